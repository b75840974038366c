"""Huge pages for XLA:CPU's per-step host allocations: the restart of the entry points and its effect."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxretina import host_memory
from train_utils import REPO_ROOT

# Prints the process id before the restart and, after it, what the restarted process has.
_RESTARTING = """
import json, os, sys
from jaxretina import host_memory
print(json.dumps({"before": os.getpid()}), flush=True)
host_memory.restart_with_huge_pages()
print(json.dumps({"after": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES"),
                  "status": host_memory.status(),
                  "child_tunables": host_memory.original_environment().get("GLIBC_TUNABLES")}))
"""

# The page faults and the value of the third run of a program whose temporaries are one block of ~200 MB.
_FAULTS_OF_A_STEP = """
import json, resource, sys
from jaxretina import host_memory
host_memory.restart_with_huge_pages()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 12 * 1024), jnp.float32)
step = jax.jit(lambda x: jnp.sum(jnp.sin(x).T @ jnp.cos(x)[:, :64]))
compiled = step.lower(x).compile()
temp = compiled.memory_analysis().temp_size_in_bytes
for _ in range(2):
  compiled(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
value = float(compiled(x))
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"temp_bytes": temp, "faults": faults, "value": value.hex(), "status": host_memory.status()}))
"""


def _python(code: str, **environment) -> list[dict]:
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.RESTARTED)}
  env.update(environment)
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=240)
  assert done.returncode == 0, done.stderr[-3000:]
  return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _skip_without_huge_pages(monkeypatch, **environment):
  for name in ("GLIBC_TUNABLES", host_memory.RESTARTED, host_memory.SWITCH):
    monkeypatch.delenv(name, raising=False)
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  reason = host_memory.why_not_restart()
  if reason:
    pytest.skip(f"this machine cannot give huge pages: {reason}")


def test_the_restart_adds_glibcs_huge_page_setting_once_and_keeps_the_process(monkeypatch):
  _skip_without_huge_pages(monkeypatch, JAXRETINA_HUGE_PAGES="1")
  before, second_before, after = _python(_RESTARTING, JAXRETINA_HUGE_PAGES="1",
                                         GLIBC_TUNABLES="glibc.malloc.arena_max=4")
  assert before["before"] == second_before["before"] == after["after"]  # exec: same process, one restart
  assert after["tunables"] == "glibc.malloc.arena_max=4:" + host_memory.TUNABLE
  assert after["status"].startswith("huge pages")
  assert after["child_tunables"] == "glibc.malloc.arena_max=4"  # what the PyTorch reference is given


def test_no_restart_when_switched_off():
  lines = _python(_RESTARTING, JAXRETINA_HUGE_PAGES="0")
  assert len(lines) == 2, lines  # printed once before, once after: no restart in between
  assert lines[1]["tunables"] is None
  assert lines[1]["status"] == "4 KiB pages (JAXRETINA_HUGE_PAGES=0)"


def test_huge_pages_take_the_page_faults_out_of_a_step(monkeypatch):
  _skip_without_huge_pages(monkeypatch, JAXRETINA_HUGE_PAGES="1")
  (small,) = _python(_FAULTS_OF_A_STEP, JAXRETINA_HUGE_PAGES="0")
  (huge,) = _python(_FAULTS_OF_A_STEP, JAXRETINA_HUGE_PAGES="1")
  assert small["temp_bytes"] >= 150 * 2**20, small  # the block the faults come from
  assert small["faults"] >= small["temp_bytes"] // 4096 // 2, small  # 4 KiB pages, each faulted anew
  assert huge["status"].startswith("huge pages"), huge
  assert huge["faults"] * 8 < small["faults"], (small, huge)
  assert huge["value"] == small["value"]  # where the memory comes from changes no bit


def test_the_switch_and_the_platform_decide(monkeypatch):
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv(host_memory.RESTARTED, raising=False)
  monkeypatch.setenv("JAXRETINA_HUGE_PAGES", "yes")
  with pytest.raises(ValueError, match=r"JAXRETINA_HUGE_PAGES='yes': expected one of auto, 1, 0"):
    host_memory.why_not_restart()
  monkeypatch.setenv("JAXRETINA_HUGE_PAGES", "auto")
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
  assert host_memory.why_not_restart() == "GLIBC_TUNABLES sets glibc.malloc.hugetlb already"
  monkeypatch.setattr(host_memory, "thp_policy", lambda: "madvise")
  assert host_memory.status().startswith("4 KiB pages (GLIBC_TUNABLES sets")  # the user's 0 is kept
  monkeypatch.delenv("GLIBC_TUNABLES")
  monkeypatch.setattr(host_memory, "thp_policy", lambda: "madvise")
  monkeypatch.setattr(host_memory, "_unsupported", lambda: "")
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert host_memory.why_not_restart().startswith("JAX will run on an accelerator (JAX_PLATFORMS=cuda,cpu")
  monkeypatch.setenv("JAXRETINA_HUGE_PAGES", "1")
  assert host_memory.why_not_restart() == ""
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JAXRETINA_HUGE_PAGES", "auto")
  assert host_memory.why_not_restart() == ""
  monkeypatch.setattr(host_memory, "thp_policy", lambda: "never")
  assert host_memory.why_not_restart() == "the kernel does not give huge pages (transparent_hugepage=never)"
  monkeypatch.setattr(host_memory, "thp_policy", lambda: "always")
  assert "already (transparent_hugepage=always)" in host_memory.why_not_restart()
  assert host_memory.status() == "huge pages (transparent_hugepage=always)"


def test_the_main_job_runs_restarted(tmp_path, monkeypatch):
  _skip_without_huge_pages(monkeypatch)  # and leaves this process's environment as a user's shell has it
  # A workdir under a regular file: the job logs its host memory, then stops with an error at once.
  (tmp_path / "file").write_text("")
  done = subprocess.run([sys.executable, "-m", "jaxretina.main", "--config", "configs/keepfit.py",
                         "--workdir", str(tmp_path / "file" / "run")], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1 and done.stderr.rstrip().splitlines()[-1].startswith("error: "), done.stderr[-2000:]
  assert "host memory: huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in done.stderr, done.stderr[-2000:]

"""Host memory for XLA:CPU's per-step allocations (jemalloc or huge pages): the entry points' restart, its effect."""

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
_VARIABLES = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF")
print(json.dumps({"before": os.getpid()}), flush=True)
host_memory.restart()
child = host_memory.original_environment()
print(json.dumps({"after": os.getpid(), "status": host_memory.status(),
                  **{name: os.environ.get(name) for name in _VARIABLES},
                  **{"child_" + name: child.get(name) for name in _VARIABLES}}))
"""

# The page faults and the value of the third run of a program whose temporaries are one block of ~200 MB.
_FAULTS_OF_A_STEP = """
import json, resource, sys
from jaxretina import host_memory
host_memory.restart()
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


_STARTING_VARIABLES = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", host_memory.RESTARTED, host_memory.SWITCH)


def _python(code: str, **environment) -> list[dict]:
  env = {k: v for k, v in os.environ.items() if k not in _STARTING_VARIABLES}
  env.update(environment)
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=240)
  assert done.returncode == 0, done.stderr[-3000:]
  return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _skip_unless_restarts(monkeypatch, **environment):
  """Skips where this machine cannot give what ``environment`` asks for; leaves this process's
  environment as a user's shell has it."""
  for name in _STARTING_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(host_memory, "_jemalloc_loaded", lambda: False)  # a test worker may run with it
  for name, value in environment.items():
    monkeypatch.setenv(name, value)
  try:
    reason = host_memory.why_not_restart()
  except FileNotFoundError as e:  # JAXRETINA_HOST_MEMORY=jemalloc without jemalloc installed
    reason = str(e)
  if reason:
    pytest.skip(f"this machine cannot give it: {reason}")


def test_the_restart_preloads_jemalloc_once_and_keeps_the_process(monkeypatch):
  _skip_unless_restarts(monkeypatch, JAXRETINA_HOST_MEMORY="jemalloc")
  before, second_before, after = _python(_RESTARTING, JAXRETINA_HOST_MEMORY="jemalloc")
  assert before["before"] == second_before["before"] == after["after"]  # exec: same process, one restart
  assert after["LD_PRELOAD"] == host_memory.find_jemalloc()
  assert after["MALLOC_CONF"] == host_memory.MALLOC_CONF
  assert after["status"].startswith(f"jemalloc (MALLOC_CONF={host_memory.MALLOC_CONF})"), after
  assert after["child_LD_PRELOAD"] is None and after["child_MALLOC_CONF"] is None  # the PyTorch reference's
  # A user's own preloads and jemalloc configuration are kept, and given back to such children.
  *_, after = _python(_RESTARTING, JAXRETINA_HOST_MEMORY="jemalloc", MALLOC_CONF="narenas:2",
                      LD_PRELOAD="libm.so.6")
  assert after["LD_PRELOAD"] == host_memory.find_jemalloc() + ":libm.so.6"
  assert after["MALLOC_CONF"] == "narenas:2" and after["status"] == \
      "jemalloc (MALLOC_CONF=narenas:2): freed memory is kept for the next step"
  assert after["child_LD_PRELOAD"] == "libm.so.6" and after["child_MALLOC_CONF"] == "narenas:2"


def test_the_restart_adds_glibcs_huge_page_setting_once_and_keeps_the_process(monkeypatch):
  _skip_unless_restarts(monkeypatch, JAXRETINA_HOST_MEMORY="huge_pages")
  before, second_before, after = _python(_RESTARTING, JAXRETINA_HOST_MEMORY="huge_pages",
                                         GLIBC_TUNABLES="glibc.malloc.arena_max=4")
  assert before["before"] == second_before["before"] == after["after"]
  assert after["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4:" + host_memory.TUNABLE
  assert after["LD_PRELOAD"] is None and after["status"].startswith("huge pages")
  assert after["child_GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4"


def test_no_restart_when_switched_off():
  lines = _python(_RESTARTING, JAXRETINA_HOST_MEMORY="off")
  assert len(lines) == 2, lines  # printed once before, once after: no restart in between
  assert lines[1]["GLIBC_TUNABLES"] is None and lines[1]["LD_PRELOAD"] is None
  assert lines[1]["status"] == "4 KiB pages, fresh each step (JAXRETINA_HOST_MEMORY=off)"


@pytest.mark.parametrize("remedy", ["jemalloc", "huge_pages"])
def test_the_remedy_takes_the_page_faults_out_of_a_step(monkeypatch, remedy):
  _skip_unless_restarts(monkeypatch, JAXRETINA_HOST_MEMORY=remedy)
  (fresh,) = _python(_FAULTS_OF_A_STEP, JAXRETINA_HOST_MEMORY="off")
  (kept,) = _python(_FAULTS_OF_A_STEP, JAXRETINA_HOST_MEMORY=remedy)
  assert fresh["temp_bytes"] >= 150 * 2**20, fresh  # the block the faults come from
  assert fresh["faults"] >= fresh["temp_bytes"] // 4096 // 2, fresh  # 4 KiB pages, each faulted anew
  assert kept["status"].startswith({"jemalloc": "jemalloc", "huge_pages": "huge pages"}[remedy]), kept
  assert kept["faults"] * 8 < fresh["faults"], (fresh, kept)
  assert kept["value"] == fresh["value"]  # where the memory comes from changes no bit


def test_the_switch_and_the_platform_decide(monkeypatch, tmp_path):
  for name in _STARTING_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(host_memory, "_jemalloc_loaded", lambda: False)
  monkeypatch.setenv("JAXRETINA_HOST_MEMORY", "yes")
  with pytest.raises(ValueError, match=r"JAXRETINA_HOST_MEMORY='yes': expected one of auto, jemalloc, "
                                       r"huge_pages, off"):
    host_memory.why_not_restart()
  monkeypatch.setattr(host_memory, "thp_policy", lambda: "never")
  assert host_memory.status().startswith("4 KiB pages, fresh each step (JAXRETINA_HOST_MEMORY='yes': "
                                         "expected")
  monkeypatch.setenv("JAXRETINA_HUGE_PAGES", "0")
  with pytest.raises(ValueError, match=r"JAXRETINA_HUGE_PAGES is now JAXRETINA_HOST_MEMORY .*=0 is "
                                       r"JAXRETINA_HOST_MEMORY=off"):
    host_memory.why_not_restart()
  monkeypatch.delenv("JAXRETINA_HUGE_PAGES")
  monkeypatch.setenv("JAXRETINA_JEMALLOC", str(tmp_path / "missing.so"))
  monkeypatch.setenv("JAXRETINA_HOST_MEMORY", "auto")
  with pytest.raises(FileNotFoundError, match=r"JAXRETINA_JEMALLOC=.*missing.so: no such file"):
    host_memory.why_not_restart()
  # Without jemalloc: huge pages where the kernel and glibc give them; an explicit request for jemalloc fails.
  monkeypatch.delenv("JAXRETINA_JEMALLOC")
  monkeypatch.setattr(host_memory, "find_jemalloc", lambda: "")
  monkeypatch.setenv("JAXRETINA_HOST_MEMORY", "jemalloc")
  with pytest.raises(FileNotFoundError, match=r"JAXRETINA_HOST_MEMORY=jemalloc: no jemalloc library found .*"
                                              r"JAXRETINA_JEMALLOC=/path/to/libjemalloc.so.2"):
    host_memory.why_not_restart()
  monkeypatch.setenv("JAXRETINA_HOST_MEMORY", "auto")
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
  assert host_memory.why_not_restart() == "no jemalloc found; GLIBC_TUNABLES sets glibc.malloc.hugetlb already"
  monkeypatch.setattr(host_memory, "thp_policy", lambda: "madvise")
  assert host_memory.status().startswith("4 KiB pages, fresh each step (no jemalloc found; GLIBC_TUNABLES")
  monkeypatch.delenv("GLIBC_TUNABLES")
  monkeypatch.setattr(host_memory, "_unsupported", lambda: "")
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert host_memory.why_not_restart().startswith("JAX will run on an accelerator (JAX_PLATFORMS=cuda,cpu")
  monkeypatch.setenv("JAXRETINA_HOST_MEMORY", "huge_pages")
  assert host_memory.why_not_restart() == ""
  assert "GLIBC_TUNABLES" in json.loads(host_memory.step_environment()[host_memory.RESTARTED])
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JAXRETINA_HOST_MEMORY", "auto")
  assert host_memory.why_not_restart() == ""
  monkeypatch.setattr(host_memory, "thp_policy", lambda: "never")
  assert host_memory.why_not_restart() == ("no jemalloc found; the kernel does not give huge pages "
                                           "(transparent_hugepage=never)")
  monkeypatch.setattr(host_memory, "thp_policy", lambda: "always")
  assert "already (transparent_hugepage=always)" in host_memory.why_not_restart()
  assert host_memory.status() == "huge pages (transparent_hugepage=always)"
  # With jemalloc, auto preloads it, on a kernel without huge pages too.
  monkeypatch.setattr(host_memory, "find_jemalloc", lambda: "/opt/lib/libjemalloc.so.2")
  monkeypatch.setattr(host_memory, "thp_policy", lambda: "never")
  environment = host_memory.step_environment()
  assert environment["LD_PRELOAD"] == "/opt/lib/libjemalloc.so.2"
  assert environment["MALLOC_CONF"] == host_memory.MALLOC_CONF and "GLIBC_TUNABLES" not in environment
  assert json.loads(environment[host_memory.RESTARTED]) == {"LD_PRELOAD": None, "MALLOC_CONF": None}


def test_the_main_job_runs_restarted(tmp_path, monkeypatch):
  _skip_unless_restarts(monkeypatch)
  # A workdir under a regular file: the job logs its host memory, then stops with an error at once.
  (tmp_path / "file").write_text("")
  done = subprocess.run([sys.executable, "-m", "jaxretina.main", "--config", "configs/keepfit.py",
                         "--workdir", str(tmp_path / "file" / "run")], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1 and done.stderr.rstrip().splitlines()[-1].startswith("error: "), done.stderr[-2000:]
  expected = ("host memory: jemalloc (MALLOC_CONF=" if host_memory.find_jemalloc() else
              "host memory: huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1")
  assert expected in done.stderr, done.stderr[-2000:]

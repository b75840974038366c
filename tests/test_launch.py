"""The launchers never launch on a dry run, wherever ``--dry-run`` stands on the line."""

import os
import stat
import subprocess

import pytest

from train_utils import REPO_ROOT


@pytest.fixture
def fake_cluster(tmp_path):
  """``sbatch`` and ``gcloud`` stand-ins that record being called."""
  log = tmp_path / "called"
  for tool in ("sbatch", "gcloud"):
    path = tmp_path / tool
    path.write_text(f"#!/bin/sh\necho {tool} >> {log}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
  return env, log


@pytest.mark.parametrize("script, options", [("slurm.sh", ["--nodes", "2"]),
                                             ("tpu_vm.sh", ["--tpu", "pod", "--zone", "us-west4-a"])])
@pytest.mark.parametrize("where", ["before", "after"])
def test_dry_run_launches_nothing(fake_cluster, script, options, where):
  env, log = fake_cluster
  job = ["--config", "configs/keepfit.py:paper", "--workdir", "/runs/k"]
  argv = options + (["--dry-run", "--"] + job if where == "before" else ["--"] + job + ["--dry-run"])
  out = subprocess.run(["bash", os.path.join(REPO_ROOT, "launch", script), *argv], env=env, capture_output=True,
                       text=True, check=True)
  assert not log.exists(), f"{script} launched on a dry run: {out.stdout}"
  assert "jaxretina.main" in out.stdout and "configs/keepfit.py:paper" in out.stdout
  assert "--dry-run" not in out.stdout  # never forwarded to the job


def test_real_run_reaches_the_scheduler(fake_cluster):
  env, log = fake_cluster
  subprocess.run(["bash", os.path.join(REPO_ROOT, "launch", "slurm.sh"), "--", "--config", "c.py"], env=env,
                 check=True, capture_output=True)
  assert log.read_text().split() == ["sbatch"]

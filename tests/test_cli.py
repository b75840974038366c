"""Command-line surfaces: the parity runner's reporting and exit code, the launch scripts' dry runs."""

import json
import os
import subprocess
import sys

import numpy as np

from conftest import REPO_ROOT


def _run(args, **kw):
  return subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, **kw)


def test_parity_cli_fails_unsupported_and_broken_cases(tmp_path):
  unknown = tmp_path / "unknown_kind"
  unknown.mkdir()
  (unknown / "meta.json").write_text(json.dumps({"case": "unknown_kind", "upstream": {"repo": "nobody/nothing",
                                                                                       "symbol": "Thing"},
                                                 "outputs": {"y": {"shape": [1], "dtype": "float32"}}}))
  np.savez(unknown / "inputs.npz", x=np.zeros(1, np.float32))
  np.savez(unknown / "outputs.npz", y=np.zeros(1, np.float32))
  not_a_case = tmp_path / "empty_dir"
  not_a_case.mkdir()
  proc = _run([sys.executable, "-m", "jaxretina.parity", str(unknown), str(not_a_case)])
  assert proc.returncode == 1, proc.stdout + proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert lines[-1] == "0 passed, 2 failed"
  assert "unsupported kind nobody/nothing:Thing" in proc.stdout
  assert "no meta.json" in proc.stdout


def test_parity_cli_reports_a_wrong_output(tmp_path):
  """A real kind with a tampered expected output fails with the output named."""
  from conftest import require_parity_dir

  src = os.path.join(require_parity_dir(), "keepfit_mha_b1_eval")
  case = tmp_path / "keepfit_mha_b1_tampered"
  case.mkdir()
  for f in ("meta.json", "weights.npz", "inputs.npz"):
    (case / f).write_bytes(open(os.path.join(src, f), "rb").read())
  out = dict(np.load(os.path.join(src, "outputs.npz")))
  out["y"] = out["y"] + 1e-2
  np.savez(case / "outputs.npz", **out)
  proc = _run([sys.executable, "-m", "jaxretina.parity", src, str(case)])
  assert proc.returncode == 1
  assert proc.stdout.strip().splitlines()[-1] == "1 passed, 1 failed"
  assert "y: max|err|" in proc.stdout


def test_launch_scripts_dry_run():
  job = ["--", "--config", "configs/keepfit.py:paper", "--workdir", "gs://b/run"]
  tpu = _run(["bash", "launch/tpu_vm.sh", "--tpu", "pod", "--zone", "z1", "--dry-run", *job])
  assert tpu.returncode == 0, tpu.stderr
  assert "--worker=all" in tpu.stdout and "jaxretina.main" in tpu.stdout and "keepfit.py:paper" in tpu.stdout
  slurm = _run(["bash", "launch/slurm.sh", "--nodes", "4", "--gpus-per-node", "8", "--dry-run", *job])
  assert slurm.returncode == 0, slurm.stderr
  assert "#SBATCH --nodes=4" in slurm.stdout and "srun python3 -m jaxretina.main" in slurm.stdout
  bad = _run(["bash", "launch/slurm.sh", "--dry-run"])
  assert bad.returncode == 2

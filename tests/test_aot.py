"""``python -m jaxretina.aot``: the train step compiled for a mesh, without data, with its figures."""

import json
import os
import subprocess
import sys

import jax

from train_utils import REPO_ROOT, tiny_keepfit_config
from jaxretina import aot

TINY = ["--config.data.image_size=32", "--config.model.vision.base_width=4", "--config.model.proj_dim=16",
        "--config.text.max_length=12", "--config.text.bert.hidden_size=16", "--config.text.bert.intermediate_size=32",
        "--config.text.bert.max_position_embeddings=16", "--config.batch_size=16"]


def test_report_has_memory_flops_and_collectives():
  report = aot.compile_train_step(tiny_keepfit_config("/nonexistent"), jax.devices())
  mem = report["memory_per_device_bytes"]
  assert set(mem) == {"arguments", "outputs", "temp", "total"} and all(v > 0 for v in mem.values())
  assert report["devices"] == jax.device_count() and report["flops_per_step"] > 0
  assert report["collectives"].get("all-reduce", 0) > 0  # gradients are reduced over the data axis


def test_cli_compiles_for_more_devices_than_the_machine_has(tmp_path):
  out = tmp_path / "aot.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "jaxretina.aot", f"--config={REPO_ROOT}/configs/keepfit.py",
                         "--devices=16", "--config.mesh=data:-1,fsdp:2", f"--json={out}", *TINY],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["devices"] == 16 and report["mesh"] == {"data": 8, "fsdp": 2}
  assert "per-device memory" in proc.stdout

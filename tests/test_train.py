"""The contrastive trainer end to end on tiny configs: sharding, resume, bad input, multi-host."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from train_utils import REPO_ROOT, tiny_keepfit_config
from jaxretina.train import checkpoint as ckpt_lib
from jaxretina.train import distributed, loop


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from jaxretina import datasets

  d = str(tmp_path_factory.mktemp("tfds"))
  datasets.ensure_built("synthetic_retina", d, config="tiny")
  return d


def _params(workdir: str, config):
  """Final params of a finished run, restored from its checkpoint."""
  mesh = distributed.make_mesh(config.mesh)
  task = loop.get_task(config, mesh)
  abstract = jax.eval_shape(task.init_state, jax.random.PRNGKey(config.seed))
  c = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_checkpointing=False)
  state = c.restore(c.latest_step(), abstract, None)
  c.close()
  return jax.device_get(state.params)


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_sharded_step_equals_single_device_step(data_dir):
  results = []
  for mesh_axes in ([("data", 8)], [("data", 1)]):
    config = tiny_keepfit_config(data_dir, mesh=mesh_axes)
    mesh = distributed.make_mesh(config.mesh)
    task = loop.get_task(config, mesh)
    abstract = jax.eval_shape(task.init_state, jax.random.PRNGKey(0))
    shardings = loop.state_shardings(mesh, abstract)
    state = jax.jit(task.init_state, out_shardings=shardings)(jax.random.PRNGKey(0))
    batch = loop.next_batch(task.data_streams(mesh), mesh)
    step = jax.jit(task.train_step, in_shardings=(shardings, distributed.batch_sharding(mesh)),
                   out_shardings=(shardings, distributed.replicated(mesh)))
    state, metrics = step(state, batch)
    assert len(batch["image"].sharding.device_set) == mesh.size
    results.append((jax.device_get(state.params), jax.device_get(state.batch_stats), float(metrics["loss"])))
  (p8, bs8, l8), (p1, bs1, l1) = results
  assert np.isfinite(l8)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  _assert_trees_close(bs8, bs1, rtol=1e-4, atol=1e-6)
  # 8 devices reduce the gradient (and the row-local contrastive loss) in another order than one.
  # Adam's first update lr·g/(|g| + eps) turns a last-bit difference of a near-zero gradient entry
  # into up to lr of parameter: nearly every entry equal to 1e-4, none further than one step of lr.
  lr = 1e-3  # the embedded config's peak rate bounds the first step's
  for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    diff = np.abs(np.asarray(a) - np.asarray(b))
    assert float(np.max(diff)) <= lr
    assert float(np.mean(diff > 1e-6 + 1e-4 * np.abs(np.asarray(b)))) <= 2e-3


def test_resume_matches_uninterrupted_run(data_dir, tmp_path):
  def run(workdir, steps):
    config = tiny_keepfit_config(data_dir, steps=steps)
    with config.unlocked():
      config.evals = {}
    loop.train_and_evaluate(config, str(workdir))
    return config

  full = tmp_path / "full"
  config = run(full, 4)
  parts = tmp_path / "parts"
  run(parts, 2)
  run(parts, 4)
  full_losses, part_losses = _losses(str(full)), _losses(str(parts))
  # Steps 3 and 4 of the resumed run saw the same batches and produced the same losses.
  for s in (1, 2, 3, 4):
    np.testing.assert_allclose(part_losses[s], full_losses[s], rtol=1e-6)
  _assert_trees_close(_params(str(parts), config), _params(str(full), config), rtol=1e-6, atol=1e-7)
  # A finished workdir resumes and finishes at once.
  run(parts, 4)
  assert max(_losses(str(parts))) == 4


def test_incompatible_checkpoint_is_refused_and_kept(data_dir, tmp_path):
  config = tiny_keepfit_config(data_dir, steps=1)
  with config.unlocked():
    config.evals = {}
  loop.train_and_evaluate(config, str(tmp_path))
  ckpt_dir = tmp_path / "checkpoints"
  before = {p: p.stat().st_mtime_ns for p in ckpt_dir.rglob("*")}
  with config.unlocked():
    config.model.proj_dim = 8
    config.total_steps = 2
  # Even told to accept the changed config, a checkpoint of another shape cannot be resumed.
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="proj|does not match"):
    loop.train_and_evaluate(config, str(tmp_path), allow_config_change=True)
  after = {p: p.stat().st_mtime_ns for p in ckpt_dir.rglob("*")}
  assert before == after


def test_non_finite_loss_stops_before_saving(data_dir, tmp_path):
  config = tiny_keepfit_config(data_dir, steps=4)
  with config.unlocked():
    config.evals = {}
    config.schedule.lr = 1e30
    config.optimizer.grad_clip = 0.0
  with pytest.raises(loop.NonFiniteLossError, match="non-finite"):
    loop.train_and_evaluate(config, str(tmp_path))
  c = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), async_checkpointing=False)
  steps = c.manager.all_steps()
  c.close()
  assert all(s < 4 for s in steps)
  losses = _losses(str(tmp_path))
  assert all(np.isfinite(losses[s]) for s in steps)


def test_typo_in_config_override_names_valid_fields(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "jaxretina.main", "--config", "configs/keepfit.py",
                         "--workdir", str(tmp_path), "--config.batchsize=3"], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "batchsize" in proc.stderr and "batch_size" in proc.stderr
  assert not os.listdir(tmp_path)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_training_matches_single_process(data_dir, tmp_path):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.path.join(REPO_ROOT, "tests") + os.pathsep + os.environ.get("PYTHONPATH", ""))
  workdir = tmp_path / "multi"
  procs = [subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "tests", "multihost_worker.py"),
                             f"127.0.0.1:{port}", "2", str(i), data_dir, str(workdir)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  p0 = dict(np.load(workdir / "params_process0.npz"))
  p1 = dict(np.load(workdir / "params_process1.npz"))
  assert p0.keys() == p1.keys()
  for k in p0:
    np.testing.assert_array_equal(p0[k], p1[k])

  config = tiny_keepfit_config(data_dir, steps=3)
  with config.unlocked():
    config.evals = {}
  single = tmp_path / "single"
  loop.train_and_evaluate(config, str(single))
  ref = _params(str(single), config)
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(ref)[0]}
  assert flat.keys() == p0.keys()
  # Cross-process all-reduces sum in another order than one process does. Adam's normalised update
  # turns a last-bit difference of a near-zero gradient entry into up to ~lr of parameter (lr ≤ 3.4e-4
  # in these 3 warm-up steps), so: nearly every entry equal to 1e-5, none further than 3 steps of lr.
  for k in flat:
    diff = np.abs(p0[k] - flat[k])
    assert float(np.max(diff)) <= 1e-3, k
    assert float(np.mean(diff > 1e-5 + 1e-4 * np.abs(flat[k]))) <= 2e-3, k

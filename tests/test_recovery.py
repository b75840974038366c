"""Checkpoint recovery: damaged steps are set aside and the run falls back, failed saves stop the run
at once, leftovers of killed runs are cleaned, user errors print one line.

One uninterrupted 4-step tiny run (``reference``) is shared: damage tests copy its workdir, break
the latest step (4) and check that the run resumes from step 3 — through the loop once (and ends
with bit-identical parameters), through ``Checkpointer.restore_latest`` for every other kind of
damage, which is the same code path without a training step.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_utils import REPO_ROOT, tiny_keepfit_config
from jaxretina.train import checkpoint as ckpt_lib
from jaxretina.train import distributed, loop
from jaxretina.train.state import TrainState

STEPS = 4
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from jaxretina import datasets

  d = str(tmp_path_factory.mktemp("tfds"))
  datasets.ensure_built("synthetic_retina", d, config="tiny")
  return d


def _config(data_dir: str, steps: int = STEPS, **overrides):
  config = tiny_keepfit_config(data_dir, steps=steps)  # checkpoint and log every step
  with config.unlocked():
    config.evals = {}
    for key, value in overrides.items():
      config[key] = value
  return config


class _Kit:
  """What restoring needs without training: the abstract sharded state and fresh data iterators."""

  def __init__(self, config):
    self.mesh = distributed.make_mesh(config.mesh)
    self.task = loop.get_task(config, self.mesh)
    abstract = jax.eval_shape(self.task.init_state, jax.random.PRNGKey(config.seed))
    self.abstract = loop.with_sharding(abstract, loop.state_shardings(self.mesh, abstract))

  def data(self) -> ckpt_lib.IteratorGroup:
    return ckpt_lib.IteratorGroup(**self.task.data_streams(self.mesh))

  def params(self, workdir) -> list[np.ndarray]:
    """The latest step's params (checksums verified by the restore)."""
    c = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_checkpointing=False)
    try:
      state, _ = c.restore_latest(self.abstract, None)
    finally:
      c.close()
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


@pytest.fixture(scope="module")
def kit(data_dir):
  return _Kit(_config(data_dir))


@pytest.fixture(scope="module")
def reference(data_dir, kit, tmp_path_factory):
  """An uninterrupted run: workdir with steps 2, 3, 4 (keep 3) and its final params."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  loop.train_and_evaluate(_config(data_dir), workdir)
  return workdir, kit.params(workdir)


def _copy(workdir: str, tmp_path) -> str:
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  return copy


def _listing(directory: str) -> dict[str, int]:
  """Every file under ``directory`` with its size and mtime: to check that nothing changed."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      st = os.stat(os.path.join(root, name))
      out[os.path.relpath(os.path.join(root, name), directory)] = (st.st_size, st.st_mtime_ns)
  return out


def _data_files(step_dir: str) -> list[str]:
  """OCDBT data files of a step: concatenated zstd-compressed array chunks (not B-tree nodes)."""
  files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
  return [f for f in files if _read(f)[:4] == ZSTD_MAGIC]


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _write(path: str, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)


def _truncate_data_files(step_dir: str) -> str:
  for f in _data_files(step_dir):
    with open(f, "r+b") as fh:
      fh.truncate(16)
  return "reading the arrays in .* failed: .*OUT_OF_RANGE"


def _flip_array_bytes(step_dir: str) -> str:
  """Flips one bit in the middle of every compressed chunk. zstd keeps incompressible float data as
  raw literals, so such an array mostly reads back without error, wrong: the checksum catches it
  (a flip the decompressor notices is damage too)."""
  for f in _data_files(step_dir):
    data = bytearray(_read(f))
    starts = [i for i in range(len(data) - 3) if data[i:i + 4] == ZSTD_MAGIC]
    for start, end in zip(starts, starts[1:] + [len(data)]):
      data[(start + end) // 2] ^= 0x01
    _write(f, bytes(data))
  return "differs from what was saved|reading the arrays in .* failed"


def _change_one_value_in_place(step_dir: str) -> str:
  """Rewrites one element of one array through TensorStore: a well-formed checkpoint whose array
  differs from what was saved (silent corruption) — only the checksum can tell."""
  import tensorstore as ts

  kvstore = {"driver": "ocdbt", "base": {"driver": "file", "path": os.path.join(step_dir, "state") + "/"}}
  keys = ts.KvStore.open(kvstore).result().list().result()
  key = min(k.decode()[:-len("/.zarray")] for k in keys if k.startswith(b"params.") and k.endswith(b"/.zarray"))
  array = ts.open({"driver": "zarr", "kvstore": dict(kvstore, path=key + "/")}, open=True).result()
  value = array.read().result()
  value.flat[0] += 1
  array.write(value).result()
  return f"the array {key.replace('.', '/')} in .* differs from what was saved \\(CRC32"


def _remove(relative: str, fault: str):
  def damage(step_dir: str) -> str:
    os.remove(os.path.join(step_dir, relative))
    return re.escape(fault)

  return damage


DAMAGE = {
    "truncated_array_files": _truncate_data_files,
    "flipped_array_bytes": _flip_array_bytes,
    "array_changed_in_place": _change_one_value_in_place,
    "missing_metadata": _remove("state/_METADATA", "state/_METADATA is missing"),
    "missing_manifest": _remove("state/manifest.ocdbt", "state/manifest.ocdbt is missing"),
    "missing_data_position": _remove("data/process_0-of-1.json", "data/process_0-of-1.json is missing"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_latest_step_is_set_aside_and_the_previous_restored(kind, kit, reference, tmp_path, capsys):
  workdir = _copy(reference[0], tmp_path)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  fault = DAMAGE[kind](os.path.join(ckpt_dir, str(STEPS)))
  capsys.readouterr()
  c = ckpt_lib.Checkpointer(ckpt_dir, async_checkpointing=False)
  state, step = c.restore_latest(kit.abstract, kit.data())
  c.close()
  assert step == STEPS - 1 and int(state.step) == STEPS - 1
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1, lines
  assert f"checkpoint step {STEPS} is damaged" in lines[0] and re.search(fault, lines[0]), lines[0]
  assert f"resuming from step {STEPS - 1}" in lines[0]
  # Set aside, not deleted, and no longer a step for Orbax.
  assert sorted(os.listdir(ckpt_dir)) == [str(STEPS - 2), str(STEPS - 1), f"{STEPS}.damaged"]
  c = ckpt_lib.Checkpointer(ckpt_dir, async_checkpointing=False)
  assert c.manager.all_steps() == [STEPS - 2, STEPS - 1]
  c.close()


def test_run_falls_back_past_a_damaged_step_and_finishes_identically(data_dir, reference, kit, tmp_path, capsys):
  workdir = _copy(reference[0], tmp_path)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  _truncate_data_files(os.path.join(ckpt_dir, str(STEPS)))
  loop.train_and_evaluate(_config(data_dir), workdir)
  assert f"checkpoint step {STEPS} is damaged" in capsys.readouterr().out
  # Step 4 was trained again from step 3 and saved under its number beside the damaged one.
  assert sorted(os.listdir(ckpt_dir)) == [str(STEPS - 2), str(STEPS - 1), str(STEPS), f"{STEPS}.damaged"]
  for got, want in zip(kit.params(workdir), reference[1]):
    np.testing.assert_array_equal(got, want)


def test_nothing_readable_stops_and_changes_nothing(kit, reference, tmp_path):
  workdir = _copy(reference[0], tmp_path)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for step in (STEPS - 2, STEPS - 1, STEPS):
    os.remove(os.path.join(ckpt_dir, str(step), "state", "_METADATA"))
  before = _listing(ckpt_dir)
  c = ckpt_lib.Checkpointer(ckpt_dir, async_checkpointing=False)
  with pytest.raises(ckpt_lib.NoReadableCheckpointError) as error:
    c.restore_latest(kit.abstract, kit.data())
  c.close()
  message = str(error.value)
  assert "nothing was moved or deleted" in message
  assert all(f"checkpoint step {s} is damaged" in message for s in (STEPS - 2, STEPS - 1, STEPS))
  assert _listing(ckpt_dir) == before
  # Steps set aside earlier and none left: still no silent start from scratch.
  for step in (STEPS - 2, STEPS - 1, STEPS):
    os.rename(os.path.join(ckpt_dir, str(step)), os.path.join(ckpt_dir, f"{step}.damaged"))
  c = ckpt_lib.Checkpointer(ckpt_dir, async_checkpointing=False)
  with pytest.raises(ckpt_lib.NoReadableCheckpointError, match="only damaged ones set aside"):
    c.restore_latest(kit.abstract, kit.data())
  c.close()


def test_other_model_shapes_stay_a_mismatch_not_damage(data_dir, reference, tmp_path):
  workdir = _copy(reference[0], tmp_path)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  config = _config(data_dir)
  with config.unlocked():
    config.model.proj_dim = 8
  other = _Kit(config)
  before = _listing(ckpt_dir)
  c = ckpt_lib.Checkpointer(ckpt_dir, async_checkpointing=False)
  with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="does not match"):
    c.restore_latest(other.abstract, None)
  c.close()
  assert _listing(ckpt_dir) == before


def test_unfinished_saves_of_a_killed_run_are_removed(reference, tmp_path, capsys):
  workdir = _copy(reference[0], tmp_path)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  stale = os.path.join(ckpt_dir, f"{STEPS + 1}{ckpt_lib.UNFINISHED_SUFFIX}")
  os.makedirs(os.path.join(stale, "state"))
  _write(os.path.join(stale, "state", "partial"), b"\0" * 100)
  c = ckpt_lib.Checkpointer(ckpt_dir, async_checkpointing=False)
  assert c.latest_step() == STEPS
  c.close()
  assert sorted(os.listdir(ckpt_dir)) == [str(s) for s in (STEPS - 2, STEPS - 1, STEPS)]
  assert "removed the unfinished checkpoint save(s)" in capsys.readouterr().out


@pytest.mark.parametrize("async_checkpointing", [False, True], ids=["sync", "async"])
def test_failed_save_stops_the_run_and_keeps_earlier_checkpoints(async_checkpointing, data_dir, kit, tmp_path,
                                                                monkeypatch):
  """The disk fills up from the save of step 3 on (Grain's writer, which Orbax runs in its background
  commit when asynchronous, raises ENOSPC)."""
  from grain._src.python.checkpoint import handler as grain_handler

  write = grain_handler.CheckpointHandler.save

  def disk_full_from_step_3(self, directory, *args, **kwargs):
    step = int(os.path.basename(os.path.dirname(str(directory))).split(".")[0])
    if step >= 3:
      path = os.path.join(str(directory), "process_0-of-1.json")
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return write(self, directory, *args, **kwargs)

  monkeypatch.setattr(grain_handler.CheckpointHandler, "save", disk_full_from_step_3)
  workdir = str(tmp_path / "run")
  with pytest.raises(ckpt_lib.CheckpointSaveError) as error:
    loop.train_and_evaluate(_config(data_dir, steps=8, async_checkpointing=async_checkpointing), workdir)
  message = str(error.value)
  assert "\n" not in message
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert f"saving checkpoint step 3 to {ckpt_dir} failed: [ENOSPC] No space left on device" in message
  assert "steps 1, 2" in message
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    last_step = max(json.loads(line)["step"] for line in f)
  assert last_step <= 4  # stopped at the failed save's step or the next one
  assert sorted(os.listdir(ckpt_dir)) == ["1", "2"]  # no unfinished 3.orbax-checkpoint-tmp left
  c = ckpt_lib.Checkpointer(ckpt_dir, async_checkpointing=False)
  _, step = c.restore_latest(kit.abstract, kit.data())
  c.close()
  assert step == 2


@pytest.mark.slow
def test_kill_9_and_resume_matches_the_uninterrupted_run(data_dir, reference, kit, tmp_path):
  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen([sys.executable, os.path.join(REPO_ROOT, "tests", "recovery_worker.py"), data_dir,
                           workdir, str(STEPS)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  # The worker stops once step STEPS-2 is committed and the next save has started
  # (recovery_worker.py), so the kill lands mid-run however slow the machine is.
  committed = os.path.join(workdir, "checkpoints", str(STEPS - 2))
  deadline = time.monotonic() + 600
  while not os.path.isdir(committed) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  assert proc.poll() is None, f"the worker ended before step {STEPS - 2} was committed: {proc.stderr.read()[-3000:]}"
  proc.send_signal(signal.SIGKILL)
  assert os.path.isdir(committed), f"no step {STEPS - 2} after 600 s"
  _, stderr = proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
  c = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_checkpointing=False)
  assert c.latest_step() < STEPS  # killed mid-run
  c.close()
  loop.train_and_evaluate(_config(data_dir, async_checkpointing=True), workdir)
  for got, want in zip(kit.params(workdir), reference[1]):
    np.testing.assert_array_equal(got, want)


class _CheckpointsAt:
  def __init__(self, step):
    self.step, self.directory = step, "/w/checkpoints"

  def latest_step(self):
    return self.step


def test_non_finite_message_tells_which_checkpoint_is_kept():
  with pytest.raises(loop.NonFiniteLossError) as error:
    loop._finite_or_raise({"loss": np.float32(np.nan)}, 7, _CheckpointsAt(None), "bfloat16")
  assert "no checkpoint was written yet" in str(error.value)
  assert "config.dtype=float32" in str(error.value)
  with pytest.raises(loop.NonFiniteLossError) as error:
    loop._finite_or_raise({"loss": np.float32(1.0), "all_finite": np.float32(0.0)}, 7, _CheckpointsAt(5), "float32")
  assert "non-finite gradients at step 7" in str(error.value)
  assert "the last checkpoint (step 5 in /w/checkpoints) is kept" in str(error.value)
  assert "float32" not in str(error.value).split("To avoid it")[1]


def _run_cli(args, **env):
  return subprocess.run([sys.executable, "-m", "jaxretina.main", *args], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, **env))


def test_cli_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
  not_a_dir = tmp_path / "file"
  not_a_dir.write_text("")
  args = ["--config", "configs/keepfit.py", "--workdir", str(not_a_dir / "run")]
  quiet = _run_cli(args, JAXRETINA_DEBUG="0")
  assert quiet.returncode == 1
  assert "Traceback" not in quiet.stderr
  errors = [line for line in quiet.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and str(not_a_dir) in errors[0], quiet.stderr
  loud = _run_cli(args, JAXRETINA_DEBUG="1")
  assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_third_party_info_is_hidden_and_ours_kept():
  from jaxretina import logs

  quiet = logs.QuietThirdPartyLogs()

  def record(path, level, exc_info=None):
    return logging.LogRecord("x", level, path, 1, "message", None, exc_info)

  assert quiet.filter(record(loop.__file__, logging.INFO))
  assert not quiet.filter(record("/site-packages/orbax/checkpoint/checkpoint_manager.py", logging.INFO))
  assert not quiet.filter(record("/site-packages/orbax/checkpoint/checkpoint_manager.py", logging.ERROR))
  try:
    raise ValueError("boom")
  except ValueError:
    warning = record("/site-packages/grain/x.py", logging.WARNING, sys.exc_info())
  assert quiet.filter(warning) and warning.exc_info is None


def test_a_step_saved_before_the_train_state_field_rename_restores(tmp_path):
  """Checkpoints written while ``TrainState.system_state`` was called ``extra`` restore into it."""
  @flax.struct.dataclass
  class StateWithTheOldFieldName:
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: dict
    rng: jax.Array
    extra: dict

  fields = dict(step=jnp.array(3, jnp.int32), params={"w": jnp.arange(4.0)}, batch_stats={"mean": jnp.zeros(2)},
                opt_state={"mu": jnp.ones(4)}, rng=jnp.zeros(2, jnp.uint32))
  centers = jnp.arange(6.0).reshape(2, 3)
  ckpt_dir = str(tmp_path / "checkpoints")
  c = ckpt_lib.Checkpointer(ckpt_dir, async_checkpointing=False)
  c.save(3, StateWithTheOldFieldName(**fields, extra={"feature_centers": centers}), None, force=True)
  c.wait()
  c.close()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          TrainState(**fields, system_state={"feature_centers": centers}))
  c = ckpt_lib.Checkpointer(ckpt_dir, async_checkpointing=False)
  try:
    state, step = c.restore_latest(abstract, None)
  finally:
    c.close()
  assert step == 3 and isinstance(state, TrainState)
  np.testing.assert_array_equal(np.asarray(state.system_state["feature_centers"]), np.asarray(centers))
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.arange(4.0))

"""What a run leaves in its workdir: logs rewritten from the restored step after an interruption,
gs:// workdirs end to end (on a stand-in for Cloud Storage), config.json guarding against silent
config changes, report files (permissions, heat-map figures), plain progress lines, and no stray
temporary folders from dataset builds."""

from __future__ import annotations

import io
import json
import os
import stat
import struct
import tempfile

import numpy as np
import pytest
from PIL import Image

import fake_gcs
from train_utils import tiny_keepfit_config
from jaxretina import fileio, inference
from jaxretina.evaluators import plots
from jaxretina.train import loop
from jaxretina.train.metrics import Progress, read_metrics


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from jaxretina import datasets

  d = str(tmp_path_factory.mktemp("tfds"))
  datasets.ensure_built("synthetic_retina", d, config="tiny")
  return d


def _config(data_dir, steps, **fields):
  config = tiny_keepfit_config(data_dir, steps=steps)
  with config.unlocked():
    config.evals = {}
    for key, value in fields.items():
      config[key] = value
  return config


class Interrupted(Exception):
  pass


def _interrupt_before_step(monkeypatch, step: int) -> None:
  """The run dies when it fetches the batch of ``step`` (as a killed job would, between steps)."""
  real = loop.next_batch
  calls = [0]

  def next_batch(streams, mesh):
    calls[0] += 1
    if calls[0] == step:
      raise Interrupted(f"killed before step {step}")
    return real(streams, mesh)

  monkeypatch.setattr(loop, "next_batch", next_batch)


def _tensorboard_scalars(logdir: str) -> list[tuple[str, int]]:
  """(tag, step) of every scalar as TensorBoard shows them: the event files in name order, where a
  SessionLog START at step s (tensorboardX's purge_step) drops what was logged before at steps >= s."""
  from tensorboardX.proto import event_pb2

  shown = []
  for name in fileio.listdir(logdir):
    data = fileio.read_bytes(fileio.join(logdir, name))
    pos = 0
    while pos < len(data):  # TFRecord: length, its CRC, the Event, its CRC
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        shown = [(tag, step) for tag, step in shown if step < event.step]
      shown += [(value.tag, event.step) for value in event.summary.value]
  return shown


def _loss_steps(workdir: str) -> list[int]:
  return [row["step"] for row in read_metrics(workdir) if "loss" in row]


def test_resume_after_interruption_logs_each_step_once(data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  config = _config(data_dir, 4, checkpoint_every=2)
  _interrupt_before_step(monkeypatch, 4)
  with pytest.raises(Interrupted):
    loop.train_and_evaluate(config, workdir)
  monkeypatch.undo()
  # Steps 1..3 were logged, step 2 checkpointed: step 3 will be trained and logged again.
  assert _loss_steps(workdir) == [1, 2, 3]
  assert sorted(s for tag, s in _tensorboard_scalars(os.path.join(workdir, "tensorboard")) if tag == "loss") == [
      1, 2, 3]

  loop.train_and_evaluate(config, workdir)
  assert _loss_steps(workdir) == [1, 2, 3, 4]
  shown = _tensorboard_scalars(os.path.join(workdir, "tensorboard"))
  assert len(shown) == len(set(shown))
  assert sorted(s for tag, s in shown if tag == "loss") == [1, 2, 3, 4]
  # A finished run opened again rewrites nothing and adds no event file.
  events = fileio.listdir(os.path.join(workdir, "tensorboard"))
  loop.train_and_evaluate(config, workdir)
  assert _loss_steps(workdir) == [1, 2, 3, 4]
  assert fileio.listdir(os.path.join(workdir, "tensorboard")) == events


def test_gs_workdir_trains_resumes_and_restores_without_local_files(data_dir, tmp_path, monkeypatch):
  bucket_root = tmp_path / "gcs"
  fake_gcs.install(monkeypatch, str(bucket_root))
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)  # a path handled by os instead of epath would appear here as gs:/...
  workdir = "gs://bucket/keepfit"
  loop.train_and_evaluate(_config(data_dir, 2), workdir)
  loop.train_and_evaluate(_config(data_dir, 3), workdir)  # resumes from the checkpoint in the bucket

  assert os.listdir(cwd) == []
  stored = bucket_root / "bucket" / "keepfit"
  assert sorted(os.listdir(stored / "checkpoints")) == ["1", "2", "3"]
  assert _loss_steps(workdir) == [1, 2, 3]
  assert json.loads((stored / "config.json").read_text())["total_steps"] == 3
  assert json.loads((stored / "config.2.json").read_text())["total_steps"] == 2  # the run's length grew at step 2
  assert sorted(s for tag, s in _tensorboard_scalars(f"{workdir}/tensorboard") if tag == "loss") == [1, 2, 3]
  run = inference.load_run(workdir)
  assert run.kind == "contrastive" and run.variables["params"]


def test_reports_write_to_gs(tmp_path, monkeypatch):
  from jaxretina import predict
  from jaxretina.transfer import runner

  bucket_root = tmp_path / "gcs"
  fake_gcs.install(monkeypatch, str(bucket_root))
  monkeypatch.chdir(tmp_path)
  out = "gs://bucket/eval"
  image = np.full((20, 30, 3), 90, np.uint8)
  plots.save_heatmap_png(image, np.eye(4), f"{out}/heatmaps/a.png", title="a")
  labels, probs = np.array([0, 1, 1]), np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
  result = dict(folds=[dict(aca=0.5)], summary=dict(aca=dict(mean=0.5, std=0.0)))
  runner.write_reports(f"{out}/transfer", result, ["a", "b"], [[0, "x", "a", "a", "0.8", "0.2"]], labels, probs)
  rows = [predict.Result(predict.Entry(("x.png",)), probabilities=np.array([0.25, 0.75]))]
  predict.write_csv(rows, ["a", "b"], ["image"], f"{out}/predictions.csv")

  assert not os.path.exists(tmp_path / "gs:")
  stored = bucket_root / "bucket" / "eval"
  assert Image.open(stored / "heatmaps" / "a.png").width > 2 * plots.HEATMAP_MIN_SIDE
  assert sorted(os.listdir(stored / "transfer")) == ["confusion_matrix.png", "metrics.csv", "metrics.json",
                                                     "predictions.csv", "roc.png"]
  assert "0.750000" in (stored / "predictions.csv").read_text()


def test_remote_event_file_is_rewritten_at_each_flush_and_continues_in_a_new_object(tmp_path, monkeypatch):
  from jaxretina.train import metrics

  fake_gcs.install(monkeypatch, str(tmp_path))
  events = metrics._RemoteEventFile("gs://bucket/tb/events", rotate_bytes=10)
  events.write(b"12345678")
  events.flush()
  events.write(b"abcd")
  events.flush()  # 12 bytes: the object is complete, later records go to events.1
  events.write(b"xyz")
  events.close()
  assert (tmp_path / "bucket" / "tb" / "events").read_bytes() == b"12345678abcd"
  assert (tmp_path / "bucket" / "tb" / "events.1").read_bytes() == b"xyz"


def _snapshot(workdir) -> dict:
  return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in workdir.rglob("*") if p.is_file()}


def test_changed_config_is_refused_unless_allowed_and_the_old_one_is_kept(data_dir, tmp_path):
  workdir = tmp_path / "run"
  loop.train_and_evaluate(_config(data_dir, 1), str(workdir))
  original = (workdir / "config.json").read_text()
  before = _snapshot(workdir)

  changed = _config(data_dir, 2)
  with changed.unlocked():
    changed.seed = 7
    changed.model.logit_scale_init = 0.1
  with pytest.raises(loop.ConfigChangedError) as refused:
    loop.train_and_evaluate(changed, str(workdir))
  message = str(refused.value)
  assert "seed: 42 → 7" in message and "model.logit_scale_init: 0.07 → 0.1" in message
  assert "total_steps" not in message  # the run's length may change
  assert "--allow_config_change" in message
  assert _snapshot(workdir) == before

  # Fields that do not change training pass without the flag.
  quiet = _config(data_dir, 1, log_every=5)
  loop.train_and_evaluate(quiet, str(workdir))

  loop.train_and_evaluate(changed, str(workdir), allow_config_change=True)
  history = sorted(p.name for p in workdir.glob("config.*.json"))
  assert history == ["config.1.1.json", "config.1.json"]
  assert (workdir / "config.1.json").read_text() == original
  assert json.loads((workdir / "config.1.1.json").read_text())["log_every"] == 5
  assert json.loads((workdir / "config.json").read_text())["seed"] == 7
  assert _loss_steps(str(workdir)) == [1, 2]


def test_a_workdir_whose_config_predates_declared_fields_resumes_and_loads(data_dir, tmp_path):
  workdir = tmp_path / "run"
  loop.train_and_evaluate(_config(data_dir, 1), str(workdir))
  path = workdir / "config.json"
  old = json.loads(path.read_text())
  # As written before these fields were declared, and before config.augment was a ConfigDict.
  del old["model"]["name"], old["model"]["norm_features"], old["remat"], old["eval_every_epochs"]
  old["augment"] = "flair"
  path.write_text(json.dumps(old))
  assert inference.load_config(str(workdir)).model.norm_features is True
  assert inference.load_run(str(workdir)).kind == "contrastive"

  # The same config: the same training, so config.json is brought up to date without a copy.
  loop.train_and_evaluate(_config(data_dir, 1), str(workdir))
  assert not list(workdir.glob("config.*.json"))
  assert json.loads(path.read_text())["augment"] == {"recipe": "flair"}

  # Trained further: the guard sees no change that alters training.
  path.write_text(json.dumps(old))
  loop.train_and_evaluate(_config(data_dir, 2), str(workdir))
  assert _loss_steps(str(workdir)) == [1, 2]


def test_config_differences_name_the_fields_that_change_training():
  old = {"log_every": 10, "total_steps": 5, "schedule": {"lr": 0.1, "name": "cosine"}, "evals": {"a": {"k": 1}},
         "data": {"data_dir": "/a", "image_size": 64}}
  new = {"log_every": 20, "total_steps": 9, "schedule": {"lr": 0.1, "name": "constant"}, "evals": {},
         "data": {"data_dir": "gs://b/tfds", "image_size": 64}, "seed": 1}
  training, other = loop.config_differences(old, new)
  assert training == ['schedule.name: "cosine" → "constant"', "seed: (absent) → 1"]
  assert other == ['data.data_dir: "/a" → "gs://b/tfds"', "evals: (absent) → {}", "evals.a.k: 1 → (absent)",
                   "log_every: 10 → 20", "total_steps: 5 → 9"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(tmp_path, umask):
  previous = os.umask(umask)
  try:
    png = plots.save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.png")
    text = fileio.write_text(tmp_path / "b" / "c.json", "{}")
  finally:
    os.umask(previous)
  for path in (png, text):
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
  assert sorted(os.listdir(tmp_path)) == ["a.png", "b"]  # no temporary files left


def test_heatmap_figure_shows_the_image_at_its_resolution_with_the_map_on_the_seen_region():
  green = np.zeros((400, 600, 3), np.uint8)
  green[...] = (10, 200, 30)
  heat = np.arange(16.0).reshape(4, 4)
  # The model saw the left half of the image only.
  figure = plots.heatmap_figure(green, heat, box=(0, 0, 400, 300), title="a title")
  plain = np.all(figure == (10, 200, 30), axis=-1)
  # The input panel at full resolution, and the right half of the attention panel left uncoloured.
  assert plain.sum() == 400 * 600 + 400 * 300
  assert figure.shape[1] > 2 * 600
  small = plots.heatmap_figure(green[:40, :60], heat)
  assert np.all(small == (10, 200, 30), axis=-1).sum() == round(40 * plots.HEATMAP_MIN_SIDE / 60) * \
      plots.HEATMAP_MIN_SIDE  # enlarged to the minimum side; the map covers all of the second panel
  big = plots.heatmap_figure(np.repeat(np.repeat(green, 4, axis=0), 4, axis=1), heat)
  assert big.shape[0] < 1600 and np.all(big == (10, 200, 30), axis=-1).sum() == \
      round(1600 * plots.HEATMAP_MAX_SIDE / 2400) * plots.HEATMAP_MAX_SIDE


def test_progress_writes_plain_lines_when_not_on_a_terminal():
  stream = io.StringIO()
  progress = Progress(total_steps=4, start_step=0, global_batch_size=8, enabled=True, stream=stream)
  for step in (2, 4):
    progress.update(step, loss=0.5)
  progress.close()
  text = stream.getvalue()
  assert "\r" not in text
  lines = text.splitlines()
  assert len(lines) == 2 and text.endswith("\n")
  assert lines[0].startswith("step 2/4 (50%) loss=0.5 img/s=") and lines[1].endswith("eta 0s")


def test_building_a_dataset_leaves_no_temporary_folder(tmp_path, monkeypatch):
  from jaxretina import datasets

  temp = tmp_path / "tmp"
  temp.mkdir()
  monkeypatch.setenv("TMPDIR", str(temp))  # the build's worker processes
  monkeypatch.setattr(tempfile, "tempdir", str(temp))  # this process
  datasets.ensure_built("synthetic_retina", str(tmp_path / "tfds"), config="tiny")
  assert os.listdir(temp) == []

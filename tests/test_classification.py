"""The classification trainer: every config's local run for a few steps, sharding invariance of the
DualAttendMed augmentation/center machinery, and the errors a user meets with bad input."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxretina.configlib import load_config_module
from jaxretina.models import attention_augment, wsdan
from jaxretina.train import distributed, loop
from jaxretina.train.checkpoint import IncompatibleCheckpointError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("classification_data"))


def tiny_config(name: str, data_dir: str, *, steps: int = 2, arg: str = ""):
  """The config's embedded local run shrunk to tiny data (32 px) and a tiny model."""
  config = load_config_module(os.path.join(REPO_ROOT, "configs", f"{name}.py")).get_config(
      ",".join(filter(None, [arg, f"steps={steps}"])))
  with config.unlocked():
    config.data.data_dir = data_dir
    config.data.builder_kwargs = dict(config="tiny")
    config.data.image_size = 32
    config.batch_size = 8
    config.log_every = 1
    config.checkpoint_every = 1
    config.async_checkpointing = False
    config.evals.classification.batch_size = 8
    config.evals.classification.heatmaps = 2
    config.evals.classification.cam_fit_examples = 16
    m = config.model
    if name == "dual_attend_med":
      m.backbone_base_width, m.num_attentions = 8, 4
    elif name == "crd_net":
      m.backbone_base_width, m.cross_dim = 8, 16
    elif name == "bira_net":
      m.backbone.update(block="basic", layers=[1, 1, 1, 1], base_width=8)
    elif name == "fcn_clip":
      m.vision.update(block="bottleneck", layers=[1, 1, 1, 1], base_width=8)
      m.proj_dim, m.decoder_channels = 16, [32, 16]
  return config


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("name", ["dual_attend_med", "crd_net", "bira_net", "fcn_clip"])
def test_local_run_trains_evaluates_and_writes_reports(name, data_dir, tmp_path):
  workdir = str(tmp_path / name)
  final = loop.train_and_evaluate(tiny_config(name, data_dir), workdir)
  assert np.isfinite(final["eval/classification/accuracy"])
  n = int(final["eval/classification/n"])
  assert n > 0
  rows = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
  out_dir = os.path.join(workdir, "eval", "classification", "step_2")
  report = json.load(open(os.path.join(out_dir, "metrics.json")))
  assert np.asarray(report["confusion_matrix"]).sum() == n
  for png in ("confusion_matrix.png", "roc.png"):
    assert os.path.getsize(os.path.join(out_dir, png)) > 1000
  if name in ("dual_attend_med", "bira_net", "fcn_clip"):  # models with attention maps
    assert len(os.listdir(os.path.join(out_dir, "heatmaps"))) == 2
  if name == "dual_attend_med":
    assert 0.0 <= final["eval/classification/cam_iou_mean"] <= 1.0
    assert len(report["cam_iou_per_image"]) == n
  if name == "crd_net":
    assert set(report["heads"]) == {"image", "oct"}
  if name == "fcn_clip":  # the notebook's validation loss, what its ReduceLROnPlateau monitors
    assert np.isfinite(final["eval/classification/loss"]) and final["eval/classification/loss"] > 0


def test_dualattendmed_step_updates_feature_centers_and_survives_resume(data_dir, tmp_path):
  workdir = str(tmp_path / "dam")
  config = tiny_config("dual_attend_med", data_dir, steps=1)
  loop.train_and_evaluate(config, workdir)
  with config.unlocked():
    config.total_steps = 2
  loop.train_and_evaluate(config, workdir)  # resumes step 1 → 2 (restoring the centers)
  from jaxretina.train.checkpoint import Checkpointer

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_checkpointing=False)
  assert ckpt.latest_step() == 2
  ckpt.close()


def test_crop_drop_and_center_update_are_sharding_invariant():
  """Under jit on 8 devices (batch sharded) the result equals the single-device result."""
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(size=(16, 32, 32, 3)), jnp.float32)
  maps = jnp.asarray(rng.uniform(size=(16, 4, 4, 2)), jnp.float32)
  features = jnp.asarray(rng.normal(size=(16, 24)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, 16), jnp.int32)
  centers = jnp.asarray(rng.normal(size=(3, 24)), jnp.float32)
  key = jax.random.PRNGKey(3)

  def step(images, maps, features, labels, centers):
    k_crop, k_drop = jax.random.split(key)
    crop = attention_augment.attention_crop(images, maps[..., 0], (0.4, 0.6), 0.1, key=k_crop)
    drop = attention_augment.attention_drop(images, maps[..., 1], (0.2, 0.5), key=k_drop)
    new_centers = wsdan.update_feature_centers(centers, features, labels, rule="dualattendmed")
    return crop, drop, new_centers

  single = jax.jit(step)(images, maps, features, labels, centers)
  mesh = distributed.make_mesh([("data", -1)])
  assert mesh.size == 8
  batch = NamedSharding(mesh, P("data"))
  rep = NamedSharding(mesh, P())
  args = [jax.device_put(a, batch) for a in (images, maps, features, labels)] + [jax.device_put(centers, rep)]
  sharded = jax.jit(step, out_shardings=(batch, batch, rep))(*args)
  for a, b in zip(single, sharded):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  assert len(sharded[0].sharding.device_set) == 8


def test_wrong_number_of_modalities_is_a_clear_error(data_dir, tmp_path):
  config = tiny_config("crd_net", data_dir)
  with config.unlocked():
    config.data.fields = "image:3"
  with pytest.raises(ValueError, match="crd_net fuses exactly 2 image modalities"):
    loop.train_and_evaluate(config, str(tmp_path / "crd"))
  config = tiny_config("dual_attend_med", data_dir)
  with config.unlocked():
    config.data.fields = "image:3,oct:1"
  with pytest.raises(ValueError, match="wsdan takes one image modality"):
    loop.train_and_evaluate(config, str(tmp_path / "dam"))
  with config.unlocked():
    config.data.fields = "image"
  with pytest.raises(ValueError, match="config.data.fields='image'"):
    loop.train_and_evaluate(config, str(tmp_path / "dam"))


def test_label_out_of_range_names_the_record(data_dir, tmp_path):
  config = tiny_config("dual_attend_med", data_dir)
  with config.unlocked():
    config.data.num_classes = 3
    config.data.class_names = ["a", "b", "c"]
  with pytest.raises(ValueError, match=r"label \d of record \d+ \(id '.*'\) of dataset 'synthetic_retina/tiny', "
                                       r"split 'train' is outside \[0, 3\)"):
    loop.train_and_evaluate(config, str(tmp_path / "dam"))
  assert not os.path.exists(str(tmp_path / "dam" / "checkpoints"))


def test_class_count_mismatch_with_checkpoint_is_refused(data_dir, tmp_path):
  workdir = str(tmp_path / "bira")
  loop.train_and_evaluate(tiny_config("bira_net", data_dir, steps=1), workdir)
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  config = tiny_config("bira_net", data_dir, steps=2)
  with config.unlocked():
    config.data.label_subset = [0, 1, 2, 3]
    config.data.num_classes = 4
    config.data.class_names = ["a", "b", "c", "d"]
  with pytest.raises(IncompatibleCheckpointError, match="classifier"):  # even with the config change allowed
    loop.train_and_evaluate(config, workdir, allow_config_change=True)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before

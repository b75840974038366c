"""FLAIR's full-network fine-tuning (``jaxretina.transfer.finetune``) on tiny encoders and images."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretina.models import flair, layers, resnet
from jaxretina.transfer import finetune as ft
from jaxretina.transfer import linear_probe


class TinyEncoder(nn.Module):
  """BatchNorm on the raw pixels (so its statistics are those of the images) → conv → ReLU → GAP."""

  width: int = 4

  @nn.compact
  def __call__(self, x, train=False):
    x = layers.BatchNorm(name="bn")(x, use_running_average=not train)
    x = layers.Conv2d(self.width, 3, padding=1, name="conv")(x)
    return jnp.mean(nn.relu(x), axis=(1, 2))


def colour_set(seed, n, num_classes=3, size=8, noise=0.3, signal=0.6):
  """Images whose dominant colour channel is the class; float32 in [0, 1]."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n)
  images = rng.uniform(0.0, noise, (n, size, size, 3)).astype(np.float32)
  images[np.arange(n), :, :, labels] += signal
  return np.clip(images, 0.0, 1.0), labels


def he_filled(module, input_shape, seed=0):
  """Variables of ``module`` filled on the host (He-normal kernels, BN identity): XLA's CPU compile of a
  ResNet's random init takes longer than the whole fine-tuning run."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape), leaf.dtype)
    return jnp.ones(leaf.shape, leaf.dtype) if name in ("scale", "var") else jnp.zeros(leaf.shape, leaf.dtype)

  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(input_shape))
  return jax.tree_util.tree_map_with_path(fill, shapes)


def tiny(seed=0, size=8):
  encoder = TinyEncoder()
  return encoder, encoder.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))


def test_flair_vision_model_learns_colours_and_updates_batch_stats():
  backbone = resnet.ResNet("basic", (1, 1, 1, 1), base_width=4, num_classes=None)
  encoder = flair.VisionModel(backbone, proj_dim=8)
  variables = he_filled(encoder, (1, 16, 16, 3))
  x_train, y_train = colour_set(1, 24, size=16)
  x_test, y_test = colour_set(2, 30, size=16)
  x_train_u8 = np.round(x_train * 255).astype(np.uint8)  # uint8 input path
  result = ft.finetune(jax.random.key(3), encoder, variables, x_train_u8, y_train, 3, epochs=6, batch_size=8,
                       lr=3e-3, log=None)
  assert result.best_epoch == 5 and np.all(np.isnan(result.history["val_f1"]))  # no val: last epoch
  accuracy = np.mean(np.argmax(np.asarray(result.predict_proba(x_test)), -1) == y_test)
  assert accuracy >= 0.8, accuracy

  # Running statistics moved (train-mode BN) and evaluation reads them.
  before = variables["batch_stats"]["model"]["bn1"]
  after = result.variables["batch_stats"]["encoder"]["model"]["bn1"]
  assert int(after["num_batches_tracked"]) == 6 * 3
  assert not np.allclose(before["mean"], after["mean"])
  logits = result.logits(x_test)
  manual = result.module.apply(result.variables, jnp.asarray(x_test), train=False)
  np.testing.assert_allclose(logits, manual, rtol=1e-5, atol=1e-5)
  stale = {**result.variables, "batch_stats": {"encoder": variables["batch_stats"]}}
  assert not np.allclose(result.module.apply(stale, jnp.asarray(x_test), train=False), manual, atol=1e-3)


@pytest.mark.parametrize("num_classes", [3, 2])
def test_lp_initialised_head_starts_from_the_probe(num_classes):
  encoder, variables = tiny()
  x, y = colour_set(4, 18, num_classes=num_classes)
  probe = ft.fit_probe_head(encoder, variables, x, y)
  feats = ft.encoder_features(encoder, variables, x)
  result = ft.finetune(jax.random.key(0), encoder, variables, x, y, num_classes, epochs=0, head_init=probe, log=None)
  assert result.best_epoch == -1 and result.history["train_loss"].shape == (0,)
  logits = np.asarray(result.logits(x))
  decision = np.asarray(probe.decision_function(feats))
  if num_classes == 2:
    # One-row binary head: logits [0, z] whose softmax is upstream's [1 − σ(z), σ(z)].
    assert result.variables["params"]["head"]["kernel"].shape == (feats.shape[1], 1)
    np.testing.assert_array_equal(logits[:, 0], 0.0)
    np.testing.assert_allclose(logits[:, 1], decision[:, 0], rtol=1e-5, atol=1e-5)
  else:
    np.testing.assert_allclose(logits, decision, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(result.predict_proba(x), probe.predict_proba(feats), rtol=1e-5, atol=1e-6)

  trained = ft.finetune(jax.random.key(0), encoder, variables, x, y, num_classes, epochs=2, batch_size=6,
                        head_init=probe, lr=1e-2, log=None)
  assert np.all(np.isfinite(trained.history["train_loss"]))
  assert not np.allclose(trained.logits(x), logits)


def test_model_selection_returns_best_epoch_and_stops_with_patience():
  encoder, variables = tiny()
  x, y = colour_set(5, 16, noise=0.8, signal=0.25)
  x_val, y_val = colour_set(6, 12, noise=0.8, signal=0.25)

  # Nothing can change (lr 0, BN frozen): the first epoch stays best and patience ends the run.
  frozen = ft.finetune(jax.random.key(0), encoder, variables, x, y, 3, val_images=x_val, val_labels=y_val, epochs=10,
                       batch_size=8, lr=0.0, patience=2, update_bn=False, log=None)
  assert frozen.best_epoch == 0 and frozen.history["val_f1"].shape == (3,)
  assert len(set(frozen.history["val_f1"].tolist())) == 1
  jax.tree.map(np.testing.assert_array_equal, frozen.variables["params"]["encoder"], variables["params"])

  lines = []
  result = ft.finetune(jax.random.key(1), encoder, variables, x, y, 3, val_images=x_val, val_labels=y_val, epochs=12,
                       batch_size=8, lr=5e-2, patience=3, log=lines.append)
  f1 = result.history["val_f1"]
  run = f1.shape[0]
  assert result.best_epoch == int(np.argmax(f1))  # first maximum: later ties are no improvement
  assert run == result.best_epoch + 1 + 3 < 12  # stopped early, 3 epochs after the best
  assert len(lines) == run + 1  # one line per epoch and the early-stopping note
  # The returned weights are the best epoch's, not the last epoch's: the same run cut at the best epoch.
  probs = np.asarray(result.predict_proba(x_val))
  np.testing.assert_allclose(ft._macro_f1(y_val, probs), f1[result.best_epoch], rtol=1e-6)
  cut = ft.finetune(jax.random.key(1), encoder, variables, x, y, 3, val_images=x_val, val_labels=y_val,
                    epochs=result.best_epoch + 1, batch_size=8, lr=5e-2, patience=None, log=None)
  jax.tree.map(np.testing.assert_array_equal, result.variables, cut.variables)

  # Without a validation split: every epoch runs and the last one is returned.
  last = ft.finetune(jax.random.key(1), encoder, variables, x, y, 3, epochs=2, batch_size=8, lr=5e-2, log=None)
  assert last.best_epoch == 1 and np.all(np.isnan(last.history["val_f1"]))
  np.testing.assert_array_equal(last.history["train_loss"], result.history["train_loss"][:2])


def test_remainder_batch_statistics_exclude_padding():
  encoder, variables = tiny()
  rng = np.random.default_rng(7)
  image = rng.uniform(0.0, 1.0, (8, 8, 3)).astype(np.float32)
  x = np.repeat(image[None], 6, axis=0)  # identical samples: the statistics do not depend on the order
  y = np.array([0, 1, 2, 0, 1, 2])
  result = ft.finetune(jax.random.key(0), encoder, variables, x, y, 3, epochs=1, batch_size=4, lr=0.0, log=None)
  bn = result.variables["batch_stats"]["encoder"]["bn"]
  assert int(bn["num_batches_tracked"]) == 2

  mean = image.reshape(-1, 3).astype(np.float64).mean(0)
  biased = image.reshape(-1, 3).astype(np.float64).var(0)
  pixels = 8 * 8
  full, rest = 4 * pixels, 2 * pixels  # a batch of 4, then the remainder of 2 at its own size
  expected_mean = 0.9 * (0.9 * 0.0 + 0.1 * mean) + 0.1 * mean
  expected_var = 0.9 * (0.9 * 1.0 + 0.1 * biased * full / (full - 1)) + 0.1 * biased * rest / (rest - 1)
  np.testing.assert_allclose(bn["mean"], expected_mean, rtol=1e-5)
  np.testing.assert_allclose(bn["var"], expected_var, rtol=1e-5)


def test_mesh_matches_single_device():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("data",))
  encoder, variables = tiny()
  x, y = colour_set(8, 20)  # 2 batches of 8, then 4 samples (not divisible by 8 devices)
  x_val, y_val = colour_set(9, 10)
  kwargs = dict(val_images=x_val, val_labels=y_val, epochs=2, batch_size=8, lr=1e-2, patience=None, log=None)
  single = ft.finetune(jax.random.key(2), encoder, variables, x, y, 3, **kwargs)
  sharded = ft.finetune(jax.random.key(2), encoder, variables, x, y, 3, mesh=mesh, **kwargs)
  assert sharded.best_epoch == single.best_epoch
  np.testing.assert_allclose(sharded.history["train_loss"], single.history["train_loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), sharded.variables,
               single.variables)
  np.testing.assert_allclose(sharded.logits(x_val), single.logits(x_val), rtol=1e-4, atol=1e-5)

  with pytest.raises(ValueError, match="batch_size=4 must be divisible by the 8 data shards"):
    ft.finetune(jax.random.key(2), encoder, variables, x, y, 3, mesh=mesh, batch_size=4, epochs=1, log=None)
  other = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("model",))
  with pytest.raises(ValueError, match="'data' axis"):
    ft.finetune(jax.random.key(2), encoder, variables, x, y, 3, mesh=other, epochs=1, log=None)


def test_bad_inputs_raise_clear_errors():
  encoder, variables = tiny()
  x, y = colour_set(10, 6)
  key = jax.random.key(0)
  call = lambda **kw: ft.finetune(key, encoder, variables, **{"train_images": x, "train_labels": y,
                                                               "num_classes": 3, "epochs": 1, "log": None, **kw})
  with pytest.raises(ValueError, match=r"train_images must be \(N, S, S, 3\)"):
    call(train_images=x[..., :2])
  with pytest.raises(ValueError, match=r"train_images must lie in \[0, 1\]"):
    call(train_images=x * 255)
  with pytest.raises(ValueError, match="train_labels must lie in"):
    call(train_labels=y + 3)
  with pytest.raises(ValueError, match=r"train_labels must be \(6,\) integers"):
    call(train_labels=y[:5])
  with pytest.raises(ValueError, match="both val_images and val_labels"):
    call(val_images=x)
  with pytest.raises(ValueError, match="val_images images are"):
    call(val_images=x[:, :4], val_labels=y)
  with pytest.raises(ValueError, match="num_classes=1"):
    call(num_classes=1, train_labels=np.zeros(6, int))
  with pytest.raises(ValueError, match="encoder_variables must be a dict with 'params'"):
    ft.finetune(key, encoder, variables["params"], x, y, 3, log=None)
  with pytest.raises(TypeError, match="head_init must be a linear_probe.LinearProbe"):
    call(head_init={"coef": 0})
  feats = np.asarray(ft.encoder_features(encoder, variables, x))
  shifted = linear_probe.fit(feats, np.arange(6) % 3 + 1)  # classes 1..3, not 0..2
  with pytest.raises(ValueError, match=r"head_init was fitted on classes \[1, 2, 3\]"):
    call(head_init=shifted)

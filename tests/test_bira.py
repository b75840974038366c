"""BiRA-Net: RA-Net masking (element-wise vs upstream matmul), grading loss, trainable mask, bilinear net."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretina.models import bira, convert, resnet
from helpers import random_variables


def _features(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _trunk():
  return resnet.ResNet(block="bottleneck", layers=(1, 1, 1, 1), base_width=4, num_classes=None)


@pytest.fixture(scope="module")
def tiny_kenet():
  """A jitted train-mode forward+backward of a tiny KeNet (64×64 → 2×2 maps, 128 channels)."""
  model = bira.KeNet(features=_trunk(), num_classes=5)
  x = _features(0, (2, 64, 64, 3))
  labels = jnp.array([1, 4])
  variables = random_variables(model, x)

  def loss_fn(params):
    log_probs, state = model.apply({**variables, "params": params}, x, train=True,
                                   mutable=["batch_stats", "intermediates"], rngs={"dropout": jax.random.key(0)})
    return bira.interclass_loss(log_probs, labels), (log_probs, state["intermediates"])

  (loss, (log_probs, inter)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
  return dict(model=model, variables=variables, x=x, loss=loss, log_probs=log_probs, inter=inter, grads=grads)


def test_kenet_outputs_log_probabilities_and_grads(tiny_kenet):
  log_probs = tiny_kenet["log_probs"]
  assert log_probs.shape == (2, 5)
  np.testing.assert_allclose(jax.nn.logsumexp(log_probs, axis=-1), 0.0, atol=1e-5)
  inter = tiny_kenet["inter"]
  assert inter["trunk_output"][0].shape == (2, 2, 2, 128)
  assert inter["attention"][0].shape == (2, 2, 2, 1)
  assert inter["gap"][0].shape == (2, 128)
  grads = tiny_kenet["grads"]
  assert np.isfinite(tiny_kenet["loss"])
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  assert np.abs(grads["ra"]["attention_1"]["kernel"]).sum() > 0
  assert np.abs(grads["denses_2"]["kernel"]).sum() > 0


def test_masking_flag_elementwise_vs_matmul():
  ra = bira.RAAttention()
  feats = _features(1, (2, 3, 3, 6))
  variables = random_variables(ra, feats)
  gap, att = jax.jit(ra.apply)(variables, feats)
  up = np.asarray(att) * np.asarray(variables["params"]["up_c2"]["kernel"][0, 0, 0])  # (B, h, w, C)
  expected = (up * np.asarray(feats)).mean((1, 2)) / up.mean((1, 2))
  np.testing.assert_allclose(gap, expected, rtol=1e-5)
  gap_mm, _ = jax.jit(bira.RAAttention(matmul_masking=True).apply)(variables, feats)
  f = np.asarray(feats).transpose(0, 3, 1, 2)  # NCHW, as torch.matmul saw it
  a = up.transpose(0, 3, 1, 2)
  expected_mm = np.matmul(a, f).mean((2, 3)) / a.mean((2, 3))
  np.testing.assert_allclose(gap_mm, expected_mm, rtol=1e-4, atol=1e-5)
  assert not np.allclose(gap, gap_mm)


def test_constant_attention_gives_plain_average_and_matmul_needs_square_maps():
  ra = bira.RAAttention()
  feats = _features(2, (1, 2, 5, 4))  # non-square: fine element-wise
  variables = random_variables(ra, feats)
  params = jax.tree_util.tree_map(lambda a: a, variables["params"])
  params["attention_7"] = {"kernel": np.zeros_like(params["attention_7"]["kernel"]),
                           "bias": np.full_like(params["attention_7"]["bias"], 0.3)}
  gap, _ = jax.jit(ra.apply)({**variables, "params": params}, feats)
  np.testing.assert_allclose(gap, np.asarray(feats).mean((1, 2)), rtol=1e-5)
  with pytest.raises(ValueError, match="square"):
    bira.RAAttention(matmul_masking=True).apply(variables, feats)


def test_interclass_loss_value_gradient_and_detach_flag():
  log_probs = jnp.log(jnp.array([[0.7, 0.1, 0.1, 0.05, 0.05], [0.1, 0.1, 0.2, 0.5, 0.1]]))
  labels = jnp.array([0, 1])
  # Sample 0: correct (w = 1/15); sample 1: predicted 3 for grade 1 (w = 3/12).
  expected = 0.5 * (-np.log(0.7) / 15 + 3 / 12 * -np.log(0.1))
  np.testing.assert_allclose(bira.interclass_loss(log_probs, labels), expected, rtol=1e-5)
  np.testing.assert_allclose(bira.interclass_loss(log_probs, labels, detach_loss=True), expected, rtol=1e-5)
  grad = jax.grad(bira.interclass_loss)(log_probs, labels)
  np.testing.assert_allclose(grad[0, 0], -0.5 / 15, rtol=1e-5)  # the weight itself is constant
  np.testing.assert_allclose(grad[1, 1], -0.5 * 3 / 12, rtol=1e-5)
  detached = jax.grad(lambda lp: bira.interclass_loss(lp, labels, detach_loss=True))(log_probs)
  np.testing.assert_array_equal(detached, 0.0)
  with pytest.raises(ValueError, match="labels"):
    bira.interclass_loss(log_probs, jnp.array([0, 1, 2]))


def test_upstream_trainable_mask(tiny_kenet):
  mask = bira.upstream_trainable_mask(tiny_kenet["variables"]["params"])
  assert mask["features"]["conv1"]["kernel"] is False
  assert mask["features"]["layer2_0"]["conv1"]["kernel"] is False
  assert mask["features"]["layer3_0"]["conv1"]["kernel"] is True
  assert mask["ra"]["up_c2"]["kernel"] is False
  assert mask["ra"]["attention_1"]["kernel"] is True and mask["denses_0"]["kernel"] is True


def test_upstream_key_mapping():
  assert bira.upstream_key("features.0.weight") == "features.conv1.weight"
  assert bira.upstream_key("features.7.0.conv2.weight") == "features.layer4.0.conv2.weight"
  assert bira.upstream_key("up_c2.weight") == "ra.up_c2.weight"
  with pytest.raises(convert.ConversionError, match="features.3"):
    bira.upstream_key("features.3.weight")


def test_bilinear_net_shapes():
  model = bira.BiRANet(backbone=_trunk(), num_classes=4)
  x = _features(3, (2, 32, 32, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  params = shapes["params"]
  assert params["classifier"]["kernel"].shape == (128 * 128, 4)  # flattened C x C outer product
  assert "net_b" in params["branch_1"] and "net_b" in params["branch_2"]
  logits, state = jax.eval_shape(
      lambda v: model.apply(v, x, mutable=["intermediates"]), shapes)
  assert logits.shape == (2, 4)
  assert state["intermediates"]["bilinear"][0].shape == (2, 128 * 128)


def _paper_config(variant):
  import os

  from jaxretina.configlib import load_config_module

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return load_config_module(os.path.join(repo, "configs", "bira_net.py")).get_config(f"paper,variant={variant}")


@pytest.mark.parametrize("variant", ["ra_net", "bira_net"])
def test_paper_recipe_freezes_what_upstream_train_freezes(variant):
  """``:paper`` leaves out of SGD what upstream ``train()`` sets ``requires_grad=False``:
  ``features[:-2]`` (stem, layer1, layer2) and the constant-1 ``up_c2``, in every branch."""
  from flax import traverse_util

  from jaxretina.systems import build_classification_system
  from jaxretina.train.classification import frozen_mask

  config = _paper_config(variant)
  with config.unlocked():
    config.model.backbone.update(block="bottleneck", layers=[1, 1, 1, 1], base_width=4)
  module = build_classification_system(config, 5, {"image": 3}).module
  params = convert.variables_shape(module, jnp.zeros((1, 64, 64, 3)))["params"]
  trainable = traverse_util.flatten_dict(frozen_mask(params, config.optimizer.frozen), sep="/")
  for branch in ([""] if variant == "ra_net" else ["branch_1/", "branch_2/"]):
    for path in ("ra/up_c2/kernel", "features/conv1/kernel", "features/bn1/scale", "features/layer1_0/conv2/kernel",
                 "features/layer2_0/downsample_1/bias"):
      assert trainable[branch + path] is False, branch + path
    for path in ("features/layer3_0/conv1/kernel", "features/layer4_0/bn3/scale", "ra/attention_0/scale",
                 "ra/attention_7/kernel"):
      assert trainable[branch + path] is True, branch + path
  if variant == "ra_net":
    assert trainable == traverse_util.flatten_dict(bira.upstream_trainable_mask(params), sep="/")


def test_paper_recipe_loss_is_the_papers_and_ce_reproduces_upstream():
  """Default: the paper's grading loss. ``loss.name='ce'`` is what upstream ``train()`` minimises:
  CE on KeNet's log-probabilities (= CE on the logits)."""
  from jaxretina.systems import build_classification_system

  config = _paper_config("ra_net")
  assert config.loss.name == "grading" and config.loss.detach_loss is False
  with config.unlocked():
    config.model.backbone.update(block="bottleneck", layers=[1, 1, 1, 1], base_width=4)
    config.model.dropout_rate = 0.0
    config.loss.name = "ce"
  classifier = build_classification_system(config, 5, {"image": 3})
  x = _features(4, (2, 64, 64, 3))
  labels = jnp.array([1, 4])
  variables = random_variables(classifier.module, x)
  loss, _ = classifier.loss(variables, {}, {"image": x}, labels, jax.random.key(0), 0)
  log_probs, _ = classifier.module.apply(variables, x, train=True, mutable=["batch_stats"])
  expected = -np.mean(np.asarray(log_probs)[np.arange(2), np.asarray(labels)])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_paper_frozen_set_matches_the_train_step_fixture():
  """The ``:paper`` (``variant=ra_net``) frozen patterns select exactly the fixture's ``meta.frozen``."""
  import os

  from flax import traverse_util

  from conftest import parity_train_dir, require_parity_dir
  from jaxretina import parity
  from jaxretina.train.classification import frozen_mask

  case_dir = os.path.join(require_parity_dir(parity_train_dir()), "bira_train_step")
  if not os.path.isdir(case_dir):
    pytest.skip(f"{case_dir} missing")
  case = parity.load_case(case_dir)
  trunk = resnet.from_constructor(case.constructor["backbone"], num_classes=None)
  dense = int(case.constructor.get("channel_remap", {}).get("256", 256))
  model = bira.KeNet(features=trunk, num_classes=5, dense_width=dense, matmul_masking=True)
  placement = {}
  shape = (1,) + parity.nchw_to_nhwc(case.inputs["x"]).shape[1:]
  variables = bira.from_torch(case.weights, model, input_shape=shape, placement=placement)
  trainable = traverse_util.flatten_dict(frozen_mask(variables["params"], _paper_config("ra_net").optimizer.frozen),
                                         sep="/")
  frozen = {path for path, t in trainable.items() if not t}
  assert frozen == {"/".join(placement[key][1:]) for key in case.meta["frozen"]}

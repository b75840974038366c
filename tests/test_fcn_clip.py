"""FCN-CLIP: frozen-encoder forward, fusion, CBAM gating flag, encoder BN flag, losses, class weights, conversion."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import require_parity_dir
from jaxretina.models import convert, fcn_clip, resnet
from helpers import random_variables


def _tiny(**kw):
  trunk = resnet.ResNet(block="bottleneck", layers=(1, 1, 1, 1), base_width=4, num_classes=None)
  return fcn_clip.FCNCLIP(vision=trunk, proj_dim=8, decoder_channels=(16, 16), cbam_reduction=4, **kw)


@pytest.fixture(scope="module")
def tiny_run():
  """Everything the model tests need from one compiled function (compiles dominate on CPU)."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
  labels = jnp.array([1, 3])
  text = jnp.asarray(np.random.default_rng(1).standard_normal((5, 8)), jnp.float32)
  weights = jnp.array([0.1, 0.3, 0.2, 0.2, 0.2])
  fused = _tiny(use_fusion=True)
  variables = random_variables(fused, x)
  m = {name: _tiny(**kw) for name, kw in (("once", {}), ("twice", {"double_cbam_gating": True}),
                                          ("enc_bn", {"use_fusion": True, "encoder_bn_batch_stats": True}))}
  plain = {**variables, "params": {k: v for k, v in variables["params"].items() if k != "fusion"}}

  @jax.jit
  def run(params):
    def loss_fn(p):
      (logits, z), state = fused.apply({**variables, "params": p}, x, train=True,
                                       mutable=["batch_stats", "intermediates"],
                                       rngs={"dropout": jax.random.key(0)})
      losses = fcn_clip.hybrid_loss(logits, z, text, labels, weights)
      return losses["loss"], (state, losses)

    (_, (state, losses)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    _, enc_state = m["enc_bn"].apply(variables, x, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": jax.random.key(0)})
    (logits_once, z), inter = m["once"].apply(plain, x, mutable=["intermediates"])
    logits_twice, _ = m["twice"].apply(plain, x)
    return dict(grads=grads, state=state, losses=losses, enc_state=enc_state, logits_once=logits_once,
                logits_twice=logits_twice, z=z, inter=inter["intermediates"])

  return dict(out=run(variables["params"]), variables=variables, plain=plain, x=x)


def test_shapes_fusion_and_unit_norm_embedding(tiny_run):
  out = tiny_run["out"]
  assert out["logits_once"].shape == (2, 5)
  np.testing.assert_allclose(np.linalg.norm(out["z"], axis=-1), 1.0, rtol=1e-5)
  inter = out["inter"]
  assert inter["layer2"][0].shape == (2, 8, 8, 32) and inter["layer3"][0].shape == (2, 4, 4, 64)
  assert inter["decoded"][0].shape == (2, 8, 8, 16)  # layer3 map upsampled x2
  fused = out["state"]["intermediates"]
  assert fused["fused"][0].shape == (2, 8, 8, 64)  # fusion: layer2 resolution, layer3 width
  assert fused["decoded"][0].shape == (2, 16, 16, 16)


def test_double_cbam_gating_flag(tiny_run):
  out = tiny_run["out"]
  d, a = np.asarray(out["inter"]["decoded"][0]), np.asarray(out["inter"]["attended"][0])
  head = tiny_run["plain"]["params"]["classifier_2"]
  once = a.mean((1, 2)) @ head["kernel"] + head["bias"]
  twice = (d * a).mean((1, 2)) @ head["kernel"] + head["bias"]
  np.testing.assert_allclose(out["logits_once"], once, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["logits_twice"], twice, rtol=1e-4, atol=1e-5)
  assert not np.allclose(once, twice)


def test_encoder_is_frozen_and_decoder_trains(tiny_run):
  grads, variables = tiny_run["out"]["grads"], tiny_run["variables"]
  enc = jax.tree_util.tree_leaves(grads["vision_model"])
  assert enc and all(np.all(g == 0) for g in enc)
  for name in ("fusion", "decoder_0", "decoder_5", "classifier_2"):
    assert np.abs(grads[name]["kernel"]).sum() > 0
  assert np.abs(grads["attention"]["spatial_gate_0"]["kernel"]).sum() > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  # Default: the frozen encoder's BN keeps its running statistics; the decoder's BN updates.
  stats = tiny_run["out"]["state"]["batch_stats"]
  before = variables["batch_stats"]
  np.testing.assert_array_equal(stats["vision_model"]["model"]["bn1"]["mean"], before["vision_model"]["model"]["bn1"]["mean"])
  assert not np.allclose(stats["decoder_1"]["mean"], before["decoder_1"]["mean"])
  # Upstream quirk: model.train() also puts the frozen encoder's BN in batch-statistics mode.
  enc_stats = tiny_run["out"]["enc_state"]["batch_stats"]["vision_model"]["model"]["bn1"]
  assert not np.allclose(enc_stats["mean"], before["vision_model"]["model"]["bn1"]["mean"])
  assert int(enc_stats["num_batches_tracked"]) == 1


def test_focal_loss_properties():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.standard_normal((6, 5)) * 2, jnp.float32)
  labels = jnp.array([0, 1, 2, 3, 4, 1])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(fcn_clip.focal_loss(logits, labels, gamma=0.0), ce.mean(), rtol=1e-6)
  for flag in (False, True):  # without class weights the quirk changes nothing
    np.testing.assert_allclose(fcn_clip.focal_loss(logits, labels, pt_from_weighted_ce=flag),
                               np.mean((1 - np.exp(-ce)) ** 2 * ce), rtol=1e-5)
  w = jnp.array([0.1, 0.2, 0.3, 0.2, 0.2])
  pt = np.exp(-ce)
  np.testing.assert_allclose(fcn_clip.focal_loss(logits, labels, w, reduction="none"),
                             w[labels] * (1 - pt) ** 2 * ce, rtol=1e-5)
  wce = w[labels] * ce
  np.testing.assert_allclose(fcn_clip.focal_loss(logits, labels, w, reduction="sum", pt_from_weighted_ce=True),
                             np.sum((1 - np.exp(-wce)) ** 2 * wce), rtol=1e-5)
  grads = jax.grad(fcn_clip.focal_loss)(logits, labels, w)
  assert np.all(np.isfinite(grads)) and np.abs(grads).sum() > 0
  with pytest.raises(ValueError, match="reduction"):
    fcn_clip.focal_loss(logits, labels, reduction="avg")
  with pytest.raises(ValueError, match="class_weights"):
    fcn_clip.focal_loss(logits, labels, jnp.ones(4))


def test_contrastive_and_hybrid_loss():
  rng = np.random.default_rng(4)
  z, text = rng.standard_normal((3, 8)), rng.standard_normal((5, 8))
  labels = np.array([0, 4, 2])
  zn = z / np.linalg.norm(z, axis=-1, keepdims=True)
  tn = text / np.linalg.norm(text, axis=-1, keepdims=True)
  expected = 0.01 * optax.softmax_cross_entropy_with_integer_labels(zn @ tn.T / 0.2, labels).mean()
  np.testing.assert_allclose(fcn_clip.contrastive_loss(z, text, labels), expected, rtol=1e-5)
  logits = rng.standard_normal((3, 5))
  losses = fcn_clip.hybrid_loss(logits, z, text, labels, None)
  np.testing.assert_allclose(losses["loss"], 0.7 * losses["focal_loss"] + 0.3 * losses["contrastive_loss"],
                             rtol=1e-6)


def test_compute_class_weights_matches_notebook():
  labels = np.repeat(np.arange(5), [445, 200, 200, 180, 180])
  weights, sample_weights = fcn_clip.compute_class_weights(labels)
  np.testing.assert_allclose(weights, [0.1293, 0.1973, 0.1644, 0.2545, 0.2545], atol=1e-4)
  assert sample_weights.shape == labels.shape
  np.testing.assert_allclose(sample_weights[-1] / sample_weights[0], weights[4] / weights[0], rtol=1e-5)
  with pytest.raises(ValueError, match=r"\[0, 5\)"):
    fcn_clip.compute_class_weights([0, 7])


def test_from_torch_rejects_inconsistent_encoder_copies():
  d = os.path.join(require_parity_dir(), "fcnclip_model_eval")
  with np.load(os.path.join(d, "weights.npz")) as z:
    state_dict = {k: z[k] for k in z.files}
  trunk = resnet.ResNet(block="bottleneck", layers=(1, 1, 1, 1), base_width=8, num_classes=None)
  model = fcn_clip.FCNCLIP(vision=trunk, proj_dim=32, decoder_channels=(64, 32), cbam_reduction=16, use_fusion=True)
  variables = fcn_clip.from_torch(state_dict, model)
  np.testing.assert_array_equal(variables["params"]["decoder_0"]["bias"], state_dict["decoder.0.bias"])
  key = "vision_model.model.conv1.weight"
  state_dict["clip_model." + key] = state_dict["clip_model." + key] + 1.0
  with pytest.raises(convert.ConversionError, match="differ"):
    fcn_clip.from_torch(state_dict, model)

"""FLAIR / KeepFIT two-tower model, expert-revision attention and losses (jaxretina.models.flair)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxretina.models import bert, convert, flair, resnet

PROJ = 8


def _tiny(**kw):
  vision = resnet.ResNet("basic", (1, 1, 1, 1), base_width=4, num_classes=None)
  text = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=16)
  return flair.TwoTower(vision=vision, text=text, proj_dim=PROJ, **kw)


def _batch(b=3, length=7, pad_from=None, seed=0):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.random((b, 32, 32, 3)), jnp.float32)
  ids = rng.integers(1, 50, (b, length)).astype(np.int32)
  mask = np.ones((b, length), np.int32)
  if pad_from is not None:
    ids[0, pad_from:] = 0
    mask[0, pad_from:] = 0
  return images, jnp.asarray(ids), jnp.asarray(mask)


@functools.lru_cache(maxsize=None)
def _kd_variables():
  """Random variables of the tiny KeepFIT model, made once for the whole module.

  Filled from numpy on the shapes of ``init`` rather than by ``jax.jit(model.init)``, whose XLA
  compilation alone costs ~20 s of CPU.
  """
  from flax import traverse_util

  rng = np.random.default_rng(0)
  shapes = traverse_util.flatten_dict(convert.variables_shape(_tiny(knowledge_attention=True), *_batch()))
  out = {}
  for path, leaf in shapes.items():
    name = path[-1]
    if name in ("scale", "var"):
      value = np.ones(leaf.shape)
    elif name in ("bias", "mean", "num_batches_tracked"):
      value = np.zeros(leaf.shape)
    elif name == "logit_scale":
      value = np.log(1 / 0.07)
    else:  # kernels and embeddings
      fan_in = int(np.prod(leaf.shape[:-1])) if name == "kernel" else 1
      value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), leaf.shape)
    out[path] = jnp.asarray(value, leaf.dtype)
  return traverse_util.unflatten_dict(out)


def _tiny_variables(knowledge_attention=False):
  variables = _kd_variables()
  if knowledge_attention:
    return variables
  params = {k: v for k, v in variables["params"].items() if k != "attention"}
  return {"params": params, "batch_stats": variables["batch_stats"]}


def _apply(model, *args, method=None):
  """Jitted ``model.apply`` (eager dispatch of a whole ResNet + BERT is slower than compiling it)."""
  return jax.jit(functools.partial(model.apply, method=method))(*args)


# ---------------------------------------------------------------------------------------- losses


def test_soft_ce_equals_hard_ce_for_identity_targets():
  logits = jax.random.normal(jax.random.key(1), (5, 5)) * 3
  labels = jnp.arange(5)
  hard = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
  np.testing.assert_allclose(flair.softce_clip_loss(logits, flair.identity_targets(5)), hard, rtol=1e-6)


def test_soft_ce_uses_the_soft_targets():
  logits = jax.random.normal(jax.random.key(2), (4, 4))
  target = flair.cooccurrence_targets([0, 1, 0, 2])
  logp = jax.nn.log_softmax(logits, -1)
  logp_t = jax.nn.log_softmax(logits.T, -1)
  expected = 0.5 * (-(target * logp).sum(-1).mean() - (target * logp_t).sum(-1).mean())
  np.testing.assert_allclose(flair.softce_clip_loss(logits, target), expected, rtol=1e-6)
  with pytest.raises(ValueError, match="softce_clip_loss"):
    flair.softce_clip_loss(logits[:3], target)


def test_cooccurrence_targets_rows_sum_to_one():
  names = ["no dr", "moderate dr", "no dr", "edema", "no dr"]
  target = np.asarray(flair.cooccurrence_targets(names))
  np.testing.assert_allclose(target.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(target[0], [1 / 3, 0, 1 / 3, 0, 1 / 3], rtol=1e-6)
  np.testing.assert_allclose(target[1], [0, 1, 0, 0, 0])
  np.testing.assert_array_equal(target, np.asarray(flair.cooccurrence_targets(jnp.array([0, 1, 0, 2, 0]))))


def test_keepfit_loss_composition():
  keys = jax.random.split(jax.random.key(3), 5)
  img, txt, rev = (jax.random.normal(k, (4, PROJ)) for k in keys[:3])
  kd_img, kd_txt = (jax.random.normal(k, (3, PROJ)) for k in keys[3:])
  target, kd_target = flair.identity_targets(4), flair.identity_targets(3)
  total, parts = flair.keepfit_loss(img, txt, kd_img, kd_txt, rev, jnp.float32(2.0), target, kd_target)
  np.testing.assert_allclose(parts["revision_mse"], jnp.mean((txt - rev) ** 2), rtol=1e-6)
  np.testing.assert_allclose(total, parts["clip"] + parts["kd_clip"] + 100 * parts["revision_mse"], rtol=1e-6)
  total1, _ = flair.keepfit_loss(img, txt, kd_img, kd_txt, rev, jnp.float32(2.0), target, kd_target, mse_weight=1.0)
  assert float(total1) < float(total)


# ---------------------------------------------------------------------------------- temperature


def test_logit_scale_clamp_and_its_gradient():
  np.testing.assert_allclose(flair.clamp_logit_scale(jnp.array([-1.0, 2.0, 4.75])), [0.0, 2.0, 4.6052], rtol=1e-7)
  txt = jnp.eye(2, 3)
  img = jnp.eye(2, 3)
  np.testing.assert_allclose(flair.logits_per_text(txt, img, jnp.float32(4.75)), np.exp(4.6052) * np.eye(2),
                             rtol=1e-5)
  # Upstream clamps .data in place: the gradient still reaches the parameter beyond the bound.
  grad = jax.grad(lambda s: flair.logits_per_text(txt, img, s).sum())(jnp.float32(4.75))
  np.testing.assert_allclose(grad, 2 * np.exp(4.6052), rtol=1e-5)


def test_logit_scale_param_initialisation():
  # Only the temperature is created: the towers are initialised lazily when called.
  variables = _tiny(logit_scale_init=0.05).init(jax.random.key(0), method=lambda m: m.logit_scale)
  assert list(variables["params"]) == ["logit_scale"]
  np.testing.assert_allclose(variables["params"]["logit_scale"], np.log(1 / 0.05), rtol=1e-6)


# ----------------------------------------------------------------------------------- attention


def _mha_inputs(b=2):
  k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
  return jax.random.normal(k1, (b, 3, 8)), jax.random.normal(k2, (b, 5, 8)), jax.random.normal(k3, (b, 5, 8))


@pytest.mark.parametrize("over_heads", [False, True])
def test_mha_softmax_axis_flag(over_heads):
  q, k, v = _mha_inputs()
  module = flair.MultiHeadAttention(num_hiddens=8, num_heads=2, softmax_over_heads=over_heads)
  variables = module.init(jax.random.key(0), q, k, v)
  out, weights = module.apply(variables, q, k, v)
  assert out.shape == (2, 3, 8) and weights.shape == (2, 2, 3, 5)
  over_keys = np.asarray(weights.sum(-1))
  over_batch_heads = np.asarray(weights.reshape(4, 3, 5).sum(0))
  if over_heads:
    np.testing.assert_allclose(over_batch_heads, 1.0, rtol=1e-5)
    assert not np.allclose(over_keys, 1.0)
  else:
    np.testing.assert_allclose(over_keys, 1.0, rtol=1e-5)
    assert not np.allclose(over_batch_heads, 1.0)


def test_mha_dropout_uses_injected_draws():
  q, k, v = _mha_inputs(b=1)
  module = flair.MultiHeadAttention(num_hiddens=8, num_heads=2, dropout=0.5)
  variables = module.init(jax.random.key(0), q, k, v)
  eval_out, _ = module.apply(variables, q, k, v)
  keep_all = jnp.ones((1, 2, 3, 5), bool)
  # Keeping every weight only rescales by 1/(1-p) = 2, and W_o is linear.
  out, _ = module.apply(variables, q, k, v, deterministic=False, dropout_keep=keep_all)
  np.testing.assert_allclose(out, 2 * eval_out, rtol=1e-5, atol=1e-6)
  drop_all, _ = module.apply(variables, q, k, v, deterministic=False, dropout_keep=~keep_all)
  np.testing.assert_allclose(drop_all, 0.0, atol=1e-7)
  sampled, _ = module.apply(variables, q, k, v, deterministic=False, rngs={"dropout": jax.random.key(5)})
  assert not np.allclose(sampled, eval_out)
  with pytest.raises(ValueError, match="divisible"):
    flair.MultiHeadAttention(num_hiddens=9, num_heads=2).init(jax.random.key(0), q, k, v)


# ------------------------------------------------------------------------------------ the model


def test_masked_pooling_differs_only_with_padding():
  variables = _tiny_variables()
  unmasked, masked = _tiny(text_pooling="all_positions"), _tiny(text_pooling="masked")
  _, ids, mask = _batch()
  _, pids, pmask = _batch(pad_from=4)

  @jax.jit
  def encode_all(v):
    enc = lambda m, i, k: m.apply(v, i, k, method=flair.TwoTower.encode_text)  # noqa: E731
    return enc(unmasked, ids, mask), enc(masked, ids, mask), enc(unmasked, pids, pmask), enc(masked, pids, pmask)

  full_a, full_b, pad_a, pad_b = (np.asarray(x) for x in encode_all(variables))
  np.testing.assert_allclose(full_a, full_b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(pad_a[0], pad_b[0], atol=1e-4)  # the padded row
  np.testing.assert_allclose(pad_a[1:], pad_b[1:], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(pad_a, axis=-1), 1.0, rtol=1e-5)


def test_projection_false_returns_raw_features():
  model = _tiny(projection=False)
  variables = convert.variables_shape(model, *_batch())
  img, txt = jax.eval_shape(model.apply, variables, *_batch())
  assert img.shape == (3, 32) and txt.shape == (3, 16)  # ResNet-basic 4·8 channels, BERT hidden 16
  assert "projection_head_vision" not in variables["params"]["vision_model"]


def test_jitted_train_step_is_finite_and_updates():
  model = _tiny(knowledge_attention=True, softmax_over_heads=False)
  variables = _tiny_variables(knowledge_attention=True)
  params, batch_stats = variables["params"], variables["batch_stats"]
  images, ids, mask = _batch(b=4, pad_from=5)
  target = flair.cooccurrence_targets(jnp.array([0, 1, 0, 2]))

  def loss_fn(p, key):
    (img, txt), new_state = model.apply({"params": p, "batch_stats": batch_stats}, images, ids, mask, train=True,
                                        mutable=["batch_stats"], rngs={"dropout": key})
    revised = model.apply({"params": p}, img, img[:2], txt[:2], train=True, method=flair.TwoTower.revise,
                          rngs={"dropout": key})
    loss, _ = flair.keepfit_loss(img, txt, img[:2], txt[:2], revised, p["logit_scale"], target,
                                 flair.identity_targets(2))
    return loss, new_state

  @jax.jit
  def step(p, key):
    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, key)
    new_p = jax.tree_util.tree_map(lambda w, g: w - 1e-2 * g, p, grads)
    new_p["logit_scale"] = flair.clamp_logit_scale(new_p["logit_scale"])
    return loss, grads, new_p, new_state

  loss, grads, new_params, new_state = step(params, jax.random.key(7))
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  assert float(jnp.abs(grads["attention"]["W_q"]["kernel"]).sum()) > 0
  assert float(jnp.abs(grads["vision_model"]["model"]["conv1"]["kernel"]).sum()) > 0
  assert not np.allclose(new_params["text_model"]["projection_head_text"]["projection"]["kernel"],
                         params["text_model"]["projection_head_text"]["projection"]["kernel"])
  assert int(new_state["batch_stats"]["vision_model"]["model"]["bn1"]["num_batches_tracked"]) == 1


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  variables = _tiny_variables()
  both = jax.jit(lambda v, *b: (_tiny().apply(v, *b), _tiny(dtype=jnp.bfloat16).apply(v, *b)))
  fp32, bf16 = both(variables, *_batch())
  for a, b in zip(fp32, bf16):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, atol=0.05)


def test_text_prototypes_are_unnormalised_means():
  model, variables = _tiny(), _tiny_variables()
  _, ids, mask = _batch(b=4)
  protos = flair.text_prototypes(model, variables, [(ids[:2], mask[:2]), (ids[2:], mask[2:])])
  emb = _apply(model, variables, ids, mask, method=flair.TwoTower.encode_text)
  np.testing.assert_allclose(protos[0], emb[:2].mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(protos[1], emb[2:].mean(0), rtol=1e-5, atol=1e-6)
  assert float(jnp.linalg.norm(protos[0])) < 1.0


def _to_torch_keys(variables):
  from flax import traverse_util

  from jaxretina.models.convert import flax_path_to_torch

  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias", "mean": "running_mean",
          "var": "running_var", "num_batches_tracked": "num_batches_tracked"}
  out = {}
  for path, v in traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, variables)).items():
    if path[1:] == ("logit_scale",):
      out["logit_scale"] = v
      continue
    if path[-1] == "kernel":
      v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
    out[f"{flax_path_to_torch(path[1:-1])}.{leaf[path[-1]]}"] = v
  return out


def test_from_torch_roundtrip_and_strictness():
  model = _tiny(knowledge_attention=True)
  variables = _tiny_variables(knowledge_attention=True)
  state_dict = _to_torch_keys(variables)
  assert "vision_model.projection_head_vision.projection.weight" in state_dict
  assert "text_model.model.encoder.layer.1.attention.self.query.weight" in state_dict
  assert "attention.W_o.weight" in state_dict
  state_dict["text_model.model.embeddings.position_ids"] = np.arange(16)[None]  # ignored buffer
  back = flair.from_torch(state_dict, model, image_shape=(1, 32, 32, 3))
  for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  del state_dict["attention.W_q.weight"]
  with pytest.raises(convert.ConversionError, match="attention/W_q/kernel"):
    flair.from_torch(state_dict, model, image_shape=(1, 32, 32, 3))


def test_bad_configuration_is_reported():
  with pytest.raises(ValueError, match="text_pooling"):
    jax.eval_shape(_tiny(text_pooling="cls").init, jax.random.key(0), *_batch())
  with pytest.raises(ValueError, match="knowledge_attention"):
    model = _tiny()
    emb = jnp.zeros((2, PROJ))
    jax.eval_shape(functools.partial(model.apply, method=flair.TwoTower.revise),
                   convert.variables_shape(model, *_batch()), emb, emb, emb)

"""OpenAI CLIP ModifiedResNet / AttentionPool2d: shapes, resolution checks, attention maths, conversion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretina.models import clip_resnet, convert
from helpers import random_variables


@pytest.fixture(scope="module")
def tiny_resnet():
  model = clip_resnet.ModifiedResNet(layers=(1, 1, 1, 1), output_dim=12, heads=2, input_resolution=32, width=8)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  variables = random_variables(model, x)

  def loss(params):
    emb, taps = model.apply({**variables, "params": params}, x, return_taps=True)
    return jnp.sum(emb ** 2), (emb, taps)

  # One jitted forward+backward serves the shape, jit and gradient checks (one compile).
  (value, (emb, taps)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  return model, variables, x, dict(value=value, emb=emb, taps=taps, grads=grads)


def test_modified_resnet_shapes_and_taps(tiny_resnet):
  _, variables, _, out = tiny_resnet
  taps = out["taps"]
  assert out["emb"].shape == (2, 12)
  assert taps["stem"].shape == (2, 8, 8, 8)  # /2 conv, /2 avg-pool
  assert taps["layer1"].shape == (2, 8, 8, 32)
  assert taps["layer4"].shape == (2, 1, 1, 256)  # width*32 channels at stride 32
  params = variables["params"]
  # Stride-1 layer1 changes channels (8 -> 32): 1x1 downsample conv; the pool has no parameters.
  assert set(params["layer1_0"]["downsample_0"]) == {"kernel"}
  assert "downsample_0" in params["layer4_0"] and "bias" not in params["conv1"]
  assert params["attnpool"]["positional_embedding"].shape == (2, 256)


def test_modified_resnet_rejects_other_resolutions(tiny_resnet):
  model, variables, _, _ = tiny_resnet
  with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\)"):
    model.apply(variables, jnp.zeros((1, 64, 64, 3)))


def test_modified_resnet_grads_finite_and_nonzero(tiny_resnet):
  _, _, _, out = tiny_resnet
  leaves = jax.tree_util.tree_leaves(out["grads"])
  assert np.isfinite(out["value"])
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert np.abs(out["grads"]["conv1"]["kernel"]).sum() > 0


def _reference_attnpool(x, p, heads):
  """numpy attention pooling written from the CLIP code, for one sample (H, W, C)."""
  tokens = x.reshape(-1, x.shape[-1])
  tokens = np.concatenate([tokens.mean(0, keepdims=True), tokens]) + p["positional_embedding"]

  def lin(name, t):
    return t @ p[name]["kernel"] + p[name]["bias"]

  q, k, v = lin("q_proj", tokens[:1]), lin("k_proj", tokens), lin("v_proj", tokens)
  hd = q.shape[-1] // heads
  outs = []
  for h in range(heads):
    sl = slice(h * hd, (h + 1) * hd)
    logits = q[:, sl] @ k[:, sl].T / np.sqrt(hd)
    w = np.exp(logits - logits.max())
    outs.append((w / w.sum()) @ v[:, sl])
  return lin("c_proj", np.concatenate(outs, -1))[0]


def test_attention_pool_matches_reference_and_mean_query():
  pool = clip_resnet.AttentionPool2d(spacial_dim=2, embed_dim=8, num_heads=2, output_dim=5)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 2, 2, 8)), jnp.float32)
  variables = random_variables(pool, x, seed=3)
  y = jax.jit(pool.apply)(variables, x)
  p = jax.tree_util.tree_map(np.asarray, variables["params"])
  for i in range(3):
    np.testing.assert_allclose(y[i], _reference_attnpool(np.asarray(x[i]), p, 2), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="2x2 map"):
    pool.apply(variables, jnp.zeros((1, 3, 3, 8)))
  with pytest.raises(ValueError, match="channels|features"):
    pool.apply(variables, jnp.zeros((1, 2, 2, 6)))


def test_from_torch_round_trip_and_strictness(tiny_resnet):
  model, variables, x, _ = tiny_resnet
  state_dict = {}
  from flax import traverse_util

  from jaxretina.models.convert import flax_path_to_torch

  leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var",
          "num_batches_tracked": "num_batches_tracked", "positional_embedding": "positional_embedding"}
  for path, v in traverse_util.flatten_dict(variables).items():
    v = np.asarray(v)
    if path[-1] == "kernel":
      v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
    state_dict["visual." + flax_path_to_torch(path[1:-1]) + "." + leaf[path[-1]]] = v
  restored = clip_resnet.from_torch(state_dict, model, prefix="visual.")
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  state_dict["visual.layer1.0.downsample.-1.weight"] = np.zeros(1)
  with pytest.raises(convert.ConversionError, match="no place"):
    clip_resnet.from_torch(state_dict, model, prefix="visual.")

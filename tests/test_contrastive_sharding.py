"""The global-scope contrastive loss computed row-locally on every device equals the dense loss, and
its compiled per-device memory grows linearly with the global batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxretina.models import flair
from jaxretina.train import contrastive, distributed


def _embeddings(n, p=16, seed=0):
  r = np.random.default_rng(seed)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  return jnp.asarray(unit(r.normal(size=(n, p))), jnp.float32), jnp.asarray(unit(r.normal(size=(n, p))), jnp.float32)


@pytest.mark.parametrize("identity", [False, True])
@pytest.mark.parametrize("mesh_spec", ["data:8", "data:2,fsdp:4", "data:1"])
def test_sharded_loss_and_gradients_equal_the_dense_loss(identity, mesh_spec):
  mesh = distributed.make_mesh(mesh_spec)
  n = 32
  txt, img = _embeddings(n)
  cats = None if identity else jnp.asarray(np.random.default_rng(1).integers(0, 5, n), jnp.int32)
  scale = jnp.asarray(3.2, jnp.float32)

  def dense(t, i, s):
    target = flair.identity_targets(n) if identity else flair.cooccurrence_targets(cats)
    return flair.softce_clip_loss(flair.logits_per_text(t, i, s), target)

  batch = NamedSharding(mesh, P(distributed.data_axes(mesh)))
  put = lambda x: jax.device_put(x, batch)  # noqa: E731
  sharded = jax.jit(jax.value_and_grad(
      lambda t, i, s: contrastive.sharded_softce_clip_loss(t, i, s, mesh, None if cats is None else put(cats)),
      argnums=(0, 1, 2)))
  value, grads = sharded(put(txt), put(img), scale)
  ref_value, ref_grads = jax.value_and_grad(dense, argnums=(0, 1, 2))(txt, img, scale)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


def _temp_bytes(global_batch: int, devices: int) -> int:
  mesh = distributed.make_mesh(f"data:{devices}", jax.devices()[:devices])
  batch = NamedSharding(mesh, P("data"))
  emb = jax.ShapeDtypeStruct((global_batch, 64), jnp.float32, sharding=batch)
  cats = jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=batch)
  step = jax.jit(jax.grad(lambda t, i, c: contrastive.sharded_softce_clip_loss(t, i, 1.0, mesh, c), argnums=(0, 1)))
  return step.lower(emb, emb, cats).compile().memory_analysis().temp_size_in_bytes


def test_per_device_memory_is_linear_in_the_global_batch():
  """At a fixed per-device batch, 4× the devices (4× the global batch) may cost ≤ 5× the temp memory
  (the dense loss needs 16×: every device builds the N × N logits and targets)."""
  small, large = _temp_bytes(64 * 2, 2), _temp_bytes(64 * 8, 8)
  assert large <= 5 * small, (small, large)

"""Sequential microbatches of a sharded global batch (``config.microbatches``).

A global batch of N rows is sharded over S data shards (n = N/S consecutive rows each). Microbatch
k takes rows ``[k·n/K, (k+1)·n/K)`` of *every* shard, so each microbatch is spread over all devices
like the batch itself and no data moves between devices; ``merge`` puts per-microbatch results
back in the batch's row order.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def check(microbatches: int, global_batch: int, shards: int) -> int:
  """``config.microbatches`` validated against the batch and the mesh."""
  k = int(microbatches or 1)
  if k < 1 or global_batch % shards or (global_batch // shards) % k:
    raise ValueError(f"config.microbatches={microbatches}: the per-shard batch ({global_batch} rows over {shards} "
                     f"data shards) must be divisible by it")
  return k


def split(tree: Any, microbatches: int, shards: int) -> Any:
  """(N, ...) leaves → (K, N/K, ...): microbatch k holds n/K rows of every shard, in shard order."""

  def one(x):
    x = jnp.asarray(x)
    per_shard = x.shape[0] // shards
    x = x.reshape((shards, microbatches, per_shard // microbatches) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((microbatches, x.shape[0] * x.shape[2]) + x.shape[3:])

  return jax.tree.map(one, tree)


def merge(tree: Any, shards: int) -> Any:
  """Inverse of ``split``: (K, N/K, ...) leaves → (N, ...) in the batch's row order."""

  def one(x):
    k, rows = x.shape[:2]
    x = x.reshape((k, shards, rows // shards) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape((k * rows,) + x.shape[3:])

  return jax.tree.map(one, tree)

"""Small shared test helpers."""

import jax
import numpy as np

from jaxretina.models import convert


def random_variables(module, *args, seed=0, **kwargs):
  """Variables of ``module`` drawn with numpy from its ``eval_shape``d init.

  ``module.init`` compiles one threefry kernel per parameter shape (tens of CPU seconds for a
  ResNet on these machines); numpy draws cost nothing. Kernels ~ N(0, 1/fan_in), BN identity.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = getattr(path[-1], "key", str(path[-1]))
    if name in ("mean", "num_batches_tracked"):
      return np.zeros(leaf.shape, leaf.dtype)
    if name in ("var", "scale"):
      return np.ones(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 10
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, convert.variables_shape(module, *args, **kwargs))

"""CBAM: the three upstream variants as one module (parity fixtures cover the numbers)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxretina.models import cbam


def _x(shape=(2, 5, 6, 32), seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("mode", cbam.MODES)
def test_shapes_and_gates_in_unit_interval(mode):
  x = _x()
  module = cbam.CBAM(mode=mode, reduction=8)
  variables = module.init(jax.random.key(1), x)
  y, channel, spatial = module.apply(variables, x, return_attention=True)
  assert y.shape == x.shape
  assert channel.shape == (2, 1, 1, 32) and spatial.shape == (2, 5, 6, 1)
  for gate in (channel, spatial):
    assert bool(jnp.all((gate > 0) & (gate < 1)))
  np.testing.assert_allclose(y, x * channel * spatial, rtol=1e-6, atol=1e-6)
  # jit gives the same result as eager.
  y_jit = jax.jit(lambda v, a: module.apply(v, a))(variables, x)
  np.testing.assert_allclose(y_jit, y, rtol=1e-6, atol=1e-6)


def test_variable_names_follow_upstream_keys():
  x = _x()
  names = {
      "official": {"ChannelGate", "SpatialGate"},
      "cal": {"mlp_0", "mlp_2", "conv"},
      "fcnclip": {"channel_gate_1", "channel_gate_3", "spatial_gate_0"},
  }
  for mode, expected in names.items():
    params = cbam.CBAM(mode=mode, reduction=8).init(jax.random.key(0), x)["params"]
    assert set(params) == expected, mode
  official = cbam.CBAM(mode="official", reduction=8).init(jax.random.key(0), x)
  assert set(official["params"]["ChannelGate"]) == {"mlp_1", "mlp_3"}
  assert set(official["batch_stats"]["SpatialGate"]["spatial"]["bn"]) == {"mean", "var", "num_batches_tracked"}
  assert "bias" not in official["params"]["SpatialGate"]["spatial"]["conv"]


def test_official_no_spatial_is_channel_gate_only():
  x = _x()
  module = cbam.CBAM(mode="official", reduction=8, pool_types=("avg", "max", "lp", "lse"), no_spatial=True)
  variables = module.init(jax.random.key(0), x)
  y, channel, spatial = module.apply(variables, x, return_attention=True)
  assert spatial is None and "batch_stats" not in variables
  np.testing.assert_allclose(y, x * channel, rtol=1e-6)


def test_official_train_updates_spatial_bn_with_momentum_0_01():
  x = _x((4, 6, 5, 32))
  module = cbam.CBAM(mode="official", reduction=8)
  variables = module.init(jax.random.key(0), x)
  _, state = module.apply(variables, x, train=True, mutable=["batch_stats"])
  bn = state["batch_stats"]["SpatialGate"]["spatial"]["bn"]
  # Re-derive the BN input: the channel-gated features' [max, mean] map through the conv.
  p = variables["params"]
  gated = x * module.apply(variables, x, return_attention=True)[1]
  pooled = cbam.channel_pool(gated)
  conv = jax.lax.conv_general_dilated(pooled, p["SpatialGate"]["spatial"]["conv"]["kernel"], (1, 1),
                                      ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=jax.lax.Precision.HIGHEST)
  n = conv.size
  np.testing.assert_allclose(bn["mean"], 0.01 * jnp.mean(conv), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(bn["var"], 0.99 + 0.01 * jnp.var(conv) * n / (n - 1), rtol=1e-5)
  assert int(bn["num_batches_tracked"]) == 1


def test_global_pools_match_numpy():
  x = np.asarray(_x((2, 3, 4, 5)))
  np.testing.assert_allclose(cbam.global_pool(x, "lp"), np.sqrt((x**2).sum(axis=(1, 2))), rtol=1e-5)
  np.testing.assert_allclose(cbam.global_pool(x, "lse"), np.log(np.exp(x).sum(axis=(1, 2))), rtol=1e-5)
  np.testing.assert_allclose(cbam.channel_pool(x)[..., 0], x.max(-1))
  np.testing.assert_allclose(cbam.channel_pool(x)[..., 1], x.mean(-1), rtol=1e-6)


def test_bad_configuration_is_named():
  x = _x()
  with pytest.raises(ValueError, match="mode"):
    cbam.CBAM(mode="cbam2").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="pool type 'median'"):
    cbam.CBAM(pool_types=("avg", "median")).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="empty MLP"):
    cbam.CBAM(reduction=64).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="NHWC"):
    cbam.CBAM().init(jax.random.key(0), x[0])


def test_from_torch_round_trip_cal_layer():
  x = _x()
  module = cbam.CBAM(mode="cal", reduction=8)
  rng = np.random.default_rng(0)
  state_dict = {"mlp.0.weight": rng.normal(size=(4, 32, 1, 1)), "mlp.2.weight": rng.normal(size=(32, 4, 1, 1)),
                "conv.weight": rng.normal(size=(1, 2, 7, 7))}
  variables = cbam.from_torch(state_dict, module, channels=32)
  np.testing.assert_allclose(variables["params"]["conv"]["kernel"], state_dict["conv.weight"].transpose(2, 3, 1, 0))
  assert module.apply(variables, x).shape == x.shape

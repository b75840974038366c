"""jaxretina.models.resnet: shapes, variants, the torch converter. Tiny widths (base_width 8).

Numerical parity with torchvision itself is covered by the tv_resnet_* fixtures (tests/test_parity.py).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from jaxretina.models import convert, layers, resnet


def _init(model, shape, seed=0):
  """Random variables and input without jax.random (whose per-shape compiles cost seconds on CPU).

  Kernels ~ N(0, 1/fan_in) keep activations O(1); BN stats start at torch's (0, 1, 0).
  """
  rng = np.random.default_rng(seed)
  target = convert.variables_shape(model, jnp.zeros(shape, jnp.float32))
  flat = {}
  for path, leaf in traverse_util.flatten_dict(target).items():
    if path[-1] == "kernel":
      value = rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
    elif path[-1] == "scale":
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif path[-1] == "var":
      value = np.ones(leaf.shape)
    elif path[-1] in ("mean", "num_batches_tracked"):
      value = np.zeros(leaf.shape)
    else:
      value = rng.normal(0, 0.1, leaf.shape)
    flat[path] = jnp.asarray(value, leaf.dtype)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  return traverse_util.unflatten_dict(flat), x


def test_resnet18_shapes_and_taps():
  model = resnet.resnet18(base_width=8, num_classes=5)
  variables, x = _init(model, (2, 32, 32, 3))
  logits, taps = model.apply(variables, x, return_taps=True)
  assert logits.shape == (2, 5)
  assert {k: v.shape for k, v in taps.items()} == {
      "stem": (2, 16, 16, 8), "layer1": (2, 8, 8, 8), "layer2": (2, 4, 4, 16),
      "layer3": (2, 2, 2, 32), "layer4": (2, 1, 1, 64), "pooled": (2, 64)}
  # BasicBlock: layer1 keeps its width (no downsample), later stages downsample once.
  params = variables["params"]
  assert "downsample_0" not in params["layer1_0"] and "downsample_0" in params["layer2_0"]
  assert set(params["layer1_1"]) == {"conv1", "bn1", "conv2", "bn2"}
  assert "conv1" in params and "fc" in params
  assert model.out_channels == 64


def test_resnet50_odd_input_shapes_and_pooled_features():
  model = resnet.resnet50(base_width=8, width_per_group=32)  # no fc: pooled features
  variables, x = _init(model, (1, 33, 31, 3))
  feats, taps = model.apply(variables, x, return_taps=True)
  assert feats.shape == (1, 256) and "fc" not in variables["params"]
  # torch floor rules: conv 7/2/3 → 17×16, max-pool 3/2/1 → 9×8, then /2 per stage (k3 s2 p1).
  assert taps["stem"].shape == (1, 17, 16, 8)
  assert taps["layer1"].shape == (1, 9, 8, 32)
  assert taps["layer4"].shape == (1, 2, 1, 256)
  np.testing.assert_allclose(feats, taps["layer4"].mean(axis=(1, 2)), rtol=1e-6, atol=1e-6)
  # Inner bottleneck width = planes · width_per_group / 64 (torchvision's rule): 8 · 32/64 = 4.
  assert variables["params"]["layer1_0"]["conv1"]["kernel"].shape == (1, 1, 8, 4)
  assert variables["params"]["layer1_0"]["conv3"]["kernel"].shape == (1, 1, 4, 32)


def test_last_stride_one_gives_output_stride_16_and_no_maxpool_stem():
  x = jnp.zeros((1, 64, 64, 3))
  os16 = resnet.resnet18(base_width=8, last_stride=1)
  v, _ = _init(os16, x.shape)
  _, taps = os16.apply(v, x, return_taps=True)
  assert taps["layer3"].shape[1:3] == (4, 4) and taps["layer4"].shape[1:3] == (4, 4)
  assert v["params"]["layer4_0"]["conv1"]["kernel"].shape == (3, 3, 32, 64)
  no_pool = resnet.resnet18(base_width=8, use_maxpool=False)
  _, taps = no_pool.apply(_init(no_pool, x.shape)[0], x, return_taps=True)
  assert taps["stem"].shape[1:3] == (32, 32) and taps["layer1"].shape[1:3] == (32, 32)
  assert taps["layer4"].shape[1:3] == (4, 4)


def test_partial_runs_compose_to_the_full_network():
  """CRD-Net's pattern: stem..layer3, then layer4 separately (call args or apply(method=...))."""
  model = resnet.resnet18(base_width=8, num_classes=3, use_maxpool=False)
  variables, x = _init(model, (2, 24, 24, 3))
  full, taps = model.apply(variables, x, return_taps=True)
  l3 = model.apply(variables, x, stop_after="layer3")
  l4 = model.apply(variables, l3, start_at="layer4", stop_after="layer4")
  np.testing.assert_array_equal(l3, taps["layer3"])
  np.testing.assert_array_equal(l4, taps["layer4"])
  np.testing.assert_allclose(model.apply(variables, l4, method=model.head), full, rtol=1e-6, atol=1e-6)
  stem = model.apply(variables, x, method=model.stem)
  np.testing.assert_array_equal(model.apply(variables, "layer1", stem, method=model.stage), taps["layer1"])
  with pytest.raises(ValueError, match="stop_after"):
    model.apply(variables, x, stop_after="layer5")
  with pytest.raises(ValueError, match="comes after"):
    model.apply(variables, x, start_at="layer4", stop_after="layer1")


def test_train_mode_updates_running_stats_torch_style():
  model = resnet.ResNet("basic", (1, 1, 1, 1), base_width=8)
  variables, x = _init(model, (4, 16, 16, 3))
  _, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
  bn1 = state["batch_stats"]["bn1"]
  assert int(bn1["num_batches_tracked"]) == 1
  # The stem BN sees the conv output: running_mean = 0.9·0 + 0.1·batch mean, var with n/(n-1).
  y = model.apply(variables, x, method=lambda m, x: m.conv1(x))
  n = y.shape[0] * y.shape[1] * y.shape[2]
  np.testing.assert_allclose(bn1["mean"], 0.1 * y.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(bn1["var"], 0.9 + 0.1 * y.var(axis=(0, 1, 2)) * n / (n - 1), rtol=1e-5)
  # Eval mode leaves the statistics alone.
  _, same = model.apply(variables, x, train=False, mutable=["batch_stats"])
  assert int(same["batch_stats"]["bn1"]["num_batches_tracked"]) == 0


def test_init_follows_torchvision():
  # One block, one jitted init: keeps jax.random compiles to a minimum.
  block = resnet.Bottleneck(planes=64, downsample=True, zero_init_residual=True)
  x = jnp.zeros((1, 4, 4, 32))
  p = jax.jit(block.init)(jax.random.key(0, impl="rbg"), x)["params"]
  np.testing.assert_array_equal(p["bn3"]["scale"], 0.0)
  np.testing.assert_array_equal(p["bn1"]["scale"], 1.0)
  np.testing.assert_array_equal(p["downsample_1"]["bias"], 0.0)
  k = np.asarray(p["conv3"]["kernel"])  # kaiming_normal(fan_out, relu): std √(2/(1·1·256))
  assert k.shape == (1, 1, 64, 256) and 0.9 < k.std() / np.sqrt(2.0 / 256) < 1.1
  assert "bias" not in p["conv2"] and "bias" not in p["downsample_0"]


def test_conv_bias_variant_and_bad_arguments():
  model = resnet.ResNet("basic", (1, 1, 1, 1), base_width=8, conv_bias=True, stem_conv_bias=True)
  p = convert.variables_shape(model, jnp.zeros((1, 16, 16, 2)))["params"]  # CRD-Net's non-RGB conv1
  assert p["conv1"]["kernel"].shape == (7, 7, 2, 8) and "bias" in p["conv1"]
  assert "bias" in p["layer1_0"]["conv1"] and "bias" not in p["layer2_0"]["downsample_0"]
  with pytest.raises(ValueError, match="block"):
    convert.variables_shape(resnet.ResNet(block="dense", layers=(1, 1, 1, 1)), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="BasicBlock only supports"):
    convert.variables_shape(resnet.resnet18(width_per_group=32), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match="NHWC"):
    convert.variables_shape(resnet.resnet18(base_width=8), jnp.zeros((16, 16, 3)))


def test_from_constructor_reads_fixture_specs():
  spec = {"torchvision.models.resnet.ResNet": {"block": "Bottleneck", "layers": [1, 1, 1, 1], "base_width": 8,
                                               "stem_channels": 8, "stage_planes": [8, 16, 32, 64]}}
  model = resnet.from_constructor(spec, num_classes=None)
  assert (model.block, model.layers, model.base_width, model.num_classes) == ("bottleneck", (1, 1, 1, 1), 8, None)
  model = resnet.from_constructor({"block": "BasicBlock", "layers": [2, 2, 2, 2], "num_classes": 7})
  assert (model.block, model.base_width, model.num_classes) == ("basic", 64, 7)
  with pytest.raises(ValueError, match="stage_planes"):
    resnet.from_constructor({"block": "BasicBlock", "layers": [1, 1, 1, 1], "base_width": 8,
                             "stage_planes": [8, 16, 32, 32]})
  with pytest.raises(ValueError, match="replace_stride_with_dilation"):
    resnet.from_constructor({"block": "Bottleneck", "layers": [1, 1, 1, 1],
                             "replace_stride_with_dilation": [False, True, True]})


def test_converter_round_trip_and_strictness():
  model = resnet.ResNet("bottleneck", (1, 2, 1, 1), base_width=8, width_per_group=16, num_classes=3)
  variables, x = _init(model, (1, 32, 32, 3))
  state_dict = resnet.to_torch(variables)
  # torchvision key names and layouts (OIHW conv, (out,in) linear, int64 counters).
  assert state_dict["layer2.1.conv2.weight"].shape == (4, 4, 3, 3)  # 16 planes · 16/64
  assert state_dict["layer1.0.downsample.1.running_var"].shape == (32,)
  assert state_dict["fc.weight"].shape == (3, 256)
  assert state_dict["bn1.num_batches_tracked"].dtype == np.int64
  back = resnet.from_torch(state_dict, model, input_shape=(1, 32, 32, 3))
  flat_a = traverse_util.flatten_dict(jax.device_get(variables))
  flat_b = traverse_util.flatten_dict(back)
  assert flat_a.keys() == flat_b.keys()
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[k]), flat_b[k], err_msg=str(k))

  missing = {k: v for k, v in state_dict.items() if k != "layer2.1.bn2.running_mean"}
  with pytest.raises(convert.ConversionError, match=r"layer2_1/bn2/mean"):
    resnet.from_torch(missing, model, input_shape=(1, 32, 32, 3))
  extra = dict(state_dict, **{"layer2.2.conv1.weight": np.zeros((4, 32, 1, 1), np.float32)})
  with pytest.raises(convert.ConversionError, match=r"layer2\.2\.conv1\.weight"):
    resnet.from_torch(extra, model, input_shape=(1, 32, 32, 3))
  # FLAIR-style: fc = Identity has no fc key; a prefixed backbone converts with prefix=.
  headless = resnet.ResNet("bottleneck", (1, 2, 1, 1), base_width=8, width_per_group=16)
  wrapped = {f"vision_model.model.{k}": v for k, v in state_dict.items() if not k.startswith("fc.")}
  out = resnet.from_torch(wrapped, headless, prefix="vision_model.model.", input_shape=(1, 32, 32, 3))
  assert "fc" not in out["params"]
  pooled = model.apply(variables, x, return_taps=True)[1]["pooled"]
  np.testing.assert_allclose(headless.apply(out, x), pooled, rtol=1e-6, atol=1e-6)


def test_bfloat16_compute():
  model = resnet.ResNet("basic", (1, 1, 1, 1), base_width=8, num_classes=2, dtype=jnp.bfloat16)
  variables, x = _init(model, (1, 16, 16, 3))
  assert variables["params"]["conv1"]["kernel"].dtype == jnp.float32
  out = model.apply(variables, x)
  assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))


def _train_loss(model):
  """(params -> a training-mode loss of ``model`` on a fixed batch, its variables)."""
  variables, images = _init(model, (2, 32, 32, 3))

  def loss(params):
    out, _ = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
    return jnp.sum(out ** 2)

  return loss, variables


def test_materialize_is_the_identity_and_keeps_the_residual_stream_in_its_own_buffer():
  """layers.materialize: same values and gradients as the identity (NaN included), and on XLA:CPU a
  conditional per block boundary and per inner activation, which fusion cannot cross."""
  x = jnp.array([[1.0, -2.0], [jnp.nan, 4.0]])
  np.testing.assert_array_equal(np.asarray(jax.jit(layers.materialize)(x)), np.asarray(x))
  nan_first = jnp.array([jnp.nan, 3.0])
  np.testing.assert_array_equal(np.asarray(jax.jit(layers.materialize)(nan_first)), np.asarray(nan_first))
  grad = jax.grad(lambda v: jnp.sum(jnp.sin(layers.materialize(v)) * 3.0))(jnp.array([0.5, 1.5]))
  np.testing.assert_allclose(np.asarray(grad), 3.0 * np.cos([0.5, 1.5]), rtol=1e-6)

  model = resnet.ResNet(block="bottleneck", layers=(2, 1, 1, 1), base_width=8, num_classes=3)
  loss, variables = _train_loss(model)

  hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).as_text()
  blocks, inner_per_block = 5, 2
  # Forward and backward each carry one conditional per materialised value.
  assert hlo.count("stablehlo.case") + hlo.count("stablehlo.if") >= blocks * (1 + inner_per_block)


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_conv_gradients_as_matmuls_match_the_convolution(stride):
  """layers.pointwise_conv_matmul_grads: the forward is the convolution bit for bit; both gradients
  are the convolution's up to float32 rounding (another order of the same sums), bf16 included."""
  rng = np.random.default_rng(stride)
  x = jnp.asarray(rng.normal(size=(2, 7, 7, 12)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(1, 1, 12, 5)) / np.sqrt(12), jnp.float32)
  strides = (stride, stride)

  def conv(v, k):
    return jax.lax.conv_general_dilated(v, k, strides, ((0, 0), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

  np.testing.assert_array_equal(np.asarray(layers.pointwise_conv_matmul_grads(x, kernel, strides)),
                                np.asarray(conv(x, kernel)))
  weights = jnp.asarray(rng.normal(size=conv(x, kernel).shape), jnp.float32)
  ours = jax.grad(lambda v, k: jnp.sum(jnp.tanh(layers.pointwise_conv_matmul_grads(v, k, strides)) * weights),
                  argnums=(0, 1))(x, kernel)
  reference = jax.grad(lambda v, k: jnp.sum(jnp.tanh(conv(v, k)) * weights), argnums=(0, 1))(x, kernel)
  for got, want in zip(ours, reference):
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  half = jax.grad(lambda k: jnp.sum(layers.pointwise_conv_matmul_grads(x.astype(jnp.bfloat16), k, strides)))(
      kernel.astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16 and half.shape == kernel.shape


@pytest.mark.parametrize("channels,stride", [((12, 5), 1), ((24, 40), 1), ((40, 17), 2), ((16, 16), 2)])
def test_pointwise_forward_is_a_matmul_above_sixteen_channels(channels, stride):
  """The forward of layers.pointwise_conv_matmul_grads is a matmul where XLA:CPU would give the
  convolution to YNNPACK (more than 16 channels on a side: the same kernel, so the same values),
  and the convolution itself at 16 or fewer (XLA:CPU's Eigen convolution sums in another order)."""
  cin, cout = channels
  rng = np.random.default_rng(cin + cout)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, cin)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(1, 1, cin, cout)) / np.sqrt(cin), jnp.float32)
  strides = (stride, stride)
  forward = str(jax.make_jaxpr(lambda v, k: layers.pointwise_conv_matmul_grads(v, k, strides))(x, kernel))
  as_matmul = max(cin, cout) > 16
  assert ("dot_general" in forward) == as_matmul
  assert ("conv_general_dilated" in forward) == (not as_matmul)
  conv = jax.lax.conv_general_dilated(x, kernel, strides, ((0, 0), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ours = jax.jit(layers.pointwise_conv_matmul_grads, static_argnums=2)(x, kernel, strides)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(conv), rtol=1e-6, atol=1e-6)


def test_resnet_convolutions_on_cpu_take_the_matmul_gradients():
  """On CPU every unit-dilation 1×1 convolution of a ResNet goes through pointwise_conv_matmul_grads,
  whose gradients agree with the plain convolution's."""
  model = resnet.ResNet(block="bottleneck", layers=(1, 1, 1, 1), base_width=8, num_classes=3)
  loss, variables = _train_loss(model)

  hlo = jax.jit(jax.grad(loss)).lower(variables["params"]).as_text()
  one_by_one = 4 * 2 + 4  # conv1 + conv3 per block, plus each stage's downsample
  assert hlo.count("dot_general") >= one_by_one
  ours = jax.grad(loss)(variables["params"])
  original = layers.pointwise_conv_matmul_grads
  try:
    layers.pointwise_conv_matmul_grads = lambda v, k, s: jax.lax.conv_general_dilated(
        v, k, s, ((0, 0), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    plain = jax.grad(loss)(variables["params"])
  finally:
    layers.pointwise_conv_matmul_grads = original
  for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
    # BatchNorm's mean subtraction leaves some entries as cancellations near 0: tolerance per leaf.
    scale = float(np.abs(np.asarray(want)).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("kernel,stride,padding,size", [(3, 2, 1, 11), (3, 2, 1, 12), (2, 2, 0, 8), (3, 1, 1, 6),
                                                          (5, 3, 2, 13)])
def test_max_pool_gradient_goes_to_the_first_maximum_of_each_window(kernel, stride, padding, size):
  """layers.max_pool2d's own backward: the forward is nn.max_pool's; the gradient is XLA's
  select-and-scatter one (torch's rule: the first maximum in row-major order) with many ties, as
  after a ReLU, and an explicit check of that rule on a window of equal values."""
  rng = np.random.default_rng(size)
  x = jnp.asarray(np.maximum(rng.normal(size=(2, size, size, 3)), 0.0).round(1), jnp.float32)  # ties
  x = x.at[0, :4].set(0.0)

  def reference(v):
    return flax_max_pool(v, kernel, stride, padding)

  np.testing.assert_array_equal(np.asarray(layers.max_pool2d(x, kernel, stride, padding)), np.asarray(reference(x)))
  weights = jnp.asarray(rng.normal(size=reference(x).shape), jnp.float32)
  ours = jax.jit(jax.grad(lambda v: jnp.sum(layers.max_pool2d(v, kernel, stride, padding) * weights)))(x)
  want = jax.jit(jax.grad(lambda v: jnp.sum(reference(v) * weights)))(x)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(want), rtol=1e-6, atol=1e-6)

  flat = jnp.zeros((1, kernel, kernel, 1), jnp.float32)  # one window (no padding), all equal
  first = jax.grad(lambda v: jnp.sum(layers.max_pool2d(v, kernel, kernel, 0)))(flat)
  expected = np.zeros((1, kernel, kernel, 1), np.float32)
  expected[0, 0, 0, 0] = 1.0
  np.testing.assert_array_equal(np.asarray(first), expected)


def flax_max_pool(v, kernel, stride, padding):
  return nn.max_pool(v, (kernel, kernel), (stride, stride), ((padding, padding), (padding, padding)))


def _batch_norm_by_autodiff(x, scale, bias, epsilon):
  """The training-mode BatchNorm expression, differentiated by JAX (what layers.batch_norm_train replaces)."""
  xf = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(xf, axis=axes)
  var = jnp.mean(jnp.square(xf - mean), axis=axes)
  inv = jax.lax.rsqrt(var + epsilon)
  y = (xf - mean) * (inv if scale is None else inv * scale)
  return (y if bias is None else y + bias), mean, var


@pytest.mark.parametrize("use_scale,use_bias", [(True, True), (False, True), (True, False), (False, False)])
def test_batch_norm_backward_is_the_derivative_of_its_forward(use_scale, use_bias):
  """layers.batch_norm_train (torch's backward formula): the outputs are the plain expression's bit for
  bit, and the gradients of x, scale and bias agree with JAX's derivative of it, also through the batch
  mean and variance outputs (which the running statistics use)."""
  rng = np.random.default_rng(int(use_scale) * 2 + int(use_bias))
  x = jnp.asarray(rng.normal(size=(3, 5, 6, 7)) * 3 + 1.5, jnp.float32)
  scale = jnp.asarray(rng.normal(size=7), jnp.float32) if use_scale else None
  bias = jnp.asarray(rng.normal(size=7), jnp.float32) if use_bias else None
  w_y, w_mean, w_var = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in (x.shape, (7,), (7,)))

  for got, want in zip(layers.batch_norm_train(x, scale, bias, 1e-5), _batch_norm_by_autodiff(x, scale, bias, 1e-5)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  def loss(fn, with_stats):
    def f(v, s, b):
      y, mean, var = fn(v, s, b, 1e-5)
      total = jnp.sum(jnp.sin(y) * w_y)
      return total + (jnp.sum(mean * w_mean) + jnp.sum(jnp.cos(var) * w_var) if with_stats else 0.0)
    return f

  for with_stats in (False, True):
    ours = jax.jit(jax.grad(loss(layers.batch_norm_train, with_stats), argnums=(0, 1, 2)))(x, scale, bias)
    want = jax.jit(jax.grad(loss(_batch_norm_by_autodiff, with_stats), argnums=(0, 1, 2)))(x, scale, bias)
    assert jax.tree.structure(ours) == jax.tree.structure(want)
    for got, expected in zip(jax.tree.leaves(ours), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-4,
                                 atol=2e-5 * float(np.abs(np.asarray(expected)).max()))

  half = jax.grad(lambda v: jnp.sum(layers.batch_norm_train(v, scale, bias, 1e-5)[0]))(x.astype(jnp.bfloat16))
  assert half.dtype == jnp.bfloat16 and half.shape == x.shape

"""CBAM (Convolutional Block Attention Module, Woo et al. ECCV 2018) in its three upstream variants.

One module, ``CBAM``, with the variant as ``mode`` (docs/systems.md#cbam-variants,
docs/fidelity.md#cbam). Everything is NHWC: input (B,H,W,C) → output (B,H,W,C).

=============  =======================  ==============  ===============  =======================
mode           channel MLP              pools           spatial input    spatial conv
=============  =======================  ==============  ===============  =======================
``official``   Linear C→C/r→C, bias     ``pool_types``  [max_c, mean_c]  7×7 no bias → BN(m 0.01)
``cal``        1×1 conv, no bias        max + avg       [max_c, mean_c]  k×k no bias, no BN
``fcnclip``    1×1 conv, bias           avg only        all C channels   7×7 C→1 with bias
=============  =======================  ==============  ===============  =======================

* ``official`` is ``Jongchan/attention-module: MODELS/cbam.py`` ``CBAM``. Pool types ``avg``,
  ``max``, ``lp`` (√Σx², ``F.lp_pool2d`` with p=2 over the whole map) and ``lse`` (logsumexp over
  H×W); the MLP outputs of every pool are summed in ``pool_types`` order. ``no_spatial`` drops the
  spatial gate. The spatial BatchNorm uses torch momentum 0.01.
* ``cal`` is ``CBAMLayer`` of CAL / DualAttendMed ``models/blocks.py``.
* ``fcnclip`` is the ``CBAM`` of the FCN-CLIP notebook: the spatial gate is a C→1 conv on the
  channel-gated features themselves. (FCN_CLIP multiplies this module's output onto its input a
  second time; that quirk belongs to the FCN-CLIP model, not to this module.)

Flax submodule names follow each variant's torch ``state_dict`` keys, so ``from_torch`` needs no
renaming: official ``ChannelGate/mlp_1``, ``ChannelGate/mlp_3``, ``SpatialGate/spatial/conv``,
``SpatialGate/spatial/bn``; cal ``mlp_0``, ``mlp_2``, ``conv``; fcnclip ``channel_gate_1``,
``channel_gate_3``, ``spatial_gate_0``.

A ResNet block inserts CBAM by calling it on the block output (after the last BN, before the
residual add, as ``MODELS/model_resnet.py`` and CAL's ``Bottleneck`` do).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxretina.models import convert, layers

MODES = ("official", "cal", "fcnclip")
POOL_TYPES = ("avg", "max", "lp", "lse")


def global_pool(x: jax.Array, pool_type: str) -> jax.Array:
  """Pools (B,H,W,C) over H×W → (B,C) like the official CBAM ``ChannelGate`` pools."""
  if pool_type == "avg":
    return jnp.mean(x, axis=(1, 2))
  if pool_type == "max":
    return jnp.max(x, axis=(1, 2))
  if pool_type == "lp":
    # F.lp_pool2d(x, 2, (H, W)) = (Σ x²)^(1/2) over the window.
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2)))
  if pool_type == "lse":
    return jax.nn.logsumexp(x, axis=(1, 2))
  raise ValueError(f"CBAM pool type {pool_type!r}: expected one of {POOL_TYPES}")


def channel_pool(x: jax.Array) -> jax.Array:
  """CBAM ``ChannelPool``: (B,H,W,C) → (B,H,W,2) = [max over C, mean over C] (max first)."""
  return jnp.concatenate([jnp.max(x, axis=-1, keepdims=True), jnp.mean(x, axis=-1, keepdims=True)], axis=-1)


class _OfficialChannelGate(nn.Module):
  """``ChannelGate``: shared MLP ``mlp = Sequential(Flatten, Linear, ReLU, Linear)`` per pool."""

  hidden: int
  pool_types: Sequence[str]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fc1 = layers.Linear(self.hidden, name="mlp_1")
    fc2 = layers.Linear(x.shape[-1], name="mlp_3")
    logits = None
    for pool_type in self.pool_types:
      out = fc2(nn.relu(fc1(global_pool(x, pool_type))))
      logits = out if logits is None else logits + out
    return jax.nn.sigmoid(logits)[:, None, None, :]


class _ConvBN(nn.Module):
  """Official CBAM ``BasicConv(2, 1, k, relu=False)``: conv (no bias) → BN(eps 1e-5, momentum 0.01)."""

  kernel_size: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = layers.Conv2d(1, self.kernel_size, padding=(self.kernel_size - 1) // 2, use_bias=False, name="conv")(x)
    return layers.BatchNorm(momentum=0.01, epsilon=1e-5, name="bn")(y, use_running_average=not train)


class _OfficialSpatialGate(nn.Module):
  kernel_size: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    return jax.nn.sigmoid(_ConvBN(self.kernel_size, name="spatial")(channel_pool(x), train))


class CBAM(nn.Module):
  """Channel then spatial attention. (B,H,W,C) → (B,H,W,C).

  Attributes:
    mode: ``'official'`` (Jongchan), ``'cal'`` (CAL/DualAttendMed ``CBAMLayer``) or ``'fcnclip'``.
    reduction: hidden width of the channel MLP is ``C // reduction`` (official ``reduction_ratio``).
    pool_types: official mode only: the global pools whose MLP outputs are summed, in order.
    no_spatial: official mode only: channel gate alone (upstream ``no_spatial=True``).
    spatial_kernel: spatial conv size (7 in every upstream; CAL's ``spatial_kernel``).
  """

  mode: str = "official"
  reduction: int = 16
  pool_types: Sequence[str] = ("avg", "max")
  no_spatial: bool = False
  spatial_kernel: int = 7

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_attention: bool = False):
    """Applies the gates.

    Args:
      x: (B,H,W,C) features.
      train: official mode's spatial BatchNorm uses batch statistics and updates its running
        statistics (call with ``mutable=['batch_stats']``). The other modes have no BatchNorm.
      return_attention: also return the gates.

    Returns:
      y (B,H,W,C); with ``return_attention``, ``(y, channel_attention (B,1,1,C),
      spatial_attention (B,H,W,1) or None when there is no spatial gate)``.
    """
    if self.mode not in MODES:
      raise ValueError(f"CBAM.mode={self.mode!r}: expected one of {MODES}")
    if x.ndim != 4:
      raise ValueError(f"CBAM input: expected (B,H,W,C) NHWC, got shape {x.shape}")
    channels = x.shape[-1]
    hidden = channels // self.reduction
    if hidden < 1:
      raise ValueError(f"CBAM: {channels} channels // reduction {self.reduction} leaves an empty MLP")
    spatial = None
    if self.mode == "official":
      for p in self.pool_types:
        if p not in POOL_TYPES:
          raise ValueError(f"CBAM pool type {p!r}: expected one of {POOL_TYPES}")
      if not self.pool_types:
        raise ValueError("CBAM(mode='official') needs at least one pool type")
      channel = _OfficialChannelGate(hidden, tuple(self.pool_types), name="ChannelGate")(x)
      y = x * channel
      if not self.no_spatial:
        spatial = _OfficialSpatialGate(self.spatial_kernel, name="SpatialGate")(y, train)
        y = y * spatial
    elif self.mode == "cal":
      fc1 = layers.Conv2d(hidden, 1, use_bias=False, name="mlp_0")
      fc2 = layers.Conv2d(channels, 1, use_bias=False, name="mlp_2")
      mlp = lambda v: fc2(nn.relu(fc1(v)))
      channel = jax.nn.sigmoid(mlp(jnp.max(x, axis=(1, 2), keepdims=True)) + mlp(jnp.mean(x, axis=(1, 2), keepdims=True)))
      y = x * channel
      spatial = jax.nn.sigmoid(layers.Conv2d(1, self.spatial_kernel, padding=self.spatial_kernel // 2,
                                             use_bias=False, name="conv")(channel_pool(y)))
      y = y * spatial
    else:  # fcnclip
      pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
      hidden_act = nn.relu(layers.Conv2d(hidden, 1, name="channel_gate_1")(pooled))
      channel = jax.nn.sigmoid(layers.Conv2d(channels, 1, name="channel_gate_3")(hidden_act))
      y = x * channel
      spatial = jax.nn.sigmoid(layers.Conv2d(1, self.spatial_kernel, padding=self.spatial_kernel // 2,
                                             name="spatial_gate_0")(y))
      y = y * spatial
    if return_attention:
      return y, channel, spatial
    return y


def from_constructor(ctor: Mapping[str, Any], mode: str) -> CBAM:
  """Builds ``CBAM`` from an upstream constructor's kwargs.

  official: ``gate_channels, reduction_ratio=16, pool_types=['avg','max'], no_spatial=False``;
  cal: ``channel, reduction=16, spatial_kernel=7``; fcnclip: ``channels, reduction=16``.
  (The channel count itself comes from the input.)
  """
  if mode == "official":
    return CBAM(mode=mode, reduction=int(ctor.get("reduction_ratio", 16)),
                pool_types=tuple(ctor.get("pool_types", ("avg", "max"))), no_spatial=bool(ctor.get("no_spatial", False)))
  if mode == "cal":
    return CBAM(mode=mode, reduction=int(ctor.get("reduction", 16)), spatial_kernel=int(ctor.get("spatial_kernel", 7)))
  if mode == "fcnclip":
    return CBAM(mode=mode, reduction=int(ctor.get("reduction", 16)))
  raise ValueError(f"CBAM mode {mode!r}: expected one of {MODES}")


def from_torch(state_dict: Mapping[str, Any], module: CBAM, channels: int, *, prefix: str = "",
               source: str = "state_dict") -> dict:
  """Upstream CBAM ``state_dict`` (keys of the variant named by ``module.mode``) → Flax variables."""
  target = convert.variables_shape(module, jnp.zeros((1, 8, 8, channels), jnp.float32))
  return convert.convert_state_dict(state_dict, target, prefix=prefix, source=source)

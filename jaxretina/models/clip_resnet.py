"""OpenAI CLIP's ``ModifiedResNet`` image tower and its ``AttentionPool2d`` (``openai/CLIP: clip/model.py``).

An alternative image tower for the two-tower models (docs/systems.md#openai-clip-modifiedresnet). It differs
from the torchvision ResNet in three places:

* the stem is three 3×3 convs (``width//2, width//2, width``) followed by ``AvgPool2d(2)``;
* strided bottlenecks keep every conv at stride 1 and anti-alias with ``AvgPool2d(stride)`` after
  ``conv2``; the shortcut is ``AvgPool2d(stride)`` → 1×1 conv → BN (torch keys ``downsample.0`` /
  ``downsample.1``; ``downsample.-1`` is the parameterless pool and has no key);
* global pooling is ``AttentionPool2d``: the mean token, prepended to the H·W tokens, is the only
  query of one multi-head attention over all tokens plus a learned positional embedding, which
  fixes the input resolution.

Everything is NHWC. Flax submodule names follow the torch module paths (``layer1_0/conv1``), so
``convert.convert_state_dict`` reads a CLIP ``visual.*`` state_dict with ``prefix='visual.'``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxretina.models import convert
from jaxretina.models.layers import BatchNorm, Conv2d, Linear, avg_pool2d

Dtype = Any


class CLIPBottleneck(nn.Module):
  """CLIP's anti-aliased bottleneck (expansion 4): ``(B, H, W, C_in) → (B, H/s, W/s, 4·planes)``."""

  planes: int
  stride: int = 1
  bn_eps: float = 1e-5
  dtype: Dtype | None = None

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    out_ch = self.planes * self.expansion

    def bn(name):
      return BatchNorm(epsilon=self.bn_eps, use_running_average=not train, dtype=self.dtype, name=name)

    out = nn.relu(bn("bn1")(Conv2d(self.planes, 1, use_bias=False, dtype=self.dtype, name="conv1")(x)))
    out = nn.relu(bn("bn2")(Conv2d(self.planes, 3, padding=1, use_bias=False, dtype=self.dtype,
                                   name="conv2")(out)))
    if self.stride > 1:
      out = avg_pool2d(out, self.stride)
    out = bn("bn3")(Conv2d(out_ch, 1, use_bias=False, dtype=self.dtype, name="conv3")(out))

    identity = x
    if self.stride > 1 or x.shape[-1] != out_ch:
      if self.stride > 1:
        identity = avg_pool2d(identity, self.stride)
      identity = Conv2d(out_ch, 1, use_bias=False, dtype=self.dtype, name="downsample_0")(identity)
      identity = bn("downsample_1")(identity)
    return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
  """CLIP attention pooling: ``(B, H, W, embed_dim) → (B, output_dim)``.

  Tokens are the H·W positions (row-major) with their mean prepended; ``positional_embedding``
  ``(spacial_dim² + 1, embed_dim)`` is added; only the mean token queries (separate q/k/v
  ``Linear`` projections with bias, ``num_heads`` heads laid out head-major along channels,
  scaling ``head_dim**-0.5``), and ``c_proj`` maps the attended mean token to ``output_dim``.

  Attributes:
    spacial_dim: side of the (square) feature map the positional embedding is sized for.
    embed_dim: channels of the input.
    num_heads: attention heads; must divide ``embed_dim``.
    output_dim: output width (``embed_dim`` when None).
  """

  spacial_dim: int
  embed_dim: int
  num_heads: int
  output_dim: int | None = None
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != self.embed_dim:
      raise ValueError(f"AttentionPool2d: expected (B, H, W, {self.embed_dim}) features, got {x.shape}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"AttentionPool2d: embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")
    b, h, w, c = x.shape
    n_pos = self.spacial_dim ** 2 + 1
    if h * w + 1 != n_pos:
      raise ValueError(f"AttentionPool2d: the positional embedding covers a {self.spacial_dim}x{self.spacial_dim} "
                       f"map, got {h}x{w} (the input resolution is fixed by spacial_dim)")
    pos = self.param("positional_embedding",
                     lambda k, s: jax.random.normal(k, s) / self.embed_dim ** 0.5, (n_pos, c))
    tokens = x.reshape(b, h * w, c)
    tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
    tokens = tokens + pos.astype(tokens.dtype)[None]

    head_dim = c // self.num_heads
    q = Linear(c, dtype=self.dtype, name="q_proj")(tokens[:, :1])
    k = Linear(c, dtype=self.dtype, name="k_proj")(tokens)
    v = Linear(c, dtype=self.dtype, name="v_proj")(tokens)
    q = q.reshape(b, 1, self.num_heads, head_dim) * head_dim ** -0.5
    k = k.reshape(b, n_pos, self.num_heads, head_dim)
    v = v.reshape(b, n_pos, self.num_heads, head_dim)
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, c)
    return Linear(self.output_dim or c, dtype=self.dtype, name="c_proj")(out)


class ModifiedResNet(nn.Module):
  """CLIP ``ModifiedResNet``: ``(B, R, R, 3) → (B, output_dim)`` with R = ``input_resolution``.

  Attributes:
    layers: bottlenecks per stage (RN50: ``(3, 4, 6, 3)``).
    output_dim: embedding width after attention pooling (RN50: 1024).
    heads: attention-pool heads (RN50: 32, i.e. ``width*32 // 64``).
    input_resolution: the only accepted input size (RN50: 224); must be a multiple of 32.
    width: stem width; stage planes are ``width·(1, 2, 4, 8)`` and outputs 4× that (RN50: 64).
  """

  layers: Sequence[int]
  output_dim: int
  heads: int
  input_resolution: int = 224
  width: int = 64
  bn_eps: float = 1e-5
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_taps: bool = False):
    """Returns the embedding, or ``(embedding, taps)`` with taps ``stem``, ``layer1``..``layer4``."""
    if len(self.layers) != 4:
      raise ValueError(f"ModifiedResNet: layers must list 4 stages, got {self.layers}")
    r = self.input_resolution
    if x.ndim != 4 or x.shape[1:3] != (r, r) or x.shape[-1] != 3:
      raise ValueError(f"ModifiedResNet: expected NHWC images (B, {r}, {r}, 3), got {x.shape}")

    def bn(name):
      return BatchNorm(epsilon=self.bn_eps, use_running_average=not train, dtype=self.dtype, name=name)

    half = self.width // 2
    x = nn.relu(bn("bn1")(Conv2d(half, 3, stride=2, padding=1, use_bias=False, dtype=self.dtype, name="conv1")(x)))
    x = nn.relu(bn("bn2")(Conv2d(half, 3, padding=1, use_bias=False, dtype=self.dtype, name="conv2")(x)))
    x = nn.relu(bn("bn3")(Conv2d(self.width, 3, padding=1, use_bias=False, dtype=self.dtype, name="conv3")(x)))
    x = avg_pool2d(x, 2)
    taps = {"stem": x}
    for stage, (n_blocks, mult) in enumerate(zip(self.layers, (1, 2, 4, 8)), start=1):
      for i in range(n_blocks):
        stride = 2 if (stage > 1 and i == 0) else 1
        x = CLIPBottleneck(self.width * mult, stride=stride, bn_eps=self.bn_eps, dtype=self.dtype,
                           name=f"layer{stage}_{i}")(x, train=train)
      taps[f"layer{stage}"] = x
    emb = AttentionPool2d(r // 32, self.width * 32, self.heads, self.output_dim, dtype=self.dtype,
                          name="attnpool")(x)
    taps["pooled"] = emb
    return (emb, taps) if return_taps else emb


def from_torch(state_dict, module: nn.Module, *, prefix: str = "", source: str = "state_dict") -> dict:
  """Converts a CLIP ``ModifiedResNet`` / ``AttentionPool2d`` torch state_dict for ``module``.

  ``prefix`` selects a sub-tree (``'visual.'`` for a full CLIP checkpoint).
  """
  if isinstance(module, AttentionPool2d):
    sample = jnp.zeros((1, module.spacial_dim, module.spacial_dim, module.embed_dim), jnp.float32)
  elif isinstance(module, ModifiedResNet):
    sample = jnp.zeros((1, module.input_resolution, module.input_resolution, 3), jnp.float32)
  else:
    raise TypeError(f"from_torch: expected ModifiedResNet or AttentionPool2d, got {type(module).__name__}")
  target = convert.variables_shape(module, sample)
  return convert.convert_state_dict(state_dict, target, prefix=prefix, source=source)

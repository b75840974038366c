"""CRD-Net (Liu et al., BOE 15(6):3699, 2024): two-modality retinal classification with cross-modal attention.

Port of ``ZirongLiu/CRD-Net: model/CRDNet.py`` (docs/systems.md#crd-net). Two separate torchvision
ResNet towers (ResNet-18 upstream), one per modality, end in a stage-4 fusion block ``CrossGate``:

  x = Attention4D_x(x) + x ;  y = Attention4D_y(y) + y      (EfficientFormerV2-style attention)
  x = UFFN_x(x) + x        ;  y = UFFN_y(y) + y
  x, y = CrossAtt(x, y)                                     (CMA: x queries y and y queries x)
  x = UFFN_x_after(x)      ;  y = UFFN_y_after(y)           (no residual, as upstream)

then a ``Conv1×1 → ReLU → Conv3×3`` fusion conv per modality, global average pooling and three
heads: ``fc`` on the concatenated features and ``fc_x`` / ``fc_y`` per modality, trained with
``CE(out) + CE(out_y) + CE(out_x)`` (``crdnet_loss``).

Layout conventions (they decide parity): everything is NHWC; tokens are the H·W positions in
row-major order; channel axes split **head-major** (q/k channel ``head·dim_k + j``, CMA qkv
channels ``(3, heads, h_dim)``), and attention outputs go back head-major.

Widths are configuration: upstream hard-codes 512-channel towers, ``CrossGate(512, 512, 1024, 4)``
and 512-channel heads; here the tower width follows ``backbone_base_width`` and ``cross_dim``
defaults to twice the tower's output channels, as upstream's ``512*1*2``.

Flax submodule names follow the torch module paths, so ``from_torch`` converts upstream
state_dicts with the generic converter.
"""

from __future__ import annotations

import functools

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxretina.models import convert, layers, resnet
from jaxretina.models.layers import BatchNorm, Conv2d, Linear

Dtype = Any


def _bn(train: bool, dtype, name: str) -> BatchNorm:
  return BatchNorm(use_running_average=not train, dtype=dtype, name=name)


def _check_nhwc(x, where: str, channels: int | None = None) -> None:
  if getattr(x, "ndim", None) != 4:
    raise ValueError(f"{where}: expected an NHWC feature map (B, H, W, C), got shape {getattr(x, 'shape', x)}")
  if channels is not None and x.shape[-1] != channels:
    raise ValueError(f"{where}: expected {channels} channels, got {x.shape[-1]} (shape {x.shape})")


class Attention4D(nn.Module):
  """EfficientFormerV2-style attention as CRD-Net codes it: ``(B, H, W, dim) → (B, H, W, dim)``.

  q, k = BN(Conv1×1(dim → heads·key_dim)); v = BN(Conv1×1(dim → heads·d)) with
  ``d = int(key_dim·attn_ratio)``, then ``v_local`` = BN(depthwise Conv3×3) **replaces** v.
  Logits ``q·kᵀ·key_dim^-½`` are mixed across heads by ``talking_head1`` (1×1 conv over the head
  axis) before the softmax and by ``talking_head2`` after it (so rows no longer sum to 1).
  ``proj`` = ReLU → Conv1×1(heads·d → dim) → BN. No residual inside (``CrossGate`` adds it).

  Attributes:
    num_heads: heads (CRD-Net: 4).
    key_dim: per-head q/k width (CRD-Net: 1024, i.e. its ``dim_k``).
    attn_ratio: per-head v width = ``int(key_dim·attn_ratio)``.
    qkv_bias, proj_bias: biases of the q/k/v and output convs.
    downsample: keys/values from a stride-2 Conv3×3 of the input (CRD-Net: False).
  """

  num_heads: int
  key_dim: int
  attn_ratio: float = 4.0
  qkv_bias: bool = True
  proj_bias: bool = True
  downsample: bool = False
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _check_nhwc(x, "Attention4D input")
    b, h, w, dim = x.shape
    heads, dk = self.num_heads, self.key_dim
    d = int(dk * self.attn_ratio)
    dh = heads * d

    def conv_bn(feats, name, inp, kernel=1, padding=0, groups=1, bias=self.qkv_bias):
      y = Conv2d(feats, kernel, padding=padding, groups=groups, use_bias=bias, dtype=self.dtype,
                 pointwise_as_matmul=True, name=f"{name}_0")(inp)
      return _bn(train, self.dtype, f"{name}_1")(y)

    q = conv_bn(heads * dk, "q", x)
    self.sow("intermediates", "q", q)
    kv_in = Conv2d(dim, 3, stride=2, padding=1, dtype=self.dtype, name="downsample")(x) if self.downsample else x
    k = conv_bn(heads * dk, "k", kv_in)
    # Both BatchNorm outputs of the value path get buffers of their own (layers.materialize): XLA:CPU
    # otherwise recomputed the first in each of the depthwise convolution's nine taps, and the whole
    # chain inside the transposes of v that the attention's backward reads (two of 0.25 s a step at
    # CRD-Net's paper size). CRD-Net's step: +7.6 % for the second buffer, +4.1 % more for the first.
    v = layers.materialize(conv_bn(dh, "v", kv_in))
    v = layers.materialize(conv_bn(dh, "v_local", v, kernel=3, padding=1, groups=dh, bias=True))
    self.sow("intermediates", "v_local", v)

    n_q = h * w
    n_kv = kv_in.shape[1] * kv_in.shape[2]
    q = q.reshape(b, n_q, heads, dk)
    k = k.reshape(b, n_kv, heads, dk)
    v = v.reshape(b, n_kv, heads, d)
    # Logits laid out (B, N_q, N_kv, heads) so the talking heads are plain 1×1 convs over "channels".
    att = jnp.einsum("bnhd,bmhd->bnmh", q, k) * dk ** -0.5
    att = Conv2d(heads, 1, pointwise_as_matmul=True, dtype=self.dtype, name="talking_head1")(att)
    att = jax.nn.softmax(att, axis=2)
    att = Conv2d(heads, 1, pointwise_as_matmul=True, dtype=self.dtype, name="talking_head2")(att)
    out = jnp.einsum("bnmh,bmhd->bnhd", att, v).reshape(b, h, w, dh)
    out = Conv2d(dim, 1, pointwise_as_matmul=True, use_bias=self.proj_bias, dtype=self.dtype,
                 name="proj_1")(nn.relu(out))
    return _bn(train, self.dtype, "proj_2")(out)


class UFFN(nn.Module):
  """Unified FFN (EfficientFormerV2): ``(B, H, W, dim) → (B, H, W, out_dim)``.

  Conv1×1(dim → hidden) → BN → GELU (exact erf, as ``nn.GELU()``) [→ depthwise Conv3×3 → BN →
  GELU when ``use_mid_conv``] → Conv1×1(hidden → out_dim) → BN, ``hidden = int(dim·expansion_rate)``.
  No residual inside.
  """

  out_dim: int
  expansion_rate: float = 4.0
  use_mid_conv: bool = True
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _check_nhwc(x, "UFFN input")
    hidden = int(x.shape[-1] * self.expansion_rate)
    y = Conv2d(hidden, 1, pointwise_as_matmul=True, dtype=self.dtype, name="fc1_0")(x)
    y = nn.gelu(_bn(train, self.dtype, "fc1_1")(y), approximate=False)
    if self.use_mid_conv:
      y = Conv2d(hidden, 3, padding=1, groups=hidden, dtype=self.dtype, name="mid_conv_0")(y)
      y = nn.gelu(_bn(train, self.dtype, "mid_conv_1")(y), approximate=False)
    y = Conv2d(self.out_dim, 1, pointwise_as_matmul=True, dtype=self.dtype, name="fc2_0")(y)
    return _bn(train, self.dtype, "fc2_1")(y)


class CrossAtt(nn.Module):
  """Cross-modal attention (CMA): ``x (B, Hx, Wx, Cx), y (B, Hy, Wy, Cy) → same shapes``.

  ``x_qkv``/``y_qkv`` = Conv1×1(C → 3·dim) with output channels laid out ``(3, heads, h_dim)``,
  ``h_dim = dim // num_heads``. The queries of x attend to the keys/values of y and vice versa,
  scaled by ``h_dim^-½``; ``proj_x``/``proj_y`` = Conv1×1(dim → C), residual added inside. No
  normalisation. x and y may differ in channels and spatial size, not in batch.
  """

  dim: int
  num_heads: int = 4
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    _check_nhwc(x, "CrossAtt x")
    _check_nhwc(y, "CrossAtt y")
    if x.shape[0] != y.shape[0]:
      raise ValueError(f"CrossAtt: x and y must share the batch size, got {x.shape} and {y.shape}")
    if self.dim % self.num_heads:
      raise ValueError(f"CrossAtt: dim {self.dim} is not divisible by num_heads {self.num_heads}")
    heads, hd = self.num_heads, self.dim // self.num_heads

    def qkv(inp, name):
      b, h, w, _ = inp.shape
      t = Conv2d(3 * self.dim, 1, pointwise_as_matmul=True, dtype=self.dtype, name=name)(inp)
      t = t.reshape(b, h * w, 3, heads, hd)
      return t[:, :, 0], t[:, :, 1], t[:, :, 2]  # each (B, N, heads, h_dim)

    q_x, k_x, v_x = qkv(x, "x_qkv")
    q_y, k_y, v_y = qkv(y, "y_qkv")

    def attend(q, k, v, shape):
      att = jax.nn.softmax(jnp.einsum("bnhd,bmhd->bhnm", q, k) * hd ** -0.5, axis=-1)
      return jnp.einsum("bhnm,bmhd->bnhd", att, v).reshape(shape[:3] + (self.dim,))

    proj = functools.partial(Conv2d, kernel_size=1, pointwise_as_matmul=True, dtype=self.dtype)
    out_x = proj(x.shape[-1], name="proj_x")(attend(q_x, k_y, v_y, x.shape)) + x
    out_y = proj(y.shape[-1], name="proj_y")(attend(q_y, k_x, v_x, y.shape)) + y
    return out_x, out_y


class CrossGate(nn.Module):
  """CRD-Net's stage-4 fusion block: ``x (B, Hx, Wx, Cx), y (B, Hy, Wy, Cy) → same shapes``.

  Per modality ``Attention4D(num_heads, key_dim=dim)`` + residual, ``UFFN`` + residual, then
  ``CrossAtt(dim, num_heads)`` (residual inside), then a second ``UFFN`` **without** residual.

  Sown into ``'intermediates'``: ``attention_x``/``attention_y`` (Attention4D outputs, before their
  residual) and ``cma_x``/``cma_y`` (CrossAtt outputs).

  Attributes:
    dim: the CMA width and the Attention4D key width per head (CRD-Net: 1024).
    num_heads: heads of both attentions (CRD-Net: 4).
  """

  dim: int
  num_heads: int = 4
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    _check_nhwc(x, "CrossGate x")
    _check_nhwc(y, "CrossGate y")
    cx, cy = x.shape[-1], y.shape[-1]
    att_x = Attention4D(self.num_heads, self.dim, dtype=self.dtype, name="pre_att_x")(x, train)
    att_y = Attention4D(self.num_heads, self.dim, dtype=self.dtype, name="pre_att_y")(y, train)
    self.sow("intermediates", "attention_x", att_x)
    self.sow("intermediates", "attention_y", att_y)
    x, y = att_x + x, att_y + y
    x = UFFN(cx, use_mid_conv=False, dtype=self.dtype, name="mlp_x")(x, train) + x
    y = UFFN(cy, use_mid_conv=False, dtype=self.dtype, name="mlp_y")(y, train) + y
    x, y = CrossAtt(self.dim, self.num_heads, dtype=self.dtype, name="cross_att")(x, y)
    self.sow("intermediates", "cma_x", x)
    self.sow("intermediates", "cma_y", y)
    x = UFFN(cx, use_mid_conv=False, dtype=self.dtype, name="mlp_x_after")(x, train)
    y = UFFN(cy, use_mid_conv=False, dtype=self.dtype, name="mlp_y_after")(y, train)
    return x, y


class CRDNet(nn.Module):
  """CRD-Net (``CrossMaResNet``): two images → ``(out, out_x, out_y)`` logits, each ``(B, num_classes)``.

  Call ``model.apply(variables, x, y)`` with ``x (B, H, W, in_channels[0])`` (modality 1, e.g. colour
  fundus) and ``y (B, H', W', in_channels[1])`` (modality 2, e.g. OCT/FFA). Intermediate maps are
  sown into ``'intermediates'``: ``x_s4``/``y_s4`` (tower outputs), ``gate_x``/``gate_y``
  (CrossGate outputs), ``fusion_x``/``fusion_y`` (fusion-conv outputs).

  Attributes:
    num_classes: classes of all three heads.
    in_channels: channels of the two modalities. A tower whose input is not 3-channel gets a stem
      conv with bias, as upstream replaces ``conv1`` by ``nn.Conv2d(in, 64, 7, 2, 3)``.
    backbone_block, backbone_layers, backbone_base_width: the towers (ResNet-18: ``'basic'``,
      ``(2, 2, 2, 2)``, 64).
    cross_dim: CrossGate ``dim`` (CMA width, Attention4D key width); default 2× the tower output
      channels (upstream ``512*1*2``).
    num_heads: CrossGate heads.
    skip_stem_maxpool: upstream quirk. ``backbone_forward`` runs conv1 → bn1 → ReLU → layer1…3
      without the tower's max-pool, so the towers have output stride 16 instead of a ResNet's 32
      (4× the tokens; upstream's shape comments, 28×28 at 448², show it runs that way). The paper
      names ResNet-18 towers and says nothing of the pool; we read the skip as an accident of the
      hand-written ``backbone_forward`` and default to the standard ResNet stem (False). True
      reproduces upstream (the parity fixtures use it).
    remat: the towers' activation rematerialisation (``resnet.ResNet.remat``: ``'none'``,
      ``'blocks'``, ``'dots'``); the parameters do not depend on it.
  """

  num_classes: int
  in_channels: Sequence[int] = (3, 3)
  backbone_block: str = "basic"
  backbone_layers: Sequence[int] = (2, 2, 2, 2)
  backbone_base_width: int = 64
  cross_dim: int | None = None
  num_heads: int = 4
  skip_stem_maxpool: bool = False
  dtype: Dtype | None = None
  remat: str = "none"

  # Not wrapped as a module method: called outside ``__call__`` (the trainer's ``backbones()`` for
  # ``config.init.backbone``), a wrapped method would adopt the tower as a child of an unbound module.
  @nn.nowrap
  def _tower(self, name: str | None, in_ch: int) -> resnet.ResNet:
    return resnet.ResNet(block=self.backbone_block, layers=tuple(self.backbone_layers), num_classes=None,
                         base_width=self.backbone_base_width, use_maxpool=not self.skip_stem_maxpool,
                         stem_conv_bias=in_ch != 3, dtype=self.dtype, remat=self.remat, name=name)

  @property
  def feature_channels(self) -> int:
    """Channels of each tower's output, the CrossGate and the heads (ResNet-18: 512)."""
    return self.backbone_base_width * 8 * resnet.expansion(self.backbone_block)

  @nn.compact
  def __call__(self, *images: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    if len(self.in_channels) != 2:
      raise ValueError(f"CRDNet.in_channels={tuple(self.in_channels)}: expected channels of 2 modalities")
    if len(images) != 2:
      raise ValueError(f"CRDNet expects 2 modalities (x, y), got {len(images)} image arrays")
    x, y = images
    for name, img, ch in (("x (modality 1)", x, self.in_channels[0]), ("y (modality 2)", y, self.in_channels[1])):
      _check_nhwc(img, f"CRDNet input {name}", ch)
    if x.shape[0] != y.shape[0]:
      raise ValueError(f"CRDNet: the two modalities must share the batch size, got {x.shape} and {y.shape}")

    c = self.feature_channels
    x = self._tower("backbone_x", self.in_channels[0])(x, train=train, stop_after="layer4")
    y = self._tower("backbone_y", self.in_channels[1])(y, train=train, stop_after="layer4")
    self.sow("intermediates", "x_s4", x)
    self.sow("intermediates", "y_s4", y)
    x, y = CrossGate(self.cross_dim or 2 * c, self.num_heads, dtype=self.dtype,
                     name="cross_att_stage4")(x, y, train)
    self.sow("intermediates", "gate_x", x)
    self.sow("intermediates", "gate_y", y)

    def fusion(inp, name):
      z = nn.relu(Conv2d(c, 1, pointwise_as_matmul=True, dtype=self.dtype, name=f"{name}_0")(inp))
      return Conv2d(c, 3, padding=1, dtype=self.dtype, name=f"{name}_2")(z)

    x, y = fusion(x, "cross_fusion_x"), fusion(y, "cross_fusion_y")
    self.sow("intermediates", "fusion_x", x)
    self.sow("intermediates", "fusion_y", y)
    f_x = resnet.global_avg_pool(x)
    f_y = resnet.global_avg_pool(y)
    out = Linear(self.num_classes, dtype=self.dtype, name="fc")(jnp.concatenate([f_x, f_y], axis=-1))
    out_x = Linear(self.num_classes, dtype=self.dtype, name="fc_x")(f_x)
    out_y = Linear(self.num_classes, dtype=self.dtype, name="fc_y")(f_y)
    return out, out_x, out_y


def crdnet_loss(outputs: tuple[jax.Array, jax.Array, jax.Array], labels: jax.Array,
                weights: Sequence[float] = (1.0, 1.0, 1.0)) -> jax.Array:
  """CRD-Net's "multiple loss": ``w0·CE(out) + w1·CE(out_x) + w2·CE(out_y)`` (mean CE each).

  ``outputs`` is ``CRDNet``'s ``(out, out_x, out_y)``; ``labels`` (B,) ints. Upstream
  (``main_multimodel.py``) uses equal weights 1/1/1.
  """
  if len(weights) != 3:
    raise ValueError(f"crdnet_loss: expected 3 weights, got {len(weights)}")
  total = 0.0
  for term, w in zip(crdnet_loss_terms(outputs, labels), weights):
    total = total + w * term
  return total


def crdnet_loss_terms(outputs: tuple[jax.Array, jax.Array, jax.Array],
                      labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The unweighted terms of ``crdnet_loss``: ``(CE(out), CE(out_x), CE(out_y))``, mean CE each."""
  if len(outputs) != 3:
    raise ValueError(f"crdnet_loss: expected 3 logits arrays (out, out_x, out_y), got {len(outputs)}")
  labels = jnp.asarray(labels)
  terms = []
  for logits in outputs:
    if logits.shape[:1] != labels.shape:
      raise ValueError(f"crdnet_loss: logits {logits.shape} do not match labels {labels.shape}")
    terms.append(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean())
  return tuple(terms)


def from_torch(state_dict: Mapping[str, Any], module: nn.Module, *sample_inputs: jax.Array, prefix: str = "",
               source: str = "state_dict", placement: dict | None = None) -> dict:
  """Converts an upstream CRD-Net (or sub-block) torch ``state_dict`` for ``module``.

  ``sample_inputs`` are NHWC arrays (or ShapeDtypeStructs) shaped like the module's inputs (only
  their channel counts matter for the variables); every key must find its place, and vice versa.
  Keys saved through upstream's ``nn.DataParallel`` wrapper (``module.`` prefix) convert as well.
  ``placement`` receives torch key (as given) → Flax path (``convert.convert_state_dict``).
  """
  target = convert.variables_shape(module, *sample_inputs)
  rename = None
  if not prefix and any(k.startswith("module.") for k in state_dict):
    rename = lambda key: key.removeprefix("module.")  # noqa: E731
  return convert.convert_state_dict(state_dict, target, prefix=prefix, rename=rename, source=source,
                                    placement=placement)

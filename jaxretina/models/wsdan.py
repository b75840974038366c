"""WS-DAN / CAL / DualAttendMed: attention heads, Bilinear Attention Pooling, the full model, centers.

docs/systems.md#ws-dan-family. Upstream: ``raoyongming/CAL: fgvc/models/cal.py`` (``WSDAN_CAL``, ``BAP``),
``JunaidAbbas517/DualAttendMed: models/cal.py`` (the same plus ``ChannelAttention``), their
``models/resnet.py`` backbone and the feature-center updates of their ``train_distributed.py``.
Everything is NHWC; attention maps are (B,h,w,M).

Model (``WSDAN``), for backbone features F (B,h,w,C):

* ``variant='cal'``: A = ReLU(BN_eps1e-3(Conv1×1_no-bias(F))) (inception ``BasicConv2d``), E = F.
* ``variant='dualattendmed'``: E, w = ChannelAttention(F); A = Conv1×1_with-bias(E) (no BN/ReLU,
  so A can be negative).
* f, f̄ = BAP(E, A) (real and counterfactual attention); logits = fc(100·f);
  effect logits = logits − fc(100·f̄) (upstream ``p_aux``).
* attention map for crop/drop: train — two maps per sample, drawn with probabilities
  ∝ √(Σ_hw A_k + 1e-6); eval — the mean over M.

Randomness (train mode) comes from an explicit PRNG ``key``, or is injected (``fake_attention``,
``pick_indices``), which the parity fixtures use for upstream's torch/numpy draws.

Upstream quirks behind flags (default = intended behaviour):

* ``WSDAN.pick_with_replacement`` (default False): upstream draws the crop and drop maps with
  ``np.random.choice(M, 2, p=...)`` *with* replacement, so both may be the same map; by default
  two distinct maps are drawn.
* ``WSDAN.clamp_negative_attention_mass`` (default True): DualAttendMed's maps are unbounded, so
  Σ_hw A_k can be negative and upstream's √(Σ + 1e-6) is NaN (numpy then raises). By default the
  sums are clamped at 0 before the square root; with False the upstream formula is used and a
  sample whose weights are not finite gets NaN attention maps, surfacing the failure.
* ``update_feature_centers(duplicate_labels='last')``: upstream's advanced-index assignment keeps
  the last sample of a repeated label (torch CPU; undefined on CUDA); default ``'mean'`` moves a
  class center by the mean update of its samples.
* ``update_feature_centers(rule='dualattendmed', share_batch_mean=True)``: DualAttendMed adds the
  *batch* mean of (f − ĉ) to every class present; default False uses each class's own mean.

``channel_weights`` keep their batch axis for B == 1 (upstream's ``squeeze()`` drops it).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxretina.models import convert, layers
from jaxretina.models import resnet as resnet_lib

VARIANTS = ("cal", "dualattendmed")
POOLS = ("GAP", "GMP")
BAP_EPS = 1e-6  # CAL / DualAttendMed; GuYuc's WS-DAN uses 1e-12 (also inside the sqrt).
BACKBONES = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}


# ------------------------------------------------------------------------ Bilinear Attention Pooling


def signed_sqrt(x: jax.Array, eps: float = BAP_EPS) -> jax.Array:
  """``sign(x)·sqrt(|x| + eps)``, eps inside the root and on every element (0 ↦ √eps)."""
  return jnp.sign(x) * jnp.sqrt(jnp.abs(x) + eps)


def bilinear_attention_pooling(features: jax.Array, attentions: jax.Array, *, pool: str = "GAP",
                               train: bool = False, key: jax.Array | None = None,
                               fake_attention: jax.Array | None = None,
                               eps: float = BAP_EPS) -> tuple[jax.Array, jax.Array]:
  """BAP: attention-weighted feature pooling and its counterfactual.

  Args:
    features: E (B,H,W,C).
    attentions: A (B,AH,AW,M); resized to (H,W) with ``align_corners=True`` bilinear if needed.
    pool: ``'GAP'`` (mean over H×W of A_m·E) or ``'GMP'`` (max over H×W of A_m·E).
    train: counterfactual attention ~ U(0, 2) (from ``key`` or ``fake_attention``); eval: ones.
    key: PRNG key for the train-mode counterfactual draw.
    fake_attention: (B,H,W,M) injected counterfactual attention (train mode).
    eps: signed-sqrt epsilon.

  Returns:
    ``(feature_matrix, counterfactual_feature)``, each (B, M·C) flattened M-major, signed-sqrt'd
    and L2-normalised. The counterfactual always uses GAP (as upstream).
  """
  if pool not in POOLS:
    raise ValueError(f"BAP pool={pool!r}: expected one of {POOLS}")
  if features.ndim != 4 or attentions.ndim != 4:
    raise ValueError(f"BAP: expected features (B,H,W,C) and attentions (B,h,w,M), got {features.shape} "
                     f"and {attentions.shape}")
  b, h, w, c = features.shape
  m = attentions.shape[-1]
  if attentions.shape[0] != b:
    raise ValueError(f"BAP: attentions batch {attentions.shape[0]} != features batch {b}")
  if attentions.shape[1:3] != (h, w):
    attentions = layers.resize_bilinear_align_corners(attentions, (h, w))

  if pool == "GAP":
    matrix = jnp.einsum("bhwm,bhwc->bmc", attentions, features) / float(h * w)
  else:
    # One map at a time (as upstream) keeps memory at B·H·W·C instead of B·H·W·M·C.
    per_map = jax.lax.map(lambda a: jnp.max(a[..., None] * features, axis=(1, 2)), jnp.moveaxis(attentions, -1, 0))
    matrix = jnp.moveaxis(per_map, 0, 1)
  feature_matrix = layers.l2_normalize(signed_sqrt(matrix.reshape(b, m * c), eps))

  if train:
    if fake_attention is None:
      if key is None:
        raise ValueError("BAP in train mode draws the counterfactual attention: pass `key` or `fake_attention`")
      fake_attention = jax.random.uniform(key, attentions.shape, jnp.float32, 0.0, 2.0)
    elif fake_attention.shape != attentions.shape:
      raise ValueError(f"BAP fake_attention: expected shape {attentions.shape} (the resized attentions), "
                       f"got {fake_attention.shape}")
    counterfactual = jnp.einsum("bhwm,bhwc->bmc", fake_attention.astype(features.dtype), features) / float(h * w)
  else:
    # einsum with all-ones attention = the per-channel mean, repeated for every map.
    counterfactual = jnp.broadcast_to(jnp.mean(features, axis=(1, 2))[:, None, :], (b, m, c))
  counterfactual_feature = layers.l2_normalize(signed_sqrt(counterfactual.reshape(b, m * c), eps))
  return feature_matrix, counterfactual_feature


# ----------------------------------------------------------------------------------------- heads


class ChannelAttention(nn.Module):
  """DualAttendMed ``ChannelAttention``: (B,h,w,C) → (E (B,h,w,C), weights (B,C)).

  w = σ(fc2(ReLU(fc1(GAP F))) + fc2(ReLU(fc1(GMP F)))), fc1 C→C/r and fc2 C/r→C bias-free; E = w·F.
  """

  reduction: int = 16

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    c = x.shape[-1]
    if c // self.reduction < 1:
      raise ValueError(f"ChannelAttention: {c} channels // reduction {self.reduction} leaves an empty MLP")
    fc1 = layers.Linear(c // self.reduction, use_bias=False, name="fc1")
    fc2 = layers.Linear(c, use_bias=False, name="fc2")
    mlp = lambda v: fc2(nn.relu(fc1(v)))
    weights = jax.nn.sigmoid(mlp(jnp.mean(x, axis=(1, 2))) + mlp(jnp.max(x, axis=(1, 2))))
    return x * weights[:, None, None, :], weights


class BasicConv2d(nn.Module):
  """Inception ``BasicConv2d`` used as CAL's attention layer: 1×1 conv (no bias) → BN(eps 1e-3) → ReLU."""

  features: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = layers.Conv2d(self.features, 1, use_bias=False, name="conv")(x)
    y = layers.BatchNorm(epsilon=1e-3, name="bn")(y, use_running_average=not train)
    return nn.relu(y)


class WSDANOutput(NamedTuple):
  """What ``WSDAN`` returns (upstream names in brackets).

  logits: (B,K) [p / p_coarse]. effect_logits: (B,K) logits − counterfactual logits [p_aux].
  feature_matrix: (B,M·C). attention_map: (B,h,w,2) train (crop map, drop map) or (B,h,w,1) eval.
  channel_weights: (B,C) DualAttendMed, None for CAL. attention_maps: (B,h,w,M) raw maps.
  """

  logits: jax.Array
  effect_logits: jax.Array
  feature_matrix: jax.Array
  attention_map: jax.Array
  channel_weights: jax.Array | None
  attention_maps: jax.Array


def attention_pick_weights(attention_maps: jax.Array, clamp_negative: bool = True,
                           eps: float = BAP_EPS) -> jax.Array:
  """Sampling probabilities (B,M) of the maps: L1-normalised √(Σ_hw A_k + eps)."""
  mass = jnp.sum(jax.lax.stop_gradient(attention_maps).astype(jnp.float32), axis=(1, 2))
  if clamp_negative:
    mass = jnp.maximum(mass, 0.0)
  weights = jnp.sqrt(mass + eps)
  return weights / jnp.maximum(jnp.sum(jnp.abs(weights), axis=1, keepdims=True), 1e-12)


def sample_pick_indices(key: jax.Array, probabilities: jax.Array, with_replacement: bool = False) -> jax.Array:
  """Two map indices per sample (B,2) int32 drawn with ``probabilities`` (B,M): [crop, drop]."""
  m = probabilities.shape[1]
  keys = jax.random.split(key, probabilities.shape[0])
  finite = jnp.all(jnp.isfinite(probabilities), axis=1, keepdims=True)
  probs = jnp.where(finite, probabilities, 1.0 / m)
  return jax.vmap(lambda k, p: jax.random.choice(k, m, (2,), replace=with_replacement, p=p))(keys, probs).astype(jnp.int32)


class WSDAN(nn.Module):
  """WS-DAN with counterfactual attention (CAL), optionally with DualAttendMed's channel attention.

  Attributes:
    num_classes: K.
    num_attentions: M (32 upstream).
    variant: ``'cal'`` (BasicConv2d attention) or ``'dualattendmed'`` (ChannelAttention + conv with bias).
    backbone_layers: Bottleneck blocks per stage of the stride-16 ResNet (``BACKBONES``); None:
      no backbone, the input is already the feature map (B,h,w,C) (the head-only fixtures).
    backbone_base_width: the backbone's stem width (64 upstream; smaller for local runs).
    pool: BAP pooling, ``'GAP'`` upstream.
    channel_reduction: ChannelAttention reduction (16).
    pick_with_replacement: upstream quirk, see the module docstring.
    clamp_negative_attention_mass: see the module docstring.
    dtype: backbone compute dtype.
    remat: the backbone's activation rematerialisation (``resnet.ResNet.remat``: ``'none'``,
      ``'blocks'``, ``'dots'``); the parameters do not depend on it.
  """

  num_classes: int
  num_attentions: int = 32
  variant: str = "dualattendmed"
  backbone_layers: Sequence[int] | None = BACKBONES["resnet152"]
  backbone_base_width: int = 64
  pool: str = "GAP"
  channel_reduction: int = 16
  pick_with_replacement: bool = False
  clamp_negative_attention_mass: bool = True
  dtype: Any = None
  remat: str = "none"

  def setup(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"WSDAN.variant={self.variant!r}: expected one of {VARIANTS}")
    if self.backbone_layers is not None:
      self.features = resnet_lib.ResNet(block="bottleneck", layers=tuple(self.backbone_layers), num_classes=None,
                                        base_width=self.backbone_base_width, last_stride=1, dtype=self.dtype,
                                        remat=self.remat)
    if self.variant == "dualattendmed":
      self.channel_attention = ChannelAttention(self.channel_reduction)
      self.attentions = layers.Conv2d(self.num_attentions, 1, use_bias=True)
    else:
      self.attentions = BasicConv2d(self.num_attentions)
    self.fc = layers.Linear(self.num_classes, use_bias=False)

  def __call__(self, x: jax.Array, train: bool = False, *, key: jax.Array | None = None,
               fake_attention: jax.Array | None = None, pick_indices: jax.Array | None = None) -> WSDANOutput:
    """Forward pass.

    Args:
      x: images (B,H,W,3), or backbone features (B,h,w,C) when ``backbone_layers`` is None.
      train: BatchNorm batch statistics (``mutable=['batch_stats']``), random counterfactual and
        random crop/drop map picks.
      key: PRNG key for the train-mode draws (split into the counterfactual and the picks).
      fake_attention: (B,h,w,M) injected counterfactual attention.
      pick_indices: (B,2) injected map indices [crop, drop].

    Returns:
      ``WSDANOutput``.
    """
    if x.ndim != 4:
      raise ValueError(f"WSDAN input: expected (B,H,W,C) NHWC, got shape {x.shape}")
    fake_key = pick_key = None
    if train and (fake_attention is None or pick_indices is None):
      if key is None:
        raise ValueError("WSDAN in train mode draws random numbers: pass `key` (or inject both "
                         "`fake_attention` and `pick_indices`)")
      fake_key, pick_key = jax.random.split(key)

    feats = self.features(x, train=train, stop_after="layer4") if self.backbone_layers is not None else x
    feats = feats.astype(jnp.float32)
    if self.variant == "dualattendmed":
      enhanced, channel_weights = self.channel_attention(feats)
      maps = self.attentions(enhanced)
    else:
      enhanced, channel_weights = feats, None
      maps = self.attentions(feats, train=train)

    feature_matrix, counterfactual = bilinear_attention_pooling(
        enhanced, maps, pool=self.pool, train=train, key=fake_key, fake_attention=fake_attention)
    logits = self.fc(feature_matrix * 100.0)
    effect_logits = logits - self.fc(counterfactual * 100.0)

    if train:
      probs = attention_pick_weights(maps, self.clamp_negative_attention_mass)
      if pick_indices is None:
        pick_indices = sample_pick_indices(pick_key, probs, self.pick_with_replacement)
      pick_indices = jnp.asarray(pick_indices, jnp.int32)
      if pick_indices.shape != (x.shape[0], 2):
        raise ValueError(f"WSDAN pick_indices: expected shape ({x.shape[0]}, 2), got {pick_indices.shape}")
      attention_map = jnp.take_along_axis(maps, pick_indices[:, None, None, :], axis=3)
      bad = ~jnp.all(jnp.isfinite(probs), axis=1)
      attention_map = jnp.where(bad[:, None, None, None], jnp.nan, attention_map)
    else:
      attention_map = jnp.mean(maps, axis=-1, keepdims=True)
    return WSDANOutput(logits, effect_logits, feature_matrix, attention_map, channel_weights, maps)


def from_constructor(ctor: Mapping[str, Any], *, variant: str, head_only: bool = False, **overrides) -> WSDAN:
  """Builds ``WSDAN`` from upstream ``WSDAN_CAL(num_classes, M, net, pretrained)`` kwargs.

  ``backbone_layers`` in ``ctor`` (a reduced backbone) wins over ``net``; ``head_only`` builds
  the head alone (upstream ``features = nn.Identity()``).
  """
  net = ctor.get("net", "resnet152")
  if head_only:
    backbone = None
  elif ctor.get("backbone_layers") is not None:
    backbone = tuple(int(n) for n in ctor["backbone_layers"])
  elif net in BACKBONES:
    backbone = BACKBONES[net]
  else:
    raise ValueError(f"WSDAN net={net!r}: expected one of {sorted(BACKBONES)}")
  kw = dict(num_classes=int(ctor["num_classes"]), num_attentions=int(ctor.get("M", 32)), variant=variant,
            backbone_layers=backbone)
  kw.update(overrides)
  return WSDAN(**kw)


def torch_key_rename(key: str) -> str | None:
  """Upstream WSDAN keys → the naming rule: ``features.{0,1,4..7}`` is an ``nn.Sequential`` of
  (conv1, bn1, relu, maxpool, layer1..layer4). ``feature_center`` (CAL training checkpoints) is
  not a model variable: use ``feature_centers_from_checkpoint``.
  """
  if key == "feature_center":
    return None
  if key.startswith("module."):  # DataParallel / DDP checkpoints
    key = key[len("module."):]
  if key.startswith("features."):
    parts = key.split(".")
    index = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}.get(parts[1])
    if index is None:
      raise convert.ConversionError(f"{key}: features.{parts[1]} is not a parameterised backbone layer")
    return ".".join(["features", index] + parts[2:])
  return key


def from_torch(state_dict: Mapping[str, Any], module: WSDAN, *, input_shape: tuple[int, ...] | None = None,
               prefix: str = "", source: str = "state_dict", placement: dict | None = None) -> dict:
  """Upstream ``WSDAN_CAL.state_dict()`` → ``{'params', 'batch_stats'}`` for ``module``.

  ``input_shape``: NHWC shape used to trace the variables: default an image (1,64,64,3), or
  (1,4,4,2048) for a head-only module (set it when the feature width differs).
  ``placement``: receives torch key → Flax path (``convert.convert_state_dict``).
  """
  if input_shape is None:
    input_shape = (1, 64, 64, 3) if module.backbone_layers is not None else (1, 4, 4, 2048)
  target = convert.variables_shape(module, jnp.zeros(input_shape, jnp.float32))
  return convert.convert_state_dict(state_dict, target, prefix=prefix, rename=torch_key_rename, source=source,
                                    placement=placement)


# ------------------------------------------------------------------------------- feature centers


def init_feature_centers(num_classes: int, dim: int, rule: str = "wsdan", key: jax.Array | None = None) -> jax.Array:
  """(K, M·C) initial centers: zeros (WS-DAN / CAL) or N(0,1)·0.01 from ``key`` (DualAttendMed)."""
  if rule == "wsdan":
    return jnp.zeros((num_classes, dim), jnp.float32)
  if rule == "dualattendmed":
    if key is None:
      raise ValueError("init_feature_centers(rule='dualattendmed') draws N(0, 0.01²): pass `key`")
    return jax.random.normal(key, (num_classes, dim), jnp.float32) * 0.01
  raise ValueError(f"feature-center rule={rule!r}: expected 'wsdan' or 'dualattendmed'")


def update_feature_centers(centers: jax.Array, features: jax.Array, labels: jax.Array, *, beta: float = 0.05,
                           rule: str = "wsdan", duplicate_labels: str = "mean",
                           share_batch_mean: bool = False) -> jax.Array:
  """One center update; pure, jittable and independent of how the batch is sharded.

  With ĉ = normalize(c_y) and the detached features f:

  * ``rule='wsdan'`` (WS-DAN / CAL): c_y ← c_y + β·(f − ĉ_y).
  * ``rule='dualattendmed'``: c_y ← ĉ_y + β·mean(f − ĉ_y).

  Args:
    centers: (K, D).
    features: (B, D) feature matrices.
    labels: (B,) int class ids.
    beta: update rate (0.05 upstream).
    rule: see above.
    duplicate_labels: ``'mean'`` (default) averages the update over a class's samples (for the
      dualattendmed rule: the mean over the class's samples); ``'last'`` keeps the last sample's
      update as upstream's index assignment does (wsdan rule only).
    share_batch_mean: dualattendmed rule, upstream quirk: add the mean over the *whole batch* to
      every class present.

  Returns:
    Updated (K, D) centers; classes absent from the batch are unchanged.
  """
  if rule not in ("wsdan", "dualattendmed"):
    raise ValueError(f"feature-center rule={rule!r}: expected 'wsdan' or 'dualattendmed'")
  if duplicate_labels not in ("mean", "last"):
    raise ValueError(f"duplicate_labels={duplicate_labels!r}: expected 'mean' or 'last'")
  if features.ndim != 2 or features.shape[1] != centers.shape[1] or labels.shape != (features.shape[0],):
    raise ValueError(f"update_feature_centers: expected features (B,{centers.shape[1]}) and labels (B,), got "
                     f"{features.shape} and {labels.shape}")
  num_classes = centers.shape[0]
  features = jax.lax.stop_gradient(features).astype(jnp.float32)
  normalized = layers.l2_normalize(centers)
  delta = features - normalized[labels]  # (B, D)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # (B, K)
  counts = jnp.sum(onehot, axis=0)
  present = (counts > 0)[:, None]
  hp = jax.lax.Precision.HIGHEST
  if duplicate_labels == "last":
    batch = features.shape[0]
    position = jnp.where(onehot > 0, jnp.arange(batch, dtype=jnp.int32)[:, None], -1)
    last = jnp.max(position, axis=0)  # (K,), -1 where absent
    class_delta = delta[jnp.maximum(last, 0)]
  else:
    class_delta = jnp.matmul(onehot.T, delta, precision=hp) / jnp.maximum(counts, 1.0)[:, None]
  if rule == "wsdan":
    return jnp.where(present, centers + beta * class_delta, centers)
  if share_batch_mean:
    class_delta = jnp.broadcast_to(jnp.mean(delta, axis=0, keepdims=True), centers.shape)
  return jnp.where(present, normalized + beta * class_delta, centers)


def feature_centers_from_checkpoint(checkpoint: Mapping[str, Any]) -> jax.Array | None:
  """The ``feature_center`` (K, M·C) a CAL / DualAttendMed training checkpoint carries, if any."""
  value = checkpoint.get("feature_center")
  return None if value is None else jnp.asarray(value, jnp.float32)

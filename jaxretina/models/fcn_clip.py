"""FCN-CLIP with CBAM (ELEC 4840 final project, ``gyuminleehk/Elec-4840-Final-Project``): DR grading on FLAIR features.

Port of ``FCN_CLIP``, ``CBAM``, ``FocalLoss``, ``compute_class_weights`` and the hybrid loss of the
notebook's code cell 7 (docs/systems.md#fcn-clip). The "CLIP" encoder is FLAIR's image tower (a
torchvision ResNet-50 + ``ProjectionLayer``), frozen:

  z, {L2, L3} = FLAIR vision tower(x)            (no gradient; L2/L3 = layer2/layer3 outputs)
  f = L3                                          or, with ``use_fusion``,
  f = Conv1×1(concat[up(L3 → size of L2), L2])   (bilinear, align_corners=False; C2+C3 → C3)
  d = decoder(f): Conv3×3 → BN → ReLU → Dropout2d → ×2 bilinear upsample → Conv3×3 → BN → ReLU
  a = CBAM(d)  (FCN-CLIP's variant, ``cbam.CBAM(mode='fcnclip')``)
  logits = Linear(GAP(a))                         (upstream: GAP(d ⊙ a), see ``double_cbam_gating``)

The forward returns ``(logits, z)``. Training minimises ``0.7·focal + 0.3·contrastive``
(``hybrid_loss``), where the contrastive term compares z with FLAIR's class prototypes
(``flair.text_prototypes``; computed once, gradient-free like upstream).

The encoder keeps FLAIR's parameter layout under ``vision_model`` (``model`` = ResNet,
``projection_head_vision``), so the ``vision_model`` subtree of FLAIR ``TwoTower`` variables plugs
in unchanged (``encoder_variables_from_flair``), and an upstream FCN_CLIP ``state_dict`` converts
with ``from_torch``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxretina.data import dr_grades
from jaxretina.models import cbam, convert, flair, resnet
from jaxretina.models.layers import BatchNorm, Conv2d, Linear, l2_normalize

Dtype = Any

# The notebook's class order (APTOS / Messidor-2 DR grades) and its hyper-parameters.
DR_CATEGORIES = dr_grades.DR_CATEGORIES
CONTRASTIVE_TEMPERATURE = 0.2  # the notebook's global ``temperature`` overrides the method default 0.1
FOCAL_WEIGHT = 0.7  # the notebook's ``alpha``: loss = alpha·focal + (1 − alpha)·contrastive
CONTRASTIVE_SCALE = 0.01  # ``compute_contrastive_loss`` multiplies its CE by 0.01


def bilinear_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """``F.interpolate(x, size, mode='bilinear')`` (align_corners=False) for NHWC ``x``.

  Half-pixel bilinear without antialiasing; equal to torch for upsampling, the only use here.
  """
  b, _, _, c = x.shape
  return jax.image.resize(x, (b, int(size[0]), int(size[1]), c), "bilinear", antialias=False)


class TappedVisionModel(nn.Module):
  """FLAIR's ``VisionModel`` that also returns its backbone's stage outputs.

  ``(B, H, W, 3) → (z (B, proj_dim), taps)`` with taps ``'layer1'``..``'layer4'`` (B, h, w, C).
  Parameter layout = ``flair.VisionModel``: ``model`` (the ResNet) and ``projection_head_vision``.
  """

  model: resnet.ResNet
  proj_dim: int = 512
  proj_bias: bool = False
  projection: bool = True
  norm: bool = True
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    pooled, taps = self.model(images, train=train, return_taps=True)
    if pooled.ndim != 2:
      raise ValueError(f"TappedVisionModel: the backbone must return pooled (B, D) features, got {pooled.shape} "
                       "(build the ResNet with num_classes=None)")
    z = flair.ProjectionLayer(self.proj_dim, use_bias=self.proj_bias, project=self.projection, norm=self.norm,
                              dtype=self.dtype, name="projection_head_vision")(pooled)
    return z, taps


class FCNCLIP(nn.Module):
  """FCN-CLIP: ``(B, H, W, 3) → (logits (B, num_classes), z (B, proj_dim))``.

  Sown into ``'intermediates'``: ``layer2``, ``layer3`` (encoder taps), ``fused`` (the fusion
  conv's output, with ``use_fusion``), ``decoded`` (decoder output), ``attended`` (the CBAM
  module's output) and ``spatial_attention`` (CBAM's spatial gate, (B, h, w, 1)).

  Attributes:
    vision: the FLAIR image backbone, a ``resnet.ResNet`` with ``num_classes=None`` (ResNet-50);
      cloned into ``vision_model/model``. Use ``from_flair`` to copy a ``flair.TwoTower``'s config.
    proj_dim, proj_bias, projection, norm_features: FLAIR's projection head (as ``flair.TwoTower``).
    num_classes: DR grades (5).
    use_fusion: decode the fused layer2+layer3 map (twice the resolution) instead of layer3 alone.
      The run behind the reported numbers used False.
    decoder_channels: widths of the two decoder convs (upstream ``(512, 128)``).
    cbam_reduction: CBAM channel-MLP reduction (16).
    dropout_rate: ``Dropout2d`` rate in the decoder (0.3); train mode needs a ``'dropout'`` key.
    double_cbam_gating: upstream quirk. ``FCN_CLIP.forward`` does ``a = CBAM(x); x = x * a``, but
      CBAM already returns the gated features, so the classifier sees x²·ca·sa. Default False
      applies the attention once (x·ca·sa, what CBAM means); True reproduces upstream.
    encoder_bn_batch_stats: upstream quirk. The encoder is frozen (no gradient), yet the notebook
      trains with ``model.train()``, so the encoder's BatchNorms normalise with batch statistics
      and keep updating their running statistics. Default False: a frozen encoder stays in eval
      mode. True with ``train=True`` reproduces upstream (call with ``mutable=['batch_stats']``).
  """

  vision: resnet.ResNet
  proj_dim: int = 512
  proj_bias: bool = False
  projection: bool = True
  norm_features: bool = True
  num_classes: int = 5
  use_fusion: bool = False
  decoder_channels: Sequence[int] = (512, 128)
  cbam_reduction: int = 16
  dropout_rate: float = 0.3
  double_cbam_gating: bool = False
  encoder_bn_batch_stats: bool = False
  dtype: Dtype | None = None

  @classmethod
  def from_flair(cls, two_tower: flair.TwoTower, **kwargs) -> "FCNCLIP":
    """An FCN-CLIP on the image tower of ``two_tower`` (same backbone and projection head)."""
    return cls(vision=two_tower.vision, proj_dim=two_tower.proj_dim, proj_bias=two_tower.proj_bias,
               projection=two_tower.projection, norm_features=two_tower.norm_features, **kwargs)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    if images.ndim != 4:
      raise ValueError(f"FCNCLIP: expected NHWC images (B, H, W, C), got shape {images.shape}")
    if len(self.decoder_channels) != 2:
      raise ValueError(f"FCNCLIP.decoder_channels={tuple(self.decoder_channels)}: expected 2 widths")
    encoder = TappedVisionModel(self.vision.clone(parent=None, name=None), proj_dim=self.proj_dim,
                                proj_bias=self.proj_bias, projection=self.projection, norm=self.norm_features,
                                dtype=self.dtype, name="vision_model")
    z, taps = encoder(images, train=train and self.encoder_bn_batch_stats)
    # The encoder is frozen: upstream runs it under torch.no_grad().
    z = jax.lax.stop_gradient(z)
    l2 = jax.lax.stop_gradient(taps["layer2"])
    l3 = jax.lax.stop_gradient(taps["layer3"])
    self.sow("intermediates", "layer2", l2)
    self.sow("intermediates", "layer3", l3)

    feats = l3
    if self.use_fusion:
      up = bilinear_resize(l3, l2.shape[1:3])
      feats = Conv2d(l3.shape[-1], 1, dtype=self.dtype, name="fusion")(jnp.concatenate([up, l2], axis=-1))
      self.sow("intermediates", "fused", feats)

    mid, out_ch = self.decoder_channels
    d = Conv2d(mid, 3, padding=1, dtype=self.dtype, name="decoder_0")(feats)
    d = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype, name="decoder_1")(d))
    d = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2), deterministic=not train)(d)  # Dropout2d
    d = bilinear_resize(d, (2 * d.shape[1], 2 * d.shape[2]))
    d = Conv2d(out_ch, 3, padding=1, dtype=self.dtype, name="decoder_5")(d)
    d = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype, name="decoder_6")(d))
    self.sow("intermediates", "decoded", d)

    gated, _, spatial = cbam.CBAM(mode="fcnclip", reduction=self.cbam_reduction, name="attention")(
        d, return_attention=True)
    self.sow("intermediates", "attended", gated)
    self.sow("intermediates", "spatial_attention", spatial)
    if self.double_cbam_gating:
      gated = d * gated
    logits = Linear(self.num_classes, dtype=self.dtype, name="classifier_2")(resnet.global_avg_pool(gated))
    return logits, z


# --------------------------------------------------------------------------------------------- losses


def focal_loss(logits: jax.Array, labels: jax.Array, class_weights: jax.Array | None = None, gamma: float = 2.0,
               reduction: str = "mean", pt_from_weighted_ce: bool = False) -> jax.Array:
  """Focal loss ``α_t (1 − p_t)^γ · (−log p_t)`` (Lin et al. 2017) with optional class weights α.

  Args:
    logits: (B, K); labels: (B,) ints in [0, K).
    class_weights: (K,) α per class, or None (α = 1).
    gamma: focusing exponent; with gamma 0 and no weights this is the cross-entropy.
    reduction: ``'mean'`` (plain batch mean, as upstream; not divided by the weight sum),
      ``'sum'`` or ``'none'`` (per sample, (B,)).
    pt_from_weighted_ce: upstream quirk. The notebook's ``FocalLoss`` takes
      ``pt = exp(−ce)`` of the *class-weighted* CE, so its modulating factor uses
      ``p_t^{α_t}`` instead of ``p_t``. True reproduces that; without weights both agree.
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"focal_loss: expected logits (B, K) and labels (B,), got {logits.shape} and {labels.shape}")
  if reduction not in ("mean", "sum", "none"):
    raise ValueError(f"focal_loss: reduction={reduction!r}, expected 'mean', 'sum' or 'none'")
  logp_t = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  if class_weights is None:
    alpha_t = jnp.ones_like(logp_t)
  else:
    class_weights = jnp.asarray(class_weights, jnp.float32)
    if class_weights.shape != logits.shape[-1:]:
      raise ValueError(f"focal_loss: class_weights shape {class_weights.shape} != ({logits.shape[-1]},)")
    alpha_t = class_weights[labels]
  ce = -alpha_t * logp_t
  pt = jnp.exp(-ce) if pt_from_weighted_ce else jnp.exp(logp_t)
  per_sample = (1.0 - pt) ** gamma * ce
  if reduction == "none":
    return per_sample
  return jnp.sum(per_sample) if reduction == "sum" else jnp.mean(per_sample)


def contrastive_loss(image_embeds: jax.Array, text_embeds: jax.Array, labels: jax.Array,
                     temperature: float = CONTRASTIVE_TEMPERATURE, scale: float = CONTRASTIVE_SCALE) -> jax.Array:
  """``scale · CE((ẑ · T̂ᵀ) / temperature, labels)``: ẑ, T̂ L2-normalised, (B, P) and (K, P).

  ``FCN_CLIP.compute_contrastive_loss``; both embeddings are frozen upstream, so the term only
  moves the logged loss, not the weights.
  """
  z = l2_normalize(jnp.asarray(image_embeds, jnp.float32), axis=-1)
  t = l2_normalize(jnp.asarray(text_embeds, jnp.float32), axis=-1)
  if z.shape[-1] != t.shape[-1]:
    raise ValueError(f"contrastive_loss: image embeds {z.shape} and text embeds {t.shape} differ in width")
  logits = z @ t.T / temperature
  return scale * optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)).mean()


def hybrid_loss(logits: jax.Array, image_embeds: jax.Array, text_embeds: jax.Array, labels: jax.Array,
                class_weights: jax.Array | None, *, gamma: float = 2.0, focal_weight: float = FOCAL_WEIGHT,
                temperature: float = CONTRASTIVE_TEMPERATURE, pt_from_weighted_ce: bool = False) -> dict:
  """The notebook's training loss: ``focal_weight·focal + (1 − focal_weight)·contrastive``.

  Returns ``{'loss', 'focal_loss', 'contrastive_loss'}`` (scalars).
  """
  focal = focal_loss(logits, labels, class_weights, gamma=gamma, pt_from_weighted_ce=pt_from_weighted_ce)
  contrast = contrastive_loss(image_embeds, text_embeds, labels, temperature=temperature)
  return {"loss": focal_weight * focal + (1.0 - focal_weight) * contrast, "focal_loss": focal,
          "contrastive_loss": contrast}


def compute_class_weights(labels: Sequence[int], num_classes: int = 5, power: float = 0.3,
                          boosts: Mapping[int, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The notebook's class weights: ``w_c = (n_c + 1e-6)^−power``, boosted, normalised to sum 1.

  Args:
    labels: training labels (after the notebook's resampling).
    num_classes: K.
    power: the damping exponent (0.3).
    boosts: per-class multipliers applied before normalising; default the notebook's
      ``{1: 1.2, 3: 1.5, 4: 1.5}`` (mild, severe, proliferative DR).

  Returns:
    ``(class_weights (K,) float32 summing to 1, sample_weights (N,) float64)`` where a sample's
    weight is its class's boosted, unnormalised ``w`` (what the notebook's sampler draws with).
  """
  labels = np.asarray(labels, np.int64)
  if labels.ndim != 1 or labels.size == 0:
    raise ValueError(f"compute_class_weights: expected a non-empty 1-D label array, got shape {labels.shape}")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"compute_class_weights: labels must lie in [0, {num_classes}), got "
                     f"[{labels.min()}, {labels.max()}]")
  boosts = {1: 1.2, 3: 1.5, 4: 1.5} if boosts is None else dict(boosts)
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  w = 1.0 / (counts + 1e-6) ** power
  for c, m in boosts.items():
    w[int(c)] *= m
  return (w / w.sum()).astype(np.float32), w[labels]


# ---------------------------------------------------------------------------------------- conversion


def encoder_variables_from_flair(fcn_variables: Mapping[str, Any], flair_variables: Mapping[str, Any]) -> dict:
  """Returns ``fcn_variables`` with its encoder replaced by the ``vision_model`` of FLAIR variables."""
  out = {}
  for col in set(fcn_variables) | set(flair_variables):
    tree = dict(fcn_variables.get(col, {}))
    if "vision_model" in flair_variables.get(col, {}):
      tree["vision_model"] = flair_variables[col]["vision_model"]
    out[col] = tree
  return out


def from_torch(state_dict: Mapping[str, Any], model: FCNCLIP, *, image_shape=(1, 64, 64, 3),
               flair_model: flair.TwoTower | None = None, source: str = "state_dict",
               placement: dict | None = None):
  """Upstream ``FCN_CLIP`` state_dict → FCN-CLIP variables [and FLAIR ``TwoTower`` variables].

  Upstream registers the encoder twice (``clip_model.vision_model.*`` and ``vision_model.*``, one
  module): the ``vision_model.*`` copy is read and the other must be identical where present.
  ``fusion.*`` is always present upstream; it is ignored when ``model.use_fusion`` is False.
  With ``flair_model``, the whole ``clip_model.*`` sub-tree (text tower included, needed for the
  class prototypes) is converted too and ``(fcn_variables, flair_variables)`` is returned.
  ``placement`` receives torch key → Flax path of the FCN-CLIP variables
  (``convert.convert_state_dict``); both names of an encoder tensor map to its one path.
  """
  for key, value in state_dict.items():
    if key.startswith("vision_model."):
      twin = state_dict.get("clip_model." + key)
      if twin is not None and not np.array_equal(np.asarray(twin), np.asarray(value)):
        raise convert.ConversionError(f"{source}: {key} and clip_model.{key} differ; upstream holds one encoder "
                                      "under both names, so the checkpoint is inconsistent")
  target = convert.variables_shape(model, jnp.zeros(image_shape, jnp.float32))
  ignore = [r"^clip_model\."] + ([] if model.use_fusion else [r"^fusion\."])
  variables = convert.convert_state_dict(state_dict, target, ignore=ignore, source=source, placement=placement)
  if placement is not None:
    for key in state_dict:
      if key.startswith("clip_model.vision_model.") and key.removeprefix("clip_model.") in placement:
        placement[key] = placement[key.removeprefix("clip_model.")]
  if flair_model is None:
    return variables
  flair_variables = flair.from_torch(state_dict, flair_model, prefix="clip_model.", image_shape=image_shape,
                                     source=source)
  return variables, flair_variables


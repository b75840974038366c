"""FLAIR / KeepFIT two-tower vision-language model, KeepFIT's expert-revision attention, their losses.

One module, ``TwoTower``, serves both systems (docs/systems.md#flair, #keepfit): a torchvision ResNet
image tower and a BERT text tower, each followed by FLAIR's ``ProjectionLayer``; KeepFIT adds the
``MultiHeadAttention`` that "revises" image embeddings with an expert-knowledge batch
(``knowledge_attention=True``).

Flax module paths follow the upstream ``state_dict`` with the converter's ``_`` rule, so
``from_torch`` needs no renaming::

  vision_model/model/...                          vision_model.model.*  (torchvision ResNet, fc=Identity)
  vision_model/projection_head_vision/projection  vision_model.projection_head_vision.projection.weight
  text_model/model/...                            text_model.model.*  (HF BertModel)
  text_model/projection_head_text/projection      text_model.projection_head_text.projection.weight
  logit_scale                                     logit_scale
  attention/W_q, W_k, W_v, W_o                    attention.W_*.weight  (KeepFIT)

Upstream quirks live behind flags whose defaults are the intended behaviour:

* ``MultiHeadAttention.softmax_over_heads`` (``TwoTower.softmax_over_heads``): KeepFIT calls
  ``F.softmax(scores)`` without ``dim`` on a (B·heads, Nq, Nk) tensor; torch's legacy rule then
  normalises over dim 0, i.e. across batch×heads instead of over keys. Default False = over keys.
* ``TwoTower.text_pooling``: FLAIR averages the token states over *all* positions, ``[PAD]``
  included (``"all_positions"``, upstream, the default because the released weights were trained
  that way); ``"masked"`` averages over real tokens only.

Images are NHWC floats in [0, 1]: FLAIR applies no mean/std normalisation anywhere.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxretina.models import bert, convert, layers
from jaxretina.models import resnet

Dtype = Any

# Upstream clamps the log-temperature to [0, 4.6052] (scale ≤ 100) before every use.
LOGIT_SCALE_MAX = 4.6052
TEXT_POOLINGS = ("all_positions", "masked")

__all__ = [
    "LOGIT_SCALE_MAX",
    "MultiHeadAttention",
    "ProjectionLayer",
    "TextModel",
    "TwoTower",
    "VisionModel",
    "clamp_logit_scale",
    "cooccurrence_targets",
    "from_torch",
    "identity_targets",
    "keepfit_loss",
    "load_flair_checkpoint",
    "logits_per_text",
    "softce_clip_loss",
    "text_prototypes",
    "two_tower_from_constructor",
]


# --------------------------------------------------------------------------------------- temperature


def clamp_logit_scale(logit_scale: jax.Array) -> jax.Array:
  """Clips the log-temperature to [0, ln 100 = 4.6052] (upstream's in-place clamp)."""
  return jnp.clip(logit_scale, 0.0, LOGIT_SCALE_MAX)


def _clamped_in_place(logit_scale: jax.Array) -> jax.Array:
  """The clamped value with the gradient of the unclamped one.

  Upstream clamps ``logit_scale.data`` (outside autograd) and then uses the parameter, so the
  forward sees the clamped value while the gradient flows to the parameter as if no clamp existed.
  """
  s = jnp.asarray(logit_scale, jnp.float32)
  return s + jax.lax.stop_gradient(clamp_logit_scale(s) - s)


def logits_per_text(txt_emb: jax.Array, img_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
  """``exp(clamp(s)) · txt @ imgᵀ``: (B_txt, P), (B_img, P) → (B_txt, B_img), float32.

  FLAIR's ``compute_logits`` returns the transpose (logits per image); KeepFIT's returns this.
  """
  txt = jnp.asarray(txt_emb, jnp.float32)
  img = jnp.asarray(img_emb, jnp.float32)
  return jnp.matmul(txt, img.T) * jnp.exp(_clamped_in_place(logit_scale))


# -------------------------------------------------------------------------------------------- losses


def _soft_cross_entropy(logits: jax.Array, target: jax.Array) -> jax.Array:
  """``F.cross_entropy(logits, target)`` with probability targets: mean_i −Σ_j T_ij log_softmax(Z_i)_j."""
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return jnp.mean(-jnp.sum(jnp.asarray(target, jnp.float32) * logp, axis=-1))


def softce_clip_loss(logits_per_text: jax.Array, target: jax.Array) -> jax.Array:
  """FLAIR's soft-target symmetric CLIP loss: ½[CE(L, T) + CE(Lᵀ, T)].

  Args:
    logits_per_text: (B_txt, B_img) logits L.
    target: (B, B) soft targets T (rows are probability vectors); upstream uses the same T for
      both directions (it is symmetric for co-occurrence and identity targets).
  Returns:
    Scalar float32 loss.
  """
  logits = jnp.asarray(logits_per_text, jnp.float32)
  if logits.ndim != 2 or logits.shape[0] != logits.shape[1] or jnp.shape(target) != logits.shape:
    raise ValueError(f"softce_clip_loss: expected square logits and a target of the same shape, got logits "
                     f"{logits.shape} and target {jnp.shape(target)}")
  return 0.5 * (_soft_cross_entropy(logits, target) + _soft_cross_entropy(logits.T, target))


def cooccurrence_targets(categories: Sequence[Any] | jax.Array) -> jax.Array:
  """FLAIR's soft targets from each sample's selected category.

  Args:
    categories: (B,) category ids (ints, jit-friendly) or category names (host-side strings).
  Returns:
    (B, B) float32 ``T_ij = 1[c_i = c_j] / Σ_k 1[c_j = c_k]``. Upstream's numpy broadcasting divides
    column j by its count; the matrix is symmetric so every row sums to 1.
  """
  if not isinstance(categories, jax.Array):
    arr = np.asarray(categories)
    if arr.ndim != 1:
      raise ValueError(f"cooccurrence_targets: expected a 1-D sequence of categories, got shape {arr.shape}")
    if arr.dtype.kind not in "iub":
      _, arr = np.unique(arr.astype(str), return_inverse=True)
    categories = jnp.asarray(arr)
  same = (categories[:, None] == categories[None, :]).astype(jnp.float32)
  return same / jnp.sum(same, axis=-1)


def identity_targets(n: int) -> jax.Array:
  """(n, n) identity targets: each image matches only its own caption (KeepFIT's MM-Retinal mode)."""
  return jnp.eye(n, dtype=jnp.float32)


def keepfit_loss(img_emb: jax.Array, txt_emb: jax.Array, kd_img_emb: jax.Array, kd_txt_emb: jax.Array,
                 revised_emb: jax.Array, logit_scale: jax.Array, target: jax.Array, kd_target: jax.Array,
                 mse_weight: float = 100.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """KeepFIT's objective (``train_epoch_with_KD_loss_Atte_s``): L_main + L_kd + w·MSE(T, R).

  Args:
    img_emb, txt_emb: (B, P) main-batch embeddings.
    kd_img_emb, kd_txt_emb: (B_k, P) knowledge-batch embeddings.
    revised_emb: (B, P) ``TwoTower.revise(img_emb, kd_img_emb, kd_txt_emb)``.
    logit_scale: the (unclamped) log-temperature parameter.
    target, kd_target: (B, B) and (B_k, B_k) soft targets.
    mse_weight: weight of the revision term (100 upstream; the pure-revision variant uses 1).
  Returns:
    ``(total, parts)`` with parts ``clip``, ``kd_clip``, ``revision_mse``, ``logits_per_text``,
    ``kd_logits_per_text``; all float32.
  """
  lpt = logits_per_text(txt_emb, img_emb, logit_scale)
  kd_lpt = logits_per_text(kd_txt_emb, kd_img_emb, logit_scale)
  clip = softce_clip_loss(lpt, target)
  kd_clip = softce_clip_loss(kd_lpt, kd_target)
  txt = jnp.asarray(txt_emb, jnp.float32)
  revised = jnp.asarray(revised_emb, jnp.float32)
  if txt.shape != revised.shape:
    raise ValueError(f"keepfit_loss: text embeddings {txt.shape} and revised embeddings {revised.shape} differ")
  mse = jnp.mean(jnp.square(txt - revised))
  total = clip + kd_clip + mse_weight * mse
  return total, {"clip": clip, "kd_clip": kd_clip, "revision_mse": mse, "logits_per_text": lpt,
                 "kd_logits_per_text": kd_lpt}


# ------------------------------------------------------------------------------------------ modules


class ProjectionLayer(nn.Module):
  """FLAIR's ``ProjectionLayer``: (B, D) → (B, features), float32 out.

  With ``project``: [x/‖x‖ if norm] → Linear → [x/‖x‖ if norm], plain division without eps, as
  upstream. Without ``project`` it is the identity (raw features, never normalised).
  The Linear is named ``projection`` after the torch attribute.
  """

  features: int
  use_bias: bool = False
  project: bool = True
  norm: bool = True
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    if not self.project:
      return x
    if self.norm:
      x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    x = layers.Linear(self.features, use_bias=self.use_bias, dtype=self.dtype, name="projection")(x)
    x = x.astype(jnp.float32)
    if self.norm:
      x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x


class VisionModel(nn.Module):
  """FLAIR's ``VisionModel``: pooled backbone features → ``projection_head_vision``.

  ``model`` is a backbone returning pooled features (B, D) (a ResNet with ``num_classes=None``).
  Input (B, H, W, 3) in [0, 1] → (B, proj_dim) (or (B, D) without projection).
  """

  model: nn.Module
  proj_dim: int = 512
  proj_bias: bool = False
  projection: bool = True
  norm: bool = True
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    feats = self.model(images, train=train)
    if feats.ndim != 2:
      raise ValueError(f"VisionModel: the backbone must return pooled (B, D) features, got shape {feats.shape} "
                       "(build the ResNet with num_classes=None)")
    head = ProjectionLayer(self.proj_dim, use_bias=self.proj_bias, project=self.projection, norm=self.norm,
                           dtype=self.dtype, name="projection_head_vision")
    return head(feats)


class TextModel(nn.Module):
  """FLAIR's ``TextModel``: BERT → mean of layers (1, 2, last) and of positions → ``projection_head_text``.

  (B, L) token ids and attention mask → (B, proj_dim). ``pooling``: see ``TwoTower.text_pooling``.
  """

  config: Any  # jaxretina.models.bert.BertConfig
  proj_dim: int = 512
  proj_bias: bool = False
  projection: bool = True
  norm: bool = True
  pooling: str = "all_positions"
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, train: bool = False,
               pool_lengths: jax.Array | None = None) -> jax.Array:
    """``pool_lengths``: (B,) the length each row's upstream batch was padded to (its longest text);
    None = the longest text of this call's batch. Only ``"all_positions"`` pooling depends on it."""
    if self.pooling not in TEXT_POOLINGS:
      raise ValueError(f"TextModel.pooling={self.pooling!r}: expected one of {TEXT_POOLINGS}")
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
      raise ValueError(f"TextModel: expected (B, L) input_ids and attention_mask of the same shape, got "
                       f"{input_ids.shape} and {attention_mask.shape}")
    encoder = bert.BertModel(self.config, add_pooling_layer=False, dtype=self.dtype, name="model")
    out = encoder(input_ids, attention_mask=attention_mask, token_type_ids=jnp.zeros_like(input_ids),
                  deterministic=not train)
    hidden = out["hidden_states"]
    if len(hidden) < 3:
      raise ValueError(f"TextModel: FLAIR pools hidden_states[1], [2] and [-1]; the BERT has only "
                       f"{len(hidden) - 1} layer(s), at least 2 are needed")
    stacked = jnp.stack([hidden[1], hidden[2], hidden[-1]]).astype(jnp.float32)  # (3, B, L, H)
    if self.pooling == "all_positions":
      # Upstream pads each batch to its longest text and averages over every position of that
      # padding. Positions past it only exist here because our batches have a static length; the
      # attention mask keeps the states below it identical, so averaging over them is exact.
      if pool_lengths is None:
        pool_lengths = jnp.max(jnp.sum(attention_mask.astype(jnp.int32), axis=-1))
      pool_lengths = jnp.broadcast_to(jnp.asarray(pool_lengths, jnp.int32), input_ids.shape[:1])
      keep = (jnp.arange(input_ids.shape[1])[None, :] < pool_lengths[:, None]).astype(jnp.float32)
      per_layer = (jnp.sum(stacked * keep[None, :, :, None], axis=2)
                   / jnp.maximum(pool_lengths.astype(jnp.float32), 1.0)[None, :, None])
    else:
      mask = attention_mask.astype(jnp.float32)[None, :, :, None]
      per_layer = jnp.sum(stacked * mask, axis=2) / jnp.maximum(jnp.sum(mask, axis=2), 1.0)
    embed = jnp.mean(per_layer, axis=0)  # (B, H)
    head = ProjectionLayer(self.proj_dim, use_bias=self.proj_bias, project=self.projection, norm=self.norm,
                           dtype=self.dtype, name="projection_head_text")
    return head(embed)


class MultiHeadAttention(nn.Module):
  """KeepFIT's d2l-style multi-head attention (``keepfit/modeling/model.py``).

  Bias-free ``W_q``/``W_k``/``W_v``/``W_o`` (num_hiddens outputs each); heads split head-minor
  within each batch element (torch layout (B·h, N, d), index b·h + head); scores Q·Kᵀ/√d with
  d = num_hiddens/h; dropout on the attention weights; concatenated heads → ``W_o``.

  Attributes:
    num_hiddens: width of the projections (divisible by ``num_heads``).
    num_heads: number of heads.
    dropout: dropout rate on the attention weights (train mode; rng collection ``'dropout'``).
    use_bias: bias on the four projections (False in KeepFIT).
    softmax_over_heads: upstream bug. ``F.softmax`` without ``dim`` on the 3-D (B·h, Nq, Nk) scores
      normalises over dim 0, i.e. across all batch elements and heads for each (query, key) pair,
      not over keys. True reproduces it (KeepFIT runs batch 1, so that is a softmax over heads).
      Default False: softmax over keys (the intended attention).
    dtype: compute dtype of the projections; the softmax runs in float32.
  """

  num_hiddens: int
  num_heads: int
  dropout: float = 0.5
  use_bias: bool = False
  softmax_over_heads: bool = False
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, queries: jax.Array, keys: jax.Array, values: jax.Array, *, deterministic: bool = True,
               dropout_keep: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Attends ``queries`` to ``keys``/``values``.

    Args:
      queries: (B, Nq, Dq); keys: (B, Nk, Dk); values: (B, Nk, Dv).
      deterministic: no dropout when True.
      dropout_keep: optional injected dropout draw, boolean (B, h, Nq, Nk) (True = kept); used
        instead of the ``'dropout'`` rng when given and not deterministic.
    Returns:
      ``(output (B, Nq, num_hiddens), attention_weights (B, h, Nq, Nk))``; the weights are taken
      before dropout (as upstream's ``attention_weights``). ``reshape(B*h, Nq, Nk)`` gives torch's
      layout.
    """
    if self.num_hiddens % self.num_heads:
      raise ValueError(f"MultiHeadAttention: num_hiddens={self.num_hiddens} is not divisible by "
                       f"num_heads={self.num_heads}")
    for name, t in (("queries", queries), ("keys", keys), ("values", values)):
      if t.ndim != 3:
        raise ValueError(f"MultiHeadAttention: {name} must be (B, N, D), got shape {t.shape}")
    if keys.shape[:2] != values.shape[:2] or queries.shape[0] != keys.shape[0]:
      raise ValueError(f"MultiHeadAttention: incompatible shapes queries {queries.shape}, keys {keys.shape}, "
                       f"values {values.shape}")
    h = self.num_heads
    d = self.num_hiddens // h

    def proj(name, x):
      return layers.Linear(self.num_hiddens, use_bias=self.use_bias, dtype=self.dtype, name=name)(x)

    def split_heads(x):  # (B, N, h·d) → (B, h, N, d)
      b, n, _ = x.shape
      return x.reshape(b, n, h, d).transpose(0, 2, 1, 3)

    q = split_heads(proj("W_q", queries)).astype(jnp.float32)
    k = split_heads(proj("W_k", keys)).astype(jnp.float32)
    v = split_heads(proj("W_v", values))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d)
    if self.softmax_over_heads:
      b, _, nq, nk = scores.shape
      weights = jax.nn.softmax(scores.reshape(b * h, nq, nk), axis=0).reshape(scores.shape)
    else:
      weights = jax.nn.softmax(scores, axis=-1)
    dropped = weights
    if not deterministic and self.dropout > 0:
      if dropout_keep is not None:
        if dropout_keep.shape != weights.shape:
          raise ValueError(f"MultiHeadAttention: dropout_keep shape {dropout_keep.shape} != attention "
                           f"weights shape {weights.shape}")
        dropped = jnp.where(dropout_keep, weights / (1.0 - self.dropout), 0.0)
      else:
        dropped = nn.Dropout(self.dropout)(weights, deterministic=False)
    out = jnp.einsum("bhqk,bhkd->bhqd", dropped.astype(v.dtype), v)
    b, _, nq, _ = out.shape
    out = out.transpose(0, 2, 1, 3).reshape(b, nq, self.num_hiddens)
    return proj("W_o", out), weights


class TwoTower(nn.Module):
  """FLAIR (``knowledge_attention=False``) or KeepFIT (``True``) image-text model.

  Attributes:
    vision: a configured backbone returning pooled (B, D) features (``resnet.ResNet(...,
      num_classes=None)``); it is cloned into ``vision_model/model``.
    text: the ``bert.BertConfig`` of the text tower.
    proj_dim: joint embedding width.
    proj_bias: bias of the two projection Linears.
    projection: apply the projection heads; False returns the raw pooled features (not normalised).
    norm_features: L2-normalise before and after each projection (only with ``projection``).
    logit_scale_init: initial temperature τ; the parameter ``logit_scale`` starts at log(1/τ).
    knowledge_attention: KeepFIT's expert-revision ``MultiHeadAttention`` (``attention``).
    attention_heads, attention_dropout: its heads (2) and weight dropout (0.5).
    softmax_over_heads: upstream KeepFIT bug flag, see ``MultiHeadAttention``. Parity sets True.
    text_pooling: ``"all_positions"`` = FLAIR's unmasked mean over every position including
      ``[PAD]`` up to the batch's longest text (upstream pads each batch to its longest text, so an
      embedding depends on the batch it was tokenised in; static-length batches here pool exactly
      that many positions); ``"masked"`` = mean over real tokens only.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters, embeddings and losses stay float32.
  """

  vision: nn.Module
  text: Any  # jaxretina.models.bert.BertConfig
  proj_dim: int = 512
  proj_bias: bool = False
  projection: bool = True
  norm_features: bool = True
  logit_scale_init: float = 0.07
  knowledge_attention: bool = False
  attention_heads: int = 2
  attention_dropout: float = 0.5
  softmax_over_heads: bool = False
  text_pooling: str = "all_positions"
  dtype: Dtype | None = None

  def setup(self):
    if self.text_pooling not in TEXT_POOLINGS:
      raise ValueError(f"TwoTower.text_pooling={self.text_pooling!r}: expected one of {TEXT_POOLINGS}")
    if self.logit_scale_init <= 0:
      raise ValueError(f"TwoTower.logit_scale_init must be a positive temperature, got {self.logit_scale_init}")
    overrides = {"dtype": self.dtype} if self.dtype is not None and hasattr(self.vision, "dtype") else {}
    backbone = self.vision.clone(parent=None, name=None, **overrides)
    self.vision_model = VisionModel(backbone, proj_dim=self.proj_dim, proj_bias=self.proj_bias,
                                    projection=self.projection, norm=self.norm_features, dtype=self.dtype)
    self.text_model = TextModel(self.text, proj_dim=self.proj_dim, proj_bias=self.proj_bias,
                                projection=self.projection, norm=self.norm_features, pooling=self.text_pooling,
                                dtype=self.dtype)
    init_value = float(np.log(1.0 / self.logit_scale_init))
    self.logit_scale = self.param("logit_scale", lambda _: jnp.asarray(init_value, jnp.float32))
    if self.knowledge_attention:
      self.attention = MultiHeadAttention(self.proj_dim, self.attention_heads, dropout=self.attention_dropout,
                                          use_bias=False, softmax_over_heads=self.softmax_over_heads,
                                          dtype=self.dtype)

  def encode_image(self, images: jax.Array, train: bool = False) -> jax.Array:
    """(B, H, W, 3) float in [0, 1] → (B, proj_dim) float32 (unit norm with projection+norm)."""
    if images.ndim != 4:
      raise ValueError(f"TwoTower.encode_image: expected NHWC images (B, H, W, C), got shape {images.shape}")
    return self.vision_model(images, train=train)

  def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array, train: bool = False,
                  pool_lengths: jax.Array | None = None) -> jax.Array:
    """(B, L) int token ids and 0/1 mask → (B, proj_dim) float32.

    ``pool_lengths`` (B,): per row, the padded length of the batch upstream would have tokenised it
    in (``TextModel``); None = this batch's longest text, as upstream's ``padding=True``.
    """
    return self.text_model(input_ids, attention_mask, train=train, pool_lengths=pool_lengths)

  def revise(self, img_emb: jax.Array, kd_img_emb: jax.Array, kd_txt_emb: jax.Array, train: bool = False,
             dropout_keep: jax.Array | None = None, groups: int = 1) -> jax.Array:
    """KeepFIT's expert revision R = MHA(query=I, key=I_k, value=T_k), one sequence per group.

    (B, P), (B_k, P), (B_k, P) → (B, P) float32. ``groups`` splits both batches into equal
    consecutive slices and attends each query slice to its own knowledge slice only, as upstream's
    DDP ranks do (each rank's attention is one batch-1 sequence of its local queries and keys).
    ``dropout_keep``: optional injected dropout draw (1, h, B, B_k), only with one group.
    """
    if not self.knowledge_attention:
      raise ValueError("TwoTower.revise needs knowledge_attention=True (KeepFIT)")
    if groups == 1:
      out, _ = self.attention(img_emb[None], kd_img_emb[None], kd_txt_emb[None], deterministic=not train,
                              dropout_keep=dropout_keep)
      return out[0].astype(jnp.float32)
    if img_emb.shape[0] % groups or kd_img_emb.shape[0] % groups or dropout_keep is not None:
      raise ValueError(f"TwoTower.revise: {groups} groups need batches divisible by it (got {img_emb.shape[0]} "
                       f"queries, {kd_img_emb.shape[0]} knowledge pairs) and no injected dropout")
    q = img_emb.reshape(groups, -1, img_emb.shape[-1])
    k = kd_img_emb.reshape(groups, -1, kd_img_emb.shape[-1])
    v = kd_txt_emb.reshape(groups, -1, kd_txt_emb.shape[-1])
    # One batch-1 call per group: with softmax_over_heads the softmax must not span groups.
    outs = [self.attention(q[g:g + 1], k[g:g + 1], v[g:g + 1], deterministic=not train)[0][0]
            for g in range(groups)]
    return jnp.concatenate(outs).astype(jnp.float32)

  def __call__(self, images: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """→ ``(img_emb (B_img, P), txt_emb (B_txt, P))``, float32."""
    img = self.encode_image(images, train=train)
    txt = self.encode_text(input_ids, attention_mask, train=train)
    if self.knowledge_attention and self.is_initializing():
      # Touch the attention so that ``init`` creates every parameter of the model.
      self.revise(img, img, img)
    return img, txt


# ---------------------------------------------------------------------------------- construction


def two_tower_from_constructor(constructor: Mapping[str, Any], bert_config: Mapping[str, Any] | Any,
                               **overrides) -> TwoTower:
  """Builds a ``TwoTower`` from upstream ``FLAIRModel``/``KeepFITModel`` constructor kwargs.

  Args:
    constructor: kwargs as in a parity ``meta.json`` (``proj_dim``, ``proj_bias``, ``projection``,
      ``norm_features``, ``logit_scale_init_value``, ``vision_type``, and optionally
      ``vision_backbone`` = torchvision ``ResNet`` kwargs, e.g. ``{'torchvision.models.resnet.ResNet':
      {'block': 'Bottleneck', 'layers': [1,1,1,1], 'width_per_group': 8}}``; absent: ResNet-50).
    bert_config: a ``BertConfig`` or its dict (HF ``config.json`` fields).
    overrides: ``TwoTower`` fields (e.g. ``knowledge_attention=True``, ``softmax_over_heads=True``).
  """
  vision_type = constructor.get("vision_type", "resnet_v1")
  if vision_type not in ("resnet_v1", "resnet_v2"):
    raise ValueError(f"two_tower_from_constructor: vision_type={vision_type!r} is not supported "
                     "(only the ResNet-50 towers 'resnet_v1'/'resnet_v2'; upstream's efficientnet option is broken)")
  spec = constructor.get("vision_backbone")
  vision = resnet.from_constructor(spec, num_classes=None) if spec else resnet.resnet50(num_classes=None)
  text = bert_config if not isinstance(bert_config, Mapping) else bert.BertConfig.from_dict(dict(bert_config))
  kw = dict(proj_dim=int(constructor.get("proj_dim", 512)), proj_bias=bool(constructor.get("proj_bias", False)),
            projection=bool(constructor.get("projection", True)),
            norm_features=bool(constructor.get("norm_features", True)),
            logit_scale_init=float(constructor.get("logit_scale_init_value", 0.07)))
  kw.update(overrides)
  return TwoTower(vision=vision, text=text, **kw)


def from_torch(state_dict: Mapping[str, Any], model: TwoTower, *, prefix: str = "",
               image_shape: tuple[int, int, int, int] = (1, 64, 64, 3), text_len: int = 8,
               source: str = "state_dict", placement: dict | None = None) -> dict:
  """FLAIR / KeepFIT ``state_dict`` → Flax variables (``params`` and ``batch_stats``) for ``model``.

  Ignored keys: the BERT pooler (unused by FLAIR), ``embeddings.position_ids``/``token_type_ids``
  buffers, and the projection Linears when ``model.projection`` is False (upstream builds them
  anyway). Everything else must fit exactly.

  Args:
    state_dict: torch key → array.
    model: the ``TwoTower`` to fill (``knowledge_attention`` must match the checkpoint).
    prefix: strip this prefix first (e.g. ``'module.'`` of a DDP checkpoint).
    image_shape, text_len: trace shapes (only the channel count and ``text_len ≤`` max positions matter).
    source: named in errors.
    placement: receives torch key → Flax path (``convert.convert_state_dict``).
  """
  images = jnp.zeros(image_shape, jnp.float32)
  ids = jnp.zeros((image_shape[0], text_len), jnp.int32)
  target = convert.variables_shape(model, images, ids, jnp.ones_like(ids))
  ignore = [r"^text_model\.model\.pooler\.", r"^text_model\.model\.embeddings\.(position_ids|token_type_ids)$"]
  if not model.projection:
    ignore.append(r"^(vision_model\.projection_head_vision|text_model\.projection_head_text)\.projection\.")
  return convert.convert_state_dict(state_dict, target, prefix=prefix, ignore=ignore, rename=bert.rename_legacy_layer_norm,
                                    source=source, placement=placement)


def load_flair_checkpoint(path: str, model: TwoTower, **kwargs) -> dict:
  """Reads a released FLAIR/KeepFIT checkpoint (``.pth``, ``.safetensors``, ``.npz``) into variables."""
  state_dict = convert.load_torch_checkpoint(path)
  if any(k.startswith("module.") for k in state_dict) and "prefix" not in kwargs:
    kwargs["prefix"] = "module."  # saved from a DistributedDataParallel wrapper
  return from_torch(state_dict, model, source=path, **kwargs)


def text_prototypes(model: TwoTower, variables: Mapping[str, Any],
                    token_batches: Sequence[tuple[Any, Any]]) -> jax.Array:
  """FLAIR's zero-shot class prototypes (``compute_text_embeddings``).

  Args:
    model, variables: the trained two-tower model.
    token_batches: per class, ``(input_ids, attention_mask)`` of all its descriptions tokenised
      together (one padding per class, as upstream).
  Returns:
    (K, proj_dim) float32: per class the mean of its description embeddings, not re-normalised.
  """
  if len(token_batches) == 0:
    raise ValueError("text_prototypes: no classes given")
  # One compilation per distinct (n_descriptions, L) shape.
  encode = jax.jit(lambda v, i, m: jnp.mean(model.apply(v, i, m, method=TwoTower.encode_text), axis=0))
  protos = []
  for k, (ids, mask) in enumerate(token_batches):
    ids = jnp.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] == 0 or jnp.shape(mask) != ids.shape:
      raise ValueError(f"text_prototypes: class {k}: expected (n_descriptions, L) token ids and a mask of the "
                       f"same shape, got {ids.shape} and {jnp.shape(mask)}")
    protos.append(encode(variables, ids, jnp.asarray(mask)))
  return jnp.stack(protos)

"""Losses of WS-DAN / CAL / DualAttendMed (docs/systems.md#cal-losses, docs/systems.md#dualattendmed-losses).

Attention maps are NHWC (B,h,w,M); feature matrices and centers are (B, M·C), M-major.

* ``center_loss``: Σ(f − c)² / B (WS-DAN, CAL).
* ``attention_alignment_loss``, ``diversity_loss``, ``auxiliary_loss_v2``: DualAttendMed.
* ``cal_classification_loss`` / ``cal_loss``: CAL's training objective.
* ``dualattendmed_classification_loss`` / ``dualattendmed_loss``: DualAttendMed's objective with
  the README's λ = 1.0 / 0.5 / 0.1 (upstream's script leaves them undefined).
* ``cal_classification_terms`` / ``dualattendmed_classification_terms``: the unweighted
  cross-entropies the classification losses combine (logged by the trainer under upstream's names).

Upstream quirk: ``Auxiliary_Loss_v2(margin=1)`` builds ``torch.Tensor(1)``, an *uninitialised*
one-element tensor, so upstream's default inter-class margin is whatever memory held. Here the
margin is a plain number, default 1.0 (the evident intent); pass another value explicitly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxretina.models.layers import l2_normalize

DUALATTENDMED_LAMBDAS = (1.0, 0.5, 0.1)  # classification, attention alignment, diversity
# The fixed weights of the terms (``*_classification_terms``) inside the classification losses.
DUALATTENDMED_CLS_WEIGHTS = {"cls_coarse": 1.0 / 6.0, "cls_fine": 2.0 / 6.0, "cls_aux": 3.0 / 6.0}
CAL_LOSS_WEIGHTS = {"ce_raw": 1.0 / 3.0, "ce_aux": 1.0, "ce_aug": 2.0 / 3.0, "center": 1.0}


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``nn.CrossEntropyLoss()``: mean over the batch of −log softmax(logits)[label]."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels))


def center_loss(features: jax.Array, centers: jax.Array) -> jax.Array:
  """``CenterLoss``: Σ (features − centers)² / B for (B, D) inputs → scalar."""
  if features.shape != centers.shape or features.ndim != 2:
    raise ValueError(f"center_loss: expected two (B, D) arrays of one shape, got {features.shape} and {centers.shape}")
  return jnp.sum(jnp.square(features - centers)) / features.shape[0]


def attention_alignment_loss(attention_maps: jax.Array, target_maps: jax.Array | None = None) -> jax.Array:
  """``AttentionAlignmentLoss``: mean squared error between the maps and a target → scalar.

  Args:
    attention_maps: (B,h,w,M).
    target_maps: (B,h,w,M); default: the mean over the M maps, broadcast (not detached, as
      upstream), i.e. the per-pixel variance across maps.
  """
  if attention_maps.ndim != 4:
    raise ValueError(f"attention_alignment_loss: expected (B,h,w,M) maps, got shape {attention_maps.shape}")
  if target_maps is None:
    target_maps = jnp.mean(attention_maps, axis=-1, keepdims=True)
  elif target_maps.shape != attention_maps.shape:
    raise ValueError(f"attention_alignment_loss: target shape {target_maps.shape} != maps {attention_maps.shape}")
  return jnp.mean(jnp.square(attention_maps - target_maps))


def diversity_loss(attention_maps: jax.Array, margin: float = 0.1) -> jax.Array:
  """``DiversityLoss``: mean over pairs i<j of relu(margin − Σ_hw (A_i·A_j)²) → scalar.

  Args:
    attention_maps: (B,h,w,M) (averaged over the batch) or one sample's (h,w,M).
    margin: 0.1 upstream.
  """
  if attention_maps.ndim == 3:
    attention_maps = attention_maps[None]
  if attention_maps.ndim != 4:
    raise ValueError(f"diversity_loss: expected (B,h,w,M) or (h,w,M) maps, got shape {attention_maps.shape}")
  m = attention_maps.shape[-1]
  if m < 2:
    return jnp.zeros((), jnp.float32)
  squared = jnp.square(attention_maps.astype(jnp.float32))
  # Σ_hw (A_i A_j)² = Σ_hw A_i² A_j²: one Gram matrix per sample.
  gram = jnp.einsum("bhwi,bhwj->bij", squared, squared, precision=jax.lax.Precision.HIGHEST)
  i, j = jnp.triu_indices(m, k=1)
  per_pair = jax.nn.relu(margin - gram[:, i, j])
  return jnp.mean(jnp.mean(per_pair, axis=1))


def auxiliary_loss_v2(feature_matrix: jax.Array, feature_centers: jax.Array, num_attentions: int, *,
                      alpha: float = 0.05, margin: float = 1.0, inner_margin: float = 0.1) -> jax.Array:
  """DualAttendMed ``Auxiliary_Loss_v2`` → scalar.

  intra = min(mean_b relu(‖n(f_b) − n(c_b)‖ − inner_margin), 10);
  inter = min(Σ_{j<k} relu(margin − mean_b ‖ĉ_{b,j} − ĉ_{b,k}‖) / M / alpha, 100), with ĉ the
  normalised centers reshaped (B, M, C). Centers are detached (no gradient flows into them).

  Args:
    feature_matrix: (B, M·C).
    feature_centers: (B, M·C), each sample's class center.
    num_attentions: M.
    alpha, inner_margin: upstream defaults 0.05 and 0.1.
    margin: inter-class margin; default 1.0 (upstream's default is uninitialised memory).
  """
  if feature_matrix.shape != feature_centers.shape or feature_matrix.ndim != 2:
    raise ValueError(f"auxiliary_loss_v2: expected two (B, M·C) arrays of one shape, got {feature_matrix.shape} "
                     f"and {feature_centers.shape}")
  b, d = feature_matrix.shape
  if d % num_attentions:
    raise ValueError(f"auxiliary_loss_v2: feature size {d} is not a multiple of num_attentions={num_attentions}")
  centers = l2_normalize(jax.lax.stop_gradient(feature_centers).astype(jnp.float32))
  features = l2_normalize(feature_matrix.astype(jnp.float32))
  intra = jnp.mean(jax.nn.relu(jnp.linalg.norm(features - centers, axis=-1) - inner_margin))
  intra = jnp.minimum(intra, 10.0)

  parts = centers.reshape(b, num_attentions, d // num_attentions)
  j, k = jnp.triu_indices(num_attentions, k=1)
  distances = jnp.linalg.norm(parts[:, j] - parts[:, k], axis=-1)  # (B, pairs)
  inter = jnp.sum(jax.nn.relu(margin - jnp.mean(distances, axis=0))) / num_attentions / alpha
  inter = jnp.minimum(inter, 100.0)
  return intra + inter


def cal_classification_terms(logits: jax.Array, effect_logits: jax.Array, aug_logits: jax.Array,
                             aug_effect_logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """CAL's three cross-entropies, unweighted, by upstream's names.

  ``ce_raw`` = CE(p_raw, y); ``ce_aux`` = CE([p_aux; p_aux_aug], [y;y;y]) (the counterfactual
  effect logits of both passes); ``ce_aug`` = CE(p_aug, [y;y]). ``aug_*`` are the (2B, K) logits
  of the [crop; drop] batch.
  """
  y2 = jnp.concatenate([labels, labels])
  return {"ce_raw": _cross_entropy(logits, labels),
          "ce_aux": _cross_entropy(jnp.concatenate([effect_logits, aug_effect_logits]), jnp.concatenate([labels, y2])),
          "ce_aug": _cross_entropy(aug_logits, y2)}


def cal_classification_loss(logits: jax.Array, effect_logits: jax.Array, aug_logits: jax.Array,
                            aug_effect_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """CAL: CE(p_raw)/3 + CE([p_aux; p_aux_aug], [y;y;y])·3/3 + CE(p_aug, [y;y])·2/3.

  ``aug_*`` are the (2B, K) logits of the [crop; drop] batch.
  """
  terms = cal_classification_terms(logits, effect_logits, aug_logits, aug_effect_logits, labels)
  return terms["ce_raw"] / 3.0 + terms["ce_aux"] + terms["ce_aug"] * 2.0 / 3.0


def cal_loss(logits, effect_logits, aug_logits, aug_effect_logits, labels, feature_matrix,
             normalized_centers) -> jax.Array:
  """CAL's total: ``cal_classification_loss`` + ``center_loss(f, normalize(c_y))``.

  ``normalized_centers``: (B, M·C) each sample's class center, L2-normalised *before* the update.
  """
  return (cal_classification_loss(logits, effect_logits, aug_logits, aug_effect_logits, labels)
          + center_loss(feature_matrix, normalized_centers))


def dualattendmed_classification_loss(logits: jax.Array, effect_logits: jax.Array, aug_logits: jax.Array,
                                      aug_effect_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """DualAttendMed: (CE(p_raw) + 2·CE(p_aug, [y;y]) + 3·CE([p_aux; p_aux_aug], [y;y;y])) / 6."""
  terms = dualattendmed_classification_terms(logits, effect_logits, aug_logits, aug_effect_logits, labels)
  return (terms["cls_coarse"] + 2.0 * terms["cls_fine"] + 3.0 * terms["cls_aux"]) / 6.0


def dualattendmed_classification_terms(logits: jax.Array, effect_logits: jax.Array, aug_logits: jax.Array,
                                       aug_effect_logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """DualAttendMed's three cross-entropies, unweighted, by upstream's names.

  ``cls_coarse`` = CE(p_raw, y); ``cls_fine`` = CE(p_aug, [y;y]); ``cls_aux`` =
  CE([p_aux; p_aux_aug], [y;y;y]).
  """
  y2 = jnp.concatenate([labels, labels])
  return {"cls_coarse": _cross_entropy(logits, labels),
          "cls_fine": _cross_entropy(aug_logits, y2),
          "cls_aux": _cross_entropy(jnp.concatenate([effect_logits, aug_effect_logits]), jnp.concatenate([labels, y2]))}


def dualattendmed_aux_clamp(epoch: int | jax.Array) -> jax.Array:
  """Upper bound of the auxiliary loss: 10 in epochs 0–4, 5 afterwards."""
  return jnp.where(jnp.asarray(epoch) < 5, 10.0, 5.0)


def dualattendmed_loss(classification: jax.Array, alignment: jax.Array, diversity: jax.Array,
                       auxiliary: jax.Array, epoch: int | jax.Array, *,
                       lambdas: tuple[float, float, float] = DUALATTENDMED_LAMBDAS,
                       aux_weight: float = 0.01) -> jax.Array:
  """DualAttendMed total: λ_cls·L_cls + λ_att·L_att + λ_div·L_div + 0.01·min(L_aux, clamp(epoch)).

  ``auxiliary`` is ``auxiliary_loss_v2(normalize(f), normalize(c_y), M)``; the clamp (10 before
  epoch 5, then 5) passes no gradient when active, as ``torch.clamp``.
  """
  lam_cls, lam_att, lam_div = lambdas
  aux = jnp.minimum(auxiliary, dualattendmed_aux_clamp(epoch))
  return lam_cls * classification + lam_att * alignment + lam_div * diversity + aux_weight * aux

"""Class activation maps and attention-vs-CAM IoU (docs/systems.md#dualattendmed-cam-iou-evaluation).

The metric: for each test image, binarise the model's attention map (mean over the M attention
maps) at its own top 20 % and a class activation map (CAM) at its own top 20 %, and report the IoU
of the two masks (mean ± std over images). Steps, as upstream (``infer.py: calculate_iou``,
``cam_generator.py``):

1. CAM_b = ReLU(Σ_c W[c, y_b] · F_b[..., c]) from the layer-4 features F (B, h, w, C), a linear
   head W (C, K) and the TRUE label y_b; min–max normalised (÷ (max − min + 1e-8)).
2. The attention map is min–max normalised (zeros if flat), bilinearly resized to the CAM's shape
   (``align_corners=False``) only if the shapes differ.
3. Each map keeps the pixels ≥ its value of rank ⌊P·(1 − fraction)⌋ in ascending order
   (``np.partition``), P = pixels per map.
4. IoU = |A∧G| / (|A| + |G| − |A∧G| + 1e-8).

**Pseudo ground truth — a deliberate departure.** Upstream's ``extract_backbone_from_trained_model``
puts a *fresh, untrained* ``Linear(2048→K)`` (weights N(0, 0.01), bias 0) on the trained backbone
and uses its weights for the CAM, so the "ground-truth" region is a random projection of the
features: the reported IoU then measures agreement with noise, not with class evidence. Here the
default head is a multinomial logistic regression fitted (``fit_linear_head``) on the trained
model's own GAP'd layer-4 features of the *training* split; the CAM of the true label then marks
the regions whose features a linear read-out of this very backbone uses as evidence for that class
— the classical CAM of Zhou et al. (2016), with no test labels used to fit it.
``select_cam_head(..., upstream_untrained_cam_head=True)`` reproduces upstream's random head
(``untrained_head``) for comparison with the published numbers.

All functions are ``jax.numpy`` and jittable for static shapes / fractions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _check_maps(maps, name: str, ndim: int = 3) -> jax.Array:
  maps = jnp.asarray(maps)
  if maps.ndim != ndim:
    raise ValueError(f"{name}: expected a {'(B, h, w)' if ndim == 3 else f'{ndim}-D'} array, got shape {maps.shape}")
  return maps


def min_max_normalize(maps, eps: float = 1e-8) -> jax.Array:
  """(..., h, w) → each map scaled to [0, 1] by (m − min) / (max − min + eps); all zeros where
  max − min ≤ eps (a flat map carries no location), as upstream treats attention maps."""
  maps = jnp.asarray(maps)
  if maps.ndim < 2:
    raise ValueError(f"min_max_normalize: expected (..., h, w) maps, got shape {maps.shape}")
  lo = jnp.min(maps, axis=(-2, -1), keepdims=True)
  hi = jnp.max(maps, axis=(-2, -1), keepdims=True)
  spread = hi - lo
  return jnp.where(spread > eps, (maps - lo) / (spread + eps), jnp.zeros_like(maps))


def top_fraction_mask(maps, fraction: float = 0.2) -> jax.Array:
  """(..., h, w) → boolean masks keeping each map's top ``fraction`` of pixels.

  Threshold = the value of ascending rank ``int(P · (1 − fraction))`` of the map's P pixels (upstream's
  ``np.partition``; the map's minimum if that rank is P, i.e. fraction 0 keeps everything ≥ min).
  Pixels ≥ the threshold are kept, so ties at the threshold are ALL kept: the mask holds at least
  P − int(P·(1 − fraction)) pixels (40 of 196 at 14×14 for 20 %), more when values tie, and a flat
  map keeps every pixel.
  """
  maps = jnp.asarray(maps)
  if maps.ndim < 2:
    raise ValueError(f"top_fraction_mask: expected (..., h, w) maps, got shape {maps.shape}")
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"top_fraction_mask: expected fraction in [0, 1], got {fraction}")
  num_pixels = maps.shape[-1] * maps.shape[-2]
  rank = int(num_pixels * (1 - fraction))  # Python float arithmetic, as upstream
  flat = maps.reshape(maps.shape[:-2] + (num_pixels,))
  if 0 <= rank < num_pixels:
    threshold = jnp.sort(flat, axis=-1)[..., rank]
  else:
    threshold = jnp.min(flat, axis=-1)
  return maps >= threshold[..., None, None]


def resize_maps(maps, size: tuple[int, int]) -> jax.Array:
  """(..., h, w) → (..., H, W) like ``F.interpolate(mode='bilinear', align_corners=False)``.

  No antialiasing when shrinking (torch does not either); float32 unless given float64.
  """
  maps = jnp.asarray(maps)
  if maps.ndim < 2:
    raise ValueError(f"resize_maps: expected (..., h, w) maps, got shape {maps.shape}")
  if not jnp.issubdtype(maps.dtype, jnp.floating):
    maps = maps.astype(jnp.float32)
  size = (int(size[0]), int(size[1]))
  if size == tuple(maps.shape[-2:]):
    return maps
  return jax.image.resize(maps, maps.shape[:-2] + size, method="linear", antialias=False)


def iou(pred_masks, gt_masks, eps: float = 1e-8) -> jax.Array:
  """(B, h, w) binary masks → (B,) |P∧G| / (|P| + |G| − |P∧G| + eps); 0 when both are empty."""
  pred_masks, gt_masks = jnp.asarray(pred_masks), jnp.asarray(gt_masks)
  if pred_masks.shape != gt_masks.shape or pred_masks.ndim < 2:
    raise ValueError(f"iou: expected two (..., h, w) masks of one shape, got {pred_masks.shape} and {gt_masks.shape}")
  p = pred_masks.astype(jnp.float32)
  g = gt_masks.astype(jnp.float32)
  inter = jnp.sum(p * g, axis=(-2, -1))
  return inter / (jnp.sum(p, axis=(-2, -1)) + jnp.sum(g, axis=(-2, -1)) - inter + eps)


def class_activation_maps(features, head_weights, labels) -> jax.Array:
  """ReLU(Σ_c W[c, y_b] F_b[..., c]): features (B, h, w, C), head_weights (C, K), labels (B,) → (B, h, w).

  Not normalised (``attention_iou`` normalises); the head's bias is a constant shift of the logit
  and does not enter a CAM.
  """
  features, head_weights, labels = jnp.asarray(features), jnp.asarray(head_weights), jnp.asarray(labels)
  if features.ndim != 4:
    raise ValueError(f"class_activation_maps: expected features (B, h, w, C), got shape {features.shape}")
  if head_weights.ndim != 2 or head_weights.shape[0] != features.shape[-1]:
    raise ValueError(f"class_activation_maps: expected head_weights ({features.shape[-1]}, K), "
                     f"got shape {head_weights.shape}")
  if labels.shape != features.shape[:1]:
    raise ValueError(f"class_activation_maps: expected labels ({features.shape[0]},), got shape {labels.shape}")
  class_weights = jnp.take(head_weights, labels, axis=1).T  # (B, C)
  return jax.nn.relu(jnp.einsum("bhwc,bc->bhw", features, class_weights))


def attention_iou(pred_maps, cam_maps, fraction: float = 0.2) -> jax.Array:
  """IoU per image between top-``fraction`` masks of attention maps and CAMs (steps 2–4 above).

  pred_maps (B, h, w): attention maps (e.g. the mean over the M WS-DAN maps); cam_maps (B, h', w'):
  CAMs (``class_activation_maps``, normalised or not). Returns (B,) IoU in [0, 1].
  """
  pred_maps = _check_maps(pred_maps, "attention_iou: pred_maps")
  cam_maps = _check_maps(cam_maps, "attention_iou: cam_maps")
  if pred_maps.shape[0] != cam_maps.shape[0]:
    raise ValueError(f"attention_iou: expected one CAM per attention map, got {pred_maps.shape} and {cam_maps.shape}")
  gt = top_fraction_mask(min_max_normalize(cam_maps), fraction)
  pred = resize_maps(min_max_normalize(pred_maps), cam_maps.shape[-2:])
  return iou(top_fraction_mask(pred, fraction), gt)


# ----------------------------------------------------------------------------------------------
# The CAM head


def untrained_head(key: jax.Array, num_features: int, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Upstream's pseudo-ground-truth head: weights N(0, 0.01²) (C, K), bias 0 (K,). Random by design
  upstream (a fresh ``nn.Linear`` with ``init.normal_(0, 0.01)``); see the module docstring."""
  weights = 0.01 * jax.random.normal(key, (num_classes, num_features), jnp.float32).T
  return weights, jnp.zeros((num_classes,), jnp.float32)


def fit_linear_head(features, labels, num_classes: int, *, l2: float = 1e-4, steps: int = 300,
                    learning_rate: float | None = None, standardize: bool = True) -> tuple[jax.Array, jax.Array]:
  """Multinomial logistic regression on GAP features: features (N, C), labels (N,) → W (C, K), b (K,).

  Minimises mean softmax cross-entropy + l2/2 · ‖W‖² with ``steps`` iterations of L-BFGS
  (``optax.lbfgs``; zoom line search when ``learning_rate`` is None), full batch, jitted.
  ``standardize`` fits on per-feature z-scores for conditioning (the penalty applies there) and
  folds the scaling back, so the returned W and b act on the raw features: logits = F·W + b.
  """
  x = jnp.asarray(features, jnp.float32)
  y = jnp.asarray(labels)
  if x.ndim != 2:
    raise ValueError(f"fit_linear_head: expected features (N, C), got shape {x.shape}")
  if y.shape != x.shape[:1]:
    raise ValueError(f"fit_linear_head: expected labels ({x.shape[0]},), got shape {y.shape}")
  labels_np = np.asarray(labels)
  if labels_np.size and (labels_np.min() < 0 or labels_np.max() >= num_classes):
    raise ValueError(f"fit_linear_head: expected labels in [0, {num_classes}), got range "
                     f"[{labels_np.min()}, {labels_np.max()}]")
  return _fit_linear_head(x, y.astype(jnp.int32), num_classes, float(l2), int(steps), learning_rate, bool(standardize))


@functools.partial(jax.jit, static_argnames=("num_classes", "l2", "steps", "learning_rate", "standardize"))
def _fit_linear_head(x, y, num_classes, l2, steps, learning_rate, standardize):
  if standardize:
    mean = jnp.mean(x, axis=0)
    std = jnp.std(x, axis=0)
    std = jnp.where(std > 0, std, 1.0)  # constant (e.g. dead ReLU) channels stay as they are
  else:
    mean = jnp.zeros(x.shape[1], x.dtype)
    std = jnp.ones(x.shape[1], x.dtype)
  z = (x - mean) / std
  one_hot = jax.nn.one_hot(y, num_classes, dtype=z.dtype)

  def loss(params):
    logits = z @ params["w"] + params["b"]
    ce = -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), axis=-1))
    return ce + 0.5 * l2 * jnp.sum(params["w"] ** 2)

  params = {"w": jnp.zeros((x.shape[1], num_classes), z.dtype), "b": jnp.zeros((num_classes,), z.dtype)}
  opt = optax.lbfgs(learning_rate=learning_rate)
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry, _):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  weights = params["w"] / std[:, None]
  bias = params["b"] - mean @ weights
  return weights, bias


def select_cam_head(train_features, train_labels, num_classes: int, *,
                    upstream_untrained_cam_head: bool = False, key: jax.Array | None = None,
                    **fit_kwargs) -> tuple[jax.Array, jax.Array]:
  """The CAM head for ``class_activation_maps``: (C, K) weights, (K,) bias.

  ``upstream_untrained_cam_head`` (default False): False fits ``fit_linear_head`` on the training
  split's GAP features (train_features (N, C), train_labels (N,)) — the intended, class-evidence
  CAM; True reproduces DualAttendMed's fresh N(0, 0.01) head (needs ``key``; the features only
  give C), whose CAMs are random projections — use it only to compare with the published IoU.
  """
  train_features = jnp.asarray(train_features)
  if train_features.ndim != 2:
    raise ValueError(f"select_cam_head: expected train_features (N, C), got shape {train_features.shape}")
  if upstream_untrained_cam_head:
    if key is None:
      raise ValueError("select_cam_head: upstream_untrained_cam_head=True needs a PRNG key")
    return untrained_head(key, train_features.shape[1], num_classes)
  return fit_linear_head(train_features, train_labels, num_classes, **fit_kwargs)

"""Attention-guided crop and drop (WS-DAN / CAL / DualAttendMed ``utils.py: batch_augment``).

Batched and jittable: every sample's crop box is computed on device and the crop is resized back
with a gather, so the whole batch runs as one program and can be sharded over the batch axis.
The arithmetic follows upstream exactly (docs/systems.md#attention-crop-and-drop):

* the map is resized to the image size with ``align_corners=True`` bilinear
  (``F.upsample_bilinear``); the threshold is ``θ · max(map)`` with the max of the *un-resized*
  map;
* crop: rows/cols of the pixels ``>= threshold`` give ``[r_min, r_max]``; the box is
  ``h0 = max(int(r_min - pad·H), 0)``, ``h1 = min(int(r_max + pad·H) + 1, H)`` (Python ``int()``
  truncation, float64 arithmetic, end exclusive), likewise for width; the crop is resized back to
  (H, W) with ``align_corners=True`` bilinear;
* drop: ``images · (resized map < threshold)``.

Upstream quirk behind a flag: upstream ends the box at ``min(int(r_max + pad·H), H)`` used as an
*exclusive* end, so the last mask row/column is cut off unless the padding reaches past it (with
padding 0 a one-row mask gives an empty crop). ``drop_last_mask_row=True`` reproduces that
(parity); the default keeps the last row/column (``+ 1``).

θ is a float, or a ``(low, high)`` pair from which one θ per sample is drawn uniformly (CAL's
training setting) — from a PRNG key, or injected as ``thetas`` (B,).

Two inputs upstream cannot handle (it raises inside ``torch.nonzero(...).min()``) are given a
defined result here: an empty crop mask (possible when the map's maximum is negative, as
DualAttendMed's unbounded maps allow) keeps the whole image, and an empty box (only with
``drop_last_mask_row``) keeps one row/column.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxretina.models import layers

MODES = ("crop", "drop")
Theta = float | Sequence[float]


def sample_thetas(key: jax.Array, theta: Theta, batch: int) -> jax.Array:
  """Per-sample thresholds (B,): ``theta`` repeated, or U(low, high) draws for a (low, high) pair."""
  if _is_range(theta):
    low, high = (float(t) for t in theta)
    return jax.random.uniform(key, (batch,), jnp.float32, low, high)
  return jnp.full((batch,), float(theta), jnp.float32)


def _is_range(theta) -> bool:
  if isinstance(theta, (tuple, list)) or (hasattr(theta, "shape") and np.ndim(theta) == 1):
    if len(theta) != 2:
      raise ValueError(f"attention augment theta={theta!r}: a range must be (low, high)")
    return True
  return False


def _thresholds(attention_map: jax.Array, theta: Theta, key, thetas) -> jax.Array:
  batch = attention_map.shape[0]
  if thetas is None:
    if _is_range(theta):
      if key is None:
        raise ValueError(f"attention augment theta={tuple(theta)} is a range: pass a PRNG `key` or the "
                         "per-sample draws as `thetas`")
      thetas = sample_thetas(key, theta, batch)
    else:
      thetas = jnp.full((batch,), float(theta), jnp.float32)
  thetas = jnp.asarray(thetas, jnp.float32)
  if thetas.shape != (batch,):
    raise ValueError(f"attention augment thetas: expected shape ({batch},), got {thetas.shape}")
  return thetas * jnp.max(attention_map.reshape(batch, -1), axis=1)


def _as_map(attention_map: jax.Array, images: jax.Array) -> jax.Array:
  """(B,h,w) or (B,h,w,1) → (B,h,w,1), checked against the images' batch."""
  if attention_map.ndim == 3:
    attention_map = attention_map[..., None]
  if attention_map.ndim != 4 or attention_map.shape[-1] != 1:
    raise ValueError(f"attention map: expected (B,h,w,1) or (B,h,w), got shape {attention_map.shape}")
  if images.ndim != 4:
    raise ValueError(f"images: expected (B,H,W,C) NHWC, got shape {images.shape}")
  if attention_map.shape[0] != images.shape[0]:
    raise ValueError(f"attention map batch {attention_map.shape[0]} != images batch {images.shape[0]}")
  return attention_map.astype(jnp.float32)


def attention_drop(images: jax.Array, attention_map: jax.Array, theta: Theta = 0.5, *,
                   key: jax.Array | None = None, thetas: jax.Array | None = None) -> jax.Array:
  """Zeroes the pixels whose resized attention is ``>= θ·max``.

  Args:
    images: (B,H,W,C).
    attention_map: (B,h,w,1) or (B,h,w), one map per sample.
    theta: float, or (low, high) to draw one θ per sample from ``key``.
    key: PRNG key for a θ range.
    thetas: (B,) injected θ draws (override ``key``).

  Returns:
    (B,H,W,C) images · (resized map < θ·max).
  """
  attention_map = _as_map(attention_map, images)
  height, width = images.shape[1:3]
  threshold = _thresholds(attention_map, theta, key, thetas)
  resized = layers.resize_bilinear_align_corners(attention_map, (height, width))
  keep = resized < threshold[:, None, None, None]
  return images * keep.astype(images.dtype)


def crop_boxes(attention_map: jax.Array, image_size: tuple[int, int], theta: Theta = 0.5,
               padding_ratio: float = 0.1, *, key: jax.Array | None = None,
               thetas: jax.Array | None = None, drop_last_mask_row: bool = False) -> jax.Array:
  """Crop boxes: (B, 4) int32 ``[h0, h1, w0, w1]`` (ends exclusive) for (B,h,w,1) maps.

  ``drop_last_mask_row``: upstream's off-by-one (see the module docstring).
  """
  if attention_map.ndim == 3:
    attention_map = attention_map[..., None]
  attention_map = attention_map.astype(jnp.float32)
  height, width = image_size
  threshold = _thresholds(attention_map, theta, key, thetas)
  resized = layers.resize_bilinear_align_corners(attention_map, (height, width))[..., 0]
  mask = resized >= threshold[:, None, None]
  rows, cols = jnp.any(mask, axis=2), jnp.any(mask, axis=1)
  h0, h1 = _box_edges(rows, height, padding_ratio, drop_last_mask_row)
  w0, w1 = _box_edges(cols, width, padding_ratio, drop_last_mask_row)
  return jnp.stack([h0, h1, w0, w1], axis=1)


def _box_edges(hits: jax.Array, size: int, padding_ratio: float,
               drop_last_mask_row: bool) -> tuple[jax.Array, jax.Array]:
  """(B, size) bool → padded (start, end) per sample, with upstream's float64 ``int()`` arithmetic."""
  # Tables of int(r ∓ pad·size) for every possible row, computed in Python float64 exactly as
  # upstream does; float32 on device would round e.g. 0.1·30 = 3.0000000000000004 differently.
  pad = padding_ratio * size
  start_table = jnp.asarray([max(int(r - pad), 0) for r in range(size)], jnp.int32)
  past_last = 0 if drop_last_mask_row else 1
  end_table = jnp.asarray([min(int(r + pad) + past_last, size) for r in range(size)], jnp.int32)
  any_hit = jnp.any(hits, axis=1)
  first = jnp.argmax(hits, axis=1)
  last = size - 1 - jnp.argmax(hits[:, ::-1], axis=1)
  start = jnp.where(any_hit, start_table[first], 0)
  end = jnp.where(any_hit, end_table[last], size)
  end = jnp.maximum(end, start + 1)
  return start, end


def _crop_taps(start: jax.Array, length: jax.Array, out_size: int) -> tuple[jax.Array, ...]:
  """Source rows (lo, hi) and weights (λ0, λ1) of an align_corners=True resize of ``[start, start+length)``.

  As torch's ``compute_source_index_and_lambda``: src = scale·dst, lo = min(⌊src⌋, L − 1),
  hi = min(lo + 1, L − 1), λ1 = clip(src − lo, 0, 1), λ0 = 1 − λ1.
  """
  if out_size == 1:
    src = jnp.zeros((1,), jnp.float32)
  else:
    # scale = float32(L − 1) / (out − 1), looked up from a table divided on the host: under jit XLA
    # turns the division by a constant into a multiplication by its reciprocal, so 47/47 would be
    # 0.99999994 and an identity crop would blend neighbouring pixels.
    scales = np.asarray([np.float32(max(n - 1, 0)) / np.float32(out_size - 1) for n in range(out_size + 1)],
                        np.float32)
    src = jnp.arange(out_size, dtype=jnp.float32) * jnp.asarray(scales)[length]
  lo = jnp.minimum(jnp.floor(src).astype(jnp.int32), length - 1)
  hi = jnp.minimum(lo + 1, length - 1)
  lambda1 = jnp.clip(src - lo.astype(jnp.float32), 0.0, 1.0)
  return start + lo, start + hi, 1.0 - lambda1, lambda1


def _crop_resize(image: jax.Array, box: jax.Array, size: tuple[int, int]) -> jax.Array:
  """``F.upsample_bilinear(image[h0:h1, w0:w1], size)`` for one (H,W,C) image, box ``[h0, h1, w0, w1]``.

  Summed as torch's CPU kernel for these sizes does (``cpu_upsample_linear_channels_last``):
  i00·(λh0·λw0) + i01·(λh0·λw1) + i10·(λh1·λw0) + i11·(λh1·λw1).
  """
  height, width = size
  h_lo, h_hi, h0, h1 = _crop_taps(box[0], box[1] - box[0], height)
  w_lo, w_hi, w0, w1 = _crop_taps(box[2], box[3] - box[2], width)
  rows_lo, rows_hi = jnp.take(image, h_lo, axis=0), jnp.take(image, h_hi, axis=0)
  corner = lambda rows, cols: jnp.take(rows, cols, axis=1)  # noqa: E731
  weight = lambda a, b: (a[:, None] * b[None, :])[..., None]  # noqa: E731
  return (corner(rows_lo, w_lo) * weight(h0, w0) + corner(rows_lo, w_hi) * weight(h0, w1)
          + corner(rows_hi, w_lo) * weight(h1, w0) + corner(rows_hi, w_hi) * weight(h1, w1))


def attention_crop(images: jax.Array, attention_map: jax.Array, theta: Theta = 0.5, padding_ratio: float = 0.1,
                   *, key: jax.Array | None = None, thetas: jax.Array | None = None,
                   drop_last_mask_row: bool = False) -> jax.Array:
  """Crops each image to its attention box (pixels ``>= θ·max``, padded) and resizes back.

  Args:
    images: (B,H,W,C).
    attention_map: (B,h,w,1) or (B,h,w).
    theta: float, or (low, high) to draw one θ per sample from ``key``.
    padding_ratio: box padding as a fraction of H (rows) and W (columns).
    key: PRNG key for a θ range.
    thetas: (B,) injected θ draws.
    drop_last_mask_row: upstream's off-by-one box end (see the module docstring).

  Returns:
    (B,H,W,C) crops, resized with ``align_corners=True`` bilinear.
  """
  attention_map = _as_map(attention_map, images)
  height, width = images.shape[1:3]
  boxes = crop_boxes(attention_map, (height, width), theta, padding_ratio, key=key, thetas=thetas,
                     drop_last_mask_row=drop_last_mask_row)
  dtype = images.dtype

  crop = lambda image, box: _crop_resize(image.astype(jnp.float32), box, (height, width))  # noqa: E731
  return jax.vmap(crop)(images, boxes).astype(dtype)


def batch_augment(images: jax.Array, attention_map: jax.Array, mode: str = "crop", theta: Theta = 0.5,
                  padding_ratio: float = 0.1, *, key: jax.Array | None = None,
                  thetas: jax.Array | None = None, drop_last_mask_row: bool = False) -> jax.Array:
  """Upstream's ``batch_augment(images, attention_map, mode, theta, padding_ratio)`` in NHWC.

  ``mode`` is ``'crop'`` (``attention_crop``) or ``'drop'`` (``attention_drop``; ``padding_ratio``
  and ``drop_last_mask_row`` unused). See those functions for the arguments.
  """
  if mode == "crop":
    return attention_crop(images, attention_map, theta, padding_ratio, key=key, thetas=thetas,
                          drop_last_mask_row=drop_last_mask_row)
  if mode == "drop":
    return attention_drop(images, attention_map, theta, key=key, thetas=thetas)
  raise ValueError(f"batch_augment mode={mode!r}: expected one of {MODES}")

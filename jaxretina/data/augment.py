"""On-device, jittable, keyed image augmentation (NHWC float32 in [0, 1]).

FLAIR/KeepFIT's batch augmentation ``augmentations_pretraining`` (kornia 0.6.12, the version KeepFIT pins):

    RandomHorizontalFlip(p=0.5) → RandomAffine(degrees=5, scale=(0.9, 1.0), p=0.25)
      → ColorJitter(brightness=0.2, contrast=0.2, p=0.25)

ported with kornia's semantics (docs/systems.md#flair-pretraining-data-and-prompts):

* affine: angle ~ U(−5°, 5°), one isotropic scale ~ U(0.9, 1.0), about the pixel centre
  ((W−1)/2, (H−1)/2), bilinear, zeros outside. By default the pixel matrix is applied exactly. kornia's
  ``warp_affine`` instead normalises it with the ``align_corners=True`` pixel→[−1, 1] map but samples
  with an ``align_corners=False`` grid, which stretches the rotation/scale by ≈ size/(size−1) about the
  centre; ``kornia_grid_quirk=True`` reproduces that exactly (the identity stays exact either way).
* ColorJitter is kornia's PIL-aligned one (not ``ColorJiggle``): brightness factor b ~ U(0.8, 1.2)
  multiplies (``adjust_brightness_accumulative``: clip(x·b, 0, 1)); contrast factor c ~ U(0.8, 1.2)
  blends with the mean grey level of the image (``adjust_contrast_with_mean_subtraction``, grey =
  0.299R + 0.587G + 0.114B: clip(c·x + (1−c)·mean, 0, 1)); the two run in random order. Saturation and
  hue are 0 in FLAIR, i.e. skipped.
* No mean/std normalisation (FLAIR has none).

Every draw is per sample (kornia draws the jitter *order* once per batch; here each sample has its own,
which gives each sample the same distribution). Draws come from ``jax.random.split(key, B)``; the
sampled parameters are plain arrays (``sample_flair_params``) so a caller can inject or inspect them and
``apply_flair_augment`` is deterministic given them. Everything is elementwise over the batch, so it runs
under ``jit`` on a batch sharded over a mesh.

General helpers for the classification recipes: ``random_affine``, ``random_rotation``,
``random_resized_crop``, ``horizontal_flip``, and torchvision's ``RandomCrop``/``CenterCrop``
(``random_crop``, ``center_crop``), ``adjust_hue`` (with ``rgb_to_hsv``/``hsv_to_rgb``),
``RandomAffine`` with translation (``torchvision_random_affine``) and ``RandomErasing``
(``random_erasing``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp

Array = jax.Array

# kornia.color.rgb_to_grayscale's default weights (ITU-R BT.601 luma).
_GREY_WEIGHTS = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class FlairAugmentConfig:
  """Probabilities and ranges of FLAIR's augmentation chain (defaults = ``augmentations_pretraining``).

  Attributes:
    flip_p: probability of a horizontal flip.
    affine_p: probability of the random affine.
    degrees: rotation angle range ±degrees.
    scale: isotropic scale range (low, high).
    jitter_p: probability of the colour jitter.
    brightness: multiplicative brightness factor range 1 ± brightness (lower end clipped at 0).
    contrast: contrast factor range 1 ± contrast (lower end clipped at 0).
  """
  flip_p: float = 0.5
  affine_p: float = 0.25
  degrees: float = 5.0
  scale: tuple[float, float] = (0.9, 1.0)
  jitter_p: float = 0.25
  brightness: float = 0.2
  contrast: float = 0.2
  # Upstream quirk (kornia warp_affine's align_corners mismatch, see the module docstring); off = the
  # exact centre rotation/scale.
  kornia_grid_quirk: bool = False

  def __post_init__(self):
    for name in ("flip_p", "affine_p", "jitter_p"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"FlairAugmentConfig.{name} must be a probability in [0, 1], got {value}")
    for name in ("degrees", "brightness", "contrast"):
      if getattr(self, name) < 0:
        raise ValueError(f"FlairAugmentConfig.{name} must be >= 0, got {getattr(self, name)}")
    low, high = self.scale
    if not 0 < low <= high:
      raise ValueError(f"FlairAugmentConfig.scale must satisfy 0 < low <= high, got {self.scale}")


def _check_images(images, where: str) -> None:
  if images.ndim != 4:
    raise ValueError(f"{where}: images must be NHWC (B, H, W, C), got shape {images.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"{where}: images must be floating point in [0, 1], got dtype {images.dtype}")


# ----------------------------------------------------------------------------------------------------
# Geometry


def bilinear_sample(image: Array, x: Array, y: Array) -> Array:
  """``grid_sample(mode='bilinear', padding_mode='zeros')`` at pixel coordinates.

  Args:
    image: (H, W, C).
    x, y: (h, w) source pixel coordinates (pixel centres at integers); corners outside the image count 0.

  Returns:
    (h, w, C) in the image's dtype.
  """
  height, width = image.shape[0], image.shape[1]
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  wx1, wy1 = x - x0, y - y0
  wx0, wy0 = 1.0 - wx1, 1.0 - wy1
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)

  def corner(yi, xi, weight):
    inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    value = image[jnp.clip(yi, 0, height - 1), jnp.clip(xi, 0, width - 1)]
    return value * jnp.where(inside, weight, 0.0)[..., None].astype(image.dtype)

  return (corner(y0, x0, wy0 * wx0) + corner(y0, x0 + 1, wy0 * wx1)
          + corner(y0 + 1, x0, wy1 * wx0) + corner(y0 + 1, x0 + 1, wy1 * wx1))


def _pixel_to_unit(size: int) -> tuple[float, float]:
  # kornia.geometry.conversions.normal_transform_pixel: [0, size-1] → [-1, 1] (eps guards size 1).
  denominator = size - 1.0 if size > 1 else 1e-14
  return 2.0 / denominator, -1.0


def warp_affine(image: Array, src_from_dst: Array, kornia_grid_quirk: bool = False) -> Array:
  """Affine warp, bilinear, zeros outside, output the input's size.

  Args:
    image: (H, W, C).
    src_from_dst: (3, 3) source ← destination pixel matrix (pixel centres at integers).
    kornia_grid_quirk: reproduce kornia ``warp_affine(..., align_corners=False)``, which normalises the
      matrix with the align_corners=True map but samples an align_corners=False grid.

  Returns:
    (H, W, C).
  """
  height, width = image.shape[0], image.shape[1]
  if not kornia_grid_quirk:
    grid_x, grid_y = jnp.meshgrid(jnp.arange(width, dtype=jnp.float32), jnp.arange(height, dtype=jnp.float32))
    m = src_from_dst
    return bilinear_sample(image, m[0, 0] * grid_x + m[0, 1] * grid_y + m[0, 2],
                           m[1, 0] * grid_x + m[1, 1] * grid_y + m[1, 2])
  sx, tx = _pixel_to_unit(width)
  sy, ty = _pixel_to_unit(height)
  norm_from_pixel = jnp.array([[sx, 0.0, tx], [0.0, sy, ty], [0.0, 0.0, 1.0]], jnp.float32)
  pixel_from_norm = jnp.array([[1.0 / sx, 0.0, -tx / sx], [0.0, 1.0 / sy, -ty / sy], [0.0, 0.0, 1.0]],
                              jnp.float32)
  src_norm_from_dst_norm = norm_from_pixel @ src_from_dst @ pixel_from_norm
  # affine_grid(align_corners=False): output pixel centres at (2i+1)/size - 1.
  xs = (2.0 * jnp.arange(width, dtype=jnp.float32) + 1.0) / width - 1.0
  ys = (2.0 * jnp.arange(height, dtype=jnp.float32) + 1.0) / height - 1.0
  grid_x, grid_y = jnp.meshgrid(xs, ys)
  m = src_norm_from_dst_norm
  src_x = m[0, 0] * grid_x + m[0, 1] * grid_y + m[0, 2]
  src_y = m[1, 0] * grid_x + m[1, 1] * grid_y + m[1, 2]
  # grid_sample(align_corners=False): normalised → pixel.
  pixel_x = ((src_x + 1.0) * width - 1.0) / 2.0
  pixel_y = ((src_y + 1.0) * height - 1.0) / 2.0
  return bilinear_sample(image, pixel_x, pixel_y)


def rotation_scale_inverse(angle_degrees: Array, scale: Array, height: int, width: int) -> Array:
  """(3, 3) source ← destination pixel matrix of kornia's centre rotation + isotropic scale.

  kornia's forward matrix is T(c)·R(θ)·S(s)·T(−c) with c = ((W−1)/2, (H−1)/2) and
  R(θ) = [[cos θ, −sin θ], [sin θ, cos θ]] (``get_affine_matrix2d`` → ``get_rotation_matrix2d(c, −θ, s)``);
  this returns its exact inverse T(c)·S(1/s)·R(−θ)·T(−c).
  """
  theta = jnp.deg2rad(angle_degrees)
  cos, sin = jnp.cos(theta) / scale, jnp.sin(theta) / scale
  cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
  return jnp.array([[cos, sin, cx - cos * cx - sin * cy],
                    [-sin, cos, cy + sin * cx - cos * cy],
                    [0.0, 0.0, 1.0]], jnp.float32)


def horizontal_flip(images: Array) -> Array:
  """Mirror left↔right: (B, H, W, C) → (B, H, W, C)."""
  return images[:, :, ::-1, :]


# ----------------------------------------------------------------------------------------------------
# Colour (kornia's PIL-aligned ColorJitter primitives)


def adjust_brightness(image: Array, factor: Array) -> Array:
  """kornia ``adjust_brightness_accumulative``: clip(x·factor, 0, 1). image (H, W, C)."""
  return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image: Array, factor: Array) -> Array:
  """kornia ``adjust_contrast_with_mean_subtraction``: clip(f·x + (1−f)·mean grey, 0, 1). image (H, W, C).

  The mean is over the image's grey levels for RGB; for another channel count, over all its values.
  """
  if image.shape[-1] == 3:
    grey = image @ jnp.asarray(_GREY_WEIGHTS, image.dtype)
    mean = jnp.mean(grey)
  else:
    mean = jnp.mean(image)
  return jnp.clip(image * factor + mean * (1.0 - factor), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# FLAIR chain


def _factor_range(amount: float) -> tuple[float, float]:
  return max(0.0, 1.0 - amount), 1.0 + amount


def sample_flair_params(key: Array, batch_size: int,
                        config: FlairAugmentConfig = FlairAugmentConfig()) -> dict[str, Array]:
  """Independent per-sample draws of FLAIR's augmentation chain.

  Returns:
    ``{'flip', 'affine', 'jitter', 'brightness_first'}``: bool (B,) — which steps apply / jitter order;
    ``{'angle', 'scale', 'brightness', 'contrast'}``: float32 (B,) — degrees, scale and factors.
  """
  keys = jax.random.split(key, 8)
  uniform = lambda k, low, high: jax.random.uniform(k, (batch_size,), jnp.float32, low, high)
  return {
      "flip": jax.random.bernoulli(keys[0], config.flip_p, (batch_size,)),
      "affine": jax.random.bernoulli(keys[1], config.affine_p, (batch_size,)),
      "angle": uniform(keys[2], -config.degrees, config.degrees),
      "scale": uniform(keys[3], *config.scale),
      "jitter": jax.random.bernoulli(keys[4], config.jitter_p, (batch_size,)),
      "brightness": uniform(keys[5], *_factor_range(config.brightness)),
      "contrast": uniform(keys[6], *_factor_range(config.contrast)),
      "brightness_first": jax.random.bernoulli(keys[7], 0.5, (batch_size,)),
  }


def _augment_one(image: Array, p: Mapping[str, Array], kornia_grid_quirk: bool) -> Array:
  height, width = image.shape[0], image.shape[1]
  image = jnp.where(p["flip"], image[:, ::-1, :], image)
  warped = warp_affine(image, rotation_scale_inverse(p["angle"], p["scale"], height, width), kornia_grid_quirk)
  image = jnp.where(p["affine"], warped, image)
  brightness_then_contrast = adjust_contrast(adjust_brightness(image, p["brightness"]), p["contrast"])
  contrast_then_brightness = adjust_brightness(adjust_contrast(image, p["contrast"]), p["brightness"])
  jittered = jnp.where(p["brightness_first"], brightness_then_contrast, contrast_then_brightness)
  return jnp.where(p["jitter"], jittered, image)


def apply_flair_augment(images: Array, params: Mapping[str, Array], kornia_grid_quirk: bool = False) -> Array:
  """FLAIR's chain with given draws (from ``sample_flair_params`` or injected).

  Args:
    images: (B, H, W, C) float in [0, 1].
    params: the dict of ``sample_flair_params``, each entry (B,).
    kornia_grid_quirk: see ``FlairAugmentConfig.kornia_grid_quirk``.

  Returns:
    (B, H, W, C), same dtype.
  """
  _check_images(images, "apply_flair_augment")
  missing = {"flip", "affine", "angle", "scale", "jitter", "brightness", "contrast",
             "brightness_first"} - set(params)
  if missing:
    raise KeyError(f"apply_flair_augment: params lacks {sorted(missing)}")
  for name, value in params.items():
    if jnp.shape(value) != (images.shape[0],):
      raise ValueError(f"apply_flair_augment: params[{name!r}] must have shape ({images.shape[0]},), "
                       f"got {jnp.shape(value)}")
  return _apply_flair_augment_jit(images, dict(params), bool(kornia_grid_quirk))


@functools.partial(jax.jit, static_argnums=(2,))
def _apply_flair_augment_jit(images: Array, params: dict[str, Array], kornia_grid_quirk: bool) -> Array:
  one = lambda image, p: _augment_one(image, p, kornia_grid_quirk)
  return jax.vmap(one)(images, params).astype(images.dtype)


def flair_augment(key: Array, images: Array, config: FlairAugmentConfig = FlairAugmentConfig()) -> Array:
  """FLAIR/KeepFIT ``augmentations_pretraining`` on a batch, independent draws per sample.

  Args:
    key: PRNG key.
    images: (B, H, W, C) float in [0, 1] (may be sharded over the batch axis; jit-friendly).
    config: probabilities and ranges; the default is upstream's chain.

  Returns:
    (B, H, W, C) augmented images in [0, 1].
  """
  _check_images(images, "flair_augment")
  return apply_flair_augment(images, sample_flair_params(key, images.shape[0], config), config.kornia_grid_quirk)


# ----------------------------------------------------------------------------------------------------
# General helpers


def random_affine(key: Array, images: Array, degrees: float, scale: tuple[float, float] = (1.0, 1.0),
                  p: float = 1.0, kornia_grid_quirk: bool = False) -> Array:
  """kornia ``RandomAffine(degrees, scale=scale, p=p)`` (no translation/shear), per-sample draws.

  images (B, H, W, C) → (B, H, W, C); zeros outside, bilinear. ``kornia_grid_quirk``: see
  ``FlairAugmentConfig``.
  """
  _check_images(images, "random_affine")
  return _random_affine_jit(key, images, jnp.float32(degrees), jnp.asarray(scale, jnp.float32), jnp.float32(p),
                            bool(kornia_grid_quirk))


@functools.partial(jax.jit, static_argnums=(5,))
def _random_affine_jit(key, images, degrees, scale, p, kornia_grid_quirk):
  batch, height, width = images.shape[:3]
  k_apply, k_angle, k_scale = jax.random.split(key, 3)
  apply = jax.random.bernoulli(k_apply, p, (batch,))
  angle = jax.random.uniform(k_angle, (batch,), jnp.float32, -degrees, degrees)
  scales = jax.random.uniform(k_scale, (batch,), jnp.float32, scale[0], scale[1])

  def one(image, do, theta, s):
    warped = warp_affine(image, rotation_scale_inverse(theta, s, height, width), kornia_grid_quirk)
    return jnp.where(do, warped, image)

  return jax.vmap(one)(images, apply, angle, scales).astype(images.dtype)


def random_rotation(key: Array, images: Array, degrees: float, p: float = 1.0) -> Array:
  """Rotation about the centre by U(−degrees, degrees), zeros outside. (B, H, W, C) → same."""
  return random_affine(key, images, degrees, (1.0, 1.0), p)


def random_resized_crop(key: Array, images: Array, size: tuple[int, int],
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)) -> Array:
  """torchvision ``RandomResizedCrop`` box sampling, per sample, resampled bilinearly to ``size``.

  The box follows torchvision's ``get_params``: 10 tries of area ~ U(scale)·H·W and log-aspect ~
  U(log ratio), the first that fits wins (drawn vectorised), else a centre crop with the aspect clamped
  to ``ratio``. The crop is resized with ``F.interpolate(mode='bilinear', align_corners=False)``
  semantics (edge clamping inside the box, no antialiasing, unlike torchvision's tensor default).

  Args:
    key: PRNG key.
    images: (B, H, W, C).
    size: output (height, width).

  Returns:
    (B, size[0], size[1], C).
  """
  _check_images(images, "random_resized_crop")
  return _random_resized_crop_jit(key, images, (int(size[0]), int(size[1])), jnp.asarray(scale, jnp.float32),
                                  jnp.asarray(ratio, jnp.float32))


@functools.partial(jax.jit, static_argnums=(2,))
def _random_resized_crop_jit(key, images, size, scale, ratio):
  batch, height, width = images.shape[:3]
  out_h, out_w = size
  tries = 10
  k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(k_area, (batch, tries), jnp.float32, scale[0], scale[1])
  aspect = jnp.exp(jax.random.uniform(k_ratio, (batch, tries), jnp.float32,
                                      jnp.log(ratio[0]), jnp.log(ratio[1])))
  box_w = jnp.round(jnp.sqrt(area * aspect))
  box_h = jnp.round(jnp.sqrt(area / aspect))
  fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
  first = jnp.argmax(fits, axis=1)
  any_fit = jnp.any(fits, axis=1)
  pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
  # torchvision's fallback: the largest centred box whose aspect lies within `ratio`.
  in_ratio = width / height
  fallback_w = jnp.where(in_ratio > ratio[1], jnp.round(height * ratio[1]), width)
  fallback_h = jnp.where(in_ratio < ratio[0], jnp.round(width / ratio[0]), height)
  box_w = jnp.where(any_fit, pick(box_w), fallback_w)
  box_h = jnp.where(any_fit, pick(box_h), fallback_h)
  top = jnp.where(any_fit, jnp.floor(jax.random.uniform(k_top, (batch,)) * (height - box_h + 1)),
                  (height - box_h) // 2)
  left = jnp.where(any_fit, jnp.floor(jax.random.uniform(k_left, (batch,)) * (width - box_w + 1)),
                   (width - box_w) // 2)

  def one(image, t, l, h, w):
    ys = t + jnp.clip((jnp.arange(out_h, dtype=jnp.float32) + 0.5) * h / out_h - 0.5, 0.0, h - 1.0)
    xs = l + jnp.clip((jnp.arange(out_w, dtype=jnp.float32) + 0.5) * w / out_w - 0.5, 0.0, w - 1.0)
    grid_x, grid_y = jnp.meshgrid(xs, ys)
    return bilinear_sample(image, grid_x, grid_y)

  return jax.vmap(one)(images, top, left, box_h, box_w).astype(images.dtype)


def random_crop(key: Array, images: Array, size: tuple[int, int]) -> Array:
  """torchvision ``RandomCrop(size)`` per sample (no padding): top ~ U{0..H−h}, left ~ U{0..W−w}.

  images (B, H, W, C) → (B, h, w, C); an exact copy of a window, no resampling.
  """
  _check_images(images, "random_crop")
  height, width = images.shape[1:3]
  out_h, out_w = int(size[0]), int(size[1])
  if not (0 < out_h <= height and 0 < out_w <= width):
    raise ValueError(f"random_crop: crop {out_h}×{out_w} does not fit in images of {height}×{width}")
  k_top, k_left = jax.random.split(key)
  batch = images.shape[0]
  tops = jax.random.randint(k_top, (batch,), 0, height - out_h + 1)
  lefts = jax.random.randint(k_left, (batch,), 0, width - out_w + 1)
  crop = lambda image, t, l: jax.lax.dynamic_slice(image, (t, l, 0), (out_h, out_w, image.shape[-1]))  # noqa: E731
  return jax.vmap(crop)(images, tops, lefts)


def center_crop_box(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
  """(top, left) of torchvision ``CenterCrop(size)``: ``int(round((H − h) / 2))`` (Python rounding)."""
  out_h, out_w = int(size[0]), int(size[1])
  if not (0 < out_h <= height and 0 < out_w <= width):
    raise ValueError(f"center_crop: crop {out_h}×{out_w} does not fit in images of {height}×{width}")
  return int(round((height - out_h) / 2.0)), int(round((width - out_w) / 2.0))


def center_crop(images, size: tuple[int, int]):
  """torchvision ``CenterCrop(size)`` of (B, H, W, C) (jax or numpy) → (B, h, w, C)."""
  top, left = center_crop_box(images.shape[1], images.shape[2], size)
  return images[:, top:top + int(size[0]), left:left + int(size[1]), :]


def rgb_to_hsv(image: Array) -> Array:
  """torchvision's tensor ``_rgb2hsv``: (..., 3) RGB in [0, 1] → HSV, each in [0, 1]."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  maxc = jnp.max(image, axis=-1)
  minc = jnp.min(image, axis=-1)
  eqc = maxc == minc
  cr = maxc - minc
  ones = jnp.ones_like(maxc)
  s = cr / jnp.where(eqc, ones, maxc)
  cr_divisor = jnp.where(eqc, ones, cr)
  rc = (maxc - r) / cr_divisor
  gc = (maxc - g) / cr_divisor
  bc = (maxc - b) / cr_divisor
  hr = jnp.where(maxc == r, bc - gc, 0.0)
  hg = jnp.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
  hb = jnp.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
  h = jnp.mod((hr + hg + hb) / 6.0 + 1.0, 1.0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(image: Array) -> Array:
  """torchvision's tensor ``_hsv2rgb``: (..., 3) HSV in [0, 1] → RGB."""
  h, s, v = image[..., 0], image[..., 1], image[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = i.astype(jnp.int32) % 6
  p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
  q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
  t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
  r = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [v, q, p, p, t], v)
  g = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [t, v, v, q, p], p)
  b = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [p, p, t, v, v], q)
  return jnp.stack([r, g, b], axis=-1)


def adjust_hue(images: Array, factor: Array) -> Array:
  """torchvision ``adjust_hue`` (tensor path): hue shifted by ``factor`` ∈ [−0.5, 0.5] turns.

  images (B, H, W, 3) in [0, 1], factor (B,).
  """
  hsv = rgb_to_hsv(images)
  hue = jnp.mod(hsv[..., 0] + factor[:, None, None], 1.0)
  return hsv_to_rgb(jnp.concatenate([hue[..., None], hsv[..., 1:]], axis=-1))


def torchvision_random_affine(key: Array, images: Array, degrees: float, translate: tuple[float, float] = (0.0, 0.0),
                              scale: tuple[float, float] = (1.0, 1.0)) -> Array:
  """torchvision ``RandomAffine(degrees, translate, scale)`` (no shear), per-sample draws, zeros outside.

  Angle ~ U(−degrees, degrees); translation (round(U(−t_x·W, t_x·W)), round(U(−t_y·H, t_y·H))) pixels;
  scale ~ U(scale). The map is torchvision's: rotation and scale about the image centre, then the
  translation. Resampling is bilinear (torchvision's default is nearest; see the callers' docs).
  images (B, H, W, C) → same shape.
  """
  _check_images(images, "torchvision_random_affine")
  return _torchvision_affine_jit(key, images, jnp.float32(degrees), jnp.asarray(translate, jnp.float32),
                                 jnp.asarray(scale, jnp.float32))


@jax.jit
def _torchvision_affine_jit(key, images, degrees, translate, scale):
  batch, height, width = images.shape[:3]
  k_angle, k_tx, k_ty, k_scale = jax.random.split(key, 4)
  angle = jax.random.uniform(k_angle, (batch,), jnp.float32, -degrees, degrees)
  tx = jnp.round(jax.random.uniform(k_tx, (batch,), jnp.float32, -translate[0] * width, translate[0] * width))
  ty = jnp.round(jax.random.uniform(k_ty, (batch,), jnp.float32, -translate[1] * height, translate[1] * height))
  scales = jax.random.uniform(k_scale, (batch,), jnp.float32, scale[0], scale[1])

  def one(image, theta, s, dx, dy):
    # Forward map T(c + t)·R·S·T(−c); its inverse is (centre rotation/scale)⁻¹ composed with T(−t).
    untranslate = jnp.array([[1.0, 0.0, -dx], [0.0, 1.0, -dy], [0.0, 0.0, 1.0]], jnp.float32)
    return warp_affine(image, rotation_scale_inverse(theta, s, height, width) @ untranslate)

  return jax.vmap(one)(images, angle, scales, tx, ty).astype(images.dtype)


def random_erasing(key: Array, images: Array, p: float, scale: tuple[float, float] = (0.02, 0.33),
                   ratio: tuple[float, float] = (0.3, 3.3), value=0.0) -> Array:
  """torchvision ``RandomErasing(p, scale, ratio, value)`` per sample.

  With probability p a box is filled with ``value`` (a scalar or one value per channel): 10 tries of
  area ~ U(scale)·H·W and log-aspect ~ U(log ratio), h = round(√(area·aspect)), w = round(√(area/aspect));
  the first with h < H and w < W wins (top ~ U{0..H−h}, left ~ U{0..W−w}); none fitting erases
  nothing, as torchvision. images (B, H, W, C) → same shape.
  """
  _check_images(images, "random_erasing")
  value = jnp.broadcast_to(jnp.asarray(value, images.dtype), images.shape[-1:])
  return _random_erasing_jit(key, images, jnp.float32(p), jnp.asarray(scale, jnp.float32),
                             jnp.asarray(ratio, jnp.float32), value)


@jax.jit
def _random_erasing_jit(key, images, p, scale, ratio, value):
  batch, height, width = images.shape[:3]
  tries = 10
  k_apply, k_area, k_ratio, k_top, k_left = jax.random.split(key, 5)
  area = height * width * jax.random.uniform(k_area, (batch, tries), jnp.float32, scale[0], scale[1])
  aspect = jnp.exp(jax.random.uniform(k_ratio, (batch, tries), jnp.float32, jnp.log(ratio[0]), jnp.log(ratio[1])))
  box_h = jnp.round(jnp.sqrt(area * aspect))
  box_w = jnp.round(jnp.sqrt(area / aspect))
  fits = (box_h < height) & (box_w < width)
  first = jnp.argmax(fits, axis=1)
  pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]  # noqa: E731
  box_h, box_w = pick(box_h), pick(box_w)
  erase = jax.random.bernoulli(k_apply, p, (batch,)) & jnp.any(fits, axis=1)
  top = jnp.floor(jax.random.uniform(k_top, (batch,)) * (height - box_h + 1))
  left = jnp.floor(jax.random.uniform(k_left, (batch,)) * (width - box_w + 1))
  rows = jnp.arange(height, dtype=jnp.float32)[None, :, None]
  cols = jnp.arange(width, dtype=jnp.float32)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None])
            & (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None]) & erase[:, None, None])
  return jnp.where(inside[..., None], value, images)

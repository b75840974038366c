"""Host-side (numpy / PIL) image handling, in one place: decoding, RGB/grey conversion, FLAIR's
square canvas (letterbox), resizing, field-of-view crop and encoding.

Every host-side reader of retinal images goes through this module: the dataset builders (build-time
decode, crop, canvas and re-encode), the Grain pipeline (record decode and resize), ``predict``
(image files and its three preprocessings) and transfer feature extraction. On-device transforms
(augmentation, crops on batches) live in ``jaxretina.data.augment``.

FLAIR feeds its networks images in [0, 1] on a square zero-padded canvas: the longer side is
resized to ``image_size`` with torchvision's *antialiased* bilinear ``Resize`` and the rest is
padded with zeros at the right/bottom (docs/systems.md#flair-pretraining-data-and-prompts). There is no mean/std
normalisation anywhere in FLAIR/KeepFIT.

The resize here reproduces torch's ``_upsample_bilinear2d_aa`` (what
``torchvision.transforms.Resize(size, antialias=True)`` runs on float tensors) in plain numpy:
separable, the last axis first; for output index ``i`` with ``scale = in/out``

* ``support = scale`` when downscaling (``scale >= 1``), else ``1``;
* ``center = scale·(i + 0.5)``, taps ``j ∈ [int(center - support + 0.5), int(center + support + 0.5))``
  clipped to the input;
* weight ``max(0, 1 - |(j + 0.5 - center)·invscale|)`` with ``invscale = 1/scale`` when
  downscaling, else ``1``; weights normalised to sum 1 per output pixel.

That is PIL's triangle filter when downscaling and plain half-pixel bilinear (edges clamped) when
upscaling. The tap positions are computed in float32 like torch's kernel, so integer truncations
agree with it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = [
    "antialiased_resize",
    "as_hwc_array",
    "canvas_resize",
    "canvas_resize_fast",
    "convert_channels",
    "crop_fov",
    "decode",
    "encode",
    "flair_preprocess",
    "letterbox",
    "li_threshold",
    "open_verified",
    "pad_to_square",
    "read_file",
    "resize_square",
    "resize_weights",
    "to_pil",
]

# PIL modes holding more than 8 bits per pixel (16-bit TIFF/PNG, float): their convert() to RGB/L clips
# at 255, so `read_file` stretches them by their maximum instead.
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "F")


# ---------------------------------------------------------------------------------------------
# Decoding, channel conversion and encoding
# ---------------------------------------------------------------------------------------------
def _mode(channels: int) -> str:
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}")
  return "RGB" if channels == 3 else "L"


def convert_channels(image: Image.Image, channels: int) -> Image.Image:
  """`image` in mode RGB (``channels`` 3: grey FFA photographs included) or L (1: OCT B-scans).

  An image already in that mode is returned as it is: stored images usually are, and convert() would
  copy every pixel for nothing.
  """
  mode = _mode(channels)
  return image if image.mode == mode else image.convert(mode)


def to_pil(array: np.ndarray) -> Image.Image:
  """PIL image of a uint8 (H, W), (H, W, 1) or (H, W, 3) array (one channel → mode L)."""
  return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


def as_hwc_array(image: Image.Image) -> np.ndarray:
  """uint8 (H, W, C) of a PIL image (grey images keep a channel axis of 1)."""
  array = np.asarray(image, np.uint8)
  return array[..., None] if array.ndim == 2 else array


def resize_square(image: Image.Image, size: int | None) -> Image.Image:
  """`image` resized (PIL bilinear) to size², untouched when it already is (or `size` is None)."""
  if size is None or image.size == (size, size):
    return image
  return image.resize((size, size), Image.Resampling.BILINEAR)


def decode(value, channels: int = 3, size: int | None = None) -> np.ndarray:
  """uint8 (H, W, channels) of a stored image: encoded bytes, or an already decoded uint8 HWC array.

  ``size``: resized to size² (PIL bilinear) when given.
  """
  _mode(channels)  # a bad channel count is refused before any decoding
  if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
    image = to_pil(value)
  else:
    with Image.open(io.BytesIO(bytes(value))) as opened:
      opened.load()
      image = convert_channels(opened, channels)
  return as_hwc_array(resize_square(convert_channels(image, channels), size))


def read_file(path: str, channels: int = 3, *, stretch_wide_modes: bool = True) -> np.ndarray:
  """uint8 (H, W, channels) of an image file.

  ``stretch_wide_modes``: 16-bit/float images are scaled by their maximum to 0..255 (PIL's convert()
  would clip them); off, PIL converts them alone (clipping), as transfer feature extraction reads them.
  """
  mode = _mode(channels)
  with Image.open(path) as opened:
    opened.load()
    image = opened
    if stretch_wide_modes and image.mode in _WIDE_MODES:
      values = np.asarray(image, np.float64)
      top = values.max()
      values = values / top * 255.0 if top > 0 else values
      image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
    array = as_hwc_array(image.convert(mode))
  if min(array.shape[:2]) < 1:
    raise ValueError(f"empty image ({array.shape[0]}x{array.shape[1]})")
  return array


def open_verified(path: str, channels: int = 3) -> tuple[Image.Image, str | None]:
  """(image in RGB / L, its file format) of an image file checked for corruption.

  ``verify()`` checks the structure (PNG CRCs, JPEG markers); ``load()`` then fails on a truncated
  file (LOAD_TRUNCATED_IMAGES stays off). Raises whatever the decoder raises.
  """
  mode = _mode(channels)
  with Image.open(path) as probe:
    probe.verify()
  with Image.open(path) as opened:
    source_format = opened.format
    opened.load()
    # copy(): the converted image must outlive the closed file.
    image = opened.convert(mode) if opened.mode != mode else opened.copy()
  return image, source_format


def encode(array: np.ndarray, encoding: str = "png", jpeg_quality: int = 95) -> bytes:
  """``'png'`` or ``'jpeg'`` bytes of a uint8 (H, W), (H, W, 1) or (H, W, 3) image.

  PNG uses fixed compression settings, so the encoded bytes (and the dataset files) are reproducible.
  """
  image = to_pil(array)
  buffer = io.BytesIO()
  if encoding == "jpeg":
    image.save(buffer, format="JPEG", quality=jpeg_quality)
  elif encoding == "png":
    image.save(buffer, format="PNG", compress_level=1)
  else:
    raise ValueError(f"encoding must be 'png' or 'jpeg', got {encoding!r}")
  return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# FLAIR's antialiased resize and square canvas
# ---------------------------------------------------------------------------------------------
def resize_weights(in_size: int, out_size: int, dtype=np.float32) -> np.ndarray:
  """The (out_size, in_size) matrix of torch's antialiased bilinear resize along one axis.

  ``dtype`` is the precision torch computes the taps in: that of the image (float32 or float64).
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"resize_weights: sizes must be positive, got in_size={in_size}, out_size={out_size}")
  f = np.dtype(dtype).type
  scale = f(in_size) / f(out_size)
  support = scale if scale >= 1.0 else f(1.0)
  invscale = f(1.0) / scale if scale >= 1.0 else f(1.0)
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    center = scale * (f(i) + f(0.5))
    # int() truncates toward zero, as the C++ static_cast<int64_t> does.
    xmin = max(int(center - support + f(0.5)), 0)
    xmax = min(int(center + support + f(0.5)), in_size)
    taps = np.arange(xmin, xmax)
    dist = np.abs((taps.astype(f) - center + f(0.5)) * invscale).astype(f)
    w = np.maximum(f(0.0), f(1.0) - dist).astype(f)
    total = w.sum(dtype=f)
    if total != 0:
      w = w / total
    weights[i, xmin:xmax] = w
  return weights


def antialiased_resize(image: np.ndarray, size: tuple[int, int], dtype=np.float32) -> np.ndarray:
  """``Resize(size, antialias=True)`` of an HWC image → (size[0], size[1], C) in ``dtype``.

  ``dtype`` (float32 or float64) is the precision of the computation, as torch uses the tensor's own.
  """
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"antialiased_resize: expected an HWC image, got shape {image.shape}")
  dtype = np.dtype(dtype)
  if dtype not in (np.float32, np.float64):
    raise ValueError(f"antialiased_resize: dtype must be float32 or float64, got {dtype}")
  out_h, out_w = int(size[0]), int(size[1])
  if out_h < 1 or out_w < 1:
    raise ValueError(f"antialiased_resize: output size must be positive, got {(out_h, out_w)}")
  in_h, in_w = image.shape[:2]
  x = image.astype(dtype)
  # torch skips an axis whose size does not change and resizes the width before the height.
  if out_w != in_w:
    x = np.einsum("ow,hwc->hoc", resize_weights(in_w, out_w, dtype), x.astype(np.float64)).astype(dtype)
  if out_h != in_h:
    x = np.einsum("oh,hwc->owc", resize_weights(in_h, out_h, dtype), x.astype(np.float64)).astype(dtype)
  return x


def _as_hwc(image: np.ndarray, where: str) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"{where}: expected an HW or HWC image, got shape {image.shape}")
  return image


def _canvas(image: np.ndarray, image_size: int, where: str, dtype=np.float32) -> np.ndarray:
  """Longer side → ``image_size`` (antialiased), zero-padded right/bottom, computed in ``dtype``."""
  if image_size < 1:
    raise ValueError(f"{where}: image_size must be positive, got {image_size}")
  h, w = image.shape[:2]
  # Python float arithmetic and int() truncation, exactly as upstream computes the target size.
  scale = max(h, w) / image_size
  new_h, new_w = int(h / scale), int(w / scale)
  if new_h < 1 or new_w < 1:
    raise ValueError(f"{where}: a {h}x{w} image would shrink to {new_h}x{new_w} at image_size={image_size}")
  resized = antialiased_resize(image, (new_h, new_w), dtype)
  out = np.zeros((image_size, image_size, image.shape[2]), dtype)
  out[:new_h, :new_w] = resized
  return out


def flair_preprocess(image: np.ndarray, image_size: int = 512) -> np.ndarray:
  """FLAIR's ``FLAIRModel.preprocess_image`` for one image.

  Args:
    image: (H, W, C) or (H, W) array in 0..255 (uint8 or float).
  Returns:
    (image_size, image_size, C) float32 in [0, 1]: divided by 255 when its maximum is > 0 (as
    upstream: a float image already in [0, 1] is divided too), longer side resized to
    ``image_size``, zero-padded right/bottom.

  Upstream divides the caller's array by 255 *in place*; this function never modifies its input.
  """
  image = _as_hwc(image, "flair_preprocess")
  x = image.astype(np.float32)  # always a copy
  if np.max(x) > 0:
    x = x / np.float32(255.0)
  return _canvas(x, image_size, "flair_preprocess")


def canvas_resize(image: np.ndarray, image_size: int = 512) -> np.ndarray:
  """FLAIR/KeepFIT ``ImageScaling(canvas=True)`` without the /255 (for build-time pre-resizing).

  Args:
    image: (H, W, C) or (H, W). uint8 images go through [0, 1] float64 like KeepFIT's
      ``pre_transform.py`` (``/255``, resize, pad, ``×255`` then ``.byte()``, which truncates).
  Returns:
    (image_size, image_size, C): uint8 for uint8 input, else float32 in the input's range.
  """
  image = _as_hwc(image, "canvas_resize")
  if image.dtype == np.uint8:
    x = _canvas(image.astype(np.float64) / 255.0, image_size, "canvas_resize", np.float64)
    # torch's .byte() truncates toward zero; the antialiased resize keeps values in [0, 1].
    return np.clip(x * 255.0, 0, 255).astype(np.uint8)
  return _canvas(image.astype(np.float32), image_size, "canvas_resize")


def canvas_resize_fast(image: np.ndarray, size: int) -> np.ndarray:
  """``canvas_resize`` of a uint8 HWC image through PIL's float resampler (the dataset builders').

  Same target size (int truncation of ``side / scale``), the same triangle filter (PIL's bilinear
  *is* torch's antialiased bilinear when downscaling) evaluated in float32 per channel, the same
  ``×255 → truncate`` and zero padding at the right/bottom — but hundreds of times faster than the
  numpy reference on multi-megapixel photographs (equal to it when downscaling in tests;
  upscaling, rare for fundus photographs, differs by one grey level in < 0.1 % of the pixels).
  """
  h, w = image.shape[:2]
  scale = max(h, w) / size
  new_h, new_w = int(h / scale), int(w / scale)
  if new_h < 1 or new_w < 1:
    raise ValueError(f"a {h}x{w} image would shrink to {new_h}x{new_w} on a {size} px canvas")
  out = np.zeros((size, size, image.shape[2]), np.uint8)
  if (new_h, new_w) == (h, w):  # already fits: only the padding
    out[:h, :w] = image
    return out
  for c in range(image.shape[2]):
    channel = Image.fromarray(np.ascontiguousarray(image[:, :, c]), "L").convert("F")
    channel = channel.resize((new_w, new_h), Image.Resampling.BILINEAR)
    out[:new_h, :new_w, c] = np.clip(np.asarray(channel, np.float32), 0, 255).astype(np.uint8)
  return out


def pad_to_square(image: np.ndarray) -> np.ndarray:
  """A uint8 HWC image zero-padded at the right/bottom to a square (the canvas without a resize)."""
  h, w, c = image.shape
  side = max(h, w)
  square = np.zeros((side, side, c), np.uint8)
  square[:h, :w] = image
  return square


def letterbox(image: np.ndarray, size: int) -> np.ndarray:
  """A uint8 HWC image zero-padded right/bottom to a square (as the builders' canvas), then resized
  to size² with PIL's bilinear filter (a no-op when it already is that size)."""
  return as_hwc_array(resize_square(to_pil(pad_to_square(image)), size))


# ---------------------------------------------------------------------------------------------
# Field-of-view crop
# ---------------------------------------------------------------------------------------------
def li_threshold(values: np.ndarray) -> float:
  """Li's iterative minimum cross-entropy threshold (as ``skimage.filters.threshold_li``)."""
  v = np.asarray(values, np.float64).ravel()
  v = v[np.isfinite(v)]
  if v.size == 0:
    raise ValueError("li_threshold: no finite values")
  uniq = np.unique(v)
  if uniq.size == 1:
    return float(uniq[0])
  tolerance = np.min(np.diff(uniq)) / 2
  offset = v.min()
  v = v - offset  # the log() below needs non-negative means
  t_next = v.mean()
  t_curr = -2 * tolerance
  while abs(t_next - t_curr) > tolerance:
    t_curr = t_next
    fore = v > t_curr
    mean_fore = v[fore].mean() if fore.any() else 0.0
    mean_back = v[~fore].mean() if (~fore).any() else 0.0
    if mean_back == 0 or mean_fore == 0:
      break
    t_next = (mean_back - mean_fore) / (np.log(mean_back) - np.log(mean_fore))
  return float(t_next + offset)


def crop_fov(image: np.ndarray, channel: int = 0) -> np.ndarray:
  """FLAIR's ``crop_foreground``: crop an HWC fundus image to its field of view.

  The red channel is thresholded (Li), the largest connected component (4-connectivity) is kept and
  the image is cropped to its bounding box. An image without a foreground is returned unchanged
  (a copy).
  """
  from scipy import ndimage  # scipy ships with jax; scikit-image is not a runtime dependency

  image = _as_hwc(image, "crop_fov")
  if not 0 <= channel < image.shape[2]:
    raise ValueError(f"crop_fov: channel {channel} out of range for an image with {image.shape[2]} channels")
  red = image[:, :, channel].astype(np.float64)
  mask = red > li_threshold(red)
  labels, n = ndimage.label(mask)
  if n == 0:
    return image.copy()
  sizes = np.bincount(labels.ravel())[1:]
  largest = labels == (int(np.argmax(sizes)) + 1)
  rows = np.flatnonzero(largest.any(axis=1))
  cols = np.flatnonzero(largest.any(axis=0))
  return image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].copy()

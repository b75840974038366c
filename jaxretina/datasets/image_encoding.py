"""How the manual-download builders store images: decoded (PIL, verified), optionally cropped to the
field of view, pre-resized to a square canvas (FLAIR's longest-side resize + zero pad) and re-encoded.

The image operations themselves are ``jaxretina.data.imaging``'s; this module decides which apply.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxretina.data import imaging

ENCODINGS = ("png", "jpeg")


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  """How images are stored.

  Attributes:
    canvas_size: side of the square canvas (longest side resized to it, zero-padded right/bottom,
      as FLAIR's ``ImageScaling(canvas=True)``); 0 keeps the original size.
    crop_fov: crop to the field of view first (``jaxretina.data.imaging.crop_fov``).
    encoding: ``'png'`` (lossless) or ``'jpeg'``.
    jpeg_quality: quality of JPEG re-encoding.
  """

  canvas_size: int = 512
  crop_fov: bool = False
  encoding: str = "png"
  jpeg_quality: int = 95


def encode_array(array: np.ndarray, options: ImageOptions) -> bytes:
  """uint8 (H, W, C) (C 1 or 3) canvas-resized when ``options.canvas_size`` and encoded as ``options.encoding``."""
  if options.canvas_size:
    array = imaging.canvas_resize_fast(array, options.canvas_size)
  return imaging.encode(array, options.encoding, options.jpeg_quality)


def process_image(path: str, options: ImageOptions) -> tuple[bool, bytes | str]:
  """(True, encoded bytes) of the stored image, or (False, reason) when the file is corrupt.

  Module-level and exception-free so worker processes can run it and the main process decides
  what a bad image means (error or skip).
  """
  try:
    image, source_format = imaging.open_verified(path, channels=3)
  except Exception as e:  # noqa: BLE001  (any decoder failure is a corrupt image)
    return False, f"corrupt or unreadable image ({type(e).__name__}: {e})"
  try:
    wanted = "JPEG" if options.encoding == "jpeg" else "PNG"
    if not options.canvas_size and not options.crop_fov and source_format == wanted:
      with open(path, "rb") as f:  # already stored as wanted: keep the original bytes (no re-encoding loss)
        return True, f.read()
    array = np.asarray(image, np.uint8)
    if options.crop_fov:
      array = imaging.crop_fov(array)
    return True, encode_array(array, options)
  except Exception as e:  # noqa: BLE001
    return False, f"could not process image ({type(e).__name__}: {e})"


def read_grey(path: str) -> np.ndarray:
  """uint8 (H, W) of a verified image file (raises on corrupt/truncated files)."""
  image, _ = imaging.open_verified(path, channels=1)
  return np.asarray(image, np.uint8)


def process_grey_image(path: str, options: ImageOptions) -> tuple[bool, bytes | str]:
  """(True, encoded grey (S, S, 1) image) or (False, reason): :func:`process_image` for grey modalities.

  No field-of-view crop: it is defined for fundus photographs, not B-scans. Always re-encoded (the
  stored image is single-channel whatever the file holds).
  """
  try:
    array = read_grey(path)
  except Exception as e:  # noqa: BLE001  (any decoder failure is a corrupt image)
    return False, f"corrupt or unreadable image ({type(e).__name__}: {e})"
  try:
    return True, encode_array(array[..., None], options)
  except Exception as e:  # noqa: BLE001
    return False, f"could not process image ({type(e).__name__}: {e})"

"""Evaluation figures as PNG files, drawn with PIL only (matplotlib is not a dependency).

* ``save_confusion_matrix_png`` — cells coloured by the row-normalised fraction, with counts and %.
* ``save_roc_png`` — one-vs-rest ROC curve per class, chance diagonal, legend with AUROCs.
* ``heatmap_overlay`` — a jet-coloured attention/CAM map blended over an RGB image.
* ``heatmap_figure`` / ``save_heatmap_png`` — the image and the map over it side by side, at the
  image's resolution, with a colour bar and a title.
* ``save_png`` — any uint8/bool/[0, 1]-float array.

Every writer creates the parent directories and writes atomically through ``jaxretina.fileio``
(a local temporary file renamed over the target, or one object upload for ``gs://`` paths), so a
reader never sees a half-written PNG; local files get the usual permissions (0666 minus the umask).
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jaxretina import fileio
from jaxretina.evaluators import metrics as metrics_lib

# Distinct line colours for per-class curves (tab10-like).
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


# ----------------------------------------------------------------------------------------------
# Writing


def _save_image_atomic(image: Image.Image, path: str | os.PathLike) -> str:
  encoded = io.BytesIO()
  image.save(encoded, format="PNG")
  return fileio.write_bytes(path, encoded.getvalue())


def save_png(array, path: str | os.PathLike) -> str:
  """Writes ``array`` (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) as a PNG; returns the path.

  dtype uint8 is written as is, bool as 0/255, floats must lie in [0, 1] and are scaled to 0..255.
  """
  arr = np.asarray(array)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or 0 in arr.shape:
    raise ValueError(f"save_png: expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {arr.shape}")
  if arr.dtype == bool:
    arr = arr.astype(np.uint8) * 255
  elif np.issubdtype(arr.dtype, np.floating):
    if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
      raise ValueError(f"save_png: expected float values in [0, 1], got range "
                       f"[{np.nanmin(arr)}, {np.nanmax(arr)}] (non-finite: {int(np.sum(~np.isfinite(arr)))})")
    arr = np.round(arr * 255.0).astype(np.uint8)
  elif arr.dtype != np.uint8:
    raise ValueError(f"save_png: expected dtype uint8, bool or float in [0, 1], got {arr.dtype}")
  return _save_image_atomic(Image.fromarray(arr), path)


# ----------------------------------------------------------------------------------------------
# Colour and resizing helpers


def jet_colormap(values: np.ndarray) -> np.ndarray:
  """(...,) values in [0, 1] → (..., 3) float RGB in [0, 1]: blue → cyan → yellow → red (jet)."""
  v = np.clip(np.asarray(values, np.float64), 0.0, 1.0)[..., None]
  centres = np.array([3.0, 2.0, 1.0])  # red, green, blue peaks of the piecewise-linear jet
  return np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)


def _resize_axis_weights(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  # F.interpolate(bilinear, align_corners=False): half-pixel centres, negative sources clamped to 0.
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  src = np.maximum(src, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  return lo, hi, src - lo


def resize_bilinear(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """(..., h, w) → (..., H, W), numpy twin of ``cam.resize_maps`` (align_corners=False)."""
  maps = np.asarray(maps, np.float64)
  y0, y1, wy = _resize_axis_weights(size[0], maps.shape[-2])
  x0, x1, wx = _resize_axis_weights(size[1], maps.shape[-1])
  rows = maps[..., y0, :] * (1.0 - wy)[:, None] + maps[..., y1, :] * wy[:, None]
  return rows[..., x0] * (1.0 - wx) + rows[..., x1] * wx


def _min_max(heat: np.ndarray) -> np.ndarray:
  lo, hi = float(heat.min()), float(heat.max())
  return np.zeros_like(heat) if hi - lo <= 0.0 else (heat - lo) / (hi - lo)


def _checked_heat(heat, where: str) -> np.ndarray:
  """A finite, non-empty (h, w) heat map as float64; errors name the caller."""
  heat = np.asarray(heat, np.float64)
  if heat.ndim != 2 or 0 in heat.shape:
    raise ValueError(f"{where}: expected a (h, w) heat map, got shape {heat.shape}")
  if not np.all(np.isfinite(heat)):
    raise ValueError(f"{where}: expected a finite heat map, got NaN/Inf values")
  return heat


def heatmap_overlay(image_uint8, heat, alpha: float = 0.5) -> np.ndarray:
  """Blends a jet-coloured ``heat`` (h, w) over ``image_uint8`` (H, W, 3); returns (H, W, 3) uint8.

  ``heat`` is min–max normalised (a flat map becomes all-blue) and bilinearly resized to the image
  (align_corners=False, as the attention maps are upsampled upstream).
  """
  image = np.asarray(image_uint8)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"heatmap_overlay: expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
  heat = _checked_heat(heat, "heatmap_overlay")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"heatmap_overlay: expected alpha in [0, 1], got {alpha}")
  heat = resize_bilinear(_min_max(heat), image.shape[:2])
  colour = jet_colormap(heat) * 255.0
  blended = (1.0 - alpha) * image.astype(np.float64) + alpha * colour
  return np.clip(np.round(blended), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Heat-map figure

# Panels are drawn at the image's own resolution, but never smaller than this on their longer side (a
# 64 px input is unreadable at 64 px) nor larger (a 4000 px photograph would make a 50 MB PNG).
HEATMAP_MIN_SIDE = 320
HEATMAP_MAX_SIDE = 1024


def _display_scale(height: int, width: int, min_side: int, max_side: int) -> float:
  longer = max(height, width)
  if longer < min_side:
    return min_side / longer
  if longer > max_side:
    return max_side / longer
  return 1.0


def _heat_on_canvas(heat: np.ndarray, box: tuple[float, float, float, float], shape: tuple[int, int]):
  """``heat`` (h, w) resized onto the (top, left, height, width) ``box`` of a ``shape`` canvas.

  Returns (values, covered): float (H, W) and the bool mask of the canvas pixels the box covers.
  """
  top, left, box_h, box_w = box
  y0, x0 = int(round(top)), int(round(left))
  y1, x1 = int(round(top + box_h)), int(round(left + box_w))
  values = np.zeros(shape, np.float64)
  covered = np.zeros(shape, bool)
  if y1 <= y0 or x1 <= x0:
    return values, covered
  resized = resize_bilinear(heat, (y1 - y0, x1 - x0))
  cy0, cx0 = max(y0, 0), max(x0, 0)
  cy1, cx1 = min(y1, shape[0]), min(x1, shape[1])
  if cy1 > cy0 and cx1 > cx0:
    values[cy0:cy1, cx0:cx1] = resized[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    covered[cy0:cy1, cx0:cx1] = True
  return values, covered


def heatmap_figure(image_uint8, heat, *, box: tuple[float, float, float, float] | None = None, title: str = "",
                   alpha: float = 0.5, min_side: int = HEATMAP_MIN_SIDE,
                   max_side: int = HEATMAP_MAX_SIDE) -> np.ndarray:
  """The image and the heat map over it side by side, with a colour bar; (H', W', 3) uint8.

  Args:
    image_uint8: (H, W, 3) or (H, W, 1) uint8, at its own resolution (the input file, the stored record).
    heat: (h, w) map over the model's input; min–max normalised, so the colour bar reads relative
      attention from low (blue) to high (red). A flat map is drawn all low, captioned "flat map".
    box: (top, left, height, width) in image pixels of the region the model's input showed (default:
      the whole image). It may reach past the image where the input was padded, and be smaller where
      the input was a crop; image pixels outside it are shown uncoloured (the model did not see them).
    title: a line above the panels (e.g. the true and the predicted class).
    alpha: weight of the colour over the image.
    min_side, max_side: the panels' longer side is the image's, raised to ``min_side`` or lowered to
      ``max_side``.
  """
  image = np.asarray(image_uint8)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
    raise ValueError(f"heatmap_figure: expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
  heat = _checked_heat(heat, "heatmap_figure")
  height, width = image.shape[:2]
  box = (0.0, 0.0, float(height), float(width)) if box is None else tuple(float(v) for v in box)
  scale = _display_scale(height, width, min_side, max_side)
  shown_h, shown_w = max(int(round(height * scale)), 1), max(int(round(width * scale)), 1)
  resample = Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS
  shown = np.asarray(Image.fromarray(image).resize((shown_w, shown_h), resample), np.uint8)
  # A map flat to float precision carries no location: drawn as all-low and said so, rather than
  # stretching rounding noise over the colour bar.
  flat = float(heat.max() - heat.min()) <= 1e-6 * max(float(np.abs(heat).max()), 1e-30)
  normalised = np.zeros_like(heat) if flat else _min_max(heat)
  values, covered = _heat_on_canvas(normalised, tuple(v * scale for v in box), (shown_h, shown_w))
  colour = jet_colormap(values) * 255.0
  blended = np.where(covered[..., None], (1.0 - alpha) * shown + alpha * colour, shown)
  overlay = np.clip(np.round(blended), 0, 255).astype(np.uint8)

  font = _font(max(14, shown_h // 28))
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  line_h = _text_size(probe, "Ag", font)[1]
  margin, gap, bar_w = 12, 12, max(16, shown_w // 24)
  tick_w = max(_text_size(probe, t, font)[0] for t in ("high", "low"))
  title_h = line_h + 12 if title else 0
  top = margin + title_h + line_h + 8  # title, then the panel captions
  fig_w = margin + shown_w + gap + shown_w + gap + bar_w + 6 + tick_w + margin
  if title:
    fig_w = max(fig_w, _text_size(probe, title, font)[0] + 2 * margin)
  fig_h = top + shown_h + margin
  fig = Image.new("RGB", (fig_w, fig_h), (255, 255, 255))
  draw = ImageDraw.Draw(fig)
  if title:
    draw.text((fig_w // 2, margin), title, fill=(0, 0, 0), font=font, anchor="mt")
  left_x, right_x = margin, margin + shown_w + gap
  for x, caption in ((left_x, "input"), (right_x, "attention (flat map)" if flat else "attention")):
    draw.text((x + shown_w // 2, top - 6), caption, fill=(0, 0, 0), font=font, anchor="mb")
  fig.paste(Image.fromarray(shown), (left_x, top))
  fig.paste(Image.fromarray(overlay), (right_x, top))
  bar_x = right_x + shown_w + gap
  ramp = jet_colormap(np.linspace(1.0, 0.0, shown_h))  # high at the top
  bar = np.repeat(np.round(ramp * 255.0).astype(np.uint8)[:, None, :], bar_w, axis=1)
  fig.paste(Image.fromarray(bar), (bar_x, top))
  draw.rectangle([bar_x - 1, top - 1, bar_x + bar_w, top + shown_h], outline=(0, 0, 0))
  draw.text((bar_x + bar_w + 6, top), "high", fill=(0, 0, 0), font=font, anchor="lt")
  draw.text((bar_x + bar_w + 6, top + shown_h), "low", fill=(0, 0, 0), font=font, anchor="lb")
  return np.asarray(fig, np.uint8)


def save_heatmap_png(image_uint8, heat, path: str | os.PathLike, **kwargs) -> str:
  """``heatmap_figure(image_uint8, heat, **kwargs)`` written to ``path``; returns the path."""
  return save_png(heatmap_figure(image_uint8, heat, **kwargs), path)


# ----------------------------------------------------------------------------------------------
# Figures


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError):  # Pillow built without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  return right - left, bottom - top


def _centred_text(draw, xy, text, font, fill=(0, 0, 0)):
  draw.text(xy, text, fill=fill, font=font, anchor="mm")


def _paste_vertical_text(canvas: Image.Image, centre: tuple[int, int], text: str, font) -> None:
  probe = ImageDraw.Draw(canvas)
  w, h = _text_size(probe, text, font)
  strip = Image.new("RGBA", (w + 8, h + 8), (255, 255, 255, 0))
  ImageDraw.Draw(strip).text((4, 4), text, fill=(0, 0, 0, 255), font=font, anchor="lt")
  strip = strip.rotate(90, expand=True)
  canvas.paste(strip, (centre[0] - strip.width // 2, centre[1] - strip.height // 2), strip)


def _blues(fraction: float) -> tuple[int, int, int]:
  """White (0) → dark blue (1)."""
  low, high = np.array([247.0, 251.0, 255.0]), np.array([8.0, 48.0, 107.0])
  rgb = low + (high - low) * float(np.clip(fraction, 0.0, 1.0))
  return tuple(int(round(c)) for c in rgb)


def _class_names(names: Sequence[str] | None, k: int) -> list[str]:
  if names is None:
    return [str(i) for i in range(k)]
  if len(names) != k:
    raise ValueError(f"class_names: expected {k} names, got {len(names)}")
  return [str(n) for n in names]


def save_confusion_matrix_png(cm, class_names: Sequence[str] | None, path: str | os.PathLike, *,
                              title: str = "Confusion matrix", cell: int = 84) -> str:
  """Draws ``cm`` (K, K) counts (rows = true class) to ``path``; returns the path.

  Each cell shows its count and its share of the true class (row-normalised %); colour encodes
  that share, so classes of different sizes are comparable.
  """
  cm = np.asarray(cm)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
    raise ValueError(f"save_confusion_matrix_png: expected a square (K, K) matrix, got shape {cm.shape}")
  if np.any(cm < 0) or not np.all(np.isfinite(cm)):
    raise ValueError("save_confusion_matrix_png: expected non-negative finite counts")
  k = cm.shape[0]
  names = _class_names(class_names, k)
  row_sums = cm.sum(1, keepdims=True).astype(np.float64)
  frac = np.divide(cm, row_sums, out=np.zeros(cm.shape, np.float64), where=row_sums > 0)

  font, small, big = _font(14), _font(12), _font(16)
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  label_w = max(_text_size(probe, n, font)[0] for n in names) + 12
  # Column names wider than a cell are written vertically so neighbours cannot overlap.
  vertical_ticks = label_w - 12 > cell - 8
  tick_h = label_w if vertical_ticks else max(_text_size(probe, n, font)[1] for n in names) + 12
  left, top = 40 + label_w, 50
  bottom = 40 + tick_h + 12
  width, height = left + k * cell + 20, top + k * cell + bottom
  img = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(img)
  _centred_text(draw, (left + k * cell // 2, 22), title, big)

  for i in range(k):
    for j in range(k):
      x0, y0 = left + j * cell, top + i * cell
      colour = _blues(frac[i, j])
      draw.rectangle([x0, y0, x0 + cell, y0 + cell], fill=colour, outline=(90, 90, 90))
      ink = (255, 255, 255) if frac[i, j] > 0.5 else (0, 0, 0)
      count = f"{int(cm[i, j])}" if float(cm[i, j]).is_integer() else f"{float(cm[i, j]):.2f}"
      _centred_text(draw, (x0 + cell // 2, y0 + cell // 2 - 9), count, font, ink)
      pct = f"{100.0 * frac[i, j]:.1f}%" if row_sums[i, 0] > 0 else "-"
      _centred_text(draw, (x0 + cell // 2, y0 + cell // 2 + 10), pct, small, ink)
    # Row (true class) and column (predicted class) tick labels.
    draw.text((left - 6, top + i * cell + cell // 2), names[i], fill=(0, 0, 0), font=font, anchor="rm")
    if vertical_ticks:
      name_w = _text_size(probe, names[i], font)[0]
      _paste_vertical_text(img, (left + i * cell + cell // 2, top + k * cell + 8 + name_w // 2 + 4), names[i], font)
    else:
      _centred_text(draw, (left + i * cell + cell // 2, top + k * cell + 14), names[i], font)

  _centred_text(draw, (left + k * cell // 2, height - 16), "Predicted class", font)
  _paste_vertical_text(img, (16, top + k * cell // 2), "True class", font)
  return _save_image_atomic(img, path)


def roc_curve(is_positive, scores) -> tuple[np.ndarray, np.ndarray]:
  """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1); sklearn ``roc_curve`` points
  with ``drop_intermediate=False``. Requires both target values present."""
  is_positive = np.asarray(is_positive, bool)
  scores = np.asarray(scores, np.float64)
  order = np.argsort(-scores, kind="stable")
  s, y = scores[order], is_positive[order]
  last_of_tie = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
  tps = np.cumsum(y)[last_of_tie]
  fps = (last_of_tie + 1) - tps
  tpr = np.r_[0.0, tps / max(int(y.sum()), 1)]
  fpr = np.r_[0.0, fps / max(int((~y).sum()), 1)]
  return fpr, tpr


def save_roc_png(labels, probs, class_names: Sequence[str] | None, path: str | os.PathLike, *,
                 title: str = "ROC (one-vs-rest)", size: int = 420) -> str:
  """Per-class one-vs-rest ROC curves of ``probs`` (N, K) against ``labels`` (N,); returns the path.

  The legend gives each class's AUROC; a class without both positives and negatives has no curve and
  is listed as "AUC undefined".
  """
  labels, probs, k = metrics_lib._validate(labels, probs, None)
  names = _class_names(class_names, k)
  font, big = _font(13), _font(16)
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  legend_lines = []
  for c in range(k):
    auc = metrics_lib.binary_auroc(labels == c, probs[:, c])
    legend_lines.append(f"{names[c]} (AUC={auc:.3f})" if not np.isnan(auc) else f"{names[c]} (AUC undefined)")
  legend_w = max(_text_size(probe, t, font)[0] for t in legend_lines) + 40
  left, top, right_pad, bottom = 60, 44, 24 + legend_w, 56
  width, height = left + size + right_pad, top + size + bottom
  img = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(img)

  def to_px(fpr, tpr):
    return left + fpr * size, top + (1.0 - tpr) * size

  for t in np.linspace(0.0, 1.0, 6):  # grid and tick labels
    x, y = to_px(t, t)
    draw.line([x, top, x, top + size], fill=(230, 230, 230))
    draw.line([left, y, left + size, y], fill=(230, 230, 230))
    _centred_text(draw, (x, top + size + 12), f"{t:.1f}", font)
    draw.text((left - 6, y), f"{t:.1f}", fill=(0, 0, 0), font=font, anchor="rm")
  draw.rectangle([left, top, left + size, top + size], outline=(0, 0, 0))
  for t in np.linspace(0.0, 1.0, 41)[::2]:  # dashed chance diagonal
    x0, y0 = to_px(t, t)
    x1, y1 = to_px(min(t + 0.025, 1.0), min(t + 0.025, 1.0))
    draw.line([x0, y0, x1, y1], fill=(128, 128, 128), width=1)

  for c in range(k):
    colour = _PALETTE[c % len(_PALETTE)]
    is_positive = labels == c
    if is_positive.all() or not is_positive.any():
      continue
    fpr, tpr = roc_curve(is_positive, probs[:, c])
    draw.line([to_px(f, t) for f, t in zip(fpr, tpr)], fill=colour, width=2)

  lx, ly = left + size + 16, top + 8
  for c, text in enumerate(legend_lines):
    colour = _PALETTE[c % len(_PALETTE)]
    draw.line([lx, ly + 8 + c * 20, lx + 18, ly + 8 + c * 20], fill=colour, width=3)
    draw.text((lx + 24, ly + 8 + c * 20), text, fill=(0, 0, 0), font=font, anchor="lm")

  _centred_text(draw, (left + size // 2, 20), title, big)
  _centred_text(draw, (left + size // 2, height - 18), "False positive rate (1 - specificity)", font)
  _paste_vertical_text(img, (14, top + size // 2), "True positive rate (sensitivity)", font)
  return _save_image_atomic(img, path)

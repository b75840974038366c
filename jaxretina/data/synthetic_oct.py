"""Deterministic paired synthetic colour fundus + OCT B-scan eyes with MMC-AMD's four classes.

The two-modality counterpart of ``jaxretina.data.synthetic`` (CRD-Net's MMC-AMD setting,
docs/systems.md#crd-net, docs/datasets.md#mmc-amd): every example is one eye, a pure function of
``(seed, index, image_size)``, with

* ``image``: a colour fundus photograph drawn like ``synthetic`` draws its retinas (field of view,
  orange-red retina with shading and texture, optic disc and cup, branching vessel tree, darker
  macula), plus the class lesions near the macula;
* ``oct``: a grayscale horizontal OCT B-scan through the fovea: speckled layered retina (bright
  RNFL — thicker on the nasal side, the side of the optic disc in the fundus —, darker nuclear
  layers, bright ellipsoid zone, brightest RPE band over Bruch's membrane, textured choroid fading
  with depth), a foveal pit, retinal vessel shadows, per-A-scan brightness variation.

Classes (``CLASS_NAMES``, MMC-AMD's order ``h d p w`` = ``CLASS_LETTERS``) and what is drawn:

============  ==============================================  ==================================================
class         fundus                                          OCT
============  ==============================================  ==================================================
normal        nothing (sometimes 1–3 tiny age-normal drusen)  smooth layers
dry AMD       yellow drusen around the macula                 small smooth dome-shaped RPE elevations (drusen)
                                                              of medium reflectivity
PCV           orange-red polyp nodules, a (large) subretinal  a tall, sharp-peaked PED with steep sides and a
              haemorrhage, a faint orange PED dome            dark lumen, a hyperreflective polyp ring under its
                                                              roof, subretinal fluid, often a shallow
                                                              "double-layer" elevation beside it
wet AMD       subretinal haemorrhage, grey-green CNV          hyporeflective subretinal fluid and intraretinal
              membrane, a ring of hard exudates, sometimes    cysts, an irregular hyperreflective CNV lesion above
              drusen                                          a low, irregular fibrovascular RPE elevation
============  ==============================================  ==================================================

The lesions of both modalities sit at the same place: a lesion centre offset horizontally from the
fovea (in fundus field-of-view units) maps to the same side of the B-scan (the scan's x axis is the
fundus image's x axis; the scan spans ``_SCAN_WIDTH`` field-of-view units around the fovea).

**Signal in one or both modalities.** For a diseased eye a per-example draw decides how strongly
each modality shows the disease: with probability ``WEAK_FUNDUS_PROBABILITY`` the fundus lesions are
weak (strength uniform in [0, ``WEAK_STRENGTH_MAX``]: few, small, faint, possibly none), with
probability ``WEAK_OCT_PROBABILITY`` the OCT lesions are, otherwise both are at full strength; never
both weak. So each single-modality classifier beats chance but cannot be perfect, and fusing the
two does better. The strengths are returned (``fundus_signal``, ``oct_signal``) for analysis; the
TFDS builder does not store them.

Variation per example: eye side, fundus rotation and geometry (as in ``synthetic``), lesion place,
size and count; OCT depth, tilt, curvature, retinal/choroidal thickness, layer thicknesses, foveal
pit width and depth, speckle strength, brightness and contrast.

Class labels are drawn per block of four consecutive indices as a random permutation of the four
classes, so every split is class-balanced (exactly, when its size is a multiple of 4).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

# The fundus drawing helpers are shared with the single-modality generator on purpose: both
# datasets show the same kind of retina.
from jaxretina.data.synthetic import (_ARTERY_RGB, _BACKGROUND, _CUP_RGB, _DISC_RGB, _DRUSEN_RGB, _EXUDATE_RGB,
                                      _HAEMORRHAGE_RGB, _VEIN_RGB, _Canvas, _rotate, _scatter, _vessel_tree,
                                      shade_retina)

DATASET_KEY = "synthetic_fundus_oct"

# MMC-AMD's classes in its index order (h=0, d=1, p=2, w=3; docs/datasets.md#mmc-amd), spelled out.
CLASS_NAMES: tuple[str, ...] = (
    "normal",
    "dry age related macular degeneration",
    "polypoidal choroidal vasculopathy",
    "wet age related macular degeneration",
)
# MMC-AMD's one-letter class codes (second token of its image ids, e.g. ``f-w-1544817``).
CLASS_LETTERS: tuple[str, ...] = ("h", "d", "p", "w")

WEAK_FUNDUS_PROBABILITY = 0.25
WEAK_OCT_PROBABILITY = 0.25
WEAK_STRENGTH_MAX = 0.3

_NORMAL, _DRY, _PCV, _WET = range(4)
_SCAN_WIDTH = 0.62  # field-of-view units covered by the B-scan (about a 6 mm macular scan)

_CNV_RGB = np.array([0.45, 0.50, 0.37], np.float32)  # grey-green membrane
_POLYP_RGB = np.array([1.0, 0.42, 0.16], np.float32)  # orange-red nodules
_PED_RGB = np.array([0.98, 0.58, 0.30], np.float32)  # orange dome of a pigment epithelial detachment


def class_label(seed: int, index: int) -> int:
  """The class of example `index`: block ``index // 4`` holds a seeded permutation of the 4 classes."""
  block_rng = np.random.default_rng((int(seed), int(index) // len(CLASS_NAMES), 0x5EED))
  return int(block_rng.permutation(len(CLASS_NAMES))[int(index) % len(CLASS_NAMES)])


def _signal_strengths(rng, label: int) -> tuple[float, float]:
  """(fundus, OCT) lesion strengths in [0, 1]; at most one modality is weak (module docstring)."""
  mode, weak = rng.uniform(), rng.uniform(0.0, WEAK_STRENGTH_MAX)
  if label == _NORMAL:
    return 1.0, 1.0
  if mode < WEAK_FUNDUS_PROBABILITY:
    return weak, 1.0
  if mode < WEAK_FUNDUS_PROBABILITY + WEAK_OCT_PROBABILITY:
    return 1.0, weak
  return 1.0, 1.0


def _count(rng, low: int, high: int, strength: float) -> int:
  """A lesion count in [low, high) scaled by strength (a weak modality may show none)."""
  return int(round(rng.integers(low, high) * strength))


# ---------------------------------------------------------------------------------------------
# Colour fundus
# ---------------------------------------------------------------------------------------------
def _render_fundus(rng, size: int, label: int, strength: float, right_eye: bool,
                   lesion_offset: np.ndarray) -> np.ndarray:
  """uint8 (S, S, 3) fundus photograph; lesions centred at macula + lesion_offset (FOV units)."""
  center = np.array([size / 2, size / 2], np.float32) + rng.normal(0, 0.015 * size, 2).astype(np.float32)
  canvas = _Canvas(size, radius=0.47 * size * rng.uniform(0.94, 1.0), center=center)
  nasal_sign = 1.0 if right_eye else -1.0
  rotation = rng.uniform(-0.2, 0.2)
  disc = _rotate(np.array([nasal_sign * rng.uniform(0.33, 0.42), rng.uniform(-0.07, 0.07)], np.float32), rotation)
  macula = _rotate(np.array([-nasal_sign * rng.uniform(0.02, 0.08), rng.uniform(-0.05, 0.05)], np.float32), rotation)
  lesion = macula + _rotate(lesion_offset.astype(np.float32), rotation)
  disc_radius = rng.uniform(0.115, 0.135)
  cup_to_disc = rng.uniform(0.2, 0.45)

  base, r2 = shade_retina(canvas, rng, center, macula, disc, disc_radius)

  mask, draw = canvas.new_mask()
  canvas.ellipse(draw, disc, disc_radius, disc_radius * rng.uniform(1.0, 1.12))
  canvas.blend(mask, _DISC_RGB, opacity=0.92, blur=0.012)
  mask, draw = canvas.new_mask()
  cup = disc + _rotate(np.array([-nasal_sign * 0.12 * disc_radius, 0.0], np.float32), rotation)
  canvas.ellipse(draw, cup, cup_to_disc * disc_radius)
  canvas.blend(mask, _CUP_RGB, opacity=0.95, blur=0.006)

  arteries, veins = _vessel_tree(rng, disc, nasal_sign, rotation)
  for vessels, rgb in ((arteries, _ARTERY_RGB), (veins, _VEIN_RGB)):
    mask, draw = canvas.new_mask()
    for points, width in vessels:
      canvas.polyline(draw, points, width)
    canvas.blend(mask, rgb * base[0] / 0.8, opacity=0.85)

  def dots(points, radius_range, rgb, opacity, blur=0.0):
    if len(points) == 0:
      return
    mask, draw = canvas.new_mask()
    for p in points:
      canvas.ellipse(draw, p, rng.uniform(*radius_range))
    canvas.blend(mask, rgb, opacity=opacity, blur=blur)

  def blobs(centre, n, spread, radius_range, rgb, opacity, blur):
    # An irregular patch: a few overlapping ellipses around `centre`.
    if n == 0:
      return
    mask, draw = canvas.new_mask()
    for p in _scatter(rng, n, centre, spread):
      canvas.ellipse(draw, p, rng.uniform(*radius_range), rng.uniform(*radius_range))
    canvas.blend(mask, rgb, opacity=opacity, blur=blur)

  fade = 0.45 + 0.55 * strength  # weak lesions are also fainter
  if label == _NORMAL:
    if rng.uniform() < 0.15:  # a few tiny drusen are normal with age: normal vs weak dry is ambiguous
      dots(_scatter(rng, int(rng.integers(1, 4)), macula, 0.12), (0.010, 0.016), _DRUSEN_RGB, 0.7)
  elif label == _DRY:
    n = _count(rng, 10, 26, strength)
    dots(_scatter(rng, n, lesion, 0.12), (0.014, 0.034), _DRUSEN_RGB, 0.85 * fade, blur=0.006)
  elif label == _WET:
    if rng.uniform() < 0.3:
      dots(_scatter(rng, _count(rng, 4, 10, strength), lesion, 0.14), (0.012, 0.024), _DRUSEN_RGB, 0.8 * fade)
    blobs(lesion, _count(rng, 1, 3, strength), 0.03, (0.05, 0.08), _CNV_RGB, 0.65 * fade, blur=0.02)
    blobs(lesion + rng.normal(0, 0.03, 2), _count(rng, 2, 5, strength), 0.05, (0.03, 0.07), _HAEMORRHAGE_RGB,
          0.9 * fade, blur=0.008)
    ring = rng.uniform(0, 2 * np.pi, _count(rng, 5, 13, strength))
    radius = rng.uniform(0.09, 0.15, len(ring))
    dots(lesion + np.stack([radius * np.cos(ring), radius * np.sin(ring)], 1), (0.010, 0.018), _EXUDATE_RGB,
         0.95 * fade)
  else:  # PCV
    blobs(lesion, int(rng.uniform() < strength), 0.01, (0.05, 0.08), _PED_RGB, 0.45 * fade, blur=0.02)
    bleed = lesion + rng.normal(0, 0.06, 2)
    blobs(bleed, _count(rng, 2, 5, strength), 0.07, (0.04, 0.11), _HAEMORRHAGE_RGB, 0.9 * fade, blur=0.008)
    dots(_scatter(rng, _count(rng, 1, 5, strength), lesion, 0.04), (0.018, 0.034), _POLYP_RGB, 0.95 * fade,
         blur=0.004)

  fov = np.clip((1.0 - np.sqrt(r2)) * canvas.radius * 0.8 + 0.5, 0.0, 1.0)[..., None]
  rgb = canvas.rgb * fov + _BACKGROUND * (1.0 - fov)
  rgb = np.clip(rgb, 0.0, 1.0) ** rng.uniform(0.9, 1.1)
  rgb = rgb + rng.normal(0, 0.012, rgb.shape).astype(np.float32)
  return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# OCT B-scan
# ---------------------------------------------------------------------------------------------
# Retinal layers from the ILM down to the photoreceptor outer segments: (reflectivity, thickness
# as a fraction of the retinal thickness away from the fovea, how much of it the foveal pit removes
# (negative: the layer thickens at the fovea)).
_INNER_LAYERS = (
    ("rnfl", 0.85, 0.13, 1.0),
    ("gcl_ipl", 0.50, 0.25, 0.97),
    ("inl", 0.20, 0.12, 0.9),
    ("opl", 0.55, 0.08, 0.7),
    ("onl", 0.11, 0.27, -0.45),
    ("elm_is", 0.30, 0.06, 0.0),
    ("ez", 0.80, 0.035, 0.0),
    ("os_iz", 0.34, 0.045, 0.0),
)
_VITREOUS = 0.03
_FLUID = 0.03
_RPE = 0.97
_BRUCH = 0.72
_CHOROID = 0.45
_SCLERA = 0.15


def _ramp(y: np.ndarray, top: np.ndarray) -> np.ndarray:
  """0 above the boundary `top` (per column), 1 below, linear over one pixel (anti-aliasing)."""
  return np.clip(y - top + 0.5, 0.0, 1.0)


def _ellipse_mask(xs, ys, cx, cy, rx, ry, wobble=None):
  """Soft (about 1 px edge) mask of an ellipse; `wobble` (k, amplitude, phase) rows make it irregular."""
  dx, dy = (xs - cx) / rx, (ys - cy) / ry
  r = np.sqrt(dx * dx + dy * dy)
  edge = 1.0
  if wobble is not None:
    theta = np.arctan2(dy, dx)
    edge = 1.0 + sum(a * np.cos(k * theta + p) for k, a, p in wobble)
  return np.clip((edge - r) * min(rx, ry) + 0.5, 0.0, 1.0)


def _render_oct(rng, size: int, label: int, strength: float, right_eye: bool, lesion_dx: float) -> np.ndarray:
  """uint8 (S, S, 1) B-scan; pixel units throughout (columns x, rows y, y grows with depth)."""
  s = float(size)
  x = (np.arange(size, dtype=np.float32) + 0.5)
  y = x[:, None]
  fovea = s * (0.5 + rng.normal(0, 0.035))
  lesion_x = fovea + s * lesion_dx / _SCAN_WIDTH
  xr = (x - fovea) / s
  nasal = xr * (1.0 if right_eye else -1.0)  # > 0 on the side of the optic disc

  # Bruch's membrane: a tilted bowl (the eye is round; the scan is rarely level).
  thickness = s * rng.uniform(0.24, 0.32)
  bruch = s * rng.uniform(0.6, 0.72) + s * rng.uniform(-0.12, 0.12) * xr - s * rng.uniform(0.0, 0.35) * xr ** 2
  pit = np.exp(-xr ** 2 / (2 * rng.uniform(0.05, 0.085) ** 2)) * rng.uniform(0.85, 1.0)

  # Class lesions as column profiles (pixels): sub-RPE elevation and subretinal fluid height.
  elevation = np.zeros(size, np.float32)
  sub_rpe = 0.45  # reflectivity under the elevated RPE
  fluid = np.zeros(size, np.float32)
  d = (x - lesion_x) / s
  overlays = []  # (mask builder, reflectivity) drawn after the layers
  if label == _DRY:
    for _ in range(_count(rng, 2, 7, strength)):
      at, half = rng.normal(0.0, 0.09), rng.uniform(0.03, 0.06)
      height = rng.uniform(0.025, 0.055) * (0.4 + 0.6 * strength)
      elevation += s * height * np.sqrt(np.clip(1.0 - ((d - at) / half) ** 2, 0.0, 1.0)) ** 1.5
  elif label == _PCV:
    half, height = rng.uniform(0.05, 0.08), strength * rng.uniform(0.1, 0.16)
    r = np.clip(np.abs(d) / half, 0.0, 1.0)
    # Near-vertical sides (the square root) and a peaked rather than flat top (the linear factor).
    elevation += s * height * np.sqrt(1.0 - r ** 2) * (1.0 - 0.45 * r)
    sub_rpe = 0.10  # a hyporeflective (serous/haemorrhagic) PED
    if rng.uniform() < 0.7:  # "double-layer sign": a shallow elevation beside the PED
      side = rng.choice((-1.0, 1.0))
      elevation += s * strength * rng.uniform(0.012, 0.025) * np.exp(-((d - side * 2.2 * half) / 0.06) ** 2)
    centre = rng.normal(0, 0.04)
    fluid += s * strength * rng.uniform(0.03, 0.06) * np.exp(-((d - centre) / rng.uniform(0.07, 0.12)) ** 2)
  elif label == _WET:
    bumps = sum(rng.uniform(0.4, 1.0) * np.exp(-((d - rng.normal(0, 0.05)) / rng.uniform(0.03, 0.07)) ** 2)
                for _ in range(3))
    elevation += s * strength * rng.uniform(0.02, 0.04) * bumps / 1.6
    sub_rpe = 0.55
    centre, width = rng.normal(0, 0.03), rng.uniform(0.08, 0.14)
    fluid += s * strength * rng.uniform(0.035, 0.08) * np.exp(-((d - centre) / width) ** 2)

  # Layer tops from Bruch's membrane upwards.
  tops = {"bruch": bruch}
  tops["sub_rpe"] = bruch - elevation
  rpe_thickness = max(1.0, 0.055 * thickness)
  tops["rpe"] = tops["sub_rpe"] - rpe_thickness
  tops["fluid"] = tops["rpe"] - fluid
  above = tops["fluid"]
  layer_tops = []
  jitter = rng.uniform(0.85, 1.15, len(_INNER_LAYERS))
  for (name, refl, fraction, pit_depth), j in zip(reversed(_INNER_LAYERS), jitter):
    layer_thickness = thickness * fraction * j * (1.0 - pit_depth * pit)
    if name == "rnfl":  # thicker towards the optic disc, as in real eyes
      layer_thickness = layer_thickness * np.clip(1.0 + 2.5 * nasal, 0.4, 2.2)
    above = above - layer_thickness
    layer_tops.append((name, refl, above))
  layer_tops.reverse()
  choroid_bottom = bruch + rpe_thickness * 0.6 + s * rng.uniform(0.1, 0.16)

  # Reflectivity: a sum of steps, one per boundary (top to bottom).
  stack = [(_VITREOUS, None)] + [(refl, top) for _, refl, top in layer_tops]
  stack += [(_FLUID, tops["fluid"]), (_RPE, tops["rpe"]), (sub_rpe, tops["sub_rpe"]), (_BRUCH, bruch),
            (_CHOROID, bruch + rpe_thickness * 0.6), (_SCLERA, choroid_bottom)]
  refl = np.full((size, size), stack[0][0], np.float32)
  for (previous, _), (value, top) in zip(stack[:-1], stack[1:]):
    refl += (value - previous) * _ramp(y, top[None, :])

  # Choroid: dark vessel lumens in a bright stroma, fading with depth.
  lumen = Image.fromarray(rng.normal(0, 1, (5, 9)).astype(np.float32), mode="F").resize((size, size),
                                                                                       Image.Resampling.BICUBIC)
  in_choroid = _ramp(y, (bruch + rpe_thickness)[None, :]) * (1.0 - _ramp(y, choroid_bottom[None, :]))
  refl *= 1.0 - in_choroid * 0.55 * np.clip(np.asarray(lumen, np.float32), 0.0, 1.5)
  below = np.clip(y - bruch[None, :], 0.0, None) / s
  refl *= np.exp(-below * rng.uniform(2.0, 4.0))

  xs, ys = np.meshgrid(x, x)
  top_of = {name: top for name, _, top in layer_tops}

  def depth_at(name, column):
    return top_of[name][int(np.clip(column, 0, size - 1))]

  if label == _PCV:
    # The polyp: a hyperreflective ring hanging under the PED roof.
    col = int(np.clip(lesion_x, 0, size - 1))
    height = elevation[col]
    if height > 2.0:
      cy = tops["sub_rpe"][col] + 0.3 * height
      rx, ry = max(1.0, 0.22 * height), max(1.0, 0.18 * height)
      ring = _ellipse_mask(xs, ys, lesion_x, cy, rx, ry) - _ellipse_mask(xs, ys, lesion_x, cy, 0.55 * rx, 0.5 * ry)
      overlays.append((ring, 0.8))
  elif label == _WET:
    # Irregular hyperreflective CNV above the RPE (subretinal hyperreflective material).
    if strength > 0.15:
      col = int(np.clip(lesion_x, 0, size - 1))
      wobble = [(k, rng.uniform(0.05, 0.2), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)]
      rx, ry = s * strength * rng.uniform(0.05, 0.08), max(1.0, s * strength * rng.uniform(0.025, 0.04))
      overlays.append((_ellipse_mask(xs, ys, lesion_x, tops["rpe"][col] - 0.6 * ry, rx, ry, wobble),
                       rng.uniform(0.7, 0.9)))
    # Intraretinal cysts in the inner nuclear and outer nuclear layers.
    for _ in range(_count(rng, 2, 7, strength)):
      cx = lesion_x + s * rng.normal(0, 0.07)
      layer = "inl" if rng.uniform() < 0.35 else "onl"
      upper = depth_at(layer, cx)
      lower = depth_at({"inl": "opl", "onl": "elm_is"}[layer], cx)
      ry = max(0.8, 0.45 * (lower - upper) * rng.uniform(0.6, 1.1))
      overlays.append((_ellipse_mask(xs, ys, cx, 0.5 * (upper + lower), ry * rng.uniform(1.0, 2.0), ry), _FLUID))

  # Retinal vessels: small bright dots in the inner retina casting a shadow downwards.
  for _ in range(int(rng.integers(2, 5))):
    cx = s * rng.uniform(0.05, 0.95)
    if abs(cx - fovea) < 0.12 * s:
      continue
    cy = depth_at("gcl_ipl", cx) + 0.5
    width = max(0.7, s * rng.uniform(0.006, 0.012))
    shadow = np.clip(1.0 - np.abs(xs - cx) / width, 0.0, 1.0) * _ramp(ys, cy + width)
    refl *= 1.0 - 0.55 * shadow
    overlays.append((_ellipse_mask(xs, ys, cx, cy, width, width), 0.75))

  for mask, value in overlays:
    refl = refl * (1.0 - mask) + value * mask

  # Speckle: multiplicative gamma noise, laterally correlated (the beam is wider than a pixel),
  # per-A-scan gain, then display gain/gamma and a little additive noise.
  shape = rng.uniform(4.0, 8.0)
  speckle = rng.gamma(shape, 1.0 / shape, (size, size)).astype(np.float32)
  speckle = 0.5 * (speckle + np.roll(speckle, 1, axis=1))
  gain = 1.0 + 0.08 * rng.standard_normal(size).astype(np.float32)
  image = refl * speckle * gain[None, :] * rng.uniform(0.85, 1.1)
  image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.85, 1.2)
  image = image + rng.normal(0, 0.02, image.shape).astype(np.float32)
  return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)[..., None]


def render_example(seed: int, index: int, image_size: int) -> dict:
  """Renders eye `index` of the paired fundus + OCT dataset with base seed `seed`.

  Args:
    seed: dataset seed (different splits use different seeds, so they are disjoint).
    index: example index; with `seed` it fixes every random choice.
    image_size: S, the side of both square images in pixels (>= 16).

  Returns:
    dict with ``image`` uint8 (S, S, 3) (colour fundus), ``oct`` uint8 (S, S, 1) (B-scan),
    ``label`` int (index into ``CLASS_NAMES``), ``id`` str, ``eye`` (``"left"``/``"right"``),
    ``dataset`` str, and ``fundus_signal`` / ``oct_signal`` floats in [0, 1] (lesion strength per
    modality; see the module docstring).
  """
  if int(image_size) < 16:
    raise ValueError(f"synthetic_oct.render_example: image_size must be >= 16 pixels, got {image_size}")
  if int(seed) < 0 or int(index) < 0:
    raise ValueError(f"synthetic_oct.render_example: seed and index must be non-negative, got seed={seed}, "
                     f"index={index}")
  size = int(image_size)
  label = class_label(seed, index)
  rng = np.random.default_rng((int(seed), int(index)))
  right_eye = bool(rng.integers(2))
  fundus_signal, oct_signal = _signal_strengths(rng, label)
  # Lesion centre relative to the fovea, in fundus field-of-view units: mostly horizontal, so the
  # B-scan through the fovea cuts it.
  lesion_offset = np.array([rng.normal(0, 0.07), rng.normal(0, 0.02)], np.float32)
  # Independent streams per modality: changing how one is drawn never changes the other.
  fundus_rng, oct_rng = (np.random.default_rng(s) for s in rng.bit_generator.seed_seq.spawn(2))
  image = _render_fundus(fundus_rng, size, label, fundus_signal, right_eye, lesion_offset)
  oct_image = _render_oct(oct_rng, size, label, oct_signal, right_eye, float(lesion_offset[0]))
  return {
      "image": image,
      "oct": oct_image,
      "label": label,
      "id": f"{DATASET_KEY}-{int(seed)}-{int(index):07d}",
      "eye": "right" if right_eye else "left",
      "dataset": DATASET_KEY,
      "fundus_signal": float(fundus_signal),
      "oct_signal": float(oct_signal),
  }


def render_batch(seed: int, indices: Sequence[int], image_size: int) -> list[dict]:
  """`render_example` for several indices (a convenience for builders and tests)."""
  return [render_example(seed, int(i), image_size) for i in indices]

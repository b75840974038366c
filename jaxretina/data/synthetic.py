"""Deterministic synthetic colour-fundus photographs with FLAIR-style labels and expert captions.

The embedded default data of jaxretina: every example is a pure function of ``(seed, index,
image_size)`` (``np.random.default_rng((seed, index))``), so a fresh machine regenerates exactly
the same dataset without downloading anything.

What an image shows (all positions, sizes, colours, the rotation, the eye side and the vessel tree
vary per example; the diagnostic signal is the lesions and the optic cup):

* a dark background outside a circular field of view, an orange-red retina with radial shading,
  a slow illumination gradient and choroidal texture;
* a branching vessel tree (arteries and wider, darker veins) leaving the optic disc and arching
  around the macula; a bright optic disc with a brighter cup; a darker macula with its fovea;
* class lesions, drawn to match the words of FLAIR's domain-knowledge dictionary
  (docs/systems.md#flair-zero-shot-prototypes): microaneurysms = "small red dots"; haemorrhages = "dense, dark red,
  sharply outlined lesion"; hard exudates = "small white or yellowish deposits with sharp margins"
  near the macula; cotton wool spots = pale, fluffy patches; venous beading; neovascularisation =
  tufts of fine tortuous vessels; preretinal haemorrhage = a boat-shaped dark-red pool; glaucoma =
  "abnormal size of the optic cup" (cup-to-disc ratio 0.68–0.88 against 0.2–0.45); age related
  macular degeneration = drusen, "yellow deposits under the retina" around the macula.

Fields per example (FLAIR dataframe conventions, docs/datasets.md#flair-format-dataframes): ``image`` uint8
(S, S, 3); ``categories`` list[str] (keys of FLAIR's dictionary); ``atributes`` list[str] (FLAIR's
spelling; ``[]`` or ``['clean']``); ``caption`` (expert-style free text for KeepFIT's knowledge
stream); ``label`` (index into ``CLASS_NAMES``); ``id``; ``dataset`` (``DATASET_KEY``).
"""

from __future__ import annotations

import itertools
import math
import string
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from jaxretina.data import dr_grades

DATASET_KEY = "synthetic"

# Ordered classes; `label` indexes this tuple. Every name is a key of FLAIR's `definitions`.
CLASS_NAMES: tuple[str, ...] = (
    "normal",
    *dr_grades.DR_CATEGORIES[1:],  # the four DR grades above 0 (a healthy eye is "normal")
    "glaucoma",
    "age related macular degeneration",
)

# The default class list for zero-shot evaluation on the held-out split (same order as labels).
ZERO_SHOT_CLASSES: tuple[str, ...] = CLASS_NAMES

# Every category an example can carry (all FLAIR dictionary keys): the classes first, then the
# secondary findings some examples list beside their class, as FLAIR's dataframes do.
CATEGORY_NAMES: tuple[str, ...] = CLASS_NAMES + (
    "no diabetic retinopathy",
    "no glaucoma",
    "microaneurysms",
    "haemorrhages",
    "hard exudates",
    "cotton wool spots",
    "neovascularisation",
    "preretinal haemorrhage",
    "large optic cup",
    "drusens",
)

ATTRIBUTE_NAMES: tuple[str, ...] = ("clean",)

# FLAIR's `definitions` entries for CATEGORY_NAMES (jusiro/FLAIR flair/modeling/dictionary.py,
# verbatim), so that `caption_corpus()` alone covers every description-augmented prompt.
CATEGORY_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "normal": ("healthy", "no findings", "no lesion signs", "no glaucoma", "no retinopathy"),
    "mild diabetic retinopathy": ("only few microaneurysms",),
    "moderate diabetic retinopathy": ("many exudates near the macula", "many haemorrhages near the macula",
                                      "retinal thickening near the macula", "hard exudates", "cotton wool spots",
                                      "few severe haemorrhages"),
    "severe diabetic retinopathy": ("venous beading", "many severe haemorrhages",
                                    "intraretinal microvascular abnormality"),
    "proliferative diabetic retinopathy": ("preretinal or vitreous haemorrhage", "neovascularization"),
    "glaucoma": ("optic nerve abnormalities", "abnormal size of the optic cup", "anomalous size in the optic disc"),
    "age related macular degeneration": ("many small drusen", "few medium-sized drusen", "large drusen",
                                         "macular degeneration"),
    "no diabetic retinopathy": ("no diabetic retinopathy", "no microaneurysms"),
    "no glaucoma": ("no glaucoma",),
    "microaneurysms": ("small red dots",),
    "haemorrhages": ("dense, dark red, sharply outlined lesion",),
    "hard exudates": ("small white or yellowish deposits with sharp margins", "bright lesion"),
    "cotton wool spots": ("cotton wool spots", "soft exudates"),
    "neovascularisation": ("neovascularisation",),
    "preretinal haemorrhage": ("preretinal haemorrhage",),
    "large optic cup": ("abnormality in optic cup",),
    "drusens": ("yellow deposits under the retina", "numerous uniform round yellow-white lesions"),
}

PROMPT_TEMPLATE = "A [ATR] fundus photograph of [CLS]"

# ---------------------------------------------------------------------------------------------
# Captions: templates whose `{field}`s take values from _CAPTION_FIELDS; caption_corpus() expands
# every template over every value, so the corpus is exactly what captions can contain.
# ---------------------------------------------------------------------------------------------
_QUANTITY = ("A few", "Several", "Many", "Numerous")
_CAPTION_FIELDS: dict[str, tuple[str, ...]] = {
    "eye": ("right", "left"),
    "cdr": tuple(f"0.{d}" for d in range(1, 10)),
    "qty": _QUANTITY,
    "location": ("in the posterior pole", "around the macula", "in all four quadrants", "along the vascular arcades"),
    "diagnosis": tuple(CLASS_NAMES) + ("a healthy retina",),
}
_OPENINGS = (
    "Colour fundus photograph of the {eye} eye.",
    "Fundus photograph of the {eye} eye, centred on the macula.",
    "Colour fundus image of the {eye} eye.",
)
_DISC_NORMAL = (
    "The optic disc is pink and well defined with a cup to disc ratio of {cdr}.",
    "Healthy optic disc, cup to disc ratio {cdr}.",
)
_DISC_LARGE_CUP = (
    "The optic disc shows a large optic cup with a cup to disc ratio of {cdr}.",
    "Enlarged cupping of the optic disc, cup to disc ratio {cdr}, with optic nerve abnormalities.",
)
_MICROANEURYSMS = (
    "{qty} microaneurysms, small red dots, are seen {location}.",
    "{qty} small red dots consistent with microaneurysms {location}.",
)
_HAEMORRHAGES = (
    "{qty} dot and blot haemorrhages are present {location}.",
    "{qty} dark red, sharply outlined haemorrhages {location}.",
)
_EXUDATES = (
    "{qty} hard exudates, yellowish deposits with sharp margins, near the macula.",
    "Clusters of hard exudates near the macula.",
)
_COTTON_WOOL = ("{qty} cotton wool spots are noted.", "Pale cotton wool spots with soft edges.")
_BEADING = ("Venous beading along a major vein.",)
_NEOVASCULARISATION = (
    "Neovascularization with fine new vessels near the optic disc.",
    "Neovascularization is seen {location}.",
)
_PRERETINAL = ("A preretinal haemorrhage is present.",)
_DRUSEN = (
    "{qty} drusen, yellow deposits under the retina, {location}.",
    "{qty} small and medium-sized drusen {location}.",
)
_UNREMARKABLE = (
    "The macula and retinal vessels appear normal.",
    "No lesion signs, no haemorrhages or exudates.",
    "No diabetic retinopathy and no drusen.",
)
_IMPRESSIONS = ("Findings are consistent with {diagnosis}.", "Impression: {diagnosis}.", "Diagnosis: {diagnosis}.")
_ALL_CAPTION_TEMPLATES = (_OPENINGS + _DISC_NORMAL + _DISC_LARGE_CUP + _MICROANEURYSMS + _HAEMORRHAGES + _EXUDATES
                          + _COTTON_WOOL + _BEADING + _NEOVASCULARISATION + _PRERETINAL + _DRUSEN + _UNREMARKABLE
                          + _IMPRESSIONS)


def _expand(template: str) -> list[str]:
  fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
  if not fields:
    return [template]
  choices = [_CAPTION_FIELDS[f] for f in fields]
  return [template.format(**dict(zip(fields, combo))) for combo in itertools.product(*choices)]


def caption_corpus() -> list[str]:
  """Every word and phrase the examples' captions, categories and prompts can contain.

  Returns the class and category names, their FLAIR dictionary descriptions, the attribute names,
  the FLAIR prompt template's words and every caption sentence expanded over all its field values.
  Ordered and duplicate-free (deterministic); meant for building an embedded text vocabulary.
  """
  corpus = list(CATEGORY_NAMES) + list(ATTRIBUTE_NAMES)
  for name in CATEGORY_NAMES:
    corpus.extend(CATEGORY_DESCRIPTIONS[name])
  corpus.append(PROMPT_TEMPLATE.replace("[ATR] ", "").replace("[CLS]", "").strip())
  corpus.append(PROMPT_TEMPLATE.replace("[ATR]", ATTRIBUTE_NAMES[0]).replace("[CLS]", "").strip())
  for template in _ALL_CAPTION_TEMPLATES:
    corpus.extend(_expand(template))
  return list(dict.fromkeys(corpus))


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
_SUPERSAMPLE = 2  # masks are drawn at 2x and box-downsampled: anti-aliased sub-pixel lesions
_BACKGROUND = np.array([0.015, 0.012, 0.010], np.float32)
_DISC_RGB = np.array([0.98, 0.70, 0.42], np.float32)
_CUP_RGB = np.array([1.0, 0.97, 0.88], np.float32)
_ARTERY_RGB = np.array([0.66, 0.14, 0.09], np.float32)
_VEIN_RGB = np.array([0.45, 0.06, 0.05], np.float32)
_MICROANEURYSM_RGB = np.array([0.42, 0.02, 0.02], np.float32)
_HAEMORRHAGE_RGB = np.array([0.36, 0.03, 0.02], np.float32)
_EXUDATE_RGB = np.array([1.0, 0.92, 0.30], np.float32)
_COTTON_WOOL_RGB = np.array([0.93, 0.90, 0.82], np.float32)
_DRUSEN_RGB = np.array([0.98, 0.88, 0.52], np.float32)
_NEOVESSEL_RGB = np.array([0.70, 0.06, 0.06], np.float32)


class _Canvas:
  """Float RGB image plus helpers that draw anti-aliased alpha masks with PIL and blend them."""

  def __init__(self, size: int, radius: float, center: np.ndarray):
    self.size = size
    self.radius = radius  # field-of-view radius in pixels: the unit of every geometric draw
    self.center = center
    self.rgb = np.zeros((size, size, 3), np.float32)

  def new_mask(self):
    mask = Image.new("L", (self.size * _SUPERSAMPLE,) * 2, 0)
    return mask, ImageDraw.Draw(mask)

  def _xy(self, p: np.ndarray) -> tuple[float, float]:
    q = (self.center + p * self.radius) * _SUPERSAMPLE
    return float(q[0]), float(q[1])

  def ellipse(self, draw, p, rx, ry=None, fill=255):
    """Ellipse at p (FOV units) with radii in FOV units; at least ~0.7 output px across."""
    ry = rx if ry is None else ry
    x, y = self._xy(p)
    sx = max(rx * self.radius, 0.7) * _SUPERSAMPLE
    sy = max(ry * self.radius, 0.7) * _SUPERSAMPLE
    draw.ellipse((x - sx, y - sy, x + sx, y + sy), fill=fill)

  def polyline(self, draw, points: np.ndarray, width: float, fill=255):
    w = max(1, int(round(width * self.radius * _SUPERSAMPLE)))
    xy = (self.center + points * self.radius) * _SUPERSAMPLE
    draw.line([tuple(q) for q in xy.tolist()], fill=fill, width=w, joint="curve")

  def blend(self, mask_image, rgb: np.ndarray, opacity: float = 1.0, blur: float = 0.0):
    """Alpha-blend `rgb` where the mask is set; `blur` (FOV units) softens the edges.

    Works on the mask's bounding box only (lesions cover a few percent of the image).
    """
    box = mask_image.getbbox()
    if box is None:
      return
    radius = blur * self.radius * _SUPERSAMPLE
    margin = int(math.ceil(3 * radius)) + _SUPERSAMPLE
    full = self.size * _SUPERSAMPLE
    # Box corners on the output pixel grid, so the 2x->1x box filter sees whole pixels.
    x0, y0 = (max(0, (c - margin) // _SUPERSAMPLE) for c in box[:2])
    x1, y1 = (min(self.size, -(-(c + margin) // _SUPERSAMPLE)) for c in box[2:])
    crop = mask_image.crop((x0 * _SUPERSAMPLE, y0 * _SUPERSAMPLE, min(full, x1 * _SUPERSAMPLE),
                            min(full, y1 * _SUPERSAMPLE)))
    if radius > 0:
      crop = crop.filter(ImageFilter.GaussianBlur(radius))
    small = crop.resize((x1 - x0, y1 - y0), Image.Resampling.BOX)
    alpha = np.asarray(small, np.float32)[..., None] * (opacity / 255.0)
    region = self.rgb[y0:y1, x0:x1]
    self.rgb[y0:y1, x0:x1] = region * (1.0 - alpha) + rgb * alpha


def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
  c, s = math.cos(angle), math.sin(angle)
  return v @ np.array([[c, s], [-s, c]], np.float32)


def _vessel_path(rng, start, direction, target, length, step, wander, steer=0.06):
  """Points (n, 2) of a smooth random walk whose heading turns from `direction` towards `target`."""
  n = max(2, int(length / step))
  theta = math.atan2(float(direction[1]), float(direction[0]))
  theta_target = math.atan2(float(target[1]), float(target[0]))
  turns = rng.normal(0, wander, n).tolist()
  headings = []
  for turn in turns:
    headings.append(theta)
    theta += steer * math.sin(theta_target - theta) + turn
  headings = np.asarray(headings, np.float32)
  steps = step * np.stack([np.cos(headings), np.sin(headings)], 1)
  steps[0] = 0.0
  return np.asarray(start, np.float32) + np.cumsum(steps, 0)


def _vessel_tree(rng, disc, nasal_sign, rotation):
  """Arteries and veins as lists of (points (n, 2), width) in FOV units, four arcades each."""
  arteries, veins = [], []
  # (initial direction, steering target, length) in a frame where temporal (towards the macula) is
  # -x·nasal_sign and superior is -y; the temporal arcades arch around the macula.
  arcades = (((-0.35, -1.0), (-1.0, 0.25), 1.25), ((-0.35, 1.0), (-1.0, -0.25), 1.25),
             ((0.5, -1.0), (1.0, -0.4), 0.75), ((0.5, 1.0), (1.0, 0.4), 0.75))
  for init, target, length in arcades:
    for kind, width, jitter in (("artery", 0.022, -0.18), ("vein", 0.030, 0.18)):
      d0 = _rotate(np.array([init[0] * nasal_sign, init[1]], np.float32), rotation + jitter + rng.normal(0, 0.1))
      tg = _rotate(np.array([target[0] * nasal_sign, target[1]], np.float32), rotation)
      main = _vessel_path(rng, disc + 0.05 * d0, d0, tg, length * rng.uniform(0.85, 1.1), 0.02, 0.04)
      out = arteries if kind == "artery" else veins
      out.append((main, width))
      # Side branches leave at 25-55 degrees and keep going roughly straight.
      for at in rng.integers(4, len(main) - 3, size=rng.integers(2, 5)):
        heading = main[at + 1] - main[at]
        branch_dir = _rotate(heading / np.linalg.norm(heading), rng.choice((-1, 1)) * rng.uniform(0.45, 0.95))
        branch = _vessel_path(rng, main[at], branch_dir, branch_dir, rng.uniform(0.2, 0.45), 0.02, 0.07)
        out.append((branch, width * 0.65))
  return arteries, veins


def _scatter(rng, n, center, spread, max_radius=0.93):
  """n points normally scattered around `center` (FOV units), kept inside the field of view."""
  points = center + rng.normal(0, spread, (n, 2)).astype(np.float32)
  norms = np.linalg.norm(points, axis=1, keepdims=True)
  return np.where(norms > max_radius, points / norms * max_radius * rng.uniform(0.6, 1.0, (n, 1)), points)


def _uniform_in_fov(rng, n, max_radius=0.85):
  r = max_radius * np.sqrt(rng.uniform(0.02, 1.0, n))
  t = rng.uniform(0, 2 * np.pi, n)
  return np.stack([r * np.cos(t), r * np.sin(t)], 1).astype(np.float32)


def _quantity(n: int) -> str:
  return _QUANTITY[0] if n <= 4 else _QUANTITY[1] if n <= 9 else _QUANTITY[2] if n <= 15 else _QUANTITY[3]


def _categories(rng, label: int, has_preretinal: bool) -> list[str]:
  name = CLASS_NAMES[label]
  if name == "normal":
    options = (["normal"], ["no diabetic retinopathy"], ["no diabetic retinopathy", "no glaucoma"],
               ["normal", "no glaucoma"])
    return list(options[rng.integers(len(options))])
  extras = {
      "mild diabetic retinopathy": (("microaneurysms", 0.3),),
      "moderate diabetic retinopathy": (("hard exudates", 0.3), ("haemorrhages", 0.2)),
      "severe diabetic retinopathy": (("haemorrhages", 0.3), ("cotton wool spots", 0.2)),
      "proliferative diabetic retinopathy": (("neovascularisation", 0.3),
                                             ("preretinal haemorrhage", 0.3 if has_preretinal else 0.0)),
      "glaucoma": (("large optic cup", 0.25),),
      "age related macular degeneration": (("drusens", 0.3),),
  }[name]
  draws = rng.uniform(size=len(extras))
  return [name] + [extra for (extra, p), u in zip(extras, draws) if u < p]


def shade_retina(canvas, rng: np.random.Generator, center, macula, disc, disc_radius: float):
  """Paints the retina onto ``canvas.rgb``: base colour × radial shading × illumination gradient ×
  choroidal texture, darker macula, peripapillary glow. Returns ``(base colour (3,), r²)`` where r² is
  the squared radius from the centre in units of the field of view (both reused by the callers)."""
  size = canvas.rgb.shape[0]
  ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  u, v = (xs - center[0]) / canvas.radius, (ys - center[1]) / canvas.radius
  r2 = u * u + v * v
  base = np.array([rng.uniform(0.72, 0.86), rng.uniform(0.27, 0.40), rng.uniform(0.09, 0.17)], np.float32)
  base *= rng.uniform(0.82, 1.12)
  phi = rng.uniform(0, 2 * np.pi)
  light = (1.0 - 0.42 * r2) * (1.0 + rng.uniform(0, 0.15) * (u * math.cos(phi) + v * math.sin(phi)))
  texture = Image.fromarray(rng.normal(0, 1, (6, 6)).astype(np.float32), mode="F").resize((size, size),
                                                                                          Image.Resampling.BICUBIC)
  light = light * (1.0 + 0.04 * np.asarray(texture, np.float32))
  dm2 = (u - macula[0]) ** 2 + (v - macula[1]) ** 2
  light *= 1.0 - 0.33 * np.exp(-dm2 / (2 * 0.11 ** 2)) - 0.15 * np.exp(-dm2 / (2 * 0.025 ** 2))
  dd2 = (u - disc[0]) ** 2 + (v - disc[1]) ** 2
  light *= 1.0 + 0.25 * np.exp(-dd2 / (2 * (2.0 * disc_radius) ** 2))  # peripapillary glow
  canvas.rgb = base * light[..., None]
  return base, r2


def render_example(seed: int, index: int, image_size: int) -> dict:
  """Renders example `index` of the synthetic dataset with base seed `seed`.

  Args:
    seed: dataset seed (different splits use different seeds, so they are disjoint).
    index: example index; with `seed` it fixes every random choice.
    image_size: S, the side of the square output image in pixels (>= 16).

  Returns:
    dict with ``image`` uint8 (S, S, 3), ``categories`` list[str], ``atributes`` list[str],
    ``caption`` str, ``label`` int (index into ``CLASS_NAMES``), ``id`` str, ``dataset`` str.
  """
  if int(image_size) < 16:
    raise ValueError(f"render_example: image_size must be >= 16 pixels, got {image_size}")
  if int(seed) < 0 or int(index) < 0:
    raise ValueError(f"render_example: seed and index must be non-negative, got seed={seed}, index={index}")
  rng = np.random.default_rng((int(seed), int(index)))
  size = int(image_size)
  label = int(rng.integers(len(CLASS_NAMES)))
  name = CLASS_NAMES[label]

  # Geometry: field of view, eye side (disc nasal: right of the image for a right eye), rotation.
  center = np.array([size / 2, size / 2], np.float32) + rng.normal(0, 0.015 * size, 2).astype(np.float32)
  canvas = _Canvas(size, radius=0.47 * size * rng.uniform(0.94, 1.0), center=center)
  right_eye = bool(rng.integers(2))
  nasal_sign = 1.0 if right_eye else -1.0
  rotation = rng.uniform(-0.2, 0.2)
  disc = _rotate(np.array([nasal_sign * rng.uniform(0.33, 0.42), rng.uniform(-0.07, 0.07)], np.float32), rotation)
  macula = _rotate(np.array([-nasal_sign * rng.uniform(0.02, 0.08), rng.uniform(-0.05, 0.05)], np.float32), rotation)
  disc_radius = rng.uniform(0.115, 0.135)
  cup_to_disc = rng.uniform(0.68, 0.88) if name == "glaucoma" else rng.uniform(0.2, 0.45)

  base, r2 = shade_retina(canvas, rng, center, macula, disc, disc_radius)

  # Optic disc and cup (the cup slightly temporal in the disc, as in real eyes).
  mask, draw = canvas.new_mask()
  canvas.ellipse(draw, disc, disc_radius, disc_radius * rng.uniform(1.0, 1.12))
  canvas.blend(mask, _DISC_RGB * (1.06 if name == "glaucoma" else 1.0), opacity=0.92, blur=0.012)
  mask, draw = canvas.new_mask()
  cup = disc + _rotate(np.array([-nasal_sign * 0.12 * disc_radius, 0.0], np.float32), rotation)
  canvas.ellipse(draw, cup, cup_to_disc * disc_radius)
  canvas.blend(mask, _CUP_RGB, opacity=0.95, blur=0.006)

  # Vessels, veins (wider, darker) over arteries.
  arteries, veins = _vessel_tree(rng, disc, nasal_sign, rotation)
  for vessels, rgb in ((arteries, _ARTERY_RGB), (veins, _VEIN_RGB)):
    mask, draw = canvas.new_mask()
    for points, width in vessels:
      canvas.polyline(draw, points, width)
    if rgb is _VEIN_RGB and name == "severe diabetic retinopathy":
      # Venous beading: sausage-like dilations along one major vein.
      points, width = veins[rng.integers(2)]
      for at in rng.integers(len(points) // 5, len(points) - 1, size=rng.integers(5, 9)):
        canvas.ellipse(draw, points[at], width * 0.9)
    canvas.blend(mask, rgb * base[0] / 0.8, opacity=0.85)

  counts = {"microaneurysms": 0, "haemorrhages": 0, "exudates": 0, "cotton_wool": 0, "drusen": 0,
            "neovascular_tufts": 0, "preretinal": 0}
  if "diabetic retinopathy" in name:
    grade = CLASS_NAMES.index(name)  # 1 mild .. 4 proliferative
    counts["microaneurysms"] = int(rng.integers(*((4, 9), (6, 13), (8, 15), (6, 13))[grade - 1]))
    counts["haemorrhages"] = int(rng.integers(*((0, 1), (2, 5), (8, 15), (4, 9))[grade - 1]))
    counts["exudates"] = int(rng.integers(*((0, 1), (6, 15), (4, 11), (3, 9))[grade - 1]))
    counts["cotton_wool"] = int(rng.integers(*((0, 1), (0, 3), (2, 5), (0, 3))[grade - 1]))
    if grade == 4:
      counts["neovascular_tufts"] = int(rng.integers(2, 4))
      counts["preretinal"] = int(rng.uniform() < 0.7)
  elif name == "age related macular degeneration":
    counts["drusen"] = int(rng.integers(10, 26))

  if counts["exudates"]:
    mask, draw = canvas.new_mask()
    n_clusters = int(rng.integers(1, 4))
    cluster_centers = _scatter(rng, n_clusters, macula, 0.2)
    for p in _scatter(rng, counts["exudates"], cluster_centers[rng.integers(n_clusters, size=counts["exudates"])],
                      0.05):
      canvas.ellipse(draw, p, rng.uniform(0.012, 0.022))
    canvas.blend(mask, _EXUDATE_RGB, opacity=0.95)
  if counts["drusen"]:
    mask, draw = canvas.new_mask()
    for p in _scatter(rng, counts["drusen"], macula, 0.13):
      canvas.ellipse(draw, p, rng.uniform(0.015, 0.035))
    canvas.blend(mask, _DRUSEN_RGB, opacity=0.85, blur=0.006)
  if counts["cotton_wool"]:
    mask, draw = canvas.new_mask()
    for p in _scatter(rng, counts["cotton_wool"], disc * 0.5, 0.3):
      canvas.ellipse(draw, p, rng.uniform(0.035, 0.05), rng.uniform(0.025, 0.04))
    canvas.blend(mask, _COTTON_WOOL_RGB, opacity=0.75, blur=0.012)
  if counts["neovascular_tufts"]:
    mask, draw = canvas.new_mask()
    for _ in range(counts["neovascular_tufts"]):
      start = disc + _rotate(np.array([disc_radius * 1.3, 0], np.float32), rng.uniform(0, 2 * np.pi))
      for _ in range(int(rng.integers(4, 7))):
        d = _rotate(np.array([1.0, 0.0], np.float32), rng.uniform(0, 2 * np.pi))
        canvas.polyline(draw, _vessel_path(rng, start, d, d, rng.uniform(0.06, 0.14), 0.008, 0.6, steer=0.0), 0.006)
    canvas.blend(mask, _NEOVESSEL_RGB, opacity=0.9)
  if counts["haemorrhages"]:
    mask, draw = canvas.new_mask()
    for p in _uniform_in_fov(rng, counts["haemorrhages"]):
      canvas.ellipse(draw, p, rng.uniform(0.03, 0.055), rng.uniform(0.025, 0.05))
    canvas.blend(mask, _HAEMORRHAGE_RGB, opacity=0.92, blur=0.004)
  if counts["microaneurysms"]:
    mask, draw = canvas.new_mask()
    for p in _scatter(rng, counts["microaneurysms"], macula, 0.3):
      canvas.ellipse(draw, p, rng.uniform(0.012, 0.018))
    canvas.blend(mask, _MICROANEURYSM_RGB, opacity=0.95)
  if counts["preretinal"]:
    # Boat-shaped: blood settles under gravity, a flat upper edge (PIL chord 0..180 = lower half).
    mask, draw = canvas.new_mask()
    p = _scatter(rng, 1, disc * 0.6, 0.15)[0]
    x, y = canvas._xy(p)
    rx, ry = (rng.uniform(0.09, 0.14) * canvas.radius * _SUPERSAMPLE, rng.uniform(0.08, 0.11) * canvas.radius
              * _SUPERSAMPLE)
    draw.chord((x - rx, y - ry, x + rx, y + ry), 0, 180, fill=255)
    canvas.blend(mask, _HAEMORRHAGE_RGB * 0.9, opacity=0.95, blur=0.004)

  # Outside the field of view: dark background, soft rim; then gamma, sensor noise, quantisation.
  fov = np.clip((1.0 - np.sqrt(r2)) * canvas.radius * 0.8 + 0.5, 0.0, 1.0)[..., None]
  rgb = canvas.rgb * fov + _BACKGROUND * (1.0 - fov)
  rgb = np.clip(rgb, 0.0, 1.0) ** rng.uniform(0.9, 1.1)
  rgb = rgb + rng.normal(0, 0.012, rgb.shape).astype(np.float32)
  image = np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)

  categories = _categories(rng, label, bool(counts["preretinal"]))
  atributes = ["clean"] if rng.uniform() < 0.15 else []
  caption = _caption(rng, name, right_eye, cup_to_disc, counts)
  return {
      "image": image,
      "categories": categories,
      "atributes": atributes,
      "caption": caption,
      "label": label,
      "id": f"{DATASET_KEY}-{int(seed)}-{int(index):07d}",
      "dataset": DATASET_KEY,
  }


def _caption(rng, name: str, right_eye: bool, cup_to_disc: float, counts: dict) -> str:
  """An expert-style report of what was drawn, from the templates that caption_corpus() expands."""

  def pick(templates, **fields):
    return templates[rng.integers(len(templates))].format(**fields)

  def location(*options):
    return options[rng.integers(len(options))]

  sentences = [pick(_OPENINGS, eye="right" if right_eye else "left")]
  cdr = f"0.{min(9, max(1, int(round(cup_to_disc * 10))))}"
  sentences.append(pick(_DISC_LARGE_CUP if name == "glaucoma" else _DISC_NORMAL, cdr=cdr))
  if counts["microaneurysms"]:
    sentences.append(pick(_MICROANEURYSMS, qty=_quantity(counts["microaneurysms"]),
                          location=location("in the posterior pole", "around the macula")))
  if counts["haemorrhages"]:
    spread = "in all four quadrants" if counts["haemorrhages"] >= 8 else location("in the posterior pole",
                                                                                   "along the vascular arcades")
    sentences.append(pick(_HAEMORRHAGES, qty=_quantity(counts["haemorrhages"]), location=spread))
  if counts["exudates"]:
    sentences.append(pick(_EXUDATES, qty=_quantity(counts["exudates"])))
  if counts["cotton_wool"]:
    sentences.append(pick(_COTTON_WOOL, qty=_quantity(counts["cotton_wool"])))
  if name == "severe diabetic retinopathy":
    sentences.append(_BEADING[0])
  if counts["neovascular_tufts"]:
    sentences.append(pick(_NEOVASCULARISATION, location="along the vascular arcades"))
  if counts["preretinal"]:
    sentences.append(_PRERETINAL[0])
  if counts["drusen"]:
    sentences.append(pick(_DRUSEN, qty=_quantity(counts["drusen"]), location="around the macula"))
  if name in ("normal", "glaucoma"):
    sentences.append(pick(_UNREMARKABLE))
  sentences.append(pick(_IMPRESSIONS, diagnosis="a healthy retina" if name == "normal" else name))
  return " ".join(sentences)


def render_batch(seed: int, indices: Sequence[int], image_size: int) -> list[dict]:
  """`render_example` for several indices (a convenience for builders and tests)."""
  return [render_example(seed, int(i), image_size) for i in indices]

"""TFDS builder ``gamma``: GAMMA glaucoma grading, colour fundus + OCT volume per eye (docs/datasets.md#gamma).

Splits: ``train`` (``training/``, labels from ``glaucoma_grading_training_GT.xlsx``) and ``test``
(``testing/`` or ``Test/``; labelled when a ``*testing_GT.xlsx`` lies in it, else ``label`` −1).
``label``: 0 ``non`` (no glaucoma), 1 ``early``, 2 ``mid_advanced`` (intermediate + advanced),
the argmax of the GT file's one-hot columns ``non, early, mid_advanced`` (a row that is not
one-hot is bad input).

How the OCT volume becomes model input (config options, part of the config name):
  * the volume is the case's ``<id>/`` folder of B-scans ``0_image.jpg … 255_image.jpg``, read in
    **numeric** order (lexicographic order would interleave 1, 10, 100);
  * ``oct_reduce='center'`` (default): the central B-scan, index ``n // 2`` (128 of 256) — through
    the fovea for GAMMA's macula-centred 3×3 mm cubes;
  * ``oct_reduce='mean'`` / ``'max'``: the per-pixel mean (rounded) / maximum over the
    ``oct_slices`` central B-scans (indices ``(n − k) // 2 … (n − k) // 2 + k − 1``; 0 = all): a
    speckle-reduced B-scan, still depth × fast axis;
  * the result is stored as ``oct``, grey (S, S, 1) on the same canvas as the fundus image (longest
    side resized, zero-padded), so ``fields='image:3,oct:1'`` reads it like ``mmc_amd``.
The challenge baseline's 256-channel volume input (every slice centre-cropped to 512² and stacked)
is not stored: at 64 MiB per case uncompressed it is a different storage format, not a record field.
``oct_num_slices`` records how many B-scans the volume had.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from jaxretina.datasets import bad_input
from jaxretina.datasets import file_discovery
from jaxretina.datasets import image_encoding
from jaxretina.datasets import label_tables
from jaxretina.datasets import manual_builder
from jaxretina.datasets.mmc_amd import ImageJob, MultiImageBuilder

_INSTRUCTIONS = """\
GAMMA glaucoma grading (task 1), https://gamma.grand-challenge.org/ (registration) or the mirror
https://huggingface.co/datasets/ctmedtech/GAMMA. Extract it in <manual_dir> so that at most 3 levels below
<manual_dir> one folder (usually Glaucoma_grading/) holds:
  training/glaucoma_grading_training_GT.xlsx
  training/multi-modality_images/0001/0001.jpg          (colour fundus)
  training/multi-modality_images/0001/0001/0_image.jpg  ... 255_image.jpg  (OCT B-scans)
  testing/multi-modality_images/...   (optional; labelled if testing/*testing_GT.xlsx is present)
"""

LABEL_COLUMNS = ("non", "early", "mid_advanced")
_CATEGORIES = ("no glaucoma", "early glaucoma", "intermediate or advanced glaucoma")
OCT_REDUCTIONS = ("center", "mean", "max")


def central_slices(num_slices: int, count: int) -> range:
  """Indices of the `count` central slices of `num_slices` (0 = all; clipped to the volume)."""
  count = num_slices if count <= 0 else min(count, num_slices)
  start = (num_slices - count) // 2
  return range(start, start + count)


def reduce_volume(slices: list[np.ndarray], reduce: str, count: int) -> np.ndarray:
  """uint8 (H, W) model input of a volume's B-scans (numerically ordered uint8 (H, W) arrays)."""
  n = len(slices)
  if reduce == "center":
    return slices[n // 2]
  chosen = np.stack([slices[i] for i in central_slices(n, count)]).astype(np.float32)
  if reduce == "mean":
    return np.round(chosen.mean(axis=0)).astype(np.uint8)
  if reduce == "max":
    return chosen.max(axis=0).astype(np.uint8)
  raise ValueError(f"oct_reduce must be one of {OCT_REDUCTIONS}, got {reduce!r}")


def process_volume(paths: tuple[str, ...], reduce: str, count: int,
                   options: image_encoding.ImageOptions) -> tuple[bool, bytes | str]:
  """(True, encoded grey (S, S, 1) OCT input) or (False, reason naming the bad slice)."""
  wanted = [paths[len(paths) // 2]] if reduce == "center" else [paths[i] for i in central_slices(len(paths), count)]
  slices = []
  for path in wanted:
    try:
      slices.append(image_encoding.read_grey(path))
    except Exception as e:  # noqa: BLE001
      return False, f"corrupt or unreadable OCT slice {path} ({type(e).__name__}: {e})"
  shapes = sorted({s.shape for s in slices})
  if len(shapes) > 1:
    return False, f"OCT slices of different sizes {shapes} (expected one size per volume)"
  try:
    if reduce == "center":
      return True, image_encoding.encode_array(slices[0][..., None], options)
    return True, image_encoding.encode_array(reduce_volume(slices, reduce, count)[..., None], options)
  except Exception as e:  # noqa: BLE001
    return False, f"could not process the OCT volume ({type(e).__name__}: {e})"


@dataclasses.dataclass(eq=False)
class GammaConfig(manual_builder.ManualRetinaConfig):
  """Attributes: oct_reduce: 'center', 'mean' or 'max' (module docstring); oct_slices: central slices
  reduced by mean/max (0 = all)."""

  oct_reduce: str = "center"
  oct_slices: int = 0


class Gamma(MultiImageBuilder):
  """GAMMA: colour fundus + macular OCT volume per eye, graded non / early / intermediate-advanced glaucoma.

  Features beyond the common ones: ``oct`` (grey (S, S, 1), the volume reduced as configured),
  ``oct_num_slices`` (int32). ``id`` = the 4-digit case folder name (``0001``); ``file_name`` = the
  fundus image.
  """

  name = "gamma"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = "https://gamma.grand-challenge.org/"
  DATASET_KEY = "gamma"
  MODALITY = "cfp+oct"
  CONFIG_CLASS = GammaConfig
  BUILDER_CONFIGS = [
      GammaConfig(name="default", description="Central OCT B-scan, 512 px canvas, PNG."),
      GammaConfig(name="mean16", oct_reduce="mean", oct_slices=16,
                  description="Mean of the 16 central OCT B-scans, 512 px canvas, PNG."),
  ]

  def _check_options(self, config) -> None:
    super()._check_options(config)
    if config.oct_reduce not in OCT_REDUCTIONS:
      raise ValueError(f"{self.name}: oct_reduce must be one of {OCT_REDUCTIONS}, got {config.oct_reduce!r}")
    if config.oct_slices < 0:
      raise ValueError(f"{self.name}: oct_slices must be >= 0 (0 = all), got {config.oct_slices}")

  def _label_names(self):
    return LABEL_COLUMNS

  def _extra_features(self):
    return {"oct": self.grey_image_feature("grey OCT input reduced from the volume (see oct_reduce)"),
            "oct_num_slices": tfds.features.Scalar(dtype=np.int32, doc="B-scans in the OCT volume")}

  def _layout(self, manual_dir: Path, bad, report):
    root, _ = file_discovery.find_root(manual_dir, [["training/multi-modality_images/"]], dataset=self.name)
    training = file_discovery.resolve(root, "training", kind="dir")
    gt = (file_discovery.glob_child(training, "*grading*training*gt*.xlsx", kind="file", what=self.name)
          or file_discovery.glob_child(training, "*_gt.xlsx", kind="file", what=self.name))
    if gt is None:
      raise bad_input.DatasetInputError(f"{self.name}: {training} lacks glaucoma_grading_training_GT.xlsx; found "
                                        f"{[p.name for p in file_discovery.list_dir(training)]}")
    layout = {"train": self._split(root, training, "train", gt, bad)}
    testing = file_discovery.resolve(root, "testing", kind="dir") or file_discovery.resolve(root, "test", kind="dir")
    if testing is None or file_discovery.resolve(testing, "multi-modality_images", kind="dir") is None:
      report.notes.append(f"no testing/multi-modality_images/ in {root}: split 'test' not written")
    else:
      test_gt = file_discovery.glob_child(testing, "*gt*.xlsx", kind="file", what=self.name)
      if test_gt is None:
        report.notes.append(f"no *testing_GT.xlsx in {testing}: split 'test' written unlabelled (label -1)")
      layout["test"] = self._split(root, testing, "test", test_gt, bad)
    return layout

  def _labels(self, gt: Path, split: str, bad) -> dict[str, tuple[int, str]]:
    table = label_tables.read_xlsx(gt, dataset=self.name)
    table.require(["data", *LABEL_COLUMNS], self.name)
    labels = {}
    for line, row in table.rows:
      where = table.where(line)
      number = label_tables.parse_label(row["data"], range(100000))
      if number is None:
        bad(split, "bad_row", where, f"data {row['data']!r} is not a case number")
        continue
      case = f"{number:04d}"
      if case in labels:
        bad(split, "duplicate_id", where, f"case {case} appears more than once")
        continue
      one_hot = [label_tables.parse_label(row[c], (0, 1)) for c in LABEL_COLUMNS]
      if None in one_hot or sum(one_hot) != 1:
        labels[case] = (-2, where)  # declared (its folder is not 'unlabelled') but rejected
        bad(split, "unknown_label", where, f"columns {'/'.join(LABEL_COLUMNS)} must be one-hot, got "
                                           f"{[row[c] for c in LABEL_COLUMNS]}")
        continue
      labels[case] = (one_hot.index(1), where)
    return labels

  def _split(self, root: Path, folder: Path, split: str, gt: Path | None, bad) -> list[manual_builder.Item]:
    images = file_discovery.resolve(folder, "multi-modality_images", kind="dir")
    cases = {p.name: p for p in file_discovery.list_dir(images) if p.is_dir()}
    labels = self._labels(gt, split, bad) if gt is not None else None
    items = []
    if labels is None:
      declared = [(name, -1, f"{images / name}") for name in cases]
    else:
      declared = [(case, label, where) for case, (label, where) in labels.items() if label >= 0]
      for name in cases:
        if name not in labels:
          bad(split, "unlabelled_image", str(cases[name]), f"case folder has no row in {gt} (expected one row per "
                                                           f"case, data = the folder's number)")
    config = self.builder_config
    for case, label, where in declared:
      case_dir = cases.get(case)
      if case_dir is None:
        bad(split, "missing_image", where, f"case folder {case}/ not found in {images}")
        continue
      index = file_discovery.ImageIndex(case_dir, relative_to=root)
      fundus = index.find(case, bad, split, where)
      volume_dir = file_discovery.resolve(case_dir, case, kind="dir")
      slices = []
      if volume_dir is not None:
        slices = sorted((p for p in file_discovery.list_dir(volume_dir)
                         if p.is_file() and p.suffix.lower() in file_discovery.IMAGE_EXTENSIONS),
                        key=lambda p: file_discovery.numeric_sort_key(p.name))
      if not slices:
        bad(split, "missing_image", where, f"no OCT volume: expected B-scans {case}/{case}/0_image.jpg ... in "
                                           f"{case_dir}")
        continue
      if fundus is None:
        continue
      items.append(manual_builder.Item(fundus, where, {
          "id": case, "file_name": index.relative(fundus), "label": label,
          "oct": ImageJob(process_volume, (tuple(str(p) for p in slices), config.oct_reduce, config.oct_slices),
                          str(volume_dir)),
          "oct_num_slices": len(slices),
          "categories": [_CATEGORIES[label]] if label >= 0 else []}))
    return items

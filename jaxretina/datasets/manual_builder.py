"""The base of the manual-download retinal dataset builders (docs/datasets.md#how-the-builders-read-a-download).

Every builder of a public dataset (``aptos2019``, ``eyepacs``, ``messidor2``, ``ddr``, ``idrid``,
``odir5k``, ...) subclasses :class:`ManualRetinaBuilder` and only describes its layout: which
anchor files identify the dataset root, how label files map to images. The cross-cutting rules are
implemented once, each in its own module:

* ``file_discovery``: finding the dataset root and resolving image files;
* ``label_tables``: reading CSV / XLSX label tables;
* ``bad_input``: the ``on_bad_input`` policy and the skip report;
* ``image_encoding``: how images are checked, cropped, pre-resized and re-encoded;
* ``process_pool``: the spawned worker processes (output order preserved).

TFDS writes every build into a temporary directory that is renamed only when all splits are
written, so a build that fails (any error, including bad input under ``'error'``) leaves no
prepared dataset behind.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import tensorflow_datasets as tfds

from jaxretina.data.dr_grades import DR_GRADE_NAMES
from jaxretina.datasets.bad_input import ON_BAD_INPUT, SKIP_REPORT_NAME, BadInputPolicy, DatasetInputError, SkipReport
from jaxretina.datasets.file_discovery import check_manual_dir
from jaxretina.datasets.image_encoding import ENCODINGS, ImageOptions, process_image
from jaxretina.datasets.local_builder import LocalInfoBuilder, coerce_option
from jaxretina.datasets.process_pool import default_num_workers, parallel_map

_log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class ManualRetinaConfig(tfds.core.BuilderConfig):
  """How a manual-download dataset is stored (see :class:`ImageOptions`).

  Subclasses add dataset-specific options (e.g. ``drop_ungradable``); every option that changes
  the stored data is folded into the config name when overridden by a keyword.
  """

  canvas_size: int = 512
  crop_fov: bool = False
  encoding: str = "png"


@dataclasses.dataclass
class Item:
  """One example to write: its source image, where it was declared, and its non-image features."""

  path: Path
  where: str
  features: dict[str, Any]


_BASE_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(tfds.core.BuilderConfig))
_SHORT_NAMES = {"canvas_size": "c", "encoding": "", "crop_fov": "fov"}


def _suffix(key: str, value) -> str:
  short = _SHORT_NAMES.get(key, key)
  if isinstance(value, bool):
    return short if value else f"no_{short}"
  return f"{short}{value}"


class ManualRetinaBuilder(LocalInfoBuilder, tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders of manually downloaded retinal datasets (ArrayRecord, no tensorflow).

  Subclasses set ``name``, ``VERSION``, ``MANUAL_DOWNLOAD_INSTRUCTIONS``, ``DATASET_KEY``,
  optionally ``CONFIG_CLASS`` / ``BUILDER_CONFIGS``, and implement ``_label_names``,
  ``_extra_features`` and ``_layout``.

  Builder keywords (besides ``config=`` and TFDS' own ``data_dir=`` etc.):
    canvas_size, crop_fov, encoding, and the config class's own options: override the config;
      the config name records every override (``default_c256_jpeg``), so differently processed
      builds never share a directory;
    on_bad_input: ``'error'`` (default) or ``'skip'``. Not part of the config name: a build that
      succeeds under ``'error'`` equals the ``'skip'`` build with nothing skipped, and what a
      ``'skip'`` build left out is listed in its skip report;
    num_workers: image-processing processes (0 = one per core, up to 16; output never depends on it);
    manual_dir: the download folder (else TFDS' ``download_config.manual_dir``).

  Common features: ``image`` (encoded, canvas² when pre-resized), ``label`` (ClassLabel; −1 =
  unlabelled), ``id`` (the identifier the label file uses; unique within a split), ``file_name``
  (image path relative to the dataset root), ``dataset`` (key), ``patient_id`` / ``eye`` (``''``
  where the source has none), ``modality``, ``categories`` / ``atributes`` (JSON lists of FLAIR-style
  texts, as ``synthetic_retina``).
  """

  CONFIG_CLASS = ManualRetinaConfig
  BUILDER_CONFIGS = [ManualRetinaConfig(name="default", description="512 px canvas, PNG.")]
  DEFAULT_CONFIG_NAME = "default"
  DATASET_KEY = ""
  MODALITY = "cfp"

  def __init__(self, *, config=None, on_bad_input: str | None = None, num_workers: int | None = None,
               manual_dir=None, **kwargs):
    option_names = [f.name for f in dataclasses.fields(self.CONFIG_CLASS) if f.name not in _BASE_CONFIG_FIELDS]
    overrides = {k: kwargs.pop(k) for k in option_names if k in kwargs}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    base = self._base_config(config)
    changed = {}
    for key, value in overrides.items():
      value = coerce_option(value, getattr(base, key), key, self.name)
      if value != getattr(base, key):
        changed[key] = value
    if overrides:
      merged = dataclasses.replace(base, **changed) if changed else base
      self._check_options(merged)
      # Name the result after the predefined config it differs least from (default +
      # drop_ungradable=True *is* 'gradable'), so equal data never lands in two directories.
      def differences(candidate):
        return {k: getattr(merged, k) for k in option_names if getattr(merged, k) != getattr(candidate, k)}

      nearest = min([base] + [c for c in self.BUILDER_CONFIGS if c is not base], key=lambda c: len(differences(c)))
      changed = differences(nearest)
      if changed:
        suffix = "_".join(_suffix(k, changed[k]) for k in option_names if k in changed)
        config = dataclasses.replace(merged, name=f"{nearest.name}_{suffix}",
                                     description=f"{nearest.description} Overrides: {changed}.")
      else:
        config = nearest
    else:
      config = base
    on_bad_input = "error" if on_bad_input is None else str(on_bad_input)
    if on_bad_input not in ON_BAD_INPUT:
      raise ValueError(f"{self.name}: on_bad_input must be one of {ON_BAD_INPUT}, got {on_bad_input!r}")
    self._on_bad_input = on_bad_input
    self._num_workers = int(num_workers) if num_workers is not None else 0
    if self._num_workers < 0:
      raise ValueError(f"{self.name}: num_workers must be >= 0, got {num_workers}")
    self._manual_dir_override = manual_dir
    self._config_manual_dir = None
    self.skip_report: SkipReport | None = None
    super().__init__(config=config, **kwargs)

  def _check_options(self, config) -> None:
    if config.canvas_size < 0 or 0 < config.canvas_size < 16:
      raise ValueError(f"{self.name}: canvas_size must be 0 (keep size) or >= 16, got {config.canvas_size}")
    if config.encoding not in ENCODINGS:
      raise ValueError(f"{self.name}: encoding must be one of {ENCODINGS}, got {config.encoding!r}")

  # -- what subclasses describe ---------------------------------------------------------------
  def _label_names(self) -> Sequence[str] | None:
    """Class names of ``label`` (None: the dataset has no single-label target)."""
    return DR_GRADE_NAMES

  def _extra_features(self) -> dict[str, Any]:
    """Dataset-specific features (name → TFDS feature)."""
    return {}

  @abc.abstractmethod
  def _layout(self, manual_dir: Path, bad: BadInputPolicy, report: SkipReport) -> dict[str, list[Item]]:
    """Finds the dataset in `manual_dir` and lists the examples of every split.

    Bad rows/images go through `bad(split, kind, where, reason)`; deliberate omissions are noted in
    ``report.notes``. Image files are checked (decoded) later, by the base class.
    """

  # -- TFDS plumbing --------------------------------------------------------------------------
  @property
  def image_options(self) -> ImageOptions:
    cfg = self.builder_config
    return ImageOptions(canvas_size=cfg.canvas_size, crop_fov=cfg.crop_fov, encoding=cfg.encoding)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.canvas_size
    shape = (size, size, 3) if size else (None, None, 3)
    features = {
        "image": tfds.features.Image(shape=shape, encoding_format=self.builder_config.encoding),
        "id": tfds.features.Text(doc="identifier as the label file writes it; unique within a split"),
        "file_name": tfds.features.Text(doc="source image path relative to the dataset root"),
        "dataset": tfds.features.Text(),
        "patient_id": tfds.features.Text(doc="'' where the source has none"),
        "eye": tfds.features.Text(doc="'left', 'right' or ''"),
        "modality": tfds.features.Text(),
        "categories": tfds.features.Text(doc="JSON list of FLAIR-style category texts"),
        "atributes": tfds.features.Text(doc="JSON list of FLAIR attributes (FLAIR's spelling)"),
    }
    names = self._label_names()
    if names is not None:
      features["label"] = tfds.features.ClassLabel(names=list(names))
    features.update(self._extra_features())
    return self.dataset_info_from_configs(
        description=inspect.getdoc(type(self)) or "",
        features=tfds.features.FeaturesDict(features),
        supervised_keys=("image", "label") if names is not None else None,
        homepage=getattr(self, "HOMEPAGE", ""),
    )

  def _resolve_manual_dir(self) -> Path:
    manual = self._manual_dir_override
    if manual is None:
      manual = self._config_manual_dir
    return check_manual_dir(manual, self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)

  def _download_and_prepare(self, dl_manager, download_config=None):
    # TFDS' dl_manager.manual_dir asserts with its own message when the folder is missing; the
    # builder checks the folder itself (check_manual_dir) to say what is wrong with it.
    self._config_manual_dir = getattr(download_config, "manual_dir", None)
    config_name = self.builder_config.name if self.builder_config else ""
    self.skip_report = SkipReport(dataset=self.name, config=config_name, on_bad_input=self._on_bad_input)
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    # self.data_dir is TFDS' temporary directory here: the report is renamed with the dataset.
    self.skip_report.write(Path(self.data_dir) / SKIP_REPORT_NAME)

  def download_and_prepare(self, *args, **kwargs):
    super().download_and_prepare(*args, **kwargs)
    report = self.skip_report
    if report is not None and report.skipped:
      _log.warning("%s: skipped %d bad input item(s) %s; listed in %s", self.name, len(report.skipped),
                   report.counts(), self.skip_report_path)

  @property
  def skip_report_path(self) -> Path:
    """Where the prepared dataset's skip report lies (it exists once the build succeeded)."""
    return Path(self.data_dir) / SKIP_REPORT_NAME

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    manual_dir = self._resolve_manual_dir()
    bad = BadInputPolicy(self._on_bad_input, self.skip_report)
    layout = self._layout(manual_dir, bad, self.skip_report)
    empty = [split for split, items in layout.items() if not items]
    for split in empty:
      self.skip_report.notes.append(f"split {split!r} has no examples left and is not written")
    if not any(layout.values()):
      raise DatasetInputError(f"{self.name}: no examples left to write in {manual_dir} "
                              f"(skipped: {self.skip_report.counts()})")
    return {split: self._generate_examples(split, items) for split, items in layout.items() if items}

  def _example(self, item: Item, images: dict[str, bytes]) -> dict[str, Any]:
    """The record of `item` with its encoded `images`: the common features' defaults filled in, the
    ``categories`` / ``atributes`` lists as JSON strings."""
    example = {"patient_id": "", "eye": "", "modality": self.MODALITY, "dataset": self.DATASET_KEY or self.name,
               "categories": "[]", "atributes": "[]", **item.features, **images}
    for key in ("categories", "atributes"):
      if not isinstance(example[key], str):
        example[key] = json.dumps(list(example[key]), ensure_ascii=False)
    return example

  def _generate_examples(self, split: str, items: list[Item]) -> Iterator[tuple[str, dict]]:
    options = self.image_options
    bad = BadInputPolicy(self._on_bad_input, self.skip_report)
    workers = self._num_workers or default_num_workers()
    args = [(str(item.path), options) for item in items]
    written = 0
    for item, (ok, result) in zip(items, parallel_map(process_image, args, workers)):
      if not ok:
        bad(split, "corrupt_image", f"{item.path} (declared by {item.where})", result)
        continue
      example = self._example(item, {"image": result})
      written += 1
      yield example["id"], example
    if not written:
      raise DatasetInputError(f"{self.name}: every image of split {split!r} was skipped "
                              f"(see the skip counts: {self.skip_report.counts()})")

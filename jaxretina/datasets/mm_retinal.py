"""TFDS builder ``mm_retinal``: MM-Retinal v1 image–caption pairs from fundus atlases (docs/datasets.md#mm-retinal).

Configs per modality: ``cfp`` (2,169 colour fundus), ``ffa`` (1,947 fluorescein angiograms), ``oct``
(233 OCT). One split, ``train`` (MM-Retinal defines none; it is pretraining data).

Read from one folder holding ``<MOD>/`` (images, mixed ``.png`` / ``.jpg``) and the caption table
``<MOD>*.csv`` (``CFP_translated_v1.csv``; an ``.xlsx`` is read too) with columns ``Image_ID`` (file
name **without** extension, resolved through the folder's case-insensitive stem index, as KeepFIT
probes ``.png`` then ``.jpg``) and ``en_caption``; the Chinese caption column (``cn_caption``,
``zh_caption`` or ``ch_caption``) and ``is_multipic`` are optional.

Features: ``image`` (RGB; FFA's grey photographs are stored as RGB), ``caption`` (English),
``caption_zh`` (Chinese, ``''`` when the table has none), ``modality`` (``cfp``/``ffa``/``oct``),
``id`` (``Image_ID``), ``dataset`` (``mm_retinal``), ``is_multipic`` (int32, −1 when absent), and
the common ``file_name`` etc. ``categories`` stays empty: the caption is the text.

KeepFIT found 2 of the 2,169 CFP ids without an image file: under the default
``on_bad_input='error'`` that stops the build naming the row; build with ``--on_bad_input skip`` to
leave such rows out (listed in the skip report).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from jaxretina.datasets import bad_input
from jaxretina.datasets import file_discovery
from jaxretina.datasets import label_tables
from jaxretina.datasets import manual_builder

_INSTRUCTIONS = """\
MM-Retinal v1 (https://github.com/lxirich/MM-Retinal → Google Drive folder). Download it and extract it in
<manual_dir> so that at most 3 levels below <manual_dir> one folder (e.g. MM_Retinal_dataset_v1/) holds
  CFP/  FFA/  OCT/              images named by Image_ID (figure01-01A.jpg / .png)
  CFP_translated_v1.csv         (likewise FFA_*.csv, OCT_*.csv) with Image_ID, en_caption (and cn_caption)
Build one config per modality: --config cfp | ffa | oct.
"""

MODALITIES = ("cfp", "ffa", "oct")
_CHINESE_COLUMNS = ("cn_caption", "zh_caption", "ch_caption", "caption_zh", "caption_cn")


@dataclasses.dataclass(eq=False)
class MmRetinalConfig(manual_builder.ManualRetinaConfig):
  """Attributes: modality: 'cfp', 'ffa' or 'oct' — which image folder and caption table are read."""

  modality: str = "cfp"


class MmRetinal(manual_builder.ManualRetinaBuilder):
  """MM-Retinal v1: atlas fundus images (CFP / FFA / OCT) with English and Chinese captions."""

  name = "mm_retinal"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = "https://github.com/lxirich/MM-Retinal"
  DATASET_KEY = "mm_retinal"
  CONFIG_CLASS = MmRetinalConfig
  BUILDER_CONFIGS = [MmRetinalConfig(name=m, modality=m, description=f"{m.upper()} images, 512 px canvas, PNG.")
                     for m in MODALITIES]
  DEFAULT_CONFIG_NAME = "cfp"

  @property
  def MODALITY(self) -> str:  # noqa: N802  (the base class reads it as a class attribute)
    return self.builder_config.modality

  def _check_options(self, config) -> None:
    super()._check_options(config)
    if config.modality not in MODALITIES:
      raise ValueError(f"{self.name}: modality must be one of {MODALITIES}, got {config.modality!r}")

  def _label_names(self):
    return None

  def _extra_features(self):
    return {"caption": tfds.features.Text(doc="English caption"),
            "caption_zh": tfds.features.Text(doc="Chinese caption ('' when the table has none)"),
            "is_multipic": tfds.features.Scalar(dtype=np.int32, doc="multi-panel scan flag; -1 when absent")}

  def _find(self, manual_dir: Path) -> tuple[Path, Path]:
    """(image folder, caption table) of the configured modality."""
    folder_name = self.builder_config.modality.upper()
    found = []
    for _, folder in file_discovery.walk_dirs(manual_dir):
      images = file_discovery.resolve(folder, folder_name, kind="dir")
      if images is None:
        continue
      tables = [p for p in file_discovery.list_dir(folder) if p.is_file() and p.suffix.lower() in (".csv", ".xlsx")
                and p.name.lower().startswith(folder_name.lower())]
      if len(tables) > 1:
        csvs = [p for p in tables if p.suffix.lower() == ".csv"]
        tables = csvs if len(csvs) == 1 else tables
      if len(tables) > 1:
        raise bad_input.DatasetInputError(f"{self.name}: several caption tables for {folder_name} in {folder}: "
                                          f"{[p.name for p in tables]}; keep exactly one")
      if tables:
        found.append((images, tables[0]))
    if len(found) == 1:
      return found[0]
    if len(found) > 1:
      raise bad_input.DatasetInputError(f"{self.name}: several MM-Retinal copies below {manual_dir}: "
                                        f"{[str(t) for _, t in found]}; keep exactly one")
    # No match: the shared search explains what was found instead.
    file_discovery.find_root(manual_dir, [[f"{folder_name}_translated_v1.csv", f"{folder_name}/"]], dataset=self.name)
    raise AssertionError("find_root found a root the modality search missed")

  def _layout(self, manual_dir: Path, bad, report):
    images, table_path = self._find(manual_dir)
    table = (label_tables.read_xlsx(table_path, dataset=self.name) if table_path.suffix.lower() == ".xlsx"
             else label_tables.read_csv(table_path, dataset=self.name))
    table.require(["Image_ID", "en_caption"], self.name)
    chinese = next((c for c in table.header if c.lower() in _CHINESE_COLUMNS), None)
    if chinese is None:
      report.notes.append(f"{table_path} has no Chinese caption column ({'/'.join(_CHINESE_COLUMNS)}): "
                          f"caption_zh is ''")
    root = table_path.parent
    index = file_discovery.ImageIndex(file_discovery.image_dir(images), relative_to=root)
    items, seen = [], set()
    for line, row in table.rows:
      where = table.where(line)
      image_id = row["Image_ID"]
      if not image_id:
        bad("train", "bad_row", where, "empty Image_ID")
        continue
      if image_id.lower() in seen:
        bad("train", "duplicate_id", where, f"Image_ID {image_id!r} appears more than once (expected unique ids)")
        continue
      seen.add(image_id.lower())
      if not row["en_caption"]:
        bad("train", "bad_row", where, f"empty en_caption for {image_id!r}")
        index.claim(image_id)
        continue
      multipic = row.get("is_multipic", "")
      multipic_value = label_tables.parse_label(multipic, (0, 1)) if multipic else -1
      if multipic_value is None:
        bad("train", "bad_row", where, f"is_multipic {multipic!r} is not 0 or 1")
        index.claim(image_id)
        continue
      path = index.find(image_id, bad, "train", where)
      if path is None:
        continue
      items.append(manual_builder.Item(path, where, {
          "id": image_id, "file_name": index.relative(path), "caption": row["en_caption"],
          "caption_zh": row[chinese] if chinese else "", "is_multipic": multipic_value}))
    bad_input.check_unlabelled(index, "train", bad, table_path)
    return {"train": items}

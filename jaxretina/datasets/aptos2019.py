"""TFDS builder ``aptos2019``: APTOS 2019 Blindness Detection, Kaggle competition layout (docs/datasets.md#aptos-2019).

Splits: ``train`` (3,662 images, ``train.csv`` grades 0–4) and ``test`` (1,928 public test images
listed in ``test.csv``, **unlabelled**: ``label`` −1 — the labelled private test set was never
released). No official validation split exists.
"""

from __future__ import annotations

from pathlib import Path

import tensorflow_datasets as tfds

from jaxretina.data import dr_grades
from jaxretina.datasets import bad_input
from jaxretina.datasets import file_discovery
from jaxretina.datasets import label_tables
from jaxretina.datasets import manual_builder

_INSTRUCTIONS = """\
APTOS 2019 (Kaggle competition data; needs a Kaggle account and accepting the competition rules):
  kaggle competitions download -c aptos2019-blindness-detection
  unzip aptos2019-blindness-detection.zip -d <manual_dir>
(or download train.csv, test.csv, train_images.zip / test_images.zip from
https://www.kaggle.com/competitions/aptos2019-blindness-detection/data and unzip the image archives
in <manual_dir>). Expected, at most 3 folder levels below <manual_dir>:
  train.csv  test.csv  train_images/<id_code>.png  test_images/<id_code>.png
Doubled folders such as train_images/train_images/ are fine. Community mirrors with
train_1.csv / valid.csv are not the competition layout and are not read.
"""


class Aptos2019(manual_builder.ManualRetinaBuilder):
  """APTOS 2019 Blindness Detection: colour fundus photographs graded 0–4 (ICDR).

  Features beyond the common ones: none (``id`` = ``id_code``; no patient/eye ids in the source).
  """

  name = "aptos2019"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = "https://www.kaggle.com/competitions/aptos2019-blindness-detection"
  DATASET_KEY = "aptos2019"

  def _layout(self, manual_dir: Path, bad, report):
    root, _ = file_discovery.find_root(manual_dir, [["train.csv", "train_images/"]], dataset=self.name, hints={
        "train_1.csv": "Found train_1.csv: that is a community Kaggle mirror's re-split (train_1/valid/test, all "
                       "labelled), not the competition layout this builder reads (train.csv + train_images/).",
        "valid.csv": "Found valid.csv: that is a community mirror layout, not the competition layout "
                     "(train.csv + train_images/).",
    })
    layout = {"train": self._split(root, "train", "train.csv", "train_images", labelled=True, bad=bad)}
    test_csv = file_discovery.resolve(root, "test.csv", kind="file")
    if test_csv is not None:
      layout["test"] = self._split(root, "test", "test.csv", "test_images", labelled=False, bad=bad)
    else:
      report.notes.append(f"no test.csv in {root}: the unlabelled test split is not written")
    return layout

  def _split(self, root: Path, split: str, csv_name: str, folder: str, *, labelled: bool,
             bad) -> list[manual_builder.Item]:
    table = label_tables.read_csv(file_discovery.resolve(root, csv_name, kind="file"), dataset=self.name)
    table.require(["id_code", "diagnosis"] if labelled else ["id_code"], self.name)
    has_labels = "diagnosis" in table.header
    image_folder = file_discovery.resolve(root, folder, kind="dir")
    if image_folder is None:
      raise bad_input.DatasetInputError(f"{self.name}: {table.path} lists images but there is no {folder}/ folder "
                                        f"next to it in {root}")
    index = file_discovery.ImageIndex(file_discovery.image_dir(image_folder), relative_to=root)
    items, seen = [], set()
    for line, row in table.rows:
      where = table.where(line)
      image_id = row["id_code"]
      if not image_id:
        bad(split, "bad_row", where, "empty id_code")
        continue
      if image_id.lower() in seen:
        bad(split, "duplicate_id", where, f"id_code {image_id!r} appears more than once (expected unique ids)")
        continue
      seen.add(image_id.lower())
      label = -1
      if has_labels:
        label = label_tables.parse_label(row["diagnosis"], range(5))
        if label is None:
          bad(split, "unknown_label", where, f"diagnosis {row['diagnosis']!r} is not one of 0..4")
          index.claim(image_id)
          continue
      path = index.find(image_id, bad, split, where)
      if path is None:
        continue
      items.append(manual_builder.Item(path, where, {
          "id": image_id, "file_name": index.relative(path), "label": label,
          "categories": dr_grades.dr_categories(label) if label >= 0 else []}))
    bad_input.check_unlabelled(index, split, bad, table.path)
    return items

"""TFDS builder ``idrid``: IDRiD part B "Disease Grading", docs/datasets.md#idrid.

Splits ``train`` (413) and ``test`` (103). Test names restart at ``IDRiD_001`` and collide with
training names (different eyes): ids are unique only within a split.
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
IDRiD, https://ieee-dataport.org/open-access/indian-diabetic-retinopathy-image-dataset-idrid (CC BY 4.0).
Download "B. Disease Grading.zip" and extract it in <manual_dir> (any wrapper folder, also
'B.%20Disease%20Grading/', is fine). Expected, at most 3 levels below <manual_dir>:
  B. Disease Grading/1. Original Images/a. Training Set/IDRiD_001.jpg ...
  B. Disease Grading/1. Original Images/b. Testing Set/IDRiD_001.jpg ...
  B. Disease Grading/2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv
  B. Disease Grading/2. Groundtruths/b. IDRiD_Disease Grading_Testing Labels.csv
Part A (segmentation, IDRiD_01.jpg ...) is a different set of eyes and is not read.
"""

_ROOT_ANCHORS = ["1. Original Images/", "2. Groundtruths/"]
_SPLITS = {"train": ("*training set", "*training labels*.csv"), "test": ("*testing set", "*testing labels*.csv")}
_ME_NAMES = ("no_referable_dme", "non_clinically_significant_dme", "dme")
_ME_CATEGORIES = ("no referable diabetic macular edema", "non clinically significant diabetic macular edema",
                  "diabetic macular edema")


class Idrid(manual_builder.ManualRetinaBuilder):
  """IDRiD disease grading: 4288×2848 fundus photographs, DR grade 0–4 and risk of macular edema 0–2.

  Features beyond the common ones: ``macular_edema_risk`` (ClassLabel: 0 no referable DME,
  1 non-clinically-significant DME, 2 DME). ``id`` = ``Image name`` (no extension); no patient ids.
  """

  name = "idrid"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = "https://ieee-dataport.org/open-access/indian-diabetic-retinopathy-image-dataset-idrid"
  DATASET_KEY = "idrid"

  def _extra_features(self):
    return {"macular_edema_risk": tfds.features.ClassLabel(names=list(_ME_NAMES))}

  def _layout(self, manual_dir: Path, bad, report):
    root, _ = file_discovery.find_root(manual_dir, [_ROOT_ANCHORS], dataset=self.name, hints={
        "idrid_01.jpg": "Found IDRiD_01.jpg-style names: that is part A (segmentation); this builder reads "
                        "part B 'B. Disease Grading'."})
    originals = file_discovery.resolve(root, "1. Original Images", kind="dir")
    truths = file_discovery.resolve(root, "2. Groundtruths", kind="dir")
    layout = {}
    for split, (folder_pattern, csv_pattern) in _SPLITS.items():
      folder = file_discovery.glob_child(originals, folder_pattern, kind="dir", what=self.name)
      label_file = file_discovery.glob_child(truths, csv_pattern, kind="file", what=self.name)
      if folder is None or label_file is None:
        raise bad_input.DatasetInputError(
            f"{self.name}: {split} split needs a folder matching {folder_pattern!r} in {originals} and a label file "
            f"matching {csv_pattern!r} in {truths}; found {[p.name for p in file_discovery.list_dir(originals)]} and "
            f"{[p.name for p in file_discovery.list_dir(truths)]}")
      table = label_tables.read_csv(label_file, dataset=self.name)
      table.require(["Image name", "Retinopathy grade", "Risk of macular edema"], self.name)
      index = file_discovery.ImageIndex(file_discovery.image_dir(folder), relative_to=root)
      items, seen = [], set()
      for line, row in table.rows:
        where = table.where(line)
        name = row["Image name"]
        if name.lower() in seen:
          bad(split, "duplicate_id", where, f"Image name {name!r} appears more than once (expected unique names)")
          continue
        seen.add(name.lower())
        grade = label_tables.parse_label(row["Retinopathy grade"], range(5))
        risk = label_tables.parse_label(row["Risk of macular edema"], range(3))
        if grade is None or risk is None:
          bad(split, "unknown_label", where, f"expected Retinopathy grade 0..4 and Risk of macular edema 0..2, got "
                                             f"{row['Retinopathy grade']!r}, {row['Risk of macular edema']!r}")
          index.claim(name)
          continue
        path = index.find(name, bad, split, where)
        if path is None:
          continue
        items.append(manual_builder.Item(path, where, {
            "id": name, "file_name": index.relative(path), "label": grade, "macular_edema_risk": risk,
            "categories": [dr_grades.DR_CATEGORIES[grade], _ME_CATEGORIES[risk]]}))
      bad_input.check_unlabelled(index, split, bad, table.path)
      layout[split] = items
    return layout

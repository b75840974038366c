"""TFDS builder ``messidor2``: Messidor-2 images (ADCIS) with the adjudicated grades (Krause et al. 2018).

docs/datasets.md#messidor-2. One split, ``test`` (1,748 images; Messidor-2 is an evaluation set without an
official split — group by ``patient_id``, the examination, when splitting it).

Labels: ``label`` = adjudicated ICDR grade 0–4, or 5 ``ungradable`` for the 4 images the
adjudication marks ungradable (same convention as ``ddr``); ``drop_ungradable=True`` (config
``gradable``) leaves them out and ``label`` has 5 classes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from jaxretina.data import dr_grades
from jaxretina.datasets import bad_input
from jaxretina.datasets import file_discovery
from jaxretina.datasets import label_tables
from jaxretina.datasets import manual_builder

_INSTRUCTIONS = """\
Messidor-2 images: https://www.adcis.net/en/third-party/messidor2/ (registration; research use). Join and
extract the four-part archive in <manual_dir>:
  cat IMAGES.zip.0* > IMAGES.zip && unzip IMAGES.zip      (or: 7z x IMAGES.zip.001)
and keep messidor-2.csv (exam pairing) next to IMAGES/. Grades: download messidor_data.csv from
https://www.kaggle.com/datasets/google-brain/messidor2-dr-grades and put it (or the unzipped archive/ folder)
in <manual_dir>. Expected, at most 3 levels below <manual_dir>:
  IMAGES/<name>.png|.JPG   messidor-2.csv   messidor_data.csv (may sit in archive/)
The 512x512 'preprocess' images of some Kaggle copies are derivatives and are not read.
"""

_DME_CATEGORIES = ("no diabetic macular edema", "diabetic macular edema")


@dataclasses.dataclass(eq=False)
class Messidor2Config(manual_builder.ManualRetinaConfig):
  """Attributes: drop_ungradable: leave out the images adjudicated ungradable (5-class ``label``)."""

  drop_ungradable: bool = False


class Messidor2(manual_builder.ManualRetinaBuilder):
  """Messidor-2: 874 examinations × 2 eyes, adjudicated DR grade, referable DME and gradability.

  Features beyond the common ones: ``dme`` (adjudicated referable DME 0/1, −1 when ungradable),
  ``gradable`` (0/1). ``id`` = the grade file's ``image_id``; ``patient_id`` = examination number
  (row of ``messidor-2.csv``, ``''`` without that file); ``eye`` from its left/right column.
  """

  name = "messidor2"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = "https://www.adcis.net/en/third-party/messidor2/"
  DATASET_KEY = "messidor2"
  CONFIG_CLASS = Messidor2Config
  BUILDER_CONFIGS = [
      Messidor2Config(name="default", description="All 1,748 images; ungradable = label 5."),
      Messidor2Config(name="gradable", drop_ungradable=True, description="The 1,744 gradable images, 5 classes."),
  ]

  def _label_names(self):
    names = dr_grades.DR_GRADE_NAMES
    return names if self.builder_config.drop_ungradable else names + (dr_grades.UNGRADABLE,)

  def _extra_features(self):
    return {"dme": tfds.features.Scalar(dtype=np.int32, doc="referable DME 0/1; -1 if ungradable"),
            "gradable": tfds.features.Scalar(dtype=np.int32, doc="adjudicated gradability 0/1")}

  def _layout(self, manual_dir: Path, bad, report):
    root, _ = file_discovery.find_root(manual_dir, [["IMAGES/"]], dataset=self.name, hints={
        "*.tif": "Found .tif images: Messidor-1 (1,200 .tif images, Excel grades per base) is a different dataset; "
                 "this builder reads Messidor-2 (IMAGES/ with .png and .JPG).",
        "preprocess": "Found a 'preprocess' folder: the 512x512 images of some Kaggle copies are derivatives; "
                      "this builder reads the ADCIS originals in IMAGES/."})
    grades_file = file_discovery.find_file(manual_dir, "messidor_data.csv", dataset=self.name)
    grades = label_tables.read_csv(grades_file, dataset=self.name)
    grades.require(["image_id", "adjudicated_dr_grade", "adjudicated_dme", "adjudicated_gradable"], self.name)
    pairing = file_discovery.find_file(manual_dir, "messidor-2.csv", dataset=self.name, required=False)
    exams = {}
    if pairing is None:
      report.notes.append(f"no messidor-2.csv below {manual_dir}: patient_id/eye left empty")
    else:
      table = label_tables.read_csv(pairing, dataset=self.name, delimiter=";")
      table.require(["left", "right"], self.name)
      for exam, (_, row) in enumerate(table.rows):
        for eye in ("left", "right"):
          if row[eye]:
            exams[row[eye].lower()] = (f"{exam:04d}", eye)
    images = file_discovery.image_dir(file_discovery.resolve(root, "IMAGES", kind="dir"))
    index = file_discovery.ImageIndex(images, relative_to=root)
    split, items, seen = "test", [], set()
    for line, row in grades.rows:
      where = grades.where(line)
      name = row["image_id"]
      if name.lower() in seen:
        bad(split, "duplicate_id", where, f"image_id {name!r} appears more than once (expected unique ids)")
        continue
      seen.add(name.lower())
      gradable = label_tables.parse_label(row["adjudicated_gradable"], (0, 1))
      if gradable is None:
        bad(split, "unknown_label", where, f"adjudicated_gradable {row['adjudicated_gradable']!r} is not 0 or 1")
        index.claim(name)
        continue
      path = index.find(name, bad, split, where)
      if path is None:
        continue
      if gradable:
        grade = label_tables.parse_label(row["adjudicated_dr_grade"], range(5))
        dme = label_tables.parse_label(row["adjudicated_dme"], (0, 1))
        if grade is None or dme is None:
          bad(split, "unknown_label", where, f"gradable image needs adjudicated_dr_grade in 0..4 and adjudicated_dme "
                                             f"in 0/1, got {row['adjudicated_dr_grade']!r}, {row['adjudicated_dme']!r}")
          continue
        categories, atributes = [dr_grades.DR_CATEGORIES[grade], _DME_CATEGORIES[dme]], ["clean"]
      else:
        if self.builder_config.drop_ungradable:
          continue
        grade, dme, categories, atributes = len(dr_grades.DR_GRADE_NAMES), -1, [], ["noisy"]
      patient, eye = exams.get(path.name.lower(), exams.get(name.lower(), ("", "")))
      if pairing is not None and not patient:
        report.notes.append(f"{name} is not in {pairing.name}: patient_id/eye left empty")
      items.append(manual_builder.Item(path, where, {
          "id": name, "file_name": index.relative(path), "label": grade, "dme": dme, "gradable": gradable,
          "patient_id": patient, "eye": eye, "categories": categories, "atributes": atributes}))
    bad_input.check_unlabelled(index, split, bad, grades.path)
    if self.builder_config.drop_ungradable:
      report.notes.append("ungradable images left out (drop_ungradable)")
    return {split: items}

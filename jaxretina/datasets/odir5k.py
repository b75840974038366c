"""TFDS builder ``odir5k``: ODIR-5K (Ocular Disease Intelligent Recognition), docs/datasets.md#odir-5k.

One record per eye image. Labels are **patient-level** multi-hot over N D G C A H M O (they cover
both eyes), so there is no single-class ``label``: ``patient_labels`` holds the multi-hot vector and
the eye's own truth is its diagnostic keywords (``keywords``; ``categories`` = the keywords split on
the full-width comma ``，`` as FLAIR does). Never copy the patient labels to an eye without checking
its keywords.

Layouts read (both carry the same annotation columns):
  * official OIA-ODIR release: ``Training Set/{Images,Annotation}`` → split ``train``;
    ``Off-site Test Set/…`` → ``test``; ``On-site Test Set/…`` → ``onsite_test`` (when present);
  * Kaggle mirror (andrewmvd): ``ODIR-5K/ODIR-5K/data.xlsx`` + ``Training Images/`` → ``train``
    (its ``Testing Images/`` have no labels and are not written; ``preprocessed_images/`` and
    ``full_df.csv`` are 512 px derivatives and are not read).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from jaxretina.datasets import bad_input
from jaxretina.datasets import file_discovery
from jaxretina.datasets import label_tables
from jaxretina.datasets import manual_builder

_INSTRUCTIONS = """\
ODIR-5K, either layout:
  * official release https://github.com/nkicsl/OIA-ODIR: extract it in <manual_dir> so that
    'Training Set/Images/', 'Training Set/Annotation/training annotation (English).xlsx' (and the
    'Off-site Test Set' / 'On-site Test Set' folders) lie at most 3 levels below <manual_dir>;
  * Kaggle mirror https://www.kaggle.com/datasets/andrewmvd/ocular-disease-recognition-odir5k: unzip it in
    <manual_dir> (gives ODIR-5K/ODIR-5K/data.xlsx and ODIR-5K/ODIR-5K/Training Images/).
If the download came as a multi-part archive, join it first (cat NAME.zip.0* > NAME.zip && unzip NAME.zip).
"""

LABEL_LETTERS = ("N", "D", "G", "C", "A", "H", "M", "O")
LABEL_NAMES = ("normal", "diabetes", "glaucoma", "cataract", "age-related macular degeneration", "hypertension",
               "myopia", "other")
_COLUMNS = ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus", "Left-Diagnostic Keywords",
            "Right-Diagnostic Keywords", *LABEL_LETTERS]
_OFFICIAL_SPLITS = {"train": "Training Set", "test": "Off-site Test Set", "onsite_test": "On-site Test Set"}


class Odir5k(manual_builder.ManualRetinaBuilder):
  """ODIR-5K: left/right colour fundus photographs of 5,000 patients with diagnostic keywords.

  Features beyond the common ones: ``patient_labels`` (int32 (8,), multi-hot N D G C A H M O of the
  patient), ``keywords`` (this eye's diagnostic keywords as written), ``patient_age`` (int32, −1 if
  blank), ``patient_sex``. ``id`` = image file name; ``patient_id`` = ``ID``; ``eye`` left/right.
  """

  name = "odir5k"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = "https://github.com/nkicsl/OIA-ODIR"
  DATASET_KEY = "odir5k"

  def _label_names(self):
    return None

  def _extra_features(self):
    return {
        "patient_labels": tfds.features.Tensor(shape=(len(LABEL_LETTERS),), dtype=np.int32,
                                               doc="patient-level multi-hot N D G C A H M O"),
        "keywords": tfds.features.Text(doc="this eye's diagnostic keywords, as written"),
        "patient_age": tfds.features.Scalar(dtype=np.int32),
        "patient_sex": tfds.features.Text(),
    }

  def _layout(self, manual_dir: Path, bad, report):
    root, kind = file_discovery.find_root(manual_dir, [["Training Set/Annotation/", "Training Set/Images/"],
                                                       ["data.xlsx", "Training Images/"]], dataset=self.name, hints={
        "full_df.csv": "Found full_df.csv: the Kaggle mirror's per-image table of its 512 px preprocessed_images is "
                       "not read; keep ODIR-5K/ODIR-5K/data.xlsx and 'Training Images/' from the same download."})
    layout = {}
    if kind == 0:
      for split, folder_name in _OFFICIAL_SPLITS.items():
        folder = file_discovery.resolve(root, folder_name, kind="dir")
        if folder is None:
          report.notes.append(f"no '{folder_name}' folder in {root}: split {split!r} not written")
          continue
        annotation_dir = file_discovery.resolve(folder, "Annotation", kind="dir")
        images = file_discovery.resolve(folder, "Images", kind="dir")
        workbook = None
        if annotation_dir is not None:
          workbook = (file_discovery.glob_child(annotation_dir, "*english*.xlsx", kind="file", what=self.name)
                      or file_discovery.glob_child(annotation_dir, "*.xlsx", kind="file", what=self.name))
        if workbook is None or images is None:
          raise bad_input.DatasetInputError(f"{self.name}: {folder} needs Images/ and an Annotation/*.xlsx workbook; "
                                            f"found {[p.name for p in file_discovery.list_dir(folder)]}")
        layout[split] = self._rows(root, split, label_tables.read_xlsx(workbook, dataset=self.name), images, bad)
    else:
      workbook = file_discovery.resolve(root, "data.xlsx", kind="file")
      layout["train"] = self._rows(root, "train", label_tables.read_xlsx(workbook, dataset=self.name),
                                   file_discovery.resolve(root, "Training Images", kind="dir"), bad)
      if file_discovery.resolve(root, "Testing Images", kind="dir") is not None:
        report.notes.append("Kaggle 'Testing Images/' carry no labels: not written")
    return layout

  def _rows(self, root: Path, split: str, table: label_tables.Table, folder: Path, bad) -> list[manual_builder.Item]:
    table.require(_COLUMNS, self.name)
    index = file_discovery.ImageIndex(file_discovery.image_dir(folder), relative_to=root)
    items, patients, names = [], set(), set()
    for line, row in table.rows:
      where = table.where(line)
      patient = row["ID"]
      if patient in patients:
        bad(split, "duplicate_id", where, f"patient ID {patient!r} appears more than once (expected one row per "
                                          f"patient)")
        continue
      patients.add(patient)
      labels = [label_tables.parse_label(row[letter], (0, 1)) for letter in LABEL_LETTERS]
      if any(v is None for v in labels):
        bad(split, "unknown_label", where, f"columns {'/'.join(LABEL_LETTERS)} must be 0 or 1, got "
                                           f"{[row[letter] for letter in LABEL_LETTERS]}")
        index.claim(row["Left-Fundus"])
        index.claim(row["Right-Fundus"])
        continue
      age = label_tables.parse_label(row["Patient Age"], range(0, 150)) if row["Patient Age"] else -1
      for eye, prefix in (("left", "Left"), ("right", "Right")):
        name = row[f"{prefix}-Fundus"]
        if not name:
          bad(split, "bad_row", where, f"empty {prefix}-Fundus file name")
          continue
        if name.lower() in names:
          bad(split, "duplicate_id", where, f"image {name!r} appears more than once (expected unique file names)")
          continue
        names.add(name.lower())
        path = index.find(name, bad, split, where)
        if path is None:
          continue
        keywords = row[f"{prefix}-Diagnostic Keywords"]
        items.append(manual_builder.Item(path, where, {
            "id": name, "file_name": index.relative(path), "patient_id": patient, "eye": eye,
            "patient_labels": np.asarray(labels, np.int32), "keywords": keywords,
            "patient_age": -1 if age is None else age, "patient_sex": row["Patient Sex"],
            "categories": [k.strip() for k in keywords.split("\uff0c") if k.strip()]}))
    bad_input.check_unlabelled(index, split, bad, table.path)
    return items

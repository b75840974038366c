"""TFDS builder ``eyepacs``: Kaggle Diabetic Retinopathy Detection 2015 (EyePACS), docs/datasets.md#eyepacs.

Splits (named as TFDS' ``diabetic_retinopathy_detection``):
  * ``train`` — ``train/`` with ``trainLabels.csv`` (35,126 images);
  * ``validation`` — ``test/`` images whose ``retinopathy_solution.csv`` row says ``Usage=Public``
    (10,906);
  * ``test`` — ``Usage=Private`` (42,670);
  * ``sample`` — ``sample/`` (10 unlabelled images, ``label`` −1), when present.
Without ``retinopathy_solution.csv`` (posted in the competition forum after the end, not in the
Kaggle download) ``validation``/``test`` are not written and the skip report says so.
"""

from __future__ import annotations

import re
from pathlib import Path

import tensorflow_datasets as tfds

from jaxretina.data import dr_grades
from jaxretina.datasets import bad_input
from jaxretina.datasets import file_discovery
from jaxretina.datasets import label_tables
from jaxretina.datasets import manual_builder

_INSTRUCTIONS = """\
EyePACS / Kaggle Diabetic Retinopathy Detection (2015), https://www.kaggle.com/c/diabetic-retinopathy-detection/data
(Kaggle account; accept the rules). The images come as multi-part zips; join and extract them in <manual_dir>:
  kaggle competitions download -c diabetic-retinopathy-detection && unzip diabetic-retinopathy-detection.zip
  cat train.zip.0* > train.zip && unzip train.zip        (or: 7z x train.zip.001)
  cat test.zip.0* > test.zip && unzip test.zip           (or: 7z x test.zip.001)
  unzip sample.zip; unzip trainLabels.csv.zip
Test labels: put retinopathy_solution.csv (posted after the competition:
https://storage.googleapis.com/kaggle-forum-message-attachments/90528/2877/retinopathy_solution.csv) next to
trainLabels.csv; without it only train (and sample) are written. Expected, at most 3 levels below <manual_dir>:
  trainLabels.csv  retinopathy_solution.csv  train/<patient>_<left|right>.jpeg  test/...  [sample/...]
"""

_NAME = re.compile(r"^(\d+)_(left|right)$", re.IGNORECASE)


class Eyepacs(manual_builder.ManualRetinaBuilder):
  """EyePACS colour fundus photographs (Kaggle DR 2015), ICDR grades 0–4, both eyes per patient.

  Features beyond the common ones: ``usage`` (``'Public'`` / ``'Private'`` leaderboard subset of
  the solution file; ``''`` for train/sample). ``id`` = ``<patient>_<eye>``, ``patient_id`` and
  ``eye`` parsed from it.
  """

  name = "eyepacs"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = "https://www.kaggle.com/c/diabetic-retinopathy-detection"
  DATASET_KEY = "eyepacs"

  def _extra_features(self):
    return {"usage": tfds.features.Text(doc="'Public'/'Private' (solution file) or ''")}

  def _layout(self, manual_dir: Path, bad, report):
    root, _ = file_discovery.find_root(manual_dir, [["trainLabels.csv", "train/"]], dataset=self.name)
    labels = label_tables.read_csv(file_discovery.resolve(root, "trainLabels.csv", kind="file"), dataset=self.name)
    train_dir = file_discovery.image_dir(file_discovery.resolve(root, "train", kind="dir"))
    layout = {"train": self._rows(root, "train", labels, file_discovery.ImageIndex(train_dir, relative_to=root), bad)}
    solution = file_discovery.resolve(root, "retinopathy_solution.csv", kind="file")
    test_dir = file_discovery.resolve(root, "test", kind="dir")
    if solution is None:
      report.notes.append(f"no retinopathy_solution.csv in {root}: validation/test splits not written")
    elif test_dir is None:
      raise bad_input.DatasetInputError(f"{self.name}: {solution} is present but there is no test/ folder in {root} "
                                        f"(extract test.zip.001..007 there)")
    else:
      table = label_tables.read_csv(solution, dataset=self.name)
      table.require(["image", "level", "Usage"], self.name)
      index = file_discovery.ImageIndex(file_discovery.image_dir(test_dir), relative_to=root)
      by_usage = {"Public": "validation", "Private": "test"}
      layout.update({"validation": [], "test": []})
      for split, items in self._iter_rows("test", table, index, bad, usage_splits=by_usage):
        layout[split].append(items)
      bad_input.check_unlabelled(index, "test", bad, solution)
    sample_dir = file_discovery.resolve(root, "sample", kind="dir")
    if sample_dir is not None:
      index = file_discovery.ImageIndex(file_discovery.image_dir(sample_dir), relative_to=root)
      layout["sample"] = []
      for path in index.unused():
        patient, eye = self._ids(path.stem)
        layout["sample"].append(manual_builder.Item(path, str(path), {
            "id": path.stem, "file_name": index.relative(path), "label": -1, "usage": "",
            "patient_id": patient, "eye": eye}))
    return layout

  @staticmethod
  def _ids(name: str) -> tuple[str, str]:
    match = _NAME.match(name)
    return (match.group(1), match.group(2).lower()) if match else ("", "")

  def _rows(self, root, split, table, index, bad) -> list[manual_builder.Item]:
    table.require(["image", "level"], self.name)
    items = [item for _, item in self._iter_rows(split, table, index, bad, usage_splits=None)]
    bad_input.check_unlabelled(index, split, bad, table.path)
    return items

  def _iter_rows(self, split, table, index, bad, *, usage_splits):
    seen = set()
    for line, row in table.rows:
      where = table.where(line)
      name = row["image"]
      target = split
      if usage_splits is not None:
        target = usage_splits.get(row["Usage"])
        if target is None:
          bad(split, "bad_row", where, f"Usage {row['Usage']!r} is not one of {sorted(usage_splits)}")
          index.claim(name)
          continue
      if name.lower() in seen:
        bad(target, "duplicate_id", where, f"image {name!r} appears more than once (expected unique names)")
        continue
      seen.add(name.lower())
      label = label_tables.parse_label(row["level"], range(5))
      if label is None:
        bad(target, "unknown_label", where, f"level {row['level']!r} is not one of 0..4")
        index.claim(name)
        continue
      path = index.find(name, bad, target, where)
      if path is None:
        continue
      patient, eye = self._ids(name)
      yield target, manual_builder.Item(path, where, {
          "id": name, "file_name": index.relative(path), "label": label, "patient_id": patient, "eye": eye,
          "usage": row.get("Usage", ""), "categories": dr_grades.dr_categories(label)})

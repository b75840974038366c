"""TFDS builder ``ddr``: DDR (OIA-DDR) diabetic-retinopathy grading part, docs/datasets.md#ddr.

Splits ``train`` (6,835), ``validation`` (2,733; ``valid`` on disk), ``test`` (4,105). ``label`` is the
grade 0–4 or 5 ``ungradable`` (kept as its own class); config ``gradable`` / ``drop_ungradable=True``
leaves the ungradable images out and ``label`` has 5 classes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tensorflow_datasets as tfds

from jaxretina.data import dr_grades
from jaxretina.datasets import bad_input
from jaxretina.datasets import file_discovery
from jaxretina.datasets import label_tables
from jaxretina.datasets import manual_builder

_INSTRUCTIONS = """\
DDR (OIA-DDR), https://github.com/nkicsl/DDR-dataset (Google Drive / Baidu Drive, password ue0t). Join the
10-part archive and extract it in <manual_dir>:
  cat DDR-dataset.zip.0* > DDR-dataset.zip && unzip DDR-dataset.zip      (or: 7z x DDR-dataset.zip.001)
Expected, at most 3 levels below <manual_dir> (a doubled DDR-dataset/DDR-dataset/ is fine):
  DR_grading/{train,valid,test}.txt   DR_grading/{train,valid,test}/*.jpg
"""

_SPLITS = {"train": "train", "validation": "valid", "test": "test"}


@dataclasses.dataclass(eq=False)
class DdrConfig(manual_builder.ManualRetinaConfig):
  """Attributes: drop_ungradable: leave out grade-5 (ungradable) images; ``label`` then has 5 classes."""

  drop_ungradable: bool = False


class Ddr(manual_builder.ManualRetinaBuilder):
  """DDR colour fundus photographs with DR grades 0–4 and 5 = ungradable.

  ``id`` = file name; no patient/eye ids are distributed. Ungradable images get no category and the
  attribute ``noisy`` (FLAIR's mapping).
  """

  name = "ddr"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = "https://github.com/nkicsl/DDR-dataset"
  DATASET_KEY = "ddr"
  CONFIG_CLASS = DdrConfig
  BUILDER_CONFIGS = [
      DdrConfig(name="default", description="All images; grade 5 = ungradable kept as label 5."),
      DdrConfig(name="gradable", drop_ungradable=True, description="Grade-5 images left out; 5 classes."),
  ]

  def _label_names(self):
    names = dr_grades.DR_GRADE_NAMES
    return names if self.builder_config.drop_ungradable else names + (dr_grades.UNGRADABLE,)

  def _layout(self, manual_dir: Path, bad, report):
    anchors = [f"DR_grading/{name}.txt" for name in _SPLITS.values()]
    root, _ = file_discovery.find_root(manual_dir, [anchors], dataset=self.name)
    grading = file_discovery.resolve(root, "DR_grading", kind="dir")
    layout = {}
    dropped = 0
    for split, disk_name in _SPLITS.items():
      label_file = file_discovery.resolve(grading, f"{disk_name}.txt", kind="file")
      folder = file_discovery.resolve(grading, disk_name, kind="dir")
      if folder is None:
        raise bad_input.DatasetInputError(f"{self.name}: {label_file} lists images but there is no folder "
                                          f"{grading / disk_name}")
      index = file_discovery.ImageIndex(file_discovery.image_dir(folder), relative_to=root)
      items, seen = [], set()
      for line, text in enumerate(label_file.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not text.strip():
          continue
        where = f"{label_file} line {line}"
        fields = text.strip().rsplit(None, 1)
        if len(fields) != 2:
          bad(split, "bad_row", where, f"expected '<file name> <grade>', got {text.strip()!r}")
          continue
        name, value = fields
        if name.lower() in seen:
          bad(split, "duplicate_id", where, f"{name!r} appears more than once (expected unique file names)")
          continue
        seen.add(name.lower())
        grade = label_tables.parse_label(value, range(6))
        if grade is None:
          bad(split, "unknown_label", where, f"grade {value!r} is not one of 0..5")
          index.claim(name)
          continue
        path = index.find(name, bad, split, where)
        if path is None:
          continue
        if grade == 5 and self.builder_config.drop_ungradable:
          dropped += 1
          continue
        ungradable = grade == 5
        items.append(manual_builder.Item(path, where, {
            "id": name, "file_name": index.relative(path), "label": grade,
            "categories": [] if ungradable else dr_grades.dr_categories(grade),
            "atributes": ["noisy"] if ungradable else []}))
      bad_input.check_unlabelled(index, split, bad, label_file)
      layout[split] = items
    if dropped:
      report.notes.append(f"{dropped} ungradable (grade 5) images left out (drop_ungradable)")
    return layout

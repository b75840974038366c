"""Tiny FAKE image-folder trees (docs/datasets.md#derived-layouts): RETFound benchmark splits and a GDRBench dataset.

Like ``fake_fundus_downloads``: each ``write_<layout>(manual_dir)`` writes a handful of small images in the
real layout and returns what a correct ``image_folder`` build must produce,
``{split: {id: expected features}}`` (``id`` = ``<class>/<file>`` within the split).
"""

from __future__ import annotations

from pathlib import Path

from fake_fundus_downloads import junk, write_image

# RETFound's APTOS2019 split folders: class folders named by grade, one class missing from val.
RETFOUND_CLASSES = ["anodr", "bmild", "cmoderate", "dsevere", "eproliferative"]
RETFOUND_FILES = {
    "train": {"anodr": ["a 1.png", "a2.jpg"], "bmild": ["b1.PNG"], "cmoderate": ["c1.png"], "dsevere": ["d1.png"],
              "eproliferative": ["e1.jpeg"]},
    "val": {"anodr": ["v1.png"], "bmild": ["v2.png"], "cmoderate": ["v3.png"], "eproliferative": ["v4.png"]},
    "test": {"anodr": ["t1.png"], "bmild": ["t2.png"], "cmoderate": ["t3.png"], "dsevere": ["t4.png"],
             "eproliferative": ["t5.png", "t6.png"]},
}
SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}

GDRBENCH_CLASSES = ["nodr", "mild_npdr", "moderate_npdr", "severe_npdr", "pdr"]


def write_retfound(manual_dir: Path) -> dict:
  """``APTOS2019/APTOS2019/{train,val,test}/<class>/<image>`` (doubled by extraction), junk files included."""
  root = Path(manual_dir) / "APTOS2019" / "APTOS2019"
  expected, seed = {}, 0
  for split, classes in RETFOUND_FILES.items():
    out = expected.setdefault(SPLIT_NAMES[split], {})
    for class_name, files in classes.items():
      for name in files:
        fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}[Path(name).suffix.lower()]
        write_image(root / split / class_name / name, seed, fmt)
        seed += 1
        out[f"{class_name}/{name}"] = {"label": RETFOUND_CLASSES.index(class_name),
                                       "file_name": f"{split}/{class_name}/{name}"}
      junk(root / split / class_name)
  (root / "train" / "anodr" / "notes.txt").write_text("not an image\n")
  return expected


def retfound_root(manual_dir: Path) -> Path:
  return Path(manual_dir) / "APTOS2019" / "APTOS2019"


def write_gdrbench(manual_dir: Path, dataset: str = "DEEPDR") -> dict:
  """``<dataset>/<class>/<image>`` with GDRBench's five class folders (one image in a nested folder)."""
  root = Path(manual_dir) / dataset
  expected, seed = {}, 50
  for class_name in GDRBENCH_CLASSES:
    for k in range(2 if class_name in ("nodr", "pdr") else 1):
      name = f"{class_name}_{k}.png"
      write_image(root / class_name / name, seed)
      seed += 1
      expected[f"{class_name}/{name}"] = {"label": sorted(GDRBENCH_CLASSES).index(class_name)}
  write_image(root / "pdr" / "extra" / "nested.png", seed)
  expected["pdr/extra/nested.png"] = {"label": sorted(GDRBENCH_CLASSES).index("pdr")}
  junk(root)
  return {"train": expected}

"""Tiny FAKE downloads of MMC-AMD, GAMMA, MM-Retinal and FLAIR-format dataframes (docs/datasets.md).

Like ``fake_fundus_downloads``: each ``write_<dataset>(manual_dir)`` writes a handful of small images and
the label/caption files with the real names, headers and quirks, and returns what a correct builder
must produce, ``{split: {id: expected features}}``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from fake_fundus_downloads import junk, write_image, write_xlsx

OCT_SIZE = (20, 10)  # PIL (width, height) of the fake B-scans


def write_grey(path: Path, value: int | None = None, seed: int = 0, fmt: str | None = None) -> Path:
  """A grey 20×10 'B-scan': constant `value`, or seeded noise."""
  path.parent.mkdir(parents=True, exist_ok=True)
  w, h = OCT_SIZE
  if value is None:
    array = np.random.default_rng(seed).integers(0, 255, (h, w)).astype(np.uint8)
  else:
    array = np.full((h, w), value, np.uint8)
  fmt = fmt or {".png": "PNG", ".jpg": "JPEG"}[path.suffix.lower()]
  Image.fromarray(array, "L").save(path, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
  return path


# ---------------------------------------------------------------------------------------------
# MMC-AMD
# ---------------------------------------------------------------------------------------------
MMC_CFP = ["f-h-100", "f-h-101", "f-d-200", "f-p-300", "f-w-400", "f-w-401"]
MMC_OCT = ["o-h-100", "o-h-101", "o-h-102", "o-d-200", "o-d-200_2", "o-p-300", "o-w-400"]
_MMC_LETTERS = "hdpw"

# scheme → split folder → (cfp ids, oct ids, mm.txt pairs or None)
MMC_SPLITS = {
    "splitA": {
        "train": (["f-h-100", "f-d-200", "f-w-401"], ["o-h-100", "o-d-200", "o-d-200_2", "o-h-102"], None),
        "val": (["f-p-300"], ["o-p-300"], [("f-p-300", "o-p-300")]),
        "test": (["f-w-400", "f-h-101"], ["o-w-400", "o-h-101"], [("f-w-400", "o-w-400"), ("f-h-101", "o-h-101")]),
    },
    "splitAP": {
        "train": (["f-h-100", "f-h-101", "f-w-400"], ["o-h-100", "o-h-101", "o-w-400"], None),
        "val": (["f-d-200"], ["o-d-200", "o-d-200_2"], [("f-d-200", "o-d-200"), ("f-d-200", "o-d-200_2")]),
        "test": (["f-p-300", "f-w-401"], ["o-p-300", "o-h-102"], [("f-p-300", "o-p-300")]),
    },
}


def _eye(image_id: str) -> str:
  return image_id[2:].split("_")[0]


def write_mmc_amd(manual_dir: Path, scheme: str = "splitA") -> dict:
  """Image package + both split packages; the train folder's ``ImageData`` is a symlink, others lack it."""
  root = Path(manual_dir) / "MMC-AMD download"
  data = root / "mmc-amd" / "ImageData"
  for k, image_id in enumerate(MMC_CFP):
    write_image(data / "cfp-clahe-448x448" / f"{image_id}.jpg", k)
  for k, image_id in enumerate(MMC_OCT):
    write_grey(data / "oct-median3x3-448x448" / f"{image_id}.jpg", seed=k)
  junk(data / "cfp-clahe-448x448")
  for name, splits in MMC_SPLITS.items():
    for disk, (cfps, octs, pairs) in splits.items():
      folder = root / f"mmc-amd-{name}-{disk}"
      for sub in ("ImageSets", "EyeSets", "SubjectSets", "annotations"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
      for modality, ids in (("cfp", cfps), ("oct", octs)):
        (folder / "ImageSets" / f"{modality}.txt").write_text("".join(f"{i}\n" for i in ids))
        (folder / "annotations" / f"{modality}.txt").write_text(
            "".join(f"{i} {_MMC_LETTERS.index(i.split('-')[1])}\n" for i in ids))
        eyes = "".join(f"{e}\n" for e in sorted({_eye(i) for i in ids}))
        (folder / "EyeSets" / f"{modality}.txt").write_text(eyes)
        (folder / "SubjectSets" / f"{modality}.txt").write_text(eyes)  # one eye per subject in the fake
      if pairs is not None:
        (folder / "ImageSets" / "mm.txt").write_text("".join(f"{a} {b}\n" for a, b in pairs))
      if disk == "train":
        os.symlink(os.path.relpath(data, folder), folder / "ImageData")
  expected = {}
  for disk, split in (("train", "train"), ("val", "validation"), ("test", "test")):
    cfps, octs, pairs = MMC_SPLITS[scheme][disk]
    if pairs is None:
      pairs = [(c, o) for c in cfps for o in octs if _eye(c) == _eye(o)]
    expected[split] = {f"{c}+{o}": {"label": _MMC_LETTERS.index(c.split("-")[1]), "cfp_id": c, "oct_id": o,
                                    "eye_id": _eye(c)} for c, o in pairs}
  return expected


def mmc_paths(manual_dir: Path) -> dict:
  root = Path(manual_dir) / "MMC-AMD download"
  return {"root": root, "cfp": root / "mmc-amd" / "ImageData" / "cfp-clahe-448x448",
          "oct": root / "mmc-amd" / "ImageData" / "oct-median3x3-448x448",
          "train": root / "mmc-amd-splitA-train", "test": root / "mmc-amd-splitA-test"}


# ---------------------------------------------------------------------------------------------
# GAMMA
# ---------------------------------------------------------------------------------------------
GAMMA_SLICES = 12
GAMMA_TRAIN = [(1, (1, 0, 0)), (2, (0, 1, 0)), (3, (0, 0, 1)), (10, (1, 0, 0))]
GAMMA_TEST = [101, 102]


def slice_value(case: int, k: int) -> int:
  """Grey level of B-scan `k` of `case` (constant per slice, distinct per slice)."""
  return 10 + 15 * k + case % 7


def write_gamma_case(folder: Path, case: int, seed: int) -> None:
  name = f"{case:04d}"
  write_image(folder / name / f"{name}.jpg", seed)
  for k in range(GAMMA_SLICES):
    write_grey(folder / name / name / f"{k}_image.jpg", slice_value(case, k))
  junk(folder / name / name)


def write_gamma(manual_dir: Path) -> dict:
  """``Glaucoma_grading/training`` with the GT workbook (``data`` integer, one-hot columns) + unlabelled ``testing``."""
  root = Path(manual_dir) / "GAMMA" / "Glaucoma_grading"
  training = root / "training"
  write_xlsx(training / "glaucoma_grading_training_GT.xlsx",
             [["data", "non", "early", "mid_advanced"]] + [[case, *one_hot] for case, one_hot in GAMMA_TRAIN])
  for k, (case, _) in enumerate(GAMMA_TRAIN):
    write_gamma_case(training / "multi-modality_images", case, k)
  junk(training / "multi-modality_images")
  write_xlsx(Path(manual_dir) / "GAMMA" / "fovea_localization_training_GT.xlsx", [["data", "Fovea_X", "Fovea_Y"]])
  for k, case in enumerate(GAMMA_TEST):
    write_gamma_case(root / "testing" / "multi-modality_images", case, 50 + k)
  return {"train": {f"{case:04d}": {"label": one_hot.index(1), "oct_num_slices": GAMMA_SLICES}
                    for case, one_hot in GAMMA_TRAIN},
          "test": {f"{case:04d}": {"label": -1, "oct_num_slices": GAMMA_SLICES} for case in GAMMA_TEST}}


def gamma_paths(manual_dir: Path) -> dict:
  training = Path(manual_dir) / "GAMMA" / "Glaucoma_grading" / "training"
  return {"training": training, "gt": training / "glaucoma_grading_training_GT.xlsx",
          "images": training / "multi-modality_images"}


# ---------------------------------------------------------------------------------------------
# MM-Retinal
# ---------------------------------------------------------------------------------------------
MM_CFP = [("figure01-01A", ".jpg", "正常人右眼眼底彩色像", "Color image of the fundus of the right eye in a normal person", "0"),
          ("figure9-9-15A", ".png", "视盘水肿", "Optic disc edema, with blurred margins", "1"),
          ("figure11-01-20b", ".JPG", "黄斑裂孔", "Macular hole. Same person as Figure 11-1-20A", "0"),
          ("figure04-40", ".png", "玻璃膜疣", "Drusen (\"hard\"), scattered", "0")]
MM_FFA = [("figure01-05B", ".jpg", "荧光素血管造影", "Fundus image of the left eye, venous phase", "0"),
          ("figure02-11", ".png", "渗漏", "Late leakage", "1")]


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def write_mm_retinal(manual_dir: Path) -> dict:
  """``MM_Retinal_dataset_v1/{CFP,FFA}/`` mixed extensions + ``<MOD>_translated_v1.csv`` (quoted captions)."""
  root = Path(manual_dir) / "MM_Retinal_dataset_v1"
  for modality, rows in (("CFP", MM_CFP), ("FFA", MM_FFA)):
    for k, (image_id, ext, *_rest) in enumerate(rows):
      if modality == "FFA":
        write_grey(root / modality / f"{image_id}{ext}", seed=k)
      else:
        write_image(root / modality / f"{image_id}{ext}", k, "PNG" if ext.lower() == ".png" else "JPEG")
    _write_csv(root / f"{modality}_translated_v1.csv", ["Image_ID", "cn_caption", "en_caption", "is_multipic"],
               [[i, zh, en, m] for i, _, zh, en, m in rows])
  junk(root / "CFP")
  return {m.lower(): {"train": {i: {"caption": en, "caption_zh": zh, "is_multipic": int(mp), "modality": m.lower()}
                                for i, _, zh, en, mp in rows}}
          for m, rows in (("CFP", MM_CFP), ("FFA", MM_FFA))}


# ---------------------------------------------------------------------------------------------
# FLAIR-format dataframes
# ---------------------------------------------------------------------------------------------
def _pandas_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
  """As ``DataFrame.to_csv``: an unnamed index column first."""
  _write_csv(path, [""] + header, [[str(k)] + row for k, row in enumerate(rows)])


def write_flair_mix(manual_dir: Path) -> dict:
  """Two dataframes (categories format + MM-Retinal's caption format), a key map, and one key under manual_dir.

  Returns ``{'csv': [paths], 'key_map': path, 'manual_dir': path, 'expected': {'train': {id: features}}}``.
  """
  base = Path(manual_dir)
  messidor = [("02_MESSIDOR/images/20051020_43808_0100_PP.png", "['clean']",
               "['no diabetic retinopathy', 'no diabetic macular edema']"),
              ("02_MESSIDOR/images/IM000013.jpg", "[]", "['moderate diabetic retinopathy']")]
  aptos = [("15_APTOS/train_images/000c1434d8d7.png", "[]", "['moderate diabetic retinopathy']"),
           ("15_APTOS/train_images//001639a390f0.png", "['noisy']", "[]")]
  # The folders on disk: MESSIDOR via the key map (relative folder, .JPG on disk), APTOS under manual_dir.
  write_image(base / "local" / "messidor" / "IMAGES" / "20051020_43808_0100_PP.png", 1)
  write_image(base / "local" / "messidor" / "IMAGES" / "IM000013.JPG", 2, "JPEG")
  write_image(base / "root" / "15_APTOS" / "train_images" / "000c1434d8d7.png", 3)
  write_image(base / "root" / "15_APTOS" / "train_images" / "001639a390f0.png", 4)
  write_image(base / "root" / "15_APTOS" / "train_images" / "unused.png", 5)  # not in any dataframe: fine
  captions = [("39_MM_Retinal_dataset/CFP/figure01-01A.jpg", "Color image of the fundus, right eye, normal person")]
  write_image(base / "mm" / "CFP" / "figure01-01A.png", 6)  # the dataframe's extension lies
  frames = base / "dataframes"
  _pandas_csv(frames / "02_MESSIDOR.csv", ["image", "atributes", "categories"],
              [list(r) for r in messidor] + [list(r) for r in aptos])
  _pandas_csv(frames / "39_MM_Retinal_dataset.csv", ["image", "caption"], [list(r) for r in captions])
  key_map = frames / "key_map.json"
  key_map.write_text(json.dumps({"02_MESSIDOR": "../local/messidor",
                                 "39_MM_Retinal_dataset": str((base / "mm").resolve())}))
  expected = {}
  for image, atributes, categories in messidor + aptos:
    expected[image] = {"categories": eval(categories), "atributes": eval(atributes), "caption": "",  # noqa: S307
                       "dataset": image.split("/")[0], "source_csv": "02_MESSIDOR.csv"}
  for image, caption in captions:
    expected[image] = {"categories": [], "atributes": [], "caption": caption, "dataset": "39_MM_Retinal_dataset",
                       "source_csv": "39_MM_Retinal_dataset.csv"}
  return {"csv": [str(frames / "02_MESSIDOR.csv"), str(frames / "39_MM_Retinal_dataset.csv")],
          "key_map": str(key_map), "manual_dir": str(base / "root"), "expected": {"train": expected}}


def write_refuge_experiment(manual_dir: Path, num_rows: int = 20) -> dict:
  """FLAIR's ``25_REFUGE.csv`` transfer dataframe (class = first letter g/n of the file) + its images."""
  base = Path(manual_dir)
  rows = []
  for k in range(num_rows):
    glaucoma = k % 3 == 0
    name = f"{'g' if glaucoma else 'n'}{k + 1:04d}.jpg"
    rows.append([f"25_REFUGE/train/Images/{name}", "[]", "['glaucoma']" if glaucoma else "['no glaucoma']"])
    write_image(base / "25_REFUGE" / "train" / "Images" / name, k, "JPEG")
  path = base / "25_REFUGE.csv"
  _pandas_csv(path, ["image", "atributes", "categories"], rows)
  return {"csv": str(path), "manual_dir": str(base)}

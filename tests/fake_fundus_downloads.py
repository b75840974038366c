"""Tiny FAKE downloads of the public retinal datasets, in each official layout (docs/datasets.md).

Every ``write_<dataset>(manual_dir)`` writes a handful of 40×30 images plus label files with the
exact headers and row formats of the real distribution, including its quirks (doubled folders,
mixed-case extensions, trailing spaces in headers, spaces and ``%20`` in paths, padding columns,
OS junk files), and returns what a correct builder must produce:
``{split: {id: expected features}}`` (features: ``label`` and dataset-specific ones).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image

IMAGE_SIZE = (40, 30)  # PIL (width, height): landscape like real fundus photographs


def write_image(path: Path, seed: int, fmt: str | None = None) -> Path:
  """A 40×30 noisy 'fundus' (bright disc on black) at `path` (format from the extension)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  w, h = IMAGE_SIZE
  yy, xx = np.mgrid[:h, :w]
  disc = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (h / 2.2) ** 2
  image = (rng.integers(0, 255, (h, w, 3)) * disc[..., None]).astype(np.uint8)
  image[..., 0] = np.maximum(image[..., 0], 80 * disc)
  fmt = fmt or {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF"}[path.suffix.lower()]
  Image.fromarray(image).save(path, format=fmt)
  return path


def truncate(path: Path) -> None:
  """Cuts an image file to half its length (a truncated download)."""
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def junk(folder: Path) -> None:
  """OS junk that extraction leaves behind."""
  folder.mkdir(parents=True, exist_ok=True)
  (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
  (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")


# ---------------------------------------------------------------------------------------------
def write_aptos2019(manual_dir: Path) -> dict:
  """Competition layout inside the CLI zip's folder; doubled ``train_images/train_images/``."""
  root = Path(manual_dir) / "aptos2019-blindness-detection"
  train = [("000c1434d8d7", 2), ("001639a390f0", 4), ("0024cdab0c1e", 1), ("002c21358ce6", 0), ("005b95c28852", 3)]
  test = ["0005cfc8afb6", "003f0afdcd15"]
  root.mkdir(parents=True, exist_ok=True)
  (root / "train.csv").write_text("id_code,diagnosis\n" + "".join(f"{i},{g}\n" for i, g in train))
  (root / "test.csv").write_text("id_code\n" + "".join(f"{i}\n" for i in test))
  (root / "sample_submission.csv").write_text("id_code,diagnosis\n" + "".join(f"{i},0\n" for i in test))
  for k, (i, _) in enumerate(train):
    write_image(root / "train_images" / "train_images" / f"{i}.png", k)
  for k, i in enumerate(test):
    write_image(root / "test_images" / f"{i}.png", 100 + k)
  junk(root / "train_images" / "train_images")
  return {"train": {i: {"label": g} for i, g in train}, "test": {i: {"label": -1} for i in test}}


def aptos_paths(manual_dir: Path) -> dict:
  root = Path(manual_dir) / "aptos2019-blindness-detection"
  return {"root": root, "train_csv": root / "train.csv", "train_images": root / "train_images" / "train_images"}


def write_eyepacs(manual_dir: Path) -> dict:
  """TFDS layout; ``trainLabels.csv`` extracted as a folder holding the CSV; ``.jpeg`` files; sample/."""
  root = Path(manual_dir)
  train = [("10_left", 0), ("10_right", 0), ("13_left", 0), ("15_left", 1), ("15_right", 2), ("16_left", 4)]
  solution = [("1_left", 0, "Private"), ("1_right", 0, "Private"), ("3_left", 2, "Public"), ("3_right", 3, "Public"),
              ("5_left", 1, "Private")]
  sample = ["20_left", "20_right"]
  (root / "trainLabels.csv").mkdir(parents=True, exist_ok=True)
  (root / "trainLabels.csv" / "trainLabels.csv").write_text("image,level\n" + "".join(f"{i},{g}\n" for i, g in train))
  (root / "retinopathy_solution.csv").write_text(
      "image,level,Usage\n" + "".join(f"{i},{g},{u}\n" for i, g, u in solution))
  (root / "sampleSubmission.csv").write_text("image,level\n" + "".join(f"{i},0\n" for i, _, _ in solution))
  for k, (i, _) in enumerate(train):
    write_image(root / "train" / f"{i}.jpeg", k)
  for k, (i, _, _) in enumerate(solution):
    write_image(root / "test" / f"{i}.jpeg", 50 + k)
  for k, i in enumerate(sample):
    write_image(root / "sample" / f"{i}.jpeg", 90 + k)
  junk(root / "train")

  def eye(i):
    patient, side = i.split("_")
    return {"patient_id": patient, "eye": side}

  return {"train": {i: {"label": g, "usage": "", **eye(i)} for i, g in train},
          "validation": {i: {"label": g, "usage": u, **eye(i)} for i, g, u in solution if u == "Public"},
          "test": {i: {"label": g, "usage": u, **eye(i)} for i, g, u in solution if u == "Private"},
          "sample": {i: {"label": -1, **eye(i)} for i in sample}}


def write_messidor2(manual_dir: Path) -> dict:
  """ADCIS ``IMAGES/`` (png + ``.JPG``) in a folder with spaces; Kaggle grades in ``archive/``."""
  root = Path(manual_dir) / "Messidor 2 (ADCIS)"
  exams = [("20051020_43808_0100_PP.png", "20051020_43832_0100_PP.png"), ("IM000013.JPG", "IM000012.JPG"),
           ("IM002385.JPG", "IM004176.JPG")]
  grades = {"20051020_43808_0100_PP.png": ("0", "0", "1"), "20051020_43832_0100_PP.png": ("1", "0", "1"),
            "IM000013.jpg": ("3", "1", "1"), "IM000012.jpg": ("4", "0", "1"), "IM002385.jpg": ("2", "1", "1"),
            "IM004176.jpg": ("", "", "0")}
  for k, name in enumerate(n for pair in exams for n in pair):
    write_image(root / "IMAGES" / name, k, "PNG" if name.endswith(".png") else "JPEG")
  junk(root / "IMAGES")
  (root / "messidor-2.csv").write_text("left;right  \n" + "".join(f"{a};{b}\n" for a, b in exams))
  archive = Path(manual_dir) / "archive"
  archive.mkdir(parents=True, exist_ok=True)
  (archive / "messidor_data.csv").write_text(
      "image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable\n"
      + "".join(f"{name},{g},{d},{q}\n" for name, (g, d, q) in grades.items()))
  (archive / "messidor_readme.txt").write_text("Adjudicated grades (Krause et al. 2018).\n")
  eyes = {}
  for exam, (left, right) in enumerate(exams):
    eyes[left.lower()] = (f"{exam:04d}", "left")
    eyes[right.lower()] = (f"{exam:04d}", "right")
  expected = {}
  for name, (g, d, q) in grades.items():
    patient, side = eyes[name.lower()]
    expected[name] = {"label": int(g) if q == "1" else 5, "dme": int(d) if q == "1" else -1, "gradable": int(q),
                      "patient_id": patient, "eye": side}
  return {"test": expected}


def write_ddr(manual_dir: Path) -> dict:
  """``DDR-dataset/DDR-dataset/DR_grading`` (doubled); ``valid`` naming; grade 5 present."""
  grading = Path(manual_dir) / "DDR-dataset" / "DDR-dataset" / "DR_grading"
  splits = {"train": [("007-0004-000.jpg", 0), ("007-0007-000.jpg", 2), ("20170120215354919.jpg", 5),
                      ("007-3280-200.jpg", 4)],
            "valid": [("007-5875-300.jpg", 1), ("20170323093305605.jpg", 5)],
            "test": [("007-0010-000.jpg", 3), ("20170323093305999.jpg", 0)]}
  seed = 0
  for disk, rows in splits.items():
    grading.mkdir(parents=True, exist_ok=True)
    (grading / f"{disk}.txt").write_text("".join(f"{n} {g}\n" for n, g in rows))
    for name, _ in rows:
      write_image(grading / disk / name, seed)
      seed += 1
  (Path(manual_dir) / "DDR-dataset" / "DDR-dataset" / "lesion_segmentation" / "train" / "image").mkdir(parents=True)
  names = {"train": "train", "valid": "validation", "test": "test"}
  return {names[d]: {n: {"label": g} for n, g in rows} for d, rows in splits.items()}


def write_idrid(manual_dir: Path) -> dict:
  """``B.%20Disease%20Grading/B. Disease Grading/``; padded training CSV with a trailing-space header."""
  root = Path(manual_dir) / "B.%20Disease%20Grading" / "B. Disease Grading"
  train = [("IDRiD_001", 3, 2), ("IDRiD_002", 3, 2), ("IDRiD_003", 2, 2), ("IDRiD_004", 0, 0), ("IDRiD_005", 1, 1)]
  test = [("IDRiD_001", 4, 2), ("IDRiD_002", 0, 0), ("IDRiD_003", 2, 1)]
  for k, (name, _, _) in enumerate(train):
    write_image(root / "1. Original Images" / "a. Training Set" / f"{name}.jpg", k)
  for k, (name, _, _) in enumerate(test):
    write_image(root / "1. Original Images" / "b. Testing Set" / f"{name}.jpg", 40 + k)
  truths = root / "2. Groundtruths"
  truths.mkdir(parents=True, exist_ok=True)
  pad = "," * 9
  (truths / "a. IDRiD_Disease Grading_Training Labels.csv").write_text(
      f"Image name,Retinopathy grade,Risk of macular edema {pad}\n"
      + "".join(f"{n},{g},{m}{pad}\n" for n, g, m in train) + f",,{pad}\n")
  (truths / "b. IDRiD_Disease Grading_Testing Labels.csv").write_text(
      "Image name,Retinopathy grade,Risk of macular edema \n" + "".join(f"{n},{g},{m}\n" for n, g, m in test))
  return {"train": {n: {"label": g, "macular_edema_risk": m} for n, g, m in train},
          "test": {n: {"label": g, "macular_edema_risk": m} for n, g, m in test}}


ODIR_COLUMNS = ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus", "Left-Diagnostic Keywords",
                "Right-Diagnostic Keywords", "N", "D", "G", "C", "A", "H", "M", "O"]


def write_xlsx(path: Path, rows: list[list]) -> None:
  """A minimal .xlsx (first sheet; strings as shared strings, numbers as numbers), as Excel writes it."""
  shared: list[str] = []
  cells_xml = []
  for r, row in enumerate(rows, start=1):
    cells = []
    for c, value in enumerate(row):
      ref = f"{chr(ord('A') + c)}{r}"
      if isinstance(value, (int, float)):
        cells.append(f'<c r="{ref}"><v>{float(value) if c == 1 else value}</v></c>')
      else:
        if value not in shared:
          shared.append(value)
        cells.append(f'<c r="{ref}" t="s"><v>{shared.index(value)}</v></c>')
    cells_xml.append(f'<row r="{r}">{"".join(cells)}</row>')
  main = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
  rel = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
  files = {
      "[Content_Types].xml": '<?xml version="1.0" encoding="UTF-8"?><Types xmlns="http://schemas.openxmlformats.org/'
                             'package/2006/content-types"/>',
      "xl/workbook.xml": f'<?xml version="1.0" encoding="UTF-8"?><workbook xmlns="{main}" xmlns:r="{rel}"><sheets>'
                         f'<sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>',
      "xl/_rels/workbook.xml.rels": '<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="http://schemas.'
                                    'openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="'
                                    f'{rel}/worksheet" Target="worksheets/sheet1.xml"/></Relationships>',
      "xl/sharedStrings.xml": f'<?xml version="1.0" encoding="UTF-8"?><sst xmlns="{main}">'
                              + "".join(f"<si><t>{escape(s)}</t></si>" for s in shared) + "</sst>",
      "xl/worksheets/sheet1.xml": f'<?xml version="1.0" encoding="UTF-8"?><worksheet xmlns="{main}"><sheetData>'
                                  + "".join(cells_xml) + "</sheetData></worksheet>",
  }
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as z:
    for name, text in files.items():
      z.writestr(name, text.encode("utf-8"))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())


_ODIR_TRAIN = [
    [0, 69, "Female", "0_left.jpg", "0_right.jpg", "cataract", "normal fundus", 0, 0, 0, 1, 0, 0, 0, 0],
    [1, 57, "Male", "1_left.jpg", "1_right.jpg", "normal fundus", "normal fundus", 1, 0, 0, 0, 0, 0, 0, 0],
    [4, 53, "Male", "4_left.jpg", "4_right.jpg", "macular epiretinal membrane",
     "moderate non proliferative retinopathy\uff0cmacular epiretinal membrane", 0, 1, 0, 0, 0, 0, 0, 1],
]
_ODIR_TEST = [[937, 62, "Female", "937_left.jpg", "937_right.jpg", "glaucoma", "normal fundus",
               0, 0, 1, 0, 0, 0, 0, 0]]


def _odir_expected(rows) -> dict:
  out = {}
  for row in rows:
    for eye, name, keywords in (("left", row[3], row[5]), ("right", row[4], row[6])):
      out[name] = {"patient_id": str(row[0]), "eye": eye, "patient_labels": list(row[7:15]), "keywords": keywords,
                   "patient_age": row[1], "categories": [k for k in keywords.split("\uff0c")]}
  return out


def write_odir5k(manual_dir: Path) -> dict:
  """Official OIA-ODIR layout: ``Training Set`` / ``Off-site Test Set`` with Images/ and Annotation/*.xlsx."""
  root = Path(manual_dir) / "OIA-ODIR"
  for folder, rows, workbook in (("Training Set", _ODIR_TRAIN, "training annotation (English).xlsx"),
                                 ("Off-site Test Set", _ODIR_TEST, "off-site test annotation (English).xlsx")):
    write_xlsx(root / folder / "Annotation" / workbook, [ODIR_COLUMNS] + rows)
    for k, row in enumerate(rows):
      write_image(root / folder / "Images" / row[3], 2 * k + len(folder))
      write_image(root / folder / "Images" / row[4], 2 * k + 1 + len(folder))
  return {"train": _odir_expected(_ODIR_TRAIN), "test": _odir_expected(_ODIR_TEST)}


def write_odir5k_kaggle(manual_dir: Path) -> dict:
  """Kaggle mirror: ``ODIR-5K/ODIR-5K/data.xlsx`` + ``Training Images/`` (+ unlabelled ``Testing Images/``)."""
  root = Path(manual_dir) / "ODIR-5K" / "ODIR-5K"
  write_xlsx(root / "data.xlsx", [ODIR_COLUMNS] + _ODIR_TRAIN)
  for k, row in enumerate(_ODIR_TRAIN):
    write_image(root / "Training Images" / row[3], 2 * k)
    write_image(root / "Training Images" / row[4], 2 * k + 1)
  write_image(root / "Testing Images" / "1000_left.jpg", 77)
  (Path(manual_dir) / "full_df.csv").write_text(",".join(ODIR_COLUMNS) + ",filepath,labels,target,filename\n")
  return {"train": _odir_expected(_ODIR_TRAIN)}


WRITERS = {"aptos2019": write_aptos2019, "eyepacs": write_eyepacs, "messidor2": write_messidor2, "ddr": write_ddr,
           "idrid": write_idrid, "odir5k": write_odir5k}

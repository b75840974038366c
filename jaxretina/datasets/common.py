"""Shared machinery of the manual-download retinal dataset builders (docs/datasets.md#how-the-builders-read-a-download).

Every builder of a public dataset (``aptos2019``, ``eyepacs``, ``messidor2``, ``ddr``, ``idrid``,
``odir5k``, ...) subclasses :class:`ManualRetinaBuilder` and only describes its layout: which
anchor files identify the dataset root, how label files map to images. This module implements
the cross-cutting rules once:

* the dataset root is found by content (anchor files at most 3 levels below ``manual_dir``), with
  an error listing what *was* found, naming multi-part archives that still need joining and
  derived layouts (community mirrors; image-folder trees, which the ``image_folder`` builder reads)
  the builder does not read;
* image files resolve case-insensitively, by full name first and by stem when the label file's
  extension lies; a stem matching two files is reported, never guessed;
* CSV / XLSX headers are stripped, fully empty padding columns and blank rows dropped; OS junk
  (``.DS_Store``, ``Thumbs.db``, ``__MACOSX``) ignored; numbered names sort numerically;
* bad input (corrupt image, label row without image, image without label row, duplicate id,
  label outside the known set) goes through one policy: ``on_bad_input='error'`` raises
  :class:`DatasetInputError` naming the file/row and what was expected, ``'skip'`` counts and lists
  it in a :class:`SkipReport` written next to the prepared dataset
  (``<data_dir>/<name>/<config>/<version>/skip_report.json``);
* images are decoded (PIL, verified), optionally cropped to the field of view, pre-resized to a
  square canvas (FLAIR's longest-side resize + zero pad) and re-encoded, in a pool of spawned
  processes with the output order preserved.

TFDS writes every build into a temporary directory that is renamed only when all splits are
written, so a build that fails (any error, including bad input under ``'error'``) leaves no
prepared dataset behind.
"""

from __future__ import annotations

import abc
import collections
import concurrent.futures
import csv
import dataclasses
import fnmatch
import inspect
import io
import json
import logging
import multiprocessing
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from xml.etree import ElementTree

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from jaxretina.data import preprocess

_log = logging.getLogger(__name__)

ON_BAD_INPUT = ("error", "skip")
ENCODINGS = ("png", "jpeg")
JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "__macosx"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
MAX_SEARCH_DEPTH = 3
SKIP_REPORT_NAME = "skip_report.json"

# The 5-grade ICDR scale shared by APTOS, EyePACS, Messidor-2, DDR and IDRiD, and FLAIR's category
# texts for it (docs/datasets.md#flair-category-texts).
DR_GRADE_NAMES = ("no_dr", "mild", "moderate", "severe", "proliferative")
DR_CATEGORIES = ("no diabetic retinopathy", "mild diabetic retinopathy", "moderate diabetic retinopathy",
                 "severe diabetic retinopathy", "proliferative diabetic retinopathy")
UNGRADABLE = "ungradable"

# Archive parts that must be joined by the user before the builder can read anything.
_MULTIPART_PATTERNS = ("*.zip.0[0-9][0-9]", "*.z[0-9][0-9]", "*.7z.0[0-9][0-9]", "*.part[0-9]*.rar",
                       "*.tar.gz.0[0-9][0-9]")
_ARCHIVE_PATTERNS = ("*.zip", "*.7z", "*.rar", "*.tar", "*.tar.gz", "*.tgz")


class DatasetInputError(ValueError):
  """The manual download does not match the documented layout, or holds bad input (file/row named)."""


# ---------------------------------------------------------------------------------------------
# Files and folders
# ---------------------------------------------------------------------------------------------
def is_junk(name: str) -> bool:
  """OS junk that extraction leaves in dataset folders (never data)."""
  lower = name.lower()
  return lower in JUNK_NAMES or lower.startswith("._")


def numeric_sort_key(name: str) -> tuple:
  """Sort key treating digit runs as numbers: ``2_image`` < ``10_image`` < ``100_image``."""
  parts = re.split(r"(\d+)", str(name))
  return tuple((0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in parts if p)


def list_dir(folder: Path) -> list[Path]:
  """Entries of `folder` without OS junk, numerically sorted."""
  return sorted((p for p in Path(folder).iterdir() if not is_junk(p.name)), key=lambda p: numeric_sort_key(p.name))


def child(folder: Path, name: str) -> Path | None:
  """The entry of `folder` called `name`, matched case-insensitively when there is no exact match."""
  folder = Path(folder)
  exact = folder / name
  if exact.exists():
    return exact
  if not folder.is_dir():
    return None
  matches = [p for p in folder.iterdir() if p.name.lower() == name.lower()]
  return matches[0] if len(matches) == 1 else None


def resolve(folder: Path, relative: str, *, kind: str = "any") -> Path | None:
  """``folder/relative`` with each component matched case-insensitively (None if absent).

  `kind` is ``'file'``, ``'dir'`` or ``'any'``. A file whose name became a *folder* holding the
  file (``trainLabels.csv/trainLabels.csv``, left by some unzip tools) resolves to the inner file.
  """
  path = Path(folder)
  for part in Path(relative).parts:
    path = child(path, part)
    if path is None:
      return None
  if kind == "file" and path.is_dir():
    inner = child(path, path.name)
    path = inner if inner is not None and inner.is_file() else None
  elif kind == "dir" and not path.is_dir():
    return None
  return path


def glob_child(folder: Path, pattern: str, *, kind: str = "any", what: str = "") -> Path | None:
  """The single entry of `folder` whose name matches the shell `pattern` case-insensitively.

  None when nothing matches; DatasetInputError when several do.
  """
  matches = [p for p in list_dir(folder) if fnmatch.fnmatch(p.name.lower(), pattern.lower())
             and (kind == "any" or (kind == "dir") == p.is_dir())]
  if len(matches) > 1:
    raise DatasetInputError(f"{what or 'the builder'}: several entries of {folder} match {pattern!r}: "
                            f"{[p.name for p in matches]}; expected exactly one")
  return matches[0] if matches else None


def walk_dirs(base: Path, max_depth: int = MAX_SEARCH_DEPTH) -> Iterator[tuple[int, Path]]:
  """(depth, folder) for `base` and every folder at most `max_depth` levels below it (junk skipped)."""
  frontier = [Path(base)]
  for depth in range(max_depth + 1):
    next_frontier = []
    for folder in frontier:
      yield depth, folder
      if depth < max_depth:
        try:
          next_frontier.extend(p for p in list_dir(folder) if p.is_dir() and not p.name.startswith("."))
        except OSError:
          continue
    frontier = next_frontier


def image_dir(folder: Path) -> Path:
  """`folder`, or the same-named folder nested in it when extraction doubled it (``x/x/``)."""
  folder = Path(folder)
  for _ in range(2):
    entries = list_dir(folder)
    has_images = any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in entries)
    inner = [p for p in entries if p.is_dir() and p.name.lower() == folder.name.lower()]
    if has_images or len(inner) != 1:
      break
    folder = inner[0]
  return folder


def _describe_tree(base: Path, max_depth: int = MAX_SEARCH_DEPTH, limit: int = 40) -> str:
  lines = []
  for depth, folder in walk_dirs(base, max_depth):
    if depth == 0:
      continue
    files = [p for p in list_dir(folder) if p.is_file()]
    rel = folder.relative_to(base)
    lines.append(f"  {rel}/ ({len(files)} files{', e.g. ' + files[0].name if files else ''})")
    if len(lines) >= limit:
      lines.append("  ...")
      break
  top_files = [p.name for p in list_dir(base) if p.is_file()]
  if top_files:
    lines.insert(0, f"  files: {top_files[:15]}{' ...' if len(top_files) > 15 else ''}")
  return "\n".join(lines) if lines else "  (nothing)"


def _find_matching(base: Path, patterns: Sequence[str], max_depth: int = MAX_SEARCH_DEPTH) -> list[Path]:
  found = []
  for _, folder in walk_dirs(base, max_depth):
    try:
      entries = list_dir(folder)
    except OSError:
      continue
    found.extend(p for p in entries if p.is_file() and any(fnmatch.fnmatch(p.name.lower(), pat) for pat in patterns))
  return found


_GDRBENCH_CLASSES = frozenset({"nodr", "mild_npdr", "moderate_npdr", "severe_npdr", "pdr"})


def _derived_layout_hints(manual_dir: Path, max_depth: int) -> list[str]:
  """Explanations for derived layouts brought instead of the official download (docs/datasets.md#derived-layouts)."""
  hints = []
  for _, folder in walk_dirs(manual_dir, max_depth):
    subdirs = {p.name.lower(): p for p in list_dir(folder) if p.is_dir()}
    if len(_GDRBENCH_CLASSES & set(subdirs)) >= 3:
      hints.append(f"{folder} holds GDRBench-style class folders ({sorted(_GDRBENCH_CLASSES & set(subdirs))}) of "
                   f"preprocessed images: a derived layout, not the official download this builder reads. Build it "
                   f"with the image_folder builder instead: python -m jaxretina.datasets build image_folder "
                   f"--manual_dir '{folder}' --data_dir DIR (one split, 'train' unless --split names another).")
      break
    split_dirs = [subdirs[s] for s in ("train", "val", "test") if s in subdirs]
    if len(split_dirs) >= 2 and all(any(c.is_dir() and any(f.suffix.lower() in IMAGE_EXTENSIONS
                                                             for f in list_dir(c)) for c in list_dir(d))
                                    for d in split_dirs):
      hints.append(f"{folder} is an image-folder tree (<split>/<class>/<image>, e.g. RETFound's benchmark "
                   f"splits): a derived layout with its own splits and class folders, not the official download "
                   f"this builder reads. Build it with the image_folder builder instead: python -m "
                   f"jaxretina.datasets build image_folder --manual_dir '{folder}' --data_dir DIR.")
      break
  return hints


def check_manual_dir(manual_dir, dataset: str, instructions: str) -> Path:
  """`manual_dir` as a Path, or DatasetInputError when it is missing, not a folder or empty."""
  if manual_dir is None or str(manual_dir) == "":
    raise DatasetInputError(f"{dataset}: no manual_dir given. {instructions.strip()}")
  path = Path(manual_dir).expanduser()
  if not path.exists():
    raise DatasetInputError(f"{dataset}: manual_dir {path} does not exist. {instructions.strip()}")
  if not path.is_dir():
    raise DatasetInputError(f"{dataset}: manual_dir {path} is not a folder. {instructions.strip()}")
  if not any(not is_junk(p.name) for p in path.iterdir()):
    raise DatasetInputError(f"{dataset}: manual_dir {path} is empty. {instructions.strip()}")
  return path


def find_root(manual_dir: Path, anchor_sets: Sequence[Sequence[str]], *, dataset: str,
              hints: dict[str, str] | None = None, max_depth: int = MAX_SEARCH_DEPTH) -> tuple[Path, int]:
  """The dataset root below `manual_dir`, found by its anchor files (docs/datasets.md#finding-the-dataset-root).

  Args:
    manual_dir: the user's download folder (checked with `check_manual_dir` first).
    anchor_sets: alternative layouts; each a list of relative paths (a trailing ``/`` = a folder)
      that must all exist (case-insensitively) under the root.
    dataset: name for messages.
    hints: shell patterns of file names → explanation, added to the error when such a file is
      present (derived layouts, e.g. a Kaggle mirror's ``train_1.csv``).
  Returns:
    (root, index of the anchor set that matched).
  Raises:
    DatasetInputError: no folder or several folders match; the message lists what was found,
      multi-part archives to join and archives to extract.
  """
  candidates = []
  for _, folder in walk_dirs(manual_dir, max_depth):
    for index, anchors in enumerate(anchor_sets):
      if all(resolve(folder, a.rstrip("/"), kind="dir" if a.endswith("/") else "file") is not None
             for a in anchors):
        candidates.append((folder, index))
        break
  if len(candidates) == 1:
    return candidates[0]
  expected = " or ".join("{" + ", ".join(a) + "}" for a in anchor_sets)
  if candidates:
    raise DatasetInputError(f"{dataset}: found several dataset roots below manual_dir {manual_dir} (each holding "
                            f"{expected}): {[str(c[0]) for c in candidates]}; keep exactly one copy")
  message = [f"{dataset}: could not find the dataset below manual_dir {manual_dir}: expected a folder (at most "
             f"{max_depth} levels deep) holding {expected}."]
  parts = _find_matching(manual_dir, _MULTIPART_PATTERNS)
  if parts:
    message.append("Found parts of a multi-part archive that must be joined and extracted first: "
                   f"{sorted(str(p.relative_to(manual_dir)) for p in parts)[:10]} (e.g. `cat NAME.zip.0* > NAME.zip "
                   f"&& unzip NAME.zip`, or `7z x NAME.zip.001`, inside {manual_dir}).")
  archives = [p for p in _find_matching(manual_dir, _ARCHIVE_PATTERNS) if p not in parts]
  if archives:
    message.append(f"Found archives that must be extracted first: "
                   f"{sorted(str(p.relative_to(manual_dir)) for p in archives)[:10]}.")
  message.extend(_derived_layout_hints(manual_dir, max_depth))
  for pattern, hint in (hints or {}).items():
    if _find_matching(manual_dir, (pattern.lower(),)) or any(
        fnmatch.fnmatch(f.name.lower(), pattern.lower()) for _, f in walk_dirs(manual_dir)):
      message.append(hint)
  message.append(f"Found under {manual_dir}:\n{_describe_tree(manual_dir)}")
  raise DatasetInputError("\n".join(message))


def find_file(base: Path, name: str, *, dataset: str, required: bool = True,
              max_depth: int = MAX_SEARCH_DEPTH) -> Path | None:
  """The one file called `name` (case-insensitively) at most `max_depth` levels below `base`.

  Finds files that sit in a side folder (``archive/messidor_data.csv``) or inside a folder named
  like the file. Several copies → DatasetInputError listing them; none → DatasetInputError when
  `required`, else None.
  """
  found = [p for _, folder in walk_dirs(base, max_depth) for p in list_dir(folder)
           if p.is_file() and p.name.lower() == name.lower()]
  if len(found) == 1:
    return found[0]
  if len(found) > 1:
    raise DatasetInputError(f"{dataset}: several files named {name!r} below {base}: {[str(p) for p in found]}; "
                            f"keep exactly one")
  if required:
    raise DatasetInputError(f"{dataset}: no file named {name!r} at most {max_depth} levels below {base}.\n"
                            f"Found:\n{_describe_tree(base)}")
  return None


class ImageIndex:
  """Images of one folder, looked up case-insensitively by file name, then by stem (docs/datasets.md#image-file-names).

  Every lookup is remembered, so the images no label row referred to can be listed afterwards.
  """

  def __init__(self, folder: Path, *, relative_to: Path | None = None):
    self.folder = Path(folder)
    self._relative_to = relative_to
    self._by_name: dict[str, list[Path]] = collections.defaultdict(list)
    self._by_stem: dict[str, list[Path]] = collections.defaultdict(list)
    for path in list_dir(self.folder):
      if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        self._by_name[path.name.lower()].append(path)
        self._by_stem[path.stem.lower()].append(path)
    self._used: set[Path] = set()

  def __len__(self) -> int:
    return sum(len(v) for v in self._by_name.values())

  def collisions(self) -> dict[str, list[str]]:
    """Stems (lower-cased) shared by several files: lookups by such a stem are refused."""
    return {stem: [p.name for p in paths] for stem, paths in self._by_stem.items() if len(paths) > 1}

  def lookup(self, name: str) -> tuple[Path | None, str]:
    """(path, '') for the image `name` refers to, or (None, reason) when absent or ambiguous.

    `name` is a file name (any case of its extension) or a bare stem.
    """
    path, _, reason = self._lookup(name)
    return path, reason

  def find(self, name: str, bad: "BadInputPolicy", split: str, where: str) -> Path | None:
    """The image `name` refers to; None after reporting it (``missing_image`` / ``ambiguous_image``) to `bad`."""
    path, kind, reason = self._lookup(name)
    if path is None:
      bad(split, kind, where, reason)
    return path

  def _lookup(self, name: str) -> tuple[Path | None, str, str]:
    name = name.strip()
    paths = self._by_name.get(name.lower(), [])
    if len(paths) != 1:
      stem = Path(name).stem if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name
      paths = paths or self._by_stem.get(stem.lower(), [])
    if len(paths) == 1:
      self._used.add(paths[0])
      return paths[0], "", ""
    if len(paths) > 1:
      for p in paths:
        self._used.add(p)  # reported here; not again as "without a label row"
      return None, "ambiguous_image", (f"{name!r} matches several files in {self.folder}: "
                                       f"{sorted(p.name for p in paths)}; expected exactly one (rename or remove "
                                       f"the others)")
    return None, "missing_image", f"image {name!r} not found in {self.folder}"

  def claim(self, name: str) -> None:
    """Marks the image(s) `name` refers to as declared (by a row that was itself rejected)."""
    self.lookup(name)

  def unused(self) -> list[Path]:
    """Images of the folder that no lookup returned, numerically sorted."""
    every = [p for paths in self._by_name.values() for p in paths]
    return sorted((p for p in every if p not in self._used), key=lambda p: numeric_sort_key(p.name))

  def relative(self, path: Path) -> str:
    """`path` relative to the dataset root (for the ``file_name`` feature)."""
    base = self._relative_to or self.folder
    try:
      return Path(path).relative_to(base).as_posix()
    except ValueError:
      return Path(path).name


# ---------------------------------------------------------------------------------------------
# Label tables
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Table:
  """A label table: stripped header names and rows (``line`` = 1-based line/row in the file)."""

  path: Path
  header: list[str]
  rows: list[tuple[int, dict[str, str]]]

  def where(self, line: int) -> str:
    return f"{self.path} row {line}"

  def require(self, columns: Iterable[str], dataset: str) -> None:
    missing = [c for c in columns if c not in self.header]
    if missing:
      raise DatasetInputError(f"{dataset}: {self.path} lacks column(s) {missing}; found header {self.header}")


def normalize_table(path: Path, raw_rows: list[list[str]], *, dataset: str) -> Table:
  """Strips header names, drops fully empty columns (padding) and blank rows (docs/datasets.md#label-tables)."""
  raw_rows = [[("" if v is None else str(v)) for v in row] for row in raw_rows]
  first = next((i for i, row in enumerate(raw_rows) if any(v.strip() for v in row)), None)
  if first is None:
    raise DatasetInputError(f"{dataset}: label file {path} is empty (expected a header row)")
  header = [h.strip().lstrip("\ufeff").strip() for h in raw_rows[first]]
  body = [(first + 2 + i, row) for i, row in enumerate(raw_rows[first + 1:])]
  width = max([len(header)] + [len(r) for _, r in body])
  header += [""] * (width - len(header))
  keep = [c for c in range(width)
          if header[c] or any(c < len(r) and r[c].strip() for _, r in body)]
  unnamed = [c for c in keep if not header[c]]
  if unnamed:
    raise DatasetInputError(f"{dataset}: {path} has values in column(s) {[c + 1 for c in unnamed]} that have no "
                            f"header name; header {header[:len(keep) + 1]}")
  names = [header[c] for c in keep]
  duplicated = sorted({n for n in names if names.count(n) > 1})
  if duplicated:
    raise DatasetInputError(f"{dataset}: {path} repeats header name(s) {duplicated}")
  rows = []
  for line, row in body:
    values = {header[c]: (row[c].strip() if c < len(row) else "") for c in keep}
    if any(values.values()):
      rows.append((line, values))
  return Table(Path(path), names, rows)


def read_csv(path: Path, *, dataset: str, delimiter: str = ",") -> Table:
  """A CSV label table (UTF-8 with or without BOM; any line endings), normalised."""
  data = Path(path).read_bytes()
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError:
    text = data.decode("latin-1")
  raw = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
  return normalize_table(Path(path), raw, dataset=dataset)


_XLSX_NS = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main",
            "r": "http://schemas.openxmlformats.org/officeDocument/2006/relationships",
            "rel": "http://schemas.openxmlformats.org/package/2006/relationships"}


def _xlsx_column(ref: str) -> int:
  index = 0
  for ch in ref:
    if not ch.isalpha():
      break
    index = index * 26 + (ord(ch.upper()) - ord("A") + 1)
  return index - 1


def _xlsx_number(text: str) -> str:
  # Excel stores every number as a float literal; integral ones (ids, grades) read back as ints.
  try:
    value = float(text)
  except ValueError:
    return text
  return str(int(value)) if value.is_integer() else text


def read_xlsx(path: Path, *, dataset: str) -> Table:
  """The first worksheet of an .xlsx workbook as a normalised table (no openpyxl needed).

  Reads shared and inline strings, numbers (integral values as integers) and booleans; formulas
  contribute their cached values.
  """
  path = Path(path)
  try:
    with zipfile.ZipFile(path) as z:
      names = set(z.namelist())
      shared = []
      if "xl/sharedStrings.xml" in names:
        for si in ElementTree.fromstring(z.read("xl/sharedStrings.xml")).findall("m:si", _XLSX_NS):
          shared.append("".join(t.text or "" for t in si.iter(f"{{{_XLSX_NS['m']}}}t")))
      workbook = ElementTree.fromstring(z.read("xl/workbook.xml"))
      first = workbook.find("m:sheets/m:sheet", _XLSX_NS)
      rel_id = first.get(f"{{{_XLSX_NS['r']}}}id")
      rels = ElementTree.fromstring(z.read("xl/_rels/workbook.xml.rels"))
      target = next(r.get("Target") for r in rels.findall("rel:Relationship", _XLSX_NS) if r.get("Id") == rel_id)
      target = target.lstrip("/")
      sheet_path = target if target.startswith("xl/") else f"xl/{target}"
      sheet = ElementTree.fromstring(z.read(sheet_path))
  except (zipfile.BadZipFile, KeyError, StopIteration, AttributeError, ElementTree.ParseError) as e:
    raise DatasetInputError(f"{dataset}: {path} is not a readable .xlsx workbook ({type(e).__name__}: {e})") from None
  raw: list[list[str]] = []
  for row in sheet.iter(f"{{{_XLSX_NS['m']}}}row"):
    number = int(row.get("r", len(raw) + 1))
    while len(raw) < number - 1:
      raw.append([])
    values: dict[int, str] = {}
    for position, cell in enumerate(row.findall("m:c", _XLSX_NS)):
      column = _xlsx_column(cell.get("r")) if cell.get("r") else position
      kind = cell.get("t", "n")
      v = cell.find("m:v", _XLSX_NS)
      if kind == "s":
        text = shared[int(v.text)] if v is not None else ""
      elif kind == "inlineStr":
        text = "".join(t.text or "" for t in cell.iter(f"{{{_XLSX_NS['m']}}}t"))
      elif kind == "n":
        text = _xlsx_number(v.text) if v is not None and v.text else ""
      else:  # 'str' (formula string), 'b', 'e'
        text = v.text or "" if v is not None else ""
      values[column] = text
    raw.append([values.get(c, "") for c in range(max(values) + 1)] if values else [])
  return normalize_table(path, raw, dataset=dataset)


def parse_label(value: str, known: Sequence[int]) -> int | None:
  """`value` as one of the integers in `known` (``'2'``, ``'2.0'``), else None."""
  try:
    number = float(value)
  except (TypeError, ValueError):
    return None
  if not number.is_integer() or int(number) not in known:
    return None
  return int(number)


# ---------------------------------------------------------------------------------------------
# Bad-input policy
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SkipReport:
  """What a build skipped (under ``on_bad_input='skip'``) and notes on what it deliberately left out."""

  dataset: str
  config: str = ""
  on_bad_input: str = "error"
  skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def add(self, split: str, kind: str, where: str, reason: str) -> None:
    self.skipped.append({"split": split, "kind": kind, "where": where, "reason": reason})

  def counts(self) -> dict[str, int]:
    return dict(collections.Counter(s["kind"] for s in self.skipped))

  def to_json(self) -> dict[str, Any]:
    return {"dataset": self.dataset, "config": self.config, "on_bad_input": self.on_bad_input,
            "num_skipped": len(self.skipped), "counts": self.counts(), "skipped": self.skipped,
            "notes": self.notes}

  def write(self, path: Path) -> None:
    Path(path).write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n")


class BadInputPolicy:
  """Raises on bad input (``'error'``) or records it in a SkipReport (``'skip'``)."""

  def __init__(self, on_bad_input: str, report: SkipReport):
    if on_bad_input not in ON_BAD_INPUT:
      raise ValueError(f"on_bad_input must be one of {ON_BAD_INPUT}, got {on_bad_input!r}")
    self.on_bad_input, self.report = on_bad_input, report

  def __call__(self, split: str, kind: str, where: str, reason: str) -> None:
    """Handles one bad item: `where` names the file/row, `reason` what was wrong and what was expected."""
    if self.on_bad_input == "error":
      raise DatasetInputError(f"{self.report.dataset} ({split} split): {where}: {reason}. "
                              f"(Pass on_bad_input='skip' / --on_bad_input skip to skip such items and list "
                              f"them in {SKIP_REPORT_NAME}.)")
    self.report.add(split, kind, where, reason)


# ---------------------------------------------------------------------------------------------
# Build-time image processing
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImageOptions:
  """How images are stored.

  Attributes:
    canvas_size: side of the square canvas (longest side resized to it, zero-padded right/bottom,
      as FLAIR's ``ImageScaling(canvas=True)``); 0 keeps the original size.
    crop_fov: crop to the field of view first (``jaxretina.data.preprocess.crop_fov``).
    encoding: ``'png'`` (lossless) or ``'jpeg'``.
    jpeg_quality: quality of JPEG re-encoding.
  """

  canvas_size: int = 512
  crop_fov: bool = False
  encoding: str = "png"
  jpeg_quality: int = 95


def canvas_resize_fast(image: np.ndarray, size: int) -> np.ndarray:
  """``preprocess.canvas_resize`` of a uint8 HWC image through PIL's float resampler.

  Same target size (int truncation of ``side / scale``), the same triangle filter (PIL's bilinear
  *is* torch's antialiased bilinear when downscaling) evaluated in float32 per channel, the same
  ``×255 → truncate`` and zero padding at the right/bottom — but hundreds of times faster than the
  numpy reference on multi-megapixel photographs (equal to it when downscaling in tests;
  upscaling, rare for fundus photographs, differs by one grey level in < 0.1 % of the pixels).
  """
  h, w = image.shape[:2]
  scale = max(h, w) / size
  new_h, new_w = int(h / scale), int(w / scale)
  if new_h < 1 or new_w < 1:
    raise ValueError(f"a {h}x{w} image would shrink to {new_h}x{new_w} on a {size} px canvas")
  out = np.zeros((size, size, image.shape[2]), np.uint8)
  if (new_h, new_w) == (h, w):  # already fits: only the padding
    out[:h, :w] = image
    return out
  for c in range(image.shape[2]):
    channel = Image.fromarray(np.ascontiguousarray(image[:, :, c]), "L").convert("F")
    channel = channel.resize((new_w, new_h), Image.Resampling.BILINEAR)
    out[:new_h, :new_w, c] = np.clip(np.asarray(channel, np.float32), 0, 255).astype(np.uint8)
  return out


def process_image(path: str, options: ImageOptions) -> tuple[bool, bytes | str]:
  """(True, encoded bytes) of the stored image, or (False, reason) when the file is corrupt.

  Module-level and exception-free so worker processes can run it and the main process decides
  what a bad image means (error or skip).
  """
  try:
    with Image.open(path) as probe:
      probe.verify()  # structural check (PNG CRCs, JPEG markers)
    with Image.open(path) as opened:
      source_format = opened.format
      opened.load()  # a truncated file fails here (LOAD_TRUNCATED_IMAGES stays off)
      image = opened.convert("RGB") if opened.mode != "RGB" else opened.copy()
  except Exception as e:  # noqa: BLE001  (any decoder failure is a corrupt image)
    return False, f"corrupt or unreadable image ({type(e).__name__}: {e})"
  try:
    wanted = "JPEG" if options.encoding == "jpeg" else "PNG"
    if not options.canvas_size and not options.crop_fov and source_format == wanted:
      with open(path, "rb") as f:  # already stored as wanted: keep the original bytes (no re-encoding loss)
        return True, f.read()
    array = np.asarray(image, np.uint8)
    if options.crop_fov:
      array = preprocess.crop_fov(array)
    if options.canvas_size:
      array = canvas_resize_fast(array, options.canvas_size)
    buffer = io.BytesIO()
    if options.encoding == "jpeg":
      Image.fromarray(array).save(buffer, format="JPEG", quality=options.jpeg_quality)
    else:
      Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return True, buffer.getvalue()
  except Exception as e:  # noqa: BLE001
    return False, f"could not process image ({type(e).__name__}: {e})"


def _apply_chunk(fn: Callable, chunk: Sequence[tuple]) -> list:
  return [fn(*args) for args in chunk]


def default_num_workers() -> int:
  return max(1, min(os.cpu_count() or 1, 16))


def parallel_map(fn: Callable, args: Sequence[tuple], num_workers: int, *, chunk_size: int = 8,
                 min_parallel: int = 32) -> Iterator:
  """``fn(*a) for a in args`` in order, on `num_workers` spawned processes (1 = in this process).

  At most ``4 × num_workers`` chunks are in flight, so memory stays bounded however many images
  there are. 'spawn' because the caller may run JAX threads that a fork would copy broken. Fewer
  than `min_parallel` items run in-process (starting workers costs more than they save).
  """
  chunks = [args[i:i + chunk_size] for i in range(0, len(args), chunk_size)]
  if num_workers <= 1 or len(args) < min_parallel:
    for chunk in chunks:
      yield from _apply_chunk(fn, chunk)
    return
  pool = concurrent.futures.ProcessPoolExecutor(min(num_workers, len(chunks)),
                                                mp_context=multiprocessing.get_context("spawn"))
  try:
    pending: collections.deque = collections.deque()
    remaining = iter(chunks)
    for chunk in remaining:
      pending.append(pool.submit(_apply_chunk, fn, chunk))
      if len(pending) >= 4 * num_workers:
        break
    while pending:
      done = pending.popleft().result()
      following = next(remaining, None)
      if following is not None:
        pending.append(pool.submit(_apply_chunk, fn, following))
      yield from done
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# The builder base class
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class ManualRetinaConfig(tfds.core.BuilderConfig):
  """How a manual-download dataset is stored (see :class:`ImageOptions`).

  Subclasses add dataset-specific options (e.g. ``drop_ungradable``); every option that changes
  the stored data is folded into the config name when overridden by a keyword.
  """

  canvas_size: int = 512
  crop_fov: bool = False
  encoding: str = "png"


@dataclasses.dataclass
class Item:
  """One example to write: its source image, where it was declared, and its non-image features."""

  path: Path
  where: str
  features: dict[str, Any]


_BASE_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(tfds.core.BuilderConfig))
_SHORT_NAMES = {"canvas_size": "c", "encoding": "", "crop_fov": "fov"}


def _coerce(value, default, key: str, dataset: str):
  """`value` (possibly a command-line string) converted to the type of the option's default."""
  if isinstance(default, bool):
    if isinstance(value, str):
      lowered = value.strip().lower()
      if lowered in ("1", "true", "yes", "on"):
        return True
      if lowered in ("0", "false", "no", "off"):
        return False
      raise ValueError(f"{dataset}: option {key} expects true/false, got {value!r}")
    return bool(value)
  if isinstance(default, int):
    try:
      return int(value)
    except (TypeError, ValueError):
      raise ValueError(f"{dataset}: option {key} expects an integer, got {value!r}") from None
  return str(value)


# Builders with options outside the config machinery (flair_dataframe's) convert them the same way.
coerce_option = _coerce


def _suffix(key: str, value) -> str:
  short = _SHORT_NAMES.get(key, key)
  if isinstance(value, bool):
    return short if value else f"no_{short}"
  return f"{short}{value}"


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo of a dataset that is only ever built locally.

  TFDS' builder constructor, for a dataset not prepared yet, asks ``initialize_from_bucket`` for
  precomputed info in gs://tfds-data: it creates a ``tempfile.mkdtemp('tfds')`` download folder
  first, finds nothing (GCS access is off in TFDS by default) and never removes it — one empty
  ``/tmp/tmp*tfds`` folder per build. jaxretina's datasets are not published there, so the lookup is
  skipped.
  """

  def initialize_from_bucket(self) -> None:
    return


class LocalInfoBuilder:
  """Mixin (before ``tfds.core.GeneratorBasedBuilder``) giving a builder ``_LocalDatasetInfo``."""

  def dataset_info_from_configs(self, **kwargs):
    # tfds.core.DatasetBuilder.dataset_info_from_configs, constructing the local-only DatasetInfo.
    metadata = self.get_metadata()
    if metadata.description:
      kwargs["description"] = metadata.description
    if metadata.citation:
      kwargs["citation"] = metadata.citation
    return _LocalDatasetInfo(builder=self, **kwargs)


class ManualRetinaBuilder(LocalInfoBuilder, tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders of manually downloaded retinal datasets (ArrayRecord, no tensorflow).

  Subclasses set ``name``, ``VERSION``, ``MANUAL_DOWNLOAD_INSTRUCTIONS``, ``DATASET_KEY``,
  optionally ``CONFIG_CLASS`` / ``BUILDER_CONFIGS``, and implement ``_label_names``,
  ``_extra_features`` and ``_layout``.

  Builder keywords (besides ``config=`` and TFDS' own ``data_dir=`` etc.):
    canvas_size, crop_fov, encoding, and the config class's own options: override the config;
      the config name records every override (``default_c256_jpeg``), so differently processed
      builds never share a directory;
    on_bad_input: ``'error'`` (default) or ``'skip'``. Not part of the config name: a build that
      succeeds under ``'error'`` equals the ``'skip'`` build with nothing skipped, and what a
      ``'skip'`` build left out is listed in its skip report;
    num_workers: image-processing processes (0 = one per core, up to 16; output never depends on it);
    manual_dir: the download folder (else TFDS' ``download_config.manual_dir``).

  Common features: ``image`` (encoded, canvas² when pre-resized), ``label`` (ClassLabel; −1 =
  unlabelled), ``id`` (the identifier the label file uses; unique within a split), ``file_name``
  (image path relative to the dataset root), ``dataset`` (key), ``patient_id`` / ``eye`` (``''``
  where the source has none), ``modality``, ``categories`` / ``atributes`` (JSON lists of FLAIR-style
  texts, as ``synthetic_retina``).
  """

  CONFIG_CLASS = ManualRetinaConfig
  BUILDER_CONFIGS = [ManualRetinaConfig(name="default", description="512 px canvas, PNG.")]
  DEFAULT_CONFIG_NAME = "default"
  DATASET_KEY = ""
  MODALITY = "cfp"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS' own lookup needs `importlib_resources` (absent in this tensorflow-free stack).
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, config=None, on_bad_input: str | None = None, num_workers: int | None = None,
               manual_dir=None, **kwargs):
    option_names = [f.name for f in dataclasses.fields(self.CONFIG_CLASS) if f.name not in _BASE_CONFIG_FIELDS]
    overrides = {k: kwargs.pop(k) for k in option_names if k in kwargs}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(config, self.CONFIG_CLASS):
      base = config
    elif (config or self.DEFAULT_CONFIG_NAME) in self.builder_configs:
      base = self.builder_configs[config or self.DEFAULT_CONFIG_NAME]
    else:
      raise ValueError(f"{self.name}: unknown config {config!r}; known: {sorted(self.builder_configs)}")
    changed = {}
    for key, value in overrides.items():
      value = _coerce(value, getattr(base, key), key, self.name)
      if value != getattr(base, key):
        changed[key] = value
    if overrides:
      merged = dataclasses.replace(base, **changed) if changed else base
      self._check_options(merged)
      # Name the result after the predefined config it differs least from (default +
      # drop_ungradable=True *is* 'gradable'), so equal data never lands in two directories.
      def differences(candidate):
        return {k: getattr(merged, k) for k in option_names if getattr(merged, k) != getattr(candidate, k)}

      nearest = min([base] + [c for c in self.BUILDER_CONFIGS if c is not base], key=lambda c: len(differences(c)))
      changed = differences(nearest)
      if changed:
        suffix = "_".join(_suffix(k, changed[k]) for k in option_names if k in changed)
        config = dataclasses.replace(merged, name=f"{nearest.name}_{suffix}",
                                     description=f"{nearest.description} Overrides: {changed}.")
      else:
        config = nearest
    else:
      config = base
    on_bad_input = "error" if on_bad_input is None else str(on_bad_input)
    if on_bad_input not in ON_BAD_INPUT:
      raise ValueError(f"{self.name}: on_bad_input must be one of {ON_BAD_INPUT}, got {on_bad_input!r}")
    self._on_bad_input = on_bad_input
    self._num_workers = int(num_workers) if num_workers is not None else 0
    if self._num_workers < 0:
      raise ValueError(f"{self.name}: num_workers must be >= 0, got {num_workers}")
    self._manual_dir_override = manual_dir
    self._config_manual_dir = None
    self.skip_report: SkipReport | None = None
    super().__init__(config=config, **kwargs)

  def _check_options(self, config) -> None:
    if config.canvas_size < 0 or 0 < config.canvas_size < 16:
      raise ValueError(f"{self.name}: canvas_size must be 0 (keep size) or >= 16, got {config.canvas_size}")
    if config.encoding not in ENCODINGS:
      raise ValueError(f"{self.name}: encoding must be one of {ENCODINGS}, got {config.encoding!r}")

  # -- what subclasses describe ---------------------------------------------------------------
  def _label_names(self) -> Sequence[str] | None:
    """Class names of ``label`` (None: the dataset has no single-label target)."""
    return DR_GRADE_NAMES

  def _extra_features(self) -> dict[str, Any]:
    """Dataset-specific features (name → TFDS feature)."""
    return {}

  @abc.abstractmethod
  def _layout(self, manual_dir: Path, bad: BadInputPolicy, report: SkipReport) -> dict[str, list[Item]]:
    """Finds the dataset in `manual_dir` and lists the examples of every split.

    Bad rows/images go through `bad(split, kind, where, reason)`; deliberate omissions are noted in
    ``report.notes``. Image files are checked (decoded) later, by the base class.
    """

  # -- TFDS plumbing --------------------------------------------------------------------------
  @property
  def image_options(self) -> ImageOptions:
    cfg = self.builder_config
    return ImageOptions(canvas_size=cfg.canvas_size, crop_fov=cfg.crop_fov, encoding=cfg.encoding)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.canvas_size
    shape = (size, size, 3) if size else (None, None, 3)
    features = {
        "image": tfds.features.Image(shape=shape, encoding_format=self.builder_config.encoding),
        "id": tfds.features.Text(doc="identifier as the label file writes it; unique within a split"),
        "file_name": tfds.features.Text(doc="source image path relative to the dataset root"),
        "dataset": tfds.features.Text(),
        "patient_id": tfds.features.Text(doc="'' where the source has none"),
        "eye": tfds.features.Text(doc="'left', 'right' or ''"),
        "modality": tfds.features.Text(),
        "categories": tfds.features.Text(doc="JSON list of FLAIR-style category texts"),
        "atributes": tfds.features.Text(doc="JSON list of FLAIR attributes (FLAIR's spelling)"),
    }
    names = self._label_names()
    if names is not None:
      features["label"] = tfds.features.ClassLabel(names=list(names))
    features.update(self._extra_features())
    return self.dataset_info_from_configs(
        description=inspect.getdoc(type(self)) or "",
        features=tfds.features.FeaturesDict(features),
        supervised_keys=("image", "label") if names is not None else None,
        homepage=getattr(self, "HOMEPAGE", ""),
    )

  def _resolve_manual_dir(self) -> Path:
    manual = self._manual_dir_override
    if manual is None:
      manual = self._config_manual_dir
    return check_manual_dir(manual, self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)

  def _download_and_prepare(self, dl_manager, download_config=None):
    # TFDS' dl_manager.manual_dir asserts with its own message when the folder is missing; the
    # builder checks the folder itself (check_manual_dir) to say what is wrong with it.
    self._config_manual_dir = getattr(download_config, "manual_dir", None)
    config_name = self.builder_config.name if self.builder_config else ""
    self.skip_report = SkipReport(dataset=self.name, config=config_name, on_bad_input=self._on_bad_input)
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    # self.data_dir is TFDS' temporary directory here: the report is renamed with the dataset.
    self.skip_report.write(Path(self.data_dir) / SKIP_REPORT_NAME)

  def download_and_prepare(self, *args, **kwargs):
    super().download_and_prepare(*args, **kwargs)
    report = self.skip_report
    if report is not None and report.skipped:
      _log.warning("%s: skipped %d bad input item(s) %s; listed in %s", self.name, len(report.skipped),
                   report.counts(), self.skip_report_path)

  @property
  def skip_report_path(self) -> Path:
    """Where the prepared dataset's skip report lies (it exists once the build succeeded)."""
    return Path(self.data_dir) / SKIP_REPORT_NAME

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    manual_dir = self._resolve_manual_dir()
    bad = BadInputPolicy(self._on_bad_input, self.skip_report)
    layout = self._layout(manual_dir, bad, self.skip_report)
    empty = [split for split, items in layout.items() if not items]
    for split in empty:
      self.skip_report.notes.append(f"split {split!r} has no examples left and is not written")
    if not any(layout.values()):
      raise DatasetInputError(f"{self.name}: no examples left to write in {manual_dir} "
                              f"(skipped: {self.skip_report.counts()})")
    return {split: self._generate_examples(split, items) for split, items in layout.items() if items}

  def _generate_examples(self, split: str, items: list[Item]) -> Iterator[tuple[str, dict]]:
    options = self.image_options
    bad = BadInputPolicy(self._on_bad_input, self.skip_report)
    workers = self._num_workers or default_num_workers()
    args = [(str(item.path), options) for item in items]
    defaults = {"patient_id": "", "eye": "", "modality": self.MODALITY, "dataset": self.DATASET_KEY or self.name,
                "categories": "[]", "atributes": "[]"}
    written = 0
    for item, (ok, result) in zip(items, parallel_map(process_image, args, workers)):
      if not ok:
        bad(split, "corrupt_image", f"{item.path} (declared by {item.where})", result)
        continue
      example = {**defaults, **item.features, "image": result}
      for key in ("categories", "atributes"):
        if not isinstance(example[key], str):
          example[key] = json.dumps(list(example[key]), ensure_ascii=False)
      written += 1
      yield example["id"], example
    if not written:
      raise DatasetInputError(f"{self.name}: every image of split {split!r} was skipped "
                              f"(see the skip counts: {self.skip_report.counts()})")


def check_unlabelled(index: ImageIndex, split: str, bad: BadInputPolicy, label_file: Path) -> None:
  """Reports every image of `index` no row of `label_file` named (docs/datasets.md#bad-input-and-the-skip-report)."""
  for path in index.unused():
    bad(split, "unlabelled_image", str(path), f"image has no row in {label_file} (expected one row per image)")


def dr_categories(grade: int) -> list[str]:
  """FLAIR-style category text of an ICDR grade 0–4."""
  return [DR_CATEGORIES[grade]]

"""Label tables of the manual downloads: CSV and XLSX read into one normalised form (docs/datasets.md#label-tables).

Headers are stripped, fully empty padding columns and blank rows dropped; XLSX workbooks are read
without openpyxl.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import zipfile
from pathlib import Path
from typing import Iterable, Sequence
from xml.etree import ElementTree

from jaxretina.datasets.bad_input import DatasetInputError


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

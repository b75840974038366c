"""FLAIR's transfer train/val/test selection (``get_dataloader_splits``, docs/systems.md#transfer-splits).

Upstream, per fold::

  data = [{image, label = targets[eval(categories)[0]]} for each dataframe row]
  random.seed(fold); random.shuffle(data)
  for each label in np.unique(labels):   # ascending label index
    idx = positions of that label in the shuffled list
    test  += idx[:n_test]; train += idx[n_test:n_test + n_train]; val += idx[n_test + n_train: ... + n_val]

with ``n = int(int(k) / 100 * N_label)`` for ``"k%"`` and ``int(s)`` otherwise. The same Mersenne
Twister calls are made here on a private ``random.Random(fold)`` (bit-identical to seeding the global
generator), so the selection equals upstream's for the same rows in the same order.

Upstream crashes on a class with exactly one row (``list(np.squeeze(...))`` of a 0-d array); here
such a class splits like any other.
"""

from __future__ import annotations

import ast
import csv
import random
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from jaxretina.data import dr_grades

__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "Sample",
    "fold_splits",
    "get_shots",
    "labelled_rows",
    "parse_categories",
    "read_dataframe",
    "split_rows",
]


class Experiment(NamedTuple):
  """One transfer experiment: its dataframe file name and its class names in label-index order."""

  csv: str
  targets: tuple[str, ...]


_DR_GRADES = dr_grades.DR_CATEGORIES
_MYOPIC_GRADES = ("myopic maculopathy grade cero", "myopic maculopathy grade one", "myopic maculopathy grade two",
                  "myopic maculopathy grade three", "myopic maculopathy grade four")

# FLAIR's and KeepFIT's ``local_data/experiments.py`` (they agree on the shared names); AMD and TAOP
# exist only in KeepFIT, 38_MMAC23* only in FLAIR. Target spellings are upstream's, "cero" included.
EXPERIMENTS: dict[str, Experiment] = {
    "02_MESSIDOR": Experiment("02_MESSIDOR.csv", _DR_GRADES),
    "25_REFUGE": Experiment("25_REFUGE.csv", ("no glaucoma", "glaucoma")),
    "13_FIVES": Experiment("13_FIVES.csv", ("normal", "age related macular degeneration", "diabetic retinopathy",
                                            "glaucoma")),
    "08_ODIR200x3": Experiment("08_ODIR200x3.csv", ("normal", "pathologic myopia", "cataract")),
    "36_ACRIMA": Experiment("36_ACRIMA.csv", ("no glaucoma", "glaucoma")),
    "CAT_MYA_2": Experiment("CAT_MYA_2.csv", ("normal", "pathologic myopia", "cataract")),
    "05_20x3": Experiment("05_20x3.csv", ("normal", "retinitis pigmentosa", "macular hole")),
    "MHL_RP_2": Experiment("MHL_RP_2.csv", ("normal", "retinitis pigmentosa", "macular hole")),
    "37_DeepDRiD_train_eval": Experiment("37_DeepDRiD_train_eval.csv", _DR_GRADES),
    "37_DeepDRiD_test": Experiment("37_DeepDRiD_test.csv", _DR_GRADES),
    "38_MMAC23A_train": Experiment("38_MMAC23A_train.csv", _MYOPIC_GRADES),
    "38_MMAC23A_test": Experiment("38_MMAC23A_test.csv", _MYOPIC_GRADES),
    "38_MMAC23B_test": Experiment("38_MMAC23B_test.csv", _MYOPIC_GRADES),
    "CGI_HRDC_Task1": Experiment("CGI_HRDC_Task1.csv", ("no hypertensive", "hypertensive")),
    "CGI_HRDC_Task2": Experiment("CGI_HRDC_Task2.csv", ("no hypertensive retinopathy", "hypertensive retinopathy")),
    "AMD": Experiment("AMD.csv", ("age related macular degeneration", "normal")),
    "TAOP": Experiment("TAOP_train.csv", ("0c", "1c", "2c", "3c", "4c")),
}


class Sample(NamedTuple):
  """One selected row: its image id (the dataframe's ``image`` column) and its label index."""

  id: Any
  label: int


def get_shots(shots: str | int, n: int) -> int:
  """How many of a class's ``n`` rows a shots specification selects (upstream ``get_shots``).

  ``"k%"`` → ``int(int(k) / 100 * n)``, evaluated in that order in floating point as upstream does
  (so ``"29%"`` of 100 is 28); anything else → ``int(shots)`` (a count per class).
  """
  text = str(shots).strip()
  try:
    if "%" in text:
      return int(int(text[:-1]) / 100 * n)
    return int(text)
  except ValueError:
    raise ValueError(f"get_shots: shots={shots!r} is neither 'k%' with an integer k nor an integer count") from None


def parse_categories(value: Any, where: str) -> list[str]:
  """A row's category names from a list or the Python list literal the dataframes store."""
  if isinstance(value, str):
    # The dataframes store a Python list literal; upstream eval()s it, literal_eval is the safe equivalent.
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      raise ValueError(f"{where}: categories {value!r} is not a list literal") from None
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
    raise ValueError(f"{where}: expected a non-empty list of category names, got {value!r}")
  return list(value)


def labelled_rows(rows: Iterable[Any], targets: Sequence[str] | Mapping[str, int]) -> list[Sample]:
  """Dataframe rows → ``Sample(id, label = targets[categories[0]])`` in row order.

  Args:
    rows: ``(id, categories)`` pairs or dicts with ``image`` (or ``id``) and ``categories`` keys;
      ``categories`` is a list of names or its string literal as stored in the CSV files.
    targets: class names in label-index order, or upstream's ``{name: index}`` dict.
  """
  index = dict(targets) if isinstance(targets, Mapping) else {name: i for i, name in enumerate(targets)}
  out = []
  for i, row in enumerate(rows):
    where = f"labelled_rows: row {i}"
    if isinstance(row, Mapping):
      if "categories" not in row or not ("image" in row or "id" in row):
        raise ValueError(f"{where}: a dict row needs 'image' (or 'id') and 'categories', got keys {sorted(row)}")
      sample_id, cats = row.get("image", row.get("id")), row["categories"]
    else:
      try:
        sample_id, cats = row
      except (TypeError, ValueError):
        raise ValueError(f"{where}: expected an (id, categories) pair or a dict, got {row!r}") from None
    first = parse_categories(cats, where)[0]
    if first not in index:
      raise ValueError(f"{where} ({sample_id!r}): first category {first!r} is not a target; targets are "
                       f"{sorted(index, key=index.get)}")
    out.append(Sample(sample_id, int(index[first])))
  return out


def _balance(data: list[Sample], rng: random.Random) -> list[Sample]:
  """Upstream ``balance_data``: oversample every class to the largest with ``random.choices``."""
  labels = [s.label for s in data]
  counts = np.bincount(labels)
  n_max = np.max(counts)
  out = []
  for label in np.unique(labels):
    idx = list(np.argwhere(np.array(labels) == label)[:, 0])
    if n_max - counts[label] > 0:
      idx += rng.choices(idx, k=int(n_max - counts[label]))
    out.extend(data[i] for i in idx)
  return out


def split_rows(rows: Iterable[Any], targets: Sequence[str] | Mapping[str, int], *, shots_train: str | int = "80%",
               shots_val: str | int = "0%", shots_test: str | int = "20%", seed: int = 0,
               balance: bool = False) -> dict[str, list[Sample]]:
  """FLAIR's per-class split of one fold.

  Args:
    rows, targets: as ``labelled_rows``; the row order matters (it is the dataframe order).
    shots_train, shots_val, shots_test: ``"k%"`` of each class or an integer count per class.
    seed: the fold index (upstream seeds Python's generator with it).
    balance: upstream's ``balance`` option, oversampling the train split with the same generator.
  Returns:
    ``{"train", "val", "test"}`` → samples, classes in ascending label order, each class's samples in
    shuffled order (upstream's loader order before its own train-loader shuffling).
  """
  data = labelled_rows(rows, targets)
  rng = random.Random(seed)
  rng.shuffle(data)
  labels = np.asarray([s.label for s in data], np.int64)
  splits: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
  for label in np.unique(labels):
    idx = np.flatnonzero(labels == label).tolist()
    n_train, n_val, n_test = (get_shots(s, len(idx)) for s in (shots_train, shots_val, shots_test))
    splits["test"] += [data[i] for i in idx[:n_test]]
    splits["train"] += [data[i] for i in idx[n_test:n_test + n_train]]
    splits["val"] += [data[i] for i in idx[n_test + n_train:n_test + n_train + n_val]]
  if balance and splits["train"]:
    splits["train"] = _balance(splits["train"], rng)
  return splits


def fold_splits(rows: Iterable[Any], targets: Sequence[str] | Mapping[str, int], folds: int,
                **kwargs) -> list[dict[str, list[Sample]]]:
  """``split_rows`` for folds 0..folds−1, each seeded with its fold index (``main_transferability``)."""
  if int(folds) < 1:
    raise ValueError(f"fold_splits: folds={folds!r} must be at least 1")
  rows = list(rows)
  return [split_rows(rows, targets, seed=fold, **kwargs) for fold in range(int(folds))]


def read_dataframe(path: str) -> list[dict[str, str]]:
  """A FLAIR/KeepFIT transfer CSV (``image``, ``categories``, …) as a list of dicts, in file order."""
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  if rows and not {"image", "categories"} <= set(rows[0]):
    raise ValueError(f"read_dataframe: {path} lacks an 'image' or 'categories' column (has {sorted(rows[0])})")
  return rows

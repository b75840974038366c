"""TFDS builder ``flair_dataframe``: FLAIR-format dataframes + local images (docs/datasets.md#flair-format-dataframes).

Reads one or more CSVs as FLAIR / KeepFIT write them (``pandas.to_csv`` with its index column)::

  ,image,atributes,categories
  0,15_APTOS/train_images/000c1434d8d7.png,[],['moderate diabetic retinopathy']

or MM-Retinal's variant ``,image,caption`` (free-text caption, no categories). ``atributes`` (sic)
and ``categories`` are Python list literals (parsed with ``ast.literal_eval``, never ``eval``).

Where the images are: ``image`` is relative to a datasets root and its first component is the
dataset key (``15_APTOS``). Each key's folder is ``key_map[key]`` (a JSON object in the file
``key_map``; relative folders are relative to the key map's own folder), else ``<manual_dir>/<key>``
(FLAIR's ``data_root_path + image``). The rest of the path resolves case-insensitively, empty
components (``regular-fundus-training//Images``) are ignored, and a file whose extension differs
from the CSV's is found through its folder's stem index.

Builder keywords (all part of the config, so different mixes never share a directory):
  csv: a path or a list of paths (rows are taken in the given order, then file order);
  key_map: path of the JSON key map ('' = none);
  experiment: '' (pretraining: one split ``train`` with every row) or a transfer experiment of
    ``jaxretina.transfer.splits.EXPERIMENTS`` (``02_MESSIDOR``, ``13_FIVES``, ...): adds
    ``label = targets[categories[0]]`` and writes ``train`` / ``validation`` / ``test`` by FLAIR's
    per-class procedure (``splits.split_rows`` with ``shots_train``, ``shots_val``, ``shots_test``
    (``'k%'`` or a count per class) and ``fold`` (the seed)). The selection is made on the rows of
    the CSVs whose categories parse, *before* images are looked up, so it equals upstream's; a row
    whose image is then missing is bad input of its split;
  balance: experiments only: upstream's ``balance`` option (``split_rows(..., balance=True)``):
    every class of ``train`` is oversampled to the largest one with the fold's generator (after the
    selection, so ``validation`` / ``test`` are unchanged). A repeated row is stored once per copy:
    the first keeps ``id`` = the ``image`` path, the k-th repeat gets ``id`` = ``<image>#k`` (TFDS
    needs unique keys); ``file_name`` is the ``image`` path for every copy.
The config name is ``<experiment or 'mix'>_<hash>``, the hash covering the CSV and key-map paths and
contents and the split options (``balance`` included when set).

Features: ``image``, ``id`` = ``file_name`` = the ``image`` path as written, ``dataset`` = its first
component exactly as written (FLAIR's description augmentation depends on it), ``categories`` /
``atributes`` (JSON lists of the parsed literals), ``caption`` (``''`` for the categories format),
``source_csv`` (file name of the dataframe the row came from), ``label`` (experiments only),
``modality`` (the ``modality`` option, ``cfp`` by default; ``ffa`` for KeepFIT-FFA's ``FFA.csv``).
Images in the folders that no row names are not reported: dataframes select subsets of datasets.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import hashlib
import io
import json
from pathlib import Path

import tensorflow_datasets as tfds

from jaxretina.datasets import bad_input
from jaxretina.datasets import file_discovery
from jaxretina.datasets import local_builder
from jaxretina.datasets import manual_builder
from jaxretina.transfer import splits as transfer_splits

_INSTRUCTIONS = """\
FLAIR-format dataframes: the transferability CSVs of https://github.com/jusiro/FLAIR
(local_data/dataframes/transferability/classification/*.csv), KeepFIT's pretraining CSVs
(https://github.com/lxirich/MM-Retinal KeepFIT/KeepFIT-CFP/local_data/dataframes/pretraining/), or your own
(header ',image,atributes,categories' or ',image,caption'). Put each dataset the CSVs name in
<manual_dir>/<key>/ (key = first component of the 'image' paths, e.g. 02_MESSIDOR/), or map keys to
folders anywhere with a JSON key map: {"02_MESSIDOR": "/data/messidor", ...}. Build with
  python -m jaxretina.datasets build flair_dataframe --csv A.csv [B.csv ...] [--key_map map.json]
      [--manual_dir ROOT] [--experiment 02_MESSIDOR --shots_train 80% --shots_test 20% --fold 0 [--balance]]
      --data_dir DIR
"""


@dataclasses.dataclass(eq=False)
class FlairDataframeConfig(manual_builder.ManualRetinaConfig):
  """Attributes: see the module docstring (csv as a JSON list of paths)."""

  csv: str = "[]"
  key_map: str = ""
  experiment: str = ""
  shots_train: str = "80%"
  shots_val: str = "0%"
  shots_test: str = "20%"
  fold: int = 0
  balance: bool = False
  modality: str = "cfp"


@dataclasses.dataclass
class Row:
  """One dataframe row: where it was, the image path as written, and its parsed texts."""

  where: str
  image: str
  categories: list
  atributes: list
  caption: str
  source_csv: str


def _csv_list(csv_paths) -> list[str]:
  if csv_paths is None:
    return []
  if isinstance(csv_paths, (str, Path)):
    text = str(csv_paths).strip()
    if text.startswith("["):
      return [str(p) for p in json.loads(text)]
    return [text] if text else []
  return [str(p) for p in csv_paths]


def _file_digest(path: Path, what: str) -> str:
  try:
    return hashlib.sha256(path.read_bytes()).hexdigest()
  except OSError as e:
    raise bad_input.DatasetInputError(f"flair_dataframe: cannot read {what} {path} ({type(e).__name__}: {e})") from None


def _literal_list(value: str, column: str) -> list:
  """A dataframe's list cell (``"['clean']"``); '' counts as an empty list."""
  text = value.strip()
  if not text:
    return []
  try:
    parsed = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise ValueError(f"{column} {value!r} is not a Python list literal") from None
  if not isinstance(parsed, (list, tuple)) or not all(isinstance(v, str) for v in parsed):
    raise ValueError(f"{column} {value!r} is not a list of strings")
  return list(parsed)


def read_dataframe(path: Path, bad, split: str = "train") -> list[Row]:
  """The rows of a FLAIR-format CSV (pandas index column ignored); bad rows go to `bad`."""
  path = Path(path)
  data = path.read_bytes()
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError:
    raise bad_input.DatasetInputError(f"flair_dataframe: {path} is not UTF-8 text") from None
  raw = list(csv.reader(io.StringIO(text, newline="")))
  if not raw or not any(v.strip() for v in raw[0]):
    raise bad_input.DatasetInputError(f"flair_dataframe: {path} is empty (expected the header ',image,atributes,"
                                      f"categories' or ',image,caption')")
  header = [h.strip() for h in raw[0]]
  columns = {h: i for i, h in enumerate(header) if h}
  if "image" not in columns or not ({"categories", "caption"} & set(columns)):
    raise bad_input.DatasetInputError(f"flair_dataframe: {path} has header {header}; expected ',image,atributes,"
                                      f"categories' or ',image,caption' (FLAIR's dataframe format)")
  rows = []
  for line, values in enumerate(raw[1:], start=2):
    if not any(v.strip() for v in values):
      continue
    where = f"{path} row {line}"
    if len(values) != len(header):
      bad(split, "bad_row", where, f"{len(values)} fields, expected {len(header)} as in the header {header}")
      continue
    get = {h: values[i] for h, i in columns.items()}
    image = get["image"].strip()
    if not image or "/" not in image.strip("/"):
      bad(split, "bad_row", where, f"image {image!r} is not '<dataset key>/<path>'")
      continue
    try:
      categories = _literal_list(get.get("categories", ""), "categories")
      atributes = _literal_list(get.get("atributes", ""), "atributes")
    except ValueError as e:
      bad(split, "bad_row", where, str(e))
      continue
    rows.append(Row(where, image, categories, atributes, get.get("caption", "").strip(), path.name))
  return rows


class FlairDataframe(manual_builder.ManualRetinaBuilder):
  """Images named by FLAIR-format dataframes (pretraining mixes and transferability benchmarks)."""

  name = "flair_dataframe"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = "https://github.com/jusiro/FLAIR"
  CONFIG_CLASS = FlairDataframeConfig
  BUILDER_CONFIGS = [FlairDataframeConfig(name="default", description="No dataframe given (pass csv=).")]

  @property
  def MODALITY(self) -> str:  # noqa: N802  (read by the base class as a class attribute)
    return self.builder_config.modality

  def __init__(self, *, config=None, csv=None, key_map=None, experiment=None, shots_train=None, shots_val=None,
               shots_test=None, fold=None, balance=None, **kwargs):
    base = config if isinstance(config, FlairDataframeConfig) else self.builder_configs["default"]
    if config is not None and not isinstance(config, FlairDataframeConfig) and config != "default":
      raise ValueError(f"flair_dataframe: configs are made from csv=/key_map=/experiment=, not by name "
                       f"(got config={config!r})")
    csvs = [str(Path(p).expanduser().resolve()) for p in _csv_list(csv if csv is not None else
                                                                   json.loads(base.csv))]
    key_map = base.key_map if key_map is None else (str(Path(key_map).expanduser().resolve()) if key_map else "")
    values = {"experiment": base.experiment if experiment is None else str(experiment),
              "shots_train": base.shots_train if shots_train is None else str(shots_train),
              "shots_val": base.shots_val if shots_val is None else str(shots_val),
              "shots_test": base.shots_test if shots_test is None else str(shots_test),
              "fold": base.fold if fold is None else int(fold),
              "balance": base.balance if balance is None else local_builder.coerce_option(balance, False, "balance",
                                                                                    "flair_dataframe")}
    if values["experiment"] and values["experiment"] not in transfer_splits.EXPERIMENTS:
      raise ValueError(f"flair_dataframe: unknown experiment {values['experiment']!r}; known: "
                       f"{sorted(transfer_splits.EXPERIMENTS)}")
    if values["balance"] and not values["experiment"]:
      raise ValueError("flair_dataframe: balance=True oversamples an experiment's train split: pass experiment= too")
    if values["experiment"]:
      for key in ("shots_train", "shots_val", "shots_test"):
        transfer_splits.get_shots(values[key], 100)  # raises on a malformed specification
    if csvs:
      digest = hashlib.sha256()
      for path in csvs:
        digest.update(f"csv {path} {_file_digest(Path(path), 'dataframe')}\n".encode())
      if key_map:
        digest.update(f"key_map {key_map} {_file_digest(Path(key_map), 'key map')}\n".encode())
      if values["experiment"]:
        # balance enters only when set, so unbalanced experiments keep the names they had before the option.
        hashed = {k: v for k, v in values.items() if k != "balance" or v}
        digest.update(json.dumps(hashed, sort_keys=True).encode())
      label = values["experiment"] or "mix"
      name = "".join(c if c.isalnum() or c == "_" else "_" for c in label) + "_" + digest.hexdigest()[:12]
      described = f"{len(csvs)} dataframe(s) {[Path(p).name for p in csvs]}"
      if values["experiment"]:
        described += f", experiment {values['experiment']} (fold {values['fold']}, shots train/val/test " \
                     f"{values['shots_train']}/{values['shots_val']}/{values['shots_test']}" \
                     f"{', balanced train' if values['balance'] else ''})"
      config = dataclasses.replace(base, name=name, csv=json.dumps(csvs), key_map=key_map,
                                   description=described + ".", **values)
    super().__init__(config=config, **kwargs)

  def _label_names(self):
    experiment = self.builder_config.experiment
    return transfer_splits.EXPERIMENTS[experiment].targets if experiment else None

  def _extra_features(self):
    return {"caption": tfds.features.Text(doc="free-text caption (',image,caption' dataframes); '' otherwise"),
            "source_csv": tfds.features.Text(doc="file name of the dataframe the row came from")}

  def _resolve_manual_dir(self) -> Path | None:
    # manual_dir is optional: a key map may place every dataset.
    manual = self._manual_dir_override if self._manual_dir_override is not None else self._config_manual_dir
    if manual is None or str(manual) == "":
      return None
    return file_discovery.check_manual_dir(manual, self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)

  def _key_folders(self) -> dict[str, Path]:
    path = self.builder_config.key_map
    if not path:
      return {}
    try:
      mapping = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise bad_input.DatasetInputError(f"{self.name}: key_map {path} is not a readable JSON file "
                                        f"({type(e).__name__}: {e})") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
      raise bad_input.DatasetInputError(f"{self.name}: key_map {path} must be a JSON object from dataset key to folder "
                                        f"path (strings), got {type(mapping).__name__}")
    folders = {}
    for key, folder in mapping.items():
      folder_path = Path(folder).expanduser()
      if not folder_path.is_absolute():
        folder_path = Path(path).parent / folder_path
      if not folder_path.is_dir():
        raise bad_input.DatasetInputError(f"{self.name}: key_map {path} maps {key!r} to {folder_path}, which is not "
                                          f"a folder")
      folders[key.strip("/")] = folder_path
    return folders

  def _layout(self, manual_dir: Path | None, bad, report):
    config = self.builder_config
    csvs = [Path(p) for p in json.loads(config.csv)]
    if not csvs:
      raise bad_input.DatasetInputError(f"{self.name}: no dataframe given: pass csv=PATH (or a list; --csv A.csv "
                                        f"B.csv on the command line). {self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
    for path in csvs:
      if not path.is_file():
        raise bad_input.DatasetInputError(f"{self.name}: dataframe {path} does not exist")
    folders = self._key_folders()
    if manual_dir is None and not folders:
      raise bad_input.DatasetInputError(f"{self.name}: neither manual_dir nor key_map given: nothing says where the "
                                        f"images are. {self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
    read_split = "all" if config.experiment else "train"
    rows, seen = [], set()
    for row in (row for path in csvs for row in read_dataframe(path, bad, read_split)):
      # Across every dataframe, before any split: a repeated image must not land in train and test.
      if row.image in seen:
        bad(read_split, "duplicate_id", row.where, f"image {row.image!r} appears more than once (expected unique "
                                                   f"rows across the dataframes)")
        continue
      seen.add(row.image)
      rows.append(row)
    if config.experiment:
      experiment = transfer_splits.EXPERIMENTS[config.experiment]
      labelled = []
      for row in rows:
        first = row.categories[0] if row.categories else None
        if first not in experiment.targets:
          bad(read_split, "unknown_label", row.where, f"first category {first!r} is not a target of experiment "
                                                      f"{config.experiment} {list(experiment.targets)}")
          continue
        labelled.append(row)
      selection = transfer_splits.split_rows(
          [{"image": k, "categories": row.categories} for k, row in enumerate(labelled)], experiment.targets,
          shots_train=config.shots_train, shots_val=config.shots_val, shots_test=config.shots_test, seed=config.fold,
          balance=config.balance)
      chosen = {"train": selection["train"], "validation": selection["val"], "test": selection["test"]}
      plan = {split: [(labelled[s.id], s.label) for s in samples] for split, samples in chosen.items()}
      report.notes.append(f"experiment {config.experiment}, fold {config.fold}, shots train/val/test "
                          f"{config.shots_train}/{config.shots_val}/{config.shots_test}"
                          f"{' (train balanced by oversampling)' if config.balance else ''}: "
                          f"{ {k: len(v) for k, v in plan.items()} } of {len(labelled)} labelled rows")
    else:
      plan = {"train": [(row, -1) for row in rows]}
    resolver = _Resolver(manual_dir, folders)
    layout = {}
    for split, chosen_rows in plan.items():
      items, copies, found = [], {}, {}
      for row, label in chosen_rows:
        if row.image not in found:  # an oversampled row is looked up (and reported) once
          found[row.image] = resolver.find(row, bad, split)
        path = found[row.image]
        if path is None:
          continue
        copy = copies[row.image] = copies.get(row.image, -1) + 1
        features = {"id": f"{row.image}#{copy}" if copy else row.image, "file_name": row.image,
                    "dataset": row.image.strip("/").split("/")[0],
                    "categories": row.categories, "atributes": row.atributes, "caption": row.caption,
                    "source_csv": row.source_csv}
        if config.experiment:
          features["label"] = label
        items.append(manual_builder.Item(path, row.where, features))
      layout[split] = items
    return layout


class _Resolver:
  """Finds the file of a dataframe ``image`` path: key folder, case-insensitive components, stem fallback."""

  def __init__(self, manual_dir: Path | None, folders: dict[str, Path]):
    self.manual_dir, self.folders = manual_dir, folders
    self._indexes: dict[Path, file_discovery.ImageIndex] = {}

  def find(self, row: Row, bad, split: str) -> Path | None:
    parts = [p for p in row.image.split("/") if p]
    key, rest = parts[0], parts[1:]
    base = self.folders.get(key)
    if base is None and self.manual_dir is not None:
      base = file_discovery.resolve(self.manual_dir, key, kind="dir")
    if base is None:
      where_to_look = f"the key map {sorted(self.folders)}" + (f" or {self.manual_dir}" if self.manual_dir else "")
      bad(split, "missing_image", row.where, f"no folder for dataset key {key!r} (looked in {where_to_look})")
      return None
    parent = file_discovery.resolve(base, "/".join(rest[:-1]), kind="dir") if len(rest) > 1 else base
    if parent is None:
      bad(split, "missing_image", row.where, f"image {row.image!r}: folder {'/'.join(rest[:-1])!r} not found in "
                                             f"{base}")
      return None
    if parent not in self._indexes:
      self._indexes[parent] = file_discovery.ImageIndex(parent)
    return self._indexes[parent].find(rest[-1], bad, split, row.where)

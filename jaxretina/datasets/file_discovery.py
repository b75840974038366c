"""Finding a manual download's files (docs/datasets.md#how-the-builders-read-a-download).

* the dataset root is found by content (anchor files at most 3 levels below ``manual_dir``), with
  an error listing what *was* found, naming multi-part archives that still need joining and
  derived layouts (community mirrors; image-folder trees, which the ``image_folder`` builder reads)
  the builder does not read;
* image files resolve case-insensitively, by full name first and by stem when the label file's
  extension lies; a stem matching two files is reported, never guessed;
* OS junk (``.DS_Store``, ``Thumbs.db``, ``__MACOSX``) is ignored; numbered names sort numerically.
"""

from __future__ import annotations

import collections
import fnmatch
import re
from pathlib import Path
from typing import Iterator, Sequence

from jaxretina.datasets.bad_input import BadInputPolicy, DatasetInputError

JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "__macosx"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
MAX_SEARCH_DEPTH = 3

# Archive parts that must be joined by the user before the builder can read anything.
_MULTIPART_PATTERNS = ("*.zip.0[0-9][0-9]", "*.z[0-9][0-9]", "*.7z.0[0-9][0-9]", "*.part[0-9]*.rar",
                       "*.tar.gz.0[0-9][0-9]")
_ARCHIVE_PATTERNS = ("*.zip", "*.7z", "*.rar", "*.tar", "*.tar.gz", "*.tgz")


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


def describe_tree(base: Path, max_depth: int = MAX_SEARCH_DEPTH, limit: int = 40) -> str:
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
  message.append(f"Found under {manual_dir}:\n{describe_tree(manual_dir)}")
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
                            f"Found:\n{describe_tree(base)}")
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

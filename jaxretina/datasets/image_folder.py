"""TFDS builder ``image_folder``: torchvision ``ImageFolder`` trees (docs/datasets.md#derived-layouts).

Two layouts, found below ``manual_dir`` (a chain of single folders left by extraction, such as
``APTOS2019/APTOS2019/``, is descended first):

* split folders — RETFound's benchmark splits::

    <root>/train/<class>/<image>   <root>/val/<class>/<image>   <root>/test/<class>/<image>

  ``train`` → split ``train``, ``val`` / ``valid`` / ``validation`` → ``validation``, ``test`` → ``test``
  (folder names matched case-insensitively);
* class folders only — GDRBench (``nodr/ mild_npdr/ ...``)::

    <root>/<class>/<image>

  written as one split, ``train`` unless the ``split`` option names another.

Images are found in each class folder and its sub-folders (as torchvision walks them), by
extension (case-insensitive); other files are ignored and counted in the skip report's notes.

Classes: the class folder names of every split, sorted as torchvision sorts them (``sorted`` of the
names), or the explicit ``classes`` option (``'a,b,c'`` or a list) fixing the label order. Unlike one
torchvision ``ImageFolder`` per split, labels are the same in every split even when a split lacks a
class (such classes are listed in the skip report's notes). A class folder not among explicit
``classes`` is bad input (an error naming the folder, or under ``on_bad_input='skip'`` its images are
skipped and the folder listed); so is an image lying directly in a split folder.

Builder keywords: ``manual_dir`` (the tree; required when the builder is constructed, because the
class names — the ``label`` feature — come from it), ``classes``, ``split``, ``modality`` (``cfp``;
``oct`` for OCTID), ``dataset`` (the ``dataset`` feature; default the root folder's name), and the
common ``canvas_size`` / ``crop_fov`` / ``encoding`` / ``on_bad_input`` / ``num_workers``. The config
name is ``<root folder name>_<hash>``, the hash covering the resolved root path, the class names and
these options, so two trees (or two class orders) never share a directory. Changing the images of a
tree in place does not change the name: delete the prepared dataset to rebuild it.

Features: the common ones (``image``, ``label`` with the class names, ``id`` = the image path within
its split (``<class>/<file>``), ``file_name`` = the path relative to the root, ``dataset``,
``modality``; no patient/eye ids, empty ``categories`` / ``atributes``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import tensorflow_datasets as tfds

from jaxretina.datasets import bad_input
from jaxretina.datasets import file_discovery
from jaxretina.datasets import manual_builder

_INSTRUCTIONS = """\
An image-folder tree as torchvision's ImageFolder reads it, e.g. RETFound's benchmark splits
(https://github.com/rmaphoh/RETFound_MAE BENCHMARK.md: <root>/train|val|test/<class>/<image>) or a
GDRBench dataset (https://github.com/chehx/DGDR: <root>/<class>/<image>, one split). Build with
  python -m jaxretina.datasets build image_folder --manual_dir <root> --data_dir DIR
      [--classes a,b,c] [--split test] [--modality oct]
"""

# Split folder name (lower-cased) → TFDS split name, as the other builders name their splits.
SPLIT_FOLDERS = {"train": "train", "val": "validation", "valid": "validation", "validation": "validation",
                 "test": "test"}


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(manual_builder.ManualRetinaConfig):
  """Attributes: see the module docstring (classes as a JSON list; root as a resolved path)."""

  root: str = ""
  classes: str = "[]"
  split: str = "train"
  modality: str = "cfp"
  dataset: str = ""


@dataclasses.dataclass
class Tree:
  """An image-folder tree: its root, split name → (split folder, class folders), and the class names."""

  root: Path
  splits: dict[str, tuple[Path, dict[str, Path]]]
  classes: list[str]


def _class_list(classes) -> list[str]:
  if classes is None:
    return []
  if isinstance(classes, str):
    text = classes.strip()
    if text.startswith("["):
      return [str(c).strip() for c in json.loads(text)]
    return [c.strip() for c in text.split(",") if c.strip()]
  return [str(c).strip() for c in classes]


def _subdirs(folder: Path) -> list[Path]:
  return [p for p in file_discovery.list_dir(folder) if p.is_dir() and not p.name.startswith(".")]


def find_tree(manual_dir: Path, *, split: str = "train") -> Tree:
  """The layout of the image-folder tree in `manual_dir` (classes sorted like torchvision).

  Raises:
    DatasetInputError: no class folders, or split folders mixed with other folders.
  """
  root = Path(manual_dir)
  # Extraction often wraps the tree in single folders (APTOS2019/APTOS2019/train/...): descend while
  # the only entry is a folder that itself holds folders (a lone class folder holds images).
  for _ in range(file_discovery.MAX_SEARCH_DEPTH):
    entries = [p for p in file_discovery.list_dir(root) if not p.name.startswith(".")]
    if len(entries) != 1 or not entries[0].is_dir() or entries[0].name.lower() in SPLIT_FOLDERS:
      break
    if not _subdirs(entries[0]):
      break
    root = entries[0]
  folders = _subdirs(root)
  if not folders:
    raise bad_input.DatasetInputError(f"image_folder: no class or split folders in {root}; expected "
                                      f"<root>/<class>/<image> or <root>/<train|val|test>/<class>/<image>.\n"
                                      f"Found:\n{file_discovery.describe_tree(root)}")
  split_folders = {p: SPLIT_FOLDERS[p.name.lower()] for p in folders if p.name.lower() in SPLIT_FOLDERS}
  if split_folders:
    others = [p.name for p in folders if p not in split_folders]
    if others:
      raise bad_input.DatasetInputError(f"image_folder: {root} holds split folders "
                                        f"{sorted(p.name for p in split_folders)} and other folders {others}; expected "
                                        f"only train/val/test (each holding class folders)")
    splits = {}
    for folder, name in split_folders.items():
      if name in splits:
        raise bad_input.DatasetInputError(f"image_folder: {root} holds two folders for split {name!r}: "
                                          f"{splits[name][0].name} and {folder.name}")
      splits[name] = (folder, {p.name: p for p in _subdirs(folder)})
  else:
    if not split or "/" in split:
      raise ValueError(f"image_folder: split must be a plain split name, got {split!r}")
    splits = {split: (root, {p.name: p for p in folders})}
  classes = sorted({name for _, class_dirs in splits.values() for name in class_dirs})
  return Tree(root, splits, classes)


def _images_below(folder: Path) -> tuple[list[Path], int]:
  """(images in `folder` and its sub-folders in torchvision's walk order, number of other files)."""
  images, others, walked = [], 0, []
  for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
    dirnames[:] = [d for d in dirnames if not file_discovery.is_junk(d) and not d.startswith(".")]  # prunes the walk
    walked.append((dirpath, filenames))
  for dirpath, filenames in sorted(walked):
    for name in sorted(filenames):
      if file_discovery.is_junk(name):
        continue
      if Path(name).suffix.lower() in file_discovery.IMAGE_EXTENSIONS:
        images.append(Path(dirpath) / name)
      else:
        others += 1
  return images, others


class ImageFolder(manual_builder.ManualRetinaBuilder):
  """Any torchvision-ImageFolder tree of retinal images (RETFound benchmark splits, GDRBench)."""

  name = "image_folder"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = "https://github.com/rmaphoh/RETFound_MAE"
  CONFIG_CLASS = ImageFolderConfig
  BUILDER_CONFIGS = [ImageFolderConfig(name="default", description="No tree given (pass manual_dir=).")]

  @property
  def MODALITY(self) -> str:  # noqa: N802  (read by the base class as a class attribute)
    return self.builder_config.modality

  def __init__(self, *, config=None, manual_dir=None, classes=None, split=None, modality=None, dataset=None,
               **kwargs):
    base = config if isinstance(config, ImageFolderConfig) else self.builder_configs["default"]
    if config is not None and not isinstance(config, ImageFolderConfig) and config != "default":
      raise ValueError(f"image_folder: configs are made from manual_dir=/classes=/split=, not by name "
                       f"(got config={config!r})")
    if manual_dir is not None and str(manual_dir) != "":
      manual = file_discovery.check_manual_dir(manual_dir, self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS).resolve()
      values = {"split": base.split if split is None else str(split),
                "modality": base.modality if modality is None else str(modality)}
      tree = find_tree(manual, split=values["split"])
      explicit = _class_list(classes)
      if len(set(explicit)) != len(explicit):
        raise ValueError(f"image_folder: classes {explicit} repeat a name")
      names = explicit or tree.classes
      values["dataset"] = str(dataset) if dataset else tree.root.name
      digest = hashlib.sha256(json.dumps({"root": str(tree.root), "classes": names,
                                          **values}, sort_keys=True).encode())
      label = "".join(c if c.isalnum() or c == "_" else "_" for c in tree.root.name) or "tree"
      config = dataclasses.replace(
          base, name=f"{label}_{digest.hexdigest()[:12]}", root=str(tree.root), classes=json.dumps(names),
          description=f"image-folder tree {tree.root} (splits {sorted(tree.splits)}, classes {names}).", **values)
    elif classes is not None or split is not None:
      raise ValueError("image_folder: classes=/split= describe a tree: pass manual_dir= too")
    super().__init__(config=config, manual_dir=manual_dir, **kwargs)

  def _label_names(self):
    names = json.loads(self.builder_config.classes)
    return names or None

  def _resolve_manual_dir(self) -> Path:
    if not self.builder_config.root:
      raise bad_input.DatasetInputError(
          f"{self.name}: the builder was made without manual_dir, so it knows no tree and no class names: construct "
          f"it with manual_dir= (tfds.builder('image_folder', data_dir=..., manual_dir=ROOT)). "
          f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}")
    return file_discovery.check_manual_dir(self.builder_config.root, self.name, self.MANUAL_DOWNLOAD_INSTRUCTIONS)

  def _layout(self, manual_dir: Path, bad, report):
    config = self.builder_config
    tree = find_tree(manual_dir, split=config.split)
    names = json.loads(config.classes)
    label_of = {name: k for k, name in enumerate(names)}
    layout = {}
    for split, (split_dir, class_dirs) in sorted(tree.splits.items()):
      items = []
      stray = [p for p in file_discovery.list_dir(split_dir) if p.is_file()
               and p.suffix.lower() in file_discovery.IMAGE_EXTENSIONS]
      for path in stray:
        bad(split, "unlabelled_image", str(path), f"image lies directly in {split_dir}, not in a class folder "
                                                  f"(expected {split_dir}/<class>/<image>)")
      ignored = 0
      for class_name, class_dir in sorted(class_dirs.items()):
        images, others = _images_below(class_dir)
        ignored += others
        if class_name not in label_of:
          bad(split, "unknown_label", str(class_dir), f"class folder {class_name!r} ({len(images)} images) is not "
                                                      f"one of the classes {names}")
          continue
        for path in images:
          within = path.relative_to(split_dir).as_posix()
          items.append(manual_builder.Item(path, str(path), {
              "id": within, "file_name": path.relative_to(tree.root).as_posix(), "label": label_of[class_name],
              "dataset": config.dataset}))
      missing = [name for name in names if name not in class_dirs or not any(
          i.features["label"] == label_of[name] for i in items)]
      if missing:
        report.notes.append(f"split {split!r} ({split_dir}) has no images of class(es) {missing}")
      if ignored:
        report.notes.append(f"split {split!r}: ignored {ignored} non-image file(s) in the class folders")
      layout[split] = items
    return layout

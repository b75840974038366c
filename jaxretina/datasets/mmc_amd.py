"""TFDS builder ``mmc_amd``: MMC-AMD colour fundus + OCT B-scan pairs for CRD-Net (docs/datasets.md#mmc-amd).

One record per **CFP–OCT pair of the same eye**, as CRD-Net consumes MMC-AMD: ``image`` = the colour
fundus photograph (RGB), ``oct`` = the OCT B-scan (grey, (S, S, 1)), ``label`` over
``synthetic_oct.CLASS_NAMES`` (MMC-AMD's order ``h d p w``: normal, dry AMD, PCV, wet AMD), so
``configs/crd_net.py`` (``fields='image:3,oct:1'``) reads it exactly like ``synthetic_fundus_oct``.

Configs = the two split packages: ``splitA`` (eye-disjoint train/val/test) and ``splitAP``
(patient-disjoint); splits ``train``, ``validation``, ``test`` from ``mmc-amd-<scheme>-{train,val,test}``.
Images are stored on a 448 px canvas by default, MMC-AMD's own size (``canvas_size`` overrides it).

Pairing (upstream ``code/data/DataOrganizer.py: get_mm_data``):
  * a split folder with ``ImageSets/mm.txt`` (val/test): exactly its ``<cfp_id> <oct_id>`` pairs;
  * otherwise (train): every OCT image with every CFP image of the same eye id (strict pairing;
    eye id = ``id[2:].split('_')[0]``, e.g. ``w-1544817``), so an eye with 2 CFP and 3 OCT images
    gives 6 records. Upstream's ``loosepair`` (pair across eyes of the same class) is not offered:
    it pairs images of different eyes, which a per-eye record cannot represent.
Unpaired images — CFP of an eye with no OCT in the split, or OCT with no CFP (≈ 1/4 of the CFP eyes
have no OCT) — are expected, not bad input: they are left out and counted per split and modality in
the skip report's ``notes`` (with their ids). Images named by ``mm.txt`` or ``ImageSets`` but
absent on disk, or whose ``annotations`` class disagrees with the class letter of the id, are bad
input (``on_bad_input``).

This module also holds :class:`MultiImageBuilder`, the base of builders whose records hold several
image features (``mmc_amd``, ``gamma``): the extra images are processed in the same worker call as
the main one, so a record is written only when all of its images decoded.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator

import tensorflow_datasets as tfds

from jaxretina.data import synthetic_oct
from jaxretina.datasets import bad_input
from jaxretina.datasets import file_discovery
from jaxretina.datasets import image_encoding
from jaxretina.datasets import label_tables
from jaxretina.datasets import manual_builder
from jaxretina.datasets import process_pool


# ---------------------------------------------------------------------------------------------
# Records with several image features
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ImageJob:
  """How one image feature of a record is made: ``fn(*args, options)`` → (ok, bytes | reason).

  `fn` must be a module-level function (it runs in spawned worker processes); `source` names the
  input file(s) in error messages.
  """

  fn: Callable
  args: tuple
  source: str


def _run_jobs(jobs: tuple[tuple[str, ImageJob], ...],
              options: image_encoding.ImageOptions) -> list[tuple[str, bool, Any, str]]:
  out = []
  for name, job in jobs:
    ok, result = job.fn(*job.args, options)
    out.append((name, ok, result, job.source))
    if not ok:
      break  # the record is dropped (or the build fails): its other images need no work
  return out


class MultiImageBuilder(manual_builder.ManualRetinaBuilder, skip_registration=True):
  """A ManualRetinaBuilder whose items carry extra image features.

  An item's ``features`` hold, for each extra image feature, an :class:`ImageJob` (declared as a
  ``tfds.features.Image`` in ``_extra_features``); the main ``image`` comes from ``item.path``
  through ``image_encoding.process_image``. A failed job is a ``corrupt_image`` of the whole record.
  """

  def _generate_examples(self, split: str, items: list[manual_builder.Item]) -> Iterator[tuple[str, dict]]:
    options = self.image_options
    bad = bad_input.BadInputPolicy(self._on_bad_input, self.skip_report)
    workers = self._num_workers or process_pool.default_num_workers()
    args = []
    for item in items:
      jobs = [("image", ImageJob(image_encoding.process_image, (str(item.path),), str(item.path)))]
      jobs += [(k, v) for k, v in item.features.items() if isinstance(v, ImageJob)]
      args.append((tuple(jobs), options))
    written = 0
    for item, results in zip(items, process_pool.parallel_map(_run_jobs, args, workers)):
      failed = [(name, result, source) for name, ok, result, source in results if not ok]
      if failed:
        name, reason, source = failed[0]
        bad(split, "corrupt_image", f"{source} ({name!r} of {item.features['id']!r}, declared by {item.where})",
            reason)
        continue
      example = self._example(item, {name: result for name, _, result, _ in results})
      written += 1
      yield example["id"], example
    if not written:
      raise bad_input.DatasetInputError(f"{self.name}: every record of split {split!r} was skipped "
                                        f"(see the skip counts: {self.skip_report.counts()})")

  def grey_image_feature(self, doc: str) -> tfds.features.Image:
    size = self.builder_config.canvas_size
    return tfds.features.Image(shape=(size, size, 1) if size else (None, None, 1),
                               encoding_format=self.builder_config.encoding, doc=doc)


# ---------------------------------------------------------------------------------------------
# MMC-AMD
# ---------------------------------------------------------------------------------------------
_INSTRUCTIONS = """\
MMC-AMD (https://github.com/li-xirong/mmc-amd; research use, images on request via the Google Form in
its README). Download the image package and the split packages (splitA and/or splitAP) and extract
them side by side in <manual_dir>, so that at most 3 levels below <manual_dir> one folder holds:
  mmc-amd/ImageData/cfp-clahe-448x448/f-<c>-<eye>.jpg   mmc-amd/ImageData/oct-median3x3-448x448/o-<c>-<eye>.jpg
  mmc-amd-splitA-train/ImageSets/{cfp,oct}.txt  annotations/{cfp,oct}.txt   (likewise -splitA-val, -splitA-test)
  mmc-amd-splitAP-train/...  (likewise -val, -test; for config splitAP)
The split folders' ImageData symlink may be missing or a full copy; mmc-amd/ImageData is used when present.
"""

CLASS_LETTERS = tuple(synthetic_oct.CLASS_LETTERS)
CLASS_NAMES = tuple(synthetic_oct.CLASS_NAMES)
_CATEGORIES = ("normal", "dry age related macular degeneration", "polypoidal choroidal vasculopathy",
               "wet age related macular degeneration")
_SPLITS = {"train": "train", "validation": "val", "test": "test"}
_SCHEMES = ("splitA", "splitAP")
_ID_PREFIX = {"cfp": "f", "oct": "o"}


def eye_id(image_id: str) -> str:
  """Upstream ``get_eyeid`` on an id: ``f-w-1544817_2`` → ``w-1544817``."""
  return image_id[2:].split("_")[0]


@dataclasses.dataclass(eq=False)
class MmcAmdConfig(manual_builder.ManualRetinaConfig):
  """Attributes: split_scheme: ``splitA`` (eye-disjoint) or ``splitAP`` (patient-disjoint) split package.

  ``canvas_size`` defaults to 448, MMC-AMD's own (already preprocessed) image size: the images are
  stored as distributed (decoded JPEG, PNG-encoded) instead of being upscaled to 512.
  """

  canvas_size: int = 448
  split_scheme: str = "splitA"


class MmcAmd(MultiImageBuilder):
  """MMC-AMD: CFP + OCT B-scan pairs of one eye, 4 classes (normal, dry AMD, PCV, wet AMD).

  Features beyond the common ones: ``oct`` (grey B-scan, (S, S, 1)), ``cfp_id`` / ``oct_id`` (image
  ids), ``eye_id`` (class letter + eye number), ``oct_file_name``. ``id`` = ``<cfp_id>+<oct_id>``;
  ``file_name`` = the CFP file; ``modality`` = ``cfp+oct``.
  """

  name = "mmc_amd"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  HOMEPAGE = "https://github.com/li-xirong/mmc-amd"
  DATASET_KEY = "mmc_amd"
  MODALITY = "cfp+oct"
  CONFIG_CLASS = MmcAmdConfig
  BUILDER_CONFIGS = [
      MmcAmdConfig(name="splitA", split_scheme="splitA", description="Eye-disjoint split package splitA; 448 px."),
      MmcAmdConfig(name="splitAP", split_scheme="splitAP",
                   description="Patient-disjoint split package splitAP; 448 px."),
  ]
  DEFAULT_CONFIG_NAME = "splitA"

  def _check_options(self, config) -> None:
    super()._check_options(config)
    if config.split_scheme not in _SCHEMES:
      raise ValueError(f"{self.name}: split_scheme must be one of {_SCHEMES}, got {config.split_scheme!r}")

  def _label_names(self):
    return CLASS_NAMES

  def _extra_features(self):
    return {
        "oct": self.grey_image_feature("grey OCT B-scan of the same eye"),
        "cfp_id": tfds.features.Text(),
        "oct_id": tfds.features.Text(),
        "eye_id": tfds.features.Text(doc="class letter + eye number, upstream get_eyeid"),
        "oct_file_name": tfds.features.Text(),
    }

  def _layout(self, manual_dir: Path, bad, report):
    scheme = self.builder_config.split_scheme
    root, _ = file_discovery.find_root(manual_dir, [[f"mmc-amd-{scheme}-train/ImageSets/"],
                                                    [f"mmc-amd-{scheme}-test/ImageSets/"]], dataset=self.name)
    layout = {}
    for split, disk in _SPLITS.items():
      folder = file_discovery.resolve(root, f"mmc-amd-{scheme}-{disk}", kind="dir")
      if folder is None:
        report.notes.append(f"no mmc-amd-{scheme}-{disk}/ folder in {root}: split {split!r} not written")
        continue
      layout[split] = self._split(root, folder, split, bad, report)
    return layout

  def _image_folders(self, root: Path, split_folder: Path) -> dict[str, Path]:
    for base in (file_discovery.resolve(root, "mmc-amd/ImageData", kind="dir"),
                 file_discovery.resolve(split_folder, "ImageData", kind="dir")):
      if base is None:
        continue
      cfp = file_discovery.glob_child(base, "cfp*", kind="dir", what=self.name)
      oct_ = file_discovery.glob_child(base, "oct*", kind="dir", what=self.name)
      if cfp is not None and oct_ is not None:
        return {"cfp": cfp, "oct": oct_}
    raise bad_input.DatasetInputError(
        f"{self.name}: no image folders for {split_folder.name}: expected {root / 'mmc-amd/ImageData'} (or "
        f"{split_folder / 'ImageData'}) holding cfp-clahe-448x448/ and oct-median3x3-448x448/; found in {root}: "
        f"{[p.name for p in file_discovery.list_dir(root)]}")

  def _read_ids(self, split_folder: Path, modality: str, split: str, bad,
                rejected: set[str]) -> dict[str, tuple[int, str]]:
    """image id → (class index, where) of ``ImageSets/<mod>.txt``, checked against ``annotations/<mod>.txt``.

    Ids reported as bad are added to `rejected` (pairs naming them are dropped without a second report).
    """
    listing = file_discovery.resolve(split_folder, f"ImageSets/{modality}.txt", kind="file")
    if listing is None:
      raise bad_input.DatasetInputError(f"{self.name}: {split_folder} lacks ImageSets/{modality}.txt")
    lines = [(n, line.strip()) for n, line in enumerate(listing.read_text().splitlines(), 1) if line.strip()]
    annotations = {}
    annotation_file = file_discovery.resolve(split_folder, f"annotations/{modality}.txt", kind="file")
    if annotation_file is not None:
      rows = [(n, line.split()) for n, line in enumerate(annotation_file.read_text().splitlines(), 1) if line.strip()]
      keyed = all(len(tokens) > 1 for _, tokens in rows)
      if not keyed and len(rows) != len(lines):
        raise bad_input.DatasetInputError(f"{self.name}: {annotation_file} has {len(rows)} lines but {listing} lists "
                                          f"{len(lines)} images (expected line-aligned files)")
      for k, (n, tokens) in enumerate(rows):
        key = tokens[0] if keyed else lines[k][1]
        annotations[key] = (tokens[-1], f"{annotation_file} line {n}")
    ids = {}
    for n, image_id in lines:
      where = f"{listing} line {n}"
      image_id = image_id.split()[0]
      if image_id in ids:
        bad(split, "duplicate_id", where, f"image id {image_id!r} listed more than once")
        continue
      parts = image_id.split("-")
      if len(parts) < 3 or parts[0].lower() != _ID_PREFIX[modality] or parts[1].lower() not in CLASS_LETTERS:
        rejected.add(image_id)
        bad(split, "unknown_label", where, f"image id {image_id!r} is not '{_ID_PREFIX[modality]}-<class letter "
                                           f"{'/'.join(CLASS_LETTERS)}>-<eye>'")
        continue
      label = CLASS_LETTERS.index(parts[1].lower())
      if image_id in annotations:
        value, annotation_where = annotations[image_id]
        if label_tables.parse_label(value, range(len(CLASS_NAMES))) != label:
          rejected.add(image_id)
          bad(split, "unknown_label", annotation_where, f"class {value!r} of {image_id!r} disagrees with its class "
                                                        f"letter {parts[1]!r} (expected {label})")
          continue
      ids[image_id] = (label, where)
    return ids

  def _split(self, root: Path, folder: Path, split: str, bad, report) -> list[manual_builder.Item]:
    images = self._image_folders(root, folder)
    rejected: set[str] = set()
    ids = {m: self._read_ids(folder, m, split, bad, rejected) for m in ("cfp", "oct")}
    mm = file_discovery.resolve(folder, "ImageSets/mm.txt", kind="file")
    pairs: list[tuple[str, str, str]] = []  # (cfp id, oct id, where)
    if mm is not None:
      for n, line in enumerate(mm.read_text().splitlines(), 1):
        tokens = line.split()
        if not tokens:
          continue
        where = f"{mm} line {n}"
        if len(tokens) != 2:
          bad(split, "bad_row", where, f"expected '<cfp_id> <oct_id>', got {line.strip()!r}")
          continue
        pairs.append((tokens[0], tokens[1], where))
    else:
      octs_by_eye = collections.defaultdict(list)
      for oct_id in ids["oct"]:
        octs_by_eye[eye_id(oct_id)].append(oct_id)
      for cfp_id, (_, where) in ids["cfp"].items():
        for oct_id in octs_by_eye.get(eye_id(cfp_id), []):
          pairs.append((cfp_id, oct_id, where))
    index = {m: file_discovery.ImageIndex(images[m], relative_to=root) for m in ("cfp", "oct")}
    items, used, seen = [], {"cfp": set(), "oct": set()}, set()
    for cfp_id, oct_id, where in pairs:
      if cfp_id in rejected or oct_id in rejected:
        continue
      unknown = [i for m, i in (("cfp", cfp_id), ("oct", oct_id)) if i not in ids[m]]
      if unknown:
        bad(split, "unknown_label", where, f"{unknown} not listed (or rejected) in ImageSets/cfp.txt / oct.txt")
        continue
      if ids["cfp"][cfp_id][0] != ids["oct"][oct_id][0] or eye_id(cfp_id) != eye_id(oct_id):
        bad(split, "bad_pair", where, f"{cfp_id!r} and {oct_id!r} are not the same eye (expected equal eye ids)")
        continue
      record_id = f"{cfp_id}+{oct_id}"
      if record_id in seen:
        bad(split, "duplicate_id", where, f"pair {record_id!r} appears more than once")
        continue
      seen.add(record_id)
      used["cfp"].add(cfp_id)
      used["oct"].add(oct_id)
      cfp_path = index["cfp"].find(cfp_id, bad, split, where)
      oct_path = index["oct"].find(oct_id, bad, split, where)
      if cfp_path is None or oct_path is None:
        continue
      label = ids["cfp"][cfp_id][0]
      items.append(manual_builder.Item(cfp_path, where, {
          "id": record_id, "file_name": index["cfp"].relative(cfp_path), "label": label,
          "oct": ImageJob(image_encoding.process_grey_image, (str(oct_path),), str(oct_path)),
          "cfp_id": cfp_id, "oct_id": oct_id, "eye_id": eye_id(cfp_id),
          "oct_file_name": index["oct"].relative(oct_path), "categories": [_CATEGORIES[label]]}))
    for modality in ("cfp", "oct"):
      unpaired = [i for i in ids[modality] if i not in used[modality]]
      if unpaired:
        eyes = sorted({eye_id(i) for i in unpaired})
        report.notes.append(f"{split}: {len(unpaired)} {modality.upper()} image(s) of {len(eyes)} eye(s) have no "
                            f"{'OCT' if modality == 'cfp' else 'CFP'} partner in {folder.name} and are not written "
                            f"(unpaired): {unpaired}")
    return items

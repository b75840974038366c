"""Transfer-evaluation inputs: labelled rows, their images, and frozen image features cached on disk.

Rows come from a FLAIR/KeepFIT dataframe (``image``, ``categories`` columns; image paths relative to
a data root, FLAIR's ``PATH_DATASETS``) or from a prepared TFDS dataset (e.g. the embedded
``synthetic_retina``, or any jaxretina builder's output). Images are preprocessed as FLAIR's
transferability loader does (``LoadImage`` → optional ``crop_foreground`` → ``ImageScaling(canvas)``):
dataframe images get the field-of-view crop (``crop_foreground``) and the antialiased longest-side
resize onto a square canvas; TFDS images were canvas-resized at build time and are only resized to
``image_size``.

Features are the vision tower's raw pooled features (B, D) (the projection head is cheap and applied
afterwards, so one extraction serves ``project_features`` True and False). They are extracted once
per (vision weights, rows, preprocessing) and stored under ``cache_dir/<key>.npz``; the key hashes the
vision tower's weight bytes, the rows' identity (dataframe bytes + every image file's size and mtime,
or the TFDS dataset's info and record files) and the preprocessing (size, crop, augmentation passes
and seed). Any change in these gives a new key, so a stale file is never read. Extraction runs the
encoder under ``jit`` on batches sharded over the mesh's data axis; with several processes each loads
its part of every global batch.

Augmented passes (``tta`` / ``fta``, 20 upstream) run FLAIR's pretraining augmentation
(``jaxretina.data.augment.flair_augment``) on device before the encoder, keyed by
``fold_in(PRNGKey(seed), pass)``; upstream draws them from torch's global generator, so they are
deterministic here and random there.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
from typing import Any, Callable, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from jaxretina.data import augment
from jaxretina.models import flair
from jaxretina.models import resnet  # noqa: F401  (the backbone class must be importable)
from jaxretina.train import distributed
from jaxretina.data import imaging
from jaxretina.transfer import splits
from jaxretina.data import pipeline
from jaxretina.datasets import ensure_built

CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Rows:
  """The labelled images of one transfer dataset, in dataframe / record order.

  ``ids``: row identifiers (dataframe ``image`` paths or record ids); ``categories``: each row's
  category names (the first one is its class, as FLAIR's ``targets[categories[0]]``);
  ``load(i)``: float32 (S, S, 3) in [0, 1], preprocessed; ``fingerprint``: identifies the images and
  their labels; ``description``: for messages.
  """

  ids: list[str]
  categories: list[list[str]]
  load: Callable[[int], np.ndarray]
  image_size: int
  fingerprint: str
  description: str

  def __len__(self) -> int:
    return len(self.ids)


def _sha256(*parts: Any) -> str:
  h = hashlib.sha256()
  for part in parts:
    h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True, default=str).encode())
  return h.hexdigest()


def dataframe_rows(csv_path: str, data_root: str, *, image_size: int, crop_foreground: bool) -> Rows:
  """The rows of a FLAIR-format CSV; image ``data_root/<image column>`` (every file must exist)."""
  if not os.path.isfile(csv_path):
    raise FileNotFoundError(f"dataframe {csv_path}: no such file (a FLAIR/KeepFIT transfer CSV with 'image' and "
                            "'categories' columns)")
  if not os.path.isdir(data_root):
    raise FileNotFoundError(f"data root {data_root}: no such directory (the folder the CSV's image paths are "
                            "relative to, FLAIR's PATH_DATASETS)")
  table = splits.read_dataframe(csv_path)
  if not table:
    raise ValueError(f"dataframe {csv_path}: no rows")
  ids, categories, paths, stats, missing = [], [], [], [], []
  for i, row in enumerate(table):
    path = os.path.join(data_root, row["image"])
    ids.append(row["image"])
    categories.append(splits.parse_categories(row["categories"], f"{csv_path}: row {i + 1}"))
    paths.append(path)
    try:
      st = os.stat(path)
      stats.append((row["image"], st.st_size, st.st_mtime_ns))
    except OSError:
      missing.append(f"row {i + 1}: {path}")
  if missing:
    shown = "\n  ".join(missing[:10]) + (f"\n  ... {len(missing) - 10} more" if len(missing) > 10 else "")
    raise FileNotFoundError(f"dataframe {csv_path}: {len(missing)} of {len(table)} images are missing under "
                            f"{data_root}:\n  {shown}")

  def load(i: int) -> np.ndarray:
    try:
      # PIL's plain conversion (16-bit ranges not stretched): what this loader has always read.
      image = imaging.read_file(paths[i], 3, stretch_wide_modes=False)
      if crop_foreground:
        image = imaging.crop_fov(image)
      return imaging.flair_preprocess(image, image_size)
    except Exception as e:  # noqa: BLE001 - name the row and the file whatever the decoder raised
      raise ValueError(f"dataframe {csv_path}: row {i + 1}: unreadable image {paths[i]}: "
                       f"{type(e).__name__}: {e}") from None

  with open(csv_path, "rb") as f:
    csv_bytes = f.read()
  return Rows(ids=ids, categories=categories, load=load, image_size=int(image_size),
              fingerprint=_sha256(b"dataframe", csv_bytes, stats),
              description=f"{os.path.basename(csv_path)} ({len(ids)} rows, images under {data_root})")


def tfds_rows(name: str, splits_: Sequence[str], data_dir: str, *, image_size: int, class_from: str = "categories",
              builder_kwargs: dict | None = None, build_if_missing: bool = False) -> Rows:
  """The records of TFDS ``splits_`` (concatenated in order) of a prepared jaxretina dataset.

  ``class_from``: ``'categories'`` (a record's class is the first of its FLAIR ``categories``, a JSON
  list, as FLAIR's dataframes) or ``'label'`` (the name of its ``label`` ClassLabel).
  """
  if class_from not in ("categories", "label"):
    raise ValueError(f"class_from={class_from!r}: expected 'categories' or 'label'")
  if build_if_missing:
    ensure_built(name, data_dir, **(builder_kwargs or {}))
  sources = [pipeline.open_source(name, s, data_dir, builder_kwargs) for s in splits_]
  ids, categories, index = [], [], []
  for source in sources:
    features = source.info.features
    if class_from not in features:
      raise ValueError(f"{source.name} split {source.split}: records have no {class_from!r} feature (features: "
                       f"{sorted(features)}); set class_from to the other of 'categories' / 'label'")
    label_names = list(features["label"].names) if class_from == "label" else None
    for i in range(len(source)):
      record = source[i]
      if label_names is not None:
        cats = [label_names[int(record["label"])]]
      else:
        cats = json.loads(pipeline._text(record["categories"]))
        if not cats:
          raise ValueError(f"{source.name} split {source.split}: record {i} has no categories (ungradable?)")
      ids.append(pipeline._text(record["id"]) if "id" in record else f"{source.split}/{i}")
      categories.append(list(cats))
      index.append((source, i))

  def load(i: int) -> np.ndarray:
    source, j = index[i]
    return pipeline.read_image(source, j, "image", 3, image_size).astype(np.float32) / 255.0

  infos = []
  for source in sources:
    root = source.info.data_dir
    files = sorted(os.listdir(root))
    infos.append((source.name, source.split, [(f, os.path.getsize(os.path.join(root, f))) for f in files]))
  return Rows(ids=ids, categories=categories, load=load, image_size=int(image_size),
              fingerprint=_sha256(b"tfds", infos, categories),
              description=f"{sources[0].name} {'+'.join(splits_)} ({len(ids)} records)")


# ------------------------------------------------------------------------------------------ weights
def weights_fingerprint(tree: Any) -> str:
  """sha256 over the leaves' paths, dtypes, shapes and bytes (order-independent of dict insertion)."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0], key=lambda kv: jax.tree_util.keystr(kv[0])):
    array = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{array.dtype}{array.shape}".encode())
    h.update(array.tobytes())
  return h.hexdigest()


def vision_variables(variables: dict) -> dict:
  """The two-tower's vision-tower collections: ``{'params': ..., 'batch_stats': ...}`` of ``vision_model``."""
  out = {"params": variables["params"]["vision_model"]}
  if "batch_stats" in variables and "vision_model" in variables["batch_stats"]:
    out["batch_stats"] = variables["batch_stats"]["vision_model"]
  return out


def backbone_variables(variables: dict) -> dict:
  vision = vision_variables(variables)
  return {c: tree["model"] for c, tree in vision.items() if "model" in tree}


def project(model, variables: dict, raw: Any, *, project_features: bool, norm_features: bool) -> np.ndarray:
  """FLAIR's ``ProjectionLayer`` on raw pooled features (..., D) → (..., proj_dim), or raw when not projecting."""
  raw = np.asarray(raw, np.float32)
  if not project_features:
    return raw
  head = flair.ProjectionLayer(model.proj_dim, use_bias=model.proj_bias, project=True, norm=norm_features)
  params = {"params": variables["params"]["vision_model"]["projection_head_vision"]}
  return np.asarray(jax.jit(head.apply)(params, jnp.asarray(raw)), np.float32)


# ------------------------------------------------------------------------------------------ extraction
@dataclasses.dataclass(frozen=True)
class Features:
  """Raw pooled features of every row: ``clean`` (N, D) and ``augmented`` (A, N, D) (A = 0: none)."""

  clean: np.ndarray
  augmented: np.ndarray
  key: str
  path: str
  from_cache: bool


def cache_key(weights: str, rows: Rows, *, augment_passes: int, augment_seed: int, kornia_grid_quirk: bool,
              preprocessing: dict) -> str:
  return _sha256(CACHE_VERSION, weights, rows.fingerprint, rows.image_size, int(augment_passes),
                 int(augment_seed), bool(kornia_grid_quirk), preprocessing)[:32]


def _load_batches(rows: Rows, chunks: Sequence[Sequence[int]], batch_size: int, num_threads: int):
  """One host batch (float32 (batch_size, S, S, 3), zero rows past a chunk's end) per chunk of row
  positions, decoded two batches ahead in a thread pool."""
  s = rows.image_size

  def make(chunk):
    batch = np.zeros((batch_size, s, s, 3), np.float32)
    for k, i in enumerate(chunk):
      image = rows.load(int(i))
      if image.shape != (s, s, 3):
        raise ValueError(f"{rows.description}: row {i} ({rows.ids[i]}) loads as {image.shape}, expected {(s, s, 3)}")
      batch[k] = image
    return batch

  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    pending = [pool.submit(make, c) for c in chunks[:2]]
    for j in range(len(chunks)):
      batch = pending[j].result()
      if j + 2 < len(chunks):
        pending.append(pool.submit(make, chunks[j + 2]))
      yield batch


def extract_features(run, rows: Rows, *, mesh, batch_size: int = 64, augment_passes: int = 0,
                     augment_seed: int = 0, kornia_grid_quirk: bool = False, cache_dir: str | None = None,
                     preprocessing: dict | None = None, num_threads: int = 8,
                     log: Callable[[str], None] = print) -> Features:
  """Raw pooled features of every row of ``rows`` under ``run``'s vision tower (cached; see the module doc).

  Args:
    run: a ``zero_shot.TwoTowerRun`` (``jaxretina.evaluators.zero_shot``).
    rows: the images.
    mesh: device mesh; batches are sharded over its data axes (``batch_size`` is rounded up to a
      multiple of the data shards).
    augment_passes: A > 0 also extracts A passes under FLAIR's augmentation (tta/fta).
    cache_dir: where feature files live (None: no cache).
    preprocessing: extra items of the cache key (e.g. ``crop_foreground``).
  """
  backbone_vars = backbone_variables(run.variables)
  key = cache_key(weights_fingerprint(backbone_vars), rows, augment_passes=augment_passes, augment_seed=augment_seed,
                  kornia_grid_quirk=kornia_grid_quirk, preprocessing=dict(preprocessing or {}))
  path = os.path.join(cache_dir, f"{key}.npz") if cache_dir else ""
  if path and os.path.isfile(path):
    try:
      with np.load(path) as z:
        clean, augmented = z["clean"], z["augmented"]
      if clean.shape[0] == len(rows) and augmented.shape[:2] == (int(augment_passes), len(rows)):
        log(f"features: {len(rows)} rows from the cache {path}")
        return Features(clean, augmented, key, path, True)
      log(f"features: the cache file {path} has the wrong shapes ({clean.shape}, {augmented.shape}); re-extracting")
    except (OSError, ValueError, KeyError) as e:
      log(f"features: unreadable cache file {path} ({type(e).__name__}: {e}); re-extracting")

  shards = distributed.num_data_shards(mesh)
  batch_size = -(-int(batch_size) // shards) * shards
  local = distributed.local_batch_size(batch_size, mesh)
  backbone = run.model.vision
  variables = jax.device_put(backbone_vars, distributed.replicated(mesh))

  @jax.jit
  def encode(v, images, aug_key):
    if aug_key is not None:
      images = augment.flair_augment(aug_key, images, augment.FlairAugmentConfig(kornia_grid_quirk=kornia_grid_quirk))
    return backbone.apply(v, images, train=False)

  n = len(rows)
  p = jax.process_index()
  passes = [None] + [jax.random.fold_in(jax.random.PRNGKey(int(augment_seed)), a) for a in range(int(augment_passes))]
  outputs = []
  for a, aug_key in enumerate(passes):
    feats = []
    # Each process decodes its block of every global batch; positions past N are zero padding, and
    # every process runs the same number of batches (the gather is collective).
    blocks = np.arange(-(-n // batch_size) * batch_size).reshape(-1, batch_size)[:, p * local:(p + 1) * local]
    chunks = [[int(i) for i in block if i < n] for block in blocks]
    for host_batch in _load_batches(rows, chunks, local, num_threads):
      images = distributed.global_batch({"image": host_batch}, mesh)["image"]
      out = encode(variables, images, aug_key)
      feats.append(np.asarray(multihost_utils.process_allgather(out, tiled=True)))
    stacked = np.concatenate(feats)[:n] if feats else np.zeros((0, 0), np.float32)
    outputs.append(stacked.astype(np.float32))
    log(f"features: pass {a + 1}/{len(passes)} ({'clean' if aug_key is None else 'augmented'}) of {n} rows")
  clean = outputs[0]
  augmented = np.stack(outputs[1:]) if len(outputs) > 1 else np.zeros((0, n, clean.shape[-1]), np.float32)
  if path and jax.process_index() == 0:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, clean=clean, augmented=augmented, ids=np.asarray(rows.ids))
    os.replace(tmp, path)
    with open(os.path.join(cache_dir, f"{key}.json"), "w") as f:
      json.dump(dict(rows=rows.description, image_size=rows.image_size, augment_passes=int(augment_passes),
                     augment_seed=int(augment_seed), preprocessing=preprocessing or {}, model=run.description), f,
                indent=1)
  return Features(clean, augmented, key, path, False)

"""Grain input pipelines on random-access (ArrayRecord / TFDS) sources.

Every stream has the same shape, built for multi-host training:

  record indices ─ shuffle (seeded, reshuffled each epoch) ─ repeat ─ per-example host work
  (PNG decode, optional resize, FLAIR prompt / caption) ─ shard by process ─ batch (local batch =
  global // process_count, drop remainder; tokenisation per batch) ─ ``to_iter_dataset``.

The shuffle and every per-example random draw are functions of ``(seed, global position)`` only,
so a stream is deterministic, independent of ``process_count`` in content, and its iterator
state (``iterator.get_state()`` / ``set_state()``) is a small dict an Orbax checkpoint can hold:
restoring it yields exactly the batch that would have come next. The process shards are strided
slices of one global stream: disjoint, covering, and equal in size up to one example.

Records are dicts as TFDS data sources give them (bytes for strings): ``image`` (encoded bytes,
or an already decoded uint8 array), ``categories``/``atributes`` (JSON strings as in
``synthetic_retina``, FLAIR's python-list strings, or sequences), ``caption``, ``label``, ``id``,
``dataset``. Images are decoded here (PIL), so a corrupt record fails with an error naming the
dataset, split, record index and id.
"""

from __future__ import annotations

import ast
import json
import logging
import zlib
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np
from absl import flags

from jaxretina.data import imaging
from jaxretina.text import prompts
import jaxretina.datasets


def _ensure_absl_flags_parsed() -> None:
  # Grain (and its worker processes) read absl flags; outside an absl app nothing parsed them.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

Tokenize = Callable[[list[str], int], dict[str, np.ndarray]]

DEFAULT_CAPTION_TEMPLATE = "A [ATR] fundus photograph of [CLS]"


def _default_read_options() -> grain.ReadOptions:
  # Decoding and prompt building are GIL-bound Python: two threads and a short buffer keep the
  # host busy without stealing the cores the train step runs on.
  return grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


class RecordSource:
  """A random-access split together with where it came from (for error messages).

  Attributes:
    name: dataset name (with config), e.g. ``"synthetic_retina/small"``.
    split: split name.
    data_dir: TFDS data directory.
    info: the builder's ``tfds.core.DatasetInfo`` (features, split sizes).
  """

  def __init__(self, data_source, *, name: str, split: str, data_dir: str, info=None):
    self._data_source = data_source
    self.name, self.split, self.data_dir, self.info = name, split, data_dir, info

  def __len__(self) -> int:
    return len(self._data_source)

  def __getitem__(self, index: int) -> dict:
    return self._data_source[index]

  def __repr__(self) -> str:
    return f"RecordSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, len={len(self)})"


def open_source(name: str, split: str, data_dir: str, builder_kwargs: dict | None = None) -> RecordSource:
  """Opens a prepared TFDS split as a random-access source; images stay encoded (decoded in the pipeline).

  Args:
    name: registered TFDS name, optionally ``name/config``.
    split: split name (``"train"``, ``"test"``, ...).
    data_dir: TFDS data directory holding the prepared dataset.
    builder_kwargs: extra ``tfds.builder`` keywords (``config=``, builder-specific sizes).

  Raises:
    FileNotFoundError: the dataset is not prepared under `data_dir`.
    ValueError: unknown dataset, missing split, or an empty split.
  """
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(name, data_dir=data_dir, **(builder_kwargs or {}))
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"open_source: no TFDS dataset named {name!r} (data_dir {data_dir!r}): {e}") from e
  label = builder.name + (f"/{builder.builder_config.name}" if builder.builder_config else "")
  if not builder.is_prepared():
    raise FileNotFoundError(f"open_source: dataset {label!r} is not prepared under data_dir {data_dir!r} "
                            f"(expected {builder.data_dir}); build it with jaxretina.datasets.ensure_built")
  splits = builder.info.splits
  if split not in splits:
    raise ValueError(f"open_source: dataset {label!r} in data_dir {data_dir!r} has no split {split!r}; "
                     f"available: {sorted(splits)}")
  if splits[split].num_examples == 0:
    raise ValueError(f"open_source: split {split!r} of dataset {label!r} in data_dir {data_dir!r} is empty")
  decoders = {name: tfds.decode.SkipDecoding() for name, feature in builder.info.features.items()
              if isinstance(feature, tfds.features.Image)} or None
  source = builder.as_data_source(split=split, decoders=decoders)
  if len(source) == 0:
    raise ValueError(f"open_source: split {split!r} of dataset {label!r} in data_dir {data_dir!r} is empty")
  return RecordSource(source, name=label, split=split, data_dir=str(data_dir), info=builder.info)


# ---------------------------------------------------------------------------------------------
# Per-record helpers
# ---------------------------------------------------------------------------------------------
def _where(source) -> str:
  name = getattr(source, "name", None)
  split = getattr(source, "split", None)
  if name is None and hasattr(source, "dataset_info"):
    name = source.dataset_info.name
  if name is None:
    name = type(source).__name__
  return f"dataset {name!r}, split {split!r}" if split is not None else f"dataset {name!r}"


def _text(value) -> str:
  if isinstance(value, (bytes, np.bytes_)):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _text(value.item())
  return str(value)


def _str_list(value) -> list[str]:
  """Lists of strings as stored by the builders: JSON / python-list strings, or sequences."""
  if value is None:
    return []
  if isinstance(value, (bytes, np.bytes_, str)) or (isinstance(value, np.ndarray) and value.ndim == 0):
    text = _text(value).strip()
    if not text:
      return []
    try:
      parsed = json.loads(text)
    except json.JSONDecodeError:
      parsed = ast.literal_eval(text)  # FLAIR dataframes: "['clean']"
    if isinstance(parsed, str):
      return [parsed]
    return [_text(v) for v in parsed]
  return [_text(v) for v in value]


def _record(source, index: int) -> dict:
  try:
    return source[int(index)]
  except Exception as e:  # noqa: BLE001  (re-raised with the record's address)
    raise RuntimeError(f"could not read record {index} of {_where(source)}: {type(e).__name__}: {e}") from e


def _decode_image(record: dict, index: int, source, image_size: int | None, field: str = "image",
                  channels: int = 3) -> np.ndarray:
  """uint8 (H, W, channels) of a record's image ``field``, resized (PIL bilinear) to image_size² when given.

  ``channels`` 3 converts any stored mode to RGB (grey FFA photographs included); 1 converts to
  grey (OCT B-scans).
  """
  if channels not in (1, 3):
    raise ValueError(f"image field {field!r}: channels must be 1 or 3, got {channels}")
  if field not in record:
    raise KeyError(f"record {index} of {_where(source)} has no {field!r} field (fields: {sorted(record)})")
  try:
    return imaging.decode(record[field], channels, image_size)
  except Exception as e:  # noqa: BLE001  (any decoder failure: report which record, not PIL's internals)
    record_id = _text(record["id"]) if "id" in record else "?"
    raise ValueError(f"corrupt or unreadable {field!r} in record {index} (id {record_id!r}) of {_where(source)}: "
                     f"{type(e).__name__}: {e}") from None


def read_image(source, index: int, field: str = "image", channels: int = 3, image_size: int | None = None) -> np.ndarray:
  """One record's decoded image field, uint8 (H, W, channels)."""
  return _decode_image(_record(source, index), index, source, image_size, field, channels)


def _label(record: dict, index: int, source, num_classes: int | None) -> int:
  if "label" not in record:
    raise KeyError(f"record {index} of {_where(source)} has no 'label' field (fields: {sorted(record)})")
  label = int(record["label"])
  if num_classes is not None and not 0 <= label < num_classes:
    record_id = _text(record["id"]) if "id" in record else "?"
    raise ValueError(f"label {label} of record {index} (id {record_id!r}) of {_where(source)} is outside "
                     f"[0, {num_classes}): the config's data.num_classes={num_classes} does not cover the "
                     "dataset's labels (set data.label_subset to train on some classes only)")
  return label


def _category_index(category_names: Sequence[str]) -> dict[str, int] | None:
  """name → id; ``None`` (no list given) means ids from a stable hash of the name (see below)."""
  if not category_names:
    return None
  index = {}
  for i, name in enumerate(category_names):
    index.setdefault(name, i)
  return index


def stable_category_id(name: str) -> int:
  """A process- and run-independent id for a category name (CRC32, 31 bits).

  Co-occurrence targets only compare ids for equality, so real pretraining mixes with hundreds of
  free-text categories need no vocabulary list; a collision (~n²/2³² for n names) would merge two
  categories' targets.
  """
  return zlib.crc32(name.encode("utf-8")) & 0x7FFFFFFF


class _TextExample:
  """Builds one (image, text, category id) element from a record index and a seeded generator."""

  def __init__(self, source, *, category_names, caption_template, augment, use_caption, image_size):
    self.source = source
    self.category_ids = _category_index(category_names)
    self.caption_template = caption_template
    self.augment = augment
    self.use_caption = use_caption
    self.image_size = image_size

  def __call__(self, record_index: int, rng: np.random.Generator) -> dict[str, Any]:
    record = _record(self.source, record_index)
    image = _decode_image(record, record_index, self.source, self.image_size)
    categories = _str_list(record.get("categories"))
    if self.use_caption:
      if "caption" not in record:
        raise KeyError(f"use_caption=True but record {record_index} of {_where(self.source)} has no 'caption'")
      text = _text(record["caption"])
      category = categories[0] if categories else None
      if category is None:
        category_id = -1
      elif self.category_ids is None:
        category_id = stable_category_id(category)
      else:
        category_id = self.category_ids.get(category, -1)
    else:
      report, category = prompts.produce_description(categories, _str_list(record.get("atributes")), rng,
                                                     self.caption_template)
      if self.augment:
        report = prompts.augment_description(report, category, rng, _text(record.get("dataset", "")))
      if self.category_ids is None:
        text, category_id = report, stable_category_id(category)
      elif category not in self.category_ids:
        raise ValueError(f"category {category!r} of record {record_index} (id {_text(record.get('id', '?'))!r}) "
                         f"of {_where(self.source)} is not in category_names; list every category the data "
                         f"can carry (for synthetic_retina: jaxretina.data.synthetic.CATEGORY_NAMES), "
                         f"or none to identify categories by a hash of their name")
      else:
        text, category_id = report, self.category_ids[category]
    return {"image": image, "text": text, "category_id": category_id}


def _text_batch_fn(tokenize: Tokenize, max_length: int, where: str):

  def batch_fn(elements: Sequence[dict]) -> dict[str, np.ndarray]:
    shapes = {e["image"].shape for e in elements}
    if len(shapes) > 1:
      raise ValueError(f"images of different sizes {sorted(shapes)} in one batch from {where}; pass image_size")
    tokens = tokenize([e["text"] for e in elements], max_length)
    return {
        "image": np.stack([e["image"] for e in elements]),
        "input_ids": np.asarray(tokens["input_ids"], np.int32),
        "attention_mask": np.asarray(tokens["attention_mask"], np.int32),
        "category_id": np.asarray([e["category_id"] for e in elements], np.int32),
    }

  return batch_fn


def _check_sharding(global_batch_size: int, process_index: int, process_count: int, where: str) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"{where}: need 0 <= process_index < process_count, got {process_index}, {process_count}")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f"{where}: global batch size {global_batch_size} must be a positive multiple of "
                     f"process_count {process_count}")
  return global_batch_size // process_count


def _check_nonempty(source, where: str) -> int:
  n = len(source)
  if n == 0:
    raise ValueError(f"{where}: {_where(source)} is empty")
  return n


def _check_seed(seed: int, where: str) -> int:
  if int(seed) < 0:
    raise ValueError(f"{where}: seed must be non-negative, got {seed}")
  return int(seed)


class _ProcessBlock(grain.MapDataset):
  """Process ``index``'s rows of every global batch: rows [index·b, (index+1)·b) of each block of B.

  Global batch k is then the same examples in the same row order whatever the process count, so
  per-row randomness on device (augmentation keys, dropout masks) and hence the trained weights do
  not depend on how many hosts a run uses.
  """

  def __init__(self, parent: grain.MapDataset, local_batch: int, index: int, count: int):
    super().__init__(parent)
    self._local, self._index, self._count = local_batch, index, count

  def __len__(self) -> int:
    return len(self._parent) // (self._local * self._count) * self._local

  def __getitem__(self, position):
    if isinstance(position, slice):
      return self.slice(position)
    block, row = divmod(position, self._local)
    return self._parent[(block * self._count + self._index) * self._local + row]

  def __str__(self) -> str:
    return f"ProcessBlock(local_batch={self._local}, index={self._index}, count={self._count})"


# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------
def image_text_batches(source, *, tokenize: Tokenize, max_length: int, category_names: Sequence[str],
                       caption_template: str = DEFAULT_CAPTION_TEMPLATE, augment_description: bool = True,
                       use_caption: bool = False, global_batch_size: int, seed: int, process_index: int = 0,
                       process_count: int = 1, image_size: int | None = None, num_epochs: int | None = None,
                       read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """The contrastive pre-training stream (FLAIR / KeepFIT main batches).

  Args:
    source: random-access records (``open_source``, a TFDS data source, ``uniform_mixture``...).
    tokenize: ``tokenize(texts, max_length) -> {'input_ids', 'attention_mask'}`` int32 (n, L),
      padded to ``max_length`` (static shapes).
    max_length: L.
    category_names: the category vocabulary; ``category_id`` indexes it.
    caption_template: FLAIR's prompt with ``[ATR]``/``[CLS]`` slots.
    augment_description: FLAIR's ``AugmentDescription`` (category → random expert description).
    use_caption: KeepFIT's "MM data" mode: the record's raw ``caption`` (no template); then
      ``category_id`` is the first listed category's index, or -1 when there is none / it is unknown
      (the KD loss uses identity targets in this mode).
    global_batch_size: examples per step over all processes.
    seed: shuffle and per-example randomness (prompt draws depend on ``(seed, position)``).
    process_index, process_count: this host's shard of the global stream.
    image_size: resize to image_size² when the stored size differs (PIL bilinear).
    num_epochs: epochs to iterate (None = forever; the order is reshuffled every epoch).
    read_options: Grain prefetch threads/buffer (default 2 threads, 4 batches).

  Returns:
    IterDataset of dicts: ``image`` uint8 (b, H, W, 3), ``input_ids`` int32 (b, L),
    ``attention_mask`` int32 (b, L), ``category_id`` int32 (b,), b = global_batch_size //
    process_count; incomplete final batches are dropped.
  """
  where = "image_text_batches"
  _ensure_absl_flags_parsed()
  local_batch = _check_sharding(global_batch_size, process_index, process_count, where)
  n = _check_nonempty(source, where)
  seed = _check_seed(seed, where)
  make = _TextExample(source, category_names=category_names, caption_template=caption_template,
                      augment=augment_description, use_caption=use_caption, image_size=image_size)
  # The prompt draws use a generator of (seed, global position): the same example gets a new
  # prompt every epoch, and the stream's content does not depend on the process layout.
  ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(num_epochs)
  ds = ds.map_with_index(lambda position, record_index: make(record_index, np.random.default_rng((seed, position))))
  ds = _ProcessBlock(ds, local_batch, process_index, process_count)
  ds = ds.batch(local_batch, drop_remainder=True, batch_fn=_text_batch_fn(tokenize, max_length, _where(source)))
  return ds.to_iter_dataset(read_options or _default_read_options())


def knowledge_batches(source, *, tokenize: Tokenize, max_length: int, global_batch_size: int, seed: int,
                      category_names: Sequence[str] = (), use_caption: bool = True,
                      caption_template: str = DEFAULT_CAPTION_TEMPLATE, augment_description: bool = True,
                      process_index: int = 0, process_count: int = 1, image_size: int | None = None,
                      num_batches: int | None = None, read_options: grain.ReadOptions | None = None
                      ) -> grain.IterDataset:
  """KeepFIT's knowledge ("KD") stream: expert image–text pairs drawn uniformly WITH replacement.

  KeepFIT zips its main loader with a ``WeightedRandomSampler(ones(N), replacement=True)`` loader
  of the same batch size; here batch k of this stream pairs with batch k of the main stream
  (iterate both once per step and checkpoint both iterator states). Draw j of global batch k picks
  record ``default_rng((seed, k * global_batch_size + j)).integers(N)``: deterministic, and
  independent of the process layout.

  Args:
    use_caption: True = paper's "MM data" mode (raw ``caption`` text, identity targets);
      False = committed code's FLAIR-style KD dataframe (prompt from categories; ``category_id``
      gives co-occurrence targets, so ``category_names`` must cover the categories).
    num_batches: batches to produce (None = forever).
    Other arguments as in ``image_text_batches``.

  Returns:
    IterDataset of dicts like ``image_text_batches``.
  """
  where = "knowledge_batches"
  _ensure_absl_flags_parsed()
  local_batch = _check_sharding(global_batch_size, process_index, process_count, where)
  n = _check_nonempty(source, where)
  seed = _check_seed(seed, where)
  make = _TextExample(source, category_names=category_names, caption_template=caption_template,
                      augment=augment_description, use_caption=use_caption, image_size=image_size)

  def draw(position: int, _) -> dict[str, Any]:
    rng = np.random.default_rng((seed, position))
    return make(int(rng.integers(n)), rng)

  positions = grain.MapDataset.range(n).repeat(None) if num_batches is None else grain.MapDataset.range(
      int(num_batches) * global_batch_size)
  ds = _ProcessBlock(positions.map_with_index(draw), local_batch, process_index, process_count)
  ds = ds.batch(local_batch, drop_remainder=True, batch_fn=_text_batch_fn(tokenize, max_length, _where(source)))
  return ds.to_iter_dataset(read_options or _default_read_options())


class LabelSubset:
  """The records of ``source`` whose label is in ``labels``, relabelled to their position there.

  ``LabelSubset(src, [0, 1, 2, 3, 4])`` keeps the five DR grades of a dataset that also has other
  classes; ``[2, 0]`` would make label 2 class 0 and label 0 class 1. The labels are scanned once
  (records are read without decoding images).
  """

  def __init__(self, source, labels: Sequence[int]):
    self.source = source
    self.labels = [int(k) for k in labels]
    if not self.labels or len(set(self.labels)) != len(self.labels):
      raise ValueError(f"label subset {list(labels)}: expected distinct labels")
    position = {k: i for i, k in enumerate(self.labels)}
    self._indices = []
    self._new_label = []
    for index in range(len(source)):
      record = _record(source, index)
      label = _label(record, index, source, None)
      if label in position:
        self._indices.append(index)
        self._new_label.append(position[label])
    self.name = f"{getattr(source, 'name', type(source).__name__)}[labels {self.labels}]"
    self.split = getattr(source, "split", None)
    self.info = getattr(source, "info", None)
    if not self._indices:
      raise ValueError(f"label subset {self.labels}: no record of {_where(source)} carries one of these labels")

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict:
    record = dict(_record(self.source, self._indices[int(index)]))
    record["label"] = self._new_label[int(index)]
    return record


def record_labels(source, num_classes: int | None = None) -> np.ndarray:
  """(N,) int64 label of every record, read without decoding images."""
  if isinstance(source, LabelSubset):
    return np.asarray(source._new_label, np.int64)
  return np.asarray([_label(_record(source, i), i, source, num_classes) for i in range(len(source))], np.int64)


def label_counts(source, num_classes: int) -> np.ndarray:
  """(num_classes,) int64 record counts per label."""
  return np.bincount(record_labels(source, num_classes), minlength=num_classes)


ImageFields = Mapping[str, int]  # image field name → channels (3 = RGB, 1 = grey)


def _check_fields(fields: ImageFields, where: str) -> dict[str, int]:
  fields = dict(fields)
  if not fields:
    raise ValueError(f"{where}: no image fields given")
  for name, channels in fields.items():
    if channels not in (1, 3):
      raise ValueError(f"{where}: image field {name!r} channels must be 1 or 3, got {channels}")
  return fields


class _LabelledExample:
  """Decodes the image fields and the checked label of one record."""

  def __init__(self, source, fields: dict[str, int], image_size: int | None, num_classes: int | None):
    self.source, self.fields, self.image_size, self.num_classes = source, fields, image_size, num_classes

  def __call__(self, record_index: int) -> dict[str, Any]:
    record = _record(self.source, record_index)
    out = {name: _decode_image(record, record_index, self.source, self.image_size, name, channels)
           for name, channels in self.fields.items()}
    out["label"] = _label(record, record_index, self.source, self.num_classes)
    return out


def _labelled_batch_fn(fields: Sequence[str], where: str):

  def batch_fn(elements: Sequence[dict]) -> dict[str, np.ndarray]:
    batch = {}
    for name in fields:
      shapes = {e[name].shape for e in elements}
      if len(shapes) > 1:
        raise ValueError(f"{name!r} images of different sizes {sorted(shapes)} in one batch from {where}; "
                         "pass image_size")
      batch[name] = np.stack([e[name] for e in elements])
    batch["label"] = np.asarray([e["label"] for e in elements], np.int32)
    if "mask" in elements[0]:
      batch["mask"] = np.asarray([e["mask"] for e in elements], bool)
      batch["index"] = np.asarray([e["index"] for e in elements], np.int32)
    return batch

  return batch_fn


def classification_batches(source, *, global_batch_size: int, seed: int, fields: ImageFields = (("image", 3),),
                           num_classes: int | None = None, process_index: int = 0, process_count: int = 1,
                           image_size: int | None = None, class_weights: Sequence[float] | None = None,
                           samples_per_epoch: int | None = None, num_epochs: int | None = None,
                           read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """The supervised training stream: labelled images (one or several modalities per record).

  Without ``class_weights``: every record once per epoch in a seeded order, reshuffled each epoch.
  With ``class_weights`` (one per class): torch's ``WeightedRandomSampler(replacement=True)`` with
  per-sample weight ``class_weights[label]`` as the upstream recipes intend it (BiRA-Net's
  1:10:8:20:21, FCN-CLIP's inverse-frequency weights): draw j of the stream picks a record with
  probability ∝ its class weight, from a generator of ``(seed, j)``, so the stream is deterministic
  and independent of the process layout; ``samples_per_epoch`` draws make an epoch.

  Args:
    source: random-access records with the image fields and an integer ``label``.
    global_batch_size: examples per step over all processes.
    seed: the order / the weighted draws.
    fields: image field name → channels, e.g. ``{'image': 3, 'oct': 1}`` (CRD-Net).
    num_classes: labels must lie in [0, num_classes) (an error names the record otherwise).
    process_index, process_count: this host's block of every global batch.
    image_size: resize every image field to image_size² when the stored size differs.
    class_weights, samples_per_epoch: class-weighted sampling with replacement (see above).
    num_epochs: epochs to iterate (None = forever).

  Returns:
    IterDataset of dicts: one uint8 (b, H, W, C) array per image field, ``label`` int32 (b,);
    b = global_batch_size // process_count; incomplete final batches are dropped.
  """
  where = "classification_batches"
  _ensure_absl_flags_parsed()
  local_batch = _check_sharding(global_batch_size, process_index, process_count, where)
  n = _check_nonempty(source, where)
  seed = _check_seed(seed, where)
  fields = _check_fields(fields, where)
  make = _LabelledExample(source, fields, image_size, num_classes)
  if class_weights is None:
    ds = grain.MapDataset.range(n).shuffle(seed=seed).repeat(num_epochs).map(make)
  else:
    if num_classes is None:
      raise ValueError(f"{where}: class_weights need num_classes")
    weights = np.asarray(class_weights, np.float64)
    if weights.shape != (num_classes,) or np.any(weights < 0) or not np.isfinite(weights).all():
      raise ValueError(f"{where}: class_weights must be {num_classes} non-negative numbers, got {list(class_weights)}")
    per_record = weights[record_labels(source, num_classes)]
    if per_record.sum() <= 0:
      raise ValueError(f"{where}: class_weights {list(class_weights)} give every record of {_where(source)} weight 0")
    cumulative = np.cumsum(per_record / per_record.sum())
    epoch = int(samples_per_epoch or n)

    def draw(position: int, _) -> dict[str, Any]:
      u = np.random.default_rng((seed, position)).uniform()
      return make(min(int(np.searchsorted(cumulative, u, side="right")), n - 1))

    total = None if num_epochs is None else int(num_epochs) * epoch
    positions = grain.MapDataset.range(epoch).repeat(None) if total is None else grain.MapDataset.range(total)
    ds = positions.map_with_index(draw)
  ds = _ProcessBlock(ds, local_batch, process_index, process_count)
  ds = ds.batch(local_batch, drop_remainder=True, batch_fn=_labelled_batch_fn(list(fields), _where(source)))
  return ds.to_iter_dataset(read_options or _default_read_options())


def labelled_batches(source, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                     image_size: int | None = None, fields: ImageFields = (("image", 3),),
                     num_classes: int | None = None) -> grain.MapDataset:
  """Evaluation stream: every example exactly once, in order, padded to whole batches.

  Process p reads records p, p + P, p + 2P, ...; every process yields the same number of batches
  (multi-host evaluation steps stay in lock-step), padded with ``mask`` False, zero images and
  label 0.

  Args:
    source: records with the image fields and integer ``label``.
    batch_size: GLOBAL batch size (as in training); each process yields batch_size // process_count.
    process_index, process_count: this host's shard.
    image_size: resize to image_size² when the stored size differs.
    fields: image field name → channels (default: RGB ``image``).
    num_classes: labels must lie in [0, num_classes).

  Returns:
    MapDataset (``len`` = number of batches, iterable, indexable) of dicts: one uint8 (b, H, W, C)
    array per image field, ``label`` int32 (b,), ``mask`` bool (b,), ``index`` int32 (b,) (the
    record index, −1 for padding).
  """
  where = "labelled_batches"
  _ensure_absl_flags_parsed()
  local_batch = _check_sharding(batch_size, process_index, process_count, where)
  n = _check_nonempty(source, where)
  fields = _check_fields(fields, where)
  per_process = -(-n // process_count)
  num_batches = -(-per_process // local_batch)
  make = _LabelledExample(source, fields, image_size, num_classes)
  # Padding entries need the image shapes; the first record tells them (images must agree anyway).
  padding = {k: np.zeros_like(v) for k, v in make(0).items() if k != "label"}

  def load(local_position: int) -> dict[str, Any]:
    record_index = process_index + local_position * process_count
    if record_index >= n:
      return dict(padding, label=0, mask=False, index=-1)
    return dict(make(record_index), mask=True, index=record_index)

  ds = grain.MapDataset.range(num_batches * local_batch).map(load)
  return ds.batch(local_batch, drop_remainder=True, batch_fn=_labelled_batch_fn(list(fields), _where(source)))


class UniformMixture:
  """FLAIR's ``UniformDataset`` as a random-access source: dataset-balanced sampling.

  Item i comes from dataset ``i mod K`` (FLAIR) — or, with ``weights``, from a dataset drawn with
  those probabilities — and is a uniform draw inside it; all draws are functions of
  ``(seed, i)``. Length = total number of records (FLAIR's epoch length).
  """

  def __init__(self, sources: Sequence, weights: Sequence[float] | None = None, seed: int = 0):
    if not sources:
      raise ValueError("uniform_mixture: no sources given")
    for s in sources:
      _check_nonempty(s, "uniform_mixture")
    if weights is not None:
      w = np.asarray(weights, np.float64)
      if w.shape != (len(sources),) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"uniform_mixture: weights must be {len(sources)} non-negative numbers with a positive "
                         f"sum, got {weights}")
      self._cumulative = np.cumsum(w / w.sum())
    else:
      self._cumulative = None
    self.sources = list(sources)
    self.seed = _check_seed(seed, "uniform_mixture")
    self.name = "mixture(" + ", ".join(_where(s) for s in sources) + ")"
    self.split = None

  def __len__(self) -> int:
    return sum(len(s) for s in self.sources)

  def __getitem__(self, index: int) -> dict:
    rng = np.random.default_rng((self.seed, int(index)))
    if self._cumulative is None:
      k = int(index) % len(self.sources)
    else:
      k = min(int(np.searchsorted(self._cumulative, rng.uniform(), side="right")), len(self.sources) - 1)
    source = self.sources[k]
    return _record(source, int(rng.integers(len(source))))


def uniform_mixture(sources: Sequence, weights: Sequence[float] | None = None, seed: int = 0) -> UniformMixture:
  """Dataset-balanced mixture of random-access sources (see ``UniformMixture``)."""
  return UniformMixture(sources, weights, seed)


class RecordSubset:
  """The records ``indices`` of ``source``, as a random-access source (position k → record indices[k])."""

  def __init__(self, source, indices: Sequence[int], description: str = ""):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    self.name = getattr(source, "name", type(source).__name__) + (f" [{description}]" if description else "")
    self.split = getattr(source, "split", None)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    return _record(self.source, int(self.indices[int(index)]))


class ConcatSource:
  """Several random-access sources one after the other (position k of source j after all of 0..j−1)."""

  def __init__(self, sources: Sequence):
    if not sources:
      raise ValueError("ConcatSource: no sources given")
    self.sources = list(sources)
    self._offsets = np.cumsum([0] + [len(s) for s in self.sources])
    self.name = " + ".join(_where(s) for s in self.sources)
    self.split = None

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"ConcatSource: index {index} outside [0, {len(self)})")
    j = int(np.searchsorted(self._offsets, index, side="right")) - 1
    return _record(self.sources[j], index - int(self._offsets[j]))


def split_by_fractions(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
  """Disjoint index sets covering ``range(n)``: a seeded random order cut into pieces by fraction.

  Like torch's ``random_split(range(n), [int(f₀·n), int(f₁·n), …, rest])`` as the FCN-CLIP notebook
  calls it: every piece but the last gets ``int(f·n)`` records, the last the remainder. The order is
  numpy's ``default_rng(seed).permutation(n)``, not torch's ``randperm``, so the membership differs
  from upstream's for the same seed (the sizes agree).
  """
  fractions = [float(f) for f in fractions]
  if not fractions or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
    raise ValueError(f"split fractions {fractions}: expected non-negative fractions summing to 1")
  sizes = [int(f * n) for f in fractions[:-1]]
  sizes.append(n - sum(sizes))
  order = np.random.default_rng(int(seed)).permutation(n)
  return [order[start:start + size] for start, size in zip(np.cumsum([0] + sizes[:-1]), sizes)]


def resample_to_class_counts(source, class_counts: Sequence[int], num_classes: int) -> RecordSubset:
  """The FCN-CLIP notebook's ``oversample_dataset``: class c (in order 0, 1, …) contributes exactly
  ``class_counts[c]`` records, its records in source order taken cyclically (so a class with more
  records than its count is *under*-sampled). A class with no record and a positive count is an error.
  """
  labels = record_labels(source, num_classes)
  if len(class_counts) != num_classes or any(int(c) < 0 for c in class_counts):
    raise ValueError(f"class counts {list(class_counts)}: expected {num_classes} non-negative counts")
  indices = []
  for c, count in enumerate(class_counts):
    members = np.flatnonzero(labels == c)
    if count and not len(members):
      raise ValueError(f"class counts {list(class_counts)}: class {c} has no record in {_where(source)} to "
                       f"resample {count} times")
    indices.extend(members[k % len(members)] for k in range(int(count)))
  return RecordSubset(source, indices, f"resampled to class counts {list(class_counts)}")


def pretraining_source(source, *, balance: bool = False, banned_categories: Sequence[str] = (),
                       banned_match: str = "substring", seed: int = 0):
  """The records upstream pretraining samples from, and how.

  ``banned_categories``: records any of whose categories is banned are dropped
  (``prompts.is_banned``: FLAIR matches a banned string inside a category, KeepFIT's pretraining
  exact equality). ``balance``: FLAIR's ``UniformDataset`` over the mix: position i draws from
  dataset ``i mod K`` (the records' ``dataset`` key, in order of first appearance) uniformly, with
  the draws a function of ``(seed, i)``, so the stream stays deterministic and resumable; the epoch
  length stays the number of (kept) records. Either option reads every record's ``categories`` /
  ``dataset`` once (images are not decoded).
  """
  where = "pretraining_source"
  n = _check_nonempty(source, where)
  if not balance and not banned_categories:
    return source
  keep, groups = [], {}
  for i in range(n):
    record = _record(source, i)
    if banned_categories and prompts.is_banned(_str_list(record.get("categories")), banned_match,
                                               list(banned_categories)):
      continue
    keep.append(i)
    groups.setdefault(_text(record.get("dataset", "")), []).append(i)
  if not keep:
    raise ValueError(f"{where}: every record of {_where(source)} has a banned category "
                     f"({banned_match} match against {list(banned_categories)})")
  dropped = n - len(keep)
  logging.info("%s: %s: %d of %d records dropped for banned categories (%s match); %s", where, _where(source),
               dropped, n, banned_match,
               f"dataset-balanced over {len(groups)} datasets" if balance else "uniform over records")
  if balance:
    return UniformMixture([RecordSubset(source, idx, f"dataset {key!r}") for key, idx in groups.items()],
                          seed=seed)
  return RecordSubset(source, keep, f"{dropped} banned records dropped") if dropped else source

"""TFDS builder ``synthetic_retina``: the embedded default dataset, generated locally (nothing downloaded).

Examples come from ``jaxretina.data.synthetic.render_example`` and are written as ArrayRecord, so
``tfds.data_source`` / ``builder.as_data_source()`` read them without tensorflow. The build is a
pure function of the config (image size, split sizes, seed) and the builder version.

Splits:
  * ``train``  — FLAIR-style image/category examples for contrastive pre-training;
  * ``test``   — held out (its own seed), for zero-shot / linear-probe evaluation;
  * ``expert`` — image–caption pairs for KeepFIT's knowledge ("KD") stream.

Features (one record per example):
  * ``image``: PNG-encoded uint8 (S, S, 3) (``tfds.features.Image``; read it with
    ``decoders={'image': tfds.decode.SkipDecoding()}`` to get the PNG bytes, as the Grain
    pipeline does);
  * ``categories``, ``atributes``: lists of strings stored as **JSON strings** (``Text``) — TFDS'
    NumPy deserialisation of ragged string sequences is not reliable without tensorflow, a JSON
    string always round-trips; ``json.loads`` gives the list back;
  * ``caption``, ``id``, ``dataset``: ``Text``; ``label``: ``ClassLabel`` over
    ``synthetic.CLASS_NAMES``.

Configs: ``default`` (96 px; 3000 / 500 / 400 examples), ``small`` (64 px; 2000 / 400 / 300),
``tiny`` (32 px; 48 / 16 / 16, for tests). Any other size is a constructor keyword away:
``tfds.builder('synthetic_retina', data_dir=d, image_size=64, num_train=1000)`` makes a config
named after its values (so different sizes never share a directory).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import multiprocessing
import os
from typing import Iterator

import numpy as np
from etils import epath
import tensorflow_datasets as tfds
from PIL import Image

from jaxretina.data import synthetic
from jaxretina.datasets import common

_SPLIT_SEED_OFFSETS = {"train": 0, "test": 1, "expert": 2}
_CHUNK = 64  # examples per worker task: large enough to amortise IPC, small enough to stream


@dataclasses.dataclass(eq=False)
class SyntheticRetinaConfig(tfds.core.BuilderConfig):
  """Sizes of the generated dataset.

  Attributes:
    image_size: side S of the square images in pixels (generate at the training size: the
      pipeline's resize is then a no-op).
    num_train, num_test, num_expert: examples per split (``expert`` may be 0: the split is
      then absent).
    seed: base seed; split k uses ``1000 * seed + k`` so splits never share an example.
    num_workers: processes used to render during the build (1 = in-process). Output does not
      depend on it.
  """

  image_size: int = 96
  num_train: int = 3000
  num_test: int = 500
  num_expert: int = 400
  seed: int = 0
  num_workers: int = 0  # 0 = min(cpu count, 4)


def _config_name(image_size, num_train, num_test, num_expert, seed) -> str:
  return f"s{image_size}_tr{num_train}_te{num_test}_ex{num_expert}_seed{seed}"


def generate_in_chunks(render_chunk, split_seed: int, num_examples: int, image_size: int,
                       num_workers: int = 0) -> Iterator[tuple[int, dict]]:
  """Yields ``render_chunk(split_seed, start, stop, image_size)``'s examples in order, chunk by chunk,
  over a spawn process pool (``num_workers`` 0 = up to 4 CPUs). ``render_chunk`` must be picklable."""
  chunks = [(split_seed, start, min(start + _CHUNK, num_examples), image_size)
            for start in range(0, num_examples, _CHUNK)]
  workers = min(num_workers or min(os.cpu_count() or 1, 4), len(chunks))
  if workers <= 1:
    for chunk in chunks:
      yield from render_chunk(*chunk)
    return
  # 'spawn': the caller may already run JAX threads, which fork would copy into a broken state.
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
    for rendered in pool.map(render_chunk, *zip(*chunks)):
      yield from rendered


def _render_chunk(split_seed: int, start: int, stop: int, image_size: int) -> list[tuple[int, dict]]:
  """Renders and PNG-encodes examples [start, stop); module-level so worker processes can run it."""
  out = []
  for index in range(start, stop):
    example = synthetic.render_example(split_seed, index, image_size)
    buffer = io.BytesIO()
    # Fixed compression settings: the encoded bytes (and so the files) are reproducible.
    Image.fromarray(example["image"]).save(buffer, format="PNG", compress_level=1)
    out.append((index, {
        "image": buffer.getvalue(),
        "categories": json.dumps(example["categories"]),
        "atributes": json.dumps(example["atributes"]),
        "caption": example["caption"],
        "label": example["label"],
        "id": example["id"],
        "dataset": example["dataset"],
    }))
  return out


class SyntheticRetina(common.LocalInfoBuilder, tfds.core.GeneratorBasedBuilder):
  """Deterministic synthetic colour-fundus photographs with FLAIR-style labels and captions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticRetinaConfig(name="default", description="96 px; 3000 train / 500 test / 400 expert."),
      SyntheticRetinaConfig(name="small", image_size=64, num_train=2000, num_test=400, num_expert=300,
                            description="64 px; 2000 train / 400 test / 300 expert."),
      SyntheticRetinaConfig(name="tiny", image_size=32, num_train=48, num_test=16, num_expert=16,
                            description="32 px; 48 / 16 / 16, for tests."),
  ]
  DEFAULT_CONFIG_NAME = "default"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS' own lookup touches `importlib_resources` (not installed: tensorflow-free stack) for
    # builders outside its package; this file is the answer it is looking for.
    return epath.Path(__file__)

  def __init__(self, *, config=None, image_size: int | None = None, num_train: int | None = None,
               num_test: int | None = None, num_expert: int | None = None, seed: int | None = None,
               num_workers: int | None = None, **kwargs):
    """Accepts a config name/object, or size keywords that override the named (or default) config."""
    overrides = {k: v for k, v in dict(image_size=image_size, num_train=num_train, num_test=num_test,
                                       num_expert=num_expert, seed=seed).items() if v is not None}
    # Worker count changes how fast, not what, is generated: it stays off the config (and its name).
    self._num_workers = None if num_workers is None else int(num_workers)
    if overrides:
      if isinstance(config, SyntheticRetinaConfig):
        base = config
      elif (config or self.DEFAULT_CONFIG_NAME) in self.builder_configs:
        base = self.builder_configs[config or self.DEFAULT_CONFIG_NAME]
      else:
        raise ValueError(f"synthetic_retina: unknown config {config!r}; known: {sorted(self.builder_configs)}")
      values = {k: getattr(base, k) for k in ("image_size", "num_train", "num_test", "num_expert", "seed")}
      values.update(overrides)
      for key, value in values.items():
        if int(value) < 0 or (key in ("image_size", "num_train", "num_test") and int(value) < 1):
          raise ValueError(f"synthetic_retina: {key} must be positive, got {value}")
      if int(values["image_size"]) < 16:
        raise ValueError(f"synthetic_retina: image_size must be >= 16, got {values['image_size']}")
      config = SyntheticRetinaConfig(name=_config_name(**values), version=self.VERSION,
                                     num_workers=base.num_workers,
                                     description=f"{values['image_size']} px; custom split sizes.",
                                     **{k: int(v) for k, v in values.items()})
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "categories": tfds.features.Text(doc="JSON list of FLAIR category names"),
            "atributes": tfds.features.Text(doc="JSON list of FLAIR attributes (FLAIR's spelling)"),
            "caption": tfds.features.Text(doc="expert-style report (KeepFIT knowledge stream)"),
            "label": tfds.features.ClassLabel(names=list(synthetic.CLASS_NAMES)),
            "id": tfds.features.Text(),
            "dataset": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/jaxretina (generated locally)",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    sizes = {"train": cfg.num_train, "test": cfg.num_test, "expert": cfg.num_expert}
    return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

  def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[int, dict]]:
    cfg = self.builder_config
    split_seed = 1000 * cfg.seed + _SPLIT_SEED_OFFSETS[split]
    yield from generate_in_chunks(_render_chunk, split_seed, num_examples, cfg.image_size,
                                  self._num_workers or cfg.num_workers)


def example_lists(record: dict) -> tuple[list[str], list[str]]:
  """(categories, atributes) of a record read back from this dataset (JSON strings → lists)."""
  return _json_list(record["categories"]), _json_list(record["atributes"])


def _json_list(value) -> list[str]:
  if isinstance(value, (bytes, np.bytes_)):
    value = value.decode("utf-8")
  return list(json.loads(value))

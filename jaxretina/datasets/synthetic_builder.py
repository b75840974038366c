"""The base of the generated (synthetic) dataset builders: size keywords that override a named config,
and rendering in chunks over worker processes.

A generated dataset is a pure function of its config (image size, split sizes, seed) and the builder
version, so a config made from keywords is named after its values: different sizes never share a
directory.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

import tensorflow_datasets as tfds

from jaxretina.datasets.local_builder import LocalInfoBuilder
from jaxretina.datasets.process_pool import parallel_map

_CHUNK = 64  # examples per worker task: large enough to amortise IPC, small enough to stream

# How each size keyword appears in the name of a config made from keywords.
_NAME_PREFIXES = {"image_size": "s", "num_train": "tr", "num_test": "te", "num_expert": "ex", "seed": "seed"}
# Keywords that must be at least 1 (the others, e.g. a split that may be absent, at least 0).
_POSITIVE_KEYS = ("image_size", "num_train", "num_test")


def generate_in_chunks(render_chunk: Callable, split_seed: int, num_examples: int, image_size: int,
                       num_workers: int = 0) -> Iterator[tuple[int, dict]]:
  """Yields ``render_chunk(split_seed, start, stop, image_size)``'s examples in order, chunk by chunk,
  over a spawn process pool (``num_workers`` 0 = up to 4 CPUs). ``render_chunk`` must be picklable."""
  chunks = [(split_seed, start, min(start + _CHUNK, num_examples), image_size)
            for start in range(0, num_examples, _CHUNK)]
  workers = min(num_workers or min(os.cpu_count() or 1, 4), len(chunks))
  # One chunk per worker task, and a pool whenever there are two workers.
  for rendered in parallel_map(render_chunk, chunks, workers, chunk_size=1, min_parallel=0):
    yield from rendered


class SyntheticBuilder(LocalInfoBuilder, tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the synthetic builders.

  Subclasses set ``CONFIG_CLASS`` (a BuilderConfig with the ``SIZE_KEYS`` fields and ``num_workers``),
  ``SIZE_KEYS`` (in config-name order), ``SPLIT_SEED_OFFSETS``, ``render_chunk``, ``BUILDER_CONFIGS``
  and ``DEFAULT_CONFIG_NAME``, and implement ``_info``.

  Builder keywords (besides ``config=`` and TFDS' own): the ``SIZE_KEYS`` override the named (or
  default) config; ``num_workers`` sets the rendering processes. The worker count changes how fast,
  not what, is generated: it stays off the config (whose name is the dataset's identity on disk), so a
  named config with only ``num_workers`` stays that config.
  """

  SIZE_KEYS: tuple[str, ...] = ()
  # Split name → seed offset: split k is rendered with seed `1000 * seed + k`; its size is `num_<split>`.
  SPLIT_SEED_OFFSETS: dict[str, int] = {}
  # Module-level `(split_seed, start, stop, image_size) -> [(index, example)]` (picklable for the workers).
  render_chunk: Callable

  def __init__(self, *, config=None, num_workers: int | None = None, **kwargs):
    overrides = {k: kwargs.pop(k) for k in self.SIZE_KEYS if k in kwargs}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    self._num_workers = None if num_workers is None else int(num_workers)
    if overrides:
      base = self._base_config(config)
      values = {k: getattr(base, k) for k in self.SIZE_KEYS}
      values.update(overrides)
      for key, value in values.items():
        if int(value) < 0 or (key in _POSITIVE_KEYS and int(value) < 1):
          raise ValueError(f"{self.name}: {key} must be positive, got {value}")
      if int(values["image_size"]) < 16:
        raise ValueError(f"{self.name}: image_size must be >= 16, got {values['image_size']}")
      name = "_".join(f"{_NAME_PREFIXES[k]}{values[k]}" for k in self.SIZE_KEYS)
      config = self.CONFIG_CLASS(name=name, version=self.VERSION, num_workers=base.num_workers,
                                 description=f"{values['image_size']} px; custom split sizes.",
                                 **{k: int(v) for k, v in values.items()})
    super().__init__(config=config, **kwargs)

  def _render_workers(self) -> int:
    """Rendering processes: the builder keyword, else the config's (0 = up to 4 CPUs)."""
    return self._num_workers or self.builder_config.num_workers

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    sizes = {split: getattr(self.builder_config, f"num_{split}") for split in self.SPLIT_SEED_OFFSETS}
    # A split of size 0 (only `expert` may be) is absent from the dataset.
    return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

  def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[int, dict]]:
    cfg = self.builder_config
    split_seed = 1000 * cfg.seed + self.SPLIT_SEED_OFFSETS[split]
    yield from generate_in_chunks(self.render_chunk, split_seed, num_examples, cfg.image_size, self._render_workers())

"""Host input benchmark: decode + batch throughput of the Grain pipeline next to a plain PIL loop.

``python -m jaxretina.bench --input`` runs :func:`run`. Both loops read the *same* encoded records
of one random-access split (an ArrayRecord TFDS dataset) and produce the same thing, uint8
(batch, S, S, 3) arrays:

* **pipeline** — ``jaxretina.data.pipeline.classification_batches``, the stream supervised training
  uses (seeded shuffle, per-record decode + label check, process block, batch), iterated through
  Grain's ``to_iter_dataset`` with its ``ReadOptions`` (by default the pipeline's own: 2 prefetch
  threads, buffer 4; no worker processes): all work runs in this process;
* **plain loop** — for each record in order: read it, ``PIL.Image.open(bytes).convert('RGB')``,
  ``np.asarray``, ``np.stack`` per batch: one thread.

The pipeline runs for ``seconds`` and the plain loop then decodes exactly as many images; repeats
alternate the two so a slow phase of the machine (on a busy shared machine a process can
get one of its two cores for seconds at a time) hits both. Per loop it reports images/s (wall),
images/s per core the process may use (``len(os.sched_getaffinity(0))``), and images per CPU-second
of the process (process CPU time over all its threads: the per-busy-core rate, the least noisy of
the three), with the median over repeats.

Unless an existing dataset is named, :func:`prepare_dataset` writes ``num_records`` synthetic fundus
photographs (``jaxretina.data.synthetic``) as JPEG files into an image-folder tree and builds it
with the ``image_folder`` builder (pre-resized to ``image_size``, JPEG), once, under ``data_dir``;
generation and build times are reported separately and are not part of the measured rates.
"""

from __future__ import annotations

import dataclasses
import io
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxretina.data import pipeline
from jaxretina.data import synthetic
import jaxretina.datasets
from jaxretina.datasets import process_pool

JPEG_QUALITY = 95


def available_cores() -> int:
  """Cores this process may run on (its CPU affinity), else the machine's count."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_data_dir() -> str:
  """``$XDG_CACHE_HOME/jaxretina/input_bench`` (``~/.cache/...`` when unset)."""
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "jaxretina", "input_bench")


def _render_jpeg(path: str, index: int, image_size: int) -> int:
  example = synthetic.render_example(0, index, image_size)
  Image.fromarray(example["image"]).save(path, format="JPEG", quality=JPEG_QUALITY)
  return int(example["label"])


def prepare_dataset(data_dir: str, num_records: int = 512, image_size: int = 512, *,
                    num_workers: int = 0) -> dict[str, Any]:
  """Builds (once) the benchmark dataset: `num_records` synthetic fundus JPEGs of `image_size`² px.

  The images go to ``<data_dir>/trees/fundus_<n>_<size>px/train/<class>/<index>.jpg`` and are built
  with ``image_folder`` (canvas `image_size`, JPEG) into `data_dir`.

  Returns:
    ``{'name', 'builder_kwargs', 'split', 'generate_s', 'build_s', 'build_img_per_s', 'build_workers',
    'built'}``: what ``pipeline.open_source`` needs, and the one-off costs (0 when cached).
  """
  import tensorflow_datasets as tfds

  if num_records < 1 or image_size < 16:
    raise ValueError(f"prepare_dataset: need num_records >= 1 and image_size >= 16, got {num_records}, {image_size}")
  tree = Path(data_dir) / "trees" / f"fundus_{num_records}_{image_size}px"
  done = tree / "COMPLETE"
  workers = num_workers or process_pool.default_num_workers()
  generate_s = 0.0
  if not done.exists():
    start = time.perf_counter()
    # Rendered into a staging folder first: the class folder depends on the label drawn per image.
    paths = [tree / "staging" / f"{index:06d}.jpg" for index in range(num_records)]
    (tree / "staging").mkdir(parents=True, exist_ok=True)
    labels = list(process_pool.parallel_map(_render_jpeg, [(str(p), i, image_size) for i, p in enumerate(paths)],
                                            workers))
    for path, label in zip(paths, labels):
      class_dir = tree / "train" / synthetic.CLASS_NAMES[label].replace(" ", "_")
      class_dir.mkdir(parents=True, exist_ok=True)
      path.rename(class_dir / path.name)
    (tree / "staging").rmdir()
    done.write_text(f"{num_records} images of {image_size} px\n")
    generate_s = time.perf_counter() - start
  kwargs = {"manual_dir": str(tree), "canvas_size": image_size, "encoding": "jpeg",
            "classes": [c.replace(" ", "_") for c in synthetic.CLASS_NAMES], "num_workers": workers}
  builder = tfds.builder("image_folder", data_dir=str(data_dir), **kwargs)
  build_s, built = 0.0, False
  if not builder.is_prepared():
    start = time.perf_counter()
    builder.download_and_prepare(file_format="array_record")
    build_s, built = time.perf_counter() - start, True
  return {"name": "image_folder", "builder_kwargs": kwargs, "split": "train", "generate_s": round(generate_s, 2),
          "build_s": round(build_s, 2), "build_img_per_s": round(num_records / build_s, 1) if built else None,
          "build_workers": workers, "built": built}


@dataclasses.dataclass
class LoopTiming:
  """One timed run of a loop: images, wall seconds and process CPU seconds (all threads)."""

  images: int
  wall_s: float
  cpu_s: float

  @property
  def img_per_s(self) -> float:
    return self.images / self.wall_s

  @property
  def img_per_cpu_s(self) -> float:
    return self.images / self.cpu_s if self.cpu_s > 0 else float("nan")


def _time_pipeline(source, batch_size: int, seconds: float, image_size: int | None, read_options,
                   seed: int) -> LoopTiming:
  batches = pipeline.classification_batches(source, global_batch_size=batch_size, seed=seed, image_size=image_size,
                                            read_options=read_options)
  iterator = iter(batches)
  next(iterator)  # starts the prefetch threads; not timed
  images = 0
  c0, w0 = time.process_time(), time.perf_counter()
  while True:
    batch = next(iterator)
    images += batch["image"].shape[0]
    if time.perf_counter() - w0 >= seconds:
      break
  timing = LoopTiming(images, time.perf_counter() - w0, time.process_time() - c0)
  del iterator  # stops the prefetch threads before the other loop runs
  return timing


def _decode_plain(raw, image_size: int | None) -> np.ndarray:
  with Image.open(io.BytesIO(raw)) as opened:
    image = opened.convert("RGB")
  if image_size is not None and image.size != (image_size, image_size):
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
  return np.asarray(image)


def _time_plain(source, batch_size: int, images: int, image_size: int | None) -> LoopTiming:
  n = len(source)
  position, seen = 0, 0
  c0, w0 = time.process_time(), time.perf_counter()
  while seen < images:
    batch = []
    for _ in range(batch_size):
      batch.append(_decode_plain(source[position % n]["image"], image_size))
      position += 1
    stacked = np.stack(batch)
    seen += stacked.shape[0]
  return LoopTiming(seen, time.perf_counter() - w0, time.process_time() - c0)


def measure(source, *, batch_size: int = 32, seconds: float = 5.0, repeats: int = 3,
            image_size: int | None = None, num_threads: int | None = None, seed: int = 0) -> dict[str, Any]:
  """Interleaved timings of the Grain pipeline and the plain PIL loop on `source` (see module doc).

  Args:
    source: random-access records with ``image`` (encoded bytes) and ``label``.
    batch_size: images per batch in both loops.
    seconds: how long each pipeline run lasts; the plain loop then decodes as many images.
    repeats: pipeline/plain pairs; medians are reported.
    image_size: resize when the stored size differs (both loops); None keeps the stored size.
    num_threads: Grain prefetch threads (None: the pipeline's default ReadOptions).
  Returns:
    dict of the settings, per-repeat timings and medians (img/s, per available core, per CPU-second)
    of both loops and their ratios.
  """
  import grain

  if batch_size < 1 or repeats < 1 or seconds <= 0:
    raise ValueError(f"measure: need batch_size >= 1, repeats >= 1, seconds > 0; got {batch_size}, {repeats}, "
                     f"{seconds}")
  if "image" not in source[0]:
    raise ValueError(f"measure: records of {source!r} have no 'image' field")
  default = pipeline._default_read_options()  # noqa: SLF001  (report what training uses)
  read_options = default if num_threads is None else grain.ReadOptions(
      num_threads=int(num_threads), prefetch_buffer_size=default.prefetch_buffer_size)
  cores = available_cores()
  runs = []
  for repeat in range(repeats):
    piped = _time_pipeline(source, batch_size, seconds, image_size, read_options, seed + repeat)
    plain = _time_plain(source, batch_size, piped.images, image_size)
    runs.append({"pipeline": piped, "plain": plain})

  def summary(kind: str) -> dict[str, Any]:
    timings = [r[kind] for r in runs]
    rate = statistics.median(t.img_per_s for t in timings)
    return {"images": [t.images for t in timings], "img_per_s": [round(t.img_per_s, 1) for t in timings],
            "img_per_s_median": round(rate, 1), "img_per_s_per_core": round(rate / cores, 1),
            "img_per_cpu_s_median": round(statistics.median(t.img_per_cpu_s for t in timings), 1),
            "cores_busy_median": round(statistics.median(t.cpu_s / t.wall_s for t in timings), 2)}

  piped, plain = summary("pipeline"), summary("plain")
  return {
      "records": len(source),
      "image_shape": list(_decode_plain(source[0]["image"], image_size).shape),
      "batch_size": batch_size,
      "repeats": repeats,
      "seconds_per_run": seconds,
      "cores_available": cores,
      "pipeline_settings": (f"classification_batches, grain ReadOptions(num_threads={read_options.num_threads}, "
                            f"prefetch_buffer_size={read_options.prefetch_buffer_size}), 0 worker processes"),
      "plain_settings": "one thread: PIL open+convert('RGB'), np.asarray, np.stack per batch",
      "pipeline": piped,
      "plain": plain,
      "ratio_img_per_s": round(piped["img_per_s_median"] / plain["img_per_s_median"], 3),
      "ratio_img_per_cpu_s": round(piped["img_per_cpu_s_median"] / plain["img_per_cpu_s_median"], 3),
  }


def run(*, data_dir: str | None = None, dataset: str | None = None, split: str = "train", num_records: int = 512,
        image_size: int = 512, batch_size: int = 32, seconds: float = 5.0, repeats: int = 3,
        num_threads: int | None = None, builder_kwargs: dict | None = None) -> dict[str, Any]:
  """The input benchmark: prepares (or opens) the dataset, then :func:`measure`.

  Args:
    data_dir: TFDS data directory (default :func:`default_data_dir`).
    dataset: an existing prepared dataset (``name`` or ``name/config``) to read instead of the
      generated one; its records need ``image`` and ``label``.
    split: split of `dataset`.
    num_records, image_size: size of the generated dataset (and the batch image size).
    batch_size, seconds, repeats, num_threads: see :func:`measure`.
    builder_kwargs: ``tfds.builder`` keywords of `dataset`.
  """
  data_dir = data_dir or default_data_dir()
  os.makedirs(data_dir, exist_ok=True)
  if dataset:
    prepared = {"name": dataset, "builder_kwargs": dict(builder_kwargs or {}), "split": split, "generate_s": 0.0,
                "build_s": 0.0, "build_img_per_s": None, "build_workers": None, "built": False}
  else:
    prepared = prepare_dataset(data_dir, num_records, image_size)
  source = pipeline.open_source(prepared["name"], prepared["split"], data_dir, prepared["builder_kwargs"])
  result = measure(source, batch_size=batch_size, seconds=seconds, repeats=repeats, image_size=image_size,
                   num_threads=num_threads)
  feature = source.info.features["image"] if source.info is not None else None
  encoding = getattr(feature, "encoding_format", None) or "?"
  return {"dataset": source.name, "split": prepared["split"], "data_dir": data_dir, "encoding": encoding,
          **{k: prepared[k] for k in ("generate_s", "build_s", "build_img_per_s", "build_workers", "built")},
          **result}

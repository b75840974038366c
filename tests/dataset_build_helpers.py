"""Building and reading back the dataset builders' output in the builder tests."""

import tensorflow_datasets as tfds

import jaxretina.datasets  # noqa: F401  (registers the builders)
from jaxretina.data.pipeline import open_source

CANVAS = 32
# Tiny canvas, in-process image work: the builders' logic, not their throughput, is under test.
KW = {"canvas_size": CANVAS, "num_workers": 1}


def build(name, manual_dir, data_dir, **kwargs):
  """The builder `name` (``KW`` + `kwargs`) prepared from `manual_dir` (None: a builder that needs none)."""
  builder = tfds.builder(name, data_dir=str(data_dir), **{**KW, **kwargs})
  config = tfds.download.DownloadConfig(manual_dir=str(manual_dir)) if manual_dir is not None else None
  builder.download_and_prepare(file_format="array_record", download_config=config)
  return builder


def text(value):
  """A record's text feature as str (stored as bytes)."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def records_by_id(source) -> dict:
  """Every record of `source`, keyed by its ``id``."""
  return {text(r["id"]): r for r in (source[i] for i in range(len(source)))}


def read_split(name, split, data_dir, **kwargs):
  """The records of one split of a prepared dataset, keyed by ``id``."""
  return records_by_id(open_source(name, split, str(data_dir), {**KW, **kwargs}))

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

import dataclasses
import json

import numpy as np
import tensorflow_datasets as tfds

from jaxretina.data import imaging
from jaxretina.data import synthetic
from jaxretina.datasets.synthetic_builder import SyntheticBuilder


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



def _render_chunk(split_seed: int, start: int, stop: int, image_size: int) -> list[tuple[int, dict]]:
  """Renders and PNG-encodes examples [start, stop); module-level so worker processes can run it."""
  out = []
  for index in range(start, stop):
    example = synthetic.render_example(split_seed, index, image_size)
    out.append((index, {
        "image": imaging.encode(example["image"]),
        "categories": json.dumps(example["categories"]),
        "atributes": json.dumps(example["atributes"]),
        "caption": example["caption"],
        "label": example["label"],
        "id": example["id"],
        "dataset": example["dataset"],
    }))
  return out


class SyntheticRetina(SyntheticBuilder):
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
  CONFIG_CLASS = SyntheticRetinaConfig
  SIZE_KEYS = ("image_size", "num_train", "num_test", "num_expert", "seed")
  SPLIT_SEED_OFFSETS = {"train": 0, "test": 1, "expert": 2}
  render_chunk = staticmethod(_render_chunk)

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



def example_lists(record: dict) -> tuple[list[str], list[str]]:
  """(categories, atributes) of a record read back from this dataset (JSON strings → lists)."""
  return _json_list(record["categories"]), _json_list(record["atributes"])


def _json_list(value) -> list[str]:
  if isinstance(value, (bytes, np.bytes_)):
    value = value.decode("utf-8")
  return list(json.loads(value))

"""TFDS builder ``synthetic_fundus_oct``: paired colour fundus + OCT B-scan eyes (CRD-Net's MMC-AMD setting).

Generated locally (nothing downloaded) from ``jaxretina.data.synthetic_oct.render_example`` and
written as ArrayRecord, so ``tfds.data_source`` / ``builder.as_data_source()`` read it without
tensorflow. The build is a pure function of the config (image size, split sizes, seed) and the
builder version.

Splits: ``train`` and ``test`` (its own seed: no shared examples).

Features (one record per eye):
  * ``image``: the colour fundus photograph, PNG-encoded uint8 (S, S, 3);
  * ``oct``: the grayscale B-scan through the fovea, PNG-encoded uint8 (S, S, 1) (read either
    image as PNG bytes with ``decoders={'oct': tfds.decode.SkipDecoding()}``; decoded otherwise);
  * ``label``: ``ClassLabel`` over ``synthetic_oct.CLASS_NAMES`` (MMC-AMD's order: normal, dry AMD,
    PCV, wet AMD); class-balanced (a permutation of the four classes per block of four indices);
  * ``id``, ``eye`` (``"left"``/``"right"``), ``dataset``: ``Text``.

Configs: ``default`` (96 px; 2000 train / 400 test), ``small`` (64 px; 1600 / 400: CRD-Net's quick
local run), ``tiny`` (32 px; 32 / 16, for tests). Any other size is a constructor keyword away:
``tfds.builder('synthetic_fundus_oct', data_dir=d, image_size=48, num_train=800)`` makes a config
named after its values (so different sizes never share a directory).
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from jaxretina.data import imaging
from jaxretina.data import synthetic_oct
from jaxretina.datasets.synthetic_builder import SyntheticBuilder


@dataclasses.dataclass(eq=False)
class SyntheticFundusOctConfig(tfds.core.BuilderConfig):
  """Sizes of the generated dataset.

  Attributes:
    image_size: side S of both square images in pixels (generate at the training size: the
      pipeline's resize is then a no-op).
    num_train, num_test: eyes per split.
    seed: base seed; split k uses ``1000 * seed + k`` so splits never share an example.
    num_workers: processes used to render during the build (1 = in-process). Output does not
      depend on it; the builder's ``num_workers=`` keyword overrides it.
  """

  image_size: int = 96
  num_train: int = 2000
  num_test: int = 400
  seed: int = 0
  num_workers: int = 0  # 0 = min(cpu count, 4)


def _render_chunk(split_seed: int, start: int, stop: int, image_size: int) -> list[tuple[int, dict]]:
  """Renders and PNG-encodes examples [start, stop); module-level so worker processes can run it."""
  out = []
  for index in range(start, stop):
    example = synthetic_oct.render_example(split_seed, index, image_size)
    out.append((index, {
        "image": imaging.encode(example["image"]),
        "oct": imaging.encode(example["oct"]),
        "label": example["label"],
        "id": example["id"],
        "eye": example["eye"],
        "dataset": example["dataset"],
    }))
  return out


class SyntheticFundusOct(SyntheticBuilder):
  """Deterministic paired synthetic colour fundus + OCT B-scan eyes, MMC-AMD's four classes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticFundusOctConfig(name="default", description="96 px; 2000 train / 400 test."),
      SyntheticFundusOctConfig(name="small", image_size=64, num_train=1600, num_test=400,
                               description="64 px; 1600 train / 400 test (CRD-Net quick local run)."),
      SyntheticFundusOctConfig(name="tiny", image_size=32, num_train=32, num_test=16,
                               description="32 px; 32 train / 16 test, for tests."),
  ]
  DEFAULT_CONFIG_NAME = "default"
  CONFIG_CLASS = SyntheticFundusOctConfig
  SIZE_KEYS = ("image_size", "num_train", "num_test", "seed")
  SPLIT_SEED_OFFSETS = {"train": 0, "test": 1}
  render_chunk = staticmethod(_render_chunk)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png",
                                         doc="colour fundus photograph"),
            "oct": tfds.features.Image(shape=(size, size, 1), encoding_format="png",
                                       doc="grayscale OCT B-scan through the fovea"),
            "label": tfds.features.ClassLabel(names=list(synthetic_oct.CLASS_NAMES)),
            "id": tfds.features.Text(),
            "eye": tfds.features.Text(doc="'left' or 'right'"),
            "dataset": tfds.features.Text(),
        }),
        supervised_keys=None,  # two inputs: (image, oct) -> label
        homepage="https://github.com/jaxretina (generated locally)",
    )

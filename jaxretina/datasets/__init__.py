"""TFDS builders of jaxretina. Importing this package registers every builder with TFDS.

Add new builders to the import list below; ``ensure_built`` prepares any of them on first use.
"""

from __future__ import annotations

import logging
import os
import time

import tensorflow_datasets as tfds

from jaxretina.datasets import synthetic_fundus_oct  # noqa: F401  (registers 'synthetic_fundus_oct')
from jaxretina.datasets import synthetic_retina  # noqa: F401  (registers 'synthetic_retina')
from jaxretina.datasets import aptos2019  # noqa: F401  (registers 'aptos2019')
from jaxretina.datasets import ddr  # noqa: F401  (registers 'ddr')
from jaxretina.datasets import eyepacs  # noqa: F401  (registers 'eyepacs')
from jaxretina.datasets import idrid  # noqa: F401  (registers 'idrid')
from jaxretina.datasets import messidor2  # noqa: F401  (registers 'messidor2')
from jaxretina.datasets import odir5k  # noqa: F401  (registers 'odir5k')
from jaxretina.datasets import mmc_amd  # noqa: F401  (registers 'mmc_amd')
from jaxretina.datasets import gamma  # noqa: F401  (registers 'gamma')
from jaxretina.datasets import mm_retinal  # noqa: F401  (registers 'mm_retinal')
from jaxretina.datasets import flair_dataframe  # noqa: F401  (registers 'flair_dataframe')
from jaxretina.datasets import image_folder  # noqa: F401  (registers 'image_folder')

_log = logging.getLogger(__name__)


def ensure_built(name: str, data_dir: str, **builder_kwargs) -> tfds.core.DatasetBuilder:
  """Returns the builder of dataset `name` under `data_dir`, building it (ArrayRecord) if absent.

  Args:
    name: registered TFDS name, optionally with config (``'synthetic_retina/small'``).
    data_dir: TFDS data directory.
    **builder_kwargs: passed to ``tfds.builder`` (``config=``, or builder-specific keywords such
      as ``image_size=`` for ``synthetic_retina``).
  """
  try:
    builder = tfds.builder(name, data_dir=data_dir, **builder_kwargs)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"ensure_built: no TFDS dataset named {name!r} is registered (did you import "
                     f"jaxretina.datasets?): {e}") from e
  if builder.is_prepared():
    return builder
  _log.info("Building dataset %s (config %s) in %s ...", builder.name, builder.builder_config.name
            if builder.builder_config else "-", builder.data_dir)
  start = time.perf_counter()
  os.makedirs(data_dir, exist_ok=True)
  builder.download_and_prepare(file_format="array_record")
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  _log.info("Built dataset %s in %s in %.1f s: %s", builder.name, builder.data_dir, time.perf_counter() - start,
            splits)
  return builder

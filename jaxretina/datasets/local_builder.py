"""What every jaxretina TFDS builder shares: local-only dataset info, the code path, and choosing the
config that keyword overrides start from (the manual-download and the synthetic builders)."""

from __future__ import annotations

import inspect

import tensorflow_datasets as tfds
from etils import epath


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """DatasetInfo of a dataset that is only ever built locally.

  TFDS' builder constructor, for a dataset not prepared yet, asks ``initialize_from_bucket`` for
  precomputed info in gs://tfds-data: it creates a ``tempfile.mkdtemp('tfds')`` download folder
  first, finds nothing (GCS access is off in TFDS by default) and never removes it — one empty
  ``/tmp/tmp*tfds`` folder per build. jaxretina's datasets are not published there, so the lookup is
  skipped.
  """

  def initialize_from_bucket(self) -> None:
    return


class LocalInfoBuilder:
  """Mixin (before ``tfds.core.GeneratorBasedBuilder``) of jaxretina's builders.

  Gives a builder ``_LocalDatasetInfo``, its code path, and :meth:`_base_config`: the config object
  that keyword overrides of the config's options apply to.
  """

  CONFIG_CLASS: type = tfds.core.BuilderConfig

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS' own lookup touches `importlib_resources` (absent in this tensorflow-free stack) for
    # builders outside its package; the file defining the builder is the answer it is looking for.
    return epath.Path(inspect.getfile(cls))

  def dataset_info_from_configs(self, **kwargs):
    # tfds.core.DatasetBuilder.dataset_info_from_configs, constructing the local-only DatasetInfo.
    metadata = self.get_metadata()
    if metadata.description:
      kwargs["description"] = metadata.description
    if metadata.citation:
      kwargs["citation"] = metadata.citation
    return _LocalDatasetInfo(builder=self, **kwargs)

  def _base_config(self, config):
    """The config `config` is (a config object) or names (None: the default config)."""
    if isinstance(config, self.CONFIG_CLASS):
      return config
    if (config or self.DEFAULT_CONFIG_NAME) in self.builder_configs:
      return self.builder_configs[config or self.DEFAULT_CONFIG_NAME]
    raise ValueError(f"{self.name}: unknown config {config!r}; known: {sorted(self.builder_configs)}")


def coerce_option(value, default, key: str, dataset: str):
  """`value` (possibly a command-line string) converted to the type of the option's default.

  Used for the config options given as builder keywords, and by builders with options outside the
  config machinery (flair_dataframe's).
  """
  if isinstance(default, bool):
    if isinstance(value, str):
      lowered = value.strip().lower()
      if lowered in ("1", "true", "yes", "on"):
        return True
      if lowered in ("0", "false", "no", "off"):
        return False
      raise ValueError(f"{dataset}: option {key} expects true/false, got {value!r}")
    return bool(value)
  if isinstance(default, int):
    try:
      return int(value)
    except (TypeError, ValueError):
      raise ValueError(f"{dataset}: option {key} expects an integer, got {value!r}") from None
  return str(value)

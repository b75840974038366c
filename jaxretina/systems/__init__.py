"""The systems jaxretina reproduces, one module each, found by ``config.model.name``.

``jaxretina/systems/<name>.py`` holds what is specific to one published system: how its model is
built from ``config.model`` and the dataset's classes and modalities, its training loss/step pieces,
its evaluation logits and the loading of its upstream weights (``systems/base.py`` lists the
interface), and the config fields it reads with their defaults (``model_config()``, optionally
``loss_config()`` and ``init_config()``; ``declared_config``). The generic trainers
(``jaxretina.train``) and the evaluators only call that interface. Adding a system = adding its
module, its config and its parity handler (docs/architecture.md).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Mapping

import ml_collections

# The config sections a system module may declare, each by a ``<section>_config()`` function.
DECLARED_SECTIONS = ("model", "loss", "init")


def available() -> list[str]:
  """The system modules of this package (``config.model.name`` values)."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base")


def system_module(name: str) -> ModuleType:
  """``jaxretina.systems.<name>``, the system ``config.model.name`` selects."""
  if name not in available():
    raise ValueError(f"config.model.name={name!r}: expected one of {available()} (the modules of jaxretina/systems/)")
  return importlib.import_module(f"jaxretina.systems.{name}")


def declared_config(name: str) -> ml_collections.ConfigDict:
  """The sections of the config that system ``name`` declares, with their defaults: ``model`` (its
  ``name`` included), ``loss`` and ``init``; a section the module does not declare is empty."""
  module = system_module(name)
  declared = ml_collections.ConfigDict()
  for section in DECLARED_SECTIONS:
    declare = getattr(module, f"{section}_config", None)
    declared[section] = declare() if declare is not None else ml_collections.ConfigDict()
  declared.model.name = name
  return declared


def model_fields(model_config: ml_collections.ConfigDict) -> dict:
  """``config.model`` without ``name``: the keyword arguments of the system's Flax module where the
  system declares them under the module's own argument names (big_vision's ``Model(**config.model)``)."""
  fields = model_config.to_dict()
  del fields["name"]
  return fields


def build_classification_system(config, num_classes: int, fields: Mapping[str, int]):
  """``jaxretina.systems.<config.model.name>.build(config, num_classes, fields)``."""
  name = config.model.name
  module = system_module(name)
  if not hasattr(module, "build"):
    raise ValueError(f"config.model.name={name!r}: jaxretina/systems/{name}.py has no build(config, num_classes, "
                     "fields); it is not a classification system")
  return module.build(config, num_classes, dict(fields))

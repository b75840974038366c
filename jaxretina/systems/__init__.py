"""The systems jaxretina reproduces, one module each, found by ``config.model.name``.

``jaxretina/systems/<name>.py`` holds what is specific to one published system: how its model is
built from ``config.model`` and the dataset's classes and modalities, its training loss/step pieces,
its evaluation logits and the loading of its upstream weights (``systems/base.py`` lists the
interface). The generic trainers (``jaxretina.train``) and the evaluators only call that interface.
Adding a system = adding its module, its config and its parity handler (docs/architecture.md).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Mapping


def available() -> list[str]:
  """The system modules of this package (``config.model.name`` values)."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base")


def build_classification_system(config, num_classes: int, fields: Mapping[str, int]):
  """``jaxretina.systems.<config.model.name>.build(config, num_classes, fields)``."""
  name = config.model.name
  if name not in available():
    raise ValueError(f"config.model.name={name!r}: expected one of {available()} (the modules of jaxretina/systems/)")
  module = importlib.import_module(f"jaxretina.systems.{name}")
  if not hasattr(module, "build"):
    raise ValueError(f"config.model.name={name!r}: jaxretina/systems/{name}.py has no build(config, num_classes, "
                     "fields); it is not a classification system")
  return module.build(config, num_classes, dict(fields))

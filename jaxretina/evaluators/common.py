"""Evaluators built from ``config.evals`` (big_vision's ``evaluators/common.py``).

``config.evals = {name: {type: <one of EVALUATOR_TYPES>, <the type's fields>}}``. The trainer hands
``from_config`` what its model offers, by name: predict functions (``predict``, ``encode_images``,
``cam_features`` ...), the data they read (``open_split``, ``data``, ``class_names`` ...), the
``workdir`` and the ``mesh``. Each type's constructor names, as keyword arguments, the ones it takes
(``ClassificationEvaluator(cfg, *, workdir, mesh, predict, ...)``); a type asking for one the trainer
does not offer is refused when the evaluators are built, naming it. Every evaluator has
``run(variables, step) -> {metric: value}`` and writes its reports under
``<workdir>/eval/<name>/step_<step>/``.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from jaxretina.evaluators.classification import ClassificationEvaluator
from jaxretina.evaluators.transfer import TransferEvaluator
from jaxretina.evaluators.zero_shot import ZeroShotEvaluator

EVALUATOR_TYPES = {"classification": ClassificationEvaluator, "zero_shot": ZeroShotEvaluator,
                   "transfer": TransferEvaluator}


class Evaluators:
  """The evaluators of ``config.evals``, run together; metrics are named ``<entry name>/<metric>``."""

  def __init__(self, named: list[tuple[str, Any]]):
    self.named = named

  def run(self, variables, step: int) -> dict[str, float]:
    results: dict[str, float] = {}
    for name, evaluator in self.named:
      for key, value in evaluator.run(variables, step).items():
        results[f"{name}/{key}"] = value
    return results


def build(name: str, cfg, **provided) -> Any:
  """The evaluator of the entry ``config.evals.<name> = cfg``, given the keyword arguments its type takes
  from ``provided`` (the others are left out)."""
  kind = cfg.get("type", name)
  if kind not in EVALUATOR_TYPES:
    raise ValueError(f"config.evals.{name}.type={kind!r}: expected one of {sorted(EVALUATOR_TYPES)}")
  evaluator_type = EVALUATOR_TYPES[kind]
  parameters = inspect.signature(evaluator_type).parameters
  wanted = [p.name for p in parameters.values() if p.kind == inspect.Parameter.KEYWORD_ONLY]
  missing = [p for p in wanted if p not in provided and parameters[p].default is inspect.Parameter.empty]
  if missing:
    raise ValueError(f"config.evals.{name}: a {kind!r} evaluator needs {', '.join(missing)}, which this task's "
                     f"model does not provide (it provides: {', '.join(sorted(provided))})")
  return evaluator_type(cfg, **{p: provided[p] for p in wanted if p in provided})


def from_config(evals: Mapping[str, Any] | None, **provided) -> Evaluators:
  """One evaluator per entry of ``evals`` (``config.evals``), in order; see the module docstring."""
  return Evaluators([(name, build(name, cfg, **provided)) for name, cfg in (evals or {}).items()])

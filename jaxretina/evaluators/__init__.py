"""Evaluators named in ``config.evals`` (big_vision style): ``{name: {type: ..., ...}}``.

Each type is a function ``(task, variables, mesh, cfg) -> {metric: value}``; the loop calls
``run_evaluators`` periodically and at the end, and the same functions run standalone.
"""

from __future__ import annotations

from typing import Any, Callable

EVALUATORS: dict[str, Callable[..., dict[str, float]]] = {}


def register(name: str):
  def deco(fn):
    EVALUATORS[name] = fn
    return fn

  return deco


def run_evaluators(task, variables, mesh) -> dict[str, float]:
  from jaxretina.evaluators import classification, transfer, zero_shot  # noqa: F401  (registers)

  results: dict[str, float] = {}
  for name, cfg in (task.config.get("evals") or {}).items():
    kind = cfg.get("type", name)
    if kind not in EVALUATORS:
      raise ValueError(f"config.evals.{name}.type={kind!r}: expected one of {sorted(EVALUATORS)}")
    for k, v in EVALUATORS[kind](task, variables, mesh, cfg).items():
      results[f"{name}/{k}"] = v
  return results

"""The ``transfer`` evaluator: FLAIR's transfer protocol (``jaxretina.evaluate``) on the model being trained.

In a contrastive config::

  c.evals = dict(lp=dict(type="transfer", method="lp", experiment="synthetic", folds=2),
                 odir=dict(type="transfer", method="zero_shot", experiment="08_ODIR200x3",
                           data=dict(dataframe_dir="/data/dataframes", root="/data/FLAIR")))

Every key except ``type`` overrides the field of the same name in ``configs/transfer.py`` (built
for the entry's ``experiment`` and ``method``; nested dicts override nested fields). Results are
written under ``<workdir>/eval/<name>/step_<N>/``; the returned metrics are the fold means of
FLAIR's summary keys. Features are extracted anew at every evaluation (the weights change), so no
feature cache is kept unless the entry sets ``cache_dir``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from jaxretina import fileio
from jaxretina.evaluators import register


def protocol_config(cfg) -> Any:
  """``configs/transfer.py`` for ``cfg``'s experiment/method with ``cfg``'s other keys applied."""
  from jaxretina.configlib import load_config_module

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                      "transfer.py")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"the transfer evaluator needs configs/transfer.py (looked at {path})")
  fields = dict(cfg)
  fields.pop("type", None)
  arg = ",".join(f"{k}={fields.pop(k)}" for k in ("experiment", "method") if k in fields)
  config = load_config_module(path).get_config(arg or None)
  config.cache_dir = ""
  with config.unlocked():
    _override(config, fields, "config.evals.<name>")
  return config


_FREE_DICTS = ("builder_kwargs",)  # dict-valued fields replaced whole, not merged field by field


def _override(node, fields: dict, where: str) -> None:
  import ml_collections

  for key, value in fields.items():
    if key not in node:
      raise ValueError(f"{where}.{key}: not a field of configs/transfer.py; valid: {', '.join(sorted(node.keys()))}")
    if isinstance(node[key], ml_collections.ConfigDict) and key not in _FREE_DICTS:
      _override(node[key], dict(value), f"{where}.{key}")
    else:
      node[key] = value


@register("transfer")
def transfer(task, variables, mesh, cfg) -> dict[str, float]:
  from jaxretina import evaluate, restore

  config = protocol_config(cfg)
  tc = task.config
  own = next((dict(e) for e in (tc.get("evals") or {}).values() if e.get("type") == "zero_shot"), {})
  prompt = dict(template=own.get("template") or "A fundus photograph of [CLS]",
                domain_knowledge=bool(own.get("domain_knowledge", True)), variant=own.get("variant", "flair"))
  run = restore.TwoTowerRun(model=task.model, variables=jax.tree.map(np.asarray, jax.device_get(variables)),
                            tokenizer=task.tokenizer, max_length=int(tc.text.max_length), prompt=prompt,
                            classes=list(own.get("classes") or []), image_size=int(tc.data.image_size),
                            source="training", description="the model being trained")
  step = getattr(task, "eval_step", 0)
  name = cfg.get("name_in_workdir") or f"transfer_{config.experiment}_{config.method}"
  workdir = getattr(task, "workdir", None) or os.getcwd()
  out_dir = fileio.join(workdir, "eval", name, f"step_{step}")  # a gs:// workdir stays a URL
  result = evaluate.run_protocol(run, config, mesh, out_dir, log=lambda _: None)
  return {k: v["mean"] for k, v in result["summary"].items() if k in evaluate.SUMMARY_KEYS}

"""The ``transfer`` evaluator: FLAIR's transfer protocol (``jaxretina.transfer``) on the model being trained.

In a contrastive config::

  c.evals = dict(lp=dict(type="transfer", method="lp", experiment="synthetic", folds=2),
                 odir=dict(type="transfer", method="zero_shot", experiment="08_ODIR200x3",
                           data=dict(dataframe_dir="/data/dataframes", root="/data/FLAIR")))

Every key except ``type`` overrides the field of the same name in the protocol's config
(``jaxretina.transfer.protocol.get_config``, built for the entry's ``experiment`` and ``method``;
nested dicts override nested fields). Results are written under ``<workdir>/eval/<name>/step_<N>/``
(``name``: the entry's ``name_in_workdir``, else ``transfer_<experiment>_<method>``); the returned
metrics are the fold means of FLAIR's summary keys. Features are extracted anew at every evaluation
(the weights change), so no feature cache is kept unless the entry sets ``cache_dir``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxretina import fileio
from jaxretina.evaluators.zero_shot import TwoTowerRun
from jaxretina.transfer import protocol, runner


def protocol_config(cfg) -> ml_collections.ConfigDict:
  """The protocol's config for ``cfg``'s experiment/method with ``cfg``'s other keys applied."""
  fields = dict(cfg)
  fields.pop("type", None)
  fields.pop("name_in_workdir", None)
  arg = ",".join(f"{k}={fields.pop(k)}" for k in ("experiment", "method") if k in fields)
  config = protocol.get_config(arg or None)
  config.cache_dir = ""
  with config.unlocked():
    protocol.override(config, fields, "config.evals.<name>")
  return config


class TransferEvaluator:
  """The transfer protocol on a two-tower model's weights (``config.evals.<name>``, see the module docstring).

  Args:
    cfg: the ``config.evals`` entry.
    workdir: the reports go under ``<workdir>/eval/...`` (the current directory when None).
    mesh: feature extraction and fine-tuning run on it.
    model: the ``flair.TwoTower`` being trained.
    tokenizer, max_length: how the class prompts are tokenised.
    prompt: ``template``, ``domain_knowledge``, ``variant`` of the class prompts (``zero_shot.prompt_of``).
    classes: the run's zero-shot classes (may be empty).
    image_size: the training resolution (the protocol's default image size).
  """

  def __init__(self, cfg, *, workdir: str | None, mesh, model, tokenizer, max_length: int, prompt: dict,
               classes: list, image_size: int):
    self.config = protocol_config(cfg)
    self.name = cfg.get("name_in_workdir") or f"transfer_{self.config.experiment}_{self.config.method}"
    self.workdir = workdir
    self.mesh = mesh
    self.model = model
    self.tokenizer = tokenizer
    self.max_length = int(max_length)
    self.prompt = dict(prompt)
    self.classes = list(classes)
    self.image_size = int(image_size)

  def run(self, variables, step: int) -> dict[str, Any]:
    """Fold means of FLAIR's summary metrics; the reports go under ``step_<step>``."""
    run = TwoTowerRun(model=self.model, variables=jax.tree.map(np.asarray, jax.device_get(variables)),
                      tokenizer=self.tokenizer, max_length=self.max_length, prompt=self.prompt,
                      classes=self.classes, image_size=self.image_size, source="training",
                      description="the model being trained")
    out_dir = fileio.join(self.workdir or os.getcwd(), "eval", self.name, f"step_{step}")  # gs:// stays a URL
    result = runner.run_protocol(run, self.config, self.mesh, out_dir, log=lambda _: None)
    return {k: v["mean"] for k, v in result["summary"].items() if k in protocol.SUMMARY_KEYS}

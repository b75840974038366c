"""BiRA-Net (``config.model.name='bira_net'``): the bilinear net or the coded RA-Net with the grading loss
(docs/systems.md#bira-net)."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from jaxretina import configlib
from jaxretina.models import bira, resnet
from jaxretina.systems import base

VARIANTS = ("bira_net", "ra_net")
LOSSES = ("grading", "ce")


def model_config() -> ml_collections.ConfigDict:
  """``config.model`` of BiRA-Net (see ``models/bira.py``)."""
  return ml_collections.ConfigDict(dict(
      variant="bira_net",  # 'bira_net': the paper's bilinear net | 'ra_net': the coded RA-Net
      backbone=base.resnet_fields(),  # the trunk (ResNet-50)
      dropout_rate=0.5,  # RA-Net's dense head
      dense_width=256,  # RA-Net's dense head
      matmul_masking=False,  # upstream quirk: True reproduces torch.matmul masking
  ))


def loss_config() -> ml_collections.ConfigDict:
  """``config.loss`` of BiRA-Net."""
  return ml_collections.ConfigDict(dict(
      # 'grading': the paper's grading loss (differentiable). 'ce' (upstream quirk): plain cross-entropy
      # on the log-probabilities, what upstream ``train()`` minimises, its grading-loss line being
      # commented out (CE on log-probabilities equals CE on the logits).
      name="grading",
      # Upstream's InterclassLoss as coded re-wraps its value in a fresh leaf: True gives that value
      # with no gradient at all, so nothing trains (for checking the value, never a recipe).
      detach_loss=False,
  ))


class BiRAClassifier(base.ClassificationSystem):
  """BiRA-Net (docs/systems.md#bira-net).

  ``config.model`` and ``config.loss``: ``model_config`` and ``loss_config`` above. Upstream's frozen
  parts are ``bira.upstream_frozen_patterns``.
  """

  def __init__(self, config, num_classes: int, fields: Mapping[str, int]):
    self.field = base.one_field(fields, "bira_net")
    self.fields = (self.field,)
    m = config.model
    self.variant = m.variant
    dtype = configlib.compute_dtype(config)
    backbone = base.resnet_backbone(m.backbone, dtype, config.remat)
    if self.variant == "bira_net":
      self.module = bira.BiRANet(backbone=backbone, num_classes=num_classes, matmul_masking=bool(m.matmul_masking),
                                 dtype=dtype)
    elif self.variant == "ra_net":
      self.module = bira.KeNet(features=backbone, num_classes=num_classes, dropout_rate=float(m.dropout_rate),
                               dense_width=int(m.dense_width), matmul_masking=bool(m.matmul_masking), dtype=dtype)
    else:
      raise ValueError(f"config.model.variant={self.variant!r}: expected one of {VARIANTS}")
    self.loss_name = config.loss.name
    if self.loss_name not in LOSSES:
      raise ValueError(f"config.loss.name={self.loss_name!r}: expected one of {LOSSES}")
    self.detach_loss = bool(config.loss.detach_loss)

  def init(self, rng, inputs):
    params_rng, dropout_rng = jax.random.split(rng)
    return self.module.init({"params": params_rng, "dropout": dropout_rng}, inputs[self.field], train=False), {}

  def backbones(self) -> dict[tuple[str, ...], resnet.ResNet]:
    if self.variant == "ra_net":
      return {("features",): self.module.features}
    return {("branch_1", "features"): self.module.backbone, ("branch_2", "features"): self.module.backbone}

  def _log_probs(self, outputs):
    # KeNet returns log-probabilities already; log_softmax is idempotent on them.
    return jax.nn.log_softmax(outputs.astype(jnp.float32), axis=-1)

  def loss(self, variables, system_state, inputs, labels, rng, epoch):
    del epoch
    outputs, mutated = self.module.apply(variables, inputs[self.field], train=True, mutable=["batch_stats"],
                                         rngs={"dropout": rng})
    log_probs = self._log_probs(outputs)
    if self.loss_name == "grading":
      total = bira.interclass_loss(log_probs, labels, detach_loss=self.detach_loss)
    else:
      total = base.cross_entropy(log_probs, labels)
    return total, ({"accuracy": base.accuracy(log_probs, labels)}, mutated["batch_stats"], system_state)

  def predict(self, variables, inputs):
    outputs, inter = self.module.apply(variables, inputs[self.field], train=False, mutable=["intermediates"])
    out = {"logits": self._log_probs(outputs)}
    maps = base.sown(inter["intermediates"], "attention")  # RA-Net: one map; the bilinear net: one per branch
    if maps:
      out["attention"] = jnp.mean(jnp.stack([a[..., 0] for a in maps]), axis=0)
    return out


def build(config, num_classes: int, fields: Mapping[str, int]) -> BiRAClassifier:
  return BiRAClassifier(config, num_classes, fields)

"""CRD-Net (``config.model.name='crd_net'``): two modalities, three heads (docs/systems.md#crd-net)."""

from __future__ import annotations

from typing import Mapping

import ml_collections

from jaxretina import configlib
from jaxretina.models import crdnet, resnet
from jaxretina.systems import base, model_fields


def model_config() -> ml_collections.ConfigDict:
  """``config.model``: the ``crdnet.CRDNet`` module's arguments (see ``models/crdnet.py``); the
  towers' input channels come from ``config.data.fields``."""
  return ml_collections.ConfigDict(dict(
      backbone_block="basic",  # the two towers: ResNet-18
      backbone_layers=(2, 2, 2, 2),
      backbone_base_width=64,
      num_heads=4,  # CrossGate heads
      cross_dim=0,  # CMA width and Attention4D key width; 0 = upstream's 2× the tower channels
      skip_stem_maxpool=False,  # upstream quirk: True reproduces the towers without max-pool
  ))


def loss_config() -> ml_collections.ConfigDict:
  """``config.loss``: the weights of the (fused, x, y) heads' cross-entropies."""
  return ml_collections.ConfigDict(dict(head_weights=[1.0, 1.0, 1.0]))


class CRDNetClassifier(base.ClassificationSystem):
  """CRD-Net on two modalities (docs/systems.md#crd-net).

  ``config.data.fields`` names the two image fields in model order (x = fundus, y = OCT/FFA);
  ``config.model`` and ``config.loss``: ``model_config`` and ``loss_config`` above.
  """

  def __init__(self, config, num_classes: int, fields: Mapping[str, int]):
    if len(fields) != 2:
      raise ValueError(f"crd_net fuses exactly 2 image modalities; config.data.fields names {len(fields)}: "
                       f"{sorted(fields)}")
    self.fields = tuple(fields)
    self.head_weights = tuple(float(w) for w in config.loss.head_weights)
    module_fields = model_fields(config.model)
    # The config's 0 is the module's None: upstream's width, 2× the tower channels.
    module_fields["cross_dim"] = int(module_fields["cross_dim"]) or None
    self.module = crdnet.CRDNet(num_classes=num_classes, in_channels=tuple(fields.values()), **module_fields,
                                dtype=configlib.compute_dtype(config), remat=config.remat)

  def _images(self, inputs):
    return tuple(inputs[f] for f in self.fields)

  def backbones(self) -> dict[tuple[str, ...], resnet.ResNet]:
    """The RGB towers (a grey tower's stem differs from torchvision's and starts from scratch)."""
    towers = {}
    for name, channels in zip(("backbone_x", "backbone_y"), self.module.in_channels):
      if channels == 3:
        towers[(name,)] = self.module._tower(None, 3)
    return towers

  def init(self, rng, inputs):
    return self.module.init({"params": rng}, *self._images(inputs), train=False), {}

  def loss(self, variables, system_state, inputs, labels, rng, epoch):
    del rng, epoch
    outputs, mutated = self.module.apply(variables, *self._images(inputs), train=True, mutable=["batch_stats"])
    total = crdnet.crdnet_loss(outputs, labels, self.head_weights)
    out, out_x, out_y = outputs
    ce_out, ce_x, ce_y = crdnet.crdnet_loss_terms(outputs, labels)  # unweighted, for the logs
    metrics = {"accuracy": base.accuracy(out, labels), f"accuracy_{self.fields[0]}": base.accuracy(out_x, labels),
               f"accuracy_{self.fields[1]}": base.accuracy(out_y, labels), "loss_fused": ce_out,
               f"loss_{self.fields[0]}": ce_x, f"loss_{self.fields[1]}": ce_y}
    return total, (metrics, mutated["batch_stats"], system_state)

  def predict(self, variables, inputs):
    out, out_x, out_y = self.module.apply(variables, *self._images(inputs), train=False)
    return {"logits": out, f"logits_{self.fields[0]}": out_x, f"logits_{self.fields[1]}": out_y}


def build(config, num_classes: int, fields: Mapping[str, int]) -> CRDNetClassifier:
  return CRDNetClassifier(config, num_classes, fields)

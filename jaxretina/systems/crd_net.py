"""CRD-Net (``config.model.name='crd_net'``): two modalities, three heads (docs/systems.md#crd-net)."""

from __future__ import annotations

from typing import Mapping

from jaxretina import configlib
from jaxretina.models import crdnet, resnet
from jaxretina.systems import base


class CRDNetClassifier(base.ClassificationSystem):
  """CRD-Net on two modalities (docs/systems.md#crd-net).

  ``config.data.fields`` names the two image fields in model order (x = fundus, y = OCT/FFA);
  ``config.model``: ``backbone_block``/``backbone_layers``/``backbone_base_width`` (ResNet-18:
  basic, [2, 2, 2, 2], 64), ``num_heads``, ``cross_dim`` (CMA width and Attention4D key width; 0 =
  upstream's 2× the tower channels), ``skip_stem_maxpool`` (upstream quirk, see
  ``models/crdnet.py``); ``config.loss.head_weights`` (1, 1, 1 upstream).
  """

  def __init__(self, config, num_classes: int, fields: Mapping[str, int]):
    if len(fields) != 2:
      raise ValueError(f"crd_net fuses exactly 2 image modalities; config.data.fields names {len(fields)}: "
                       f"{sorted(fields)}")
    self.fields = tuple(fields)
    m = config.model
    self.head_weights = tuple(float(w) for w in config.loss.get("head_weights", (1.0, 1.0, 1.0)))
    self.module = crdnet.CRDNet(num_classes=num_classes, in_channels=tuple(fields.values()),
                                backbone_block=m.get("backbone_block", "basic"),
                                backbone_layers=tuple(m.get("backbone_layers", (2, 2, 2, 2))),
                                backbone_base_width=int(m.get("backbone_base_width", 64)),
                                num_heads=int(m.get("num_heads", 4)),
                                cross_dim=int(m.get("cross_dim") or 0) or None,
                                skip_stem_maxpool=bool(m.get("skip_stem_maxpool", False)),
                                dtype=configlib.compute_dtype(config), remat=base.remat_mode(config))

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

  def loss(self, variables, extra, inputs, labels, rng, epoch):
    del rng, epoch
    outputs, mutated = self.module.apply(variables, *self._images(inputs), train=True, mutable=["batch_stats"])
    total = crdnet.crdnet_loss(outputs, labels, self.head_weights)
    out, out_x, out_y = outputs
    ce_out, ce_x, ce_y = crdnet.crdnet_loss_terms(outputs, labels)  # unweighted, for the logs
    metrics = {"accuracy": base.accuracy(out, labels), f"accuracy_{self.fields[0]}": base.accuracy(out_x, labels),
               f"accuracy_{self.fields[1]}": base.accuracy(out_y, labels), "loss_fused": ce_out,
               f"loss_{self.fields[0]}": ce_x, f"loss_{self.fields[1]}": ce_y}
    return total, (metrics, mutated["batch_stats"], extra)

  def predict(self, variables, inputs):
    out, out_x, out_y = self.module.apply(variables, *self._images(inputs), train=False)
    return {"logits": out, f"logits_{self.fields[0]}": out_x, f"logits_{self.fields[1]}": out_y}


def build(config, num_classes: int, fields: Mapping[str, int]) -> CRDNetClassifier:
  return CRDNetClassifier(config, num_classes, fields)

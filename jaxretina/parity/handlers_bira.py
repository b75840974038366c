"""Parity handlers for BiRA-Net (``ISS-Kerui/BIRA-NET-…``: ``KeNet`` and ``InterclassLoss``)."""

from __future__ import annotations

import numpy as np

from jaxretina import parity
from jaxretina.models import bira, resnet

REPO = "ISS-Kerui/BIRA-NET-BILINEAR-ATTENTION-NET-FOR-DIABETIC-RETINOPATHY-GRADING"


@parity.register(REPO, "KeNet")
def kenet(case: parity.Case) -> dict:
  c = case.constructor
  trunk = resnet.from_constructor(c.get("backbone") or {"block": "Bottleneck", "layers": [3, 4, 6, 3]},
                                  num_classes=None)
  model = bira.KeNet(features=trunk, num_classes=int(c.get("classes_num", 5)),
                     matmul_masking=True)  # upstream masks with torch.matmul
  x = parity.nchw_to_nhwc(case.inputs["x"])
  variables = bira.from_torch(case.weights, model, input_shape=(1,) + x.shape[1:], source=case.name)
  log_probs, state = model.apply(variables, x, mutable=["intermediates"])
  aux = {k: v[0] for k, v in state["intermediates"].items()}
  return {"log_probs": log_probs, "aux/features": parity.nhwc_to_nchw(aux["trunk_output"]),
          "aux/attention": parity.nhwc_to_nchw(aux["attention"]), "aux/gap": aux["gap"]}


@parity.register(REPO, "InterclassLoss")
def interclass(case: parity.Case) -> dict:
  loss = bira.interclass_loss(case.inputs["pred"], np.asarray(case.inputs["truth"]),
                              detach_loss=True)  # upstream re-wraps the loss in a fresh Variable
  return {"loss": loss}

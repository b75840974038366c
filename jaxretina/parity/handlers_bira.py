"""Parity handlers for BiRA-Net (``ISS-Kerui/BIRA-NET-…``: ``KeNet``, ``InterclassLoss`` and ``train``).

Upstream behaviour switched on here (the library defaults are the intended behaviour):
``matmul_masking=True``, ``detach_loss=True`` (the loss value) and, in the train step,
``loss.name='ce'`` (what upstream ``train()`` minimises instead of the grading loss).
"""

from __future__ import annotations

import numpy as np

from jaxretina import parity
from jaxretina.models import bira, resnet
from jaxretina.parity import classification_steps as steps

REPO = "ISS-Kerui/BIRA-NET-BILINEAR-ATTENTION-NET-FOR-DIABETIC-RETINOPATHY-GRADING"


def _dense_width(c: dict) -> int:
  """The dense head's hidden width: upstream hard-codes ``Linear(2048, 256)`` (fixtures may remap it)."""
  return int((c.get("channel_remap") or {}).get("256", 256))


@parity.register(REPO, "KeNet")
def kenet(case: parity.Case) -> dict:
  c = case.constructor
  trunk = resnet.from_constructor(c.get("backbone") or {"block": "Bottleneck", "layers": [3, 4, 6, 3]},
                                  num_classes=None)
  model = bira.KeNet(features=trunk, num_classes=int(c.get("classes_num", 5)), dense_width=_dense_width(c),
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


@parity.register(REPO, "train")
def bira_train_step(case: parity.Case) -> dict:
  """One iteration of ``train()`` (code/train.py) through the classification trainer's own step.

  Upstream trains ``KeNet`` (``model.variant='ra_net'``) with plain CE on its log-probabilities
  (``loss.name='ce'``: the grading loss is never trained upstream), ``torch.matmul`` masking,
  SGD over the parameters ``meta.frozen`` leaves out, every BatchNorm in train mode (frozen
  ones included). The fixture turns the dense ``Dropout(0.5)`` off (``driver_patches``).
  """
  c = case.constructor
  trunk = resnet.from_constructor(c.get("backbone") or {"block": "Bottleneck", "layers": [3, 4, 6, 3]},
                                  num_classes=None)
  weights = case.meta.get("loss_weights") or {"ce": 1.0}
  if weights != {"ce": 1.0}:
    raise ValueError(f"{case.path}: loss_weights {weights}: upstream train() minimises CE alone (weight 1)")
  x = steps.images(case, "x")
  num_classes = int((c.get("KeNet") or {}).get("classes_num", c.get("classes_num", 5)))
  config = steps.base_config(case, "bira_net", fields="x:3", num_classes=num_classes, image_size=max(x.shape[1:3]))
  config.model.update(variant="ra_net", backbone=steps.resnet_fields(trunk), dropout_rate=0.0,
                      dense_width=_dense_width(c), matmul_masking=True)  # upstream masks with torch.matmul
  config.loss.update(name="ce", detach_loss=False)  # the loss upstream's train() minimises
  task, variables, placement = steps.build(
      case, config, lambda module, placement: bira.from_torch(case.weights, module, input_shape=(1,) + x.shape[1:],
                                                              source=case.path, placement=placement))
  new_state, metrics, grads = steps.run_step(case, task, variables, {"x": x})
  extra = {"clip/total_norm": metrics["grad_norm"]} if "clip/total_norm" in case.outputs else {}
  return parity.train_step_outputs(case, placement, grads=grads, params=new_state.params,
                                   batch_stats=new_state.batch_stats, loss=metrics["loss"], extra=extra)

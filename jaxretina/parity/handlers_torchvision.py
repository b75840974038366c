"""Parity handlers for torchvision models (``pytorch/vision``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxretina import parity
from jaxretina.models import convert, resnet


@parity.register("pytorch/vision", "ResNet")
def torchvision_resnet(case: parity.Case) -> dict:
  """``torchvision.models.resnet.ResNet(block, layers, num_classes, width_per_group, groups)(x)``.

  Outputs: ``logits`` (or pooled features when the fixture has no fc), ``aux/layer4`` (NCHW) and,
  in train mode, ``state_after/<torch key>`` for every BatchNorm buffer.
  """
  ctor = dict(case.constructor)
  has_fc = any(k.startswith("fc.") for k in case.weights)
  module = resnet.from_constructor(ctor, num_classes=int(ctor.get("num_classes", 1000)) if has_fc else None)
  x = parity.nchw_to_nhwc(case.inputs["x"]).astype(np.float32)
  variables = resnet.from_torch(case.weights, module, input_shape=(1,) + x.shape[1:], source=case.path)
  x = jnp.asarray(x)
  if case.train:
    (out, taps), new_state = module.apply(variables, x, train=True, return_taps=True, mutable=["batch_stats"])
  else:
    out, taps = module.apply(variables, x, train=False, return_taps=True)
    new_state = None
  result = {"logits": np.asarray(out), "aux/layer4": parity.nhwc_to_nchw(taps["layer4"])}
  if new_state is not None:
    result.update(parity.state_after(new_state, convert.flax_path_to_torch))
  return result

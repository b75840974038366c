"""Parity handlers for CBAM: the official module (Jongchan) and CAL / DualAttendMed ``CBAMLayer``.

(FCN-CLIP's CBAM, ``mode='fcnclip'``, is exercised through the FCN-CLIP handlers.)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxretina import parity
from jaxretina.models import cbam, convert


def _run(case: parity.Case, mode: str) -> dict:
  x = parity.nchw_to_nhwc(case.inputs["x"]).astype(np.float32)
  module = cbam.from_constructor(case.constructor, mode)
  variables = cbam.from_torch(case.weights, module, channels=x.shape[-1], source=case.path)
  x = jnp.asarray(x)
  if case.train:
    y, new_state = module.apply(variables, x, train=True, mutable=["batch_stats"])
    out = {"y": parity.nhwc_to_nchw(y)}
    out.update(parity.state_after(new_state, convert.flax_path_to_torch))
    return out
  return {"y": parity.nhwc_to_nchw(module.apply(variables, x, train=False))}


@parity.register("Jongchan/attention-module", "CBAM")
def jongchan_cbam(case: parity.Case) -> dict:
  """``CBAM(gate_channels, reduction_ratio, pool_types, no_spatial)(x)``; train mode adds BN buffers."""
  return _run(case, "official")


@parity.register("raoyongming/CAL", "CBAMLayer")
def cal_cbam_layer(case: parity.Case) -> dict:
  """``CBAMLayer(channel, reduction, spatial_kernel)(x)`` (identical in DualAttendMed)."""
  return _run(case, "cal")


@parity.register("JunaidAbbas517/DualAttendMed", "CBAMLayer")
def dualattendmed_cbam_layer(case: parity.Case) -> dict:
  return _run(case, "cal")

"""Parity handlers for WS-DAN / CAL / DualAttendMed: BAP, the WSDAN_CAL model, crop/drop, losses.

Upstream's in-forward draws come from the fixtures' ``rng/*`` inputs, and the flags that switch
intended behaviour to upstream's are set here (index picks with replacement, unclamped pick
weights, crop boxes that cut off the last mask row/column).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxretina import parity
from jaxretina.losses import wsdan as losses
from jaxretina.models import attention_augment, wsdan

CAL = "raoyongming/CAL"
DAM = "JunaidAbbas517/DualAttendMed"


def _nhwc(x) -> jnp.ndarray:
  return jnp.asarray(parity.nchw_to_nhwc(np.asarray(x)).astype(np.float32))


def _bap(case: parity.Case) -> dict:
  fake = case.inputs.get("rng/fake_att")
  fm, cf = wsdan.bilinear_attention_pooling(
      _nhwc(case.inputs["features"]), _nhwc(case.inputs["attentions"]), pool=case.constructor.get("pool", "GAP"),
      train=case.train, fake_attention=None if fake is None else _nhwc(fake))
  return {"feature_matrix": fm, "counterfactual_feature": cf}


parity.register(CAL, "BAP")(_bap)
parity.register(DAM, "BAP")(_bap)


def _wsdan_model(case: parity.Case, variant: str) -> dict:
  head_only = not any(k.startswith("features.") for k in case.weights)
  module = wsdan.from_constructor(case.constructor, variant=variant, head_only=head_only,
                                  pick_with_replacement=True, clamp_negative_attention_mass=False)
  x_name = "x" if "x" in case.inputs else "feature_maps"
  x = _nhwc(case.inputs[x_name])
  variables = wsdan.from_torch(case.weights, module, input_shape=(1,) + x.shape[1:], source=case.path)
  kwargs = {}
  if case.train:
    kwargs = dict(fake_attention=_nhwc(case.inputs["rng/fake_att"]),
                  pick_indices=jnp.asarray(case.inputs["rng/k_index"], jnp.int32))
    out, new_state = module.apply(variables, x, train=True, mutable=["batch_stats"], **kwargs)
  else:
    out, new_state = module.apply(variables, x, train=False), None

  to_nchw = parity.nhwc_to_nchw
  if variant == "cal":
    result = {"p": out.logits, "p_aux": out.effect_logits}
  else:
    result = {"p_coarse": out.logits, "p_aux": out.effect_logits, "channel_weights": out.channel_weights,
              "attention_maps": to_nchw(out.attention_maps)}
  result.update(feature_matrix=out.feature_matrix, attention_map=to_nchw(out.attention_map))
  if new_state is not None:
    result.update(parity.state_after(new_state, _torch_module_path))
  return result


def _torch_module_path(path: tuple[str, ...]) -> str:
  """Flax module path → upstream torch path (the backbone sits in ``features.{0,1,4..7}``)."""
  torch_path = parity.flax_path_to_torch(path)
  if torch_path.startswith("features."):
    head, _, rest = torch_path[len("features."):].partition(".")
    index = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}[head]
    torch_path = ".".join(p for p in ("features", index, rest) if p)
  return torch_path


@parity.register(CAL, "WSDAN_CAL")
def cal_wsdan(case: parity.Case) -> dict:
  """``WSDAN_CAL(num_classes, M, net)(x)`` → p, p_aux, feature_matrix, attention_map [+ BN buffers]."""
  return _wsdan_model(case, "cal")


@parity.register(DAM, "WSDAN_CAL")
def dualattendmed_wsdan(case: parity.Case) -> dict:
  """DualAttendMed ``WSDAN_CAL(...)(x, return_attention_weights=True)`` → all six outputs."""
  return _wsdan_model(case, "dualattendmed")


def _batch_augment(case: parity.Case) -> dict:
  ctor = case.constructor
  theta = ctor.get("theta", 0.5)
  thetas = case.inputs.get("rng/theta")
  images = _nhwc(case.inputs["images"])
  out = attention_augment.batch_augment(
      images, _nhwc(case.inputs["attention_map"]), mode=ctor.get("mode", "crop"),
      theta=tuple(theta) if isinstance(theta, list) else float(theta),
      padding_ratio=float(ctor.get("padding_ratio", 0.1)),
      thetas=None if thetas is None else jnp.asarray(thetas, jnp.float32), drop_last_mask_row=True)
  return {"images_out": parity.nhwc_to_nchw(out)}


parity.register(DAM, "batch_augment")(_batch_augment)
parity.register(CAL, "batch_augment")(_batch_augment)


def _center_loss(case: parity.Case) -> dict:
  return {"loss": losses.center_loss(jnp.asarray(case.inputs["outputs"]), jnp.asarray(case.inputs["targets"]))}


parity.register(CAL, "CenterLoss")(_center_loss)
parity.register(DAM, "CenterLoss")(_center_loss)


@parity.register(DAM, "AttentionAlignmentLoss")
def attention_alignment(case: parity.Case) -> dict:
  maps = _nhwc(case.inputs["attention_maps"])
  out = {"loss_default_target": losses.attention_alignment_loss(maps)}
  if "target_attention_maps" in case.inputs:
    out["loss_explicit_target"] = losses.attention_alignment_loss(maps, _nhwc(case.inputs["target_attention_maps"]))
  return out


@parity.register(DAM, "DiversityLoss")
def diversity(case: parity.Case) -> dict:
  margin = float(case.constructor.get("margin", 0.1))
  maps = _nhwc(case.inputs["attention_maps"])
  return {"loss": losses.diversity_loss(maps, margin), "loss_3d_first_sample": losses.diversity_loss(maps[0], margin)}


@parity.register(DAM, "Auxiliary_Loss_v2")
def auxiliary_v2(case: parity.Case) -> dict:
  ctor = case.constructor
  margin = ctor.get("margin")
  if not isinstance(margin, list):
    raise ValueError(f"{case.name}: margin={margin!r}; upstream's torch.Tensor(int) margin is uninitialised "
                     "memory and cannot be reproduced — the fixture must give the margin as a list")
  inner = case.weights.get("inner_margin", np.asarray(ctor.get("inner_margin", [0.1])))
  loss = losses.auxiliary_loss_v2(jnp.asarray(case.inputs["feature_matrix"]), jnp.asarray(case.inputs["feature_centers"]),
                                  int(ctor["M"]), alpha=float(ctor.get("alpha", 0.05)), margin=float(margin[0]),
                                  inner_margin=float(np.asarray(inner).reshape(-1)[0]))
  # margin is a 1-element tensor upstream, so the loss has shape (1,).
  return {"loss": jnp.reshape(loss, (1,))}

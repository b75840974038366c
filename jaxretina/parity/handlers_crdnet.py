"""Parity handlers for CRD-Net (``ZirongLiu/CRD-Net: model/CRDNet.py``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxretina import parity
from jaxretina.models import crdnet, resnet
from jaxretina.parity import classification_steps as steps

REPO = "ZirongLiu/CRD-Net"


def _nchw_outputs(values: dict) -> dict:
  return {k: parity.nhwc_to_nchw(v) for k, v in values.items()}


def _sown(state, *path) -> dict:
  """``{name: first sown value}`` of ``state['intermediates'][path...]``."""
  node = state["intermediates"]
  for p in path:
    node = node[p]
  return {k: v[0] for k, v in node.items() if isinstance(v, tuple)}


def _reject_unsupported(c: dict, **expected) -> None:
  for key, want in expected.items():
    if key in c and c[key] != want:
      raise ValueError(f"CRD-Net constructor {key}={c[key]!r} is not supported by this handler (expected {want!r})")


@parity.register(REPO, "Attention4D")
def attention4d(case: parity.Case) -> dict:
  c = case.constructor
  _reject_unsupported(c, rel_position=None)
  act = str(c.get("act_layer", "None"))
  if "None" not in act and "ReLU" not in act:
    raise ValueError(f"Attention4D act_layer {act!r}: only ReLU (upstream default) is ported")
  x = parity.nchw_to_nhwc(case.inputs["x"])
  if int(c["dim"]) != x.shape[-1]:
    raise ValueError(f"Attention4D dim {c['dim']} != input channels {x.shape[-1]}")
  module = crdnet.Attention4D(num_heads=int(c["num_head"]), key_dim=int(c["dim_k"]),
                              attn_ratio=float(c.get("att_ratio", 4.0)), qkv_bias=bool(c.get("qkv_bias", True)),
                              proj_bias=bool(c.get("proj_bias", True)), downsample=bool(c.get("downsample", False)))
  variables = crdnet.from_torch(case.weights, module, x, source=case.name)
  y, state = module.apply(variables, x, mutable=["intermediates"])
  aux = _sown(state)
  return {"y": parity.nhwc_to_nchw(y), "aux/q": parity.nhwc_to_nchw(aux["q"]),
          "aux/v_local": parity.nhwc_to_nchw(aux["v_local"])}


@parity.register(REPO, "UFFN")
def uffn(case: parity.Case) -> dict:
  c = case.constructor
  act = str(c.get("act_layer", "GELU"))
  if "GELU" not in act:
    raise ValueError(f"UFFN act_layer {act!r}: only nn.GELU (upstream default) is ported")
  x = parity.nchw_to_nhwc(case.inputs["x"])
  if int(c["dim"]) != x.shape[-1]:
    raise ValueError(f"UFFN dim {c['dim']} != input channels {x.shape[-1]}")
  module = crdnet.UFFN(out_dim=int(c["out_dim"]), expansion_rate=float(c.get("expansion_rate", 4.0)),
                       use_mid_conv=bool(c.get("use_mid_conv", True)))
  variables = crdnet.from_torch(case.weights, module, x, source=case.name)
  return {"y": parity.nhwc_to_nchw(module.apply(variables, x))}


@parity.register(REPO, "CrossAtt")
def cross_att(case: parity.Case) -> dict:
  c = case.constructor
  x, y = parity.nchw_to_nhwc(case.inputs["x"]), parity.nchw_to_nhwc(case.inputs["y"])
  if (int(c["x_ch"]), int(c["y_ch"])) != (x.shape[-1], y.shape[-1]):
    raise ValueError(f"CrossAtt x_ch/y_ch {c['x_ch']}/{c['y_ch']} != input channels {x.shape[-1]}/{y.shape[-1]}")
  module = crdnet.CrossAtt(dim=int(c.get("dim", 128)), num_heads=int(c.get("num_head", 4)))
  variables = crdnet.from_torch(case.weights, module, x, y, source=case.name)
  out_x, out_y = module.apply(variables, x, y)
  return _nchw_outputs({"out_x": out_x, "out_y": out_y})


@parity.register(REPO, "CrossGate")
def cross_gate(case: parity.Case) -> dict:
  c = case.constructor
  x, y = parity.nchw_to_nhwc(case.inputs["x"]), parity.nchw_to_nhwc(case.inputs["y"])
  if (int(c["x_ch"]), int(c["y_ch"])) != (x.shape[-1], y.shape[-1]):
    raise ValueError(f"CrossGate x_ch/y_ch {c['x_ch']}/{c['y_ch']} != input channels {x.shape[-1]}/{y.shape[-1]}")
  module = crdnet.CrossGate(dim=int(c["dim"]), num_heads=int(c["num_head"]))
  variables = crdnet.from_torch(case.weights, module, x, y, source=case.name)
  (out_x, out_y), state = module.apply(variables, x, y, mutable=["intermediates"])
  aux = _sown(state)
  out = {"out_x": out_x, "out_y": out_y}
  out.update({"aux/pre_att_x": aux["attention_x"], "aux/pre_att_y": aux["attention_y"],
              "aux/cma_x": aux["cma_x"], "aux/cma_y": aux["cma_y"]})
  return _nchw_outputs(out)


def _remap(c: dict, width: int) -> int:
  """Upstream hard-coded width → the fixture's width (``constructor.channel_remap``)."""
  return int((c.get("channel_remap") or {}).get(str(width), width))


def _model_fields(c: dict) -> dict:
  """``CrossMaResNet`` constructor (fixture ``constructor``) → ``crdnet.CRDNet`` fields."""
  backbone = resnet.from_constructor(c.get("backbone") or {"block": "BasicBlock", "layers": [2, 2, 2, 2]},
                                     num_classes=None)
  gate = dict((c.get("cross_att_stage4") or {}).get("CrossGate") or {})
  feat = backbone.base_width * 8 * resnet.expansion(backbone.block)
  if feat != _remap(c, 512):
    raise ValueError(f"CrossMaResNet: tower output width {feat} != head width {_remap(c, 512)} (channel_remap)")
  dim = int(gate.get("dim", _remap(c, 1024)))
  if int(gate.get("x_ch", feat)) != feat or int(gate.get("y_ch", feat)) != feat:
    raise ValueError(f"CrossMaResNet: CrossGate channels {gate} != tower output width {feat}")
  return dict(num_classes=int(c.get("num_classes", 4)),
              in_channels=(int(c.get("in_ch_x", 3)), int(c.get("in_ch_y", 3))),
              backbone_block=backbone.block, backbone_layers=tuple(backbone.layers),
              backbone_base_width=backbone.base_width, cross_dim=dim, num_heads=int(gate.get("num_head", 4)),
              skip_stem_maxpool=True)  # upstream backbone_forward skips the max-pool


@parity.register(REPO, "CrossMaResNet")
def crossmaresnet(case: parity.Case) -> dict:
  model = crdnet.CRDNet(**_model_fields(case.constructor))
  x, y = parity.nchw_to_nhwc(case.inputs["x"]), parity.nchw_to_nhwc(case.inputs["y"])
  variables = crdnet.from_torch(case.weights, model, x, y, source=case.name)
  (out, out_x, out_y), state = model.apply(variables, jnp.asarray(x), jnp.asarray(y), mutable=["intermediates"])
  aux = _sown(state)
  result = {"out": out, "out_x": out_x, "out_y": out_y}
  if "labels" in case.inputs:
    result["loss"] = crdnet.crdnet_loss((out, out_x, out_y), np.asarray(case.inputs["labels"]))
  result.update({f"aux/{k}": parity.nhwc_to_nchw(v) for k, v in aux.items()})
  return result


@parity.register(REPO, "train_and_evaluate")
def crdnet_train_step(case: parity.Case) -> dict:
  """One iteration of ``train_and_evaluate`` through the classification trainer's own step.

  ``CE(out) + CE(out_x) + CE(out_y)`` with ``meta.loss_weights``, SGD as ``meta.optimizer`` says,
  every BatchNorm in train mode.
  """
  fields = _model_fields(case.constructor)
  x, y = steps.images(case, "x"), steps.images(case, "y")
  weights = case.meta.get("loss_weights") or {"ce_out": 1.0, "ce_out_x": 1.0, "ce_out_y": 1.0}
  if set(weights) != {"ce_out", "ce_out_x", "ce_out_y"}:
    raise ValueError(f"{case.path}: loss_weights {weights}: expected the three heads ce_out, ce_out_x, ce_out_y")
  config = steps.base_config(case, "crd_net", fields=f"x:{fields['in_channels'][0]},y:{fields['in_channels'][1]}",
                             num_classes=fields["num_classes"], image_size=max(x.shape[1:3]))
  config.model.update(backbone_block=fields["backbone_block"], backbone_layers=list(fields["backbone_layers"]),
                      backbone_base_width=fields["backbone_base_width"], num_heads=fields["num_heads"],
                      cross_dim=fields["cross_dim"], skip_stem_maxpool=fields["skip_stem_maxpool"])
  # The classifier's head order is (fused, x, y); upstream names the terms out / out_x / out_y.
  config.loss.head_weights = [float(weights[k]) for k in ("ce_out", "ce_out_x", "ce_out_y")]
  task, variables, placement = steps.build(
      case, config, lambda module, placement: crdnet.from_torch(case.weights, module, x, y, source=case.path,
                                                                placement=placement))
  new_state, metrics, grads = steps.run_step(case, task, variables, {"x": x, "y": y})
  terms = {"ce_out": metrics["loss_fused"], "ce_out_x": metrics["loss_x"], "ce_out_y": metrics["loss_y"]}
  extra = {"clip/total_norm": metrics["grad_norm"]} if "clip/total_norm" in case.outputs else {}
  return parity.train_step_outputs(case, placement, grads=grads, params=new_state.params,
                                   batch_stats=new_state.batch_stats, loss=metrics["loss"], terms=terms, extra=extra)

"""Parity handlers for OpenAI CLIP's ``ModifiedResNet`` and ``AttentionPool2d`` (``openai/CLIP``)."""

from __future__ import annotations

from jaxretina import parity
from jaxretina.models import clip_resnet

REPO = "openai/CLIP"


@parity.register(REPO, "AttentionPool2d")
def attention_pool(case: parity.Case) -> dict:
  c = case.constructor
  module = clip_resnet.AttentionPool2d(spacial_dim=int(c["spacial_dim"]), embed_dim=int(c["embed_dim"]),
                                       num_heads=int(c["num_heads"]), output_dim=c.get("output_dim"))
  variables = clip_resnet.from_torch(case.weights, module, source=case.name)
  y = module.apply(variables, parity.nchw_to_nhwc(case.inputs["x"]))
  return {"y": y}


@parity.register(REPO, "ModifiedResNet")
def modified_resnet(case: parity.Case) -> dict:
  c = case.constructor
  module = clip_resnet.ModifiedResNet(layers=tuple(c["layers"]), output_dim=int(c["output_dim"]),
                                      heads=int(c["heads"]), input_resolution=int(c.get("input_resolution", 224)),
                                      width=int(c.get("width", 64)))
  variables = clip_resnet.from_torch(case.weights, module, source=case.name)
  emb, taps = module.apply(variables, parity.nchw_to_nhwc(case.inputs["x"]), return_taps=True)
  return {"embedding": emb, "aux/layer4": parity.nhwc_to_nchw(taps["layer4"])}

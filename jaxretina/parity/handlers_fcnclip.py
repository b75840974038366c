"""Parity handlers for FCN-CLIP (``gyuminleehk/Elec-4840-Final-Project``, notebook code cell 7).

Upstream behaviour switched on here (the library defaults are the intended behaviour):
``double_cbam_gating=True`` (the CBAM output multiplied onto x again),
``pt_from_weighted_ce=True`` (focal ``pt`` from the class-weighted CE) and, in the train step,
``encoder_bn_batch_stats=True`` (the frozen encoder's BatchNorms in train mode).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxretina import parity
from jaxretina.models import cbam, fcn_clip, flair
from jaxretina.parity import classification_steps as steps

REPO = "gyuminleehk/Elec-4840-Final-Project"


@parity.register(REPO, "CBAM")
def fcnclip_cbam(case: parity.Case) -> dict:
  c = case.constructor
  x = jnp.asarray(parity.nchw_to_nhwc(case.inputs["x"]))
  if "channels" in c and int(c["channels"]) != x.shape[-1]:
    raise ValueError(f"CBAM channels {c['channels']} != input channels {x.shape[-1]}")
  module = cbam.from_constructor(c, "fcnclip")
  variables = cbam.from_torch(case.weights, module, channels=x.shape[-1], source=case.name)
  y, channel, spatial = module.apply(variables, x, return_attention=True)
  return {"y": parity.nhwc_to_nchw(y), "aux/channel_attention": parity.nhwc_to_nchw(channel),
          "aux/spatial_attention": parity.nhwc_to_nchw(spatial)}


@parity.register(REPO, "FocalLoss")
def focal(case: parity.Case) -> dict:
  gamma = float(case.constructor.get("gamma", 2.0))
  logits, targets = case.inputs["logits"], np.asarray(case.inputs["targets"])
  weights = case.inputs.get("class_weights")
  out = {}
  for name, reduction in (("loss", "mean"), ("loss_sum", "sum"), ("loss_none", "none")):
    out[name] = fcn_clip.focal_loss(logits, targets, weights, gamma=gamma, reduction=reduction,
                                    pt_from_weighted_ce=True)
  out["loss_no_alpha"] = fcn_clip.focal_loss(logits, targets, None, gamma=gamma, pt_from_weighted_ce=True)
  return out


def _widths(c: dict) -> tuple[int, int, int]:
  """(decoder mid, decoder out, CBAM reduction) from the fixture's reduced widths."""
  reduced = c.get("reduced_widths") or {}
  remap = {int(k): int(v) for k, v in (c.get("channel_remap") or {}).items()}
  mid = int(reduced.get("decoder_mid", remap.get(512, 512)))
  out = int(reduced.get("decoder_out", remap.get(128, 128)))
  hidden = int(reduced.get("cbam_hidden", remap.get(8, out // 16)))
  if out % hidden:
    raise ValueError(f"FCN_CLIP: CBAM hidden width {hidden} does not divide {out} channels")
  return mid, out, out // hidden


@parity.register(REPO, "FCN_CLIP")
def fcnclip_model(case: parity.Case) -> dict:
  c = case.constructor
  if "bert_config" not in case.meta:
    raise ValueError(f"{case.path}: meta.json has no bert_config (the FLAIR text tower's configuration)")
  two_tower = flair.two_tower_from_constructor(c.get("FLAIRModel_kwargs") or {}, case.meta["bert_config"],
                                               text_pooling="all_positions")
  ctor = c.get("FCN_CLIP") or {}
  mid, out, reduction = _widths(c)
  common = dict(num_classes=int(ctor.get("num_classes", 5)), decoder_channels=(mid, out), cbam_reduction=reduction,
                dropout_rate=float(ctor.get("dropout_rate", 0.3)), double_cbam_gating=True)
  model = fcn_clip.FCNCLIP.from_flair(two_tower, use_fusion=False, **common)
  model_fusion = fcn_clip.FCNCLIP.from_flair(two_tower, use_fusion=True, **common)

  images = jnp.asarray(parity.nchw_to_nhwc(case.inputs["pixel_values"]))
  image_shape = (1,) + tuple(images.shape[1:])
  variables, flair_variables = fcn_clip.from_torch(case.weights, model_fusion, image_shape=image_shape,
                                                   flair_model=two_tower, source=case.name)
  plain_variables = {**variables, "params": {k: v for k, v in variables["params"].items() if k != "fusion"}}

  (logits, z), state = model.apply(plain_variables, images, mutable=["intermediates"])
  aux = {k: v[0] for k, v in state["intermediates"].items() if isinstance(v, tuple)}
  (logits_fusion, _), state_f = model_fusion.apply(variables, images, mutable=["intermediates"])
  aux_f = {k: v[0] for k, v in state_f["intermediates"].items() if isinstance(v, tuple)}

  out = {"logits": logits, "clip_features": z, "probs": jax.nn.softmax(logits, axis=-1),
         "logits_fusion": logits_fusion}
  for name, sown in (("decoder", "decoded"), ("cbam", "attended"), ("layer2", "layer2"), ("layer3", "layer3")):
    out[f"aux/{name}"] = parity.nhwc_to_nchw(aux[sown])
  for name, sown in (("fusion", "fused"), ("decoder_fusion", "decoded"), ("cbam_fusion", "attended")):
    out[f"aux/{name}"] = parity.nhwc_to_nchw(aux_f[sown])

  n_classes = len([k for k in case.inputs if re.fullmatch(r"zs_input_ids_\d+", k)])
  if n_classes:
    batches = [(jnp.asarray(case.inputs[f"zs_input_ids_{k}"].astype(np.int32)),
                jnp.asarray(case.inputs[f"zs_attention_mask_{k}"].astype(np.int32))) for k in range(n_classes)]
    text = flair.text_prototypes(two_tower, flair_variables, batches)
    out["text_embeds"] = text
    if "labels" in case.inputs:
      labels = np.asarray(case.inputs["labels"])
      losses = fcn_clip.hybrid_loss(logits, z, text, labels, case.inputs.get("class_weights"),
                                    gamma=float(c.get("focal_gamma", 2.0)), focal_weight=float(c.get("alpha", 0.7)),
                                    temperature=float(c.get("temperature", fcn_clip.CONTRASTIVE_TEMPERATURE)),
                                    pt_from_weighted_ce=True)
      out.update(losses)
  return out


@parity.register(REPO, "train_hybrid_epoch")
def fcnclip_train_step(case: parity.Case) -> dict:
  """One iteration of the notebook's ``train_hybrid_epoch`` through the classification trainer's own step.

  ``alpha·focal + (1 − alpha)·contrastive`` with the fixture's ``class_weights``; the contrastive
  term compares the frozen image embedding with the class prototypes of the (tiny random) FLAIR
  text tower and has no gradient. The FLAIR encoder is left out of the optimizer (``meta.frozen``,
  upstream: ``torch.no_grad``) but its BatchNorms run on batch statistics
  (``encoder_bn_batch_stats``). The fixture turns the decoder's ``Dropout2d`` off (``driver_patches``).
  """
  c = case.constructor
  if "bert_config" not in case.meta:
    raise ValueError(f"{case.path}: meta.json has no bert_config (the FLAIR text tower's configuration)")
  flair_kwargs = c.get("FLAIRModel_kwargs") or {}
  two_tower = flair.two_tower_from_constructor(flair_kwargs, case.meta["bert_config"], text_pooling="all_positions")
  if (two_tower.proj_bias, two_tower.projection, two_tower.norm_features) != (False, True, True):
    raise ValueError(f"{case.path}: the fcn_clip classifier builds FLAIR's projection head without bias, with "
                     "projection and normalisation; this fixture's FLAIRModel differs")
  ctor = c.get("FCN_CLIP") or {}
  mid, out, reduction = _widths(c)
  alpha = float(c.get("alpha", fcn_clip.FOCAL_WEIGHT))
  weights = case.meta.get("loss_weights") or {}
  if weights and not np.allclose([weights["focal"], weights["contrastive"]], [alpha, 1.0 - alpha]):
    raise ValueError(f"{case.path}: loss_weights {weights} disagree with alpha {alpha}")
  images = steps.images(case, "pixel_values")
  num_classes = int(ctor.get("num_classes", 5))
  config = steps.base_config(case, "fcn_clip", fields="pixel_values:3", num_classes=num_classes,
                             image_size=max(images.shape[1:3]))
  config.model.update(vision=steps.resnet_fields(two_tower.vision), proj_dim=int(two_tower.proj_dim),
                      use_fusion=bool(c.get("use_fusion", False)), decoder_channels=[mid, out],
                      cbam_reduction=reduction, dropout_rate=0.0,
                      double_cbam_gating=True,  # upstream multiplies CBAM's output onto x again
                      encoder_bn_batch_stats=True)  # upstream trains with the frozen encoder in train mode
  class_weights = case.inputs.get("class_weights")
  config.loss.update(gamma=float(c.get("focal_gamma", 2.0)),
                     class_weights=[float(w) for w in class_weights] if class_weights is not None else "none",
                     pt_from_weighted_ce=True,  # upstream's pt from the class-weighted CE
                     focal_weight=alpha, temperature=float(c.get("temperature", fcn_clip.CONTRASTIVE_TEMPERATURE)))
  image_shape = (1,) + tuple(images.shape[1:])
  flair_variables = {}

  def convert(module, placement):
    variables, flair_variables["tree"] = fcn_clip.from_torch(case.weights, module, image_shape=image_shape,
                                                             flair_model=two_tower, source=case.path,
                                                             placement=placement)
    return variables

  # The FLAIR text tower and logit scale are upstream's clip_model only: the classifier holds no copy;
  # without fusion, upstream's unused fusion conv has no counterpart either.
  outside = r"^clip_model\.(text_model\.|logit_scale$)" + ("" if config.model.use_fusion else r"|^fusion\.")
  task, variables, placement = steps.build(case, config, convert, outside_model=outside)
  n_classes = len([k for k in case.inputs if re.fullmatch(r"zs_input_ids_\d+", k)])
  if n_classes:
    batches = [(jnp.asarray(case.inputs[f"zs_input_ids_{k}"].astype(np.int32)),
                jnp.asarray(case.inputs[f"zs_attention_mask_{k}"].astype(np.int32))) for k in range(n_classes)]
    task.classifier.set_prototypes(flair.text_prototypes(two_tower, flair_variables["tree"], batches))
  elif "loss/contrastive" in case.outputs:
    raise ValueError(f"{case.path}: the fixture has a contrastive term but no tokenised class prompts (zs_*)")
  new_state, metrics, grads = steps.run_step(case, task, variables, {"pixel_values": images})
  terms = {"focal": metrics["loss_focal"]}
  if "loss_contrastive" in metrics:
    terms["contrastive"] = metrics["loss_contrastive"]
  extra = {"clip/total_norm": metrics["grad_norm"]} if "clip/total_norm" in case.outputs else {}
  return parity.train_step_outputs(case, placement, grads=grads, params=new_state.params,
                                   batch_stats=new_state.batch_stats, loss=metrics["loss"], terms=terms, extra=extra)

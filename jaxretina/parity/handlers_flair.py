"""Parity handlers for FLAIR (``jusiro/FLAIR``) and KeepFIT (``lxirich/MM-Retinal``).

Upstream behaviour switched on here (the library defaults are the intended behaviour):
``softmax_over_heads=True`` for KeepFIT's attention, ``text_pooling="all_positions"`` (the unmasked
mean over ``[PAD]``), and the in-place ``logit_scale`` clamp (``logit_scale_after``).
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from jaxretina import configlib, parity
from jaxretina.data import imaging
from jaxretina.models import convert, flair
from jaxretina.train import contrastive


def _images(case: parity.Case, name: str) -> jnp.ndarray:
  return jnp.asarray(parity.nchw_to_nhwc(case.inputs[name]).astype(np.float32))


def _tokens(case: parity.Case, ids: str, mask: str) -> tuple[jnp.ndarray, jnp.ndarray]:
  return jnp.asarray(case.inputs[ids].astype(np.int32)), jnp.asarray(case.inputs[mask].astype(np.int32))


def _softmax(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _build(case: parity.Case, **overrides):
  if "bert_config" not in case.meta:
    raise ValueError(f"{case.path}: meta.json has no bert_config (the text tower's configuration)")
  model = flair.two_tower_from_constructor(case.constructor, case.meta["bert_config"],
                                           text_pooling="all_positions", **overrides)
  image_shape = (1,) + tuple(parity.nchw_to_nhwc(case.inputs["pixel_values"]).shape[1:])
  variables = flair.from_torch(case.weights, model, image_shape=image_shape, source=case.path)
  return model, variables


def _encode(model, variables, images, ids, mask):
  img = model.apply(variables, images, method=flair.TwoTower.encode_image)
  txt = model.apply(variables, ids, mask, method=flair.TwoTower.encode_text)
  return img, txt


@parity.register("jusiro/FLAIR", "FLAIRModel")
def flair_model(case: parity.Case) -> dict:
  """FLAIR forward, soft CLIP loss, probabilities, logit-scale clamp and the zero-shot path."""
  model, variables = _build(case)
  logit_scale = variables["params"]["logit_scale"]
  img, txt = _encode(model, variables, _images(case, "pixel_values"),
                     *_tokens(case, "input_ids", "attention_mask"))
  # FLAIR's compute_logits returns logits per image = (logits per text)ᵀ.
  lpi = flair.logits_per_text(txt, img, logit_scale).T
  loss = flair.softce_clip_loss(lpi.T, jnp.asarray(case.inputs["target"]))
  out = {"img_embeds": img, "text_embeds": txt, "logits_per_image": lpi, "loss": loss,
         "probs": _softmax(lpi), "logit_scale_after": flair.clamp_logit_scale(logit_scale)}
  n_classes = len([k for k in case.inputs if re.fullmatch(r"zs_input_ids_\d+", k)])
  if n_classes:
    batches = [_tokens(case, f"zs_input_ids_{k}", f"zs_attention_mask_{k}") for k in range(n_classes)]
    protos = flair.text_prototypes(model, variables, batches)
    zs_logits = flair.logits_per_text(protos, img, logit_scale).T
    out.update(zs_text_embeds=protos, zs_logits=zs_logits, zs_probs=_softmax(zs_logits))
  return out


@parity.register("lxirich/MM-Retinal", "KeepFITModel")
def keepfit_model(case: parity.Case) -> dict:
  """KeepFIT forward with the expert-knowledge branch (``train_epoch_with_KD_loss_Atte_s``), eval mode."""
  model, variables = _build(case, knowledge_attention=True, softmax_over_heads=True)
  logit_scale = variables["params"]["logit_scale"]
  img, txt = _encode(model, variables, _images(case, "pixel_values"),
                     *_tokens(case, "input_ids", "attention_mask"))
  kd_img, kd_txt = _encode(model, variables, _images(case, "kd_pixel_values"),
                           *_tokens(case, "kd_input_ids", "kd_attention_mask"))
  revised = model.apply(variables, img, kd_img, kd_txt, method=flair.TwoTower.revise)
  total, parts = flair.keepfit_loss(img, txt, kd_img, kd_txt, revised, logit_scale,
                                    jnp.asarray(case.inputs["target"]), jnp.asarray(case.inputs["kd_target"]))
  lpt = parts["logits_per_text"]
  return {"img_embeds": img, "text_embeds": txt, "logits_per_text": lpt, "loss_clip": parts["clip"],
          "kd_img_embeds": kd_img, "kd_text_embeds": kd_txt, "kd_logits_per_text": parts["kd_logits_per_text"],
          "kd_loss_clip": parts["kd_clip"], "kd_embed": revised, "kd_norm_loss": parts["revision_mse"],
          "total_loss": total, "probs": _softmax(np.asarray(lpt).T),
          "logit_scale_after": flair.clamp_logit_scale(logit_scale)}


@parity.register("lxirich/MM-Retinal", "MultiHeadAttention")
def keepfit_attention(case: parity.Case) -> dict:
  """KeepFIT's ``MultiHeadAttention(**constructor)(queries, keys, values)`` with upstream's dim-0 softmax."""
  ctor = case.constructor
  module = flair.MultiHeadAttention(num_hiddens=int(ctor["num_hiddens"]), num_heads=int(ctor["num_heads"]),
                                    dropout=float(ctor.get("dropout", 0.0)), use_bias=bool(ctor.get("bias", False)),
                                    softmax_over_heads=True)
  q, k, v = (jnp.asarray(case.inputs[n].astype(np.float32)) for n in ("queries", "keys", "values"))
  target = convert.variables_shape(module, q, k, v)
  variables = convert.convert_state_dict(case.weights, target, source=case.path)
  y, weights = module.apply(variables, q, k, v)
  b, h, nq, nk = weights.shape
  return {"y": y, "attention_weights": np.asarray(weights).reshape(b * h, nq, nk)}


@parity.register("jusiro/FLAIR", "FLAIRModel.preprocess_image")
def flair_preprocess_image(case: parity.Case) -> dict:
  """``FLAIRModel.preprocess_image(image)``: HWC 0..255 → (1, C, S, S) NCHW."""
  size = int(case.constructor.get("image_size", 512))
  out = imaging.flair_preprocess(case.inputs["image"], image_size=size)
  return {"image_out": np.transpose(out, (2, 0, 1))[None]}


# ------------------------------------------------------------------------------------ train steps


def _contrastive_config(case: parity.Case, knowledge: bool):
  """The contrastive trainer's config for a FLAIR/KeepFIT train-step fixture (``meta.json``)."""
  meta = case.meta
  opt = meta["optimizer"]
  hp = opt["hyper_parameters"]
  spec = dict(next(iter(case.constructor["vision_backbone"].values())))
  c = configlib.contrastive_config("flair", steps=1)
  c.seed = int(meta.get("seed", 0))
  c.dtype = "float32"
  c.batch_size = int(case.inputs["pixel_values"].shape[0])
  c.data.image_size = int(case.inputs["pixel_values"].shape[-1])
  c.text.update(tokenizer="embedded", pretrained_dir="", max_length=int(case.inputs["input_ids"].shape[1]))
  c.text.bert = dict(meta["bert_config"])
  c.model.vision.update(block=spec["block"], layers=list(spec["layers"]),
                        width_per_group=int(spec.get("width_per_group", 64)), base_width=int(spec["base_width"]))
  c.model.update(proj_dim=int(case.constructor["proj_dim"]), proj_bias=bool(case.constructor.get("proj_bias", False)),
                 projection=bool(case.constructor.get("projection", True)),
                 norm_features=bool(case.constructor.get("norm_features", True)),
                 logit_scale_init=float(case.constructor.get("logit_scale_init_value", 0.07)),
                 attention_heads=2,
                 attention_dropout=0.0,  # the fixture sets KeepFIT's attention dropout to 0 (driver_patches)
                 softmax_over_heads=True,  # upstream's dim-less F.softmax
                 text_pooling="all_positions")
  weights = meta.get("loss_weights", {})
  c.knowledge.update(enabled=knowledge, weight=float(weights.get("kd_norm_mse", 100.0)), targets="identity")
  c.loss.contrastive_scope = "global"
  clip = opt.get("grad_clip") or {}
  c.optimizer.update(name="adamw", weight_decay=float(hp["weight_decay"]), b1=float(hp["betas"][0]),
                     b2=float(hp["betas"][1]), eps=float(hp["eps"]), grad_clip=float(clip.get("max_norm") or 0.0))
  # fit() steps LinearWarmupCosineAnnealingLR per iteration with len(loader) iterations per epoch.
  c.schedule.update(name="flair_warmup_cosine", lr=float(opt["base_lr"]), warmup_epochs=float(opt["warmup_epoch"]),
                    max_epochs=100.0, eta_min=0.0)
  c.num_train_examples = int(opt["len_loader"]) * c.batch_size
  return c


def _contrastive_train_step(case: parity.Case, knowledge: bool) -> dict:
  import jax

  config = _contrastive_config(case, knowledge)
  task = contrastive.ContrastiveTask(config, parity.one_device_mesh(), config.num_train_examples)
  placement: dict = {}
  image_shape = (1,) + tuple(parity.nchw_to_nhwc(case.inputs["pixel_values"]).shape[1:])
  variables = flair.from_torch(case.weights, task.model, image_shape=image_shape, source=case.path,
                               placement=placement)
  state = parity.start_state(case, task, variables)
  inputs = {"images": _images(case, "pixel_values"), "target": jnp.asarray(case.inputs["target"])}
  inputs["input_ids"], inputs["attention_mask"] = _tokens(case, "input_ids", "attention_mask")
  if knowledge:
    inputs["kd_images"] = _images(case, "kd_pixel_values")
    inputs["kd_input_ids"], inputs["kd_attention_mask"] = _tokens(case, "kd_input_ids", "kd_attention_mask")
    inputs["kd_target"] = jnp.asarray(case.inputs["kd_target"])
  new_state, metrics, grads = jax.jit(task.step_on_inputs)(state, inputs, jax.random.key(0))
  terms = {"clip": metrics["loss_main"]}
  if knowledge:
    terms.update(kd_clip=metrics["loss_kd"], kd_norm_mse=metrics["loss_revision"])
  return parity.train_step_outputs(case, placement, grads=grads, params=new_state.params,
                                   batch_stats=new_state.batch_stats, loss=metrics["loss"], terms=terms,
                                   extra={"clip/total_norm": metrics["grad_norm"]})


@parity.register("lxirich/MM-Retinal", "KeepFITModel.fit")
def keepfit_train_step(case: parity.Case) -> dict:
  """One ``KeepFITModel.fit`` iteration through the contrastive trainer's own step."""
  return _contrastive_train_step(case, knowledge=True)


@parity.register("jusiro/FLAIR", "FLAIRModel.fit")
def flair_train_step(case: parity.Case) -> dict:
  """One ``FLAIRModel.fit`` iteration through the contrastive trainer's own step."""
  return _contrastive_train_step(case, knowledge=False)

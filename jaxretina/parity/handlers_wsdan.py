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
from jaxretina.models import attention_augment, convert, wsdan
from jaxretina.configlib import classification_config
from jaxretina.losses import wsdan as wsdan_losses
from jaxretina.train import classification

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
  torch_path = convert.flax_path_to_torch(path)
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


# ------------------------------------------------------------------------------------ train steps

# Fixture draws (``rng/*``, upstream's torch/numpy/python draws inside the step) → the names under
# which the WS-DAN classifier takes injected draws (``WSDANClassifier.INJECTABLE_DRAWS``).
_STEP_DRAWS = {"rng/fake_att_raw": "fake_attention_raw", "rng/k_index_raw": "pick_indices_raw",
               "rng/theta_crop": "crop_thetas", "rng/theta_drop": "drop_thetas",
               "rng/fake_att_aug": "fake_attention_aug", "rng/k_index_aug": "pick_indices_aug"}
# Fixture ``loss/<term>`` → the trainer's metric.
_STEP_TERMS = {"cls_coarse": "loss_cls_coarse", "cls_fine": "loss_cls_fine", "cls_aux": "loss_cls_aux",
               "att": "loss_alignment", "div": "loss_diversity", "aux_raw": "loss_auxiliary",
               "ce_raw": "loss_ce_raw", "ce_aux": "loss_ce_aux", "ce_aug": "loss_ce_aug", "center": "loss_center"}
# upstream adjust_learning() without config.lr_decay_*: lr·0.9^((epoch + i/len(loader)) / 2).
_FALLBACK_DECAY_RATE, _FALLBACK_DECAY_EPOCHS = 0.9, 2.0


def _patched_number(case: parity.Case, pattern: str, what: str) -> float:
  """A number the fixture's ``driver_patches`` state (e.g. the stand-in loader's length)."""
  import re

  for line in case.meta.get("driver_patches", []):
    found = re.search(pattern, line)
    if found:
      return float(found.group(1))
  raise ValueError(f"{case.path}: meta.driver_patches do not give {what} (pattern {pattern!r})")


def _check_weights(case: parity.Case, given: dict, expected: dict) -> None:
  """The fixture's term weights must be the ones the trainer's losses hard-code."""
  bad = {k: (given.get(k), w) for k, w in expected.items() if not np.isclose(float(given.get(k, np.nan)), w)}
  if bad:
    raise ValueError(f"{case.path}: loss weights (fixture, trainer) differ: {bad}")


def _wsdan_step_config(case: parity.Case, variant: str):
  """The classification trainer's config for a DualAttendMed / CAL ``train`` fixture (``meta.json``).

  Upstream's accidents that the step reproduces are switched on here (defaults: the paper's intent):
  picks with replacement, unclamped pick weights, crop boxes without the last mask row, CAL's
  last-write centre update and DualAttendMed's one batch-mean centre momentum.
  """
  import fractions
  import re

  meta, ctor = case.meta, case.constructor
  net, upstream_cfg, opt = ctor["WSDAN_CAL"], meta["config"], meta["optimizer"]
  hp = opt["hyper_parameters"]
  batch, _, height, width = case.inputs["x"].shape
  if height != width:
    raise ValueError(f"{case.path}: the trainer takes square images, x is {height}x{width}")
  c = classification_config("wsdan")
  c.seed = int(meta.get("seed", 0))
  c.batch_size = int(batch)
  c.data.num_classes = int(net["num_classes"])
  c.data.image_size = int(height)
  c.data.fields = "image:3"

  c.model.variant = variant
  c.model.num_attentions = int(net.get("M", 32))
  backbone = (ctor.get("backbone") or {}).get("models.resnet.ResNet")
  if backbone:
    if backbone.get("block") != "Bottleneck":
      raise ValueError(f"{case.path}: backbone block {backbone.get('block')!r}; WSDAN's ResNet is Bottleneck")
    c.model.backbone_layers = [int(n) for n in backbone["layers"]]
    c.model.backbone_base_width = int(fractions.Fraction(backbone.get("width_scale", "1")) * 64)
  else:
    c.model.backbone_layers = list(wsdan.BACKBONES[net.get("net", "resnet152")])
    c.model.backbone_base_width = 64
  features = c.model.backbone_base_width * 8 * 4
  if int(ctor.get("num_features", features)) != features:
    raise ValueError(f"{case.path}: num_features {ctor['num_features']} != backbone output width {features}")
  c.model.pick_with_replacement = True  # np.random.choice(M, 2, p=...) draws with replacement
  c.model.clamp_negative_attention_mass = False  # upstream's sqrt(sum + 1e-6) as is

  c.loss.center_beta = float(upstream_cfg["beta"])
  c.loss.share_batch_mean = variant == "dualattendmed"  # DualAttendMed: one batch-mean momentum
  c.loss.center_duplicate_labels = "last"  # CAL's feature_center[y] += ...: the last write wins
  c.loss.drop_last_mask_row = True  # upstream's exclusive box end at int(r_max + pad)
  c.loss.crop_theta = upstream_cfg["crop_theta"]
  c.loss.crop_padding = float(upstream_cfg["crop_padding_ratio"])
  c.loss.drop_theta = upstream_cfg["drop_theta"]
  weights = meta["loss_weights"]
  if variant == "dualattendmed":
    c.loss.lambdas = [float(weights["cls"]), float(weights["att"]), float(weights["div"])]
    c.loss.aux_weight = float(str(weights["aux"]).split("*")[0])
    clamp = re.search(r"max=([0-9.]+)", str(weights["aux"]))
    trainer_clamp = float(wsdan_losses.dualattendmed_aux_clamp(int(opt["epoch"])))
    if clamp and not np.isclose(float(clamp.group(1)), trainer_clamp):
      raise ValueError(f"{case.path}: the aux term is clamped at {clamp.group(1)}; the trainer clamps at "
                       f"{trainer_clamp} in epoch {opt['epoch']}")
    # Auxiliary_Loss_v2's own default margin is uninitialised memory; the fixture says which it used.
    c.loss.aux_margin = _patched_number(case, r"margin=\[([0-9.eE+-]+)\]", "the Auxiliary_Loss_v2 margin")
    _check_weights(case, weights["cls_parts"], wsdan_losses.DUALATTENDMED_CLS_WEIGHTS)
    if not np.isclose(float(upstream_cfg.get("diversity_margin", 0.1)), 0.1):
      raise ValueError(f"{case.path}: DiversityLoss margin {upstream_cfg['diversity_margin']}; the trainer uses 0.1")
  else:
    _check_weights(case, weights, wsdan_losses.CAL_LOSS_WEIGHTS)

  if "SGD" not in opt["name"] or float(hp.get("dampening", 0)) or hp.get("maximize"):
    raise ValueError(f"{case.path}: optimizer {opt['name']} {hp}; the trainer's sgd is torch SGD without dampening")
  c.optimizer.update(name="sgd", momentum=float(hp["momentum"]), nesterov=bool(hp.get("nesterov", False)),
                     weight_decay=float(hp.get("weight_decay", 0.0)),
                     grad_clip=float((opt.get("grad_clip") or {}).get("max_norm") or 0.0), frozen=[])
  if "lr_decay_factor" in upstream_cfg and "lr_decay_epochs" in upstream_cfg:
    c.schedule.update(name="epoch_step_decay", lr=float(opt["base_lr"]), gamma=float(upstream_cfg["lr_decay_factor"]),
                      every_epochs=float(upstream_cfg["lr_decay_epochs"]), continuous=False)
  else:
    c.schedule.update(name="epoch_step_decay", lr=float(opt["base_lr"]), gamma=_FALLBACK_DECAY_RATE,
                      every_epochs=_FALLBACK_DECAY_EPOCHS, continuous=True)
  c.epochs = int(opt["epoch"]) + 1
  return c


def _wsdan_train_step(case: parity.Case, variant: str) -> dict:
  """One upstream ``train`` iteration through the classification trainer's own step."""
  import jax

  config = _wsdan_step_config(case, variant)
  opt = case.meta["optimizer"]
  loader_len = int(opt.get("len_loader") or _patched_number(case, r"loader \(len (\d+)\)", "the loader length"))
  iteration = int(opt.get("iteration", 0))  # the fixture runs the epoch's first iteration
  labels = np.asarray(case.inputs["labels"])
  mesh = parity.one_device_mesh()
  # An epoch of loader_len batches, so that the trainer's epoch = step // steps_per_epoch.
  task = classification.ClassificationTask(config, mesh, np.resize(labels, loader_len * len(labels)))
  if task.steps_per_epoch != loader_len:
    raise ValueError(f"{case.path}: the trainer has {task.steps_per_epoch} steps per epoch, upstream {loader_len}")
  step = int(opt["epoch"]) * loader_len + iteration
  placement: dict = {}
  x = _nhwc(case.inputs["x"])
  variables = wsdan.from_torch(case.weights, task.classifier.module, input_shape=(1,) + x.shape[1:],
                               source=case.path, placement=placement)
  # Upstream builds a fresh SGD (no momentum buffer) and sets its lr from the epoch schedule: a fresh
  # optimizer state whose schedule counter is at the step (optax's sgd reads the lr at its own count).
  state = parity.start_state(case, task, variables, step=step,
                             system_state={"feature_centers": jnp.asarray(case.inputs["feature_center"], jnp.float32)})
  draws = {}
  for fixture_name, name in _STEP_DRAWS.items():
    if fixture_name in case.inputs:
      value = np.asarray(case.inputs[fixture_name])
      draws[name] = jnp.asarray(value, jnp.int32) if np.issubdtype(value.dtype, np.integer) else _nhwc(value)
  inputs = {task.classifier.field: x, "draws": draws}
  new_state, metrics, grads = jax.jit(task.step_on_inputs)(state, inputs, jnp.asarray(labels, jnp.int32),
                                                           jax.random.key(0))
  # Scalars in the fixture's shape: DualAttendMed's Auxiliary_Loss_v2 margin is a 1-element tensor,
  # so upstream's aux term and total loss have shape (1,).
  scalar = lambda name, value: np.reshape(np.asarray(value), case.outputs[name].shape)  # noqa: E731
  terms = {name.removeprefix("loss/"): scalar(name, metrics[_STEP_TERMS[name.removeprefix("loss/")]])
           for name in case.outputs if name.startswith("loss/") and name.removeprefix("loss/") in _STEP_TERMS}
  centers = new_state.system_state["feature_centers"]
  return parity.train_step_outputs(case, placement, grads=grads, params=new_state.params,
                                   batch_stats=new_state.batch_stats, loss=scalar("loss", metrics["loss"]),
                                   terms=terms, extra={"state_after/feature_center": centers})


@parity.register(DAM, "train")
def dualattendmed_train_step(case: parity.Case) -> dict:
  """One DualAttendMed ``train_distributed.train`` iteration through the classification trainer's step."""
  return _wsdan_train_step(case, "dualattendmed")


@parity.register(CAL, "train")
def cal_train_step(case: parity.Case) -> dict:
  """One CAL ``fgvc/train_distributed.train`` iteration through the classification trainer's step."""
  return _wsdan_train_step(case, "cal")

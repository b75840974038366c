"""The model-specific parts of the classification trainer, named by ``config.model.name``.

A *classifier* turns one batch of prepared inputs (a dict of normalised NHWC float images per
modality) into the training loss, and into evaluation logits; the trainer
(``jaxretina.train.classification``) owns everything else. Each one reproduces its upstream
training step (docs/systems.md):

* ``wsdan`` — DualAttendMed (default) or CAL (``model.variant='cal'``): raw pass → feature
  center update → attention crop (map 0) and drop (map 1) → one pass over [crop; drop] → the
  composite loss; evaluation averages the raw and attention-crop logits as upstream validates.
* ``crd_net`` — CRD-Net: two modalities, three heads, ``w·CE`` over the three.
* ``bira_net`` — BiRA-Net: the bilinear net (``model.variant='bira_net'``) or the coded RA-Net
  (``'ra_net'``), with the grading loss (``loss.name='grading'``) or plain CE.
* ``fcn_clip`` — FCN-CLIP + CBAM: frozen FLAIR image tower, FCN decoder, CBAM, focal loss
  (+ the gradient-free contrastive term when class prototypes are available).

Interface (duck-typed): ``fields`` (input names, in model order), ``module``,
``init(rng, inputs) -> (variables, extra)``, ``loss(variables, extra, inputs, labels, rng, epoch)
-> (loss, (metrics, batch_stats, extra))``, ``predict(variables, inputs) -> {'logits', ['attention']}``
and optionally ``cam_features(variables, inputs) -> (B, h, w, C)`` (attention-map IoU),
``torch_rename`` (upstream key renamer for ``config.init.checkpoint``), ``backbones()`` (param
path → torchvision-layout ResNet, for ``config.init.backbone``),
``prepare(image_size)`` (constants read once per start), ``load_pretrained(variables) -> variables``
(fresh starts) and ``set_training_labels(labels, num_classes)``.

``config.remat`` ('none' | 'blocks' | 'dots', ``resnet.ResNet.remat``) goes to every ResNet a
classifier trains: activation rematerialisation of its blocks, the parameters unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxretina import configlib
from jaxretina.losses import wsdan as wsdan_losses
from jaxretina.models import attention_augment, bira, crdnet, fcn_clip, resnet, wsdan
from jaxretina.models.layers import l2_normalize

CLASSIFIERS: dict[str, Callable[..., Any]] = {}


def register(name: str):
  def deco(cls):
    CLASSIFIERS[name] = cls
    return cls

  return deco


def build(config: ml_collections.ConfigDict, num_classes: int, channels: Mapping[str, int]):
  name = config.model.name
  if name not in CLASSIFIERS:
    raise ValueError(f"config.model.name={name!r}: expected one of {sorted(CLASSIFIERS)}")
  return CLASSIFIERS[name](config, num_classes, dict(channels))


def _accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels))


def _split_variables(variables: Mapping[str, Any]) -> tuple[Any, Any]:
  return variables["params"], variables.get("batch_stats", {})


def _with_stats(params, batch_stats) -> dict:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def _one_field(fields: Mapping[str, int], model: str) -> str:
  if len(fields) != 1:
    raise ValueError(f"{model} takes one image modality; config.data.fields names {len(fields)}: {sorted(fields)}")
  (name,) = fields
  return name


def _remat(config) -> str:
  # Configs saved before config.remat existed train without rematerialisation.
  return config.get("remat", "none")


def _backbone(cfg: Mapping[str, Any], dtype, remat: str = "none") -> resnet.ResNet:
  return resnet.ResNet(block=cfg.get("block", "bottleneck"), layers=tuple(cfg.get("layers", (3, 4, 6, 3))),
                       base_width=int(cfg.get("base_width", 64)), width_per_group=int(cfg.get("width_per_group", 64)),
                       num_classes=None, dtype=dtype, remat=remat)


# --------------------------------------------------------------------------------------------- WS-DAN


@register("wsdan")
class WSDANClassifier:
  """DualAttendMed / CAL on one image modality (docs/systems.md#dualattendmed, #cal).

  ``config.model``: ``variant`` ('dualattendmed' | 'cal'), ``backbone_layers`` (Bottleneck blocks per
  stage; ResNet-152 = [3, 8, 36, 3]), ``backbone_base_width``, ``num_attentions`` (M), the upstream
  flags ``pick_with_replacement`` and ``clamp_negative_attention_mass`` (see ``models/wsdan.py``).
  ``config.loss``: ``center_beta`` (0.05), ``share_batch_mean`` (DualAttendMed's center-update quirk,
  see ``wsdan.update_feature_centers``), ``lambdas`` (1.0, 0.5, 0.1), ``aux_weight`` (0.01),
  ``aux_margin`` (1.0), ``crop_theta``/``crop_padding``/``drop_theta`` (a float or a [low, high]
  range), ``eval_crop_theta``/``eval_crop_padding``, ``drop_last_mask_row`` (crop-box quirk),
  ``center_duplicate_labels`` ('mean', or upstream CAL's 'last', see ``wsdan.update_feature_centers``).

  The step's random numbers come from its key; a caller can inject any of them instead as
  ``inputs['draws'][name]`` (``INJECTABLE_DRAWS``), e.g. to replay upstream's torch/numpy draws
  (the parity fixtures). Metrics carry each loss term under ``loss_<upstream name>``.
  """

  # name → what it replaces. "raw": the pass on the batch; "aug": the pass on [crop; drop] (2B).
  INJECTABLE_DRAWS = {
      "fake_attention_raw": "(B,h,w,M) BAP counterfactual attention, raw pass",
      "pick_indices_raw": "(B,2) int [crop, drop] attention-map indices, raw pass",
      "crop_thetas": "(B,) crop threshold factors (when crop_theta is a range)",
      "drop_thetas": "(B,) drop threshold factors (when drop_theta is a range)",
      "fake_attention_aug": "(2B,h,w,M) BAP counterfactual attention, [crop; drop] pass",
      "pick_indices_aug": "(2B,2) int attention-map indices, [crop; drop] pass (unused by the loss)",
  }

  def __init__(self, config, num_classes: int, fields: Mapping[str, int]):
    self.field = _one_field(fields, "wsdan")
    self.fields = (self.field,)
    m, self.loss_cfg = config.model, config.loss
    self.variant = m.get("variant", "dualattendmed")
    self.num_classes = num_classes
    self.module = wsdan.WSDAN(
        num_classes=num_classes, num_attentions=int(m.get("num_attentions", 32)), variant=self.variant,
        backbone_layers=tuple(m.get("backbone_layers", wsdan.BACKBONES["resnet152"])),
        backbone_base_width=int(m.get("backbone_base_width", 64)),
        pick_with_replacement=bool(m.get("pick_with_replacement", False)),
        clamp_negative_attention_mass=bool(m.get("clamp_negative_attention_mass", True)),
        dtype=configlib.compute_dtype(config), remat=_remat(config))
    self.center_rule = "dualattendmed" if self.variant == "dualattendmed" else "wsdan"

  torch_rename = staticmethod(wsdan.torch_key_rename)  # upstream keys → the converter's naming rule

  def _theta(self, key: str, default):
    value = self.loss_cfg.get(key, default)
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else float(value)

  def init(self, rng, inputs):
    init_rng, center_rng, call_rng = jax.random.split(rng, 3)
    variables = self.module.init({"params": init_rng}, inputs[self.field], train=False)
    dim = self.module.num_attentions * self._channels(variables)
    centers = wsdan.init_feature_centers(self.num_classes, dim, self.center_rule, center_rng)
    del call_rng
    return variables, {"feature_centers": centers}

  def _channels(self, variables) -> int:
    return int(variables["params"]["attentions"]["kernel"].shape[-2])

  def _injected_draws(self, inputs) -> dict[str, jax.Array]:
    draws = dict(inputs.get("draws") or {})
    unknown = sorted(set(draws) - set(self.INJECTABLE_DRAWS))
    if unknown:
      raise ValueError(f"wsdan: unknown injected draws {unknown}; expected names among {sorted(self.INJECTABLE_DRAWS)}")
    return draws

  def loss(self, variables, extra, inputs, labels, rng, epoch):
    params, stats = _split_variables(variables)
    x = inputs[self.field]
    draws = self._injected_draws(inputs)
    k_raw, k_crop, k_drop, k_aug = jax.random.split(rng, 4)
    out, mutated = self.module.apply(_with_stats(params, stats), x, train=True, key=k_raw, mutable=["batch_stats"],
                                     fake_attention=draws.get("fake_attention_raw"),
                                     pick_indices=draws.get("pick_indices_raw"))
    centers = extra["feature_centers"]
    class_centers = l2_normalize(centers)[labels]  # upstream reads them before the update
    new_centers = wsdan.update_feature_centers(
        centers, out.feature_matrix, labels, beta=float(self.loss_cfg.get("center_beta", 0.05)),
        rule=self.center_rule, share_batch_mean=bool(self.loss_cfg.get("share_batch_mean", False)),
        duplicate_labels=self.loss_cfg.get("center_duplicate_labels", "mean"))
    maps = jax.lax.stop_gradient(out.attention_map)  # upstream augments under torch.no_grad()
    drop_last = bool(self.loss_cfg.get("drop_last_mask_row", False))
    crop = attention_augment.attention_crop(x, maps[..., 0], self._theta("crop_theta", 0.5),
                                            float(self.loss_cfg.get("crop_padding", 0.1)), key=k_crop,
                                            thetas=draws.get("crop_thetas"), drop_last_mask_row=drop_last)
    drop = attention_augment.attention_drop(x, maps[..., 1], self._theta("drop_theta", 0.5), key=k_drop,
                                            thetas=draws.get("drop_thetas"))
    aug, mutated = self.module.apply(_with_stats(params, mutated["batch_stats"]),
                                     jax.lax.stop_gradient(jnp.concatenate([crop, drop])), train=True, key=k_aug,
                                     mutable=["batch_stats"], fake_attention=draws.get("fake_attention_aug"),
                                     pick_indices=draws.get("pick_indices_aug"))
    metrics = {}
    if self.variant == "dualattendmed":
      terms = wsdan_losses.dualattendmed_classification_terms(out.logits, out.effect_logits, aug.logits,
                                                              aug.effect_logits, labels)
      cls = wsdan_losses.dualattendmed_classification_loss(out.logits, out.effect_logits, aug.logits,
                                                           aug.effect_logits, labels)
      align = wsdan_losses.attention_alignment_loss(out.attention_maps)
      diversity = wsdan_losses.diversity_loss(out.attention_maps)
      aux = wsdan_losses.auxiliary_loss_v2(out.feature_matrix, class_centers, self.module.num_attentions,
                                           margin=float(self.loss_cfg.get("aux_margin", 1.0)))
      total = wsdan_losses.dualattendmed_loss(
          cls, align, diversity, aux, epoch,
          lambdas=tuple(self.loss_cfg.get("lambdas", wsdan_losses.DUALATTENDMED_LAMBDAS)),
          aux_weight=float(self.loss_cfg.get("aux_weight", 0.01)))
      metrics.update(loss_classification=cls, loss_alignment=align, loss_diversity=diversity, loss_auxiliary=aux)
    else:
      terms = wsdan_losses.cal_classification_terms(out.logits, out.effect_logits, aug.logits, aug.effect_logits,
                                                    labels)
      terms["center"] = wsdan_losses.center_loss(out.feature_matrix, class_centers)
      total = wsdan_losses.cal_loss(out.logits, out.effect_logits, aug.logits, aug.effect_logits, labels,
                                    out.feature_matrix, class_centers)
    metrics.update({f"loss_{name}": value for name, value in terms.items()})
    metrics.update(accuracy=_accuracy(out.logits, labels),
                   accuracy_aug=_accuracy(aug.logits, jnp.concatenate([labels, labels])))
    return total, (metrics, mutated["batch_stats"], dict(extra, feature_centers=new_centers))

  def predict(self, variables, inputs):
    """Upstream validation: (p_raw + p_crop) / 2 with the crop from the mean attention map."""
    x = inputs[self.field]
    out = self.module.apply(variables, x, train=False)
    crop = attention_augment.attention_crop(x, out.attention_map[..., 0],
                                            float(self.loss_cfg.get("eval_crop_theta", 0.5)),
                                            float(self.loss_cfg.get("eval_crop_padding", 0.1)),
                                            drop_last_mask_row=bool(self.loss_cfg.get("drop_last_mask_row", False)))
    out_crop = self.module.apply(variables, crop, train=False)
    return {"logits": 0.5 * (out.logits + out_crop.logits), "logits_raw": out.logits,
            "attention": out.attention_map[..., 0]}

  def backbones(self) -> dict[tuple[str, ...], resnet.ResNet]:
    m = self.module
    return {("features",): resnet.ResNet(block="bottleneck", layers=tuple(m.backbone_layers), num_classes=None,
                                         base_width=m.backbone_base_width, last_stride=1, dtype=m.dtype)}

  def cam_features(self, variables, inputs):
    return self.module.apply(variables, inputs[self.field],
                             method=lambda m, x: m.features(x, train=False, stop_after="layer4"))


# --------------------------------------------------------------------------------------------- CRD-Net


@register("crd_net")
class CRDNetClassifier:
  """CRD-Net on two modalities (docs/systems.md#crd-net).

  ``config.data.fields`` names the two image fields in model order (x = fundus, y = OCT/FFA);
  ``config.model``: ``backbone_block``/``backbone_layers``/``backbone_base_width`` (ResNet-18:
  basic, [2, 2, 2, 2], 64), ``num_heads``, ``cross_dim`` (CMA width and Attention4D key width; 0 =
  upstream's 2× the tower channels), ``skip_stem_maxpool`` (upstream quirk, see
  ``models/crdnet.py``); ``config.loss.head_weights`` (1, 1, 1 upstream).
  """

  def __init__(self, config, num_classes: int, fields: Mapping[str, int]):
    if len(fields) != 2:
      raise ValueError(f"crd_net fuses exactly 2 image modalities; config.data.fields names {len(fields)}: "
                       f"{sorted(fields)}")
    self.fields = tuple(fields)
    m = config.model
    self.head_weights = tuple(float(w) for w in config.loss.get("head_weights", (1.0, 1.0, 1.0)))
    self.module = crdnet.CRDNet(num_classes=num_classes, in_channels=tuple(fields.values()),
                                backbone_block=m.get("backbone_block", "basic"),
                                backbone_layers=tuple(m.get("backbone_layers", (2, 2, 2, 2))),
                                backbone_base_width=int(m.get("backbone_base_width", 64)),
                                num_heads=int(m.get("num_heads", 4)),
                                cross_dim=int(m.get("cross_dim") or 0) or None,
                                skip_stem_maxpool=bool(m.get("skip_stem_maxpool", False)),
                                dtype=configlib.compute_dtype(config), remat=_remat(config))

  def _images(self, inputs):
    return tuple(inputs[f] for f in self.fields)

  def backbones(self) -> dict[tuple[str, ...], resnet.ResNet]:
    """The RGB towers (a grey tower's stem differs from torchvision's and starts from scratch)."""
    towers = {}
    for name, channels in zip(("backbone_x", "backbone_y"), self.module.in_channels):
      if channels == 3:
        towers[(name,)] = self.module._tower(None, 3)
    return towers

  def init(self, rng, inputs):
    return self.module.init({"params": rng}, *self._images(inputs), train=False), {}

  def loss(self, variables, extra, inputs, labels, rng, epoch):
    del rng, epoch
    outputs, mutated = self.module.apply(variables, *self._images(inputs), train=True, mutable=["batch_stats"])
    total = crdnet.crdnet_loss(outputs, labels, self.head_weights)
    out, out_x, out_y = outputs
    ce_out, ce_x, ce_y = crdnet.crdnet_loss_terms(outputs, labels)  # unweighted, for the logs
    metrics = {"accuracy": _accuracy(out, labels), f"accuracy_{self.fields[0]}": _accuracy(out_x, labels),
               f"accuracy_{self.fields[1]}": _accuracy(out_y, labels), "loss_fused": ce_out,
               f"loss_{self.fields[0]}": ce_x, f"loss_{self.fields[1]}": ce_y}
    return total, (metrics, mutated["batch_stats"], extra)

  def predict(self, variables, inputs):
    out, out_x, out_y = self.module.apply(variables, *self._images(inputs), train=False)
    return {"logits": out, f"logits_{self.fields[0]}": out_x, f"logits_{self.fields[1]}": out_y}


# --------------------------------------------------------------------------------------------- BiRA-Net


@register("bira_net")
class BiRAClassifier:
  """BiRA-Net (docs/systems.md#bira-net).

  ``config.model``: ``variant`` ('bira_net': the paper's bilinear net | 'ra_net': the coded RA-Net),
  ``backbone`` (ResNet fields: block, layers, base_width), ``dropout_rate`` and ``dense_width``
  (RA-Net head; 0.5 and 256 upstream), ``matmul_masking`` (upstream quirk, see ``models/bira.py``).

  ``config.loss.name``: 'grading' (default, the paper's grading loss, differentiable) or 'ce'
  (upstream quirk: plain cross-entropy on the log-probabilities, which is what upstream
  ``train()`` minimises, because its grading-loss line is commented out; CE on log-probabilities
  equals CE on the logits). ``config.loss.detach_loss`` reproduces upstream's ``InterclassLoss``
  as coded, a fresh leaf: the same value with no gradient at all, so nothing trains (for checking
  the value, never a recipe). Upstream's frozen parts are ``bira.upstream_frozen_patterns``.
  """

  def __init__(self, config, num_classes: int, fields: Mapping[str, int]):
    self.field = _one_field(fields, "bira_net")
    self.fields = (self.field,)
    m = config.model
    self.variant = m.get("variant", "bira_net")
    dtype = configlib.compute_dtype(config)
    backbone = _backbone(m.backbone, dtype, _remat(config))
    if self.variant == "bira_net":
      self.module = bira.BiRANet(backbone=backbone, num_classes=num_classes,
                                 matmul_masking=bool(m.get("matmul_masking", False)), dtype=dtype)
    elif self.variant == "ra_net":
      self.module = bira.KeNet(features=backbone, num_classes=num_classes,
                               dropout_rate=float(m.get("dropout_rate", 0.5)),
                               dense_width=int(m.get("dense_width", 256)),
                               matmul_masking=bool(m.get("matmul_masking", False)), dtype=dtype)
    else:
      raise ValueError(f"config.model.variant={self.variant!r}: expected 'bira_net' or 'ra_net'")
    self.loss_name = config.loss.get("name", "grading")
    if self.loss_name not in ("grading", "ce"):
      raise ValueError(f"config.loss.name={self.loss_name!r}: expected 'grading' or 'ce'")
    self.detach_loss = bool(config.loss.get("detach_loss", False))

  def init(self, rng, inputs):
    params_rng, dropout_rng = jax.random.split(rng)
    return self.module.init({"params": params_rng, "dropout": dropout_rng}, inputs[self.field], train=False), {}

  def backbones(self) -> dict[tuple[str, ...], resnet.ResNet]:
    if self.variant == "ra_net":
      return {("features",): self.module.features}
    return {("branch_1", "features"): self.module.backbone, ("branch_2", "features"): self.module.backbone}

  def _log_probs(self, outputs):
    # KeNet returns log-probabilities already; log_softmax is idempotent on them.
    return jax.nn.log_softmax(outputs.astype(jnp.float32), axis=-1)

  def loss(self, variables, extra, inputs, labels, rng, epoch):
    del epoch
    outputs, mutated = self.module.apply(variables, inputs[self.field], train=True, mutable=["batch_stats"],
                                         rngs={"dropout": rng})
    log_probs = self._log_probs(outputs)
    if self.loss_name == "grading":
      total = bira.interclass_loss(log_probs, labels, detach_loss=self.detach_loss)
    else:
      total = _cross_entropy(log_probs, labels)
    return total, ({"accuracy": _accuracy(log_probs, labels)}, mutated["batch_stats"], extra)

  def predict(self, variables, inputs):
    outputs, inter = self.module.apply(variables, inputs[self.field], train=False, mutable=["intermediates"])
    out = {"logits": self._log_probs(outputs)}
    maps = _sown(inter["intermediates"], "attention")  # RA-Net: one map; the bilinear net: one per branch
    if maps:
      out["attention"] = jnp.mean(jnp.stack([a[..., 0] for a in maps]), axis=0)
    return out


def _sown(tree: Mapping[str, Any], name: str) -> list[jax.Array]:
  """Every value sown under ``name`` anywhere in an ``intermediates`` tree."""
  found = []
  for key, value in tree.items():
    if key == name:
      found.extend(value)
    elif isinstance(value, Mapping):
      found.extend(_sown(value, name))
  return found


# --------------------------------------------------------------------------------------------- FCN-CLIP


@register("fcn_clip")
class FCNCLIPClassifier:
  """FCN-CLIP + CBAM on a frozen FLAIR image tower (docs/systems.md#fcn-clip).

  ``config.model``: ``vision`` (ResNet fields of the FLAIR tower), ``proj_dim``, ``use_fusion``,
  ``decoder_channels``, ``cbam_reduction`` (16), ``dropout_rate``, and the upstream quirks
  ``double_cbam_gating``, ``encoder_bn_batch_stats`` (see ``models/fcn_clip.py``). ``config.loss``:
  ``gamma`` (2), ``class_weights`` ('notebook': the notebook's rule on the training labels, 'none',
  or a list), ``pt_from_weighted_ce`` (quirk), ``focal_weight`` (0.7), ``temperature`` (0.2, the
  contrastive term's). ``config.init.flair_checkpoint``: a
  FLAIR/KeepFIT PyTorch checkpoint for the encoder (and the text tower for the contrastive term's
  class prototypes, ``config.data.class_prompts``). Train the encoder-frozen model with
  ``config.optimizer.frozen=['^vision_model/']``.
  """

  def __init__(self, config, num_classes: int, fields: Mapping[str, int]):
    self.field = _one_field(fields, "fcn_clip")
    self.fields = (self.field,)
    self.config = config
    m, self.loss_cfg = config.model, config.loss
    dtype = configlib.compute_dtype(config)
    self.module = fcn_clip.FCNCLIP(
        vision=_backbone(m.vision, dtype, _remat(config)), proj_dim=int(m.get("proj_dim", 512)),
        num_classes=num_classes,
        use_fusion=bool(m.get("use_fusion", False)), decoder_channels=tuple(m.get("decoder_channels", (512, 128))),
        cbam_reduction=int(m.get("cbam_reduction", 16)),
        dropout_rate=float(m.get("dropout_rate", 0.3)), double_cbam_gating=bool(m.get("double_cbam_gating", False)),
        encoder_bn_batch_stats=bool(m.get("encoder_bn_batch_stats", False)), dtype=dtype)
    self.class_weights = None  # set by the trainer from the training labels (set_training_labels)
    self.prototypes = None  # (K, proj_dim) text prototypes when a FLAIR checkpoint gives a text tower
    self.flair_variables = None

  def set_training_labels(self, labels: np.ndarray, num_classes: int) -> None:
    rule = self.loss_cfg.get("class_weights", "notebook")
    if rule in (None, "none", ""):
      self.class_weights = None
    elif rule == "notebook":
      self.class_weights = jnp.asarray(fcn_clip.compute_class_weights(labels, num_classes)[0])
    else:
      weights = np.asarray(rule, np.float32)
      if weights.shape != (num_classes,):
        raise ValueError(f"config.loss.class_weights: expected {num_classes} weights, got {list(rule)}")
      self.class_weights = jnp.asarray(weights)

  def init(self, rng, inputs):
    params_rng, dropout_rng = jax.random.split(rng)
    return self.module.init({"params": params_rng, "dropout": dropout_rng}, inputs[self.field], train=False), {}

  def prepare(self, image_size: int) -> None:
    """Reads ``config.init.flair_checkpoint`` once: encoder weights and the class prototypes.

    Runs on every start (fresh or resumed): the prototypes are a constant of the loss, not state.
    """
    init = self.config.get("init") or {}
    path = init.get("flair_checkpoint")
    if not path:
      return
    text_dir = init.get("text_dir")
    if not text_dir:
      raise ValueError("config.init.flair_checkpoint needs config.init.text_dir: the local Bio_ClinicalBERT "
                       "directory (config.json + vocab) the checkpoint's text tower was built with")
    from jaxretina.evaluators.zero_shot import class_prototypes
    from jaxretina.models import bert as bert_lib
    from jaxretina.models import flair
    from jaxretina.text.tokenizer import Tokenizer

    two_tower = flair.TwoTower(vision=self.module.vision, text=bert_lib.BertConfig.from_pretrained_dir(text_dir),
                               proj_dim=self.module.proj_dim)
    self.flair_variables = flair.load_flair_checkpoint(path, two_tower, image_shape=(1, image_size, image_size, 3))
    classes = list(self.loss_cfg.get("prototype_classes") or self.config.data.class_names)
    self.set_prototypes(class_prototypes(two_tower, self.flair_variables, Tokenizer.from_pretrained_dir(text_dir),
                                         classes, template=self.loss_cfg.get("prompt_template",
                                                                             "Fundus image showing [CLS]"),
                                         domain_knowledge=True))

  def set_prototypes(self, prototypes) -> None:
    """The contrastive term's class prototypes, (num_classes, proj_dim): a constant of the loss.

    ``prepare`` sets them from the FLAIR checkpoint's text tower; a caller holding text embeddings
    computed otherwise (the parity handler: prompts tokenised upstream) sets them here.
    """
    prototypes = jnp.asarray(prototypes, jnp.float32)
    if prototypes.shape != (self.module.num_classes, self.module.proj_dim):
      raise ValueError(f"FCN-CLIP class prototypes: expected ({self.module.num_classes}, {self.module.proj_dim}) "
                       f"(classes, proj_dim), got {prototypes.shape}")
    self.prototypes = prototypes

  def backbones(self) -> dict[tuple[str, ...], resnet.ResNet]:
    return {("vision_model", "model"): self.module.vision}

  def load_pretrained(self, variables):
    if getattr(self, "flair_variables", None) is None:
      return variables
    return fcn_clip.encoder_variables_from_flair(variables, self.flair_variables)

  def loss(self, variables, extra, inputs, labels, rng, epoch):
    del epoch
    (logits, z), mutated = self.module.apply(variables, inputs[self.field], train=True, mutable=["batch_stats"],
                                             rngs={"dropout": rng})
    focal = fcn_clip.focal_loss(logits, labels, self.class_weights, gamma=float(self.loss_cfg.get("gamma", 2.0)),
                                pt_from_weighted_ce=bool(self.loss_cfg.get("pt_from_weighted_ce", False)))
    metrics = {"loss_focal": focal, "accuracy": _accuracy(logits, labels)}
    weight = float(self.loss_cfg.get("focal_weight", fcn_clip.FOCAL_WEIGHT))
    # The notebook always trains alpha·focal (+ (1 − alpha)·contrastive): without prototypes the
    # focal term keeps its 0.7 weight (the contrastive term has no gradient either way).
    total = weight * focal
    if self.prototypes is not None:
      contrast = fcn_clip.contrastive_loss(
          z, self.prototypes, labels,
          temperature=float(self.loss_cfg.get("temperature", fcn_clip.CONTRASTIVE_TEMPERATURE)))
      total = total + (1.0 - weight) * contrast
      metrics["loss_contrastive"] = contrast
    return total, (metrics, mutated["batch_stats"], extra)

  def predict(self, variables, inputs):
    (logits, z), inter = self.module.apply(variables, inputs[self.field], train=False, mutable=["intermediates"])
    return {"logits": logits, "attention": _sown(inter["intermediates"], "spatial_attention")[0][..., 0],
            "embedding": z}

  def eval_loss(self, outputs, labels):
    """The notebook's validation loss per example (B,): the training loss's terms on ``predict``'s
    eval-mode outputs (the evaluator averages it; FCN-CLIP's ReduceLROnPlateau / early stopping
    monitor it)."""
    weight = float(self.loss_cfg.get("focal_weight", fcn_clip.FOCAL_WEIGHT))
    focal = fcn_clip.focal_loss(outputs["logits"], labels, self.class_weights,
                                gamma=float(self.loss_cfg.get("gamma", 2.0)), reduction="none",
                                pt_from_weighted_ce=bool(self.loss_cfg.get("pt_from_weighted_ce", False)))
    total = weight * focal
    if self.prototypes is not None:
      temperature = float(self.loss_cfg.get("temperature", fcn_clip.CONTRASTIVE_TEMPERATURE))

      def one(z, y):  # the batch-mean term of one example
        return fcn_clip.contrastive_loss(z[None], self.prototypes, y[None], temperature=temperature)

      total = total + (1.0 - weight) * jax.vmap(one)(outputs["embedding"], labels)
    return total

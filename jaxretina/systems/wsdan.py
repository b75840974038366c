"""DualAttendMed and CAL (WS-DAN with counterfactual attention): the training step, evaluation logits and
upstream-weight loading of ``config.model.name='wsdan'`` (docs/systems.md#dualattendmed, #cal)."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from jaxretina import configlib
from jaxretina.losses import wsdan as wsdan_losses
from jaxretina.models import attention_augment, resnet, wsdan
from jaxretina.models.layers import l2_normalize
from jaxretina.systems import base, model_fields


def model_config() -> ml_collections.ConfigDict:
  """``config.model``: the ``wsdan.WSDAN`` module's arguments (see ``models/wsdan.py``)."""
  return ml_collections.ConfigDict(dict(
      variant="dualattendmed",  # 'dualattendmed' | 'cal'
      num_attentions=32,  # M, the attention maps
      backbone_layers=tuple(wsdan.BACKBONES["resnet152"]),  # Bottleneck blocks per stage
      backbone_base_width=64,
      # Upstream quirks; the defaults are the intended behaviour.
      pick_with_replacement=False,
      clamp_negative_attention_mass=True,
  ))


def loss_config() -> ml_collections.ConfigDict:
  """``config.loss``: the training step's constants (DualAttendMed's defaults; CAL's are in
  configs/dual_attend_med.py:variant=cal)."""
  return ml_collections.ConfigDict(dict(
      center_beta=0.05,  # feature-centre momentum
      # DualAttendMed's centre-update quirk: the whole batch's mean moves every present class
      # (``wsdan.update_feature_centers``).
      share_batch_mean=False,
      center_duplicate_labels="mean",  # or upstream CAL's 'last' (``wsdan.update_feature_centers``)
      lambdas=list(wsdan_losses.DUALATTENDMED_LAMBDAS),  # classification, alignment, diversity weights
      aux_weight=0.01,  # DualAttendMed's auxiliary loss weight
      aux_margin=1.0,  # Auxiliary_Loss_v2's margin (upstream: an uninitialised torch.Tensor(1))
      # Attention crop / drop thresholds: a float, or a [low, high] range drawn per sample (CAL).
      crop_theta=configlib.any_type(0.5),
      crop_padding=0.1,
      drop_theta=configlib.any_type(0.5),
      eval_crop_theta=0.5,  # the evaluation crop (upstream validation)
      eval_crop_padding=0.1,
      drop_last_mask_row=False,  # upstream's crop boxes end one mask row early (quirk)
  ))


class WSDANClassifier(base.ClassificationSystem):
  """DualAttendMed / CAL on one image modality (docs/systems.md#dualattendmed, #cal).

  ``config.model`` and ``config.loss``: ``model_config`` and ``loss_config`` above.

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
    self.field = base.one_field(fields, "wsdan")
    self.fields = (self.field,)
    self.loss_cfg = config.loss
    self.variant = config.model.variant
    self.num_classes = num_classes
    self.module = wsdan.WSDAN(num_classes=num_classes, **model_fields(config.model),
                              dtype=configlib.compute_dtype(config), remat=config.remat)
    self.center_rule = "dualattendmed" if self.variant == "dualattendmed" else "wsdan"

  torch_rename = staticmethod(wsdan.torch_key_rename)  # upstream keys → the converter's naming rule

  def restore_system_state(self, checkpoint_extras, system_state, source: str):
    """An upstream CAL/DualAttendMed checkpoint's ``feature_center`` becomes the feature centers."""
    if "feature_center" not in checkpoint_extras:
      return system_state
    centers = checkpoint_extras["feature_center"]
    if centers.shape != tuple(system_state["feature_centers"].shape):
      raise ValueError(f"{source}: feature_center has shape {centers.shape}, this model's centers are "
                       f"{tuple(system_state['feature_centers'].shape)} (num_classes × M·C)")
    return dict(system_state, feature_centers=jax.device_put(centers, system_state["feature_centers"].sharding))

  def _theta(self, key: str):
    value = self.loss_cfg[key]
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

  def loss(self, variables, system_state, inputs, labels, rng, epoch):
    params, stats = base.split_variables(variables)
    x = inputs[self.field]
    draws = self._injected_draws(inputs)
    k_raw, k_crop, k_drop, k_aug = jax.random.split(rng, 4)
    out, mutated = self.module.apply(base.with_stats(params, stats), x, train=True, key=k_raw, mutable=["batch_stats"],
                                     fake_attention=draws.get("fake_attention_raw"),
                                     pick_indices=draws.get("pick_indices_raw"))
    centers = system_state["feature_centers"]
    class_centers = l2_normalize(centers)[labels]  # upstream reads them before the update
    new_centers = wsdan.update_feature_centers(
        centers, out.feature_matrix, labels, beta=float(self.loss_cfg.center_beta),
        rule=self.center_rule, share_batch_mean=bool(self.loss_cfg.share_batch_mean),
        duplicate_labels=self.loss_cfg.center_duplicate_labels)
    maps = jax.lax.stop_gradient(out.attention_map)  # upstream augments under torch.no_grad()
    drop_last = bool(self.loss_cfg.drop_last_mask_row)
    crop = attention_augment.attention_crop(x, maps[..., 0], self._theta("crop_theta"),
                                            float(self.loss_cfg.crop_padding), key=k_crop,
                                            thetas=draws.get("crop_thetas"), drop_last_mask_row=drop_last)
    drop = attention_augment.attention_drop(x, maps[..., 1], self._theta("drop_theta"), key=k_drop,
                                            thetas=draws.get("drop_thetas"))
    aug, mutated = self.module.apply(base.with_stats(params, mutated["batch_stats"]),
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
                                           margin=float(self.loss_cfg.aux_margin))
      total = wsdan_losses.dualattendmed_loss(
          cls, align, diversity, aux, epoch,
          lambdas=tuple(self.loss_cfg.lambdas), aux_weight=float(self.loss_cfg.aux_weight))
      metrics.update(loss_classification=cls, loss_alignment=align, loss_diversity=diversity, loss_auxiliary=aux)
    else:
      terms = wsdan_losses.cal_classification_terms(out.logits, out.effect_logits, aug.logits, aug.effect_logits,
                                                    labels)
      terms["center"] = wsdan_losses.center_loss(out.feature_matrix, class_centers)
      total = wsdan_losses.cal_loss(out.logits, out.effect_logits, aug.logits, aug.effect_logits, labels,
                                    out.feature_matrix, class_centers)
    metrics.update({f"loss_{name}": value for name, value in terms.items()})
    metrics.update(accuracy=base.accuracy(out.logits, labels),
                   accuracy_aug=base.accuracy(aug.logits, jnp.concatenate([labels, labels])))
    return total, (metrics, mutated["batch_stats"], dict(system_state, feature_centers=new_centers))

  def predict(self, variables, inputs):
    """Upstream validation: (p_raw + p_crop) / 2 with the crop from the mean attention map."""
    x = inputs[self.field]
    out = self.module.apply(variables, x, train=False)
    crop = attention_augment.attention_crop(x, out.attention_map[..., 0],
                                            float(self.loss_cfg.eval_crop_theta),
                                            float(self.loss_cfg.eval_crop_padding),
                                            drop_last_mask_row=bool(self.loss_cfg.drop_last_mask_row))
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


def build(config, num_classes: int, fields: Mapping[str, int]) -> WSDANClassifier:
  return WSDANClassifier(config, num_classes, fields)

"""FCN-CLIP + CBAM (``config.model.name='fcn_clip'``) on a frozen FLAIR image tower
(docs/systems.md#fcn-clip)."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxretina import configlib
from jaxretina.models import fcn_clip, resnet
from jaxretina.systems import base, model_fields
from jaxretina.evaluators.zero_shot import class_prototypes
from jaxretina.models import bert as bert_lib
from jaxretina.models import flair
from jaxretina.text.tokenizer import Tokenizer


def model_config() -> ml_collections.ConfigDict:
  """``config.model``: the ``fcn_clip.FCNCLIP`` module's arguments (see ``models/fcn_clip.py``)."""
  return ml_collections.ConfigDict(dict(
      vision=base.resnet_fields(),  # the FLAIR image tower (ResNet-50)
      proj_dim=512,  # FLAIR's projection width
      use_fusion=False,  # decode the fused layer2+layer3 map instead of layer3 alone
      decoder_channels=(512, 128),
      cbam_reduction=16,
      dropout_rate=0.3,  # the decoder's Dropout2d
      # Upstream quirks; the defaults are the intended behaviour.
      double_cbam_gating=False,
      encoder_bn_batch_stats=False,
  ))


def loss_config() -> ml_collections.ConfigDict:
  """``config.loss``: the notebook's focal + contrastive objective."""
  return ml_collections.ConfigDict(dict(
      gamma=2.0,  # the focal loss's focusing exponent
      # Focal-loss class weights: 'notebook' (the notebook's rule on the training labels), 'none', or
      # a list of one weight per class.
      class_weights=configlib.any_type("notebook"),
      pt_from_weighted_ce=False,  # upstream quirk: pt from the class-weighted CE
      focal_weight=fcn_clip.FOCAL_WEIGHT,  # alpha: alpha·focal + (1 − alpha)·contrastive
      temperature=fcn_clip.CONTRASTIVE_TEMPERATURE,  # the contrastive term's
      # The contrastive term's class prototypes: the FLAIR text tower's embedding of this prompt per
      # class name (empty prototype_classes: config.data.class_names).
      prompt_template="Fundus image showing [CLS]",
      prototype_classes=[],
  ))


def init_config() -> ml_collections.ConfigDict:
  """``config.init``: the FLAIR/KeepFIT PyTorch checkpoint of the encoder (and of the text tower that
  gives the class prototypes), with the local Bio_ClinicalBERT directory it was built with."""
  return ml_collections.ConfigDict(dict(flair_checkpoint="", text_dir=""))


class FCNCLIPClassifier(base.ClassificationSystem):
  """FCN-CLIP + CBAM on a frozen FLAIR image tower (docs/systems.md#fcn-clip).

  ``config.model``, ``config.loss`` and ``config.init``: ``model_config``, ``loss_config`` and
  ``init_config`` above. Train the encoder-frozen model with ``config.optimizer.frozen=['^vision_model/']``.
  """

  def __init__(self, config, num_classes: int, fields: Mapping[str, int]):
    self.field = base.one_field(fields, "fcn_clip")
    self.fields = (self.field,)
    self.config = config
    self.loss_cfg = config.loss
    dtype = configlib.compute_dtype(config)
    fields = model_fields(config.model)
    fields["vision"] = base.resnet_backbone(config.model.vision, dtype, config.remat)
    self.module = fcn_clip.FCNCLIP(num_classes=num_classes, **fields, dtype=dtype)
    self.class_weights = None  # set by the trainer from the training labels (set_training_labels)
    self.prototypes = None  # (K, proj_dim) text prototypes when a FLAIR checkpoint gives a text tower
    self.flair_variables = None

  def set_training_labels(self, labels: np.ndarray, num_classes: int) -> None:
    rule = self.loss_cfg.class_weights
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

  def sampling_class_weights(self, rule: str, labels: np.ndarray, num_classes: int) -> list[float]:
    """'fcn_clip_notebook': the notebook's sampler, per-sample weight (n_y + 1e-6)^-0.3, boosted."""
    if rule != "fcn_clip_notebook":
      return super().sampling_class_weights(rule, labels, num_classes)
    return fcn_clip.compute_class_weights(labels, num_classes)[0].tolist()

  def prepare(self, image_size: int) -> None:
    """Reads ``config.init.flair_checkpoint`` once: encoder weights and the class prototypes.

    Runs on every start (fresh or resumed): the prototypes are a constant of the loss, not state.
    """
    path, text_dir = self.config.init.flair_checkpoint, self.config.init.text_dir
    if not path:
      return
    if not text_dir:
      raise ValueError("config.init.flair_checkpoint needs config.init.text_dir: the local Bio_ClinicalBERT "
                       "directory (config.json + vocab) the checkpoint's text tower was built with")
    two_tower = flair.TwoTower(vision=self.module.vision, text=bert_lib.BertConfig.from_pretrained_dir(text_dir),
                               proj_dim=self.module.proj_dim)
    self.flair_variables = flair.load_flair_checkpoint(path, two_tower, image_shape=(1, image_size, image_size, 3))
    classes = list(self.loss_cfg.prototype_classes or self.config.data.class_names)
    self.set_prototypes(class_prototypes(two_tower, self.flair_variables, Tokenizer.from_pretrained_dir(text_dir),
                                         classes, template=self.loss_cfg.prompt_template, domain_knowledge=True))

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
    if self.flair_variables is None:
      return variables
    return fcn_clip.encoder_variables_from_flair(variables, self.flair_variables)

  def loss(self, variables, system_state, inputs, labels, rng, epoch):
    del epoch
    (logits, z), mutated = self.module.apply(variables, inputs[self.field], train=True, mutable=["batch_stats"],
                                             rngs={"dropout": rng})
    focal = fcn_clip.focal_loss(logits, labels, self.class_weights, gamma=float(self.loss_cfg.gamma),
                                pt_from_weighted_ce=bool(self.loss_cfg.pt_from_weighted_ce))
    metrics = {"loss_focal": focal, "accuracy": base.accuracy(logits, labels)}
    weight = float(self.loss_cfg.focal_weight)
    # The notebook always trains alpha·focal (+ (1 − alpha)·contrastive): without prototypes the
    # focal term keeps its 0.7 weight (the contrastive term has no gradient either way).
    total = weight * focal
    if self.prototypes is not None:
      contrast = fcn_clip.contrastive_loss(
          z, self.prototypes, labels,
          temperature=float(self.loss_cfg.temperature))
      total = total + (1.0 - weight) * contrast
      metrics["loss_contrastive"] = contrast
    return total, (metrics, mutated["batch_stats"], system_state)

  def predict(self, variables, inputs):
    (logits, z), inter = self.module.apply(variables, inputs[self.field], train=False, mutable=["intermediates"])
    return {"logits": logits, "attention": base.sown(inter["intermediates"], "spatial_attention")[0][..., 0],
            "embedding": z}

  def eval_loss(self, outputs, labels):
    """The notebook's validation loss per example (B,): the training loss's terms on ``predict``'s
    eval-mode outputs (the evaluator averages it; FCN-CLIP's ReduceLROnPlateau / early stopping
    monitor it)."""
    weight = float(self.loss_cfg.focal_weight)
    focal = fcn_clip.focal_loss(outputs["logits"], labels, self.class_weights,
                                gamma=float(self.loss_cfg.gamma), reduction="none",
                                pt_from_weighted_ce=bool(self.loss_cfg.pt_from_weighted_ce))
    total = weight * focal
    if self.prototypes is not None:
      temperature = float(self.loss_cfg.temperature)

      def one(z, y):  # the batch-mean term of one example
        return fcn_clip.contrastive_loss(z[None], self.prototypes, y[None], temperature=temperature)

      total = total + (1.0 - weight) * jax.vmap(one)(outputs["embedding"], labels)
    return total


def build(config, num_classes: int, fields: Mapping[str, int]) -> FCNCLIPClassifier:
  return FCNCLIPClassifier(config, num_classes, fields)

"""What every classification system provides, and the small helpers they share.

A *system* turns one batch of prepared inputs (a dict of normalised NHWC float images per modality)
into the training loss and into evaluation logits, and knows its upstream weights; the trainer
(``jaxretina.train.classification``) owns everything else and never asks which system it runs.
Each lives in ``jaxretina/systems/<config.model.name>.py`` with a ``build(config, num_classes,
fields)`` function (docs/architecture.md).

Required: ``fields`` (input names, in model order), ``module`` (the Flax model),
``init(rng, inputs) -> (variables, system_state)``, ``loss(variables, system_state, inputs, labels, rng, epoch)
-> (loss, (metrics, batch_stats, system_state))``, ``predict(variables, inputs) -> {'logits', ['attention']}``.
Optional capabilities, present only where the system has them: ``cam_features(variables, inputs)
-> (B, h, w, C)`` (attention-map IoU) and ``eval_loss`` (a validation loss for early stopping).
The hooks below have neutral defaults.

``config.remat`` ('none' | 'blocks' | 'dots', ``resnet.ResNet.remat``) goes to every ResNet a
system trains: activation rematerialisation of its blocks, the parameters unchanged.

A system module also declares the config fields it reads, with their defaults: ``model_config()``
(``config.model``), and where it has them ``loss_config()`` (``config.loss``) and ``init_config()``
(``config.init``: the weights it can start from). ``configlib.classification_config`` pulls them in
by ``config.model.name``; config files only override values.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxretina.models import resnet


class ClassificationSystem:
  """Neutral defaults of the optional hooks; a system overrides what it uses."""

  # Upstream state_dict key -> the converter's naming rule (``config.init.checkpoint``); None: as is.
  torch_rename = None

  def backbones(self) -> dict[tuple[str, ...], resnet.ResNet]:
    """Param path -> torchvision-layout ResNet that ``config.init.backbone`` initialises."""
    return {}

  def set_training_labels(self, labels: np.ndarray, num_classes: int) -> None:
    """Called once with the training split's labels (e.g. loss class weights from them)."""

  def prepare(self, image_size: int) -> None:
    """Called once per start with the model's input size (constants read from files)."""

  def load_pretrained(self, variables: Mapping[str, Any]) -> Mapping[str, Any]:
    """Fresh starts only: the system's own pretrained pieces (returns ``variables`` if none)."""
    return variables

  def sampling_class_weights(self, rule: str, labels: np.ndarray, num_classes: int) -> list[float]:
    """A named per-class sampling rule of this system (``config.data.sampling.class_weights``)."""
    raise ValueError(f"config.data.sampling.class_weights={rule!r}: expected None, a list of {num_classes} "
                     "weights, 'inverse_frequency' or a rule of the model's system")

  def restore_system_state(self, checkpoint_extras: Mapping[str, Any], system_state: Mapping[str, Any],
                           source: str) -> Mapping[str, Any]:
    """Non-parameter state taken from a converted upstream checkpoint (``config.init.checkpoint``)."""
    del checkpoint_extras, source
    return system_state


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels))


def split_variables(variables: Mapping[str, Any]) -> tuple[Any, Any]:
  return variables["params"], variables.get("batch_stats", {})


def with_stats(params, batch_stats) -> dict:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def one_field(fields: Mapping[str, int], model: str) -> str:
  if len(fields) != 1:
    raise ValueError(f"{model} takes one image modality; config.data.fields names {len(fields)}: {sorted(fields)}")
  (name,) = fields
  return name


def resnet_fields() -> ml_collections.ConfigDict:
  """The config fields of a torchvision-layout ResNet tower, defaults ResNet-50: ``block`` ('basic' |
  'bottleneck'), ``layers`` (blocks per stage), ``base_width`` (the stem's channels; 64 in
  torchvision), ``width_per_group`` (64: torchvision's ResNets; 128: the wide ones)."""
  return ml_collections.ConfigDict(dict(block="bottleneck", layers=(3, 4, 6, 3), base_width=64, width_per_group=64))


def resnet_backbone(cfg: ml_collections.ConfigDict, dtype, remat: str = "none") -> resnet.ResNet:
  """A classifier-less ResNet from a ``resnet_fields`` section of ``config.model``."""
  return resnet.ResNet(block=cfg.block, layers=tuple(cfg.layers), base_width=int(cfg.base_width),
                       width_per_group=int(cfg.width_per_group), num_classes=None, dtype=dtype, remat=remat)


def sown(tree: Mapping[str, Any], name: str) -> list[jax.Array]:
  """Every value sown under ``name`` anywhere in an ``intermediates`` tree."""
  found = []
  for key, value in tree.items():
    if key == name:
      found.extend(value)
    elif isinstance(value, Mapping):
      found.extend(sown(value, name))
  return found

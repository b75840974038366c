"""Train-step fixtures of classification systems, run through the classification trainer's own step.

The CRD-Net, BiRA-Net and FCN-CLIP train-step handlers build a ``config.task='classification'``
config from the fixture's ``meta.json`` (model fields per handler, the optimizer and learning rate
from ``meta.optimizer``, the frozen parameters from ``meta.frozen``/``meta.no_grad``), construct
``ClassificationTask`` without opening data, load ``weights.npz`` into a ``TrainState`` and run
``task.step_on_inputs`` — the step ``python -m jaxretina.main`` runs after ``prepare_inputs``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from jaxretina import parity
from jaxretina.configlib import classification_config
from jaxretina.systems import build_classification_system
from jaxretina.train.classification import ClassificationTask, parse_fields


def resnet_fields(backbone) -> dict:
  """The ``config.model`` ResNet fields (``systems.base.resnet_backbone``) of a ``resnet.ResNet``."""
  if backbone.groups != 1:
    raise ValueError(f"grouped ResNet convs (groups={backbone.groups}) are not configurable in the systems")
  return dict(block=backbone.block, layers=list(backbone.layers), base_width=int(backbone.base_width),
              width_per_group=int(backbone.width_per_group))


def optimizer_config(case: parity.Case, frozen: list[str]) -> dict:
  """``config.optimizer`` from ``meta.optimizer`` (torch SGD or AdamW, ``clip_grad_norm_``)."""
  opt = case.meta["optimizer"]
  name = opt["name"].rsplit(".", 1)[-1]
  hp = opt["hyper_parameters"]
  if hp.get("maximize"):
    raise ValueError(f"{case.path}: optimizer maximize=True is not supported")
  clip = opt.get("grad_clip") or {}
  if clip and float(clip.get("norm_type", 2.0)) != 2.0:
    raise ValueError(f"{case.path}: gradient clipping with norm_type {clip['norm_type']}; only the 2-norm is supported")
  common = dict(weight_decay=float(hp.get("weight_decay", 0.0)), grad_clip=float(clip.get("max_norm") or 0.0),
                frozen=list(frozen))
  if name == "SGD":
    if float(hp.get("dampening", 0.0)) != 0.0:
      raise ValueError(f"{case.path}: SGD dampening {hp['dampening']} is not supported (torch default 0)")
    return dict(name="sgd", momentum=float(hp.get("momentum", 0.0)), nesterov=bool(hp.get("nesterov", False)),
                **common)
  if name == "AdamW":
    if hp.get("amsgrad"):
      raise ValueError(f"{case.path}: AdamW amsgrad=True is not supported")
    betas = hp.get("betas", (0.9, 0.999))
    return dict(name="adamw", b1=float(betas[0]), b2=float(betas[1]), eps=float(hp.get("eps", 1e-8)), **common)
  raise ValueError(f"{case.path}: optimizer {opt['name']} is not supported (torch SGD or AdamW)")


def frozen_patterns(case: parity.Case, placement: Mapping[str, tuple[str, ...]], *,
                    outside_model: str | None = None) -> list[str]:
  """``config.optimizer.frozen`` patterns for the parameters ``meta.frozen``/``meta.no_grad`` list.

  Upstream skips them in the optimizer (``requires_grad=False``, or a ``.grad`` left None), so
  they get neither an update nor weight decay. Each one must have been placed in the model's
  params; ``outside_model`` matches the listed keys that have no counterpart in the trained model
  (e.g. FCN-CLIP's FLAIR text tower, which the classifier does not hold).
  """
  patterns = []
  for key in list(case.meta.get("frozen") or []) + list(case.meta.get("no_grad") or []):
    where = placement.get(key)
    if where is None:
      if outside_model and re.search(outside_model, key):
        continue
      raise ValueError(f"{case.path}: frozen/no-grad parameter {key} has no place in the model")
    if where[0] != "params":
      raise ValueError(f"{case.path}: frozen/no-grad {key} is not a parameter ({'/'.join(where)})")
    patterns.append("^" + re.escape("/".join(where[1:])) + "$")
  return sorted(set(patterns))


def base_config(case: parity.Case, model_name: str, *, fields: str, num_classes: int,
                image_size: int) -> ml_collections.ConfigDict:
  """A classification config with the fixture's batch, optimizer and constant learning rate.

  The handler fills ``config.model`` and ``config.loss``. Upstream's schedules (none, or
  ReduceLROnPlateau per epoch) leave the first step at the base rate; ``run_step`` checks it
  against ``meta.optimizer.lr_at_step``.
  """
  c = classification_config(model_name, steps=1)
  c.seed = int(case.meta.get("seed", 0))
  c.batch_size = int(case.inputs["labels"].shape[0])
  c.data.name = case.name
  c.data.fields = fields
  c.data.num_classes = int(num_classes)
  c.data.image_size = int(image_size)
  c.optimizer.update(optimizer_config(case, frozen=[]))  # build() adds meta.frozen once the weights are placed
  c.schedule.update(name="constant", lr=float(case.meta["optimizer"]["base_lr"]))
  return c


def build(case: parity.Case, config: ml_collections.ConfigDict,
          convert: Callable[[Any, dict], Mapping[str, Any]], *, outside_model: str | None = None):
  """``(task, variables, placement)``: ``weights.npz`` converted for the configured model, then
  ``ClassificationTask`` on one device without data (the fixture's labels as training labels),
  with ``meta.frozen``/``meta.no_grad`` as ``config.optimizer.frozen``.

  ``convert(module, placement)`` converts ``case.weights`` for the classifier's module, filling
  ``placement`` (torch key → Flax path).
  """
  module = build_classification_system(config, int(config.data.num_classes), parse_fields(config.data.fields)).module
  placement: dict = {}
  variables = convert(module, placement)
  config.optimizer.frozen = frozen_patterns(case, placement, outside_model=outside_model)
  mesh = parity.one_device_mesh()
  task = ClassificationTask(config, mesh, np.asarray(case.inputs["labels"], np.int64))
  return task, variables, placement


def run_step(case: parity.Case, task, variables: Mapping[str, Any], inputs: Mapping[str, Any]):
  """One ``task.step_on_inputs`` from ``variables`` → ``(new_state, metrics, grads before clipping)``.

  Fails when the configured learning rate differs from ``meta.optimizer.lr_at_step`` or when a
  frozen parameter moved.
  """
  state = parity.start_state(case, task, variables)
  params = state.params
  labels = jnp.asarray(np.asarray(case.inputs["labels"]).astype(np.int32))
  # The fixtures draw nothing inside the step (dropout off), so the model key is arbitrary.
  new_state, metrics, grads = jax.jit(task.step_on_inputs)(state, dict(inputs), labels, jax.random.PRNGKey(1))
  _check_frozen_unchanged(case, task.config.optimizer.frozen, params, new_state.params)
  return new_state, metrics, grads


def _check_frozen_unchanged(case: parity.Case, patterns: list[str], before: Any, after: Any) -> None:
  compiled = [re.compile(p) for p in patterns]
  flat_before = traverse_util.flatten_dict(dict(before), sep="/")
  flat_after = traverse_util.flatten_dict(dict(after), sep="/")
  moved = [path for path, value in flat_before.items()
           if any(c.search(path) for c in compiled) and not np.array_equal(np.asarray(value),
                                                                           np.asarray(flat_after[path]))]
  if moved:
    raise AssertionError(f"{case.path}: the optimizer changed frozen parameters {moved[:5]}")


def images(case: parity.Case, name: str) -> jnp.ndarray:
  """An NCHW fixture input as the trainer's NHWC float32 images."""
  return jnp.asarray(parity.nchw_to_nhwc(case.inputs[name]).astype(np.float32))

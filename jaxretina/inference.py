"""Trained models loaded for inference: jaxretina workdirs and released FLAIR/KeepFIT checkpoints.

``load_run`` rebuilds a model from a jaxretina workdir without opening any dataset;
``load_two_tower`` gives a two-tower model (a contrastive workdir or an upstream ``.pth``) with what
zero-shot scoring and the transfer protocol need around it (``zero_shot.TwoTowerRun``).

A workdir (``jaxretina.train.loop``) holds ``config.json`` and Orbax checkpoints under
``checkpoints/<step>/`` with the items ``state`` (the ``TrainState``) and ``data`` (iterator
state). ``load_run`` rebuilds the model from the config alone (the task classes would open the
training data) and restores only ``params`` and ``batch_stats`` of the chosen step, as host numpy
arrays: the optimizer state is never read, so a checkpoint written on a pod restores on a laptop.

  run = load_run("/runs/keepfit")           # latest step
  config, kind, model, variables = run      # kind: 'contrastive' (TwoTower) | 'classification' (classifier)
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxretina import configlib, fileio
from jaxretina.evaluators.zero_shot import TwoTowerRun, prompt_of
from jaxretina.models import bert as bert_lib
from jaxretina.models import convert, flair
from jaxretina.systems import build_classification_system
from jaxretina.systems import flair as two_tower
from jaxretina.text import prompts
from jaxretina.text.tokenizer import Tokenizer
from jaxretina.train import checkpoint, classification
from jaxretina.train.checkpoint import IncompatibleCheckpointError

KINDS = ("contrastive", "classification")
_COLLECTIONS = ("params", "batch_stats")


class Run(NamedTuple):
  """A restored run; unpacks as ``(config, kind, model, variables)``.

  ``model`` is a ``flair.TwoTower`` for ``kind='contrastive'`` and a classifier of
  ``jaxretina.systems`` (``.predict(variables, inputs)``) for ``'classification'``.
  ``variables`` holds ``params`` (and ``batch_stats`` where the model has BatchNorm) as numpy arrays.
  """

  config: ml_collections.ConfigDict
  kind: str
  model: Any
  variables: dict


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's ``config.json`` as a ConfigDict, over the declared defaults (``configlib.with_defaults``:
  a field declared after the run was trained reads as its default)."""
  path = fileio.join(workdir, "config.json")
  if not fileio.isfile(path):
    raise FileNotFoundError(f"{workdir}: no config.json — not a jaxretina workdir (a training run writes "
                            "config.json and checkpoints/ there)")
  try:
    fields = json.loads(fileio.read_text(path))
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: unreadable config ({type(e).__name__}: {e})") from None
  if not isinstance(fields, dict) or fields.get("task") not in KINDS:
    raise ValueError(f"{path}: config.task={fields.get('task') if isinstance(fields, dict) else None!r}; "
                     f"expected one of {KINDS}")
  return configlib.with_defaults(fields)


# The checkpoints of the run, and the one of its best epoch-end evaluation (config.early_stopping.keep_best).
CHECKPOINT_DIRS = {False: "checkpoints", True: "checkpoints_best"}


def checkpoint_steps(workdir: str, best: bool = False) -> list[int]:
  """Finalised checkpoint steps in ``workdir/checkpoints`` (``checkpoints_best`` with ``best``;
  Orbax's temporary directories excluded)."""
  root = fileio.join(workdir, CHECKPOINT_DIRS[bool(best)])
  if not fileio.isdir(root):
    return []
  return sorted(int(name) for name in fileio.listdir(root)
                if name.isdigit() and fileio.isdir(fileio.join(root, name, "state")))


def build_model(config: ml_collections.ConfigDict) -> tuple[Any, dict]:
  """The run's model and the abstract variables it initialises (``jax.ShapeDtypeStruct`` leaves)."""
  rng = jax.random.PRNGKey(0)
  if config.task == "contrastive":
    tokenizer = two_tower.build_tokenizer(config.text)
    model = two_tower.build_model(config, two_tower.build_text_config(config.text, tokenizer))
    s, length = int(config.data.image_size), int(config.text.max_length)
    images = jnp.zeros((1, s, s, 3), jnp.float32)
    ids = jnp.zeros((1, length), jnp.int32)
    abstract = jax.eval_shape(lambda: model.init({"params": rng, "dropout": rng}, images, ids, jnp.ones_like(ids)))
    return model, abstract
  fields = classification.parse_fields(config.data.fields)
  classifier = build_classification_system(config, int(config.data.num_classes), fields)
  s = classification.input_size(config.data)  # the crop when the run crops (config.data.crop_size)
  inputs = {name: jnp.zeros((1, s, s, ch), jnp.float32) for name, ch in fields.items()}
  abstract = jax.eval_shape(lambda: classifier.init(rng, inputs)[0])
  return classifier, abstract


def restore_variables(state_dir: str, abstract: dict) -> dict:
  """``params``/``batch_stats`` of the Orbax ``state`` item at ``state_dir`` as numpy arrays.

  Only these two collections are read (Orbax partial restore); their tree must equal ``abstract``'s
  in paths and shapes, else ``IncompatibleCheckpointError`` lists the differences.
  """
  import orbax.checkpoint as ocp

  checkpointer = ocp.PyTreeCheckpointer()
  try:
    meta = checkpointer.metadata(state_dir).item_metadata
  except Exception as e:  # noqa: BLE001 - any unreadable metadata: name the directory
    raise IncompatibleCheckpointError(f"cannot read the checkpoint metadata at {state_dir}: "
                                      f"{type(e).__name__}: {e}") from None
  stored = meta.tree if hasattr(meta, "tree") else meta
  wanted = {c: abstract[c] for c in _COLLECTIONS if jax.tree.leaves(abstract.get(c, {}))}
  present = {c: stored[c] for c in wanted if c in stored}
  _check_same_shapes(wanted, present, state_dir)
  item = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), present)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), present)
  restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                         partial_restore=True))
  return {c: jax.tree.map(lambda a, t: np.asarray(a, t.dtype), restored[c], wanted[c]) for c in wanted}


def _check_same_shapes(wanted: dict, stored: dict, where: str) -> None:
  problems = checkpoint.shape_mismatches(wanted, stored, model="the model config.json builds",
                                         builder="config.json builds")
  if problems:
    raise IncompatibleCheckpointError(f"the checkpoint {where} does not match the model of its config.json "
                                      f"({len(problems)} differing leaves):\n  {checkpoint._head(problems)}")


def load_run(workdir: str, step: int | None = None, *, best: bool = False) -> Run:
  """Rebuilds ``workdir``'s model from its ``config.json`` and restores the weights of ``step``.

  Args:
    workdir: a training run's directory (``config.json`` + ``checkpoints/``).
    step: checkpoint step; None = the latest.
    best: read ``checkpoints_best/`` instead: the state of the best epoch-end evaluation of a run with
      ``config.early_stopping`` (upstream's best-validation checkpoint).
  Returns:
    ``Run(config, kind, model, variables)`` (see ``Run``).
  """
  workdir = os.fspath(workdir)
  if not fileio.isdir(workdir):
    raise FileNotFoundError(f"{workdir}: no such directory (expected a jaxretina workdir)")
  config = load_config(workdir)
  steps = checkpoint_steps(workdir, best)
  folder = CHECKPOINT_DIRS[bool(best)]
  if not steps:
    raise FileNotFoundError(f"{workdir}: no checkpoint under {os.path.join(workdir, folder)} (the run "
                            "has not saved a step yet" + (", or has no config.early_stopping)" if best else ")"))
  if step is None:
    step = steps[-1]
  elif int(step) not in steps:
    raise FileNotFoundError(f"{workdir}: no checkpoint for step {step}; saved steps: {steps}")
  model, abstract = build_model(config)
  state_dir = fileio.join(fileio.absolute(workdir), folder, str(int(step)), "state")
  variables = restore_variables(state_dir, abstract)
  return Run(config=config, kind=str(config.task), model=model, variables=variables)


# ------------------------------------------------------------------------------------- two-tower models
FLAIR_IMAGE_SIZE = 512
FLAIR_MAX_TEXT_LENGTH = 77  # FLAIR's tokenizer; KeepFIT's is 256
KEEPFIT_MAX_TEXT_LENGTH = 256
UPSTREAM_EXTENSIONS = (".pth", ".pt", ".bin", ".safetensors", ".npz")


def load_two_tower(checkpoint: str, *, text_dir: str | None = None, step: int | None = None,
                   constructor: dict | None = None) -> TwoTowerRun:
  """A two-tower model from a jaxretina contrastive workdir or a released FLAIR/KeepFIT checkpoint.

  Args:
    checkpoint: a workdir of ``task='contrastive'``, or an upstream weights file (``.pth`` ...). Upstream
      files are recognised as KeepFIT by their ``attention.*`` keys, else FLAIR; a ``module.`` prefix
      (DistributedDataParallel) is stripped.
    text_dir: for upstream files, the local Bio_ClinicalBERT directory (config.json + vocabulary) the
      text tower was built with.
    step: workdir checkpoint step (default: the latest).
    constructor: for upstream files of another architecture than the released ResNet-50 / 512-d
      towers, upstream's ``FLAIRModel`` constructor kwargs (``flair.two_tower_from_constructor``).
  """
  if fileio.isdir(checkpoint):  # a workdir, local or gs://
    config = load_config(checkpoint)
    if config.task != "contrastive":
      raise ValueError(f"{checkpoint}: a {config.task} run ({config.model.name}); a two-tower "
                       "(task='contrastive') FLAIR/KeepFIT run is needed here")
    run = load_run(checkpoint, step)
    prompt, classes = prompt_of(run.config.evals)
    return TwoTowerRun(model=run.model, variables=run.variables,
                       tokenizer=two_tower.build_tokenizer(run.config.text),
                       max_length=int(run.config.text.max_length), prompt=prompt,
                       classes=classes, image_size=int(run.config.data.image_size),
                       source="workdir", description=f"two-tower run {checkpoint}")
  if not os.path.isfile(checkpoint):
    raise FileNotFoundError(f"checkpoint {checkpoint}: no such file or directory (expected a jaxretina workdir or "
                            "an upstream FLAIR/KeepFIT .pth)")
  if not checkpoint.lower().endswith(UPSTREAM_EXTENSIONS):
    raise ValueError(f"checkpoint {checkpoint}: expected a jaxretina workdir (a directory) or an upstream "
                     f"FLAIR/KeepFIT checkpoint ({', '.join(UPSTREAM_EXTENSIONS)})")
  if not text_dir:
    raise ValueError(f"checkpoint {checkpoint} is an upstream FLAIR/KeepFIT checkpoint: name the local "
                     "Bio_ClinicalBERT directory (config.json + vocab) its text tower was built with (text_dir)")
  if not os.path.isdir(text_dir):
    raise FileNotFoundError(f"text_dir {text_dir}: no such directory")
  state_dict = convert.load_torch_checkpoint(checkpoint)
  prefix = "module." if any(k.startswith("module.") for k in state_dict) else ""
  keepfit = any(k.startswith(prefix + "attention.") for k in state_dict)  # KeepFIT's knowledge attention
  model = flair.two_tower_from_constructor(dict(constructor or {}), bert_lib.BertConfig.from_pretrained_dir(text_dir),
                                           knowledge_attention=keepfit)
  variables = flair.from_torch(state_dict, model, prefix=prefix, source=checkpoint)
  prompt = dict(template=prompts.ZERO_SHOT_TEMPLATE, domain_knowledge=True, variant="keepfit" if keepfit else "flair")
  return TwoTowerRun(model=model, variables=jax.tree.map(np.asarray, variables),
                     tokenizer=Tokenizer.from_pretrained_dir(text_dir),
                     max_length=KEEPFIT_MAX_TEXT_LENGTH if keepfit else FLAIR_MAX_TEXT_LENGTH, prompt=prompt,
                     classes=[], image_size=int((constructor or {}).get("image_size", FLAIR_IMAGE_SIZE)),
                     source="upstream",
                     description=f"{'KeepFIT' if keepfit else 'FLAIR'} checkpoint {checkpoint}")

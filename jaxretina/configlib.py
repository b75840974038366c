"""Helpers for config files: argument parsing (big_vision's ``parse_arg``) and loading a sibling config."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``'paper,batch=64,data_dir=/x'`` into a ConfigDict with typed values.

  A bare word sets a boolean field to True (``paper`` → ``paper=True``). Values take the type of
  their default; unknown keys are an error naming the valid ones.
  """
  cfg = ml_collections.ConfigDict(defaults)
  if not arg:
    return cfg
  for part in arg.split(","):
    part = part.strip()
    if not part:
      continue
    key, _, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config argument {key!r} unknown; valid: {', '.join(sorted(defaults))}")
    if not _:
      cfg[key] = True
      continue
    default = defaults[key]
    if isinstance(default, bool):
      cfg[key] = value.lower() in ("1", "true", "yes", "on")
    elif isinstance(default, int):
      cfg[key] = int(value)
    elif isinstance(default, float):
      cfg[key] = float(value)
    else:
      cfg[key] = value
  return cfg


def load_config_module(path: str):
  """Imports a config file by path (config files are scripts, not a package)."""
  import importlib.util
  import os

  name = "jaxretina_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def default_data_dir() -> str:
  """Where datasets are built and read: ``$JAXRETINA_DATA_DIR`` or ``~/.cache/jaxretina/datasets``."""
  import os

  return os.environ.get("JAXRETINA_DATA_DIR", os.path.expanduser("~/.cache/jaxretina/datasets"))


def classification_config(model_name: str, *, steps: int = 0) -> ml_collections.ConfigDict:
  """The fields every classification config has (``task='classification'``), with neutral defaults.

  Each config file (``configs/dual_attend_med.py`` ...) fills in its model, data and recipe; the
  field meanings are documented in ``jaxretina.train.classification`` and ``...classifiers``.
  ``remat`` ('none' | 'blocks' | 'dots'): activation rematerialisation of the ResNet blocks.
  """
  c = ml_collections.ConfigDict()
  c.task = "classification"
  c.seed = 0
  c.mesh = "data:-1"  # axis:size list; e.g. --config.mesh=data:-1,fsdp:4
  # Run each step as K sequential microbatches (gradients summed; contrastive losses keep every
  # negative through GradCache); BatchNorm then normalises per microbatch.
  c.microbatches = 1
  c.dtype = "float32"  # compute dtype; 'bfloat16' on accelerators (params stay fp32)
  c.remat = "none"  # recompute each ResNet block in the backward pass: 'blocks' | 'dots' (less memory)
  c.distributed = dict(coordinator_address="", num_processes=0, process_id=-1)
  # fields: the image modalities in model order as 'name:channels,...' (CRD-Net: 'image:3,oct:1').
  # image_size: images are resized to image_size²; crop_size (0 = none): then cropped to crop_size² on
  # device, at random per sample for training and at the centre for evaluation / prediction.
  # mix.sources (none = off): [{name, split, builder_kwargs}, ...] whose records are concatenated in
  # that order and cut at random (mix.seed) into the named splits of mix.splits [[name, fraction], ...].
  # train_class_counts (none = off): the training split resampled cyclically to these per-class counts.
  c.data = ml_collections.ConfigDict(dict(
      name="", data_dir=default_data_dir(), builder_kwargs=None, build_if_missing=False, train_split="train",
      image_size=224, crop_size=0, fields="image:3", num_classes=0, class_names=[], label_subset=None,
      normalize="imagenet", sampling=dict(class_weights=None, samples_per_epoch=0), class_prompts=None,
      mix=dict(sources=[], splits=[], seed=0), train_class_counts=[]))
  c.model = ml_collections.ConfigDict(dict(name=model_name))
  c.loss = ml_collections.ConfigDict()
  c.augment = dict(hflip=0.5, rotation=0.0, resized_crop_scale=None, brightness=0.0, saturation=0.0)
  c.optimizer = ml_collections.ConfigDict(dict(name="sgd", momentum=0.9, weight_decay=0.0, grad_clip=0.0,
                                               frozen=[]))
  c.schedule = ml_collections.ConfigDict(dict(name="constant", lr=1e-3))
  c.init = ml_collections.ConfigDict(dict(checkpoint=""))
  c.batch_size = 32
  c.epochs = 1
  c.total_steps = steps
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.log_every = 20
  c.checkpoint_every = 500
  c.eval_every = 0
  # Evaluate at every N-th epoch end (0 = off); ReduceLROnPlateau and early stopping step on these
  # evaluations (jaxretina.train.plateau). metric '' = off; names are '<evaluator>/<metric>'.
  c.eval_every_epochs = 0
  c.reduce_on_plateau = ml_collections.ConfigDict(dict(
      metric="", mode="min", factor=0.1, patience=10, threshold=1e-4, threshold_mode="rel", cooldown=0,
      min_lr=0.0, eps=1e-8))
  c.early_stopping = ml_collections.ConfigDict(dict(metric="", mode="min", patience=0, min_delta=0.0,
                                                    keep_best=True))
  c.evals = ml_collections.ConfigDict(dict(classification=dict(
      type="classification", split="test", batch_size=64, heatmaps=8, cam_iou=False)))
  return c

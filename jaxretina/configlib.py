"""Helpers for config files: argument parsing (big_vision's ``parse_arg``) and loading a sibling config."""

from __future__ import annotations

import ml_collections
from jaxretina.data import synthetic
from jaxretina.text import prompts
from jaxretina.data import synthetic, synthetic_oct


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
  field meanings are documented in ``jaxretina.train.classification`` and ``jaxretina.systems``.
  ``remat`` ('none' | 'blocks' | 'dots'): activation rematerialisation of the ResNet blocks.
  """
  c = ml_collections.ConfigDict()
  c.task = "classification"
  c.seed = 0
  c.mesh = "data:-1"  # axis:size list; e.g. --config.mesh=data:-1,fsdp:4
  # Run each step as K sequential microbatches (gradients summed; contrastive losses keep every
  # negative through GradCache); BatchNorm then normalises per microbatch.
  c.microbatches = 1
  # > 0: the global batch is this × the devices of the mesh (config.batch_size is then not used), so
  # one command keeps the recipe's per-device batch on any number of GPUs/TPU chips.
  c.per_device_batch_size = 0
  c.dtype = "auto"  # activations: bfloat16 on GPU/TPU, float32 on CPU (configlib.compute_dtype); params stay fp32
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
  c.profile_steps = ""  # 'START,END': a jax.profiler trace of those steps under WORKDIR/profile
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


# Bio_ClinicalBERT's (bert-base-cased) vocabulary size: the paper-shaped text tower's embedding table.
PAPER_BERT_VOCAB_SIZE = 28996
# Captions of the synthetic paper-shaped runs are padded to this many tokens (FLAIR's model_max_length).
SYNTHETIC_CAPTION_TOKENS = 77


def synthetic_builder_kwargs(image_size, *, num_train: int = 512, num_test: int = 64,
                             num_expert: int | None = 64) -> dict:
  """TFDS builder kwargs of a generated dataset at ``image_size`` px (built once, cached in data_dir).

  ``image_size`` may be a reference to ``config.data.image_size``, so that ``--config.data.image_size``
  generates the images at the new size too."""
  kwargs = dict(image_size=image_size, num_train=num_train, num_test=num_test)
  if num_expert is not None:
    kwargs["num_expert"] = num_expert
  return kwargs


def use_synthetic_pretraining_data(c: ml_collections.ConfigDict) -> None:
  """``:paper,synthetic=True`` for the two-tower configs: the paper's towers (ResNet-50 and a BERT-base
  text tower with Bio_ClinicalBERT's 28,996-entry embedding table, trained from scratch), resolution,
  batch and optimiser, on generated retina images and captions. Nothing is downloaded: the captions are
  tokenised with the embedded vocabulary, whose ids all fall inside the table."""
  c.data.name = "synthetic_retina"
  c.data.builder_kwargs = synthetic_builder_kwargs(c.data.get_ref("image_size"))
  c.data.build_if_missing = True
  c.data.category_names = list(synthetic.CATEGORY_NAMES)
  c.data.banned_categories = list(prompts.BANNED_CATEGORIES)
  c.kd.name = ""  # the generated dataset's own expert split
  c.kd.split = "expert"
  c.text.tokenizer = "embedded"
  c.text.pretrained_dir = ""
  c.text.bert = dict(vocab_size=PAPER_BERT_VOCAB_SIZE)
  c.text.max_length = SYNTHETIC_CAPTION_TOKENS
  c.evals = dict(zero_shot=dict(type="zero_shot", split="test", classes=list(synthetic.ZERO_SHOT_CLASSES),
                                template="A fundus photograph of [CLS]", domain_knowledge=True, variant="flair",
                                batch_size=64))


def use_synthetic_classification_data(c: ml_collections.ConfigDict, *, builder: str = "synthetic_retina") -> None:
  """``:paper,synthetic=True`` for the classification configs: the paper's model, resolution, batch and
  optimiser on generated images (nothing downloaded). The labels are the first ``data.num_classes``
  generated classes; dataset mixes, per-class resampling and validation splits of the paper's data
  are dropped (the generated data has a train and a test split)."""
  names = synthetic_oct.CLASS_NAMES if builder == "synthetic_fundus_oct" else synthetic.CLASS_NAMES
  num_classes = int(c.data.num_classes)
  if not 0 < num_classes <= len(names):
    raise ValueError(f"config.data.num_classes={num_classes}: the {builder} data has {len(names)} classes")
  c.data.name = builder
  c.data.builder_kwargs = synthetic_builder_kwargs(
      c.data.get_ref("image_size"), num_expert=None if builder == "synthetic_fundus_oct" else 0)
  c.data.build_if_missing = True
  c.data.class_names = list(names[:num_classes])
  c.data.label_subset = list(range(num_classes)) if num_classes < len(names) else None
  c.data.mix = dict(sources=[], splits=[], seed=0)
  c.data.train_class_counts = []
  dropped = [name for name in c.evals if c.evals[name].get("split", "test") != "test"]
  for name in dropped:
    del c.evals[name]
  kept = next(iter(c.evals), None)
  for monitor in (c.reduce_on_plateau, c.early_stopping):
    evaluator, _, metric = monitor.metric.partition("/")
    if evaluator in dropped and kept is not None:
      monitor.metric = f"{kept}/{metric}"  # e.g. FCN-CLIP's validation loss -> the test split's


def require_paper(arg: ml_collections.ConfigDict, config_file: str) -> None:
  if not arg.paper:
    raise ValueError(f"{config_file}: synthetic=True runs the paper's model on generated data; spell it "
                     f"configs/{config_file}:paper,synthetic=True")


def compute_dtype(config: ml_collections.ConfigDict):
  """``config.dtype``: the activations' dtype (parameters and optimiser state stay float32).

  'auto' (the default) is bfloat16 on GPUs and TPUs, where it is the fast path and numerically
  standard for these models, and float32 on CPUs, where the parity fixtures are checked; 'float32' or
  'bfloat16' force one.
  """
  import jax
  import jax.numpy as jnp

  name = str(config.get("dtype", "auto"))
  if name == "auto":
    return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32)
  if name not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"config.dtype={name!r}: expected 'auto', 'float32' or 'bfloat16'")
  return jnp.dtype(name)

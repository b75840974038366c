"""Config fields and their defaults, declared once, and helpers for config files.

The fields every config of a task kind has are declared here (``classification_config``,
``contrastive_config``), those of a system in its module (``jaxretina/systems/<name>.py``:
``model_config()``, ``loss_config()``, ``init_config()``), each with its default and meaning; config
files only override values. ``with_defaults`` reads a saved config over the same declarations.
Also: argument parsing (big_vision's ``parse_arg``) and loading a sibling config.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from jaxretina import systems
from jaxretina.data import synthetic, synthetic_oct
from jaxretina.text import prompts


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


def any_type(value) -> ml_collections.FieldReference:
  """A config field that takes values of more than one type (a float or a [low, high] range, a rule
  name or a list of weights): a ConfigDict field otherwise refuses a value of another type than its
  default's."""
  return ml_collections.FieldReference(value, field_type=object)


def _run_config(task: str, model_name: str, steps: int) -> ml_collections.ConfigDict:
  """The fields of every config, whatever its task kind, and the sections the system ``model_name``
  declares (``model``, ``loss``, ``init``: ``systems.declared_config``)."""
  c = ml_collections.ConfigDict()
  c.task = task  # 'classification' | 'contrastive': the trainer (jaxretina.train.loop.get_task)
  c.seed = 0
  c.mesh = "data:-1"  # axis:size list; e.g. --config.mesh=data:-1,fsdp:4
  # Run each step as K sequential microbatches (gradients summed; contrastive losses keep every
  # negative through GradCache); BatchNorm then normalises per microbatch.
  c.microbatches = 1
  # > 0: the global batch is this × the devices of the mesh (config.batch_size is then not used), so
  # one command keeps the recipe's per-device batch on any number of GPUs/TPU chips.
  c.per_device_batch_size = 0
  c.dtype = "auto"  # activations: bfloat16 on GPU/TPU, float32 on CPU (configlib.compute_dtype); params stay fp32
  # Recompute in the backward pass (less activation memory for one more forward pass): 'blocks' each
  # ResNet block and BERT layer, 'dots' all but the conv/Dense outputs; 'none' keeps everything.
  c.remat = "none"
  # jax.distributed.initialize arguments; unset (the defaults) they come from the environment.
  c.distributed = dict(coordinator_address="", num_processes=0, process_id=-1)
  c.update(systems.declared_config(model_name))
  # train/optim.py: name 'sgd' (momentum, nesterov) | 'adamw' (b1, b2, eps); weight_decay (decoupled
  # for adamw, added to the gradient for sgd, as torch); grad_clip (global norm; 0 = off).
  c.optimizer = dict(name="sgd", weight_decay=0.0, grad_clip=0.0, momentum=0.9, nesterov=False, b1=0.9, b2=0.999,
                     eps=1e-8)
  # train/optim.py SCHEDULES: 'constant'; 'warmup_cosine' (warmup_steps, to eta_min over the run);
  # 'flair_warmup_cosine' (warmup_epochs, cosine over max_epochs to eta_min, stepped per iteration);
  # 'epoch_step_decay' (lr·gamma^⌊epoch / every_epochs⌋; continuous: without the floor).
  c.schedule = dict(name="constant", lr=1e-3, warmup_steps=0, warmup_epochs=1.0, max_epochs=100.0, eta_min=0.0,
                    gamma=1.0, every_epochs=1.0, continuous=False)
  c.batch_size = 32  # the global batch (see per_device_batch_size)
  c.epochs = 1
  c.total_steps = steps  # > 0: train this many steps instead of the epochs'
  c.keep_checkpoints = 3
  c.async_checkpointing = True
  c.log_every = 20
  c.profile_steps = ""  # 'START,END': a jax.profiler trace of those steps under WORKDIR/profile
  c.checkpoint_every = 500
  c.eval_every = 0  # evaluate every N steps (0: at the end only)
  # Evaluate at every N-th epoch end too (0 = off); the classification task's ReduceLROnPlateau and
  # early stopping step on these evaluations (jaxretina.train.plateau).
  c.eval_every_epochs = 0
  # name -> the evaluator's own fields (evaluators/common.py EVALUATOR_TYPES by 'type').
  c.evals = ml_collections.ConfigDict()
  return c


def augment_config(overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """``config.augment`` of the classification task (``train.classification.augment``): the on-device
  train-time transforms, each off at its value here, with ``overrides`` (a whole or partial
  ``config.augment``) over them."""
  def chain():
    return dict(
        resized_crop_scale=None,  # [low, high]: torchvision's RandomResizedCrop back to the input size
        hflip=0.0,  # flip probability
        rotation=0.0,  # degrees d of a rotation U(−d, d) about the centre, zeros outside
        brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,  # ColorJitter amounts
        affine_degrees=0.0, affine_translate=0.0, affine_scale=(1.0, 1.0),  # RandomAffine without shear
        erasing=0.0, erasing_scale=(0.02, 0.33), erasing_ratio=(0.3, 3.3),  # RandomErasing(p, scale, ratio)
        order=None,  # the transforms' order; None: train.classification.AUGMENT_OPS
    )

  c = ml_collections.ConfigDict(chain())
  # Samples whose label is in ``labels`` get this chain instead of the main one (FCN-CLIP's
  # "minority" transform).
  c.class_conditional = dict(labels=[], **chain())
  # Upstream quirk (FCN-CLIP): the notebook's three subsets share one dataset object, so its transforms
  # also run on validation and test, chosen by the true label. False (the intent): evaluation is
  # deterministic; True reproduces it.
  c.augment_eval_splits = False
  if overrides:
    c.update(overrides)
  return c


def classification_config(model_name: str, *, steps: int = 0) -> ml_collections.ConfigDict:
  """The fields every classification config has (``task='classification'``), with neutral defaults.

  Each config file (``configs/dual_attend_med.py`` ...) overrides its model, data and recipe values;
  ``config.model``, ``config.loss`` and part of ``config.init`` are declared by the system
  ``jaxretina/systems/<model_name>.py``.
  """
  c = _run_config("classification", model_name, steps)
  # fields: the image modalities in model order as 'name:channels,...' (CRD-Net: 'image:3,oct:1').
  # image_size: images are resized to image_size²; crop_size (0 = none): then cropped to crop_size² on
  # device, at random per sample for training and at the centre for evaluation / prediction.
  # label_subset (none = all): the dataset labels kept, in the order of the model's classes.
  # normalize: train.classification.NORMALIZATIONS. sampling: class_weights none (shuffled epochs), a
  # list (one weight per class, with replacement), 'inverse_frequency' or a rule of the system;
  # samples_per_epoch (0 = the split size).
  # mix.sources (none = off): [{name, split, builder_kwargs}, ...] whose records are concatenated in
  # that order and cut at random (mix.seed) into the named splits of mix.splits [[name, fraction], ...].
  # train_class_counts (none = off): the training split resampled cyclically to these per-class counts.
  c.data = ml_collections.ConfigDict(dict(
      name="", data_dir=default_data_dir(), builder_kwargs=None, build_if_missing=False, train_split="train",
      image_size=224, crop_size=0, fields="image:3", num_classes=0, class_names=[], label_subset=None,
      normalize="imagenet", sampling=dict(class_weights=any_type(None), samples_per_epoch=0), class_prompts=None,
      mix=dict(sources=[], splits=[], seed=0), train_class_counts=[]))
  c.augment = augment_config(dict(hflip=0.5))
  c.optimizer.frozen = []  # regexes of '/'-joined parameter paths that get no update
  # checkpoint: an upstream PyTorch checkpoint of the whole model; backbone: torchvision ResNet
  # weights for every RGB backbone of the system (its ``backbones()``). Fresh starts only.
  c.init.update(checkpoint="", backbone="")
  # ReduceLROnPlateau and early stopping on the epoch-end evaluations (config.eval_every_epochs;
  # jaxretina.train.plateau). metric '' = off; names are '<evaluator>/<metric>'.
  c.reduce_on_plateau = ml_collections.ConfigDict(dict(
      metric="", mode="min", factor=0.1, patience=10, threshold=1e-4, threshold_mode="rel", cooldown=0,
      min_lr=0.0, eps=1e-8))
  c.early_stopping = ml_collections.ConfigDict(dict(metric="", mode="min", patience=0, min_delta=0.0,
                                                    keep_best=True))
  c.evals = ml_collections.ConfigDict(dict(classification=dict(
      type="classification", split="test", batch_size=64, heatmaps=8, cam_iou=False)))
  return c


# config.augment.recipe of the contrastive task: FLAIR's pretraining augmentation, or none.
CONTRASTIVE_AUGMENT_RECIPES = ("flair", "none")


def contrastive_config(model_name: str = "flair", *, steps: int = 0) -> ml_collections.ConfigDict:
  """The fields every contrastive (image–text pretraining) config has (``task='contrastive'``).

  ``configs/keepfit.py`` and ``configs/flair.py`` override the recipe values; ``config.model`` and
  ``config.loss`` are declared by the two-tower system ``jaxretina/systems/<model_name>.py``.
  """
  c = _run_config("contrastive", model_name, steps)
  # category_names: every category an example can carry (empty: categories are identified by a
  # stable hash of their name). caption_template / augment_description: how the prompts are made
  # from the categories (text/prompts.py). banned_categories: samples carrying one are dropped,
  # matched 'exact' or as a 'substring'. balance: sample dataset i mod K, then a record in it (FLAIR).
  c.data = ml_collections.ConfigDict(dict(
      name="", data_dir=default_data_dir(), builder_kwargs=None, build_if_missing=False, train_split="train",
      image_size=512, category_names=[], caption_template="A [ATR] fundus photograph of [CLS]",
      augment_description=True, banned_categories=[], banned_match="substring", balance=False))
  # tokenizer: 'embedded' (the shipped retina vocabulary) or a local HF directory; pretrained_dir: a
  # local HF BERT directory (config.json + weights), '' = the text tower from bert's fields
  # (BertConfig's, vocabulary size and padding id from the tokenizer) trained from scratch.
  c.text = ml_collections.ConfigDict(dict(tokenizer="embedded", pretrained_dir="", max_length=77,
                                          bert=ml_collections.ConfigDict()))
  # KeepFIT's expert-knowledge stream (off: FLAIR's objective): image–caption pairs of the dataset
  # ``name`` ('' = config.data.name) split ``split``; each step adds their contrastive loss (``targets``
  # 'identity', or the pairs' category co-occurrence) and ``weight`` × the MSE of the expert revision.
  c.knowledge = ml_collections.ConfigDict(dict(enabled=False, split="expert", use_caption=True, targets="identity",
                                               weight=100.0, name="", data_dir="", builder_kwargs=None))
  # checkpoint: a whole FLAIR/KeepFIT PyTorch checkpoint; vision_checkpoint: torchvision ResNet weights
  # for the image tower; text_pretrained: a local HF BERT directory for the text tower. Fresh starts only.
  c.init.update(checkpoint="", vision_checkpoint="", text_pretrained="")
  c.optimizer.name = "adamw"
  c.schedule.name = "flair_warmup_cosine"
  c.augment = dict(recipe="flair")  # one of CONTRASTIVE_AUGMENT_RECIPES, on the main stream's images
  c.start_epoch = 0  # the run continues one of this many epochs: it trains epochs − start_epoch epochs
  return c


# Config fields whose entries are not declared (each holds its own keys): a saved value replaces the
# default as a whole instead of being merged into it.
OPEN_FIELDS = ("evals", "data.builder_kwargs", "text.bert", "knowledge.builder_kwargs")

_DEFAULTS_OF_TASK = {"classification": classification_config, "contrastive": contrastive_config}


def with_defaults(fields: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A saved config (``config.json``'s fields) merged over the declared defaults of its task and model.

  A workdir's config.json written before a field was declared lacks it; every reader of a saved config
  (resume's config guard, ``inference.load_config``) goes through here, so that it reads as the
  config that trained the run: the field at its declared default. Fields the defaults do not have are
  kept; ``OPEN_FIELDS`` are taken whole.
  """
  fields = dict(fields)
  task = fields.get("task")
  if task not in _DEFAULTS_OF_TASK:
    raise ValueError(f"config.task={task!r}: expected one of {sorted(_DEFAULTS_OF_TASK)}")
  if task == "contrastive" and isinstance(fields.get("augment"), str):
    fields["augment"] = {"recipe": fields["augment"]}  # saved before config.augment was a ConfigDict
  if task == "contrastive" and "kd" in fields and "knowledge" not in fields:
    fields["knowledge"] = fields.pop("kd")  # saved before config.kd was named config.knowledge
  model = dict(fields.get("model") or {})
  config = _DEFAULTS_OF_TASK[task](model["name"]) if "name" in model else _DEFAULTS_OF_TASK[task]()
  _override(config, fields)
  return config


def _override(config: ml_collections.ConfigDict, fields: Mapping[str, Any], prefix: str = "") -> None:
  for key, value in fields.items():
    path = prefix + key
    if isinstance(value, Mapping) and key in config and isinstance(config[key], ml_collections.ConfigDict) \
        and path not in OPEN_FIELDS:
      _override(config[key], value, path + ".")
      continue
    try:
      config[key] = value
    except TypeError as e:  # a saved value of another type than the declared default's
      raise ValueError(f"config.{path}={value!r}: {e}") from None


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
  c.knowledge.name = ""  # the generated dataset's own expert split
  c.knowledge.split = "expert"
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
  c.data.mix.update(sources=[], splits=[], seed=0)
  c.data.train_class_counts = []
  dropped = [name for name in c.evals if c.evals[name].split != "test"]
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

  name = str(config.dtype)
  if name == "auto":
    return jnp.dtype(jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32)
  if name not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"config.dtype={name!r}: expected 'auto', 'float32' or 'bfloat16'")
  return jnp.dtype(name)

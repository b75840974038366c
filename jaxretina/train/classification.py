"""Supervised classification: DualAttendMed / CAL, CRD-Net, BiRA-Net and FCN-CLIP through one trainer.

The task bundle the loop (``jaxretina.train.loop``) runs for ``config.task='classification'``. It
owns the data (one or several image modalities per example, label subsets, class-weighted
sampling), on-device augmentation and normalisation, the optimizer (with frozen parameter groups)
and evaluation; the model's forward/loss/prediction is the *classifier* named by
``config.model.name`` (``jaxretina.systems``).

One step: images (uint8, resized to ``config.data.image_size`` by the pipeline) → [0, 1] → random
crop to ``config.data.crop_size`` when set (evaluation: the centre crop) → augmentation per modality
(independent draws, as upstream's per-modality transforms; ``config.augment.class_conditional``
swaps the chain by label) → normalisation → ``classifier.loss`` → optimizer update. BatchNorm
statistics are computed over the global batch (SyncBN-like; CAL trains with SyncBN).

Data beyond one dataset split: ``config.data.mix`` (several TFDS splits concatenated, then split
at random by fraction) and ``config.data.train_class_counts`` (cyclic per-class resampling of the
training split). Per-epoch ReduceLROnPlateau and early stopping: ``config.reduce_on_plateau`` /
``config.early_stopping`` with ``config.eval_every_epochs`` (``jaxretina.train.plateau``; the loop
calls ``after_evaluation`` after each epoch's evaluation).

The config fields and their defaults are declared in ``configlib.classification_config`` and in the
system's module (``jaxretina/systems/<config.model.name>.py``).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from jaxretina import configlib
from jaxretina.data import augment as augment_lib
from jaxretina.evaluators import common as evaluators_lib
from jaxretina.systems import build_classification_system
from jaxretina.train import distributed, microbatch, optim, plateau
from jaxretina.train.state import TaskBase, TrainState
from jaxretina.data import pipeline
from jaxretina import datasets
from jaxretina.models import convert, resnet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BIRA_PIXEL_MEAN = (109.97, 127.34, 123.88)  # BiRA-Net: input = 255·x − mean (no division)
NORMALIZATIONS = ("imagenet", "unit", "bira_pixel_mean")


def normalize(images: jax.Array, mode: str) -> jax.Array:
  """(B, H, W, C) in [0, 1] → model input. Grey (C = 1) images use the mean of the RGB constants."""
  channels = images.shape[-1]

  def const(values):
    v = jnp.asarray(values, jnp.float32)
    return v if channels == 3 else jnp.mean(v, keepdims=True)

  if mode == "imagenet":
    return (images - const(IMAGENET_MEAN)) / const(IMAGENET_STD)
  if mode == "unit":
    return images
  if mode == "bira_pixel_mean":
    return images * 255.0 - const(BIRA_PIXEL_MEAN)
  raise ValueError(f"config.data.normalize={mode!r}: expected one of {NORMALIZATIONS}")


def adjust_saturation(images: jax.Array, factor: jax.Array) -> jax.Array:
  """torchvision ``adjust_saturation``: blend with the grey image, clip to [0, 1]. images (B,H,W,3), factor (B,)."""
  grey = images @ jnp.asarray((0.299, 0.587, 0.114), images.dtype)
  f = factor[:, None, None, None]
  return jnp.clip(f * images + (1.0 - f) * grey[..., None], 0.0, 1.0)


def normalization_zero(mode: str, channels: int) -> tuple[float, ...]:
  """The [0, 1] pixel value that ``normalize(·, mode)`` maps to 0, per channel.

  torchvision's ``RandomErasing`` runs after ``Normalize`` and fills with 0; erasing before the
  normalisation with this value gives the same input.
  """
  if mode == "imagenet":
    values = IMAGENET_MEAN
  elif mode == "unit":
    values = (0.0, 0.0, 0.0)
  elif mode == "bira_pixel_mean":
    values = tuple(v / 255.0 for v in BIRA_PIXEL_MEAN)
  else:
    raise ValueError(f"config.data.normalize={mode!r}: expected one of {NORMALIZATIONS}")
  return tuple(values) if channels == 3 else (float(np.mean(values)),)


# The transforms ``augment`` knows, in their default order (``config.augment.order`` changes it).
AUGMENT_OPS = ("resized_crop", "hflip", "rotation", "color_jitter", "affine", "erasing")


def color_jitter(key: jax.Array, images: jax.Array, brightness: float = 0.0, contrast: float = 0.0,
                 saturation: float = 0.0, hue: float = 0.0) -> jax.Array:
  """torchvision ``ColorJitter`` per sample, (B, H, W, C) in [0, 1].

  Factors b, c, s ~ U(max(0, 1 − a), 1 + a), hue shift ~ U(−h, h); the active adjustments run in a
  random order drawn per sample (torchvision draws ``randperm(4)`` per image). Contrast blends with
  the image's mean grey level, saturation with its grey image; saturation and hue leave grey images
  unchanged. Float arithmetic throughout (torchvision on PIL images rounds to uint8 between steps).
  """
  batch = images.shape[0]
  rgb = images.shape[-1] == 3
  k_order, k_b, k_c, k_s, k_h = jax.random.split(key, 5)
  uniform = lambda k, low, high: jax.random.uniform(k, (batch,), jnp.float32, low, high)  # noqa: E731
  ops = []
  if brightness > 0:
    f = uniform(k_b, max(0.0, 1.0 - brightness), 1.0 + brightness)
    ops.append(lambda x, f=f: jnp.clip(x * f[:, None, None, None], 0.0, 1.0))
  if contrast > 0:
    f = uniform(k_c, max(0.0, 1.0 - contrast), 1.0 + contrast)
    ops.append(lambda x, f=f: jax.vmap(augment_lib.adjust_contrast)(x, f))
  if saturation > 0 and rgb:
    f = uniform(k_s, max(0.0, 1.0 - saturation), 1.0 + saturation)
    ops.append(lambda x, f=f: adjust_saturation(x, f))
  if hue > 0 and rgb:
    if hue > 0.5:
      raise ValueError(f"color_jitter: hue={hue} must lie in [0, 0.5] (torchvision's range)")
    f = uniform(k_h, -hue, hue)
    ops.append(lambda x, f=f: augment_lib.adjust_hue(x, f))
  if len(ops) == 1:
    return ops[0](images)
  # A uniform random permutation of the active adjustments per sample; position by position, each
  # sample takes the adjustment its permutation puts there.
  order = jnp.argsort(jax.random.uniform(k_order, (batch, len(ops))), axis=1)
  for position in range(len(ops)):
    out = images
    for j, op in enumerate(ops):
      out = jnp.where((order[:, position] == j)[:, None, None, None], op(images), out)
    images = out
  return images


def _has_affine(cfg: ml_collections.ConfigDict) -> bool:
  scale = tuple(float(v) for v in cfg.affine_scale)
  return bool(cfg.affine_degrees or cfg.affine_translate or scale != (1.0, 1.0))


def _augment_chain(key: jax.Array, images: jax.Array, cfg: ml_collections.ConfigDict, erase_value) -> jax.Array:
  order = list(cfg.order or AUGMENT_OPS)
  unknown = [op for op in order if op not in AUGMENT_OPS]
  if unknown or len(set(order)) != len(order):
    raise ValueError(f"config.augment.order={order}: expected distinct names among {AUGMENT_OPS}")
  keys = dict(zip(AUGMENT_OPS, jax.random.split(key, len(AUGMENT_OPS))))
  batch = images.shape[0]
  for op in order:
    k = keys[op]
    if op == "resized_crop" and cfg.resized_crop_scale:
      scale = tuple(float(s) for s in cfg.resized_crop_scale)
      images = augment_lib.random_resized_crop(k, images, images.shape[1:3], scale)
    elif op == "hflip" and float(cfg.hflip) > 0:
      flip = jax.random.bernoulli(k, float(cfg.hflip), (batch,))
      images = jnp.where(flip[:, None, None, None], augment_lib.horizontal_flip(images), images)
    elif op == "rotation" and float(cfg.rotation) > 0:
      images = augment_lib.random_rotation(k, images, float(cfg.rotation))
    elif op == "color_jitter":
      images = color_jitter(k, images, float(cfg.brightness), float(cfg.contrast), float(cfg.saturation),
                            float(cfg.hue))
    elif op == "affine" and _has_affine(cfg):
      translate = float(cfg.affine_translate)
      images = augment_lib.torchvision_random_affine(k, images, float(cfg.affine_degrees), (translate, translate),
                                                     tuple(float(s) for s in cfg.affine_scale))
    elif op == "erasing" and float(cfg.erasing) > 0:
      images = augment_lib.random_erasing(k, images, float(cfg.erasing), tuple(float(s) for s in cfg.erasing_scale),
                                          tuple(float(s) for s in cfg.erasing_ratio), erase_value)
  return images


def augment(key: jax.Array, images: jax.Array, cfg: Mapping[str, Any], labels: jax.Array | None = None,
            erase_value=0.0) -> jax.Array:
  """The classification recipes' train-time transforms on device, per sample, for (B, H, W, C) in [0, 1].

  ``cfg`` (``config.augment``, whole or in part: ``configlib.augment_config`` declares the fields and
  completes it), each transform skipped at its neutral value:

  * ``resized_crop_scale``: [low, high] of torchvision's RandomResizedCrop back to the input size;
  * ``hflip``: flip probability;
  * ``rotation``: degrees of a rotation U(−d, d) about the centre, zeros outside (RandomRotation);
  * ``brightness``/``contrast``/``saturation``/``hue``: ColorJitter amounts (``color_jitter``);
  * ``affine_degrees``/``affine_translate``/``affine_scale``: RandomAffine(degrees, translate=(t, t),
    scale) without shear;
  * ``erasing``/``erasing_scale``/``erasing_ratio``: RandomErasing(p, scale, ratio), filled with
    ``erase_value`` (the normalisation's zero point: torchvision erases after ``Normalize`` with 0);
  * ``order``: the order of the transforms (None: ``AUGMENT_OPS``);
  * ``class_conditional``: ``{labels: [...], <the keys above>}`` — samples whose label is listed get
    this chain instead of the main one (FCN-CLIP's "minority" transform); needs ``labels`` (B,).

  Geometric resampling is bilinear with zeros outside (torchvision's RandomRotation/RandomAffine
  default to nearest).
  """
  cfg = configlib.augment_config(cfg)
  k_main, k_class = jax.random.split(key)
  out = _augment_chain(k_main, images, cfg, erase_value)
  conditional = cfg.class_conditional
  chosen_labels = list(conditional.labels)
  if chosen_labels:
    if labels is None:
      raise ValueError("config.augment.class_conditional needs the batch's labels; this batch has none")
    alternative = _augment_chain(k_class, images, conditional, erase_value)
    chosen = jnp.isin(labels, jnp.asarray(chosen_labels, labels.dtype))
    out = jnp.where(chosen[:, None, None, None], alternative, out)
  return out


def parse_fields(spec: str) -> dict[str, int]:
  """``'image:3,oct:1'`` → {'image': 3, 'oct': 1} (image field → channels, in model order)."""
  fields = {}
  for part in str(spec).split(","):
    name, sep, channels = part.strip().partition(":")
    if not name or not sep or channels not in ("1", "3") or name in fields:
      raise ValueError(f"config.data.fields={spec!r}: expected 'name:channels[,name:channels]' with channels 1 "
                       "or 3 and distinct names, e.g. 'image:3' or 'image:3,oct:1'")
    fields[name] = int(channels)
  return fields


def frozen_mask(params: Any, patterns: list[str]) -> Any:
  """True for the parameters that train: those whose '/'-joined path matches none of ``patterns``."""
  compiled = [re.compile(p) for p in patterns]
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  matched = {p: False for p in patterns}
  mask = {}
  for path in flat:
    hit = [c.pattern for c in compiled if c.search(path)]
    for p in hit:
      matched[p] = True
    mask[path] = not hit
  unused = [p for p, used in matched.items() if not used]
  if unused:
    raise ValueError(f"config.optimizer.frozen: the patterns {unused} match no parameter (paths look like "
                     f"{sorted(flat)[:3]})")
  return traverse_util.unflatten_dict(mask, sep="/")


def input_crop_size(d: ml_collections.ConfigDict) -> int | None:
  """``config.data.crop_size`` checked against ``image_size`` (None: the model sees image_size² whole).

  Images are resized to ``image_size``² by the pipeline, then cropped to ``crop_size``² on device:
  at random per sample for training, at the centre for evaluation and prediction (upstream's
  ``Resize(S/0.875)`` → ``RandomCrop(S)`` / ``CenterCrop(S)``).
  """
  crop = d.crop_size
  if not crop:
    return None
  if not 0 < int(crop) <= int(d.image_size):
    raise ValueError(f"config.data.crop_size={crop}: expected a crop in (0, config.data.image_size="
                     f"{d.image_size}] (image_size is the size images are resized to before cropping)")
  return int(crop)


def input_size(d: ml_collections.ConfigDict) -> int:
  """The side of the model's input images: ``crop_size`` when set, else ``image_size``."""
  return input_crop_size(d) or int(d.image_size)


def _open_mix_split(d: ml_collections.ConfigDict, split: str, data_dir: str):
  """``config.data.mix``: the records of several TFDS splits concatenated in the listed order, then
  divided at random into named splits by fraction (``pipeline.split_by_fractions``)."""
  mix = d.mix
  names = [str(entry[0]) for entry in mix.splits]
  if split not in names:
    raise ValueError(f"split {split!r} is not one of config.data.mix.splits {names}")
  parts = []
  for i, source in enumerate(mix.sources):
    if not source.get("name") or not source.get("split"):
      raise ValueError(f"config.data.mix.sources[{i}]={dict(source)}: expected a dataset 'name' and its 'split'")
    kwargs = dict(source.get("builder_kwargs") or {})
    if d.build_if_missing:
      datasets.ensure_built(source["name"], data_dir, **kwargs)
    parts.append(pipeline.open_source(source["name"], source["split"], data_dir, kwargs))
  concatenated = pipeline.ConcatSource(parts)
  try:
    indices = pipeline.split_by_fractions(len(concatenated), [float(entry[1]) for entry in mix.splits],
                                          int(mix.seed))
  except ValueError as e:
    raise ValueError(f"config.data.mix.splits={[list(entry) for entry in mix.splits]}: {e}") from None
  return pipeline.RecordSubset(concatenated, indices[names.index(split)], f"mix split {split!r}")


def open_split(d: ml_collections.ConfigDict, split: str, name: str | None = None, data_dir: str | None = None,
               builder_kwargs=None):
  """A split of ``config.data`` ``d``'s dataset (or another), label subset applied, built if allowed.

  With ``config.data.mix.sources`` (and no other ``name`` asked for) the split is one of the mix's.
  """
  if d.mix.sources and not name:
    source = _open_mix_split(d, split, data_dir or d.data_dir)
    return pipeline.LabelSubset(source, list(d.label_subset)) if d.label_subset else source
  name = name or d.name
  data_dir = data_dir or d.data_dir
  kwargs = dict(builder_kwargs or d.builder_kwargs or {})
  if d.build_if_missing:
    datasets.ensure_built(name, data_dir, **kwargs)
  source = pipeline.open_source(name, split, data_dir, kwargs)
  subset = d.label_subset
  if subset:
    source = pipeline.LabelSubset(source, list(subset))
  return source


class ClassificationTask(TaskBase):
  """The classification task bundle (see ``jaxretina.train.loop.Task``)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh, train_labels: np.ndarray, train_source=None):
    """``train_labels``: the training split's labels (sampling weights, epoch length, the classifier's
    label-derived constants). It opens no data; ``make_classification_task`` opens the split."""
    self.config = config
    self.mesh = mesh
    d = config.data
    self.fields = parse_fields(d.fields)
    self.num_classes = int(d.num_classes)
    self.class_names = list(d.class_names or [str(k) for k in range(self.num_classes)])
    if len(self.class_names) != self.num_classes:
      raise ValueError(f"config.data.class_names has {len(self.class_names)} names for num_classes="
                       f"{self.num_classes}")
    self.global_batch_size = distributed.global_batch_size(config, mesh)
    self.local_batch_size = distributed.local_batch_size(self.global_batch_size, mesh)
    self.train_source = train_source
    self.classifier = build_classification_system(config, self.num_classes, self.fields)
    train_labels = np.asarray(train_labels)
    self.classifier.set_training_labels(train_labels, self.num_classes)
    # config.augment completed with the declared neutral transforms (a config may give a part of it).
    self.augment_config = configlib.augment_config(config.augment)
    self.crop_size = input_crop_size(d)
    self.input_size = self.crop_size or int(d.image_size)
    self.classifier.prepare(self.input_size)
    self.class_weights, samples = self._sampling(train_labels)
    self.steps_per_epoch = max(samples // self.global_batch_size, 1)
    self.microbatches = microbatch.check(config.microbatches, self.global_batch_size,
                                         distributed.num_data_shards(mesh))
    self.total_steps = int(config.total_steps or math.ceil(config.epochs * self.steps_per_epoch))
    self.schedule = optim.make_schedule(config.schedule, self.steps_per_epoch, self.total_steps)
    frozen = list(config.optimizer.frozen)
    trainable = None
    if frozen:
      abstract = jax.eval_shape(self._init_variables, jax.random.PRNGKey(0))[0]
      trainable = frozen_mask(abstract["params"], frozen)
    # ReduceLROnPlateau / early stopping (off unless configured): a learning-rate scale in the
    # optimizer state, updated after each epoch's evaluation (after_evaluation).
    self.plateau = plateau.Controller(config)
    self.tx = self.plateau.wrap(optim.make_optimizer(config.optimizer, self.schedule, trainable))
    counts = np.bincount(train_labels, minlength=self.num_classes)
    logging.info("classification task %s: %d train examples (per class %s), %d steps/epoch, %d steps",
                 config.model.name, len(train_labels), counts.tolist(), self.steps_per_epoch, self.total_steps)

  # ------------------------------------------------------------------ data
  def open_split(self, split: str, name: str | None = None, data_dir: str | None = None, builder_kwargs=None):
    """A split of ``config.data``'s dataset (or another), label subset applied, built if allowed."""
    return open_split(self.config.data, split, name, data_dir, builder_kwargs)

  def _sampling(self, train_labels: np.ndarray) -> tuple[list[float] | None, int]:
    """``config.data.sampling``: ``class_weights`` None (epochs of a shuffled order), a list (one
    weight per class, torch's WeightedRandomSampler with replacement), 'inverse_frequency' or a
    rule of the model's system (``sampling_class_weights``, e.g. 'fcn_clip_notebook');
    ``samples_per_epoch`` (0 = the split size)."""
    s = self.config.data.sampling
    weights = s.class_weights
    n = len(train_labels)
    if weights in (None, "", "none"):
      return None, n
    if weights == "inverse_frequency":
      counts = np.bincount(train_labels, minlength=self.num_classes).astype(np.float64)
      weights = [1.0 / c if c else 0.0 for c in counts]
    elif isinstance(weights, str):
      weights = self.classifier.sampling_class_weights(weights, train_labels, self.num_classes)
    weights = [float(w) for w in weights]
    if len(weights) != self.num_classes:
      raise ValueError(f"config.data.sampling.class_weights: expected {self.num_classes} weights, got {weights}")
    return weights, int(s.samples_per_epoch or n)

  def data_streams(self, mesh) -> dict[str, Any]:
    return {"main": iter(pipeline.classification_batches(
        self.train_source, global_batch_size=self.global_batch_size, seed=self.config.seed, fields=self.fields,
        num_classes=self.num_classes, process_index=jax.process_index(), process_count=jax.process_count(),
        image_size=self.config.data.image_size, class_weights=self.class_weights,
        samples_per_epoch=self.steps_per_epoch * self.global_batch_size if self.class_weights else None))}

  def prepare_inputs(self, batch: Mapping[str, jax.Array], key: jax.Array | None) -> dict[str, jax.Array]:
    """uint8 batch → normalised float inputs per modality (augmented when ``key`` is given).

    With ``config.data.crop_size`` a training batch (``key`` given) is cropped at random per sample,
    an evaluation batch (``key`` None: evaluators, CAM features) at the centre, before augmenting.
    ``batch['label']`` selects ``config.augment.class_conditional``'s chain.
    """
    mode = self.config.data.normalize
    aug_cfg = self.augment_config
    labels = batch.get("label") if hasattr(batch, "get") else None
    if key is None and aug_cfg.augment_eval_splits and labels is not None:
      # Upstream quirk (config.augment.augment_eval_splits): evaluation batches get the training
      # transforms too. The key is a function of the batch's record indices, so a re-evaluation
      # draws the same transforms.
      index = jnp.max(batch["index"]) if "index" in batch else 0
      key = jax.random.fold_in(jax.random.PRNGKey(int(self.config.seed)), index)
    inputs = {}
    keys = jax.random.split(key, len(self.fields)) if key is not None else [None] * len(self.fields)
    for (name, channels), k in zip(self.fields.items(), keys):
      if name not in batch:
        raise KeyError(f"batch has no image field {name!r} (config.data.fields); it has {sorted(batch)}")
      images = batch[name]
      if images.ndim != 4 or images.shape[-1] != channels:
        raise ValueError(f"image field {name!r}: expected (B, H, W, {channels}) (config.data.fields), got "
                         f"{images.shape}")
      images = images.astype(jnp.float32) / 255.0
      if self.crop_size:
        if k is not None:
          k_crop, k = jax.random.split(k)
          images = augment_lib.random_crop(k_crop, images, (self.crop_size, self.crop_size))
        else:
          images = augment_lib.center_crop(images, (self.crop_size, self.crop_size))
      if k is not None:
        images = augment(k, images, aug_cfg, labels=labels, erase_value=normalization_zero(mode, channels))
      inputs[name] = normalize(images, mode)
    return inputs

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global loader batch (what ``train_step`` takes), for compiling
    without data (``python -m jaxretina.aot``)."""
    b, s = self.global_batch_size, int(self.config.data.image_size)
    batch = {name: jax.ShapeDtypeStruct((b, s, s, ch), jnp.uint8) for name, ch in self.fields.items()}
    batch["label"] = jax.ShapeDtypeStruct((b,), jnp.int32)
    return batch

  def _dummy_inputs(self) -> dict[str, jax.Array]:
    s = self.input_size
    return {name: jnp.zeros((2, s, s, ch), jnp.float32) for name, ch in self.fields.items()}

  # ------------------------------------------------------------------ state
  def _init_variables(self, rng):
    return self.classifier.init(rng, self._dummy_inputs())

  def init_state(self, rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    variables, system_state = self._init_variables(init_rng)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                      opt_state=self.tx.init(params), rng=state_rng, system_state=system_state)

  def load_pretrained(self, state: TrainState) -> TrainState:
    """Fresh start only: ``config.init.checkpoint`` (an upstream PyTorch checkpoint of this model,
    converted strictly; a CAL/DualAttendMed ``feature_center`` comes along) and the classifier's own
    pretrained pieces (FCN-CLIP's FLAIR encoder)."""
    init = self.config.init
    variables = jax.device_get(state.variables())
    system_state = state.system_state
    changed = False
    if init.checkpoint:
      variables, extras = self._convert_checkpoint(init.checkpoint)
      system_state = self.classifier.restore_system_state(extras, system_state, init.checkpoint)
      changed = True
    if init.backbone:
      variables = self._load_backbones(variables, init.backbone)
      changed = True
    loaded = self.classifier.load_pretrained(variables)
    changed = changed or loaded is not variables
    variables = loaded
    if not changed:
      return state
    shard = lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding)  # noqa: E731
    params = jax.tree.map(shard, variables["params"], state.params)
    batch_stats = jax.tree.map(shard, variables.get("batch_stats", {}), state.batch_stats)
    return state.replace(params=params, batch_stats=batch_stats, opt_state=self.tx.init(params),
                         system_state=system_state)

  def _load_backbones(self, variables: dict, path: str) -> dict:
    """torchvision ResNet weights (``config.init.backbone``) into every RGB backbone of the model.

    Like upstream's ImageNet initialisation: the classifier head (``fc.*``) is dropped; every
    backbone variable must be filled (a different depth is an error, not a silent skip).
    """
    state_dict = convert.load_torch_checkpoint(path)
    s = self.input_size
    for where, module in self.classifier.backbones().items():
      loaded = resnet.from_torch(state_dict, module, input_shape=(1, s, s, 3), ignore=[r"^fc\."], source=path)
      for collection, tree in loaded.items():
        node = variables[collection]
        for key in where[:-1]:
          node = node[key]
        node[where[-1]] = tree
    return variables

  def _convert_checkpoint(self, path: str) -> tuple[dict, dict]:
    state_dict, extras = convert.load_torch_checkpoint(path, return_extras=True)
    if any(k.startswith("module.") for k in state_dict):  # saved from a (Distributed)DataParallel wrapper
      state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    target = jax.eval_shape(self._init_variables, jax.random.PRNGKey(0))[0]
    rename = self.classifier.torch_rename
    return convert.convert_state_dict(state_dict, target, rename=rename, source=path), extras

  # ------------------------------------------------------------------ step
  def step_on_inputs(self, state: TrainState, inputs: Mapping[str, jax.Array], labels: jax.Array,
                     model_rng: jax.Array):
    """One optimisation step on prepared (normalised, augmented) inputs → ``(new_state, metrics,
    gradients before clipping)``. ``inputs`` may carry the classifier's injected random draws."""
    epoch = state.step // self.steps_per_epoch

    def loss_fn(params, batch_stats, system_state, chunk_inputs, chunk_labels, rng):
      variables = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
      return self.classifier.loss(variables, system_state, chunk_inputs, chunk_labels, rng, epoch)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if self.microbatches == 1:
      (loss, (metrics, batch_stats, system_state)), grads = grad_fn(
          state.params, state.batch_stats, state.system_state, inputs, labels, model_rng)
    else:
      # Gradient accumulation: the mean of the microbatches' mean losses is the batch's mean loss.
      # BatchNorm normalises each microbatch with its own statistics and updates its running
      # statistics once per microbatch; model state (WS-DAN's centres) updates microbatch by microbatch.
      shards = distributed.num_data_shards(self.mesh)
      chunks = microbatch.split((dict(inputs), labels), self.microbatches, shards)
      keys = jax.random.split(model_rng, self.microbatches)

      def accumulate(carry, xs):
        batch_stats, system_state, grads = carry
        (chunk_inputs, chunk_labels), key = xs
        (chunk_loss, (chunk_metrics, batch_stats, system_state)), chunk_grads = grad_fn(
            state.params, batch_stats, system_state, chunk_inputs, chunk_labels, key)
        grads = jax.tree.map(lambda g, c: g + c / self.microbatches, grads, chunk_grads)
        return (batch_stats, system_state, grads), (chunk_loss, chunk_metrics)

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (batch_stats, system_state, grads), (losses, chunk_metrics) = jax.lax.scan(
          accumulate, (state.batch_stats, state.system_state, zeros), (chunks, keys))
      loss = jnp.mean(losses)
      metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), chunk_metrics)
    new_state = optim.apply_gradients(state, grads, self.tx, batch_stats=batch_stats, system_state=system_state)
    grad_norm = optax.global_norm(grads)
    lr = self.schedule(state.step) * plateau.lr_scale(state.opt_state)  # the rate this step applied
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=lr,
                   all_finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    return new_state, metrics, grads

  def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    rng, aug_rng, model_rng = jax.random.split(state.rng, 3)
    new_state, metrics, _ = self.step_on_inputs(state, self.prepare_inputs(batch, aug_rng), batch["label"],
                                                model_rng)
    return new_state.replace(rng=rng), metrics

  def predict(self, variables, batch) -> dict[str, jax.Array]:
    """Evaluation outputs of a uint8 batch: ``logits`` (B, K) [+ ``attention`` (B, h, w)]."""
    return self.classifier.predict(variables, self.prepare_inputs(batch, None))

  # ------------------------------------------------------------------ eval
  def evaluators(self, workdir: str | None) -> evaluators_lib.Evaluators:
    """The evaluators of ``config.evals`` on this classifier, writing their reports under ``workdir``."""
    classifier = self.classifier
    # Optional capabilities of a system (jaxretina.systems.base): offered only where it has them.
    optional = {}
    if hasattr(classifier, "cam_features"):
      optional["cam_features"] = lambda v, batch: classifier.cam_features(v, self.prepare_inputs(batch, None))
    if hasattr(classifier, "eval_loss"):
      optional["eval_loss"] = classifier.eval_loss
    return evaluators_lib.from_config(
        self.config.evals, workdir=workdir, mesh=self.mesh, predict=self.predict, open_split=self.open_split,
        fields=self.fields, class_names=self.class_names, image_size=int(self.config.data.image_size),
        crop_size=self.crop_size, batch_size=self.global_batch_size, train_split=self.config.data.train_split,
        **optional)

  def after_evaluation(self, state: TrainState, metrics: Mapping[str, float]) -> tuple[TrainState, Any]:
    """The loop's hook after each epoch's evaluation: ReduceLROnPlateau and early stopping
    (``jaxretina.train.plateau``) → ``(state with the updated rate scale, plateau.Report)``."""
    if not self.plateau.enabled:
      return state, None
    opt_state, report = self.plateau.after_evaluation(state.opt_state, metrics, int(jax.device_get(state.step)))
    return state.replace(opt_state=opt_state), report

  def stop_reason(self, state: TrainState) -> str | None:
    """Why a restored run has already stopped early (None: it has not)."""
    return self.plateau.stop_reason(state.opt_state) if self.plateau.enabled else None

  @property
  def keep_best_checkpoint(self) -> bool:
    return self.plateau.keep_best


def make_classification_task(config, mesh) -> ClassificationTask:
  """The task on ``config.data``'s training split (label subset applied, built if allowed)."""
  num_classes = int(config.data.num_classes)
  source = open_split(config.data, config.data.train_split)
  counts = config.data.train_class_counts
  if counts:
    if len(counts) != num_classes:
      raise ValueError(f"config.data.train_class_counts={list(counts)}: expected one count per class "
                       f"(config.data.num_classes={num_classes})")
    try:
      source = pipeline.resample_to_class_counts(source, [int(c) for c in counts], num_classes)
    except ValueError as e:
      raise ValueError(f"config.data.train_class_counts: {e}") from None
  return ClassificationTask(config, mesh, pipeline.record_labels(source, num_classes), train_source=source)

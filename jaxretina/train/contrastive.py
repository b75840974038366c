"""Contrastive image–text pretraining: FLAIR, and KeepFIT's knowledge-enhanced objective.

One step (KeepFIT, ``train_epoch_with_KD_loss_Atte_s``; FLAIR is the same with ``config.kd`` off):

  I  = f_img(aug(images))     T  = f_txt(prompt tokens)        L_main = softCLIP(T·Iᵀ·e^s, co-occurrence)
  I_k = f_img(kd images)      T_k = f_txt(kd caption tokens)   L_kd   = softCLIP(T_k·I_kᵀ·e^s, targets_kd)
  R = MHA(query=I, key=I_k, value=T_k)                         L = L_main + L_kd + w·MSE(T, R)

with the logit scale clamped in place to [0, ln 100] before the forward (the gradient, weight decay
and update act on the clamped value), then global-norm clipping and AdamW with FLAIR's
per-iteration warm-up/cosine.

Text embeddings pool over the positions up to the longest text of the batch they were tokenised
in, as upstream's ``padding=True`` batches do (``flair.TextModel``), although our batches are padded
to a static ``config.text.max_length``.

Upstream runs DDP with per-rank losses and per-rank BatchNorm; here the step is one jitted program
over the global batch. ``config.loss.contrastive_scope='per_device'`` reproduces upstream's ranks:
the batch is split into as many groups as there are data shards, and each group has its own
contrastive losses, its own expert-revision attention (its queries attend to its own knowledge
pairs only) and its own text padding length. BatchNorm statistics are always global (SyncBN-like).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxretina.models import bert as bert_lib
from jaxretina.models import flair
from jaxretina.models import resnet as resnet_lib
from jaxretina.train import distributed, optim
from jaxretina.train.loop import TrainState, register_task


def build_tokenizer(cfg: ml_collections.ConfigDict):
  """``config.text.tokenizer``: 'embedded' (shipped retina vocabulary) or a local HF directory."""
  from jaxretina.text.tokenizer import Tokenizer

  source = cfg.get("tokenizer", "embedded")
  if source in ("embedded", None, ""):
    return Tokenizer.embedded()
  if not os.path.isdir(source):
    raise FileNotFoundError(f"config.text.tokenizer={source!r}: not a local directory with a BERT vocabulary")
  return Tokenizer.from_pretrained_dir(source)


def build_text_config(cfg: ml_collections.ConfigDict, tokenizer) -> bert_lib.BertConfig:
  """``config.text.bert``: a directory with config.json (pretrained) or a dict of BertConfig fields."""
  pretrained = cfg.get("pretrained_dir")
  if pretrained:
    return bert_lib.BertConfig.from_pretrained_dir(pretrained)
  fields = dict(cfg.bert)
  fields.setdefault("vocab_size", tokenizer.vocab_size)
  fields.setdefault("pad_token_id", tokenizer.pad_token_id)
  return bert_lib.BertConfig.from_dict(fields)


def build_model(config: ml_collections.ConfigDict, text_config: bert_lib.BertConfig) -> flair.TwoTower:
  m = config.model
  dtype = jnp.dtype(config.get("dtype", "float32"))
  vision = resnet_lib.ResNet(block=m.vision.block, layers=tuple(m.vision.layers),
                             width_per_group=m.vision.get("width_per_group", 64),
                             base_width=m.vision.get("base_width", 64), num_classes=None, dtype=dtype)
  return flair.TwoTower(
      vision=vision,
      text=text_config,
      proj_dim=m.proj_dim,
      proj_bias=m.get("proj_bias", False),
      projection=m.get("projection", True),
      norm_features=m.get("norm_features", True),
      logit_scale_init=m.get("logit_scale_init", 0.07),
      knowledge_attention=config.kd.enabled,
      attention_heads=m.get("attention_heads", 2),
      attention_dropout=m.get("attention_dropout", 0.5),
      softmax_over_heads=m.get("softmax_over_heads", False),
      text_pooling=m.get("text_pooling", "all_positions"),
      dtype=dtype,
  )


def grouped_softce(logits_fn, img, txt, target_fn, groups: int) -> jax.Array:
  """Soft-target CLIP loss over ``groups`` equal slices of the batch (1 = the global batch).

  ``target_fn(rows, n)`` gives the (n, n) targets of the rows ``rows``.
  """
  if groups == 1:
    return flair.softce_clip_loss(logits_fn(txt, img), target_fn(slice(None), img.shape[0]))
  b = img.shape[0] // groups
  losses = [flair.softce_clip_loss(logits_fn(txt[g * b:(g + 1) * b], img[g * b:(g + 1) * b]),
                                   target_fn(slice(g * b, (g + 1) * b), b)) for g in range(groups)]
  return jnp.mean(jnp.stack(losses))


class ContrastiveTask:
  """The contrastive task bundle the loop runs (see ``jaxretina.train.loop.Task``).

  Built from the config and the size of the training split; it opens no data until
  ``data_streams`` (``make_contrastive_task`` opens the split for the loop), so the step can be
  built and run on given inputs (the train-step parity handlers do).
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh, num_train_examples: int, train_source=None):
    self.config = config
    self.mesh = mesh
    self.tokenizer = build_tokenizer(config.text)
    self.text_config = build_text_config(config.text, self.tokenizer)
    self.model = build_model(config, self.text_config)
    self.global_batch_size = int(config.batch_size)
    self.local_batch_size = distributed.local_batch_size(self.global_batch_size, mesh)
    self.train_source = train_source
    self.steps_per_epoch = max(int(num_train_examples) // self.global_batch_size, 1)
    epochs = config.epochs - config.get("start_epoch", 0)
    self.total_steps = int(config.get("total_steps") or math.ceil(epochs * self.steps_per_epoch))
    self.schedule = optim.make_schedule(config.schedule, self.steps_per_epoch, self.total_steps)
    self.tx = optim.make_optimizer(config.optimizer, self.schedule)
    self.groups = distributed.num_data_shards(mesh) if config.loss.get("contrastive_scope") == "per_device" else 1
    logging.info("contrastive task: %d train examples, %d steps/epoch, %d steps", num_train_examples,
                 self.steps_per_epoch, self.total_steps)

  # ------------------------------------------------------------------ state
  def _dummy_inputs(self):
    s = self.config.data.image_size
    L = self.config.text.max_length
    return (jnp.zeros((2, s, s, 3), jnp.float32), jnp.zeros((2, L), jnp.int32), jnp.ones((2, L), jnp.int32))

  def _init_variables(self, rng):
    images, ids, mask = self._dummy_inputs()
    return self.model.init({"params": rng, "dropout": rng}, images, ids, mask)

  def init_state(self, rng: jax.Array) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    variables = self._init_variables(init_rng)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                      opt_state=self.tx.init(params), rng=state_rng)

  def load_pretrained(self, state: TrainState) -> TrainState:
    """``config.init``: a whole FLAIR/KeepFIT checkpoint, or per-tower weights (big_vision style).

    Runs on a fresh start only (a resumed run has its own weights), outside jit so the weights are
    device arrays rather than constants baked into a program.
    """
    init = self.config.get("init") or {}
    if not any(init.get(k) for k in ("checkpoint", "vision_checkpoint", "text_pretrained")):
      return state
    variables = jax.device_get(state.variables())
    if init.get("checkpoint"):
      variables = flair.load_flair_checkpoint(init.checkpoint, self.model)
    if init.get("vision_checkpoint"):
      from jaxretina.models.convert import load_torch_checkpoint

      s = self.config.data.image_size
      vis = resnet_lib.from_torch(load_torch_checkpoint(init.vision_checkpoint), self.model.vision,
                                  input_shape=(1, s, s, 3))
      variables["params"]["vision_model"]["model"] = vis["params"]
      variables["batch_stats"]["vision_model"]["model"] = vis["batch_stats"]
    if init.get("text_pretrained"):
      _, text_vars = bert_lib.load_hf_bert(init.text_pretrained, add_pooling_layer=False)
      variables["params"]["text_model"]["model"] = text_vars["params"]
    shard = lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding)  # noqa: E731
    params = jax.tree.map(shard, variables["params"], state.params)
    batch_stats = jax.tree.map(shard, variables.get("batch_stats", {}), state.batch_stats)
    return state.replace(params=params, batch_stats=batch_stats, opt_state=self.tx.init(params))

  # ------------------------------------------------------------------ data
  def data_streams(self, mesh) -> dict[str, Any]:
    from jaxretina.data import pipeline

    c, d = self.config, self.config.data
    common = dict(tokenize=self.tokenizer, max_length=c.text.max_length, category_names=list(d.category_names),
                  global_batch_size=self.global_batch_size, process_index=jax.process_index(),
                  process_count=jax.process_count(), image_size=d.image_size)
    streams = {"main": iter(pipeline.image_text_batches(
        self.train_source, caption_template=d.caption_template, augment_description=d.augment_description,
        use_caption=False, seed=c.seed, **common))}
    if c.kd.enabled:
      kd_source = pipeline.open_source(c.kd.get("name") or d.name, c.kd.split, c.kd.get("data_dir") or d.data_dir,
                                       dict(c.kd.get("builder_kwargs") or d.get("builder_kwargs") or {}))
      streams["kd"] = iter(pipeline.knowledge_batches(
          kd_source, use_caption=c.kd.use_caption, caption_template=d.caption_template,
          augment_description=d.augment_description, seed=c.seed + 1, **common))
    return streams

  # ------------------------------------------------------------------ step
  def learning_rate(self, step):
    return self.schedule(step)

  def prepare_inputs(self, batch, key: jax.Array) -> dict[str, jax.Array]:
    """A loader batch → the step's inputs: images as floats in [0, 1] (the main batch augmented,
    the knowledge batch not: KeepFIT does not augment it), tokens, and the category ids the soft
    targets are built from."""
    c = self.config
    images = batch["image"].astype(jnp.float32) / 255.0
    if c.get("augment", "flair") == "flair":
      from jaxretina.data.augment import flair_augment

      images = flair_augment(key, images)
    inputs = {"images": images, "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "category_id": batch["category_id"]}
    if c.kd.enabled:
      inputs.update(kd_images=batch["kd/image"].astype(jnp.float32) / 255.0, kd_input_ids=batch["kd/input_ids"],
                    kd_attention_mask=batch["kd/attention_mask"])
      if c.kd.targets != "identity":
        inputs["kd_category_id"] = batch["kd/category_id"]
    return inputs

  def _targets(self, inputs, prefix: str, rows: slice, n: int) -> jax.Array:
    """Soft targets of one contrastive group: given (``<prefix>target``), co-occurrence of the
    group's categories, or identity (KeepFIT's knowledge pairs)."""
    if f"{prefix}target" in inputs:
      if self.groups != 1:
        raise ValueError("explicit contrastive targets need config.loss.contrastive_scope='global'")
      return inputs[f"{prefix}target"]
    if f"{prefix}category_id" in inputs:
      return flair.cooccurrence_targets(inputs[f"{prefix}category_id"][rows])
    return flair.identity_targets(n)

  def _pool_lengths(self, attention_mask: jax.Array) -> jax.Array | None:
    """Per row, the longest text of its contrastive group: upstream tokenises each rank's batch
    with ``padding=True``, so that is the length its text pooling averages over."""
    if self.groups == 1:
      return None
    lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=-1).reshape(self.groups, -1)
    return jnp.repeat(jnp.max(lengths, axis=-1), attention_mask.shape[0] // self.groups)

  def loss_fn(self, params, batch_stats, inputs, dropout_rng):
    """The objective on prepared inputs → ``(loss, (metrics, new batch_stats))``.

    The logit scale enters as it is: the step clamps the parameter before differentiating, as
    upstream clamps ``logit_scale.data`` in place before its forward.
    """
    c = self.config
    kd = c.kd.enabled
    groups = self.groups

    def forward(m):
      img = m.encode_image(inputs["images"], train=True)
      txt = m.encode_text(inputs["input_ids"], inputs["attention_mask"], train=True,
                          pool_lengths=self._pool_lengths(inputs["attention_mask"]))
      out = {"img": img, "txt": txt}
      if kd:
        out["kd_img"] = m.encode_image(inputs["kd_images"], train=True)
        out["kd_txt"] = m.encode_text(inputs["kd_input_ids"], inputs["kd_attention_mask"], train=True,
                                      pool_lengths=self._pool_lengths(inputs["kd_attention_mask"]))
        out["revised"] = m.revise(img, out["kd_img"], out["kd_txt"], train=True, groups=groups)
      return out

    variables = {"params": params, "batch_stats": batch_stats}
    out, new_vars = self.model.apply(variables, method=forward, mutable=["batch_stats"],
                                     rngs={"dropout": dropout_rng})
    logits_fn = lambda t, i: flair.logits_per_text(t, i, params["logit_scale"])  # noqa: E731
    loss_main = grouped_softce(logits_fn, out["img"], out["txt"],
                               lambda s, n: self._targets(inputs, "", s, n), groups)
    metrics = {"loss_main": loss_main}
    loss = loss_main
    if kd:
      loss_kd = grouped_softce(logits_fn, out["kd_img"], out["kd_txt"],
                               lambda s, n: self._targets(inputs, "kd_", s, n), groups)
      loss_revision = jnp.mean(jnp.square(out["txt"].astype(jnp.float32) - out["revised"].astype(jnp.float32)))
      loss = loss + loss_kd + c.kd.weight * loss_revision
      metrics.update(loss_kd=loss_kd, loss_revision=loss_revision)
    metrics["loss"] = loss
    return loss, (metrics, new_vars["batch_stats"])

  def step_on_inputs(self, state: TrainState, inputs, dropout_rng: jax.Array):
    """One optimisation step on prepared inputs → ``(new_state, metrics, gradients before clipping)``.

    Upstream order: clamp ``logit_scale`` in place to [0, ln 100], forward/backward at the clamped
    value, clip the global gradient norm, AdamW. The clamped value is what the gradient, the
    weight decay and the update see; nothing clamps after the update (the next step does).
    """
    params = dict(state.params, logit_scale=flair.clamp_logit_scale(state.params["logit_scale"]))
    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
        params, state.batch_stats, inputs, dropout_rng)
    new_state = optim.apply_gradients(state, grads, self.tx, params=params, batch_stats=batch_stats)
    grad_norm = optax.global_norm(grads)
    metrics.update(grad_norm=grad_norm, lr=self.schedule(state.step),
                   logit_scale=jnp.exp(flair.clamp_logit_scale(new_state.params["logit_scale"])),
                   all_finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    return new_state, metrics, grads

  def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    rng, aug_rng, drop_rng = jax.random.split(state.rng, 3)
    new_state, metrics, _ = self.step_on_inputs(state, self.prepare_inputs(batch, aug_rng), drop_rng)
    return new_state.replace(rng=rng), metrics

  # ------------------------------------------------------------------ eval
  def evaluate(self, state: TrainState, mesh) -> dict[str, float]:
    from jaxretina.evaluators import run_evaluators

    self.eval_step = int(jax.device_get(state.step))
    return run_evaluators(self, state.variables(), mesh)


@register_task("contrastive")
def make_contrastive_task(config, mesh) -> ContrastiveTask:
  """The task on ``config.data``'s training split (built first when ``build_if_missing``)."""
  from jaxretina.data import pipeline

  d = config.data
  if d.get("build_if_missing", False):
    from jaxretina import datasets

    datasets.ensure_built(d.name, d.data_dir, **dict(d.get("builder_kwargs") or {}))
  source = pipeline.open_source(d.name, d.train_split, d.data_dir, dict(d.get("builder_kwargs") or {}))
  source = pipeline.pretraining_source(source, balance=bool(d.get("balance", False)),
                                       banned_categories=list(d.get("banned_categories") or []),
                                       banned_match=d.get("banned_match", "substring"), seed=int(config.seed))
  return ContrastiveTask(config, mesh, len(source), train_source=source)

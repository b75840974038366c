"""Contrastive image–text pretraining: FLAIR, and KeepFIT's knowledge-enhanced objective.

One step (KeepFIT, ``train_epoch_with_KD_loss_Atte_s``; FLAIR is the same with ``config.knowledge`` off;
the fields and their defaults: ``configlib.contrastive_config`` and ``systems/flair.py``):

  I  = f_img(aug(images))     T  = f_txt(prompt tokens)        L_main = softCLIP(T·Iᵀ·e^s, co-occurrence)
  I_k = f_img(knowledge images) T_k = f_txt(knowledge captions)   L_kd   = softCLIP(T_k·I_kᵀ·e^s, targets_kd)
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
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxretina import configlib
from jaxretina.evaluators import common as evaluators_lib
from jaxretina.evaluators import zero_shot
from jaxretina.models import bert as bert_lib
from jaxretina.models import flair
from jaxretina.models import resnet as resnet_lib
from jaxretina.systems import flair as two_tower
from jaxretina.train import distributed, microbatch, optim
from jaxretina.train.state import TaskBase, TrainState
from jaxretina.models.convert import load_torch_checkpoint
from jaxretina.data import pipeline
from jaxretina.data.augment import flair_augment
from jaxretina import datasets


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


def sharded_softce_clip_loss(txt: jax.Array, img: jax.Array, logit_scale: jax.Array, mesh,
                             categories: jax.Array | None = None) -> jax.Array:
  """``flair.softce_clip_loss`` of the global batch, each device computing only its own rows.

  Equal to ``softce_clip_loss(logits_per_text(txt, img, s), T)`` with T the co-occurrence targets of
  ``categories`` (identity targets when None), but no device builds the (N, N) logits or targets:
  device d gathers the embeddings (N·P) and builds the (n, N) rows of its n texts against every
  image and of its n images against every text (open_clip's local loss), so per-device memory is
  linear in the global batch N at a fixed per-device batch n.

  Args:
    txt, img: (N, P) embeddings, the batch sharded over the mesh's data axes.
    logit_scale: the log-temperature (replicated).
    mesh: the training mesh.
    categories: (N,) int category ids, sharded like the batch; None = identity targets.
  """
  from jax.sharding import PartitionSpec as P

  axes = distributed.data_axes(mesh)
  n_global = txt.shape[0]
  identity = categories is None
  if identity:
    categories = jnp.arange(n_global, dtype=jnp.int32)  # identity targets: a distinct "category" per row

  def local(txt_l, img_l, scale, cats_l):
    txt_all = jax.lax.all_gather(txt_l, axes, tiled=True)
    img_all = jax.lax.all_gather(img_l, axes, tiled=True)
    cats_all = jax.lax.all_gather(cats_l, axes, tiled=True)
    same = (cats_l[:, None] == cats_all[None, :]).astype(jnp.float32)
    # Row r of T is same(c_r, ·) / count(c_r); T is symmetric, so the image rows use the same rows.
    targets = same / jnp.sum(same, axis=-1, keepdims=True)
    factor = jnp.exp(flair._clamped_in_place(scale))

    def soft_ce_sum(rows, others):
      logits = jnp.matmul(rows.astype(jnp.float32), others.astype(jnp.float32).T) * factor
      return jnp.sum(-jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))

    total = soft_ce_sum(txt_l, img_all) + soft_ce_sum(img_l, txt_all)
    return 0.5 * jax.lax.psum(total, axes) / n_global

  batch = P(axes)
  return jax.shard_map(local, mesh=mesh, in_specs=(batch, batch, P(), batch), out_specs=P())(
      txt, img, jnp.asarray(logit_scale, jnp.float32), categories.astype(jnp.int32))


class ContrastiveTask(TaskBase):
  """The contrastive task bundle the loop runs (see ``jaxretina.train.loop.Task``).

  Built from the config and the size of the training split; it opens no data until
  ``data_streams`` (``make_contrastive_task`` opens the split for the loop), so the step can be
  built and run on given inputs (the train-step parity handlers do).
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh, num_train_examples: int, train_source=None):
    self.config = config
    self.mesh = mesh
    self.tokenizer = two_tower.build_tokenizer(config.text)
    self.text_config = two_tower.build_text_config(config.text, self.tokenizer)
    self.model = two_tower.build_model(config, self.text_config)
    self.global_batch_size = distributed.global_batch_size(config, mesh)
    self.local_batch_size = distributed.local_batch_size(self.global_batch_size, mesh)
    self.train_source = train_source
    self.steps_per_epoch = max(int(num_train_examples) // self.global_batch_size, 1)
    epochs = config.epochs - config.start_epoch
    self.total_steps = int(config.total_steps or math.ceil(epochs * self.steps_per_epoch))
    self.schedule = optim.make_schedule(config.schedule, self.steps_per_epoch, self.total_steps)
    self.tx = optim.make_optimizer(config.optimizer, self.schedule)
    if config.augment.recipe not in configlib.CONTRASTIVE_AUGMENT_RECIPES:
      raise ValueError(f"config.augment.recipe={config.augment.recipe!r}: expected one of "
                       f"{configlib.CONTRASTIVE_AUGMENT_RECIPES}")
    self.groups = distributed.num_data_shards(mesh) if config.loss.contrastive_scope == "per_device" else 1
    self.microbatches = microbatch.check(config.microbatches, self.global_batch_size,
                                         distributed.num_data_shards(mesh))
    logging.info("contrastive task: %d train examples, %d steps/epoch, %d steps", num_train_examples,
                 self.steps_per_epoch, self.total_steps)

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one global loader batch (what ``train_step`` takes), for compiling
    without data (``python -m jaxretina.aot``)."""
    b, s, length = self.global_batch_size, int(self.config.data.image_size), int(self.config.text.max_length)
    fields = {"image": ((b, s, s, 3), jnp.uint8), "input_ids": ((b, length), jnp.int32),
              "attention_mask": ((b, length), jnp.int32), "category_id": ((b,), jnp.int32)}
    if self.config.knowledge.enabled:
      fields.update({f"kd/{k}": v for k, v in list(fields.items())})
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in fields.items()}

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
    init = self.config.init
    if not (init.checkpoint or init.vision_checkpoint or init.text_pretrained):
      return state
    variables = jax.device_get(state.variables())
    if init.checkpoint:
      variables = flair.load_flair_checkpoint(init.checkpoint, self.model)
    if init.vision_checkpoint:
      s = self.config.data.image_size
      vis = resnet_lib.from_torch(load_torch_checkpoint(init.vision_checkpoint), self.model.vision,
                                  input_shape=(1, s, s, 3))
      variables["params"]["vision_model"]["model"] = vis["params"]
      variables["batch_stats"]["vision_model"]["model"] = vis["batch_stats"]
    if init.text_pretrained:
      _, text_vars = bert_lib.load_hf_bert(init.text_pretrained, add_pooling_layer=False)
      variables["params"]["text_model"]["model"] = text_vars["params"]
    shard = lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding)  # noqa: E731
    params = jax.tree.map(shard, variables["params"], state.params)
    batch_stats = jax.tree.map(shard, variables.get("batch_stats", {}), state.batch_stats)
    return state.replace(params=params, batch_stats=batch_stats, opt_state=self.tx.init(params))

  # ------------------------------------------------------------------ data
  def data_streams(self, mesh) -> dict[str, Any]:
    c, d = self.config, self.config.data
    common = dict(tokenize=self.tokenizer, max_length=c.text.max_length, category_names=list(d.category_names),
                  global_batch_size=self.global_batch_size, process_index=jax.process_index(),
                  process_count=jax.process_count(), image_size=d.image_size)
    streams = {"main": iter(pipeline.image_text_batches(
        self.train_source, caption_template=d.caption_template, augment_description=d.augment_description,
        use_caption=False, seed=c.seed, **common))}
    if c.knowledge.enabled:
      kd_source = pipeline.open_source(c.knowledge.name or d.name, c.knowledge.split,
                                       c.knowledge.data_dir or d.data_dir,
                                       dict(c.knowledge.builder_kwargs or d.builder_kwargs or {}))
      streams["kd"] = iter(pipeline.knowledge_batches(
          kd_source, use_caption=c.knowledge.use_caption, caption_template=d.caption_template,
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
    if c.augment.recipe == "flair":
      images = flair_augment(key, images)
    inputs = {"images": images, "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "category_id": batch["category_id"]}
    if c.knowledge.enabled:
      inputs.update(kd_images=batch["kd/image"].astype(jnp.float32) / 255.0, kd_input_ids=batch["kd/input_ids"],
                    kd_attention_mask=batch["kd/attention_mask"])
      if c.knowledge.targets != "identity":
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

  def _clip_loss(self, logit_scale, img, txt, inputs, prefix: str) -> jax.Array:
    """The soft CLIP loss of one stream: per group (per-device scope), or over the global batch with
    each device computing its own rows (``sharded_softce_clip_loss``). Explicit targets (the parity
    fixtures) take the dense global formulation."""
    if self.groups > 1 or f"{prefix}target" in inputs:
      logits_fn = lambda t, i: flair.logits_per_text(t, i, logit_scale)  # noqa: E731
      return grouped_softce(logits_fn, img, txt, lambda s, n: self._targets(inputs, prefix, s, n), self.groups)
    return sharded_softce_clip_loss(txt, img, logit_scale, self.mesh, inputs.get(f"{prefix}category_id"))

  def _pool_lengths(self, attention_mask: jax.Array) -> jax.Array | None:
    """Per row, the longest text of its contrastive group: upstream tokenises each rank's batch
    with ``padding=True``, so that is the length its text pooling averages over."""
    if self.groups == 1:
      return None
    lengths = jnp.sum(attention_mask.astype(jnp.int32), axis=-1).reshape(self.groups, -1)
    return jnp.repeat(jnp.max(lengths, axis=-1), attention_mask.shape[0] // self.groups)

  def embed(self, params, batch_stats, inputs, dropout_rng, pool_lengths=None):
    """Both towers in train mode → ``(embeddings, new batch_stats)``: ``img``, ``txt`` (and
    ``kd_img``, ``kd_txt`` with the knowledge stream). ``pool_lengths``: ``{'': (B,), 'kd_': (B_k,)}``
    text pooling lengths per row (default: each stream's ``_pool_lengths``)."""
    with_knowledge = self.config.knowledge.enabled
    if pool_lengths is None:
      pool_lengths = {"": self._pool_lengths(inputs["attention_mask"])}
      if with_knowledge:
        pool_lengths["kd_"] = self._pool_lengths(inputs["kd_attention_mask"])

    def forward(m):
      out = {"img": m.encode_image(inputs["images"], train=True),
             "txt": m.encode_text(inputs["input_ids"], inputs["attention_mask"], train=True,
                                  pool_lengths=pool_lengths[""])}
      if with_knowledge:
        out["kd_img"] = m.encode_image(inputs["kd_images"], train=True)
        out["kd_txt"] = m.encode_text(inputs["kd_input_ids"], inputs["kd_attention_mask"], train=True,
                                      pool_lengths=pool_lengths["kd_"])
      return out

    out, new_vars = self.model.apply({"params": params, "batch_stats": batch_stats}, method=forward,
                                     mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    return out, new_vars["batch_stats"]

  def embedding_loss(self, params, emb, inputs, dropout_rng):
    """The objective on the embeddings of the whole batch → ``(loss, metrics)``: the soft CLIP losses,
    and with the knowledge stream the expert revision and its MSE."""
    c = self.config
    loss_main = self._clip_loss(params["logit_scale"], emb["img"], emb["txt"], inputs, "")
    metrics = {"loss_main": loss_main}
    loss = loss_main
    if c.knowledge.enabled:
      revised = self.model.apply({"params": params}, emb["img"], emb["kd_img"], emb["kd_txt"], train=True,
                                 groups=self.groups, method=flair.TwoTower.revise,
                                 rngs={"dropout": jax.random.fold_in(dropout_rng, 1)})
      loss_kd = self._clip_loss(params["logit_scale"], emb["kd_img"], emb["kd_txt"], inputs, "kd_")
      loss_revision = jnp.mean(jnp.square(emb["txt"].astype(jnp.float32) - revised.astype(jnp.float32)))
      loss = loss + loss_kd + c.knowledge.weight * loss_revision
      metrics.update(loss_kd=loss_kd, loss_revision=loss_revision)
    metrics["loss"] = loss
    return loss, metrics

  def loss_fn(self, params, batch_stats, inputs, dropout_rng):
    """The objective on prepared inputs → ``(loss, (metrics, new batch_stats))``.

    The logit scale enters as it is: the step clamps the parameter before differentiating, as
    upstream clamps ``logit_scale.data`` in place before its forward.
    """
    emb, new_stats = self.embed(params, batch_stats, inputs, dropout_rng)
    loss, metrics = self.embedding_loss(params, emb, inputs, dropout_rng)
    return loss, (metrics, new_stats)

  def microbatched_grads(self, params, batch_stats, inputs, dropout_rng):
    """``value_and_grad(loss_fn)`` with the towers run in ``config.microbatches`` sequential pieces,
    keeping every negative (GradCache, Gao et al. 2021).

    1. Embed each microbatch without keeping its activations (a scan; BatchNorm running statistics
       update once per microbatch, in order).
    2. Loss of the whole batch on the embeddings; its gradient with respect to the embeddings and to
       the parameters used on them directly (logit scale, revision attention).
    3. Re-run each microbatch's towers and pull its embedding gradient back to the parameters.

    BatchNorm normalises each microbatch with its own statistics (as K accumulation steps or K
    data-parallel ranks without SyncBN would), so the gradient equals the full-batch one exactly
    for every layer but BatchNorm's batch statistics.
    """
    with_knowledge = self.config.knowledge.enabled
    shards = distributed.num_data_shards(self.mesh)
    k = self.microbatches

    def full_lengths(mask):
      per_row = self._pool_lengths(mask)
      if per_row is None:  # one group: the whole batch's longest text, spelled out per row
        per_row = jnp.full(mask.shape[:1], jnp.max(jnp.sum(mask.astype(jnp.int32), axis=-1)), jnp.int32)
      return per_row

    tower_inputs = {name: inputs[name] for name in ("images", "input_ids", "attention_mask")}
    tower_inputs["pool"] = full_lengths(inputs["attention_mask"])
    if with_knowledge:
      tower_inputs.update({name: inputs[name] for name in ("kd_images", "kd_input_ids", "kd_attention_mask")})
      tower_inputs["kd_pool"] = full_lengths(inputs["kd_attention_mask"])
    chunks = microbatch.split(tower_inputs, k, shards)
    keys = jax.random.split(dropout_rng, k)

    def embed_chunk(p, stats, chunk, key):
      pools = {"": chunk["pool"], "kd_": chunk.get("kd_pool")}
      return self.embed(p, stats, chunk, key, pool_lengths=pools)

    def first_pass(stats, xs):
      chunk, key = xs
      emb, stats = embed_chunk(params, stats, chunk, key)
      return stats, emb

    new_stats, emb_chunks = jax.lax.scan(first_pass, batch_stats, (chunks, keys))
    emb_chunks = jax.lax.stop_gradient(emb_chunks)
    (loss, metrics), (direct_grads, emb_grads) = jax.value_and_grad(self.embedding_loss, argnums=(0, 1),
                                                                    has_aux=True)(
        params, microbatch.merge(emb_chunks, shards), inputs, dropout_rng)
    emb_grad_chunks = microbatch.split(emb_grads, k, shards)

    def second_pass(grads, xs):
      chunk, key, emb_grad = xs
      # Train-mode BatchNorm normalises with the microbatch's own statistics, so this forward equals
      # the first pass whatever running statistics it is given.
      _, pull_back = jax.vjp(lambda p: embed_chunk(p, batch_stats, chunk, key)[0], params)
      (chunk_grads,) = pull_back(emb_grad)
      return jax.tree.map(jnp.add, grads, chunk_grads), None

    grads, _ = jax.lax.scan(second_pass, direct_grads, (chunks, keys, emb_grad_chunks))
    return (loss, (metrics, new_stats)), grads

  def step_on_inputs(self, state: TrainState, inputs, dropout_rng: jax.Array):
    """One optimisation step on prepared inputs → ``(new_state, metrics, gradients before clipping)``.

    Upstream order: clamp ``logit_scale`` in place to [0, ln 100], forward/backward at the clamped
    value, clip the global gradient norm, AdamW. The clamped value is what the gradient, the
    weight decay and the update see; nothing clamps after the update (the next step does).
    """
    params = dict(state.params, logit_scale=flair.clamp_logit_scale(state.params["logit_scale"]))
    if self.microbatches > 1:
      (loss, (metrics, batch_stats)), grads = self.microbatched_grads(params, state.batch_stats, inputs, dropout_rng)
    else:
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
  def evaluators(self, workdir: str | None) -> evaluators_lib.Evaluators:
    """The evaluators of ``config.evals`` on this model, writing their reports under ``workdir``."""
    model, config = self.model, self.config
    prompt, classes = zero_shot.prompt_of(config.evals)
    return evaluators_lib.from_config(
        config.evals, workdir=workdir, mesh=self.mesh,
        encode_images=lambda v, images: model.apply(v, images, train=False, method=type(model).encode_image),
        encode_texts=lambda v, ids, mask: model.apply(v, ids, mask, train=False, method=type(model).encode_text),
        model=model, tokenizer=self.tokenizer, max_length=int(config.text.max_length), prompt=prompt,
        classes=classes, data=config.data, image_size=int(config.data.image_size),
        batch_size=self.global_batch_size)


def make_contrastive_task(config, mesh) -> ContrastiveTask:
  """The task on ``config.data``'s training split (built first when ``build_if_missing``)."""
  d = config.data
  if d.build_if_missing:
    datasets.ensure_built(d.name, d.data_dir, **dict(d.builder_kwargs or {}))
  source = pipeline.open_source(d.name, d.train_split, d.data_dir, dict(d.builder_kwargs or {}))
  source = pipeline.pretraining_source(source, balance=bool(d.balance), banned_categories=list(d.banned_categories),
                                       banned_match=d.banned_match, seed=int(config.seed))
  return ContrastiveTask(config, mesh, len(source), train_source=source)

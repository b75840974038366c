"""Contrastive image–text pretraining: FLAIR, and KeepFIT's knowledge-enhanced objective.

One step (KeepFIT, ``train_epoch_with_KD_loss_Atte_s``; FLAIR is the same with ``config.kd`` off):

  I  = f_img(aug(images))     T  = f_txt(prompt tokens)        L_main = softCLIP(T·Iᵀ·e^s, co-occurrence)
  I_k = f_img(kd images)      T_k = f_txt(kd caption tokens)   L_kd   = softCLIP(T_k·I_kᵀ·e^s, targets_kd)
  R = MHA(query=I, key=I_k, value=T_k)                         L = L_main + L_kd + w·MSE(T, R)

then AdamW with FLAIR's per-iteration warm-up/cosine, global-norm clipping, and the logit scale
clamped to [0, ln 100] after the update as upstream clamps it in place.

Upstream runs DDP with per-rank losses and per-rank BatchNorm; here the step is one jitted program
over the global batch. ``config.loss.contrastive_scope='per_device'`` reproduces per-rank
contrastive losses (the batch is split into as many groups as there are data shards); BatchNorm
statistics are always global (SyncBN-like).
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
  """Soft-target CLIP loss over ``groups`` equal slices of the batch (1 = the global batch)."""
  if groups == 1:
    return flair.softce_clip_loss(logits_fn(txt, img), target_fn(slice(None)))
  b = img.shape[0] // groups
  losses = [flair.softce_clip_loss(logits_fn(txt[g * b:(g + 1) * b], img[g * b:(g + 1) * b]),
                                   target_fn(slice(g * b, (g + 1) * b))) for g in range(groups)]
  return jnp.mean(jnp.stack(losses))


class ContrastiveTask:
  """The contrastive task bundle the loop runs (see ``jaxretina.train.loop.Task``)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh):
    self.config = config
    self.mesh = mesh
    self.tokenizer = build_tokenizer(config.text)
    self.text_config = build_text_config(config.text, self.tokenizer)
    self.model = build_model(config, self.text_config)
    self.global_batch_size = int(config.batch_size)
    self.local_batch_size = distributed.local_batch_size(self.global_batch_size, mesh)

    from jaxretina.data import pipeline

    d = config.data
    self._ensure_built()
    self.train_source = pipeline.open_source(d.name, d.train_split, d.data_dir, dict(d.get("builder_kwargs") or {}))
    n_train = len(self.train_source)
    self.steps_per_epoch = max(n_train // self.global_batch_size, 1)
    epochs = config.epochs - config.get("start_epoch", 0)
    self.total_steps = int(config.get("total_steps") or math.ceil(epochs * self.steps_per_epoch))
    self.schedule = optim.make_schedule(config.schedule, self.steps_per_epoch, self.total_steps)
    self.tx = optim.make_optimizer(config.optimizer, self.schedule)
    self.groups = distributed.num_data_shards(mesh) if config.loss.get("contrastive_scope") == "per_device" else 1
    logging.info("contrastive task: %d train examples, %d steps/epoch, %d steps", n_train, self.steps_per_epoch,
                 self.total_steps)

  def _ensure_built(self):
    d = self.config.data
    if d.get("build_if_missing", False):
      from jaxretina import datasets

      datasets.ensure_built(d.name, d.data_dir, **dict(d.get("builder_kwargs") or {}))

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

  def train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    c = self.config
    rng, aug_rng, drop_rng = jax.random.split(state.rng, 3)
    images = batch["image"].astype(jnp.float32) / 255.0
    if c.get("augment", "flair") == "flair":
      from jaxretina.data.augment import flair_augment

      images = flair_augment(aug_rng, images)
    kd = c.kd.enabled
    if kd:
      kd_images = batch["kd/image"].astype(jnp.float32) / 255.0  # KeepFIT does not augment the KD batch

    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}

      def forward(m):
        img = m.encode_image(images, train=True)
        txt = m.encode_text(batch["input_ids"], batch["attention_mask"], train=True)
        out = {"img": img, "txt": txt}
        if kd:
          out["kd_img"] = m.encode_image(kd_images, train=True)
          out["kd_txt"] = m.encode_text(batch["kd/input_ids"], batch["kd/attention_mask"], train=True)
          out["revised"] = m.revise(img, out["kd_img"], out["kd_txt"], train=True)
        return out

      out, new_vars = self.model.apply(variables, method=forward, mutable=["batch_stats"],
                                       rngs={"dropout": drop_rng})
      scale = flair.clamp_logit_scale(params["logit_scale"])
      logits_fn = lambda t, i: flair.logits_per_text(t, i, scale)  # noqa: E731
      cats = batch["category_id"]
      loss_main = grouped_softce(logits_fn, out["img"], out["txt"],
                                 lambda s: flair.cooccurrence_targets(cats[s]), self.groups)
      metrics = {"loss_main": loss_main}
      loss = loss_main
      if kd:
        if c.kd.targets == "identity":
          kd_target = lambda s: flair.identity_targets(out["kd_img"][s].shape[0])  # noqa: E731
        else:
          kd_cats = batch["kd/category_id"]
          kd_target = lambda s: flair.cooccurrence_targets(kd_cats[s])  # noqa: E731
        loss_kd = grouped_softce(logits_fn, out["kd_img"], out["kd_txt"], kd_target, self.groups)
        loss_revision = jnp.mean(jnp.square(out["txt"].astype(jnp.float32) - out["revised"].astype(jnp.float32)))
        loss = loss + loss_kd + c.kd.weight * loss_revision
        metrics.update(loss_kd=loss_kd, loss_revision=loss_revision)
      metrics["loss"] = loss
      return loss, (metrics, new_vars["batch_stats"])

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = dict(params, logit_scale=flair.clamp_logit_scale(params["logit_scale"]))
    grad_norm = optax.global_norm(grads)
    metrics.update(grad_norm=grad_norm, lr=self.schedule(state.step),
                   logit_scale=jnp.exp(params["logit_scale"]),
                   all_finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                              rng=rng)
    return new_state, metrics

  # ------------------------------------------------------------------ eval
  def evaluate(self, state: TrainState, mesh) -> dict[str, float]:
    from jaxretina.evaluators import run_evaluators

    self.eval_step = int(jax.device_get(state.step))
    return run_evaluators(self, state.variables(), mesh)


@register_task("contrastive")
def make_contrastive_task(config, mesh) -> ContrastiveTask:
  return ContrastiveTask(config, mesh)

"""Optimizers and learning-rate schedules named in the config, with the upstream recipes' semantics."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def flair_warmup_cosine(base_lr: float, steps_per_epoch: int, warmup_epochs: float = 1.0,
                        max_epochs: float = 100.0, eta_min: float = 0.0,
                        warmup_start_lr: float | None = None) -> Callable[[Any], Any]:
  """FLAIR's ``LinearWarmupCosineAnnealingLR`` stepped per iteration (flair/pretraining/utils.py).

  W = warm-up iterations, T = max_epochs·steps_per_epoch, lr₀ = base_lr / W (``fit`` passes
  ``warmup_start_lr = lr / (warmup_epoch · len(loader))``):
  t < W: lr₀ + t·(lr − lr₀)/(W − 1);  t ≥ W: η_min + (lr − η_min)·½(1 + cos(π(t − W)/(T − W))).
  FLAIR/KeepFIT set max_epochs=100 whatever the run length, so the cosine barely decays.
  """
  warmup = max(int(round(warmup_epochs * steps_per_epoch)), 1)
  total = max(int(round(max_epochs * steps_per_epoch)), warmup + 1)
  lr0 = base_lr / (warmup_epochs * steps_per_epoch) if warmup_start_lr is None else warmup_start_lr

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warm = lr0 + t * (base_lr - lr0) / max(warmup - 1, 1)
    progress = (t - warmup) / (total - warmup)
    cos = eta_min + (base_lr - eta_min) * 0.5 * (1.0 + jnp.cos(math.pi * jnp.clip(progress, 0.0, 1.0)))
    return jnp.where(t < warmup, warm, cos)

  return schedule


def epoch_step_decay(base_lr: float, steps_per_epoch: int, gamma: float, every_epochs: float,
                     continuous: bool = False) -> Callable[[Any], Any]:
  """lr·γ^⌊epoch / every⌋ (DualAttendMed: 0.8 every 10 epochs; WS-DAN StepLR: 0.9 every 2).

  ``continuous`` uses the fractional epoch without the floor: CAL's per-iteration
  lr·0.9^((epoch + i/len)/2).
  """

  def schedule(step):
    epoch = jnp.asarray(step, jnp.float32) / steps_per_epoch
    exponent = epoch / every_epochs if continuous else jnp.floor(epoch / every_epochs)
    return base_lr * jnp.power(gamma, exponent)

  return schedule


SCHEDULES = ("flair_warmup_cosine", "warmup_cosine", "constant", "epoch_step_decay")


def make_schedule(cfg: Any, steps_per_epoch: int, total_steps: int) -> Callable[[Any], Any]:
  """``cfg`` is ``config.schedule``; ``name`` one of ``SCHEDULES``."""
  name = cfg.name
  lr = float(cfg.lr)
  if name == "epoch_step_decay":
    return epoch_step_decay(lr, steps_per_epoch, float(cfg.gamma), float(cfg.every_epochs),
                            bool(cfg.continuous))
  if name == "flair_warmup_cosine":
    return flair_warmup_cosine(lr, steps_per_epoch, cfg.warmup_epochs, cfg.max_epochs,
                               cfg.eta_min)
  if name == "warmup_cosine":
    warm = int(cfg.warmup_steps)
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warm, 1), max(total_steps, warm + 1),
                                              cfg.eta_min)
  if name == "constant":
    return optax.constant_schedule(lr)
  raise ValueError(f"config.schedule.name={name!r}: expected one of {SCHEDULES}")


def make_optimizer(cfg: Any, schedule: Callable[[Any], Any], trainable: Any = None) -> optax.GradientTransformation:
  """``cfg`` is ``config.optimizer``: ``name`` in {adamw, sgd}, ``weight_decay``, ``grad_clip``.

  torch AdamW ⇔ ``optax.adamw`` (decoupled decay lr·λ·p, eps outside the sqrt). torch SGD with
  weight decay adds λ·p to the gradient before momentum: ``add_decayed_weights`` then ``sgd``.

  ``trainable``: a pytree of bools shaped like the params (None = all). Frozen leaves get no
  update at all (no weight decay either) and no optimizer state, as parameters a torch optimizer
  was never given; the gradient clip sees only the trainable gradients.
  """
  tx = _make_optimizer(cfg, schedule)
  if trainable is None:
    return tx
  labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def _make_optimizer(cfg: Any, schedule: Callable[[Any], Any]) -> optax.GradientTransformation:
  name = cfg.name
  parts = []
  if cfg.grad_clip:
    parts.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
  if name == "adamw":
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=float(cfg.weight_decay)))
  elif name == "sgd":
    if cfg.weight_decay:
      parts.append(optax.add_decayed_weights(float(cfg.weight_decay)))
    parts.append(optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov))
  else:
    raise ValueError(f"config.optimizer.name={name!r}: expected adamw or sgd")
  return optax.chain(*parts)


def apply_gradients(state: Any, grads: Any, tx: optax.GradientTransformation, *, params: Any = None,
                    batch_stats: Any = None, system_state: Any = None) -> Any:
  """One optimizer update of a ``TrainState``: clipping, weight decay and the step, as ``tx`` says.

  ``params``: the parameters the gradient was taken at when the step changed them first (the
  contrastive step's in-place logit-scale clamp); default ``state.params``. ``batch_stats`` and
  ``system_state``: the forward's updated non-gradient state (default: unchanged).
  """
  params = state.params if params is None else params
  updates, opt_state = tx.update(grads, state.opt_state, params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(params, updates), opt_state=opt_state,
                       batch_stats=state.batch_stats if batch_stats is None else batch_stats,
                       system_state=state.system_state if system_state is None else system_state)

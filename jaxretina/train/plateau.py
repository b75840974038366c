"""Per-epoch learning-rate reduction on a plateau and early stopping, on a monitored evaluation metric.

Two upstream recipes step these once per epoch on a validation metric (docs/systems.md):
BiRA-Net ``ReduceLROnPlateau(mode='max', factor=0.1, patience=6)`` on test accuracy and an early stop
after 10 epochs without improvement; FCN-CLIP ``ReduceLROnPlateau(mode='min', factor=0.5,
patience=2)`` on validation loss, early stopping with patience 7 and the best-validation-loss
checkpoint. Configured by

  config.eval_every_epochs = 1   # the loop evaluates at every epoch end and then calls the task's hook
  config.reduce_on_plateau = dict(metric='validation/loss', mode='min', factor=0.5, patience=2,
                                  threshold=1e-4, threshold_mode='rel', cooldown=0, min_lr=0.0, eps=1e-8)
  config.early_stopping = dict(metric='validation/loss', mode='min', patience=7, min_delta=0.0, keep_best=True)

(``metric`` '' = off; metric names are the evaluators' keys, ``<evaluator>/<metric>``).

``ReduceLROnPlateau`` follows ``torch.optim.lr_scheduler.ReduceLROnPlateau`` exactly (defaults included:
threshold 1e-4 in 'rel' mode, cooldown 0, min_lr 0, eps 1e-8): an evaluation is *better* when
``a < best·(1 − threshold)`` ('min', 'rel'), ``a > best·(1 + threshold)`` ('max', 'rel'), or
``a < best − threshold`` / ``a > best + threshold`` ('abs'); after more than ``patience`` evaluations
that are not better the rate becomes ``max(lr·factor, min_lr)`` (only if that lowers it by more
than ``eps``), then ``cooldown`` evaluations are ignored. One evaluation = one torch ``step(metric)``.
The rate is the schedule's (``config.schedule``) times a scale kept in the optimizer state: the
last transformation of the optimizer multiplies every update by it, which for SGD (with momentum
and weight decay) and AdamW is exactly a multiplied learning rate. ``min_lr`` and ``eps`` are read
against ``config.schedule.lr`` × scale.

``EarlyStopping`` is the loops upstream write by hand: an evaluation improves when it beats the best
so far strictly (``a < best − min_delta`` for 'min', ``a > best + min_delta`` for 'max'; no relative
threshold), and the run stops once ``patience`` evaluations in a row did not improve. The loop then
writes a final checkpoint and says why it stopped; with ``keep_best`` it also keeps the checkpoint
of the best evaluation under ``<workdir>/checkpoints_best/``.

Everything the two rules remember (scale, best values — as float64 bit patterns, so a resumed run
compares exactly as an uninterrupted one — counters, the best step) lives in a ``PlateauState`` inside
the optimizer state: it is checkpointed with the run and survives resume. The rules run on the host
after each epoch's evaluation (``Controller.after_evaluation``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

MODES = ("min", "max")
THRESHOLD_MODES = ("rel", "abs")


class PlateauState(NamedTuple):
  """The optimizer-state leaf of ``scale_by_plateau`` (all replicated scalars)."""

  scale: jax.Array  # float32 (): multiplies every update (the learning-rate scale)
  best: jax.Array  # uint32 (2,): float64 bits of ReduceLROnPlateau's best
  num_bad_epochs: jax.Array  # int32
  cooldown_counter: jax.Array  # int32
  last_epoch: jax.Array  # int32: evaluations seen
  stop_best: jax.Array  # uint32 (2,): float64 bits of early stopping's best
  stop_bad_epochs: jax.Array  # int32: evaluations in a row without improvement
  stop_best_step: jax.Array  # int32: train step of the best evaluation (-1 = none yet)


def _bits(value: float) -> np.ndarray:
  return np.array([value], np.float64).view(np.uint32)


def _float(bits) -> float:
  return float(np.asarray(bits, np.uint32).view(np.float64)[0])


def _worst(mode: str) -> float:
  return math.inf if mode == "min" else -math.inf


def initial_state(plateau_mode: str = "min", stop_mode: str = "min") -> PlateauState:
  return PlateauState(scale=jnp.ones((), jnp.float32), best=jnp.asarray(_bits(_worst(plateau_mode))),
                      num_bad_epochs=jnp.zeros((), jnp.int32), cooldown_counter=jnp.zeros((), jnp.int32),
                      last_epoch=jnp.zeros((), jnp.int32), stop_best=jnp.asarray(_bits(_worst(stop_mode))),
                      stop_bad_epochs=jnp.zeros((), jnp.int32), stop_best_step=jnp.full((), -1, jnp.int32))


def scale_by_plateau(plateau_mode: str = "min", stop_mode: str = "min") -> optax.GradientTransformation:
  """Multiplies the updates by the ``PlateauState.scale`` it carries (set host-side, never by the step)."""

  def init_fn(params):
    del params
    return initial_state(plateau_mode, stop_mode)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: u * state.scale.astype(u.dtype), updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def _is_plateau_state(x) -> bool:
  return isinstance(x, PlateauState)


def find_state(opt_state: Any) -> PlateauState | None:
  """The ``PlateauState`` inside an optimizer state, or None when the optimizer has none."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_plateau_state) if _is_plateau_state(x)]
  if len(found) > 1:
    raise ValueError(f"the optimizer state holds {len(found)} PlateauStates; expected at most one")
  return found[0] if found else None


def lr_scale(opt_state: Any) -> jax.Array:
  """The current learning-rate scale (1 without a plateau rule); usable inside jit."""
  state = find_state(opt_state)
  return jnp.ones((), jnp.float32) if state is None else state.scale


def _host(x) -> np.ndarray:
  # Replicated leaves: every process holds the whole value (works on multi-host meshes too).
  if isinstance(x, jax.Array):
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def _like(value, old) -> jax.Array:
  value = np.asarray(value, old.dtype).reshape(old.shape)
  if isinstance(old, jax.Array) and hasattr(old, "sharding"):
    return jax.make_array_from_callback(value.shape, old.sharding, lambda index: value[index])
  return jnp.asarray(value)


@dataclasses.dataclass(frozen=True)
class ReduceLROnPlateau:
  """``torch.optim.lr_scheduler.ReduceLROnPlateau``'s rule on a learning-rate *scale* (see the module doc)."""

  mode: str = "min"
  factor: float = 0.1
  patience: int = 10
  threshold: float = 1e-4
  threshold_mode: str = "rel"
  cooldown: int = 0
  min_lr: float = 0.0
  eps: float = 1e-8

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"config.reduce_on_plateau.mode={self.mode!r}: expected one of {MODES}")
    if self.threshold_mode not in THRESHOLD_MODES:
      raise ValueError(f"config.reduce_on_plateau.threshold_mode={self.threshold_mode!r}: expected one of "
                       f"{THRESHOLD_MODES}")
    if not 0.0 < self.factor < 1.0:
      raise ValueError(f"config.reduce_on_plateau.factor={self.factor}: expected a factor in (0, 1)")
    if self.patience < 0 or self.cooldown < 0 or self.min_lr < 0:
      raise ValueError("config.reduce_on_plateau: patience, cooldown and min_lr must be >= 0, got "
                       f"{self.patience}, {self.cooldown}, {self.min_lr}")

  def is_better(self, a: float, best: float) -> bool:
    if self.mode == "min" and self.threshold_mode == "rel":
      return a < best * (1.0 - self.threshold)
    if self.mode == "min":
      return a < best - self.threshold
    if self.threshold_mode == "rel":
      return a > best * (self.threshold + 1.0)
    return a > best + self.threshold

  def step(self, tracker: dict, metric: float, base_lr: float) -> dict:
    """One ``scheduler.step(metric)``. ``tracker``: scale, best, num_bad_epochs, cooldown_counter, last_epoch."""
    t = dict(tracker)
    current = float(metric)
    t["last_epoch"] += 1
    if self.is_better(current, t["best"]):
      t["best"] = current
      t["num_bad_epochs"] = 0
    else:
      t["num_bad_epochs"] += 1
    if t["cooldown_counter"] > 0:
      t["cooldown_counter"] -= 1
      t["num_bad_epochs"] = 0  # torch ignores bad epochs in cooldown
    if t["num_bad_epochs"] > self.patience:
      old_lr = base_lr * t["scale"]
      new_lr = max(old_lr * self.factor, self.min_lr)
      if old_lr - new_lr > self.eps:
        t["scale"] = new_lr / base_lr
      t["cooldown_counter"] = self.cooldown
      t["num_bad_epochs"] = 0
    return t


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  """Stop after ``patience`` evaluations in a row without a strict improvement (see the module doc)."""

  mode: str = "min"
  patience: int = 0
  min_delta: float = 0.0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"config.early_stopping.mode={self.mode!r}: expected one of {MODES}")
    if self.patience < 1:
      raise ValueError(f"config.early_stopping.patience={self.patience}: expected >= 1 with a metric set")
    if self.min_delta < 0:
      raise ValueError(f"config.early_stopping.min_delta={self.min_delta}: expected >= 0")

  def improves(self, a: float, best: float) -> bool:
    return a < best - self.min_delta if self.mode == "min" else a > best + self.min_delta

  def step(self, tracker: dict, metric: float, step: int) -> tuple[dict, bool]:
    """``tracker``: stop_best, stop_bad_epochs, stop_best_step → (new tracker, improved)."""
    t = dict(tracker)
    improved = self.improves(float(metric), t["stop_best"])
    if improved:
      t.update(stop_best=float(metric), stop_bad_epochs=0, stop_best_step=int(step))
    else:
      t["stop_bad_epochs"] += 1
    return t, improved

  def should_stop(self, tracker: Mapping[str, Any]) -> bool:
    return tracker["stop_bad_epochs"] >= self.patience


@dataclasses.dataclass
class Report:
  """What one evaluation did: scalars for the metrics file, whether the early-stopping metric improved
  (the best checkpoint), why the run stops (None: it goes on), and what changed, for the log."""

  scalars: dict
  improved: bool
  stop_reason: str | None
  messages: list


def _metric_name(cfg) -> str:
  return str(cfg.metric).removeprefix("eval/")


class Controller:
  """Both rules as ``config.reduce_on_plateau`` / ``config.early_stopping`` set them (either may be off;
  the fields and their defaults: ``configlib.classification_config``)."""

  def __init__(self, config):
    rp, es = config.reduce_on_plateau, config.early_stopping
    self.plateau_metric = _metric_name(rp)
    self.stop_metric = _metric_name(es)
    self.plateau = None
    self.stopping = None
    if self.plateau_metric:
      self.plateau = ReduceLROnPlateau(
          mode=str(rp.mode), factor=float(rp.factor), patience=int(rp.patience), threshold=float(rp.threshold),
          threshold_mode=str(rp.threshold_mode), cooldown=int(rp.cooldown), min_lr=float(rp.min_lr),
          eps=float(rp.eps))
    if self.stop_metric:
      self.stopping = EarlyStopping(mode=str(es.mode), patience=int(es.patience), min_delta=float(es.min_delta))
    self.keep_best = bool(self.stopping is not None and es.keep_best)
    self.base_lr = float(config.schedule.lr)
    if self.enabled and not int(config.eval_every_epochs):
      raise ValueError("config.reduce_on_plateau / config.early_stopping count evaluations at epoch ends: set "
                       "config.eval_every_epochs=1 (upstream steps them once per epoch)")
    if self.enabled and self.base_lr <= 0:
      raise ValueError(f"config.schedule.lr={self.base_lr}: ReduceLROnPlateau needs a positive base rate")

  @property
  def enabled(self) -> bool:
    return self.plateau is not None or self.stopping is not None

  def wrap(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` followed by the scale (unchanged when neither rule is configured)."""
    if not self.enabled:
      return tx
    return optax.chain(tx, scale_by_plateau(self.plateau.mode if self.plateau else "min",
                                            self.stopping.mode if self.stopping else "min"))

  def read(self, opt_state) -> dict:
    state = find_state(opt_state)
    if state is None:
      raise ValueError("the optimizer state has no PlateauState: build the optimizer with Controller.wrap")
    return {"scale": float(_host(state.scale)), "best": _float(_host(state.best)),
            "num_bad_epochs": int(_host(state.num_bad_epochs)),
            "cooldown_counter": int(_host(state.cooldown_counter)), "last_epoch": int(_host(state.last_epoch)),
            "stop_best": _float(_host(state.stop_best)), "stop_bad_epochs": int(_host(state.stop_bad_epochs)),
            "stop_best_step": int(_host(state.stop_best_step))}

  def write(self, opt_state, tracker: Mapping[str, Any]):
    old = find_state(opt_state)
    new = PlateauState(
        scale=_like(np.float32(tracker["scale"]), old.scale), best=_like(_bits(tracker["best"]), old.best),
        num_bad_epochs=_like(tracker["num_bad_epochs"], old.num_bad_epochs),
        cooldown_counter=_like(tracker["cooldown_counter"], old.cooldown_counter),
        last_epoch=_like(tracker["last_epoch"], old.last_epoch),
        stop_best=_like(_bits(tracker["stop_best"]), old.stop_best),
        stop_bad_epochs=_like(tracker["stop_bad_epochs"], old.stop_bad_epochs),
        stop_best_step=_like(tracker["stop_best_step"], old.stop_best_step))
    return jax.tree.map(lambda x: new if _is_plateau_state(x) else x, opt_state, is_leaf=_is_plateau_state)

  def _lookup(self, metrics: Mapping[str, float], name: str, field: str) -> float:
    flat = {k.removeprefix("eval/"): v for k, v in metrics.items()}
    if name not in flat:
      raise KeyError(f"config.{field}.metric={name!r} is not among this evaluation's metrics "
                     f"{sorted(flat)} (names are '<evaluator>/<metric>' of config.evals)")
    return float(flat[name])

  def after_evaluation(self, opt_state, metrics: Mapping[str, float], step: int) -> tuple[Any, Report]:
    """Both rules on one epoch's evaluation → (new optimizer state, report)."""
    t = self.read(opt_state)
    messages, improved, reason = [], False, None
    if self.plateau is not None:
      old_scale = t["scale"]
      t.update(self.plateau.step(t, self._lookup(metrics, self.plateau_metric, "reduce_on_plateau"), self.base_lr))
      t["scale"] = float(np.float32(t["scale"]))  # what the optimizer state holds
      if t["scale"] != old_scale:
        messages.append(f"{self.plateau_metric} reached a plateau: learning rate × {t['scale']:.6g} "
                        f"(lr {self.base_lr * t['scale']:.6g})")
    if self.stopping is not None:
      t, improved = self.stopping.step(t, self._lookup(metrics, self.stop_metric, "early_stopping"), step)
      if self.stopping.should_stop(t):
        reason = self.stop_reason_of(t)
    scalars = {"lr_scale": t["scale"]}
    if self.plateau is not None:
      scalars["plateau/num_bad_epochs"] = float(t["num_bad_epochs"])
    if self.stopping is not None:
      scalars["early_stopping/bad_epochs"] = float(t["stop_bad_epochs"])
      if math.isfinite(t["stop_best"]):
        scalars["early_stopping/best"] = t["stop_best"]
    return self.write(opt_state, t), Report(scalars=scalars, improved=improved, stop_reason=reason,
                                            messages=messages)

  def stop_reason_of(self, t: Mapping[str, Any]) -> str:
    return (f"early stopping: {self.stop_metric} has not improved for {t['stop_bad_epochs']} evaluations "
            f"(config.early_stopping.patience={self.stopping.patience}); best {t['stop_best']:.6g} at step "
            f"{t['stop_best_step']}")

  def stop_reason(self, opt_state) -> str | None:
    """Why a (restored) run has already stopped, or None."""
    if self.stopping is None:
      return None
    t = self.read(opt_state)
    return self.stop_reason_of(t) if self.stopping.should_stop(t) else None

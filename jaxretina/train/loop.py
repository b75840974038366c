"""The one training loop every task kind runs (contrastive pretraining, classification).

A *task* (scenic's "model bundle") brings the model, its data streams, its loss/step and its
evaluators; this loop brings everything else: mesh and shardings, born-sharded init, resume from
the workdir, the jitted step with donated state, metrics, progress, periodic evaluation, and
checkpoints that are never written from a non-finite state.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterator, Mapping

import jax
import ml_collections
import numpy as np

from jaxretina import configlib
from jaxretina import fileio
from jaxretina import host_memory
from jaxretina import profiling
from jaxretina.train import checkpoint as ckpt_lib
from jaxretina.train import classification, contrastive, distributed
from jaxretina.train import metrics as metrics_lib
from jaxretina.train.metrics import MetricWriter, Progress
from jaxretina.train.state import Task, TrainState


# Where the loop keeps the checkpoint of the best epoch-end evaluation (early stopping's metric).
BEST_CHECKPOINT_DIR = "checkpoints_best"


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN/Inf; the run stopped before saving anything from that state."""


class ConfigChangedError(ValueError):
  """The config differs from the one that trained the workdir in fields that change training."""


def get_task(config, mesh) -> Task:
  """Builds the task bundle named by ``config.task``."""
  factories = {"contrastive": contrastive.make_contrastive_task,
               "classification": classification.make_classification_task}
  if config.task not in factories:
    raise ValueError(f"config.task={config.task!r}: expected one of {sorted(factories)}")
  return factories[config.task](config, mesh)


def state_shardings(mesh, abstract_state: TrainState) -> TrainState:
  rep = distributed.replicated(mesh)
  return TrainState(
      step=rep,
      params=distributed.param_shardings(mesh, abstract_state.params),
      batch_stats=jax.tree.map(lambda _: rep, abstract_state.batch_stats),
      opt_state=distributed.param_shardings(mesh, abstract_state.opt_state),
      rng=rep,
      system_state=jax.tree.map(lambda _: rep, abstract_state.system_state),
  )


def with_sharding(abstract, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def next_batch(streams: Mapping[str, Iterator], mesh) -> dict[str, jax.Array]:
  batch = {}
  for prefix, it in streams.items():
    local = next(it)
    for k, v in distributed.global_batch(local, mesh).items():
      batch[k if prefix == "main" else f"{prefix}/{k}"] = v
  return batch


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict[str, float]:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns final metrics.

  ``workdir`` is a local path or a URL (``gs://bucket/run``; see ``jaxretina.fileio``). A workdir
  that was trained with another config is refused (``ConfigChangedError``, see
  ``config_differences``) unless ``allow_config_change``.
  """
  logging.info("host memory: %s", host_memory.status())
  distributed.maybe_initialize_distributed(config)
  mesh = distributed.make_mesh(config.mesh)
  # Before anything is built or written: a refused config leaves the workdir as it was.
  previous_config = check_config_unchanged(config, workdir, allow_config_change)
  fileio.makedirs(workdir)
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

  task = get_task(config, mesh)
  evaluators = task.evaluators(workdir)  # config.evals; they write their reports (plots, heatmaps) under workdir
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(task.init_state, rng)
  shardings = state_shardings(mesh, abstract)

  checkpointer = ckpt_lib.Checkpointer(fileio.join(workdir, "checkpoints"),
                                       max_to_keep=config.keep_checkpoints,
                                       async_checkpointing=config.async_checkpointing)
  streams = task.data_streams(mesh)
  data_group = ckpt_lib.IteratorGroup(**streams)
  try:
    # The newest step that reads back intact; damaged newer ones are set aside with one line each.
    restored = checkpointer.restore_latest(with_sharding(abstract, shardings), data_group)
  except BaseException:
    checkpointer.close()
    raise
  if restored is not None:
    state, restored_step = restored
    logging.info("resuming from %s step %d", checkpointer.directory, restored_step)
  else:
    state = jax.jit(task.init_state, out_shardings=shardings)(rng)
    state = task.load_pretrained(state)
  start = int(jax.device_get(state.step))
  _write_config(config, workdir, previous_config, start)
  total = task.total_steps
  writer = MetricWriter(workdir, start_step=start)
  stopped = task.stop_reason(state)
  if start >= total or stopped:
    checkpointer.close()
    final = _last_eval(workdir)
    why = f"stopped at step {start}/{total} ({stopped})" if stopped else f"already trained to step {start}/{total}"
    _print(f"{workdir}: {why}; last evaluation: {_fmt(final)}")
    writer.close()
    return final

  batch_sh = distributed.batch_sharding(mesh)
  step_fn = jax.jit(task.train_step, in_shardings=(shardings, batch_sh),
                    out_shardings=(shardings, distributed.replicated(mesh)), donate_argnums=(0,))
  log_every = int(config.log_every)
  eval_every = int(config.eval_every)
  # Epoch-end evaluations (upstream's per-epoch validation); only these call task.after_evaluation.
  epoch_eval_every = int(config.eval_every_epochs) * task.steps_per_epoch
  ckpt_every = int(config.checkpoint_every)
  best_checkpointer = None
  if task.keep_best_checkpoint:
    best_checkpointer = ckpt_lib.Checkpointer(fileio.join(workdir, BEST_CHECKPOINT_DIR), max_to_keep=1,
                                              async_checkpointing=config.async_checkpointing)
  progress = Progress(total, start, task.global_batch_size)
  final: dict[str, float] = {}
  stop_reason, stopped_at = None, None
  compute_dtype = configlib.compute_dtype(config).name  # named in the non-finite-loss message
  profiler = profiling.StepProfiler(config.profile_steps, fileio.join(workdir, "profile"))
  t_start = time.perf_counter()
  compile_s = None
  last_metrics = None
  completed = False
  try:
    for step in range(start + 1, total + 1):
      batch = next_batch(streams, mesh)
      t0 = time.perf_counter()
      if compile_s is None:
        step_fn = step_fn.lower(state, batch).compile()
        distributed.wait_for_all_processes(f"jaxretina_step_compiled_{start}")
      profiler.before_step(step)
      state, metrics = step_fn(state, batch)
      profiled = profiler.after_step(step, metrics)
      if profiled:
        _print(profiled)
      last_metrics = metrics
      if compile_s is None:
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        logging.info("first step (incl. compile) %.1fs", compile_s)
      is_log = step % log_every == 0 or step == total
      is_ckpt = (ckpt_every and step % ckpt_every == 0) or step == total
      is_epoch_eval = bool(epoch_eval_every) and step % epoch_eval_every == 0
      is_eval = (eval_every and step % eval_every == 0) or is_epoch_eval or step == total
      if is_log or is_ckpt or is_eval:
        scalars = _finite_or_raise(jax.device_get(metrics), step, checkpointer, compute_dtype)
        progress.update(step, loss=scalars.get("loss", float("nan")))
        scalars["img_per_s"] = progress.img_per_s
        writer.write(step, scalars)
      if is_eval:
        evals = evaluators.run(state.variables(), step)
        final = {f"eval/{k}": v for k, v in evals.items()}
        writer.write(step, final)
        _print(f"step {step}: {_fmt(final)}")
        if is_epoch_eval:
          state, report = task.after_evaluation(state, evals)
          if report is not None:
            writer.write(step, report.scalars)
            for message in report.messages:
              _print(f"step {step}: {message}")
            if report.improved and best_checkpointer is not None:
              best_checkpointer.save(step, state, data_group, force=True)
            stop_reason = report.stop_reason
      if is_ckpt or stop_reason:
        checkpointer.save(step, state, data_group, force=step == total or bool(stop_reason))
      # An asynchronous save reports a failure (disk full) only when asked: ask every step, without
      # waiting for a save in progress, so a failed one stops the run within a step or two.
      for c in (checkpointer, best_checkpointer):
        if c is not None:
          c.raise_if_save_failed()
      if stop_reason:
        stopped_at = step
        break
    completed = True
  finally:
    profiler.close()
    progress.close()
    save_error = _close_checkpointers(checkpointer, best_checkpointer)
    writer.close()
    if save_error is not None and not completed:
      _print(str(save_error))  # the error already on its way out is raised; this one is reported too
  if save_error is not None:
    raise save_error  # the last save (written while the loop ended) failed
  if last_metrics is not None:
    end = stopped_at or total
    _print(f"trained steps {start + 1}..{end} in {time.perf_counter() - t_start:.0f}s "
           f"(first step incl. compile {compile_s:.1f}s)")
  if stop_reason:
    best = f"; best checkpoint in {fileio.join(workdir, BEST_CHECKPOINT_DIR)}" if best_checkpointer else ""
    _print(f"stopped at step {stopped_at}/{total}: {stop_reason}{best}")
  return final


def _finite_or_raise(metrics: Mapping[str, Any], step: int, checkpointer: ckpt_lib.Checkpointer,
                     dtype: str) -> dict[str, float]:
  scalars = {k: float(np.asarray(v)) for k, v in metrics.items() if np.size(v) == 1}
  bad = [k for k, v in scalars.items() if k.startswith("loss") and not np.isfinite(v)]
  if bad or not scalars.get("all_finite", 1.0):
    # Checkpoints are only written after this check passed, so the latest one holds finite values.
    last = checkpointer.latest_step()
    kept = (f"the last checkpoint (step {last} in {checkpointer.directory}) is kept and running the same "
            "command again resumes from it" if last is not None else "no checkpoint was written yet")
    advice = ["lower config.schedule.lr", "check the data"]
    if str(dtype) != "float32":
      advice.append(f"use config.dtype=float32 (this run computes in {dtype})")
    raise NonFiniteLossError(
        f"non-finite {', '.join(bad) or 'gradients'} at step {step} ({_fmt(scalars)}). The run stopped "
        f"before saving this state; {kept}. To avoid it: {', '.join(advice[:-1])} or {advice[-1]}.")
  return scalars


def _close_checkpointers(*checkpointers: ckpt_lib.Checkpointer | None) -> ckpt_lib.CheckpointSaveError | None:
  """Closes every checkpointer (waiting for its last save); returns the first save failure."""
  first = None
  for c in checkpointers:
    if c is None:
      continue
    try:
      c.close()
    except ckpt_lib.CheckpointSaveError as e:
      first = first or e
  return first


# ----------------------------------------------------------------------------------------------
# config.json: the config that trained the workdir

CONFIG_FILE = "config.json"

# Fields that may change when a run resumes without changing how it trains (dotted paths; a path
# covers its subtree): logging, evaluation, checkpoint and profiling cadence, the run's length, where
# the data is read from, the device layout and recomputation (same arithmetic, other memory/placement),
# and which evaluators run. The length is allowed so that a finished run can be trained further; a
# schedule whose horizon is the run length (``warmup_cosine`` over ``total_steps``) then follows the
# new length from the resumed step on. Everything else — model, data, optimizer, schedule, loss,
# augmentation, seed, batch size, dtype, microbatches, epoch-end evaluation cadence (it drives
# ReduceLROnPlateau and early stopping) — changes training.
CHANGEABLE_ON_RESUME = (
    "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "async_checkpointing", "profile_steps",
    "total_steps", "epochs", "data.data_dir", "knowledge.data_dir", "evals", "mesh", "remat", "distributed",
)


def _config_fields(config) -> dict:
  """The config as config.json holds it (JSON types: tuples are lists)."""
  return json.loads(config.to_json_best_effort())


def _declared_fields(fields: Mapping[str, Any]) -> dict:
  """config.json's fields over the declared defaults (``configlib.with_defaults``): a field declared
  after the workdir's config.json was written reads as its default, an old name as the new one."""
  return _config_fields(configlib.with_defaults(fields))


def _flatten(fields: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in fields.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      flat.update(_flatten(value, path + "."))
    else:
      flat[path] = value
  return flat


def _changeable(path: str) -> bool:
  return any(path == field or path.startswith(field + ".") for field in CHANGEABLE_ON_RESUME)


_ABSENT = object()


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
  """(fields that change training, other fields) differing between two config.json dicts, each as
  ``'path: old → new'`` lines."""
  a, b = _flatten(old), _flatten(new)
  training, other = [], []
  for path in sorted(set(a) | set(b)):
    before, after = a.get(path, _ABSENT), b.get(path, _ABSENT)
    if before == after:
      continue
    line = f"{path}: {_show(before)} → {_show(after)}"
    (other if _changeable(path) else training).append(line)
  return training, other


def _show(value) -> str:
  return "(absent)" if value is _ABSENT else json.dumps(value)


def check_config_unchanged(config, workdir: str, allow_config_change: bool = False) -> dict | None:
  """Compares ``config`` with the workdir's ``config.json``; returns the latter (None without one).

  Raises ``ConfigChangedError`` listing the differing fields (old → new) when they change training
  (everything outside ``CHANGEABLE_ON_RESUME``) and ``allow_config_change`` is false. Both configs
  are compared over the declared defaults (``configlib.with_defaults``), so a field declared since
  config.json was written is no difference while it keeps its default. Nothing is written here.
  """
  path = fileio.join(workdir, CONFIG_FILE)
  if not fileio.exists(path):
    return None
  try:
    previous = json.loads(fileio.read_text(path))
  except ValueError as e:
    raise ConfigChangedError(f"{path}: unreadable ({e}); it records the config that trained this workdir. "
                             "Repair or remove it, or use another --workdir.") from None
  training, other = config_differences(_declared_fields(previous), _declared_fields(_config_fields(config)))
  if training and not allow_config_change:
    raise ConfigChangedError(
        f"the config differs from the one that trained {workdir} ({path}) in {len(training)} field(s) that "
        "change training:\n  " + "\n  ".join(training) + "\nNothing in the workdir was changed. Run with "
        "the config in config.json, use another --workdir, or pass --allow_config_change to continue this "
        "run with the new config (the old config.json is then kept as config.<step>.json).")
  if training:
    logging.warning("continuing %s with a changed config (--allow_config_change):\n  %s", workdir,
                    "\n  ".join(training))
  if other:
    logging.info("config fields changed since the last run of %s (these do not change training):\n  %s",
                 workdir, "\n  ".join(other))
  return previous


def _write_config(config, workdir: str, previous: dict | None, step: int) -> None:
  """Writes config.json; a differing previous one is kept as ``config.<step>.json`` first (the
  config that trained the steps up to ``step``), never overwritten."""
  if jax.process_index() != 0:
    return
  fields = _config_fields(config)
  if previous is not None and previous == fields:
    return
  path = fileio.join(workdir, CONFIG_FILE)
  # A config.json that differs only by fields declared since (at their defaults) is brought up to
  # date without keeping a copy: it describes the same training.
  if previous is not None and _declared_fields(previous) != _declared_fields(fields):
    history = fileio.join(workdir, f"config.{step}.json")
    n = 1
    while fileio.exists(history):  # a second change at the same step
      history = fileio.join(workdir, f"config.{step}.{n}.json")
      n += 1
    fileio.write_text(history, fileio.read_text(path))  # the file as it was, byte for byte
  fileio.write_text(path, config.to_json_best_effort(indent=2))


def _last_eval(workdir: str) -> dict[str, float]:
  last = {}
  for row in metrics_lib.read_metrics(workdir):
    evals = {k: v for k, v in row.items() if k.startswith("eval/")}
    if evals:
      last = evals
  return last


def _fmt(d: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def _print(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)

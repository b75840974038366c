"""The training state and what a task kind provides to the training loop (``train/loop.py``).

Both task kinds (``train/contrastive.py``, ``train/classification.py``) derive from ``TaskBase``,
whose hooks have neutral defaults; the loop calls every hook unconditionally.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Protocol

import flax
import jax
import numpy as np


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data: checkpointable as a plain array
  # Non-gradient model state besides BatchNorm statistics, updated by the step (e.g. WS-DAN's
  # feature centers); replicated.
  system_state: Any = flax.struct.field(default_factory=dict)

  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats} if self.batch_stats else {"params": self.params}


class Task(Protocol):
  """What a task kind provides to the loop, besides the hooks of ``TaskBase``."""

  global_batch_size: int
  steps_per_epoch: int
  total_steps: int

  def init_state(self, rng: jax.Array) -> TrainState: ...

  def data_streams(self, mesh) -> dict[str, Iterator[Mapping[str, np.ndarray]]]: ...

  def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict]: ...

  # config.evals built for this model, reporting under workdir: ``.run(variables, step) -> {metric: value}``.
  def evaluators(self, workdir: str | None) -> Any: ...


class TaskBase:
  """Neutral defaults of the loop's optional hooks; a task kind overrides what it uses."""

  # Keep the state of the best epoch-end evaluation as its own checkpoint (early stopping).
  keep_best_checkpoint = False

  def load_pretrained(self, state: TrainState) -> TrainState:
    """Fresh starts only: weights named in ``config.init``."""
    return state

  def stop_reason(self, state: TrainState) -> str | None:
    """Why a restored state already stopped early (None: it did not)."""
    del state
    return None

  def after_evaluation(self, state: TrainState, metrics: Mapping[str, float]) -> tuple[TrainState, Any]:
    """Called after each epoch-end evaluation (``config.eval_every_epochs``) with its metrics; returns
    the state and a report (or None) with ``scalars`` (written to the metrics file), ``messages``
    (printed), ``improved`` (keep this state as the best checkpoint when ``keep_best_checkpoint``)
    and ``stop_reason`` (not None: stop training here)."""
    del metrics
    return state, None

"""Metrics to JSONL and TensorBoard (no tensorflow), and a progress bar with throughput and ETA."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np


class MetricWriter:
  """Writes scalars of one step to ``workdir/metrics.jsonl`` and TensorBoard event files.

  Only process 0 writes. JSONL lines are appended (a resumed run continues the same file).
  """

  def __init__(self, workdir: str, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
      try:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # pragma: no cover - tensorboardX is a dependency
        self._tb = None

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time()}
    for k, v in scalars.items():
      v = np.asarray(v)
      row[k] = float(v) if v.size == 1 else v.tolist()
    self._jsonl.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k not in ("step", "time") and isinstance(v, float):
          self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """tqdm bar showing step, loss, img/s and ETA; a plain line per update when not on a terminal."""

  def __init__(self, total_steps: int, start_step: int, global_batch_size: int, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.batch = global_batch_size
    self.start = start_step
    self.total = total_steps
    self._t_last = time.perf_counter()
    self._step_last = start_step
    self.img_per_s = float("nan")
    self._bar = None
    if self.enabled:
      from tqdm.auto import tqdm

      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       mininterval=1.0, disable=False)

  def update(self, step: int, **scalars: float) -> None:
    now = time.perf_counter()
    if step > self._step_last:
      self.img_per_s = (step - self._step_last) * self.batch / max(now - self._t_last, 1e-9)
    self._t_last, self._step_last = now, step
    if self._bar is not None:
      self._bar.n = step
      post = {k: f"{v:.4g}" for k, v in scalars.items()}
      post["img/s"] = f"{self.img_per_s:.1f}"
      self._bar.set_postfix(post, refresh=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()

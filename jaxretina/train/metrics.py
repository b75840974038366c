"""Metrics to JSONL and TensorBoard (no tensorflow), and a progress display with throughput and ETA.

A resumed run rewrites its logs from the restored step (as big_vision and MaxText do): rows of
``metrics.jsonl`` after that step — written by the interrupted run after its last checkpoint, and
about to be written again — are dropped when the writer opens, and TensorBoard is told to purge its
events from the next step on (tensorboardX's ``purge_step``), so every logged step appears once.

Both files work on a remote workdir (``gs://...``) through ``jaxretina.fileio``. Object stores cannot
append, so there ``metrics.jsonl`` is kept in memory and rewritten whole every ``flush_every_s``
seconds and at close, and each TensorBoard event file is rewritten at tensorboardX's flushes (every
``flush_every_s``) — a crash loses at most that interval of metrics, which the resumed run rewrites.
"""

from __future__ import annotations

import io
import json
import sys
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np

from jaxretina import fileio

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(workdir: str) -> list[dict]:
  """The rows of ``workdir/metrics.jsonl`` ([] when there is none).

  A line cut short by a crash mid-write (the last one) is skipped: the run that resumes rewrites it.
  """
  path = fileio.join(workdir, METRICS_FILE)
  if not fileio.exists(path):
    return []
  rows = []
  for line in fileio.read_text(path).splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:
      continue
  return rows


def _rows_up_to(text: str, last_step: int) -> list[str]:
  kept = []
  for line in text.splitlines():
    try:
      row = json.loads(line)
    except ValueError:  # a line cut short by a crash: its step is about to be logged again
      continue
    if int(row.get("step", 0)) <= last_step:
      kept.append(line + "\n")
  return kept


class MetricWriter:
  """Writes scalars of one step to ``workdir/metrics.jsonl`` and TensorBoard event files.

  Only process 0 writes. ``start_step``: the step the run starts from (restored or 0); rows of later
  steps are removed from ``metrics.jsonl`` and hidden from TensorBoard (see the module docstring).
  Without it the file is appended to as it stands.
  """

  def __init__(self, workdir: str, enabled: bool | None = None, *, start_step: int | None = None,
               flush_every_s: float = 60.0):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.workdir = workdir
    self.start_step = start_step
    self.flush_every_s = float(flush_every_s)
    self._remote = fileio.is_remote(workdir)
    self._path = fileio.join(workdir, METRICS_FILE)
    self._jsonl = None  # local: the file, appended to line by line
    self._lines: list[str] = []  # remote: the whole file, rewritten at each flush
    self._dirty = False
    self._last_flush = time.monotonic()
    self._tb = None
    self._tb_failed = False
    if not self.enabled:
      return
    fileio.makedirs(workdir)
    existing = ""
    if (self._remote or start_step is not None) and fileio.exists(self._path):
      existing = fileio.read_text(self._path)
    if self._remote:
      self._lines = (_rows_up_to(existing, start_step) if start_step is not None
                     else [line + "\n" for line in existing.splitlines()])
      self._dirty = start_step is not None and "".join(self._lines) != existing
      self._flush_jsonl()
    else:
      if start_step is not None and existing:
        kept = "".join(_rows_up_to(existing, start_step))
        if kept != existing:
          fileio.write_text(self._path, kept)  # atomic: an interruption here keeps the old file whole
      self._jsonl = open(self._path, "a", buffering=1)

  def _tensorboard(self):
    """The SummaryWriter, opened at the first write (a run that writes nothing leaves no event file)."""
    if self._tb is None and not self._tb_failed:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:  # pragma: no cover - tensorboardX is a dependency
        self._tb_failed = True
        return None
      logdir = fileio.join(self.workdir, TENSORBOARD_DIR)
      if self._remote:
        _register_remote_event_files(logdir)
      # purge_step: TensorBoard drops the events of steps >= it written before this file (those of
      # the interrupted run after its last checkpoint).
      purge = None if self.start_step is None else int(self.start_step) + 1
      # Event files are named by the second they were opened in; the nanosecond suffix keeps a run
      # restarted within the same second from truncating the previous file, and sorts after it.
      self._tb = SummaryWriter(logdir, purge_step=purge, flush_secs=max(int(self.flush_every_s), 1),
                               filename_suffix=f".{time.time_ns()}")
    return self._tb

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time()}
    for k, v in scalars.items():
      v = np.asarray(v)
      row[k] = float(v) if v.size == 1 else v.tolist()
    line = json.dumps(row) + "\n"
    if self._remote:
      self._lines.append(line)
      self._dirty = True
      if time.monotonic() - self._last_flush >= self.flush_every_s:
        self._flush_jsonl()
    else:
      self._jsonl.write(line)
    tb = self._tensorboard()
    if tb is not None:
      for k, v in row.items():
        if k not in ("step", "time") and isinstance(v, float):
          tb.add_scalar(k, v, int(step))

  def _flush_jsonl(self) -> None:
    if self._dirty:
      fileio.write_text(self._path, "".join(self._lines))
      self._dirty = False
    self._last_flush = time.monotonic()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
      self._jsonl = None
    if self._remote and self.enabled:
      self._flush_jsonl()
    if self._tb is not None:
      self._tb.close()
      self._tb = None


# ----------------------------------------------------------------------------------------------
# TensorBoard event files on object stores


class _RemoteEventFile:
  """A TensorBoard event file on an object store, written through epath.

  Objects cannot be appended to, so the records are kept and the object is rewritten whole at each
  flush (what tensorboardX's own gs:// writer does, without its google-cloud-storage dependency).
  Past ``rotate_bytes`` the file continues in a new object (``<name>.1``, ``<name>.2``, ...: they sort
  after it, and TensorBoard reads every ``*tfevents*`` file of the directory in name order), so that
  neither the memory held nor the upload grows with the length of the run.
  """

  def __init__(self, path: str, rotate_bytes: int = 8 << 20):
    self._base = path
    self._part = 0
    self._buffer = io.BytesIO()
    self._dirty = False
    self._rotate_bytes = rotate_bytes
    self._lock = threading.Lock()

  def _name(self) -> str:
    return self._base if self._part == 0 else f"{self._base}.{self._part}"

  def write(self, data: bytes) -> None:
    with self._lock:
      self._buffer.write(data)
      self._dirty = True

  def flush(self) -> None:
    # tensorboardX flushes only between whole records, so a rotation never splits one.
    with self._lock:
      if self._dirty:
        fileio.write_bytes(self._name(), self._buffer.getvalue())
        self._dirty = False
      if self._buffer.tell() >= self._rotate_bytes:
        self._part += 1
        self._buffer = io.BytesIO()

  def close(self) -> None:
    self.flush()


class _RemoteEventFileFactory:
  def open(self, path: str) -> _RemoteEventFile:
    return _RemoteEventFile(path)

  def directory_check(self, path: str) -> None:
    fileio.makedirs(path)


def _register_remote_event_files(logdir: str) -> None:
  """Routes tensorboardX's event files under ``logdir``'s URL scheme through epath (tensorboardX picks a
  writer by the scheme of the path; its default for gs:// needs google-cloud-storage)."""
  from tensorboardX import record_writer

  scheme = logdir.split("://", 1)[0]
  if not isinstance(record_writer.REGISTERED_FACTORIES.get(scheme), _RemoteEventFileFactory):
    record_writer.register_writer_factory(scheme, _RemoteEventFileFactory())


# ----------------------------------------------------------------------------------------------
# Progress


def _format_duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  if seconds >= 60:
    return f"{seconds // 60}m{seconds % 60:02d}s"
  return f"{seconds}s"


class Progress:
  """Step, loss, img/s and ETA: a tqdm bar on a terminal; otherwise (output to a file or a pipe) one
  plain line per update on stdout, ``\\n``-terminated, so logs stay readable line by line."""

  def __init__(self, total_steps: int, start_step: int, global_batch_size: int, enabled: bool | None = None,
               stream=None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.batch = global_batch_size
    self.start = start_step
    self.total = total_steps
    self._t_last = time.perf_counter()
    self._step_last = start_step
    self._first_update = None  # (time, step) of the first update: the ETA's speed is measured from there
    self.img_per_s = float("nan")
    self._bar = None
    self._stream = stream if stream is not None else sys.stdout
    self._plain = not _is_terminal(self._stream)
    if self.enabled and not self._plain:
      from tqdm.auto import tqdm

      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       mininterval=1.0, disable=False)

  def update(self, step: int, **scalars: float) -> None:
    now = time.perf_counter()
    if step > self._step_last:
      self.img_per_s = (step - self._step_last) * self.batch / max(now - self._t_last, 1e-9)
    self._t_last, self._step_last = now, step
    if not self.enabled:
      return
    post = {k: f"{v:.4g}" for k, v in scalars.items()}
    post["img/s"] = f"{self.img_per_s:.1f}"
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix(post, refresh=True)
      return
    # ETA from the mean speed since the first update, which excludes the first step's compilation;
    # at the first update only its own interval (compilation included) is known.
    if self._first_update is None:
      self._first_update = (now, step)
      eta = (self.total - step) * self.batch / self.img_per_s if self.img_per_s > 0 else float("nan")
    else:
      t0, s0 = self._first_update
      eta = (self.total - step) * (now - t0) / (step - s0) if step > s0 else float("nan")
    fields = " ".join(f"{k}={v}" for k, v in post.items())
    self._stream.write(f"step {step}/{self.total} ({100.0 * step / max(self.total, 1):.0f}%) {fields} "
                       f"eta {_format_duration(eta)}\n")
    self._stream.flush()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _is_terminal(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # no isatty, or a closed stream
    return False

"""Orbax checkpoints of the train state together with the Grain iterator state.

A run started on a workdir that already has a checkpoint resumes from its latest step. Before
anything is restored (and long before anything could be saved over it) the checkpoint's tree is
compared with the state this config builds; a mismatch is an ``IncompatibleCheckpointError`` that
names the first differing leaves and leaves the workdir untouched.

Recovery (``Checkpointer.restore_latest``): a step that cannot be read back as it was written — a
file missing or truncated, or an array whose checksum differs from the one recorded at save — is
*damaged*, not incompatible. It is renamed to ``<step>.damaged`` (never deleted; Orbax does not list
it as a step) with one printed line naming the step, the file and the fault, and the run resumes
from the step before. When no step is readable nothing is moved and ``NoReadableCheckpointError``
stops the run instead of training from scratch over the checkpoints.

Integrity: every save records the CRC32 of each state array (``<step>/checksums/checksums.json``,
committed with the step, written by process 0) and every restore recomputes and compares them: a
flipped bit in an array file that the storage format does not notice is caught. The CRC is taken
over the whole array's bytes, so it does not depend on the sharding (see ``array_checksums`` for
what is covered with several processes).

Saving: a failed save (disk full, no permission) raises ``CheckpointSaveError`` with one line (step,
directory, errno), removes its unfinished ``<step>.orbax-checkpoint-tmp`` directory and leaves the
committed steps as they were. Orbax writes asynchronously and reports a failure only when asked:
``raise_if_save_failed`` asks without waiting and is called by the loop every step. Unfinished
directories left by a killed run are removed when a ``Checkpointer`` is created (process 0).
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import os
import re
import time
import zlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import grain
from etils import epath

from jaxretina.train import distributed

# Orbax writes a step into ``<step><this>`` and renames it to ``<step>`` once complete.
UNFINISHED_SUFFIX = ".orbax-checkpoint-tmp"
DAMAGED_SUFFIX = ".damaged"
CHECKSUMS_ITEM = "checksums"
CHECKSUMS_FILE = "checksums.json"
# Barrier names must be unique; every process creates its Checkpointers and meets these barriers in
# the same order, so a counter gives matching names.
_BARRIER_IDS = itertools.count()


# Train-state fields renamed after checkpoints were written with the old name: old -> current.
RENAMED_STATE_FIELDS = {"extra": "system_state"}


def _renamed_in(stored: Any, abstract_state: Any) -> dict[str, str]:
  if not dataclasses.is_dataclass(abstract_state) or not hasattr(stored, "keys"):
    return {}
  return {old: new for old, new in RENAMED_STATE_FIELDS.items()
          if old in stored.keys() and new not in stored.keys() and hasattr(abstract_state, new)}


def _in_saved_layout(abstract_state: Any, stored: Any) -> Any:
  """``abstract_state`` as the tree ``stored`` was saved as: a step written before a train-state
  field was renamed (``RENAMED_STATE_FIELDS``) is read into a dict that still has the old name."""
  renamed = _renamed_in(stored, abstract_state)
  if not renamed:
    return abstract_state
  fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
  for old, new in renamed.items():
    fields[old] = fields.pop(new)
  return fields


def _from_saved_layout(state: Any, abstract_state: Any) -> Any:
  """The restored ``state`` as the current train-state class (undoes ``_in_saved_layout``)."""
  if not isinstance(state, dict) or not dataclasses.is_dataclass(abstract_state):
    return state
  state = dict(state)
  for old, new in RENAMED_STATE_FIELDS.items():
    if old in state:
      state[new] = state.pop(old)
  return type(abstract_state)(**state)


class CheckpointError(RuntimeError):
  """A checkpoint problem the user can act on; ``python -m jaxretina.main`` prints only its message."""


class IncompatibleCheckpointError(CheckpointError):
  """The workdir's checkpoint was written by a different model/optimizer configuration."""


class DamagedCheckpointError(CheckpointError):
  """One step cannot be read back as it was written (missing/truncated file, checksum mismatch)."""

  def __init__(self, step: int, fault: str):
    super().__init__(f"checkpoint step {step} is damaged: {fault}")
    self.step = step
    self.fault = fault


class NoReadableCheckpointError(CheckpointError):
  """The checkpoint directory has steps (or set-aside damaged ones) but none can be restored."""


class CheckpointSaveError(CheckpointError):
  """Writing a checkpoint failed; the steps committed before it are intact."""


class IteratorGroup:
  """Several named data iterators checkpointed as one (main stream + knowledge stream).

  Speaks the protocol of Grain's Orbax handler: ``get_state() -> bytes``, ``set_state(bytes)``.
  """

  def __init__(self, **iterators: Any):
    self.iterators = iterators

  def get_state(self) -> bytes:
    return json.dumps({k: _jsonable(it.get_state()) for k, it in self.iterators.items()}).encode()

  def set_state(self, state: bytes) -> None:
    states = json.loads(state.decode() if isinstance(state, bytes) else state)
    missing = set(self.iterators) - set(states)
    if missing:
      raise IncompatibleCheckpointError(f"checkpointed data state lacks the streams {sorted(missing)} "
                                        f"(has {sorted(states)})")
    for k, it in self.iterators.items():
      it.set_state(states[k])

  def start_prefetch(self) -> None:
    for it in self.iterators.values():
      if hasattr(it, "start_prefetch"):
        it.start_prefetch()


class _FrozenIteratorState:
  """An iterator position taken at save time, in the shape Grain's handler saves (``get_state``)."""

  def __init__(self, state: bytes):
    self._state = state

  def get_state(self) -> bytes:
    return self._state


def _jsonable(state):
  if isinstance(state, bytes):
    return {"__bytes__": state.decode()}
  return state


class Checkpointer:
  """``CheckpointManager`` with items ``state`` (pytree), ``data`` (iterator group) and
  ``checksums`` (JSON: one checksum per state array)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_checkpointing: bool = True):
    self.directory = directory if "://" in os.fspath(directory) else os.path.abspath(directory)  # gs:// stays a URL
    self._root = epath.Path(self.directory)
    self._unconfirmed_save: int | None = None  # the step whose (async) save has not been confirmed yet
    # Before the manager lists the steps, and before any save of this run could collide with the
    # ``<step>.orbax-checkpoint-tmp`` name a killed run left behind (Orbax reuses that name).
    self._remove_unfinished_saves()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_checkpointing,
        create=True,
    )
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_names=("state", "data", CHECKSUMS_ITEM),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                       CHECKSUMS_ITEM: ocp.JsonCheckpointHandler(filename=CHECKSUMS_FILE)},
        options=options,
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  # -- restore ----------------------------------------------------------------------------------

  def _stored_tree(self, step: int) -> Any:
    """The saved state's tree metadata (paths and shapes; no array is read)."""
    state_dir = self._root / str(step) / "state"
    try:
      meta = self.manager.item_metadata(step)
      stored = meta["state"] if isinstance(meta, dict) or hasattr(meta, "__getitem__") else meta.state
    except Exception as e:  # noqa: BLE001 - whatever the reader raises, the step cannot be read
      raise DamagedCheckpointError(step, f"cannot read the metadata in {state_dir}: {describe_error(e)}") from e
    if stored is None:
      raise DamagedCheckpointError(step, f"{state_dir / '_METADATA'} holds no tree")
    return stored

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises IncompatibleCheckpointError when the stored tree's leaves differ in path or shape.

    Only a readable tree can mismatch: metadata that is missing or unreadable is damage
    (``DamagedCheckpointError``), whatever config wrote it.
    """
    state_dir = self._root / str(step) / "state"
    if not (state_dir / "_METADATA").exists():
      raise DamagedCheckpointError(step, f"{state_dir / '_METADATA'} is missing")
    stored = self._stored_tree(step)
    problems = shape_mismatches(_in_saved_layout(abstract_state, stored), stored, model="this model",
                                builder="this config builds")
    if problems:
      raise IncompatibleCheckpointError(
          f"the workdir's checkpoint {self.directory}/{step} does not match this configuration "
          f"({len(problems)} differing leaves):\n  {_head(problems)}\n"
          "Nothing was overwritten. Use another --workdir, or the config that wrote this checkpoint.")

  def restore(self, step: int, abstract_state: Any, data: IteratorGroup | None) -> Any:
    """The state saved at ``step`` (and ``data`` set to its position), checksums verified.

    Raises IncompatibleCheckpointError (readable, but another configuration's tree) or
    DamagedCheckpointError (anything that keeps the step from being read back as written).
    """
    self._check_readable(step, abstract_state, with_data=data is not None)
    return self._read(step, abstract_state, data)

  def _check_readable(self, step: int, abstract_state: Any, *, with_data: bool) -> None:
    """The checks that need no array read: files present, metadata readable and matching."""
    self._check_files(step, with_data=with_data)
    self.check_compatible(step, abstract_state)

  def _read(self, step: int, abstract_state: Any, data: IteratorGroup | None) -> Any:
    state_dir = self._root / str(step) / "state"
    target = _in_saved_layout(abstract_state, self._stored_tree(step))  # raises its own, clearer error
    # One item at a time, so that a failure names the item it came from.
    try:
      state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    except Exception as e:  # noqa: BLE001 - every reader error means the arrays cannot be read back
      raise DamagedCheckpointError(step, f"reading the arrays in {state_dir} failed: {describe_error(e)}") from e
    state = state["state"]
    self._verify_checksums(step, state)  # under the names it was saved with, as its checksums are
    state = _from_saved_layout(state, abstract_state)
    if data is not None:  # last: Grain starts prefetching from the restored position
      try:
        self.manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data)))
      except Exception as e:  # noqa: BLE001 - sorted into mismatch (re-raised) and damage
        incompatible = _in_chain(e, IncompatibleCheckpointError)
        if incompatible is not None:
          raise incompatible from None
        raise DamagedCheckpointError(step, f"{self._data_file(step)} is unreadable: {describe_error(e)}") from e
    return state

  def restore_latest(self, abstract_state: Any, data: IteratorGroup | None) -> tuple[Any, int] | None:
    """(state, step) of the newest step that restores intact; None when there is no step at all.

    Damaged steps newer than it are set aside as ``<step>.damaged`` (one printed line each) once a
    readable one is found, so a directory where nothing is readable stays exactly as it was.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      set_aside = self.damaged_dirs()
      if set_aside:
        raise NoReadableCheckpointError(
            f"{self.directory} holds no readable checkpoint, only damaged ones set aside earlier: "
            f"{', '.join(set_aside)}. Nothing was deleted. To train from scratch here, move them out of "
            "the directory; or use another --workdir.")
      return None
    damaged: list[DamagedCheckpointError] = []
    for step in steps:
      # Every process must fall back past the same steps (Orbax's restore is collective): the
      # processes agree after the cheap checks, and again after the reads.
      fault = _agreed_fault(step, _fault_of(lambda: self._check_readable(step, abstract_state,
                                                                          with_data=data is not None)))
      if fault is None:
        state = None
        try:
          state = self._read(step, abstract_state, data)
        except DamagedCheckpointError as e:
          fault = e
        fault = _agreed_fault(step, fault)
      if fault is not None:
        damaged.append(fault)
        continue
      for e in damaged:
        moved_to = self._set_aside(e.step)
        _say(f"{e}; moved it to {moved_to} and resuming from step {step}")
      if damaged:
        distributed.wait_for_all_processes(f"jaxretina_set_aside_{next(_BARRIER_IDS)}")
        self.manager.reload()  # forget the set-aside steps: this run saves those step numbers again
      return state, step
    earlier = self.damaged_dirs()
    raise NoReadableCheckpointError(
        f"no checkpoint in {self.directory} can be read; nothing was moved or deleted:\n  "
        + "\n  ".join(str(e) for e in damaged)
        + (f"\n  (set aside as damaged earlier: {', '.join(earlier)})" if earlier else "")
        + "\nRepair them or move them out of the directory to train from scratch, or use another --workdir.")

  def damaged_dirs(self) -> list[str]:
    """Names of the steps set aside as damaged, oldest first."""
    if not self._root.exists():
      return []
    return sorted((p.name for p in self._root.iterdir() if DAMAGED_SUFFIX in p.name),
                  key=lambda name: (int(name.split(".")[0]) if name.split(".")[0].isdigit() else -1, name))

  def _check_files(self, step: int, *, with_data: bool) -> None:
    """Names a missing file before a reader reports it in its own terms (or as a config mismatch)."""
    step_dir = self._root / str(step)
    state_dir = step_dir / "state"
    if not state_dir.exists():
      raise DamagedCheckpointError(step, f"{state_dir} is missing")
    uses_ocdbt = any(p.name.startswith("ocdbt.process_") for p in state_dir.iterdir())
    if uses_ocdbt and not (state_dir / "manifest.ocdbt").exists():
      raise DamagedCheckpointError(step, f"{state_dir / 'manifest.ocdbt'} is missing (the index of the arrays)")
    if with_data:
      data_file = self._data_file(step)
      if not data_file.exists():
        raise DamagedCheckpointError(step, f"{data_file} is missing (the data iterator position)")

  def _data_file(self, step: int) -> epath.Path:
    """This process's file of the ``data`` item (Grain's naming)."""
    return self._root / str(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def _verify_checksums(self, step: int, state: Any) -> None:
    item_dir = self._root / str(step) / CHECKSUMS_ITEM
    if not item_dir.exists():
      return  # written before checksums were recorded: restored unverified
    path = item_dir / CHECKSUMS_FILE
    try:
      record = json.loads(path.read_text())
      recorded = record["arrays"]
    except Exception as e:  # noqa: BLE001 - missing, truncated or not ours: the record is damaged
      raise DamagedCheckpointError(step, f"{path} is unreadable: {describe_error(e)}") from e
    if record.get("algorithm") != CHECKSUM_ALGORITHM:
      return  # another version's checksums: cannot be compared
    for key, entry in array_checksums(state).items():
      want = recorded.get(key)
      # Not recorded: the array was sharded across processes when saved. Another dtype: the restore
      # cast it, so the saved bytes cannot be reproduced.
      if want is None or want["dtype"] != entry["dtype"]:
        continue
      if want["crc32"] != entry["crc32"]:
        raise DamagedCheckpointError(
            step, f"the array {key} in {self._root / str(step) / 'state'} differs from what was saved "
                  f"(CRC32 {entry['crc32']}, recorded {want['crc32']} in {path})")

  def _set_aside(self, step: int) -> str:
    """Renames step ``step`` to ``<step>.damaged`` (``.damaged.2``, ... if taken); returns the new path."""
    source = self._root / str(step)
    target = self._root / f"{step}{DAMAGED_SUFFIX}"
    n = 2
    while target.exists():
      target = self._root / f"{step}{DAMAGED_SUFFIX}.{n}"
      n += 1
    if jax.process_index() == 0:
      source.rename(target)
    return os.fspath(target)

  # -- save -------------------------------------------------------------------------------------

  def save(self, step: int, state: Any, data: IteratorGroup | None, *, force: bool = False) -> bool:
    """Starts saving ``step`` (in the background when asynchronous); False when the manager's
    interval skips it. Raises CheckpointSaveError for this save or an earlier unconfirmed one."""
    self.raise_if_save_failed(wait=True)
    if not force and not self.manager.should_save(step):
      return False
    args = {"state": ocp.args.StandardSave(state),
            # Only process 0 writes the JSON item; the others need not compute it.
            CHECKSUMS_ITEM: ocp.args.JsonSave({"algorithm": CHECKSUM_ALGORITHM,
                                               "arrays": array_checksums(state) if jax.process_index() == 0 else {}})}
    if data is not None:
      # Orbax runs Grain's (blocking) handler in its background commit, after the loop may have
      # drawn further batches: hand it the position as of this step.
      args["data"] = grain.checkpoint.CheckpointSave(_FrozenIteratorState(data.get_state()))
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    except Exception as e:  # noqa: BLE001 - every failed write ends the run with one line
      raise self._save_failed(step, e) from e
    if saved:
      self._unconfirmed_save = step
    return saved

  def raise_if_save_failed(self, *, wait: bool = False) -> None:
    """Raises CheckpointSaveError if the last save failed. Without ``wait`` it returns at once
    while that save is still being written (cheap enough to call every step)."""
    step = self._unconfirmed_save
    if step is None or (not wait and self.manager.is_saving_in_progress()):
      return
    try:
      self.manager.wait_until_finished()  # re-raises the background writer's error, once
    except Exception as e:  # noqa: BLE001
      raise self._save_failed(step, e) from e
    self._unconfirmed_save = None

  def _save_failed(self, step: int, error: Exception) -> CheckpointSaveError:
    """Removes the failed step's unfinished directory; returns the error to raise."""
    self._unconfirmed_save = None
    removed = []
    if jax.process_index() == 0:
      for path in self._unfinished_dirs():
        if path.name.split(".")[0] == str(step) and _remove_tree(path):
          removed.append(path.name)
    committed = sorted(int(p.name) for p in self._root.iterdir() if p.name.isdigit()) if self._root.exists() else []
    kept = (f"the committed checkpoints (steps {', '.join(map(str, committed))}) are intact" if committed
            else "no checkpoint was committed before it")
    cleaned = f"; removed the unfinished {', '.join(removed)}" if removed else ""
    return CheckpointSaveError(f"saving checkpoint step {step} to {self.directory} failed: "
                               f"{describe_error(error)}. {kept[0].upper()}{kept[1:]}{cleaned}.")

  def wait(self) -> None:
    self.raise_if_save_failed(wait=True)

  def close(self) -> None:
    """Waits for the last save; raises CheckpointSaveError if it failed (the manager is closed anyway)."""
    try:
      self.raise_if_save_failed(wait=True)
    finally:
      self.manager.close()

  def _unfinished_dirs(self) -> list[epath.Path]:
    if not self._root.exists():
      return []
    return [p for p in self._root.iterdir() if UNFINISHED_SUFFIX in p.name]

  def _remove_unfinished_saves(self) -> None:
    if jax.process_index() == 0:
      stale = [path for path in self._unfinished_dirs() if _remove_tree(path)]
      if stale:
        _say(f"removed the unfinished checkpoint save(s) {', '.join(sorted(p.name for p in stale))} in "
             f"{self.directory} (left by an interrupted run)")
    distributed.wait_for_all_processes(f"jaxretina_unfinished_saves_removed_{next(_BARRIER_IDS)}")


# ----------------------------------------------------------------------------------------------
# Checksums

CHECKSUM_ALGORITHM = "crc32-of-c-order-bytes"


def array_checksums(tree: Any) -> dict[str, dict[str, Any]]:
  """``{leaf path: {"dtype", "shape", "crc32"}}``: CRC32 of each array's bytes in C order.

  Computed on the host from the whole array, so it does not depend on the sharding: a checkpoint
  restored onto another mesh verifies too. Every array this process holds entirely is covered —
  with one process all of them (a sharded array is assembled from its shards), with several the
  replicated ones (all of them under data parallelism); an array sharded across processes (FSDP
  over hosts) is not checksummed, as no process holds it. Cost: one device→host copy of the state
  plus CRC32 at memory speed, in the blocking part of a save (measured in README "Checkpoints").
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  keys, values = [], []
  for path, leaf in leaves:
    value = _whole_value(leaf)
    if value is not None:
      keys.append("/".join(_key_str(p) for p in path))
      values.append(value)
  values = jax.device_get(values)  # one batched transfer
  out = {}
  for key, value in zip(keys, values):
    value = np.ascontiguousarray(value)
    out[key] = {"dtype": str(value.dtype), "shape": list(value.shape),
                "crc32": f"{zlib.crc32(value.reshape(-1).view(np.uint8)):08x}"}
  return out


def _whole_value(leaf: Any) -> Any:
  """The leaf's complete value as something ``jax.device_get`` turns into numpy; None when this
  process holds only part of it."""
  if not isinstance(leaf, jax.Array):
    return np.asarray(leaf)
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  if leaf.is_fully_addressable:
    return leaf
  if leaf.is_fully_replicated:
    return leaf.addressable_data(0)
  return None


# ----------------------------------------------------------------------------------------------
# Errors and paths


def describe_error(error: BaseException) -> str:
  """One line for an error from the I/O stack: the errno first when there is one (an OSError in the
  chain, or TensorStore's ``[os_error_code='28']``), then the innermost message — TensorStore's names
  the array key, the database and the file — without TensorStore's multi-kilobyte spec dump."""
  chain = _chain(error)
  for e in chain:
    if isinstance(e, OSError) and e.errno:
      where = f": {e.filename}" if e.filename else ""
      return f"[{errno.errorcode.get(e.errno, e.errno)}] {e.strerror or os.strerror(e.errno)}{where}"
  innermost = chain[-1]
  text = str(innermost).strip().splitlines()[0] if str(innermost).strip() else ""
  text = re.sub(r"\s*(\[tensorstore_spec=|See full TensorStore details:).*$", "", text)
  os_error = next((m for e in chain for m in [re.search(r"\[os_error_code='(\d+)'\]", str(e))] if m), None)
  prefix = ""
  if os_error is not None:
    code = int(os_error.group(1))
    prefix = f"[{errno.errorcode.get(code, code)}] {os.strerror(code)}; "
    text = text.replace(os_error.group(0), "").rstrip()
  if len(text) > 500:
    text = text[:500] + "…"
  return prefix + (f"{type(innermost).__name__}: {text}" if text else type(innermost).__name__)


def _fault_of(check) -> DamagedCheckpointError | None:
  try:
    check()
  except DamagedCheckpointError as e:
    return e
  return None


_AGREEMENT_TIMEOUT_MS = 10 * 60 * 1000


def _agreed_fault(step: int, fault: DamagedCheckpointError | None) -> DamagedCheckpointError | None:
  """This process's fault, else another process's: damage seen by one process counts for all.

  Goes through the coordination service's key-value store (no device collective, so processes may
  arrive minutes apart). One process: ``fault`` as it is.
  """
  if jax.process_count() == 1:
    return fault
  from jax._src import distributed as jax_distributed  # the client has no public accessor

  client = jax_distributed.global_state.client
  if client is None:  # processes set up by the platform itself
    return fault
  name = f"jaxretina_restore_agreement_{next(_BARRIER_IDS)}"
  client.key_value_set(f"{name}/{jax.process_index()}", "ok" if fault is None else f"damaged: {fault.fault}")
  client.wait_at_barrier(name, _AGREEMENT_TIMEOUT_MS)
  if fault is None:
    for i in range(jax.process_count()):
      verdict = client.blocking_key_value_get(f"{name}/{i}", _AGREEMENT_TIMEOUT_MS)
      if verdict != "ok":
        return DamagedCheckpointError(step, f"process {i} found it {verdict}")
  return fault


def _remove_tree(path: epath.Path, attempts: int = 5) -> bool:
  """Removes a directory; True once it is gone. Retries: the writers of a failed save that Orbax
  did not wait for may still be adding files to it for a moment."""
  for attempt in range(attempts):
    try:
      path.rmtree()
    except FileNotFoundError:
      pass
    except OSError:
      time.sleep(0.2 * (attempt + 1))
      continue
    if not path.exists():
      return True
  return False


def _chain(error: BaseException) -> list[BaseException]:
  chain, seen = [], set()
  e: BaseException | None = error
  while e is not None and id(e) not in seen:
    chain.append(e)
    seen.add(id(e))
    e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
  return chain


def _in_chain(error: BaseException, kind: type) -> BaseException | None:
  return next((e for e in _chain(error) if isinstance(e, kind)), None)


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def shape_mismatches(wanted: Any, stored: Any, *, model: str, builder: str) -> list[str]:
  """One line per leaf whose presence or shape differs between two trees (wanted = what the code builds)."""
  want, have = _flat_shapes(wanted), _flat_shapes(stored)
  problems = []
  for k in sorted(set(want) | set(have)):
    if k not in have:
      problems.append(f"{k}: expected {want[k]}, absent from the checkpoint")
    elif k not in want:
      problems.append(f"{k}: in the checkpoint {have[k]}, not in {model}")
    elif want[k] != have[k]:
      problems.append(f"{k}: checkpoint has shape {have[k]}, {builder} {want[k]}")
  return problems


def _head(problems: list[str], limit: int = 12) -> str:
  return "\n  ".join(problems[:limit]) + (f"\n  ... {len(problems) - limit} more" if len(problems) > limit else "")


def _flat_shapes(tree: Any) -> dict[str, tuple]:
  out = {}
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  for path, leaf in leaves:
    key = "/".join(_key_str(p) for p in path)
    shape = getattr(leaf, "shape", None)
    out[key] = tuple(shape) if shape is not None else tuple(np.shape(leaf))
  return out


def _key_str(p) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(p, attr):
      return str(getattr(p, attr))
  return str(p)

"""Orbax checkpoints of the train state together with the Grain iterator state.

A run started on a workdir that already has a checkpoint resumes from its latest step. Before
anything is restored (and long before anything could be saved over it) the checkpoint's tree is
compared with the state this config builds; a mismatch is an ``IncompatibleCheckpointError`` that
names the first differing leaves and leaves the workdir untouched.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import grain


class IncompatibleCheckpointError(RuntimeError):
  """The workdir's checkpoint was written by a different model/optimizer configuration."""


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


def _jsonable(state):
  if isinstance(state, bytes):
    return {"__bytes__": state.decode()}
  return state


class Checkpointer:
  """``CheckpointManager`` with items ``state`` (pytree) and ``data`` (iterator group)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_checkpointing: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=save_interval_steps,
        enable_async_checkpointing=async_checkpointing,
        create=True,
    )
    self.manager = ocp.CheckpointManager(
        self.directory,
        item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()},
        options=options,
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises IncompatibleCheckpointError when leaves differ in path, shape or dtype."""
    try:
      meta = self.manager.item_metadata(step)
      stored = meta["state"] if isinstance(meta, dict) or hasattr(meta, "__getitem__") else meta.state
    except Exception as e:  # noqa: BLE001 - unreadable metadata is itself an incompatibility
      raise IncompatibleCheckpointError(f"cannot read the checkpoint at {self.directory}/{step}: {e}") from e
    if stored is None:
      return
    problems = shape_mismatches(abstract_state, stored, model="this model", builder="this config builds")
    if problems:
      raise IncompatibleCheckpointError(
          f"the workdir's checkpoint {self.directory}/{step} does not match this configuration "
          f"({len(problems)} differing leaves):\n  {_head(problems)}\n"
          "Nothing was overwritten. Use another --workdir, or the config that wrote this checkpoint.")

  def restore(self, step: int, abstract_state: Any, data: IteratorGroup | None) -> Any:
    self.check_compatible(step, abstract_state)
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"]

  def save(self, step: int, state: Any, data: IteratorGroup | None, *, force: bool = False) -> bool:
    args = {"state": ocp.args.StandardSave(state)}
    if data is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data)
    return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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

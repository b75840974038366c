"""The files of a run wherever it lives: a local path, or a URL such as ``gs://bucket/run`` (etils.epath).

Everything the trainer and the evaluators write under a workdir (``config.json``, ``metrics.jsonl``,
TensorBoard events, evaluation reports, plots, predictions) goes through these helpers, so a workdir
on Cloud Storage works like a local one. Local paths use ``os`` directly; URLs go through
``etils.epath`` (Orbax's own path layer), whose ``gs://`` backend needs ``gcsfs`` (the ``[gcs]`` extra).

Object stores have no rename and no append: a remote write replaces the whole object, which appears
only once its upload is complete, so it is atomic without a temporary file. A local write goes to a
temporary file in the same directory and is renamed over the target, so a reader never sees half a
file either; it is created with mode 0666 minus the umask, as ``open()`` would.
"""

from __future__ import annotations

import os
import uuid
from typing import Union

PathLike = Union[str, os.PathLike]


def is_remote(path: PathLike) -> bool:
  """True for URLs (``gs://...``, ``s3://...``): paths that ``os`` must never see."""
  return "://" in os.fspath(path)


def _epath(path: PathLike):
  from etils import epath

  return epath.Path(os.fspath(path))


def join(base: PathLike, *parts: str) -> str:
  """``os.path.join`` for local paths and URLs alike (a URL keeps its ``//``)."""
  return os.path.join(os.fspath(base), *parts)


def absolute(path: PathLike) -> str:
  """An absolute local path, or the URL unchanged (``os.path.abspath('gs://b/x')`` would make it a
  relative path ``<cwd>/gs:/b/x``)."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def makedirs(path: PathLike) -> None:
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def exists(path: PathLike) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: PathLike) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: PathLike) -> bool:
  return _epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def listdir(path: PathLike) -> list[str]:
  """Names (not paths) of the entries of a directory."""
  if is_remote(path):
    return sorted(p.name for p in _epath(path).iterdir())
  return sorted(os.listdir(path))


def read_text(path: PathLike) -> str:
  if is_remote(path):
    return _epath(path).read_text()
  with open(path, encoding="utf-8") as f:
    return f.read()


def read_bytes(path: PathLike) -> bytes:
  if is_remote(path):
    return _epath(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def write_bytes(path: PathLike, data: bytes) -> str:
  """Writes ``data`` to ``path`` atomically (see the module docstring), creating the parent
  directories; returns the path."""
  path = os.fspath(path)
  if is_remote(path):
    target = _epath(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return path
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
  # os.open with 0o666 lets the kernel apply the umask (tempfile.mkstemp would give 0600: files other
  # users of a shared workdir cannot read).
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def write_text(path: PathLike, text: str) -> str:
  return write_bytes(path, text.encode("utf-8"))


def rename(source: PathLike, target: PathLike) -> None:
  """Renames a file, never over an existing one (FileExistsError)."""
  if is_remote(source) or is_remote(target):
    target_path = _epath(target)
    if target_path.exists():
      raise FileExistsError(f"{os.fspath(target)} exists")
    _epath(source).rename(target_path)
    return
  if os.path.exists(target):
    raise FileExistsError(f"{os.fspath(target)} exists")
  os.rename(source, target)

"""A stand-in for Cloud Storage in tests: ``gs://bucket/x`` is served from ``<root>/bucket/x`` on disk.

Both paths a gs:// workdir's files take are redirected: etils.epath's ``gs`` backend (everything
jaxretina.fileio, Orbax's directory handling and the TensorBoard writer do) and the TensorStore key-value
store Orbax writes array data through (its ``gcs`` driver becomes the ``file`` driver under ``root``).
Orbax's query for a hierarchical-namespace bucket (a Cloud Storage API call) answers "no".
Code that bypassed epath with ``os``/``open`` would create a local folder named ``gs:`` instead,
which the tests look for.
"""

from __future__ import annotations

import os

from etils.epath import backend as epath_backend
from etils.epath import gpath

PREFIX = "gs://"


class FakeGcsBackend(epath_backend._OsPathBackend):  # pylint: disable=protected-access
  """epath's local backend with every ``gs://`` path mapped under ``root`` (and results mapped back)."""

  def __init__(self, root: str):
    self.root = root

  def local(self, path) -> str:
    path = os.fspath(path)
    if not path.startswith(PREFIX):
      raise AssertionError(f"the fake gs:// backend got a non-gs path {path!r}")
    return os.path.join(self.root, path[len(PREFIX):])

  def url(self, path) -> str:
    return PREFIX + os.path.relpath(os.fspath(path), self.root)

  def open(self, path, mode):
    return super().open(self.local(path), mode)

  def exists(self, path):
    return super().exists(self.local(path))

  def isdir(self, path):
    return super().isdir(self.local(path))

  def listdir(self, path):
    return super().listdir(self.local(path))

  def glob(self, path):
    return [self.url(p) for p in super().glob(self.local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for root, dirs, files in super().walk(self.local(top), top_down=top_down, on_error=on_error):
      yield self.url(root), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    return super().makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    return super().mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

  def rmtree(self, path):
    return super().rmtree(self.local(path))

  def remove(self, path):
    return super().remove(self.local(path))

  def rename(self, path, dst):
    return super().rename(self.local(path), self.local(dst))

  def replace(self, path, dst):
    return super().replace(self.local(path), self.local(dst))

  def copy(self, path, dst, *, overwrite):
    return super().copy(self.local(path), self.local(dst), overwrite=overwrite)

  def stat(self, path):
    return super().stat(self.local(path))


def install(monkeypatch, root: str) -> FakeGcsBackend:
  """Serves gs:// from ``root`` for the rest of the test (undone by ``monkeypatch``)."""
  from orbax.checkpoint._src.path import gcs_utils

  fake = FakeGcsBackend(root)
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", fake)  # pylint: disable=protected-access
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                      lambda path: {"driver": "file", "path": fake.local(str(path))})
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  return fake

"""``config.mesh`` from the command line, as the README and the launchers write it."""

import os

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from train_utils import REPO_ROOT
from jaxretina.train import distributed


def _parse(*args):
  argv = ["main", f"--config={os.path.join(REPO_ROOT, 'configs', 'keepfit.py')}", *args]
  values = flags.FlagValues()
  # The override flags are declared from the command line, as jaxretina.main's are from sys.argv.
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def test_readme_mesh_override_builds_the_mesh():
  config = _parse("--config.mesh=data:-1,fsdp:4")
  mesh = distributed.make_mesh(config.mesh)
  assert dict(mesh.shape) == {"data": jax.device_count() // 4, "fsdp": 4}


def test_default_and_list_forms():
  assert dict(distributed.make_mesh(_parse().mesh).shape) == {"data": jax.device_count()}
  assert distributed.parse_mesh([("data", -1), ("fsdp", 2)]) == [("data", -1), ("fsdp", 2)]


@pytest.mark.parametrize("bad", ["data", "data:x", ":4", "data:-1,fsdp"])
def test_malformed_mesh_names_the_field(bad):
  with pytest.raises(ValueError, match="config.mesh"):
    distributed.parse_mesh(bad)


def test_per_device_batch_size_scales_the_global_batch_with_the_mesh(tmp_path):
  from train_utils import tiny_keepfit_config
  from jaxretina.train import contrastive

  config = tiny_keepfit_config(str(tmp_path / "data"))
  with config.unlocked():
    config.per_device_batch_size = 3
  for devices in (2, 8):
    mesh = distributed.make_mesh("data:-1", jax.devices()[:devices])
    assert distributed.global_batch_size(config, mesh) == 3 * devices
    task = contrastive.ContrastiveTask(config, mesh, num_train_examples=64)
    assert task.global_batch_size == 3 * devices
  with config.unlocked():
    config.per_device_batch_size = 0  # off: config.batch_size as given
  assert distributed.global_batch_size(config, distributed.make_mesh("data:-1")) == config.batch_size
  with config.unlocked():
    config.per_device_batch_size = -1
  with pytest.raises(ValueError, match="config.per_device_batch_size"):
    distributed.global_batch_size(config, distributed.make_mesh("data:-1"))

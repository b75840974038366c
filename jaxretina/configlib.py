"""Helpers for config files: argument parsing (big_vision's ``parse_arg``) and loading a sibling config."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``'paper,batch=64,data_dir=/x'`` into a ConfigDict with typed values.

  A bare word sets a boolean field to True (``paper`` → ``paper=True``). Values take the type of
  their default; unknown keys are an error naming the valid ones.
  """
  cfg = ml_collections.ConfigDict(defaults)
  if not arg:
    return cfg
  for part in arg.split(","):
    part = part.strip()
    if not part:
      continue
    key, _, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config argument {key!r} unknown; valid: {', '.join(sorted(defaults))}")
    if not _:
      cfg[key] = True
      continue
    default = defaults[key]
    if isinstance(default, bool):
      cfg[key] = value.lower() in ("1", "true", "yes", "on")
    elif isinstance(default, int):
      cfg[key] = int(value)
    elif isinstance(default, float):
      cfg[key] = float(value)
    else:
      cfg[key] = value
  return cfg


def load_config_module(path: str):
  """Imports a config file by path (config files are scripts, not a package)."""
  import importlib.util
  import os

  name = "jaxretina_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module

r"""Entry point: ``python -m jaxretina.main --config configs/<name>.py[:ARG] --workdir DIR [--config.x=y ...]``.

The config names the task (contrastive pretraining or classification), the model, the data and the
evaluators; the workdir (a local path or ``gs://bucket/path``) holds checkpoints, ``metrics.jsonl``,
TensorBoard events and ``config.json``. A workdir that already has a checkpoint is resumed; with a
config that differs in what changes training it is refused unless ``--allow_config_change``. On a
pod, run the same command on every host (see ``launch/``); ``jax.distributed`` is initialised from
the environment.

Errors the user can cause or fix — a bad or unwritable workdir, a full disk, damaged or incompatible
checkpoints, a changed config, a non-finite loss — end the run with one ``error: ...`` line and exit
status 1. ``--debug`` (or ``JAXRETINA_DEBUG=1``) shows their full traceback instead, and the INFO
logs of the libraries underneath (Orbax, absl, TensorStore), which are otherwise hidden.
"""

from __future__ import annotations

import os
import sys

from jaxretina import host_memory

if __name__ == "__main__":
  host_memory.restart()  # before the imports below: it may start the process over

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxretina import logs  # noqa: E402
from jaxretina.configlib import load_config_module  # noqa: E402
from jaxretina.train import checkpoint, loop  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/keepfit.py[:ARG].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs: a local path or "
                                "a gs://bucket/path URL.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Continue a workdir whose config.json differs from this config in fields that "
    "change training (the old config.json is kept as config.<step>.json). Without it such a run is refused.")
_DEBUG = flags.DEFINE_bool("debug", False, "Full tracebacks for every error and the INFO logs of third-party "
                           "libraries (also JAXRETINA_DEBUG=1).")

def _explain_override_error(argv) -> None:
  """Turns ml_collections' terse error for a typo'd --config.x into one that lists valid fields."""
  import ml_collections

  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    cfg_path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if cfg_path is None and "--config" in argv[:-1]:
      cfg_path = argv[argv.index("--config") + 1]
    if cfg_path is None:
      return
    file, _, cfg_arg = cfg_path.partition(":")
    cfg = load_config_module(file).get_config(cfg_arg or None)
    node = cfg
    for part in path.split("."):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      sys.exit(f"error: --config.{path}: no field {part!r}" + (f"; valid fields here: {', '.join(valid)}"
                                                                 if valid else ""))


def debug_mode() -> bool:
  return logs.debug_requested(_DEBUG.value)


def _user_errors() -> tuple[type[BaseException], ...]:
  """Exceptions whose message tells the user what to do: printed without a traceback."""
  return (OSError, checkpoint.CheckpointError, loop.NonFiniteLossError, loop.ConfigChangedError)


def main(argv) -> None:
  del argv
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  debug = debug_mode()
  logs.configure(debug)
  config = _CONFIG.value
  try:
    # expanduser leaves URLs (gs://...) as they are.
    loop.train_and_evaluate(config, os.path.expanduser(_WORKDIR.value),
                            allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except _user_errors() as e:
    if debug:
      raise
    sys.exit(f"error: {e}")


def run() -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  try:
    flags.FLAGS(sys.argv)  # parse early: ml_collections reports a typo'd override tersely
  except Exception as e:  # noqa: BLE001 - every parse error ends the run with a message
    _explain_override_error(sys.argv)
    sys.exit(f"error: {e}")
  app.run(main, flags_parser=lambda argv: argv[:1])  # already parsed above


if __name__ == "__main__":
  run()

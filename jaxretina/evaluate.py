r"""Transfer evaluation of two-tower models: ``python -m jaxretina.evaluate [--config FILE[:ARG] | --config=:ARG]``.

FLAIR's ``main_transferability`` protocol (docs/systems.md#transfer-evaluation-protocol) on a
checkpoint: a jaxretina contrastive workdir or a released FLAIR/KeepFIT ``.pth``
(``jaxretina.inference.load_two_tower``), run by ``jaxretina.transfer.runner``. The config is the
protocol's (``jaxretina.transfer.protocol.get_config``): with no ``--config`` its defaults, with
``--config=:ARG`` (nothing before the colon) the same for ``ARG``, e.g.
``--config=:experiment=08_ODIR200x3,method=lp`` — these need no file, so they work from an installed
package too — or a config file such as the repository's ``configs/transfer.py:ARG``.

Writes to ``config.out_dir`` (default: ``<workdir>/eval/transfer/<experiment>/<run id>`` for a
workdir, else ``./transfer_results/<experiment>/<run id>``): ``metrics.json``, ``metrics.csv``,
``predictions.csv``, ``confusion_matrix.png`` and ``roc.png``, and prints the summary table. The
same protocol runs inside training as the ``transfer`` evaluator (``config.evals``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

from jaxretina import host_memory

if __name__ == "__main__":
  host_memory.restart()  # before the imports below: it may start the process over

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxretina import fileio, inference  # noqa: E402
from jaxretina.train import distributed  # noqa: E402
from jaxretina.train.checkpoint import IncompatibleCheckpointError  # noqa: E402
from jaxretina.transfer import protocol, runner  # noqa: E402

# The protocol's config file inside the package: what --config names when it names no file.
PROTOCOL_CONFIG_FILE = protocol.__file__


def default_out_dir(config) -> str:
  """``<workdir>/eval/transfer/<experiment>/<run id>`` for a workdir, else under ``./transfer_results``."""
  in_workdir = fileio.isdir(config.checkpoint)  # a workdir (local or gs://) keeps its evaluations
  base = config.checkpoint if in_workdir else os.path.join(os.getcwd(), "transfer_results")
  sub = os.path.join("eval", "transfer") if in_workdir else ""
  return fileio.join(base, sub, config.experiment, protocol.run_id(config))


def evaluate(config, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Loads ``config.checkpoint`` and runs the protocol (``runner.run_protocol``)."""
  protocol.check_config(config)
  if not config.checkpoint:
    raise ValueError("no checkpoint: pass --checkpoint PATH (a jaxretina contrastive workdir or an upstream "
                     "FLAIR/KeepFIT .pth)")
  run = inference.load_two_tower(config.checkpoint, text_dir=config.text_dir or None,
                                 step=None if int(config.step) < 0 else int(config.step),
                                 constructor=json.loads(config.upstream_constructor) if config.upstream_constructor
                                 else None)
  mesh = distributed.make_mesh(config.mesh)
  return runner.run_protocol(run, config, mesh, config.out_dir or default_out_dir(config), log=log)


def with_package_config(argv: list[str]) -> list[str]:
  """``argv`` with ``--config=:ARG`` / ``--config :ARG`` (no file before the colon) naming the protocol's
  config file in the package (``PROTOCOL_CONFIG_FILE``): an installed jaxretina has no ``configs/``."""
  out = list(argv)
  for i, value in enumerate(out):
    if value.startswith("--config=:"):
      out[i] = "--config=" + PROTOCOL_CONFIG_FILE + value[len("--config="):]
    elif value.startswith(":") and i > 0 and out[i - 1] == "--config":
      out[i] = PROTOCOL_CONFIG_FILE + value
  return out


def _cli() -> None:
  """``python -m jaxretina.evaluate``. The flags are defined here, not at import, so that the module stays
  importable as a library beside other entry points that define their own ``--config``."""
  argv = with_package_config(sys.argv)
  config_flag = config_flags.DEFINE_config_file(
      "config", PROTOCOL_CONFIG_FILE, "the protocol's config: FILE[:ARG] (e.g. configs/transfer.py:method=lp), or "
      ":ARG for the defaults shipped in the package (e.g. --config=:experiment=08_ODIR200x3,method=lp)",
      lock_config=True, sys_argv=argv)
  checkpoint = flags.DEFINE_string("checkpoint", None, "a jaxretina contrastive workdir or an upstream "
                                   "FLAIR/KeepFIT .pth (sets config.checkpoint)")
  out = flags.DEFINE_string("out", None, "output folder (sets config.out_dir)")

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = config_flag.value
    with config.unlocked():
      config.checkpoint = checkpoint.value or config.checkpoint
      config.out_dir = out.value or config.out_dir
    try:
      distributed.maybe_initialize_distributed()
      evaluate(config)
    except (FileNotFoundError, ValueError, IncompatibleCheckpointError) as e:
      print(f"evaluate: error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(main, argv=argv)


if __name__ == "__main__":
  _cli()

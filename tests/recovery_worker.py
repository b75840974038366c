"""A tiny KeepFIT run for the kill -9 test: ``recovery_worker.py DATA_DIR WORKDIR STEPS``.

Same device setup and matmul precision as the test process (via conftest), asynchronous checkpoints
every step. Once the save of step STEPS-1 has started (Orbax first finishes the one before it, so
step STEPS-2 is committed) the worker stops for up to ten minutes: the parent's SIGKILL lands then,
mid-run and with a save possibly in flight, however slowly a loaded machine ran the steps before.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest  # noqa: E402,F401  (device count, matmul precision, compilation cache)
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

from train_utils import tiny_keepfit_config  # noqa: E402
from jaxretina.train import checkpoint as ckpt_lib  # noqa: E402
from jaxretina.train import loop  # noqa: E402

data_dir, workdir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = tiny_keepfit_config(data_dir, steps=steps)
with config.unlocked():
  config.evals = {}
  config.async_checkpointing = True

_save = ckpt_lib.Checkpointer.save


def _save_then_pause(self, step, *args, **kwargs):
  saved = _save(self, step, *args, **kwargs)
  if step == steps - 1:
    time.sleep(600)
  return saved


ckpt_lib.Checkpointer.save = _save_then_pause
loop.train_and_evaluate(config, workdir)

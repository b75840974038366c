"""One process of the two-process test: ``multihost_worker.py ADDRESS NUM_PROCESSES PROCESS_ID DATA_DIR WORKDIR``.

Runs 3 tiny KeepFIT steps under ``jax.distributed`` (4 fake CPU devices per process, set by the
caller through XLA_FLAGS) and writes this process's final params to ``params_process<i>.npz``.
"""

import os
import sys

import jax
import numpy as np

address, num_processes, process_id, data_dir, workdir = sys.argv[1:6]
jax.config.update("jax_default_matmul_precision", "highest")
jax.distributed.initialize(coordinator_address=address, num_processes=int(num_processes),
                           process_id=int(process_id))
assert jax.process_count() == int(num_processes) and jax.device_count() == 4 * int(num_processes)

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

from train_utils import tiny_keepfit_config  # noqa: E402
from jaxretina.train import loop  # noqa: E402
from jaxretina.train import distributed  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

config = tiny_keepfit_config(data_dir, steps=3)
with config.unlocked():
  config.evals = {}
loop.train_and_evaluate(config, workdir)

# Read the final params back from the shared checkpoint, fully replicated on every process.
mesh = distributed.make_mesh(config.mesh)
task = loop.get_task(config, mesh)
abstract = jax.eval_shape(task.init_state, jax.random.PRNGKey(config.seed))
shardings = loop.state_shardings(mesh, abstract)
from jaxretina.train import checkpoint as ckpt_lib  # noqa: E402

c = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_checkpointing=False)
state = c.restore(c.latest_step(), loop.with_sharding(abstract, shardings), None)
c.close()
params = multihost_utils.process_allgather(state.params, tiled=True)
flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
np.savez(os.path.join(workdir, f"params_process{process_id}.npz"), **flat)
print("process", process_id, "done", flush=True)

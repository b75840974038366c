r"""Ahead-of-time compile of a config's train step for a mesh you may not have (MaxText's train_compile).

  python -m jaxretina.aot --config configs/keepfit.py:paper --devices 64 [--json /tmp/aot.json] \
      [--config.mesh=data:-1,fsdp:8 --config.batch_size=1536 ...]
  python -m jaxretina.aot --config configs/keepfit.py:paper --topology v5e:8x8   # needs jaxretina[tpu]

Lowers and compiles ``train_step`` (the program ``python -m jaxretina.main`` runs) over a mesh of
``--devices`` fake CPU devices, or of a TPU/GPU topology's devices through JAX's ahead-of-time
compilation, without data or weights (everything is abstract), and prints per-device memory
(``arguments`` = state + batch shard, ``outputs``, ``temp``, ``total``), FLOPs per step and the
collectives in the compiled program. CPU compilation stands in for the accelerator's: the memory of
the buffers is what the program needs, the layouts and fusions of a TPU/GPU compiler differ.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags
from jaxretina.train import classification, contrastive, distributed
from jaxretina.train import distributed, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/keepfit.py:paper.",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 8, "Number of fake CPU devices to compile for (without --topology).")
_TOPOLOGY = flags.DEFINE_string("topology", "", "A TPU topology (e.g. v5e:8x8) to compile for instead of CPU "
                                "devices; needs libtpu (pip install 'jaxretina[tpu]').")
_JSON = flags.DEFINE_string("json", "", "Also write the figures as JSON to this path.")

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _devices(count: int, topology: str):
  import jax

  if topology:
    try:
      from jax.experimental import topologies

      return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # noqa: BLE001 - reported with what to do
      raise SystemExit(f"error: --topology={topology}: cannot describe it ({type(e).__name__}: {e}); "
                       "ahead-of-time TPU compilation needs libtpu: pip install 'jaxretina[tpu]'") from e
  devices = jax.devices()
  if len(devices) < count:
    raise SystemExit(f"error: --devices={count}: only {len(devices)} devices; the fake CPU device count is "
                     "fixed when JAX starts (run python -m jaxretina.aot as its own process)")
  return devices[:count]


def task_without_data(config, mesh):
  """The config's task built from its settings alone (sizes stand in for the training split)."""
  import numpy as np

  batch = distributed.global_batch_size(config, mesh)
  if config.task == "contrastive":
    return contrastive.ContrastiveTask(config, mesh, num_train_examples=batch)
  if config.task == "classification":
    labels = np.arange(batch) % int(config.data.num_classes)
    return classification.ClassificationTask(config, mesh, labels)
  raise SystemExit(f"error: config.task={config.task!r}: expected 'contrastive' or 'classification'")


def compile_train_step(config, devices) -> dict[str, Any]:
  """Compiles ``config``'s train step over ``devices``; returns the figures ``main`` prints."""
  import jax

  mesh = distributed.make_mesh(config.mesh, devices)
  task = task_without_data(config, mesh)
  abstract = jax.eval_shape(task.init_state, jax.random.PRNGKey(0))
  shardings = loop.state_shardings(mesh, abstract)
  batch_sharding = distributed.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
           for k, v in task.abstract_batch().items()}
  step = jax.jit(task.train_step, in_shardings=(shardings, batch_sharding),
                 out_shardings=(shardings, distributed.replicated(mesh)), donate_argnums=(0,))
  # XLA:CPU's cse_barrier_expander drops jax.checkpoint's barriers and merges the recomputed forward
  # back into the original one, which would hide what config.remat saves on GPU/TPU compilers.
  options = {"xla_disable_hlo_passes": "cse_barrier_expander"} if devices[0].platform == "cpu" else None
  compiled = step.lower(loop.with_sharding(abstract, shardings), batch).compile(compiler_options=options)
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = compiled.as_text()
  collectives = collections.Counter(m.group(1) for m in re.finditer(
      r"= \S+ (" + "|".join(COLLECTIVES) + r")(?:-start)?\(", hlo))
  per_device = {"arguments": int(memory.argument_size_in_bytes), "outputs": int(memory.output_size_in_bytes),
                "temp": int(memory.temp_size_in_bytes)}
  per_device["total"] = per_device["arguments"] + per_device["outputs"] + per_device["temp"] - int(
      getattr(memory, "alias_size_in_bytes", 0))
  return {"config": config.get("name", ""), "task": config.task, "devices": mesh.size, "mesh": dict(mesh.shape),
          "platform": devices[0].platform, "global_batch": task.global_batch_size,
          "memory_per_device_bytes": per_device, "flops_per_step": float((cost or {}).get("flops", float("nan"))),
          "collectives": dict(sorted(collectives.items()))}


def _print(report: dict[str, Any]) -> None:
  mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
  mem = report["memory_per_device_bytes"]
  print(f"{report['task']} train step on {report['devices']} {report['platform']} devices, mesh {report['mesh']}, "
        f"global batch {report['global_batch']}")
  print("per-device memory: " + ", ".join(f"{k} {mib(v)}" for k, v in mem.items()))
  print(f"FLOPs per step (per device, from the compiled program): {report['flops_per_step']:.4g}")
  print("collectives: " + (", ".join(f"{k} ×{v}" for k, v in report["collectives"].items()) or "none"))


def main(argv) -> None:
  del argv
  import jax

  if not _TOPOLOGY.value:
    # Before the CPU backend starts: it is created with this many devices.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  logging.getLogger().setLevel(logging.WARNING)
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required")
  report = compile_train_step(config, _devices(_DEVICES.value, _TOPOLOGY.value))
  report["config"] = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
  _print(report)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  app.run(main)

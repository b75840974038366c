"""Multi-process start-up, the device mesh, and how arrays are laid out on it.

jaxretina's answer to "pmap across accelerators" is ``jax.jit`` over a ``Mesh``: the batch is
sharded over the data axes, parameters are replicated (or, with an ``fsdp`` axis, their largest
divisible dimension is sharded over it), and XLA inserts the collectives.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")  # every batch dimension is split over all of these that the mesh has

_ENV_HINTS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
              "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")


def maybe_initialize_distributed(config: Any = None) -> None:
  """Calls ``jax.distributed.initialize()`` when this process is one of several.

  Explicit settings (``config.distributed.coordinator_address``/``num_processes``/``process_id``, or
  the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``)
  win; otherwise JAX's own cluster detection (TPU pods, SLURM, Open MPI) is used when one of those
  environments is recognised. A single process on one machine does nothing.
  """
  dist = dict(getattr(config, "distributed", None) or {}) if config is not None else {}
  address = dist.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
  num = dist.get("num_processes") or os.environ.get("JAX_NUM_PROCESSES")
  pid = dist.get("process_id", -1)
  pid = pid if pid is not None and int(pid) >= 0 else os.environ.get("JAX_PROCESS_ID")
  if jax.distributed.is_initialized():
    return
  if address and num is not None and pid is not None:
    logging.info("jax.distributed.initialize(%s, num_processes=%s, process_id=%s)", address, num, pid)
    jax.distributed.initialize(coordinator_address=address, num_processes=int(num), process_id=int(pid))
  elif any(os.environ.get(k) for k in _ENV_HINTS) and int(os.environ.get("SLURM_NTASKS", "2")) > 1:
    logging.info("jax.distributed.initialize() from the cluster environment")
    jax.distributed.initialize()


def parse_mesh(spec: str | Sequence[Sequence[Any]]) -> list[tuple[str, int]]:
  """``config.mesh`` → ``[(name, size), ...]``.

  The command-line form is a string ``'data:-1,fsdp:4'`` (``--config.mesh=data:-1,fsdp:4``); Python
  configs may also give the list ``[('data', -1), ('fsdp', 4)]``.
  """
  if isinstance(spec, str):
    axes = []
    for part in spec.split(","):
      name, sep, size = part.strip().partition(":")
      try:
        axes.append((name.strip(), int(size)))
      except ValueError:
        sep = ""
      if not name.strip() or not sep:
        raise ValueError(f"config.mesh={spec!r}: expected 'axis:size[,axis:size]' with integer sizes "
                         f"(one may be -1), e.g. 'data:-1' or 'data:-1,fsdp:4'")
    return axes
  try:
    return [(str(name), int(size)) for name, size in spec]
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.mesh={spec!r}: expected 'axis:size[,axis:size]' or [(axis, size), ...]") from e


def make_mesh(axes: str | Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds a mesh from ``'data:-1,fsdp:4'`` or ``[(name, size), ...]``; one size may be -1 (all
  remaining devices).

  Axis types are ``Auto`` (``jax.make_mesh`` defaults to explicit axes in this JAX, which rejects
  ordinary GSPMD code).
  """
  axes = parse_mesh(axes)
  devices = list(devices if devices is not None else jax.devices())
  names = tuple(str(a[0]) for a in axes)
  sizes = [int(a[1]) for a in axes]
  known = int(np.prod([s for s in sizes if s != -1])) if sizes else 1
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may have size -1, got {list(axes)}")
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"config.mesh {list(axes)}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) < len(devices) and -1 not in [int(a[1]) for a in axes]:
    # An explicit smaller mesh (e.g. [('data', 1)]) uses the first devices: handy for debugging.
    logging.warning("config.mesh %s uses %d of %d devices", list(axes), int(np.prod(sizes)), len(devices))
    devices = devices[:int(np.prod(sizes))]
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"config.mesh {list(axes)} needs {int(np.prod(sizes))} devices, have {len(devices)}")
  for n in names:
    if n not in ("data", "fsdp", "model"):
      raise ValueError(f"config.mesh: unknown axis {n!r} (known: data, fsdp, model)")
  try:
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(sizes, devices=devices)
  except Exception:  # noqa: BLE001 - CPU/fake devices have no topology to optimise for
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def data_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in DATA_AXES if a in mesh.axis_names)


def num_data_shards(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in data_axes(mesh)]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every data axis."""
  return NamedSharding(mesh, P(data_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(mesh: Mesh, abstract_tree: Any, min_fsdp_size: int = 2**18) -> Any:
  """Shardings for a tree of parameters / optimizer state.

  Without an ``fsdp`` axis everything is replicated. With one, each array of at least
  ``min_fsdp_size`` elements is split along its largest dimension divisible by the axis size
  (ZeRO-3 style); small arrays stay replicated.
  """
  fsdp = mesh.shape.get("fsdp", 1) if "fsdp" in mesh.axis_names else 1

  def rule(x):
    shape = getattr(x, "shape", ())
    if fsdp <= 1 or not shape or int(np.prod(shape)) < min_fsdp_size:
      return replicated(mesh)
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % fsdp == 0:
        spec = [None] * len(shape)
        spec[dim] = "fsdp"
        return NamedSharding(mesh, P(*spec))
    return replicated(mesh)

  return jax.tree.map(rule, abstract_tree)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays sharded on the data axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def global_batch_size(config, mesh: Mesh) -> int:
  """``config.per_device_batch_size`` × the mesh's devices when set (> 0), else ``config.batch_size``:
  the same command then keeps the per-device batch on 8 GPUs or a 256-chip pod."""
  per_device = int(config.per_device_batch_size)
  if per_device < 0:
    raise ValueError(f"config.per_device_batch_size={per_device}: expected 0 (use config.batch_size) or more")
  return per_device * mesh.size if per_device else int(config.batch_size)


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """The per-process share of a global batch; errors name the field to fix."""
  shards = num_data_shards(mesh)
  if global_batch_size % shards:
    raise ValueError(f"config.batch_size={global_batch_size} must be divisible by the {shards} data shards "
                     f"of the mesh {dict(mesh.shape)}")
  if global_batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={global_batch_size} must be divisible by the "
                     f"{jax.process_count()} processes")
  return global_batch_size // jax.process_count()


def wait_for_all_processes(name: str, timeout_s: float = 1800.0) -> None:
  """Blocks until every process reaches the barrier ``name`` (no-op with one process).

  The barrier is the coordination service's, not a device collective: CPU collectives (Gloo) give
  up after 30 s when one process reaches the first collective that much later than another (e.g.
  still compiling on a loaded host), so the loop compiles its step first and meets here before
  running it.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # the client has no public accessor

  client = jax_distributed.global_state.client
  if client is None:  # processes set up by the platform itself (e.g. TPU pods without initialize())
    return
  client.wait_at_barrier(name, int(timeout_s * 1000))

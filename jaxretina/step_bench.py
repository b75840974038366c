"""Timing a config's train step: the library behind ``python -m jaxretina.bench --config``.

See ``jaxretina.bench`` for what is measured and how steps of a shared CPU are filtered.
"""

from __future__ import annotations

import resource
import statistics
import time

from jaxretina import bench_torch, configlib, host_memory, profiling
from jaxretina.data import input_bench
from jaxretina.train import distributed, loop


def _peak_memory_bytes(devices) -> tuple[int, str]:
  stats = [d.memory_stats() for d in devices if hasattr(d, "memory_stats")]
  stats = [s for s in stats if s and "peak_bytes_in_use" in s]
  if stats:
    return max(s["peak_bytes_in_use"] for s in stats), "device peak_bytes_in_use (max over devices)"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host process max RSS"


# --against_torch: timed steps of each framework per alternation block (after one untimed step).
TIMED_STEPS_PER_BLOCK = 2


def _cpu_share(cpu_seconds: float, wall: float, cores: int) -> float:
  return cpu_seconds / (wall * cores)


def _timed(fn, cores: int) -> tuple[float, float]:
  """(wall seconds, CPU share) of one call of ``fn`` (which blocks until its results are ready)."""
  c0, w0 = time.process_time(), time.perf_counter()
  fn()
  wall = time.perf_counter() - w0
  return wall, _cpu_share(time.process_time() - c0, wall, cores)


def _median_kept(samples: list[tuple[float, float]], min_cpu_share: float, on_cpu: bool) -> tuple[float, int]:
  kept = [wall for wall, share in samples if not on_cpu or share >= min_cpu_share]
  return statistics.median(kept or [wall for wall, _ in samples]), len(kept)


def benchmark(config, steps: int, warmup: int, min_cpu_share: float, *, profile_top: int = 0,
              profile_dir: str | None = None, against_torch: bool = False) -> dict:
  import jax

  mesh = distributed.make_mesh(config.mesh)
  task = loop.get_task(config, mesh)
  rng = jax.random.PRNGKey(config.seed)
  abstract = jax.eval_shape(task.init_state, rng)
  shardings = loop.state_shardings(mesh, abstract)
  state = jax.jit(task.init_state, out_shardings=shardings)(rng)
  streams = task.data_streams(mesh)
  batch = loop.next_batch(streams, mesh)
  step_fn = jax.jit(task.train_step, in_shardings=(shardings, distributed.batch_sharding(mesh)),
                    out_shardings=(shardings, distributed.replicated(mesh)), donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  flops = profiling.compiled_flops(compiled)
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(state)

  def jax_step():
    nonlocal state, metrics
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)

  reference = None
  result_torch = {}
  if against_torch:
    reference = bench_torch.ReferenceProcess(config, jax.device_get(batch), task)
    for _ in range(warmup):
      reference.step()
    ours = sum(int(x.size) for x in jax.tree.leaves(state.params))
    result_torch = {"torch_parameters": reference.parameters, "jaxretina_parameters": ours,
                    "torch_reference_differs": reference.differences, "torch_threads": reference.threads,
                    "torch_process": f"its own, alternating with ours in blocks of 1 untimed + "
                                      f"{TIMED_STEPS_PER_BLOCK} timed steps"}

  cores = input_bench.available_cores()
  on_cpu = jax.devices()[0].platform == "cpu"
  ours_samples, torch_samples = [], []
  try:
    if reference is None:
      ours_samples = [_timed(jax_step, cores) for _ in range(steps)]
    while reference is not None and len(ours_samples) < steps:
      # Alternating blocks, so that a slow phase of the machine hits both alike; each block starts
      # with an untimed step, because the first step after the other framework ran pays for the
      # memory that one touched (KeepFIT: 12.0 s against 8.9 s for the step after it).
      timed = min(TIMED_STEPS_PER_BLOCK, steps - len(ours_samples))
      jax_step()
      ours_samples += [_timed(jax_step, cores) for _ in range(timed)]
      reference.step()
      for _ in range(timed):
        wall, cpu_seconds = reference.step()
        torch_samples.append((wall, _cpu_share(cpu_seconds, wall, cores)))
  finally:
    if reference is not None:
      reference.close()
  median, kept = _median_kept(ours_samples, min_cpu_share, on_cpu)
  peak, peak_kind = _peak_memory_bytes(jax.local_devices())
  device = jax.devices()[0]
  result = {
      "config_task": config.task,
      "devices": f"{jax.device_count()} x {device.device_kind}",
      "global_batch": task.global_batch_size,
      "compile_s": round(compile_s, 2),
      "step_s_median": round(median, 4),
      "img_per_s": round(task.global_batch_size / median, 2),
      "img_per_s_per_device": round(task.global_batch_size / median / jax.device_count(), 2),
      "steps_timed": len(ours_samples),
      "steps_kept": kept if on_cpu else len(ours_samples),
      "kept_rule": f"cpu/(wall*{cores}) >= {min_cpu_share}" if on_cpu else "all",
      "peak_memory_mb": round(peak / 2**20, 1),
      "peak_memory_kind": peak_kind,
      "model_tflop_per_step": round(flops * jax.device_count() / 1e12, 4) if flops else None,
      "achieved_tflop_s_per_device": round(flops / median / 1e12, 4) if flops else None,
      "compute_dtype": configlib.compute_dtype(config).name,
      "host_memory": host_memory.status(),
      "loss_finite": bool(jax.device_get(metrics["loss"]) == jax.device_get(metrics["loss"])),
  }
  dtype = configlib.compute_dtype(config).name
  peak_flops = profiling.peak_flops_per_device(device, dtype)
  if flops and peak_flops:
    result["mfu"] = round(flops / median / peak_flops, 4)
    result["mfu_peak_tflop_s"] = peak_flops / 1e12
  elif flops:
    result["mfu"] = f"n/a (no peak FLOP/s on record for {device.device_kind!r}, {dtype})"
  if reference is not None:
    torch_median, torch_kept = _median_kept(torch_samples, min_cpu_share, on_cpu)
    result.update(result_torch)
    result.update({"torch_step_s_median": round(torch_median, 4), "torch_steps_kept": torch_kept,
                   "speed_jaxretina_over_torch": round(torch_median / median, 3)})
  if profile_top or profile_dir:
    import tempfile

    directory = profile_dir or tempfile.mkdtemp(prefix="jaxretina_profile_")
    traced_steps = 3
    trace_path = profiling.trace(jax_step, directory, traced_steps)
    rows = profiling.top_ops(trace_path, traced_steps, compiled.as_text())
    result["profile"] = trace_path
    result["profile_summary"] = profiling.summary(rows)
    if profile_top:
      result["_profile_tables"] = (profiling.format_categories(rows) + "\n\n" +
                                   profiling.format_table(rows, profile_top))
  return result

r"""Benchmarks: a config's train step, or the host input pipeline.

  python -m jaxretina.bench --config configs/keepfit.py[:paper,synthetic=True] [--steps N]
      [--against_torch] [--profile_top 20] [--profile_dir DIR] [--json PATH] [--config.x=y ...]
  python -m jaxretina.bench --input [--input_records 512] [--input_image_size 512]
      [--input_dataset NAME --data_dir DIR] [--input_seconds 5] [--input_repeats 3] [--json PATH]

**Train step** (``--config``):

Prints compile seconds, steady-state train throughput (img/s, global and per device), peak memory,
the model FLOPs of one step (XLA's cost analysis of the compiled step), the FLOP/s achieved and, on
GPUs/TPUs whose peak is in ``jaxretina.profiling.PEAK_FLOPS``, the MFU. The step runs on one batch
drawn from the config's own pipeline, repeated (compute only, MaxText's "synthetic data" mode), so
input speed does not enter the number. ``:paper,synthetic=True`` on any config gives the paper's
model, resolution and batch on generated data: nothing is downloaded.

``--against_torch`` builds the equivalent PyTorch step (``jaxretina.bench_torch``: same towers, loss
structure and optimiser, fed the same batch; contrastive configs, DualAttendMed and CRD-Net) and
times it alternating with ours, each framework in a process of its own
(``bench_torch.ReferenceProcess``), in blocks of one untimed and two timed steps: the first step
after the other framework ran is slower for either; it prints both medians and
``speed_jaxretina_over_torch`` (> 1: ours is faster).

``--profile_top N`` traces three more steps with ``jax.profiler`` and prints the time per op
category and the N slowest ops (on CPU, seconds summed over the threads the trace shows running
them: a YNNPACK op's pool workers are not traced, so the sum is below the process CPU time);
``--profile_dir`` keeps the trace for TensorBoard's profile plugin.

Shared CPU machines can have slow phases in which a process gets about one of its cores.
Each step's process CPU time is divided by wall time × the cores
the process may use; only steps where that ratio is ≥ ``--min_cpu_share`` count towards the
median, and how many did is printed. On accelerators the ratio is not meaningful and every step
counts.

**Input** (``--input``): host-side images/s of decode + batch of pre-resized records through the
Grain pipeline training uses (``classification_batches``), next to a plain PIL + numpy loop over
the same encoded records in the same run, absolute, per core the process may use and per CPU-second,
and their ratio (``jaxretina.data.input_bench``). Unless ``--input_dataset`` names a prepared
dataset, ``--input_records`` synthetic fundus JPEGs of ``--input_image_size`` px are generated and
built with the ``image_folder`` builder once, cached under ``--data_dir``.
"""

from __future__ import annotations

import json
import os
import sys

from jaxretina import host_memory

if __name__ == "__main__":
  host_memory.restart()  # before the imports below: it may start the process over

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxretina import logs, step_bench  # noqa: E402
from jaxretina.data import input_bench  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file to benchmark (train-step mode).",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after warm-up.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_MIN_CPU_SHARE = flags.DEFINE_float("min_cpu_share", 0.85, "CPU-only: keep steps with cpu/(wall·cores) ≥ this.")
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
_AGAINST_TORCH = flags.DEFINE_bool("against_torch", False, "Also time an equivalent PyTorch step "
                                   "(jaxretina.bench_torch), interleaved with ours, and print the ratio.")
_PROFILE_TOP = flags.DEFINE_integer("profile_top", 0, "Trace 3 steps and print the N ops that take the most "
                                    "time, and the time per op category.")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", None, "Write the traced steps' jax.profiler trace here "
                                   "(TensorBoard profile plugin); default: a temporary directory.")
_INPUT = flags.DEFINE_bool("input", False, "Benchmark the host input pipeline instead of a train step.")
_INPUT_RECORDS = flags.DEFINE_integer("input_records", 512, "Input mode: records of the generated dataset.")
_INPUT_IMAGE_SIZE = flags.DEFINE_integer("input_image_size", 512, "Input mode: image side (generated and batched).")
_INPUT_DATASET = flags.DEFINE_string("input_dataset", None, "Input mode: a prepared dataset (name or name/config) "
                                     "with image + label to read instead of the generated one.")
_INPUT_SPLIT = flags.DEFINE_string("input_split", "train", "Input mode: split of --input_dataset.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Input mode: TFDS data directory (default: a cache dir, "
                                "$XDG_CACHE_HOME/jaxretina/input_bench).")
_INPUT_SECONDS = flags.DEFINE_float("input_seconds", 5.0, "Input mode: seconds per pipeline run.")
_INPUT_REPEATS = flags.DEFINE_integer("input_repeats", 3, "Input mode: interleaved pipeline/plain-loop pairs.")
_INPUT_BATCH = flags.DEFINE_integer("input_batch_size", 32, "Input mode: images per batch.")
_INPUT_THREADS = flags.DEFINE_integer("input_threads", None, "Input mode: Grain prefetch threads (default: the "
                                      "pipeline's own ReadOptions).")


def _print_input(result: dict) -> None:
  print(f"dataset                {result['dataset']} ({result['split']}, {result['records']} records, "
        f"{result['encoding']}, images {tuple(result['image_shape'])})")
  if result["built"]:
    print(f"prepared               generated in {result['generate_s']} s, built in {result['build_s']} s "
          f"({result['build_img_per_s']} img/s, {result['build_workers']} workers); not part of the rates")
  print(f"cores available        {result['cores_available']}  (len(os.sched_getaffinity(0)))")
  print(f"batch / runs           {result['batch_size']} / {result['repeats']} x {result['seconds_per_run']} s, "
        f"pipeline and plain loop interleaved")
  for kind, settings in (("pipeline", result["pipeline_settings"]), ("plain", result["plain_settings"])):
    r = result[kind]
    print(f"{kind:8s} settings       {settings}")
    print(f"{kind:8s} img/s          {r['img_per_s_median']} (runs {r['img_per_s']}), per core "
          f"{r['img_per_s_per_core']}, per CPU-second {r['img_per_cpu_s_median']}, cores busy {r['cores_busy_median']}")
  print(f"ratio pipeline/plain   {result['ratio_img_per_s']} (img/s), {result['ratio_img_per_cpu_s']} (per CPU-second)")


def main(argv) -> None:
  del argv
  logs.configure(debug=logs.debug_requested())
  if _INPUT.value:
    result = input_bench.run(data_dir=_DATA_DIR.value, dataset=_INPUT_DATASET.value, split=_INPUT_SPLIT.value,
                             num_records=_INPUT_RECORDS.value, image_size=_INPUT_IMAGE_SIZE.value,
                             batch_size=_INPUT_BATCH.value, seconds=_INPUT_SECONDS.value,
                             repeats=_INPUT_REPEATS.value, num_threads=_INPUT_THREADS.value)
    _print_input(result)
    if _JSON.value:
      with open(_JSON.value, "w") as f:
        json.dump(result, f, indent=2)
    return
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (or pass --input for the input benchmark)")
  result = step_bench.benchmark(_CONFIG.value, _STEPS.value, _WARMUP.value, _MIN_CPU_SHARE.value,
                     profile_top=_PROFILE_TOP.value, profile_dir=_PROFILE_DIR.value,
                     against_torch=_AGAINST_TORCH.value)
  tables = result.pop("_profile_tables", None)
  for k, v in result.items():
    if k != "profile_summary":
      print(f"{k:28s} {v}")
  if tables:
    print("\ntime per op category and top ops (3 traced steps; on CPU, seconds summed over the traced "
          "threads, which leave out YNNPACK's pool workers):")
    print(tables)
  if result["steps_kept"] == 0:
    print("warning: no step met the CPU-share rule (machine in a slow phase); median over all steps",
          file=sys.stderr)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)

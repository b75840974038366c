"""Step profiles: ``jax.profiler`` traces of chosen steps, per-op time tables, model FLOPs and MFU.

A trace written here is the standard TensorBoard profile (``tensorboard --logdir WORKDIR/profile``,
profile plugin) and is also read back by ``top_ops`` to print where the time of a step goes without
TensorBoard.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
from typing import Any

import jax

# Dense peak FLOP/s per chip for MFU (bf16 / fp32 where the vendor states it); device_kind substrings
# as JAX reports them. Sources: the vendors' data sheets (dense, without sparsity).
PEAK_FLOPS = {
    "bfloat16": {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
                 "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H200": 989e12, "H100": 989e12, "A100": 312e12,
                 "L4": 121e12, "A10G": 70e12, "V100": 125e12},
    "float32": {"H200": 67e12, "H100": 67e12, "A100": 19.5e12, "L4": 30e12, "A10G": 31e12, "V100": 15.7e12},
}


def parse_step_range(spec: str) -> tuple[int, int] | None:
  """``config.profile_steps``: ``'START,END'`` (1-based, inclusive) or '' (no profile)."""
  if not spec:
    return None
  try:
    start, end = (int(part) for part in str(spec).split(","))
  except ValueError:
    raise ValueError(f"config.profile_steps={spec!r}: expected 'START,END', e.g. '10,12'") from None
  if not 1 <= start <= end:
    raise ValueError(f"config.profile_steps={spec!r}: expected 1 <= START <= END")
  return start, end


def peak_flops_per_device(device, dtype: str) -> float | None:
  """The device's dense peak FLOP/s for ``dtype``, or None when it is not in the table (e.g. CPUs)."""
  table = PEAK_FLOPS.get(str(dtype), {})
  kind = getattr(device, "device_kind", "")
  for name in sorted(table, key=len, reverse=True):  # 'TPU v5 lite' before 'TPU v5'
    if name in kind:
      return table[name]
  return None


def compiled_flops(compiled) -> float | None:
  """FLOPs of one execution of a compiled program, per device, from XLA's cost analysis."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  flops = (cost or {}).get("flops")
  return float(flops) if flops is not None and flops >= 0 else None


@dataclasses.dataclass
class OpTime:
  name: str  # the HLO instruction (fusions keep their fusion name)
  category: str  # what the instruction is: convolution, dot, copy/transpose, loop fusion, ...
  seconds_per_step: float
  calls_per_step: float


def latest_trace(directory: str) -> str:
  paths = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"{directory}: no *.xplane.pb profile (jax.profiler trace) under it")
  return paths[-1]


def _computation_opcodes(hlo_text: str) -> dict[str, set[str]]:
  """Opcodes used in each computation of an HLO module's text."""
  opcodes: dict[str, set[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if header and "=" not in line.split("{")[0]:
      current = header.group(1)
      opcodes[current] = set()
    elif current and (m := _INSTRUCTION.match(line)):
      opcodes[current].add(m.group(2))
  return opcodes


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*?\b([a-z][\w\-]*)\((.*)$")


def hlo_categories(hlo_text: str) -> dict[str, str]:
  """Maps each instruction name of a compiled module to a readable category: convolutions and
  matmuls (also inside library fusions such as XLA:CPU's YNNPACK/oneDNN ones), copies/transposes,
  elementwise/reduction loop fusions, collectives, ..."""
  bodies = _computation_opcodes(hlo_text)
  categories = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, opcode, rest = m.groups()
    if opcode == "fusion":
      calls = re.search(r"calls=%?([\w.\-]+)", rest)
      body = bodies.get(calls.group(1), set()) if calls else set()
      if "convolution" in body:
        categories[name] = "convolution"
      elif "dot" in body:
        categories[name] = "dot (matmul)"
      elif name.startswith(("transpose", "copy")) or body <= {"transpose", "copy", "bitcast", "parameter"}:
        categories[name] = "copy/transpose"
      elif "reduce" in body or "reduce-window" in body:
        categories[name] = "reduction fusion"
      else:
        categories[name] = "elementwise fusion"
    elif opcode in ("copy", "transpose"):
      categories[name] = "copy/transpose"
    elif opcode == "dot":
      categories[name] = "dot (matmul)"
    else:
      categories[name] = opcode
  return categories


def top_ops(trace_path: str, steps: int, hlo_text: str | None = None) -> list[OpTime]:
  """Per-op time per step of a trace of ``steps`` steps, sorted by time (XLA ops with an ``hlo_op``)."""
  from jax.profiler import ProfileData

  data = ProfileData.from_file(trace_path)
  total = collections.Counter()
  calls = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        op = stats.get("hlo_op")
        if not op or event.name.startswith("end:"):
          continue
        total[op] += event.duration_ns * 1e-9
        calls[op] += 1
  categories = hlo_categories(hlo_text) if hlo_text else {}
  rows = [OpTime(name=op, category=categories.get(op, _category_from_name(op)),
                 seconds_per_step=seconds / steps, calls_per_step=calls[op] / steps)
          for op, seconds in total.items()]
  return sorted(rows, key=lambda r: -r.seconds_per_step)


def _category_from_name(op: str) -> str:
  return re.sub(r"[.\d]+$", "", op)


def by_category(rows: list[OpTime]) -> list[tuple[str, float, int]]:
  """(category, seconds per step, number of distinct ops), largest first."""
  seconds = collections.Counter()
  count = collections.Counter()
  for r in rows:
    seconds[r.category] += r.seconds_per_step
    count[r.category] += 1
  return [(c, s, count[c]) for c, s in seconds.most_common()]


def trace(fn, directory: str, steps: int) -> str:
  """Runs ``fn()`` ``steps`` times under a profiler trace written to ``directory``; returns its path."""
  jax.profiler.start_trace(directory)
  try:
    for _ in range(steps):
      jax.block_until_ready(fn())
  finally:
    jax.profiler.stop_trace()
  return latest_trace(directory)


def format_table(rows: list[OpTime], limit: int = 15) -> str:
  """The ``limit`` slowest ops; share = of all ops' time."""
  total = sum(r.seconds_per_step for r in rows) or 1.0
  lines = [f"{'op':40s} {'category':22s} {'s/step':>8s} {'share':>6s} {'calls':>6s}"]
  for r in rows[:limit]:
    lines.append(f"{r.name[:40]:40s} {r.category[:22]:22s} {r.seconds_per_step:8.3f} "
                 f"{r.seconds_per_step / total:6.1%} {r.calls_per_step:6.0f}")
  return "\n".join(lines)


def format_categories(rows: list[OpTime]) -> str:
  total = sum(r.seconds_per_step for r in rows) or 1.0
  lines = [f"{'category':28s} {'s/step':>8s} {'share':>6s} {'ops':>5s}"]
  for category, seconds, count in by_category(rows)[:12]:
    lines.append(f"{category[:28]:28s} {seconds:8.3f} {seconds / total:6.1%} {count:5d}")
  return "\n".join(lines)


def summary(rows: list[OpTime]) -> dict[str, Any]:
  return {"top_ops": [dataclasses.asdict(r) for r in rows[:30]],
          "categories": [dict(category=c, seconds_per_step=s, ops=n) for c, s, n in by_category(rows)]}


class StepProfiler:
  """``config.profile_steps='START,END'``: a ``jax.profiler`` trace of training steps START..END
  (1-based, inclusive), written under ``directory`` when step END has finished."""

  def __init__(self, spec: str, directory: str):
    self.range = parse_step_range(spec)
    self.directory = directory
    self.active = False

  def before_step(self, step: int) -> None:
    if self.range and step == self.range[0]:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after_step(self, step: int, outputs: Any) -> str | None:
    """Stops the trace after step END; returns a message saying where it went (else None)."""
    if self.active and step >= self.range[1]:
      jax.block_until_ready(outputs)
      self.close()
      return (f"profile of steps {self.range[0]}..{step} written under {self.directory} "
              f"(tensorboard --logdir {self.directory}, profile tab)")
    return None

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()

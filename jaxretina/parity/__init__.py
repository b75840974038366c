"""Numerical parity against fixtures produced by the real upstream PyTorch code.

A fixture directory (format: ``docs/parity.md``) holds ``meta.json``, ``weights.npz``
(the upstream ``state_dict``), ``inputs.npz`` (including ``rng/*`` draws made inside upstream
forwards) and ``outputs.npz``. A *handler* builds the jaxretina module from ``meta.json``,
converts the weights, runs the inputs and returns every output in the fixture's layout (NCHW for
4-D image tensors, torch key names for ``state_after/*``). This module compares them with the
per-output tolerances and reports.

Handlers are registered per upstream ``(repo, symbol)`` — the *kind* of a case — never per case
name, so other shapes and configurations of the same kind run through the same code. They live in
the ``handlers_*.py`` modules of this package, which are discovered automatically.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pkgutil
import traceback
from typing import Any, Callable, Mapping

import numpy as np
from jaxretina.models import convert
from jaxretina.train.state import TrainState

Handler = Callable[["Case"], Mapping[str, Any]]
MASK_PREFIX = "params_after_mask/"
_REGISTRY: dict[tuple[str, str], Handler] = {}
_DISCOVERED = False


@dataclasses.dataclass
class Case:
  """One fixture directory, loaded."""

  path: str
  meta: dict
  weights: dict[str, np.ndarray]
  inputs: dict[str, np.ndarray]
  outputs: dict[str, np.ndarray]

  @property
  def name(self) -> str:
    return self.meta.get("case", os.path.basename(os.path.normpath(self.path)))

  @property
  def constructor(self) -> dict:
    return self.meta.get("constructor") or {}

  @property
  def train(self) -> bool:
    return self.meta.get("mode") == "train"

  @property
  def train_step(self) -> bool:
    return self.meta.get("mode") == "train_step"

  @property
  def kind(self) -> tuple[str, str]:
    up = self.meta.get("upstream", {})
    return up.get("repo", ""), _symbol(up.get("symbol", ""))


@dataclasses.dataclass
class Result:
  name: str
  passed: bool
  detail: str
  worst_output: str = ""
  worst_abs_err: float = 0.0
  worst_ratio: float = 0.0  # abs err / allowed err, 1.0 = on the boundary


def _symbol(symbol: str) -> str:
  return symbol.split(" ")[0].strip()


def register(repo: str, symbol: str) -> Callable[[Handler], Handler]:
  """Registers ``fn(case) -> {output_name: array}`` for cases of upstream ``repo``/``symbol``."""

  def deco(fn: Handler) -> Handler:
    _REGISTRY[(repo, symbol)] = fn
    return fn

  return deco


def _discover() -> None:
  global _DISCOVERED
  if _DISCOVERED:
    return
  _DISCOVERED = True
  for mod in pkgutil.iter_modules(__path__):
    if mod.name.startswith("handlers_"):
      importlib.import_module(f"{__name__}.{mod.name}")


def supported_kinds() -> list[tuple[str, str]]:
  _discover()
  return sorted(_REGISTRY)


def load_case(path: str) -> Case:
  """Loads a fixture directory; raises FileNotFoundError naming what is missing."""
  meta_path = os.path.join(path, "meta.json")
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{path}: no meta.json (not a parity fixture directory)")
  with open(meta_path) as f:
    meta = json.load(f)

  def npz(name):
    p = os.path.join(path, f"{name}.npz")
    if not os.path.isfile(p):
      if name == "weights":
        return {}
      raise FileNotFoundError(f"{path}: missing {name}.npz")
    with np.load(p, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}

  return Case(path=path, meta=meta, weights=npz("weights"), inputs=npz("inputs"), outputs=npz("outputs"))


def compare(case: Case, got: Mapping[str, Any]) -> Result:
  """Compares handler outputs with the fixture, every output, per-output tolerances."""
  specs = case.meta.get("outputs", {})
  # params_after_mask/* select the compared entries of params_after/*; they are not outputs.
  names = [n for n in dict.fromkeys(list(specs) + list(case.outputs)) if not n.startswith(MASK_PREFIX)]
  failures: list[str] = []
  worst = ("", 0.0, 0.0)
  for name in names:
    if name not in case.outputs:
      failures.append(f"{name}: listed in meta.json but absent from outputs.npz")
      continue
    ref = np.asarray(case.outputs[name])
    if name not in got:
      if case.train_step and name.startswith("aux/"):
        continue  # a train step's intermediates are for debugging; compared when the handler gives them
      failures.append(f"{name}: not produced by the port")
      continue
    out = np.asarray(got[name])
    if out.shape != ref.shape:
      failures.append(f"{name}: shape {out.shape} != expected {ref.shape}")
      continue
    spec = specs.get(name, {})
    if spec.get("exact") or np.issubdtype(ref.dtype, np.integer) or ref.dtype == bool:
      bad = int(np.sum(out.astype(np.int64) != ref.astype(np.int64)))
      if bad:
        failures.append(f"{name}: {bad} of {ref.size} integer values differ")
      continue
    atol = float(spec.get("atol", case.meta.get("atol", 1e-6)))
    rtol = float(spec.get("rtol", case.meta.get("rtol", 1e-5)))
    out = out.astype(np.float64)
    refd = ref.astype(np.float64)
    if not np.all(np.isfinite(out)):
      failures.append(f"{name}: non-finite values in the port's output")
      continue
    err = np.abs(out - refd)
    allowed = atol + rtol * np.abs(refd)
    mask_name = MASK_PREFIX + name.removeprefix("params_after/")
    if name.startswith("params_after/") and mask_name in case.outputs:
      keep = np.asarray(case.outputs[mask_name], bool)
      err, allowed = err[keep], allowed[keep]
    ratio = float(np.max(err / allowed)) if err.size else 0.0
    max_err = float(np.max(err)) if err.size else 0.0
    if ratio > worst[2]:
      worst = (name, max_err, ratio)
    if ratio > 1.0:
      failures.append(f"{name}: max|err|={max_err:.3g} exceeds atol={atol:g}+rtol={rtol:g}·|ref| "
                      f"({int(np.sum(err > allowed))} of {err.size} values)")
  passed = not failures
  detail = "; ".join(failures) if failures else f"{len(names)} outputs"
  return Result(case.name, passed, detail, *worst)


def run_case(path: str) -> Result:
  """Loads, runs and compares one fixture directory; never raises."""
  try:
    case = load_case(path)
  except Exception as e:  # noqa: BLE001 - reported as a failed case
    return Result(os.path.basename(os.path.normpath(path)), False, f"cannot load: {e}")
  _discover()
  handler = _REGISTRY.get(case.kind)
  if handler is None:
    return Result(case.name, False, f"unsupported kind {case.kind[0]}:{case.kind[1]}")
  _set_precision()
  try:
    got = handler(case)
  except Exception as e:  # noqa: BLE001
    tb = traceback.format_exc(limit=-3).strip().splitlines()
    return Result(case.name, False, f"{type(e).__name__}: {e} [{' | '.join(tb[-3:])}]")
  return compare(case, {k: np.asarray(v) for k, v in got.items()})


def _set_precision() -> None:
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")


# ---------------------------------------------------------------- helpers for handler modules


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  return np.transpose(np.asarray(x), (0, 2, 3, 1)) if np.ndim(x) == 4 else np.asarray(x)


def nhwc_to_nchw(x) -> np.ndarray:
  x = np.asarray(x)
  return np.transpose(x, (0, 3, 1, 2)) if x.ndim == 4 else x


def state_after(variables: Mapping[str, Any], to_torch_key: Callable[[tuple[str, ...]], str]) -> dict:
  """Flattens ``batch_stats`` into ``state_after/<torch key>`` outputs.

  ``to_torch_key`` maps a Flax module path (tuple) to the torch module path (string).
  """
  from flax import traverse_util

  leaf_names = {"mean": "running_mean", "var": "running_var", "num_batches_tracked": "num_batches_tracked"}
  out = {}
  for path, v in traverse_util.flatten_dict(dict(variables.get("batch_stats", {}))).items():
    torch_module = to_torch_key(path[:-1])
    out[f"state_after/{torch_module}.{leaf_names[path[-1]]}"] = np.asarray(v)
  return out


def train_step_outputs(case: Case, placement: Mapping[str, tuple[str, ...]], *, grads: Any, params: Any,
                       batch_stats: Any, loss: Any, terms: Mapping[str, Any] = (),
                       extra: Mapping[str, Any] = ()) -> dict[str, np.ndarray]:
  """A train step's results in a train-step fixture's layout.

  ``grads``/``params``/``batch_stats`` are the step's Flax trees (gradients before clipping, the
  parameters after the update, the BatchNorm state after the step); ``placement`` maps each torch
  key of ``case.weights`` to its Flax path (``convert.convert_state_dict(..., placement=)``).
  Gradients and updated parameters are reported only for the keys the fixture lists (frozen and
  gradient-free parameters have none). ``terms``: ``loss/<name>`` values; ``extra``: any other
  outputs by their fixture name (``clip/total_norm``, ``state_after/feature_center``, ...).
  """
  shapes = {k: np.shape(v) for k, v in case.weights.items()}
  out: dict[str, np.ndarray] = {"loss": np.asarray(loss)}
  out.update({f"loss/{k}": np.asarray(v) for k, v in dict(terms).items()})
  for prefix, trees in (("grads/", {"params": grads}), ("params_after/", {"params": params}),
                        ("state_after/", {"batch_stats": batch_stats})):
    for key, value in convert.to_torch_state_dict(trees, placement, shapes).items():
      if prefix + key in case.outputs:
        out[prefix + key] = value
  out.update({k: np.asarray(v) for k, v in dict(extra).items()})
  return out


def one_device_mesh():
  """The mesh a train-step fixture runs on: upstream's step is one process on one device."""
  import jax

  return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))


def start_state(case: Case, task, variables: Mapping[str, Any], *, step: int = 0, system_state: Any = None):
  """The trainer state a train-step fixture starts from.

  Checks that ``task``'s schedule gives the fixture's ``meta.optimizer.lr_at_step`` at ``step``, and
  starts a fresh optimizer (upstream builds its own) whose schedule counter is at ``step``.
  """
  import jax
  import jax.numpy as jnp
  import optax

  want = float(case.meta["optimizer"]["lr_at_step"])
  lr = float(task.schedule(step))
  if not np.isclose(lr, want, rtol=1e-6, atol=0.0):
    raise ValueError(f"{case.path}: the configured schedule gives lr {lr} at step {step}, the fixture ran at {want}")
  params = jax.tree.map(jnp.asarray, variables["params"])
  opt_state = task.tx.init(params)
  if step:
    opt_state = optax.tree_utils.tree_set(opt_state, count=jnp.asarray(step, jnp.int32))
    if int(optax.tree_utils.tree_get(opt_state, "count", -1)) != step:
      raise ValueError(f"{case.path}: cannot put the optimizer's schedule counter at step {step}")
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                    batch_stats=jax.tree.map(jnp.asarray, variables.get("batch_stats", {})), opt_state=opt_state,
                    rng=jax.random.key_data(jax.random.key(0)),
                    system_state={} if system_state is None else system_state)

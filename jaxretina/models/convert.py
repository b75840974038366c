"""Generic PyTorch ``state_dict`` → Flax variables conversion.

Every ported module names its Flax submodules after the torch module path, with one rule:
a numeric path component is joined to its parent with ``_`` (torch ``layer1.0.conv1`` is Flax
``layer1_0/conv1``; ``encoder.layer.3.attention`` is ``encoder/layer_3/attention``). With that
rule, a single converter serves every model; model files only add a ``rename`` for the keys that
break it (for example an ``nn.Sequential`` whose indices name different layers).

The converter is strict: it reports every torch key it could not place and every Flax leaf
nothing filled, with the expected shapes, instead of silently leaving random weights behind.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util

LEAF_RENAMES = {
    # torch leaf name -> candidate (collection, flax leaf) in order of preference
    "weight": (("params", "kernel"), ("params", "scale"), ("params", "embedding")),
    "bias": (("params", "bias"),),
    "running_mean": (("batch_stats", "mean"),),
    "running_var": (("batch_stats", "var"),),
    "num_batches_tracked": (("batch_stats", "num_batches_tracked"),),
}


class ConversionError(ValueError):
  """A state_dict does not fit the Flax model it is converted into."""


def torch_path_to_flax(key: str) -> tuple[str, ...]:
  """``'layer1.0.conv1'`` → ``('layer1_0', 'conv1')``: numeric components join their parent."""
  out: list[str] = []
  for part in key.split("."):
    if part.lstrip("-").isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return tuple(out)


# torch → Flax kernel axes by rank: conv OI[D]HW → [D]HWIO, conv1d OIW → WIO, linear (out,in) → (in,out).
_KERNEL_AXES = {2: (1, 0), 3: (2, 1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}



def flax_path_to_torch(path: tuple[str, ...]) -> str:
  """Inverse of ``torch_path_to_flax``: ``('layer1_0', 'bn1')`` → ``'layer1.0.bn1'``."""
  parts = []
  for p in path:
    m = re.fullmatch(r"(.+?)((?:_-?\d+)+)", p)
    if m:
      parts.append(m.group(1))
      parts.extend(m.group(2)[1:].split("_"))
    else:
      parts.append(p)
  return ".".join(parts)


def torch_to_flax_array(value: np.ndarray, flax_leaf: str, target_shape: tuple[int, ...]) -> np.ndarray:
  """Re-lays a torch tensor for a Flax leaf: conv OI[D]HW → [D]HWIO, linear (out,in) → (in,out)."""
  value = np.asarray(value)
  if flax_leaf == "kernel" and value.ndim in _KERNEL_AXES:
    value = value.transpose(_KERNEL_AXES[value.ndim])
  if value.shape != tuple(target_shape):
    raise ConversionError(f"shape {value.shape} (after re-layout) != expected {tuple(target_shape)}")
  return value


def convert_state_dict(
    state_dict: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    prefix: str = "",
    rename: Callable[[str], str | None] | None = None,
    ignore: Iterable[str] = (),
    source: str = "state_dict",
    placement: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, Any]:
  """Converts ``state_dict`` into a variables dict shaped like ``target``.

  Args:
    state_dict: torch key → array (numpy or anything ``np.asarray`` takes).
    target: the Flax variables (or their ``jax.eval_shape``): ``{'params': ..., 'batch_stats': ...}``.
    prefix: only keys starting with it are used, with it stripped (e.g. ``'vision_model.model.'``).
    rename: maps a (prefix-stripped) torch key to another torch-style key, or ``None`` to drop it.
    ignore: regexes of keys that are expected and unused (e.g. the BERT pooler).
    source: named in error messages (usually the checkpoint's path).
    placement: when given, a dict that receives torch key (as in ``state_dict``) → the Flax path
      ``(collection, *path)`` it filled; ``to_torch_state_dict`` uses it to lay Flax trees (for
      example gradients) out as torch tensors again.

  Returns:
    A variables dict with numpy leaves, every leaf of ``target`` filled.

  Raises:
    ConversionError: naming every unplaced key and every unfilled leaf.
  """
  flat_target = {k: v for k, v in traverse_util.flatten_dict(_unfreeze(target)).items()}
  filled: dict[tuple[str, ...], np.ndarray] = {}
  unexpected: list[str] = []
  problems: list[str] = []
  ignore_res = [re.compile(p) for p in ignore]

  for torch_key, value in state_dict.items():
    key = torch_key
    if prefix:
      if not key.startswith(prefix):
        continue
      key = key[len(prefix):]
    if any(r.search(key) for r in ignore_res):
      continue
    if rename is not None:
      key = rename(key)
      if key is None:
        continue
    path = torch_path_to_flax(key)
    placed = False
    candidates = [(c, path[:-1] + (leaf,)) for c, leaf in LEAF_RENAMES.get(path[-1], ())]
    candidates += [("params", path), ("batch_stats", path)]
    for collection, flax_path in candidates:
      full = (collection,) + flax_path
      if full in flat_target:
        try:
          arr = torch_to_flax_array(value, flax_path[-1], flat_target[full].shape)
        except ConversionError as e:
          problems.append(f"{key} -> {'/'.join(full)}: {e}")
          placed = True
          break
        dtype = flat_target[full].dtype
        filled[full] = arr.astype(dtype)
        if placement is not None:
          placement[torch_key] = full
        placed = True
        break
    if not placed:
      unexpected.append(f"{key} {tuple(np.shape(value))}")

  missing = [f"{'/'.join(k)} {tuple(v.shape)}" for k, v in flat_target.items() if k not in filled]
  if unexpected or missing or problems:
    lines = [f"cannot convert {source}" + (f" (prefix {prefix!r})" if prefix else "") + ":"]
    if problems:
      lines.append("  shape mismatches:\n    " + "\n    ".join(problems))
    if unexpected:
      lines.append("  keys with no place in the model:\n    " + "\n    ".join(unexpected[:50]))
      if len(unexpected) > 50:
        lines.append(f"    ... and {len(unexpected) - 50} more")
    if missing:
      lines.append("  model variables the state_dict does not provide:\n    " + "\n    ".join(missing[:50]))
      if len(missing) > 50:
        lines.append(f"    ... and {len(missing) - 50} more")
    raise ConversionError("\n".join(lines))
  return traverse_util.unflatten_dict(filled)


def flax_to_torch_array(value: Any, flax_leaf: str, torch_shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of ``torch_to_flax_array``: a Flax leaf re-laid as the torch tensor of ``torch_shape``."""
  value = np.asarray(value)
  if flax_leaf == "kernel" and value.ndim in _KERNEL_AXES:
    value = value.transpose(np.argsort(_KERNEL_AXES[value.ndim]))
  if value.shape != tuple(torch_shape):
    raise ConversionError(f"shape {value.shape} (after re-layout) != torch shape {tuple(torch_shape)}")
  return value


def to_torch_state_dict(trees: Mapping[str, Any], placement: Mapping[str, tuple[str, ...]],
                        torch_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """Lays Flax trees out under the torch keys they were converted from.

  Args:
    trees: collection → tree, e.g. ``{'params': grads}`` or ``{'params': p, 'batch_stats': s}``.
    placement: from ``convert_state_dict(..., placement=...)``.
    torch_shapes: torch key → shape (the original ``state_dict``'s).
  Returns:
    torch key → array for every placed key whose collection is in ``trees``.
  """
  flat = {c: traverse_util.flatten_dict(_unfreeze(t)) for c, t in trees.items()}
  out = {}
  for key, (collection, *path) in placement.items():
    if collection in flat and tuple(path) in flat[collection]:
      out[key] = flax_to_torch_array(flat[collection][tuple(path)], path[-1], torch_shapes[key])
  return out


def variables_shape(module, *args, rngs=None, **kwargs) -> dict[str, Any]:
  """``jax.eval_shape`` of ``module.init`` — the target for ``convert_state_dict``, allocation-free."""
  rngs = rngs if rngs is not None else {"params": jax.random.key(0)}
  return jax.eval_shape(lambda: module.init(rngs, *args, **kwargs))


def load_torch_checkpoint(path: str, return_extras: bool = False):
  """Reads a PyTorch or safetensors checkpoint into ``{key: np.ndarray}`` without running pickle code.

  ``.safetensors`` needs no torch. ``.pt/.pth/.bin`` need torch and load with
  ``weights_only=True`` (tensors and plain containers only). A checkpoint that wraps its
  ``state_dict`` (``{'state_dict': ...}`` or ``{'model': ...}``) is unwrapped; with
  ``return_extras`` the wrapper's other tensors (e.g. CAL's ``feature_center``) come back too, as
  ``(state_dict, extras)``.
  """
  import os

  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file

    loaded = dict(load_file(path))
    return (loaded, {}) if return_extras else loaded
  if path.endswith(".npz"):
    with np.load(path) as z:
      loaded = {k: z[k] for k in z.files}
    return (loaded, {}) if return_extras else loaded
  try:
    import torch
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"reading {path} needs PyTorch (pip install torch==2.13.0); "
                      "or convert it to .safetensors first") from e
  obj = torch.load(path, map_location="cpu", weights_only=True)
  wrapper_obj = {}
  for wrapper in ("state_dict", "model", "model_state_dict"):
    if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
      wrapper_obj, obj = obj, obj[wrapper]
      break
  if not isinstance(obj, dict):
    raise ConversionError(f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")

  def arrays(d):
    out = {}
    for k, v in d.items():
      if hasattr(v, "detach"):
        v = v.detach().cpu()
        out[k] = v.float().numpy() if v.is_floating_point() else v.numpy()
    return out

  if return_extras:
    return arrays(obj), arrays({k: v for k, v in wrapper_obj.items() if v is not obj})
  return arrays(obj)


def _unfreeze(tree):
  if hasattr(tree, "unfreeze"):
    return tree.unfreeze()
  return jax.tree_util.tree_map(lambda x: x, dict(tree)) if isinstance(tree, Mapping) else tree

"""FLAIR's expert-knowledge dictionary (class name → expert descriptions), shipped as data.

The entries are FLAIR's ``flair/modeling/dictionary.py: definitions`` copied verbatim into
``jaxretina/assets/flair_definitions.json`` (the JSON also records the upstream commits). KeepFIT-CFP's
copy (``keepfit/modeling/dictionary.py``) holds the same entries minus the five
"myopic maculopathy grade …" keys, so one file serves both through ``variant``.

Upstream keeps ``definitions`` as a module-level dict whose lists ``compute_text_embeddings`` mutates in
place (it appends the class name to the global description list). That side effect is not reproduced:
every call here returns fresh copies, so callers can never change what a later caller sees.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from typing import Any

VARIANTS = ("flair", "keepfit")
_ASSET = "flair_definitions.json"


@functools.lru_cache(maxsize=1)
def _load_asset() -> dict[str, Any]:
  text = (importlib.resources.files("jaxretina") / "assets" / _ASSET).read_text(encoding="utf-8")
  return json.loads(text)


def _check_variant(variant: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"definitions: variant must be one of {VARIANTS}, got {variant!r}")


def definitions(variant: str = "flair") -> dict[str, list[str]]:
  """A fresh copy of the expert-knowledge dictionary, in upstream key order.

  Args:
    variant: ``"flair"`` (109 keys, jusiro/FLAIR) or ``"keepfit"`` (104 keys, lxirich/MM-Retinal
      KeepFIT-CFP: no "myopic maculopathy grade …" keys).

  Returns:
    ``{class name: [description, ...]}``; mutating it does not affect later calls.
  """
  _check_variant(variant)
  asset = _load_asset()
  omitted = set(asset["keepfit_omits"]) if variant == "keepfit" else set()
  return {name: list(descriptions) for name, descriptions in asset["definitions"].items()
          if name not in omitted}


def source(variant: str = "flair") -> dict[str, str]:
  """Where the dictionary was copied from: ``{'repo', 'path', 'commit'}``."""
  _check_variant(variant)
  return dict(_load_asset()[f"{variant}_source"])

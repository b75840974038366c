"""The bad-input policy of the dataset builders (docs/datasets.md#bad-input-and-the-skip-report).

Bad input (corrupt image, label row without image, image without label row, duplicate id, label
outside the known set) goes through one policy: ``on_bad_input='error'`` raises
:class:`DatasetInputError` naming the file/row and what was expected, ``'skip'`` counts and lists it
in a :class:`SkipReport` written next to the prepared dataset
(``<data_dir>/<name>/<config>/<version>/skip_report.json``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Protocol

ON_BAD_INPUT = ("error", "skip")
SKIP_REPORT_NAME = "skip_report.json"


class DatasetInputError(ValueError):
  """The manual download does not match the documented layout, or holds bad input (file/row named)."""


@dataclasses.dataclass
class SkipReport:
  """What a build skipped (under ``on_bad_input='skip'``) and notes on what it deliberately left out."""

  dataset: str
  config: str = ""
  on_bad_input: str = "error"
  skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def add(self, split: str, kind: str, where: str, reason: str) -> None:
    self.skipped.append({"split": split, "kind": kind, "where": where, "reason": reason})

  def counts(self) -> dict[str, int]:
    return dict(collections.Counter(s["kind"] for s in self.skipped))

  def to_json(self) -> dict[str, Any]:
    return {"dataset": self.dataset, "config": self.config, "on_bad_input": self.on_bad_input,
            "num_skipped": len(self.skipped), "counts": self.counts(), "skipped": self.skipped,
            "notes": self.notes}

  def write(self, path: Path) -> None:
    Path(path).write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n")


class BadInputPolicy:
  """Raises on bad input (``'error'``) or records it in a SkipReport (``'skip'``)."""

  def __init__(self, on_bad_input: str, report: SkipReport):
    if on_bad_input not in ON_BAD_INPUT:
      raise ValueError(f"on_bad_input must be one of {ON_BAD_INPUT}, got {on_bad_input!r}")
    self.on_bad_input, self.report = on_bad_input, report

  def __call__(self, split: str, kind: str, where: str, reason: str) -> None:
    """Handles one bad item: `where` names the file/row, `reason` what was wrong and what was expected."""
    if self.on_bad_input == "error":
      raise DatasetInputError(f"{self.report.dataset} ({split} split): {where}: {reason}. "
                              f"(Pass on_bad_input='skip' / --on_bad_input skip to skip such items and list "
                              f"them in {SKIP_REPORT_NAME}.)")
    self.report.add(split, kind, where, reason)


class ImagesNotUsed(Protocol):
  """What ``check_unlabelled`` needs of an image index (``file_discovery.ImageIndex``)."""

  def unused(self) -> Iterable[Path]: ...


def check_unlabelled(index: ImagesNotUsed, split: str, bad: BadInputPolicy, label_file: Path) -> None:
  """Reports every image of `index` no row of `label_file` named (docs/datasets.md#bad-input-and-the-skip-report)."""
  for path in index.unused():
    bad(split, "unlabelled_image", str(path), f"image has no row in {label_file} (expected one row per image)")

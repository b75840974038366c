"""The fields every ``config.evals`` entry that reads one dataset split has, declared once."""

from __future__ import annotations


def split_entry_fields(evaluator_type: str) -> dict:
  """``type``, the split and dataset read, and the batch size, at their defaults."""
  return dict(
      type=evaluator_type,
      split="test",
      # The dataset read ('' / None: the training data's, config.data).
      name="", data_dir="", builder_kwargs=None,
      batch_size=0,  # 0: the training batch
  )

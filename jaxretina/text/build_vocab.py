"""Builds the shipped retina WordPiece vocabulary (``jaxretina/assets/retina_vocab.txt``).

    python -m jaxretina.text.build_vocab [--out PATH]

Corpus: every key and description of the FLAIR expert dictionary, the prompt templates, the banned
category names and, when the synthetic data generator is importable, its
``jaxretina.data.synthetic.caption_corpus()`` and ``CLASS_NAMES``.

Vocabulary (ids in this order): ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4``; every ASCII letter,
digit and punctuation mark as a word-initial piece and as a ``##`` continuation piece (so words outside
the corpus split into pieces instead of becoming ``[UNK]``); then every distinct corpus word, sorted.
Words are what BERT's own normaliser and pre-tokeniser (``tokenizers``' ``BertNormalizer(lowercase)`` +
``BertPreTokenizer``: lowercase, accents stripped, split on whitespace and punctuation) produce, so each
corpus word is exactly one token under ``BertTokenizerFast``; this is checked before writing.

Why not ``tokenizers.trainers.WordPieceTrainer``: with a budget large enough to make every word one
token, its intermediate subwords depend on how equal-count merges are broken, which varies from run to
run (20 of ~1,070 entries differed between two runs), so the shipped ids would not be reproducible. The
whole-word vocabulary is deterministic and small (hundreds of entries), which is what a text tower
trained from scratch on the synthetic or retinal captions needs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import string
import sys
from typing import Iterable, Sequence

from tokenizers import normalizers, pre_tokenizers

from jaxretina.text import dictionary, prompts
from jaxretina.text.tokenizer import embedded_vocab_path
from jaxretina.text.tokenizer import Tokenizer

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_ALPHABET = tuple(string.ascii_lowercase + string.digits + string.punctuation)


def _synthetic_captions() -> list[str]:
  """The synthetic generator's captions and class names, or [] while that module does not exist yet."""
  try:
    synthetic = importlib.import_module("jaxretina.data.synthetic")
  except ModuleNotFoundError as error:
    if error.name not in ("jaxretina.data.synthetic",):
      raise
    return []
  texts = list(synthetic.caption_corpus())
  texts.extend(getattr(synthetic, "CLASS_NAMES", ()))
  return texts


def corpus(include_synthetic: bool = True) -> list[str]:
  """All texts the vocabulary must cover (FLAIR dictionary is the superset of KeepFIT's)."""
  texts: list[str] = []
  for name, descriptions in dictionary.definitions("flair").items():
    texts.append(name)
    texts.extend(descriptions)
  for template in (prompts.FLAIR_TEMPLATE, prompts.ZERO_SHOT_TEMPLATE):
    texts.append(template.replace("[ATR]", "").replace("[CLS]", ""))
  texts.extend(prompts.BANNED_CATEGORIES)
  if include_synthetic:
    texts.extend(_synthetic_captions())
  return texts


def _bert_word_splitter():
  normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                          lowercase=True)
  pre_tokenizer = pre_tokenizers.BertPreTokenizer()

  def words(text: str) -> list[str]:
    return [word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))]

  return words


def corpus_words(texts: Iterable[str]) -> list[str]:
  """Distinct lowercase words of ``texts`` as BERT splits them (punctuation marks are words), sorted."""
  split = _bert_word_splitter()
  return sorted({word for text in texts for word in split(text)})


def vocab_for(texts: Sequence[str]) -> list[str]:
  """The vocabulary (id order) covering every word of ``texts`` as one token; deterministic."""
  vocab = list(SPECIAL_TOKENS) + list(_ALPHABET) + [f"##{c}" for c in _ALPHABET]
  present = set(vocab)
  vocab.extend(word for word in corpus_words(texts) if word not in present)
  return vocab


def check_single_token_words(vocab_path: str, texts: Sequence[str]) -> list[str]:
  """Corpus words the vocabulary at ``vocab_path`` does not encode as exactly one token."""
  tokenizer = Tokenizer.from_vocab(vocab_path, lowercase=True)
  return [word for word in corpus_words(texts) if len(tokenizer.tokenize(word)) != 1]


def write_vocab(vocab: Sequence[str], path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(vocab) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=embedded_vocab_path(), help="where to write vocab.txt")
  parser.add_argument("--no-synthetic", action="store_true",
                      help="leave out jaxretina.data.synthetic.caption_corpus()")
  args = parser.parse_args(argv)
  texts = corpus(include_synthetic=not args.no_synthetic)
  vocab = vocab_for(texts)
  write_vocab(vocab, args.out)
  split_words = check_single_token_words(args.out, texts)
  if split_words:
    raise RuntimeError(f"build_vocab: words not single tokens: {split_words[:20]}")
  synthetic = "with" if (not args.no_synthetic and _synthetic_captions()) else "without"
  print(f"wrote {len(vocab)} entries for {len(corpus_words(texts))} corpus words "
        f"({synthetic} the synthetic caption corpus) to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

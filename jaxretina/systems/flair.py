"""FLAIR and KeepFIT (``task='contrastive'``): the two-tower model, its tokenizer and text config.

The contrastive trainer (``jaxretina.train.contrastive``), the inference loader
(``jaxretina.inference``), zero-shot/transfer evaluation and ``predict`` build the two towers here,
from ``config.model`` / ``config.text`` alone (no data is opened). A new two-tower system provides
the same three functions in its own module and is named by ``config.model.name``.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import ml_collections

from jaxretina import configlib
from jaxretina.models import bert as bert_lib
from jaxretina.models import flair
from jaxretina.models import resnet as resnet_lib
from jaxretina.text.tokenizer import Tokenizer


def build_tokenizer(cfg: ml_collections.ConfigDict):
  """``config.text.tokenizer``: 'embedded' (shipped retina vocabulary) or a local HF directory."""
  source = cfg.get("tokenizer", "embedded")
  if source in ("embedded", None, ""):
    return Tokenizer.embedded()
  if not os.path.isdir(source):
    raise FileNotFoundError(f"config.text.tokenizer={source!r}: not a local directory with a BERT vocabulary")
  return Tokenizer.from_pretrained_dir(source)


def build_text_config(cfg: ml_collections.ConfigDict, tokenizer) -> bert_lib.BertConfig:
  """``config.text.bert``: a directory with config.json (pretrained) or a dict of BertConfig fields."""
  pretrained = cfg.get("pretrained_dir")
  if pretrained:
    return bert_lib.BertConfig.from_pretrained_dir(pretrained)
  fields = dict(cfg.bert)
  fields.setdefault("vocab_size", tokenizer.vocab_size)
  fields.setdefault("pad_token_id", tokenizer.pad_token_id)
  return bert_lib.BertConfig.from_dict(fields)


def build_model(config: ml_collections.ConfigDict, text_config: bert_lib.BertConfig) -> flair.TwoTower:
  """The two-tower model of ``config``. ``config.remat`` ('none' | 'blocks' | 'dots') rematerialises
  the ResNet blocks and the BERT layers (``resnet.ResNet.remat``, ``bert.BertConfig.remat``)."""
  m = config.model
  dtype = configlib.compute_dtype(config)
  remat = config.get("remat", "none")  # configs saved before config.remat existed: no remat
  vision = resnet_lib.ResNet(block=m.vision.block, layers=tuple(m.vision.layers),
                             width_per_group=m.vision.get("width_per_group", 64),
                             base_width=m.vision.get("base_width", 64), num_classes=None, dtype=dtype,
                             remat=remat)
  return flair.TwoTower(
      vision=vision,
      text=dataclasses.replace(text_config, remat=remat),
      proj_dim=m.proj_dim,
      proj_bias=m.get("proj_bias", False),
      projection=m.get("projection", True),
      norm_features=m.get("norm_features", True),
      logit_scale_init=m.get("logit_scale_init", 0.07),
      knowledge_attention=config.kd.enabled,
      attention_heads=m.get("attention_heads", 2),
      attention_dropout=m.get("attention_dropout", 0.5),
      softmax_over_heads=m.get("softmax_over_heads", False),
      text_pooling=m.get("text_pooling", "all_positions"),
      dtype=dtype,
  )

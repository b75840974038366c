"""FLAIR and KeepFIT (``task='contrastive'``): the two-tower model, its tokenizer and text config.

The contrastive trainer (``jaxretina.train.contrastive``), the inference loader
(``jaxretina.inference``), zero-shot/transfer evaluation and ``predict`` build the two towers here,
from ``config.model`` / ``config.text`` alone (no data is opened). A new two-tower system provides
the same three functions and its ``model_config``/``loss_config`` in its own module and is named by
``config.model.name``.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from jaxretina import configlib
from jaxretina.models import bert as bert_lib
from jaxretina.models import flair
from jaxretina.systems import base, model_fields
from jaxretina.text.tokenizer import Tokenizer


def model_config() -> ml_collections.ConfigDict:
  """``config.model``: the ``flair.TwoTower`` module's arguments besides the text tower (``config.text``)
  and the knowledge attention (on with ``config.knowledge.enabled``); see ``models/flair.py``."""
  return ml_collections.ConfigDict(dict(
      vision=base.resnet_fields(),  # the image tower (ResNet-50)
      proj_dim=512,  # the shared embedding width
      proj_bias=False,
      projection=True,  # project both towers' features to proj_dim
      norm_features=True,  # L2-normalise the embeddings
      logit_scale_init=0.07,  # the initial temperature (the parameter is log(1 / this))
      # KeepFIT's expert-revision attention over the knowledge pairs.
      attention_heads=2,
      attention_dropout=0.5,
      # Upstream KeepFIT calls F.softmax without dim → a softmax over heads
      # (docs/systems.md#keepfit-expert-revision-attention); False is the paper's attention over the
      # knowledge keys.
      softmax_over_heads=False,
      text_pooling="all_positions",  # FLAIR: mean over every token incl. [PAD]; 'masked' ignores padding
  ))


def loss_config() -> ml_collections.ConfigDict:
  """``config.loss``: ``contrastive_scope`` 'global' (one contrastive loss over the global batch) or
  'per_device' (one per data shard, as upstream's DDP ranks; ``train/contrastive.py``)."""
  return ml_collections.ConfigDict(dict(contrastive_scope="global"))


def build_tokenizer(cfg: ml_collections.ConfigDict):
  """``config.text.tokenizer``: 'embedded' (shipped retina vocabulary) or a local HF directory."""
  source = cfg.tokenizer
  if source in ("embedded", None, ""):
    return Tokenizer.embedded()
  if not os.path.isdir(source):
    raise FileNotFoundError(f"config.text.tokenizer={source!r}: not a local directory with a BERT vocabulary")
  return Tokenizer.from_pretrained_dir(source)


def build_text_config(cfg: ml_collections.ConfigDict, tokenizer) -> bert_lib.BertConfig:
  """``config.text.bert``: a directory with config.json (pretrained) or a dict of BertConfig fields."""
  pretrained = cfg.pretrained_dir
  if pretrained:
    return bert_lib.BertConfig.from_pretrained_dir(pretrained)
  fields = dict(cfg.bert)
  fields.setdefault("vocab_size", tokenizer.vocab_size)
  fields.setdefault("pad_token_id", tokenizer.pad_token_id)
  return bert_lib.BertConfig.from_dict(fields)


def build_model(config: ml_collections.ConfigDict, text_config: bert_lib.BertConfig) -> flair.TwoTower:
  """The two-tower model of ``config``. ``config.remat`` ('none' | 'blocks' | 'dots') rematerialises
  the ResNet blocks and the BERT layers (``resnet.ResNet.remat``, ``bert.BertConfig.remat``)."""
  dtype = configlib.compute_dtype(config)
  fields = model_fields(config.model)
  fields["vision"] = base.resnet_backbone(config.model.vision, dtype, config.remat)
  return flair.TwoTower(text=dataclasses.replace(text_config, remat=config.remat),
                        knowledge_attention=config.knowledge.enabled, **fields, dtype=dtype)

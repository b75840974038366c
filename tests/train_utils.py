"""Tiny contrastive configs for trainer tests (few distinct jit shapes: every test shares them)."""

from __future__ import annotations

import os

from jaxretina.configlib import load_config_module

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATA = dict(config="tiny")  # synthetic_retina: 32 px, 48 train / 16 test / 16 expert


def tiny_keepfit_config(data_dir: str, *, steps: int = 3, mesh=(("data", -1),), knowledge: bool = True):
  """The embedded KeepFIT config shrunk to a few-second compile: 32 px, base width 4, 2-layer BERT."""
  config = load_config_module(os.path.join(REPO_ROOT, "configs", "keepfit.py")).get_config(f"steps={steps}")
  with config.unlocked():
    config.mesh = ",".join(f"{name}:{size}" for name, size in mesh)
    config.data.data_dir = data_dir
    config.data.builder_kwargs = dict(TINY_DATA)
    config.data.image_size = 32
    config.batch_size = 16
    config.knowledge.enabled = knowledge
    config.text.max_length = 12
    config.text.bert = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                            max_position_embeddings=16, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    config.model.vision.update(block="bottleneck", layers=[1, 1, 1, 1], width_per_group=64, base_width=4)
    config.model.proj_dim = 16
    config.checkpoint_every = 1
    config.log_every = 1
    config.async_checkpointing = False
    config.evals.zero_shot.batch_size = 16
  return config

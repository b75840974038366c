r"""FLAIR pretraining (Silva-Rodríguez et al., 2023): the KeepFIT trainer with the knowledge branch off.

Embedded local run (no ARG), on the synthetic retina data, ~5 min on 2 CPU cores:

  python -m jaxretina.main --config configs/flair.py --workdir /tmp/flair

Published recipe (``:paper``): ResNet-50 + Bio_ClinicalBERT (tokeniser max length 77), 512 px,
AdamW 1e-4 / wd 1e-5, per-iteration warm-up + cosine (100-epoch horizon), grad clip 1.0, 15 epochs,
batch 128, dataset-balanced sampling over the FLAIR pretraining mix:

  python -m jaxretina.main --config configs/flair.py:paper --workdir /runs/flair \
    --config.data.data_dir=/data/tfds --config.text.tokenizer=/weights/Bio_ClinicalBERT \
    --config.text.pretrained_dir=/weights/Bio_ClinicalBERT --config.init.vision_checkpoint=/weights/resnet50.pth

Arguments as ``configs/keepfit.py`` (``paper``, ``steps=N``).
"""

import os

from jaxretina.configlib import load_config_module


def get_config(arg=None):
  keepfit = load_config_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "keepfit.py"))
  arg = ",".join(a for a in [arg or "", "knowledge=False"] if a)
  c = keepfit.get_config(arg)
  c.data.banned_match = "substring"  # FLAIR bans a sample when a banned string is inside a category
  if "paper" in arg.split(","):
    with c.unlocked():
      c.text.max_length = 77  # FLAIR's tokenizer.model_max_length
      c.batch_size = 128
      c.epochs = 15
      c.start_epoch = 0
      c.loss.contrastive_scope = "global"
      c.data.balance = True  # FLAIR's UniformDataset: dataset i mod K, then a uniform record in it
  return c

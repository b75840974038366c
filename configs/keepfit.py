r"""KeepFIT: knowledge-enhanced FLAIR pretraining (MM-Retinal, Wu et al., MICCAI 2024).

Embedded local run (no ARG) — a fresh machine, nothing downloaded. Generates the synthetic retina
dataset (TFDS/ArrayRecord, cached under ``data.data_dir``), pretrains a small ResNet + small BERT
two-tower with the KeepFIT objective and prints the zero-shot accuracy on the held-out split:

  python -m jaxretina.main --config configs/keepfit.py --workdir /tmp/keepfit

  Expect ~6-8 min on 2 CPU cores (dataset generation, compile, 600 steps); zero-shot accuracy on the
  7 held-out synthetic classes (chance 0.14) is reported in README.md. Running the same command again
  resumes from the workdir's checkpoint and finishes at once.

Published recipe (``:paper``) — KeepFIT-CFP as released: ResNet-50 (torchvision v2 ImageNet weights
from a local .pth) + Bio_ClinicalBERT (a local HF directory), 512 px canvas, AdamW 1e-4 / wd 1e-5,
FLAIR's per-iteration linear warm-up + cosine (100-epoch horizon), grad clip 1.0, batch 24 per device,
epochs 15→40 continuing from a FLAIR-style checkpoint, KD stream of MM-Retinal CFP image–caption pairs
with identity targets, MSE weight 100:

  python -m jaxretina.main --config configs/keepfit.py:paper --workdir gs://bucket/keepfit \
    --config.data.data_dir=/data/tfds --config.text.tokenizer=/weights/Bio_ClinicalBERT \
    --config.text.pretrained_dir=/weights/Bio_ClinicalBERT \
    --config.init.vision_checkpoint=/weights/resnet50-11ad3fa6.pth \
    --config.per_device_batch_size=24

The datasets are built with ``python -m jaxretina.datasets build flair_dataframe ...`` and
``... build mm_retinal ...`` (see README). On a pod the same command runs on every host
(``launch/tpu_vm.sh``, ``launch/slurm.sh``); ``--config.mesh`` changes the device layout,
e.g. ``--config.mesh=data:-1,fsdp:4``.

Config arguments: ``paper`` (published recipe), ``knowledge=False`` (FLAIR objective: ``config.knowledge.enabled``
off, the expert-knowledge pairs stream unused), ``steps=N`` (override the step count, e.g. for smoke
tests). The fields and their defaults are declared in ``jaxretina.configlib.contrastive_config`` and
``jaxretina/systems/flair.py``; this file only overrides values.

``--config.remat=blocks`` recomputes each ResNet block and BERT layer in the backward pass: less
activation memory for one more forward pass of them ('dots' keeps the conv/Dense outputs; default 'none').
"""

from jaxretina import configlib
from jaxretina.configlib import contrastive_config, parse_arg
from jaxretina.data import synthetic
from jaxretina.text import prompts


def get_config(arg=None):
  arg = parse_arg(arg, paper=False, synthetic=False, knowledge=True, steps=0)
  c = contrastive_config("flair", steps=arg.steps)
  c.seed = 42
  # Upstream pretraining drops the OOD categories; KeepFIT matches them exactly, FLAIR as substrings.
  c.data.banned_categories = list(prompts.BANNED_CATEGORIES)
  c.data.banned_match = "exact"
  c.data.balance = False  # KeepFIT samples its mix uniformly (FLAIR: dataset-balanced, configs/flair.py)
  c.knowledge.enabled = arg.knowledge  # the config argument knowledge=False: FLAIR's objective (configs/flair.py)
  c.optimizer.update(name="adamw", weight_decay=1e-5, grad_clip=1.0)
  c.schedule.update(name="flair_warmup_cosine", lr=1e-4, warmup_epochs=1.0, max_epochs=100.0)

  if arg.paper:
    c.data.name = "flair_dataframe"
    c.data.builder_kwargs = None
    c.data.build_if_missing = False
    c.data.train_split = "train"
    c.data.image_size = 512
    c.data.category_names = []  # empty: categories are identified by a stable hash of their name
    c.knowledge.name = "mm_retinal"
    c.knowledge.split = "train"
    c.text.tokenizer = ""  # set to the Bio_ClinicalBERT directory
    c.text.max_length = 256  # KeepFIT's tokenizer.model_max_length
    c.text.bert = dict()  # Bio_ClinicalBERT's own config.json (text.pretrained_dir)
    c.model.vision.update(block="bottleneck", layers=(3, 4, 6, 3), width_per_group=64, base_width=64)
    c.model.proj_dim = 512
    c.batch_size = 24 * 8
    c.epochs = 40
    c.start_epoch = 15
    c.init.checkpoint = ""  # KeepFIT continues from a 15-epoch FLAIR-style checkpoint when given
    c.loss.contrastive_scope = "per_device"  # DDP: one contrastive loss per rank of 24
    c.checkpoint_every = 1000
    c.eval_every = 5000
    c.evals = dict()
  else:
    c.data.name = "synthetic_retina"
    c.data.builder_kwargs = dict(config="small")  # 64 px; 2000 train / 400 test / 300 expert
    c.data.build_if_missing = True
    c.data.train_split = "train"
    c.data.image_size = 64
    c.data.category_names = list(synthetic.CATEGORY_NAMES)  # every category an example can carry
    c.text.tokenizer = "embedded"
    c.text.max_length = 32
    c.text.bert = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                       max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    c.model.vision.update(block="bottleneck", layers=(1, 1, 1, 1), width_per_group=64, base_width=16)
    c.model.proj_dim = 128
    c.batch_size = 32
    c.epochs = 8
    c.start_epoch = 0
    c.schedule.lr = 1e-3  # small from-scratch towers learn faster than FLAIR's fine-tuning rate
    c.schedule.max_epochs = c.epochs
    c.checkpoint_every = 200
    c.eval_every = 0  # evaluate at the end
    c.evals = dict(zero_shot=dict(type="zero_shot", split="test", classes=list(synthetic.ZERO_SHOT_CLASSES),
                                  template="A fundus photograph of [CLS]", domain_knowledge=True, variant="flair",
                                  batch_size=64))
  if arg.synthetic:
    configlib.require_paper(arg, 'keepfit.py')
    configlib.use_synthetic_pretraining_data(c)
  c.lock()
  return c

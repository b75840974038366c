r"""FCN-CLIP + CBAM: DR grading with an FCN decoder and CBAM on a frozen FLAIR image tower.

Embedded local run (no ARG): the 5 DR grades of the synthetic retina dataset (64 px; nothing
downloaded); a small FLAIR-style ResNet image tower, frozen (no gradient, BatchNorm in eval mode),
its layer3 map decoded by the FCN decoder + CBAM, trained with the notebook's class-weighted focal
loss. Without ``--config.init.flair_checkpoint`` the frozen tower keeps its random initialisation
(the decoder learns on random features); point it at a FLAIR/KeepFIT checkpoint for the real thing:

  python -m jaxretina.main --config configs/fcn_clip.py --workdir /tmp/fcn_clip

Published recipe (``:paper``, docs/systems.md#fcn-clip-training-recipe): FLAIR ResNet-50 tower from
``flair_resnet.pth``, 512 px, ImageNet normalisation, the notebook's class-weighted sampler and
focal-loss weights, AdamW (lr 2e-4, weight decay 1e-3), gradient clip 2.0, batch 32, 20 epochs,
on Messidor-2 + APTOS 2019; the 0.3-weighted contrastive term against FLAIR's class prototypes
("Fundus image showing [CLS]") is reported (it carries no gradient):

  python -m jaxretina.main --config configs/fcn_clip.py:paper --workdir /runs/fcn_clip \
    --config.data.data_dir=/data/tfds --config.init.flair_checkpoint=/weights/flair_resnet.pth \
    --config.init.text_dir=/weights/Bio_ClinicalBERT

The notebook's ReduceLROnPlateau (factor 0.5, patience 2 on validation loss) and early stopping
are not reproduced (constant rate; documented deviation). Upstream quirks are flags under
``config.model``/``config.loss`` (``double_cbam_gating``, ``encoder_bn_batch_stats``,
``pt_from_weighted_ce``), default off.

Config arguments: ``paper``, ``steps=N``.
"""

from jaxretina.configlib import classification_config, parse_arg
from jaxretina.data import synthetic
from jaxretina.models import fcn_clip


def get_config(arg=None):
  arg = parse_arg(arg, paper=False, steps=0)
  c = classification_config("fcn_clip", steps=arg.steps)
  c.model.use_fusion = False  # the reported run; True decodes the fused layer2+layer3 map
  c.model.double_cbam_gating = False
  c.model.encoder_bn_batch_stats = False
  c.model.dropout_rate = 0.3
  c.loss.gamma = 2.0
  c.loss.class_weights = "notebook"
  c.loss.pt_from_weighted_ce = False
  c.loss.focal_weight = fcn_clip.FOCAL_WEIGHT
  c.loss.prompt_template = "Fundus image showing [CLS]"
  c.loss.prototype_classes = list(fcn_clip.DR_CATEGORIES)
  c.init.flair_checkpoint = ""
  c.init.text_dir = ""
  c.optimizer = dict(name="adamw", weight_decay=1e-3, grad_clip=2.0, frozen=["^vision_model/"])
  c.data.num_classes = 5
  c.data.class_names = list(fcn_clip.DR_CATEGORIES)
  c.data.sampling = dict(class_weights="fcn_clip_notebook", samples_per_epoch=0)

  if arg.paper:
    c.data.name = "messidor2"  # + APTOS 2019 in the notebook: build both and list them in data.name
    c.data.image_size = 512
    c.model.vision = dict(block="bottleneck", layers=[3, 4, 6, 3], base_width=64)
    c.model.proj_dim = 512
    c.model.decoder_channels = [512, 128]
    c.schedule = dict(name="constant", lr=2e-4)
    c.batch_size = 32
    c.epochs = 20
    c.evals.classification.split = "test"
  else:
    c.data.name = "synthetic_retina"
    c.data.builder_kwargs = dict(config="small")
    c.data.build_if_missing = True
    c.data.label_subset = list(range(5))
    c.data.class_names = list(synthetic.CLASS_NAMES[:5])
    c.data.image_size = 64
    c.data.normalize = "unit"  # FLAIR's towers see [0, 1] images
    c.model.vision = dict(block="bottleneck", layers=[1, 1, 1, 1], base_width=16)
    c.model.proj_dim = 128
    c.model.decoder_channels = [64, 32]
    c.schedule = dict(name="warmup_cosine", lr=2e-3, warmup_steps=30, eta_min=0.0)
    c.batch_size = 32
    c.epochs = 40  # the frozen tower makes a step cheap
    c.checkpoint_every = 200
  return c

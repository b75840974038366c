r"""BiRA-Net: bilinear attention net with the grading loss for diabetic-retinopathy grading.

Embedded local run (no ARG): the 5 DR grades of the synthetic retina dataset (64 px; nothing
downloaded), the bilinear two-branch net (the paper figure's design; docs/fidelity.md#bira-net says
what is inferred) on small ResNet trunks, trained with the grading loss:

  python -m jaxretina.main --config configs/bira_net.py --workdir /tmp/bira

Published recipe (``:paper``, docs/systems.md#bira-net-training-recipe, with the intended reading
of its bugs): ResNet-50 trunks from torchvision weights, 610 px, input 255·x − pixel mean,
horizontal flips, class-weighted sampling 1:10:8:20:21 with replacement and 32,000 samples per
epoch, SGD (lr 2e-4, momentum 0.9, weight decay 1e-8) with the stem, layer1, layer2 and the
constant ``up_c2`` frozen, batch 30, 10 epochs, on EyePACS:

  python -m jaxretina.datasets build eyepacs --manual_dir ~/eyepacs --data_dir /data/tfds --canvas_size 640
  python -m jaxretina.main --config configs/bira_net.py:paper --workdir /runs/bira \
    --config.data.data_dir=/data/tfds --config.init.backbone=/weights/resnet50-0676ba61.pth

As upstream, the test accuracy is evaluated after every epoch and drives ReduceLROnPlateau (mode
'max', factor 0.1, patience 6) and early stopping (10 epochs without improvement; the best-accuracy
checkpoint is kept under <workdir>/checkpoints_best).
``variant=ra_net`` trains the RA-Net as coded upstream (one trunk, dense head, log-softmax).

Config arguments: ``paper``, ``variant=bira_net|ra_net``, ``steps=N``.
"""

from jaxretina import configlib
from jaxretina.configlib import classification_config, parse_arg
from jaxretina.data import synthetic
from jaxretina.models import bira

DR_GRADES = list(synthetic.CLASS_NAMES[:5])


def get_config(arg=None):
  arg = parse_arg(arg, paper=False, synthetic=False, variant="bira_net", steps=0)
  # config.model / config.loss: declared in jaxretina/systems/bira_net.py (the paper's grading loss;
  # loss.name='ce' reproduces upstream train(), which minimises plain CE: the parity handler runs it).
  c = classification_config("bira_net", steps=arg.steps)
  c.model.variant = arg.variant
  c.data.normalize = "bira_pixel_mean"
  c.augment.hflip = 0.5

  if arg.paper:
    c.data.name = "eyepacs"
    c.data.num_classes = 5
    c.data.class_names = ["no DR", "mild", "moderate", "severe", "proliferative DR"]
    c.data.image_size = 610
    c.data.sampling.update(class_weights=[1.0, 10.0, 8.0, 20.0, 21.0], samples_per_epoch=32000)
    c.model.backbone.update(block="bottleneck", layers=(3, 4, 6, 3), base_width=64)
    # As upstream train(): the trunk's stem, layer1, layer2 and the constant-1 up_c2 stay frozen (per branch).
    c.optimizer.update(name="sgd", momentum=0.9, weight_decay=1e-8, frozen=bira.upstream_frozen_patterns(arg.variant))
    c.schedule.update(name="constant", lr=2e-4)
    c.batch_size = 30
    c.epochs = 10
    c.seed = 1
    c.evals.classification.split = "test"
    c.checkpoint_every = 1000
    # train(): scheduler.step(test_accuracy) after each epoch; stop after 10 epochs without a strict
    # improvement (end_patient >= 10); the best-accuracy weights are saved.
    c.eval_every_epochs = 1
    c.reduce_on_plateau.update(dict(metric="classification/accuracy", mode="max", factor=0.1, patience=6))
    c.early_stopping.update(dict(metric="classification/accuracy", mode="max", patience=10))
  else:
    c.data.name = "synthetic_retina"
    c.data.builder_kwargs = dict(config="small")
    c.data.build_if_missing = True
    c.data.label_subset = list(range(5))  # the five DR grades
    c.data.num_classes = 5
    c.data.class_names = DR_GRADES
    c.data.image_size = 64
    c.model.backbone.update(block="basic", layers=(1, 1, 1, 1), base_width=16)
    c.optimizer.update(name="adamw", weight_decay=1e-4, grad_clip=1.0)
    c.schedule.update(name="warmup_cosine", lr=2e-3, warmup_steps=30, eta_min=0.0)
    c.batch_size = 32
    c.epochs = 12
    c.checkpoint_every = 200
  if arg.synthetic:
    configlib.require_paper(arg, 'bira_net.py')
    configlib.use_synthetic_classification_data(c, builder="synthetic_retina")
  return c

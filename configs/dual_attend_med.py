r"""DualAttendMed (WS-DAN + CAL + channel attention) for retinal disease classification.

Embedded local run (no ARG): builds the synthetic retina dataset (64 px, 7 classes; nothing
downloaded) and trains a small stride-16 Bottleneck ResNet with DualAttendMed's head and its full
training step (raw pass → feature-center update → attention crop + drop → second pass →
composite loss), then evaluates the raw + crop averaged prediction, writes the confusion matrix,
ROC curves, attention heatmaps and the attention-map IoU against class-activation maps:

  python -m jaxretina.main --config configs/dual_attend_med.py --workdir /tmp/dam

Published recipe (``:paper``, docs/systems.md#dualattendmed-training-recipe): ResNet-152 (layer4 stride 1, output
stride 16) from torchvision weights, M = 32 attention maps, images resized to 256 px then cropped to
224 (random crop for training, centre crop for evaluation and prediction, as upstream's
``get_transform``), horizontal flips and colour jitter, SGD (momentum 0.9, weight decay 1e-5, lr 1e-3 ×
0.8 every 10 epochs), batch 16, 40 epochs, crop θ 0.5 (pad 0.1), drop θ 0.5, λ = 1.0 / 0.5 / 0.1,
auxiliary loss weight 0.01; DR grading on APTOS 2019 (5 grades):

  python -m jaxretina.datasets build aptos2019 --manual_dir ~/aptos --data_dir /data/tfds --canvas_size 256
  python -m jaxretina.main --config configs/dual_attend_med.py:paper --workdir /runs/dam \
    --config.data.data_dir=/data/tfds --config.init.backbone=/weights/resnet152-b121ed2d.pth

Other datasets: ``--config.data.name=ddr --config.data.num_classes=6`` etc. (upstream hard-codes
8 output classes whatever the dataset; here the head has the dataset's classes).
``variant=cal`` gives CAL's objective (BasicConv2d attention, center loss, CAL's θ ranges).

Config arguments: ``paper``, ``variant=dualattendmed|cal``, ``steps=N``.
"""

from jaxretina import configlib
from jaxretina.configlib import classification_config, parse_arg
from jaxretina.data import synthetic
from jaxretina.models import wsdan


def get_config(arg=None):
  arg = parse_arg(arg, paper=False, synthetic=False, variant="dualattendmed", steps=0)
  # config.model / config.loss: declared in jaxretina/systems/wsdan.py (DualAttendMed's values).
  c = classification_config("wsdan", steps=arg.steps)
  c.model.variant = arg.variant
  if arg.variant == "cal":
    c.loss.crop_theta = [0.4, 0.6]
    c.loss.drop_theta = [0.2, 0.5]
    c.loss.eval_crop_theta = 0.1
    c.loss.eval_crop_padding = 0.05
  c.evals.classification.cam_iou = True
  # config.init.backbone: the torchvision ResNet .pth of the backbone (upstream: resnet152-b121ed2d.pth).

  if arg.paper:
    c.data.name = "aptos2019"
    c.data.num_classes = 5
    c.data.class_names = ["no DR", "mild", "moderate", "severe", "proliferative DR"]
    # get_transform(S=224): Resize((⌊S/0.875⌋,)*2) = 256 → RandomCrop(224) (train) / CenterCrop(224) (eval).
    c.data.image_size = int(224 / 0.875)
    c.data.crop_size = 224
    c.model.backbone_layers = tuple(wsdan.BACKBONES["resnet152"])
    c.model.backbone_base_width = 64
    c.augment.update(hflip=0.5, brightness=0.126, saturation=0.5)
    c.optimizer.update(name="sgd", momentum=0.9, weight_decay=1e-5)
    c.schedule.update(name="epoch_step_decay", lr=1e-3, gamma=0.8, every_epochs=10)
    c.batch_size = 16
    c.epochs = 40
    c.evals.classification.split = "test"
    c.evals.classification.batch_size = 64
    c.checkpoint_every = 1000
  else:
    c.data.name = "synthetic_retina"
    c.data.builder_kwargs = dict(config="small")  # 64 px; 2000 train / 400 test
    c.data.build_if_missing = True
    c.data.num_classes = len(synthetic.CLASS_NAMES)
    c.data.class_names = list(synthetic.CLASS_NAMES)
    c.data.image_size = 64
    c.model.backbone_layers = (1, 1, 1, 1)
    c.model.backbone_base_width = 16
    c.model.num_attentions = 8
    c.augment.update(hflip=0.5, brightness=0.126, saturation=0.5)
    # From scratch on 2000 images: AdamW learns in minutes where the fine-tuning SGD rate would not.
    c.optimizer.update(name="adamw", weight_decay=1e-4)
    c.schedule.update(name="warmup_cosine", lr=2e-3, warmup_steps=30, eta_min=0.0)
    c.batch_size = 32
    c.epochs = 10
    c.checkpoint_every = 200
  if arg.synthetic:
    configlib.require_paper(arg, 'dual_attend_med.py')
    configlib.use_synthetic_classification_data(c, builder="synthetic_retina")
  return c

r"""CRD-Net: cross-modal attention between a colour-fundus and an OCT tower (AMD classification).

Embedded local run (no ARG): paired synthetic fundus photographs + OCT B-scans through the fovea
(``synthetic_fundus_oct``, 64 px, MMC-AMD's four classes; nothing downloaded), two ResNet-18
towers (narrowed for the CPU), CrossGate (CMA + Attention4D + UFFN), the fusion head and the two
single-modality heads, trained with the three-head loss:

  python -m jaxretina.main --config configs/crd_net.py --workdir /tmp/crd_net

The evaluation reports the fused prediction and, beside it, each single-modality head
(``metrics.json``).

Released recipe (``:paper``, docs/systems.md#crd-net-training-recipe): two 3-channel ResNet-18 towers,
both initialised from the torchvision ImageNet weights of ``--config.init.backbone`` (upstream builds
both with ``resnet18(pretrained=True)``; its loader opens every image as PIL 'RGB', so the grey OCT
B-scan enters as three equal channels, as ``data.fields='image:3,oct:3'`` decodes it here),
448 px (inferred from MMC-AMD's 448² images), RandomRotation(180) per modality,
ImageNet normalisation, SGD (lr 1e-3, momentum 0.9, no weight decay), batch 8, 150 epochs, loss
CE(fused) + CE(fundus) + CE(OCT), on MMC-AMD paired per eye:

  python -m jaxretina.datasets build mmc_amd --manual_dir ~/mmc-amd --data_dir /data/tfds
  (``--config splitAP`` for the patient-disjoint split, then ``--config.data.builder_kwargs="{'config': 'splitAP'}"``)
  python -m jaxretina.main --config configs/crd_net.py:paper --workdir /runs/crd \
    --config.data.data_dir=/data/tfds --config.init.backbone=/weights/resnet18-f37072fd.pth

Upstream selects the checkpoint with the best test Cohen κ; here every evaluation's κ is logged
and kept in ``metrics.jsonl``. ``skip_stem_maxpool`` reproduces upstream's towers without max-pool.

Config arguments: ``paper``, ``steps=N``.
"""

from jaxretina import configlib
from jaxretina.configlib import classification_config, parse_arg
from jaxretina.data import synthetic_oct


def get_config(arg=None):
  arg = parse_arg(arg, paper=False, synthetic=False, steps=0)
  c = classification_config("crd_net", steps=arg.steps)
  # Model order: x = fundus, y = OCT. The embedded run trains from scratch and keeps the OCT grey
  # (a 1-channel tower gets upstream's replacement stem conv); :paper feeds it as RGB.
  c.data.fields = "image:3,oct:1"
  c.data.num_classes = len(synthetic_oct.CLASS_NAMES)
  c.data.class_names = list(synthetic_oct.CLASS_NAMES)
  # config.model / config.loss: declared in jaxretina/systems/crd_net.py (upstream's ResNet-18 towers,
  # 4 heads, cross_dim 0 = 2× the tower channels, the three heads' CE weighted 1, 1, 1).
  c.augment.update(hflip=0.0, rotation=180.0)

  if arg.paper:
    c.data.name = "mmc_amd"
    # Both towers 3-channel and ImageNet-initialised, as upstream: the grey OCT is decoded to RGB
    # (its one channel repeated, PIL's L -> RGB), so it is normalised per channel like the fundus.
    c.data.fields = "image:3,oct:3"
    c.data.image_size = 448
    c.model.backbone_layers = (2, 2, 2, 2)
    c.model.backbone_base_width = 64
    c.optimizer.update(name="sgd", momentum=0.9, weight_decay=0.0)
    c.schedule.update(name="constant", lr=1e-3)
    c.batch_size = 8
    c.epochs = 150
    c.eval_every = 500
  else:
    c.data.name = "synthetic_fundus_oct"
    c.data.builder_kwargs = dict(config="small")  # 64 px; 1600 train / 400 test
    c.data.build_if_missing = True
    c.data.image_size = 64
    c.model.backbone_layers = (1, 1, 1, 1)
    c.model.backbone_base_width = 16
    # Attention4D's value width is 4·heads·cross_dim (16,384 channels at upstream's 2× the tower
    # channels); 32 keeps the local run in minutes.
    c.model.cross_dim = 32
    c.optimizer.update(name="adamw", weight_decay=1e-4, grad_clip=1.0)
    c.schedule.update(name="warmup_cosine", lr=2e-3, warmup_steps=30, eta_min=0.0)
    c.batch_size = 32
    c.epochs = 8
    c.checkpoint_every = 200
  if arg.synthetic:
    configlib.require_paper(arg, 'crd_net.py')
    configlib.use_synthetic_classification_data(c, builder="synthetic_fundus_oct")
  return c

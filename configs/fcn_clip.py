r"""FCN-CLIP + CBAM: DR grading with an FCN decoder and CBAM on a frozen FLAIR image tower.

Embedded local run (no ARG): the 5 DR grades of the synthetic retina dataset (64 px; nothing
downloaded); a small FLAIR-style ResNet image tower, frozen (no gradient, BatchNorm in eval mode),
its layer3 map decoded by the FCN decoder + CBAM, trained with the notebook's class-weighted focal
loss. Without ``--config.init.flair_checkpoint`` the frozen tower keeps its random initialisation
(the decoder learns on random features); point it at a FLAIR/KeepFIT checkpoint for the real thing:

  python -m jaxretina.main --config configs/fcn_clip.py --workdir /tmp/fcn_clip

Published recipe (``:paper``, docs/systems.md#fcn-clip-training-recipe): FLAIR ResNet-50 tower from
``flair_resnet.pth``, 512 px, ImageNet normalisation; the notebook's data: Messidor-2 (its 1,744
gradable images) + APTOS 2019 train concatenated (5,406 images) and split 70/15/15 at random (seed
42), the training split resampled cyclically to {0: 445, 1: 200, 2: 200, 3: 180, 4: 180}, class
weights from those resampled labels for the focal loss and the weighted sampler, the "minority"
augmentation for classes 1, 3, 4 and a 0.1 flip for the others; AdamW (lr 2e-4, weight decay 1e-3),
gradient clip 2.0, batch 32, 20 epochs; per epoch the validation loss drives ReduceLROnPlateau
(factor 0.5, patience 2) and early stopping (patience 7; the best-validation-loss checkpoint is kept
under <workdir>/checkpoints_best, ``python -m jaxretina.predict --best``). The loss is 0.7 × focal +
0.3 × the contrastive term against FLAIR's class prototypes ("Fundus image showing [CLS]"; it
carries no gradient, and without a FLAIR checkpoint it is left out: 0.7 × focal):

  python -m jaxretina.datasets build messidor2 --config gradable --manual_dir ~/messidor2 --data_dir /data/tfds
  python -m jaxretina.datasets build aptos2019 --manual_dir ~/aptos --data_dir /data/tfds
  python -m jaxretina.main --config configs/fcn_clip.py:paper --workdir /runs/fcn_clip \
    --config.data.data_dir=/data/tfds --config.init.flair_checkpoint=/weights/flair_resnet.pth \
    --config.init.text_dir=/weights/Bio_ClinicalBERT

Upstream quirks are flags, default off: ``config.model``/``config.loss`` (``double_cbam_gating``,
``encoder_bn_batch_stats``, ``pt_from_weighted_ce``) and ``config.augment.augment_eval_splits``.

Config arguments: ``paper``, ``steps=N``.
"""

from jaxretina import configlib
from jaxretina.configlib import classification_config, parse_arg
from jaxretina.data import synthetic
from jaxretina.models import fcn_clip


def get_config(arg=None):
  arg = parse_arg(arg, paper=False, synthetic=False, steps=0)
  # config.model / config.loss / config.init.flair_checkpoint: declared in jaxretina/systems/fcn_clip.py
  # (the notebook's values; its quirks off).
  c = classification_config("fcn_clip", steps=arg.steps)
  c.loss.prototype_classes = list(fcn_clip.DR_CATEGORIES)
  c.optimizer.update(name="adamw", weight_decay=1e-3, grad_clip=2.0, frozen=["^vision_model/"])
  c.data.num_classes = 5
  c.data.class_names = list(fcn_clip.DR_CATEGORIES)
  c.data.sampling.class_weights = "fcn_clip_notebook"
  c.augment.hflip = 0.5

  if arg.paper:
    c.data.name = "messidor2+aptos2019"
    # The notebook's combined_dataset.csv: FLAIR's 02_MESSIDOR.csv (the gradable images, first
    # category = grade), then APTOS 2019 train.csv; random_split 70/15/15 with manual_seed(42).
    c.data.mix.update(
        sources=[dict(name="messidor2", split="test", builder_kwargs=dict(config="gradable")),
                 dict(name="aptos2019", split="train", builder_kwargs=None)],
        splits=[["train", 0.7], ["validation", 0.15], ["test", 0.15]], seed=42)
    c.data.train_class_counts = [445, 200, 200, 180, 180]  # oversample_dataset's target_counts
    c.data.image_size = 512
    # val_test_transform (Resize 512, flip 0.1) for classes 0 and 2; minority_transform for 1, 3, 4.
    c.augment.update(hflip=0.1,
                     class_conditional=dict(
                         labels=[1, 3, 4], order=["hflip", "rotation", "resized_crop", "color_jitter", "affine",
                                                  "erasing"],
                         hflip=0.6, rotation=35.0, resized_crop_scale=[0.65, 1.0], brightness=0.25, contrast=0.25,
                         saturation=0.25, hue=0.12, affine_degrees=18.0, affine_translate=0.12,
                         affine_scale=[0.75, 1.25], erasing=0.4, erasing_scale=[0.02, 0.12]))
    c.model.vision.update(block="bottleneck", layers=(3, 4, 6, 3), base_width=64)
    c.model.proj_dim = 512
    c.model.decoder_channels = [512, 128]
    c.schedule.update(name="constant", lr=2e-4)
    c.batch_size = 32
    c.epochs = 20
    # Per epoch: the validation loss (0.7 × focal + 0.3 × contrastive, eval mode) steps
    # ReduceLROnPlateau(mode='min', factor=0.5, patience=2) and early stopping (patience 7, strict
    # improvement, best-validation-loss checkpoint). The test split is evaluated alongside, so the
    # test metrics of the best epoch are those of the best checkpoint.
    c.eval_every_epochs = 1
    c.evals = dict(validation=dict(type="classification", split="validation", batch_size=32, heatmaps=0,
                                   cam_iou=False, name_in_workdir="validation"),
                   test=dict(type="classification", split="test", batch_size=16, heatmaps=8, cam_iou=False,
                             name_in_workdir="test"))
    c.reduce_on_plateau.update(dict(metric="validation/loss", mode="min", factor=0.5, patience=2))
    c.early_stopping.update(dict(metric="validation/loss", mode="min", patience=7))
  else:
    c.data.name = "synthetic_retina"
    c.data.builder_kwargs = dict(config="small")
    c.data.build_if_missing = True
    c.data.label_subset = list(range(5))
    c.data.class_names = list(synthetic.CLASS_NAMES[:5])
    c.data.image_size = 64
    c.data.normalize = "unit"  # FLAIR's towers see [0, 1] images
    c.model.vision.update(block="bottleneck", layers=(1, 1, 1, 1), base_width=16)
    c.model.proj_dim = 128
    c.model.decoder_channels = [64, 32]
    c.schedule.update(name="warmup_cosine", lr=2e-3, warmup_steps=30, eta_min=0.0)
    c.batch_size = 32
    c.epochs = 40  # the frozen tower makes a step cheap
    c.checkpoint_every = 200
  if arg.synthetic:
    configlib.require_paper(arg, 'fcn_clip.py')
    configlib.use_synthetic_classification_data(c, builder="synthetic_retina")
  return c

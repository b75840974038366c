r"""Transfer evaluation of a FLAIR / KeepFIT two-tower model (FLAIR's ``main_transferability.py``).

One command per row of KeepFIT's tables (docs/systems.md#transfer-evaluation-protocol,
docs/systems.md#keepfit-and-flair-results):

  python -m jaxretina.evaluate --config configs/transfer.py:experiment=08_ODIR200x3,method=zero_shot \
    --checkpoint /weights/keepfit_flair+mm.pth --config.text_dir=/weights/Bio_ClinicalBERT \
    --config.data.dataframe_dir=/data/MM-Retinal/KeepFIT/local_data/dataframes/transferability \
    --config.data.root=/data/FLAIR_datasets

``--checkpoint`` is a jaxretina contrastive workdir or a released FLAIR/KeepFIT ``.pth`` (then
``text_dir`` names the local Bio_ClinicalBERT directory). ``experiment`` is one of
``jaxretina.transfer.splits.EXPERIMENTS`` (its CSV is read from ``data.dataframe_dir``, image paths
resolved under ``data.root``) or ``synthetic`` (the embedded synthetic retina test split; no download).

Arguments (``:a=b,c=d``): ``experiment``, ``method`` (zero_shot | lp | clip_adapter | tip_adapter |
tip_adapter_f | finetune; FLAIR's spellings clipAdapter / tipAdapter / tipAdapter-f / FT also work),
``shots_train``, ``shots_val``, ``shots_test`` ("k%" per class or a count per class), ``folds``,
``tta``, ``fta``. Unset, the shots and folds are each method's usual protocol: zero-shot on 100 % of
every class (1 fold); LP, adapters and fine-tuning 80 % / 20 % train / test, 5 folds (FLAIR's own
argparse defaults are 0 % / 100 % and 1 fold for every method). Examples:

  # Few-shot (KeepFIT's ODIR200x3 columns): 5 shots per class, 20 % test, 5 folds
  python -m jaxretina.evaluate --config configs/transfer.py:experiment=08_ODIR200x3,method=clip_adapter,shots_train=5
  # Linear probe on raw 2048-d features (FLAIR README: project_features False)
  python -m jaxretina.evaluate --config configs/transfer.py:experiment=25_REFUGE,method=lp,shots_train=20%
  # Local demo on a run of configs/keepfit.py (no data or weights needed)
  python -m jaxretina.evaluate --config configs/transfer.py:method=lp --checkpoint /tmp/keepfit

``project_features`` defaults per method: True for zero-shot and the adapters (they score against
the 512-d text prototypes), False for lp and finetune (FLAIR's README). Upstream KeepFIT's README
writes ``-- project_features True`` which argparse silently drops; that quirk is not reproduced.
"""

import os

import ml_collections

from jaxretina.configlib import parse_arg

METHOD_ALIASES = {"clipAdapter": "clip_adapter", "tipAdapter": "tip_adapter", "tipAdapter-f": "tip_adapter_f",
                  "FT": "finetune", "LP+FT": "finetune"}


def get_config(arg=None):
  arg = parse_arg(arg, experiment="synthetic", method="zero_shot", shots_train="", shots_val="", shots_test="",
                  folds=0, tta=False, fta=False)
  method = METHOD_ALIASES.get(arg.method, arg.method)
  zero_shot = method == "zero_shot"
  c = ml_collections.ConfigDict()
  c.checkpoint = ""  # a jaxretina contrastive workdir or an upstream FLAIR/KeepFIT .pth (or --checkpoint)
  c.step = -1  # workdir checkpoint step; -1 = the latest
  c.text_dir = ""  # upstream .pth only: the local Bio_ClinicalBERT directory
  # upstream .pth only, JSON: FLAIRModel constructor kwargs of a non-released architecture, e.g.
  # '{"proj_dim": 32, "vision_backbone": {...}}' (flair.two_tower_from_constructor); '' = ResNet-50, 512-d
  c.upstream_constructor = ""
  c.out_dir = ""  # default: <workdir>/eval/transfer/<experiment>/<run id>, or ./transfer_results/... for a .pth
  c.cache_dir = os.environ.get("JAXRETINA_FEATURE_CACHE", os.path.expanduser("~/.cache/jaxretina/features"))
  c.mesh = "data:-1"  # axis:size list; e.g. --config.mesh=data:-1,fsdp:4
  c.seed = 0  # adapter / fine-tuning initialisation; the folds are seeded by their index as upstream
  c.experiment = arg.experiment
  c.targets = []  # class names in label order; default: the experiment's
  c.method = method
  c.shots_train = arg.shots_train or ("0%" if zero_shot else "80%")
  c.shots_val = arg.shots_val or "0%"
  c.shots_test = arg.shots_test or ("100%" if zero_shot else "20%")
  c.folds = int(arg.folds) or (1 if zero_shot else 5)
  c.balance = False  # upstream's oversampling of the train split
  c.project_features = method not in ("lp", "finetune")
  c.norm_features = True
  c.tta = bool(arg.tta)
  c.fta = bool(arg.fta)
  c.augment = ml_collections.ConfigDict(dict(passes=20, seed=0, kornia_grid_quirk=False))
  # Upstream Tip-Adapter(-f) predicts, without tta, from test images passed once through the random
  # pretraining augmentation (``extract_vision_features(..., transforms=augmentations_pretraining)``).
  # False (default): clean test features, as every other method and the Tip-Adapter paper.
  c.tip_augment_test_features = False

  c.data = ml_collections.ConfigDict()
  c.data.batch_size = 64  # feature extraction, global
  c.data.num_threads = 8  # host decode threads
  if arg.experiment == "synthetic":
    from jaxretina.data import synthetic

    c.data.source = "tfds"
    c.data.name = "synthetic_retina"
    c.data.splits = ["test"]  # held out from configs/keepfit.py's pretraining
    c.data.data_dir = os.environ.get("JAXRETINA_DATA_DIR", os.path.expanduser("~/.cache/jaxretina/datasets"))
    c.data.builder_kwargs = dict(config="small")
    c.data.build_if_missing = True
    c.data.class_from = "label"  # 'categories': the first FLAIR category of a record (other jaxretina datasets)
    c.data.image_size = 0  # 0: the checkpoint's training resolution
    c.targets = list(synthetic.ZERO_SHOT_CLASSES)
  else:
    c.data.source = "dataframe"
    c.data.dataframe_dir = ""  # folder of the experiment CSVs (KeepFIT: local_data/dataframes/transferability)
    c.data.csv = ""  # or one CSV path (overrides the experiment's file name)
    c.data.root = ""  # FLAIR's PATH_DATASETS: the CSV's image paths are relative to it
    c.data.crop_foreground = True  # FLAIR's main_transferability default; KeepFIT has no such step
    c.data.image_size = 512

  c.zero_shot = ml_collections.ConfigDict(dict(template="", domain_knowledge=True))  # '' = the model's template
  c.lp = ml_collections.ConfigDict(dict(C=0.316, max_iter=1000))
  c.adapter = ml_collections.ConfigDict(dict(epochs=40, lr=1e-3, batch_size=1, order_seed=42,
                                             tip_f_train_test_mismatch=False, tip_f_inputs_track_keys=False))
  c.finetune = ml_collections.ConfigDict(dict(epochs=50, batch_size=4, lr=1e-4, patience=10, lp_init=arg.method == "LP+FT"))
  c.lock()
  return c

r"""FLAIR's transfer protocol: its configuration, with every default (docs/systems.md#transfer-evaluation-protocol).

``get_config(arg)`` is the protocol's config; ``configs/transfer.py`` hands it on, and
``python -m jaxretina.evaluate`` reads it from here when no config file is named, so an installed
package (without the repository's ``configs/``) has it too. The ``transfer`` evaluator builds its
config with it as well. ``jaxretina.transfer.runner`` runs the protocol on a loaded model.

``arg`` (``a=b,c=d``): ``experiment``, ``method`` (zero_shot | lp | clip_adapter | tip_adapter |
tip_adapter_f | finetune; FLAIR's spellings clipAdapter / tipAdapter / tipAdapter-f / FT / LP+FT
also work), ``shots_train``, ``shots_val``, ``shots_test`` ("k%" per class or a count per class),
``folds``, ``tta``, ``fta``. Unset, the shots and folds are each method's usual protocol: zero-shot on
100 % of every class (1 fold); LP, adapters and fine-tuning 80 % / 20 % train / test, 5 folds (FLAIR's
own argparse defaults are 0 % / 100 % and 1 fold for every method). ``experiment`` is one of
``jaxretina.transfer.splits.EXPERIMENTS`` (its CSV is read from ``data.dataframe_dir``, image paths
resolved under ``data.root``) or ``synthetic`` (the embedded synthetic retina test split; no download).

``project_features`` defaults per method: True for zero-shot and the adapters (they score against
the 512-d text prototypes), False for lp and finetune (FLAIR's README). Upstream KeepFIT's README
writes ``-- project_features True`` which argparse silently drops; that quirk is not reproduced.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import ml_collections

from jaxretina.configlib import default_data_dir, parse_arg
from jaxretina.data import synthetic
from jaxretina.transfer import splits

METHODS = ("zero_shot", "lp", "clip_adapter", "tip_adapter", "tip_adapter_f", "finetune")
# FLAIR's / KeepFIT's command-line spellings of the methods.
METHOD_ALIASES = {"clipAdapter": "clip_adapter", "tipAdapter": "tip_adapter", "tipAdapter-f": "tip_adapter_f",
                  "FT": "finetune", "LP+FT": "finetune"}
# The methods that score image features against the text prototypes.
LANGUAGE_METHODS = ("zero_shot", "clip_adapter", "tip_adapter", "tip_adapter_f")
# The fold-summary metrics reported (FLAIR's and KeepFIT's tables).
SUMMARY_KEYS = ("aca", "kappa", "f1_avg", "auc_avg", "sensitivity_avg", "specificity_avg", "taop_acc", "amd_auc",
                "amd_kappa", "amd_f1")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The protocol's config for ``arg`` (see the module docstring), locked."""
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
    c.data.source = "tfds"
    c.data.name = "synthetic_retina"
    c.data.splits = ["test"]  # held out from configs/keepfit.py's pretraining
    c.data.data_dir = default_data_dir()
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
  c.finetune = ml_collections.ConfigDict(dict(epochs=50, batch_size=4, lr=1e-4, patience=10,
                                              lp_init=arg.method == "LP+FT"))
  c.lock()
  return c


# Dict-valued fields that an override replaces whole instead of merging field by field.
_FREE_DICTS = ("builder_kwargs",)


def override(config: ml_collections.ConfigDict, fields: Mapping[str, Any], where: str) -> None:
  """Sets ``fields`` on ``config`` in place; nested dicts set nested fields. An unknown key is an
  error naming ``where`` (e.g. ``config.evals.lp``) and the valid fields."""
  for key, value in fields.items():
    if key not in config:
      raise ValueError(f"{where}.{key}: not a field of the transfer protocol's config; valid: "
                       f"{', '.join(sorted(config.keys()))}")
    if isinstance(config[key], ml_collections.ConfigDict) and key not in _FREE_DICTS:
      override(config[key], dict(value), f"{where}.{key}")
    else:
      config[key] = value


def check_config(config) -> None:
  """Refuses combinations the protocol cannot run, before any work."""
  if config.method not in METHODS:
    raise ValueError(f"config.method={config.method!r}: expected one of {METHODS} (or FLAIR's clipAdapter, "
                     "tipAdapter, tipAdapter-f, FT)")
  if config.method in LANGUAGE_METHODS and not config.project_features:
    raise ValueError(f"config.method={config.method!r} scores image features against the text prototypes and needs "
                     "config.project_features=True (raw pooled features do not live in the joint space)")
  if (config.tta or config.fta) and config.method == "finetune":
    raise ValueError("config.tta / config.fta: feature augmentation applies to the feature-based methods; finetune "
                     "trains on the images themselves")
  if (config.tta or config.fta or config.tip_augment_test_features) and int(config.augment.passes) < 1:
    raise ValueError(f"config.augment.passes={config.augment.passes}: tta / fta need at least one augmented pass")
  if int(config.folds) < 1:
    raise ValueError(f"config.folds={config.folds}: expected at least 1")


def targets_of(config) -> list[str]:
  """The class names in label order: ``config.targets``, else the experiment's."""
  if config.targets:
    return list(config.targets)
  if config.experiment in splits.EXPERIMENTS:
    return list(splits.EXPERIMENTS[config.experiment].targets)
  raise ValueError(f"config.experiment={config.experiment!r} is not one of jaxretina.transfer.splits.EXPERIMENTS "
                   f"({', '.join(sorted(splits.EXPERIMENTS))}): name its classes with config.targets")


def run_id(config) -> str:
  """A folder name for one protocol run: method, shots, folds and the flags that change results."""
  parts = [config.method, f"train{config.shots_train}", f"val{config.shots_val}", f"test{config.shots_test}",
           f"folds{config.folds}"]
  parts += [flag for flag in ("tta", "fta", "balance") if config[flag]]
  if config.method in ("lp", "finetune") and config.project_features:
    parts.append("projected")
  return re.sub(r"[^A-Za-z0-9_.-]", "", "_".join(parts).replace("%", "pct"))

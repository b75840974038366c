"""Runs FLAIR's transfer protocol (``jaxretina.transfer.protocol``) on a loaded two-tower model.

FLAIR's ``main_transferability`` (docs/systems.md#transfer-evaluation-protocol) on frozen features
extracted once and cached (``jaxretina.transfer.features``): per fold f (seeded with f, as upstream),
the per-class train / val / test selection of ``transfer.splits``; the method (zero-shot, linear
probe, CLIP-Adapter, Tip-Adapter, Tip-Adapter-f, full fine-tuning) fitted on the train split; its
test probabilities scored with FLAIR's / KeepFIT's metrics; mean ± std over folds.

``run_protocol`` writes to its ``out_dir``: ``metrics.json`` (config, per-fold metrics, fold summary),
``metrics.csv`` (one row per fold plus mean and std), ``predictions.csv`` (every test row of every fold
with its probabilities), ``confusion_matrix.png`` and ``roc.png`` (the test predictions of all folds
pooled), and logs the summary table. ``python -m jaxretina.evaluate`` runs it on a checkpoint, the
``transfer`` evaluator on the model being trained.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from jaxretina import fileio
from jaxretina.evaluators import metrics as metrics_lib
from jaxretina.evaluators import plots
from jaxretina.evaluators.zero_shot import TwoTowerRun, class_prototypes
from jaxretina.models import flair
from jaxretina.transfer import adapters, features, finetune, linear_probe, splits
from jaxretina.transfer.protocol import LANGUAGE_METHODS, SUMMARY_KEYS, check_config, targets_of


def load_rows(config, image_size: int) -> features.Rows:
  """The labelled rows of ``config.data`` (a TFDS dataset or a FLAIR dataframe) at ``image_size``."""
  d = config.data
  if d.source == "tfds":
    return features.tfds_rows(d.name, list(d.splits), d.data_dir, image_size=image_size, class_from=d.class_from,
                              builder_kwargs=dict(d.builder_kwargs or {}), build_if_missing=d.build_if_missing)
  if d.source != "dataframe":
    raise ValueError(f"config.data.source={d.source!r}: expected 'dataframe' or 'tfds'")
  csv_path = d.csv
  if not csv_path:
    if config.experiment not in splits.EXPERIMENTS:
      raise ValueError(f"config.experiment={config.experiment!r} has no known CSV: set config.data.csv")
    if not d.dataframe_dir:
      raise ValueError("config.data.dataframe_dir is not set: the folder holding "
                       f"{splits.EXPERIMENTS[config.experiment].csv} (KeepFIT: local_data/dataframes/transferability)")
    csv_path = os.path.join(d.dataframe_dir, splits.EXPERIMENTS[config.experiment].csv)
  if not d.root:
    raise ValueError("config.data.root is not set: the folder the CSV's image paths are relative to "
                     "(FLAIR's PATH_DATASETS)")
  return features.dataframe_rows(csv_path, d.root, image_size=image_size, crop_foreground=d.crop_foreground)


# ------------------------------------------------------------------------------------------ one fold
class _Fold:
  """Index arrays of one fold: ``train``, ``val``, ``test`` row positions and their labels."""

  def __init__(self, split: dict):
    for name in ("train", "val", "test"):
      setattr(self, name, np.asarray([s.id for s in split[name]], np.int64))
      setattr(self, f"{name}_labels", np.asarray([s.label for s in split[name]], np.int64))


def _fit_and_predict(config, fold: _Fold, feats, project: Callable, protos, logit_scale, num_classes: int,
                     run: TwoTowerRun, rows, mesh, key, log) -> np.ndarray:
  """Test probabilities (n_test, K) of ``config.method`` fitted on ``fold``'s train split."""
  method = config.method
  if method != "zero_shot" and method != "finetune" and fold.train.size == 0:
    raise ValueError(f"method {method!r} needs training samples: config.shots_train={config.shots_train!r} selects "
                     "none")
  # Train features: clean (N, d), or the augmented passes concatenated pass-major (fta).
  if config.fta:
    x_train, y_train = adapters.stack_augmented(project(feats.augmented[:, fold.train]), fold.train_labels)
  else:
    x_train, y_train = project(feats.clean[fold.train]), fold.train_labels
  # Test features: clean (N, d), or (A, N, d) whose logits the methods average (tta).
  if config.tta:
    x_test = project(feats.augmented[:, fold.test])
  elif config.tip_augment_test_features and method in ("tip_adapter", "tip_adapter_f"):
    x_test = project(feats.augmented[0, fold.test])
  else:
    x_test = project(feats.clean[fold.test])

  if method == "zero_shot":
    return np.asarray(adapters.zero_shot_proba(x_test, protos, logit_scale))
  if method == "lp":
    missing = sorted(set(range(num_classes)) - set(y_train.tolist()))
    if missing:
      raise ValueError(f"lp: the training split has no sample of classes {missing}; raise config.shots_train "
                       f"(now {config.shots_train!r})")
    probe = linear_probe.fit(x_train, y_train, C=config.lp.C, max_iter=config.lp.max_iter)
    if not bool(probe.converged):
      log(f"  lp: L-BFGS stopped at max_iter={config.lp.max_iter} before max|grad| <= tol (as scikit-learn would "
          "warn)")
    return np.asarray(probe.predict_proba(x_test))
  a = config.adapter
  if method == "clip_adapter":
    fitted = adapters.fit_clip_adapter(key, x_train, y_train, protos, logit_scale, epochs=a.epochs, lr=a.lr,
                                       batch_size=a.batch_size, order_seed=a.order_seed)
    return np.asarray(fitted.predict_proba(x_test))
  if method == "tip_adapter":
    return np.asarray(adapters.fit_tip_adapter(x_train, y_train, protos).predict_proba(x_test))
  if method == "tip_adapter_f":
    fitted = adapters.fit_tip_adapter_f(x_train, y_train, protos, logit_scale, epochs=a.epochs, lr=a.lr,
                                        batch_size=a.batch_size, order_seed=a.order_seed,
                                        tip_f_train_test_mismatch=a.tip_f_train_test_mismatch,
                                        tip_f_inputs_track_keys=a.tip_f_inputs_track_keys)
    return np.asarray(fitted.predict_proba(x_test))
  return _finetune(config, fold, run, rows, mesh, key, num_classes, x_train if config.finetune.lp_init else None,
                   y_train, log)


def _images(rows, positions: np.ndarray) -> np.ndarray:
  out = np.zeros((len(positions), rows.image_size, rows.image_size, 3), np.uint8)
  for k, i in enumerate(positions):
    out[k] = np.clip(np.round(rows.load(int(i)) * 255.0), 0, 255).astype(np.uint8)
  return out


def _finetune(config, fold: _Fold, run: TwoTowerRun, rows, mesh, key, num_classes, lp_features, lp_labels,
              log) -> np.ndarray:
  if fold.train.size == 0:
    raise ValueError(f"finetune needs training samples: config.shots_train={config.shots_train!r} selects none")
  m = run.model
  encoder = flair.VisionModel(m.vision.clone(parent=None, name=None), proj_dim=m.proj_dim, proj_bias=m.proj_bias,
                              projection=config.project_features, norm=config.norm_features)
  head_init = None
  if lp_features is not None:
    head_init = linear_probe.fit(lp_features, lp_labels, C=config.lp.C, max_iter=config.lp.max_iter)
  f = config.finetune
  tuned = finetune.finetune(key, encoder, features.vision_variables(run.variables), _images(rows, fold.train),
                            fold.train_labels, num_classes,
                            val_images=_images(rows, fold.val) if fold.val.size else None,
                            val_labels=fold.val_labels if fold.val.size else None, epochs=f.epochs,
                            batch_size=f.batch_size, lr=f.lr, patience=f.patience, head_init=head_init, mesh=mesh,
                            log=log)
  return np.asarray(tuned.predict_proba(_images(rows, fold.test)))


# ------------------------------------------------------------------------------------------ protocol
def run_protocol(run: TwoTowerRun, config, mesh, out_dir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
  """The whole protocol for ``run`` under ``config``; returns ``{'folds', 'summary', ...}``."""
  check_config(config)
  targets = targets_of(config)
  image_size = int(config.data.image_size) or int(run.image_size)
  rows = load_rows(config, image_size)
  log(f"transfer: {config.method} on {rows.description}, {len(targets)} classes, {config.folds} fold(s), "
      f"train {config.shots_train} / val {config.shots_val} / test {config.shots_test}")
  # Folds first: a class-name mismatch fails before any extraction.
  folds = [_Fold(s) for s in splits.fold_splits(list(enumerate(rows.categories)), targets, int(config.folds),
                                                shots_train=config.shots_train, shots_val=config.shots_val,
                                                shots_test=config.shots_test, balance=config.balance)]
  needs_augmented = config.tta or config.fta or (config.tip_augment_test_features
                                                 and config.method in ("tip_adapter", "tip_adapter_f"))
  t0 = time.perf_counter()
  feats = features.extract_features(
      run, rows, mesh=mesh, batch_size=config.data.batch_size,
      augment_passes=int(config.augment.passes) if needs_augmented else 0, augment_seed=config.augment.seed,
      kornia_grid_quirk=config.augment.kornia_grid_quirk, cache_dir=config.cache_dir or None,
      preprocessing=dict(source=config.data.source, crop_foreground=config.data.get("crop_foreground", False)),
      num_threads=config.data.num_threads, log=log)
  extract_s = time.perf_counter() - t0

  def project(raw):
    return features.project(run.model, run.variables, raw, project_features=config.project_features,
                            norm_features=config.norm_features)

  protos, logit_scale = None, None
  if config.method in LANGUAGE_METHODS:
    template = config.zero_shot.template or run.prompt["template"]
    protos = np.asarray(class_prototypes(run.model, run.variables, run.tokenizer, targets, template=template,
                                         domain_knowledge=config.zero_shot.domain_knowledge,
                                         variant=run.prompt.get("variant", "flair"), max_length=run.max_length))
    logit_scale = np.asarray(run.variables["params"]["logit_scale"], np.float32)

  fold_metrics, all_labels, all_probs, prediction_rows = [], [], [], []
  for f, fold in enumerate(folds):
    if fold.test.size == 0:
      raise ValueError(f"fold {f}: config.shots_test={config.shots_test!r} selects no test sample")
    key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), f)
    probs = _fit_and_predict(config, fold, feats, project, protos, logit_scale, len(targets), run, rows, mesh, key,
                             log)
    probs = np.asarray(probs, np.float64)
    m = metrics_lib.flair_metrics(fold.test_labels, probs)
    fold_metrics.append(m)
    all_labels.append(fold.test_labels)
    all_probs.append(probs)
    for i, label, p in zip(fold.test, fold.test_labels, probs):
      prediction_rows.append([f, rows.ids[i], targets[label], targets[int(np.argmax(p))]] + [f"{v:.6f}" for v in p])
    log(f"  fold {f + 1}/{len(folds)}: train {fold.train.size}, val {fold.val.size}, test {fold.test.size}: "
        f"ACA {m['aca']:.3f}, kappa {m['kappa']:.3f}, macro F1 {m['f1_avg']:.3f}, macro AUC {m['auc_avg']:.3f}")
  summary = metrics_lib.summarize_folds(fold_metrics)
  result = dict(config=json.loads(config.to_json_best_effort()), model=run.description, rows=rows.description,
                targets=targets, chance_aca=1.0 / len(targets), feature_cache=feats.path,
                features_from_cache=feats.from_cache, extract_seconds=extract_s, folds=fold_metrics, summary=summary)
  if jax.process_index() == 0:
    write_reports(out_dir, result, targets, prediction_rows, np.concatenate(all_labels), np.concatenate(all_probs))
  keys = [k for k in SUMMARY_KEYS if k in summary]
  log(f"{config.experiment} · {config.method} ({len(folds)} fold(s), mean ± std):\n"
      + metrics_lib.format_table(summary, keys))
  log(f"wrote {out_dir}")
  return result


def write_reports(out_dir: str, result: dict, targets, prediction_rows, labels: np.ndarray, probs: np.ndarray) -> None:
  """``metrics.json``, ``metrics.csv``, ``predictions.csv``, ``confusion_matrix.png`` and ``roc.png`` in
  ``out_dir`` (a local folder or a ``gs://`` URL)."""

  def csv_text(rows) -> str:
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue()

  keys = [k for k in SUMMARY_KEYS if k in result["summary"]]
  metrics_rows = [["fold"] + keys]
  metrics_rows += [[i] + [m.get(k, "") for k in keys] for i, m in enumerate(result["folds"])]
  metrics_rows.append(["mean"] + [result["summary"][k]["mean"] for k in keys])
  metrics_rows.append(["std"] + [result["summary"][k]["std"] for k in keys])
  prediction_header = ["fold", "id", "label", "predicted"] + [f"prob_{t}" for t in targets]
  # Each file is written whole and atomically (fileio), on local disk or gs:// alike.
  fileio.write_text(fileio.join(out_dir, "metrics.json"),
                    json.dumps(result, indent=1, default=float, allow_nan=True))
  fileio.write_text(fileio.join(out_dir, "metrics.csv"), csv_text(metrics_rows))
  fileio.write_text(fileio.join(out_dir, "predictions.csv"), csv_text([prediction_header] + list(prediction_rows)))
  k = len(targets)
  cm = metrics_lib.confusion_matrix(labels, np.argmax(probs, axis=-1), k)
  plots.save_confusion_matrix_png(cm, targets, fileio.join(out_dir, "confusion_matrix.png"),
                                  title="test predictions, all folds")
  plots.save_roc_png(labels, probs, targets, fileio.join(out_dir, "roc.png"), title="one-vs-rest ROC, all folds")

"""Classification metrics in plain numpy, with scikit-learn's semantics (docs/systems.md#transfer-metrics).

scikit-learn is not a run-time dependency; the tests pin every number here to it. Conventions:

* ``labels`` (N,) integer classes in [0, K); ``probs`` (N, K) class scores (softmax probabilities
  or any monotone score: only ranks matter for AUROC, only the arg-max for the rest).
* Metrics that are undefined on the given data (AUROC of a class absent from the labels or present
  in every sample, κ with a zero chance-disagreement denominator, recall of an absent class, ...)
  are NaN and each is explained by one string in ``result["undefined"]``. Nothing warns, nothing
  raises for them; malformed input raises ``ValueError``.
* Results are full precision. FLAIR/KeepFIT print their numbers rounded to 3 decimals:
  ``round_like_flair`` reproduces that for display and comparison with published tables.

Semantics that follow scikit-learn deliberately (so numbers match what upstream reports):

* κ (``cohen_kappa_score``) is computed on the classes present in labels ∪ predictions, and the
  quadratic weights use the distance between the *positions* of two classes in that sorted set, not
  between the class indices (identical whenever no class in the middle of the range is absent from
  both).
* macro F1 (``f1_score(average="macro")``) averages over labels ∪ predictions; ACA / balanced
  accuracy averages recall over the classes present in the labels.
* AUROC is the Mann–Whitney statistic with average ranks for ties, which equals sklearn's trapezoidal
  ROC area.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

_NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# Input checking


def _as_labels(labels, name: str = "labels") -> np.ndarray:
  arr = np.asarray(labels)
  if arr.ndim != 1:
    raise ValueError(f"{name}: expected a 1-D array of class indices (N,), got shape {arr.shape}")
  if arr.dtype == bool:
    return arr.astype(np.int64)
  if not np.issubdtype(arr.dtype, np.integer):
    if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
      raise ValueError(f"{name}: expected integer class indices, got dtype {arr.dtype} with non-integer values")
  return arr.astype(np.int64)


def _check_range(labels: np.ndarray, num_classes: int, name: str) -> None:
  bad = labels[(labels < 0) | (labels >= num_classes)]
  if bad.size:
    raise ValueError(f"{name}: expected class indices in [0, {num_classes}), got {sorted(set(bad.tolist()))[:10]}")


def _validate(labels, probs, num_classes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
  probs = np.asarray(probs, dtype=np.float64)
  if probs.ndim != 2:
    raise ValueError(f"probs: expected a (N, K) array of class scores, got shape {probs.shape}")
  n, k = probs.shape
  if num_classes is not None and num_classes != k:
    raise ValueError(f"probs: expected {num_classes} columns (num_classes), got shape {probs.shape}")
  if k < 2:
    raise ValueError(f"probs: expected at least 2 classes (columns), got shape {probs.shape}")
  labels = _as_labels(labels)
  if labels.shape[0] != n:
    raise ValueError(f"labels: expected {n} entries to match probs {probs.shape}, got {labels.shape[0]}")
  if n == 0:
    raise ValueError("labels/probs: expected at least one sample, got N=0")
  if not np.all(np.isfinite(probs)):
    raise ValueError(f"probs: expected finite values, got {int(np.sum(~np.isfinite(probs)))} NaN/Inf entries")
  _check_range(labels, k, "labels")
  return labels, probs, k


# ----------------------------------------------------------------------------------------------
# Building blocks


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
  """(K, K) int64 counts; row = true class, column = predicted class."""
  labels, preds = _as_labels(labels, "labels"), _as_labels(preds, "preds")
  if labels.shape != preds.shape:
    raise ValueError(f"labels {labels.shape} and preds {preds.shape}: expected the same length")
  _check_range(labels, num_classes, "labels")
  _check_range(preds, num_classes, "preds")
  flat = labels * num_classes + preds
  return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).astype(np.int64)


def _kappa_from_cm(cm: np.ndarray, weights: str | None) -> float:
  """sklearn ``cohen_kappa_score`` from a full (K, K) matrix; NaN when the denominator is 0."""
  present = (cm.sum(0) + cm.sum(1)) > 0  # sklearn's label set: labels ∪ predictions
  cm = cm[np.ix_(present, present)].astype(np.float64)
  m = cm.shape[0]
  expected = np.outer(cm.sum(1), cm.sum(0)) / cm.sum()
  if weights is None:
    w = 1.0 - np.eye(m)
  elif weights == "quadratic":
    idx = np.arange(m, dtype=np.float64)
    w = (idx[:, None] - idx[None, :]) ** 2
  elif weights == "linear":
    idx = np.arange(m, dtype=np.float64)
    w = np.abs(idx[:, None] - idx[None, :])
  else:
    raise ValueError(f"weights: expected None, 'linear' or 'quadratic', got {weights!r}")
  denom = float(np.sum(w * expected))
  if denom == 0.0:
    return _NAN
  return 1.0 - float(np.sum(w * cm)) / denom


def cohen_kappa(labels, preds, num_classes: int, weights: str | None = None) -> float:
  """Cohen's κ (sklearn semantics); NaN when undefined (e.g. one class in labels and predictions)."""
  return _kappa_from_cm(confusion_matrix(labels, preds, num_classes), weights)


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks with ties sharing their mean rank (scipy.stats.rankdata 'average')."""
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  start = np.cumsum(counts) - counts + 1
  return (start + (counts - 1) / 2.0)[inverse.reshape(-1)]


def binary_auroc(is_positive: np.ndarray, scores: np.ndarray) -> float:
  """ROC AUC of ``scores`` for boolean targets; NaN if only one target value is present."""
  is_positive = np.asarray(is_positive, dtype=bool)
  scores = np.asarray(scores, dtype=np.float64)
  n_pos = int(is_positive.sum())
  n_neg = is_positive.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return _NAN
  ranks = _average_ranks(scores)
  return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _safe_div(num: float, den: float) -> float:
  return float(num) / float(den) if den else _NAN


def _mean_defined(values: Iterable[float]) -> float:
  vals = [v for v in values if not math.isnan(v)]
  return float(np.mean(vals)) if vals else _NAN


# ----------------------------------------------------------------------------------------------
# Metric dictionaries


def classification_metrics(labels, probs, num_classes: int | None = None, *,
                           class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """All classification metrics of ``probs`` (N, K) against ``labels`` (N,); predictions = arg-max.

  Returns a flat JSON-serialisable dict: ``n``, ``accuracy``, ``aca`` (balanced accuracy),
  ``kappa`` (unweighted), ``kappa_quadratic``, ``f1_macro``, ``auc_macro`` (mean of the defined
  per-class AUROCs), ``sensitivity_mean``/``specificity_mean`` (means of the defined per-class
  values), per class k: ``f1_k``, ``auc_k`` (one-vs-rest), ``recall_k`` (= ``sensitivity_k``),
  ``specificity_k``; ``confusion_matrix`` (nested list, rows = truth), ``undefined`` (list of
  strings) and ``class_names`` when given.
  """
  labels, probs, k = _validate(labels, probs, num_classes)
  if class_names is not None and len(class_names) != k:
    raise ValueError(f"class_names: expected {k} names (one per probs column), got {len(class_names)}")
  preds = np.argmax(probs, axis=-1)
  cm = confusion_matrix(labels, preds, k)
  n = int(labels.size)
  tp = np.diag(cm).astype(np.float64)
  support = cm.sum(1).astype(np.float64)  # true count per class
  predicted = cm.sum(0).astype(np.float64)
  fn, fp = support - tp, predicted - tp
  tn = n - tp - fn - fp

  out: dict[str, Any] = {"n": n, "accuracy": float(tp.sum() / n)}
  undefined: list[str] = []

  recalls, specificities, aucs = [], [], []
  for c in range(k):
    recall = _safe_div(tp[c], support[c])
    if math.isnan(recall):
      undefined.append(f"recall_{c}: class {c} absent from labels")
      undefined.append(f"sensitivity_{c}: class {c} absent from labels")
    spec = _safe_div(tn[c], tn[c] + fp[c])
    if math.isnan(spec):
      undefined.append(f"specificity_{c}: every label is class {c} (no negatives)")
    f1 = _safe_div(2 * tp[c], 2 * tp[c] + fp[c] + fn[c])
    if math.isnan(f1):
      undefined.append(f"f1_{c}: class {c} absent from labels and predictions")
    auc = binary_auroc(labels == c, probs[:, c])
    if math.isnan(auc):
      reason = f"class {c} absent from labels" if support[c] == 0 else f"every label is class {c} (no negatives)"
      undefined.append(f"auc_{c}: {reason}")
    out[f"recall_{c}"] = recall
    out[f"sensitivity_{c}"] = recall
    out[f"specificity_{c}"] = spec
    out[f"f1_{c}"] = f1
    out[f"auc_{c}"] = auc
    recalls.append(recall)
    specificities.append(spec)
    aucs.append(auc)

  out["aca"] = _mean_defined(recalls)  # balanced accuracy: classes present in the labels
  out["sensitivity_mean"] = out["aca"]
  out["specificity_mean"] = _mean_defined(specificities)
  if math.isnan(out["specificity_mean"]):
    undefined.append("specificity_mean: no class has negatives")
  out["f1_macro"] = _mean_defined(out[f"f1_{c}"] for c in range(k))  # defined exactly on labels ∪ preds
  out["auc_macro"] = _mean_defined(aucs)
  if math.isnan(out["auc_macro"]):
    undefined.append("auc_macro: no class has both positives and negatives in labels")
  for name, weights in (("kappa", None), ("kappa_quadratic", "quadratic")):
    out[name] = _kappa_from_cm(cm, weights)
    if math.isnan(out[name]):
      undefined.append(f"{name}: chance disagreement is 0 (labels and predictions hold one class)")
  out["confusion_matrix"] = cm.tolist()
  if class_names is not None:
    out["class_names"] = [str(c) for c in class_names]
  out["undefined"] = undefined
  return out


def _binary_threshold_sweep(is_positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Unweighted κ and F1 of ``scores >= t`` for every distinct score t (ascending, as sklearn's
  ``precision_recall_curve`` thresholds). Returns (thresholds, kappa, f1)."""
  n = is_positive.size
  thresholds, inverse = np.unique(scores, return_inverse=True)
  pos_at = np.bincount(inverse, weights=is_positive.astype(np.float64), minlength=thresholds.size)
  all_at = np.bincount(inverse, minlength=thresholds.size).astype(np.float64)
  # Predicted positive at threshold j = samples with score index >= j: reverse cumulative sums.
  tp = np.cumsum(pos_at[::-1])[::-1]
  fp = np.cumsum((all_at - pos_at)[::-1])[::-1]
  n_pos = float(is_positive.sum())
  fn = n_pos - tp
  tn = (n - n_pos) - fp
  po = (tp + tn) / n
  pe = ((tp + fp) * n_pos + (fn + tn) * (n - n_pos)) / (n * n)
  with np.errstate(divide="ignore", invalid="ignore"):
    kappa = np.where(pe < 1.0, (po - pe) / (1.0 - pe), np.nan)
    f1_den = 2 * tp + fp + fn
    f1 = np.where(f1_den > 0, 2 * tp / np.where(f1_den > 0, f1_den, 1.0), 0.0)  # sklearn zero_division → 0
  return thresholds, kappa, f1


def flair_metrics(labels, probs) -> dict[str, Any]:
  """FLAIR's ``classification_metrics`` keys plus KeepFIT's additions, unrounded (docs/systems.md#transfer-metrics).

  FLAIR: ``kappa`` (quadratic), ``aca`` (mean per-class recall), ``acc_class``; one-vs-rest per
  class present in the labels (ascending, as ``np.unique(refs)``): ``f1_class``, ``auc_class``,
  ``sensitivity_class``, ``specificity_class`` and their means ``f1_avg``, ``auc_avg``,
  ``sensitivity_avg``, ``specificity_avg``; ``cm`` and ``cm_norm`` (nested lists).
  KeepFIT: ``taop_acc`` (plain accuracy); for K == 2 ``amd_auc`` = AUROC of ``probs[:, 1]``,
  ``amd_kappa``/``amd_f1`` = unweighted κ and F1 of ``probs[:, 1] >= t`` at the threshold t among
  the precision-recall-curve thresholds (the distinct scores) that maximises κ + F1 on these very
  labels — an optimistic, test-set-tuned operating point, reproduced because KeepFIT reports it
  (``amd_threshold`` gives t; the first, i.e. lowest, maximiser wins ties like ``np.argmax``).

  Where FLAIR would crash or print NaN (a class predicted but absent from the labels makes its
  ``cm_norm`` row 0/0 and ACA NaN; a single-class label set makes ``roc_auc_score`` raise), these
  lists cover the classes present in the labels and undefined entries are NaN, explained in
  ``undefined``.
  """
  labels, probs, k = _validate(labels, probs, None)
  preds = np.argmax(probs, axis=-1)
  cm = confusion_matrix(labels, preds, k)
  present = [int(c) for c in np.unique(labels)]
  n = int(labels.size)
  undefined: list[str] = []

  support = cm.sum(1)
  with np.errstate(divide="ignore", invalid="ignore"):
    cm_norm = cm / np.where(support > 0, support, 1)[:, None]
  cm_norm[support == 0] = np.nan

  f1_class, auc_class, sens_class, spec_class, acc_class = [], [], [], [], []
  for c in present:
    tp = float(cm[c, c])
    fn = float(support[c]) - tp
    fp = float(cm[:, c].sum()) - tp
    tn = n - tp - fn - fp
    acc_class.append(tp / float(support[c]))
    sens_class.append(tp / (tp + fn))
    spec = _safe_div(tn, tn + fp)
    if math.isnan(spec):
      undefined.append(f"specificity_class[{c}]: every label is class {c} (no negatives)")
    spec_class.append(spec)
    f1_class.append(2 * tp / (2 * tp + fp + fn))
    auc = binary_auroc(labels == c, probs[:, c])
    if math.isnan(auc):
      undefined.append(f"auc_class[{c}]: every label is class {c} (no negatives)")
    auc_class.append(auc)

  out: dict[str, Any] = {
      "n": n,
      "classes": present,
      "aca": float(np.mean(acc_class)),
      "kappa": _kappa_from_cm(cm, "quadratic"),
      "acc_class": acc_class,
      "f1_class": f1_class,
      "f1_avg": float(np.mean(f1_class)),
      "auc_class": auc_class,
      "auc_avg": _mean_defined(auc_class),
      "sensitivity_class": sens_class,
      "sensitivity_avg": float(np.mean(sens_class)),
      "specificity_class": spec_class,
      "specificity_avg": _mean_defined(spec_class),
      "taop_acc": float(np.mean(preds == labels)),
      "cm": cm.tolist(),
      "cm_norm": cm_norm.tolist(),
  }
  if math.isnan(out["kappa"]):
    undefined.append("kappa: chance disagreement is 0 (labels and predictions hold one class)")
  if math.isnan(out["auc_avg"]):
    undefined.append("auc_avg: labels hold one class only")
  if math.isnan(out["specificity_avg"]):
    undefined.append("specificity_avg: labels hold one class only")

  if k == 2:
    is_positive = labels == 1
    if len(present) < 2:
      for key in ("amd_auc", "amd_kappa", "amd_f1", "amd_threshold"):
        out[key] = _NAN
        undefined.append(f"{key}: labels hold class {present[0]} only")
    else:
      scores = probs[:, 1]
      thresholds, kappa, f1 = _binary_threshold_sweep(is_positive, scores)
      objective = np.where(np.isnan(kappa), -np.inf, kappa + f1)
      best = int(np.argmax(objective))
      out["amd_auc"] = binary_auroc(is_positive, scores)
      out["amd_kappa"] = float(kappa[best])
      out["amd_f1"] = float(f1[best])
      out["amd_threshold"] = float(thresholds[best])
  out["undefined"] = undefined
  return out


def round_like_flair(metrics: Any, decimals: int = 3) -> Any:
  """``metrics`` with every float rounded to 3 decimals (``np.round``), as FLAIR/KeepFIT print."""
  if isinstance(metrics, Mapping):
    return {key: round_like_flair(v, decimals) for key, v in metrics.items()}
  if isinstance(metrics, (list, tuple)):
    return [round_like_flair(v, decimals) for v in metrics]
  if isinstance(metrics, np.ndarray):
    return round_like_flair(metrics.tolist(), decimals)
  if isinstance(metrics, (bool, np.bool_, int, np.integer, str)) or metrics is None:
    return metrics
  if isinstance(metrics, (float, np.floating)):
    return float(np.round(float(metrics), decimals))
  return metrics


def _is_scalar_number(v: Any) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def summarize_folds(fold_metrics: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
  """Mean and population std (``np.std``, ddof=0, as FLAIR's ``average_folds_results``) per scalar key.

  NaN values of a key are left out of its mean/std and counted: each entry is
  ``{"mean", "std", "n" (finite values used), "n_nan"}``; a key NaN in every fold has NaN mean/std.
  Non-scalar entries (lists, matrices, strings) are skipped. Full precision: round for display
  with ``round_like_flair``.
  """
  if not fold_metrics:
    raise ValueError("fold_metrics: expected at least one metrics dict, got an empty sequence")
  keys: list[str] = []
  for fold in fold_metrics:
    if not isinstance(fold, Mapping):
      raise ValueError(f"fold_metrics: expected dicts of metrics, got {type(fold).__name__}")
    for key, v in fold.items():
      if _is_scalar_number(v) and key not in keys:
        keys.append(key)
  out: dict[str, dict[str, float]] = {}
  for key in keys:
    values = np.asarray([float(f[key]) for f in fold_metrics if key in f and _is_scalar_number(f[key])])
    finite = values[~np.isnan(values)]
    out[key] = {
        "mean": float(np.mean(finite)) if finite.size else _NAN,
        "std": float(np.std(finite)) if finite.size else _NAN,
        "n": int(finite.size),
        "n_nan": int(values.size - finite.size),
    }
  return out


def _format_value(v: Any) -> str | None:
  if isinstance(v, Mapping) and "mean" in v and "std" in v:
    text = f"{float(v['mean']):.4f} ± {float(v['std']):.4f}"
    if v.get("n_nan"):
      text += f"  ({int(v['n_nan'])} NaN)"
    return text
  if isinstance(v, (bool, np.bool_)):
    return str(bool(v))
  if isinstance(v, (int, np.integer)):
    return str(int(v))
  if isinstance(v, (float, np.floating)):
    return "nan" if math.isnan(v) else f"{float(v):.4f}"
  return None


def format_table(metrics: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
  """A two-column text table of ``metrics`` (a metrics dict or a ``summarize_folds`` result).

  Without ``keys``: every scalar (or mean ± std) entry in dict order; with ``keys``: those, in that
  order, non-scalars printed as ``repr`` and missing ones as ``-``.
  """
  rows: list[tuple[str, str]] = []
  for key in (keys if keys is not None else metrics.keys()):
    if key not in metrics:
      if keys is not None:
        rows.append((key, "-"))
      continue
    text = _format_value(metrics[key])
    if text is None:
      if keys is None:
        continue
      text = repr(metrics[key])
    rows.append((key, text))
  if not rows:
    return "(no scalar metrics)"
  width = max(len("metric"), *(len(k) for k, _ in rows))
  value_width = max(len("value"), *(len(v) for _, v in rows))
  lines = [f"{'metric':<{width}} | value", f"{'-' * width}-+-{'-' * value_width}"]
  lines += [f"{k:<{width}} | {v}" for k, v in rows]
  return "\n".join(lines)

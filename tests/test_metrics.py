"""Classification metrics against scikit-learn (the semantics upstream reports), edge cases, folds."""

import json
import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from jaxretina.evaluators import metrics


def _random_case(seed, n=60, k=4, ties=True, drop_pred_class=None):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
  if ties:  # coarse scores: many exact ties inside each column
    logits = np.round(logits, 0)
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  if drop_pred_class is not None:
    probs[:, drop_pred_class] = -1.0  # never the arg-max
  return labels, probs


@pytest.mark.parametrize("seed,drop", [(0, None), (1, None), (2, 2), (3, 0)])
def test_matches_sklearn(seed, drop):
  labels, probs = _random_case(seed, drop_pred_class=drop)
  k = probs.shape[1]
  preds = probs.argmax(1)
  if drop is not None:
    assert drop not in preds and drop in labels
  m = metrics.classification_metrics(labels, probs)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
  close(m["accuracy"], skm.accuracy_score(labels, preds))
  close(m["aca"], skm.balanced_accuracy_score(labels, preds))
  close(m["kappa"], skm.cohen_kappa_score(labels, preds))
  close(m["kappa_quadratic"], skm.cohen_kappa_score(labels, preds, weights="quadratic"))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    close(m["f1_macro"], skm.f1_score(labels, preds, average="macro"))
  per_class_f1 = skm.f1_score(labels, preds, average=None, labels=np.arange(k), zero_division=0)
  recall = skm.recall_score(labels, preds, average=None, labels=np.arange(k), zero_division=0)
  for c in range(k):
    close(m[f"auc_{c}"], skm.roc_auc_score(labels == c, probs[:, c]))
    close(m[f"f1_{c}"], per_class_f1[c])
    close(m[f"recall_{c}"], recall[c])
    close(m[f"sensitivity_{c}"], recall[c])
    cm_bin = skm.confusion_matrix(labels == c, preds == c, labels=[False, True])
    close(m[f"specificity_{c}"], cm_bin[0, 0] / (cm_bin[0, 0] + cm_bin[0, 1]))
  close(m["auc_macro"], skm.roc_auc_score(np.eye(k)[labels], probs, multi_class="ovr"))
  np.testing.assert_array_equal(m["confusion_matrix"], skm.confusion_matrix(labels, preds, labels=np.arange(k)))
  np.testing.assert_array_equal(metrics.confusion_matrix(labels, preds, k),
                                skm.confusion_matrix(labels, preds, labels=np.arange(k)))
  assert m["undefined"] == [] and m["n"] == labels.size
  json.dumps(m)  # serialisable as is


def test_quadratic_kappa_uses_sklearn_label_positions():
  # Class 2 absent from both: sklearn's quadratic weights use positions in {0, 1, 3, 4}.
  labels = np.array([0, 1, 3, 4, 4, 1, 0, 3])
  preds = np.array([0, 3, 3, 4, 1, 1, 0, 4])
  np.testing.assert_allclose(metrics.cohen_kappa(labels, preds, 5, "quadratic"),
                             skm.cohen_kappa_score(labels, preds, weights="quadratic"), atol=1e-12)


def test_flair_metrics_match_upstream_formulas():
  labels, probs = _random_case(4, n=80, k=3)
  labels[labels == 1] = 2  # class 1 absent from the labels (FLAIR's lists skip it)
  preds = probs.argmax(1)
  f = metrics.flair_metrics(labels, probs)
  present = np.unique(labels)
  assert f["classes"] == present.tolist()
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
  close(f["kappa"], skm.cohen_kappa_score(labels, preds, weights="quadratic"))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    f1 = [skm.f1_score(labels == i, preds == i) for i in present]
    rec = [skm.recall_score(labels == i, preds == i) for i in present]
  auc = [skm.roc_auc_score(labels == i, probs[:, i]) for i in present]
  spec = []
  for i in present:
    cm = skm.confusion_matrix(labels == i, preds == i)
    spec.append(cm[0, 0] / (cm[0, 0] + cm[0, 1]))
  close(f["f1_class"], f1)
  close(f["f1_avg"], np.mean(f1))
  close(f["auc_class"], auc)
  close(f["auc_avg"], np.mean(auc))
  close(f["sensitivity_class"], rec)
  close(f["specificity_class"], spec)
  close(f["specificity_avg"], np.mean(spec))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": intended here
    close(f["aca"], skm.balanced_accuracy_score(labels, preds))
  close(f["taop_acc"], skm.accuracy_score(labels, preds))
  assert "amd_auc" not in f
  rounded = metrics.round_like_flair(f)
  assert rounded["kappa"] == float(np.round(f["kappa"], 3)) and rounded["classes"] == f["classes"]
  json.dumps(rounded)


def _keepfit_amd_bruteforce(labels, scores):
  """KeepFIT's loop verbatim (sklearn thresholds, kappa, f1, first arg-max)."""
  _, _, thresholds = skm.precision_recall_curve(labels, scores)
  kappas, f1s = [], []
  for t in thresholds:
    y = np.array(scores >= t, dtype=float)
    kappas.append(skm.cohen_kappa_score(labels, y))
    f1s.append(skm.f1_score(labels, y))
  best = int(np.argmax(np.array(kappas) + np.array(f1s)))
  return skm.roc_auc_score(labels, scores), kappas[best], f1s[best], thresholds[best]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_amd_metrics_match_bruteforce(seed):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, 70)
  p1 = np.clip(0.5 + 0.25 * (labels - 0.5) + rng.normal(0, 0.2, 70), 0, 1)
  p1 = np.round(p1, 1)  # ties between thresholds
  probs = np.stack([1 - p1, p1], 1)
  f = metrics.flair_metrics(labels, probs)
  auc, kappa, f1, t = _keepfit_amd_bruteforce(labels, p1)
  np.testing.assert_allclose([f["amd_auc"], f["amd_kappa"], f["amd_f1"], f["amd_threshold"]],
                             [auc, kappa, f1, t], rtol=0, atol=1e-12)


def test_single_class_present_is_undefined_not_an_error():
  labels = np.zeros(6, int)
  probs = np.tile([0.7, 0.2, 0.1], (6, 1))
  probs[0] = [0.1, 0.8, 0.1]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no warning spam
    m = metrics.classification_metrics(labels, probs)
    f = metrics.flair_metrics(labels, probs)
  assert math.isnan(m["auc_0"]) and math.isnan(m["auc_1"]) and math.isnan(m["auc_macro"])
  assert math.isnan(m["recall_2"]) and math.isnan(m["specificity_0"]) and math.isnan(m["f1_2"])
  assert "auc_0: every label is class 0 (no negatives)" in m["undefined"]
  assert "auc_1: class 1 absent from labels" in m["undefined"]
  assert any(u.startswith("f1_2:") for u in m["undefined"])
  np.testing.assert_allclose(m["aca"], 5 / 6)
  np.testing.assert_allclose(m["kappa"], skm.cohen_kappa_score(labels, probs.argmax(1)))  # 0, defined
  assert math.isnan(f["auc_avg"]) and any(u.startswith("auc_class[0]") for u in f["undefined"])
  json.dumps(m)

  # One class in labels AND predictions: κ has a zero denominator.
  m = metrics.classification_metrics(np.ones(4, int), np.tile([0.2, 0.8], (4, 1)))
  assert math.isnan(m["kappa"]) and math.isnan(m["kappa_quadratic"])
  assert any(u.startswith("kappa:") for u in m["undefined"])
  f = metrics.flair_metrics(np.ones(4, int), np.tile([0.2, 0.8], (4, 1)))
  assert math.isnan(f["amd_auc"]) and math.isnan(f["amd_kappa"])


@pytest.mark.parametrize("labels,probs,match", [
    (np.zeros(3, int), np.ones(3), r"probs: expected a \(N, K\)"),
    (np.zeros(3, int), np.ones((4, 2)), "labels: expected 4 entries"),
    (np.array([0, 1, 2]), np.ones((3, 2)), r"labels: expected class indices in \[0, 2\), got \[2\]"),
    (np.array([0, -1, 1]), np.ones((3, 2)), r"got \[-1\]"),
    (np.array([0.5, 1, 0]), np.ones((3, 2)), "labels: expected integer class indices"),
    (np.zeros(2, int), np.array([[0.5, np.nan], [0.5, 0.5]]), "probs: expected finite values"),
    (np.zeros((2, 1), int), np.ones((2, 2)), "labels: expected a 1-D array"),
])
def test_bad_inputs_raise(labels, probs, match):
  with pytest.raises(ValueError, match=match):
    metrics.classification_metrics(labels, probs)


def test_bad_num_classes_and_names():
  with pytest.raises(ValueError, match="expected 3 columns"):
    metrics.classification_metrics([0, 1], np.ones((2, 2)), num_classes=3)
  with pytest.raises(ValueError, match="class_names: expected 2 names"):
    metrics.classification_metrics([0, 1], np.eye(2), class_names=["a"])
  with pytest.raises(ValueError, match="preds: expected class indices"):
    metrics.confusion_matrix([0, 1], [0, 5], 2)
  m = metrics.classification_metrics([0, 1], np.eye(2), class_names=["no", "yes"])
  assert m["class_names"] == ["no", "yes"] and m["accuracy"] == 1.0


def test_summarize_folds_and_table():
  folds = [{"aca": 0.5, "kappa": float("nan"), "auc_class": [0.1], "n": 10},
           {"aca": 0.7, "kappa": 0.2, "auc_class": [0.3], "n": 10},
           {"aca": 0.9, "kappa": 0.4, "n": 12}]
  s = metrics.summarize_folds(folds)
  assert set(s) == {"aca", "kappa", "n"}
  np.testing.assert_allclose([s["aca"]["mean"], s["aca"]["std"]], [0.7, np.std([0.5, 0.7, 0.9])])
  np.testing.assert_allclose([s["kappa"]["mean"], s["kappa"]["std"]], [0.3, 0.1])
  assert (s["kappa"]["n"], s["kappa"]["n_nan"]) == (2, 1) and (s["aca"]["n"], s["aca"]["n_nan"]) == (3, 0)
  all_nan = metrics.summarize_folds([{"x": float("nan")}, {"x": float("nan")}])
  assert math.isnan(all_nan["x"]["mean"]) and all_nan["x"]["n_nan"] == 2
  with pytest.raises(ValueError, match="at least one"):
    metrics.summarize_folds([])

  table = metrics.format_table(s)
  assert "aca" in table and "0.7000 ± 0.1633" in table and "(1 NaN)" in table
  labels, probs = _random_case(5)
  m = metrics.classification_metrics(labels, probs)
  table = metrics.format_table(m, keys=["accuracy", "kappa", "missing", "confusion_matrix"])
  lines = table.splitlines()
  assert lines[2].startswith("accuracy") and f"{m['accuracy']:.4f}" in lines[2]
  assert lines[4].split("|")[1].strip() == "-" and "[[" in lines[5]
  assert "confusion_matrix" not in metrics.format_table(m)

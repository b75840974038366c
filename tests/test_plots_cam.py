"""PNG writers and overlays (PIL), CAM / attention-IoU utilities (docs/systems.md#dualattendmed-cam-iou-evaluation)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

from jaxretina.evaluators import cam, metrics, plots


# ----------------------------------------------------------------------------------------------
# plots


def _probs(seed=0, n=120, k=3):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  logits = rng.normal(size=(n, k)) + 2.0 * np.eye(k)[labels]
  return labels, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


def _open_png(path):
  assert os.path.getsize(path) > 2000  # a real figure, not an empty canvas
  with Image.open(path) as img:
    assert img.format == "PNG"
    img.load()
    return np.asarray(img.convert("RGB"))


def test_confusion_matrix_png(tmp_path):
  labels, probs = _probs()
  cm = metrics.confusion_matrix(labels, probs.argmax(1), 3)
  path = plots.save_confusion_matrix_png(cm, ["normal", "diabetic retinopathy", "glaucoma"],
                                         tmp_path / "nested" / "cm.png")
  pixels = _open_png(path)
  assert pixels.shape[0] > 200 and pixels.shape[1] > 200
  # The dark (high-share) diagonal cells exist: some strongly blue pixels.
  assert np.any((pixels[..., 2] > 90) & (pixels[..., 0] < 40))
  assert [p for p in os.listdir(tmp_path / "nested")] == ["cm.png"]  # no temporary left behind
  with pytest.raises(ValueError, match="square"):
    plots.save_confusion_matrix_png(np.ones((2, 3)), None, tmp_path / "bad.png")
  with pytest.raises(ValueError, match="class_names: expected 3 names"):
    plots.save_confusion_matrix_png(cm, ["a"], tmp_path / "bad.png")


def test_roc_png_and_curve(tmp_path):
  labels, probs = _probs(1)
  labels[:5] = 0
  pixels = _open_png(plots.save_roc_png(labels, probs, None, tmp_path / "roc.png"))
  palette = np.array(plots._PALETTE[:3])
  for colour in palette:  # each class curve is drawn in its colour
    assert np.any(np.all(pixels == colour, axis=-1))
  from sklearn.metrics import roc_curve
  rounded = np.round(probs[:, 0], 1)  # ties
  fpr, tpr = plots.roc_curve(labels == 0, rounded)
  ref_fpr, ref_tpr, _ = roc_curve(labels == 0, rounded, drop_intermediate=False)
  np.testing.assert_allclose(fpr, ref_fpr)
  np.testing.assert_allclose(tpr, ref_tpr)
  # A class without positives has no curve but does not fail.
  plots.save_roc_png(np.zeros(10, int), np.tile([0.6, 0.4], (10, 1)), ["a", "b"], tmp_path / "one.png")


def test_heatmap_overlay_and_save_png(tmp_path):
  image = np.full((64, 96, 3), 100, np.uint8)
  heat = np.zeros((8, 12))
  heat[6, 2] = 5.0  # hot spot in the lower-left area
  out = plots.heatmap_overlay(image, heat, alpha=0.5)
  assert out.shape == image.shape and out.dtype == np.uint8
  redness = out[..., 0].astype(int) - out[..., 2].astype(int)
  y, x = np.unravel_index(np.argmax(redness), redness.shape)
  assert abs(y - (6 + 0.5) * 8) <= 4 and abs(x - (2 + 0.5) * 8) <= 4
  assert redness[5, 90] < 0  # cold corner is blue
  np.testing.assert_array_equal(plots.heatmap_overlay(image, heat, alpha=0.0), image)
  flat = plots.heatmap_overlay(image, np.ones((3, 3)), alpha=1.0)
  assert np.all(flat == flat[0, 0])  # a flat map colours uniformly
  with pytest.raises(ValueError, match="uint8"):
    plots.heatmap_overlay(image.astype(np.float32), heat)

  for arr in (out, heat / 5.0, heat > 0):
    path = plots.save_png(arr, tmp_path / "a" / "b.png")
    with Image.open(path) as img:
      assert img.size == (arr.shape[1], arr.shape[0])
  with pytest.raises(ValueError, match=r"float values in \[0, 1\]"):
    plots.save_png(heat, tmp_path / "x.png")


def test_numpy_resize_matches_torch():
  x = np.random.default_rng(0).normal(size=(2, 5, 7)).astype(np.float32)
  for size in [(10, 14), (3, 4), (9, 2)]:
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=size, mode="bilinear",
                                          align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(plots.resize_bilinear(x, size), ref, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# cam


def test_resize_maps_matches_torch_interpolate():
  x = np.random.default_rng(1).normal(size=(3, 14, 14)).astype(np.float32)
  for size in [(28, 28), (7, 7), (10, 17), (14, 14)]:
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=size, mode="bilinear",
                                          align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(cam.resize_maps(x, size), ref, atol=1e-6)


def test_top_fraction_mask_matches_np_partition():
  rng = np.random.default_rng(2)
  maps = rng.normal(size=(4, 14, 14)).astype(np.float32)
  masks = np.asarray(cam.top_fraction_mask(maps, 0.2))
  for m, mask in zip(maps, masks):
    flat = m.flatten()
    idx = int(len(flat) * (1 - 0.2))
    np.testing.assert_array_equal(mask, m >= np.partition(flat, idx)[idx])
  assert masks.sum((1, 2)).tolist() == [40] * 4  # 196 − int(156.8): ~20 %
  ties = np.zeros((1, 4, 5))
  ties[0, 0, :3] = 1.0
  assert int(cam.top_fraction_mask(ties, 0.2).sum()) == 20  # threshold value 0: ties all kept
  assert bool(jnp.all(cam.top_fraction_mask(maps, 0.0)))
  jitted = jax.jit(cam.top_fraction_mask, static_argnums=1)(maps, 0.2)
  np.testing.assert_array_equal(jitted, masks)


def test_min_max_normalize_and_iou():
  maps = jnp.stack([jnp.arange(12.0).reshape(3, 4), jnp.full((3, 4), 3.0)])
  out = cam.min_max_normalize(maps)
  np.testing.assert_allclose(out[0], np.arange(12.0).reshape(3, 4) / (11.0 + 1e-8), rtol=1e-6)
  np.testing.assert_array_equal(out[1], 0.0)
  a = np.zeros((2, 4, 4), bool)
  a[:, :2] = True
  np.testing.assert_allclose(cam.iou(a, a), [1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(cam.iou(a, ~a), [0.0, 0.0])
  b = np.zeros((1, 4, 4), bool)
  b[0, :, :2] = True  # overlaps a in a 2×2 block: 4 / (8 + 8 − 4)
  np.testing.assert_allclose(cam.iou(a[:1], b), [4 / 12], rtol=1e-6)
  np.testing.assert_allclose(cam.iou(np.zeros((1, 2, 2)), np.zeros((1, 2, 2))), [0.0])
  with pytest.raises(ValueError, match="one shape"):
    cam.iou(a, b)


def test_class_activation_maps_is_relu_of_label_weights():
  rng = np.random.default_rng(3)
  feats = rng.normal(size=(3, 5, 6, 8)).astype(np.float32)
  weights = rng.normal(size=(8, 4)).astype(np.float32)
  labels = np.array([2, 0, 3])
  out = cam.class_activation_maps(feats, weights, labels)
  ref = np.maximum(np.stack([np.einsum("hwc,c->hw", feats[i], weights[:, labels[i]]) for i in range(3)]), 0)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  assert np.any(ref == 0) and np.any(ref > 0)
  with pytest.raises(ValueError, match=r"head_weights \(8, K\)"):
    cam.class_activation_maps(feats, weights.T, labels)


def test_attention_iou_hand_made():
  cam_maps = np.zeros((2, 10, 10), np.float32)
  cam_maps[:, :4, :5] = 1.0 + np.arange(20).reshape(4, 5) / 100  # top 20 % = this 4×5 block
  pred = np.zeros((2, 5, 5), np.float32)
  pred[0, :2, :3] = 1.0 + np.arange(6).reshape(2, 3) / 100  # upsampled: covers the same corner
  pred[1, 3:, 3:] = 1.0  # opposite corner
  out = np.asarray(cam.attention_iou(pred, cam_maps, 0.2))
  # Reference: upstream's steps in numpy/torch.
  ref = []
  for p, c in zip(pred, cam_maps):
    c = (c - c.min()) / (c.max() - c.min() + 1e-8)
    p = (p - p.min()) / (p.max() - p.min() + 1e-8)
    p = torch.nn.functional.interpolate(torch.from_numpy(p)[None, None], size=c.shape, mode="bilinear",
                                        align_corners=False)[0, 0].numpy()
    masks = []
    for m in (p, c):
      idx = int(m.size * 0.8)
      masks.append(m >= np.partition(m.flatten(), idx)[idx])
    inter = np.sum(masks[0] & masks[1])
    ref.append(inter / (masks[0].sum() + masks[1].sum() - inter + 1e-8))
  np.testing.assert_allclose(out, ref, rtol=1e-6)
  assert out[0] > 0.5 and out[1] == 0.0
  np.testing.assert_allclose(cam.attention_iou(cam_maps, cam_maps), [1.0, 1.0], rtol=1e-6)


def test_fit_linear_head_matches_logistic_regression():
  rng = np.random.default_rng(4)
  n, c, k = 240, 12, 3
  y = rng.integers(0, k, n)
  centres = rng.normal(size=(k, c)) * 3
  x = (centres[y] + rng.normal(size=(n, c))) * 4.0 + 2.0  # separable, badly scaled
  w, b = cam.fit_linear_head(x, y, k)
  assert w.shape == (c, k) and b.shape == (k,)
  preds = np.asarray(x @ np.asarray(w) + np.asarray(b)).argmax(1)
  assert np.mean(preds == y) == 1.0
  ref = LogisticRegression(C=1e4, max_iter=5000).fit(x, y)
  assert np.mean(ref.predict(x) == preds) == 1.0

  # Overlapping classes: same objective as sklearn (l2 = 1 / (C·N), raw features) → same probabilities.
  x2 = centres[y] / 3 + rng.normal(size=(n, c))
  w2, b2 = cam.fit_linear_head(x2, y, k, l2=1.0 / n, standardize=False, steps=200)
  logits = x2 @ np.asarray(w2, np.float64) + np.asarray(b2, np.float64)
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  ref2 = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(x2, y)
  np.testing.assert_allclose(probs, ref2.predict_proba(x2), atol=2e-3)
  with pytest.raises(ValueError, match=r"labels in \[0, 3\)"):
    cam.fit_linear_head(x, y + 1, k)


def test_select_cam_head_and_untrained_head():
  feats = np.random.default_rng(5).normal(size=(20, 6)).astype(np.float32)
  labels = np.arange(20) % 2
  w, b = cam.select_cam_head(feats, labels, 2, upstream_untrained_cam_head=True, key=jax.random.key(0))
  assert w.shape == (6, 2) and np.all(np.asarray(b) == 0) and 0.002 < float(jnp.std(w)) < 0.03
  with pytest.raises(ValueError, match="PRNG key"):
    cam.select_cam_head(feats, labels, 2, upstream_untrained_cam_head=True)
  w_fit, _ = cam.select_cam_head(feats, labels, 2, steps=20)
  assert w_fit.shape == (6, 2)

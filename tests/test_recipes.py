"""Upstream training recipes the trainer reproduces: DualAttendMed's resize → random/centre crop,
FCN-CLIP's data recipe (dataset mix, seeded split, cyclic resampling, resampled class weights,
class-conditional augmentation, the 0.7-weighted focal loss, the evaluation-augmentation quirk flag)
and ReduceLROnPlateau / early stopping with torch's semantics (also across a resume)."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from jaxretina import inference, predict
from jaxretina.configlib import load_config_module
from jaxretina.data import augment as augment_lib
from jaxretina.data import pipeline
from jaxretina.evaluators import plots
from jaxretina.models import fcn_clip
from jaxretina.train import classification, loop, plateau

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_CLASS_WEIGHTS = [0.1293, 0.1973, 0.1644, 0.2545, 0.2545]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("recipe_data"))


def _config(name: str, arg: str = ""):
  return load_config_module(os.path.join(REPO_ROOT, "configs", f"{name}.py")).get_config(arg)


def _one_device_mesh():
  return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))


def _task(config, labels):
  return classification.ClassificationTask(config, _one_device_mesh(), np.asarray(labels, np.int64))


def _uint8_batch(batch, size, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8))


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


# ------------------------------------------------------------------------ DualAttendMed: resize → crop


def test_dualattendmed_paper_resizes_to_256_and_crops_224():
  c = _config("dual_attend_med", "paper")
  assert (c.data.image_size, c.data.crop_size) == (256, 224)
  assert classification.input_size(c.data) == 224


def _no_augment_dam(image_size, crop_size):
  c = _config("dual_attend_med")
  with c.unlocked():
    c.data.image_size, c.data.crop_size = image_size, crop_size
    c.augment = dict(hflip=0.0, rotation=0.0, resized_crop_scale=None, brightness=0.0, saturation=0.0)
    c.model.backbone_base_width, c.model.num_attentions = 8, 4
  return c


def test_training_batches_are_cropped_at_random_and_evaluation_at_the_centre():
  task = _task(_no_augment_dam(40, 32), np.arange(7))
  assert task.input_size == 32 and task._dummy_inputs()["image"].shape[1:3] == (32, 32)
  batch = {"image": _uint8_batch(16, 40), "label": jnp.zeros(16, jnp.int32)}
  normalized = np.asarray(classification.normalize(batch["image"].astype(jnp.float32) / 255.0, "imagenet"))
  # Evaluation (key None): torchvision CenterCrop — offset round((40 − 32) / 2) = 4 on both axes.
  evaluated = np.asarray(task.prepare_inputs(batch, None)["image"])
  np.testing.assert_allclose(evaluated, normalized[:, 4:36, 4:36], atol=1e-6)
  # Training: every sample is some 32×32 window of its image, the windows drawn per sample.
  trained = np.asarray(task.prepare_inputs(batch, jax.random.PRNGKey(3))["image"])
  assert trained.shape == (16, 32, 32, 3)
  offsets = []
  for b in range(16):
    hits = [(t, l) for t in range(9) for l in range(9)
            if np.allclose(trained[b], normalized[b, t:t + 32, l:l + 32], atol=1e-6)]
    assert len(hits) == 1
    offsets.append(hits[0])
  assert len(set(offsets)) > 1


def test_predict_preprocessing_centre_crops_like_evaluation():
  image = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
  x = predict._pad_resize_preprocess(40, 32)(image, "image")
  assert x.shape == (32, 32, 3)
  whole = predict._pad_resize_preprocess(40)(image, "image")
  np.testing.assert_array_equal(x, whole[4:36, 4:36])


def test_cropping_run_trains_evaluates_restores_and_predicts_at_the_crop(data_dir, tmp_path):
  c = _tiny_bira(data_dir, steps=1)
  with c.unlocked():
    c.data.image_size, c.data.crop_size = 40, 32
  workdir = str(tmp_path / "crop")
  final = loop.train_and_evaluate(c, workdir)
  assert np.isfinite(final["eval/classification/accuracy"])
  heatmap = os.listdir(os.path.join(workdir, "eval", "classification", "step_1", "heatmaps"))[0]
  figure = Image.open(os.path.join(workdir, "eval", "classification", "step_1", "heatmaps", heatmap))
  assert figure.width > 2 * plots.HEATMAP_MIN_SIDE  # the stored image and the map beside it, enlarged
  predictor = predict.load_workdir_predictor(workdir)
  assert predictor.image_size == 32
  # The 32² input is the centre 80 % of the 40² resize of the image padded to a square.
  assert predictor.input_box((50, 40)) == pytest.approx((5.0, 5.0, 40.0, 40.0))
  image = np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8)
  x = predictor.preprocess(image, "image")
  probs, attention = predictor.predict({"image": x[None]})
  assert probs.shape == (1, 5) and np.isfinite(probs).all()


# ------------------------------------------------------------------------ FCN-CLIP: data recipe and loss


def test_fcn_clip_paper_config_carries_the_notebook_recipe():
  c = _config("fcn_clip", "paper")
  assert [s["name"] for s in c.data.mix.sources] == ["messidor2", "aptos2019"]
  assert c.data.mix.sources[0]["builder_kwargs"] == {"config": "gradable"}  # FLAIR's 1,744 graded images
  assert [list(s) for s in c.data.mix.splits] == [["train", 0.7], ["validation", 0.15], ["test", 0.15]]
  assert c.data.mix.seed == 42 and list(c.data.train_class_counts) == [445, 200, 200, 180, 180]
  minority = c.augment.class_conditional
  assert list(minority.labels) == [1, 3, 4] and c.augment.hflip == 0.1
  assert list(minority.order) == ["hflip", "rotation", "resized_crop", "color_jitter", "affine", "erasing"]
  assert (minority.hflip, minority.rotation, list(minority.resized_crop_scale)) == (0.6, 35.0, [0.65, 1.0])
  assert (minority.brightness, minority.contrast, minority.saturation, minority.hue) == (0.25, 0.25, 0.25, 0.12)
  assert (minority.affine_degrees, minority.affine_translate, list(minority.affine_scale)) == (18.0, 0.12,
                                                                                               [0.75, 1.25])
  assert (minority.erasing, list(minority.erasing_scale)) == (0.4, [0.02, 0.12])
  assert c.augment.augment_eval_splits is False  # the quirk flag defaults to the intent
  assert c.init.flair_checkpoint == "" and c.loss.focal_weight == 0.7


def test_split_by_fractions_matches_the_notebooks_sizes():
  parts = pipeline.split_by_fractions(5406, [0.7, 0.15, 0.15], seed=42)
  assert [len(p) for p in parts] == [3784, 810, 812]  # the notebook's log
  assert sorted(np.concatenate(parts).tolist()) == list(range(5406))
  for a, b in zip(parts, pipeline.split_by_fractions(5406, [0.7, 0.15, 0.15], seed=42)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(parts[0], pipeline.split_by_fractions(5406, [0.7, 0.15, 0.15], seed=0)[0])


def test_cyclic_resampling_to_class_counts_and_the_resampled_class_weights():
  labels = [0, 1, 0, 2, 1, 0, 3, 4, 0]
  source = [{"label": y} for y in labels]
  resampled = pipeline.resample_to_class_counts(source, [2, 3, 1, 2, 0], 5)
  # Per class in order, that class's records in source order, cyclically.
  assert resampled.indices.tolist() == [0, 2, 1, 4, 1, 3, 6, 6]
  with pytest.raises(ValueError, match="class 4 has no record"):
    pipeline.resample_to_class_counts([{"label": 0}], [1, 0, 0, 0, 1], 5)
  # The notebook: the training split resampled to {0: 445, 1: 200, 2: 200, 3: 180, 4: 180}, the
  # class weights of the focal loss and the sampler computed from those resampled labels.
  rng = np.random.default_rng(0)
  big = [{"label": int(y)} for y in rng.choice(5, 3784, p=[0.5, 0.1, 0.25, 0.05, 0.1])]
  train = pipeline.resample_to_class_counts(big, [445, 200, 200, 180, 180], 5)
  train_labels = pipeline.record_labels(train, 5)
  assert np.bincount(train_labels).tolist() == [445, 200, 200, 180, 180]
  c = _config("fcn_clip")
  with c.unlocked():
    c.model.vision.update(block="bottleneck", layers=[1, 1, 1, 1], base_width=8)
    c.model.proj_dim, c.model.decoder_channels = 16, [32, 16]
  task = _task(c, train_labels)
  np.testing.assert_allclose(task.classifier.class_weights, NOTEBOOK_CLASS_WEIGHTS, atol=1e-4)
  # The sampler draws with the unnormalised weights: the same class distribution.
  np.testing.assert_allclose(np.asarray(task.class_weights) / np.sum(task.class_weights), NOTEBOOK_CLASS_WEIGHTS,
                             atol=1e-4)
  assert task.steps_per_epoch == 1205 // c.batch_size


def test_mixed_sources_concatenate_and_split_by_fraction(data_dir):
  c = _tiny_bira(data_dir)
  with c.unlocked():
    c.data.label_subset = None
    c.data.num_classes = 7
    c.data.class_names = [str(k) for k in range(7)]
    c.data.mix = dict(sources=[dict(name="synthetic_retina", split="train", builder_kwargs=dict(config="tiny")),
                               dict(name="synthetic_retina", split="test", builder_kwargs=dict(config="tiny"))],
                      splits=[["train", 0.5], ["validation", 0.25], ["test", 0.25]], seed=3)
  parts = {s: classification.open_split(c.data, s) for s in ("train", "validation", "test")}
  first = pipeline.open_source("synthetic_retina", "train", data_dir, dict(config="tiny"))
  second = pipeline.open_source("synthetic_retina", "test", data_dir, dict(config="tiny"))
  n = len(first) + len(second)
  assert [len(p) for p in parts.values()] == [n // 2, n // 4, n - n // 2 - n // 4]
  ids = [pipeline._text(p[i]["id"]) for p in parts.values() for i in range(len(p))]
  every = [pipeline._text(s[i]["id"]) for s in (first, second) for i in range(len(s))]
  assert sorted(ids) == sorted(every)  # disjoint and covering the concatenation
  with pytest.raises(ValueError, match="config.data.mix.splits"):
    classification.open_split(c.data, "valid")
  with c.unlocked():
    c.data.train_class_counts = [3, 3, 3, 3, 3, 3, 3]
    c.data.build_if_missing = True
  task = classification.make_classification_task(c, _one_device_mesh())
  assert np.bincount(pipeline.record_labels(task.train_source, 7), minlength=7).tolist() == [3] * 7


def _fcn_clip_classifier():
  from jaxretina.systems import build_classification_system

  c = _config("fcn_clip")
  with c.unlocked():
    c.model.vision.update(block="bottleneck", layers=[1, 1, 1, 1], base_width=8)
    c.model.proj_dim, c.model.decoder_channels = 16, [32, 16]
  classifier = build_classification_system(c, 5, {"image": 3})
  classifier.set_training_labels(np.repeat(np.arange(5), [445, 200, 200, 180, 180]), 5)
  return classifier


def test_fcn_clip_loss_without_prototypes_is_the_weighted_focal_term():
  classifier = _fcn_clip_classifier()
  inputs = {"image": jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))}
  variables, extra = classifier.init(jax.random.PRNGKey(1), inputs)
  labels = jnp.array([0, 1, 3, 4])
  total, (metrics, _, _) = classifier.loss(variables, extra, inputs, labels, jax.random.PRNGKey(2), 0)
  assert classifier.prototypes is None
  np.testing.assert_allclose(total, 0.7 * metrics["loss_focal"], rtol=1e-6)
  # The evaluation loss (what ReduceLROnPlateau / early stopping monitor): the same terms in eval mode.
  out = classifier.predict(variables, inputs)
  per_example = classifier.eval_loss(out, labels)
  focal = fcn_clip.focal_loss(out["logits"], labels, classifier.class_weights, reduction="none")
  np.testing.assert_allclose(per_example, 0.7 * focal, rtol=1e-6)
  prototypes = jax.random.normal(jax.random.PRNGKey(3), (5, 16))
  classifier.set_prototypes(prototypes)
  with_terms = classifier.eval_loss(out, labels)
  contrast = fcn_clip.contrastive_loss(out["embedding"], prototypes, labels)
  np.testing.assert_allclose(jnp.mean(with_terms), 0.7 * jnp.mean(focal) + 0.3 * contrast, rtol=1e-5)


def _conditional_task(**augment):
  c = _config("fcn_clip")
  with c.unlocked():
    c.model.vision.update(block="bottleneck", layers=[1, 1, 1, 1], base_width=8)
    c.model.proj_dim, c.model.decoder_channels = 16, [32, 16]
    c.data.image_size = 16
    c.augment = dict(hflip=0.0, class_conditional=dict(labels=[1, 3, 4], hflip=1.0), **augment)
  return _task(c, np.arange(5))


def test_class_conditional_augmentation_follows_the_label_and_stays_off_at_evaluation():
  task = _conditional_task()
  labels = jnp.array([0, 1, 2, 3, 4, 1])
  batch = {"image": _uint8_batch(6, 16), "label": labels, "index": jnp.arange(6)}
  plain = np.asarray(task.prepare_inputs(batch, None)["image"])
  trained = np.asarray(task.prepare_inputs(batch, jax.random.PRNGKey(0))["image"])
  minority = np.isin(np.asarray(labels), [1, 3, 4])
  np.testing.assert_allclose(trained[minority], plain[minority][:, :, ::-1], atol=1e-6)
  np.testing.assert_allclose(trained[~minority], plain[~minority], atol=1e-6)
  # The notebook's accident (minority chain in every split) only behind augment_eval_splits.
  quirk = _conditional_task(augment_eval_splits=True)
  evaluated = np.asarray(quirk.prepare_inputs(batch, None)["image"])
  np.testing.assert_allclose(evaluated[minority], plain[minority][:, :, ::-1], atol=1e-6)
  np.testing.assert_allclose(evaluated[~minority], plain[~minority], atol=1e-6)
  with pytest.raises(ValueError, match="class_conditional needs the batch's labels"):
    task.prepare_inputs({"image": batch["image"]}, jax.random.PRNGKey(0))


def test_erasing_fills_the_normalisations_zero_and_affine_translates_by_whole_pixels():
  images = jax.random.uniform(jax.random.PRNGKey(0), (8, 20, 20, 3))
  zero = classification.normalization_zero("imagenet", 3)
  erased = classification.augment(jax.random.PRNGKey(1), images, dict(erasing=1.0, erasing_scale=[0.1, 0.1]),
                                  erase_value=zero)
  normalized = np.asarray(classification.normalize(erased, "imagenet"))
  changed = np.any(np.asarray(erased) != np.asarray(images), axis=-1)
  for b in range(8):
    rows, cols = np.nonzero(changed[b])
    area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert 20 <= area <= 60  # 10 % of 400 px, rounded box sides
    np.testing.assert_allclose(normalized[b][changed[b]], 0.0, atol=1e-6)
  shifted = augment_lib.torchvision_random_affine(jax.random.PRNGKey(2), images, 0.0, (0.2, 0.2))
  for b in range(8):
    hits = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
            if np.allclose(np.asarray(shifted[b]), np.asarray(_shift(images[b], dy, dx)), atol=1e-5)]
    assert len(hits) == 1


def _shift(image, dy, dx):
  out = jnp.zeros_like(image)
  h, w = image.shape[:2]
  src = image[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
  return out.at[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]].set(src)


def test_color_jitter_applies_its_adjustments_in_a_random_order_per_sample():
  images = jax.random.uniform(jax.random.PRNGKey(0), (64, 4, 4, 3))
  out = np.asarray(classification.color_jitter(jax.random.PRNGKey(1), images, brightness=0.5, saturation=0.5))
  # Recover the draws: the same key gives the same factors (color_jitter's own split).
  _, k_b, _, k_s, _ = jax.random.split(jax.random.PRNGKey(1), 5)
  b = jax.random.uniform(k_b, (64,), jnp.float32, 0.5, 1.5)
  s = jax.random.uniform(k_s, (64,), jnp.float32, 0.5, 1.5)
  bright = lambda x: jnp.clip(x * b[:, None, None, None], 0.0, 1.0)  # noqa: E731
  saturate = lambda x: classification.adjust_saturation(x, s)  # noqa: E731
  first_b, first_s = np.asarray(saturate(bright(images))), np.asarray(bright(saturate(images)))
  is_b = np.all(np.isclose(out, first_b, atol=1e-6), axis=(1, 2, 3))
  is_s = np.all(np.isclose(out, first_s, atol=1e-6), axis=(1, 2, 3))
  assert np.all(is_b | is_s) and is_b.any() and is_s.any()


# ------------------------------------------------------------------------ ReduceLROnPlateau / early stopping


def _torch_lrs(values, base_lr, **kwargs):
  torch = pytest.importorskip("torch")
  param = torch.nn.Parameter(torch.zeros(1))
  optimizer = torch.optim.SGD([param], lr=base_lr)
  scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kwargs)
  lrs = []
  for v in values:
    scheduler.step(float(v))
    lrs.append(optimizer.param_groups[0]["lr"])
  return lrs


def _ours(values, base_lr, **kwargs):
  rule = plateau.ReduceLROnPlateau(**kwargs)
  t = {"scale": 1.0, "best": math.inf if rule.mode == "min" else -math.inf, "num_bad_epochs": 0,
       "cooldown_counter": 0, "last_epoch": 0}
  lrs = []
  for v in values:
    t = rule.step(t, float(v), base_lr)
    t["scale"] = float(np.float32(t["scale"]))  # as the optimizer state holds it
    lrs.append(base_lr * t["scale"])
  return lrs


@pytest.mark.parametrize("kwargs", [
    {},  # torch's defaults: min, factor 0.1, patience 10, threshold 1e-4 rel, cooldown 0, min_lr 0
    dict(mode="max", factor=0.1, patience=6),  # BiRA-Net
    dict(mode="min", factor=0.5, patience=2),  # FCN-CLIP
    dict(mode="max", factor=0.5, patience=1, threshold=0.05, threshold_mode="abs", cooldown=2),
    dict(mode="min", factor=0.3, patience=0, threshold=0.1, cooldown=1, min_lr=2e-5),
    dict(mode="min", factor=0.5, patience=0, min_lr=1e-4, eps=1e-3),
])
def test_plateau_rule_matches_torch_reduce_lr_on_plateau(kwargs):
  rng = np.random.default_rng(len(str(kwargs)))
  base_lr = 2e-4
  # Noisy trends, exact repeats, values inside the threshold band, a NaN.
  values = np.concatenate([np.round(rng.random(20), 2), [0.5, 0.5, 0.49995, 0.5, float("nan"), 0.4],
                           np.linspace(1.0, 0.0, 10), np.linspace(0.0, 1.0, 10)])
  np.testing.assert_allclose(_ours(values, base_lr, **kwargs), _torch_lrs(values, base_lr, **kwargs),
                             rtol=1e-6, atol=0)


def test_plateau_rule_rejects_what_torch_rejects():
  with pytest.raises(ValueError, match="config.reduce_on_plateau.factor"):
    plateau.ReduceLROnPlateau(factor=1.0)
  with pytest.raises(ValueError, match="config.reduce_on_plateau.mode"):
    plateau.ReduceLROnPlateau(mode="lowest")


def test_early_stopping_counts_evaluations_without_strict_improvement():
  rule = plateau.EarlyStopping(mode="min", patience=3)
  t = {"stop_best": math.inf, "stop_bad_epochs": 0, "stop_best_step": -1}
  stops = []
  for step, v in enumerate([1.0, 0.9, 0.9, 0.95, 0.8, 0.8, 0.8, 0.85], start=1):
    t, _ = rule.step(t, v, step)
    stops.append(rule.should_stop(t))
  # The notebook: `val_loss < best_val_loss` resets the counter; `counter >= patience` stops.
  assert stops == [False] * 7 + [True]
  assert (t["stop_best"], t["stop_best_step"]) == (0.8, 5)


def _tiny_bira(data_dir, *, steps=0):
  from test_classification import tiny_config

  c = tiny_config("bira_net", data_dir, steps=steps)
  with c.unlocked():
    c.checkpoint_every = 0
    c.evals.classification.heatmaps = 1
    c.schedule = dict(name="constant", lr=1e-3)
  return c


def _with_plateau(c, epochs, stop_patience=0):
  """Plateau on the evaluator's constant ``chance`` (1/K): after the first evaluation no evaluation is
  better, so the rule acts on a known schedule (no dependence on what the model learns)."""
  with c.unlocked():
    c.eval_every_epochs = 1
    c.reduce_on_plateau.update(dict(metric="classification/chance", mode="max", factor=0.5, patience=0))
    if stop_patience:
      c.early_stopping.update(dict(metric="classification/chance", mode="max", patience=stop_patience))
  task = classification.make_classification_task(c, _one_device_mesh())
  with c.unlocked():
    c.total_steps = epochs * task.steps_per_epoch
  return c, task.steps_per_epoch


def _lr_by_step(workdir):
  return {r["step"]: r["lr"] for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "lr" in r}


def _scales(workdir):
  return [(r["step"], r["lr_scale"]) for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "lr_scale" in r]


def test_plateau_lowers_the_rate_per_epoch_and_the_scale_survives_resume(data_dir, tmp_path):
  c = _tiny_bira(data_dir)
  with c.unlocked():
    c.data.build_if_missing = True
  c, spe = _with_plateau(c, epochs=2)
  workdir = str(tmp_path / "plateau")
  loop.train_and_evaluate(c, workdir)
  assert _scales(workdir) == [(spe, 1.0), (2 * spe, 0.5)]
  lr = _lr_by_step(workdir)
  assert lr[1] == pytest.approx(1e-3) and lr[2 * spe] == pytest.approx(1e-3)  # lowered after epoch 2's eval
  with c.unlocked():
    c.total_steps = 3 * spe
  loop.train_and_evaluate(c, workdir)  # resumes from the epoch-2 checkpoint, scale 0.5 restored
  lr = _lr_by_step(workdir)
  assert lr[2 * spe + 1] == pytest.approx(5e-4, rel=1e-6) and lr[3 * spe] == pytest.approx(5e-4, rel=1e-6)
  assert _scales(workdir)[-1] == (3 * spe, 0.25)


def test_early_stopping_ends_the_run_with_a_final_and_a_best_checkpoint(data_dir, tmp_path, capsys):
  c = _tiny_bira(data_dir)
  with c.unlocked():
    c.data.build_if_missing = True
  c, spe = _with_plateau(c, epochs=6, stop_patience=2)
  workdir = str(tmp_path / "stop")
  final = loop.train_and_evaluate(c, workdir)
  assert "eval/classification/accuracy" in final
  out = capsys.readouterr().out
  assert f"stopped at step {3 * spe}/{6 * spe}: early stopping: classification/chance has not improved for 2" in out
  assert inference.checkpoint_steps(workdir) == [3 * spe]  # the final checkpoint at the stop
  assert inference.checkpoint_steps(workdir, best=True) == [spe]  # the best (first) evaluation's state
  assert inference.load_run(workdir, best=True).variables["params"]
  assert _scales(workdir) == [(spe, 1.0), (2 * spe, 0.5), (3 * spe, 0.25)]
  # Started again, the run knows it has stopped: no training, the same checkpoints.
  loop.train_and_evaluate(c, workdir)
  assert "early stopping" in capsys.readouterr().out
  assert inference.checkpoint_steps(workdir) == [3 * spe]


def test_plateau_needs_epoch_evaluations_and_a_known_metric(data_dir, tmp_path):
  c = _tiny_bira(data_dir, steps=2)
  with c.unlocked():
    c.data.build_if_missing = True
    c.reduce_on_plateau.metric = "classification/accuracy"
  with pytest.raises(ValueError, match="config.eval_every_epochs=1"):
    classification.make_classification_task(c, _one_device_mesh())
  controller = plateau.Controller(_with_plateau(c, epochs=1)[0])
  opt_state = controller.wrap(optax.sgd(0.1)).init({"w": jnp.zeros(2)})
  with pytest.raises(KeyError, match="config.reduce_on_plateau.metric='classification/chance'"):
    controller.after_evaluation(opt_state, {"validation/loss": 1.0}, step=1)

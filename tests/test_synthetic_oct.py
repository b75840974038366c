"""The paired synthetic fundus + OCT generator and its TFDS builder ``synthetic_fundus_oct``."""

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from jaxretina.data import synthetic_oct

_NORMAL, _DRY, _PCV, _WET = range(4)


@pytest.fixture(scope="module")
def examples():
  return synthetic_oct.render_batch(11, range(200), 32)


def _auc(negatives: np.ndarray, positives: np.ndarray) -> float:
  """P(positive feature > negative feature) (ties count half): the ROC AUC of a threshold."""
  diff = positives[:, None] - negatives[None, :]
  return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def _fundus_features(image: np.ndarray) -> list[float]:
  r, g, b = (image[..., c].astype(np.int32) for c in range(3))
  yellow = ((r > 190) & (g > 160) & (b < 150) & (g > 0.75 * r)).mean()  # drusen, exudates
  # Haemorrhage: dark red in the central (macular) area, which the vessel arcades go around.
  size = image.shape[0]
  ys, xs = np.mgrid[0:size, 0:size] + 0.5
  central = (ys - size / 2) ** 2 + (xs - size / 2) ** 2 < (0.2 * size) ** 2
  dark_red = ((r > 40) & (r < 110) & (g < 30) & (b < 40) & central).mean()
  return [float(yellow), float(dark_red)]


def _oct_features(oct_image: np.ndarray) -> list[float]:
  """How far the retinal surface bulges above its smoothed course; dark pixels under the surface."""
  x = ndimage.uniform_filter(oct_image[..., 0].astype(np.float32), (2, 3))
  bright = np.percentile(x, 98)
  surface = ndimage.median_filter((x > 0.4 * bright).argmax(0).astype(np.float32), 3)
  bulge = (ndimage.median_filter(surface, 11, mode="nearest") - surface).max()
  rows = np.arange(x.shape[0])[:, None]
  band = (rows > surface[None]) & (rows < surface[None] + 0.22 * x.shape[0])
  dark = ((x < 0.2 * bright) & band).sum() / band.sum()
  return [float(bulge), float(dark)]


def test_render_is_deterministic_and_index_dependent():
  a, b = synthetic_oct.render_example(3, 7, 40), synthetic_oct.render_example(3, 7, 40)
  for key in ("image", "oct"):
    assert a[key].tobytes() == b[key].tobytes()
  assert {k: v for k, v in a.items() if k not in ("image", "oct")} == {
      k: v for k, v in b.items() if k not in ("image", "oct")}
  c = synthetic_oct.render_example(3, 8, 40)
  assert c["image"].tobytes() != a["image"].tobytes() and c["oct"].tobytes() != a["oct"].tobytes()
  assert c["id"] != a["id"]
  assert synthetic_oct.render_example(4, 7, 40)["oct"].tobytes() != a["oct"].tobytes()


def test_shapes_dtypes_and_fields(examples):
  for e in examples[:20]:
    assert e["image"].shape == (32, 32, 3) and e["image"].dtype == np.uint8
    assert e["oct"].shape == (32, 32, 1) and e["oct"].dtype == np.uint8
    assert e["eye"] in ("left", "right") and e["dataset"] == synthetic_oct.DATASET_KEY
    assert 0 <= e["fundus_signal"] <= 1 and 0 <= e["oct_signal"] <= 1
    assert min(e["fundus_signal"], e["oct_signal"]) < 1 or max(e["fundus_signal"], e["oct_signal"]) == 1
  assert synthetic_oct.render_example(0, 1, 57)["oct"].shape == (57, 57, 1)
  assert {e["eye"] for e in examples} == {"left", "right"}


def test_class_names_follow_mmc_amd_order():
  assert synthetic_oct.CLASS_LETTERS == ("h", "d", "p", "w")
  assert synthetic_oct.CLASS_NAMES[0] == "normal" and "polypoidal" in synthetic_oct.CLASS_NAMES[2]
  assert synthetic_oct.CLASS_NAMES[1].startswith("dry") and synthetic_oct.CLASS_NAMES[3].startswith("wet")


def test_labels_are_balanced_per_block_of_four(examples):
  labels = np.array([e["label"] for e in examples])
  for block in labels.reshape(-1, 4):
    assert sorted(block) == [0, 1, 2, 3]
  assert labels[:8].tolist() != [0, 1, 2, 3, 0, 1, 2, 3]  # permuted, not index % 4
  assert all(synthetic_oct.class_label(11, i) == labels[i] for i in range(8))


def test_at_most_one_modality_is_weak(examples):
  diseased = [e for e in examples if e["label"] != _NORMAL]
  assert all(max(e["fundus_signal"], e["oct_signal"]) == 1.0 for e in diseased)
  weak_fundus = np.mean([e["fundus_signal"] < 1 for e in diseased])
  weak_oct = np.mean([e["oct_signal"] < 1 for e in diseased])
  assert 0.1 < weak_fundus < 0.4 and 0.1 < weak_oct < 0.4


def test_hand_features_separate_classes_in_each_modality(examples):
  labels = np.array([e["label"] for e in examples])
  fundus = np.array([_fundus_features(e["image"]) for e in examples])
  oct_ = np.array([_oct_features(e["oct"]) for e in examples])
  normal = labels == _NORMAL
  # Fundus: drusen are yellow; PCV and wet AMD bleed.
  assert _auc(fundus[normal, 0], fundus[labels == _DRY, 0]) > 0.8
  assert _auc(fundus[normal, 1], fundus[(labels == _PCV) | (labels == _WET), 1]) > 0.7
  # OCT: drusen, the PED and CNV/fluid lift the retinal surface; wet AMD's fluid and cysts are dark.
  assert _auc(oct_[normal, 0], oct_[labels == _PCV, 0]) > 0.6
  assert _auc(oct_[normal, 0], oct_[labels != _NORMAL, 0]) > 0.6
  assert _auc(oct_[labels == _DRY, 1], oct_[labels == _WET, 1]) > 0.65



def test_each_modality_beats_chance_and_fusion_beats_both(examples):
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import cross_val_score
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler

  labels = np.array([e["label"] for e in examples])
  fundus = np.array([_fundus_features(e["image"]) for e in examples])
  oct_ = np.array([_oct_features(e["oct"]) for e in examples])

  def accuracy(features):
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return cross_val_score(classifier, features, labels, cv=5).mean()

  fundus_only, oct_only = accuracy(fundus), accuracy(oct_)
  fused = accuracy(np.concatenate([fundus, oct_], 1))
  assert fundus_only > 0.4 and oct_only > 0.33  # chance: 0.25
  assert fused > max(fundus_only, oct_only)

def test_bad_arguments_are_rejected():
  with pytest.raises(ValueError, match="image_size"):
    synthetic_oct.render_example(0, 0, 8)
  with pytest.raises(ValueError, match="non-negative"):
    synthetic_oct.render_example(0, -1, 32)


def test_builder_builds_tiny_and_reads_back_through_the_pipeline(tmp_path):
  from jaxretina import datasets
  from jaxretina.data import pipeline

  builder = datasets.ensure_built("synthetic_fundus_oct", str(tmp_path), config="tiny", num_workers=1)
  assert builder.builder_config.name == "tiny"
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 32, "test": 16}
  assert list(builder.info.features["label"].names) == list(synthetic_oct.CLASS_NAMES)
  source = pipeline.open_source("synthetic_fundus_oct", "train", str(tmp_path), {"config": "tiny"})
  assert len(source) == 32
  labels, seen = [], set()
  for i in range(len(source)):
    record = source[i]
    index = int(record["id"].decode().rsplit("-", 1)[1])
    expected = synthetic_oct.render_example(0, index, 32)  # the train split's seed
    image, oct_image = (np.asarray(Image.open(io.BytesIO(record[k]))) for k in ("image", "oct"))
    np.testing.assert_array_equal(image, expected["image"])  # PNG is lossless
    np.testing.assert_array_equal(oct_image[..., None], expected["oct"])
    assert record["label"] == expected["label"]
    assert record["eye"].decode() == expected["eye"]
    assert record["dataset"].decode() == synthetic_oct.DATASET_KEY
    labels.append(record["label"])
    seen.add(index)
  assert seen == set(range(32))
  assert np.bincount(labels).tolist() == [8, 8, 8, 8]


def test_builder_size_overrides_make_their_own_config(tmp_path):
  import tensorflow_datasets as tfds

  from jaxretina import datasets

  sizes = dict(image_size=24, num_train=5, num_test=3, seed=2, num_workers=1)
  builder = datasets.ensure_built("synthetic_fundus_oct", str(tmp_path), **sizes)
  assert builder.builder_config.name == "s24_tr5_te3_seed2"
  source = tfds.data_source(f"synthetic_fundus_oct/{builder.builder_config.name}", split="test",
                            data_dir=str(tmp_path))
  record = source[0]
  expected = synthetic_oct.render_example(1000 * 2 + 1, int(record["id"].decode().rsplit("-", 1)[1]), 24)
  np.testing.assert_array_equal(record["oct"], expected["oct"])
  with pytest.raises(ValueError, match="image_size"):
    tfds.builder("synthetic_fundus_oct", data_dir=str(tmp_path), image_size=8)
  with pytest.raises(ValueError, match="unknown config"):
    tfds.builder("synthetic_fundus_oct", data_dir=str(tmp_path), config="huge", num_train=3)

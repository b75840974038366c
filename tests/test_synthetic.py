"""The synthetic retina generator and its TFDS builder."""

import json
import re

import numpy as np
import pytest

from jaxretina.data import synthetic


def _pixel_stats(images: np.ndarray) -> dict[str, float]:
  r, g, b = (images[..., c].astype(np.int32) for c in range(3))
  return {
      "yellow": float(((r > 190) & (g > 160) & (b < 150) & (g > 0.75 * r)).mean()),
      "white": float(((r > 225) & (g > 215) & (b > 170)).mean()),
      "dark_red": float(((r > 40) & (r < 140) & (g < 45) & (b < 40)).mean()),
  }


@pytest.fixture(scope="module")
def examples():
  return [synthetic.render_example(5, i, 48) for i in range(210)]


def test_render_is_deterministic_and_index_dependent():
  a, b = synthetic.render_example(3, 7, 40), synthetic.render_example(3, 7, 40)
  assert a["image"].tobytes() == b["image"].tobytes()
  assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
  assert a["image"].shape == (40, 40, 3) and a["image"].dtype == np.uint8
  c = synthetic.render_example(3, 8, 40)
  assert c["image"].tobytes() != a["image"].tobytes() and c["id"] != a["id"]
  assert synthetic.render_example(4, 7, 40)["image"].tobytes() != a["image"].tobytes()


def test_fields_follow_flair_conventions(examples):
  from jaxretina.text import dictionary

  definitions = dictionary.definitions("flair")
  for name in synthetic.CATEGORY_NAMES:
    assert name in definitions, name
    assert tuple(definitions[name]) == synthetic.CATEGORY_DESCRIPTIONS[name], name
  assert set(synthetic.ZERO_SHOT_CLASSES) <= set(synthetic.CLASS_NAMES)
  labels = {e["label"] for e in examples}
  assert labels == set(range(len(synthetic.CLASS_NAMES)))
  for e in examples:
    assert e["categories"] and set(e["categories"]) <= set(synthetic.CATEGORY_NAMES)
    assert e["atributes"] in ([], ["clean"])
    assert e["dataset"] == synthetic.DATASET_KEY
    name = synthetic.CLASS_NAMES[e["label"]]
    if name != "normal":
      assert e["categories"][0] == name and name in e["caption"]


def test_caption_corpus_covers_every_caption_word(examples):
  words = lambda text: set(re.findall(r"[a-z0-9]+", text.lower()))
  corpus_words = set().union(*(words(t) for t in synthetic.caption_corpus()))
  for e in examples:
    assert words(e["caption"]) <= corpus_words, e["caption"]
    assert words(" ".join(e["categories"] + e["atributes"])) <= corpus_words


def test_classes_differ_visibly(examples):
  stats = {}
  for label, name in enumerate(synthetic.CLASS_NAMES):
    stats[name] = _pixel_stats(np.stack([e["image"] for e in examples if e["label"] == label]))
  normal = stats["normal"]
  assert stats["age related macular degeneration"]["yellow"] > 5 * normal["yellow"]  # drusen
  assert stats["moderate diabetic retinopathy"]["yellow"] > 5 * normal["yellow"]  # hard exudates
  assert stats["glaucoma"]["white"] > 2 * normal["white"]  # large bright cup
  assert stats["severe diabetic retinopathy"]["dark_red"] > 1.2 * normal["dark_red"]  # haemorrhages
  assert stats["mild diabetic retinopathy"]["dark_red"] > normal["dark_red"]  # microaneurysms


def test_bad_arguments_are_rejected():
  with pytest.raises(ValueError, match="image_size"):
    synthetic.render_example(0, 0, 8)
  with pytest.raises(ValueError, match="non-negative"):
    synthetic.render_example(-1, 0, 32)


def test_builder_builds_and_reads_back_without_tensorflow(tmp_path):
  import tensorflow_datasets as tfds

  from jaxretina import datasets

  sizes = dict(image_size=32, num_train=12, num_test=5, num_expert=3, seed=2, num_workers=1)
  builder = datasets.ensure_built("synthetic_retina", str(tmp_path), **sizes)
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 12, "test": 5, "expert": 3}
  assert datasets.ensure_built("synthetic_retina", str(tmp_path), **sizes).data_dir == builder.data_dir
  source = tfds.data_source(f"synthetic_retina/{builder.builder_config.name}", split="test", data_dir=str(tmp_path))
  assert len(source) == 5
  seen = set()
  for i in range(len(source)):
    record = source[i]
    index = int(record["id"].decode().rsplit("-", 1)[1])
    expected = synthetic.render_example(1000 * 2 + 1, index, 32)  # the test split's seed
    np.testing.assert_array_equal(record["image"], expected["image"])  # PNG is lossless
    assert record["label"] == expected["label"]
    assert json.loads(record["categories"]) == expected["categories"]
    assert json.loads(record["atributes"]) == expected["atributes"]
    assert record["caption"].decode() == expected["caption"]
    assert record["dataset"].decode() == "synthetic"
    seen.add(index)
  assert seen == set(range(5))

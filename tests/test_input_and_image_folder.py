"""The image_folder builder (RETFound / GDRBench trees), flair_dataframe's balance option, the input benchmark."""

import collections
import io
import json

import numpy as np
import pytest
from PIL import Image

import fake_fundus_downloads as fundus_fakes
import fake_multimodal_downloads as multimodal_fakes
import fake_image_folder_trees as folder_fakes
from dataset_build_helpers import CANVAS, KW, records_by_id, text
import tensorflow_datasets as tfds

import jaxretina.datasets  # noqa: F401  (registers the builders)
from jaxretina.data import input_bench
from jaxretina.data.pipeline import classification_batches, open_source
from jaxretina.data import imaging
from jaxretina.datasets import bad_input
from jaxretina.datasets import file_discovery
from jaxretina.transfer import splits as transfer_splits


def build_folder(manual_dir, data_dir, **kwargs):
  builder = tfds.builder("image_folder", data_dir=str(data_dir), manual_dir=str(manual_dir), **{**KW, **kwargs})
  builder.download_and_prepare(file_format="array_record")
  return builder


def read(builder, split):
  source = open_source("image_folder", split, builder.data_dir_root,
                       {**KW, "manual_dir": builder.builder_config.root,
                        "classes": json.loads(builder.builder_config.classes)})
  return source, records_by_id(source)


def test_retfound_splits_labels_ids_and_images(tmp_path):
  expected = folder_fakes.write_retfound(tmp_path / "m")
  builder = build_folder(tmp_path / "m", tmp_path / "d")
  # The doubled APTOS2019/APTOS2019/ wrapper is descended; the config is named after the tree.
  assert builder.builder_config.root == str(folder_fakes.retfound_root(tmp_path / "m").resolve())
  assert builder.builder_config.name.startswith("APTOS2019_")
  assert builder.info.features["label"].names == folder_fakes.RETFOUND_CLASSES
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {k: len(v) for k, v in expected.items()}
  for split, want in expected.items():
    _, records = read(builder, split)
    assert set(records) == set(want)
    for record_id, features in want.items():
      record = records[record_id]
      assert int(record["label"]) == features["label"]
      assert text(record["file_name"]) == features["file_name"]
      assert text(record["dataset"]) == "APTOS2019"
      stored = np.asarray(Image.open(io.BytesIO(record["image"])))
      with Image.open(folder_fakes.retfound_root(tmp_path / "m") / features["file_name"]) as original:
        want_image = imaging.canvas_resize_fast(np.asarray(original.convert("RGB")), CANVAS)
      np.testing.assert_array_equal(stored, want_image)
  report = json.loads(builder.skip_report_path.read_text())
  assert report["num_skipped"] == 0
  assert any("'validation'" in note and "dsevere" in note for note in report["notes"]), report["notes"]
  assert any("non-image" in note for note in report["notes"]), report["notes"]
  # Read back through Grain with the labels it checks.
  source, _ = read(builder, "train")
  batch = next(iter(classification_batches(source, global_batch_size=2, seed=0, num_classes=5)))
  assert batch["image"].shape == (2, CANVAS, CANVAS, 3) and batch["label"].dtype == np.int32


def test_gdrbench_single_split_explicit_classes_and_other_trees(tmp_path):
  expected = folder_fakes.write_gdrbench(tmp_path / "m")
  builder = build_folder(tmp_path / "m", tmp_path / "d")
  assert builder.info.features["label"].names == sorted(folder_fakes.GDRBENCH_CLASSES)  # torchvision's order
  _, records = read(builder, "train")
  assert {k: int(r["label"]) for k, r in records.items()} == {k: v["label"] for k, v in expected["train"].items()}
  # Explicit classes fix the label order (and are another dataset); split= names the one split.
  ordered = tfds.builder("image_folder", data_dir=str(tmp_path / "d"), manual_dir=str(tmp_path / "m"),
                         classes=",".join(folder_fakes.GDRBENCH_CLASSES), split="test", **KW)
  assert ordered.builder_config.name != builder.builder_config.name and not ordered.is_prepared()
  ordered.download_and_prepare(file_format="array_record")
  assert ordered.info.features["label"].names == folder_fakes.GDRBENCH_CLASSES
  assert list(ordered.info.splits) == ["test"]
  source = open_source("image_folder", "test", str(tmp_path / "d"), {**KW, "manual_dir": str(tmp_path / "m"),
                                                                      "classes": folder_fakes.GDRBENCH_CLASSES,
                                                                      "split": "test"})
  labels = {text(source[i]["id"]): int(source[i]["label"]) for i in range(len(source))}
  assert labels == {k: folder_fakes.GDRBENCH_CLASSES.index(k.split("/")[0]) for k in expected["train"]}
  # A second tree with the same folder name is a different dataset: the root path is in the name.
  folder_fakes.write_gdrbench(tmp_path / "other")
  other = tfds.builder("image_folder", data_dir=str(tmp_path / "d"), manual_dir=str(tmp_path / "other"), **KW)
  assert other.builder_config.name.startswith("DEEPDR_") and other.builder_config.name != builder.builder_config.name
  assert not other.is_prepared()


def test_stray_class_folder_and_corrupt_image_error_or_skip(tmp_path):
  folder_fakes.write_retfound(tmp_path / "m")
  root = folder_fakes.retfound_root(tmp_path / "m")
  fundus_fakes.write_image(root / "test" / "fstray" / "s.png", 7)
  fundus_fakes.truncate(root / "train" / "bmild" / "b1.PNG")
  classes = ",".join(folder_fakes.RETFOUND_CLASSES)
  with pytest.raises(bad_input.DatasetInputError, match=r"class folder 'fstray'.*not one of the classes"):
    build_folder(tmp_path / "m", tmp_path / "d", classes=classes)
  with pytest.raises(bad_input.DatasetInputError, match=r"b1\.PNG.*corrupt"):
    build_folder(tmp_path / "m", tmp_path / "d", classes=classes + ",fstray")
  assert not tfds.builder("image_folder", data_dir=str(tmp_path / "d"), manual_dir=str(tmp_path / "m"),
                          classes=classes, **KW).is_prepared()
  builder = build_folder(tmp_path / "m", tmp_path / "d", classes=classes, on_bad_input="skip")
  report = json.loads(builder.skip_report_path.read_text())
  assert report["counts"] == {"unknown_label": 1, "corrupt_image": 1}, report
  assert any("fstray" in s["where"] for s in report["skipped"])
  assert builder.info.splits["train"].num_examples == 5 and builder.info.splits["test"].num_examples == 6
  # Without explicit classes the stray folder is simply a sixth class.
  assert tfds.builder("image_folder", data_dir=str(tmp_path / "d"), manual_dir=str(tmp_path / "m"),
                      **KW).info.features["label"].names == folder_fakes.RETFOUND_CLASSES + ["fstray"]


def test_bad_trees_and_options(tmp_path):
  with pytest.raises(bad_input.DatasetInputError, match="does not exist"):
    tfds.builder("image_folder", data_dir=str(tmp_path / "d"), manual_dir=str(tmp_path / "nope"))
  (tmp_path / "flat").mkdir()
  fundus_fakes.write_image(tmp_path / "flat" / "a.png", 0)
  with pytest.raises(bad_input.DatasetInputError, match="no class or split folders"):
    tfds.builder("image_folder", data_dir=str(tmp_path / "d"), manual_dir=str(tmp_path / "flat"))
  fundus_fakes.write_image(tmp_path / "mixed" / "train" / "x" / "a.png", 0)
  fundus_fakes.write_image(tmp_path / "mixed" / "extra" / "a.png", 0)
  with pytest.raises(bad_input.DatasetInputError, match=r"split folders \['train'\] and other folders \['extra'\]"):
    tfds.builder("image_folder", data_dir=str(tmp_path / "d"), manual_dir=str(tmp_path / "mixed"))
  with pytest.raises(ValueError, match="repeat"):
    tfds.builder("image_folder", data_dir=str(tmp_path / "d"), manual_dir=str(tmp_path / "mixed" / "train"),
                 classes="x,x")
  unbound = tfds.builder("image_folder", data_dir=str(tmp_path / "d"))
  with pytest.raises(bad_input.DatasetInputError, match="without manual_dir"):
    unbound.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "mixed")))


def test_derived_layout_hints_name_the_image_folder_builder(tmp_path):
  folder_fakes.write_retfound(tmp_path / "retfound")
  with pytest.raises(bad_input.DatasetInputError, match=r"image-folder tree.*build image_folder --manual_dir"):
    file_discovery.find_root(tmp_path / "retfound", [["train.csv"]], dataset="aptos2019")
  folder_fakes.write_gdrbench(tmp_path / "gdr")
  with pytest.raises(bad_input.DatasetInputError, match=r"GDRBench.*build image_folder --manual_dir"):
    file_discovery.find_root(tmp_path / "gdr", [["DDR_grading.csv"]], dataset="ddr")


def test_flair_dataframe_balance_oversamples_train_only(tmp_path):
  refuge = multimodal_fakes.write_refuge_experiment(tmp_path / "m")
  kwargs = {**KW, "csv": refuge["csv"], "experiment": "25_REFUGE", "fold": 1}
  plain = tfds.builder("flair_dataframe", data_dir=str(tmp_path / "d"), **kwargs)
  balanced = tfds.builder("flair_dataframe", data_dir=str(tmp_path / "d"), balance="true", **kwargs)
  assert balanced.builder_config.balance and balanced.builder_config.name != plain.builder_config.name
  balanced.download_and_prepare(file_format="array_record",
                                download_config=tfds.download.DownloadConfig(manual_dir=refuge["manual_dir"]))
  targets = ("no glaucoma", "glaucoma")
  rows = transfer_splits.read_dataframe(refuge["csv"])
  want = transfer_splits.split_rows(rows, targets, seed=1, balance=True)
  unbalanced = transfer_splits.split_rows(rows, targets, seed=1)
  assert len(want["train"]) > len(unbalanced["train"])
  source = open_source("flair_dataframe", "train", str(tmp_path / "d"), {**kwargs, "balance": True})
  got = [(text(source[i]["file_name"]), int(source[i]["label"])) for i in range(len(source))]
  assert collections.Counter(got) == collections.Counter((s.id, s.label) for s in want["train"])
  assert len(set(text(source[i]["id"]) for i in range(len(source)))) == len(source)  # copies get '#k' ids
  assert set(collections.Counter(label for _, label in got).values()) == {max(
      collections.Counter(s.label for s in unbalanced["train"]).values())}
  test = open_source("flair_dataframe", "test", str(tmp_path / "d"), {**kwargs, "balance": True})
  assert sorted(text(test[i]["id"]) for i in range(len(test))) == sorted(s.id for s in want["test"])
  with pytest.raises(ValueError, match="balance=True.*experiment"):
    tfds.builder("flair_dataframe", data_dir=str(tmp_path / "d"), csv=refuge["csv"], balance=True)


def test_input_benchmark_runs_both_loops_on_the_same_images(tmp_path):
  result = input_bench.run(data_dir=str(tmp_path / "bench"), num_records=16, image_size=64, batch_size=4,
                           seconds=0.2, repeats=1)
  assert result["records"] == 16 and result["image_shape"] == [64, 64, 3] and result["encoding"] == "jpeg"
  assert result["built"] and result["build_img_per_s"] > 0
  assert result["pipeline"]["images"] == result["plain"]["images"] and result["pipeline"]["images"][0] >= 4
  for kind in ("pipeline", "plain"):
    assert result[kind]["img_per_s_median"] > 0 and result[kind]["img_per_cpu_s_median"] > 0
  assert result["ratio_img_per_s"] > 0 and "num_threads=2" in result["pipeline_settings"]
  # Cached: a second run neither generates nor builds.
  again = input_bench.run(data_dir=str(tmp_path / "bench"), num_records=16, image_size=64, batch_size=4,
                          seconds=0.1, repeats=1, num_threads=1)
  assert not again["built"] and again["generate_s"] == 0 and "num_threads=1" in again["pipeline_settings"]


def test_cli_builds_an_image_folder_tree(tmp_path):
  import os
  import subprocess
  import sys

  expected = folder_fakes.write_gdrbench(tmp_path / "m")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  run = subprocess.run([sys.executable, "-m", "jaxretina.datasets", "build", "image_folder", "--manual_dir",
                        str(tmp_path / "m"), "--data_dir", str(tmp_path / "d"), "--canvas_size", str(CANVAS),
                        "--num_workers", "1"], capture_output=True, text=True, env=env, timeout=120)
  assert run.returncode == 0, run.stderr[-3000:]
  total = sum(len(records) for records in expected.values())  # {split: {id: features}}
  assert f"train: {total} examples" in run.stdout, run.stdout

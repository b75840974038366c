"""Zero-shot classification with FLAIR's text prototypes (docs/systems.md#flair-zero-shot-prototypes).

Each class name becomes its domain-knowledge descriptions wrapped in the prompt template; the
descriptions of one class are tokenised together (padded to the longest, as FLAIR does), encoded,
and averaged without re-normalisation into the class prototype. Scores are e^s·X·Pᵀ.

``config.evals.<name> = {type: 'zero_shot', split, classes, template, domain_knowledge, variant,
batch_size, [name, data_dir, builder_kwargs, label_map]}`` (the fields and their defaults:
``entry_config``) measures accuracy, ACA and per-class recall of a two-tower model on a dataset split
(``ZeroShotEvaluator``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxretina.data import pipeline
from jaxretina.evaluators import entry_fields
from jaxretina.models import flair
from jaxretina.text import prompts
from jaxretina.train import distributed


class TwoTowerRun(NamedTuple):
  """A FLAIR / KeepFIT two-tower model with what zero-shot scoring needs around it.

  ``model``/``variables``: ``flair.TwoTower`` and its weights (numpy); ``tokenizer`` and ``max_length``
  for the class prompts; ``prompt``: ``template``, ``domain_knowledge``, ``variant`` (the run's
  zero_shot evaluator, else FLAIR's); ``classes``: the run's zero-shot classes (may be empty);
  ``image_size``: the resolution it was trained at; ``source``: 'workdir', 'upstream' or 'training';
  ``description``: for messages.
  """

  model: Any
  variables: dict
  tokenizer: Any
  max_length: int
  prompt: dict
  classes: list
  image_size: int
  source: str
  description: str


def entry_config(entry: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A ``config.evals`` entry of type 'zero_shot' over its declared fields and defaults."""
  c = ml_collections.ConfigDict(dict(
      **entry_fields.split_entry_fields("zero_shot"),
      classes=[],  # the class names scored, in label order
      # The class prompts: the template's [CLS] slot filled with each class's domain-knowledge
      # descriptions (or its name), written as FLAIR's or KeepFIT's prompts ('flair' | 'keepfit').
      template=prompts.ZERO_SHOT_TEMPLATE, domain_knowledge=True, variant="flair",
      label_map=[],  # the dataset label of each class ([] = the class index)
  ))
  c.update(entry)
  return c


def prompt_of(evals: Mapping[str, Any] | None) -> tuple[dict, list[str]]:
  """``(prompt, classes)`` of the first ``zero_shot`` entry of a run's ``config.evals``: the template,
  domain knowledge and variant its class prompts are written with (FLAIR's when it has none)."""
  own = entry_config(next((cfg for cfg in (evals or {}).values() if cfg.get("type") == "zero_shot"), {}))
  prompt = dict(template=own.template or prompts.ZERO_SHOT_TEMPLATE, domain_knowledge=bool(own.domain_knowledge),
                variant=own.variant)
  return prompt, list(own.classes)


def prototypes_from_encoder(encode_texts: Callable, tokenizer, class_names: Sequence[str], *, template: str,
                            domain_knowledge: bool = True, variant: str = "flair", max_length: int = 77) -> jax.Array:
  """(K, proj_dim) prototypes, one per class name; ``encode_texts(input_ids, attention_mask)`` gives
  the (n, proj_dim) text embeddings."""
  protos = []
  for name in class_names:
    texts = prompts.class_prompts(name, template=template, domain_knowledge=domain_knowledge, variant=variant)
    tok = tokenizer(texts, max_length=max_length, padding="longest")
    emb = encode_texts(jnp.asarray(tok["input_ids"]), jnp.asarray(tok["attention_mask"]))
    protos.append(jnp.mean(emb, axis=0))
  return jnp.stack(protos)


def class_prototypes(model, variables, tokenizer, class_names: Sequence[str], *, template: str,
                     domain_knowledge: bool = True, variant: str = "flair", max_length: int = 77) -> jax.Array:
  """(K, proj_dim) prototypes of ``model`` (a ``flair.TwoTower``), one per class name."""
  encode = jax.jit(lambda v, ids, mask: model.apply(v, ids, mask, train=False, method=type(model).encode_text))
  return prototypes_from_encoder(lambda ids, mask: encode(variables, ids, mask), tokenizer, class_names,
                                 template=template, domain_knowledge=domain_knowledge, variant=variant,
                                 max_length=max_length)


def classification_summary(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict[str, float]:
  """Accuracy, ACA (mean per-class recall, FLAIR's balanced accuracy) and per-class recall."""
  out = {"accuracy": float(np.mean(labels == preds)) if labels.size else float("nan")}
  recalls = []
  for k in range(num_classes):
    sel = labels == k
    if sel.any():
      r = float(np.mean(preds[sel] == k))
      recalls.append(r)
      out[f"recall_{k}"] = r
  out["aca"] = float(np.mean(recalls)) if recalls else float("nan")
  out["chance"] = 1.0 / num_classes
  return out


class ZeroShotEvaluator:
  """Zero-shot accuracy of a two-tower model on a split (``config.evals.<name>``, see the module docstring).

  Args:
    cfg: the ``config.evals`` entry (its fields and defaults: ``entry_config``).
    mesh: batches are sharded over its data axes and gathered across processes.
    encode_images: ``(variables, images) -> (B, proj_dim)``, images float in [0, 1].
    encode_texts: ``(variables, input_ids, attention_mask) -> (n, proj_dim)``.
    tokenizer, max_length: how the class prompts are tokenised.
    data: the training config's ``data``: the dataset (name, data_dir, builder_kwargs) the entry's
      split is read from unless it names another, and the image size.
    batch_size: the default evaluation batch (the training batch).
  """

  def __init__(self, cfg, *, mesh, encode_images: Callable, encode_texts: Callable, tokenizer, max_length: int,
               data, batch_size: int):
    self.cfg = cfg = entry_config(cfg)
    self.mesh = mesh
    self.encode_images = encode_images
    self.encode_texts = jax.jit(encode_texts)
    self.tokenizer = tokenizer
    self.max_length = int(max_length)
    self.data = data
    self.classes = list(cfg.classes)
    batch = int(cfg.batch_size or batch_size)
    self.batch_size = batch - batch % distributed.num_data_shards(mesh)

  def run(self, variables, step: int) -> dict[str, Any]:
    """Metrics of ``variables`` (``step`` is not used: the evaluator writes no files)."""
    del step
    cfg, d = self.cfg, self.data
    source = pipeline.open_source(cfg.name or d.name, cfg.split, cfg.data_dir or d.data_dir,
                                  dict(cfg.builder_kwargs or d.builder_kwargs or {}))
    protos = prototypes_from_encoder(lambda ids, mask: self.encode_texts(variables, ids, mask), self.tokenizer,
                                     self.classes, template=cfg.template,
                                     domain_knowledge=cfg.domain_knowledge, variant=cfg.variant,
                                     max_length=self.max_length)
    scale = jnp.exp(flair.clamp_logit_scale(variables["params"]["logit_scale"]))
    encode_images = self.encode_images

    @jax.jit
    def predict(v, images):
      img = encode_images(v, images.astype(jnp.float32) / 255.0)
      return jnp.argmax(scale * img @ protos.T, axis=-1)

    labels, preds = [], []
    label_map = np.asarray(cfg.label_map or list(range(len(self.classes))))
    for batch in pipeline.labelled_batches(source, batch_size=self.batch_size, process_index=jax.process_index(),
                                           process_count=jax.process_count(), image_size=d.image_size):
      images = distributed.global_batch({"image": batch["image"]}, self.mesh)["image"]
      p = np.asarray(multihost_utils.process_allgather(predict(variables, images), tiled=True))
      mask = np.asarray(multihost_utils.process_allgather(batch["mask"], tiled=True))
      lab = np.asarray(multihost_utils.process_allgather(batch["label"], tiled=True))
      labels.append(label_map[lab[mask]])
      preds.append(p[mask])
    labels = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
    preds = np.concatenate(preds) if preds else np.zeros((0,), np.int64)
    out = classification_summary(labels, preds, len(self.classes))
    out["n"] = float(labels.size)
    return out

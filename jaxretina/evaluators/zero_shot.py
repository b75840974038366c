"""Zero-shot classification with FLAIR's text prototypes (docs/systems.md#flair-zero-shot-prototypes).

Each class name becomes its domain-knowledge descriptions wrapped in the prompt template; the
descriptions of one class are tokenised together (padded to the longest, as FLAIR does), encoded,
and averaged without re-normalisation into the class prototype. Scores are e^s·X·Pᵀ.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from jaxretina.evaluators import register
from jaxretina.models import flair
from jaxretina.train import distributed


def class_prototypes(model, variables, tokenizer, class_names: Sequence[str], *, template: str,
                     domain_knowledge: bool = True, variant: str = "flair", max_length: int = 77) -> jax.Array:
  """(K, proj_dim) prototypes, one per class name."""
  from jaxretina.text import prompts

  encode = jax.jit(lambda v, ids, mask: model.apply(v, ids, mask, train=False, method=type(model).encode_text))
  protos = []
  for name in class_names:
    texts = prompts.class_prompts(name, template=template, domain_knowledge=domain_knowledge, variant=variant)
    tok = tokenizer(texts, max_length=max_length, padding="longest")
    emb = encode(variables, jnp.asarray(tok["input_ids"]), jnp.asarray(tok["attention_mask"]))
    protos.append(jnp.mean(emb, axis=0))
  return jnp.stack(protos)


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


@register("zero_shot")
def zero_shot(task, variables, mesh, cfg) -> dict[str, Any]:
  """``cfg``: split, classes, template, domain_knowledge, variant, batch_size, [name, data_dir]."""
  from jaxretina.data import pipeline

  d = task.config.data
  classes = list(cfg.classes)
  source = pipeline.open_source(cfg.get("name") or d.name, cfg.split, cfg.get("data_dir") or d.data_dir,
                                dict(cfg.get("builder_kwargs") or d.get("builder_kwargs") or {}))
  protos = class_prototypes(task.model, variables, task.tokenizer, classes, template=cfg.template,
                            domain_knowledge=cfg.get("domain_knowledge", True), variant=cfg.get("variant", "flair"),
                            max_length=task.config.text.max_length)
  scale = jnp.exp(flair.clamp_logit_scale(variables["params"]["logit_scale"]))
  model = task.model

  @jax.jit
  def predict(v, images):
    img = model.apply(v, images.astype(jnp.float32) / 255.0, train=False, method=type(model).encode_image)
    return jnp.argmax(scale * img @ protos.T, axis=-1)

  batch_size = int(cfg.get("batch_size", task.global_batch_size))
  batch_size -= batch_size % distributed.num_data_shards(mesh)
  labels, preds = [], []
  label_map = np.asarray(cfg.get("label_map") or list(range(len(classes))))
  for batch in pipeline.labelled_batches(source, batch_size=batch_size, process_index=jax.process_index(),
                                         process_count=jax.process_count(), image_size=d.image_size):
    images = distributed.global_batch({"image": batch["image"]}, mesh)["image"]
    p = np.asarray(multihost_utils.process_allgather(predict(variables, images), tiled=True))
    mask = np.asarray(multihost_utils.process_allgather(batch["mask"], tiled=True))
    lab = np.asarray(multihost_utils.process_allgather(batch["label"], tiled=True))
    labels.append(label_map[lab[mask]])
    preds.append(p[mask])
  labels = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
  preds = np.concatenate(preds) if preds else np.zeros((0,), np.int64)
  out = classification_summary(labels, preds, len(classes))
  out["n"] = float(labels.size)
  return out

"""Supervised evaluation of the classification task: metrics, plots, heatmaps and attention-map IoU.

``config.evals.<name> = {type: 'classification', split, batch_size, heatmaps, cam_iou, ...}`` (the
fields and their defaults: ``entry_config``).
Over every example of the split (sharded over the mesh, gathered across hosts) it computes
``metrics.classification_metrics`` of the model's evaluation logits (DualAttendMed: the raw +
attention-crop average) and writes, under ``<workdir>/eval/<name>/step_<N>/``: ``metrics.json``
(everything, incl. per-class values, the confusion matrix and which metrics are undefined),
``confusion_matrix.png``, ``roc.png`` and ``heatmaps/<i>.png`` (for models that have attention maps:
the stored image at its resolution beside the attention over it, with a colour bar; the title gives
the true and the predicted class). The workdir may be a ``gs://`` URL (``jaxretina.fileio``).

``cam_iou`` (models with ``cam_features``): IoU between the model's eval attention map and a
class-activation map (docs/systems.md#dualattendmed-cam-iou-evaluation). Upstream's pseudo ground truth uses a fresh,
*untrained* linear head; here the head is a logistic regression fitted on the trained model's own
layer-4 GAP features of ``cam_fit_split`` (default: the training split, at most
``cam_fit_examples`` examples), and the CAM is that of the true label (see
``jaxretina.evaluators.cam``). ``cam_head='untrained'`` reproduces upstream.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxretina import fileio
from jaxretina.data import pipeline
from jaxretina.evaluators import cam
from jaxretina.evaluators import entry_fields
from jaxretina.evaluators import metrics as metrics_lib
from jaxretina.evaluators import plots
from jaxretina.train import distributed

SUMMARY_KEYS = ("accuracy", "aca", "kappa_quadratic", "kappa", "f1_macro", "auc_macro", "sensitivity_mean",
                "specificity_mean", "n")


def _gather(x) -> np.ndarray:
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def entry_config(entry: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A ``config.evals`` entry of type 'classification' over its declared fields and defaults."""
  c = ml_collections.ConfigDict(dict(
      **entry_fields.split_entry_fields("classification"),
      heatmaps=8,  # attention heatmaps written per evaluation (models with attention maps)
      name_in_workdir="",  # the reports' folder under <workdir>/eval/ ('' = 'classification')
      cam_iou=False,  # attention-map IoU against class-activation maps (models with cam_features)
      cam_fraction=0.2,  # the top fraction of each map that is compared
      cam_head="fitted",  # the CAM's head: 'fitted' on cam_fit_split, or upstream's 'untrained' one
      cam_seed=0,  # the untrained head's initialisation
      cam_fit_split="",  # '' = the training split
      cam_fit_examples=1024,
  ))
  c.update(entry)
  return c


class ClassificationEvaluator:
  """Metrics, plots and heatmaps of a classifier on a split (``config.evals.<name>``, see the module docstring).

  Args:
    cfg: the ``config.evals`` entry (its fields and defaults: ``entry_config``).
    workdir: reports go to ``<workdir>/eval/<name_in_workdir or 'classification'>/step_<N>/``; None
      writes nothing.
    mesh: batches are sharded over its data axes and gathered across processes.
    predict: ``(variables, uint8 batch) -> {'logits', ['attention'], ['logits_<field>']}``.
    open_split: ``(split, name, data_dir, builder_kwargs) -> record source`` (the training data's
      label subset applied).
    fields: image modality -> channels, in model order.
    class_names: one per class.
    image_size: the loader's resize; crop_size: the model's centre crop of it (None: none).
    batch_size: the default evaluation batch (the training batch).
    train_split: the split the CAM head is fitted on unless ``cam_fit_split`` names another.
    cam_features: ``(variables, uint8 batch) -> (B, h, w, C)`` for models that have them (``cam_iou``).
    eval_loss: ``(predict outputs, labels) -> (B,)`` per-example loss, for models that define one.
  """

  def __init__(self, cfg, *, workdir: str | None, mesh, predict: Callable, open_split: Callable,
               fields: Mapping[str, int], class_names: Sequence[str], image_size: int, crop_size: int | None,
               batch_size: int, train_split: str, cam_features: Callable | None = None,
               eval_loss: Callable | None = None):
    self.cfg = cfg = entry_config(cfg)
    self.workdir = workdir
    self.mesh = mesh
    self.predict = predict
    self.open_split = open_split
    self.fields = dict(fields)
    self.class_names = list(class_names)
    self.num_classes = len(self.class_names)
    self.image_size = int(image_size)
    self.crop_size = crop_size
    self.train_split = train_split
    self.cam_features = cam_features
    self.eval_loss = eval_loss
    shards = distributed.num_data_shards(mesh)
    batch = int(cfg.batch_size or batch_size)
    self.batch_size = max(batch - batch % shards, shards)

  def _run(self, variables, source, fn, limit: int | None = None) -> dict[str, np.ndarray]:
    """Applies jitted ``fn(variables, batch)`` over ``source``; returns the gathered outputs of real rows."""
    collected: dict[str, list[np.ndarray]] = {}
    seen = 0
    for batch in pipeline.labelled_batches(source, batch_size=self.batch_size, process_index=jax.process_index(),
                                           process_count=jax.process_count(), image_size=self.image_size,
                                           fields=self.fields, num_classes=self.num_classes):
      # "index" (record index, −1 for padding) keys augment_eval_splits' draws; models ignore it.
      inputs = distributed.global_batch({k: batch[k] for k in (*self.fields, "label", "index")}, self.mesh)
      out = fn(variables, inputs)
      mask = _gather(batch["mask"])
      rows = {"label": _gather(batch["label"])[mask], "index": _gather(batch["index"])[mask]}
      rows.update({k: _gather(v)[mask] for k, v in out.items()})
      for k, v in rows.items():
        collected.setdefault(k, []).append(v)
      seen += int(mask.sum())
      if limit is not None and seen >= limit:
        break
    return {k: np.concatenate(v) for k, v in collected.items()}

  def run(self, variables, step: int) -> dict[str, Any]:
    """Summary metrics of ``variables``; the reports go under ``step_<step>``."""
    cfg = self.cfg
    source = self.open_split(cfg.split, cfg.name, cfg.data_dir, cfg.builder_kwargs)
    want_cam = bool(cfg.cam_iou) and self.cam_features is not None
    want_loss = self.eval_loss is not None
    cam_weights = self._cam_head(variables) if want_cam else None
    predict, cam_features, eval_loss = self.predict, self.cam_features, self.eval_loss

    def evaluate_batch(v, batch):
      out = predict(v, batch)
      result = {"probs": jax.nn.softmax(out["logits"].astype(jnp.float32), axis=-1)}
      if "attention" in out:
        result["attention"] = out["attention"]
      for key, value in out.items():  # CRD-Net's single-modality heads: logits_<field>
        if key.startswith("logits_") and key != "logits_raw":
          result["probs_" + key[len("logits_"):]] = jax.nn.softmax(value.astype(jnp.float32), axis=-1)
      if want_loss:  # the classifier's own evaluation loss per example (FCN-CLIP's validation loss)
        result["loss"] = eval_loss(out, batch["label"]).astype(jnp.float32)
      if want_cam:
        # The pseudo ground truth: the CAM of the true label under the fitted (or untrained) head.
        features = cam_features(v, batch)
        result["cam"] = jax.nn.relu(jnp.einsum("bhwc,cb->bhw", features.astype(jnp.float32),
                                               cam_weights[:, batch["label"]]))
      return result

    out = self._run(variables, source, jax.jit(evaluate_batch))
    labels, probs = out["label"], out["probs"]
    results = metrics_lib.classification_metrics(labels, probs, self.num_classes, class_names=self.class_names)
    heads = {key[len("probs_"):]: metrics_lib.classification_metrics(labels, value, self.num_classes)
             for key, value in out.items() if key.startswith("probs_")}
    if heads:
      results["heads"] = heads
    if want_loss:
      # The mean over examples (upstream averages batch means; equal up to a smaller last batch).
      results["loss"] = float(np.mean(out["loss"]))
    if want_cam:
      ious = np.asarray(cam.attention_iou(out["attention"], out["cam"],
                                          fraction=float(cfg.cam_fraction)))
      results.update(cam_iou_mean=float(np.mean(ious)), cam_iou_std=float(np.std(ious)),
                     cam_iou_per_image=ious.tolist(), cam_head=cfg.cam_head)

    name = cfg.name_in_workdir or "classification"
    if self.workdir and jax.process_index() == 0:
      out_dir = fileio.join(self.workdir, "eval", name, f"step_{step}")
      self._write_outputs(out_dir, source, results, labels, probs, out["index"], out.get("attention"),
                          int(cfg.heatmaps))
      results["output_dir"] = out_dir
    summary = {k: float(results[k]) for k in (*SUMMARY_KEYS, "loss") if k in results}
    summary.update({k: float(results[k]) for k in ("cam_iou_mean", "cam_iou_std") if k in results})
    for head, head_results in results.get("heads", {}).items():
      summary[f"{head}_head/accuracy"] = float(head_results["accuracy"])
    summary["chance"] = 1.0 / self.num_classes
    return summary

  def _cam_head(self, variables) -> jax.Array:
    """(C, K) weights of the CAM head: fitted on GAP features of ``cam_fit_split``, or upstream's untrained one."""
    cfg = self.cfg
    if cfg.cam_head == "untrained":
      # Only the feature width C matters here: the shapes of one loader batch give it without data.
      s = self.image_size
      batch = {name: jax.ShapeDtypeStruct((2, s, s, ch), jnp.uint8) for name, ch in self.fields.items()}
      probe = jax.eval_shape(self.cam_features, variables, batch)
      weights, _ = cam.untrained_head(jax.random.PRNGKey(int(cfg.cam_seed)), probe.shape[-1],
                                      self.num_classes)
      return jnp.asarray(weights, jnp.float32)
    fit_source = self.open_split(cfg.cam_fit_split or self.train_split)
    cam_features = self.cam_features
    gap = jax.jit(lambda v, b: {"gap": jnp.mean(cam_features(v, b), axis=(1, 2))})
    fit = self._run(variables, fit_source, gap, limit=int(cfg.cam_fit_examples))
    weights, _ = cam.fit_linear_head(fit["gap"], fit["label"], self.num_classes)
    return jnp.asarray(weights, jnp.float32)

  def _write_outputs(self, out_dir, source, results, labels, probs, indices, attention, num_heatmaps) -> None:
    fileio.write_text(fileio.join(out_dir, "metrics.json"), json.dumps(_jsonable(results), indent=2))
    cm = np.asarray(results["confusion_matrix"])
    plots.save_confusion_matrix_png(cm, self.class_names, fileio.join(out_dir, "confusion_matrix.png"))
    plots.save_roc_png(labels, probs, self.class_names, fileio.join(out_dir, "roc.png"))
    if attention is None or num_heatmaps <= 0:
      return
    field, channels = next(iter(self.fields.items()))
    preds = np.argmax(probs, axis=-1)
    for i in range(min(num_heatmaps, len(labels))):
      # The record as stored (its own resolution); the model saw it resized to image_size², then the
      # evaluation centre crop — the box of the record that the attention map covers.
      image = pipeline.read_image(source, int(indices[i]), field, channels)
      height, width = image.shape[:2]
      seen = self.crop_size / self.image_size if self.crop_size else 1.0
      box = (height * (1 - seen) / 2, width * (1 - seen) / 2, height * seen, width * seen)
      true, pred = self.class_names[int(labels[i])], self.class_names[int(preds[i])]
      title = f"record {int(indices[i])}: true {true}, predicted {pred} ({float(probs[i, preds[i]]):.2f})"
      plots.save_heatmap_png(image, np.asarray(attention[i], np.float32),
                             fileio.join(out_dir, "heatmaps",
                                         f"{int(indices[i]):05d}_true-{_slug(true)}_pred-{_slug(pred)}.png"),
                             box=box, title=title)


def _slug(name: str) -> str:
  return "".join(c if c.isalnum() else "_" for c in name)[:40]


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return _jsonable(value.tolist())
  if isinstance(value, (np.floating, float)):
    return None if not np.isfinite(value) else float(value)
  if isinstance(value, np.integer):
    return int(value)
  return value

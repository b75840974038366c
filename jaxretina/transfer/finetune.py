"""FLAIR's full-network fine-tuning (``transferability/modeling/finetuning.py: FineTuning``, method ``FT``).

The vision encoder (any Flax module mapping (B, S, S, 3) images in [0, 1] to (B, D) features — for
FLAIR the ``VisionModel``, i.e. projected and normalised 512-d features when ``project_features``,
raw pooled features otherwise) gets a linear classifier ``head`` and the whole network is trained:

* Head: ``Linear(D → K)`` with torch's default init, or initialised from a fitted linear probe
  (method names containing ``LP``): the probe's ``coef``/``intercept`` are copied in. scikit-learn
  (and ``linear_probe.fit``) stores ONE row for two classes; upstream copies that (1, D) matrix as is,
  so a binary LP-initialised head has a single logit z trained with BCE-with-logits and predicted as
  ``[1 − σ(z), σ(z)]``. Here that head returns the logits ``[0, z]``: their softmax is exactly
  ``[1 − σ(z), σ(z)]`` and their cross-entropy exactly BCE-with-logits, so one loss serves every head.
* Optimiser: torch ``AdamW(model.parameters(), lr=1e-4, eps=1e-4)`` (weight decay 0.01, betas
  (0.9, 0.999)) over ALL parameters — upstream's ``freeze_weights`` knows only the architecture names
  "resnet"/"efficientnet", never FLAIR's "resnet_v1", so nothing is frozen. No learning-rate schedule.
  Gradients are clipped to global norm 1 (``clip_grad_norm_``; torch divides by ``norm + 1e-6``,
  optax by ``norm`` — a 1e-6 relative difference on clipped steps).
* Loop: 50 epochs (``main_transferability.py --epochs``), batch 4 (``--batch_size``), the training
  loader reshuffled every epoch with ``drop_last=False``; BatchNorm in train mode (``--update_bn True``:
  batch statistics, running statistics updated with torch's momentum) and eval mode for validation
  and test. The last, smaller batch is run at its own size (a second compilation), so its batch
  statistics are those of its real samples as in torch, never diluted by padding.
* Model selection (``--save_best True --patience 10``): after each epoch the validation macro F1
  (FLAIR's ``f1_avg``: mean one-vs-rest F1 over the classes present in the labels, predictions =
  arg-max) in eval mode; strictly better epochs are kept; training stops once ``patience`` epochs in
  a row did not improve, and the best weights are returned.
* Test predictions: eval mode, softmax of the logits (``FineTuned.predict_proba``).

Deviations from upstream, all where upstream cannot run or where the port changes only precision:

* Mixed precision: upstream trains under ``torch.cuda.amp.autocast`` with a ``GradScaler``; this
  port trains in float32 (no loss scaling needed, no skipped steps).
* Without a validation split upstream's ``save_best`` path loads its empty ``best_state_dict`` and
  crashes; here the last epoch's weights are returned (``best_epoch`` = the last epoch).
* Upstream starts the best F1 at 0.0, so an epoch scoring exactly 0 is never kept (and a run that
  never beats 0 crashes the same way); here the first epoch is always a candidate.
* Upstream switches to sigmoid + BCE whenever the head is LP-initialised (its test
  ``if classifier.weight.shape[0]:`` is always true) — for K > 2 the BCE shape check then raises.
  The intended test is a one-row (binary) head, which is what this port implements.

Upstream options not ported: ``fta`` (kornia augmentation of training batches), ``freeze_classifier``,
``last_lp`` and the segmentation task.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxretina.evaluators import metrics as metrics_lib
from jaxretina.models import layers
from jaxretina.train import distributed
from jaxretina.transfer import linear_probe

__all__ = ["FineTuneClassifier", "FineTuned", "encoder_features", "finetune", "fit_probe_head"]

# main_transferability.py's fine-tuning defaults.
UPSTREAM_EPOCHS = 50
UPSTREAM_BATCH_SIZE = 4
UPSTREAM_PATIENCE = 10
_EVAL_BATCH_SIZE = 32


class FineTuneClassifier(nn.Module):
  """``encoder`` → ``Linear`` classifier named ``head``.

  Attributes:
    encoder: images (B, S, S, 3) in [0, 1] → features (B, D); called with ``train=``.
    num_classes: K.
    single_logit: a one-row head (a binary probe's layout, K must be 2) whose logit z is returned
      as the two logits ``[0, z]`` (softmax = ``[1 − σ(z), σ(z)]``).
  """

  encoder: nn.Module
  num_classes: int
  single_logit: bool = False

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
    """(B, S, S, 3) in [0, 1] → (B, K) logits."""
    if self.single_logit and self.num_classes != 2:
      raise ValueError(f"FineTuneClassifier: single_logit needs num_classes=2, got {self.num_classes}")
    feats = self.encoder(images, train=train)
    if feats.ndim != 2:
      raise ValueError(f"FineTuneClassifier: the encoder must return (B, D) features, got shape {feats.shape}")
    z = layers.Linear(1 if self.single_logit else self.num_classes, name="head")(feats)
    if self.single_logit:
      z = jnp.concatenate([jnp.zeros_like(z), z], axis=-1)
    return z


# ------------------------------------------------------------------------------------------- helpers


def _as_float_images(images: jax.Array) -> jax.Array:
  """uint8 → /255; floats pass through as float32 (validated on the host)."""
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def _check_images(images: Any, name: str, like: np.ndarray | None = None, where: str = "finetune") -> np.ndarray:
  """(N, S, S, 3) uint8 as is, or float32 checked to lie in [0, 1]; errors name ``where`` and ``name``."""
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] == 0:
    raise ValueError(f"{where}: {name} must be (N, S, S, 3) with N > 0, got shape {x.shape}")
  if like is not None and x.shape[1:] != like.shape[1:]:
    raise ValueError(f"{where}: {name} images are {x.shape[1:]}, the training images {like.shape[1:]}")
  if x.dtype == np.uint8:
    return x
  if x.dtype.kind != "f":
    raise ValueError(f"{where}: {name} must be uint8 or float in [0, 1], got dtype {x.dtype}")
  lo, hi = float(np.min(x)), float(np.max(x))
  if not (np.isfinite(lo) and np.isfinite(hi) and lo >= 0.0 and hi <= 1.0):
    raise ValueError(f"{where}: float {name} must lie in [0, 1] (uint8 is divided by 255), got range [{lo}, {hi}]")
  return x.astype(np.float32, copy=False)


def _check_labels(labels: Any, n: int, num_classes: int, name: str) -> np.ndarray:
  y = np.asarray(labels)
  if y.shape != (n,) or y.dtype.kind not in "iu":
    raise ValueError(f"finetune: {name} must be ({n},) integers, got shape {y.shape} dtype {y.dtype}")
  if y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f"finetune: {name} must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
  return y.astype(np.int32)


def _data_shards(mesh) -> int:
  if mesh is None:
    return 1
  if "data" not in mesh.axis_names:
    raise ValueError(f"finetune: mesh must have a 'data' axis, got axes {mesh.axis_names}")
  return distributed.num_data_shards(mesh)


def _put_batch(x: np.ndarray, mesh) -> jax.Array:
  """A batch sharded over the mesh's data axes when its size divides, else replicated (a short
  last batch) — both give the same global computation."""
  if mesh is None:
    return jnp.asarray(x)
  if x.shape[0] % distributed.num_data_shards(mesh) == 0:
    return jax.device_put(x, distributed.batch_sharding(mesh))
  return jax.device_put(x, distributed.replicated(mesh))


def _batched_eval(apply_fn: Callable[[Any, jax.Array], jax.Array], variables: Any, images: np.ndarray,
                  batch_size: int, mesh=None) -> jax.Array:
  """``apply_fn(variables, batch)`` over fixed-size batches (the last zero-padded: eval mode treats
  rows independently), concatenated → (N, ...)."""
  n = images.shape[0]
  outputs = []
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    real = chunk.shape[0]
    if real < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - real,) + chunk.shape[1:], chunk.dtype)])
    outputs.append(apply_fn(variables, _put_batch(chunk, mesh))[:real])
  return jnp.concatenate(outputs, axis=0)


@functools.partial(jax.jit, static_argnums=0)
def _eval_logits(module: nn.Module, variables: Any, images: jax.Array) -> jax.Array:
  """Eval-mode ``module`` output; jitted once per (module, shapes), shared by every call."""
  return module.apply(variables, _as_float_images(images), train=False)


def encoder_features(encoder: nn.Module, encoder_variables: dict, images: Any, *, batch_size: int = _EVAL_BATCH_SIZE,
                     mesh=None) -> jax.Array:
  """Eval-mode features (N, D) of (N, S, S, 3) uint8 / [0, 1] images, as FLAIR's
  ``extract_vision_features`` (``model.eval()``)."""
  x = _check_images(images, "images", where="encoder_features")
  shards = _data_shards(mesh)
  batch_size = -(-int(batch_size) // shards) * shards
  return _batched_eval(functools.partial(_eval_logits, encoder), encoder_variables, x, batch_size, mesh)


def fit_probe_head(encoder: nn.Module, encoder_variables: dict, images: Any, labels: Any, *,
                   batch_size: int = _EVAL_BATCH_SIZE, mesh=None, **probe_kwargs) -> linear_probe.LinearProbe:
  """The LP initialisation of upstream's ``LP`` fine-tuning methods: ``linear_probe.fit`` (FLAIR's
  settings unless ``probe_kwargs`` says otherwise) on the eval-mode training features."""
  feats = encoder_features(encoder, encoder_variables, images, batch_size=batch_size, mesh=mesh)
  return linear_probe.fit(np.asarray(feats), np.asarray(labels), **probe_kwargs)


def _probe_head_params(probe: linear_probe.LinearProbe, num_classes: int, feature_dim: int) -> tuple[dict, bool]:
  """``head`` params {kernel (D, R), bias (R,)} from a fitted probe, and whether it is one-row."""
  if not isinstance(probe, linear_probe.LinearProbe):
    raise TypeError(f"finetune: head_init must be a linear_probe.LinearProbe, got {type(probe).__name__}")
  if tuple(probe.classes) != tuple(range(num_classes)):
    raise ValueError(f"finetune: head_init was fitted on classes {list(probe.classes)}; fine-tuning needs "
                     f"0..{num_classes - 1} (every class present in the probe's training labels)")
  coef = jnp.asarray(probe.coef, jnp.float32)
  rows = 1 if num_classes == 2 else num_classes
  if coef.shape != (rows, feature_dim) or probe.intercept.shape != (rows,):
    raise ValueError(f"finetune: head_init coef {coef.shape} / intercept {probe.intercept.shape} do not match "
                     f"({rows}, {feature_dim}) for {num_classes} classes and the encoder's {feature_dim}-d features")
  return {"kernel": coef.T, "bias": jnp.asarray(probe.intercept, jnp.float32)}, rows == 1


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  return jnp.mean(nll)


def _optimizer(lr: float, eps: float, weight_decay: float, clip_norm: float) -> optax.GradientTransformation:
  """``clip_grad_norm_(clip_norm)`` then torch ``AdamW`` (eps outside the sqrt, decoupled decay lr·λ·p)."""
  return optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(lr, b1=0.9, b2=0.999, eps=eps, weight_decay=weight_decay))


@functools.partial(jax.jit, static_argnames=("module", "hyper", "train_mode", "out_sharding"))
def _train_step(variables, opt_state, images, labels, rng, *, module, hyper, train_mode, out_sharding):
  """One optimiser step on one batch → (variables, opt_state, mean CE). Jitted once per module,
  hyper-parameters and batch shape, so folds and repeated runs reuse the compilation."""
  params = variables["params"]
  others = {k: v for k, v in variables.items() if k != "params"}
  update_stats = train_mode and "batch_stats" in others

  def loss_fn(params, others):
    v = {**others, "params": params}
    x = _as_float_images(images)
    if update_stats:
      logits, updates = module.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": rng})
      others = {**others, "batch_stats": updates["batch_stats"]}
    else:
      logits = module.apply(v, x, train=train_mode, rngs={"dropout": rng})
    return _cross_entropy(logits, labels), others

  (loss, others), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, others)
  optimizer = _optimizer(*hyper)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  out = ({**others, "params": optax.apply_updates(params, updates)}, opt_state, loss)
  if out_sharding is not None:
    out = jax.lax.with_sharding_constraint(out, out_sharding)
  return out


def _macro_f1(labels: np.ndarray, probs: np.ndarray) -> float:
  """FLAIR's selection criterion ``f1_avg``."""
  return float(metrics_lib.flair_metrics(labels, probs)["f1_avg"])


# ---------------------------------------------------------------------------------------------- API


@flax.struct.dataclass
class FineTuned:
  """A fine-tuned encoder + head.

  Attributes:
    variables: {'params': {'encoder', 'head'}, 'batch_stats': {'encoder'}} (batch_stats only when the
      encoder has them).
    history: per epoch run (early stopping shortens it): ``train_loss`` (mean of the batch losses, as
      upstream prints) and ``val_f1`` (NaN without a validation split), numpy arrays.
    best_epoch: index into ``history`` of the returned weights (−1: no epoch was run).
    module: the ``FineTuneClassifier``.
  """

  variables: Any
  history: Any
  best_epoch: int = flax.struct.field(pytree_node=False)
  module: Any = flax.struct.field(pytree_node=False)

  def logits(self, images: Any, batch_size: int = _EVAL_BATCH_SIZE) -> jax.Array:
    """(N, S, S, 3) uint8 or float in [0, 1] → (N, K) logits, eval mode, in batches of ``batch_size``."""
    x = _check_images(images, "images", where="FineTuned.logits")
    return _batched_eval(functools.partial(_eval_logits, self.module), self.variables, x, int(batch_size))

  def predict_proba(self, images: Any, batch_size: int = _EVAL_BATCH_SIZE) -> jax.Array:
    """(N, K) softmax probabilities (``[1 − σ(z), σ(z)]`` for a one-row binary head)."""
    return jax.nn.softmax(self.logits(images, batch_size), axis=-1)


def finetune(key: jax.Array, encoder: nn.Module, encoder_variables: dict, train_images: Any, train_labels: Any,
             num_classes: int, *, val_images: Any = None, val_labels: Any = None, epochs: int = UPSTREAM_EPOCHS,
             batch_size: int = UPSTREAM_BATCH_SIZE, lr: float = 1e-4, eps: float = 1e-4, weight_decay: float = 0.01,
             clip_norm: float = 1.0, patience: int | None = UPSTREAM_PATIENCE,
             head_init: linear_probe.LinearProbe | None = None, update_bn: bool = True, mesh=None,
             log: Callable[[str], Any] | None = print) -> FineTuned:
  """Fine-tunes ``encoder`` + a linear head on a labelled image set as FLAIR's ``FineTuning``.

  Args:
    key: PRNG key: the head's torch-default init, each epoch's shuffle, and any ``'dropout'`` rng.
    encoder: images (B, S, S, 3) float32 in [0, 1] → (B, D), called as ``apply(v, x, train=bool)``.
    encoder_variables: its ``params`` and, if it has BatchNorm, ``batch_stats``.
    train_images: (N, S, S, 3) uint8 (divided by 255) or float in [0, 1]; train_labels: (N,) ints in [0, K).
    num_classes: K ≥ 2.
    val_images, val_labels: the model-selection split (both or neither).
    epochs, batch_size, lr, eps, weight_decay, clip_norm: upstream 50, 4, 1e-4, 1e-4, 0.01, 1.
    patience: epochs without a validation improvement before stopping (upstream 10); None: never stop
      early (the best epoch is still returned).
    head_init: a fitted ``linear_probe.LinearProbe`` on the encoder's features (classes 0..K−1) to
      initialise the head (upstream's ``LP`` methods); see ``fit_probe_head``.
    update_bn: BatchNorm in train mode while training (upstream ``--update_bn``, default True); False
      keeps it (and every other train-only behaviour) in eval mode, as upstream's ``model.eval()``.
    mesh: optional ``Mesh`` with a 'data' axis; batches are split over it (``batch_size`` must divide),
      parameters replicated.
    log: called with one line per epoch; None for silence.
  Returns:
    ``FineTuned`` with the selected weights.
  """
  if int(num_classes) < 2:
    raise ValueError(f"finetune: num_classes={num_classes!r} must be at least 2")
  num_classes = int(num_classes)
  x_train = _check_images(train_images, "train_images")
  y_train = _check_labels(train_labels, x_train.shape[0], num_classes, "train_labels")
  if (val_images is None) != (val_labels is None):
    raise ValueError("finetune: pass both val_images and val_labels, or neither")
  has_val = val_images is not None
  if has_val:
    x_val = _check_images(val_images, "val_images", like=x_train)
    y_val = _check_labels(val_labels, x_val.shape[0], num_classes, "val_labels")
  if int(epochs) < 0:
    raise ValueError(f"finetune: epochs={epochs!r} must be non-negative")
  if int(batch_size) < 1:
    raise ValueError(f"finetune: batch_size={batch_size!r} must be at least 1")
  if patience is not None and int(patience) < 1:
    raise ValueError(f"finetune: patience={patience!r} must be at least 1 (or None)")
  batch_size = int(batch_size)
  shards = _data_shards(mesh)
  if batch_size % shards:
    raise ValueError(f"finetune: batch_size={batch_size} must be divisible by the {shards} data shards of the "
                     f"mesh {dict(mesh.shape)}")
  if not isinstance(encoder_variables, dict) or "params" not in encoder_variables:
    raise ValueError("finetune: encoder_variables must be a dict with 'params' (and 'batch_stats' if the encoder "
                     f"has BatchNorm), got {type(encoder_variables).__name__}"
                     + (f" with keys {sorted(encoder_variables)}" if isinstance(encoder_variables, dict) else ""))

  init_key, shuffle_key, dropout_key = jax.random.split(key, 3)
  probe_x = jnp.zeros((1,) + x_train.shape[1:], jnp.float32)
  feats = jax.eval_shape(lambda v, x: encoder.apply(v, x, train=False), encoder_variables, probe_x)
  if len(feats.shape) != 2:
    raise ValueError(f"finetune: the encoder must return (B, D) features, got shape {feats.shape}")
  feature_dim = int(feats.shape[-1])
  if head_init is None:
    single_logit = False
    head_params = layers.Linear(num_classes).init(init_key, jnp.zeros((1, feature_dim)))["params"]
  else:
    head_params, single_logit = _probe_head_params(head_init, num_classes, feature_dim)
  module = FineTuneClassifier(encoder=encoder, num_classes=num_classes, single_logit=single_logit)

  variables = {col: {"encoder": tree} for col, tree in encoder_variables.items()}
  variables["params"] = {"encoder": encoder_variables["params"], "head": head_params}
  variables = jax.tree.map(jnp.asarray, variables)
  if mesh is not None:
    variables = jax.device_put(variables, distributed.replicated(mesh))

  hyper = (float(lr), float(eps), float(weight_decay), float(clip_norm))
  opt_state = _optimizer(*hyper).init(variables["params"])
  out_sharding = None if mesh is None else distributed.replicated(mesh)
  train_step = functools.partial(_train_step, module=module, hyper=hyper, train_mode=bool(update_bn),
                                 out_sharding=out_sharding)
  eval_apply = functools.partial(_eval_logits, module)

  n = x_train.shape[0]
  steps = -(-n // batch_size)
  best_f1, best_epoch, best_variables, since_best = -np.inf, -1, variables, 0
  train_loss, val_f1 = [], []
  for epoch in range(int(epochs)):
    order = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), n))
    epoch_rng = jax.random.fold_in(dropout_key, epoch)
    losses = []
    for step in range(steps):
      idx = order[step * batch_size:(step + 1) * batch_size]
      variables, opt_state, loss = train_step(variables, opt_state, _put_batch(x_train[idx], mesh),
                                              _put_batch(y_train[idx], mesh), jax.random.fold_in(epoch_rng, step))
      losses.append(loss)
    train_loss.append(float(jnp.mean(jnp.stack(losses))))

    if has_val:
      probs = jax.nn.softmax(_batched_eval(eval_apply, variables, x_val, batch_size, mesh), axis=-1)
      f1 = _macro_f1(y_val, np.asarray(probs))
    else:
      f1 = float("nan")
    val_f1.append(f1)
    if log is not None:
      log(f"finetune epoch {epoch + 1}/{epochs}: train loss {train_loss[-1]:.5f}"
          + (f", val macro F1 {f1:.4f}" if has_val else ""))

    if not has_val:
      best_epoch, best_variables = epoch, variables
      continue
    if f1 > best_f1:
      best_f1, best_epoch, best_variables, since_best = f1, epoch, variables, 0
    else:
      since_best += 1
    if patience is not None and since_best >= int(patience):
      if log is not None:
        log(f"finetune: no improvement for {since_best} epochs, stopping; best epoch {best_epoch + 1}")
      break

  history = {"train_loss": np.asarray(train_loss, np.float32), "val_f1": np.asarray(val_f1, np.float32)}
  return FineTuned(variables=best_variables, history=history, best_epoch=best_epoch, module=module)

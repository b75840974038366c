"""FLAIR's vision-language adapters on frozen image features (``transferability/modeling/adapters.py``).

All methods score unit image features X (N, d) against the class text prototypes P (K, d) of
``flair.text_prototypes`` / ``zero_shot.class_prototypes``; ``logit_scale`` is the model's log-temperature
parameter, exponentiated without a clamp as upstream's adapters do.

* Zero-shot: ``exp(s)·X·Pᵀ``.
* CLIP-Adapter: ``A = ReLU ∘ Linear(d/4→d) ∘ ReLU ∘ Linear(d→d/4)`` (no biases, torch default init);
  ``X' = normalise(0.2·A(X) + 0.8·X)``; logits ``exp(s)·X'·Pᵀ``; trained with CE.
* Tip-Adapter: cache keys K = training features (N, d), values V = one-hot labels (N, K);
  logits ``c·X·Pᵀ + α·exp(−(β − β·X·Kᵀ))·V`` with c = 100, β = 5, α = 1 (upstream's constants; no
  search over α, β). c is CLIP's temperature, not the model's exp(s): with exp(s) < 100 the zero-shot
  term is sharper than the model's own zero-shot logits, while the cache's class sums are at most the
  shots per class, so with few shots Tip-Adapter stays near zero-shot (KeepFIT's FLAIR row on
  ODIR200×3: 0.403–0.422 ACA at 1–10 shots, zero-shot 0.403).
* Tip-Adapter-f: the same with the keys learned, initialised from the cache.

Training follows upstream: 40 epochs, one sample per step in a fixed order shuffled once with
Python's ``random`` (seed 42 here), AdamW(lr 1e-3, eps 1e-4, weight decay 0.01); CLIP-Adapter anneals
the rate with a per-step cosine over epochs·steps, Tip-Adapter-f keeps it constant. One epoch is one
jitted ``lax.scan`` over its steps; ``batch_size`` > 1 groups consecutive samples of the same order
(the last batch masked when it is short).

Upstream's order is drawn from the global Python generator, which ``main_transferability`` last
seeded through the fold's split, and its features arrive in a torch-shuffled loader order; neither is
recoverable from features alone, so the order is explicit here (``order=`` or ``order_seed=``).

Upstream quirks, behind flags whose defaults are the intended behaviour:

* ``tip_f_train_test_mismatch`` (``fit_tip_adapter_f``): upstream trains Tip-Adapter-f on
  ``exp(s)·x·Pᵀ + α·exp(s)·φ(x·Kᵀ)·V / N`` but predicts with ``100·X·Pᵀ + α·φ(X·Kᵀ)·V``. The Tip-Adapter
  paper (Zhang et al., ECCV 2022) fine-tunes and predicts with one formula, the inference one;
  default False trains on it.
* ``tip_f_inputs_track_keys`` (``fit_tip_adapter_f``): upstream's learnable key matrix shares storage
  with the cache it reads its training inputs from, so every optimizer step also moves the inputs
  (no gradient flows through them). The paper's inputs are the fixed training features; default False.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxretina.models import layers

__all__ = [
    "ClipAdapter",
    "FittedClipAdapter",
    "TipAdapter",
    "fit_clip_adapter",
    "fit_tip_adapter",
    "fit_tip_adapter_f",
    "sample_order",
    "stack_augmented",
    "tip_adapter_logits",
    "zero_shot_logits",
    "zero_shot_proba",
]

# Upstream's Tip-Adapter constants (``TipAdapter.__init__`` and its hard-coded CLIP scale).
TIP_BETA = 5.0
TIP_ALPHA = 1.0
TIP_CLIP_SCALE = 100.0


# ------------------------------------------------------------------------------------------- helpers


def _check_features(features: Any, dim: int | None, where: str) -> jax.Array:
  """(N, d) or, for test-time augmentation, (A, N, d) float features."""
  x = jnp.asarray(features)
  if x.ndim not in (2, 3) or (dim is not None and x.shape[-1] != dim):
    want = "d" if dim is None else str(dim)
    raise ValueError(f"{where}: expected features (N, {want}) or (A, N, {want}), got shape {x.shape}")
  return x.astype(jnp.float32)


def _tta_mean(logits_fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
  """Per-pass logits averaged over the augmentation axis when ``x`` is (A, N, d) (upstream ``tta``)."""
  return jnp.mean(jax.vmap(logits_fn)(x), axis=0) if x.ndim == 3 else logits_fn(x)


def _check_training_set(features: Any, labels: Any, prototypes: Any, where: str):
  p = jnp.asarray(prototypes, jnp.float32)
  if p.ndim != 2:
    raise ValueError(f"{where}: prototypes must be (K, d), got shape {p.shape}")
  x = np.asarray(features, np.float32)
  y = np.asarray(labels)
  if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != p.shape[1]:
    raise ValueError(f"{where}: features must be (N, {p.shape[1]}) with N > 0 to match prototypes {p.shape}, "
                     f"got {x.shape}")
  if y.shape != (x.shape[0],) or y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= p.shape[0]:
    raise ValueError(f"{where}: labels must be ({x.shape[0]},) integers in [0, {p.shape[0]}), got shape {y.shape} "
                     f"dtype {y.dtype}" + (f" range [{y.min()}, {y.max()}]" if y.size and y.dtype.kind in "iu" else ""))
  return jnp.asarray(x), jnp.asarray(y, jnp.int32), p


def sample_order(n: int, seed: int = 42) -> np.ndarray:
  """The fixed training order: ``random.shuffle`` of 0..n−1 after ``random.seed(seed)``.

  Same Mersenne Twister calls as upstream's ``random.shuffle(np.arange(n))`` on a private generator.
  """
  order = list(range(int(n)))
  random.Random(seed).shuffle(order)
  return np.asarray(order, np.int32)


def stack_augmented(features: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
  """Feature augmentation (``fta``): A augmented passes (A, N, d) with their labels (A, N) or (N,) →
  (A·N, d), (A·N,), pass-major as upstream concatenates them."""
  x = np.asarray(features)
  y = np.asarray(labels)
  if x.ndim != 3 or y.shape not in ((x.shape[1],), x.shape[:2]):
    raise ValueError(f"stack_augmented: expected features (A, N, d) and labels (N,) or (A, N), got {x.shape} and "
                     f"{y.shape}")
  y = np.broadcast_to(y, x.shape[:2])
  return x.reshape(-1, x.shape[-1]), y.reshape(-1)


def _cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean CE over the real (mask = 1) samples of a batch."""
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _batched_order(order: Any, n: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
  """(steps, B) sample indices and their mask; the last batch is padded with masked index 0."""
  order = np.asarray(order)
  if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
    raise ValueError(f"order must be a permutation of 0..{n - 1}, got shape {order.shape}")
  if int(batch_size) < 1:
    raise ValueError(f"batch_size={batch_size!r} must be at least 1")
  steps = -(-n // batch_size)
  idx = np.zeros(steps * batch_size, np.int32)
  mask = np.zeros(steps * batch_size, np.float32)
  idx[:n], mask[:n] = order, 1.0
  return jnp.asarray(idx.reshape(steps, batch_size)), jnp.asarray(mask.reshape(steps, batch_size))


def _train(loss_fn: Callable[[Any, jax.Array, jax.Array], jax.Array], params: Any,
           optimizer: optax.GradientTransformation, idx: jax.Array, mask: jax.Array, epochs: int):
  """``epochs`` passes over the fixed batches; returns the params and each epoch's mean loss.

  ``loss_fn(params, batch_indices (B,), batch_mask (B,))`` → scalar. One jitted epoch scans the steps.
  """
  n = jnp.sum(mask)

  @jax.jit
  def epoch(params, opt_state):
    def step(carry, batch):
      params, opt_state = carry
      b_idx, b_mask = batch
      loss, grads = jax.value_and_grad(loss_fn)(params, b_idx, b_mask)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss * jnp.sum(b_mask)

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (idx, mask))
    return params, opt_state, jnp.sum(losses) / n

  opt_state = optimizer.init(params)
  losses = []
  for _ in range(int(epochs)):
    params, opt_state, loss = epoch(params, opt_state)
    losses.append(loss)
  return params, jnp.stack(losses) if losses else jnp.zeros((0,), jnp.float32)


def _adamw(learning_rate, eps: float, weight_decay: float) -> optax.GradientTransformation:
  """torch ``AdamW(lr, eps=eps, weight_decay)``: decoupled decay lr·λ·p, eps outside the sqrt."""
  return optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=eps, weight_decay=weight_decay)


# ----------------------------------------------------------------------------------------- zero-shot


def zero_shot_logits(features: Any, prototypes: Any, logit_scale: Any) -> jax.Array:
  """``exp(s)·X·Pᵀ``: features (N, d) or (A, N, d) (logits averaged over A), prototypes (K, d) → (N, K)."""
  p = jnp.asarray(prototypes, jnp.float32)
  x = _check_features(features, p.shape[-1], "zero_shot_logits")
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  return _tta_mean(lambda f: scale * (f @ p.T), x)


def zero_shot_proba(features: Any, prototypes: Any, logit_scale: Any) -> jax.Array:
  """Softmax of ``zero_shot_logits``: (N, K)."""
  return jax.nn.softmax(zero_shot_logits(features, prototypes, logit_scale), axis=-1)


# -------------------------------------------------------------------------------------- CLIP-Adapter


class ClipAdapter(nn.Module):
  """CLIP-Adapter's residual feature adapter (Gao et al. 2021, as in FLAIR's ``ClipAdapter``).

  Submodules ``down`` / ``up`` are upstream's ``adapter.0`` / ``adapter.2``.
  """

  reduction: int = 4
  ratio: float = 0.2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(..., d) unit features → (..., d) adapted unit features."""
    d = x.shape[-1]
    if d // self.reduction < 1:
      raise ValueError(f"ClipAdapter: feature size {d} is smaller than reduction={self.reduction}")
    a = nn.relu(layers.Linear(d // self.reduction, use_bias=False, name="down")(x))
    a = nn.relu(layers.Linear(d, use_bias=False, name="up")(a))
    x = self.ratio * a + (1.0 - self.ratio) * x
    # Upstream divides by the norm without an epsilon.
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@flax.struct.dataclass
class FittedClipAdapter:
  """A trained CLIP-Adapter with the prototypes and temperature it scores against."""

  params: Any
  prototypes: jax.Array
  logit_scale: jax.Array
  losses: jax.Array  # (epochs,) mean training CE per epoch
  module: ClipAdapter = flax.struct.field(pytree_node=False)

  def logits(self, features: Any) -> jax.Array:
    """(N, d) or (A, N, d) → (N, K) ``exp(s)·A(X)·Pᵀ`` (averaged over A)."""
    x = _check_features(features, self.prototypes.shape[-1], "FittedClipAdapter.logits")
    scale = jnp.exp(self.logit_scale)
    return _tta_mean(lambda f: scale * (self.module.apply({"params": self.params}, f) @ self.prototypes.T), x)

  def predict_proba(self, features: Any) -> jax.Array:
    return jax.nn.softmax(self.logits(features), axis=-1)


def fit_clip_adapter(key: jax.Array, features: Any, labels: Any, prototypes: Any, logit_scale: Any, *,
                     epochs: int = 40, lr: float = 1e-3, eps: float = 1e-4, weight_decay: float = 0.01,
                     batch_size: int = 1, reduction: int = 4, ratio: float = 0.2, order: Any = None,
                     order_seed: int = 42) -> FittedClipAdapter:
  """Trains CLIP-Adapter as FLAIR's ``ClipAdapter.train``.

  Args:
    key: PRNG key of the adapter's torch-default initialisation.
    features: (N, d) unit training features; labels: (N,) ints in [0, K).
    prototypes: (K, d) class prototypes; logit_scale: the model's log-temperature.
    epochs, lr, eps, weight_decay: AdamW with a cosine decay to 0 over epochs·steps (per step).
    batch_size: samples per step (upstream: 1).
    order: the fixed sample order (a permutation of 0..N−1); default ``sample_order(N, order_seed)``.
  """
  x, y, p = _check_training_set(features, labels, prototypes, "fit_clip_adapter")
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  module = ClipAdapter(reduction=reduction, ratio=ratio)
  params = module.init(key, x[:1])["params"]
  idx, mask = _batched_order(sample_order(x.shape[0], order_seed) if order is None else order, x.shape[0],
                             int(batch_size))
  schedule = optax.cosine_decay_schedule(lr, max(int(epochs) * idx.shape[0], 1))

  def loss_fn(params, b_idx, b_mask):
    logits = scale * (module.apply({"params": params}, x[b_idx]) @ p.T)
    return _cross_entropy(logits, y[b_idx], b_mask)

  params, losses = _train(loss_fn, params, _adamw(schedule, eps, weight_decay), idx, mask, epochs)
  return FittedClipAdapter(params=params, prototypes=p, logit_scale=jnp.asarray(logit_scale, jnp.float32),
                           losses=losses, module=module)


# --------------------------------------------------------------------------------------- Tip-Adapter


def tip_adapter_logits(features: jax.Array, prototypes: jax.Array, keys: jax.Array, values: jax.Array, *,
                       alpha: float = TIP_ALPHA, beta: float = TIP_BETA,
                       clip_scale: float = TIP_CLIP_SCALE) -> jax.Array:
  """``c·X·Pᵀ + α·exp(−(β − β·X·Kᵀ))·V``: X (B, d), P (K, d), keys (N, d), values (N, K) → (B, K)."""
  affinity = features @ keys.T
  cache = jnp.exp(-(beta - beta * affinity)) @ values
  return clip_scale * (features @ prototypes.T) + alpha * cache


@flax.struct.dataclass
class TipAdapter:
  """A Tip-Adapter cache (training-free) or a fine-tuned Tip-Adapter-f.

  Attributes:
    keys: (N, d) cache keys (training features, or the learned keys).
    values: (N, K) one-hot training labels.
    prototypes: (K, d).
    alpha, beta, clip_scale: the logit formula's constants.
    losses: (epochs,) mean training CE per epoch (empty for the training-free cache).
  """

  keys: jax.Array
  values: jax.Array
  prototypes: jax.Array
  losses: jax.Array
  alpha: float = flax.struct.field(pytree_node=False, default=TIP_ALPHA)
  beta: float = flax.struct.field(pytree_node=False, default=TIP_BETA)
  clip_scale: float = flax.struct.field(pytree_node=False, default=TIP_CLIP_SCALE)

  def logits(self, features: Any) -> jax.Array:
    """(N, d) or (A, N, d) → (N, K) (averaged over A), upstream's inference formula."""
    x = _check_features(features, self.prototypes.shape[-1], "TipAdapter.logits")
    return _tta_mean(lambda f: tip_adapter_logits(f, self.prototypes, self.keys, self.values, alpha=self.alpha,
                                                  beta=self.beta, clip_scale=self.clip_scale), x)

  def predict_proba(self, features: Any) -> jax.Array:
    return jax.nn.softmax(self.logits(features), axis=-1)


def fit_tip_adapter(features: Any, labels: Any, prototypes: Any, *, alpha: float = TIP_ALPHA,
                    beta: float = TIP_BETA, clip_scale: float = TIP_CLIP_SCALE) -> TipAdapter:
  """Training-free Tip-Adapter: the cache of (N, d) training features and their one-hot labels."""
  x, y, p = _check_training_set(features, labels, prototypes, "fit_tip_adapter")
  return TipAdapter(keys=x, values=jax.nn.one_hot(y, p.shape[0], dtype=jnp.float32), prototypes=p,
                    losses=jnp.zeros((0,), jnp.float32), alpha=float(alpha), beta=float(beta),
                    clip_scale=float(clip_scale))


def fit_tip_adapter_f(features: Any, labels: Any, prototypes: Any, logit_scale: Any = None, *, epochs: int = 40,
                      lr: float = 1e-3, eps: float = 1e-4, weight_decay: float = 0.01, batch_size: int = 1,
                      alpha: float = TIP_ALPHA, beta: float = TIP_BETA, clip_scale: float = TIP_CLIP_SCALE,
                      order: Any = None, order_seed: int = 42, tip_f_train_test_mismatch: bool = False,
                      tip_f_inputs_track_keys: bool = False) -> TipAdapter:
  """Tip-Adapter-f: learns the cache keys (initialised from the features) as FLAIR's ``TipAdapter(train=True)``.

  Args:
    features: (N, d) unit training features; labels: (N,) ints in [0, K); prototypes: (K, d).
    logit_scale: the model's log-temperature, used only by ``tip_f_train_test_mismatch``.
    epochs, lr, eps, weight_decay, batch_size: AdamW at a constant rate (upstream: 40, 1e-3, 1e-4, 0.01, 1).
    alpha, beta, clip_scale: the logit formula's constants.
    order, order_seed: the fixed sample order, as ``fit_clip_adapter``.
    tip_f_train_test_mismatch: train on upstream's ``exp(s)·x·Pᵀ + α·exp(s)·φ(x·Kᵀ)·V / N`` instead of
      the inference formula (see the module docstring).
    tip_f_inputs_track_keys: read each training input from the current learned keys, as upstream's
      shared storage does, instead of the fixed features.
  """
  x, y, p = _check_training_set(features, labels, prototypes, "fit_tip_adapter_f")
  if tip_f_train_test_mismatch and logit_scale is None:
    raise ValueError("fit_tip_adapter_f: tip_f_train_test_mismatch=True needs the model's logit_scale")
  n = x.shape[0]
  values = jax.nn.one_hot(y, p.shape[0], dtype=jnp.float32)
  scale = jnp.exp(jnp.asarray(0.0 if logit_scale is None else logit_scale, jnp.float32))
  idx, mask = _batched_order(sample_order(n, order_seed) if order is None else order, n, int(batch_size))

  def loss_fn(keys, b_idx, b_mask):
    inputs = jax.lax.stop_gradient(keys[b_idx]) if tip_f_inputs_track_keys else x[b_idx]
    if tip_f_train_test_mismatch:
      cache = jnp.exp(-(beta - beta * (inputs @ keys.T))) @ values
      logits = scale * (inputs @ p.T) + alpha * (scale * cache / n)
    else:
      logits = tip_adapter_logits(inputs, p, keys, values, alpha=alpha, beta=beta, clip_scale=clip_scale)
    return _cross_entropy(logits, y[b_idx], b_mask)

  keys, losses = _train(loss_fn, x, _adamw(lr, eps, weight_decay), idx, mask, epochs)
  return TipAdapter(keys=keys, values=values, prototypes=p, losses=losses, alpha=float(alpha), beta=float(beta),
                    clip_scale=float(clip_scale))

"""FLAIR's linear probe: scikit-learn's ``LogisticRegression`` reproduced as a jitted JAX solver.

Upstream (``transferability/modeling/adapters.py: LinearProbe``) fits
``LogisticRegression(random_state=0, C=0.316, max_iter=1000, class_weight="balanced")`` (lbfgs) on
frozen image features. scikit-learn ≥ 1.5 minimises, for sample weights ``sw_i`` (balanced:
``n / (K · n_{y_i})``) and ``S = Σ sw_i``::

  (1/S) Σ_i sw_i · loss_i + 1/(2·C·S) · ‖W‖²        (intercept unpenalised)

i.e. ``C·Σ sw_i·loss_i + ½‖W‖²`` divided by ``C·S`` — the same minimiser. ``loss_i`` is the
multinomial cross-entropy over K coefficient vectors for K > 2 and the binary logistic loss of ONE
coefficient vector (positive class = the larger label) for K = 2, whose probabilities are
``[1 − σ(z), σ(z)]``. Convergence follows scipy's L-BFGS-B test ``max |∇| ≤ tol`` on that scaled
objective, here with Optax's L-BFGS and zoom line search inside one ``lax.while_loop``, in float64
(scoped to the call) as scipy. Solutions agree with scikit-learn's to rounding when both take the
same iterates; where the problem is ill-conditioned (d ≫ N) both stop within ``tol`` of the optimum
along slightly different paths, and probabilities can differ by ~1e-3.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["LinearProbe", "balanced_sample_weights", "fit", "predict_proba"]


@flax.struct.dataclass
class LinearProbe:
  """A fitted probe (scikit-learn's attribute layout).

  Attributes:
    coef: (1, d) for two classes, else (K, d).
    intercept: (1,) or (K,).
    classes: the label values of the columns of ``predict_proba`` (ascending), static.
    n_iter: L-BFGS iterations run.
    converged: whether ``max |∇| ≤ tol`` was reached within ``max_iter``.
  """

  coef: jax.Array
  intercept: jax.Array
  n_iter: jax.Array
  converged: jax.Array
  classes: tuple[int, ...] = flax.struct.field(pytree_node=False)

  def decision_function(self, features: jax.Array) -> jax.Array:
    """(..., d) → (..., K) class scores, or (..., 1) for two classes."""
    return jnp.asarray(features, self.coef.dtype) @ self.coef.T + self.intercept

  def predict_proba(self, features: jax.Array) -> jax.Array:
    return predict_proba(self, features)

  def predict(self, features: jax.Array) -> jax.Array:
    """(N, d) → (N,) predicted label values."""
    return jnp.asarray(self.classes)[jnp.argmax(self.predict_proba(features), axis=-1)]


def predict_proba(probe: LinearProbe, features: jax.Array) -> jax.Array:
  """Class probabilities as FLAIR's ``LinearProbe.predict`` computes them.

  Args:
    probe: a fitted probe.
    features: (N, d), or (A, N, d) for test-time augmentation: the scores of the A augmented passes
      are averaged before the activation, as upstream's ``tta``.
  Returns:
    (N, K): softmax of the scores, or ``[1 − σ(z), σ(z)]`` for two classes.
  """
  features = jnp.asarray(features)
  if features.ndim not in (2, 3) or features.shape[-1] != probe.coef.shape[-1]:
    raise ValueError(f"predict_proba: expected features (N, {probe.coef.shape[-1]}) or (A, N, "
                     f"{probe.coef.shape[-1]}), got {features.shape}")
  scores = probe.decision_function(features)
  if features.ndim == 3:
    scores = jnp.mean(scores, axis=0)
  if scores.shape[-1] == 1:
    p = jax.nn.sigmoid(scores)
    return jnp.concatenate([1.0 - p, p], axis=-1)
  return jax.nn.softmax(scores, axis=-1)


def balanced_sample_weights(label_index: np.ndarray, num_classes: int) -> np.ndarray:
  """scikit-learn's ``class_weight='balanced'`` per sample: n / (K · n_class)."""
  counts = np.bincount(label_index, minlength=num_classes)
  return (label_index.size / (num_classes * counts))[label_index]


def _binary_loss(params, x, y, sw):
  z = x @ params["coef"][0] + params["intercept"][0]
  # log(1 + e^z) − y·z, the half-binomial loss scikit-learn uses with y ∈ {0, 1}.
  return jnp.sum(sw * (jnp.logaddexp(0.0, z) - y * z))


def _multinomial_loss(params, x, y, sw):
  z = x @ params["coef"].T + params["intercept"]
  nll = jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
  return jnp.sum(sw * nll)


def _grad_max_abs(tree) -> jax.Array:
  return jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree_util.tree_leaves(tree)]))


def _fit_lbfgs(objective, params0, tol, max_iter: int, memory_size: int, max_linesearch_steps: int):
  # Trying the unit step first at every iteration, as scipy's L-BFGS-B does, keeps the iterates close
  # to scikit-learn's (same iteration counts on well-conditioned problems).
  linesearch = optax.scale_by_zoom_linesearch(max_linesearch_steps=max_linesearch_steps, initial_guess_strategy="one")
  solver = optax.lbfgs(memory_size=memory_size, linesearch=linesearch)
  value_and_grad = optax.value_and_grad_from_state(objective)

  def cond(carry):
    _, state, it, gmax = carry
    return (it < max_iter) & (gmax > tol)

  def body(carry):
    params, state, it, _ = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
    params = optax.apply_updates(params, updates)
    return params, state, it + 1, _grad_max_abs(optax.tree.get(state, "grad"))

  gmax0 = _grad_max_abs(jax.grad(objective)(params0))
  params, _, n_iter, gmax = jax.lax.while_loop(cond, body, (params0, solver.init(params0), jnp.int32(0), gmax0))
  return params, n_iter, gmax


def fit(features: Any, labels: Any, C: float = 0.316, class_weight: str | None = "balanced", max_iter: int = 1000,
        tol: float = 1e-4, memory_size: int = 10, max_linesearch_steps: int = 50,
        solver_dtype: str = "float64") -> LinearProbe:
  """Fits the probe like ``LogisticRegression(C=C, class_weight=class_weight, max_iter=max_iter, tol=tol)``.

  Args:
    features: (N, d) frozen features (FLAIR's ``lp`` uses the raw 2048-d pooled features).
    labels: (N,) integer labels; the classes are the distinct values, as scikit-learn's ``classes_``.
    C: inverse L2 strength.
    class_weight: ``"balanced"`` or None (all samples weight 1).
    max_iter, tol: L-BFGS iteration cap and ``max |∇|`` stopping tolerance (scipy's ``gtol``).
    memory_size, max_linesearch_steps: L-BFGS history and line-search cap (scikit-learn: 10 and 50).
    solver_dtype: "float64" (default, like scipy; enabled only inside this call) or "float32".
  Returns:
    The fitted ``LinearProbe`` with float32 coefficients.
  """
  x_host = np.asarray(features)
  y_host = np.asarray(labels)
  if x_host.ndim != 2 or x_host.shape[0] == 0:
    raise ValueError(f"linear_probe.fit: features must be (N, d) with N > 0, got shape {x_host.shape}")
  if y_host.shape != (x_host.shape[0],) or y_host.dtype.kind not in "iub":
    raise ValueError(f"linear_probe.fit: labels must be ({x_host.shape[0]},) integers, got shape {y_host.shape} "
                     f"dtype {y_host.dtype}")
  if not np.all(np.isfinite(x_host)):
    raise ValueError("linear_probe.fit: features contain NaN or Inf")
  if class_weight not in ("balanced", None):
    raise ValueError(f"linear_probe.fit: class_weight={class_weight!r}: expected 'balanced' or None")
  if not C > 0:
    raise ValueError(f"linear_probe.fit: C={C!r} must be positive")
  classes, label_index = np.unique(y_host, return_inverse=True)
  if classes.size < 2:
    raise ValueError(f"linear_probe.fit: needs at least two classes in labels, got {classes.tolist()}")
  k = classes.size
  binary = k == 2
  sw = balanced_sample_weights(label_index, k) if class_weight == "balanced" else np.ones(label_index.size)

  if solver_dtype not in ("float64", "float32"):
    raise ValueError(f"linear_probe.fit: solver_dtype={solver_dtype!r}: expected 'float64' or 'float32'")
  # A scoped x64 context (no global switch): scipy's L-BFGS-B works in float64, and a float32
  # objective stalls the line search before max |∇| ≤ 1e-4 on ill-conditioned features.
  with jax.enable_x64(solver_dtype == "float64"):
    dtype = jnp.dtype(solver_dtype)
    params, n_iter, gmax = _fit(jnp.asarray(x_host, dtype), jnp.asarray(label_index, dtype if binary else jnp.int32),
                                jnp.asarray(sw, dtype), jnp.asarray(1.0 / C, dtype), jnp.asarray(tol, dtype),
                                num_rows=1 if binary else k, max_iter=int(max_iter), memory_size=int(memory_size),
                                max_linesearch_steps=int(max_linesearch_steps))
    intercept = params["intercept"]
    if not binary:
      # The multinomial intercepts are defined up to a common shift; report them centred.
      intercept = intercept - jnp.mean(intercept)
    # FLAIR copies the solution into a float32 torch Linear; so does this probe.
    coef = params["coef"].astype(jnp.float32)
    intercept = intercept.astype(jnp.float32)
    n_iter, converged = n_iter.astype(jnp.int32), gmax <= tol
  return LinearProbe(coef=coef, intercept=intercept, n_iter=n_iter, converged=converged,
                     classes=tuple(int(c) for c in classes))


@functools.partial(jax.jit, static_argnames=("num_rows", "max_iter", "memory_size", "max_linesearch_steps"))
def _fit(x, y, sw, inv_c, tol, *, num_rows: int, max_iter: int, memory_size: int, max_linesearch_steps: int):
  """L-BFGS on the scaled objective; ``num_rows`` = 1 (binary, ``y`` float in {0, 1}) or K (``y`` int)."""
  data_loss = _binary_loss if num_rows == 1 else _multinomial_loss
  s = jnp.sum(sw)

  def objective(params):
    return (data_loss(params, x, y, sw) + 0.5 * inv_c * jnp.sum(params["coef"] ** 2)) / s

  params0 = {"coef": jnp.zeros((num_rows, x.shape[1]), x.dtype), "intercept": jnp.zeros((num_rows,), x.dtype)}
  return _fit_lbfgs(objective, params0, tol, max_iter, memory_size, max_linesearch_steps)

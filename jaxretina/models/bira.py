"""BiRA-Net (Zhao et al., ICIP 2019): attention-masked ResNet features and a bilinear combination for DR grading.

Port of the official ``ISS-Kerui/BIRA-NET-…: code/model.py`` (``KeNet``, the RA-Net) and
``code/train.py`` (``InterclassLoss``, the "grading loss"), plus the bilinear network of the paper
figure, which the official repository does not implement in runnable form (docs/systems.md#bira-net).

RA-Net (``KeNet``), NHWC:

  F   = ResNet trunk (torchvision ``children()[:-2]``)                    (B, h, w, C)
  a   = Net-A(F) = sigmoid(1×1 convs C→64→16→8→1 after a BN, ReLU between) (B, h, w, 1)
  A   = up_c2(a): 1×1 conv 1→C without bias (upstream: constant 1, frozen)  (B, h, w, C)
  gap = GAP(A ⊙ F) / GAP(A)                                                 (B, C)
  out = log_softmax(Linear(256→K)(Dropout(0.5)(Linear(C→256)(gap))))

Upstream computes ``A ⊙ F`` as ``torch.matmul(A, F)`` (a per-channel h×w matrix product, which only
runs on square maps); the paper's figure draws an element-wise product. ``matmul_masking`` selects.

Bilinear network (``BiRANet``) — **inferred**, no fixture or runnable upstream code exists:
two RA-Net branches (separate weights) see the same image; each adds a Net-B,
``g = GAP(ReLU(Conv1×1 C→C)(F))``, and averages it with its RA output (``(gap + g) / 2``, the
figure's "M / Mean"); the two branch vectors are combined by an outer product into the
"Bilinear Vector", flattened (C²), signed-square-rooted and L2-normalised as in standard bilinear
CNNs (Lin et al. 2015), and classified by one Linear layer. The official ``model_bilinear.py``
does not compile; the third-party reimplementation reduces the outer product differently
(``res·resᵀ`` then a mean), which we do not follow.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxretina.models import convert, resnet
from jaxretina.models.layers import BatchNorm, Conv2d, Linear, l2_normalize

Dtype = Any


class RAAttention(nn.Module):
  """Net-A + ``up_c2`` + attention-weighted pooling: ``F (B, h, w, C) → (gap (B, C), a (B, h, w, 1))``.

  Attributes:
    matmul_masking: upstream quirk. False (paper): ``A ⊙ F`` element-wise. True: upstream's
      ``torch.matmul(A, F)`` on NCHW tensors, a per-(sample, channel) h×w matrix product, which
      requires h == w.
  """

  matmul_masking: bool = False
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    if features.ndim != 4:
      raise ValueError(f"RAAttention: expected (B, h, w, C) features, got {features.shape}")
    c = features.shape[-1]
    a = BatchNorm(use_running_average=not train, dtype=self.dtype, name="attention_0")(features)
    for idx, width in ((1, 64), (3, 16), (5, 8)):
      a = nn.relu(Conv2d(width, 1, dtype=self.dtype, name=f"attention_{idx}")(a))
    a = jax.nn.sigmoid(Conv2d(1, 1, dtype=self.dtype, name="attention_7")(a))
    att = Conv2d(c, 1, use_bias=False, kernel_init=nn.initializers.ones, dtype=self.dtype, name="up_c2")(a)
    if self.matmul_masking:
      h, w = features.shape[1:3]
      if h != w:
        raise ValueError(f"RAAttention(matmul_masking=True) needs square feature maps (torch.matmul of "
                         f"h×w matrices), got {h}×{w}; use a square input or element-wise masking")
      masked = jnp.einsum("bikc,bkjc->bijc", att, features)
    else:
      masked = att * features
    gap = jnp.mean(masked, axis=(1, 2)) / jnp.mean(att, axis=(1, 2))
    return gap, a


class KeNet(nn.Module):
  """BiRA-Net's RA-Net as coded upstream: ``(B, H, W, 3) → log-probabilities (B, num_classes)``.

  ``features`` is the trunk, a ``resnet.ResNet`` with ``num_classes=None`` (ResNet-50 upstream);
  it is adopted under the name ``features``. ``dense_width`` is the hidden width of the dense
  head (upstream 256). Sown into ``'intermediates'``: ``trunk_output``
  (trunk output), ``attention`` (Net-A map, (B, h, w, 1)) and ``gap`` (the pooled vector, (B, C)).
  Unlike upstream's ``torch.squeeze``, a batch of one keeps its batch axis. Dropout needs a
  ``'dropout'`` PRNG key when ``train``.
  """

  features: resnet.ResNet
  num_classes: int = 5
  dropout_rate: float = 0.5
  matmul_masking: bool = False
  dense_width: int = 256
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"KeNet: expected NHWC images (B, H, W, C), got {x.shape}")
    feats = self.features(x, train=train, stop_after="layer4")
    gap, a = RAAttention(self.matmul_masking, dtype=self.dtype, name="ra")(feats, train)
    self.sow("intermediates", "trunk_output", feats)
    self.sow("intermediates", "attention", a)
    self.sow("intermediates", "gap", gap)
    logits = _dense_head(gap, self.num_classes, self.dropout_rate, train, self.dtype, self.dense_width)
    return jax.nn.log_softmax(logits, axis=-1)


def _dense_head(v, num_classes, dropout_rate, train, dtype, width=256):
  """``denses`` = Linear(C→256) → Dropout → Linear(256→K), no activation between (as upstream)."""
  h = Linear(width, dtype=dtype, name="denses_0")(v)
  h = nn.Dropout(dropout_rate, deterministic=not train)(h)
  return Linear(num_classes, dtype=dtype, name="denses_2")(h)


class RABranch(nn.Module):
  """One BiRA-Net branch: trunk → (RA vector + Net-B vector) / 2, ``(B, H, W, 3) → (B, C)``."""

  features: resnet.ResNet
  matmul_masking: bool = False
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    feats = self.features(x, train=train, stop_after="layer4")
    gap, attention = RAAttention(self.matmul_masking, dtype=self.dtype, name="ra")(feats, train)
    self.sow("intermediates", "attention", attention)
    g = nn.relu(Conv2d(feats.shape[-1], 1, dtype=self.dtype, name="net_b")(feats))
    return 0.5 * (gap + jnp.mean(g, axis=(1, 2)))


class BiRANet(nn.Module):
  """The bilinear BiRA-Net of the paper figure (inferred, see the module docstring).

  ``(B, H, W, 3) → logits (B, num_classes)``. ``backbone`` is a template ``resnet.ResNet``
  (``num_classes=None``); each branch gets its own copy and weights. The bilinear vector has C²
  entries (C = trunk channels), so the classifier has C²·K weights.
  """

  backbone: resnet.ResNet
  num_classes: int = 5
  matmul_masking: bool = False
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"BiRANet: expected NHWC images (B, H, W, C), got {x.shape}")
    v1 = RABranch(self.backbone.clone(name=None, parent=None), self.matmul_masking, self.dtype,
                  name="branch_1")(x, train)
    v2 = RABranch(self.backbone.clone(name=None, parent=None), self.matmul_masking, self.dtype,
                  name="branch_2")(x, train)
    bilinear = jnp.einsum("bi,bj->bij", v1, v2).reshape(x.shape[0], -1)
    bilinear = jnp.sign(bilinear) * jnp.sqrt(jnp.abs(bilinear) + 1e-12)
    bilinear = l2_normalize(bilinear, axis=-1)
    self.sow("intermediates", "bilinear", bilinear)
    return Linear(self.num_classes, dtype=self.dtype, name="classifier")(bilinear)


def interclass_loss(log_probs: jax.Array, labels: jax.Array, *, detach_loss: bool = False) -> jax.Array:
  """BiRA-Net's "grading loss": a CE re-weighted by how far the predicted grade is from the truth.

  ``L = mean_i w_i · (−log_probs[i, t_i])`` with ``w_i = (|argmax_i − t_i| + 1) / Σ_k (|t_i − k| + 1)``
  (k over the K = ``log_probs.shape[-1]`` grades; upstream hard-codes K = 5). ``w_i`` depends on
  the hard prediction and is held constant (``stop_gradient``), so the loss is differentiable
  in the log-probabilities.

  Args:
    log_probs: (B, K) log-probabilities (``KeNet``'s output).
    labels: (B,) integer grades in [0, K).
    detach_loss: upstream quirk. ``InterclassLoss`` wraps its result in a fresh
      ``Variable(requires_grad=True)``, which cuts it from the graph: no gradient reaches the
      model. True reproduces that (``stop_gradient`` of the whole loss); the value is unchanged.
  """
  log_probs = jnp.asarray(log_probs, jnp.float32)
  labels = jnp.asarray(labels)
  if log_probs.ndim != 2 or labels.shape != log_probs.shape[:1]:
    raise ValueError(f"interclass_loss: expected log_probs (B, K) and labels (B,), got {log_probs.shape} "
                     f"and {labels.shape}")
  k = log_probs.shape[-1]
  grades = jnp.arange(k)
  pred = jnp.argmax(log_probs, axis=-1)
  norm = jnp.sum(jnp.abs(labels[:, None] - grades[None, :]) + 1, axis=-1)
  w = jax.lax.stop_gradient((jnp.abs(pred - labels) + 1) / norm)
  nll = -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  loss = jnp.mean(w * nll)
  return jax.lax.stop_gradient(loss) if detach_loss else loss


# What upstream ``train()`` freezes (``requires_grad=False``, left out of SGD): the trunk's stem,
# layer1 and layer2 (``features[:-2]``, the ImageNet-pretrained low levels) and ``up_c2`` (the
# constant-1 1×1 conv that copies the attention map onto every channel). Paths relative to one
# RA-Net (``KeNet``, or a ``BiRANet`` branch).
_UPSTREAM_FROZEN = (r"features/(conv1|bn1|layer1_|layer2_)", r"ra/up_c2/")


def upstream_frozen_patterns(variant: str = "ra_net") -> list[str]:
  """``config.optimizer.frozen`` regexes of the parameters upstream's ``train()`` freezes.

  ``variant``: 'ra_net' (``KeNet``, parameters at the root) or 'bira_net' (``BiRANet``: the same
  parts in both branches).
  """
  if variant not in ("ra_net", "bira_net"):
    raise ValueError(f"upstream_frozen_patterns: variant {variant!r}, expected 'ra_net' or 'bira_net'")
  prefix = "^" if variant == "ra_net" else "^branch_[12]/"
  return [prefix + p for p in _UPSTREAM_FROZEN]


def upstream_trainable_mask(params: Mapping[str, Any]) -> Any:
  """``KeNet`` parameters that upstream trains (True) — a mask for ``optax.masked``.

  ``train.py`` freezes the trunk's stem, layer1 and layer2 (``features[:-2]``) and ``up_c2``
  (``upstream_frozen_patterns``); layer3, layer4, Net-A and the dense layers train.
  """
  frozen = [re.compile(p) for p in upstream_frozen_patterns("ra_net")]
  flat = traverse_util.flatten_dict(dict(params), sep="/")
  mask = {path: not any(f.search(path) for f in frozen) for path in flat}
  return traverse_util.unflatten_dict(mask, sep="/")


_SEQUENTIAL_TRUNK = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}


def upstream_key(key: str) -> str:
  """Upstream ``KeNet`` key → the port's torch-style path.

  The trunk is an ``nn.Sequential`` of torchvision's children (``features.0`` = conv1, ``features.1``
  = bn1, ``features.4``…``7`` = layer1…4); the attention convs live under ``ra``.
  """
  parts = key.split(".")
  if parts[0] == "features" and len(parts) > 1:
    if parts[1] not in _SEQUENTIAL_TRUNK:
      raise convert.ConversionError(f"{key}: features.{parts[1]} is not a ResNet child with parameters")
    return ".".join(["features", _SEQUENTIAL_TRUNK[parts[1]]] + parts[2:])
  if parts[0] in ("attention", "up_c2"):
    return "ra." + key
  return key


def from_torch(state_dict: Mapping[str, Any], module: KeNet, *, input_shape=(1, 64, 64, 3), prefix: str = "",
               source: str = "state_dict", placement: dict | None = None) -> dict:
  """Upstream ``KeNet`` state_dict → variables of ``module`` (a ``KeNet``).

  ``placement`` receives torch key → Flax path (``convert.convert_state_dict``).
  """
  if not isinstance(module, KeNet):
    raise TypeError(f"bira.from_torch converts KeNet checkpoints, got {type(module).__name__}")
  target = convert.variables_shape(module, jnp.zeros(input_shape, jnp.float32))
  return convert.convert_state_dict(state_dict, target, prefix=prefix, rename=upstream_key, source=source,
                                    placement=placement)

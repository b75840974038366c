"""torchvision ResNet (v1.5: stride on the 3×3 conv) in Flax linen, NHWC, with its converter.

Flax module paths follow torch's state_dict keys (``convert.torch_path_to_flax``): ``conv1``,
``bn1``, ``layer{i}_{j}/{conv1,bn1,conv2,bn2[,conv3,bn3],downsample_0,downsample_1}``, ``fc``. A
torchvision ``state_dict`` therefore converts with no renaming (``from_torch``).

Beyond torchvision's own arguments the module takes the variants the ported systems use:

* ``base_width``: stem channels; stage planes are ``base_width * (1, 2, 4, 8)``. torchvision is
  64. The reduced-width parity fixtures (CRD-Net, FCN-CLIP) rebuild torchvision's ResNet this way.
* ``last_stride=1``: layer4 without downsampling (output stride 16), as the CAL / DualAttendMed
  backbone (``ResNet(stride=1)``).
* ``use_maxpool=False``: stem without its max-pool, as CRD-Net's ``backbone_forward`` runs it.
* ``conv_bias``: the 3×3 convs of a BasicBlock carry a bias, as in CAL's ``models/resnet.py``.
* ``stem_conv_bias``: the stem conv carries a bias, as CRD-Net's replacement ``conv1`` for inputs
  with other than 3 channels.
* ``remat``: activation rematerialisation of every block (``'none'``, ``'blocks'``, ``'dots'``, see
  ``layers.REMAT_MODES``); the variables and their paths are the same in every mode.

Running part of the network (CRD-Net runs the stem and layer1..3, fuses, then runs layer4): call
with ``start_at``/``stop_after`` (``'stem'``, ``'layer1'`` … ``'layer4'``, ``'head'``), or use the
methods ``stem``/``stage``/``head`` through ``module.apply(variables, ..., method=...)``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxretina.models import convert, layers

Dtype = Any

BLOCKS = ("basic", "bottleneck")
EXPANSION = {"basic": 1, "bottleneck": 4}
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4", "head")
# torchvision / upstream class names accepted wherever a block name is given.
_BLOCK_ALIASES = {"basic": "basic", "basicblock": "basic", "bottleneck": "bottleneck"}


def expansion(block: str) -> int:
  """Output channels per plane of a block: basic 1, bottleneck 4."""
  return EXPANSION[canonical_block(block)]


def canonical_block(block: str) -> str:
  """``'BasicBlock'``/``'basic'`` → ``'basic'``; ``'Bottleneck'`` → ``'bottleneck'``."""
  name = _BLOCK_ALIASES.get(str(block).lower())
  if name is None:
    raise ValueError(f"ResNet block {block!r}: expected one of 'basic'/'BasicBlock', 'bottleneck'/'Bottleneck'")
  return name


class BasicBlock(nn.Module):
  """torchvision ``BasicBlock``: 3×3 conv (stride) → BN → ReLU → 3×3 conv → BN, + identity, ReLU.

  Input (B,H,W,C_in) → (B,H/stride,W/stride,planes).
  """

  planes: int
  stride: int = 1
  downsample: bool = False
  conv_bias: bool = False
  bn_eps: float = 1e-5
  bn_momentum: float = 0.1
  zero_init_residual: bool = False
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = _bn_factory(self, train)
    out = _conv(self, self.planes, 3, self.stride, 1, self.conv_bias, "conv1")(x)
    out = layers.materialize(nn.relu(bn("bn1")(out)))
    out = _conv(self, self.planes, 3, 1, 1, self.conv_bias, "conv2")(out)
    out = bn("bn2", zero=self.zero_init_residual)(out)
    identity = _downsample(self, x, self.planes, train) if self.downsample else x
    return nn.relu(out + identity)


class Bottleneck(nn.Module):
  """torchvision ``Bottleneck`` (v1.5): 1×1 → 3×3 (stride, groups) → 1×1 (×4), + identity, ReLU.

  Inner width = ``int(planes * width_per_group / 64) * groups`` (torchvision's rule).
  Input (B,H,W,C_in) → (B,H/stride,W/stride,4·planes).
  """

  planes: int
  stride: int = 1
  downsample: bool = False
  groups: int = 1
  width_per_group: int = 64
  bn_eps: float = 1e-5
  bn_momentum: float = 0.1
  zero_init_residual: bool = False
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = _bn_factory(self, train)
    width = int(self.planes * (self.width_per_group / 64.0)) * self.groups
    out_ch = self.planes * EXPANSION["bottleneck"]
    out = layers.materialize(nn.relu(bn("bn1")(_conv(self, width, 1, 1, 0, False, "conv1")(x))))
    out = _conv(self, width, 3, self.stride, 1, False, "conv2", groups=self.groups)(out)
    out = layers.materialize(nn.relu(bn("bn2")(out)))
    out = bn("bn3", zero=self.zero_init_residual)(_conv(self, out_ch, 1, 1, 0, False, "conv3")(out))
    identity = _downsample(self, x, out_ch, train) if self.downsample else x
    return nn.relu(out + identity)


def _conv(mod, features, kernel, stride, padding, bias, name, groups=1):
  return layers.Conv2d(features, kernel, stride=stride, padding=padding, groups=groups, use_bias=bias,
                       kernel_init=layers.kaiming_normal_fan_out, dtype=mod.dtype, name=name)


def _bn_factory(mod, train):
  def make(name, zero=False):
    bn = layers.BatchNorm(momentum=mod.bn_momentum, epsilon=mod.bn_eps, dtype=mod.dtype,
                          scale_init=nn.initializers.zeros if zero else nn.initializers.ones, name=name)
    return lambda y: bn(y, use_running_average=not train)

  return make


def _downsample(mod, x, out_ch, train):
  """torch ``downsample = Sequential(conv1x1(stride), BN)`` → Flax ``downsample_0``/``downsample_1``."""
  y = _conv(mod, out_ch, 1, mod.stride, 0, False, "downsample_0")(x)
  return _bn_factory(mod, train)("downsample_1")(y)


class ResNet(nn.Module):
  """torchvision ResNet. Input (B,H,W,C_in) float (C_in is taken from the input; 3 for images).

  Attributes:
    block: ``'basic'`` or ``'bottleneck'`` (torch class names ``BasicBlock``/``Bottleneck`` accepted).
    layers: blocks per stage, e.g. ``(3, 4, 6, 3)``.
    num_classes: size of ``fc``; None: no fc, the pooled features (B, C_out) are returned (FLAIR
      sets ``fc = Identity``).
    width_per_group: bottleneck inner width = planes·width_per_group/64·groups (torchvision).
    groups: grouped 3×3 convs (ResNeXt).
    base_width: stem channels; stage planes = base_width·(1, 2, 4, 8). torchvision: 64.
    last_stride: stride of layer4; 1 gives output stride 16 (CAL / DualAttendMed).
    use_maxpool: False skips the stem max-pool (CRD-Net's ``backbone_forward``).
    conv_bias: BasicBlock 3×3 convs with bias (CAL's BasicBlock); BN stays.
    stem_conv_bias: stem conv with bias (CRD-Net's replacement conv1 for non-RGB inputs).
    bn_eps, bn_momentum: BatchNorm settings, torch's momentum convention.
    zero_init_residual: the last BN of each block starts at scale 0 (torchvision's option).
    dtype: compute dtype (e.g. bf16); parameters stay float32.
    remat: activation rematerialisation of each block in the backward pass, trading compute for
      memory: ``'none'`` (keep every activation), ``'blocks'`` (keep only each block's input and
      recompute the block), ``'dots'`` (also keep its conv outputs; recompute BN and ReLU). The
      stem and head are never rematerialised. Parameter/batch_stats names and values, and so
      checkpoints and ``from_torch``, do not depend on it.
  """

  block: str
  layers: Sequence[int]
  num_classes: int | None = None
  width_per_group: int = 64
  groups: int = 1
  base_width: int = 64
  last_stride: int = 2
  use_maxpool: bool = True
  conv_bias: bool = False
  stem_conv_bias: bool = False
  bn_eps: float = 1e-5
  bn_momentum: float = 0.1
  zero_init_residual: bool = False
  dtype: Dtype | None = None
  remat: str = "none"

  def setup(self):
    kind = canonical_block(self.block)
    if len(self.layers) != 4 or any(int(n) < 1 for n in self.layers):
      raise ValueError(f"ResNet.layers={tuple(self.layers)}: expected 4 positive block counts")
    if kind == "basic" and (self.groups != 1 or self.width_per_group != 64):
      raise ValueError("BasicBlock only supports groups=1 and width_per_group=64 (as torchvision)")
    if self.conv_bias and kind != "basic":
      raise ValueError("conv_bias applies to BasicBlock only (CAL's Bottleneck convs are bias-free)")
    layers.check_remat(self.remat, "ResNet")
    self.conv1 = layers.Conv2d(self.base_width, 7, stride=2, padding=3, use_bias=self.stem_conv_bias,
                               kernel_init=layers.kaiming_normal_fan_out, dtype=self.dtype)
    self.bn1 = layers.BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=self.dtype)
    exp = EXPANSION[kind]
    # train (argument 2, counting self) is a python bool deciding BatchNorm's mode: static under remat.
    block_cls = layers.remat_module(BasicBlock if kind == "basic" else Bottleneck, self.remat, static_argnums=(2,))
    inplanes = self.base_width
    stages = []
    for i, n_blocks in enumerate(self.layers):
      planes = self.base_width * 2**i
      stride = 1 if i == 0 else (self.last_stride if i == 3 else 2)
      blocks = []
      for j in range(int(n_blocks)):
        s = stride if j == 0 else 1
        common = dict(planes=planes, stride=s, downsample=(j == 0 and (s != 1 or inplanes != planes * exp)),
                      bn_eps=self.bn_eps, bn_momentum=self.bn_momentum,
                      zero_init_residual=self.zero_init_residual, dtype=self.dtype)
        if kind == "basic":
          blocks.append(block_cls(conv_bias=self.conv_bias, **common))
        else:
          blocks.append(block_cls(groups=self.groups, width_per_group=self.width_per_group, **common))
        inplanes = planes * exp
      stages.append(blocks)
    # Lists assigned in setup are named <attr>_<index>: layer1_0, layer1_1, ... = torch layer1.0, ...
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    if self.num_classes is not None:
      self.fc = layers.Linear(self.num_classes, dtype=self.dtype)

  @property
  def out_channels(self) -> int:
    """Channels of layer4's output (= pooled feature size)."""
    return self.base_width * 8 * expansion(self.block)

  def stem(self, x: jax.Array, train: bool = False, return_pre_pool: bool = False):
    """conv1 → bn1 → ReLU [→ max-pool 3/2/1]. (B,H,W,C_in) → (B,H/4,W/4,base_width) (H/2 without pool).

    With ``return_pre_pool`` also returns the activation before the max-pool.
    """
    y = nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
    pooled = layers.max_pool2d(y, 3, 2, 1) if self.use_maxpool else layers.materialize(y)
    return (pooled, y) if return_pre_pool else pooled

  def stage(self, name: str, x: jax.Array, train: bool = False) -> jax.Array:
    """Runs ``'layer1'``..``'layer4'`` on its input (B,h,w,C) → (B,h',w',C')."""
    if name not in STAGES[1:5]:
      raise ValueError(f"ResNet.stage({name!r}): expected one of {STAGES[1:5]}")
    for i, blk in enumerate(getattr(self, name)):
      # The residual stream is materialised between blocks and at the stage's end (layers.materialize:
      # XLA:CPU would otherwise recompute the whole chain of earlier blocks inside each consumer, e.g.
      # the transposes of WS-DAN's attention head); a stage's input already has a buffer.
      x = blk(x if i == 0 else layers.materialize(x), train)  # train positional: static under remat
    return layers.materialize(x)

  def head(self, x: jax.Array) -> jax.Array:
    """Global average pool [→ fc]. (B,h,w,C) → (B,num_classes) or (B,C)."""
    pooled = global_avg_pool(x)
    return self.fc(pooled) if self.num_classes is not None else pooled

  def __call__(self, x: jax.Array, train: bool = False, return_taps: bool = False,
               start_at: str = "stem", stop_after: str = "head"):
    """Runs stages ``start_at``..``stop_after`` (of ``STAGES``).

    Args:
      x: (B,H,W,C_in) image for ``start_at='stem'``, else the input of stage ``start_at``
        (e.g. layer3's output when ``start_at='layer4'``).
      train: BatchNorm in train mode (call with ``mutable=['batch_stats']``).
      return_taps: also return the intermediate activations.
      start_at, stop_after: a sub-range of the network; outside the full range the result is the
        feature map (B,h,w,C) of ``stop_after`` (for ``'stem'``: after the max-pool).

    Returns:
      logits (B,num_classes), pooled features (B,C_out) when num_classes is None, or the
      ``stop_after`` feature map; with ``return_taps``, ``(out, taps)`` where taps holds the stages
      that ran: ``'stem'`` (after ReLU, before the max-pool), ``'layer1'``..``'layer4'``
      (B,h,w,C) and ``'pooled'`` (B,C).
    """
    for arg, value in (("start_at", start_at), ("stop_after", stop_after)):
      if value not in STAGES:
        raise ValueError(f"ResNet {arg}={value!r}: expected one of {STAGES}")
    first, last = STAGES.index(start_at), STAGES.index(stop_after)
    if first > last:
      raise ValueError(f"ResNet: start_at={start_at!r} comes after stop_after={stop_after!r}")
    if x.ndim != 4:
      raise ValueError(f"ResNet input: expected (B,H,W,C) NHWC, got shape {x.shape}")
    taps: dict[str, jax.Array] = {}
    for name in STAGES[first:last + 1]:
      if name == "stem":
        x, taps["stem"] = self.stem(x, train=train, return_pre_pool=True)
      elif name == "head":
        x = taps["pooled"] = global_avg_pool(x)
        if self.num_classes is not None:
          x = self.fc(x)
      else:
        x = taps[name] = self.stage(name, x, train=train)
    return (x, taps) if return_taps else x


def global_avg_pool(x: jax.Array) -> jax.Array:
  """``AdaptiveAvgPool2d(1)`` + flatten: (B,h,w,C) → (B,C), accumulated in float32."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)


def _factory(block, blocks, doc):
  def make(**kw) -> ResNet:
    return ResNet(block=block, layers=blocks, **kw)

  make.__doc__ = f"{doc}: ``ResNet(block={block!r}, layers={blocks})``; keyword arguments go to ``ResNet``."
  return make


resnet18 = _factory("basic", (2, 2, 2, 2), "ResNet-18")
resnet34 = _factory("basic", (3, 4, 6, 3), "ResNet-34")
resnet50 = _factory("bottleneck", (3, 4, 6, 3), "ResNet-50")
resnet101 = _factory("bottleneck", (3, 4, 23, 3), "ResNet-101")
resnet152 = _factory("bottleneck", (3, 8, 36, 3), "ResNet-152")


_SPEC_KEYS = frozenset({"block", "layers", "num_classes", "width_per_group", "groups", "base_width",
                        "stem_channels", "stage_planes", "stage_out_channels", "zero_init_residual", "how"})


def from_constructor(spec: Mapping[str, Any], **overrides) -> ResNet:
  """Builds a ResNet from a fixture-style description of a torchvision ResNet.

  ``spec`` is either the constructor kwargs (``block``, ``layers``, ``num_classes``,
  ``width_per_group``, ``groups``, ``base_width``) or ``{'torchvision.models.resnet.ResNet': {...}}``
  as parity ``meta.json`` files write backbones. ``base_width`` there is the stem width (planes
  ``base_width·(1,2,4,8)``; ``stem_channels``/``stage_planes``/``stage_out_channels`` are checked
  against it). Keys it does not know raise. ``overrides`` (e.g. ``num_classes=None``,
  ``last_stride=1``) win over ``spec``.
  """
  spec = dict(spec)
  if len(spec) == 1 and isinstance(next(iter(spec.values())), Mapping):
    spec = dict(next(iter(spec.values())))
  if "block" not in spec or "layers" not in spec:
    raise ValueError(f"ResNet spec {spec}: needs 'block' and 'layers'")
  unknown = sorted(set(spec) - _SPEC_KEYS)
  if unknown:  # e.g. replace_stride_with_dilation: not implemented, so never silently dropped
    raise ValueError(f"ResNet spec: unsupported keys {unknown} (supported: {sorted(_SPEC_KEYS)})")
  base = int(spec.get("base_width", spec.get("stem_channels", 64)))
  block = canonical_block(spec["block"])
  checks = {"stem_channels": [base], "stage_planes": [base * m for m in (1, 2, 4, 8)],
            "stage_out_channels": [base * m * EXPANSION[block] for m in (1, 2, 4, 8)]}
  for key, expected in checks.items():
    if key in spec and [int(c) for c in np.ravel(spec[key])] != expected:
      raise ValueError(f"ResNet spec: {key} {spec[key]} != {expected} implied by base_width {base}")
  kw = dict(block=block, layers=tuple(int(n) for n in spec["layers"]),
            num_classes=spec.get("num_classes", 1000), width_per_group=int(spec.get("width_per_group", 64)),
            groups=int(spec.get("groups", 1)), base_width=base,
            zero_init_residual=bool(spec.get("zero_init_residual", False)))
  kw.update(overrides)
  return ResNet(**kw)


def from_torch(state_dict: Mapping[str, Any], module: ResNet, *, prefix: str = "",
               input_shape: tuple[int, ...] = (1, 64, 64, 3), rename=None, ignore=(),
               source: str = "state_dict") -> dict:
  """torchvision ResNet ``state_dict`` → ``{'params', 'batch_stats'}`` for ``module``.

  Args:
    state_dict: torch key → array (numpy or torch tensors); only keys under ``prefix`` are used
      (e.g. ``'vision_model.model.'``).
    module: the ResNet to fill. With ``num_classes=None`` there is no ``fc`` (torchvision models
      with ``fc = Identity`` have no fc key; an ``fc.*`` key present is an error unless ignored).
    input_shape: NHWC shape used to trace the variable shapes (its channel count matters).
    rename, ignore, source: passed to ``convert.convert_state_dict``.

  Raises:
    convert.ConversionError: naming every unplaced key and every variable left unfilled.
  """
  state_dict = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else v) for k, v in state_dict.items()}
  target = convert.variables_shape(module, jnp.zeros(input_shape, jnp.float32))
  return convert.convert_state_dict(state_dict, target, prefix=prefix, rename=rename, ignore=ignore,
                                    source=source)


def to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Inverse of ``from_torch``: Flax variables → torchvision-style ``state_dict`` of numpy arrays."""
  from flax import traverse_util

  leaf = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
          ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var",
          ("batch_stats", "num_batches_tracked"): "num_batches_tracked"}
  out = {}
  for path, v in traverse_util.flatten_dict(dict(variables)).items():
    key = f"{convert.flax_path_to_torch(path[1:-1])}.{leaf[(path[0], path[-1])]}"
    v = np.asarray(v)
    if path[-1] == "kernel":
      v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
    elif path[-1] == "num_batches_tracked":
      v = v.astype(np.int64)
    out[key] = v
  return out

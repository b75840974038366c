"""PyTorch reference steps for ``python -m jaxretina.bench --against_torch``.

Each reference is the upstream system's training step written plainly in PyTorch at the config's
shapes: the same ResNet / BERT-base towers (parameter counts are printed beside ours), the same
loss structure and the same optimiser, fed the same batch. It is a yardstick for speed on the same
machine in the same run, not a parity reference (``jaxretina.parity`` checks numbers against the real
upstream code). What it leaves out is stated in ``DIFFERENCES``.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Mapping

import numpy as np

from jaxretina import host_memory

DIFFERENCES = {
    "contrastive": "no augmentation in the torch step (ours runs FLAIR's augmentation inside the jitted step)",
    "crd_net": "none in structure (EfficientFormerV2's Attention4D/UFFN and the CMA as CRD-Net codes them)",
    "wsdan": "attention crop/drop by nearest-pixel indexing instead of bilinear resampling; no alignment/diversity terms",
}


def _torch():
  try:
    import torch
  except ImportError as e:  # torch is in the test extra
    raise SystemExit("error: --against_torch needs PyTorch: pip install 'jaxretina[test]'") from e
  return torch


def threads() -> int:
  """The intra-op threads PyTorch runs its reference step on."""
  return _torch().get_num_threads()


def _resnet(torch, block: str, layers, base_width: int, width_per_group: int = 64, last_stride: int = 2,
            in_channels: int = 3, use_maxpool: bool = True):
  """torchvision's ResNet without its classifier (torchvision is not a dependency)."""
  nn = torch.nn

  class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample):
      super().__init__()
      width = int(planes * (width_per_group / 64.0))
      self.conv1, self.bn1 = nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width)
      self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
      self.conv3, self.bn3 = nn.Conv2d(width, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
      self.relu, self.downsample = nn.ReLU(inplace=True), downsample

    def forward(self, x):
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
      return self.relu(out + (self.downsample(x) if self.downsample is not None else x))

  class Basic(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, downsample):
      super().__init__()
      self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
      self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)
      self.relu, self.downsample = nn.ReLU(inplace=True), downsample

    def forward(self, x):
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      return self.relu(out + (self.downsample(x) if self.downsample is not None else x))

  cls = Bottleneck if block == "bottleneck" else Basic
  modules = [nn.Conv2d(in_channels, base_width, 7, 2, 3, bias=in_channels != 3), nn.BatchNorm2d(base_width),
             nn.ReLU(inplace=True)] + ([nn.MaxPool2d(3, 2, 1)] if use_maxpool else [])
  inplanes = base_width
  for i, blocks in enumerate(layers):
    planes = base_width * 2 ** i
    stride = 1 if i == 0 else (last_stride if i == 3 else 2)
    for j in range(blocks):
      down = None
      if j == 0 and (stride != 1 or inplanes != planes * cls.expansion):
        down = nn.Sequential(nn.Conv2d(inplanes, planes * cls.expansion, 1, stride, bias=False),
                             nn.BatchNorm2d(planes * cls.expansion))
      modules.append(cls(inplanes, planes, stride if j == 0 else 1, down))
      inplanes = planes * cls.expansion
  net = nn.Sequential(*modules)
  net.out_channels = inplanes
  return net


def _images(torch, batch: Mapping[str, np.ndarray], key: str):
  x = np.asarray(batch[key], np.float32) / 255.0
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _optimizer(torch, config, params):
  opt = config.optimizer
  lr = float(config.schedule.lr)
  if opt.name == "sgd":
    return torch.optim.SGD(params, lr=lr, momentum=float(opt.momentum),
                           weight_decay=float(opt.weight_decay))
  return torch.optim.AdamW(params, lr=lr, weight_decay=float(opt.weight_decay),
                           betas=(float(opt.b1), float(opt.b2)), eps=float(opt.eps))


def _contrastive_step(torch, config, batch, text_config) -> tuple[Callable[[], float], int]:
  import transformers

  nn, F = torch.nn, torch.nn.functional
  m = config.model
  vision = _resnet(torch, m.vision.block, m.vision.layers, m.vision.base_width,
                   m.vision.width_per_group)
  bert_cfg = transformers.BertConfig(
      vocab_size=text_config.vocab_size, hidden_size=text_config.hidden_size,
      num_hidden_layers=text_config.num_hidden_layers, num_attention_heads=text_config.num_attention_heads,
      intermediate_size=text_config.intermediate_size, max_position_embeddings=text_config.max_position_embeddings,
      hidden_dropout_prob=text_config.hidden_dropout_prob,
      attention_probs_dropout_prob=text_config.attention_probs_dropout_prob)
  text = transformers.BertModel(bert_cfg, add_pooling_layer=False)
  text.config._attn_implementation = "eager"  # FLAIR/KeepFIT ran the eager attention of their transformers
  vision_proj = nn.Linear(vision.out_channels, m.proj_dim, bias=m.proj_bias)
  text_proj = nn.Linear(text_config.hidden_size, m.proj_dim, bias=m.proj_bias)
  with_knowledge = bool(config.knowledge.enabled)
  attention = nn.MultiheadAttention(m.proj_dim, m.attention_heads, dropout=m.attention_dropout,
                                    batch_first=False) if with_knowledge else None
  logit_scale = nn.Parameter(torch.tensor(np.log(1 / m.logit_scale_init), dtype=torch.float32))
  modules = nn.ModuleList([vision, text, vision_proj, text_proj] + ([attention] if with_knowledge else []))
  params = list(modules.parameters()) + [logit_scale]
  opt = _optimizer(torch, config, params)
  clip = float(config.optimizer.grad_clip)
  streams = [("image", "input_ids", "attention_mask")]
  if with_knowledge:
    streams.append(("kd/image", "kd/input_ids", "kd/attention_mask"))
  tensors = [(_images(torch, batch, i), torch.from_numpy(np.asarray(batch[t], np.int64)),
              torch.from_numpy(np.asarray(batch[a], np.int64))) for i, t, a in streams]
  categories = torch.from_numpy(np.asarray(batch["category_id"], np.int64))

  def embed(images, ids, mask):
    img = vision_proj(torch.flatten(F.adaptive_avg_pool2d(vision(images), 1), 1))
    hidden = text(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    pooled = torch.stack([hidden[1], hidden[2], hidden[-1]]).mean(0).mean(1)  # FLAIR's text pooling
    return F.normalize(img, dim=-1), F.normalize(text_proj(pooled), dim=-1)

  def softce(img, txt, target):
    logits = txt @ img.t() * logit_scale.exp()
    target = target / target.sum(-1, keepdim=True)
    return 0.5 * ((-target * F.log_softmax(logits, -1)).sum(-1).mean()
                  + (-target.t() * F.log_softmax(logits.t(), -1)).sum(-1).mean())

  def step() -> float:
    modules.train()
    opt.zero_grad(set_to_none=True)
    img, txt = embed(*tensors[0])
    loss = softce(img, txt, (categories[:, None] == categories[None, :]).float())
    if with_knowledge:
      kd_img, kd_txt = embed(*tensors[1])
      loss = loss + softce(kd_img, kd_txt, torch.eye(kd_img.shape[0]))
      revised, _ = attention(txt[:, None], kd_txt[:, None], kd_txt[:, None])
      loss = loss + float(config.knowledge.weight) * F.mse_loss(revised[:, 0], txt)
    loss.backward()
    if clip:
      torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    return float(loss.detach())

  return step, sum(p.numel() for p in params)


def _wsdan_step(torch, config, batch) -> tuple[Callable[[], float], int]:
  nn, F = torch.nn, torch.nn.functional
  m = config.model
  num_classes, attentions = int(config.data.num_classes), int(m.num_attentions)
  backbone = _resnet(torch, "bottleneck", m.backbone_layers, int(m.backbone_base_width), last_stride=1)
  channels = backbone.out_channels
  reduction = channels // 16
  channel_mlp = nn.Sequential(nn.Conv2d(channels, reduction, 1, bias=False), nn.ReLU(),
                              nn.Conv2d(reduction, channels, 1, bias=False))
  attention_conv = nn.Conv2d(channels, attentions, 1)
  fc = nn.Linear(attentions * channels, num_classes, bias=False)
  modules = nn.ModuleList([backbone, channel_mlp, attention_conv, fc])
  params = list(modules.parameters())
  opt = _optimizer(torch, config, params)
  crop = int(config.data.crop_size or config.data.image_size)
  images = _images(torch, batch, "image")[:, :, :crop, :crop].contiguous()
  labels = torch.from_numpy(np.asarray(batch["label"], np.int64))

  def bap(feats, maps):
    matrix = torch.einsum("imjk,injk->imn", maps, feats) / (feats.shape[2] * feats.shape[3])
    matrix = torch.sign(matrix) * torch.sqrt(matrix.abs() + 1e-12)
    return F.normalize(matrix.reshape(feats.shape[0], -1), dim=-1)

  def forward(x):
    feats = backbone(x)
    weights = torch.sigmoid(channel_mlp(F.adaptive_avg_pool2d(feats, 1)) + channel_mlp(F.adaptive_max_pool2d(feats, 1)))
    enhanced = feats * weights
    maps = attention_conv(enhanced)
    fake = torch.rand_like(maps) * 2
    logits = fc(bap(enhanced, maps) * 100.0)
    return logits, logits - fc(bap(enhanced, fake) * 100.0), maps

  def augment(x, maps):
    with torch.no_grad():
      b, _, h, w = x.shape
      pick = maps[torch.arange(b), torch.randint(0, maps.shape[1], (b,))]
      pick = F.interpolate(pick[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
      mask = pick >= pick.flatten(1).max(1)[0][:, None, None] * 0.5
      rows, cols = mask.any(2), mask.any(1)
      crops = []
      for i in range(b):
        r, c = torch.nonzero(rows[i])[:, 0], torch.nonzero(cols[i])[:, 0]
        if r.numel() and c.numel():  # an all-negative map selects nothing: keep the whole image
          patch = x[i:i + 1, :, int(r.min()):int(r.max()) + 1, int(c.min()):int(c.max()) + 1]
        else:
          patch = x[i:i + 1]
        crops.append(F.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False))
      return torch.cat([torch.cat(crops), x * (~mask)[:, None].float()])

  def step() -> float:
    modules.train()
    opt.zero_grad(set_to_none=True)
    logits, effect, maps = forward(images)
    aug_logits, aug_effect, _ = forward(augment(images, maps.detach()))
    both = torch.cat([labels, labels])
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(effect, labels)
            + F.cross_entropy(aug_logits, both) + F.cross_entropy(aug_effect, both))
    loss.backward()
    opt.step()
    return float(loss.detach())

  return step, sum(p.numel() for p in params)


def _crdnet_step(torch, config, batch, fields) -> tuple[Callable[[], float], int]:
  nn, F = torch.nn, torch.nn.functional
  m = config.model
  names, channels = list(fields), list(fields.values())
  towers = [_resnet(torch, m.backbone_block, m.backbone_layers,
                    int(m.backbone_base_width), in_channels=ch,
                    use_maxpool=not m.skip_stem_maxpool) for ch in channels]
  c = towers[0].out_channels
  dim, heads = int(m.cross_dim) or 2 * c, int(m.num_heads)
  num_classes = int(config.data.num_classes)

  def conv_bn(cin, cout, k=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups), nn.BatchNorm2d(cout))

  class Attention4D(nn.Module):
    def __init__(self):
      super().__init__()
      d = 4 * dim
      self.q, self.k, self.v = conv_bn(c, heads * dim), conv_bn(c, heads * dim), conv_bn(c, heads * d)
      self.v_local = conv_bn(heads * d, heads * d, 3, groups=heads * d)
      self.th1, self.th2 = nn.Conv2d(heads, heads, 1), nn.Conv2d(heads, heads, 1)
      self.proj = nn.Sequential(nn.ReLU(), conv_bn(heads * d, c))

    def forward(self, x):
      b, _, h, w = x.shape
      q = self.q(x).flatten(2).reshape(b, heads, -1, h * w).permute(0, 1, 3, 2)
      k = self.k(x).flatten(2).reshape(b, heads, -1, h * w)
      v_local = self.v_local(self.v(x))
      v = v_local.flatten(2).reshape(b, heads, -1, h * w).permute(0, 1, 3, 2)
      att = self.th2(self.th1(q @ k * dim ** -0.5).softmax(-1))
      out = (att @ v).transpose(2, 3).reshape(b, -1, h, w)
      return self.proj(out)

  def uffn():
    return nn.Sequential(conv_bn(c, 4 * c), nn.GELU(), conv_bn(4 * c, c))

  class CrossGate(nn.Module):
    def __init__(self):
      super().__init__()
      self.att_x, self.att_y, self.mlp_x, self.mlp_y = Attention4D(), Attention4D(), uffn(), uffn()
      self.x_qkv, self.y_qkv = nn.Conv2d(c, 3 * dim, 1), nn.Conv2d(c, 3 * dim, 1)
      self.proj_x, self.proj_y = nn.Conv2d(dim, c, 1), nn.Conv2d(dim, c, 1)
      self.after_x, self.after_y = uffn(), uffn()

    def forward(self, x, y):
      x = x + self.att_x(x)
      y = y + self.att_y(y)
      x, y = x + self.mlp_x(x), y + self.mlp_y(y)
      b, _, h, w = x.shape

      def qkv(conv, t):
        return conv(t).flatten(2).reshape(b, 3, heads, dim // heads, -1).permute(1, 0, 2, 4, 3)

      qx, kx, vx = qkv(self.x_qkv, x)
      qy, ky, vy = qkv(self.y_qkv, y)

      def attend(q, k, v):
        out = ((q @ k.transpose(-1, -2)) * (dim // heads) ** -0.5).softmax(-1) @ v
        return out.permute(0, 1, 3, 2).reshape(b, dim, h, w)

      x, y = self.proj_x(attend(qx, ky, vy)) + x, self.proj_y(attend(qy, kx, vx)) + y
      return self.after_x(x), self.after_y(y)

  gate = CrossGate()
  fusions = [nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1)) for _ in range(2)]
  fc, fc_x, fc_y = nn.Linear(2 * c, num_classes), nn.Linear(c, num_classes), nn.Linear(c, num_classes)
  modules = nn.ModuleList(towers + [gate] + fusions + [fc, fc_x, fc_y])
  params = list(modules.parameters())
  opt = _optimizer(torch, config, params)
  images = [_images(torch, batch, name) for name in names]
  labels = torch.from_numpy(np.asarray(batch["label"], np.int64))

  def step() -> float:
    modules.train()
    opt.zero_grad(set_to_none=True)
    x, y = gate(towers[0](images[0]), towers[1](images[1]))
    fx = F.adaptive_avg_pool2d(fusions[0](x), 1).flatten(1)
    fy = F.adaptive_avg_pool2d(fusions[1](y), 1).flatten(1)
    loss = (F.cross_entropy(fc(torch.cat([fx, fy], 1)), labels) + F.cross_entropy(fc_x(fx), labels)
            + F.cross_entropy(fc_y(fy), labels))
    loss.backward()
    opt.step()
    return float(loss.detach())

  return step, sum(p.numel() for p in params)


def reference_step(config, batch: Mapping[str, np.ndarray], task: Any) -> tuple[Callable[[], float], int, str]:
  """``(step, parameter count, what differs)`` of the PyTorch reference for ``config``."""
  torch = _torch()
  torch.manual_seed(int(config.seed))
  if config.task == "contrastive":
    step, count = _contrastive_step(torch, config, batch, task.text_config)
    return step, count, DIFFERENCES["contrastive"]
  name = config.model.name
  if name == "wsdan":
    step, count = _wsdan_step(torch, config, batch)
    return step, count, DIFFERENCES["wsdan"]
  if name == "crd_net":
    step, count = _crdnet_step(torch, config, batch, task.fields)
    return step, count, DIFFERENCES["crd_net"]
  raise SystemExit(f"error: --against_torch: no PyTorch reference step for model {name!r} "
                   "(available: the contrastive configs, dual_attend_med, crd_net)")


class ReferenceProcess:
  """The PyTorch reference step in a process of its own, run one step at a time on request.

  In one process the two frameworks share a heap and PyTorch's objects: our KeepFIT step took 7.9 s
  before the reference was built and 8.5–8.9 s after, with nothing else changed. Here each keeps
  its own, as in real use, while the steps stay interleaved in time: the child waits, idle, between
  the steps it is asked for (``step_bench`` alternates them in blocks).
  """

  def __init__(self, config, batch: Mapping[str, np.ndarray], task: Any):
    inputs = {"config": config, "batch": {k: np.asarray(v) for k, v in batch.items()},
              "text_config": getattr(task, "text_config", None), "fields": getattr(task, "fields", None)}
    with tempfile.NamedTemporaryFile(prefix="jaxretina_torch_reference_", suffix=".pkl", delete=False) as f:
      pickle.dump(inputs, f)
      self._inputs_path = f.name
    # The environment this process was started with: PyTorch runs as it would without jaxretina (no
    # huge-page setting unless the user gave one, see jaxretina.host_memory).
    self._process = subprocess.Popen([sys.executable, "-m", "jaxretina.bench_torch", self._inputs_path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=host_memory.original_environment())
    built = self._reply()
    self.parameters, self.differences, self.threads = built["parameters"], built["differences"], built["threads"]

  def _reply(self) -> dict:
    line = self._process.stdout.readline()
    if not line:
      code = self._process.wait()
      raise RuntimeError(f"the PyTorch reference process exited ({code}) without answering; its error is above")
    return json.loads(line)

  def step(self) -> tuple[float, float]:
    """(wall seconds, the child's CPU seconds) of one reference step."""
    self._process.stdin.write("step\n")
    self._process.stdin.flush()
    timed = self._reply()
    return timed["wall"], timed["cpu_seconds"]

  def close(self) -> None:
    if self._process.poll() is None:
      self._process.stdin.close()
      self._process.wait(timeout=60)
    os.unlink(self._inputs_path)


class _TaskAttributes:
  def __init__(self, text_config, fields):
    self.text_config, self.fields = text_config, fields


def _serve(inputs_path: str) -> None:
  """The child of ``ReferenceProcess``: builds the step, then times one per ``step`` line on stdin."""
  out = sys.stdout
  sys.stdout = sys.stderr  # stdout carries the replies only: anything a library prints goes to stderr
  with open(inputs_path, "rb") as f:
    inputs = pickle.load(f)
  task = _TaskAttributes(inputs["text_config"], inputs["fields"])
  step, parameters, differences = reference_step(inputs["config"], inputs["batch"], task)
  out.write(json.dumps({"parameters": parameters, "differences": differences, "threads": threads()}) + "\n")
  out.flush()
  for command in sys.stdin:
    if command.strip() != "step":
      raise SystemExit(f"error: unknown command {command.strip()!r} (expected 'step')")
    c0, w0 = time.process_time(), time.perf_counter()
    step()
    wall = time.perf_counter() - w0
    out.write(json.dumps({"wall": wall, "cpu_seconds": time.process_time() - c0}) + "\n")
    out.flush()


if __name__ == "__main__":
  _serve(sys.argv[1])

"""PyTorch twins of the fastadv_jax model zoo, in the references' layouts.

Used by the parity tests (tests/test_interop.py) and the speed benchmarks. The
state-dict keys are those of the reference implementations, so their published
checkpoints load into these modules and `fastadv_jax.interop` converts either:

* `PreActResNetTorch`: Wong et al. (locuslab/fast_adversarial), the GradAlign
  code (tml-epfl/understanding-fast-adv-training) and Rice et al.
  (locuslab/robust_overfitting): `conv1`, `layer1.0.bn1`, `layer1.0.conv1`,
  `layer1.0.bn2`, `layer1.0.conv2`, `layer2.0.shortcut.0`, `bn` (final BN, when
  present), `linear`.
* `SimpleCNNTorch`: the GradAlign code's `CNN(n_conv=1)`: `_model.0` (conv),
  `_model.3` (linear).
* `WideResNetTorch`: Madry / TRADES / Rice `wideresnet.py`: `conv1`,
  `block1.layer.0.{bn1,conv1,bn2,conv2,convShortcut}`, `bn1`, `fc` (and the
  unused `sub_block1` when `sub_block1=True`).
* `ResNet50Torch`: torchvision's `resnet50` layout (`conv1`, `bn1`,
  `layer1.0.{conv1..bn3,downsample.0,downsample.1}`, `fc`) without needing
  torchvision.

Inputs are NCHW in [0, 1]; normalization (when mean/std are given) happens inside
via non-persistent buffers, so it never appears in the state dict, as in the
references (which normalize in the data loader).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _normalizer(module: nn.Module, mean: Optional[Sequence[float]],
                std: Optional[Sequence[float]]) -> None:
  if (mean is None) != (std is None):
    raise ValueError("give both mean and std, or neither")
  module.has_normalization = mean is not None
  if mean is not None:
    module.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                           persistent=False)
    module.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                           persistent=False)


def _normalize(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
  return (x - module.mean) / module.std if module.has_normalization else x


def gradalign_initialize_weights(module: nn.Module) -> None:
  """The GradAlign code's `utils.initialize_weights` (apply with `model.apply`)."""
  if isinstance(module, nn.Conv2d):
    n = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
    module.weight.data.normal_(0, math.sqrt(2. / n))
    if module.bias is not None:
      module.bias.data.zero_()
  elif isinstance(module, nn.Linear):
    module.weight.data.normal_(0, math.sqrt(2. / module.in_features))
    if module.bias is not None:
      module.bias.data.zero_()
  elif isinstance(module, nn.BatchNorm2d):
    module.weight.data.fill_(1)
    module.bias.data.zero_()


class PreActBlockTorch(nn.Module):
  """Pre-activation basic block; `shortcut` picks the projection's input."""
  expansion = 1

  def __init__(self, in_planes: int, planes: int, stride: int = 1,
               shortcut: str = "preact"):
    super().__init__()
    if shortcut not in ("preact", "activated"):
      raise ValueError(f"shortcut must be 'preact' or 'activated', got {shortcut!r}")
    self.shortcut_input = shortcut
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(
          nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

  def forward(self, x):
    out = F.relu(self.bn1(x))
    if hasattr(self, "shortcut"):
      # Wong / GradAlign: self.shortcut(x); Rice: self.shortcut(out).
      shortcut = self.shortcut(x if self.shortcut_input == "preact" else out)
    else:
      shortcut = x
    out = self.conv1(out)
    out = self.conv2(F.relu(self.bn2(out)))
    return out + shortcut


class PreActResNetTorch(nn.Module):
  """PreActResNet-18 and its variants (see fastadv_jax.models.preact_resnet)."""

  def __init__(self, num_classes: int = 10, final_bn: bool = True, shortcut: str = "preact",
               init: str = "torch", mean=None, std=None,
               widths: Sequence[int] = (64, 128, 256, 512),
               stage_sizes: Sequence[int] = (2, 2, 2, 2)):
    super().__init__()
    _normalizer(self, mean, std)
    self.final_bn = final_bn
    self.in_planes = widths[0]
    self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
    for i, (width, num_blocks) in enumerate(zip(widths, stage_sizes)):
      setattr(self, f"layer{i + 1}",
              self._make_layer(width, num_blocks, 1 if i == 0 else 2, shortcut))
    self.num_stages = len(widths)
    if final_bn:
      self.bn = nn.BatchNorm2d(widths[-1])
    self.linear = nn.Linear(widths[-1], num_classes)
    if init == "he_fan_out":
      self.apply(gradalign_initialize_weights)
    elif init != "torch":
      raise ValueError(f"init must be 'torch' or 'he_fan_out', got {init!r}")

  def _make_layer(self, planes, num_blocks, stride, shortcut):
    layers = []
    for s in [stride] + [1] * (num_blocks - 1):
      layers.append(PreActBlockTorch(self.in_planes, planes, s, shortcut))
      self.in_planes = planes
    return nn.Sequential(*layers)

  def forward(self, x):
    out = self.conv1(_normalize(self, x))
    for i in range(self.num_stages):
      out = getattr(self, f"layer{i + 1}")(out)
    if self.final_bn:
      out = F.relu(self.bn(out))
    out = out.mean(dim=(2, 3))  # = avg_pool2d(out, 4) on the 4x4 map of a 32x32 input
    return self.linear(out)


def preact_resnet18_torch(variant: str = "gradalign", **kwargs) -> PreActResNetTorch:
  """The reference variants by name: "gradalign", "wong", "rice" (kwargs override)."""
  cifar = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))
  presets = {
      "gradalign": dict(final_bn=False, shortcut="preact", init="he_fan_out"),
      "wong": dict(final_bn=True, shortcut="preact", init="torch", **cifar),
      "rice": dict(final_bn=True, shortcut="activated", init="torch", **cifar),
  }
  return PreActResNetTorch(**{**presets[variant], **kwargs})


class SimpleCNNTorch(nn.Module):
  """GradAlign's single-layer CNN: `_model` = [conv, ReLU, Flatten, Linear]."""

  def __init__(self, num_classes: int = 10, filters: int = 4, image_size: int = 32,
               in_channels: int = 3, init: str = "he_fan_out", mean=None, std=None):
    super().__init__()
    _normalizer(self, mean, std)
    self._model = nn.Sequential(
        nn.Conv2d(in_channels, filters, 3, stride=1, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(filters * image_size * image_size, num_classes))
    if init == "he_fan_out":
      self.apply(gradalign_initialize_weights)
    elif init != "torch":
      raise ValueError(f"init must be 'torch' or 'he_fan_out', got {init!r}")

  def forward(self, x):
    return self._model(_normalize(self, x))


class WideBasicBlockTorch(nn.Module):
  """The Madry / TRADES / Rice WideResNet block (equalInOut shortcut rule)."""

  def __init__(self, in_planes: int, out_planes: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
    self.equal_in_out = in_planes == out_planes
    self.convShortcut = (None if self.equal_in_out else
                         nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False))

  def forward(self, x):
    activated = F.relu(self.bn1(x))
    out = F.relu(self.bn2(self.conv1(activated)))
    out = self.conv2(out)
    return out + (x if self.equal_in_out else self.convShortcut(activated))


class _NetworkBlock(nn.Module):
  def __init__(self, nb_layers, in_planes, out_planes, stride):
    super().__init__()
    self.layer = nn.Sequential(*[
        WideBasicBlockTorch(in_planes if i == 0 else out_planes, out_planes,
                            stride if i == 0 else 1) for i in range(nb_layers)])

  def forward(self, x):
    return self.layer(x)


class WideResNetTorch(nn.Module):
  """WRN-depth-widen_factor; `sub_block1=True` adds the references' unused block."""

  def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10,
               sub_block1: bool = False, mean=None, std=None):
    super().__init__()
    _normalizer(self, mean, std)
    channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    assert (depth - 4) % 6 == 0
    n = (depth - 4) // 6
    self.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
    self.block1 = _NetworkBlock(n, channels[0], channels[1], 1)
    if sub_block1:
      self.sub_block1 = _NetworkBlock(n, channels[0], channels[1], 1)
    self.block2 = _NetworkBlock(n, channels[1], channels[2], 2)
    self.block3 = _NetworkBlock(n, channels[2], channels[3], 2)
    self.bn1 = nn.BatchNorm2d(channels[3])
    self.fc = nn.Linear(channels[3], num_classes)
    for m in self.modules():  # the reference's init
      if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        m.weight.data.normal_(0, math.sqrt(2. / fan_out))
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.data.fill_(1)
        m.bias.data.zero_()
      elif isinstance(m, nn.Linear):
        m.bias.data.zero_()

  def forward(self, x):
    out = self.conv1(_normalize(self, x))
    out = self.block3(self.block2(self.block1(out)))
    out = F.relu(self.bn1(out))
    return self.fc(out.mean(dim=(2, 3)))


class BottleneckTorch(nn.Module):
  """torchvision's Bottleneck (stride on the 3x3 conv)."""
  expansion = 4

  def __init__(self, in_planes: int, planes: int, stride: int = 1):
    super().__init__()
    out_planes = planes * self.expansion
    self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out_planes)
    self.downsample = None
    if stride != 1 or in_planes != out_planes:
      self.downsample = nn.Sequential(
          nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
          nn.BatchNorm2d(out_planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return F.relu(out + identity)


class ResNet50Torch(nn.Module):
  """torchvision-layout ResNet (ResNet-50 by default), NCHW input in [0, 1]."""

  def __init__(self, num_classes: int = 1000, stage_sizes=(3, 4, 6, 3),
               widths=(64, 128, 256, 512), mean=(0.485, 0.456, 0.406),
               std=(0.229, 0.224, 0.225)):
    super().__init__()
    _normalizer(self, mean, std)
    self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    in_planes = widths[0]
    self.num_stages = len(widths)
    for i, (planes, num_blocks) in enumerate(zip(widths, stage_sizes)):
      blocks = []
      for j in range(num_blocks):
        blocks.append(BottleneckTorch(in_planes, planes, (1 if i == 0 else 2) if j == 0 else 1))
        in_planes = planes * BottleneckTorch.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(in_planes, num_classes)
    for m in self.modules():  # torchvision's init
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)

  def forward(self, x):
    out = self.maxpool(F.relu(self.bn1(self.conv1(_normalize(self, x)))))
    for i in range(self.num_stages):
      out = getattr(self, f"layer{i + 1}")(out)
    return self.fc(out.mean(dim=(2, 3)))


def build_torch_model(name: str, *, num_classes: int = 10, **kwargs) -> nn.Module:
  """The twin of `fastadv_jax.models.get_model(name, ...)` for the names it covers."""
  builders = {
      "preact_resnet18": lambda **kw: PreActResNetTorch(
          **{"final_bn": False, "shortcut": "preact", "init": "he_fan_out", **kw}),
      "preact_resnet18_gradalign": lambda **kw: preact_resnet18_torch("gradalign", **kw),
      "preact_resnet18_wong": lambda **kw: preact_resnet18_torch("wong", **kw),
      "preact_resnet18_rice": lambda **kw: preact_resnet18_torch("rice", **kw),
      "simple_cnn": SimpleCNNTorch,
      "wide_resnet": WideResNetTorch,
      "wrn34_10": lambda **kw: WideResNetTorch(depth=34, widen_factor=10, **kw),
      "wrn28_10": lambda **kw: WideResNetTorch(depth=28, widen_factor=10, **kw),
      "resnet50": ResNet50Torch,
  }
  if name not in builders:
    raise ValueError(f"No PyTorch twin for {name!r}; choose one of {sorted(builders)}.")
  return builders[name](num_classes=num_classes, **kwargs)


def count_torch_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())

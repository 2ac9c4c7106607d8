"""Building blocks shared by the model zoo: initialisers, BatchNorm, normalization.

The references are PyTorch code, so the layers here reproduce PyTorch's
conventions where they matter for reproducing published numbers:

* BatchNorm with PyTorch's momentum 0.1 (Flax `momentum=0.9`, the weight of the
  old running average) and epsilon 1e-5. One small difference remains: PyTorch
  updates `running_var` with the *unbiased* batch variance, Flax with the biased
  one (a factor n/(n-1) with n = batch x height x width values per channel,
  below 1.0005 for CIFAR batches of 128). Normalization itself uses the biased
  variance in both.
* Convolutions with explicit symmetric padding (`padding=1` in PyTorch), never
  "SAME", which pads asymmetrically for stride 2 and would shift every
  downsampled feature map by one pixel relative to the PyTorch models.
* Named initialisation schemes (`INITS`) matching the reference code.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastadv_jax import _checks

Initializer = Callable[..., jax.Array]

# Per-channel statistics used by the reference code for their in-data
# normalization (Wong et al., Rice et al.: `cifar10_mean`, `cifar10_std`).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PyTorch BatchNorm2d defaults: momentum 0.1 weights the *new* batch statistic.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def torch_default_kernel_init() -> Initializer:
  """PyTorch's default Conv2d / Linear weight init, kaiming_uniform_(a=sqrt(5)).

  U(-b, b) with b = gain * sqrt(3 / fan_in), gain = sqrt(2 / (1 + a^2)) =
  sqrt(1/3), i.e. b = 1 / sqrt(fan_in): variance scaling 1/3, uniform.
  """
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def he_fan_out_init() -> Initializer:
  """N(0, 2 / (k*k*out_channels)) for convolutions (He et al. 2015, fan-out mode).

  The GradAlign code's `initialize_weights` and the WideResNet code of
  Madry / TRADES / Rice et al. (`normal_(0, sqrt(2 / n))`, n = k*k*out);
  also torchvision's `kaiming_normal_(mode="fan_out")`. Not truncated.
  """
  return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def he_fan_in_init() -> Initializer:
  """N(0, 2 / in_features): the GradAlign code's Linear init."""
  return nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class InitScheme(NamedTuple):
  """How each kind of parameter is initialised (bias flags: True = PyTorch's
  default uniform bias, False = zeros)."""
  conv_kernel: Callable[[], Initializer]
  conv_bias_torch: bool      # True: PyTorch default uniform bias; False: zeros
  dense_kernel: Callable[[], Initializer]
  dense_bias_torch: bool


# Named schemes; each reproduces one reference codebase.
INITS = {
    # PyTorch defaults (Wong et al., Rice et al. / ZeroGrad, AdvLC).
    "torch": InitScheme(torch_default_kernel_init, True, torch_default_kernel_init, True),
    # GradAlign code (utils.initialize_weights): He fan-out convs, N(0, 2/in)
    # linear, all biases zero.
    "he_fan_out": InitScheme(he_fan_out_init, False, he_fan_in_init, False),
    # torchvision ResNet: He fan-out convs, PyTorch-default Linear.
    "torchvision": InitScheme(he_fan_out_init, False, torch_default_kernel_init, True),
    # WideResNet of Madry / TRADES / Rice et al.: He fan-out convs,
    # PyTorch-default Linear weight, Linear bias zero.
    "wrn": InitScheme(he_fan_out_init, False, torch_default_kernel_init, False),
}


def check_init(init: str) -> None:
  _checks.check_choice("init", init, INITS)


# Input channels up to which `conv(..., im2col=True)` runs as patches x matrix
# (the image convolution, 3 channels in). XLA:CPU's own convolution is slow for
# so few input channels: on a 2-core CPU the single-layer CNN's forward pass
# and input gradient ran 1.3-2.6x faster as im2col (benchmarks/bench_input_conv.py,
# benchmarks/README_parity.md), and its FGSM train step 1.2-1.3x faster
# (benchmarks/README.md, "The single-layer CNN with an im2col stem"); GradAlign's
# double backprop ran slower. Evaluation sets it on CPU
# (`closures.eval_logits_fn`); training takes it as a model keyword.
IM2COL_MAX_IN_FEATURES = 4


def _patches(x, kernel_hw, strides, padding):
  """(B, H', W', kh*kw*C): the kh*kw shifted (strided) views of the padded x."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  out_h = (x.shape[1] - kh) // sh + 1
  out_w = (x.shape[2] - kw) // sw + 1
  # Stacked on a new axis, not concatenated along channels: the same array,
  # but XLA:CPU then writes it in one pass; concatenated, each view was its own
  # fusion and copied again, and inside the Square attack's loop 100 queries
  # took 0.48 s instead of 0.30 s, 100 APGD-CE iterations 0.31 s instead of
  # 0.20 s (batch 96 and 48, 16 filters).
  views = jnp.stack([x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
                     for i in range(kh) for j in range(kw)], axis=3)
  return views.reshape(views.shape[:3] + (-1,))


def image_conv(x, kernel, strides, padding):
  """`lax.conv_general_dilated` (NHWC, HWIO, explicit padding) computed as
  im2col: the patches of `x` times the flattened kernel. The same function to
  float rounding, differentiated by JAX like any matmul: the weight gradient
  reuses the forward pass's patches (faster than XLA:CPU's convolution for an
  image's few channels, and no convolution left in any derivative).
  """
  kh, kw, c, f = kernel.shape
  return jnp.dot(_patches(x, (kh, kw), strides, padding), kernel.reshape(kh * kw * c, f))


class _ImageConv:
  """Flax `conv_general_dilated_cls` running `image_conv` where it applies
  (no dilation, no groups, explicit padding, the NHWC/HWIO layout Flax uses),
  `lax.conv_general_dilated` otherwise."""

  def __call__(self, lhs, rhs, window_strides, padding, *, lhs_dilation=None,
               rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
               precision=None):
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    plain = (lhs.ndim == 4 and not isinstance(padding, str) and feature_group_count == 1
             and all(d == 1 for d in (lhs_dilation or (1, 1)))
             and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                                dimension_numbers) == nhwc
             and precision is None)
    if not plain:
      return jax.lax.conv_general_dilated(
          lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
          rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
          feature_group_count=feature_group_count, precision=precision)
    return image_conv(lhs, rhs, tuple(window_strides),
                      tuple(tuple(int(p) for p in pair) for pair in padding))


def conv(features: int, kernel: int, stride: int = 1, *, padding: int,
         in_features: int, init: str, use_bias: bool = False, dtype: Any = jnp.float32,
         im2col: bool = False, name: Optional[str] = None) -> nn.Conv:
  """A Conv with PyTorch's symmetric zero padding and the chosen init scheme.

  With `im2col` and at most `IM2COL_MAX_IN_FEATURES` input channels it runs
  through `image_conv` (the same parameters and function).
  """
  scheme = INITS[init]
  bias_init = (torch_default_bias_init(in_features * kernel * kernel)
               if scheme.conv_bias_torch else nn.initializers.zeros_init())
  use_im2col = im2col and in_features <= IM2COL_MAX_IN_FEATURES
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                 kernel_init=scheme.conv_kernel(), bias_init=bias_init,
                 dtype=dtype, param_dtype=jnp.float32, name=name,
                 conv_general_dilated_cls=_ImageConv if use_im2col else None)


def dense(features: int, *, in_features: int, init: str, dtype: Any = jnp.float32,
          name: Optional[str] = None) -> nn.Dense:
  """A Dense layer (PyTorch Linear) with the chosen init scheme."""
  scheme = INITS[init]
  bias_init = (torch_default_bias_init(in_features) if scheme.dense_bias_torch
               else nn.initializers.zeros_init())
  return nn.Dense(features, kernel_init=scheme.dense_kernel(), bias_init=bias_init,
                  dtype=dtype, param_dtype=jnp.float32, name=name)


def batch_norm(train: bool, *, dtype: Any = jnp.float32,
               name: Optional[str] = None) -> nn.BatchNorm:
  """BatchNorm2d with PyTorch's momentum (0.1) and epsilon (1e-5).

  Per-device statistics under pmap (no `axis_name`), as on one GPU in the
  references. Running averages live in the "batch_stats" collection.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                      epsilon=BN_EPSILON, dtype=dtype, param_dtype=jnp.float32,
                      # Two-pass variance, as PyTorch: E[x²] − E[x]² loses float32
                      # precision on channels with mean² ≫ variance (2% error in
                      # a GradAlign g2 in the lockstep parity check).
                      use_fast_variance=False, name=name)


def check_mean_std(mean: Optional[Sequence[float]], std: Optional[Sequence[float]],
                   channels: Optional[int] = None) -> None:
  """Raises unless mean/std are both None or both per-channel sequences."""
  if (mean is None) != (std is None):
    raise ValueError(
        f"Give both mean and std for the in-model normalization, or neither; "
        f"got mean={mean!r}, std={std!r}.")
  if mean is None:
    return
  if len(mean) != len(std):
    raise ValueError(f"mean {mean!r} and std {std!r} have different lengths.")
  if channels is not None and len(mean) not in (1, channels):
    raise ValueError(
        f"mean/std have {len(mean)} entries but the images have {channels} channels.")
  if any(s <= 0 for s in std):
    raise ValueError(f"std must be > 0 per channel, got {std!r}.")


def normalize(x: jax.Array, mean: Optional[Sequence[float]],
              std: Optional[Sequence[float]], dtype: Any) -> jax.Array:
  """(x - mean) / std per channel in float32, then cast to the compute dtype.

  Images come in as NHWC in [0, 1]; attacks work in that pixel space and the
  normalization is part of the model (the references normalize in the data
  loader and rescale ε by std, which is the same function of the pixels).
  """
  x = jnp.asarray(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 kept (parity checks)
  if mean is not None:
    check_mean_std(mean, std, x.shape[-1])
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return x.astype(dtype)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes of an NHWC map.

  The CIFAR references call `avg_pool2d(out, 4)` (`8` for WideResNet) on the
  final 4x4 (8x8) map of a 32x32 input, which is the same thing; the global
  mean also works for other input sizes.
  """
  return jnp.mean(x, axis=(1, 2))

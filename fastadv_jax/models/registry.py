"""Models by name: the registry configs and the CLI select architectures from.

Every constructor takes `num_classes`, `dtype` and architecture keywords, checks
them at this boundary (a clear ValueError before any compilation) and returns a
Linen module with `__call__(x, train=False)`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import _checks
from fastadv_jax.models import common
from fastadv_jax.models.preact_resnet import SHORTCUTS, PreActResNet
from fastadv_jax.models.resnet import ResNet
from fastadv_jax.models.simple_cnn import SimpleCNN
from fastadv_jax.models.wide_resnet import WideResNet


def _check_common(num_classes: int, dtype: Any, init: str,
                  mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> None:
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
  try:
    dt = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"dtype {dtype!r} is not a dtype.") from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype (float32, bfloat16, ...), got {dtype!r}.")
  common.check_init(init)
  common.check_mean_std(mean, std)


def _check_stages(stage_sizes: Sequence[int], widths: Sequence[int]) -> None:
  if len(stage_sizes) != len(widths) or not stage_sizes:
    raise ValueError(
        f"stage_sizes {tuple(stage_sizes)!r} and widths {tuple(widths)!r} must be "
        f"non-empty and of the same length.")
  if any(int(v) < 1 for v in (*stage_sizes, *widths)):
    raise ValueError(
        f"stage_sizes {tuple(stage_sizes)!r} and widths {tuple(widths)!r} must be positive.")


def _tuple(values: Optional[Sequence[float]]) -> Optional[tuple]:
  return None if values is None else tuple(float(v) for v in values)


def preact_resnet18(*, num_classes: int = 10, dtype: Any = jnp.float32,
                    final_bn: bool = False, shortcut: str = "preact",
                    init: str = "he_fan_out", mean: Optional[Sequence[float]] = None,
                    std: Optional[Sequence[float]] = None,
                    widths: Sequence[int] = (64, 128, 256, 512),
                    stage_sizes: Sequence[int] = (2, 2, 2, 2),
                    remat: bool = False, im2col_stem: bool = False) -> PreActResNet:
  """PreActResNet-18; the defaults are the GradAlign code's variant.

  Args:
    num_classes: number of logits.
    dtype: compute dtype (parameters float32).
    final_bn: BN + ReLU before pooling (Wong, Rice: True; GradAlign: False).
    shortcut: "preact" (projection on the block input; Wong, GradAlign) or
      "activated" (on relu(bn1(x)); Rice).
    init: "torch" (PyTorch default) or "he_fan_out" (GradAlign).
    mean, std: per-channel normalization inside the model, or None.
    widths, stage_sizes: channels and blocks per stage (tiny test models).
    remat: recompute each block's activations in the backward pass (see
      `PreActResNet.remat`; a speed setting, the function is the same).
    im2col_stem: compute the stem convolution as im2col (see
      `PreActResNet.im2col_stem`; a speed setting on CPU, the same function).
  Returns:
    A `PreActResNet` module.
  """
  _check_common(num_classes, dtype, init, mean, std)
  _checks.check_choice("shortcut", shortcut, SHORTCUTS)
  _check_stages(stage_sizes, widths)
  _checks.check_choice("remat", remat, (False, True))
  _checks.check_choice("im2col_stem", im2col_stem, (False, True))
  return PreActResNet(num_classes=int(num_classes), stage_sizes=tuple(map(int, stage_sizes)),
                      widths=tuple(map(int, widths)), final_bn=bool(final_bn),
                      shortcut=shortcut, init_scheme=init, mean=_tuple(mean), std=_tuple(std),
                      dtype=dtype, remat=bool(remat), im2col_stem=bool(im2col_stem))


def _preset(base: Callable[..., nn.Module], doc: str, **preset_kwargs) -> Callable[..., nn.Module]:
  """A constructor with preset defaults that the caller may still override."""

  @functools.wraps(base)
  def constructor(**kwargs):
    return base(**{**preset_kwargs, **kwargs})

  constructor.__doc__ = doc
  constructor.preset_kwargs = dict(preset_kwargs)
  return constructor


preact_resnet18_gradalign = _preset(
    preact_resnet18,
    "PreActResNet-18 of the GradAlign code: no final BN (11,171,146 parameters), "
    "projection shortcut on the pre-activation input, He fan-out init, no normalization.",
    final_bn=False, shortcut="preact", init="he_fan_out", mean=None, std=None)

preact_resnet18_wong = _preset(
    preact_resnet18,
    "PreActResNet-18 of Wong et al. (fast_adversarial): final BN + ReLU "
    "(11,172,170 parameters), projection shortcut on the pre-activation input, "
    "PyTorch default init, CIFAR-10 mean/std normalization (done in their data loader, "
    "here inside the model; pass mean=None, std=None to drop it).",
    final_bn=True, shortcut="preact", init="torch",
    mean=common.CIFAR10_MEAN, std=common.CIFAR10_STD)

preact_resnet18_rice = _preset(
    preact_resnet18,
    "PreActResNet-18 of Rice et al. (robust_overfitting; used by ZeroGrad/MultiGrad): "
    "final BN + ReLU, projection shortcut on the activated input, PyTorch default "
    "init, CIFAR-10 mean/std normalization inside the model.",
    final_bn=True, shortcut="activated", init="torch",
    mean=common.CIFAR10_MEAN, std=common.CIFAR10_STD)


def resnet50(*, num_classes: int = 10, dtype: Any = jnp.float32, init: str = "torchvision",
             mean: Optional[Sequence[float]] = common.IMAGENET_MEAN,
             std: Optional[Sequence[float]] = common.IMAGENET_STD,
             widths: Sequence[int] = (64, 128, 256, 512),
             stage_sizes: Sequence[int] = (3, 4, 6, 3),
             im2col_stem: bool = False) -> ResNet:
  """torchvision-layout ResNet-50 (25,557,032 parameters with num_classes=1000).

  Normalizes with the ImageNet mean/std by default, as Wong et al.'s ImageNet
  code does in its data loader; pass mean=None, std=None for none.
  `im2col_stem`: see `ResNet.im2col_stem` (a speed setting on CPU).
  """
  _check_common(num_classes, dtype, init, mean, std)
  _check_stages(stage_sizes, widths)
  _checks.check_choice("im2col_stem", im2col_stem, (False, True))
  return ResNet(num_classes=int(num_classes), stage_sizes=tuple(map(int, stage_sizes)),
                widths=tuple(map(int, widths)), init_scheme=init, mean=_tuple(mean),
                std=_tuple(std), dtype=dtype, im2col_stem=bool(im2col_stem))


def wide_resnet(*, num_classes: int = 10, dtype: Any = jnp.float32, depth: int = 34,
                widen_factor: int = 10, init: str = "wrn",
                mean: Optional[Sequence[float]] = None,
                std: Optional[Sequence[float]] = None,
                im2col_stem: bool = False) -> WideResNet:
  """WideResNet-depth-widen_factor in the Madry / TRADES / Rice layout.

  `im2col_stem`: see `WideResNet.im2col_stem` (a speed setting on CPU).
  """
  _check_common(num_classes, dtype, init, mean, std)
  _checks.check_choice("im2col_stem", im2col_stem, (False, True))
  if not isinstance(depth, (int, np.integer)) or depth < 10 or (depth - 4) % 6:
    raise ValueError(
        f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth!r}.")
  if not isinstance(widen_factor, (int, np.integer)) or widen_factor < 1:
    raise ValueError(f"widen_factor must be a positive integer, got {widen_factor!r}.")
  return WideResNet(depth=int(depth), widen_factor=int(widen_factor),
                    num_classes=int(num_classes), init_scheme=init, mean=_tuple(mean),
                    std=_tuple(std), dtype=dtype, im2col_stem=bool(im2col_stem))


def _fixed_wrn(depth: int, widen_factor: int) -> Callable[..., WideResNet]:
  def constructor(**kwargs):
    fixed = {"depth", "widen_factor"} & set(kwargs)
    if fixed:
      raise ValueError(
          f"wrn{depth}_{widen_factor} fixes {sorted(fixed)}; use get_model('wide_resnet', "
          f"depth=..., widen_factor=...) for other sizes.")
    return wide_resnet(depth=depth, widen_factor=widen_factor, **kwargs)

  constructor.__doc__ = f"WRN-{depth}-{widen_factor} (`wide_resnet` with fixed size)."
  constructor.__signature__ = inspect.signature(wide_resnet).replace(parameters=[
      p for p in inspect.signature(wide_resnet).parameters.values()
      if p.name not in ("depth", "widen_factor")])
  return constructor


def simple_cnn(*, num_classes: int = 10, dtype: Any = jnp.float32, filters: int = 4,
               init: str = "he_fan_out", mean: Optional[Sequence[float]] = None,
               std: Optional[Sequence[float]] = None, im2col_stem: bool = False) -> SimpleCNN:
  """Single-layer CNN of GradAlign §4: conv3x3(filters, bias) -> ReLU -> linear.

  `im2col_stem` computes the convolution as im2col (`SimpleCNN.im2col_stem`):
  the same function and parameters, a faster FGSM/PGD train step on CPU
  (benchmarks/README.md), a slower GradAlign one.
  """
  _check_common(num_classes, dtype, init, mean, std)
  _checks.check_choice("im2col_stem", im2col_stem, (False, True))
  if not isinstance(filters, (int, np.integer)) or filters < 1:
    raise ValueError(f"filters must be a positive integer, got {filters!r}.")
  return SimpleCNN(num_classes=int(num_classes), filters=int(filters), init_scheme=init,
                   mean=_tuple(mean), std=_tuple(std), dtype=dtype,
                   im2col_stem=bool(im2col_stem))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "preact_resnet18": preact_resnet18,
    "preact_resnet18_gradalign": preact_resnet18_gradalign,
    "preact_resnet18_wong": preact_resnet18_wong,
    "preact_resnet18_rice": preact_resnet18_rice,
    "resnet50": resnet50,
    "wide_resnet": wide_resnet,
    "wrn34_10": _fixed_wrn(34, 10),
    "wrn28_10": _fixed_wrn(28, 10),
    "simple_cnn": simple_cnn,
}


def _allowed_kwargs(constructor: Callable[..., nn.Module]) -> list[str]:
  return [name for name in inspect.signature(constructor).parameters
          if name not in ("num_classes", "dtype")]


def get_model(name: str, *, num_classes: int = 10, dtype: Any = jnp.float32,
              **kwargs) -> nn.Module:
  """Builds a registered model.

  Args:
    name: one of `MODELS`.
    num_classes: number of logits (ResNet-50 on ImageNet: pass 1000).
    dtype: compute dtype (jnp.float32 or jnp.bfloat16); parameters stay float32.
    **kwargs: architecture keywords of that model (e.g. final_bn, shortcut,
      init, mean, std, widths, stage_sizes for the PreActResNets; depth,
      widen_factor for wide_resnet; filters for simple_cnn).
  Returns:
    A Flax Linen module with `__call__(x, train=False) -> float32 logits`.
  Raises:
    ValueError: unknown name, unknown keyword, or a bad keyword value.
  """
  _checks.check_choice("model", name, MODELS)
  constructor = MODELS[name]
  allowed = _allowed_kwargs(constructor)
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(
        f"Unknown keyword(s) {unknown} for model {name!r}; it accepts {sorted(allowed)}.")
  return constructor(num_classes=num_classes, dtype=dtype, **kwargs)


def _dummy_input(image_shape: Sequence[int]) -> jax.Array:
  image_shape = tuple(int(s) for s in image_shape)
  if len(image_shape) != 3 or min(image_shape) < 1:
    raise ValueError(f"image_shape must be (height, width, channels), got {image_shape!r}.")
  return jnp.zeros((1, *image_shape), jnp.float32)


def _plain(variables: Mapping[str, Any]) -> dict:
  """A plain dict with only the collections the model has."""
  out = {}
  for collection in ("params", "batch_stats"):
    if collection in variables:
      out[collection] = jax.tree_util.tree_map(lambda v: v, dict(variables[collection]))
  return out


def init_variables(model: nn.Module, key: jax.Array,
                   image_shape: Sequence[int] = (32, 32, 3)) -> dict:
  """Initial variables of `model` for images of `image_shape` (H, W, C).

  Returns:
    `{"params": ..., "batch_stats": ...}` as plain dicts; no "batch_stats" key
    for models without BatchNorm. Parameters are float32.
  """
  x = _dummy_input(image_shape)
  variables = jax.jit(functools.partial(model.init, train=False))(key, x)
  return _plain(variables)


def abstract_variables(model: nn.Module, image_shape: Sequence[int] = (32, 32, 3)) -> dict:
  """Shapes and dtypes of `model`'s variables (jax.eval_shape: nothing is computed)."""
  x = _dummy_input(image_shape)
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.key(0), x)
  return _plain(variables)


def count_params(variables_or_params: Any) -> int:
  """Number of scalar parameters.

  Args:
    variables_or_params: a variables dict (only its "params" collection is
      counted), a params tree, or either as `jax.ShapeDtypeStruct`s.
  """
  tree = variables_or_params
  if isinstance(tree, Mapping) and "params" in tree:
    tree = tree["params"]
  return int(sum(int(np.prod(getattr(leaf, "shape", np.shape(leaf))))
                 for leaf in jax.tree_util.tree_leaves(tree)))

"""Model zoo: Flax Linen classifiers taking NHWC images in [0, 1].

Every model has `__call__(x, train=False) -> float32 logits`, optional
per-channel normalization inside (mean/std), a compute `dtype` with float32
parameters, and BatchNorm (where present) with PyTorch's momentum and epsilon,
its running averages in the "batch_stats" collection.

  model = models.get_model("preact_resnet18_gradalign")
  variables = models.init_variables(model, jax.random.key(0))
  logits = model.apply(variables, x)                      # eval-mode BN
  logits, updates = model.apply(variables, x, train=True,
                                mutable=["batch_stats"])  # batch statistics
"""

from fastadv_jax.models.common import (
    CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD,
    INITS)
from fastadv_jax.models.preact_resnet import PreActBlock, PreActResNet
from fastadv_jax.models.registry import (
    MODELS, abstract_variables, count_params, get_model, init_variables)
from fastadv_jax.models.resnet import Bottleneck, ResNet
from fastadv_jax.models.simple_cnn import SimpleCNN
from fastadv_jax.models.wide_resnet import WideBasicBlock, WideResNet

__all__ = [
    "MODELS", "get_model", "init_variables", "abstract_variables", "count_params",
    "PreActResNet", "PreActBlock", "ResNet", "Bottleneck", "WideResNet", "WideBasicBlock",
    "SimpleCNN", "INITS", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD",
    "IMAGENET_MEAN", "IMAGENET_STD",
]

r"""CIFAR-100 configs (ZeroGrad/MultiGrad paper, Table 2; GradAlign runs by analogy).

  fastadv-train --config configs/cifar100.py:zerograd --workdir runs/c100_zg

Variants and expected PGD-50-10 results (PreActResNet-18, one GPU, ../shared/REFERENCE.md):
  zerograd   ZeroGrad q=0.45, RandomRotation(15), reflect padding   53.70 clean / 25.08 robust
  multigrad  MultiGrad N=3                                          53.32 / 25.31
  fgsm_rs    FGSM-RS α=1.25ε (baseline)                             (not in REFERENCE.md's table)
  gradalign  FGSM + GradAlign with the CIFAR-10 λ rule              (not in REFERENCE.md's table)

Hardware: GPU (30 epochs of a PreActResNet-18).
"""

import os

from fastadv_jax import config_base

import ml_collections


def _cifar10_config(variant: str) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10.py")
  return config_base.load_config_file(path, variant)


VARIANTS = ("zerograd", "multigrad", "fgsm_rs", "gradalign")


def get_config(variant: str = "zerograd") -> ml_collections.ConfigDict:
  config_base.check_variant("CIFAR-100", variant, VARIANTS)
  config = _cifar10_config(variant)
  config.dataset = "cifar100"
  config.num_classes = 100
  if variant == "zerograd":
    config.attack.kwargs.q = 0.45
  if variant in ("zerograd", "multigrad"):
    config.model.kwargs = ml_collections.ConfigDict(dict(mean=(0.5071, 0.4865, 0.4409),
                                                         std=(0.2673, 0.2564, 0.2762)))
    config.augment.rotation = 15.0  # RandomRotation(15) of the ZeroGrad paper
  return config

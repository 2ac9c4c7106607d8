r"""SVHN configs (GradAlign paper Table 5; ZeroGrad paper).

  fastadv-train --config configs/svhn.py:gradalign --workdir runs/svhn_ga

Variants and expected PGD-50-10 results (PreActResNet-18, one GPU, ../shared/REFERENCE.md):
  gradalign  FGSM + GradAlign λ=1.5625·1.6^(ε/8) (2.5 at ε=8)   92.36 clean / 42.08 robust
  fgsm_rs    FGSM-RS                                           (GradAlign Fig. 2)
  pgd2_gradalign  PGD-2 + GradAlign λ=0.5
  zerograd   ZeroGrad (15 ep, lr_max 0.01, no augmentation)     (ZeroGrad paper)
  free       AT for Free, m=8, 45 replayed epochs, lr_max 0.01

All: 15 epochs, lr_max 0.05, no flip; the FGSM step (FGSM-based methods) or ε
(PGD) ramps linearly from 0 over the first 5 epochs, as in the GradAlign code
(GradAlign's η is not ramped). Without it training collapses to the majority class.
Hardware: GPU.
"""

import os

from fastadv_jax import config_base

import ml_collections


def _cifar10_config(variant: str) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cifar10.py")
  return config_base.load_config_file(path, variant)


VARIANTS = ("gradalign", "fgsm_rs", "pgd2_gradalign", "zerograd", "free")


def get_config(variant: str = "gradalign") -> ml_collections.ConfigDict:
  config_base.check_variant("SVHN", variant, VARIANTS)
  config = _cifar10_config(variant)
  config.dataset = "svhn_cropped"
  config.num_classes = 10
  config.num_epochs = 15
  config.schedule.lr_max = 0.05
  config.augment.flip = False
  is_pgd = config.attack.name == "pgd"
  config.warmup.update(epochs=5.0, target="eps" if is_pgd else "step")
  if variant == "gradalign":
    config.regularizers.grad_align.lambda_rule = "svhn"
  if variant == "pgd2_gradalign":
    config.regularizers.grad_align.weight = 0.5
  if variant == "zerograd":
    config.schedule.lr_max = 0.01
    config.augment.update(padding=0, flip=False)
    config.warmup.epochs = 0.0
  if variant == "free":
    config.num_epochs = 45
    config.schedule.lr_max = 0.01
  return config

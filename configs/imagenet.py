r"""ImageNet configs (Wong et al. 2020 recipe; GradAlign paper Table 6).

  fastadv-train --config configs/imagenet.py:fgsm_rs --config.eps=4 --workdir runs/in_fgsm_rs

Variants and expected results (ResNet-50, clean on the full validation set,
PGD-50-10 robust accuracy on 1,000 points; ../shared/REFERENCE.md):
  fgsm_rs    FGSM-RS, step 1.25ε                   ε=4: 56.9 / 30.6 (FGSM in Table 6); ε=6: 36.6 / 0.1
  gradalign  FGSM-RS + GradAlign, λ 0.01 (ε=2, 4), 0.1 (ε=6)      ε=4: 57.8 / 30.5; ε=6: 51.5 / 20.3

Recipe: 15 epochs in three phases (epochs 0-6 at 128 px crops of images
pre-resized to 160, batch 512; 6-12 at 224 px, batch 224 (GradAlign: 180);
12-15 at 288 px, batch 128 (GradAlign: 100)); learning rate 0 -> 0.4 at epoch 1
-> 0.04 at 6 -> 0.004 at 12 -> 0.0004 at 15, piecewise linear per epoch; SGD
momentum 0.9, weight decay 1e-4, none on BatchNorm; evaluation on 288 px centre
crops. Hardware: 8 GPUs or a TPU pod slice, under pmap.

The data must be prepared once as TFDS ArrayRecord (see README, "Datasets").
"""

from fastadv_jax import config_base
from fastadv_jax import regularizers

import ml_collections


VARIANTS = ("fgsm_rs", "gradalign")


def get_config(variant: str = "fgsm_rs") -> ml_collections.ConfigDict:
  config_base.check_variant("ImageNet", variant, VARIANTS)
  config = config_base.base_config()
  config.variant = variant
  config.dataset = "imagenet2012"
  config.num_classes = 1000
  config.data.source = "tfds"
  config.model.name = "resnet50"
  config.dtype = "bfloat16"
  config.eps = 4.0
  config.attack.name = "fgsm_rs"
  config.attack.step_eps_ratio = 1.25
  config.num_epochs = 15
  config.batch_size = 512
  config.optimizer.update(name="sgd", momentum=0.9, weight_decay=1e-4, decay_bn=False)
  config.schedule.update(name="imagenet_wong", lr_max=0.4)
  config.schedule.kwargs = ml_collections.ConfigDict()
  # Progressive resizing (Wong et al.): (first epoch, crop size, pre-resize, batch size).
  config.imagenet_phases = ml_collections.ConfigDict(dict(
      start_epochs=[0, 6, 12], crop_sizes=[128, 224, 288], resize_sizes=[160, 352, 352],
      batch_sizes=[512, 224, 128], eval_size=288))
  config.evals.test.update(n=1000, batch_size=100, pgd_steps=10)
  # best/ by PGD-10 on the first 256 images of the first training batch (128 px
  # crops), never on the validation set that is reported.
  config.evals.train_pgd = config_base.default_eval(
      split="train", n=256, batch_size=128, metrics=["clean_acc", "pgd_acc"])
  config.best.eval = "train_pgd"
  config.final_eval.update(n=1000, steps=50, restarts=10, batch_size=100)
  config.augment.update(padding=0, flip=True)
  if variant == "gradalign":
    config.regularizers.grad_align = ml_collections.ConfigDict(
        dict(weight=0.01, lambda_rule="", formulation=regularizers.DEFAULT_FORMULATION))
    config.imagenet_phases.batch_sizes = [512, 180, 100]
  return config

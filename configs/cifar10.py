r"""CIFAR-10 configs: every published setting of the four papers, by name.

Usage (big_vision style, a variant after the colon):

  fastadv-train --config configs/cifar10.py:gradalign --workdir runs/ga
  fastadv-train --config configs/cifar10.py:gradalign --config.eps=16 --workdir runs/ga16

Variants (expected results: PGD-50-10 on CIFAR-10 from ../shared/REFERENCE.md,
PreActResNet-18, one GPU; on the JPEG copy of CIFAR-10 used on machines without
internet expect numbers close to, not equal to, these):

  fgsm            FGSM, α=ε, lr_max 0.2, 30 ep.       85.16 clean / 0.02 robust (CO) at ε=8
  fgsm_rs         FGSM-RS, α=1.25ε (Wong et al.)       84.32 / 45.10 at ε=8; 0.00 robust at ε=16
  gradalign       FGSM + GradAlign, λ=0.02·10^(ε/8)    81.00 / 47.58 (AA 44.54) at ε=8; 58.46 / 28.88 at ε=16
  pgd2, pgd10     PGD-2 α=ε/2, PGD-10 α=2ε/10, no RS   82.15 / 48.43 and 81.88 / 50.04
  pgd2_gradalign  PGD-2 + GradAlign λ=0.1              (GradAlign Fig. 9)
  cure, igr       FGSM + CURE λ=700 / + IGR λ=1000     80.20 / 47.25 and 77.47 / 46.69
                  (λ depends on the gradient convention, REFERENCE.md: here
                  that of the CURE and GradAlign code, gradients of the
                  batch-mean CE reduced per example and averaged,
                  scale=batch_mean_averaged; the per-example convention is B²
                  times larger and made λ·IGR ~1e5 × the CE at initialisation)
  fgsm_early_stop FGSM α=7/255 with early stopping     45.35 robust
  zerograd        ZeroGrad q=0.35 (Rice PRN-18, fp32)  81.61 / 47.55
  multigrad       MultiGrad N=3                        81.38 / 47.85
  n_fgsm          N-FGSM (de Jorge et al. 2022)        not in REFERENCE.md's table
  free            AT for Free, m=8 replays, 96 epochs of 390 steps (37,440 steps, one
                  schedule; 12 passes over the data)   (GradAlign Fig. 1 baseline)
  fgsm_elle       FGSM + ELLE λ=1000 (ε ≤ 8; 5000 for ε 10-20; Abad Rocamora et al. 2024)
  advlc           FGSM-N + AdvLC λ=0.55, 200 ep.       81.06 / 47.07 (best, AutoAttack); 82.70 / 42.71 (end)
  advlc_swa       FGSM-N + AdvLC λ=0.5 + SWA from epoch 50 (AdvLC paper's SWA rows)
  pgd10_advlc     PGD-10 (α=ε/4) + AdvLC λ=0.4         (AdvLC Table 1)
  fgsm_rs_advlc   any attack combines with any regularizers: FGSM-RS + AdvLC
  cnn_fgsm        the single-layer CNN of GradAlign §4, FGSM ε=10/255, Adam.
                  Catastrophic overfitting (paper: around epoch 6, alignment
                  ~0.12; our seed-0 run: epoch 18, alignment 0.07-0.19):
                  PGD accuracy drops, FGSM accuracy rises, alignment falls.

Reference conventions (../shared/REFERENCE.md, "Conventions of the reference
code"; each proven in lockstep with the authors' PyTorch step by
benchmarks/parity_train_step.py) are the defaults here:

  * bn_updates="every_forward": BatchNorm running statistics are updated on
    every train-mode forward the reference makes (GradAlign code: the FGSM
    pass, train.py l.153, the CE pass, l.188, GradAlign's g2, l.193; PGD-k: k
    attack passes, utils.py l.171; ZeroGrad code: train_cifar.py l.62, l.93;
    AdvLC code: src/utils/train.py l.190, l.197).
  * box_grad="zero" for the attacks the GradAlign code runs through its
    `utils.clamp(X + delta, 0, 1)` (utils.py l.20-30; train.py l.152, utils.py
    l.171): PyTorch 1.4 (pinned by its Dockerfile, the environment of the
    published numbers) gives 0 at pixels exactly 0 or 1, current PyTorch 1/2
    (--config.attack.kwargs.box_grad=half), no clamp "full". The ZeroGrad,
    N-FGSM and AdvLC code feed X + delta without a clamp in the graph: "full".
  * FGSM-RS in the GradAlign code: eta not clipped to the box before the step
    (clip_init_to_box=False, train.py l.146); Wong's code clips it.
  * AT for Free: order="step_first" (the GradAlign code: the delta step, then
    the weights at x + delta_new, train.py l.149-207); Shafahi's single pass is
    order="single_pass".
  * AdvLC's SWA (`advlc_swa`): from epoch 50, once per epoch after its first
    step, BatchNorm re-estimated on a pass of the augmented training set after
    each average (src/utils/train.py l.233-240, src/utils/swa.py; README
    `--swa 50 n 500`).
  * AdvLC: the "clean" logits at the FGSM-N start clip(x + eta) (clean_point=
    "start", the AdvLC code, src/utils/train.py l.189-191), not Eq. 14's f(x).

Deviations that remain, and why:
  * Mixed precision: bfloat16 here, apex O1 float16 with loss scaling there
    (no float16 loss scaling in this library; parity is proven in float32/64).
  * The running variance averages the biased batch variance (Flax), PyTorch
    the unbiased one: a factor n/(n-1) < 1.0005 on CIFAR batches of 128
    (fastadv_jax/models/common.py). The lockstep table isolates it.
  * The GradAlign code's monitoring pass at x for PGD / random corner (train.py
    l.182-184) also updates the running statistics; not replayed (it feeds a
    log only). PGD + GradAlign takes g1 from PGD's first step here, from that
    pass (without the clamp) there.
  * Model selection (best/) never uses test points. The GradAlign-code
    variants select as that code does, by PGD-10 on the first 256 training
    points every 200 steps (train.py l.85, l.231-246; evals.train_pgd). The
    ZeroGrad and AdvLC code select on the test set; their variants here hold
    out the last 1,000 training examples instead (data.validation_size,
    evals.validation; recorded in summary.json), so they train on 49,000
    examples, and select with one PGD random start (the AdvLC code: none).
  * CURE and IGR: GradAlign Table 8's squared norm and ε·sign step (the CURE
    code takes a norm and an l2-normalized step of length h); the gradient
    convention is the CURE code's (see the cure/igr entry above).
  * Wong's AT for Free feeds the unclipped X + delta_prev to a new minibatch;
    the single pass here clips it to the box.

Hardware: the PreActResNet-18 variants are GPU configs (30 epochs of FGSM take
about 10 minutes on a V100 in the papers; GradAlign about 3x that). The
`cnn_fgsm` variant runs on a CPU in minutes and is the README's main job.
"""

from fastadv_jax import config_base
from fastadv_jax import regularizers

import ml_collections

# The exact formulation of the input-gradient penalties (GradAlign, CURE, IGR):
# --config.regularizers.grad_align.formulation=forward_over_reverse etc.
_FORMULATION = regularizers.DEFAULT_FORMULATION


def _regularizer(weight: float | None = None, lambda_rule: str = "", **hparams):
  spec = dict(hparams)
  spec["weight"] = 0.0 if weight is None else float(weight)
  spec["lambda_rule"] = lambda_rule
  return ml_collections.ConfigDict(spec)


def _gradalign_paper(config):
  """GradAlign paper setup (App. B / released scripts)."""
  config.model.name = "preact_resnet18_gradalign"
  config.dtype = "bfloat16"  # the paper trains in mixed precision; evaluation is float32
  config.num_epochs = 30
  config.batch_size = 128
  config.optimizer.update(name="sgd", momentum=0.9, weight_decay=5e-4)
  config.schedule.update(name="cyclic", lr_max=0.2)
  # Their code reads the rate at epoch + (i + 1) / n.
  config.schedule.kwargs = ml_collections.ConfigDict(dict(peak_fraction=0.4, step_offset=1))
  config.augment.update(padding=4, pad_mode="zero", flip=True)
  config.bn_updates = "every_forward"
  # Model selection (best/) as in the GradAlign code (train.py l.85, l.231-246):
  # PGD-10 (α = ε/4, one random start) on the first 256 training points,
  # unaugmented, every 200 steps; never on test points.
  config.evals.train_pgd = config_base.default_eval(
      split="train", n=256, every_steps=200, every_epochs=0,
      metrics=["clean_acc", "pgd_acc"])
  config.best.eval = "train_pgd"
  return config


def _select_on_validation(config, n: int = 1000):
  """Model selection on `n` training examples held out of training.

  The ZeroGrad and AdvLC code select their best checkpoint on the test set
  (AdvLC: src/utils/train.py l.102-131, PGD-10 without random start); that
  makes "best" optimistic, so here the last `n` training examples are held
  out (data.validation_size; recorded in summary.json) and PGD-10 with one
  random start on them picks best/, instead of the GradAlign code's training
  points (`_gradalign_paper`).
  """
  del config.evals.train_pgd
  config.data.validation_size = n
  config.evals.validation = config_base.default_eval(
      split="validation", n=n, metrics=["clean_acc", "pgd_acc"])
  config.best.eval = "validation"


def _gradalign_clamp(attack):
  """The GradAlign code's gradient through utils.clamp under PyTorch 1.4."""
  if attack.name in ("fgsm", "fgsm_rs", "pgd", "free") and "box_grad" not in attack.kwargs:
    attack.kwargs.box_grad = "zero"


def _zerograd_paper(config):
  """ZeroGrad/MultiGrad paper setup: Rice et al.'s PreActResNet-18, float32."""
  config.model.name = "preact_resnet18_rice"
  config.dtype = "float32"
  config.num_epochs = 30
  config.optimizer.update(name="sgd", momentum=0.9, weight_decay=5e-4)
  config.schedule.update(name="cyclic", lr_max=0.2)
  config.schedule.kwargs = ml_collections.ConfigDict(dict(peak_fraction=0.5))
  config.augment.update(padding=4, pad_mode="reflect", flip=True)
  config.final_eval.update(n=10000)
  config.bn_updates = "every_forward"
  _select_on_validation(config)
  return config


def _advlc_paper(config):
  """AdvLC paper setup (Li & Spratling 2023, Table 1)."""
  config.model.name = "preact_resnet18_wong"
  config.dtype = "float32"
  config.num_epochs = 200
  config.batch_size = 100
  config.optimizer.update(name="sgd", momentum=0.9, weight_decay=1e-4)
  config.schedule.update(name="piecewise", lr_max=0.1)
  config.schedule.kwargs = ml_collections.ConfigDict(dict(boundary_epochs=[100, 150],
                                                          factor=0.1))
  config.bn_updates = "every_forward"
  _select_on_validation(config)
  return config


def get_config(variant: str = "gradalign") -> ml_collections.ConfigDict:
  """Returns the config of `variant` (see the module docstring for the list)."""
  config = _gradalign_paper(config_base.base_config())
  config.dataset = "cifar10"
  config.num_classes = 10
  config.eps = 8.0
  attack = config.attack
  if variant == "fgsm":
    attack.name = "fgsm"
  elif variant == "fgsm_rs":
    attack.name = "fgsm_rs"
    attack.step_eps_ratio = 1.25  # 10/255 at ε = 8
    attack.kwargs = ml_collections.ConfigDict(dict(clip_init_to_box=False))
  elif variant == "gradalign":
    attack.name = "fgsm"
    config.schedule.lr_max = 0.3  # released GradAlign script
    config.regularizers.grad_align = _regularizer(lambda_rule="cifar10", formulation=_FORMULATION)
  elif variant in ("pgd2", "pgd10", "pgd2_gradalign"):
    steps = 2 if variant.startswith("pgd2") else 10
    attack.name = "pgd"
    attack.step_eps_ratio = 0.5 if steps == 2 else 0.2
    attack.kwargs = ml_collections.ConfigDict(dict(steps=steps, random_start=False))
    if variant == "pgd2_gradalign":
      config.regularizers.grad_align = _regularizer(weight=0.1, formulation=_FORMULATION)
  elif variant == "cure":
    attack.name = "fgsm"
    config.regularizers.cure = _regularizer(weight=700.0, formulation=_FORMULATION)
  elif variant == "igr":
    attack.name = "fgsm"
    config.regularizers.input_grad_norm = _regularizer(weight=1000.0, formulation=_FORMULATION)
  elif variant == "fgsm_early_stop":
    attack.name = "fgsm"
    attack.step = 7.0  # best/ is the early-stopped state (model selection above)
  elif variant == "zerograd":
    _zerograd_paper(config)
    attack.name = "zerograd"
    attack.kwargs = ml_collections.ConfigDict(dict(q=0.35))
  elif variant == "multigrad":
    _zerograd_paper(config)
    attack.name = "multigrad"
    attack.kwargs = ml_collections.ConfigDict(dict(num_starts=3))
  elif variant == "n_fgsm":
    _zerograd_paper(config)
    config.model.name = "preact_resnet18_wong"
    attack.name = "n_fgsm"
  elif variant == "free":
    attack.name = "free"
    attack.step_eps_ratio = 1.0
    attack.kwargs = ml_collections.ConfigDict(dict(replays=8, order="step_first"))
    config.num_epochs = 96
    config.schedule.lr_max = 0.04
  elif variant in ("advlc", "advlc_swa", "pgd10_advlc", "fgsm_rs_advlc"):
    _advlc_paper(config)
    if variant == "advlc":
      attack.name = "fgsm_n"
      config.regularizers.advlc = _regularizer(weight=0.55, clean_point="start")
    elif variant == "advlc_swa":
      # λ = 0.5 with SWA (AdvLC paper); the AdvLC code's `--swa 50 n 500`:
      # from epoch 50, once per epoch (500 steps of batch 100), BatchNorm
      # re-estimated on a pass of the augmented training set after each average.
      attack.name = "fgsm_n"
      config.regularizers.advlc = _regularizer(weight=0.5, clean_point="start")
      config.swa.update(enabled=True, start_epoch=50, every_steps=0,
                        bn_update="each_average", bn_batches=0)
    elif variant == "pgd10_advlc":
      attack.name = "pgd"
      attack.step_eps_ratio = 0.25
      attack.kwargs = ml_collections.ConfigDict(dict(steps=10, random_start=False))
      config.regularizers.advlc = _regularizer(weight=0.4, clean_point="start")
    else:
      attack.name = "fgsm_rs"
      attack.step_eps_ratio = 1.25
      config.regularizers.advlc = _regularizer(weight=0.55)
  elif variant == "cnn_fgsm":
    config.model.name = "simple_cnn"
    # im2col_stem=True: a faster FGSM step on CPU, the same function (listed so
    # that --config.model.kwargs.im2col_stem can set it; benchmarks/README.md).
    config.model.kwargs = ml_collections.ConfigDict(dict(filters=4, im2col_stem=False))
    config.dtype = "float32"
    config.eps = 10.0
    attack.name = "fgsm"
    config.optimizer.update(name="adam", weight_decay=5e-4)
    config.schedule.update(name="cyclic", lr_max=0.003)
    config.num_epochs = 30
    config.final_eval.update(n=1000, steps=50, restarts=10)
    # Small evaluation batches: on CPU the evaluation model's im2col stem
    # (closures.eval_logits_fn) materializes 27 values per pixel, and batches
    # of 32-64 keep them in cache: the 1,000-point per-epoch evaluation took
    # 0.35-0.39 s against 0.67 s at 250, and the main job's training loop
    # spent 20.7 s evaluating against 29.6 s (the results do not depend on
    # the batch). The final PGD-50-10 keeps 250: with 40 its extra bucket
    # shapes' compilations cost more than the batches saved.
    for spec in config.evals.values():
      spec.batch_size = 40
  elif variant == "fgsm_elle":
    attack.name = "fgsm"
    config.regularizers.elle = _regularizer(weight=1000.0)
  else:
    config_base.check_variant("CIFAR-10", variant, VARIANTS)
  if config.model.name in ("preact_resnet18_gradalign", "simple_cnn") and variant != "fgsm_elle":
    _gradalign_clamp(attack)
  config.variant = variant
  return config


VARIANTS = ("fgsm", "fgsm_rs", "gradalign", "pgd2", "pgd10", "pgd2_gradalign", "cure",
            "igr", "fgsm_early_stop", "zerograd", "multigrad", "n_fgsm", "free", "advlc",
            "advlc_swa",
            "pgd10_advlc", "fgsm_rs_advlc", "cnn_fgsm", "fgsm_elle")

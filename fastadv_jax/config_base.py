"""The base training config and its validation.

Every file in `configs/` starts from `base_config()` and changes what its
published setting needs. Values are serializable only (numbers, strings, dicts);
methods, models, optimizers and schedules are chosen by name. ε and steps are in
/255 units in configs (``--config.eps=16``) and converted to pixel units once,
by `eps_pixels`.

`validate_config` runs before anything compiles and raises a ValueError naming
the offending value and the allowed choices.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

DATASETS = {"cifar10": 10, "cifar100": 100, "svhn_cropped": 10, "imagenet2012": 1000}
OPTIMIZERS = ("sgd", "adam")
DTYPES = ("float32", "bfloat16")
ATTACK_BN_MODES = ("batch", "eval")
# Attack keyword arguments carried as traced values in the train state, so that
# the catastrophic-overfitting monitor can change them without a recompile.
TRACED_ATTACK_KWARGS = ("q",)
# GradAlign's λ as a function of ε (REFERENCE.md), by dataset name.
LAMBDA_RULES = ("cifar10", "svhn")


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every config (GradAlign's CIFAR-10 setting)."""
  c = ml_collections.ConfigDict()
  c.dataset = "cifar10"
  c.variant = ""
  c.num_classes = 10
  c.data = ml_collections.ConfigDict(dict(
      source="auto",       # auto | tfds | local
      data_dir="",         # TFDS data_dir ("" = TFDS default)
      local_path="",       # a .npz or a tar(.gz)/folder of split/class/image files
      train_subset=0,      # >0: train on the first N training examples (CPU-scale runs)
  ))
  c.model = ml_collections.ConfigDict(dict(name="preact_resnet18_gradalign",
                                           kwargs=ml_collections.ConfigDict()))
  c.dtype = "float32"      # compute dtype of the model in training; evaluation is float32
  c.eps = 8.0              # L-inf radius in /255
  c.attack = ml_collections.ConfigDict(dict(
      name="fgsm",
      step=config_dict.placeholder(float),  # in /255; None = the attack's default
      step_eps_ratio=config_dict.placeholder(float),  # step = ratio * eps (follows --config.eps)
      kwargs=ml_collections.ConfigDict(),
      bn="batch",          # BatchNorm statistics during the attack: batch | eval
  ))
  # name -> ConfigDict(weight=λ, **hyperparameters of that regularizer)
  c.regularizers = ml_collections.ConfigDict()
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", momentum=0.9, nesterov=False, weight_decay=5e-4, decay_bn=True,
      cycle_momentum=False))
  c.schedule = ml_collections.ConfigDict(dict(
      name="cyclic", lr_max=0.2, kwargs=ml_collections.ConfigDict(dict(peak_fraction=0.4))))
  c.num_epochs = 30
  c.batch_size = 128       # global batch; split evenly across devices
  c.augment = ml_collections.ConfigDict(dict(padding=4, pad_mode="zero", flip=True,
                                             rotation=0.0))
  # Linear ramp from 0 over the first epochs (SVHN): of eps (PGD) or of the step.
  c.warmup = ml_collections.ConfigDict(dict(epochs=0.0, target="eps"))
  # AT for Free: each minibatch is replayed `replays` times; num_epochs counts
  # replayed iterations (passes over the data = num_epochs / replays).
  c.free = ml_collections.ConfigDict(dict(replays=1))
  # Stochastic weight averaging (AdvLC): average the weights at the end of every
  # epoch from `start_epoch` on; BatchNorm statistics are recomputed on
  # `bn_batches` training batches at the end; evaluated as the "swa" state.
  c.swa = ml_collections.ConfigDict(dict(enabled=False, start_epoch=0, bn_batches=100))
  c.seed = 0
  c.log_every_steps = 50
  c.eval_every_steps = 0   # 0: once per epoch
  c.checkpoint_every_steps = 0  # 0: once per epoch
  c.keep_checkpoints = 3
  c.eval = ml_collections.ConfigDict(dict(n=1000, batch_size=250, pgd_steps=10,
                                          pgd_restarts=1))
  c.final_eval = ml_collections.ConfigDict(dict(
      enabled=True, n=1000, steps=50, restarts=10, rule="strict", batch_size=250))
  c.early_stopping = ml_collections.ConfigDict(dict(
      enabled=False, n_points=256, pgd_steps=10, every_steps=200, stop_on_drop=False,
      drop=0.2))
  c.co_monitor = ml_collections.ConfigDict(dict(
      enabled=True, pgd_drop=0.05, pgd_rel_drop=0.5, alignment_drop=0.1,
      fgsm_over_clean=0.05, rollback=False,
      max_rollbacks=2,
      # hparam name -> ConfigDict(op="add"|"mul"|"set", value=...), applied on rollback,
      # e.g. {"attack/q": {"op": "add", "value": 0.1}} or {"reg/grad_align": {"op": "mul", "value": 2}}
      adjust=ml_collections.ConfigDict()))
  c.allow_config_change = False
  return c


def load_config_file(path: str, variant: str | None = None):
  """Loads a config file (`configs/<dataset>.py`) as a module, or its `get_config(variant)`.

  Config files are not a package: this is how one config builds on another
  (cifar100 and svhn on cifar10), and how notebooks and tests read them.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  name = "fastadv_configs_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"No config file at {path!r}.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module if variant is None else module.get_config(variant)


def eps_pixels(config) -> float:
  """ε in [0,1] pixel units."""
  return float(config.eps) / 255.0


def step_pixels(config) -> float | None:
  """The attack step in pixel units, or None for the attack's own default."""
  if config.attack.step is not None:
    return float(config.attack.step) / 255.0
  if config.attack.step_eps_ratio is not None:
    return float(config.attack.step_eps_ratio) * eps_pixels(config)
  return None


def regularizer_weight(config, name: str) -> float:
  """λ of regularizer `name`: its weight, or GradAlign's rule λ(ε) when lambda_rule is set."""
  spec = config.regularizers[name]
  if spec.get("lambda_rule"):
    from fastadv_jax import regularizers  # pylint: disable=g-import-not-at-top
    return float(regularizers.lambda_for_eps(spec.lambda_rule, eps_pixels(config)))
  return float(spec.weight)


def _choice(what: str, value: Any, choices) -> None:
  choices = list(choices)
  if value not in choices:
    raise ValueError(f"Unknown {what} {value!r}; choose one of {sorted(choices)}.")


def validate_config(config, num_devices: int = 1) -> None:
  """Raises a ValueError for an inconsistent config, before anything compiles."""
  # Imported here: these modules import jax and are heavy; configs stay light.
  from fastadv_jax import attacks, models, regularizers, schedules  # pylint: disable=g-import-not-at-top

  _choice("dataset", config.dataset, DATASETS)
  if config.num_classes != DATASETS[config.dataset]:
    raise ValueError(f"num_classes={config.num_classes} but {config.dataset} has "
                     f"{DATASETS[config.dataset]} classes.")
  _choice("data.source", config.data.source, ("auto", "tfds", "local"))
  _choice("model.name", config.model.name, models.MODELS)
  _choice("dtype", config.dtype, DTYPES)
  attack_names = list(attacks.ATTACKS) + ["free"]
  _choice("attack.name", config.attack.name, attack_names)
  _choice("attack.bn", config.attack.bn, ATTACK_BN_MODES)
  if not 0 <= config.eps <= 255:
    raise ValueError(f"eps={config.eps} must be in [0, 255] (it is given in /255).")
  if config.attack.step is not None and config.attack.step < 0:
    raise ValueError(f"attack.step={config.attack.step} must be >= 0 (in /255).")
  if config.attack.step is not None and config.attack.step_eps_ratio is not None:
    raise ValueError("Set attack.step or attack.step_eps_ratio, not both.")
  if config.attack.step_eps_ratio is not None and config.attack.step_eps_ratio < 0:
    raise ValueError(f"attack.step_eps_ratio={config.attack.step_eps_ratio} must be >= 0.")
  for name, reg in config.regularizers.items():
    _choice("regularizer", name, regularizers.REGULARIZERS)
    if "weight" not in reg:
      raise ValueError(f"regularizers.{name} needs a weight (λ).")
    if reg.get("lambda_rule"):
      _choice(f"regularizers.{name}.lambda_rule", reg.lambda_rule, LAMBDA_RULES)
    elif reg.weight < 0:
      raise ValueError(f"regularizers.{name}.weight={reg.weight} must be >= 0.")
  _choice("optimizer.name", config.optimizer.name, OPTIMIZERS)
  _choice("schedule.name", config.schedule.name, schedules.SCHEDULES)
  if config.schedule.lr_max < 0:
    raise ValueError(f"schedule.lr_max={config.schedule.lr_max} must be >= 0.")
  if config.num_epochs <= 0:
    raise ValueError(f"num_epochs={config.num_epochs} must be > 0.")
  if config.batch_size <= 0 or config.batch_size % num_devices:
    raise ValueError(
        f"batch_size={config.batch_size} must be a positive multiple of the "
        f"number of devices ({num_devices}).")
  if config.dataset == "imagenet2012":
    if "imagenet_phases" not in config:
      raise ValueError("ImageNet configs need imagenet_phases (see configs/imagenet.py).")
    for b in config.imagenet_phases.batch_sizes:
      if b <= 0 or b % num_devices:
        raise ValueError(f"imagenet_phases.batch_sizes has {b}, not a positive multiple "
                         f"of the number of devices ({num_devices}).")
  _choice("augment.pad_mode", config.augment.pad_mode, ("zero", "reflect"))
  _choice("warmup.target", config.warmup.target, ("eps", "step"))
  if config.free.replays < 1:
    raise ValueError(f"free.replays={config.free.replays} must be >= 1.")
  if config.free.replays > 1 and config.attack.name != "free":
    raise ValueError("free.replays > 1 only makes sense with attack.name='free'.")
  _choice("final_eval.rule", config.final_eval.rule, ("strict", "max_loss"))
  for key, adj in config.co_monitor.adjust.items():
    _choice("co_monitor.adjust op", adj.op, ("add", "mul", "set"))
    known = traced_hparam_names(config)
    if key not in known:
      raise ValueError(f"co_monitor.adjust names {key!r}, not a tunable setting of "
                       f"this config; choose one of {sorted(known)}.")


def traced_hparam_names(config) -> list[str]:
  """Settings carried as traced values in the train state (changeable without recompiling)."""
  names = [f"reg/{n}" for n in config.regularizers]
  names += [f"attack/{k}" for k in config.attack.kwargs if k in TRACED_ATTACK_KWARGS]
  return names

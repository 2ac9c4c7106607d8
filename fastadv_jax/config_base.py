"""The base training config and its validation.

Every file in `configs/` starts from `base_config()` and changes what its
published setting needs. Values are serializable only (numbers, strings, dicts);
methods, models, optimizers and schedules are chosen by name. ε and steps are in
/255 units in configs (``--config.eps=16``) and converted to pixel units once,
by `eps_pixels`.

`validate_config` runs before anything compiles or is written and raises a
ValueError naming the offending value and the allowed choices; the method
sections (eps, attack, regularizers, warmup) are validated by building the
method object (`methods.build_method`).
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

DATASETS = {"cifar10": 10, "cifar100": 100, "svhn_cropped": 10, "imagenet2012": 1000}
OPTIMIZERS = ("sgd", "adam")
DTYPES = ("float32", "bfloat16")
SWA_BN_UPDATES = ("each_average", "at_end")
# The metrics the catastrophic-overfitting monitor reads from its evaluation.
CO_MONITOR_METRICS = ("clean_acc", "fgsm_acc", "fgsm_point_acc", "pgd_acc", "grad_alignment")


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
      # >0: the last N training examples are held out of training as the
      # "validation" split, for model selection without test data (config.best).
      validation_size=0,
  ))
  c.model = ml_collections.ConfigDict(dict(name="preact_resnet18_gradalign",
                                           kwargs=ml_collections.ConfigDict()))
  c.dtype = "float32"      # compute dtype of the model in training; evaluation is float32
  # How the per-device train step runs: "pmap" or "shard_map" (a one-axis mesh of
  # all devices of all processes); the same results (tests/test_multihost.py).
  c.parallel = "pmap"
  c.eps = 8.0              # L-inf radius in /255
  c.attack = ml_collections.ConfigDict(dict(
      name="fgsm",
      # The step: in /255, or as a multiple of eps (follows --config.eps); both
      # None = the attack's default (attacks.ATTACK_SPECS).
      step=config_dict.placeholder(float),
      step_eps_ratio=config_dict.placeholder(float),
      kwargs=ml_collections.ConfigDict(),  # the attack's other keyword arguments
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
  # BatchNorm running statistics: "once" per step (the CE forward) or
  # "every_forward" (once per train-mode forward, as the PyTorch references;
  # see fastadv_jax/train_step.py). Paper configs use the reference's.
  c.bn_updates = "once"
  # Stochastic weight averaging (AdvLC's "+SWA" rows; evaluated as the "swa"
  # state): the equal-weight average of the weights after step i of every epoch
  # from `start_epoch` (0-based) on, where i % every_steps == 0 (0: once per
  # epoch, after its first step: the AdvLC code's `--swa 50 n 500` at 500 steps
  # per epoch). BatchNorm statistics of the average are re-estimated on
  # `bn_batches` augmented training batches (0: the whole epoch) after each
  # average ("each_average", the AdvLC code) or once at the end ("at_end").
  c.swa = ml_collections.ConfigDict(dict(enabled=False, start_epoch=0, every_steps=0,
                                         bn_update="at_end", bn_batches=100))
  c.seed = 0
  c.log_every_steps = 50
  c.checkpoint_every_steps = 0  # 0: once per epoch
  c.keep_checkpoints = 3
  # Evaluations during training, by name (big_vision style; see
  # evaluate.validate_evals): each with its split, points, period and metrics.
  c.evals = ml_collections.ConfigDict({"test": default_eval()})
  # The best checkpoint (best/) is the state with the highest `metric` of the
  # evaluation `eval`; with stop_on_drop, training stops once it falls more
  # than `drop` below its best (Wong et al.'s early stopping).
  c.best = ml_collections.ConfigDict(dict(eval="test", metric="pgd_acc",
                                          stop_on_drop=False, drop=0.2))
  c.final_eval = ml_collections.ConfigDict(dict(
      enabled=True, n=1000, steps=50, restarts=10, rule="strict", batch_size=250))
  c.co_monitor = ml_collections.ConfigDict(dict(
      enabled=True, eval="test", pgd_drop=0.05, pgd_rel_drop=0.5, alignment_drop=0.1,
      fgsm_over_clean=0.05, rollback=False,
      max_rollbacks=2,
      # >0: without a rollback, stop training this many epochs after the monitor
      # fires (a seed sweep's collapse runs need not go the full schedule).
      stop_after_epochs=0,
      # hparam name -> ConfigDict(op="add"|"mul"|"set", value=...), applied on rollback,
      # e.g. {"attack/q": {"op": "add", "value": 0.1}} or {"reg/grad_align": {"op": "mul", "value": 2}}
      adjust=ml_collections.ConfigDict()))
  c.allow_config_change = False
  return c


def default_eval(**overrides) -> ml_collections.ConfigDict:
  """The per-epoch evaluation on the first 1,000 test points (clean, FGSM,
  PGD-10 with α = ε/4 and one random start, gradient alignment, cos(FGSM, PGD))."""
  from fastadv_jax import evaluate  # pylint: disable=g-import-not-at-top
  settings = dict(evaluate.EVAL_DEFAULTS)
  settings.update(overrides)
  return ml_collections.ConfigDict(settings)


def check_variant(what: str, variant: str, variants) -> None:
  """Raises a ValueError for an unknown config variant, with a "did you mean"."""
  from fastadv_jax import methods  # pylint: disable=g-import-not-at-top
  methods.check_name(f"{what} variant", variant, variants)


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


# Numeric settings outside the method sections: (dotted name, kind, min, max).
# `int` fields take integers only; `float` fields any finite real number.
FIELD_RULES = (
    ("seed", int, 0, 2**31 - 1),
    ("num_classes", int, 2, None),
    ("num_epochs", int, 1, None),
    ("batch_size", int, 1, None),
    ("log_every_steps", int, 1, None),
    ("checkpoint_every_steps", int, 0, None),
    ("keep_checkpoints", int, 1, None),
    ("data.train_subset", int, 0, None),
    ("data.validation_size", int, 0, None),
    ("eps", float, 0.0, 255.0),
    ("schedule.lr_max", float, 0.0, None),
    ("augment.padding", int, 0, None),
    ("augment.rotation", float, 0.0, 180.0),
    ("warmup.epochs", float, 0.0, None),
    ("swa.start_epoch", int, 0, None),
    ("swa.every_steps", int, 0, None),
    ("swa.bn_batches", int, 0, None),
    ("best.drop", float, 0.0, 1.0),
    ("final_eval.n", int, 1, None),
    ("final_eval.steps", int, 1, None),
    ("final_eval.restarts", int, 1, None),
    ("final_eval.batch_size", int, 1, None),
    ("co_monitor.max_rollbacks", int, 0, None),
    ("co_monitor.stop_after_epochs", int, 0, None),
)
# Examples per split of the datasets as TFDS serves them (a local copy may differ;
# the loop checks again against the data it loaded).
SPLIT_SIZES = {"cifar10": {"train": 50000, "test": 10000},
               "cifar100": {"train": 50000, "test": 10000},
               "svhn_cropped": {"train": 73257, "test": 26032},
               "imagenet2012": {"train": 1281167, "test": 50000}}


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def set_dotted(config, dotted: str, value) -> None:
  """Sets `config.<dotted>` (e.g. "evals.test.n") to `value`, adding a new leaf if needed."""
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents:
    node = node[part]
  with node.unlocked():
    node[leaf] = value


def parse_setting(text: str) -> tuple[str, Any]:
  """`dotted.name=value` (a Python literal, else a string), as scripts' --set takes it."""
  import argparse  # pylint: disable=g-import-not-at-top
  import ast  # pylint: disable=g-import-not-at-top
  if "=" not in text:
    raise argparse.ArgumentTypeError(f"--set {text!r}: expected name=value")
  name, value = text.split("=", 1)
  try:
    return name, ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return name, value


def check_fields(config) -> None:
  """Checks every `FIELD_RULES` entry: type and range, naming the field and value."""
  import math  # pylint: disable=g-import-not-at-top
  import numbers  # pylint: disable=g-import-not-at-top
  for name, kind, low, high in FIELD_RULES:
    value = _get(config, name)
    if kind is int:
      ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
      must = "an integer"
    else:
      ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))
      must = "a finite number"
    if not ok:
      raise ValueError(f"{name}={value!r} must be {must}.")
    if (low is not None and value < low) or (high is not None and value > high):
      bounds = (f"in [{low}, {high}]" if high is not None else f">= {low}")
      raise ValueError(f"{name}={value!r} must be {bounds}.")


def check_sizes(config, num_train: int | None, num_test: int | None,
                num_validation: int | None = None) -> None:
  """Checks the sizes a config asks for against the splits (None: unknown).

  train_subset and the batch size against the training set (what is left of
  it after the held-out validation examples), final_eval.n and each
  evaluation's n against its split.
  """
  from fastadv_jax import evaluate  # pylint: disable=g-import-not-at-top
  if num_train is not None:
    if config.data.train_subset > num_train:
      raise ValueError(f"data.train_subset={config.data.train_subset} is larger than the "
                       f"{config.dataset} training set ({num_train} examples).")
    if config.data.train_subset:
      num_train = config.data.train_subset
    if config.batch_size > num_train:
      raise ValueError(f"batch_size={config.batch_size} is larger than the training set "
                       f"({num_train} examples).")
  if num_test is not None and config.final_eval.enabled and config.final_eval.n > num_test:
    raise ValueError(f"final_eval.n={config.final_eval.n} is larger than the "
                     f"{config.dataset} test set ({num_test} examples).")
  if num_validation is None and num_train is not None:
    num_validation = config.data.validation_size
  evaluate.validate_evals({k: dict(v) for k, v in config.evals.items()},
                          split_sizes={"test": num_test, "train": num_train,
                                       "validation": num_validation})


def _choice(what: str, value: Any, choices) -> None:
  from fastadv_jax import methods  # pylint: disable=g-import-not-at-top
  methods.check_name(what, value, choices)


def validate_config(config, num_devices: int = 1):
  """Raises a ValueError for an inconsistent config, before anything compiles.

  Returns:
    The validated `methods.Method` of the config.
  """
  # Imported here: these modules import jax and are heavy; configs stay light.
  from fastadv_jax import methods, models, schedules, train_state  # pylint: disable=g-import-not-at-top

  _choice("dataset", config.dataset, DATASETS)
  check_fields(config)
  if config.num_classes != DATASETS[config.dataset]:
    raise ValueError(f"num_classes={config.num_classes} but {config.dataset} has "
                     f"{DATASETS[config.dataset]} classes.")
  _choice("data.source", config.data.source, ("auto", "tfds", "local"))
  _choice("model.name", config.model.name, models.MODELS)
  _choice("dtype", config.dtype, DTYPES)
  _choice("parallel", config.parallel, train_state.PARALLEL_MODES)
  # Builds the Linen module only (no parameters, nothing compiled): the
  # registry checks model.kwargs here rather than after the data is loaded.
  train_state.create_model(config)
  method = methods.build_method(config)
  _choice("optimizer.name", config.optimizer.name, OPTIMIZERS)
  _choice("schedule.name", config.schedule.name, schedules.SCHEDULES)
  if config.batch_size % num_devices:
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
    if method.attack.replays > 1:
      raise ValueError("Replayed minibatches (AT for Free) are not supported with "
                       "ImageNet's progressive resizing.")
  _choice("augment.pad_mode", config.augment.pad_mode, ("zero", "reflect"))
  _choice("final_eval.rule", config.final_eval.rule, ("strict", "max_loss"))
  _choice("swa.bn_update", config.swa.bn_update, SWA_BN_UPDATES)
  if config.data.source == "local" or config.dataset == "imagenet2012":
    check_sizes(config, None, None)  # the loop checks against the data it loads
  else:
    sizes = SPLIT_SIZES[config.dataset]
    check_sizes(config, sizes["train"], sizes["test"])
  for what, section in (("best", config.best), ("co_monitor", config.co_monitor)):
    if what == "co_monitor" and not section.enabled:
      continue
    _choice(f"{what}.eval", section.eval, config.evals)
  best_metrics = config.evals[config.best.eval].metrics
  _choice("best.metric", config.best.metric, best_metrics)
  if config.co_monitor.enabled:
    missing = [m for m in ("clean_acc", "fgsm_acc", "pgd_acc")
               if m not in config.evals[config.co_monitor.eval].metrics]
    if missing:
      raise ValueError(f"co_monitor.eval={config.co_monitor.eval!r} does not compute "
                       f"{missing}; add them to evals.{config.co_monitor.eval}.metrics "
                       f"or disable the monitor (co_monitor.enabled=False).")
  known = method.hparam_names
  for key, adj in config.co_monitor.adjust.items():
    _choice("co_monitor.adjust op", adj.op, ("add", "mul", "set"))
    _choice("co_monitor.adjust setting", key, known)
  return method


def eps_pixels(config) -> float:
  """ε in [0,1] pixel units (configs give it in /255): the one conversion."""
  return float(config.eps) / 255.0

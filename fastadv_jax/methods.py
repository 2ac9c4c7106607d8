"""A training method: one attack and zero or more regularizers, validated once.

`build_method(config)` turns a config's `eps`, `attack` and `regularizers`
sections into a `Method`, before anything is written or compiled:

* ε and the attack step are converted from /255 to pixel units here and
  nowhere else. The step is given in one place: `attack.step` (in /255) or
  `attack.step_eps_ratio` (a multiple of ε); otherwise the attack's default
  from its spec (`attacks.ATTACK_SPECS`).
* Every keyword argument is bound against the function's signature: unknown,
  missing or out-of-range values (ZeroGrad's q outside [0, 1], ...) raise a
  ValueError naming the value and the choices. Ranges are checked by the
  functions' own boundary checks, run once on concrete values through
  `jax.eval_shape` (abstract evaluation: nothing is compiled).
* Hyperparameters the monitor may change (each regularizer's λ, the attack's
  spec-declared traced arguments such as ZeroGrad's q) are named
  `reg/<name>` and `attack/<argument>`; the train state carries them.

The train step is built from a `Method` (`train_step.make_train_step`) and
reads no config.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import attacks
from fastadv_jax import closures
from fastadv_jax import config_base
from fastadv_jax import regularizers
from fastadv_jax.models import registry

ATTACK_BN_MODES = ("batch", "eval")
WARMUP_TARGETS = ("eps", "step")
# BatchNorm running-statistics updates per train step (train_step module docstring).
BN_UPDATES = ("once", "every_forward")
# AT for Free's order of the δ step and the weight step (train_step docstring).
CARRIED_ORDERS = ("single_pass", "step_first")
# GradAlign's λ as a function of ε, by dataset name (regularizers.lambda_for_eps).
LAMBDA_RULES = ("cifar10", "svhn")
# Arguments every attack receives from the train step, never from a config.
_ATTACK_SUPPLIED = ("loss_fn", "x", "key", "eps", "step", "delta", "noise")


def did_you_mean(value: Any, choices) -> str:
  """' Did you mean 'x'?' for a close match among `choices`, else ''."""
  close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
  return f" Did you mean {close[0]!r}?" if close else ""


def check_name(what: str, value: Any, choices) -> None:
  """Raises a ValueError naming `value`, a close match and all `choices`."""
  choices = sorted(map(str, choices))
  if value not in choices:
    raise ValueError(f"Unknown {what} {value!r}.{did_you_mean(value, choices)} "
                     f"Choose one of {choices}.")


@dataclasses.dataclass(frozen=True)
class AttackMethod:
  """The attack of a method, bound and validated.

  Attributes:
    name: its name in `attacks.ATTACK_SPECS`.
    spec: its spec.
    kwargs: static keyword arguments (they fix the compiled program).
    traced: initial values of the spec's traced arguments present in the
      call (carried in the train state as `attack/<argument>`).
    step: the step in pixel units, or None when the attack takes none.
    bn: BatchNorm statistics during the attack: "batch" or "eval".
    replays: train steps per minibatch (AT for Free's m; 1 otherwise).
    order: for a carried perturbation, "single_pass" or "step_first".
  """
  name: str
  spec: attacks.AttackSpec
  kwargs: Mapping[str, Any]
  traced: Mapping[str, float]
  step: Optional[float]
  bn: str = "batch"
  replays: int = 1
  order: str = "single_pass"

  @property
  def fn(self):
    return self.spec.fn

  @property
  def gradient_at_clean(self) -> bool:
    """Whether the attack's `grad_at_start` is ∇ℓ(x) for these arguments."""
    return bool(self.spec.gradient_at_clean({**self.kwargs, **self.traced}))


@dataclasses.dataclass(frozen=True)
class RegularizerMethod:
  """One regularizer of a method: its spec, λ and bound hyperparameters."""
  name: str
  spec: regularizers.RegularizerSpec
  weight: float
  hparams: Mapping[str, Any]

  @property
  def fn(self):
    return self.spec.fn


@dataclasses.dataclass(frozen=True)
class Method:
  """What the train step needs to know about the training method.

  Attributes:
    eps: the L∞ radius in pixel units.
    attack: the bound attack.
    regularizers: the bound regularizers, in config order.
    warmup_epochs: linear ramp from 0 over this many epochs (0: none).
    warmup_target: what ramps: "eps" (PGD in the GradAlign SVHN code) or
      "step" (the attack step of FGSM-based methods).
    bn_updates: "once" or "every_forward" (see `train_step`).
  """
  eps: float
  attack: AttackMethod
  regularizers: tuple[RegularizerMethod, ...] = ()
  warmup_epochs: float = 0.0
  warmup_target: str = "eps"
  bn_updates: str = "once"

  def initial_hparams(self) -> dict[str, Any]:
    """The traced hyperparameters' initial values, by name."""
    hp = {f"reg/{r.name}": jnp.float32(r.weight) for r in self.regularizers}
    hp.update({f"attack/{k}": jnp.float32(v) for k, v in self.attack.traced.items()})
    return hp

  @property
  def hparam_names(self) -> list[str]:
    """Names of the settings the catastrophic-overfitting monitor may change."""
    return sorted(self.initial_hparams())

  @property
  def consumed(self) -> set[str]:
    """Train-step quantities some regularizer consumes."""
    return {q for r in self.regularizers for q in r.spec.consumes.values()}


# ----------------------------------------------------------------------------
# Binding and checking keyword arguments.


def _keyword_parameters(fn) -> tuple[dict[str, inspect.Parameter], bool]:
  """(keyword parameters of fn by name, whether it takes **kwargs)."""
  params = inspect.signature(fn).parameters
  named = {n: p for n, p in params.items()
           if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
  return named, any(p.kind == p.VAR_KEYWORD for p in params.values())


def _bind(what: str, fn, given: Mapping[str, Any], supplied) -> None:
  """Unknown or missing keyword arguments of `fn` raise a ValueError."""
  named, var_keyword = _keyword_parameters(fn)
  settable = sorted(n for n in named if n not in supplied)
  for name in given:
    if name in supplied:
      raise ValueError(f"{what}: {name!r} is supplied by the train step and cannot be "
                       f"set in the config.")
    if name not in named and not var_keyword:
      raise ValueError(f"{what}: unknown keyword {name!r}.{did_you_mean(name, settable)} "
                       f"Choose from {settable}.")
  missing = [n for n, p in named.items()
             if p.default is p.empty and n not in supplied and n not in given]
  if missing:
    raise ValueError(f"{what}: missing required keyword(s) {missing}.")


def _abstract_check(what: str, call) -> None:
  """Runs `call(x)` abstractly, so the function's own boundary checks see
  the concrete keyword values; their errors name the value."""
  x = jax.ShapeDtypeStruct((2, 4, 4, 3), jnp.float32)
  try:
    jax.eval_shape(call, x)
  except (ValueError, TypeError) as e:
    raise ValueError(f"{what}: {e}") from None


def _probe_logits(x):
  """A tiny stand-in model for abstract checks: logits from the pixels."""
  return x.reshape(x.shape[0], -1)[:, :10]


def _probe_loss(x):
  return closures.cross_entropy(_probe_logits, jnp.zeros((x.shape[0],), jnp.int32))


def _probe_quantities(x) -> dict[str, Any]:
  loss_fn = _probe_loss(x)
  return {"loss_fn": loss_fn, "logits_fn": _probe_logits, "x": x,
          "labels": loss_fn.labels, "delta": jnp.zeros_like(x), "start": x,
          "grad_at_start": jnp.zeros_like(x), "grad_at_clean": jnp.zeros_like(x),
          "logits_adv": _probe_logits(x), "key": jax.random.PRNGKey(0),
          "eps": 8 / 255, "step_index": jnp.int32(0)}


# ----------------------------------------------------------------------------
# Config -> Method.


def _attack_step(config, spec: attacks.AttackSpec, eps: float) -> Optional[float]:
  attack = config.attack
  if attack.get("step") is not None and attack.get("step_eps_ratio") is not None:
    raise ValueError(f"attack.step={attack.step} and attack.step_eps_ratio="
                     f"{attack.step_eps_ratio} are both set; set one (step in /255, or "
                     f"step_eps_ratio as a multiple of eps).")
  if attack.get("step") is not None:
    if not attack.step >= 0:
      raise ValueError(f"attack.step={attack.step} must be >= 0 (in /255).")
    return float(attack.step) / 255.0
  if attack.get("step_eps_ratio") is not None:
    if not attack.step_eps_ratio >= 0:
      raise ValueError(f"attack.step_eps_ratio={attack.step_eps_ratio} must be >= 0.")
    return float(attack.step_eps_ratio) * eps
  return None if spec.default_step is None else spec.default_step * eps


def build_attack(config, eps: float) -> AttackMethod:
  """The config's attack section bound to its spec (see the module docstring)."""
  name = config.attack.name
  check_name("attack.name", name, attacks.ATTACK_SPECS)
  spec = attacks.ATTACK_SPECS[name]
  bn = config.attack.get("bn", "batch")
  check_name("attack.bn", bn, ATTACK_BN_MODES)
  kwargs = dict(config.attack.kwargs)
  what = f"attack {name!r} (config.attack.kwargs)"
  replays = 1
  order = "single_pass"
  if spec.carried is not None:
    order = kwargs.pop("order", order)
    check_name(f"{what}: order", order, CARRIED_ORDERS)
    replays = kwargs.pop(spec.carried.replays_kwarg, 1)
    if isinstance(replays, bool) or not isinstance(replays, (int, np.integer)) or replays < 1:
      raise ValueError(f"{what}: {spec.carried.replays_kwarg}={replays!r} must be an "
                       f"integer >= 1.")
  if "step" in kwargs:
    raise ValueError(f"{what}: give the step as attack.step (in /255) or "
                     f"attack.step_eps_ratio (a multiple of eps), not as kwargs.step.")
  _bind(what, spec.fn, kwargs, _ATTACK_SUPPLIED)
  step = _attack_step(config, spec, eps)
  named, _ = _keyword_parameters(spec.fn)
  if step is None and "step" in named and named["step"].default is named["step"].empty:
    raise ValueError(f"attack {name!r} needs a step: set attack.step (in /255) or "
                     f"attack.step_eps_ratio.")
  traced = {k: float(kwargs.pop(k)) for k in spec.traced if k in kwargs}
  call_kwargs = {**kwargs, **traced}
  if step is not None:
    call_kwargs["step"] = step

  def call(x):
    extra = {"delta": jnp.zeros_like(x)} if spec.carried is not None else {}
    return spec.fn(_probe_loss(x), x, jax.random.PRNGKey(0), eps=eps, **extra, **call_kwargs)

  _abstract_check(what, call)
  return AttackMethod(name=name, spec=spec, kwargs=kwargs, traced=traced, step=step,
                      bn=bn, replays=int(replays), order=order)


def build_regularizer(name: str, section, eps: float) -> RegularizerMethod:
  """One `config.regularizers.<name>` section bound to its spec."""
  check_name("regularizer", name, regularizers.REGULARIZER_SPECS)
  spec = regularizers.REGULARIZER_SPECS[name]
  hparams = dict(section)
  what = f"regularizers.{name}"
  if "weight" not in hparams:
    raise ValueError(f"{what} needs a weight (λ).")
  weight = hparams.pop("weight")
  rule = hparams.pop("lambda_rule", "")
  if rule:
    check_name(f"{what}.lambda_rule", rule, LAMBDA_RULES)
    weight = regularizers.lambda_for_eps(rule, eps)
  elif not (isinstance(weight, (int, float)) and weight >= 0):
    raise ValueError(f"{what}.weight={weight!r} must be a number >= 0.")
  _bind(what, spec.fn, hparams, spec.consumes)

  def call(x):
    quantities = _probe_quantities(x)
    args = {arg: quantities[q] for arg, q in spec.consumes.items()}
    return spec.fn(**args, **hparams)

  _abstract_check(what, call)
  return RegularizerMethod(name=name, spec=spec, weight=float(weight), hparams=hparams)


def build_method(config) -> Method:
  """Validates the config's method sections and returns the `Method`.

  Raises:
    ValueError: naming the offending value (and the choices), before anything
      is compiled or written.
  """
  if not 0 <= config.eps <= 255:
    raise ValueError(f"eps={config.eps} must be in [0, 255] (it is given in /255).")
  eps = config_base.eps_pixels(config)
  attack = build_attack(config, eps)
  regs = tuple(build_regularizer(name, section, eps)
               for name, section in config.regularizers.items())
  warmup_epochs = float(config.warmup.epochs)
  target = config.warmup.target
  check_name("warmup.target", target, WARMUP_TARGETS)
  if warmup_epochs < 0:
    raise ValueError(f"warmup.epochs={warmup_epochs} must be >= 0.")
  if warmup_epochs > 0 and target == "step" and attack.step is None:
    raise ValueError(f"warmup.target='step' but attack {attack.name!r} takes no step; "
                     f"use warmup.target='eps' or give attack.step.")
  bn_updates = config.get("bn_updates", "once")
  check_name("bn_updates", bn_updates, BN_UPDATES)
  return Method(eps=eps, attack=attack, regularizers=regs, warmup_epochs=warmup_epochs,
                warmup_target=target, bn_updates=bn_updates)


def keyword_defaults(config) -> dict[str, Any]:
  """The signature default of every keyword the config's sections pass on, by config path.

  Paths are "model.kwargs.<k>" (the model constructor's keywords),
  "attack.kwargs.<k>" (the attack's) and "regularizers.<name>.<k>" (each
  configured regularizer's), with JSON values (tuples as lists). A stored config
  that lacks such a key (written before the library added it) ran with this
  default, so resuming it with the key set to its default is the same run.
  Unknown names contribute nothing (validation reports them).
  """
  sources = []
  model = registry.MODELS.get(config.model.get("name"))
  if model is not None:
    sources.append(("model.kwargs", model))
  spec = attacks.ATTACK_SPECS.get(config.attack.get("name"))
  if spec is not None:
    sources.append(("attack.kwargs", spec.fn))
  for name in config.regularizers.keys():
    if name in regularizers.REGULARIZER_SPECS:
      sources.append((f"regularizers.{name}", regularizers.REGULARIZER_SPECS[name].fn))
  defaults = {}
  for prefix, fn in sources:
    named, _ = _keyword_parameters(fn)
    for key, parameter in named.items():
      if parameter.default is parameter.empty:
        continue
      try:
        defaults[f"{prefix}.{key}"] = json.loads(json.dumps(parameter.default))
      except (TypeError, ValueError):  # not a config value (a dtype, a function)
        pass
  return defaults

"""Shared pieces of the AutoAttack attacks: result type, model calls, checks.

Conventions every attack in this package follows:

* An attack is a function `attack(logits_fn, x, y, key, *, eps, ..., mask=None)`
  returning an `AttackResult(x_adv, fooled, info)`. `x_adv` holds the
  adversarial point where the attack fooled the model and the clean `x`
  elsewhere (as `perturb` does in fra31/auto-attack); `fooled[i]` says that the
  model misclassifies `x_adv[i]` (points already misclassified at `x` count as
  fooled, with `x_adv[i] = x[i]`).
* `mask` (bool, (B,)) selects the points to attack; the others are returned
  unchanged. Shapes never shrink: the whole batch goes through every forward
  pass and the masks decide what is accepted, so each compiled loop serves any
  mask. (The ensemble in `ensemble.py` compacts still-robust points into
  fixed-size chunks between attacks to save the wasted work.)
* `logits_fn(x) -> logits` is the model, passed *into* the jitted loops as an
  argument. A pytree closure (`closures.eval_logits_fn(model, variables)`, or a
  `jax.tree_util.Partial`) makes its arrays arguments of the compiled loops,
  which are reused for another checkpoint of the same architecture; a plain
  Python callable works too (`closures.as_pytree` wraps it in an argument-free
  `Partial`, static for jit), but its captured arrays are baked into the
  compiled program as constants (slow to compile for large models, and a new
  closure recompiles). A `stochastic=True` attack calls `logits_fn(x, key)`
  with a fresh key per forward pass (randomized defenses).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import _checks, attacks, closures

Array = jax.Array

NORMS = attacks.NORMS  # one spelling: "linf", "l2"


class AttackResult(NamedTuple):
  """What every attack of this package returns.

  Attributes:
    x_adv: (B, ...) float32. The adversarial example where `fooled`, `x` elsewhere.
    fooled: (B,) bool. The model misclassifies `x_adv` (argmax != y), as seen by
      the attack's own forward passes; True for points misclassified at `x`.
    info: dict of per-example diagnostics, attack-specific (see each attack).
  """
  x_adv: Array
  fooled: Array
  info: dict


# ---------------------------------------------------------------------------
# Model calls.

def call_logits(fn: Callable, x: Array, key: Optional[Array], stochastic: bool) -> Array:
  """`fn(x)` (or `fn(x, key)` for a stochastic model) as float32 logits."""
  logits = fn(x, key) if stochastic else fn(x)
  return jnp.asarray(logits).astype(jnp.float32)


def _predict(fn, x, key, stochastic):
  return call_logits(fn, x, key, stochastic)


predict = jax.jit(_predict, static_argnames=("stochastic",))
"""Jitted `logits_fn(x)`; `predict(closures.as_pytree(f), x, key, stochastic)`."""


# Random draws live in these small shared functions rather than inside the
# attack loops: a threefry draw is costly to compile on CPU, and this way every
# attack of a given batch shape reuses one compiled draw.

@functools.partial(jax.jit, static_argnames=("shape",))
def uniform_noise(key: Array, shape: tuple) -> Array:
  """U[-1, 1]^shape, float32."""
  return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)


def normal_noise(key: Array, shape: tuple) -> Array:
  """N(0, 1)^shape, float32, by inverse CDF of the shared uniform draw.

  The transform `jax.random.normal` applies itself (sqrt(2) erfinv(u)), so the
  compiled uniform draw is reused.
  """
  u = jnp.maximum(uniform_noise(key, shape), jnp.nextafter(jnp.float32(-1), jnp.float32(0)))
  return jnp.sqrt(jnp.float32(2)) * jax.scipy.special.erfinv(u)


def is_traced(*values: Any) -> bool:
  return any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(values))


def take_label(logits: Array, labels: Array) -> Array:
  return jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def per_example_max_abs(delta: Array) -> Array:
  return jnp.max(jnp.abs(delta.reshape(delta.shape[0], -1)), axis=-1)


def per_example_l2(delta: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.square(delta.reshape(delta.shape[0], -1)), axis=-1))


def expand_to(v: Array, x: Array) -> Array:
  """(B,) -> (B, 1, ..., 1) broadcastable against x."""
  return v.reshape((v.shape[0],) + (1,) * (x.ndim - 1))


# ---------------------------------------------------------------------------
# Boundary checks (concrete values only; traced values pass, per DESIGN.md).

def canonical_norm(norm: Any, allowed=NORMS) -> str:
  """'Linf'/'linf'/'L2'/'l2' -> 'linf'/'l2' (the spelling of `attacks.NORMS`); anything else raises."""
  lookup = {n.lower(): n for n in allowed}
  if not isinstance(norm, str) or norm.lower() not in lookup:
    raise ValueError(f"Unknown norm {norm!r}; choose one of {list(allowed)}.")
  return lookup[norm.lower()]


def check_eps(eps: Any) -> None:
  if eps is None:
    raise ValueError("eps must be given (a float in (0, 1], pixel units).")
  _checks.check_eps(eps)
  _checks.check_positive("eps", eps)




def check_inputs(x: Any, y: Any, mask: Any = None) -> None:
  """Images in [0, 1] with a batch axis; integer labels (B,); optional mask (B,)."""
  _checks.check_images(x)
  if np.ndim(y) != 1:
    raise ValueError(f"y must be a vector of integer labels (B,), got shape {np.shape(y)}.")
  _checks.check_same_batch("x", x, "y", y)
  y_dtype = y.dtype if hasattr(y, "dtype") else np.asarray(y).dtype
  if not jnp.issubdtype(y_dtype, jnp.integer):
    raise ValueError(f"y must hold integer class labels, got dtype {y_dtype}.")
  if mask is not None:
    if np.shape(mask) != (np.shape(x)[0],):
      raise ValueError(
          f"mask must have shape (B,) = ({np.shape(x)[0]},), got {np.shape(mask)}.")


def check_labels_in_range(y: Any, num_classes: int) -> None:
  if is_traced(y):
    return
  arr = np.asarray(y)
  if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
    raise ValueError(
        f"labels y must lie in [0, {num_classes - 1}] (the model has {num_classes} "
        f"classes); they span [{arr.min()}, {arr.max()}].")


def check_n_target_classes(n_target_classes: int, num_classes: int, what: str) -> None:
  _checks.check_int("n_target_classes", n_target_classes, 1)
  if n_target_classes > num_classes - 1:
    raise ValueError(
        f"{what}: n_target_classes={n_target_classes} but the model has only "
        f"{num_classes} classes, so at most {num_classes - 1} target classes exist.")


def prepare(logits_fn, x, y, mask):
  """Common conversion: pytree closure, float32 images, int32 labels, bool mask."""
  fn = closures.as_pytree(logits_fn)
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y).astype(jnp.int32)
  mask = jnp.ones(x.shape[0], bool) if mask is None else jnp.asarray(mask, bool)
  return fn, x, y, mask


def scalar(value) -> Array:
  """A float32 scalar with a fixed (strong) type, so jitted loops never
  recompile between Python floats and arrays."""
  return jnp.asarray(value, jnp.float32)


def any_concrete(v: Array) -> bool:
  """`bool(jnp.any(v))` when concrete; True (keep going) when traced."""
  if is_traced(v):
    return True
  return bool(np.any(np.asarray(v)))

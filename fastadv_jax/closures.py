"""Closures: the one interface between models and attacks, regularizers, metrics.

The primitive is `logits_fn(x) -> logits`: a Flax Linen model applied with fixed
variables, with the BatchNorm mode chosen when the closure is built:

* ``bn="batch"``: batch statistics, running averages *not* updated (the mutated
  collection is dropped). What attacks and regularizers use during training, as
  the PyTorch references do (they attack in `model.train()` mode).
* ``bn="eval"``: running averages; what every evaluation uses.

Loss closures are built from a `logits_fn` and labels. A loss closure is any
callable `loss_fn(x) -> scalar` (the batch mean); the ones built here are
`LossFn` objects that additionally expose per-example losses and correctness
(`loss_fn.with_aux(x)`), which PGD needs for per-example early stopping, best
iterates and restart selection. A plain `lambda x: ...` works with every attack
that needs only a gradient (FGSM, FGSM-RS, ZeroGrad, ...).

Example::

  logits_fn = closures.logits_fn(model, variables, bn="batch")
  loss_fn = closures.cross_entropy(logits_fn, y)
  delta = attacks.pgd(loss_fn, x, key, eps=8/255, step=2/255, steps=10)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fastadv_jax import _checks

Array = jax.Array
LogitsFn = Callable[[Array], Array]

BN_MODES = ("batch", "eval")


def logits_fn(model: Any, variables: Any, *, bn: str = "eval",
              dtype: Any = None) -> LogitsFn:
  """Returns `x -> logits` for a Linen `model` with call signature `(x, train)`.

  Args:
    model: a Flax Linen module whose `__call__(x, train: bool)` returns logits.
    variables: its variables (`{"params": ..., "batch_stats": ...}`).
    bn: "batch" (batch statistics; running averages are not updated) or
      "eval" (running averages).
    dtype: dtype of the returned logits; None promotes to at least float32
      (losses and their gradients stay in float32 when the model computes in
      bf16, and float64 stays float64).
  Returns:
    A pure function of a batch of images NHWC in [0, 1].
  """
  _checks.check_choice("BatchNorm mode bn", bn, BN_MODES)
  has_batch_stats = "batch_stats" in variables

  def apply(x):
    if bn == "batch" and has_batch_stats:
      # Batch statistics; the updated running averages are dropped on purpose.
      logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    else:
      logits = model.apply(variables, x, train=bn == "batch")
    return _at_least_float32(logits) if dtype is None else logits.astype(dtype)

  return apply


class LossAux(NamedTuple):
  """Per-example information a loss closure reports beside its batch mean."""
  losses: Array   # (B,) per-example loss
  correct: Array  # (B,) bool: the model still classifies the example correctly
  logits: Array   # (B, C)


@dataclasses.dataclass(frozen=True)
class LossFn:
  """A batch-mean loss closure with per-example information.

  `loss_fn(x)` is the mean over the batch of `per_example(logits, labels)`, all
  computed from *one* forward pass of the batch (so BatchNorm in batch mode
  couples the examples exactly as in the references' batch-mean losses).
  """
  logits_fn: LogitsFn
  labels: Array
  per_example: Callable[[Array, Array], Array]
  name: str = "loss"

  def with_aux(self, x: Array) -> tuple[Array, LossAux]:
    logits = self.logits_fn(x)
    losses = self.per_example(logits, self.labels)
    correct = jnp.argmax(logits, axis=-1) == self.labels
    return jnp.mean(losses), LossAux(losses, correct, logits)

  def __call__(self, x: Array) -> Array:
    return self.with_aux(x)[0]


def _at_least_float32(logits: Array) -> Array:
  """bf16/fp16 logits are promoted to float32; float64 stays float64."""
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def cross_entropy_per_example(logits: Array, labels: Array) -> Array:
  """Softmax cross-entropy per example, in float32 (or float64 for float64 logits)."""
  return optax.softmax_cross_entropy_with_integer_labels(_at_least_float32(logits), labels)


def dlr_per_example(logits: Array, labels: Array) -> Array:
  """Untargeted Difference of Logits Ratio (Croce & Hein 2020, Eq. 6).

  DLR(x, y) = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12), with z
  sorted in decreasing order. Larger is better for the attacker.
  """
  logits = _at_least_float32(logits)
  num_classes = logits.shape[-1]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=bool)
  z_y = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  z_other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
  z_sorted = jnp.sort(logits, axis=-1)
  denom = z_sorted[:, -1] - z_sorted[:, -3] + 1e-12
  return -(z_y - z_other) / denom


def dlr_targeted_per_example(logits: Array, labels: Array, targets: Array) -> Array:
  """Targeted DLR (Croce & Hein 2020, Eq. 7): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2)."""
  logits = _at_least_float32(logits)
  z_y = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  z_t = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  z_sorted = jnp.sort(logits, axis=-1)
  denom = z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12
  return -(z_y - z_t) / denom


def margin_per_example(logits: Array, labels: Array) -> Array:
  """Carlini-Wagner margin max_{i != y} z_i - z_y (positive once misclassified)."""
  logits = _at_least_float32(logits)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
  z_y = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  z_other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
  return z_other - z_y


def cross_entropy(logits_fn: LogitsFn, labels: Array) -> LossFn:
  """Batch-mean cross-entropy closure `x -> mean_i CE(f(x)_i, y_i)`."""
  return LossFn(logits_fn, labels, cross_entropy_per_example, "ce")


def dlr(logits_fn: LogitsFn, labels: Array) -> LossFn:
  """Batch-mean untargeted DLR loss closure (APGD-DLR)."""
  return LossFn(logits_fn, labels, dlr_per_example, "dlr")


def dlr_targeted(logits_fn: LogitsFn, labels: Array, targets: Array) -> LossFn:
  """Batch-mean targeted DLR loss closure (APGD-T); `targets` are class indices."""
  return LossFn(logits_fn, labels,
                lambda z, y: dlr_targeted_per_example(z, y, targets), "dlr_targeted")


def margin(logits_fn: LogitsFn, labels: Array) -> LossFn:
  """Batch-mean CW margin loss closure."""
  return LossFn(logits_fn, labels, margin_per_example, "margin")


LOSSES = {"ce": cross_entropy, "dlr": dlr, "margin": margin}


def loss_fn(name: str, logits_fn: LogitsFn, labels: Array) -> LossFn:
  """A loss closure chosen by name: one of `LOSSES` ("ce", "dlr", "margin")."""
  _checks.check_choice("loss", name, LOSSES)
  return LOSSES[name](logits_fn, labels)

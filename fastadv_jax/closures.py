"""Closures: the one interface between models and attacks, regularizers, metrics.

The primitive is `logits_fn(x) -> logits`: a Flax Linen model applied with fixed
variables, with the BatchNorm mode chosen when the closure is built:

* ``bn="batch"``: batch statistics, running averages *not* updated (the mutated
  collection is dropped). What attacks and regularizers use during training, as
  the PyTorch references do (they attack in `model.train()` mode).
* ``bn="eval"``: running averages; what every evaluation uses
  (`eval_logits_fn`: eval mode and float32 throughout).

`logits_fn(...)` returns a `LogitsFn`, a pytree (a `flax.struct.dataclass`): the
variables are its leaves; the Linen module, the BatchNorm mode and the output
dtype are static. So one closure type works everywhere:

* inside a traced function (the train step) it is an ordinary callable;
* passed as an *argument* to `jax.jit` / `jax.pmap` / `shard_map`, its variables
  become device buffers (not constants baked into the executable), and the
  compiled function is cached by the static part: another checkpoint of the
  same architecture (an equal module) reuses it. Linen modules are hashable
  dataclasses; a module with unhashable attributes (lists) cannot be passed
  as a jit argument (use tuples).

Loss closures are built from a `logits_fn` and labels. A loss closure is any
callable `loss_fn(x) -> scalar` (the batch mean); the ones built here are
`LossFn` objects (pytrees too: the logits closure and the labels are leaves, the
per-example loss function static) that additionally expose per-example losses
and correctness (`loss_fn.with_aux(x)`), which PGD needs for per-example early
stopping, best iterates and restart selection. A plain `lambda x: ...` works with
every attack that needs only a gradient (FGSM, FGSM-RS, ZeroGrad, ...).

A user's plain Python callable (a lambda, a `functools.partial`) is not a pytree
with array leaves; `as_pytree` wraps it in an argument-free
`jax.tree_util.Partial` at the boundary of the functions that pass closures into
compiled code (evaluation, AutoAttack). jit then treats the callable as static
(hashed by identity) and its captured arrays become constants of the executable.

Example::

  logits_fn = closures.logits_fn(model, variables, bn="batch")
  loss_fn = closures.cross_entropy(logits_fn, y)
  delta = attacks.pgd(loss_fn, x, key, eps=8/255, step=2/255, steps=10).delta
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastadv_jax import _checks

Array = jax.Array

BN_MODES = ("batch", "eval")


@flax.struct.dataclass
class LogitsFn:
  """`x -> logits` of a Linen model with fixed variables; a pytree.

  Build it with `logits_fn(...)` or `eval_logits_fn(...)`.

  Attributes:
    variables: the model variables (`{"params": ..., "batch_stats": ...}`),
      the pytree leaves.
    model: the Linen module, `__call__(x, train: bool) -> logits` (static).
    bn: "batch" or "eval" (static; see the module docstring).
    dtype: dtype of the returned logits, or None for at least float32 (static).
  """
  variables: Any
  model: Any = flax.struct.field(pytree_node=False)
  bn: str = flax.struct.field(pytree_node=False, default="eval")
  dtype: Any = flax.struct.field(pytree_node=False, default=None)

  def __call__(self, x: Array) -> Array:
    if self.bn == "batch" and "batch_stats" in self.variables:
      # Batch statistics; the updated running averages are dropped on purpose.
      logits, _ = self.model.apply(self.variables, x, train=True,
                                   mutable=["batch_stats"])
    else:
      logits = self.model.apply(self.variables, x, train=self.bn == "batch")
    return _at_least_float32(logits) if self.dtype is None else logits.astype(self.dtype)


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
    A `LogitsFn` (a pytree), a pure function of a batch of images NHWC in [0, 1].
  """
  _checks.check_choice("BatchNorm mode bn", bn, BN_MODES)
  return LogitsFn(variables, model, bn, None if dtype is None else np.dtype(dtype))


def eval_logits_fn(model: Any, variables: Any) -> LogitsFn:
  """The evaluation closure: BatchNorm in eval mode, float32 throughout.

  Evaluation is always float32 (DESIGN.md, "Conventions"): a module with a
  non-float32 `dtype` attribute (a bf16 training model) is cloned with
  `dtype=float32`, floating variables are cast to float32, and the logits are
  float32. On the CPU backend a module with an `im2col_stem` attribute (the
  library's models) is cloned with `im2col_stem=True`: its first convolution
  (3 input channels) then runs as im2col + matmul
  (`models.common.image_conv`), the same function and parameters, whose input
  gradients XLA:CPU computes about 2x faster than its own convolution's; on
  the parity benchmark's CNN this made AutoAttack 1.3x -> 2.0x torchattacks'
  throughput (benchmarks/README_parity.md). Two closures of the same
  architecture share compiled evaluations.

  Args:
    model: a Linen module with `__call__(x, train)`.
    variables: its variables.
  Returns:
    `LogitsFn(variables, model, bn="eval", dtype=float32)`.
  """
  model_dtype = getattr(model, "dtype", None)
  if model_dtype is not None and np.dtype(model_dtype) != np.float32:
    model = model.clone(dtype=jnp.float32)
  if jax.default_backend() == "cpu" and getattr(model, "im2col_stem", True) is False:
    model = model.clone(im2col_stem=True)
  variables = jax.tree_util.tree_map(
      lambda v: jnp.asarray(v, jnp.float32)
      if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating) else jnp.asarray(v),
      variables)
  return logits_fn(model, variables, bn="eval", dtype=jnp.float32)


def as_pytree(fn: Callable) -> Any:
  """`fn` in a form that can be passed as an argument into jit / pmap.

  A pytree closure (`LogitsFn`, `LossFn`, a `jax.tree_util.Partial`, any
  registered pytree with a `__call__`) is returned as is: its arrays become
  arguments of the compiled function. Any other callable (a lambda, a Python
  closure, a `functools.partial`) is wrapped in an argument-free
  `jax.tree_util.Partial`, which jit treats as static: hashed by identity, its
  captured arrays baked into the executable.

  Raises:
    ValueError: `fn` is not callable.
  """
  if not callable(fn):
    raise ValueError(f"Expected a callable logits or loss closure, got "
                     f"{type(fn).__name__}.")
  if is_opaque(fn):
    return jax.tree_util.Partial(fn)
  return fn


def is_opaque(fn: Any) -> bool:
  """True when `fn` is not a pytree container (it is its own single leaf)."""
  leaves = jax.tree_util.tree_leaves(fn)
  return len(leaves) == 1 and leaves[0] is fn


class LossAux(NamedTuple):
  """Per-example information a loss closure reports beside its batch mean."""
  losses: Array   # (B,) per-example loss
  correct: Array  # (B,) bool: the model still classifies the example correctly
  logits: Array   # (B, C)


@flax.struct.dataclass
class LossFn:
  """A batch-mean loss closure with per-example information; a pytree.

  `loss_fn(x)` is the mean over the batch of `per_example(logits, labels)` (or
  `per_example(logits, labels, targets)` when `targets` is given), all computed
  from *one* forward pass of the batch (so BatchNorm in batch mode couples the
  examples exactly as in the references' batch-mean losses).

  The constructors below (`cross_entropy`, `dlr`, ...) wrap a plain Python
  `logits_fn` with `as_pytree`, so the closure they return can always be passed
  into jit; a `LossFn(...)` built directly with a plain callable has that
  callable as a leaf and works only inside traced code.

  Attributes:
    logits_fn: the logits closure (a pytree field: a `LogitsFn` contributes
      its variables as leaves).
    labels: (B,) integer labels (a leaf).
    per_example: `(logits, labels[, targets]) -> (B,)` losses (static: use a
      module-level function such as `cross_entropy_per_example`, so closures
      built twice hash equal).
    name: a name for logs (static).
    targets: optional (B,) target classes (a leaf), e.g. for targeted DLR.
  """
  logits_fn: Any
  labels: Array
  per_example: Callable[..., Array] = flax.struct.field(pytree_node=False)
  name: str = flax.struct.field(pytree_node=False, default="loss")
  targets: Optional[Array] = None

  def with_aux(self, x: Array) -> tuple[Array, LossAux]:
    logits = self.logits_fn(x)
    check_labels(self.labels, logits.shape, "labels")
    if self.targets is not None:
      check_labels(self.targets, logits.shape, "targets")
    if self.targets is None:
      losses = self.per_example(logits, self.labels)
    else:
      losses = self.per_example(logits, self.labels, self.targets)
    correct = jnp.argmax(logits, axis=-1) == self.labels
    return jnp.mean(losses), LossAux(losses, correct, logits)

  def __call__(self, x: Array) -> Array:
    return self.with_aux(x)[0]


def check_labels(labels: Any, logits_shape: tuple[int, ...], what: str = "labels") -> None:
  """Raises a ValueError for labels that do not fit the logits.

  The batch size (static) is checked always, even while tracing; the class
  range only for concrete labels (a traced value cannot be inspected without
  a host sync). Out-of-range labels would otherwise give a NaN or a wrong loss
  silently (one_hot of an out-of-range class is all zeros).
  """
  shape = np.shape(labels)
  if len(shape) != 1 or shape[0] != logits_shape[0]:
    raise ValueError(f"{what} has shape {shape}; expected ({logits_shape[0]},), one "
                     f"label per example of the batch.")
  if _checks.is_concrete(labels):
    values = np.asarray(labels)
    if not np.issubdtype(values.dtype, np.integer):
      raise ValueError(f"{what} must be integers, got dtype {values.dtype}.")
    num_classes = logits_shape[-1]
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
      raise ValueError(f"{what} holds {bad[0]}, outside [0, {num_classes - 1}] for a "
                       f"model with {num_classes} classes.")


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
  return LossFn(as_pytree(logits_fn), labels, cross_entropy_per_example, "ce")


def dlr(logits_fn: LogitsFn, labels: Array) -> LossFn:
  """Batch-mean untargeted DLR loss closure (APGD-DLR)."""
  return LossFn(as_pytree(logits_fn), labels, dlr_per_example, "dlr")


def dlr_targeted(logits_fn: LogitsFn, labels: Array, targets: Array) -> LossFn:
  """Batch-mean targeted DLR loss closure (APGD-T); `targets` are class indices."""
  return LossFn(as_pytree(logits_fn), labels, dlr_targeted_per_example, "dlr_targeted",
                targets)


def margin(logits_fn: LogitsFn, labels: Array) -> LossFn:
  """Batch-mean CW margin loss closure."""
  return LossFn(as_pytree(logits_fn), labels, margin_per_example, "margin")


LOSSES = {"ce": cross_entropy, "dlr": dlr, "margin": margin}


def loss_fn(name: str, logits_fn: LogitsFn, labels: Array) -> LossFn:
  """A loss closure chosen by name: one of `LOSSES` ("ce", "dlr", "margin")."""
  _checks.check_choice("loss", name, LOSSES)
  return LOSSES[name](logits_fn, labels)

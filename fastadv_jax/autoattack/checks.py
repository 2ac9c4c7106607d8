"""Warnings for signs that an AutoAttack evaluation may be unreliable.

JAX versions of the checks in fra31/auto-attack `autoattack/checks.py` (see its
`flags_doc.md`), emitted with `warnings.warn` and a specific category so they
can be filtered or turned into errors (`warnings.simplefilter("error",
GradientMaskingWarning)`):

* `RandomizedDefenseWarning`: repeated calls on the same inputs give different
  predictions or logits (use `version="rand"`).
* `ProbabilityOutputWarning`: the outputs look like probabilities (softmax
  already applied) instead of logits.
* `GradientMaskingWarning`: zero (or non-finite) input gradients at APGD's
  starting point; black-box Square or FAB-T lowering the robust accuracy left
  by the gradient attacks before them; no attack succeeding on any point.

The reference's `check_dynamic` (counting autograd calls during inference) has
no JAX counterpart and is not implemented.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax.autoattack import _common


class AutoAttackWarning(UserWarning):
  """Base class of every AutoAttack reliability warning."""


class GradientMaskingWarning(AutoAttackWarning):
  """Gradient-based attacks may be failing for reasons other than robustness."""


class ProbabilityOutputWarning(GradientMaskingWarning):
  """The model seems to return probabilities instead of logits."""


class RandomizedDefenseWarning(AutoAttackWarning):
  """The model's outputs change between calls: use version="rand" (EOT)."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _warn(message: str, category: type) -> None:
  """warnings.warn attributed to the first caller outside this package."""
  frame, stacklevel = sys._getframe(0), 1
  while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
    frame, stacklevel = frame.f_back, stacklevel + 1
  warnings.warn(message, category, stacklevel=stacklevel)


def check_randomized(logits_fn: Callable, x, y, key, *, stochastic: bool = False,
                     n: int = 5, alpha: float = 1e-4) -> bool:
  """Warns when `n` calls on `x` disagree (fra31 `check_randomized`).

  The calls are made eagerly (not under jit), so randomness hidden in Python
  state is seen; a stochastic model gets a different key per call. Raised if
  the number of correct predictions changes or the L2-normalized logits of
  two calls differ by more than `alpha` for some example.

  Returns:
    True when the warning was emitted.
  """
  keys = jax.random.split(key, n)
  outputs, n_correct = [], []
  for k in keys:
    logits = np.asarray(_common.call_logits(logits_fn, x, k, stochastic), np.float64)
    n_correct.append(int(np.sum(np.argmax(logits, -1) == np.asarray(y))))
    norms = np.sqrt(np.sum(logits ** 2, axis=-1, keepdims=True))
    outputs.append(logits / (norms + 1e-10))
  max_diff = 0.0
  for i in range(n - 1):
    for j in range(i + 1, n):
      max_diff = max(max_diff, float(np.max(np.sqrt(np.sum((outputs[i] - outputs[j]) ** 2, -1)))))
  if len(set(n_correct)) > 1 or max_diff > alpha:
    _warn("the model's outputs change between calls on the same inputs (max normalized "
          f"logit difference {max_diff:.3g}, correct counts {n_correct}): it seems to be a "
          'randomized defense; use version="rand" (APGD with EOT) and stochastic=True.',
          RandomizedDefenseWarning)
    return True
  return False


def check_range_output(logits, alpha: float = 1e-5) -> bool:
  """Warns when outputs lie in [0, 1] and sum to 1 (fra31 `check_range_output`)."""
  logits = np.asarray(logits, np.float64)
  if (logits.max() < 1.0 + alpha and logits.min() > -alpha
      and np.all(np.abs(logits.sum(-1) - 1.0) < alpha)):
    _warn("the model's outputs look like a probability distribution (in [0, 1], summing "
          "to 1): AutoAttack expects logits (pre-softmax); probabilities make the "
          "cross-entropy and DLR gradients vanish numerically.", ProbabilityOutputWarning)
    return True
  return False


def warn_zero_gradients(n_zero: int, n_attacked: int, attack: str) -> bool:
  """Warns when some attacked points had a zero or non-finite input gradient.

  fra31 `check_zero_gradients` (it checks the DLR losses only; here every APGD
  loss is checked: a cross-entropy gradient that is exactly zero means a
  saturated softmax, itself a cause of masked gradients).
  """
  if n_zero > 0:
    _warn(f"{attack}: {n_zero} of {n_attacked} attacked points have a zero (or non-finite) "
          "input gradient at the starting point; gradient-based attacks cannot make "
          "progress there (input quantization, non-differentiable layers, saturated "
          "logits). Consider BPDA or black-box attacks (Square).", GradientMaskingWarning)
    return True
  return False


def check_black_box_gain(robust_accuracy: Mapping[str, float], *, alpha: float = 0.002,
                         attacks: Sequence[str] = ("square", "fab-t")) -> list[str]:
  """Warns when Square (or FAB-T) lowers the robust accuracy left before it.

  fra31 `check_square_sr`: black-box attacks beating white-box ones hint at
  an overestimated robustness. Here the accuracy before each listed attack
  (the previous stage of the ensemble) is compared with the accuracy after it;
  a drop larger than `alpha` (a fraction of all points) warns.

  Args:
    robust_accuracy: ordered {stage: robust accuracy after it}, starting with "clean".
  Returns:
    The attacks that triggered the warning.
  """
  stages = list(robust_accuracy.items())
  flagged = []
  for i in range(1, len(stages)):
    name, acc = stages[i]
    prev_name, prev = stages[i - 1]
    # Only meaningful after at least one gradient attack ran.
    if name in attacks and prev_name != "clean" and acc < prev - alpha:
      flagged.append(name)
      _warn(f"{name} lowered the robust accuracy left by the attacks before it by "
            f"{prev - acc:.2%} (from {prev:.2%} to {acc:.2%}): the gradient-based attacks "
            "missed points, which hints at gradient masking; consider more Square "
            "queries/restarts or an adaptive attack.", GradientMaskingWarning)
  return flagged


def check_no_success(n_attacked: int, n_fooled: int) -> bool:
  """Warns when no attack fooled any of the correctly classified points."""
  if n_attacked > 0 and n_fooled == 0:
    _warn(f"no attack fooled any of the {n_attacked} correctly classified points: the "
          "robust accuracy equals the clean accuracy, which is unusual for eps > 0 and "
          "may indicate gradient masking (or a very small eps).", GradientMaskingWarning)
    return True
  return False


def gradient_is_degenerate(grad) -> jax.Array:
  """(B,) bool: the per-example gradient is all zeros or has a non-finite entry."""
  flat = grad.reshape(grad.shape[0], -1)
  total = jnp.sum(jnp.abs(flat), axis=-1)
  return (total == 0) | ~jnp.isfinite(total)


__all__ = [
    "AutoAttackWarning", "GradientMaskingWarning", "ProbabilityOutputWarning",
    "RandomizedDefenseWarning", "check_randomized", "check_range_output",
    "warn_zero_gradients", "check_black_box_gain", "check_no_success",
]

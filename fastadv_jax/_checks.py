"""Boundary checks for values a user passes in.

Every public function validates its *concrete* arguments (Python numbers, NumPy
arrays, committed JAX arrays) before any compilation and raises a ValueError that
names the offending value and the allowed range or choices. Traced values (inside
`jax.jit`, `jax.grad`, `jax.pmap`) pass through unchecked: checking them would
force a host sync or a recompile.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
import numpy as np


def is_concrete(value: Any) -> bool:
  """True when `value` can be inspected on the host without tracing."""
  if isinstance(value, jax.core.Tracer):
    return False
  return isinstance(value, (int, float, np.ndarray, np.generic, jax.Array))


def check_int(what: str, value: Any, minimum: int | None = None) -> None:
  """Raises unless `value` is a Python or NumPy integer (not a bool) >= minimum.

  Counts (steps, restarts, batch sizes) are static: they fix the compiled
  program, so they are checked on concrete values only.
  """
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{what} must be an integer, got {value!r}.")
  if minimum is not None and value < minimum:
    raise ValueError(f"{what} must be >= {minimum}, got {value!r}.")


def check_choice(what: str, value: Any, choices: Iterable[Any]) -> None:
  """Raises a ValueError unless `value` is one of `choices`."""
  choices = list(choices)
  if value not in choices:
    raise ValueError(
        f"Unknown {what} {value!r}; choose one of {sorted(map(str, choices))}.")


def check_nonnegative(what: str, value: Any) -> None:
  """Raises for a concrete negative (or NaN) number; traced values pass."""
  if value is None or not is_concrete(value):
    return
  arr = np.asarray(value)
  if arr.size and (np.any(np.isnan(arr)) or np.any(arr < 0)):
    raise ValueError(f"{what} must be >= 0, got {value!r}.")


def check_positive(what: str, value: Any) -> None:
  """Raises for a concrete number <= 0 (or NaN); traced values pass."""
  if value is None or not is_concrete(value):
    return
  arr = np.asarray(value)
  if arr.size and (np.any(np.isnan(arr)) or np.any(arr <= 0)):
    raise ValueError(f"{what} must be > 0, got {value!r}.")


def check_in_range(what: str, value: Any, low: float, high: float, *,
                   low_open: bool = False, high_open: bool = False) -> None:
  """Raises unless low <(=) value <(=) high for a concrete value."""
  if value is None or not is_concrete(value):
    return
  arr = np.asarray(value, dtype=np.float64)
  ok_low = np.all(arr > low) if low_open else np.all(arr >= low)
  ok_high = np.all(arr < high) if high_open else np.all(arr <= high)
  if np.any(np.isnan(arr)) or not (ok_low and ok_high):
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    raise ValueError(f"{what} must lie in {lo}{low}, {high}{hi}, got {value!r}.")


def check_eps(eps: Any, what: str = "eps") -> None:
  """ε is in [0,1] pixel units: a value above 1 is almost surely given in /255."""
  if eps is None or not is_concrete(eps):
    return
  check_nonnegative(what, eps)
  if np.any(np.asarray(eps) > 1):
    raise ValueError(
        f"{what}={eps!r} is larger than 1, but images are in [0, 1]; "
        f"give it in pixel units (e.g. 8/255), not in /255.")


def check_images(x: Any, what: str = "x") -> None:
  """Images must be a batch (leading axis) of values in [0, 1]."""
  if not is_concrete(x):
    return
  arr = np.asarray(x)
  if arr.ndim < 2:
    raise ValueError(
        f"{what} must be a batch of images (leading batch axis), got shape {arr.shape}.")
  if arr.size:
    lo, hi = float(arr.min()), float(arr.max())
    if not (lo >= 0.0 and hi <= 1.0):
      raise ValueError(
          f"{what} must lie in the box [0, 1] (NHWC float images); its values span "
          f"[{lo:.4g}, {hi:.4g}]. Normalization belongs inside the model.")


def check_same_batch(what_a: str, a: Any, what_b: str, b: Any) -> None:
  """Raises when two arrays disagree on the leading (batch) dimension."""
  sa, sb = np.shape(a), np.shape(b)
  if sa and sb and sa[0] != sb[0]:
    raise ValueError(
        f"{what_a} has batch size {sa[0]} (shape {sa}) but {what_b} has "
        f"{sb[0]} (shape {sb}).")


def check_same_shape(what_a: str, a: Any, what_b: str, b: Any) -> None:
  sa, sb = np.shape(a), np.shape(b)
  if sa != sb:
    raise ValueError(f"{what_a} has shape {sa} but {what_b} has shape {sb}.")

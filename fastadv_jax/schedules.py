"""Learning-rate, momentum and warm-up schedules of the reproduced papers.

Every function returns an `optax.Schedule`: a pure, jittable map from the
iteration count (the number of optimizer updates already made, starting at 0,
as `optax.inject_hyperparams` and `optax.scale_by_schedule` count) to a float32
value. All schedules are stepped per iteration; epoch-based recipes are given
their boundaries in steps (`epochs * steps_per_epoch`).

`step_offset` shifts where a schedule is read: the value used for update `s`
(0-based) is `f(s + step_offset)`. With the default 0 the first update is at
`f(0)`: for the cyclic schedule that is learning rate 0, as in Wong et al.'s
`torch.optim.lr_scheduler.CyclicLR` (stepped after each iteration, so its first
iteration runs at `base_lr = 0`). The GradAlign and ImageNet (Wong et al.) code
set the rate before iteration `i` of an epoch to `f(epoch + (i + 1) / n)`,
i.e. `step_offset=1`: its first update is at `f(1 / n)` and its last at `f(T)`.

Example::

  lr = schedules.cyclic(0.2, total_steps=30 * 391, peak_fraction=2 / 5)
  momentum = schedules.cyclic_momentum(total_steps=30 * 391)
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=0.9)
  eps = schedules.warmup(8 / 255, warmup_steps=5 * 573)(step)  # traced in jit
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
import optax

from fastadv_jax import _checks

Schedule = optax.Schedule






def _check_finite(what: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or (
      not np.isfinite(value)):
    raise ValueError(f"{what} must be a finite number, got {value!r}.")


def _read_step(step: Any, step_offset: int):
  return jnp.asarray(step, jnp.float32) + step_offset


def piecewise_linear(step_knots: Sequence[float], values: Sequence[float], *,
                     step_offset: int = 0) -> Schedule:
  """Linear interpolation through `(step_knots[i], values[i])`, constant outside.

  `np.interp` semantics, the form every schedule of the reproduced papers'
  code takes (`np.interp([t], knots, values)`).

  Args:
    step_knots: non-decreasing steps (at least one).
    values: the schedule's value at each knot.
    step_offset: the value for update `s` is read at `s + step_offset`.
  Returns:
    An `optax.Schedule`.
  """
  knots = np.asarray(step_knots, np.float64)
  vals = np.asarray(values, np.float64)
  if knots.ndim != 1 or knots.size == 0 or knots.shape != vals.shape:
    raise ValueError(
        f"step_knots and values must be non-empty 1-D sequences of the same length, "
        f"got {list(step_knots)!r} and {list(values)!r}.")
  if np.any(np.diff(knots) < 0):
    raise ValueError(f"step_knots must be non-decreasing, got {list(step_knots)!r}.")
  _checks.check_int("step_offset", step_offset)
  knots_f32 = jnp.asarray(knots, jnp.float32)
  vals_f32 = jnp.asarray(vals, jnp.float32)

  def schedule(step):
    return jnp.interp(_read_step(step, step_offset), knots_f32, vals_f32)

  return schedule


def constant(value: float) -> Schedule:
  """The constant schedule `step -> value` (float32)."""
  _check_finite("value", value)

  def schedule(step):
    return jnp.full(jnp.shape(step), value, jnp.float32)

  return schedule


def cyclic(lr_max: float, total_steps: int, peak_fraction: float = 0.4, *,
           step_offset: int = 0) -> Schedule:
  """Triangular one-cycle learning rate `interp(t, [0, p*T, T], [0, lr_max, 0])`.

  The "cyclic" schedule of Wong et al. 2020 ("Fast is better than free", peak
  at the middle, p = 1/2), of the GradAlign paper (Andriushchenko & Flammarion
  2020, Sec. 5 and App. B: p = 2/5, updated every iteration) and of the
  ZeroGrad/MultiGrad paper (Golgooni et al. 2023, p = 1/2).

  With `step_offset=0` the first update is at learning rate 0, as in Wong et
  al.'s `CyclicLR` scheduler; no special case is needed because the
  interpolation is 0 at t = 0. The GradAlign code reads the rate at
  `epoch + (i + 1) / n`, i.e. `step_offset=1`.

  Args:
    lr_max: the peak learning rate (>= 0).
    total_steps: T, the number of updates of the whole run (epochs * steps per
      epoch); the rate is 0 at T and stays 0 after it.
    peak_fraction: p in (0, 1): where the peak lies, as a fraction of T.
    step_offset: the value for update `s` is read at `s + step_offset`.
  Returns:
    An `optax.Schedule`.
  """
  _checks.check_nonnegative("lr_max", lr_max)
  _check_finite("lr_max", lr_max)
  _checks.check_int("total_steps", total_steps, 1)
  _checks.check_in_range("peak_fraction", peak_fraction, 0.0, 1.0,
                         low_open=True, high_open=True)
  return piecewise_linear([0.0, peak_fraction * total_steps, float(total_steps)],
                          [0.0, lr_max, 0.0], step_offset=step_offset)


def cyclic_momentum(total_steps: int, peak_fraction: float = 0.5, *,
                    base_momentum: float = 0.8, max_momentum: float = 0.9,
                    step_offset: int = 0) -> Schedule:
  """Momentum cycled opposite to the cyclic learning rate: 0.9 -> 0.8 -> 0.9.

  Wong et al. 2020 train CIFAR-10 with `torch.optim.lr_scheduler.CyclicLR`,
  whose default `cycle_momentum=True` (base_momentum=0.8, max_momentum=0.9)
  moves the momentum to its minimum while the learning rate peaks:
  `interp(t, [0, p*T, T], [max, base, max])`. Use it with
  `optax.inject_hyperparams(optax.sgd)(learning_rate=..., momentum=<this>)`.

  Args:
    total_steps: T, the number of updates of the whole run.
    peak_fraction: where the learning rate peaks (Wong: 1/2).
    base_momentum: the momentum at the learning-rate peak.
    max_momentum: the momentum at the start and the end.
    step_offset: the value for update `s` is read at `s + step_offset`.
  Returns:
    An `optax.Schedule`.
  """
  _checks.check_int("total_steps", total_steps, 1)
  _checks.check_in_range("peak_fraction", peak_fraction, 0.0, 1.0,
                         low_open=True, high_open=True)
  _checks.check_in_range("base_momentum", base_momentum, 0.0, 1.0)
  _checks.check_in_range("max_momentum", max_momentum, 0.0, 1.0)
  return piecewise_linear(
      [0.0, peak_fraction * total_steps, float(total_steps)],
      [max_momentum, base_momentum, max_momentum], step_offset=step_offset)


def piecewise(init_value: float, boundaries: Sequence[int], factor: float = 0.1, *,
              step_offset: int = 0) -> Schedule:
  """Step decay: `init_value * factor**(number of boundaries <= step)`.

  The AdvLC schedule (Li & Spratling 2023, following Rice et al. 2020): lr 0.1
  for 200 epochs, multiplied by 0.1 at epochs 100 and 150, i.e.
  `piecewise(0.1, [100 * steps_per_epoch, 150 * steps_per_epoch])`: the update
  with index `100 * steps_per_epoch` (the first of epoch 100, 0-based) already
  uses the decayed rate, as PyTorch's `MultiStepLR(milestones=[100, 150])`.

  Args:
    init_value: the value before the first boundary.
    boundaries: strictly increasing steps at which the value is multiplied.
    factor: the multiplier applied at each boundary (>= 0).
    step_offset: the value for update `s` is read at `s + step_offset`.
  Returns:
    An `optax.Schedule`.
  """
  _check_finite("init_value", init_value)
  _checks.check_nonnegative("factor", factor)
  bounds = list(boundaries)
  for b in bounds:
    _checks.check_int("each boundary", b)
  if any(b1 <= b0 for b0, b1 in zip(bounds, bounds[1:])):
    raise ValueError(f"boundaries must be strictly increasing steps, got {bounds!r}.")
  _checks.check_int("step_offset", step_offset)
  levels = jnp.asarray([init_value * factor**i for i in range(len(bounds) + 1)],
                       jnp.float32)
  bounds_arr = jnp.asarray(bounds, jnp.float32).reshape(-1)

  def schedule(step):
    s = _read_step(step, step_offset)
    crossed = jnp.sum(s[..., None] >= bounds_arr, axis=-1)
    return levels[crossed]

  return schedule


def one_drop(value: float, drop_step: int, factor: float = 0.1, *,
             step_offset: int = 0) -> Schedule:
  """A constant rate dropped once: `value` before `drop_step`, `value*factor` from it on.

  A single-milestone `piecewise` (PyTorch `MultiStepLR` with one milestone),
  for long-schedule baselines that decay the rate once near the end.

  Args:
    value: the rate before the drop.
    drop_step: the first update that uses the dropped rate.
    factor: the multiplier at the drop.
    step_offset: the value for update `s` is read at `s + step_offset`.
  Returns:
    An `optax.Schedule`.
  """
  _checks.check_int("drop_step", drop_step, 1)
  return piecewise(value, [drop_step], factor, step_offset=step_offset)


def epochs_to_steps(epoch: float, steps_per_epoch: int | Sequence[int],
                    phase_boundaries: Sequence[float] | None = None) -> float:
  """Converts an (fractional) epoch to a step count when phases differ in steps per epoch.

  Args:
    epoch: the epoch (>= 0), e.g. 6 for the end of ImageNet phase 1.
    steps_per_epoch: one int for the whole run, or one per phase.
    phase_boundaries: epochs where the phases start and the last one ends,
      e.g. (0, 6, 12, 15); one more entry than `steps_per_epoch`. Needed only
      with several steps-per-epoch values.
  Returns:
    The number of updates made when `epoch` epochs are complete.
  """
  if isinstance(steps_per_epoch, (int, np.integer)):
    _checks.check_int("steps_per_epoch", steps_per_epoch, 1)
    return float(epoch) * int(steps_per_epoch)
  steps = list(steps_per_epoch)
  if phase_boundaries is None or len(list(phase_boundaries)) != len(steps) + 1:
    raise ValueError(
        f"With one steps_per_epoch per phase ({steps!r}), phase_boundaries must "
        f"give {len(steps) + 1} epochs (start of each phase and the end), got "
        f"{phase_boundaries!r}.")
  bounds = [float(b) for b in phase_boundaries]
  if any(b1 <= b0 for b0, b1 in zip(bounds, bounds[1:])) or bounds[0] != 0:
    raise ValueError(
        f"phase_boundaries must start at 0 and increase strictly, got {bounds!r}.")
  for s in steps:
    _checks.check_int("each steps_per_epoch", s, 1)
  total = 0.0
  for (start, end), spe in zip(zip(bounds, bounds[1:]), steps):
    total += max(0.0, min(float(epoch), end) - start) * spe
  if epoch > bounds[-1]:
    total += (float(epoch) - bounds[-1]) * steps[-1]
  return total


# Wong et al. 2020, ImageNet (their configs' lr_epochs/lr_values for the three
# phases, chained): 0 -> 0.4 over epoch 1, -> 0.04 at epoch 6 (end of phase 1,
# 128 px), -> 0.004 at 12 (phase 2, 224 px), -> 0.0004 at 15 (phase 3, 288 px).
# The values are multiples of the peak, lr_max = 0.4.
IMAGENET_WONG_EPOCHS = (0.0, 1.0, 6.0, 12.0, 15.0)
IMAGENET_WONG_VALUES = (0.0, 1.0, 0.1, 0.01, 0.001)
IMAGENET_WONG_LR_MAX = 0.4
IMAGENET_WONG_PHASE_BOUNDARIES = (0, 6, 12, 15)


def imagenet_wong(steps_per_epoch: int | Sequence[int], *,
                  lr_max: float = IMAGENET_WONG_LR_MAX,
                  epoch_knots: Sequence[float] = IMAGENET_WONG_EPOCHS,
                  values: Sequence[float] = IMAGENET_WONG_VALUES,
                  phase_boundaries: Sequence[float] = IMAGENET_WONG_PHASE_BOUNDARIES,
                  step_offset: int = 0) -> Schedule:
  """The ImageNet learning rate of Wong et al. 2020, piecewise linear in epochs.

  Phase 1 (epochs 0-6, 128 px, batch 512): 0 -> 0.4 at epoch 1 -> 0.04 at
  epoch 6; phase 2 (6-12, 224 px, batch 224): 0.04 -> 0.004; phase 3 (12-15,
  288 px, batch 128): 0.004 -> 0.0004 (`np.interp` over fractional epochs in
  their code). Because the phases use different batch sizes, an epoch has a
  different number of steps in each phase: give `steps_per_epoch` per phase
  (e.g. `data.imagenet.phase_steps_per_epoch(...)`) and the epoch knots are
  converted to steps phase by phase. Their code reads the rate at
  `epoch + (i + 1) / n` (`step_offset=1`).

  Args:
    steps_per_epoch: one int, or one int per phase.
    lr_max: the peak learning rate (0.4 in Wong et al.); `values` are scaled by it.
    epoch_knots: epochs of the interpolation knots.
    values: learning rate at each knot, as a multiple of lr_max.
    phase_boundaries: start epoch of each phase and the final epoch.
    step_offset: the value for update `s` is read at `s + step_offset`.
  Returns:
    An `optax.Schedule`.
  """
  step_knots = [epochs_to_steps(e, steps_per_epoch, phase_boundaries)
                for e in epoch_knots]
  _checks.check_nonnegative("lr_max", lr_max)
  return piecewise_linear(step_knots, [lr_max * v for v in values],
                          step_offset=step_offset)


def warmup(value: float, warmup_steps: int, *, step_offset: int = 0) -> Schedule:
  """Linear ramp `value * min(step / warmup_steps, 1)` for an ε or step-size warm-up.

  The SVHN recipe of the GradAlign paper (Andriushchenko & Flammarion 2020,
  App. B): ε (PGD) or the FGSM step (FGSM-based methods) grows linearly from 0
  over the first 5 epochs; without it training collapses to the majority
  class. The returned value is a traced float32 inside jit, so a warmed-up ε
  never triggers a recompile. Their code counts iterations from one
  no-update iteration, i.e. `step_offset=1`.

  Args:
    value: the final value (e.g. 8/255).
    warmup_steps: steps to reach it (0: constant `value`).
    step_offset: the value for update `s` is read at `s + step_offset`.
  Returns:
    An `optax.Schedule`.
  """
  _check_finite("value", value)
  _checks.check_int("warmup_steps", warmup_steps)
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}.")
  if warmup_steps == 0:
    return constant(value)
  return piecewise_linear([0.0, float(warmup_steps)], [0.0, value],
                          step_offset=step_offset)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": constant,
    "cyclic": cyclic,
    "cyclic_momentum": cyclic_momentum,
    "piecewise": piecewise,
    "one_drop": one_drop,
    "piecewise_linear": piecewise_linear,
    "imagenet_wong": imagenet_wong,
    "warmup": warmup,
}


def get_schedule(name: str, **kwargs: Any) -> Schedule:
  """A schedule chosen by name (one of `SCHEDULES`) built from keyword arguments.

  Raises a ValueError naming the allowed names for an unknown `name`, and the
  accepted arguments for a missing or unexpected one, before anything runs.
  """
  _checks.check_choice("schedule", name, SCHEDULES)
  fn = SCHEDULES[name]
  try:
    inspect.signature(fn).bind(**kwargs)
  except TypeError as e:
    params = [p for p in inspect.signature(fn).parameters]
    raise ValueError(
        f"Bad arguments {sorted(kwargs)} for schedule {name!r} ({e}); it takes "
        f"{params}.") from None
  return fn(**kwargs)

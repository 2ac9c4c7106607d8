"""Robust evaluation: one engine for clean, FGSM, PGD-k-r accuracy, gradient
alignment and cos(δ_FGSM, δ_PGD); AutoAttack; named evaluations; records.

Any model is evaluated through a `logits_fn(x) -> logits` closure, in float32 with
BatchNorm in eval mode: `closures.eval_logits_fn(model, variables)`. The protocol
follows the papers this library reimplements (REFERENCE.md, "Evaluation
protocol"): PGD-50-10 with step ε/4, CE loss, random starts, and a named restart
rule; AutoAttack "standard" (Croce & Hein 2020); clean accuracy on the full test
set and robust accuracy on `n` points chosen at random with a recorded seed or as
the first `n`.

One definition of every quantity, computed per example (`robustness_metrics`;
`clean_accuracy`, `pgd_accuracy` and `evaluate` are built on the same code):

* clean_acc: argmax f(x) = y.
* fgsm_acc: correct at x *and* at x + δ_FGSM (one step of size ε from x).
* pgd_acc: correct at x *and* at x + δ_PGD (PGD-k-r, step ε/4 by default, random
  start, restart rule "strict" or "max_loss"). Robust accuracy counts an example
  robust only when it is classified correctly both at x and at x + δ (x lies in
  the ε-ball, so a misclassified clean point is not robust); hence robust
  accuracy <= clean accuracy, everywhere in this library.
* grad_alignment: GradAlign Eq. 5, cos(∇ₓℓ(x), ∇ₓℓ(x + η)), η ~ U[-ε, ε]^d, CE
  loss, x + η clipped to [0, 1]; averaged over the examples where both gradients
  are nonzero (`grad_alignment_n` of them).
* cos_fgsm_pgd: cos(δ_FGSM, δ_PGD) per example (GradAlign Fig. 2), 0 where a
  perturbation is zero, averaged over all examples.
* input_grad_l1, hessian_top (asked for by name, not in `DEFAULT_METRICS`): the
  loss-landscape metrics of Li & Spratling (AdvLC, §3), per example at x, CE
  loss: IG = ‖∇ₓℓ(x)‖₁ and the dominant eigenvalue of the input Hessian ∇ₓ²ℓ(x)
  (20 power iterations from the example's key, `metrics.hessian_top_eigenvalues`),
  averaged over all examples. The AdvLC code takes both on a whole batch
  tensor; with BatchNorm in eval mode the batch's values are the per-example
  ones divided by the batch size (its IG: their mean; its top eigenvalue:
  their maximum, over B).

How the batching works, and why:

* Everything runs **per example** (`jax.vmap` over single examples), with the
  example's random key `fold_in(key, example_id)` where `example_id` is its index
  in the test set (split once: one key for PGD, one for η). The result of an
  example therefore depends only on the model, the key and that index: not on
  the batch size, the padding, the number of devices or which other points were
  selected. This requires a `logits_fn` that treats examples independently
  (BatchNorm in eval mode), which evaluation needs anyway. When only accuracies
  are asked for, only the correctly classified points are attacked (the others
  are not robust); the cosine metrics attack every point.
* Batches have one fixed shape (`_run_batched`, the one padding implementation
  of this engine): the points are split into the fewest batches of at most
  `batch_size`, all of one size, the last one padded (with copies of a real
  example whose results are dropped), so an evaluation compiles once and pads
  less than one example per batch. With several devices the batch is a
  multiple of the device count, split across `jax.local_devices()` by `jax.pmap`.
  ε and the PGD step are traced float32 scalars (another ε reuses the compiled
  program); the metrics and the PGD settings are static.
* The closure is passed to the compiled function as an argument: a `LogitsFn`
  (a pytree) contributes its weights as device buffers, and the compiled
  function is cached by its module, so another checkpoint of the same
  architecture reuses it. A user's plain Python callable works too: it is
  wrapped in `jax.tree_util.Partial` (`closures.as_pytree`), its captured arrays
  become constants of the executable and nothing is cached across calls.
* AutoAttack is delegated to `fastadv_jax.autoattack.autoattack`, whose Python
  driver gathers the still-robust points into padded chunks of `batch_size`
  between attacks (one device; results depend on the chunking, not only on
  the key).

Named evaluations (big_vision style): a config holds `evals`, a dict from a name
to settings (`EVAL_DEFAULTS` lists the keys); `validate_evals` checks them before
anything runs, `resolve_evals` fills in the defaults and `run_named_eval` runs one.

Records (`evaluate`, `save_record`) are JSON, in the spirit of RobustBench's
model records: dataset, threat model, ε, clean and robust accuracy, n, selection,
seeds, attack settings (including the restart rule), versions, device, time.
`save_record` never overwrites an earlier, different record: it writes the next
free name `<stem>-1.json`, `<stem>-2.json`, ... instead.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import numbers
import os
import re
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import _checks
from fastadv_jax import attacks as attacks_lib
from fastadv_jax import closures
from fastadv_jax import device_shards
from fastadv_jax.restore import CHECKPOINTS

Array = jax.Array

ATTACKS = ("pgd", "autoattack")
RESTART_RULES = ("strict", "max_loss")
PGD_LOSSES = ("ce", "dlr")
SELECTIONS = ("random", "first")
AUTOATTACK_VERSIONS = ("standard",)
RECORD_SCHEMA = "fastadv_jax.eval_record/1"
# What an evaluation computes unless its `metrics` say otherwise.
DEFAULT_METRICS = ("clean_acc", "fgsm_acc", "fgsm_point_acc", "pgd_acc", "grad_alignment",
                   "cos_fgsm_pgd")
# Every metric; AdvLC's loss-landscape metrics cost more and are asked for by name.
METRICS = DEFAULT_METRICS + ("input_grad_l1", "hessian_top")
# Metrics defined on every point (not only the clean-correct ones). The
# accuracy at the FGSM point (correct at x + δ_FGSM, whatever the clean
# prediction) is not a robust accuracy: it is the catastrophic-overfitting
# signature of GradAlign Fig. 1, where it rises above clean accuracy.
_ALL_POINT_METRICS = ("fgsm_point_acc", "grad_alignment", "cos_fgsm_pgd", "input_grad_l1",
                      "hessian_top")

# Test-set sizes of the datasets the configs know, so that `n` can be checked
# before any data is read.
TEST_SET_SIZES = {"cifar10": 10000, "cifar100": 10000, "svhn_cropped": 26032,
                  "imagenet2012": 50000}


class Accuracy(NamedTuple):
  """Per-example result and its mean.

  Attributes:
    correct: (N,) bool NumPy array; for robust accuracy True means the example is
      classified correctly at x and at the adversarial point.
    accuracy: the mean of `correct`, a Python float in [0, 1].
  """
  correct: np.ndarray
  accuracy: float


# ----------------------------------------------------------------------------
# The per-example computation (traced once per setting and batch shape).


def _to_float_images(x: Array) -> Array:
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 255.0
  return x.astype(jnp.float32)


def _example_values(logits_fn, x, y, key, dynamic, *, metrics, pgd_steps, pgd_restarts,
                    rule, loss, early_stop):
  """The requested `metrics` of one example x (HWC), as a dict of scalars.

  `dynamic` holds eps and step as traced scalars: another radius reuses the
  compiled function. The attacks and metrics run on a batch of one.
  """
  # pylint: disable=g-import-not-at-top
  from fastadv_jax import attacks
  from fastadv_jax import metrics as metrics_lib
  # pylint: enable=g-import-not-at-top
  eps, step = dynamic["eps"], dynamic["step"]
  xb, yb = x[None], y[None]
  key_pgd, key_eta = jax.random.split(key)
  ce = closures.cross_entropy(logits_fn, yb)

  def correct(point):
    return (jnp.argmax(logits_fn(point), axis=-1) == yb)[0]

  clean_ok = correct(xb)
  out = {}
  if "clean_acc" in metrics:
    out["clean_acc"] = clean_ok
  if {"fgsm_acc", "fgsm_point_acc", "cos_fgsm_pgd"} & set(metrics):
    delta_fgsm = attacks.fgsm(ce, xb, eps=eps).delta
    fgsm_ok = correct(xb + delta_fgsm)
    if "fgsm_acc" in metrics:
      out["fgsm_acc"] = clean_ok & fgsm_ok
    if "fgsm_point_acc" in metrics:
      out["fgsm_point_acc"] = fgsm_ok
  if "pgd_acc" in metrics or "cos_fgsm_pgd" in metrics:
    pgd_loss = closures.loss_fn(loss, logits_fn, yb)
    delta_pgd = attacks.pgd(pgd_loss, xb, key_pgd, eps=eps, step=step, steps=pgd_steps,
                            restarts=pgd_restarts, random_start=True,
                            early_stop=early_stop, select=rule).delta
    if "pgd_acc" in metrics:
      out["pgd_acc"] = clean_ok & correct(xb + delta_pgd)
  if "grad_alignment" in metrics:
    cos, valid = metrics_lib.gradient_alignment(ce, xb, key_eta, eps=eps, reduce="none",
                                                return_valid=True)
    out["grad_alignment"] = cos[0]
    out["grad_alignment_valid"] = valid[0]
  if "cos_fgsm_pgd" in metrics:
    out["cos_fgsm_pgd"] = metrics_lib.perturbation_cosine(delta_fgsm, delta_pgd)[0]
  if "input_grad_l1" in metrics:
    out["input_grad_l1"] = metrics_lib.input_gradient_l1(ce, xb, reduce="none")[0]
  if "hessian_top" in metrics:
    key_hessian = jax.random.fold_in(key_eta, 1)
    out["hessian_top"] = metrics_lib.hessian_top_eigenvalues(ce, xb, key_hessian, k=1)[0]
  return out


def _build_executor(settings: tuple, num_devices: int):
  """`f(logits_fn, x, y, ids, key, dynamic) -> dict of (B,)`, jit-ted or pmap-ped.

  `settings` are static (they change the program); `dynamic` is a dict of
  float32 scalars (eps, step) passed as arguments.
  """
  example_fn = functools.partial(_example_values, **dict(settings))

  def run(logits_fn, x, y, ids, key, dynamic):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
    return jax.vmap(example_fn, in_axes=(None, 0, 0, 0, None))(
        logits_fn, _to_float_images(x), y, keys, dynamic)

  if num_devices == 1:
    return jax.jit(run)
  return jax.pmap(run, in_axes=(None, 0, 0, 0, None, None),
                  devices=jax.local_devices()[:num_devices])


_cached_executor = functools.lru_cache(maxsize=32)(_build_executor)


def _settings(metrics: Sequence[str], *, pgd_steps=None, pgd_restarts=None, rule=None,
              loss="ce", early_stop=False) -> tuple:
  """The static settings of one computation, canonical (so equal settings
  share one compiled program; PGD settings only where PGD runs)."""
  metrics = tuple(m for m in METRICS if m in metrics)
  if not any(m in metrics for m in ("pgd_acc", "cos_fgsm_pgd")):
    pgd_steps = pgd_restarts = rule = loss = early_stop = None
  else:
    pgd_steps, pgd_restarts = int(pgd_steps), int(pgd_restarts)
    early_stop = bool(early_stop)
  return (("metrics", metrics), ("pgd_steps", pgd_steps),
          ("pgd_restarts", pgd_restarts), ("rule", rule), ("loss", loss),
          ("early_stop", early_stop))


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _run_batched(settings: tuple, logits_fn, images, labels, key, *,
                 dynamic: dict | None = None, batch_size: int,
                 num_devices: int | None, example_ids, progress: bool,
                 desc: str, shape_count: int | None = None) -> dict[str, np.ndarray]:
  """Applies `_example_values` to all examples in fixed-shape batches.

  The batch shape is chosen for `shape_count` examples (default: all of
  them), so a subset of a set of points (e.g. its clean-correct points) is
  run with the set's batch shape and reuses its compiled program.

  Returns a dict of (N,) NumPy arrays, one per computed value.
  """
  num = len(images)
  if num_devices is None:
    num_devices = jax.local_device_count()
  if not 1 <= num_devices <= jax.local_device_count():
    raise ValueError(f"num_devices={num_devices} must lie in [1, "
                     f"{jax.local_device_count()}] (the local device count).")
  if example_ids is None:
    example_ids = np.arange(num)
  example_ids = np.asarray(example_ids, dtype=np.int32)
  _checks.check_same_batch("images", images, "example_ids", example_ids)
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  dynamic = {name: jnp.float32(value) for name, value in (dynamic or {}).items()}
  # One batch shape per evaluation: as many batches as `batch_size` needs, of
  # equal size (so padding stays below one example per batch and device), a
  # multiple of the device count.
  count = max(num, shape_count or 0)
  num_batches = -(-count // batch_size)
  batch = _round_up(-(-count // num_batches), num_devices)
  tree = closures.as_pytree(logits_fn)
  # A wrapped plain callable is static for jit (hashed by identity): its
  # executor is not cached at module level, which would keep its arrays alive.
  make = _cached_executor if tree is logits_fn else _build_executor
  executor = make(settings, num_devices)

  images = np.asarray(images)
  labels = np.asarray(labels, dtype=np.int32)

  def padded(array, start):
    chunk = array[start:start + batch]
    if len(chunk) < batch:  # copies of the batch's first example, dropped later
      fill = np.repeat(chunk[:1], batch - len(chunk), axis=0)
      chunk = np.concatenate([chunk, fill], axis=0)
    if num_devices > 1:
      chunk = chunk.reshape((num_devices, batch // num_devices) + chunk.shape[1:])
    return chunk

  results: dict[str, np.ndarray] = {}
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=num, desc=desc, unit="img", leave=False)
  pending = None  # dispatch the next batch before waiting for the previous one

  def collect(item):
    start, out = item
    count = min(batch, num - start)
    for name, value in out.items():
      value = np.asarray(value).reshape(-1)
      if name not in results:
        results[name] = np.zeros((num,), dtype=value.dtype)
      results[name][start:start + count] = value[:count]
    if bar is not None:
      bar.update(count)

  try:
    for start in range(0, num, batch):
      out = executor(tree, padded(images, start), padded(labels, start),
                     padded(example_ids, start), key, dynamic)
      if pending is not None:
        collect(pending)
      pending = (start, out)
    if pending is not None:
      collect(pending)
  finally:
    if bar is not None:
      bar.close()
  return results


def _per_example_metrics(logits_fn, images, labels, key, *, metrics, eps, step,
                         pgd_steps=None, pgd_restarts=None, rule=None, loss="ce",
                         early_stop=False, batch_size, num_devices, example_ids,
                         clean_correct=None, progress=False,
                         desc="eval") -> dict[str, np.ndarray]:
  """The engine: (N,) per-example values of `metrics` (arguments checked).

  Accuracies under attack are computed only for the clean-correct points (the
  others are 0) unless a metric defined on every point is requested; per-example
  keys make both ways give identical results. The clean-correct subset runs in
  batches of the shape chosen for all N points, so its compiled program does
  not change with the number of correct points (from one epoch to the next).
  """
  num = len(images)
  example_ids = np.arange(num) if example_ids is None else np.asarray(example_ids)
  _checks.check_same_batch("images", images, "example_ids", example_ids)
  pgd = dict(pgd_steps=pgd_steps, pgd_restarts=pgd_restarts, rule=rule, loss=loss,
             early_stop=early_stop)
  dynamic = {"eps": eps, "step": step}
  common = dict(batch_size=batch_size, num_devices=num_devices, progress=progress)
  attack_metrics = tuple(m for m in metrics if m != "clean_acc")
  if any(m in _ALL_POINT_METRICS for m in metrics) or not attack_metrics:
    return _run_batched(_settings(metrics, **pgd), logits_fn, images, labels, key,
                        dynamic=dynamic, example_ids=example_ids, desc=desc, **common)
  if clean_correct is None:
    clean_correct = _run_batched(
        _settings(("clean_acc",)), logits_fn, images, labels, key, dynamic=dynamic,
        example_ids=example_ids, desc="clean", **common)["clean_acc"]
  clean_correct = np.asarray(clean_correct, bool)
  _checks.check_same_batch("images", images, "clean_correct", clean_correct)
  values = {m: np.zeros((num,), bool) for m in attack_metrics}
  if "clean_acc" in metrics:
    values["clean_acc"] = clean_correct
  attacked = np.flatnonzero(clean_correct)
  if attacked.size:
    out = _run_batched(
        _settings(attack_metrics, **pgd), logits_fn, np.asarray(images)[attacked],
        np.asarray(labels)[attacked], key, dynamic=dynamic,
        example_ids=example_ids[attacked], desc=desc, shape_count=num, **common)
    for m in attack_metrics:
      values[m][attacked] = out[m]
  return values


# ----------------------------------------------------------------------------
# Public accuracy functions.


def _check_common(images, labels, batch_size) -> None:
  if np.ndim(images) != 4:
    raise ValueError(f"images must be a batch of NHWC images, got shape "
                     f"{np.shape(images)}.")
  _checks.check_same_batch("images", images, "labels", labels)
  if len(images) == 0:
    raise ValueError("images is empty: nothing to evaluate.")
  if np.asarray(images).dtype != np.uint8:
    _checks.check_images(np.asarray(images), "images")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


def _check_eps(eps) -> None:
  if eps is None:
    raise ValueError("eps must be given (in [0, 1] pixel units, e.g. 8/255).")
  _checks.check_eps(eps)
  _checks.check_positive("eps", eps)




def _check_metrics(metrics) -> tuple:
  if isinstance(metrics, str) or not isinstance(metrics, Sequence) or not metrics:
    raise ValueError(f"metrics must be a non-empty list of names from "
                     f"{list(METRICS)}, got {metrics!r}.")
  for m in metrics:
    _checks.check_choice("metric", m, METRICS)
  return tuple(m for m in METRICS if m in metrics)


def clean_accuracy(logits_fn, images, labels, batch_size: int = 500, *,
                   num_devices: int | None = None, progress: bool = False
                   ) -> Accuracy:
  """Clean (unattacked) accuracy.

  Args:
    logits_fn: `x -> logits`, float32, BatchNorm in eval mode (e.g.
      `closures.eval_logits_fn(model, variables)`; a plain callable works too,
      see the module docstring).
    images: (N, H, W, C) uint8 in [0, 255] or float in [0, 1].
    labels: (N,) integer labels.
    batch_size: examples per compiled call (padded; see the module docstring).
    num_devices: devices to split each batch across (None: all local devices).
    progress: show a tqdm progress bar.
  Returns:
    `Accuracy(correct, accuracy)`.
  """
  _check_common(images, labels, batch_size)
  correct = _per_example_metrics(
      logits_fn, images, labels, jax.random.key(0), metrics=("clean_acc",), eps=0.0,
      step=0.0, batch_size=batch_size, num_devices=num_devices, example_ids=None,
      progress=progress, desc="clean")["clean_acc"]
  return Accuracy(correct, float(np.mean(correct)))


def pgd_accuracy(logits_fn, images, labels, key, *, eps: float, steps: int = 50,
                 restarts: int = 10, step: float | None = None, loss: str = "ce",
                 rule: str = "strict", batch_size: int = 250,
                 early_stop: bool = False, num_devices: int | None = None,
                 example_ids: Sequence[int] | None = None,
                 clean_correct: np.ndarray | None = None, progress: bool = True
                 ) -> Accuracy:
  """Robust accuracy under PGD-`steps`-`restarts` (L∞, random starts).

  The evaluation of Wong et al. 2020 and Andriushchenko & Flammarion 2020
  (PGD-50-10, α = ε/4, CE loss), run with `fastadv_jax.attacks.pgd`; the same
  per-example computation as `robustness_metrics(..., metrics=("pgd_acc",))`.

  With the strict rule (and no early stop) the restarts run one after the
  other, each only on the points no earlier restart fooled (under the strict
  rule they decide nothing else), packed into bucketed batches, with the steps
  in compiled chunks: the same result, less work. Several devices split the
  points, one driver thread each (`fastadv_jax.device_shards`).

  Args:
    logits_fn: `x -> logits`, float32, BatchNorm in eval mode; must treat
      examples independently (attacks run per example).
    images: (N, H, W, C) uint8 in [0, 255] or float in [0, 1].
    labels: (N,) integer labels.
    key: a `jax.random` key or an int seed; example i uses
      `fold_in(key, example_ids[i])` (split into a PGD and an η key).
    eps: L∞ radius in [0, 1] pixel units (> 0).
    steps: PGD steps per restart.
    restarts: random restarts.
    step: step size α; None: ε/4.
    loss: "ce" or "dlr".
    rule: restart selection. "strict": robust only if no restart fools the
      model; "max_loss": the restart with the highest final loss decides (the
      rule of the GradAlign, Wong and ZeroGrad code, slightly optimistic).
    batch_size: examples per compiled call (the last batch is padded).
    early_stop: stop attacking an example once fooled (Wong's / ZeroGrad's code).
    num_devices: the strict rule splits the points between devices, one
      driver thread each (None: all local devices on an accelerator, one on
      CPU); the other rules split each batch (None: all local devices).
    example_ids: the examples' indices in the test set (default 0..N-1); they
      select the per-example random keys.
    clean_correct: optional (N,) bool, the clean correctness if already known
      (otherwise computed); only these points are attacked.
    progress: show a tqdm progress bar.
  Returns:
    `Accuracy(correct, accuracy)`: correct[i] is True when example i is
    classified correctly at x and at the attacked point.
  """
  _check_common(images, labels, batch_size)
  _check_eps(eps)
  _checks.check_int("steps", steps, 1)
  _checks.check_int("restarts", restarts, 1)
  _checks.check_choice("PGD loss", loss, PGD_LOSSES)
  _checks.check_choice("restart rule", rule, RESTART_RULES)
  step = eps / 4 if step is None else step
  _checks.check_positive("step", step)
  if _strict_driver(rule, early_stop):
    correct = _pgd_strict_correct(
        logits_fn, images, labels, key, eps=eps, step=step, steps=steps, restarts=restarts,
        loss=loss, batch_size=batch_size, example_ids=example_ids,
        clean_correct=clean_correct, progress=progress, num_devices=num_devices)
    return Accuracy(correct, float(np.mean(correct)))
  correct = _per_example_metrics(
      logits_fn, images, labels, key, metrics=("pgd_acc",), eps=eps, step=step,
      pgd_steps=steps, pgd_restarts=restarts, rule=rule, loss=loss,
      early_stop=early_stop, batch_size=batch_size, num_devices=num_devices,
      example_ids=example_ids, clean_correct=clean_correct, progress=progress,
      desc=f"PGD-{steps}-{restarts}")["pgd_acc"]
  return Accuracy(correct, float(np.mean(correct)))


def _strict_driver(rule: str, early_stop: bool) -> bool:
  """Whether `pgd_accuracy` runs `_pgd_strict_correct` (a driver per device)."""
  return rule == "strict" and not early_stop


@functools.partial(jax.jit, static_argnames=("restart",))
def _pgd_starts(x, ids, key, eps, *, restart):
  """Restart `restart`'s box-clipped random starts, as `_example_values`' PGD draws them."""
  def one(xe, i):
    key_pgd, _ = jax.random.split(jax.random.fold_in(key, i))
    # pylint: disable-next=protected-access
    delta = attacks_lib._uniform(jax.random.fold_in(key_pgd, restart), (1,) + xe.shape, eps)
    return attacks_lib.project_box(xe[None], delta)[0]
  return jax.vmap(one)(_to_float_images(x), ids)


@functools.partial(jax.jit, static_argnames=("loss", "length"))
def _pgd_steps(logits_fn, x, y, delta, eps, step, *, loss, length):
  """`length` PGD steps from `delta`, per example exactly as `_example_values`' PGD."""
  def one(xe, ye, de):
    out = attacks_lib.pgd(closures.loss_fn(loss, logits_fn, ye[None]), xe[None], None,
                          eps=eps, step=step, steps=length, random_start=False,
                          delta_init=de[None])
    return out.delta[0]
  return jax.vmap(one)(_to_float_images(x), y, delta)


@jax.jit
def _pgd_correct(logits_fn, x, y, delta):
  return jnp.argmax(logits_fn(_to_float_images(x) + delta), -1) == y


def _pgd_strict_correct(logits_fn, images, labels, key, *, eps, step, steps, restarts, loss,
                        batch_size, example_ids, clean_correct, progress,
                        num_devices) -> np.ndarray:
  """PGD-`steps`-`restarts` robust correctness under the strict rule, fast.

  The same per-example computation as `_example_values` (same keys, starts
  and steps; the same `fastadv_jax.attacks.pgd` per example), scheduled
  differently: under the strict rule a point is robust only if no restart
  fools it, so each restart runs only on the points no earlier restart fooled,
  in batches of at most the evaluation's batch shape padded to a bucketed size
  (`autoattack._common.bucket_size`), and the steps run in compiled chunks,
  unrolled when they convolve (XLA:CPU runs convolution gradients inside loop
  bodies about 2x slower, jax-ml/jax#12868). Results equal the generic
  engine's. With several devices the points are split between them, one
  driver thread per device (`fastadv_jax.device_shards`).
  """
  from fastadv_jax.autoattack import _common as aa_common  # pylint: disable=g-import-not-at-top
  devices = device_shards.resolve_devices(num_devices)
  num = len(images)
  example_ids = np.arange(num) if example_ids is None else np.asarray(example_ids)
  _checks.check_same_batch("images", images, "example_ids", example_ids)
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  if clean_correct is None:
    clean_correct = _run_batched(
        _settings(("clean_acc",)), logits_fn, images, labels, key,
        dynamic={"eps": eps, "step": 0.0}, batch_size=batch_size, num_devices=1,
        example_ids=example_ids, progress=progress, desc="clean")["clean_acc"]
  clean_correct = np.asarray(clean_correct, bool)
  _checks.check_same_batch("images", images, "clean_correct", clean_correct)
  # The batch shape `_run_batched` would choose for all N points.
  num_batches = max(-(-num // batch_size), 1)
  batch = -(-num // num_batches)
  tree = closures.as_pytree(logits_fn)
  images = np.asarray(images)
  labels = np.asarray(labels, np.int32)
  chunks = aa_common.loop_chunks(steps)

  def attack_shard(points, device, position):
    """The restarts on `points` (indices) on `device`: their robust correctness."""
    eps32, step32 = jnp.float32(eps), jnp.float32(step)
    robust = clean_correct[points].copy()
    bar = None
    if progress:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      where = f" {device}" if len(devices) > 1 else ""
      bar = tqdm(total=restarts * steps, desc=f"PGD-{steps}-{restarts}{where}", unit="step",
                 leave=False, position=position if len(devices) > 1 else None)
    try:
      for restart in range(restarts):
        remaining = np.flatnonzero(robust)
        if bar is not None:
          bar.set_postfix(robust=int(remaining.size), refresh=False)
        if not remaining.size:
          if bar is not None:
            bar.update(steps * (restarts - restart))
          break
        parts = []
        for start in range(0, remaining.size, batch):
          rows = remaining[start:start + batch]
          n = rows.size
          size = aa_common.bucket_size(n, batch)
          rows = np.concatenate([rows, np.full(size - n, rows[0], rows.dtype)])
          x = jax.device_put(images[points[rows]], device)
          y = jax.device_put(labels[points[rows]], device)
          ids = jax.device_put(example_ids[points[rows]].astype(np.int32), device)
          parts.append((rows, n, x, y, _pgd_starts(x, ids, key, eps32, restart=restart)))
        for c, (_, length) in enumerate(chunks):
          chunk_start = time.perf_counter()
          for p, (rows, n, x, y, delta) in enumerate(parts):
            parts[p] = (rows, n, x, y, _pgd_steps(tree, x, y, delta, eps32, step32,
                                                  loss=loss, length=length))
          if bar is not None:
            jax.block_until_ready(parts[-1][4])
            bar.update(length)
            if position == 0 and restart == 0 and c == min(1, len(chunks) - 1):
              # The first timed chunk after compilation: seconds per point and step.
              rate = (time.perf_counter() - chunk_start) / (remaining.size * length)
              left = rate * remaining.size * (steps * restarts - (c + 1) * length)
              bar.write(f"PGD-{steps}-{restarts} on {num} points: about "
                        f"{aa_common.duration(left)} left if no restart fools a point")
        for rows, n, x, y, delta in parts:
          ok = np.asarray(_pgd_correct(tree, x, y, delta))[:n]
          robust[rows[:n][~ok]] = False
        if bar is not None and position == 0 and restart == 0 and restarts > 1:
          left = rate * int(robust.sum()) * steps * (restarts - 1)
          bar.write(f"PGD-{steps}-{restarts}: {int(robust.sum())} of {remaining.size} "
                    f"points robust after the first restart; about "
                    f"{aa_common.duration(left)} left if they all stay robust")
    finally:
      if bar is not None:
        bar.close()
    return robust

  robust = np.empty(num, bool)
  for points, shard_robust in device_shards.run_on_devices(attack_shard, np.arange(num),
                                                           devices):
    robust[points] = shard_robust
  return robust


def robustness_metrics(logits_fn, images, labels, key, *, eps: float,
                       metrics: Sequence[str] = DEFAULT_METRICS, pgd_steps: int = 10,
                       pgd_restarts: int = 1, pgd_step: float | None = None,
                       rule: str = "strict", batch_size: int = 250,
                       example_ids: Sequence[int] | None = None,
                       num_devices: int | None = None, progress: bool = False
                       ) -> dict[str, float]:
  """Clean / FGSM / PGD accuracy, gradient alignment and cos(δ_FGSM, δ_PGD).

  The one evaluation the training loop uses (per-epoch monitoring, early
  stopping, best-checkpoint selection, final evaluation). Definitions, per
  example (see the module docstring): clean_acc; fgsm_acc and pgd_acc count an
  example when it is correct at x *and* at x + δ (FGSM: one step of size ε from
  x, Goodfellow et al. 2015; PGD: Madry et al. 2018, random start, step
  `pgd_step`, `pgd_restarts` restarts selected by `rule`); grad_alignment is
  GradAlign Eq. 5 (Andriushchenko & Flammarion 2020), cos(∇ₓℓ(x), ∇ₓℓ(x + η))
  with η ~ U[-ε, ε]^d drawn from the example's key, CE loss; cos_fgsm_pgd is
  cos(δ_FGSM, δ_PGD) (GradAlign Fig. 2). Only the requested metrics are
  computed. Example i uses the key `fold_in(key, example_ids[i])`, so the
  results do not depend on the batch size, the padding or the device count.

  Args:
    logits_fn: `x -> logits`, float32, BatchNorm in eval mode (e.g.
      `closures.eval_logits_fn(model, variables)`); must treat examples
      independently. A plain Python callable works (not cached across calls).
    images: (N, H, W, C) uint8 in [0, 255] or float in [0, 1].
    labels: (N,) integer labels.
    key: a `jax.random` key or an int seed.
    eps: L∞ radius in [0, 1] pixel units (> 0); a traced argument of the
      compiled evaluation (changing it does not recompile).
    metrics: names from `METRICS`.
    pgd_steps, pgd_restarts: PGD-k-r.
    pgd_step: PGD step size α; None: ε/4.
    rule: PGD restart selection, "strict" or "max_loss" (see `pgd_accuracy`).
    batch_size: examples per compiled call (the last batch is padded).
    example_ids: the examples' indices in their split (default 0..N-1); they
      select the per-example random keys.
    num_devices: devices to split each batch across (None: all local devices).
    progress: show a tqdm progress bar.
  Returns:
    A dict of Python floats: each requested metric's mean over the N examples
    (grad_alignment: over the examples where both gradients are nonzero, nan
    if there is none, with their count in "grad_alignment_n"), and "n" = N.
  """
  _check_common(images, labels, batch_size)
  _check_eps(eps)
  metrics = _check_metrics(metrics)
  _checks.check_int("pgd_steps", pgd_steps, 1)
  _checks.check_int("pgd_restarts", pgd_restarts, 1)
  _checks.check_choice("restart rule", rule, RESTART_RULES)
  pgd_step = eps / 4 if pgd_step is None else pgd_step
  _checks.check_positive("pgd_step", pgd_step)
  values = _per_example_metrics(
      logits_fn, images, labels, key, metrics=metrics, eps=eps, step=pgd_step,
      pgd_steps=pgd_steps, pgd_restarts=pgd_restarts, rule=rule,
      batch_size=batch_size, num_devices=num_devices, example_ids=example_ids,
      progress=progress, desc="eval")
  result = {}
  for m in metrics:
    if m == "grad_alignment":
      valid = values["grad_alignment_valid"]
      count = int(np.sum(valid))
      result[m] = (float(np.sum(values[m][valid], dtype=np.float64) / count)
                   if count else float("nan"))
      result["grad_alignment_n"] = count
    else:
      result[m] = float(np.mean(values[m], dtype=np.float64))
  result["n"] = len(images)
  return result


def _run_autoattack(logits_fn, images, labels, key, *, eps, version, batch_size,
                    num_devices, progress, attack_kwargs):
  from fastadv_jax import autoattack  # pylint: disable=g-import-not-at-top
  _check_common(images, labels, batch_size)
  _check_eps(eps)
  _checks.check_choice("AutoAttack version", version, AUTOATTACK_VERSIONS)
  device_shards.resolve_devices(num_devices)  # a bad count fails before anything runs
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  images = np.asarray(images)
  x = (images.astype(np.float32) / 255.0 if images.dtype == np.uint8
       else images.astype(np.float32))
  attack_kwargs = dict(attack_kwargs, num_devices=num_devices)
  attack_kwargs.setdefault("progress", progress)
  return autoattack.autoattack(logits_fn, x, np.asarray(labels, np.int32), key, eps=eps,
                               version=version, batch_size=batch_size,
                               verbose=progress, **attack_kwargs)


def autoattack_accuracy(logits_fn, images, labels, key, *, eps: float,
                        version: str = "standard", batch_size: int = 250,
                        num_devices: int | None = None, progress: bool = True,
                        **attack_kwargs) -> Accuracy:
  """Robust accuracy under AutoAttack (Croce & Hein 2020), L∞.

  Runs `fastadv_jax.autoattack.autoattack` ("standard": APGD-CE, APGD-T, FAB-T,
  Square with 5,000 queries, 100 iterations for APGD and FAB, each attack only
  on the points still robust). Its driver gathers the still-robust points into
  chunks of at most `batch_size`, padded to a few bucketed sizes (each
  compiled once), and every target, restart and block of Square queries again
  runs on the points still to fool only. A point's random draws come from the
  key and its index (`example_ids`, default 0..N-1), so, as with PGD, the
  result does not depend on the batch size.

  Args:
    logits_fn: `x -> logits`, float32, BatchNorm in eval mode, e.g.
      `closures.eval_logits_fn(model, variables)` (a pytree: the weights are
      arguments of the compiled attacks, not constants baked into them); a
      plain callable works too (wrapped with `jax.tree_util.Partial`).
    images: (N, H, W, C) uint8 in [0, 255] or float in [0, 1].
    labels: (N,) integer labels.
    key: a `jax.random` key or an int seed.
    eps: L∞ radius in [0, 1] pixel units (> 0).
    version: the ensemble; "standard".
    batch_size: chunk size of the still-robust points.
    num_devices: devices to split the points between, one driver thread each
      (None: all local devices on an accelerator, one on CPU); the result does
      not depend on it.
    progress: a tqdm progress bar per attack (iterations or queries, points
      still robust) and the robust accuracy printed after each attack.
    **attack_kwargs: passed to `autoattack.autoattack`, e.g. `n_iter`,
      `n_queries`, `n_target_classes`, `square_rescale_schedule`,
      `example_ids`.
  Returns:
    `Accuracy(correct, accuracy)`.
  """
  result = _run_autoattack(logits_fn, images, labels, key, eps=eps, version=version,
                           batch_size=batch_size, num_devices=num_devices,
                           progress=progress, attack_kwargs=attack_kwargs)
  robust = np.asarray(result.robust, bool)
  return Accuracy(robust, float(np.mean(robust)))


# ----------------------------------------------------------------------------
# Named evaluations (config.evals).

EVAL_SPLITS = ("train", "test", "validation")
EVAL_DEFAULTS = {
    "split": "test",          # which split the points come from
    "n": 1000,                # number of points (<= the split's size)
    "selection": "first",     # "first" n, or n "random" ones (seeded by `seed`)
    "seed": 0,                # the random selection's seed
    "every_epochs": 1,        # run every this many epochs (0: not by epochs)
    "every_steps": 0,         # or every this many steps (0: not by steps)
    "at_end": False,          # also run once after training
    "batch_size": 250,        # examples per compiled call (global, all devices)
    "metrics": list(DEFAULT_METRICS),  # names from METRICS
    "pgd_steps": 10,
    "pgd_restarts": 1,
    "pgd_step_fraction": 0.25,  # PGD step α as a fraction of ε (ε/4)
    "rule": "strict",         # PGD restart selection: strict | max_loss
}
"""The settings of one named evaluation and their defaults (serializable values).

A config holds `evals = {name: {key: value, ...}}`; keys left out take these
defaults. The attacks use the run's ε; example i of the split uses the key
`fold_in(key, i)`, so an evaluation's value at a given key does not depend on
which other points are selected, the batch size or the device count.
"""

_EVAL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def _entry_items(entry) -> dict:
  if hasattr(entry, "to_dict"):  # ml_collections.ConfigDict
    entry = entry.to_dict()
  if not isinstance(entry, Mapping):
    raise ValueError(f"must be a dict of settings, got {type(entry).__name__}")
  return dict(entry)


def validate_evals(evals: Mapping[str, Mapping], *,
                   split_sizes: Mapping[str, int] | None = None) -> None:
  """Checks named evaluation settings (`config.evals`) before anything runs.

  Rules, for each entry (keys left out take `EVAL_DEFAULTS`):

  * the name is a non-empty identifier (letters, digits, "_", "-"; it prefixes
    logged metrics, e.g. "test/pgd_acc"); the entry is a dict or ConfigDict;
  * every key is one of `EVAL_DEFAULTS`;
  * split: one of `EVAL_SPLITS` or of the keys of `split_sizes`;
  * n: an integer >= 1, and <= the split's size when `split_sizes` knows it;
  * selection: "first" or "random"; seed: an integer >= 0;
  * every_epochs, every_steps: integers >= 0, not both > 0 (one schedule per
    evaluation), and the evaluation must run at some point: every_epochs > 0,
    every_steps > 0 or at_end=True; at_end: a bool;
  * batch_size, pgd_steps, pgd_restarts: integers >= 1;
  * metrics: a non-empty list of distinct names from `METRICS`;
  * pgd_step_fraction: a finite number > 0; rule: "strict" or "max_loss".

  Args:
    evals: name -> settings.
    split_sizes: optional split name -> number of examples, or None where
      unknown (e.g. {"test": 10000, "train": 50000}); its keys are accepted as
      splits besides `EVAL_SPLITS`.
  Raises:
    ValueError: naming the evaluation, the key, the value and the choices.
  """
  if hasattr(evals, "to_dict"):
    evals = evals.to_dict()
  if not isinstance(evals, Mapping):
    raise ValueError(f"evals must be a dict from names to settings, got "
                     f"{type(evals).__name__}.")
  splits = EVAL_SPLITS + tuple(s for s in (split_sizes or {}) if s not in EVAL_SPLITS)
  for name, entry in evals.items():
    if not isinstance(name, str) or not _EVAL_NAME.match(name):
      raise ValueError(f"evals: name {name!r} must be a non-empty identifier "
                       f"(letters, digits, '_' or '-', not starting with a digit).")
    where = f"evals[{name!r}]"
    try:
      entry = _entry_items(entry)
    except ValueError as e:
      raise ValueError(f"{where} {e}.") from None
    for key in entry:
      if key not in EVAL_DEFAULTS:
        raise ValueError(f"{where}: unknown key {key!r}; choose from "
                         f"{sorted(EVAL_DEFAULTS)}.")
    s = dict(EVAL_DEFAULTS, **entry)

    def fail(key, must):
      raise ValueError(f"{where}.{key}={s[key]!r}: {must}.")

    def integer(key, minimum):
      value = s[key]
      if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
          or value < minimum):
        fail(key, f"must be an integer >= {minimum}")

    def choice(key, choices):
      if not isinstance(s[key], str) or s[key] not in choices:
        fail(key, f"choose one of {list(choices)}")

    choice("split", splits)
    integer("n", 1)
    size = None if split_sizes is None else split_sizes.get(s["split"])
    if size is not None and s["n"] > size:
      fail("n", f"larger than the {s['split']!r} split ({size} examples)")
    choice("selection", SELECTIONS)
    integer("seed", 0)
    integer("every_epochs", 0)
    integer("every_steps", 0)
    if not isinstance(s["at_end"], bool):
      fail("at_end", "must be True or False")
    if s["every_epochs"] > 0 and s["every_steps"] > 0:
      raise ValueError(
          f"{where}: every_epochs={s['every_epochs']!r} and every_steps="
          f"{s['every_steps']!r} are both set; give one schedule (set the other to 0).")
    if s["every_epochs"] == 0 and s["every_steps"] == 0 and not s["at_end"]:
      raise ValueError(
          f"{where}: every_epochs=0, every_steps=0 and at_end=False: the evaluation "
          f"would never run; set one of them.")
    integer("batch_size", 1)
    integer("pgd_steps", 1)
    integer("pgd_restarts", 1)
    metrics = s["metrics"]
    if isinstance(metrics, str) or not isinstance(metrics, Sequence) or not metrics:
      fail("metrics", f"must be a non-empty list of names from {list(METRICS)}")
    for m in metrics:
      if m not in METRICS:
        raise ValueError(f"{where}.metrics: unknown metric {m!r}; choose from "
                         f"{list(METRICS)}.")
    if len(set(metrics)) != len(metrics):
      fail("metrics", "lists a metric twice")
    fraction = s["pgd_step_fraction"]
    if (isinstance(fraction, bool) or not isinstance(fraction, numbers.Real)
        or not math.isfinite(fraction) or fraction <= 0):
      fail("pgd_step_fraction", "must be a finite number > 0 (the PGD step is "
           "pgd_step_fraction * eps)")
    choice("rule", RESTART_RULES)


def resolve_evals(evals: Mapping[str, Mapping], *,
                  split_sizes: Mapping[str, int] | None = None) -> dict[str, dict]:
  """`validate_evals`, then each entry completed with `EVAL_DEFAULTS`.

  Returns:
    name -> a plain dict holding every key of `EVAL_DEFAULTS` (metrics as a list).
  """
  validate_evals(evals, split_sizes=split_sizes)
  if hasattr(evals, "to_dict"):
    evals = evals.to_dict()
  resolved = {}
  for name, entry in evals.items():
    settings = dict(EVAL_DEFAULTS, **_entry_items(entry))
    settings["metrics"] = list(settings["metrics"])
    resolved[name] = settings
  return resolved


def run_named_eval(settings: Mapping, logits_fn, images, labels, key, *, eps: float,
                   num_devices: int | None = None, progress: bool = False
                   ) -> dict[str, float]:
  """Runs one named evaluation (an entry of `resolve_evals`) on a split.

  Selects `n` points of the split (`select_indices(len(images), n, selection,
  seed)`) and returns `robustness_metrics` on them, with each point's index in
  the split as its example id.

  Args:
    settings: one evaluation's settings; missing keys take `EVAL_DEFAULTS`.
    logits_fn: the evaluation closure (`closures.eval_logits_fn`).
    images, labels: the whole split named by `settings["split"]`.
    key: a `jax.random` key or an int seed (e.g. folded with the step).
    eps: L∞ radius in [0, 1] pixel units (the run's ε).
    num_devices: devices (None: all local devices).
    progress: tqdm progress bar.
  Returns:
    The dict of `robustness_metrics`.
  """
  s = resolve_evals({"eval": settings})["eval"]
  indices = select_indices(len(images), s["n"], s["selection"], s["seed"])
  processes = jax.process_count()
  if processes > 1:
    # Each process evaluates its share of the points (per-example keys: the
    # same values as in one process), then the sums are gathered.
    if len(indices) < processes:
      raise ValueError(f"An evaluation of n={len(indices)} points cannot be shared by "
                       f"{processes} processes: use n >= {processes}.")
    indices = np.array_split(indices, processes)[jax.process_index()]
  result = robustness_metrics(
      logits_fn, np.asarray(images)[indices], np.asarray(labels)[indices], key, eps=eps,
      metrics=s["metrics"], pgd_steps=s["pgd_steps"], pgd_restarts=s["pgd_restarts"],
      pgd_step=s["pgd_step_fraction"] * eps, rule=s["rule"], batch_size=s["batch_size"],
      example_ids=indices, num_devices=num_devices, progress=progress)
  return _combine_across_processes(result) if processes > 1 else result


def _combine_across_processes(result: dict[str, float]) -> dict[str, float]:
  """Every process's `robustness_metrics` on its points -> the metrics on all points.

  Means are weighted by their counts ("n"; "grad_alignment_n" for gradient
  alignment) and gathered with `multihost_utils.process_allgather` (float32:
  accuracies are exact counts; alignment sums to about 1e-7).
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  counts = {"n": result["n"], "grad_alignment_n": result.get("grad_alignment_n", 0)}
  names = sorted(k for k in result if k not in counts)
  weight = {k: counts["grad_alignment_n" if k == "grad_alignment" else "n"] for k in names}
  local = np.array([result[k] * weight[k] if weight[k] else 0.0 for k in names] +
                   [counts["n"], counts["grad_alignment_n"]], np.float32)
  total = np.asarray(multihost_utils.process_allgather(local), np.float64).sum(axis=0)
  combined = dict(zip(names + ["n", "grad_alignment_n"], total.tolist()))
  out = {}
  for k in names:
    denominator = combined["grad_alignment_n" if k == "grad_alignment" else "n"]
    out[k] = combined[k] / denominator if denominator else float("nan")
  out["n"] = int(round(combined["n"]))
  if "grad_alignment_n" in result:
    out["grad_alignment_n"] = int(round(combined["grad_alignment_n"]))
  return out


# ----------------------------------------------------------------------------
# Evaluation records.


def select_indices(num_examples: int, n: int, selection: str = "random",
                   seed: int = 0) -> np.ndarray:
  """Indices of the `n` test points attacked.

  "first": 0..n-1 (the GradAlign code). "random": the sorted first `n` of
  `numpy.random.default_rng(seed).permutation(num_examples)` (n random points,
  as the GradAlign paper reports).
  """
  _checks.check_choice("selection", selection, SELECTIONS)
  if not isinstance(n, (int, np.integer)) or not 1 <= n <= num_examples:
    raise ValueError(f"n={n!r} must be an integer in [1, {num_examples}] "
                     f"(there are {num_examples} examples to choose from).")
  if selection == "first":
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).permutation(num_examples)[:n])


def device_info() -> dict:
  """The accelerator the evaluation ran on, for records."""
  devices = jax.devices()
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "count": len(devices), "local_count": jax.local_device_count(),
          "process_count": jax.process_count()}


def _versions() -> dict:
  import fastadv_jax  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  try:
    import jaxlib  # pylint: disable=g-import-not-at-top
    jaxlib_version = jaxlib.__version__
  except (ImportError, AttributeError):
    jaxlib_version = None
  return {"fastadv_jax": fastadv_jax.__version__, "jax": jax.__version__,
          "jaxlib": jaxlib_version, "flax": flax.__version__,
          "numpy": np.__version__}


def evaluate(logits_fn, test_images, test_labels, seed: int = 0, *,
             attack: str = "pgd", eps: float, n: int = 1000,
             selection: str = "random", batch_size: int = 250, steps: int = 50,
             restarts: int = 10, step: float | None = None, loss: str = "ce",
             rule: str = "strict", early_stop: bool = False,
             version: str = "standard", autoattack_kwargs: dict | None = None,
             num_devices: int | None = None, dataset: str | None = None,
             metadata: dict | None = None, progress: bool = True) -> dict:
  """Clean accuracy on the full test set, robust accuracy on `n` points, a record.

  Args:
    logits_fn: `x -> logits`, float32, BatchNorm in eval mode
      (`closures.eval_logits_fn(model, variables)`; a plain callable works too).
    test_images: (N, H, W, C) uint8 or float in [0, 1], the full test set.
    test_labels: (N,) integer labels.
    seed: selects the `n` points ("random") and the attack's key
      (`jax.random.key(seed)`, folded with each point's test-set index).
    attack: "pgd" (PGD-`steps`-`restarts`) or "autoattack".
    eps: L∞ radius in [0, 1] pixel units.
    n: number of points attacked.
    selection: "random" (n random points, seeded) or "first" (the first n).
    batch_size, steps, restarts, step, loss, rule, early_stop: see
      `pgd_accuracy`; `version`: see `autoattack_accuracy`.
    autoattack_kwargs: further `autoattack.autoattack` settings (n_iter,
      n_queries, ...), recorded.
    num_devices: devices (None: all local devices; for AutoAttack and strict
      PGD, whose drivers split the points between devices, one on CPU).
    dataset: dataset name for the record.
    metadata: extra JSON-able entries (model name, checkpoint, ...) stored
      under "metadata".
    progress: tqdm progress bars.
  Returns:
    A JSON-able record (see the module docstring); `clean_acc` and
    `robust_acc` are in [0, 1], `*_percent` in percent.
  """
  _checks.check_choice("attack", attack, ATTACKS)
  _check_eps(eps)
  _checks.check_choice("selection", selection, SELECTIONS)
  _check_common(test_images, test_labels, batch_size)
  num_examples = len(test_images)
  indices = select_indices(num_examples, n, selection, seed)
  if attack == "pgd":
    _checks.check_int("steps", steps, 1)
    _checks.check_int("restarts", restarts, 1)
    _checks.check_choice("PGD loss", loss, PGD_LOSSES)
    _checks.check_choice("restart rule", rule, RESTART_RULES)
  else:
    _checks.check_choice("AutoAttack version", version, AUTOATTACK_VERSIONS)
  step = eps / 4 if step is None else float(step)

  start_time = time.time()
  clean = clean_accuracy(logits_fn, test_images, test_labels, batch_size=batch_size,
                         num_devices=num_devices, progress=progress)
  clean_time = time.time() - start_time
  sub_images = np.asarray(test_images)[indices]
  sub_labels = np.asarray(test_labels)[indices]
  key = jax.random.key(seed)
  attack_start = time.time()
  if attack == "pgd":
    robust = pgd_accuracy(logits_fn, sub_images, sub_labels, key, eps=eps,
                          steps=steps, restarts=restarts, step=step, loss=loss,
                          rule=rule, batch_size=batch_size, early_stop=early_stop,
                          num_devices=num_devices, example_ids=indices,
                          clean_correct=clean.correct[indices], progress=progress)
    attack_settings = {"name": "pgd", "steps": int(steps), "restarts": int(restarts),
                       "step": float(step), "step_255": float(step) * 255,
                       "loss": loss, "restart_rule": rule, "random_start": True,
                       "early_stop": bool(early_stop)}
  else:
    attack_kwargs = dict(autoattack_kwargs or {})
    # Each point's draws keyed by its test-set index, as PGD's: a point's result
    # does not depend on which other points are evaluated with it.
    attack_kwargs.setdefault("example_ids", np.asarray(indices))
    result = _run_autoattack(logits_fn, sub_images, sub_labels, key, eps=eps,
                             version=version, batch_size=batch_size,
                             num_devices=num_devices, progress=progress,
                             attack_kwargs=attack_kwargs)
    robust = Accuracy(np.asarray(result.robust, bool),
                      float(np.mean(result.robust)))
    attack_settings = {"name": "autoattack", "version": version,
                       "attacks": list(result.stages[1:]),
                       "robust_acc_after_stage": dict(result.robust_accuracy),
                       "n_iter": attack_kwargs.get("n_iter", 100),
                       "n_target_classes": attack_kwargs.get("n_target_classes", 9),
                       "n_queries": attack_kwargs.get("n_queries", 5000),
                       "square_rescale_schedule": attack_kwargs.get(
                           "square_rescale_schedule", False),
                       "chunking": f"still-robust points in chunks of {batch_size}"}
  attack_time = time.time() - attack_start
  driver_per_device = attack == "autoattack" or _strict_driver(rule, early_stop)
  used_devices = (len(device_shards.resolve_devices(num_devices)) if driver_per_device else
                  jax.local_device_count() if num_devices is None else num_devices)
  versions = _versions()

  record = {
      "schema": RECORD_SCHEMA,
      "dataset": dataset,
      "threat_model": "Linf",  # RobustBench's name of the threat model
      "eps": float(eps),
      "eps_255": float(eps) * 255,
      "clean_acc": clean.accuracy,
      "robust_acc": robust.accuracy,
      "clean_acc_percent": 100 * clean.accuracy,
      "robust_acc_percent": 100 * robust.accuracy,
      "clean_acc_on_attacked_points": float(np.mean(clean.correct[indices])),
      "n_clean": int(num_examples),
      "n_robust": int(n),
      "n_robust_correct": int(np.sum(robust.correct)),
      "selection": selection,
      "selection_rule": (
          "first n" if selection == "first" else
          "sorted(numpy.random.default_rng(seed).permutation(n_clean)[:n])"),
      "seed": int(seed),
      "attack_key": ("jax.random.split(fold_in(jax.random.key(seed), test-set index "
                     "of the point))[0]"),
      "robust_definition": "correct at x and at x + delta",
      "attack": attack_settings,
      "bn_mode": "eval",
      "dtype": "float32",
      "batch_size": int(batch_size),
      "num_devices": int(used_devices),
      "versions": versions,
      "library_version": versions["fastadv_jax"],
      "jax_version": jax.__version__,
      "device": device_info(),
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "wall_time_s": time.time() - start_time,
      "clean_wall_time_s": clean_time,
      "attack_wall_time_s": attack_time,
      "metadata": dict(metadata or {}),
  }
  return record


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable.")


def _numbered(path: str, number: int) -> str:
  stem, ext = os.path.splitext(path)
  return path if number == 0 else f"{stem}-{number}{ext or '.json'}"


def save_record(record: dict, path: str) -> str:
  """Writes `record` as JSON to `path` atomically; returns the path written.

  The file is written to a temporary file in the same directory, synced, and then
  moved into place, so a reader never sees a partial record. An existing file
  is never replaced: if `path` already holds exactly this record nothing is
  written; if it holds a different one, the record goes to the first free name
  `<stem>-1.json`, `<stem>-2.json`, ... (with a warning), so repeated evaluations
  accumulate side by side.

  Args:
    record: a JSON-able dict (NumPy scalars and arrays are converted).
    path: the target file name.
  Returns:
    The path the record is stored at.
  """
  text = json.dumps(record, indent=2, default=_json_default, allow_nan=True) + "\n"
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-record-", suffix=".json", dir=directory)
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide records from other users
    number = 0
    while True:
      target = _numbered(path, number)
      if os.path.exists(target):
        with open(target) as f:
          if f.read() == text:
            return target
        number += 1
        continue
      try:
        # A hard link never replaces an existing file: atomic "create if absent".
        os.link(tmp, target)
      except FileExistsError:
        number += 1
        continue
      except OSError:  # a filesystem without hard links
        if os.path.exists(target):
          number += 1
          continue
        os.replace(tmp, target)
      if number:
        warnings.warn(f"{path} already holds a different record; wrote {target}.")
      return target
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def evaluate_workdir(workdir: str, *, checkpoint: str = "best", attack: str = "pgd",
                     n: int = 1000, seed: int = 0, eps: float | None = None,
                     batch_size: int = 250, steps: int = 50, restarts: int = 10,
                     step: float | None = None, rule: str = "strict",
                     loss: str = "ce", selection: str = "first",
                     autoattack_kwargs: dict | None = None,
                     num_devices: int | None = None, out: str | None = None,
                     progress: bool = True) -> dict:
  """Evaluates a training run's checkpoint and writes the record.

  Loads `(model, variables, config) = fastadv_jax.restore.restore_for_eval(
  workdir, checkpoint)`, the test split `fastadv_jax.data.load_split(
  config.dataset, "test", ...)` with the run's data settings, runs `evaluate`
  in float32 with BatchNorm in eval mode and writes the record to
  `out` or `workdir/eval/<checkpoint>_<attack>_n<n>_seed<seed>.json` (see
  `save_record`: an existing different record is never overwritten).

  The arguments are checked before anything is loaded.

  Args:
    workdir: the training run's work directory.
    checkpoint: "best" (best monitored robust accuracy) or "last".
    attack: "pgd" or "autoattack".
    n: number of test points attacked (clean accuracy uses the full test set).
    seed: selects the points and the attack's random keys.
    eps: L∞ radius in [0, 1] pixel units; None: the run's `config.eps`.
    batch_size, steps, restarts, step, rule, loss: the attack (see
      `pgd_accuracy`; steps/restarts/step/rule/loss are PGD settings).
    selection: "first" (the first n test points, as training's final
      evaluation) or "random" (n points drawn with `seed`).
    autoattack_kwargs: further AutoAttack settings (e.g. {"n_iter": 10}).
    num_devices: devices (None: as `evaluate`).
    out: record path (default under `workdir/eval/`).
    progress: tqdm progress bars.
  Returns:
    The record, with `record["path"]` set to the file written (the file itself
    holds the record without that entry).
  Raises:
    ValueError: an unknown choice, eps <= 0, n outside [1, test-set size].
    FileNotFoundError: no such checkpoint (from `restore_for_eval`).
  """
  _checks.check_choice("checkpoint", checkpoint, CHECKPOINTS)
  _checks.check_choice("attack", attack, ATTACKS)
  _checks.check_choice("selection", selection, SELECTIONS)
  if eps is not None:
    _check_eps(eps)
  if not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"n={n!r} must be a positive integer.")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
  if attack == "pgd":
    _checks.check_int("steps", steps, 1)
    _checks.check_int("restarts", restarts, 1)
    _checks.check_choice("PGD loss", loss, PGD_LOSSES)
    _checks.check_choice("restart rule", rule, RESTART_RULES)
  if step is not None:
    _checks.check_positive("step", step)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"No such work directory: {workdir!r}.")

  from fastadv_jax import restore  # pylint: disable=g-import-not-at-top
  model, variables, config, checkpoint_step = restore.restore_for_eval(workdir, checkpoint)
  dataset = str(config.dataset)
  size = TEST_SET_SIZES.get(dataset)
  if size is not None and n > size:
    raise ValueError(f"n={n} is larger than the {dataset} test set ({size} examples).")
  if eps is None:
    from fastadv_jax import config_base  # pylint: disable=g-import-not-at-top
    eps = config_base.eps_pixels(config)
    _check_eps(eps)

  from fastadv_jax import data  # pylint: disable=g-import-not-at-top
  images, labels = _load_test_split(data, config, progress)
  if n > len(images):
    raise ValueError(f"n={n} is larger than the test set ({len(images)} examples).")

  logits_fn = closures.eval_logits_fn(model, variables)
  metadata = {"workdir": os.path.abspath(workdir), "checkpoint": checkpoint,
              "checkpoint_step": checkpoint_step,
              "model": _config_get(config, "model.name"),
              "model_kwargs": _config_get(config, "model.kwargs"),
              "train_attack": _config_get(config, "attack.name"),
              "train_eps_255": _config_get(config, "eps")}
  record = evaluate(logits_fn, images, labels, seed, attack=attack, eps=eps, n=n,
                    selection=selection, batch_size=batch_size, steps=steps,
                    restarts=restarts, step=step, loss=loss, rule=rule,
                    autoattack_kwargs=autoattack_kwargs, num_devices=num_devices,
                    dataset=dataset, metadata=metadata, progress=progress)
  if out is None:
    out = os.path.join(workdir, "eval",
                       f"{checkpoint}_{attack}_n{n}_{selection}_seed{seed}.json")
  path = save_record(record, out)
  return dict(record, path=path)


def _config_get(config, dotted: str):
  """A JSON-able config entry, or None if absent."""
  value = config
  for part in dotted.split("."):
    try:
      value = value[part]
    except (KeyError, TypeError, AttributeError):
      return None
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  try:
    json.dumps(value)
  except TypeError:
    return str(value)
  return value


def _load_test_split(data_module, config, progress=True):
  """The test split as (uint8 images, int32 labels) with the run's data settings."""
  data_cfg = config.get("data", None) if hasattr(config, "get") else None
  kwargs = {}
  if data_cfg is not None:
    for name in ("source", "data_dir", "local_path"):
      # "" in a config means "the default", which load_split spells None.
      if name in data_cfg and data_cfg[name] not in ("", None):
        kwargs[name] = data_cfg[name]
  images, labels = data_module.load_split(config.dataset, "test", progress=progress,
                                          **kwargs)
  return np.asarray(images), np.asarray(labels, dtype=np.int32)

"""Robust evaluation: clean, PGD-k-r and AutoAttack accuracy, and results records.

Any model is evaluated through a `logits_fn(x) -> logits` closure, in float32 with
BatchNorm in eval mode (`closures.logits_fn(model, variables, bn="eval")` or
`model_logits_fn` below). The protocol follows the papers this library reimplements
(REFERENCE.md, "Evaluation protocol"): PGD-50-10 with step ε/4, CE loss, random
starts, and a named restart rule; AutoAttack "standard" (Croce & Hein 2020); clean
accuracy on the full test set and robust accuracy on `n` points chosen at random
with a recorded seed or as the first `n`.

How the batching works, and why:

* PGD runs **per example** (`jax.vmap` over single examples), with the
  example's random key `fold_in(key, example_id)` where `example_id` is its index
  in the test set. The result of an example therefore depends only on the model,
  the key and that index: not on the batch size, the padding, the number of
  devices or which other points were selected. This requires a `logits_fn` that
  treats examples independently (BatchNorm in eval mode), which evaluation needs
  anyway. Only correctly classified points are attacked.
* Batches have one fixed shape: the points are split into the fewest batches
  of at most `batch_size`, all of one size, the last one padded (with copies of
  a real example whose results are dropped), so an evaluation compiles once and
  pads less than one example per batch. With several devices the batch is a
  multiple of the device count, split across `jax.local_devices()` by `jax.pmap`.
* AutoAttack is delegated to `fastadv_jax.autoattack.autoattack`, whose Python
  driver gathers the still-robust points into padded chunks of `batch_size`
  between attacks (one device; results depend on the chunking, not only on
  the key).
* A `logits_fn` that is a pytree (e.g. `jax.tree_util.Partial(apply, variables)`,
  as `model_logits_fn` returns) is passed to the compiled function as an argument,
  so its weights are device buffers rather than constants baked into the
  executable, and the compiled function is reused across calls. A plain Python
  closure works too; its captured arrays become constants of the executable.

Robust accuracy counts an example robust only when it is classified correctly
both at x and at x + δ (x lies in the ε-ball, so a misclassified clean point is
not robust); hence robust accuracy <= clean accuracy.

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
import os
import tempfile
import time
import warnings
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import _checks
from fastadv_jax import closures

Array = jax.Array

ATTACKS = ("pgd", "autoattack")
RESTART_RULES = ("strict", "max_loss")
PGD_LOSSES = ("ce", "dlr")
SELECTIONS = ("random", "first")
CHECKPOINTS = ("best", "last", "swa")
AUTOATTACK_VERSIONS = ("standard",)
RECORD_SCHEMA = "fastadv_jax.eval_record/1"

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
# Closures.


def _apply_eval(model: Any, variables: Any, x: Array) -> Array:
  return model.apply(variables, x, train=False).astype(jnp.float32)


def model_logits_fn(model: Any, variables: Any) -> Callable[[Array], Array]:
  """Eval-mode float32 `logits_fn` whose variables are pytree leaves.

  Equivalent to `closures.logits_fn(model, variables, bn="eval")`, but returned
  as a `jax.tree_util.Partial`, so the evaluation functions pass the variables
  to the compiled function as arguments instead of baking them in as constants,
  and reuse the compiled function for another checkpoint of the same model.

  Args:
    model: a Linen module with `__call__(x, train)`; a module with a `dtype`
      attribute is cloned with float32 (evaluation is always float32).
    variables: its variables; floating leaves are cast to float32.
  Returns:
    `logits_fn(x) -> float32 logits`, BatchNorm in eval mode.
  """
  if getattr(model, "dtype", jnp.float32) != jnp.float32:
    model = model.clone(dtype=jnp.float32)
  variables = jax.tree_util.tree_map(
      lambda v: jnp.asarray(v, jnp.float32)
      if jnp.issubdtype(jnp.asarray(v).dtype, jnp.floating) else jnp.asarray(v),
      variables)
  return jax.tree_util.Partial(_CallModel(model), variables)


class _CallModel:
  """Hashable by the model (Linen modules are frozen dataclasses), so two
  `model_logits_fn`s of the same architecture share one compiled evaluation."""

  def __init__(self, model):
    self.model = model

  def __call__(self, variables, x):
    return _apply_eval(self.model, variables, x)

  def __eq__(self, other):
    if not isinstance(other, _CallModel):
      return False
    try:
      return bool(other.model == self.model)
    except Exception:  # pylint: disable=broad-except
      return other.model is self.model

  def __hash__(self):
    try:
      return hash(("fastadv_jax.evaluate._CallModel", self.model))
    except TypeError:  # a module with unhashable attributes: by identity
      return id(self.model)


def _as_pytree(logits_fn) -> tuple[Any, bool]:
  """(logits_fn as a pytree, whether its compiled functions may be cached)."""
  leaves = jax.tree_util.tree_leaves(logits_fn)
  if len(leaves) == 1 and leaves[0] is logits_fn:
    # An opaque closure: wrapped with no array leaves. Its compiled functions
    # are not cached at module level, which would keep its arrays alive.
    return jax.tree_util.Partial(logits_fn), False
  return logits_fn, True


# ----------------------------------------------------------------------------
# Per-batch computations (traced once per evaluation setting and shape).


def _to_float_images(x: Array) -> Array:
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 255.0
  return x.astype(jnp.float32)


def _clean_batch(logits_fn, x, y, keys, dynamic):
  del keys, dynamic
  return jnp.argmax(logits_fn(x), axis=-1) == y


def _pgd_example(logits_fn, x, y, key, dynamic, *, steps, restarts, loss, rule,
                 early_stop):
  """Robustness of one example (x: HWC) to PGD-`steps`-`restarts`.

  `dynamic` holds eps and step as traced scalars: another radius reuses the
  compiled function.
  """
  eps, step = dynamic["eps"], dynamic["step"]
  from fastadv_jax import attacks  # pylint: disable=g-import-not-at-top
  xb, yb = x[None], y[None]
  loss_fn = closures.loss_fn(loss, logits_fn, yb)
  delta = attacks.pgd(loss_fn, xb, key, eps=eps, step=step, steps=steps,
                      restarts=restarts, random_start=True, early_stop=early_stop,
                      select=rule)
  clean_ok = jnp.argmax(logits_fn(xb), axis=-1) == yb
  adv_ok = jnp.argmax(logits_fn(xb + delta), axis=-1) == yb
  return (clean_ok & adv_ok)[0]


def _per_example(example_fn):
  def batch_fn(logits_fn, x, y, keys, dynamic):
    return jax.vmap(example_fn, in_axes=(None, 0, 0, 0, None))(
        logits_fn, x, y, keys, dynamic)
  return batch_fn


def _batch_fn(kind: str, settings: tuple) -> Callable:
  settings = dict(settings)
  if kind == "clean":
    return _clean_batch
  if kind == "pgd":
    return _per_example(functools.partial(_pgd_example, **settings))
  raise ValueError(f"Unknown evaluation kind {kind!r}.")


def _build_executor(kind: str, settings: tuple, num_devices: int) -> Callable:
  """`f(logits_fn, x, y, ids, key, dynamic) -> (B,) bool`, jit-ted or pmap-ped.

  `settings` are static (they change the program); `dynamic` is a dict of
  float32 scalars (eps, step) passed as arguments.
  """
  batch_fn = _batch_fn(kind, settings)

  def run(logits_fn, x, y, ids, key, dynamic):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
    return batch_fn(logits_fn, _to_float_images(x), y, keys, dynamic)

  if num_devices == 1:
    return jax.jit(run)
  return jax.pmap(run, in_axes=(None, 0, 0, 0, None, None),
                  devices=jax.local_devices()[:num_devices])


_cached_executor = functools.lru_cache(maxsize=32)(_build_executor)


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _run_batched(kind: str, settings: tuple, logits_fn, images, labels, key, *,
                 dynamic: dict | None = None, batch_size: int,
                 num_devices: int | None, example_ids, progress: bool,
                 desc: str) -> np.ndarray:
  """Applies the `kind` computation to all examples in fixed-shape batches."""
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
  num_batches = -(-num // batch_size)
  batch = _round_up(-(-num // num_batches), num_devices)
  tree, cacheable = _as_pytree(logits_fn)
  make = _cached_executor if cacheable else _build_executor
  executor = make(kind, settings, num_devices)

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

  results = np.zeros((num,), dtype=bool)
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=num, desc=desc, unit="img", leave=False)
  pending = None  # dispatch the next batch before waiting for the previous one

  def collect(item):
    start, out = item
    count = min(batch, num - start)
    results[start:start + count] = np.asarray(out).reshape(-1)[:count]
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


def _check_count(what: str, value: Any) -> None:
  if not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{what} must be a positive integer, got {value!r}.")


def clean_accuracy(logits_fn, images, labels, batch_size: int = 500, *,
                   num_devices: int | None = None, progress: bool = False
                   ) -> Accuracy:
  """Clean (unattacked) accuracy.

  Args:
    logits_fn: `x -> logits`, float32, BatchNorm in eval mode.
    images: (N, H, W, C) uint8 in [0, 255] or float in [0, 1].
    labels: (N,) integer labels.
    batch_size: examples per compiled call (padded; see the module docstring).
    num_devices: devices to split each batch across (None: all local devices).
    progress: show a tqdm progress bar.
  Returns:
    `Accuracy(correct, accuracy)`.
  """
  _check_common(images, labels, batch_size)
  correct = _run_batched("clean", (), logits_fn, images, labels, jax.random.key(0),
                         batch_size=batch_size, num_devices=num_devices,
                         example_ids=None, progress=progress, desc="clean")
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
  (PGD-50-10, α = ε/4, CE loss), run with `fastadv_jax.attacks.pgd`.

  Args:
    logits_fn: `x -> logits`, float32, BatchNorm in eval mode; must treat
      examples independently (attacks run per example).
    images: (N, H, W, C) uint8 in [0, 255] or float in [0, 1].
    labels: (N,) integer labels.
    key: a `jax.random` key or an int seed; example i uses
      `fold_in(key, example_ids[i])`.
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
    num_devices: devices to split each batch across (None: all local devices).
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
  _check_count("steps", steps)
  _check_count("restarts", restarts)
  _checks.check_choice("PGD loss", loss, PGD_LOSSES)
  _checks.check_choice("restart rule", rule, RESTART_RULES)
  step = eps / 4 if step is None else step
  _checks.check_positive("step", step)
  num = len(images)
  example_ids = np.arange(num) if example_ids is None else np.asarray(example_ids)
  _checks.check_same_batch("images", images, "example_ids", example_ids)
  if clean_correct is None:
    clean_correct = clean_accuracy(logits_fn, images, labels, batch_size=batch_size,
                                   num_devices=num_devices).correct
  _checks.check_same_batch("images", images, "clean_correct", clean_correct)
  # Only correctly classified points are attacked (the others are not robust);
  # per-example keys make this identical to attacking every point.
  attacked = np.flatnonzero(np.asarray(clean_correct, bool))
  correct = np.zeros((num,), bool)
  if attacked.size:
    settings = (("steps", int(steps)), ("restarts", int(restarts)), ("loss", loss),
                ("rule", rule), ("early_stop", bool(early_stop)))
    correct[attacked] = _run_batched(
        "pgd", settings, logits_fn, np.asarray(images)[attacked],
        np.asarray(labels)[attacked], key, dynamic={"eps": eps, "step": step},
        batch_size=batch_size, num_devices=num_devices,
        example_ids=example_ids[attacked], progress=progress,
        desc=f"PGD-{steps}-{restarts}")
  return Accuracy(correct, float(np.mean(correct)))


def _run_autoattack(logits_fn, images, labels, key, *, eps, version, batch_size,
                    num_devices, progress, attack_kwargs):
  from fastadv_jax import autoattack  # pylint: disable=g-import-not-at-top
  _check_common(images, labels, batch_size)
  _check_eps(eps)
  _checks.check_choice("AutoAttack version", version, AUTOATTACK_VERSIONS)
  if num_devices not in (None, 1):
    raise ValueError(f"num_devices={num_devices}: AutoAttack runs on one device "
                     f"(its driver compacts the still-robust points on the host); "
                     f"use num_devices=1 or None.")
  if isinstance(key, (int, np.integer)):
    key = jax.random.key(int(key))
  images = np.asarray(images)
  x = (images.astype(np.float32) / 255.0 if images.dtype == np.uint8
       else images.astype(np.float32))
  if isinstance(logits_fn, jax.tree_util.Partial) or not _as_pytree(logits_fn)[1]:
    fn = logits_fn
  else:  # another pytree closure: its leaves still become arguments
    fn = jax.tree_util.Partial(_call_pytree, logits_fn)
  return autoattack.autoattack(fn, x, np.asarray(labels, np.int32), key, eps=eps,
                               version=version, batch_size=batch_size,
                               verbose=progress, **attack_kwargs)


def _call_pytree(logits_fn, x):
  return logits_fn(x)


def autoattack_accuracy(logits_fn, images, labels, key, *, eps: float,
                        version: str = "standard", batch_size: int = 250,
                        num_devices: int | None = None, progress: bool = True,
                        **attack_kwargs) -> Accuracy:
  """Robust accuracy under AutoAttack (Croce & Hein 2020), L∞.

  Runs `fastadv_jax.autoattack.autoattack` ("standard": APGD-CE, APGD-T, FAB-T,
  Square with 5,000 queries, 100 iterations for APGD and FAB, each attack only
  on the points still robust). Its driver gathers the still-robust points into
  chunks of `batch_size` (the last one padded), so each attack compiles once;
  unlike PGD, the random draws depend on the chunking (results are
  reproducible for the same key, points and batch size).

  Args:
    logits_fn: `x -> logits`, float32, BatchNorm in eval mode (a
      `jax.tree_util.Partial`, e.g. from `model_logits_fn`, avoids baking the
      weights into the compiled attacks).
    images: (N, H, W, C) uint8 in [0, 255] or float in [0, 1].
    labels: (N,) integer labels.
    key: a `jax.random` key or an int seed.
    eps: L∞ radius in [0, 1] pixel units (> 0).
    version: the ensemble; "standard".
    batch_size: chunk size of the still-robust points.
    num_devices: 1 or None (one device; see above).
    progress: print the robust accuracy after each attack.
    **attack_kwargs: passed to `autoattack.autoattack`, e.g. `n_iter`,
      `n_queries`, `n_target_classes`, `square_rescale_schedule`.
  Returns:
    `Accuracy(correct, accuracy)`.
  """
  result = _run_autoattack(logits_fn, images, labels, key, eps=eps, version=version,
                           batch_size=batch_size, num_devices=num_devices,
                           progress=progress, attack_kwargs=attack_kwargs)
  robust = np.asarray(result.robust, bool)
  return Accuracy(robust, float(np.mean(robust)))


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
                     f"(the test set has {num_examples} examples).")
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
    logits_fn: `x -> logits`, float32, BatchNorm in eval mode.
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
    num_devices: devices (None: all local devices for PGD; AutoAttack uses one).
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
    _check_count("steps", steps)
    _check_count("restarts", restarts)
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
    result = _run_autoattack(logits_fn, sub_images, sub_labels, key, eps=eps,
                             version=version, batch_size=batch_size,
                             num_devices=None, progress=progress,
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
  used_devices = (1 if attack == "autoattack" else
                  jax.local_device_count() if num_devices is None else num_devices)
  versions = _versions()

  record = {
      "schema": RECORD_SCHEMA,
      "dataset": dataset,
      "threat_model": "Linf",
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
      "attack_key": "fold_in(jax.random.key(seed), test-set index of the point)",
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
                     loss: str = "ce", selection: str = "random",
                     autoattack_kwargs: dict | None = None,
                     num_devices: int | None = None, out: str | None = None,
                     progress: bool = True) -> dict:
  """Evaluates a training run's checkpoint and writes the record.

  Loads `(model, variables, config) = fastadv_jax.train.restore_for_eval(
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
    selection: "random" or "first".
    autoattack_kwargs: further AutoAttack settings (e.g. {"n_iter": 10}).
    num_devices: devices (None: all local devices).
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
    _check_count("steps", steps)
    _check_count("restarts", restarts)
    _checks.check_choice("PGD loss", loss, PGD_LOSSES)
    _checks.check_choice("restart rule", rule, RESTART_RULES)
  if step is not None:
    _checks.check_positive("step", step)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"No such work directory: {workdir!r}.")

  from fastadv_jax import train  # pylint: disable=g-import-not-at-top
  model, variables, config = train.restore_for_eval(workdir, checkpoint)
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

  logits_fn = model_logits_fn(model, variables)
  metadata = {"workdir": os.path.abspath(workdir), "checkpoint": checkpoint,
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
    out = os.path.join(workdir, "eval", f"{checkpoint}_{attack}_n{n}_seed{seed}.json")
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

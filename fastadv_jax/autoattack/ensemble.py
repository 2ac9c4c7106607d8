"""AutoAttack: the parameter-free ensemble of Croce & Hein 2020.

"Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks" (ICML 2020), Sec. 4, as `run_standard_evaluation` in
fra31/auto-attack: the attacks run in sequence, each only on the points that
are still robust, and a point counts as non-robust once the model
misclassifies the adversarial example an attack returned for it.

* version="standard": APGD-CE (1 restart), APGD-T (9 targets, 1 restart each),
  FAB-T (9 targets, 1 restart each), Square (5000 queries, 1 restart);
  100 iterations for APGD and FAB.
* version="rand" (randomized defenses): APGD-CE and APGD-DLR with EOT over 20
  samples per gradient, 1 restart each (give `stochastic=True` and a
  `logits_fn(x, key)`).

Compaction: the Python driver gathers the points still robust into chunks of
at most `batch_size`, each padded (and masked) to a bucketed size (8, 12, 16,
24, 32, 48, ...: `_common.bucket_size`), so work shrinks with the robust set like the
reference's index sets while a handful of shapes, each compiled once, serve
every stage and batch. Within an attack, every target, restart and (Square)
block of queries again runs on the points still to fool only, packed the same
way. Every random draw of a point comes from the key and the point's index
(`example_ids`), so a point's result does not depend on the chunking, nor on
the number of devices: with several, the points are split between them and
each device runs the stages on its share in its own thread
(`fastadv_jax.device_shards`).
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import closures
from fastadv_jax import device_shards
from fastadv_jax import _checks
from fastadv_jax.autoattack import _common
from fastadv_jax.autoattack import checks as checks_lib
from fastadv_jax.autoattack._apgd import apgd, apgd_targeted
from fastadv_jax.autoattack._fab import fab_targeted
from fastadv_jax.autoattack._square import square

Array = jax.Array

ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "rand": ("apgd-ce", "apgd-dlr"),
}
_GRADIENT_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t")
_LINF_ONLY = ("fab-t", "square")


class AutoAttackResult(NamedTuple):
  """Outcome of `autoattack` on N points.

  Attributes:
    x_adv: (N, ...) float32 jax array; the adversarial example found by the
      first successful attack, x where the point stayed robust (or was
      misclassified already).
    robust: (N,) NumPy bool; correctly classified at x and fooled by no attack.
    clean_correct: (N,) NumPy bool; correctly classified at x.
    robust_accuracy: {stage: fraction of the N points robust after it}, in
      order: "clean" (the clean accuracy), then each attack run.
    stage_fooled: (N,) NumPy int; index into `stages` of the stage at which the
      point stopped being robust (0: misclassified at x), -1 if robust.
    stages: ("clean", *attacks run).
    stage_times: {attack: (start, end)} in `time.perf_counter()` seconds, the
      wall-clock window of each stage (compilation included).
  """
  x_adv: Array
  robust: np.ndarray
  clean_correct: np.ndarray
  robust_accuracy: dict
  stage_fooled: np.ndarray
  stages: tuple
  stage_times: Optional[dict] = None


def _validate(x, y, eps, norm, version, attacks_to_run, batch_size, n_iter, n_target_classes,
              n_queries, eot_iter):
  _common.check_eps(eps)
  norm = _common.canonical_norm(norm)
  if version not in VERSIONS:
    raise ValueError(f"Unknown AutoAttack version {version!r}; choose one of {sorted(VERSIONS)}.")
  if attacks_to_run is None:
    attacks = VERSIONS[version]
  else:
    if isinstance(attacks_to_run, str):
      raise ValueError(f"attacks_to_run must be a sequence of names, got the string "
                       f"{attacks_to_run!r}; e.g. [{attacks_to_run!r}].")
    attacks = tuple(attacks_to_run)
    if not attacks:
      raise ValueError(f"attacks_to_run is empty; choose from {list(ATTACKS)}.")
    for name in attacks:
      if name not in ATTACKS:
        raise ValueError(f"Unknown attack {name!r} in attacks_to_run; choose from {list(ATTACKS)}.")
    if len(set(attacks)) != len(attacks):
      raise ValueError(f"attacks_to_run lists an attack twice: {list(attacks)}.")
  if norm != "linf":
    bad = [a for a in attacks if a in _LINF_ONLY]
    if bad:
      raise ValueError(
          f"{bad} support norm 'linf' only (FAB-T and Square L2 are not implemented); with "
          f"norm={norm!r} pass attacks_to_run from {list(_GRADIENT_ATTACKS)}.")
  _common.check_inputs(x, y)
  if batch_size is not None:
    _checks.check_int("batch_size", batch_size, 1)
  _checks.check_int("n_iter", n_iter, 1)
  _checks.check_int("n_target_classes", n_target_classes, 1)
  _checks.check_int("n_queries", n_queries, 1)
  if eot_iter is not None:
    _checks.check_int("eot_iter", eot_iter, 1)
  return norm, attacks


@jax.jit
def _scatter_rows(x_adv, rows, values):
  """x_adv[rows] = values, skipping rows == len(x_adv) (fixed shapes: one compile)."""
  return x_adv.at[rows].set(values, mode="drop")


def padded_chunks(indices: np.ndarray, size: int, bucketed: bool = False):
  """Yields (padded index array, number of real entries) for chunks of `indices`.

  Chunks hold at most `size` entries; each is padded (with its first entry) to
  `size`, or with `bucketed` to `_common.bucket_size(n, size)`.
  """
  for start in range(0, len(indices), size):
    chunk = indices[start:start + size]
    n = len(chunk)
    padded = _common.bucket_size(n, size) if bucketed else size
    if n < padded:
      chunk = np.concatenate([chunk, np.full(padded - n, chunk[0], chunk.dtype)])
    yield chunk, n


def autoattack(logits_fn: Callable, x, y, key, *, eps: float, norm: str = "linf",
               version: str = "standard", attacks_to_run: Optional[Sequence[str]] = None,
               batch_size: Optional[int] = None, n_iter: int = 100, n_target_classes: int = 9,
               n_queries: int = 5000, eot_iter: Optional[int] = None,
               square_rescale_schedule: bool = False, stochastic: bool = False,
               checks: bool = True, verbose: bool = False, progress: bool = False,
               example_ids=None, num_devices: Optional[int] = None) -> AutoAttackResult:
  """Runs AutoAttack (Croce & Hein 2020) and reports robust accuracy per stage.

  Python orchestration around jitted attacks: the robust set is concrete, so
  this function is not itself jittable (the attacks are).

  Args:
    logits_fn: `x -> logits`, evaluation mode (BatchNorm running averages);
      `(x, key) -> logits` when `stochastic`. Prefer a pytree closure,
      `closures.eval_logits_fn(model, variables)` (the variables then become
      arguments of the compiled attacks instead of constants); a plain
      callable is wrapped by `closures.as_pytree`.
    x: (N, H, W, C) images in [0, 1] (N may be a whole test set).
    y: (N,) integer labels.
    key: `jax.random` key; the same key gives the same result.
    eps: radius in pixel units (e.g. 8/255).
    norm: "linf" (default) or "l2" (then only APGD attacks are available).
    version: "standard" or "rand" (sets the attack list and the EOT count).
    attacks_to_run: optional subset/order of `ATTACKS` ("apgd-ce", "apgd-dlr",
      "apgd-t", "fab-t", "square"), overriding the version's list; the
      version's parameters still apply.
    batch_size: the most points attacked in one call (default: N). Each
      stage runs on the points still robust only, in chunks of at most
      `batch_size` padded to a bucketed size (8, 12, 16, 24, ...); the
      results do not depend on it.
    n_iter: iterations of APGD/APGD-T/FAB-T (100 in AutoAttack; torchattacks'
      AutoAttack uses its attacks' default of 10).
    n_target_classes: targets of APGD-T and FAB-T (9; at most num_classes - 1).
    n_queries: Square's query budget (5000).
    eot_iter: EOT samples per APGD gradient (default 1, "rand": 20).
    square_rescale_schedule: rescale Square's p schedule to n_queries
      (torchattacks: True; fra31 AutoAttack: False, the default).
    stochastic: `logits_fn` takes a key (randomized defense).
    checks: run the reliability checks and emit `fastadv_jax.autoattack.checks` warnings.
    verbose: print the robust accuracy after each stage (once all have run).
    progress: a tqdm progress bar per stage (iterations or queries, points
      still robust).
    example_ids: optional (N,) ints, the points' ids (default 0..N-1, e.g.
      their test-set indices); a point's random draws depend on the key, the
      stage and its id only.
    num_devices: local devices to split the points between, one driver thread
      per device (`fastadv_jax.device_shards`; the results do not depend on
      it); None: all local devices on an accelerator, one on CPU.

  Returns:
    An `AutoAttackResult`.

  Raises:
    ValueError: for bad eps/norm/version/attack names, images outside [0, 1],
      mismatched x/y, labels out of range or too few classes for a loss.
  """
  norm, attacks = _validate(x, y, eps, norm, version, attacks_to_run, batch_size, n_iter,
                            n_target_classes, n_queries, eot_iter)
  devices = device_shards.resolve_devices(num_devices)
  if eot_iter is None:
    eot_iter = 20 if version == "rand" else 1
  fn = closures.as_pytree(logits_fn)
  x = jnp.asarray(x, jnp.float32)
  y_host = np.asarray(y).astype(np.int32)
  y = jnp.asarray(y_host)
  num_points = x.shape[0]
  chunk_size = num_points if batch_size is None else min(batch_size, num_points)
  key_checks, key_clean, key_attacks = jax.random.split(key, 3)

  # Clean predictions, chunked like the attacks.
  all_indices = np.arange(num_points)
  predictions = np.empty(num_points, np.int64)
  num_classes = None
  for c, (chunk, n) in enumerate(padded_chunks(all_indices, chunk_size)):
    logits = _common.predict(fn, x[chunk], jax.random.fold_in(key_clean, c), stochastic)
    if num_classes is None:
      num_classes = logits.shape[-1]
      if checks:
        checks_lib.check_range_output(logits[:n])
    predictions[chunk[:n]] = np.asarray(jnp.argmax(logits[:n], -1))
  _common.check_labels_in_range(y_host, num_classes)
  if "apgd-dlr" in attacks and num_classes < 3:
    raise ValueError(f"apgd-dlr needs at least 3 classes; the model has {num_classes}.")
  if "apgd-t" in attacks:
    if num_classes < 4:
      raise ValueError(f"apgd-t (targeted DLR) needs at least 4 classes; the model has "
                       f"{num_classes}.")
    _common.check_n_target_classes(n_target_classes, num_classes, "apgd-t")
  if "fab-t" in attacks:
    _common.check_n_target_classes(n_target_classes, num_classes, "fab-t")

  if checks and version != "rand":
    n_check = min(chunk_size, 250)
    checks_lib.check_randomized(fn, x[:n_check], y[:n_check], key_checks, stochastic=stochastic)

  clean_correct = predictions == y_host
  robust_accuracy = {"clean": float(np.mean(clean_correct))}
  if verbose:
    print(f"AutoAttack ({version}, {norm}, eps={eps:.5f}): clean accuracy "
          f"{robust_accuracy['clean']:.2%}")

  def run(name, xb, yb, k, mask, ids):
    common = dict(eps=eps, mask=mask, stochastic=stochastic, example_ids=ids)
    if name in ("apgd-ce", "apgd-dlr"):
      return apgd(fn, xb, yb, k, norm=norm, loss=name[5:], n_iter=n_iter, n_restarts=1,
                  eot_iter=eot_iter, warn=False, **common)
    if name == "apgd-t":
      return apgd_targeted(fn, xb, yb, k, norm=norm, n_target_classes=n_target_classes,
                           n_iter=n_iter, n_restarts=1, eot_iter=eot_iter, warn=False,
                           **common)
    if name == "fab-t":
      return fab_targeted(fn, xb, yb, k, norm=norm, n_target_classes=n_target_classes,
                          n_iter=n_iter, n_restarts=1, **common)
    return square(fn, xb, yb, k, norm=norm, n_queries=n_queries, n_restarts=1,
                  p_init=0.8, rescale_schedule=square_rescale_schedule, **common)

  if example_ids is None:
    example_ids = np.arange(num_points)
  example_ids = np.asarray(example_ids)
  if example_ids.shape != (num_points,):
    raise ValueError(f"example_ids must have shape (N,) = ({num_points},), got "
                     f"{example_ids.shape}.")
  # Iterations per chunk, for the progress bar.
  per_chunk = {"apgd-ce": n_iter, "apgd-dlr": n_iter, "apgd-t": n_iter * n_target_classes,
               "fab-t": n_iter * n_target_classes, "square": n_queries}
  # Gradient evaluations per point, for the run-time estimate (a Square query
  # is a forward pass, about a third of a gradient).
  gradients = {"apgd-ce": n_iter * eot_iter, "apgd-dlr": n_iter * eot_iter,
               "apgd-t": n_iter * n_target_classes * eot_iter,
               "fab-t": n_iter * n_target_classes, "square": n_queries / 3}
  x_host = np.asarray(x)

  def attack_shard(points, device, position):
    """The stages on `points` (indices into x), on `device`: the shard's
    adversarial rows, the stage that fooled each point, and per stage its
    zero-gradient count and wall-clock window."""
    xs = jax.device_put(x_host[points], device)
    ys = jax.device_put(y_host[points], device)
    ids = example_ids[points]
    robust = clean_correct[points].copy()
    fooled_at = np.where(robust, -1, 0)
    x_adv = xs
    where = f" {device}" if len(devices) > 1 else ""
    stats = {}
    for stage, name in enumerate(attacks, start=1):
      stage_start = time.perf_counter()
      indices = np.flatnonzero(robust)
      n_zero_grad = 0
      key_stage = jax.random.fold_in(key_attacks, stage)
      n_chunks = -(-indices.size // chunk_size)
      with _common.progress_bar(n_chunks * per_chunk[name], f"{name.upper()} ({stage}/"
                                f"{len(attacks)}){where}", int(indices.size), progress,
                                position=position if len(devices) > 1 else None) as bar:
        for c, (chunk, n) in enumerate(padded_chunks(indices, chunk_size, bucketed=True)):
          if bar is not None:
            bar.robust_elsewhere = int(np.sum(robust)) - n
          # One key per stage: the points' own keys come from their ids; a
          # stochastic model gets fresh randomness per chunk.
          key_chunk = jax.random.fold_in(key_stage, c) if stochastic else key_stage
          mask = jnp.arange(chunk.size) < n
          xb, yb = xs[chunk], ys[chunk]
          result = run(name, xb, yb, key_chunk, mask, ids[chunk])
          # Decide by re-evaluating the returned points, as the reference does.
          logits = _common.predict(fn, result.x_adv, jax.random.fold_in(key_chunk, 1),
                                   stochastic)
          fooled = np.asarray(jnp.argmax(logits, -1) != yb)[:n]
          if "zero_grad" in result.info:
            n_zero_grad += int(np.sum(np.asarray(result.info["zero_grad"])[:n]))
          newly = chunk[:n][fooled]
          if newly.size:
            # Padding and points not fooled point past the end and are dropped.
            rows = np.full(chunk.size, len(points), np.int32)
            rows[:n][fooled] = newly
            x_adv = _scatter_rows(x_adv, rows, result.x_adv)
            robust[newly] = False
            fooled_at[newly] = stage
        if bar is not None:
          bar.robust_elsewhere = 0
          bar.robust(int(np.sum(robust)))
      jax.block_until_ready(x_adv)
      stats[name] = (int(indices.size), n_zero_grad, stage_start, time.perf_counter())
      if progress and position == 0 and indices.size and stage < len(attacks):
        # Seconds per point and gradient, as this stage ran (without its first
        # iterations, which include compilation, where the bar saw later ones),
        # times the later stages' gradients on every point left: rough (fewer
        # points reach later stages; a Square query counts as a third of a
        # gradient).
        seconds = bar.steady_seconds() if bar is not None else None
        if seconds is None:
          seconds = stats[name][3] - stage_start
        rate = seconds / (indices.size * gradients[name])
        left = rate * int(np.sum(robust)) * sum(gradients[a] for a in attacks[stage:])
        share = f" (this device's {len(points)} of {num_points} points)" if len(
            devices) > 1 else ""
        _common.write(f"AutoAttack{share}: {int(np.sum(robust))} points robust after "
                      f"{name.upper()}; about {_common.duration(left)} left if they all "
                      f"stay robust")
    return np.asarray(x_adv), fooled_at, stats

  shards = device_shards.run_on_devices(attack_shard, all_indices, devices)
  x_adv_host = x_host.copy()
  stage_fooled = np.empty(num_points, np.int64)
  for points, (shard_x_adv, shard_fooled, _) in shards:
    x_adv_host[points] = shard_x_adv
    stage_fooled[points] = shard_fooled
  robust = stage_fooled == -1
  stage_times = {}
  for stage, name in enumerate(attacks, start=1):
    stats = [shard_stats[name] for _, (_, _, shard_stats) in shards]
    attacked = sum(s[0] for s in stats)
    stage_times[name] = (min(s[2] for s in stats), max(s[3] for s in stats))
    robust_accuracy[name] = float(np.mean((stage_fooled == -1) | (stage_fooled > stage)))
    if checks and name in _GRADIENT_ATTACKS and attacked:
      checks_lib.warn_zero_gradients(sum(s[1] for s in stats), attacked, name.upper())
    if verbose:
      print(f"  robust accuracy after {name.upper()}: {robust_accuracy[name]:.2%} "
            f"({stage_times[name][1] - stage_times[name][0]:.1f} s)")

  if checks:
    checks_lib.check_black_box_gain(robust_accuracy)
    checks_lib.check_no_success(int(np.sum(clean_correct)),
                                int(np.sum(clean_correct & ~robust)))
  return AutoAttackResult(jnp.asarray(x_adv_host), robust, clean_correct, robust_accuracy,
                          stage_fooled, ("clean",) + tuple(attacks), stage_times)


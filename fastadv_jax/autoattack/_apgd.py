"""Auto-PGD (APGD) and its targeted DLR variant (APGD-T).

Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks", Algorithm 1 and Sec. 3, following
the reference implementation (fra31/auto-attack `autopgd_base.py`, also
torchattacks `APGD`/`APGDT`):

* random start x + eps * t / ||t|| (t ~ U[-1, 1]^d for Linf, N(0, I) for L2);
* step size eta^(0) = 2 eps, momentum alpha = 0.75 (Eq. 2; no momentum in the
  first step);
* checkpoints w_j: the first after p_1 = 0.22 N_iter iterations, then every
  k iterations with k decreasing by 0.03 N_iter down to 0.06 N_iter;
* at a checkpoint the step size is halved, and the iterate restarted from the
  best point, when (Condition 1) the loss increased in at most rho = 0.75 of
  the last k steps, or (Condition 2) the step size was not reduced at the last
  checkpoint and the best loss did not improve since;
* the attack keeps the last misclassified iterate (`x_best_adv`) and, for
  `info["x_best"]`, the highest-loss iterate.

Losses: cross-entropy, DLR (Eq. 6) and targeted DLR (Eq. 7), from
`fastadv_jax.closures`. Everything has fixed shapes; per-example step sizes and
masks replace the reference's shrinking index sets.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import _checks, closures
from fastadv_jax.autoattack import _common, checks
from fastadv_jax.autoattack._common import AttackResult

Array = jax.Array

LOSSES = ("ce", "dlr")


def _loss_ce(logits, y, target):
  del target
  return closures.cross_entropy_per_example(logits, y)


def _loss_dlr(logits, y, target):
  del target
  return closures.dlr_per_example(logits, y)


def _loss_dlr_targeted(logits, y, target):
  return closures.dlr_targeted_per_example(logits, y, target)


_LOSS_FNS = {"ce": _loss_ce, "dlr": _loss_dlr, "dlr-targeted": _loss_dlr_targeted}


def checkpoint_schedule(n_iter: int) -> tuple[np.ndarray, np.ndarray]:
  """APGD checkpoints as in the reference (iteration indices are 0-based).

  Returns:
    (is_checkpoint, k): two (n_iter,) arrays; at iteration i with
    is_checkpoint[i], the oscillation test looks at the last k[i] steps.
    For n_iter=100 the checkpoints are i = 21, 40, 56, 69, 79, 86, 92, 98.
  """
  k = max(int(0.22 * n_iter), 1)
  k_min = max(int(0.06 * n_iter), 1)
  k_decrease = max(int(0.03 * n_iter), 1)
  is_checkpoint = np.zeros(n_iter, bool)
  ks = np.zeros(n_iter, np.int32)
  since_last = 0
  for i in range(n_iter):
    since_last += 1
    if since_last == k:
      is_checkpoint[i] = True
      ks[i] = k
      since_last = 0
      k = max(k - k_decrease, k_min)
  return is_checkpoint, ks


def _normalize_l2(v):
  norm = _common.per_example_l2(v)
  return v / _common.expand_to(norm + 1e-12, v)


def _project_l2(x, x_new, eps):
  """x + (x_new - x) * min(eps, ||x_new - x||) / ||x_new - x||, clipped to the box."""
  delta = x_new - x
  norm = _common.expand_to(_common.per_example_l2(delta), x)
  return jnp.clip(x + _normalize_l2(delta) * jnp.minimum(eps, norm), 0.0, 1.0)


def random_start(x: Array, keys: Array, eps, norm: str) -> Array:
  """x + eps * t / ||t|| clipped to the box; t ~ U[-1, 1]^d (Linf) or N(0, I) (L2).

  `keys`: (B,) per-example keys (`_common.row_keys`); row b of t is drawn from
  keys[b] alone.
  """
  if norm == "linf":
    t = _common.row_uniform(keys, x.shape[1:])
    t = t / _common.expand_to(_common.per_example_max_abs(t) + 1e-12, t)
  else:
    t = _normalize_l2(_common.row_normal(keys, x.shape[1:]))
  return jnp.clip(x + jnp.asarray(eps, jnp.float32) * t, 0.0, 1.0)


def _loss_and_grad(fn, x_adv, y, target, k, *, loss, eot_iter, stochastic):
  """(grad, per-example losses, logits) at x_adv (EOT-averaged gradient)."""
  loss_per_example = _LOSS_FNS[loss]

  def one_sample(sample_key):
    def total(xa):
      logits = _common.call_logits(fn, xa, sample_key, stochastic)
      losses = loss_per_example(logits, y, target)
      # Sum, not mean: per-example gradients independent of the batch size.
      return jnp.sum(losses), (losses, logits)
    (_, (losses, logits)), grad = jax.value_and_grad(total, has_aux=True)(x_adv)
    return grad, losses, logits

  if not stochastic or eot_iter == 1:
    # A deterministic model gives eot_iter identical gradients: compute one.
    return one_sample(k)

  def accumulate(grad_sum, sample_key):
    grad, losses, logits = one_sample(sample_key)
    return grad_sum + grad, (losses, logits)
  grad_sum, (losses, logits) = jax.lax.scan(
      accumulate, jnp.zeros_like(x_adv), jax.random.split(k, eot_iter))
  # As the reference: averaged gradient, loss and logits of the last sample.
  return grad_sum / eot_iter, losses[-1], logits[-1]


def _model_key(key, i, stochastic):
  # `key` only feeds a stochastic model (fresh randomness per forward pass).
  return jax.random.fold_in(key, i) if stochastic else None


@functools.partial(jax.jit, static_argnames=("loss", "n_iter", "eot_iter", "stochastic"))
def _apgd_init(fn, x, y, target, x_start, key, eps, *, loss, n_iter, eot_iter, stochastic):
  """The state of an APGD run at its start point (the loss and gradient there)."""
  eps = jnp.asarray(eps, jnp.float32)
  batch = x.shape[0]
  grad, losses, logits = _loss_and_grad(
      fn, x_start, y, target, _model_key(key, n_iter, stochastic), loss=loss,
      eot_iter=eot_iter, stochastic=stochastic)
  state = dict(
      x_adv=x_start, x_adv_old=x_start, grad=grad,
      x_best=x_start, grad_best=grad, loss_best=losses,
      x_best_adv=x_start, robust=jnp.argmax(logits, -1) == y,
      step_size=jnp.full((batch,), 2.0, jnp.float32) * eps,
      loss_steps=jnp.zeros((n_iter, batch), jnp.float32),
      loss_best_last_check=losses,
      reduced_last_check=jnp.ones((batch,), bool),
  )
  return state, checks.gradient_is_degenerate(grad)


@functools.partial(jax.jit, static_argnames=("norm", "loss", "n_iter", "eot_iter", "stochastic",
                                             "length"))
def _apgd_chunk(fn, x, y, target, key, eps, rho, state, i0, *, norm, loss, n_iter, eot_iter,
                stochastic, length):
  """Iterations i0 .. i0 + length - 1 of an APGD run (Alg. 1 of Croce & Hein 2020)."""
  eps = jnp.asarray(eps, jnp.float32)
  is_checkpoint, ks = checkpoint_schedule(n_iter)
  is_checkpoint, ks = jnp.asarray(is_checkpoint), jnp.asarray(ks)
  window = max(int(0.22 * n_iter), 1)  # the largest k

  def body(i, s):
    x_adv = s["x_adv"]
    momentum_diff = x_adv - s["x_adv_old"]
    a = jnp.where(i > 0, 0.75, 1.0)
    step = _common.expand_to(s["step_size"], x)
    if norm == "linf":
      x1 = x_adv + step * jnp.sign(s["grad"])
      x1 = jnp.clip(jnp.clip(x1, x - eps, x + eps), 0.0, 1.0)
      x1 = x_adv + (x1 - x_adv) * a + momentum_diff * (1 - a)
      x1 = jnp.clip(jnp.clip(x1, x - eps, x + eps), 0.0, 1.0)
    else:
      x1 = x_adv + step * _normalize_l2(s["grad"])
      x1 = _project_l2(x, x1, eps)
      x1 = x_adv + (x1 - x_adv) * a + momentum_diff * (1 - a)
      x1 = _project_l2(x, x1, eps)

    grad, losses, logits = _loss_and_grad(fn, x1, y, target, _model_key(key, i, stochastic),
                                          loss=loss, eot_iter=eot_iter, stochastic=stochastic)
    correct = jnp.argmax(logits, -1) == y
    robust = s["robust"] & correct
    x_best_adv = jnp.where(_common.expand_to(~correct, x), x1, s["x_best_adv"])

    loss_steps = s["loss_steps"].at[i].set(losses)
    improved = losses > s["loss_best"]
    improved_x = _common.expand_to(improved, x)
    x_best = jnp.where(improved_x, x1, s["x_best"])
    grad_best = jnp.where(improved_x, grad, s["grad_best"])
    loss_best = jnp.where(improved, losses, s["loss_best"])

    # Checkpoint (evaluated every step, applied only where is_checkpoint[i]).
    k = ks[i]
    offsets = jnp.arange(window)
    # Python-style negative indices, as in the reference's loss_steps[j - c - 1].
    current = loss_steps[(i - offsets) % n_iter]
    previous = loss_steps[(i - offsets - 1) % n_iter]
    n_increase = jnp.sum((current > previous) & (offsets < k)[:, None], axis=0)
    condition_1 = n_increase <= k * rho
    condition_2 = ~s["reduced_last_check"] & (s["loss_best_last_check"] >= loss_best)
    reduce = (condition_1 | condition_2) & is_checkpoint[i]
    reduce_x = _common.expand_to(reduce, x)

    check = is_checkpoint[i]
    return dict(
        x_adv=jnp.where(reduce_x, x_best, x1),
        x_adv_old=x_adv,
        grad=jnp.where(reduce_x, grad_best, grad),
        x_best=x_best, grad_best=grad_best, loss_best=loss_best,
        x_best_adv=x_best_adv, robust=robust,
        step_size=jnp.where(reduce, s["step_size"] / 2.0, s["step_size"]),
        loss_steps=loss_steps,
        loss_best_last_check=jnp.where(check, loss_best, s["loss_best_last_check"]),
        reduced_last_check=jnp.where(check, condition_1 | condition_2,
                                     s["reduced_last_check"]),
    )

  return _common.iterate(body, state, i0, length)


def _apgd_run(fn, x, y, target, x_start, key, eps, rho, *, norm, loss, n_iter, eot_iter,
              stochastic):
  """One APGD run (one restart) on the whole batch, from `x_start`.

  The iterations run in compiled chunks (`_common.loop_chunks`); every row is
  independent of the others, so a row's result does not depend on the batch.

  Returns:
    x_best_adv: last misclassified iterate (the start point where never fooled),
    robust: (B,) bool, no iterate was misclassified,
    loss_best: (B,) highest loss seen, x_best: the point attaining it,
    degenerate_grad: (B,) bool, zero/non-finite gradient at the start point,
    step_size: (B,) the final step size.
  """
  statics = dict(loss=loss, n_iter=n_iter, eot_iter=eot_iter, stochastic=stochastic)
  state, degenerate_grad = _apgd_init(fn, x, y, target, x_start, key, eps, **statics)
  chunks = _common.loop_chunks(n_iter)
  for i0, length in chunks:
    state = _apgd_chunk(fn, x, y, target, key, eps, rho, state, jnp.int32(i0), norm=norm,
                        length=length, **statics)
    _common.tick(length, wait_for=state["robust"])
  return (state["x_best_adv"], state["robust"], state["loss_best"], state["x_best"],
          degenerate_grad, state["step_size"])


def _validate(x, y, eps, norm, n_iter, n_restarts, rho, eot_iter, mask):
  _common.check_eps(eps)
  norm = _common.canonical_norm(norm)
  _common.check_inputs(x, y, mask)
  _checks.check_int("n_iter", n_iter, 1)
  _checks.check_int("n_restarts", n_restarts, 1)
  _checks.check_int("eot_iter", eot_iter, 1)
  _checks.check_in_range("rho", rho, 0.0, 1.0)
  return norm


def _run_restarts(fn, x, y, target, keys, key, eps, rho, attackable, *, norm, loss, n_iter,
                  n_restarts, eot_iter, stochastic, x_adv, fooled, info):
  """Runs restarts on the points of `attackable` not yet fooled; returns the
  updated (x_adv, fooled, info).

  Each restart runs on the points still to fool only, packed into a bucketed
  batch (`_common.on_active_rows`), as the reference attacks only them.
  `keys`: (B,) per-example keys (random starts); `key`: the model's key (a
  stochastic model's randomness, per forward pass).
  """
  for restart in range(n_restarts):
    active = attackable & ~fooled
    if not _common.any_concrete(active):
      _common.tick(n_iter * (n_restarts - restart))
      break
    _common.report_active(active)
    key_model = jax.random.fold_in(key, restart)

    def step(active, x, y, target, keys, state):
      x_adv, fooled, info = state
      x_best_adv, robust, loss_best, x_best, degenerate, step_size = _apgd_run(
          fn, x, y, target, random_start(x, _common.fold_rows(keys, restart), eps, norm),
          key_model, _common.scalar(eps), _common.scalar(rho),
          norm=norm, loss=loss, n_iter=n_iter, eot_iter=eot_iter, stochastic=stochastic)
      newly_fooled = active & ~robust
      x_adv = jnp.where(_common.expand_to(newly_fooled, x), x_best_adv, x_adv)
      fooled = fooled | newly_fooled
      info = dict(info)
      better = active & (loss_best > info["loss_best"])
      info["loss_best"] = jnp.where(better, loss_best, info["loss_best"])
      info["x_best"] = jnp.where(_common.expand_to(better, x), x_best, info["x_best"])
      info["zero_grad"] = info["zero_grad"] | (active & degenerate)
      info["step_size"] = jnp.where(active, step_size, info["step_size"])
      return x_adv, fooled, info

    x_adv, fooled, info = _common.on_active_rows(
        step, active, (x, y, target, keys), (x_adv, fooled, info))
  _common.report_active(attackable & ~fooled)
  return x_adv, fooled, info


def _initial_info(x):
  return dict(loss_best=jnp.full((x.shape[0],), -jnp.inf, jnp.float32), x_best=x,
              zero_grad=jnp.zeros((x.shape[0],), bool),
              step_size=jnp.full((x.shape[0],), jnp.nan, jnp.float32))


def _maybe_warn(info, attackable, name, warn):
  if warn and not _common.is_traced(info["zero_grad"], attackable):
    checks.warn_zero_gradients(int(np.sum(np.asarray(info["zero_grad"]))),
                               int(np.sum(np.asarray(attackable))), name)


def apgd(logits_fn: Callable, x, y, key, *, eps: float, norm: str = "linf",
         loss: str = "ce", n_iter: int = 100, n_restarts: int = 1, rho: float = 0.75,
         eot_iter: int = 1, mask=None, stochastic: bool = False,
         warn: bool = True, example_ids=None) -> AttackResult:
  """Untargeted APGD (Croce & Hein 2020, Alg. 1) with the CE or DLR loss.

  Each restart attacks only the points still robust; a point counts as fooled
  as soon as one iterate is misclassified (the reference's `perturb` with
  `cheap=True`).

  Args:
    logits_fn: `x -> logits` (B, C); `(x, key) -> logits` when `stochastic`.
      Prefer a pytree closure such as `closures.eval_logits_fn(model,
      variables)` (see `fastadv_jax.autoattack`).
    x: (B, ...) images in [0, 1].
    y: (B,) integer labels.
    key: a `jax.random` key (random starts; EOT samples when stochastic).
    eps: radius of the `norm` ball, in pixel units (> 0).
    norm: "linf" or "l2" (case-insensitive).
    loss: "ce" (cross-entropy) or "dlr" (difference of logits ratio, Eq. 6).
    n_iter: iterations per restart (100 in AutoAttack).
    n_restarts: random restarts (1 in AutoAttack "standard"/"rand").
    rho: Condition-1 threshold of the step-size rule (0.75).
    eot_iter: gradients averaged per step (Expectation over Transformation;
      20 in AutoAttack "rand"); only matters when `stochastic`.
    mask: optional (B,) bool, the points to attack (default: all).
    example_ids: optional (B,) ints, the points' ids (e.g. their test-set
      indices; default 0..B-1). A point's random draws come from `key` and its
      id alone, so its result does not depend on the batch it is attacked in.
    stochastic: call `logits_fn(x, key)` with a fresh key per forward pass.
    warn: emit `GradientMaskingWarning` for zero gradients (concrete calls only).

  Returns:
    AttackResult(x_adv, fooled, info) with info = {"loss_best": (B,) highest loss
    found (-inf for points not attacked), "x_best": the point attaining it (x
    where not attacked), "zero_grad": (B,) bool, zero/non-finite gradient at a
    starting point, "step_size": (B,) final step size of the last run on the
    point (NaN where not attacked)}.
  """
  norm = _validate(x, y, eps, norm, n_iter, n_restarts, rho, eot_iter, mask)
  if loss not in LOSSES:
    raise ValueError(f"Unknown APGD loss {loss!r}; choose one of {list(LOSSES)}.")
  fn, x, y, mask = _common.prepare(logits_fn, x, y, mask)
  key_clean, key_attack = jax.random.split(key)
  clean_logits = _common.predict(fn, x, key_clean, stochastic)
  _common.check_labels_in_range(y, clean_logits.shape[-1])
  if loss == "dlr" and clean_logits.shape[-1] < 3:
    raise ValueError(f"the DLR loss needs at least 3 classes; the model has "
                     f"{clean_logits.shape[-1]}.")
  clean_correct = jnp.argmax(clean_logits, -1) == y
  attackable = mask & clean_correct
  key_rows, key_model = jax.random.split(key_attack)
  keys = _common.example_keys(key_rows, example_ids, x.shape[0])
  x_adv, fooled, info = _run_restarts(
      fn, x, y, None, keys, key_model, eps, rho, attackable, norm=norm, loss=loss,
      n_iter=n_iter, n_restarts=n_restarts, eot_iter=eot_iter, stochastic=stochastic,
      x_adv=x, fooled=jnp.zeros_like(attackable), info=_initial_info(x))
  _maybe_warn(info, attackable, f"APGD-{loss.upper()}", warn)
  return AttackResult(x_adv, fooled | ~clean_correct, info)


def target_classes(clean_logits: Array, n_target_classes: int) -> Array:
  """(n_target_classes, B) targets: the classes ranked 2nd, 3rd, ... by logit.

  As the reference, `sort(logits)[:, -r]` for r = 2 .. n_target_classes + 1
  (at a correctly classified point, rank 1 is the label itself).
  """
  order = jnp.argsort(clean_logits, axis=-1)
  num_classes = clean_logits.shape[-1]
  return jnp.stack([order[:, num_classes - r] for r in range(2, n_target_classes + 2)])


def apgd_targeted(logits_fn: Callable, x, y, key, *, eps: float, norm: str = "linf",
                  n_target_classes: int = 9, n_iter: int = 100, n_restarts: int = 1,
                  rho: float = 0.75, eot_iter: int = 1, mask=None,
                  stochastic: bool = False, warn: bool = True,
                  example_ids=None) -> AttackResult:
  """APGD-T: APGD on the targeted DLR loss (Eq. 7), one run per target class.

  Targets are the `n_target_classes` classes with the highest clean logits
  besides the top one (the reference's ranking), attacked in that order;
  each target runs `n_restarts` restarts on the points still robust.

  Args:
    logits_fn, x, y, key, eps, norm, n_iter, n_restarts, rho, eot_iter, mask,
    stochastic, warn: as in `apgd`.
    n_target_classes: number of target classes (9 in AutoAttack; at most
      num_classes - 1). The targeted DLR loss needs at least 4 classes.

  Returns:
    AttackResult as in `apgd`; info["loss_best"] compares targeted-DLR values
    across targets.
  """
  norm = _validate(x, y, eps, norm, n_iter, n_restarts, rho, eot_iter, mask)
  _checks.check_int("n_target_classes", n_target_classes, 1)
  fn, x, y, mask = _common.prepare(logits_fn, x, y, mask)
  key_clean, key_attack = jax.random.split(key)
  clean_logits = _common.predict(fn, x, key_clean, stochastic)
  num_classes = clean_logits.shape[-1]
  _common.check_labels_in_range(y, num_classes)
  if num_classes < 4:
    raise ValueError(f"the targeted DLR loss needs at least 4 classes; the model has "
                     f"{num_classes}.")
  _common.check_n_target_classes(n_target_classes, num_classes, "APGD-T")
  clean_correct = jnp.argmax(clean_logits, -1) == y
  attackable = mask & clean_correct
  targets = target_classes(clean_logits, n_target_classes)
  key_rows, key_model = jax.random.split(key_attack)
  keys = _common.example_keys(key_rows, example_ids, x.shape[0])
  x_adv, fooled, info = x, jnp.zeros_like(attackable), _initial_info(x)
  for t in range(n_target_classes):
    x_adv, fooled, info = _run_restarts(
        fn, x, y, targets[t], _common.fold_rows(keys, t), jax.random.fold_in(key_model, t),
        eps, rho, attackable,
        norm=norm, loss="dlr-targeted", n_iter=n_iter, n_restarts=n_restarts,
        eot_iter=eot_iter, stochastic=stochastic, x_adv=x_adv, fooled=fooled, info=info)
  _maybe_warn(info, attackable, "APGD-T", warn)
  return AttackResult(x_adv, fooled | ~clean_correct, info)


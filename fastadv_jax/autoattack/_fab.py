"""Targeted FAB (FAB-T), the minimum-norm attack of AutoAttack, Linf.

Croce & Hein 2020, "Minimally distorted adversarial examples with a fast
adaptive boundary attack" (FAB, Alg. 1 and Sec. 3.3), in the targeted form of
the AutoAttack paper (Sec. 4) and the reference implementation
(fra31/auto-attack `fab_pt.py`/`fab_base.py`, torchattacks `FAB` with
`multi_targeted=True`). Per iteration, with f = z_t - z_y linearized at x1:

  d1 = proj(x1), d2 = proj(x0): minimal Linf steps from the current point and
       from the original point onto {f(x1) + <grad f, z - x1> = 0} within [0, 1]^d;
  alpha = min(||d1|| / (||d1|| + ||d2||), alpha_max);
  x1 <- clip((1 - alpha)(x1 + eta d1) + alpha (x0 + eta d2), 0, 1);
  if x1 is misclassified: keep it when closer than the best so far, then step
  back towards x0: x1 <- x0 + beta (x1 - x0).

A point counts as fooled when the closest misclassified point found lies
within eps of x (Linf); otherwise it is returned unchanged. Defaults are the
published ones: alpha_max = 0.1, eta = 1.05, beta = 0.9, 100 iterations, no
random start in the first restart (random starts of radius eps/2 afterwards).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from fastadv_jax import _checks
from fastadv_jax.autoattack import _common
from fastadv_jax.autoattack._common import AttackResult
from fastadv_jax.autoattack._apgd import target_classes

Array = jax.Array

_NO_ADVERSARIAL = 1e10  # the reference's "not found yet" distance


def projection_linf(points: Array, w: Array, b: Array) -> Array:
  """Minimal-Linf step onto a hyperplane within the box [0, 1]^d.

  For each row: d minimizing ||d||_inf subject to <w, t + d> = b and
  0 <= t + d <= 1 (FAB, Sec. 3.2; a port of the reference `projection_linf`,
  with its bisection run on all rows instead of a selected subset). Where the
  hyperplane cannot be reached inside the box, d moves every coordinate with
  w_i != 0 to the box face in the direction that approaches it.

  Args:
    points: (N, D) points t.
    w: (N, D) hyperplane normals.
    b: (N,) offsets.
  Returns:
    (N, D) steps d.
  """
  t = points
  sign = jnp.where(jnp.sum(w * t, axis=1) - b >= 0, 1.0, -1.0)
  w = w * sign[:, None]
  b = b * sign
  nonzero = (w != 0).astype(t.dtype)
  a = (w < 0).astype(t.dtype)
  d = (a - t) * nonzero
  p = a - t * (2 * a - 1)  # distance from t to the face that d moves towards
  order = jnp.argsort(p, axis=1)

  b = b - jnp.sum(w * t, axis=1)
  b0 = jnp.sum(w * d, axis=1)

  order_desc = jnp.flip(order, axis=1)
  w_sorted = jnp.take_along_axis(w, order_desc, axis=1)
  bs2 = -w_sorted * jnp.take_along_axis(d, order_desc, axis=1)
  s = jnp.cumsum(jnp.abs(w_sorted), axis=1)
  sb = jnp.cumsum(bs2, axis=1) + b0[:, None]

  p_min = jnp.take_along_axis(p, order[:, :1], axis=1)[:, 0]
  b2 = sb[:, -1] - s[:, -1] * p_min
  c_l = b - b2 > 0
  c2 = (b - b0 > 0) & ~c_l

  num_features = w.shape[1]
  rows = jnp.arange(w.shape[0])

  def bisection_step(_, bounds):
    lb, ub = bounds
    mid = jnp.floor((lb + ub) / 2)
    mid_i = mid.astype(jnp.int32)
    ind = order[rows, num_features - 1 - mid_i]
    b2_mid = sb[rows, mid_i] - s[rows, mid_i] * p[rows, ind]
    go_up = b - b2_mid > 0
    return jnp.where(go_up, mid, lb), jnp.where(go_up, ub, mid)

  lb, _ = jax.lax.fori_loop(
      0, math.ceil(math.log2(num_features)), bisection_step,
      (jnp.zeros(w.shape[0], t.dtype), jnp.full(w.shape[0], num_features - 1, t.dtype)))
  lb_i = lb.astype(jnp.int32)

  def safe_ratio(num, den):
    # den = -(sum of |w| so far); 0 only for all-zero prefixes, where the row
    # is not selected (or the step is 0 anyway).
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)

  lambda_l = jnp.maximum(safe_ratio(b - sb[:, -1], -s[:, -1]), 0.0)[:, None]
  d_l = (2 * a - 1) * lambda_l
  lambda_2 = jnp.maximum(safe_ratio(b - sb[rows, lb_i], -s[rows, lb_i]), 0.0)[:, None]
  d_2 = jnp.minimum(lambda_2, d) * a + jnp.maximum(-lambda_2, d) * (1 - a)
  d = jnp.where(c_l[:, None], d_l, jnp.where(c2[:, None], d_2, d))
  return d * nonzero


def _random_start(x, key, eps):
  t = _common.uniform_noise(key, x.shape)
  t = t / _common.expand_to(_common.per_example_max_abs(t), t)
  # The reference scales by min(best distance, eps) / 2; at the start of a run
  # the best distance is "none found" (1e10), so eps / 2.
  return jnp.clip(x + 0.5 * jnp.asarray(eps, jnp.float32) * t, 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("n_iter", "stochastic"))
def _fab_targeted_run(fn, x, y, target, x_start, key, alpha_max, eta, beta, *, n_iter,
                      stochastic):
  """One FAB-T run towards `target` on the whole batch, from `x_start`.

  Returns:
    (x_best, distance): the closest misclassified point found and its Linf
    distance to x (`_NO_ADVERSARIAL` where none was found; x_best = x there).
  """
  batch = x.shape[0]
  x0 = x.reshape(batch, -1)
  x1 = x_start.reshape(batch, -1)

  def diff_and_grad(x1_flat, k):
    def total(x_flat):
      logits = _common.call_logits(fn, x_flat.reshape(x.shape), k, stochastic)
      diff = _common.take_label(logits, target) - _common.take_label(logits, y)
      return jnp.sum(diff), diff
    (_, diff), grad = jax.value_and_grad(total, has_aux=True)(x1_flat)
    return diff, grad

  def body(i, state):
    x1, x_best, distance = state
    # `key` only feeds a stochastic model (fresh randomness per forward pass).
    k_grad, k_pred = (jax.random.split(jax.random.fold_in(key, i)) if stochastic
                      else (None, None))
    diff, w = diff_and_grad(x1, k_grad)
    b = -diff + jnp.sum(w * x1, axis=1)
    steps = projection_linf(jnp.concatenate([x1, x0]), jnp.concatenate([w, w]),
                            jnp.concatenate([b, b]))
    d1, d2 = steps[:batch], steps[batch:]
    norms = jnp.maximum(jnp.max(jnp.abs(steps), axis=1), 1e-8)
    a1, a2 = norms[:batch], norms[batch:]
    alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
    x1 = jnp.clip((x1 + eta * d1) * (1 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)

    logits = _common.call_logits(fn, x1.reshape(x.shape), k_pred, stochastic)
    is_adv = jnp.argmax(logits, -1) != y
    dist = jnp.max(jnp.abs(x1 - x0), axis=1)
    closer = is_adv & (dist < distance)
    x_best = jnp.where(closer[:, None], x1, x_best)
    distance = jnp.where(closer, dist, distance)
    x1 = jnp.where(is_adv[:, None], x0 + (x1 - x0) * beta, x1)
    return x1, x_best, distance

  init = (x1, x0, jnp.full((batch,), _NO_ADVERSARIAL, jnp.float32))
  _, x_best, distance = jax.lax.fori_loop(0, n_iter, body, init)
  return x_best.reshape(x.shape), distance


def fab_targeted(logits_fn: Callable, x, y, key, *, eps: float, norm: str = "linf",
                 n_target_classes: int = 9, n_iter: int = 100, n_restarts: int = 1,
                 alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 mask=None, stochastic: bool = False) -> AttackResult:
  """FAB-T (Linf): targeted FAB against the top `n_target_classes` other classes.

  Targets are ranked by clean logit as in `apgd_targeted`; for each target,
  `n_restarts` runs (the first from x, later ones from random points at Linf
  distance eps/2) attack the points still robust.

  Args:
    logits_fn, x, y, key, eps, mask, stochastic: as in `apgd`.
    norm: "linf" only (FAB-T L2/L1 are not implemented).
    n_target_classes: 9 in AutoAttack (at most num_classes - 1).
    n_iter: FAB iterations per run (100 in AutoAttack).
    n_restarts: runs per target (1 in AutoAttack "standard").
    alpha_max, eta, beta: FAB's step bias cap, overshoot and backward step.

  Returns:
    AttackResult(x_adv, fooled, info) with info = {"distance": (B,) Linf norm of
    the closest misclassified point found over all targets (inf where none)}.
    x_adv is that point where it lies within eps, else x.
  """
  _common.check_eps(eps)
  norm = _common.canonical_norm(norm)
  if norm != "linf":
    raise ValueError(f"fab_targeted supports norm 'linf' only, got {norm!r}.")
  _common.check_inputs(x, y, mask)
  _checks.check_int("n_iter", n_iter, 1)
  _checks.check_int("n_restarts", n_restarts, 1)
  _checks.check_int("n_target_classes", n_target_classes, 1)
  for name, value in (("alpha_max", alpha_max), ("eta", eta), ("beta", beta)):
    _checks.check_positive(name, value)
  fn, x, y, mask = _common.prepare(logits_fn, x, y, mask)
  key_clean, key_attack = jax.random.split(key)
  clean_logits = _common.predict(fn, x, key_clean, stochastic)
  num_classes = clean_logits.shape[-1]
  _common.check_labels_in_range(y, num_classes)
  _common.check_n_target_classes(n_target_classes, num_classes, "FAB-T")
  clean_correct = jnp.argmax(clean_logits, -1) == y
  attackable = mask & clean_correct
  targets = target_classes(clean_logits, n_target_classes)

  x_adv, fooled = x, jnp.zeros_like(attackable)
  best_distance = jnp.full((x.shape[0],), jnp.inf, jnp.float32)
  for t in range(n_target_classes):
    for restart in range(n_restarts):
      active = attackable & ~fooled
      if not _common.any_concrete(active):
        break
      key_start, key_model = jax.random.split(
          jax.random.fold_in(jax.random.fold_in(key_attack, t), restart))
      # The first run starts at x, later ones at random points (reference).
      x_start = x if restart == 0 else _random_start(x, key_start, eps)
      x_found, distance = _fab_targeted_run(
          fn, x, y, targets[t], x_start, key_model, _common.scalar(alpha_max),
          _common.scalar(eta), _common.scalar(beta),
          n_iter=n_iter, stochastic=stochastic)
      found = active & (distance < _NO_ADVERSARIAL)
      best_distance = jnp.where(found, jnp.minimum(best_distance, distance), best_distance)
      # Accepted only within the eps-ball, as the reference's `res > eps` check.
      newly_fooled = found & (distance <= eps)
      x_adv = jnp.where(_common.expand_to(newly_fooled, x), x_found, x_adv)
      fooled = fooled | newly_fooled
  return AttackResult(x_adv, fooled | ~clean_correct, {"distance": best_distance})

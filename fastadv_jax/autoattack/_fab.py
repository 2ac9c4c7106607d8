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
from typing import Callable

import jax
import jax.numpy as jnp

from fastadv_jax import _checks
from fastadv_jax.autoattack import _common
from fastadv_jax.autoattack._common import AttackResult
from fastadv_jax.autoattack._apgd import target_classes

Array = jax.Array

_NO_ADVERSARIAL = 1e10  # the reference's "not found yet" distance


# Bisection steps on the step length in `projection_linf`: 2^-40 of the search
# interval is below float32 resolution, so the bracket ends at adjacent floats.
_BISECTION_STEPS = 40


def projection_linf(points: Array, w: Array, b: Array) -> Array:
  """Minimal-Linf step onto a hyperplane within the box [0, 1]^d.

  For each row: d minimizing ||d||_inf subject to <w, t + d> = b and
  0 <= t + d <= 1 (FAB, Sec. 3.2; the reference `projection_linf`). Where the
  hyperplane cannot be reached inside the box, d moves every coordinate with
  w_i != 0 to the box face in the direction that approaches it.

  The reference sorts the coordinates by their distance p_i to the box face
  and bisects over the sorted order for the step length lambda solving
  G(lambda) = sum_i |w_i| min(p_i, lambda) = r (G is piecewise linear and
  increasing). Here the bisection runs on lambda itself, O(d) per step with no
  sort (a sort of 3072 floats per row costs far more on XLA:CPU), and ends
  with the reference's closed form on the final linear piece:
  lambda = (r - sum_{p_i <= lo} |w_i| p_i) / sum_{p_i > lo} |w_i|, exact once
  the bracket [lo, hi] holds no breakpoint below lambda.

  Args:
    points: (N, D) points t.
    w: (N, D) hyperplane normals.
    b: (N,) offsets.
  Returns:
    (N, D) steps d.
  """
  t = points
  wt = jnp.sum(w * t, axis=1)
  sign = jnp.where(wt - b >= 0, 1.0, -1.0)
  w = w * sign[:, None]
  r = (wt - b) * sign  # >= 0: how far <w, .> must decrease
  nonzero = (w != 0).astype(t.dtype)
  a = (w < 0).astype(t.dtype)
  d = (a - t) * nonzero
  p = a - t * (2 * a - 1)  # distance from t to the face that d moves towards
  aw = jnp.abs(w)
  total_w = jnp.sum(aw, axis=1)
  reach = jnp.sum(aw * p, axis=1)  # G(max p): the decrease moving all the way
  p_min = jnp.min(p, axis=1)
  c_l = total_w * p_min > r            # solution below every breakpoint
  c2 = (reach > r) & ~c_l               # reachable: bisection

  def g(lam):
    return jnp.sum(aw * jnp.minimum(p, lam[:, None]), axis=1)

  def bisection_step(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    above = g(mid) > r
    return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

  lo, _ = jax.lax.fori_loop(0, _BISECTION_STEPS, bisection_step,
                            (p_min, jnp.max(p, axis=1)))
  saturated = p <= lo[:, None]
  free_w = jnp.sum(jnp.where(saturated, 0.0, aw), axis=1)
  rest = r - jnp.sum(jnp.where(saturated, aw * p, 0.0), axis=1)

  def safe_ratio(num, den):
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)

  lambda_l = jnp.maximum(safe_ratio(r, total_w), 0.0)[:, None]
  d_l = (2 * a - 1) * lambda_l
  lambda_2 = jnp.maximum(safe_ratio(rest, free_w), 0.0)[:, None]
  d_2 = jnp.minimum(lambda_2, d) * a + jnp.maximum(-lambda_2, d) * (1 - a)
  d = jnp.where(c_l[:, None], d_l, jnp.where(c2[:, None], d_2, d))
  return d * nonzero


def _random_start(x, keys, eps):
  """x + eps/2 * t / ||t||_inf, t ~ U[-1, 1]^d per row (row b from keys[b])."""
  t = _common.row_uniform(keys, x.shape[1:])
  t = t / _common.expand_to(_common.per_example_max_abs(t), t)
  # The reference scales by min(best distance, eps) / 2; at the start of a run
  # the best distance is "none found" (1e10), so eps / 2.
  return jnp.clip(x + 0.5 * jnp.asarray(eps, jnp.float32) * t, 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("stochastic", "length"))
def _fab_chunk(fn, x, y, target, key, alpha_max, eta, beta, state, i0, *, stochastic, length):
  """FAB-T iterations i0 .. i0 + length - 1 on the whole batch (state: x1, x_best, distance)."""
  batch = x.shape[0]
  x0 = x.reshape(batch, -1)

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

  return _common.iterate(body, state, i0, length)


def _fab_targeted_run(fn, x, y, target, x_start, key, alpha_max, eta, beta, *, n_iter,
                      stochastic):
  """One FAB-T run towards `target` on the whole batch, from `x_start`.

  The iterations run in compiled chunks (`_common.loop_chunks`, as APGD's).

  Returns:
    (x_best, distance): the closest misclassified point found and its Linf
    distance to x (`_NO_ADVERSARIAL` where none was found; x_best = x there).
  """
  batch = x.shape[0]
  state = (x_start.reshape(batch, -1), x.reshape(batch, -1),
           jnp.full((batch,), _NO_ADVERSARIAL, jnp.float32))
  chunks = _common.loop_chunks(n_iter)
  for i0, length in chunks:
    state = _fab_chunk(fn, x, y, target, key, alpha_max, eta, beta, state, jnp.int32(i0),
                       stochastic=stochastic, length=length)
    _common.tick(length, wait_for=state[2])
  _, x_best, distance = state
  return x_best.reshape(x.shape), distance


def fab_targeted(logits_fn: Callable, x, y, key, *, eps: float, norm: str = "linf",
                 n_target_classes: int = 9, n_iter: int = 100, n_restarts: int = 1,
                 alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 mask=None, stochastic: bool = False, example_ids=None) -> AttackResult:
  """FAB-T (Linf): targeted FAB against the top `n_target_classes` other classes.

  Targets are ranked by clean logit as in `apgd_targeted`; for each target,
  `n_restarts` runs (the first from x, later ones from random points at Linf
  distance eps/2) attack the points still robust.

  Args:
    logits_fn, x, y, key, eps, mask, stochastic, example_ids: as in `apgd`.
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
  key_rows, key_model_all = jax.random.split(key_attack)
  clean_logits = _common.predict(fn, x, key_clean, stochastic)
  num_classes = clean_logits.shape[-1]
  _common.check_labels_in_range(y, num_classes)
  _common.check_n_target_classes(n_target_classes, num_classes, "FAB-T")
  clean_correct = jnp.argmax(clean_logits, -1) == y
  attackable = mask & clean_correct
  targets = target_classes(clean_logits, n_target_classes)

  keys = _common.example_keys(key_rows, example_ids, x.shape[0])
  params = (_common.scalar(alpha_max), _common.scalar(eta), _common.scalar(beta))

  x_adv, fooled = x, jnp.zeros_like(attackable)
  best_distance = jnp.full((x.shape[0],), jnp.inf, jnp.float32)
  for t in range(n_target_classes):
    for restart in range(n_restarts):
      active = attackable & ~fooled
      if not _common.any_concrete(active):
        _common.tick(n_iter * (n_restarts - restart))
        break
      _common.report_active(active)
      key_model = jax.random.fold_in(jax.random.fold_in(key_model_all, t), restart)

      def step(active, x, y, target, keys, state, restart=restart, key_model=key_model):
        x_adv, fooled, best_distance = state
        # The first run starts at x, later ones at random points (reference).
        x_start = (x if restart == 0 else
                   _random_start(x, _common.fold_rows(_common.fold_rows(keys, t), restart), eps))
        x_found, distance = _fab_targeted_run(
            fn, x, y, target, x_start, key_model, *params, n_iter=n_iter,
            stochastic=stochastic)
        found = active & (distance < _NO_ADVERSARIAL)
        best_distance = jnp.where(found, jnp.minimum(best_distance, distance), best_distance)
        # Accepted only within the eps-ball, as the reference's `res > eps` check.
        newly_fooled = found & (distance <= eps)
        x_adv = jnp.where(_common.expand_to(newly_fooled, x), x_found, x_adv)
        return x_adv, fooled | newly_fooled, best_distance

      x_adv, fooled, best_distance = _common.on_active_rows(
          step, active, (x, y, targets[t], keys), (x_adv, fooled, best_distance))
  _common.report_active(attackable & ~fooled)
  return AttackResult(x_adv, fooled | ~clean_correct, {"distance": best_distance})

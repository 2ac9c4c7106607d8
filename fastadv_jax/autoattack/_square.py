"""Square Attack (Linf), the score-based black-box attack of AutoAttack.

Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack: a
query-efficient black-box adversarial attack via random search", Alg. 1 and
Alg. 2 (Linf), following the reference implementation (fra31/auto-attack
`square.py`, torchattacks `Square`):

* start at vertical stripes: x + eps * s, s in {-1, +1} per (column, channel);
* each query proposes, per example, a random square of side
  h = max(round(sqrt(p * H * W)), 1) at a random position, whose pixels move
  to the other side of the ball (+-2 eps per channel, random signs), then
  projects onto the ball and the box; the proposal is kept when it lowers the
  margin loss z_y - max_{j != y} z_j (or misclassifies);
* p follows the published piecewise-constant schedule: p_init halved after
  10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 iterations (with
  `rescale_schedule`, the iteration counter is first rescaled to 10000
  queries, as torchattacks' default; AutoAttack itself uses
  `resc_schedule=False`).

Differences from the reference, on purpose: square positions and colours are
drawn per example (the Square Attack paper's algorithm; the reference draws one
square for the whole batch per query), and the loop runs on the full batch with
a mask of points still to fool, in compiled calls of `QUERIES_PER_CALL`
queries; between calls the points still to fool are packed into a smaller
bucketed batch (the reference drops fooled points at every query).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import _checks
from fastadv_jax.autoattack import _common
from fastadv_jax.autoattack._common import AttackResult

Array = jax.Array

LOSSES = ("margin", "ce")

_P_SCHEDULE_BOUNDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(n_queries: int, p_init: float = 0.8, rescale: bool = False) -> np.ndarray:
  """(n_queries,) fraction p of pixels changed at each iteration (reference `p_selection`)."""
  p = np.empty(n_queries, np.float64)
  for i in range(n_queries):
    it = int(i / n_queries * 10000) if rescale else i
    halvings = sum(it > bound for bound in _P_SCHEDULE_BOUNDS)
    p[i] = p_init / 2 ** halvings
  return p


def square_sizes(n_queries: int, height: int, width: int, p_init: float = 0.8,
                 rescale: bool = False) -> np.ndarray:
  """(n_queries,) side of the square at each iteration: max(round(sqrt(p H W)), 1)."""
  p = p_schedule(n_queries, p_init, rescale)
  return np.array([max(int(round(np.sqrt(pi * height * width))), 1) for pi in p], np.int32)


def _margin_and_loss(logits, y, loss):
  z_y = _common.take_label(logits, y)
  onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
  z_other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
  margin = z_y - z_other
  if loss == "margin":
    return margin, margin
  ce = -jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y]
  return margin, -ce


def _stripes(x, keys):
  """(B, 1, W, C) random signs: the vertical-stripe initialization (row b from keys[b])."""
  return jnp.sign(_common.row_uniform(keys, (1,) + x.shape[2:]))


# Queries per compiled call: between calls the driver packs the points still to
# fool into a smaller bucket (the reference drops fooled points every query).
QUERIES_PER_CALL = 100


@functools.partial(jax.jit, static_argnames=("loss", "stochastic"))
def _square_init(fn, x, y, stripes, key, eps, *, loss, stochastic):
  """The vertical-stripe start and its margin/loss."""
  x_best = jnp.clip(x + jnp.asarray(eps, jnp.float32) * stripes, 0.0, 1.0)
  k = jax.random.fold_in(key, -1) if stochastic else None
  margin, loss_value = _margin_and_loss(_common.call_logits(fn, x_best, k, stochastic), y, loss)
  return x_best, margin, loss_value


@functools.partial(jax.jit, static_argnames=("n_queries", "p_init", "rescale", "loss",
                                             "stochastic"))
def _square_chunk(fn, x, y, keys, key, eps, active, state, i0, i_end, *, n_queries, p_init,
                  rescale, loss, stochastic):
  """Square iterations i0 .. i_end - 1 (fewer once every active point is fooled).

  state: (x_best, margin_min, loss_min, queries); returns (the iteration
  reached, state).
  """
  batch, height, width, channels = x.shape
  eps = jnp.asarray(eps, jnp.float32)
  sizes = jnp.asarray(square_sizes(n_queries, height, width, p_init, rescale))
  rows = jnp.arange(height)[None, :, None, None]
  cols = jnp.arange(width)[None, None, :, None]

  def evaluate(x_eval, i):
    k = jax.random.fold_in(key, i) if stochastic else None
    return _margin_and_loss(_common.call_logits(fn, x_eval, k, stochastic), y, loss)

  # Random bits per example and query (square position, per-channel signs),
  # drawn for the whole block at once: query i of row b from fold_in(keys[b], i).
  block = jnp.asarray(i0, jnp.int32) + jnp.arange(QUERIES_PER_CALL, dtype=jnp.int32)
  all_bits = jax.vmap(lambda k: jax.vmap(
      lambda i: jax.random.bits(jax.random.fold_in(k, i), (2 + channels,), jnp.uint32))(block)
                      )(keys)  # (B, QUERIES_PER_CALL, 2 + C)

  def cond(carry):
    i, (_, margin_min, _, _) = carry
    return (i < i_end) & jnp.any(active & (margin_min > 0))

  def body(carry):
    i, (x_best, margin_min, loss_min, queries) = carry
    s = sizes[i]
    bits = jax.lax.dynamic_index_in_dim(all_bits, i - i0, axis=1, keepdims=False)
    # Uniform over {0, ..., H - s - 1} as the reference's random_int(0, h - s)
    # (0 when the square covers the whole side); the modulo bias is < 1e-8.
    top = (bits[:, 0] % jnp.maximum(height - s, 1).astype(jnp.uint32)).astype(jnp.int32)
    left = (bits[:, 1] % jnp.maximum(width - s, 1).astype(jnp.uint32)).astype(jnp.int32)
    colours = jnp.where(bits[:, 2:] >> 31 == 1, 1.0, -1.0)[:, None, None, :]
    in_square = ((rows >= top[:, None, None, None]) & (rows < top[:, None, None, None] + s)
                 & (cols >= left[:, None, None, None]) & (cols < left[:, None, None, None] + s))
    x_new = x_best + jnp.where(in_square, 2.0 * eps * colours, 0.0)
    x_new = jnp.clip(jnp.clip(x_new, x - eps, x + eps), 0.0, 1.0)
    margin, loss_new = evaluate(x_new, i)

    to_fool = active & (margin_min > 0)
    improved = loss_new < loss_min
    loss_min = jnp.where(to_fool & improved, loss_new, loss_min)
    accept = to_fool & (improved | (margin <= 0))
    margin_min = jnp.where(accept, margin, margin_min)
    x_best = jnp.where(accept[:, None, None, None], x_new, x_best)
    return i + 1, (x_best, margin_min, loss_min, queries + to_fool.astype(jnp.int32))

  return jax.lax.while_loop(cond, body, (jnp.asarray(i0, jnp.int32), state))


def _square_run(fn, x, y, keys, key, eps, active, *, n_queries, p_init, rescale, loss,
                stochastic):
  """One Square Attack run; returns (x_best, fooled, margin_min, queries per example).

  Runs `QUERIES_PER_CALL` queries per compiled call; between calls only the
  points still to fool go on, packed into a bucketed batch (when concrete).
  """
  statics = dict(loss=loss, stochastic=stochastic)
  x_best, margin_min, loss_min = _square_init(fn, x, y, _stripes(x, keys), key, eps, **statics)
  # Queries count the initial evaluation, as the reference's n_queries.
  state = (x_best, margin_min, loss_min, jnp.where(active, 1, 0).astype(jnp.int32))
  i = 0
  while i < n_queries:
    to_fool = active & (state[1] > 0)
    if not _common.any_concrete(to_fool):
      break
    _common.report_active(to_fool)
    # Blocks start at multiples of QUERIES_PER_CALL (one compiled program).
    i_end = min((i // QUERIES_PER_CALL + 1) * QUERIES_PER_CALL, n_queries)
    reached = []

    def step(to_fool, x, y, keys, state, i0=i, i_end=i_end):
      i_reached, state = _square_chunk(
          fn, x, y, keys, key, eps, to_fool, state, jnp.int32(i0), jnp.int32(i_end),
          n_queries=n_queries, p_init=p_init, rescale=rescale, **statics)
      reached.append(i_reached)
      return state

    state = _common.on_active_rows(step, to_fool, (x, y, keys), state)
    i_next = int(reached[0]) if not _common.is_traced(reached[0]) else i_end
    _common.tick(i_next - i)
    i = i_next if i_next > i else i_end
  _common.tick(n_queries - i)
  x_best, margin_min, _, queries = state
  # Final decision by argmax, as the reference re-evaluates its output.
  logits = _common.predict(
      fn, x_best, jax.random.fold_in(key, n_queries + 1) if stochastic else None, stochastic)
  fooled = jnp.argmax(logits, -1) != y
  return x_best, fooled, margin_min, queries


def square(logits_fn: Callable, x, y, key, *, eps: float, norm: str = "linf",
           n_queries: int = 5000, n_restarts: int = 1, p_init: float = 0.8,
           loss: str = "margin", rescale_schedule: bool = False, mask=None,
           stochastic: bool = False, example_ids=None) -> AttackResult:
  """Untargeted Square Attack, Linf (Andriushchenko et al. 2020, Alg. 1-2).

  Only forward passes of `logits_fn` are used. Each restart attacks the points
  still robust.

  Args:
    logits_fn, y, key, eps, mask, stochastic, example_ids: as in `apgd`.
    x: (B, H, W, C) images in [0, 1] (NHWC: squares are spatial).
    norm: "linf" only (the L2 variant is not implemented).
    n_queries: iterations (queries after the initial one) per restart; 5000 in
      AutoAttack.
    n_restarts: restarts (1 in AutoAttack).
    p_init: initial fraction of pixels changed (0.8).
    loss: "margin" (z_y - max_{j != y} z_j, AutoAttack's choice) or "ce" (-CE).
    rescale_schedule: rescale the p schedule to n_queries (torchattacks' default
      True; fra31's AutoAttack uses False, the default here).

  Returns:
    AttackResult(x_adv, fooled, info) with info = {"margin": (B,) smallest
    margin reached in the last restart that attacked the point (inf for points
    not attacked), "queries": (B,) int, model queries spent on the point in
    that restart (including the initial one; 0 where not attacked)}.
  """
  _common.check_eps(eps)
  norm = _common.canonical_norm(norm)
  if norm != "linf":
    raise ValueError(f"square supports norm 'linf' only, got {norm!r}.")
  _common.check_inputs(x, y, mask)
  if np.ndim(x) != 4:
    raise ValueError(f"square needs NHWC images (B, H, W, C), got shape {np.shape(x)}.")
  _checks.check_int("n_queries", n_queries, 1)
  _checks.check_int("n_restarts", n_restarts, 1)
  _checks.check_in_range("p_init", p_init, 0.0, 1.0, low_open=True)
  if loss not in LOSSES:
    raise ValueError(f"Unknown Square loss {loss!r}; choose one of {list(LOSSES)}.")
  fn, x, y, mask = _common.prepare(logits_fn, x, y, mask)
  key_clean, key_attack = jax.random.split(key)
  key_rows, key_model = jax.random.split(key_attack)
  keys = _common.example_keys(key_rows, example_ids, x.shape[0])
  clean_logits = _common.predict(fn, x, key_clean, stochastic)
  _common.check_labels_in_range(y, clean_logits.shape[-1])
  clean_correct = jnp.argmax(clean_logits, -1) == y
  attackable = mask & clean_correct

  x_adv, fooled = x, jnp.zeros_like(attackable)
  margin = jnp.full((x.shape[0],), jnp.inf, jnp.float32)
  queries = jnp.zeros((x.shape[0],), jnp.int32)
  for restart in range(n_restarts):
    active = attackable & ~fooled
    if not _common.any_concrete(active):
      break
    x_found, fooled_run, margin_run, n_used = _square_run(
        fn, x, y, _common.fold_rows(keys, restart),
        jax.random.fold_in(key_model, restart), _common.scalar(eps), active,
        n_queries=n_queries, p_init=float(p_init), rescale=bool(rescale_schedule),
        loss=loss, stochastic=stochastic)
    newly_fooled = active & fooled_run
    x_adv = jnp.where(_common.expand_to(newly_fooled, x), x_found, x_adv)
    fooled = fooled | newly_fooled
    margin = jnp.where(active, margin_run, margin)
    queries = jnp.where(active, n_used, queries)
  return AttackResult(x_adv, fooled | ~clean_correct, {"margin": margin, "queries": queries})

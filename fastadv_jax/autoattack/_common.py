"""Shared pieces of the AutoAttack attacks: result type, model calls, checks.

Conventions every attack in this package follows:

* An attack is a function `attack(logits_fn, x, y, key, *, eps, ..., mask=None)`
  returning an `AttackResult(x_adv, fooled, info)`. `x_adv` holds the
  adversarial point where the attack fooled the model and the clean `x`
  elsewhere (as `perturb` does in fra31/auto-attack); `fooled[i]` says that the
  model misclassifies `x_adv[i]` (points already misclassified at `x` count as
  fooled, with `x_adv[i] = x[i]`).
* `mask` (bool, (B,)) selects the points to attack; the others are returned
  unchanged. Called eagerly, each target, restart (and block of Square
  queries) runs on the points still to fool only, packed into a batch of a
  bucketed size (`compact_rows`), as the reference attacks only those; under
  an outer jit the whole batch runs, masked. Every random draw of a point
  comes from its own key (`row_keys`, from `example_ids`), so packing, batch
  and position never change a point's result. The ensemble packs the points
  still robust the same way between attacks.
* `logits_fn(x) -> logits` is the model, passed *into* the jitted loops as an
  argument. A pytree closure (`closures.eval_logits_fn(model, variables)`, or a
  `jax.tree_util.Partial`) makes its arrays arguments of the compiled loops,
  which are reused for another checkpoint of the same architecture; a plain
  Python callable works too (`closures.as_pytree` wraps it in an argument-free
  `Partial`, static for jit), but its captured arrays are baked into the
  compiled program as constants (slow to compile for large models, and a new
  closure recompiles). A `stochastic=True` attack calls `logits_fn(x, key)`
  with a fresh key per forward pass (randomized defenses).
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import _checks, attacks, closures, xla_cpu

Array = jax.Array

NORMS = attacks.NORMS  # one spelling: "linf", "l2"


class AttackResult(NamedTuple):
  """What every attack of this package returns.

  Attributes:
    x_adv: (B, ...) float32. The adversarial example where `fooled`, `x` elsewhere.
    fooled: (B,) bool. The model misclassifies `x_adv` (argmax != y), as seen by
      the attack's own forward passes; True for points misclassified at `x`.
    info: dict of per-example diagnostics, attack-specific (see each attack).
  """
  x_adv: Array
  fooled: Array
  info: dict


# ---------------------------------------------------------------------------
# Model calls.

def call_logits(fn: Callable, x: Array, key: Optional[Array], stochastic: bool) -> Array:
  """`fn(x)` (or `fn(x, key)` for a stochastic model) as float32 logits."""
  logits = fn(x, key) if stochastic else fn(x)
  return jnp.asarray(logits).astype(jnp.float32)


def _predict(fn, x, key, stochastic):
  return call_logits(fn, x, key, stochastic)


predict = jax.jit(_predict, static_argnames=("stochastic",))
"""Jitted `logits_fn(x)`; `predict(closures.as_pytree(f), x, key, stochastic)`."""


# Random draws: every random number of an example comes from its own key
# (`row_keys`), drawn by small shared jitted functions (a threefry draw is
# costly to compile on CPU; this way the attacks reuse one compiled draw per
# batch shape).

@jax.jit
def row_keys(key: Array, ids: Array) -> Array:
  """(B,) keys `fold_in(key, ids[b])`: one key per example.

  The attacks draw every random number of an example (start point, Square's
  squares) from its own key, so an example's result depends on the model, the
  key and its id only: not on the batch it was run in, its position there or
  the padding (the ensemble's bucketed compaction relies on this).
  """
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(ids, jnp.uint32))


def example_keys(key: Array, example_ids, batch: int) -> Array:
  """(B,) per-example keys: `row_keys(key, example_ids)` (default ids 0..B-1).

  Pass the points' indices in a larger set (e.g. the test set) as
  `example_ids` and a point's random draws no longer depend on the batch it
  is attacked in.
  """
  if example_ids is None:
    example_ids = np.arange(batch)
  if np.shape(example_ids) != (batch,):
    raise ValueError(f"example_ids must have shape (B,) = ({batch},), got "
                     f"{np.shape(example_ids)}.")
  return row_keys(key, example_ids)


@jax.jit
def fold_rows(keys: Array, data) -> Array:
  """(B,) keys `fold_in(keys[b], data)`."""
  return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


@functools.partial(jax.jit, static_argnames=("shape",))
def row_uniform(keys: Array, shape: tuple) -> Array:
  """(B, *shape) U[-1, 1], row b drawn from keys[b] alone."""
  return jax.vmap(lambda k: jax.random.uniform(k, shape, jnp.float32, -1.0, 1.0))(keys)


def row_normal(keys: Array, shape: tuple) -> Array:
  """(B, *shape) N(0, 1) per row, by inverse CDF of `row_uniform`."""
  u = jnp.maximum(row_uniform(keys, shape), jnp.nextafter(jnp.float32(-1), jnp.float32(0)))
  return jnp.sqrt(jnp.float32(2)) * jax.scipy.special.erfinv(u)


# ---------------------------------------------------------------------------
# Iteration loops.
#
# On XLA:CPU a convolution's input gradient inside a while-loop body runs
# 2-2.5x slower than the same computation at the top level of a program (its
# transposed kernel is not canonicalized for the Eigen kernel there; see
# jax-ml/jax#12868; measured on the single-layer CNN: 0.20 vs 0.09 ms per
# example and iteration). The gradient attacks therefore run their iterations
# in chunks of `UNROLL` iterations, one compiled chunk called from a Python
# loop (asynchronous dispatch: the state stays on the device and the host
# never waits between chunks), unrolled when the iteration convolves
# (`xla_cpu.unroll_loop`). 5 rather than 10: the same speed (APGD, 64 rows,
# 100 iterations: 0.88 s either way, 1.0 s with 1) and 1.4 s less compilation
# per batch shape. On other backends one call runs the whole loop
# (`lax.fori_loop`).

UNROLL = 5


def loop_chunks(n_iter: int) -> list[tuple[int, int]]:
  """[(first iteration, length), ...] for an `n_iter`-iteration loop.

  CPU: chunks of `UNROLL` iterations and one shorter remainder (at most two
  compiled lengths); other backends: one chunk.
  """
  if jax.default_backend() != "cpu":
    return [(0, n_iter)]
  return [(i0, min(UNROLL, n_iter - i0)) for i0 in range(0, n_iter, UNROLL)]


def iterate(body: Callable, state, i0, length: int):
  """`length` iterations `state = body(i, state)` for i = i0, i0 + 1, ...

  Call inside a jitted function: unrolled where `xla_cpu.unroll_loop` says
  so, a `fori_loop` otherwise.
  """
  if xla_cpu.unroll_loop(body, i0, state):
    for j in range(length):
      state = body(i0 + j, state)
    return state
  return jax.lax.fori_loop(i0, i0 + length, body, state)


# ---------------------------------------------------------------------------
# Compaction: attack only the rows still to fool, in bucketed shapes.
#
# Every row of every attack is independent of the others (per-example keys,
# per-example losses), so the rows still to fool can be gathered into a smaller
# batch, attacked, and scattered back with the same result. The smaller batch
# has a bucketed number of rows: powers of two and 1.5x powers of two (8, 12,
# 16, 24, 32, 48, ...), so padding wastes at most a third of a batch (powers of
# two alone waste up to half: 44 points in a 64-row batch) while a handful of
# shapes, each compiled once, serve every batch.

MIN_BUCKET = 8


def bucket_size(n: int, cap: int) -> int:
  """The smallest bucket (8, 12, 16, 24, 32, 48, ...) >= n, at most `cap`."""
  size = MIN_BUCKET
  while size < n:
    if size * 3 // 2 >= n and (size * 3) % 2 == 0:
      size = size * 3 // 2
      break
    size *= 2
  return min(size, cap)


def compact_rows(active) -> Optional[tuple[np.ndarray, np.ndarray]]:
  """(gather rows, scatter rows) packing the True rows of `active` into a bucket.

  Returns None when packing saves nothing (the bucket is the whole batch) or
  `active` is traced (under an outer jit the shapes cannot shrink). Padding
  rows repeat the first active row when gathered and point past the end of the
  batch when scattered (dropped).
  """
  if is_traced(active):
    return None
  active = np.asarray(active)
  batch = active.shape[0]
  rows = np.flatnonzero(active)
  size = bucket_size(rows.size, batch)
  if size >= batch or rows.size == 0:
    return None
  pad = size - rows.size
  gather = np.concatenate([rows, np.full(pad, rows[0], rows.dtype)]).astype(np.int32)
  scatter = np.concatenate([rows, np.full(pad, batch, rows.dtype)]).astype(np.int32)
  return gather, scatter


@jax.jit
def gather_rows(tree, rows):
  """tree[rows] for every leaf (rows along axis 0)."""
  return jax.tree_util.tree_map(lambda a: a[rows], tree)


@jax.jit
def scatter_rows(tree, rows, values):
  """tree.at[rows].set(values) for every leaf; rows == len(leaf) are dropped."""
  return jax.tree_util.tree_map(lambda a, v: a.at[rows].set(v, mode="drop"), tree, values)


def on_active_rows(step: Callable, active, full_args: tuple, state):
  """`state = step(*args, state)` on the rows of `active` only.

  `full_args` and `state` are pytrees of (B, ...) arrays (None leaves allowed);
  `step(active, *args, state) -> state` works on any batch size. The rows not
  in `active` keep their state.
  """
  packing = compact_rows(active)
  if packing is None:
    return step(active, *full_args, state)
  gather, scatter = packing
  valid = np.arange(gather.size) < int(np.sum(np.asarray(active)))
  sub_args, sub_state = gather_rows((full_args, state), gather)
  sub_state = step(jnp.asarray(valid), *sub_args, sub_state)
  return scatter_rows(state, scatter, sub_state)


# ---------------------------------------------------------------------------
# Progress: the ensemble opens a bar per stage; the attacks report into it.


class _Progress:
  """A tqdm bar of one attack stage: iterations done, points still robust."""

  def __init__(self, bar, robust_elsewhere: int):
    self.bar = bar
    self.robust_elsewhere = robust_elsewhere  # robust points outside the running batch
    # For run-time estimates: when the first iterations ended (their compilation
    # included) and how many iterations ran after them.
    self.first_tick = None
    self.ticks_after_first = 0

  def tick(self, n: int, wait_for=None) -> None:
    if wait_for is not None:
      jax.block_until_ready(wait_for)  # so the bar follows the computation
    if self.first_tick is None:
      self.first_tick = time.perf_counter()
    else:
      self.ticks_after_first += n
    self.bar.update(n)

  def steady_seconds(self) -> Optional[float]:
    """The stage's time without its first iterations (compilation), scaled to
    all its iterations; None before two ticks."""
    if self.first_tick is None or not self.ticks_after_first:
      return None
    per_iteration = (time.perf_counter() - self.first_tick) / self.ticks_after_first
    return per_iteration * self.bar.total

  def robust(self, active_in_batch: int) -> None:
    self.bar.set_postfix(robust=self.robust_elsewhere + int(active_in_batch), refresh=False)


# Per thread: with several devices each device's driver runs in its own
# thread (`fastadv_jax.device_shards`) with its own bars.
_PROGRESS = threading.local()


def _open_reporters() -> list:
  if not hasattr(_PROGRESS, "stack"):
    _PROGRESS.stack = []
  return _PROGRESS.stack


def progress():
  """The innermost open progress reporter of this thread, or None."""
  stack = _open_reporters()
  return stack[-1] if stack else None


class progress_bar:  # pylint: disable=invalid-name
  """Context manager: a tqdm bar (`total` iterations) the attacks report into."""

  def __init__(self, total: int, desc: str, robust: int, enabled: bool = True,
               position: int | None = None):
    self.enabled = enabled
    self.args = dict(total=total, desc=desc, unit="it", leave=True, dynamic_ncols=True,
                     position=position)
    self.robust = robust
    self.reporter = None

  def __enter__(self):
    if not self.enabled:
      return None
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    self.reporter = _Progress(tqdm(**self.args), 0)
    self.reporter.bar.set_postfix(robust=self.robust)
    _open_reporters().append(self.reporter)
    return self.reporter

  def __exit__(self, *exc):
    if self.reporter is not None:
      _open_reporters().remove(self.reporter)
      self.reporter.bar.close()
    return False


def duration(seconds: float) -> str:
  """12 s, 3.4 min, 1.2 h: a run-time estimate for a person."""
  if seconds < 90:
    return f"{seconds:.0f} s"
  if seconds < 5400:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


def write(message: str) -> None:
  """Prints `message` above any open progress bars."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  tqdm.write(message)


def tick(n: int, wait_for=None) -> None:
  """Reports `n` iterations done (waits for `wait_for` only when a bar is open)."""
  reporter = progress()
  if reporter is not None and not is_traced(wait_for):
    reporter.tick(n, wait_for)


def report_active(active) -> None:
  """Reports the points of the running batch still to fool (concrete only)."""
  reporter = progress()
  if reporter is not None and not is_traced(active):
    reporter.robust(int(np.sum(np.asarray(active))))


def is_traced(*values: Any) -> bool:
  return any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(values))


def take_label(logits: Array, labels: Array) -> Array:
  return jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def per_example_max_abs(delta: Array) -> Array:
  return jnp.max(jnp.abs(delta.reshape(delta.shape[0], -1)), axis=-1)


def per_example_l2(delta: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.square(delta.reshape(delta.shape[0], -1)), axis=-1))


def expand_to(v: Array, x: Array) -> Array:
  """(B,) -> (B, 1, ..., 1) broadcastable against x."""
  return v.reshape((v.shape[0],) + (1,) * (x.ndim - 1))


# ---------------------------------------------------------------------------
# Boundary checks (concrete values only; traced values pass, per DESIGN.md).

def canonical_norm(norm: Any, allowed=NORMS) -> str:
  """'Linf'/'linf'/'L2'/'l2' -> 'linf'/'l2' (the spelling of `attacks.NORMS`); anything else raises."""
  lookup = {n.lower(): n for n in allowed}
  if not isinstance(norm, str) or norm.lower() not in lookup:
    raise ValueError(f"Unknown norm {norm!r}; choose one of {list(allowed)}.")
  return lookup[norm.lower()]


def check_eps(eps: Any) -> None:
  if eps is None:
    raise ValueError("eps must be given (a float in (0, 1], pixel units).")
  _checks.check_eps(eps)
  _checks.check_positive("eps", eps)




def check_inputs(x: Any, y: Any, mask: Any = None) -> None:
  """Images in [0, 1] with a batch axis; integer labels (B,); optional mask (B,)."""
  _checks.check_images(x)
  if np.ndim(y) != 1:
    raise ValueError(f"y must be a vector of integer labels (B,), got shape {np.shape(y)}.")
  _checks.check_same_batch("x", x, "y", y)
  y_dtype = y.dtype if hasattr(y, "dtype") else np.asarray(y).dtype
  if not jnp.issubdtype(y_dtype, jnp.integer):
    raise ValueError(f"y must hold integer class labels, got dtype {y_dtype}.")
  if mask is not None:
    if np.shape(mask) != (np.shape(x)[0],):
      raise ValueError(
          f"mask must have shape (B,) = ({np.shape(x)[0]},), got {np.shape(mask)}.")


def check_labels_in_range(y: Any, num_classes: int) -> None:
  if is_traced(y):
    return
  arr = np.asarray(y)
  if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
    raise ValueError(
        f"labels y must lie in [0, {num_classes - 1}] (the model has {num_classes} "
        f"classes); they span [{arr.min()}, {arr.max()}].")


def check_n_target_classes(n_target_classes: int, num_classes: int, what: str) -> None:
  _checks.check_int("n_target_classes", n_target_classes, 1)
  if n_target_classes > num_classes - 1:
    raise ValueError(
        f"{what}: n_target_classes={n_target_classes} but the model has only "
        f"{num_classes} classes, so at most {num_classes - 1} target classes exist.")


def prepare(logits_fn, x, y, mask):
  """Common conversion: pytree closure, float32 images, int32 labels, bool mask."""
  fn = closures.as_pytree(logits_fn)
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y).astype(jnp.int32)
  mask = jnp.ones(x.shape[0], bool) if mask is None else jnp.asarray(mask, bool)
  return fn, x, y, mask


def scalar(value) -> Array:
  """A float32 scalar with a fixed (strong) type, so jitted loops never
  recompile between Python floats and arrays."""
  return jnp.asarray(value, jnp.float32)


def any_concrete(v: Array) -> bool:
  """`bool(jnp.any(v))` when concrete; True (keep going) when traced."""
  if is_traced(v):
    return True
  return bool(np.any(np.asarray(v)))

"""Tests for fastadv_jax.autoattack: APGD(-T), FAB-T, Square and the ensemble.

Every model here is one function, `toy_model(params, x)`, bound with
`jax.tree_util.Partial`: a linear model (optionally with quantized inputs or a
softmax on top), so that every attack compiles once for the whole module and
the worst case over the Linf ball and the box has a closed form:

  min over ||d||_inf <= eps, 0 <= x + d <= 1 of  (w_y - w_j) . (x + d) + b_y - b_j
  is attained at x + d = clip(x - eps * sign(w_y - w_j), 0, 1).
"""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from jax.tree_util import Partial

from fastadv_jax import autoattack as aa
from fastadv_jax import closures
from fastadv_jax.autoattack import _apgd, _fab, checks

SHAPE = (4, 4, 3)
DIM = int(np.prod(SHAPE))
NUM_CLASSES = 5
BATCH = 8
EPS = 0.05
N_ITER = 10
N_QUERIES = 100
N_TARGETS = NUM_CLASSES - 1
KEY = jax.random.key(0)


def toy_model(params, x):
  flat = x.reshape(x.shape[0], -1)
  levels = params["levels"]
  # Quantized inputs (levels > 0): a step function, zero gradient everywhere.
  flat = jnp.where(levels > 0, jnp.round(flat * levels) / jnp.maximum(levels, 1.0), flat)
  logits = flat @ params["w"] + params["b"]
  return jnp.where(params["softmax"] > 0, jax.nn.softmax(logits), logits)


def make_model(w, b, levels=0.0, softmax=0.0):
  params = dict(w=jnp.asarray(w, jnp.float32), b=jnp.asarray(b, jnp.float32),
                levels=jnp.float32(levels), softmax=jnp.float32(softmax))
  return Partial(toy_model, params)


def worst_margins(x, y, w, b, eps):
  """(B, K) closed-form worst-case margins z_y - z_j over the ball and the box (inf at j = y)."""
  xf = np.asarray(x, np.float64).reshape(len(x), -1)
  w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
  eps = np.reshape(np.asarray(eps, np.float64), (-1, 1, 1))      # scalar or per example
  v = w[:, y].T[:, :, None] - w[None, :, :]                      # (B, D, K)
  x_worst = np.clip(xf[:, :, None] - eps * np.sign(v), 0.0, 1.0)
  m = np.sum(v * x_worst, axis=1) + b[y][:, None] - b[None, :]
  m[np.arange(len(y)), y] = np.inf
  return m


def min_distance(x, y, w, b, target):
  """(B,) smallest Linf radius at which z_target can reach z_y (bisection, box included)."""
  lo, hi = np.zeros(len(x)), np.ones(len(x))
  reachable = worst_margins(x, y, w, b, 1.0)[np.arange(len(x)), target] <= 0
  for _ in range(60):
    mid = (lo + hi) / 2
    m = worst_margins(x, y, w, b, mid)
    below = m[np.arange(len(x)), target] <= 0
    hi, lo = np.where(below, mid, hi), np.where(below, lo, mid)
  return np.where(reachable, hi, np.inf)


def margin_of(model, x, y):
  z = np.asarray(model(jnp.asarray(x)), np.float64)
  z_y = z[np.arange(len(y)), y]
  z[np.arange(len(y)), y] = -np.inf
  return z_y - z.max(-1)


def assert_in_ball_and_box(x_adv, x, eps, norm="linf"):
  x_adv, x = np.asarray(x_adv), np.asarray(x)
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  delta = (x_adv - x).reshape(len(x), -1)
  size = np.abs(delta).max(1) if norm == "linf" else np.sqrt((delta ** 2).sum(1))
  assert np.all(size <= eps + 1e-6), size.max()


def centre_boundary(rng, w, b):
  """Shifts b[1] so that the 0-vs-1 boundary passes through the middle of the data."""
  x = rng.uniform(0, 1, (256, DIM))
  b = np.array(b, np.float64)
  b[1] += np.median(x @ (w[:, 0] - w[:, 1]) + b[0] - b[1])
  return b


def select_points(rng, w, b, n_foolable, n_robust, clear=0.3, eps=EPS, low=0.0, high=1.0):
  """Points labelled by the model whose closed-form foolability is far from the border.

  A point is kept as foolable when it is foolable at 0.8 eps with worst margin
  below -clear, as robust when it is robust at 1.25 eps with margin above clear.
  """
  x_f, x_r = [], []
  for _ in range(100):
    x = rng.uniform(low, high, (64,) + SHAPE)
    y = np.argmax(x.reshape(64, -1) @ w + b, -1)
    m_in = worst_margins(x, y, w, b, 0.8 * eps).min(1)
    m_out = worst_margins(x, y, w, b, 1.25 * eps).min(1)
    x_f = (x_f + list(x[m_in < -clear]))[:n_foolable]
    x_r = (x_r + list(x[m_out > clear]))[:n_robust]
    if len(x_f) == n_foolable and len(x_r) == n_robust:
      break
  else:
    raise RuntimeError(f"found only {len(x_f)} foolable and {len(x_r)} robust points")
  x = np.stack(x_f + x_r).astype(np.float32)
  y = np.argmax(x.reshape(len(x), -1).astype(np.float64) @ w + b, -1).astype(np.int32)
  return x, y


@pytest.fixture(scope="module")
def binary():
  """Linear model where only classes 0 and 1 matter (the others sit at -1000)."""
  rng = np.random.default_rng(0)
  w = rng.normal(size=(DIM, NUM_CLASSES))
  b = np.array([0.0, 0.5, -1000.0, -1000.0, -1000.0])
  x, y = select_points(rng, w, b, BATCH // 2, BATCH // 2)
  return make_model(w, b), w, b, x, y


@pytest.fixture(scope="module")
def multiclass():
  """Linear 5-class model on 16 points: 6 foolable, 6 robust, 4 misclassified at x."""
  rng = np.random.default_rng(1)
  w = rng.normal(size=(DIM, NUM_CLASSES)) * 0.5
  b = rng.normal(size=NUM_CLASSES)
  x, y = select_points(rng, w, b, 6, 6, clear=0.1)
  x_wrong = rng.uniform(0, 1, (4,) + SHAPE).astype(np.float32)
  y_wrong = (np.argmax(x_wrong.reshape(4, -1) @ w + b, -1) + 1) % NUM_CLASSES
  x = np.concatenate([x, x_wrong])
  y = np.concatenate([y, y_wrong]).astype(np.int32)
  return make_model(w, b), w, b, x, y


@pytest.fixture(scope="module")
def multiclass_result(multiclass):
  model, _, _, x, y = multiclass
  with warnings.catch_warnings():
    warnings.simplefilter("error", checks.AutoAttackWarning)  # a clean model: no warnings
    return aa.autoattack(model, x, y, KEY, eps=EPS, n_iter=N_ITER, n_target_classes=N_TARGETS,
                         n_queries=N_QUERIES, batch_size=BATCH)


# ---------------------------------------------------------------------------
# Schedules.

def test_apgd_checkpoints_match_reference():
  is_checkpoint, ks = aa.checkpoint_schedule(100)
  assert list(np.flatnonzero(is_checkpoint)) == [21, 40, 56, 69, 79, 86, 92, 98]
  assert list(ks[is_checkpoint]) == [22, 19, 16, 13, 10, 7, 6, 6]


def test_square_p_schedule():
  p = aa.p_schedule(5000, 0.8)
  assert p[10] == 0.8 and p[11] == 0.4 and p[50] == 0.4 and p[51] == 0.2
  assert p[4999] == 0.8 / 128
  rescaled = aa.p_schedule(5000, 0.8, rescale=True)  # counter doubled for 5000 queries
  assert rescaled[5] == 0.8 and rescaled[6] == 0.4 and rescaled[4999] == 0.8 / 512


# ---------------------------------------------------------------------------
# FAB's projection: a minimum-Linf step onto a hyperplane within the box.

def test_projection_linf_is_the_minimal_feasible_step():
  rng = np.random.default_rng(0)
  n, d = 12, 6
  t = rng.uniform(0, 1, (n, d))
  w = rng.normal(size=(n, d))
  w[0, :3] = 0.0  # some coordinates that cannot help
  target = rng.uniform(0, 1, (n, d))  # a feasible point: the hyperplane meets the box
  b = np.sum(w * target, 1)
  steps = np.asarray(jax.jit(aa.projection_linf)(
      jnp.asarray(t, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)),
      np.float64)
  for i in range(n):
    # LP: min s  s.t.  -s <= d_j <= s,  w . d = b - w . t,  0 <= t + d <= 1.
    c = np.r_[np.zeros(d), 1.0]
    a_ub = np.block([[np.eye(d), -np.ones((d, 1))], [-np.eye(d), -np.ones((d, 1))]])
    lp = scipy.optimize.linprog(
        c, A_ub=a_ub, b_ub=np.zeros(2 * d), A_eq=np.r_[w[i], 0.0][None],
        b_eq=[b[i] - w[i] @ t[i]], bounds=[(-t[i, j], 1 - t[i, j]) for j in range(d)] + [(0, None)])
    assert lp.status == 0
    np.testing.assert_allclose(np.abs(steps[i]).max(), lp.fun, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w[i] @ (t[i] + steps[i]), b[i], atol=1e-4)
    assert np.all(t[i] + steps[i] >= -1e-6) and np.all(t[i] + steps[i] <= 1 + 1e-6)


# ---------------------------------------------------------------------------
# Single attacks on linear models, against the closed form.

def test_apgd_ce_reaches_the_linear_worst_case(binary):
  model, w, b, x, y = binary
  result = aa.apgd(model, x, y, KEY, eps=EPS, n_iter=N_ITER)
  closed_form = worst_margins(x, y, w, b, EPS).min(1)
  assert np.any(closed_form < 0) and np.any(closed_form > 0)
  np.testing.assert_array_equal(np.asarray(result.fooled), closed_form < 0)
  # The highest-loss point is the worst case: sign(grad) is exact for a linear model.
  np.testing.assert_allclose(margin_of(model, result.info["x_best"], y), closed_form, atol=1e-4)
  assert_in_ball_and_box(result.x_adv, x, EPS)
  assert_in_ball_and_box(result.info["x_best"], x, EPS)
  fooled = np.asarray(result.fooled)
  assert np.all(margin_of(model, result.x_adv, y)[fooled] < 0)
  np.testing.assert_array_equal(np.asarray(result.x_adv)[~fooled], x[~fooled])
  assert not np.any(np.asarray(result.info["zero_grad"]))


def test_apgd_step_size_halves_at_every_checkpoint_without_progress(binary):
  # On a linear model the first step reaches the worst case and the loss stays
  # flat, so every checkpoint halves the step (Condition 1): for N_ITER = 10
  # the checkpoints are i = 1, ..., 9, and eta = 2 eps / 2^9 at the end.
  model, _, _, x, y = binary
  result = aa.apgd(model, x, y, KEY, eps=EPS, n_iter=N_ITER)
  is_checkpoint, _ = aa.checkpoint_schedule(N_ITER)
  robust = ~np.asarray(result.fooled)
  np.testing.assert_allclose(np.asarray(result.info["step_size"])[robust],
                             2 * EPS / 2 ** is_checkpoint.sum(), rtol=1e-6)


def test_apgd_matches_the_torchattacks_trajectory():
  """Same model, same random start: APGD-DLR's best losses agree with torchattacks'."""
  torch = pytest.importorskip("torch")
  torchattacks = pytest.importorskip("torchattacks")
  rng = np.random.default_rng(1)
  batch, hidden, eps, n_iter = 16, 32, 0.03, 100
  w1, b1 = rng.normal(size=(DIM, hidden)) * 0.5, rng.normal(size=hidden) * 0.1
  w2 = rng.normal(size=(hidden, NUM_CLASSES + 1)) * 0.5
  # Nonlinear, so that the step-size rule acts on a non-trivial loss trajectory.
  model = Partial(_mlp, tuple(jnp.asarray(a, jnp.float32) for a in (w1, b1, w2)))

  class TorchMLP(torch.nn.Module):
    def forward(self, x):  # NCHW in; the weights' rows follow NHWC order
      flat = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
      h = torch.tanh(flat @ torch.tensor(w1, dtype=torch.float32)
                     + torch.tensor(b1, dtype=torch.float32))
      return h @ torch.tensor(w2, dtype=torch.float32)

  x = rng.uniform(0.2, 0.8, (batch,) + SHAPE).astype(np.float32)
  y = np.argmax(np.asarray(model(jnp.asarray(x))), -1).astype(np.int32)
  u = rng.uniform(-1, 1, (batch,) + SHAPE).astype(np.float32)
  start = np.clip(x + eps * u / np.abs(u.reshape(batch, -1)).max(1)[:, None, None, None], 0, 1)
  _, robust, loss_best, _, _, _ = _apgd._apgd_run(
      model, jnp.asarray(x), jnp.asarray(y), None, jnp.asarray(start), KEY, jnp.float32(eps),
      jnp.float32(0.75), norm="linf", loss="dlr", n_iter=n_iter, eot_iter=1, stochastic=False)

  attack = torchattacks.APGD(TorchMLP(), norm="Linf", eps=eps, steps=n_iter, loss="dlr")
  rand, torch.rand = torch.rand, lambda *a, **k: torch.tensor((u.transpose(0, 3, 1, 2) + 1) / 2)
  try:  # torchattacks draws its start with torch.rand: hand it ours
    _, t_robust, t_loss_best, _ = attack.attack_single_run(
        torch.tensor(x.transpose(0, 3, 1, 2)).contiguous(), torch.tensor(y).long())
  finally:
    torch.rand = rand
  assert 0 < t_robust.numpy().mean() < 1
  np.testing.assert_allclose(np.asarray(loss_best), t_loss_best.numpy(), rtol=1e-4, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(robust), t_robust.numpy())


def _mlp(params, x):
  w1, b1, w2 = params
  return jnp.tanh(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2


def test_apgd_l2_reaches_the_linear_worst_case(binary):
  model, w, b, _, _ = binary
  rng = np.random.default_rng(3)
  x = rng.uniform(0.4, 0.6, (BATCH,) + SHAPE).astype(np.float32)  # the box stays inactive
  y = np.argmax(x.reshape(BATCH, -1) @ w + b, -1).astype(np.int32)
  eps = 0.1
  v = w[:, y].T - w[:, 1 - y].T
  closed_form = np.sum(v * x.reshape(BATCH, -1), 1) + b[y] - b[1 - y] - eps * np.linalg.norm(v, axis=1)
  result = aa.apgd(model, x, y, KEY, eps=eps, norm="l2", n_iter=N_ITER)
  np.testing.assert_allclose(margin_of(model, result.info["x_best"], y), closed_form,
                             atol=2e-3 * np.abs(closed_form).max())
  np.testing.assert_array_equal(np.asarray(result.fooled), closed_form < 0)
  assert_in_ball_and_box(result.x_adv, x, eps, norm="l2")


def test_fab_targeted_finds_the_minimal_distance(binary):
  model, w, b, x, y = binary
  result = aa.fab_targeted(model, x, y, KEY, eps=EPS, n_target_classes=1, n_iter=N_ITER)
  d_min = min_distance(x, y, w, b, 1 - y)
  distance = np.asarray(result.info["distance"])
  # Never closer than the true minimum, and close to it (overshoot eta = 1.05 at most).
  assert np.all(distance >= d_min - 1e-5)
  assert np.all(distance <= 1.05 * d_min + 1e-5)
  np.testing.assert_array_equal(np.asarray(result.fooled), d_min <= EPS)
  assert_in_ball_and_box(result.x_adv, x, EPS)


def test_square_reaches_a_channelwise_linear_worst_case():
  # With weights constant over space, the worst case is a constant colour per
  # channel, which Square's squares can reach.
  rng = np.random.default_rng(2)
  w = np.broadcast_to(rng.normal(size=(1, 1, 3, NUM_CLASSES)), SHAPE + (NUM_CLASSES,))
  w = w.reshape(DIM, NUM_CLASSES) * 0.3
  b = centre_boundary(rng, w, [0.0, 0.0, -1000.0, -1000.0, -1000.0])
  x, y = select_points(rng, w, b, BATCH // 2, BATCH // 2, clear=0.05)
  model = make_model(w, b)
  result = aa.square(model, x, y, KEY, eps=EPS, n_queries=N_QUERIES)
  closed_form = worst_margins(x, y, w, b, EPS).min(1)
  np.testing.assert_array_equal(np.asarray(result.fooled), closed_form < 0)
  # Random search cannot beat the optimum.
  assert np.all(np.asarray(result.info["margin"]) >= closed_form - 1e-4)
  assert_in_ball_and_box(result.x_adv, x, EPS)
  assert np.all(np.asarray(result.info["queries"]) <= N_QUERIES + 1)


def test_apgd_targeted_and_masks(multiclass):
  model, w, b, x, y = multiclass
  # 3 foolable, 2 robust, 3 misclassified points: the batch shape of the others.
  x, y = x[[0, 1, 2, 6, 7, 12, 13, 14]], y[[0, 1, 2, 6, 7, 12, 13, 14]]
  mask = np.arange(len(x)) % 2 == 0
  result = aa.apgd_targeted(model, x, y, KEY, eps=EPS, n_target_classes=N_TARGETS,
                            n_iter=N_ITER, mask=mask)
  clean_wrong = np.argmax(np.asarray(model(jnp.asarray(x))), -1) != y
  fooled = np.asarray(result.fooled)
  foolable = worst_margins(x, y, w, b, EPS).min(1) < 0
  np.testing.assert_array_equal(fooled[~mask], clean_wrong[~mask])  # left alone
  np.testing.assert_array_equal(np.asarray(result.x_adv)[~mask], x[~mask])
  assert np.all(foolable[fooled & ~clean_wrong])  # only what the closed form allows
  assert np.all(margin_of(model, result.x_adv, y)[fooled] < 0)
  assert_in_ball_and_box(result.x_adv, x, EPS)


def test_attack_loops_do_not_recompile(binary):
  model, _, _, x, y = binary
  aa.apgd(model, x, y, KEY, eps=EPS, n_iter=N_ITER)
  before = _apgd._apgd_chunk._cache_size()
  aa.apgd(model, x, y, jax.random.key(7), eps=0.03, n_iter=N_ITER, mask=y == 0)
  aa.apgd(model, jnp.asarray(x), jnp.asarray(y), KEY, eps=jnp.float32(0.02), n_iter=N_ITER)
  assert _apgd._apgd_chunk._cache_size() == before


def test_rolled_and_unrolled_loops_give_the_same_attack(multiclass, monkeypatch):
  """APGD and FAB on a convolutional model: their chunks unrolled or rolled
  (`xla_cpu.unroll_loop`) give the same attack."""
  from fastadv_jax import models, xla_cpu  # pylint: disable=g-import-not-at-top
  _, _, _, x, y = multiclass
  model = models.get_model("simple_cnn", filters=4, num_classes=NUM_CLASSES)
  logits_fn = closures.eval_logits_fn(model, models.init_variables(model, KEY, SHAPE))
  attacks = lambda: (aa.apgd(logits_fn, x, y, KEY, eps=EPS, n_iter=N_ITER),
                     aa.fab_targeted(logits_fn, x, y, KEY, eps=EPS, n_iter=N_ITER,
                                     n_target_classes=1))
  chunks = (_apgd._apgd_chunk, _fab._fab_chunk)
  decisions = []

  def decide(decision):
    def unroll_loop(body, *args):
      decisions.append(decision)
      return decision
    monkeypatch.setattr(xla_cpu, "unroll_loop", unroll_loop)
    for chunk in chunks:  # the decision is taken when a chunk is traced
      chunk.clear_cache()

  decide(True)
  unrolled = attacks()
  decide(False)
  rolled = attacks()
  for chunk in chunks:
    chunk.clear_cache()
  assert True in decisions and False in decisions
  for got, want in zip(rolled, unrolled):
    np.testing.assert_array_equal(got.fooled, want.fooled)
    np.testing.assert_allclose(got.x_adv, want.x_adv, atol=1e-6)


def test_apgd_is_traceable_under_jit(binary):
  model, _, _, x, y = binary
  eager = aa.apgd(model, x, y, KEY, eps=EPS, n_iter=N_ITER)
  jitted = jax.jit(lambda x: aa.apgd(model, x, y, KEY, eps=EPS, n_iter=N_ITER))(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(jitted.fooled), np.asarray(eager.fooled))
  np.testing.assert_allclose(np.asarray(jitted.x_adv), np.asarray(eager.x_adv), atol=1e-6)


class LinearNet(nn.Module):
  """The toy model's linear case as a Linen module (eval-mode closures)."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))


def test_closure_types_give_the_same_attack(binary):
  """A `closures.LogitsFn`, a `Partial` and a plain callable: one result; a
  second checkpoint of the same module reuses the compiled loop."""
  model, w, b, x, y = binary
  variables = {"params": {"Dense_0": {"kernel": jnp.asarray(w, jnp.float32),
                                      "bias": jnp.asarray(b, jnp.float32)}}}
  logits_fn = closures.eval_logits_fn(LinearNet(), variables)
  np.testing.assert_allclose(logits_fn(x), model(x), rtol=1e-5, atol=1e-4)
  reference = aa.apgd(model, x, y, KEY, eps=EPS, n_iter=N_ITER)
  before = _apgd._apgd_chunk._cache_size()
  for fn in (logits_fn, lambda z: logits_fn(z)):
    result = aa.apgd(fn, x, y, KEY, eps=EPS, n_iter=N_ITER)
    np.testing.assert_array_equal(np.asarray(result.fooled), np.asarray(reference.fooled))
    np.testing.assert_allclose(np.asarray(result.x_adv), np.asarray(reference.x_adv),
                               atol=1e-6)
  compiled = _apgd._apgd_chunk._cache_size()
  assert compiled > before
  other = closures.eval_logits_fn(LinearNet(), jax.tree_util.tree_map(
      lambda v: 2 * v, variables))
  aa.apgd(other, x, y, KEY, eps=EPS, n_iter=N_ITER)
  assert _apgd._apgd_chunk._cache_size() == compiled


# ---------------------------------------------------------------------------
# The ensemble.

def test_autoattack_finds_exactly_the_foolable_points(multiclass, multiclass_result):
  model, w, b, x, y = multiclass
  result = multiclass_result
  clean_correct = np.argmax(np.asarray(model(jnp.asarray(x))), -1) == y
  foolable = worst_margins(x, y, w, b, EPS).min(1) < 0
  np.testing.assert_array_equal(result.clean_correct, clean_correct)
  np.testing.assert_array_equal(result.robust, clean_correct & ~foolable)
  assert 0 < result.robust.sum() < clean_correct.sum() < len(x)


def test_autoattack_result_is_consistent(multiclass, multiclass_result):
  model, _, _, x, y = multiclass
  result = multiclass_result
  accuracies = list(result.robust_accuracy.values())
  assert list(result.robust_accuracy) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
  assert result.stages == tuple(result.robust_accuracy)
  assert accuracies[0] == pytest.approx(result.clean_correct.mean())
  assert all(a >= b for a, b in zip(accuracies, accuracies[1:]))  # never exceeds clean
  assert accuracies[-1] == pytest.approx(result.robust.mean())
  assert not np.any(result.robust & ~result.clean_correct)
  assert_in_ball_and_box(result.x_adv, x, EPS)
  broken = result.clean_correct & ~result.robust
  assert np.all(margin_of(model, result.x_adv, y)[broken] < 0)
  np.testing.assert_array_equal(np.asarray(result.x_adv)[~broken], x[~broken])
  np.testing.assert_array_equal(result.stage_fooled == -1, result.robust)
  np.testing.assert_array_equal(result.stage_fooled == 0, ~result.clean_correct)
  for stage, name in enumerate(result.stages):
    assert result.robust_accuracy[name] == pytest.approx(np.mean(
        (result.stage_fooled == -1) | (result.stage_fooled > stage)))


def test_autoattack_same_seed_same_result(multiclass, multiclass_result):
  model, _, _, x, y = multiclass
  again = aa.autoattack(model, x, y, KEY, eps=EPS, n_iter=N_ITER, n_target_classes=N_TARGETS,
                        n_queries=N_QUERIES, batch_size=BATCH)
  np.testing.assert_array_equal(np.asarray(again.x_adv), np.asarray(multiclass_result.x_adv))
  np.testing.assert_array_equal(again.stage_fooled, multiclass_result.stage_fooled)
  assert again.robust_accuracy == multiclass_result.robust_accuracy


# ---------------------------------------------------------------------------
# Compaction: every stage, target, restart and block of Square queries runs on
# the points still to fool only, packed into bucketed shapes.

def test_bucket_sizes():
  from fastadv_jax.autoattack import _common
  sizes = [_common.bucket_size(n, 10 ** 6) for n in range(1, 1000)]
  assert sizes[:8] == [8] * 8
  assert all(s >= n for n, s in zip(range(1, 1000), sizes))
  assert all(s <= max(8, 1.5 * n) for n, s in zip(range(1, 1000), sizes))  # waste < 1/3
  assert np.all(np.diff(sizes) >= 0) and len(set(sizes)) <= 16  # few shapes
  assert _common.bucket_size(200, 100) == 100  # capped at the batch size


def test_chunking_and_compaction_do_not_change_results(multiclass, multiclass_result):
  """One chunk of 16, chunks of 8 (the fixture) and a subset with its ids: the
  same per-point result (x_adv, stage), every point in the ball and the box."""
  model, _, _, x, y = multiclass
  common = dict(eps=EPS, n_iter=N_ITER, n_target_classes=N_TARGETS, n_queries=N_QUERIES)
  whole = aa.autoattack(model, x, y, KEY, batch_size=None, **common)
  for other in (whole,):
    np.testing.assert_array_equal(other.robust, multiclass_result.robust)
    np.testing.assert_array_equal(other.stage_fooled, multiclass_result.stage_fooled)
    np.testing.assert_allclose(np.asarray(other.x_adv), np.asarray(multiclass_result.x_adv),
                               atol=1e-6)
  assert_in_ball_and_box(whole.x_adv, x, EPS)
  ids = np.array([13, 2, 7, 0, 9, 5])
  sub = aa.autoattack(model, x[ids], y[ids], KEY, batch_size=4, example_ids=ids, **common)
  np.testing.assert_array_equal(sub.robust, whole.robust[ids])
  np.testing.assert_array_equal(sub.stage_fooled, whole.stage_fooled[ids])
  np.testing.assert_allclose(np.asarray(sub.x_adv), np.asarray(whole.x_adv)[ids], atol=1e-6)


def test_devices_split_the_points_without_changing_results(multiclass, multiclass_result,
                                                           monkeypatch):
  """Three devices, one driver thread each on its share of the points: the same
  per-point result as one device, and the arrays of each share on its device."""
  from fastadv_jax import device_shards
  model, _, _, x, y = multiclass
  devices = device_shards.resolve_devices(3)
  seen = []
  run_on_devices = device_shards.run_on_devices

  def recording(driver, points, devs):
    def spying(shard, device, position):
      seen.append((device, jnp.zeros(()).devices()))
      return driver(shard, device, position)
    return run_on_devices(spying, points, devs)

  monkeypatch.setattr(device_shards, "run_on_devices", recording)
  split = aa.autoattack(model, x, y, KEY, eps=EPS, n_iter=N_ITER, n_target_classes=N_TARGETS,
                        n_queries=N_QUERIES, batch_size=BATCH, num_devices=3)
  assert sorted(str(d) for d, _ in seen) == sorted(str(d) for d in devices)
  assert all(placed == {device} for device, placed in seen)
  np.testing.assert_array_equal(split.stage_fooled, multiclass_result.stage_fooled)
  np.testing.assert_array_equal(np.asarray(split.x_adv), np.asarray(multiclass_result.x_adv))
  assert split.robust_accuracy == multiclass_result.robust_accuracy
  with pytest.raises(ValueError, match="num_devices=99"):
    aa.autoattack(model, x, y, KEY, eps=EPS, num_devices=99)


@pytest.mark.parametrize("attack", ["apgd-t", "fab-t", "square"])
def test_packed_attack_equals_the_full_batch(multiclass, attack, monkeypatch):
  """Each target/restart/query block runs on the points still to fool, packed
  into a smaller bucket; without packing (the whole batch, masked, as under an
  outer jit): the same result."""
  from fastadv_jax.autoattack import _common
  model, _, _, x, y = multiclass
  x = np.concatenate([x, x[:8]])  # 24 points: packing into 8 or 12 rows saves work
  y = np.concatenate([y, y[:8]])
  if attack == "apgd-t":
    run = lambda: aa.apgd_targeted(model, x, y, KEY, eps=EPS, n_iter=N_ITER,
                                   n_target_classes=N_TARGETS, warn=False)
  elif attack == "fab-t":
    run = lambda: aa.fab_targeted(model, x, y, KEY, eps=EPS, n_iter=N_ITER,
                                  n_target_classes=N_TARGETS, n_restarts=2)
  else:
    run = lambda: aa.square(model, x, y, KEY, eps=EPS, n_queries=N_QUERIES, n_restarts=2)
  packings = []
  compact_rows = _common.compact_rows

  def recording(active):
    packing = compact_rows(active)
    packings.append(packing)
    return packing

  monkeypatch.setattr(_common, "compact_rows", recording)
  packed = run()
  assert any(p is not None and p[0].size < len(x) for p in packings)  # it did pack
  monkeypatch.setattr(_common, "compact_rows", lambda active: None)
  full = run()
  np.testing.assert_array_equal(np.asarray(packed.fooled), np.asarray(full.fooled))
  np.testing.assert_allclose(np.asarray(packed.x_adv), np.asarray(full.x_adv), atol=1e-6)
  assert_in_ball_and_box(packed.x_adv, x, EPS)
  assert 0 < np.mean(np.asarray(packed.fooled)) < 1


def test_ensemble_does_not_recompile_within_a_bucket(multiclass, multiclass_result):
  """Chunks of 8 only ever use 8-row buckets: other points and keys reuse the
  compiled attack loops."""
  from fastadv_jax.autoattack import _fab, _square
  del multiclass_result  # compiled the 8-row programs
  model, _, _, x, y = multiclass
  loops = (_apgd._apgd_init, _apgd._apgd_chunk, _fab._fab_chunk, _square._square_chunk)
  before = [f._cache_size() for f in loops]
  order = np.random.default_rng(3).permutation(len(x))
  aa.autoattack(model, x[order], y[order], jax.random.key(5), eps=EPS, n_iter=N_ITER,
                n_target_classes=N_TARGETS, n_queries=N_QUERIES, batch_size=BATCH,
                checks=False)
  assert [f._cache_size() for f in loops] == before


def test_autoattack_progress_bars(multiclass, capsys):
  model, _, _, x, y = multiclass
  result = aa.autoattack(model, x, y, KEY, eps=EPS, n_iter=N_ITER, n_target_classes=N_TARGETS,
                         n_queries=N_QUERIES, batch_size=BATCH, progress=True, checks=False)
  captured = capsys.readouterr()
  err = captured.err
  for stage, name in enumerate(("APGD-CE", "APGD-T", "FAB-T", "SQUARE"), start=1):
    assert f"{name} ({stage}/4)" in err
  # A run-time estimate after every stage but the last.
  for name in ("APGD-CE", "APGD-T", "FAB-T"):
    assert re.search(rf"points robust after {name}; about \d+ s left if they all stay "
                     rf"robust", captured.out)
  assert "robust=" in err
  assert f"robust={int(result.robust.sum())}" in err


def test_rand_version_with_a_stochastic_model(multiclass):
  model, _, _, x, y = multiclass

  def noisy(x, key):
    return model(x) + 0.01 * jax.random.normal(key, (x.shape[0], NUM_CLASSES))

  with warnings.catch_warnings():
    warnings.simplefilter("error", checks.RandomizedDefenseWarning)  # "rand" skips that check
    result = aa.autoattack(noisy, x, y, KEY, eps=EPS, version="rand", attacks_to_run=["apgd-ce"],
                           n_iter=N_ITER, eot_iter=2, batch_size=BATCH, stochastic=True)
  assert list(result.robust_accuracy) == ["clean", "apgd-ce"]
  assert_in_ball_and_box(result.x_adv, x, EPS)
  assert not np.any(result.robust & ~result.clean_correct)
  assert result.robust_accuracy["apgd-ce"] < result.robust_accuracy["clean"]


# ---------------------------------------------------------------------------
# Warnings.

def _messages(records, category):
  return [str(r.message) for r in records if issubclass(r.category, category)]


def test_flat_loss_warns_gradient_masking():
  b = np.arange(NUM_CLASSES, dtype=np.float64)
  model = make_model(np.zeros((DIM, NUM_CLASSES)), b)  # logits independent of x
  x = np.random.default_rng(0).uniform(0, 1, (BATCH,) + SHAPE).astype(np.float32)
  y = np.full(BATCH, NUM_CLASSES - 1, np.int32)
  with pytest.warns(checks.GradientMaskingWarning, match="zero"):
    single = aa.apgd(model, x, y, KEY, eps=EPS, loss="dlr", n_iter=N_ITER)
  assert np.all(np.asarray(single.info["zero_grad"])) and not np.any(np.asarray(single.fooled))
  with warnings.catch_warnings(record=True) as records:
    warnings.simplefilter("always")
    result = aa.autoattack(model, x, y, KEY, eps=EPS, attacks_to_run=["apgd-ce", "apgd-t"],
                           n_iter=N_ITER, n_target_classes=N_TARGETS)
  masking = _messages(records, checks.GradientMaskingWarning)
  assert any("APGD-CE" in m and "zero" in m for m in masking)
  assert any("APGD-T" in m and "zero" in m for m in masking)
  assert any("no attack fooled" in m for m in masking)
  assert result.robust.all()


def test_step_function_lets_square_beat_apgd():
  rng = np.random.default_rng(4)
  w = rng.normal(size=(DIM, NUM_CLASSES)) * 0.5
  b = rng.normal(size=NUM_CLASSES)
  model = make_model(w, b, levels=2.0)  # round(2x) / 2: zero gradient everywhere
  x = rng.uniform(0, 1, (BATCH,) + SHAPE).astype(np.float32)
  y = np.argmax(np.asarray(model(jnp.asarray(x))), -1).astype(np.int32)
  with warnings.catch_warnings(record=True) as records:
    warnings.simplefilter("always")
    result = aa.autoattack(model, x, y, KEY, eps=0.3, attacks_to_run=["apgd-ce", "square"],
                           n_iter=N_ITER, n_queries=N_QUERIES)
  masking = _messages(records, checks.GradientMaskingWarning)
  # APGD-CE can only fool at its random start; Square's search finds more.
  assert result.robust_accuracy["square"] < result.robust_accuracy["apgd-ce"]
  assert any("square lowered the robust accuracy" in m for m in masking)
  assert any("APGD-CE" in m and "zero" in m for m in masking)


def test_softmax_output_warns(multiclass):
  _, w, b, x, y = multiclass
  model = make_model(w, b, softmax=1.0)
  with pytest.warns(checks.ProbabilityOutputWarning):
    aa.autoattack(model, x[:BATCH], y[:BATCH], KEY, eps=EPS, attacks_to_run=["apgd-ce"],
                  n_iter=N_ITER)


def test_randomized_model_warns(multiclass):
  model, _, _, x, y = multiclass

  def noisy(x, key):
    return model(x) + jax.random.normal(key, (x.shape[0], NUM_CLASSES))

  with pytest.warns(checks.RandomizedDefenseWarning):
    assert checks.check_randomized(noisy, x, y, KEY, stochastic=True)
  impure_rng = np.random.default_rng(0)
  with pytest.warns(checks.RandomizedDefenseWarning):  # randomness hidden in Python state
    assert checks.check_randomized(lambda x: model(x) + impure_rng.normal(size=(len(x), 1, )),
                                   x, y, KEY)
  with warnings.catch_warnings():
    warnings.simplefilter("error", checks.RandomizedDefenseWarning)
    assert not checks.check_randomized(model, x, y, KEY)


# ---------------------------------------------------------------------------
# Bad inputs.

@pytest.mark.parametrize("call, match", [
    (lambda m, x, y: aa.apgd(m, x, y, KEY, eps=0.0), "eps"),
    (lambda m, x, y: aa.apgd(m, x, y, KEY, eps=-0.1), "eps"),
    (lambda m, x, y: aa.apgd(m, x, y, KEY, eps=8.0), "pixel units"),
    (lambda m, x, y: aa.apgd(m, x, y, KEY, eps=EPS, norm="L3"), "norm"),
    (lambda m, x, y: aa.apgd(m, x, y, KEY, eps=EPS, loss="hinge"), "loss"),
    (lambda m, x, y: aa.apgd(m, x + 2.0, y, KEY, eps=EPS), r"\[0, 1\]"),
    (lambda m, x, y: aa.apgd(m, x, y[:3], KEY, eps=EPS), "batch size"),
    (lambda m, x, y: aa.apgd(m, x, y.astype(np.float32), KEY, eps=EPS), "integer"),
    (lambda m, x, y: aa.apgd(m, x, y + NUM_CLASSES, KEY, eps=EPS, n_iter=N_ITER), "labels"),
    (lambda m, x, y: aa.apgd(m, x, y, KEY, eps=EPS, n_iter=0), "n_iter"),
    (lambda m, x, y: aa.apgd(m, x, y, KEY, eps=EPS, mask=np.ones(3, bool)), "mask"),
    (lambda m, x, y: aa.apgd_targeted(m, x, y, KEY, eps=EPS, n_target_classes=NUM_CLASSES,
                                      n_iter=N_ITER), "target classes"),
    (lambda m, x, y: aa.fab_targeted(m, x, y, KEY, eps=EPS, norm="L2"), "linf"),
    (lambda m, x, y: aa.square(m, x.reshape(len(x), -1), y, KEY, eps=EPS), "NHWC"),
    (lambda m, x, y: aa.autoattack(m, x, y, KEY, eps=EPS, version="plus"), "version"),
    (lambda m, x, y: aa.autoattack(m, x, y, KEY, eps=EPS, attacks_to_run=["apgd-x"]), "attack"),
    (lambda m, x, y: aa.autoattack(m, x, y, KEY, eps=EPS, attacks_to_run="apgd-ce"), "sequence"),
    (lambda m, x, y: aa.autoattack(m, x, y, KEY, eps=EPS, attacks_to_run=["square", "square"]),
     "twice"),
    (lambda m, x, y: aa.autoattack(m, x, y, KEY, eps=EPS, norm="L2"), "linf"),
    (lambda m, x, y: aa.autoattack(m, x, y, KEY, eps=EPS, batch_size=0), "batch_size"),
])
def test_bad_inputs_raise(binary, call, match):
  model, _, _, x, y = binary
  with pytest.raises(ValueError, match=match):
    call(model, x, y)

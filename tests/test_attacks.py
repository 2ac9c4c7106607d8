"""Tests for fastadv_jax.attacks: perturbation sets, exact semantics, the point and
gradient each attack reports, determinism, compilation counts and boundary checks,
on tiny models and one fixed shape.

The generic tests run every attack registered in `attacks.ATTACK_SPECS`; the
keyword arguments an attack needs to be called come from `ATTACK_ROWS` in
`method_rows.py`, one row per registered name (a registered attack without a row fails those tests).
"""

import functools
import inspect

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fastadv_jax import attacks
from fastadv_jax import closures
import method_rows
from method_rows import ATTACK_ROWS

SHAPE = (4, 8, 8, 3)
BATCH = SHAPE[0]
DIM = int(np.prod(SHAPE[1:]))
NUM_CLASSES = 10
EPS = 8 / 255

# Further settings of some attacks, run through the same generic checks
# (merged over the attack's ATTACK_ROWS row).
VARIANTS = [
    ("fgsm_rs", {"clip_init_to_box": False}),
    ("pgd", {"restarts": 2, "early_stop": True, "keep_best": True}),
    ("pgd", {"step": 0.5, "norm": "l2", "restarts": 2, "select": "max_loss"}),
    ("pgd", {"random_start": False}),
    ("pgd", {"steps": 0}),
    ("zerograd", {"mask_mode": "perturbation"}),
    ("random_corner", {"step": 4 / 255}),
    ("n_fgsm", {"noise_mag": EPS / 2, "clip_noise_to_box": False}),
]


_row = method_rows.attack_row


def _kwargs(name, variant=None):
  return {**_row(name)["kwargs"], **(variant or {})}


CASES = ([(name, {}) for name in sorted(attacks.ATTACK_SPECS)]
         + [(name, v) for name, v in VARIANTS])
CASE_IDS = [name if not v else f"{name}-" + "-".join(f"{k}={v[k]}" for k in sorted(v))
            for name, v in CASES]


# ----------------------------------------------------------------------------
# Tiny models and data.
# ----------------------------------------------------------------------------

def _images(seed, low=0.0, high=1.0):
  rng = np.random.default_rng(seed)
  return rng.uniform(low, high, SHAPE).astype(np.float32)


def _labels(seed):
  return np.random.default_rng(seed).integers(0, NUM_CLASSES, BATCH).astype(np.int32)


def _box_images(seed):
  """Images touching both ends of the box (exercises the box projection)."""
  x = _images(seed)
  x[:, 0] = 0.0
  x[:, 1] = 1.0
  return x


@pytest.fixture(scope="module")
def params():
  rng = np.random.default_rng(0)
  return {
      "w1": jnp.asarray(rng.normal(0, 1 / np.sqrt(DIM), (DIM, 32)), jnp.float32),
      "b1": jnp.asarray(rng.normal(0, 0.1, (32,)), jnp.float32),
      "w2": jnp.asarray(rng.normal(0, 1.0, (32, NUM_CLASSES)), jnp.float32),
  }


def mlp_logits(params, z, dtype=jnp.float32):
  """A small nonconvex model; dtype=bfloat16 computes the whole model in bf16."""
  h = z.reshape(z.shape[0], -1).astype(dtype)
  h = jnp.tanh(h @ params["w1"].astype(dtype) + params["b1"].astype(dtype))
  return (h @ params["w2"].astype(dtype)).astype(jnp.float32)


def ce_loss_fn(params, y, dtype=jnp.float32):
  return closures.cross_entropy(lambda z: mlp_logits(params, z, dtype), y)


@functools.lru_cache(maxsize=None)
def _input_grad_fn():
  return jax.jit(lambda params, y, z: jax.grad(ce_loss_fn(params, y))(z))


def input_grad(params, y, z):
  """∇ₓ of the batch-mean CE of the MLP at z (jitted, float32)."""
  return _input_grad_fn()(params, jnp.asarray(y), jnp.asarray(z))


def _carried_delta(seed):
  """A random carried perturbation in the ball, for an attack whose spec has
  `carried` (the train step carries the attack's own, projected, output)."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(-EPS, EPS, SHAPE), jnp.float32)


@functools.lru_cache(maxsize=None)
def jitted_attack(name, variant=()):
  """jit(attack) on the MLP's CE closure for a registered attack.

  eps, the spec's traced keyword arguments and (for a carried attack) the
  carried delta are traced arguments: `run(params, x, y, key, eps, traced, delta)`.
  """
  spec = attacks.ATTACK_SPECS[name]
  kwargs = _kwargs(name, dict(variant))
  static = {k: v for k, v in kwargs.items() if k not in spec.traced}

  @jax.jit
  def run(params, x, y, key, eps, traced, delta):
    extra = {"delta": delta} if spec.carried is not None else {}
    return spec.fn(ce_loss_fn(params, y), x, key, eps=eps, **static, **traced, **extra)

  traced = {k: v for k, v in kwargs.items() if k in spec.traced}
  return run, traced


def _run(params, name, variant, x, y, key, eps=EPS, delta_seed=0):
  run, traced = jitted_attack(name, tuple(sorted(variant.items())))
  delta = _carried_delta(delta_seed) if attacks.ATTACK_SPECS[name].carried else None
  return run(params, jnp.asarray(x), jnp.asarray(y), key, eps, traced, delta)


def _resolved_step(name, kwargs, eps=EPS):
  spec = attacks.ATTACK_SPECS[name]
  if kwargs.get("step") is not None:
    return kwargs["step"]
  return None if spec.default_step is None else spec.default_step * eps


# ----------------------------------------------------------------------------
# The registry and every registered attack.
# ----------------------------------------------------------------------------

def test_every_registered_attack_has_a_row_and_no_row_is_stale():
  method_rows.assert_rows_match("attack", attacks.ATTACK_SPECS, ATTACK_ROWS)


def test_registry_views_and_specs_are_consistent():
  assert set(attacks.ATTACKS) == set(attacks.ATTACK_SPECS)
  for name, spec in attacks.ATTACK_SPECS.items():
    assert attacks.ATTACKS[name] is spec.fn
    assert attacks.get_attack(name) is spec.fn
    assert spec.default_step is None or spec.default_step > 0, name
    fn_params = set(inspect.signature(spec.fn).parameters)
    for arg in spec.traced:
      assert arg in fn_params, (name, arg)
    if spec.carried is not None:
      assert "delta" in fn_params, name
  with pytest.raises(ValueError, match="already registered"):
    attacks.register_attack("fgsm", attacks.ATTACK_SPECS["fgsm"])


@pytest.mark.parametrize("name,variant", CASES, ids=CASE_IDS)
def test_attack_output_stays_in_its_set_and_reports_its_start(params, name, variant):
  spec = attacks.ATTACK_SPECS[name]
  kwargs = _kwargs(name, variant)
  x, y = _box_images(1), _labels(1)
  out = _run(params, name, variant, x, y, jax.random.PRNGKey(3))
  assert isinstance(out, attacks.AttackOutput)
  chex.assert_shape([out.delta, out.start], SHAPE)
  chex.assert_type([out.delta, out.start], jnp.float32)
  delta, start = np.asarray(out.delta), np.asarray(out.start)

  # x + delta in the box, delta within the perturbation set of the spec.
  adv = x + delta
  assert adv.min() >= 0.0 and adv.max() <= 1.0
  step = _resolved_step(name, kwargs)
  radius = spec.radius(EPS, step, kwargs)
  assert radius == pytest.approx(attacks.perturbation_set_radius(name, EPS, **kwargs))
  assert np.abs(delta).max() <= radius * (1 + 1e-6)
  if kwargs.get("norm") == "l2":
    norms = np.sqrt(np.sum(delta.reshape(BATCH, -1).astype(np.float64) ** 2, axis=1))
    assert np.all(norms <= EPS * (1 + 1e-5))
  if name == "none":
    assert np.all(delta == 0)
  else:
    assert np.abs(delta).max() > 0

  # The start is a point of the box within the attack's radius of x, and the
  # reported gradient is the input gradient there.
  assert start.min() >= 0.0 and start.max() <= 1.0
  assert np.abs(start - x).max() <= radius * (1 + 1e-6)
  if out.grad_at_start is not None:
    chex.assert_shape(out.grad_at_start, SHAPE)
    chex.assert_type(out.grad_at_start, jnp.float32)
    chex.assert_trees_all_close(out.grad_at_start, input_grad(params, y, out.start),
                                rtol=1e-5, atol=1e-9)
    assert np.abs(np.asarray(out.grad_at_start)).max() > 0

  # gradient_at_clean is truthful: when it says so, the gradient is ∇ℓ(x).
  if spec.gradient_at_clean(kwargs):
    np.testing.assert_array_equal(start, x)
    if out.grad_at_start is not None:
      chex.assert_trees_all_close(out.grad_at_start, input_grad(params, y, x),
                                  rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name,variant", CASES, ids=CASE_IDS)
def test_same_key_same_output_other_key_other_delta_iff_random(params, name, variant):
  x, y = _images(19), _labels(19)
  a = _run(params, name, variant, x, y, jax.random.PRNGKey(7))
  b = _run(params, name, variant, x, y, jax.random.PRNGKey(7))
  c = _run(params, name, variant, x, y, jax.random.PRNGKey(8))
  chex.assert_trees_all_equal(a, b)
  random = _row(name)["random"]
  if random(_kwargs(name, variant)) if callable(random) else random:
    assert not np.array_equal(np.asarray(a.delta), np.asarray(c.delta))
  else:
    chex.assert_trees_all_equal(a, c)


@pytest.mark.parametrize("name", sorted(attacks.ATTACK_SPECS))
def test_traced_eps_and_traced_arguments_pass_the_checks(params, name):
  """eps (and the spec's traced arguments) are traced in `jitted_attack`: the
  checks let them through, and eps = 0 (the start of a warm-up) gives the zero
  perturbation, without a recompile."""
  x, y = _images(24), _labels(24)
  run, _ = jitted_attack(name, ())
  zero = _run(params, name, {}, x, y, jax.random.PRNGKey(0), eps=0.0)
  assert np.all(np.asarray(zero.delta) == 0)
  full = _run(params, name, {}, x, y, jax.random.PRNGKey(0), eps=EPS)
  if name != "none":
    assert np.abs(np.asarray(full.delta)).max() > 0
  assert run._cache_size() == 1


def test_perturbation_set_radius_follows_the_specs():
  assert attacks.perturbation_set_radius("none", EPS) == 0.0
  assert attacks.perturbation_set_radius("pgd", EPS, step=2 / 255, steps=3) == EPS
  assert attacks.perturbation_set_radius("fgsm", EPS) == EPS
  assert attacks.perturbation_set_radius("n_fgsm", EPS) == pytest.approx(3 * EPS)
  assert attacks.perturbation_set_radius("n_fgsm", EPS, noise_mag=EPS) == pytest.approx(2 * EPS)
  assert attacks.perturbation_set_radius("n_fgsm", EPS, step=0.5 * EPS) == pytest.approx(
      2.5 * EPS)
  assert attacks.perturbation_set_radius("fgsm_n", EPS) == pytest.approx(2 * EPS)
  with pytest.raises(ValueError, match="fgsm_rs"):
    attacks.perturbation_set_radius("fgsm_gradalign", EPS)


def test_unprojected_attacks_leave_the_eps_ball(params):
  x, y = _images(2, 0.2, 0.8), _labels(2)
  for name, factor in [("n_fgsm", 3.0), ("fgsm_n", 2.0)]:
    delta = np.asarray(_run(params, name, {}, x, y, jax.random.PRNGKey(0)).delta)
    assert attacks.perturbation_set_radius(name, EPS) == pytest.approx(factor * EPS)
    assert np.abs(delta).max() > 1.5 * EPS, name
    assert np.abs(delta).max() <= factor * EPS * (1 + 1e-6)


# ----------------------------------------------------------------------------
# Single-step attacks: exact semantics.
# ----------------------------------------------------------------------------

def _linear_loss(c):
  return lambda z: jnp.mean(jnp.sum(z * c, axis=(1, 2, 3)))


def test_fgsm_on_a_linear_loss_is_eps_sign_of_its_gradient_clipped_to_the_box():
  rng = np.random.default_rng(4)
  c = rng.normal(size=SHAPE).astype(np.float32)
  x = _images(4)
  x[:, :2] = 0.0
  x[:, -2:] = 1.0
  loss_fn = _linear_loss(c)
  out = attacks.fgsm(loss_fn, jnp.asarray(x), eps=EPS)
  expected = np.clip(x + EPS * np.sign(c), 0.0, 1.0) - x
  np.testing.assert_allclose(np.asarray(out.delta), expected, rtol=0, atol=1e-7)
  np.testing.assert_allclose(np.asarray(out.grad_at_start), c / BATCH, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.start), x)  # FGSM starts at x
  # A step larger than eps is clipped to the eps-ball.
  big = attacks.fgsm(loss_fn, jnp.asarray(x), eps=EPS, step=3 * EPS)
  np.testing.assert_allclose(np.asarray(big.delta), expected, rtol=0, atol=1e-7)
  assert np.sum(np.abs(expected) == np.float32(EPS)) > 0
  assert np.sum(expected == 0) > 0  # the box clipped some coordinates


def test_fgsm_rs_follows_wong():
  """On a linear loss the gradient sign is known: delta = clip_eps(eta + 1.25 eps s)."""
  c = np.random.default_rng(5).normal(size=SHAPE).astype(np.float32)
  x = _images(5, 0.2, 0.8)
  out = attacks.fgsm_rs(_linear_loss(c), jnp.asarray(x), jax.random.PRNGKey(0), eps=EPS)
  delta, start = np.asarray(out.delta), np.asarray(out.start)
  s = np.sign(c)
  # eta + 1.25 eps s reaches the edge eps*s iff eta*s >= -0.25 eps (probability 5/8).
  at_edge = delta == np.float32(EPS) * s
  assert 0.5 < at_edge.mean() < 0.75
  moved = ~at_edge
  # There, eta + 1.25 eps s was inside the ball: delta - 1.25 eps s = eta in [-eps, -0.25 eps].
  eta = delta[moved] - np.float32(1.25 * EPS) * s[moved]
  assert np.all(np.abs(eta) <= EPS * (1 + 1e-5))
  assert np.all(eta * s[moved] <= -0.25 * EPS * (1 - 1e-5))
  # ... and the start is x + eta (x is well inside the box: no clipping).
  np.testing.assert_allclose(start[moved], x[moved] + eta, rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.grad_at_start), c / BATCH, rtol=1e-6)


# Noise half-width of the noisy single-step attacks at their defaults, in units of eps.
NOISY_STARTS = [("fgsm_rs", 1.0), ("zerograd", 1.0), ("n_fgsm", 2.0), ("fgsm_n", 1.0)]


@pytest.mark.parametrize("name,noise", NOISY_STARTS, ids=[n for n, _ in NOISY_STARTS])
def test_noisy_attacks_start_at_the_box_clipped_noisy_point(params, name, noise):
  x, y = _box_images(26), _labels(26)
  out = _run(params, name, {}, x, y, jax.random.PRNGKey(4))
  start = np.asarray(out.start)
  eta = start - x
  assert start.min() >= 0.0 and start.max() <= 1.0
  assert np.abs(eta).max() <= noise * EPS * (1 + 1e-5)
  # Noise everywhere inside the box, clipped at its ends (x = 0 and x = 1 rows).
  inner = (x > noise * EPS) & (x < 1 - noise * EPS)
  assert np.abs(eta[inner]).max() > 0.9 * noise * EPS
  assert np.mean(eta[inner] != 0) > 0.99
  assert np.all(eta[:, 0] >= 0) and np.all(eta[:, 1] <= 0)
  assert np.mean(eta[:, 0] == 0) > 0.3 and np.mean(eta[:, 1] == 0) > 0.3
  chex.assert_trees_all_close(out.grad_at_start, input_grad(params, y, out.start),
                              rtol=1e-5, atol=1e-9)


def test_fgsm_n_steps_eps_from_its_noisy_start(params):
  x, y = jnp.asarray(_images(16, 0.2, 0.8)), _labels(16)
  out = attacks.fgsm_n(ce_loss_fn(params, y), x, jax.random.PRNGKey(5), eps=EPS)
  delta, grad = np.asarray(out.delta), np.asarray(out.grad_at_start)
  eta = np.asarray(out.start) - np.asarray(x)
  assert np.abs(eta).max() <= EPS * (1 + 1e-6) and np.abs(eta).max() > 0.9 * EPS
  np.testing.assert_allclose(delta, eta + np.float32(EPS) * np.sign(grad), atol=1e-7)
  n_fgsm = attacks.n_fgsm(ce_loss_fn(params, y), x, jax.random.PRNGKey(5), eps=EPS)
  assert isinstance(n_fgsm, attacks.AttackOutput)
  # N-FGSM's noise is U[-2eps, 2eps].
  assert np.abs(np.asarray(n_fgsm.start) - np.asarray(x)).max() > 1.5 * EPS


# ----------------------------------------------------------------------------
# PGD.
# ----------------------------------------------------------------------------

def _periodic_loss():
  """Per-example loss sin(50 * mean(z)): sign steps overshoot and oscillate."""
  def logits_fn(z):
    m = jnp.mean(z.reshape(z.shape[0], -1), axis=1)
    return jnp.stack([jnp.sin(50.0 * m), jnp.zeros_like(m)], axis=1)
  return closures.LossFn(logits_fn, jnp.zeros((BATCH,), jnp.int32),
                         lambda logits, labels: logits[:, 0], "periodic")


def test_pgd_keep_best_never_ends_below_its_start():
  x = jnp.asarray(_images(6, 0.35, 0.65))
  loss_fn = _periodic_loss()
  start = np.asarray(loss_fn.with_aux(x)[1].losses)
  kwargs = dict(eps=0.3, step=0.07, steps=3, random_start=False)
  plain = attacks.pgd(loss_fn, x, **kwargs).delta
  best = attacks.pgd(loss_fn, x, keep_best=True, **kwargs).delta
  plain_loss = np.asarray(loss_fn.with_aux(x + plain)[1].losses)
  best_loss = np.asarray(loss_fn.with_aux(x + best)[1].losses)
  # The construction matters: without keep_best some example ends lower.
  assert np.any(plain_loss < start - 1e-3)
  assert np.all(best_loss >= start - 1e-6)
  assert np.all(best_loss >= plain_loss - 1e-6)


def _sign_of_first_coordinate_loss(x):
  """Label 0 is predicted iff delta[0,0,0] >= 0; the loss is high when it is."""
  x0 = x[:, 0, 0, 0]
  def logits_fn(z):
    s = z[:, 0, 0, 0] - x0
    return jnp.stack([s, -s], axis=1)
  return closures.LossFn(logits_fn, jnp.zeros((BATCH,), jnp.int32),
                         lambda logits, labels: logits[:, 0] - logits[:, 1], "s")


def test_pgd_strict_never_reports_robust_when_some_restart_fools():
  x = jnp.asarray(_images(7, 0.2, 0.8))
  loss_fn = _sign_of_first_coordinate_loss(x)
  # steps=0: each restart's final point is its random start; with 16 restarts
  # some start fools each example and some does not (all but surely).
  kwargs = dict(eps=EPS, step=0.0, steps=0, restarts=16)
  key = jax.random.PRNGKey(8)
  strict = attacks.pgd(loss_fn, x, key, select="strict", **kwargs)
  max_loss = attacks.pgd(loss_fn, x, key, select="max_loss", **kwargs)
  strict_correct = np.asarray(loss_fn.with_aux(x + strict.delta)[1].correct)
  max_loss_correct = np.asarray(loss_fn.with_aux(x + max_loss.delta)[1].correct)
  assert not strict_correct.any()
  # The references' rule keeps the high-loss, correctly classified restart.
  assert max_loss_correct.all()
  # No step, no gradient; the start is the first restart's.
  assert strict.grad_at_start is None and max_loss.grad_at_start is None
  first = attacks.pgd(loss_fn, x, key, eps=EPS, step=0.0, steps=0)
  np.testing.assert_array_equal(np.asarray(strict.start), np.asarray(first.start))


def test_pgd_reports_its_first_restarts_start_and_gradient(params):
  x, y = jnp.asarray(_images(27)), _labels(27)
  loss_fn = ce_loss_fn(params, y)
  key = jax.random.PRNGKey(5)
  kwargs = dict(eps=EPS, step=2 / 255, steps=3)
  multi = attacks.pgd(loss_fn, x, key, restarts=3, early_stop=True, **kwargs)
  single = attacks.pgd(loss_fn, x, key, **kwargs)  # restart 0 of the same key
  np.testing.assert_array_equal(np.asarray(multi.start), np.asarray(single.start))
  chex.assert_trees_all_close(multi.grad_at_start, single.grad_at_start, rtol=1e-6,
                              atol=1e-10)
  chex.assert_trees_all_close(single.grad_at_start, input_grad(params, y, single.start),
                              rtol=1e-5, atol=1e-9)
  # The start is random (not x), inside the ball and the box.
  start = np.asarray(single.start)
  assert np.abs(start - np.asarray(x)).max() > 0.9 * EPS
  assert np.abs(start - np.asarray(x)).max() <= EPS * (1 + 1e-6)
  # pgd_corner reports the start and gradient of its PGD run.
  corner = attacks.pgd_corner(loss_fn, x, key, **kwargs)
  chex.assert_trees_all_equal(corner.start, single.start)
  chex.assert_trees_all_close(corner.grad_at_start, single.grad_at_start, rtol=1e-6,
                              atol=1e-10)


def test_pgd_strict_robust_set_is_within_max_loss_robust_set(params):
  x, y = _images(9), _labels(9)
  loss_fn = ce_loss_fn(params, y)
  kwargs = dict(eps=4 / 255, step=1 / 255, steps=3, restarts=3)
  key = jax.random.PRNGKey(1)
  strict = attacks.pgd(loss_fn, jnp.asarray(x), key, select="strict", **kwargs).delta
  max_loss = attacks.pgd(loss_fn, jnp.asarray(x), key, select="max_loss", **kwargs).delta
  c_strict = np.asarray(loss_fn.with_aux(x + strict)[1].correct)
  c_max = np.asarray(loss_fn.with_aux(x + max_loss)[1].correct)
  assert np.all(c_max[c_strict])  # strict-robust implies max_loss-robust
  clean_correct = np.asarray(loss_fn.with_aux(jnp.asarray(x))[1].correct)
  assert c_strict.sum() <= clean_correct.sum()


def test_pgd_increases_the_loss_and_early_stop_freezes_fooled_examples(params):
  x = jnp.asarray(_images(10))
  # Labels: the clean prediction, wrong for the first two examples.
  y = np.asarray(jnp.argmax(mlp_logits(params, x), axis=1)).astype(np.int32)
  y[:2] = (y[:2] + 1) % NUM_CLASSES
  loss_fn = ce_loss_fn(params, y)
  clean = loss_fn.with_aux(x)[1]
  out = attacks.pgd(loss_fn, x, eps=EPS, step=2 / 255, steps=5, random_start=False)
  assert float(loss_fn(x + out.delta)) > float(clean.losses.mean())
  # Without a random start PGD starts at x: its gradient is ∇ℓ(x).
  np.testing.assert_array_equal(np.asarray(out.start), np.asarray(x))
  chex.assert_trees_all_close(out.grad_at_start, input_grad(params, y, x), rtol=1e-5,
                              atol=1e-9)
  frozen = attacks.pgd(loss_fn, x, eps=EPS, step=2 / 255, steps=5,
                       random_start=False, early_stop=True).delta
  misclassified = ~np.asarray(clean.correct)
  assert misclassified.any() and (~misclassified).any()
  # Examples misclassified at the (zero) start are never updated.
  assert np.all(np.asarray(frozen)[misclassified] == 0)
  assert np.abs(np.asarray(frozen)[~misclassified]).max() > 0


def test_pgd_l2_stays_in_the_l2_ball_and_delta_init_is_used(params):
  x, y = jnp.asarray(_images(11, 0.1, 0.9)), _labels(11)
  loss_fn = ce_loss_fn(params, y)
  delta = attacks.pgd(loss_fn, x, jax.random.PRNGKey(0), eps=0.5, step=0.2, steps=4,
                      norm="l2").delta
  norms = np.linalg.norm(np.asarray(delta).reshape(BATCH, -1), axis=1)
  assert np.all(norms <= 0.5 * (1 + 1e-5)) and np.all(norms > 0.25)
  # steps=0 returns the (projected) start, and no gradient.
  init = np.full(SHAPE, 2 * EPS, np.float32)
  out = attacks.pgd(loss_fn, x, eps=EPS, step=0.0, steps=0, delta_init=init)
  np.testing.assert_array_equal(np.asarray(out.delta), np.float32(EPS))
  np.testing.assert_array_equal(np.asarray(out.start), np.asarray(x) + np.float32(EPS))
  assert out.grad_at_start is None


class _TinyBNNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    return nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))


def test_pgd_with_a_batchnorm_model_through_closures():
  model = _TinyBNNet()
  x, y = jnp.asarray(_images(12)), jnp.asarray(_labels(12))
  variables = model.init(jax.random.PRNGKey(0), x)

  @jax.jit
  def attack(variables, x, y, key):
    loss_fn = closures.cross_entropy(closures.logits_fn(model, variables, bn="batch"), y)
    out = attacks.pgd(loss_fn, x, key, eps=EPS, step=2 / 255, steps=3, restarts=2,
                      early_stop=True)
    return (out, loss_fn.with_aux(x + out.delta)[1].correct,
            loss_fn.with_aux(x)[1].correct, jax.grad(loss_fn)(out.start))

  out, adv_correct, clean_correct, grad = attack(variables, x, y, jax.random.PRNGKey(1))
  delta = np.asarray(out.delta)
  assert np.abs(delta).max() <= EPS and (np.asarray(x) + delta).max() <= 1.0
  assert np.asarray(adv_correct).sum() <= np.asarray(clean_correct).sum()
  # The gradient at the start is that of the batch-mean loss in batch mode.
  chex.assert_trees_all_close(out.grad_at_start, grad, rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------
# ZeroGrad and MultiGrad.
# ----------------------------------------------------------------------------

def test_per_example_quantile_matches_numpy_and_torch():
  values = np.random.default_rng(13).exponential(size=SHAPE).astype(np.float32)
  for q in (0.0, 0.35, 0.45, 0.7, 1.0):
    ours = np.asarray(attacks.per_example_quantile(jnp.asarray(values), q))
    flat = values.reshape(BATCH, -1)
    np.testing.assert_allclose(ours, np.quantile(flat, q, axis=1), rtol=1e-6)
    torch_q = torch.quantile(torch.from_numpy(flat), q, dim=1).numpy()
    np.testing.assert_allclose(ours, torch_q, rtol=1e-6)


@pytest.mark.parametrize("mask_mode", ["gradient", "perturbation"])
def test_zerograd_zeroes_exactly_the_entries_strictly_below_the_quantile(params, mask_mode):
  x, y = _images(14, 0.2, 0.8), _labels(14)
  q = 0.35
  out = attacks.zerograd(ce_loss_fn(params, y), jnp.asarray(x), jax.random.PRNGKey(2),
                         eps=EPS, q=q, mask_mode=mask_mode)
  delta, grad = np.asarray(out.delta), np.asarray(out.grad_at_start)
  abs_grad = np.abs(grad).reshape(BATCH, -1)
  threshold = np.quantile(abs_grad, q, axis=1)  # numpy's default 'linear'
  masked = (abs_grad < threshold[:, None]).reshape(SHAPE)
  assert 0.3 < masked.mean() < 0.4
  # Unmasked entries: eta + 2 eps sign(g) always reaches the edge of the ball.
  np.testing.assert_array_equal(delta[~masked], np.float32(EPS) * np.sign(grad[~masked]))
  if mask_mode == "perturbation":
    assert np.all(delta[masked] == 0)
  else:
    # Masked entries keep their random init: inside the ball, almost never 0 or eps.
    assert np.all(np.abs(delta[masked]) < EPS) and np.all(delta[masked] != 0)
    # That init is the start's noise (x is inside the box: nothing clipped).
    np.testing.assert_allclose(delta[masked], (np.asarray(out.start) - x)[masked],
                               rtol=0, atol=1e-7)


def test_zerograd_quantile_ends_are_strict(params):
  """q = 1: the threshold is the largest |g|, which is kept (strict <); q = 0: none masked."""
  x, y = jnp.asarray(_images(14, 0.2, 0.8)), _labels(14)
  loss_fn = ce_loss_fn(params, y)
  key = jax.random.PRNGKey(2)
  out = attacks.zerograd(loss_fn, x, key, eps=EPS, q=1.0, mask_mode="perturbation")
  top = np.asarray(out.delta).reshape(BATCH, -1)
  grad = np.asarray(out.grad_at_start).reshape(BATCH, -1)
  assert np.all(np.sum(top != 0, axis=1) == 1)
  np.testing.assert_array_equal(np.argmax(np.abs(top), axis=1),
                                np.argmax(np.abs(grad), axis=1))
  none_masked = np.asarray(attacks.zerograd(loss_fn, x, key, eps=EPS, q=0.0,
                                            mask_mode="perturbation").delta)
  assert np.all(np.abs(none_masked) == np.float32(EPS))


def test_multigrad_keeps_only_coordinates_whose_signs_agree():
  rng = np.random.default_rng(15)
  x = _images(15, 0.2, 0.8)
  # Half of the coordinates have a fixed gradient sign in the whole ball (linear
  # part); on the other half the gradient is 2 (z - x) = 2 eta, whose sign is
  # that of each random start, so all 3 starts agree with probability 1/4.
  fixed = rng.random(SHAPE) < 0.5
  c = np.where(fixed, rng.normal(size=SHAPE), 0.0).astype(np.float32)
  xj = jnp.asarray(x)
  def loss_fn(z):
    quad = jnp.where(fixed, 0.0, jnp.square(z - xj))
    return jnp.mean(jnp.sum(z * c + quad, axis=(1, 2, 3)))
  key = jax.random.PRNGKey(4)
  out = attacks.multigrad(loss_fn, xj, key, eps=EPS, num_starts=3)
  delta, g1 = np.asarray(out.delta), np.asarray(out.grad_at_start)
  np.testing.assert_array_equal(delta[fixed], np.float32(EPS) * np.sign(c[fixed]))
  free = delta[~fixed]
  kept = free != 0
  assert 0.15 < kept.mean() < 0.35
  np.testing.assert_array_equal(free[kept], np.float32(EPS) * np.sign(g1[~fixed][kept]))
  # g1 is the gradient at the first start: 2 eta / B where the loss is quadratic.
  eta1 = np.asarray(out.start) - x
  np.testing.assert_allclose(g1[~fixed], 2 * eta1[~fixed] / BATCH, rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose(g1[fixed], c[fixed] / BATCH, rtol=1e-6)
  # One start keeps everything; the sequential variant gives the same result.
  single = np.asarray(attacks.multigrad(loss_fn, xj, key, eps=EPS, num_starts=1).delta)
  assert np.all(single[~fixed] != 0)
  sequential = attacks.multigrad(loss_fn, xj, key, eps=EPS, num_starts=3, vectorize=False)
  chex.assert_trees_all_equal(sequential, out)


# ----------------------------------------------------------------------------
# Other single-step attacks and AT for Free.
# ----------------------------------------------------------------------------

def test_random_corner_and_pgd_corner_lie_on_corners(params):
  x, y = jnp.asarray(_images(17, 0.2, 0.8)), _labels(17)
  corner = attacks.random_corner(None, x, jax.random.PRNGKey(0), eps=EPS)
  # A pure random corner takes no gradient; its start is x.
  assert corner.grad_at_start is None
  np.testing.assert_array_equal(np.asarray(corner.start), np.asarray(x))
  corner = np.asarray(corner.delta)
  assert np.all(np.abs(corner) == np.float32(EPS))
  assert 0.4 < (corner > 0).mean() < 0.6
  delta = np.asarray(attacks.pgd_corner(ce_loss_fn(params, y), x, jax.random.PRNGKey(1),
                                        eps=EPS, step=2 / 255, steps=2).delta)
  assert np.all(np.isin(np.abs(delta), [0.0, np.float32(EPS)]))


def test_free_step_matches_fgsm_from_zero_and_accumulates(params):
  x, y = jnp.asarray(_images(18, 0.2, 0.8)), _labels(18)
  loss_fn = ce_loss_fn(params, y)
  zero = jnp.zeros(SHAPE, jnp.float32)
  step = EPS / 2
  first = attacks.free_step(loss_fn, x, delta=zero, eps=EPS, step=step)
  fgsm = attacks.fgsm(loss_fn, x, eps=EPS, step=step)
  chex.assert_trees_all_equal(first, fgsm)  # delta, start = x and ∇ℓ(x)
  np.testing.assert_array_equal(
      np.asarray(attacks.free_update(x, zero, first.grad_at_start, eps=EPS, step=step)),
      np.asarray(first.delta))
  assert attacks.ATTACK_SPECS["free"].carried.update is attacks.free_update
  delta = first.delta
  for _ in range(3):
    out = attacks.free_step(loss_fn, x, delta=delta, eps=EPS, step=step)
    # The gradient is taken at the carried (old) point.
    np.testing.assert_array_equal(np.asarray(out.start), np.asarray(x + delta))
    delta = out.delta
  delta = np.asarray(delta)
  assert np.abs(delta).max() <= EPS and np.abs(delta).max() == np.float32(EPS)


# ----------------------------------------------------------------------------
# Compilation, dtypes, checks.
# ----------------------------------------------------------------------------

def test_jitted_attacks_do_not_recompile_across_batches(params):
  chex.clear_trace_counter()
  kwargs = {"step": 2 / 255, "steps": 3, "restarts": 2, "early_stop": True,
            "keep_best": True}

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(params, x, y, key, eps):
    return attacks.pgd(ce_loss_fn(params, y), x, key, eps=eps, **kwargs)

  for seed, eps in [(20, EPS), (21, EPS), (22, 4 / 255)]:  # new data, new traced eps
    out = run(params, jnp.asarray(_images(seed)), jnp.asarray(_labels(seed)),
              jax.random.PRNGKey(seed), eps)
    assert np.abs(np.asarray(out.delta)).max() <= eps * (1 + 1e-6)
  assert run._cache_size() == 1


def test_bf16_model_gives_float32_perturbation(params):
  x, y = jnp.asarray(_images(23, 0.2, 0.8)), _labels(23)
  loss_fn = ce_loss_fn(params, y, dtype=jnp.bfloat16)
  key = jax.random.PRNGKey(0)
  for out in [attacks.fgsm_rs(loss_fn, x, key, eps=EPS),
              attacks.zerograd(loss_fn, x, key, eps=EPS, q=0.35),
              attacks.pgd(loss_fn, x, key, eps=EPS, step=2 / 255, steps=2, restarts=2)]:
    chex.assert_type([out.delta, out.start, out.grad_at_start], jnp.float32)
    delta = np.asarray(out.delta)
    # Random-init coordinates are float32 values that bf16 cannot represent.
    as_bf16 = np.asarray(jnp.asarray(delta).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(as_bf16 != delta) > 0.1
  chex.assert_type(attacks.fgsm(loss_fn, x, eps=EPS).grad_at_start, jnp.float32)


def _plain_loss(params, y):
  return lambda z: jnp.mean(closures.cross_entropy_per_example(mlp_logits(params, z), y))


@pytest.mark.parametrize("case", [
    "negative_eps", "eps_in_255", "negative_step", "q_above_one", "image_outside_box",
    "delta_init_shape", "unknown_norm", "unknown_select", "unknown_mask_mode",
    "early_stop_plain", "restarts_plain", "restarts_without_random_start",
    "restarts_with_delta_init", "steps_float", "missing_key", "unknown_attack",
    "free_delta_shape", "negative_noise_mag"])
def test_bad_concrete_input_raises_value_error(params, case):
  x, y = jnp.asarray(_images(25)), jnp.asarray(_labels(25))
  loss_fn = ce_loss_fn(params, y)
  key = jax.random.PRNGKey(0)
  pgd = functools.partial(attacks.pgd, loss_fn, x, key, eps=EPS, step=EPS / 4, steps=2)
  calls = {
      "negative_eps": lambda: attacks.fgsm(loss_fn, x, eps=-0.1),
      "eps_in_255": lambda: attacks.fgsm_rs(loss_fn, x, key, eps=8.0),
      "negative_step": lambda: attacks.fgsm(loss_fn, x, eps=EPS, step=-1e-3),
      "q_above_one": lambda: attacks.zerograd(loss_fn, x, key, eps=EPS, q=1.5),
      "image_outside_box": lambda: attacks.fgsm(loss_fn, x * 2.0 + 0.1, eps=EPS),
      "delta_init_shape": lambda: pgd(delta_init=jnp.zeros((2, 8, 8, 3))),
      "unknown_norm": lambda: pgd(norm="l1"),
      "unknown_select": lambda: pgd(restarts=2, select="best"),
      "unknown_mask_mode": lambda: attacks.zerograd(loss_fn, x, key, eps=EPS, q=0.3,
                                                    mask_mode="coordinates"),
      "early_stop_plain": lambda: attacks.pgd(_plain_loss(params, y), x, key, eps=EPS,
                                              step=EPS / 4, steps=2, early_stop=True),
      "restarts_plain": lambda: attacks.pgd(_plain_loss(params, y), x, key, eps=EPS,
                                            step=EPS / 4, steps=2, restarts=3),
      "restarts_without_random_start": lambda: pgd(restarts=3, random_start=False),
      "restarts_with_delta_init": lambda: pgd(restarts=2, delta_init=jnp.zeros(SHAPE)),
      "steps_float": lambda: attacks.pgd(loss_fn, x, key, eps=EPS, step=EPS, steps=2.0),
      "missing_key": lambda: attacks.fgsm_rs(loss_fn, x, None, eps=EPS),
      "unknown_attack": lambda: attacks.get_attack("fgsm_gradalign"),
      "free_delta_shape": lambda: attacks.free_step(loss_fn, x, delta=jnp.zeros((4, 8, 8, 1)),
                                                    eps=EPS),
      "negative_noise_mag": lambda: attacks.n_fgsm(loss_fn, x, key, eps=EPS, noise_mag=-EPS),
  }
  with pytest.raises(ValueError) as info:
    calls[case]()
  if case == "unknown_attack":
    assert "fgsm_rs" in str(info.value) and "zerograd" in str(info.value)
  if case == "early_stop_plain":
    assert "with_aux" in str(info.value)


# ----------------------------------------------------------------------------
# Explicit draws (`noise=`) and the gradient rule at the box boundary.
# ----------------------------------------------------------------------------

def _key_draw(name, key, eps=EPS):
  """The draw an attack makes from `key` with its defaults, reproduced here."""
  unit = lambda k, shape: jax.random.uniform(k, shape, jnp.float32, -1.0, 1.0)
  if name == "multigrad":
    keys = jax.random.split(key, 3)
    return jnp.stack([unit(k, SHAPE) * eps for k in keys])
  if name == "pgd":  # restart r draws from fold_in(key, r)
    return (unit(jax.random.fold_in(key, 0), SHAPE) * eps)[None]
  if name == "random_corner":
    return eps * jax.random.rademacher(key, SHAPE, jnp.float32)
  return unit(key, SHAPE) * (2 * eps if name == "n_fgsm" else eps)


DRAWING = ["fgsm_rs", "zerograd", "multigrad", "n_fgsm", "fgsm_n", "random_corner", "pgd"]


@pytest.mark.parametrize("name", DRAWING)
def test_explicit_noise_equal_to_the_keys_draw_gives_the_same_output(params, name):
  """noise=None draws from the key; passing that very draw gives bit-identical
  results, and another draw another delta (the argument is really used)."""
  x, y = jnp.asarray(_box_images(31)), _labels(31)
  key = jax.random.PRNGKey(7)
  kwargs = dict(_row(name)["kwargs"])
  fn = attacks.ATTACK_SPECS[name].fn
  loss = ce_loss_fn(params, y)
  drawn = fn(loss, x, key, eps=EPS, **kwargs)
  draw = _key_draw(name, key)
  given = fn(loss, x, None, eps=EPS, noise=draw, **kwargs)
  chex.assert_trees_all_equal(drawn, given)
  other = fn(loss, x, None, eps=EPS, noise=-draw, **kwargs)
  assert not np.array_equal(np.asarray(other.delta), np.asarray(drawn.delta))


def test_noise_of_the_wrong_shape_raises(params):
  x, y = jnp.asarray(_images(3)), _labels(3)
  with pytest.raises(ValueError, match="noise has shape"):
    attacks.fgsm_rs(ce_loss_fn(params, y), x, None, eps=EPS, noise=jnp.zeros((2, 8, 8, 3)))
  with pytest.raises(ValueError, match="noise has shape"):
    attacks.pgd(ce_loss_fn(params, y), x, None, eps=EPS, step=EPS / 4, steps=1,
                noise=jnp.zeros(SHAPE))


def test_boundary_input_grad_rules_on_a_linear_loss():
  """Through clamp(x + delta, 0, 1): factor 1 inside, 0 outside, and at exactly 0 or
  1 the tie rule: 1 ("full", no clamp), 0 (PyTorch 1.4), 1/2 (current PyTorch)."""
  c = np.random.default_rng(2).normal(size=SHAPE).astype(np.float32)
  x = _images(2, 0.2, 0.8)
  x[:, 0] = 0.0
  x[:, 1] = 1.0
  delta = np.zeros(SHAPE, np.float32)
  delta[:, 2] = -1.0     # x + delta < 0: outside
  loss = _linear_loss(c)
  g = {r: np.asarray(attacks.boundary_input_grad(loss, jnp.asarray(x), jnp.asarray(delta), r))
       for r in attacks.BOX_GRAD_RULES}
  base = c / BATCH
  inside = np.ones(SHAPE, bool)
  inside[:, :3] = False
  for r in ("full", "zero", "half"):
    np.testing.assert_allclose(g[r][inside], base[inside], rtol=1e-6)
  np.testing.assert_allclose(g["full"][:, :3], base[:, :3], rtol=1e-6)
  np.testing.assert_array_equal(g["zero"][:, :3], 0.0)
  np.testing.assert_allclose(g["half"][:, :2], base[:, :2] / 2, rtol=1e-6)
  np.testing.assert_array_equal(g["half"][:, 2], 0.0)


def test_boundary_rules_match_torch_clamp_of_the_gradalign_code():
  """`box_grad="half"` is what current PyTorch gives through GA's utils.clamp."""
  rng = np.random.default_rng(4)
  x = np.clip(rng.uniform(-0.3, 1.3, SHAPE), 0, 1).astype(np.float32)
  delta = rng.choice([0.0, EPS, -EPS], SHAPE).astype(np.float32)
  c = rng.normal(size=SHAPE).astype(np.float32)
  d = torch.tensor(delta, requires_grad=True)
  lo, hi = torch.zeros(1), torch.ones(1)
  point = torch.max(torch.min(torch.tensor(x) + d, hi), lo)
  (point * torch.tensor(c)).sum().div(BATCH).backward()
  ours = attacks.boundary_input_grad(_linear_loss(c), jnp.asarray(x), jnp.asarray(delta), "half")
  np.testing.assert_allclose(np.asarray(ours), d.grad.numpy(), rtol=1e-6, atol=0)


def test_fgsm_with_the_pytorch14_rule_leaves_boundary_pixels_unperturbed(params):
  x, y = _box_images(9), _labels(9)
  loss = ce_loss_fn(params, y)
  zero = np.asarray(attacks.fgsm(loss, jnp.asarray(x), eps=EPS, box_grad="zero").delta)
  full = np.asarray(attacks.fgsm(loss, jnp.asarray(x), eps=EPS).delta)
  at_boundary = (x == 0) | (x == 1)
  assert np.all(zero[at_boundary] == 0)
  # With the full gradient, about half of them move into the box.
  assert 0.3 < np.mean(full[at_boundary] != 0) < 0.7
  np.testing.assert_array_equal(zero[~at_boundary], full[~at_boundary])


def test_attacks_keep_float64_inputs_in_float64(params):
  with jax.enable_x64(True):
    x = jnp.asarray(_images(5), jnp.float64)
    y = _labels(5)
    p64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
    loss = closures.cross_entropy(lambda z: mlp_logits(p64, z, jnp.float64), y)
    for name in ("fgsm", "fgsm_rs", "pgd"):
      kwargs = dict(_row(name)["kwargs"])
      out = attacks.ATTACK_SPECS[name].fn(loss, x, jax.random.PRNGKey(0), eps=EPS, **kwargs)
      assert out.delta.dtype == jnp.float64 and out.grad_at_start.dtype == jnp.float64, name


@pytest.mark.parametrize("name,count", [("fgsm", 1), ("fgsm_rs", 1), ("n_fgsm", 1),
                                        ("multigrad", 3), ("pgd", 3), ("free", 1)])
def test_attacks_report_the_points_of_their_forward_passes(params, name, count):
  x, y = _box_images(12), _labels(12)
  out = _run(params, name, {}, x, y, jax.random.PRNGKey(1))
  points = np.asarray(out.forward_points)
  assert points.shape == (count,) + SHAPE
  np.testing.assert_array_equal(points[0], np.asarray(out.start))
  assert points.min() >= 0 and points.max() <= 1

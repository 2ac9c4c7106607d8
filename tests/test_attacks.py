"""Tests for fastadv_jax.attacks: perturbation sets, exact semantics, determinism,
compilation counts and boundary checks, on tiny models and one fixed shape."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fastadv_jax import attacks
from fastadv_jax import closures

SHAPE = (4, 8, 8, 3)
BATCH = SHAPE[0]
DIM = int(np.prod(SHAPE[1:]))
NUM_CLASSES = 10
EPS = 8 / 255


# ----------------------------------------------------------------------------
# Tiny models and data.
# ----------------------------------------------------------------------------

def _images(seed, low=0.0, high=1.0):
  rng = np.random.default_rng(seed)
  return rng.uniform(low, high, SHAPE).astype(np.float32)


def _labels(seed):
  return np.random.default_rng(seed).integers(0, NUM_CLASSES, BATCH).astype(np.int32)


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


TRACE_COUNTS = {}


@functools.lru_cache(maxsize=None)
def jitted_attack(name, **kwargs):
  """jit(attack) on the MLP's CE closure; eps and step are traced arguments.

  Counts how often the Python function is traced (= compiled) per configuration.
  """
  attack = attacks.get_attack(name)
  config = (name, tuple(sorted(kwargs.items())))
  TRACE_COUNTS[config] = 0

  @jax.jit
  def run(params, x, y, key, eps):
    TRACE_COUNTS[config] += 1
    return attack(ce_loss_fn(params, y), x, key, eps=eps, **kwargs)

  return run


ATTACK_CASES = [
    ("none", {}),
    ("fgsm", {}),
    ("fgsm_rs", {}),
    ("fgsm_rs", {"clip_init_to_box": False}),
    ("pgd", {"step": 2 / 255, "steps": 3}),
    ("pgd", {"step": 2 / 255, "steps": 3, "restarts": 2, "early_stop": True,
             "keep_best": True}),
    ("pgd", {"step": 0.5, "steps": 3, "norm": "l2", "restarts": 2,
             "select": "max_loss"}),
    ("zerograd", {"q": 0.35}),
    ("zerograd", {"q": 0.35, "mask_mode": "perturbation"}),
    ("multigrad", {}),
    ("n_fgsm", {}),
    ("fgsm_n", {}),
    ("random_corner", {}),
    ("random_corner", {"step": 4 / 255}),
    ("pgd_corner", {"step": 2 / 255, "steps": 2}),
]


def _run(params, name, kwargs, x, y, key, eps=EPS):
  fn = jitted_attack(name, **kwargs)
  return fn(params, jnp.asarray(x), jnp.asarray(y), key, eps)


# ----------------------------------------------------------------------------
# Perturbation sets.
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,kwargs", ATTACK_CASES,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(ATTACK_CASES)])
def test_attack_stays_in_its_set_and_the_box(params, name, kwargs):
  # Images touching both ends of the box exercise the box projection.
  x = _images(1)
  x[:, 0] = 0.0
  x[:, 1] = 1.0
  y = _labels(1)
  delta = _run(params, name, kwargs, x, y, jax.random.PRNGKey(3))
  delta = np.asarray(delta)
  assert delta.dtype == np.float32 and delta.shape == SHAPE
  adv = x + delta
  assert adv.min() >= 0.0 and adv.max() <= 1.0
  radius = attacks.perturbation_set_radius(name, EPS)
  if kwargs.get("norm") == "l2":
    norms = np.sqrt(np.sum(delta.reshape(BATCH, -1).astype(np.float64) ** 2, axis=1))
    assert np.all(norms <= EPS * (1 + 1e-5))
  else:
    assert np.abs(delta).max() <= radius * (1 + 1e-6)
  if name == "none":
    assert np.all(delta == 0)
  else:
    assert np.abs(delta).max() > 0


def test_unprojected_attacks_leave_the_eps_ball(params):
  x, y = _images(2, 0.2, 0.8), _labels(2)
  for name, factor in [("n_fgsm", 3.0), ("fgsm_n", 2.0)]:
    delta = np.asarray(_run(params, name, {}, x, y, jax.random.PRNGKey(0)))
    assert attacks.perturbation_set_radius(name, EPS) == pytest.approx(factor * EPS)
    assert np.abs(delta).max() > 1.5 * EPS, name
    assert np.abs(delta).max() <= factor * EPS * (1 + 1e-6)


def test_fgsm_on_a_linear_loss_is_eps_sign_of_its_gradient_clipped_to_the_box():
  rng = np.random.default_rng(4)
  c = rng.normal(size=SHAPE).astype(np.float32)
  x = _images(4)
  x[:, :2] = 0.0
  x[:, -2:] = 1.0
  loss_fn = lambda z: jnp.mean(jnp.sum(z * c, axis=(1, 2, 3)))
  delta, grad = attacks.fgsm(loss_fn, jnp.asarray(x), eps=EPS, return_grad=True)
  expected = np.clip(x + EPS * np.sign(c), 0.0, 1.0) - x
  np.testing.assert_allclose(np.asarray(delta), expected, rtol=0, atol=1e-7)
  np.testing.assert_allclose(np.asarray(grad), c / BATCH, rtol=1e-6)
  # A step larger than eps is clipped to the eps-ball.
  big = attacks.fgsm(loss_fn, jnp.asarray(x), eps=EPS, step=3 * EPS)
  np.testing.assert_allclose(np.asarray(big), expected, rtol=0, atol=1e-7)
  assert np.sum(np.abs(expected) == np.float32(EPS)) > 0
  assert np.sum(expected == 0) > 0  # the box clipped some coordinates


def test_fgsm_rs_follows_wong():
  """On a linear loss the gradient sign is known: delta = clip_eps(eta + 1.25 eps s)."""
  c = np.random.default_rng(5).normal(size=SHAPE).astype(np.float32)
  x = _images(5, 0.2, 0.8)
  loss_fn = lambda z: jnp.mean(jnp.sum(z * c, axis=(1, 2, 3)))
  delta = np.asarray(attacks.fgsm_rs(loss_fn, jnp.asarray(x), jax.random.PRNGKey(0),
                                     eps=EPS))
  s = np.sign(c)
  # eta + 1.25 eps s reaches the edge eps*s iff eta*s >= -0.25 eps (probability 5/8).
  at_edge = delta == np.float32(EPS) * s
  assert 0.5 < at_edge.mean() < 0.75
  moved = ~at_edge
  # There, eta + 1.25 eps s was inside the ball: delta - 1.25 eps s = eta in [-eps, -0.25 eps].
  eta = delta[moved] - np.float32(1.25 * EPS) * s[moved]
  assert np.all(np.abs(eta) <= EPS * (1 + 1e-5))
  assert np.all(eta * s[moved] <= -0.25 * EPS * (1 - 1e-5))


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
  plain = attacks.pgd(loss_fn, x, **kwargs)
  best = attacks.pgd(loss_fn, x, keep_best=True, **kwargs)
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
  strict_correct = np.asarray(loss_fn.with_aux(x + strict)[1].correct)
  max_loss_correct = np.asarray(loss_fn.with_aux(x + max_loss)[1].correct)
  assert not strict_correct.any()
  # The references' rule keeps the high-loss, correctly classified restart.
  assert max_loss_correct.all()


def test_pgd_strict_robust_set_is_within_max_loss_robust_set(params):
  x, y = _images(9), _labels(9)
  loss_fn = ce_loss_fn(params, y)
  kwargs = dict(eps=4 / 255, step=1 / 255, steps=3, restarts=3)
  key = jax.random.PRNGKey(1)
  strict = _run(params, "pgd", dict(step=1 / 255, steps=3, restarts=3), x, y, key, 4 / 255)
  max_loss = attacks.pgd(loss_fn, jnp.asarray(x), key, select="max_loss", **kwargs)
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
  delta = attacks.pgd(loss_fn, x, eps=EPS, step=2 / 255, steps=5, random_start=False)
  assert float(loss_fn(x + delta)) > float(clean.losses.mean())
  frozen = attacks.pgd(loss_fn, x, eps=EPS, step=2 / 255, steps=5,
                       random_start=False, early_stop=True)
  misclassified = ~np.asarray(clean.correct)
  assert misclassified.any() and (~misclassified).any()
  # Examples misclassified at the (zero) start are never updated.
  assert np.all(np.asarray(frozen)[misclassified] == 0)
  assert np.abs(np.asarray(frozen)[~misclassified]).max() > 0


def test_pgd_l2_stays_in_the_l2_ball_and_delta_init_is_used(params):
  x, y = jnp.asarray(_images(11, 0.1, 0.9)), _labels(11)
  loss_fn = ce_loss_fn(params, y)
  delta = attacks.pgd(loss_fn, x, jax.random.PRNGKey(0), eps=0.5, step=0.2, steps=4,
                      norm="l2")
  norms = np.linalg.norm(np.asarray(delta).reshape(BATCH, -1), axis=1)
  assert np.all(norms <= 0.5 * (1 + 1e-5)) and np.all(norms > 0.25)
  # steps=0 returns the (projected) start.
  init = np.full(SHAPE, 2 * EPS, np.float32)
  start = attacks.pgd(loss_fn, x, eps=EPS, step=0.0, steps=0, delta_init=init)
  np.testing.assert_array_equal(np.asarray(start), np.float32(EPS))


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
    delta = attacks.pgd(loss_fn, x, key, eps=EPS, step=2 / 255, steps=3, restarts=2,
                        early_stop=True)
    return delta, loss_fn.with_aux(x + delta)[1].correct, loss_fn.with_aux(x)[1].correct

  delta, adv_correct, clean_correct = attack(variables, x, y, jax.random.PRNGKey(1))
  delta = np.asarray(delta)
  assert np.abs(delta).max() <= EPS and (np.asarray(x) + delta).max() <= 1.0
  assert np.asarray(adv_correct).sum() <= np.asarray(clean_correct).sum()


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
  delta, grad = attacks.zerograd(ce_loss_fn(params, y), jnp.asarray(x),
                                 jax.random.PRNGKey(2), eps=EPS, q=q,
                                 mask_mode=mask_mode, return_grad=True)
  delta, grad = np.asarray(delta), np.asarray(grad)
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


def test_zerograd_quantile_ends_are_strict(params):
  """q = 1: the threshold is the largest |g|, which is kept (strict <); q = 0: none masked."""
  x, y = jnp.asarray(_images(14, 0.2, 0.8)), _labels(14)
  loss_fn = ce_loss_fn(params, y)
  key = jax.random.PRNGKey(2)
  top, grad = attacks.zerograd(loss_fn, x, key, eps=EPS, q=1.0, mask_mode="perturbation",
                               return_grad=True)
  top, grad = np.asarray(top).reshape(BATCH, -1), np.asarray(grad).reshape(BATCH, -1)
  assert np.all(np.sum(top != 0, axis=1) == 1)
  np.testing.assert_array_equal(np.argmax(np.abs(top), axis=1),
                                np.argmax(np.abs(grad), axis=1))
  none_masked = np.asarray(attacks.zerograd(loss_fn, x, key, eps=EPS, q=0.0,
                                            mask_mode="perturbation"))
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
  delta, g1 = attacks.multigrad(loss_fn, xj, key, eps=EPS, num_starts=3, return_grad=True)
  delta, g1 = np.asarray(delta), np.asarray(g1)
  np.testing.assert_array_equal(delta[fixed], np.float32(EPS) * np.sign(c[fixed]))
  free = delta[~fixed]
  kept = free != 0
  assert 0.15 < kept.mean() < 0.35
  np.testing.assert_array_equal(free[kept], np.float32(EPS) * np.sign(g1[~fixed][kept]))
  # One start keeps everything; the sequential variant gives the same result.
  single = np.asarray(attacks.multigrad(loss_fn, xj, key, eps=EPS, num_starts=1))
  assert np.all(single[~fixed] != 0)
  sequential = attacks.multigrad(loss_fn, xj, key, eps=EPS, num_starts=3, vectorize=False)
  np.testing.assert_array_equal(np.asarray(sequential), delta)


# ----------------------------------------------------------------------------
# Other single-step attacks and AT for Free.
# ----------------------------------------------------------------------------

def test_fgsm_n_returns_its_noise_and_steps_eps_from_it(params):
  x, y = jnp.asarray(_images(16, 0.2, 0.8)), _labels(16)
  delta, grad, eta = attacks.fgsm_n(ce_loss_fn(params, y), x, jax.random.PRNGKey(5),
                                    eps=EPS, return_grad=True, return_noise=True)
  delta, grad, eta = map(np.asarray, (delta, grad, eta))
  assert np.abs(eta).max() <= EPS and np.abs(eta).max() > 0.9 * EPS
  np.testing.assert_allclose(delta, eta + np.float32(EPS) * np.sign(grad), atol=1e-7)
  only_noise = attacks.n_fgsm(ce_loss_fn(params, y), x, jax.random.PRNGKey(5),
                              eps=EPS, return_noise=True)
  assert isinstance(only_noise, tuple) and len(only_noise) == 2
  assert np.abs(np.asarray(only_noise[1])).max() > 1.5 * EPS  # U[-2eps, 2eps]


def test_random_corner_and_pgd_corner_lie_on_corners(params):
  x, y = jnp.asarray(_images(17, 0.2, 0.8)), _labels(17)
  corner = np.asarray(attacks.random_corner(None, x, jax.random.PRNGKey(0), eps=EPS))
  assert np.all(np.abs(corner) == np.float32(EPS))
  assert 0.4 < (corner > 0).mean() < 0.6
  delta = np.asarray(attacks.pgd_corner(ce_loss_fn(params, y), x, jax.random.PRNGKey(1),
                                        eps=EPS, step=2 / 255, steps=2))
  assert np.all(np.isin(np.abs(delta), [0.0, np.float32(EPS)]))


def test_free_step_matches_fgsm_from_zero_and_accumulates(params):
  x, y = jnp.asarray(_images(18, 0.2, 0.8)), _labels(18)
  loss_fn = ce_loss_fn(params, y)
  zero = jnp.zeros(SHAPE, jnp.float32)
  step = EPS / 2
  first, grad = attacks.free_step(loss_fn, x, zero, eps=EPS, step=step, return_grad=True)
  np.testing.assert_array_equal(np.asarray(first),
                                np.asarray(attacks.fgsm(loss_fn, x, eps=EPS, step=step)))
  np.testing.assert_array_equal(
      np.asarray(attacks.free_update(x, zero, grad, eps=EPS, step=step)), np.asarray(first))
  delta = first
  for _ in range(3):
    delta = attacks.free_step(loss_fn, x, delta, eps=EPS, step=step)
  delta = np.asarray(delta)
  assert np.abs(delta).max() <= EPS and np.abs(delta).max() == np.float32(EPS)


# ----------------------------------------------------------------------------
# Randomness, compilation, dtypes, checks.
# ----------------------------------------------------------------------------

RANDOM_CASES = [(n, k) for n, k in ATTACK_CASES
                if n in ("fgsm_rs", "pgd", "zerograd", "multigrad", "n_fgsm",
                         "fgsm_n", "random_corner")][:7]


@pytest.mark.parametrize("name,kwargs", RANDOM_CASES,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(RANDOM_CASES)])
def test_same_key_same_delta_other_key_other_delta(params, name, kwargs):
  x, y = _images(19), _labels(19)
  a = np.asarray(_run(params, name, kwargs, x, y, jax.random.PRNGKey(7)))
  b = np.asarray(_run(params, name, kwargs, x, y, jax.random.PRNGKey(7)))
  c = np.asarray(_run(params, name, kwargs, x, y, jax.random.PRNGKey(8)))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_jitted_attacks_do_not_recompile_across_batches(params):
  kwargs = {"step": 2 / 255, "steps": 3, "restarts": 2, "early_stop": True,
            "keep_best": True}
  run = jitted_attack("pgd", **kwargs)
  config = ("pgd", tuple(sorted(kwargs.items())))
  before = TRACE_COUNTS[config]
  for seed, eps in [(20, EPS), (21, EPS), (22, 4 / 255)]:  # new data, new traced eps
    delta = run(params, jnp.asarray(_images(seed)), jnp.asarray(_labels(seed)),
                jax.random.PRNGKey(seed), eps)
    assert np.abs(np.asarray(delta)).max() <= eps * (1 + 1e-6)
  assert TRACE_COUNTS[config] - before <= 1
  assert TRACE_COUNTS[config] == 1
  assert run._cache_size() == 1


def test_bf16_model_gives_float32_perturbation(params):
  x, y = jnp.asarray(_images(23, 0.2, 0.8)), _labels(23)
  loss_fn = ce_loss_fn(params, y, dtype=jnp.bfloat16)
  key = jax.random.PRNGKey(0)
  for delta in [attacks.fgsm_rs(loss_fn, x, key, eps=EPS),
                attacks.zerograd(loss_fn, x, key, eps=EPS, q=0.35),
                attacks.pgd(loss_fn, x, key, eps=EPS, step=2 / 255, steps=2, restarts=2)]:
    delta = np.asarray(delta)
    assert delta.dtype == np.float32
    # Random-init coordinates are float32 values that bf16 cannot represent.
    as_bf16 = np.asarray(jnp.asarray(delta).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.mean(as_bf16 != delta) > 0.1
  _, grad = attacks.fgsm(loss_fn, x, eps=EPS, return_grad=True)
  assert grad.dtype == jnp.float32


def test_traced_arguments_pass_the_checks(params):
  x, y = jnp.asarray(_images(24)), jnp.asarray(_labels(24))

  @jax.jit
  def run(eps, q, x):
    return attacks.zerograd(ce_loss_fn(params, y), x, jax.random.PRNGKey(0), eps=eps, q=q)

  # eps = 0 at the start of a warm-up: traced, unchecked, and a zero perturbation.
  assert np.all(np.asarray(run(0.0, 0.35, x)) == 0)
  assert np.abs(np.asarray(run(EPS, 0.35, x))).max() > 0


def _plain_loss(params, y):
  return lambda z: jnp.mean(closures.cross_entropy_per_example(mlp_logits(params, z), y))


@pytest.mark.parametrize("case", [
    "negative_eps", "eps_in_255", "negative_step", "q_above_one", "image_outside_box",
    "delta_init_shape", "unknown_norm", "unknown_select", "unknown_mask_mode",
    "early_stop_plain", "restarts_plain", "restarts_without_random_start",
    "steps_float", "missing_key", "unknown_attack", "free_delta_shape"])
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
      "steps_float": lambda: attacks.pgd(loss_fn, x, key, eps=EPS, step=EPS, steps=2.0),
      "missing_key": lambda: attacks.fgsm_rs(loss_fn, x, None, eps=EPS),
      "unknown_attack": lambda: attacks.get_attack("fgsm_gradalign"),
      "free_delta_shape": lambda: attacks.free_step(loss_fn, x, jnp.zeros((4, 8, 8, 1)),
                                                    eps=EPS),
  }
  with pytest.raises(ValueError) as info:
    calls[case]()
  if case == "unknown_attack":
    assert "fgsm_rs" in str(info.value) and "zerograd" in str(info.value)
  if case == "early_stop_plain":
    assert "with_aux" in str(info.value)


def test_registry_is_complete():
  expected = {"none", "fgsm", "fgsm_rs", "pgd", "zerograd", "multigrad", "n_fgsm",
              "fgsm_n", "random_corner", "pgd_corner"}
  assert set(attacks.ATTACKS) == expected
  for name in expected:
    assert attacks.get_attack(name) is attacks.ATTACKS[name]

"""Tests for fastadv_jax.metrics: known answers on linear and quadratic losses, lemmas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import closures
from fastadv_jax import metrics as M

EPS = 8 / 255
B, H, W, C = 4, 4, 4, 3
D = H * W * C


def _run(fn):
  """Evaluates a zero-argument function under jit (one compilation)."""
  return jax.jit(fn)()


@pytest.fixture(scope="module")
def images():
  return jax.random.uniform(jax.random.key(0), (B, H, W, C), jnp.float32, 0.05, 0.95)


@pytest.fixture(scope="module")
def linear_problem(images):
  """A model linear in x and a loss linear in its logits: the input gradient is constant."""
  weights = jax.random.normal(jax.random.key(1), (D, 5))
  logits_fn = lambda x: x.reshape(x.shape[0], -1) @ weights
  labels = jnp.array([0, 1, 2, 3])
  loss_fn = closures.LossFn(logits_fn, labels,
                            lambda z, y: -jnp.take_along_axis(z, y[:, None], axis=1)[:, 0],
                            "negative_logit")
  per_example_grad = -weights[:, labels].T.reshape(B, H, W, C)
  return loss_fn, per_example_grad


def _quadratic_problem(eigenvalues):
  """ℓᵢ = ½ xᵢᵀ A xᵢ with a known spectrum; loss_fn is the batch mean."""
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(2), (D, D)))
  a = (q * jnp.asarray(eigenvalues)) @ q.T
  per_example = lambda x: 0.5 * jnp.einsum("bi,ij,bj->b", x.reshape(x.shape[0], -1), a,
                                          x.reshape(x.shape[0], -1))
  return a, per_example


def test_gradient_alignment_of_a_linear_model_is_one(linear_problem, images):
  loss_fn, _ = linear_problem
  per_example, mean = _run(lambda: (
      M.gradient_alignment(loss_fn, images, jax.random.key(3), eps=EPS, reduce="none"),
      M.gradient_alignment(loss_fn, images, jax.random.key(3), eps=EPS)))
  np.testing.assert_allclose(np.asarray(per_example), 1.0, rtol=1e-5)
  assert float(mean) == pytest.approx(1.0, rel=1e-5)


def test_gradient_alignment_given_eta_and_validity(linear_problem, images):
  loss_fn, _ = linear_problem
  key = jax.random.key(3)
  eta = jax.random.uniform(key, images.shape, jnp.float32, -EPS, EPS)
  drawn, given = _run(lambda: (
      M.gradient_alignment(loss_fn, images, key, eps=EPS, reduce="none"),
      M.gradient_alignment(loss_fn, images, eps=EPS, eta=eta, reduce="none")))
  np.testing.assert_array_equal(np.asarray(drawn), np.asarray(given))
  # a zero gradient (a loss flat in example 0's input): cosine 0, not valid
  mask = jnp.arange(images.shape[0]).reshape(-1, 1, 1, 1) > 0
  flat = lambda x: loss_fn(jnp.where(mask, x, 0.0))
  cos, valid = _run(lambda: M.gradient_alignment(flat, images, key, eps=EPS, reduce="none",
                                                 return_valid=True))
  np.testing.assert_array_equal(np.asarray(valid), [False, True, True, True])
  np.testing.assert_allclose(np.asarray(cos), [0.0, 1.0, 1.0, 1.0], atol=1e-5)
  with pytest.raises(ValueError, match="key"):
    M.gradient_alignment(loss_fn, images, eps=EPS)
  with pytest.raises(ValueError, match="eta"):
    M.gradient_alignment(loss_fn, images, eps=EPS, eta=eta[:2])


def test_gradient_alignment_is_below_one_for_a_curved_loss(images):
  _, per_example = _quadratic_problem(np.linspace(-3.0, 5.0, D))
  loss_fn = lambda x: jnp.mean(per_example(x))
  value = float(_run(lambda: M.gradient_alignment(loss_fn, images, jax.random.key(3), eps=0.3)))
  assert 0.0 < value < 0.999


def test_perturbation_cosine_and_sign_statistics():
  delta = jnp.array([[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(M.perturbation_cosine(delta, 3 * delta), [1.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(M.perturbation_cosine(delta, -delta), [-1.0, 0.0], atol=1e-6)
  ref = jnp.array([[1.0, 2.0, 0.5, 1.0], [1.0, -1.0, 1.0, 1.0]])
  # Row 0: coordinate 1 flips, coordinate 3 is 0 vs +: 2 of 4 (1 of 3 ignoring zeros).
  np.testing.assert_allclose(M.sign_disagreement(delta, ref), [0.5, 1.0])
  np.testing.assert_allclose(M.sign_disagreement(delta, ref, ignore_zeros=True), [1 / 3, 0.0])
  np.testing.assert_allclose(M.perturbation_l1_norm(delta), [3.5, 0.0])
  assert float(M.perturbation_l1_norm(delta, reduce="mean")) == pytest.approx(1.75)


def test_linearization_error(linear_problem, images):
  loss_fn, _ = linear_problem
  delta = EPS * jnp.sign(jax.random.normal(jax.random.key(4), images.shape))
  err_linear = _run(lambda: M.linearization_error(loss_fn, images, delta, per_example=True))
  np.testing.assert_allclose(np.asarray(err_linear), 0.0, atol=1e-4)
  # Quadratic: the error is exactly ½ δᵀAδ per example.
  a, per_example = _quadratic_problem(np.linspace(0.5, 4.0, D))
  quad = closures.LossFn(lambda x: x, jnp.zeros(B, jnp.int32),
                         lambda z, y: per_example(z), "quadratic")
  expected = 0.5 * jnp.einsum("bi,ij,bj->b", delta.reshape(B, -1), a, delta.reshape(B, -1))
  err, err_batch = _run(lambda: (M.linearization_error(quad, images, delta, per_example=True),
                                 M.linearization_error(quad, images, delta)))
  np.testing.assert_allclose(np.asarray(err), np.asarray(expected), rtol=2e-3)
  assert float(err_batch) == pytest.approx(float(jnp.mean(expected)), rel=2e-3)


def test_fixed_linf_perturbation_and_error_curve(images):
  delta = M.fixed_linf_perturbation(jax.random.key(5), images.shape, eps=EPS, fraction=0.25)
  flat = np.asarray(delta).reshape(B, -1)
  np.testing.assert_allclose(np.abs(flat).max(axis=1), EPS, rtol=1e-6)
  assert (np.count_nonzero(flat, axis=1) == 12).all()
  np.testing.assert_allclose(np.linalg.norm(flat, axis=1), EPS * math.sqrt(12), rtol=1e-5)
  # The error of a quadratic with A = c·I is c/2·‖δ‖²: it grows with the ℓ2 norm.
  loss_fn = lambda x: jnp.mean(jnp.sum(1.5 * x ** 2, axis=(1, 2, 3)))
  norms, errors = _run(lambda: M.linearization_error_curve(
      loss_fn, images, jax.random.key(6), eps=EPS, fractions=(0.25, 0.5, 1.0),
      direction="gradient"))
  np.testing.assert_allclose(np.asarray(norms), EPS * np.sqrt([12, 24, 48]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(errors), 1.5 * np.asarray(norms) ** 2, rtol=2e-3)


def test_input_gradient_l1_and_effectiveness(linear_problem, images):
  loss_fn, per_example_grad = linear_problem
  expected = np.abs(np.asarray(per_example_grad)).reshape(B, -1).sum(axis=1)
  ig, ig_mean = _run(lambda: (M.input_gradient_l1(loss_fn, images, reduce="none"),
                              M.input_gradient_l1(loss_fn, images)))
  np.testing.assert_allclose(np.asarray(ig), expected, rtol=1e-5)
  assert float(ig_mean) == pytest.approx(expected.mean(), rel=1e-5)
  # For a linear loss and δ = ε·sign(∇ℓ) the loss rises by exactly ε‖∇ℓ‖₁.
  fgsm = EPS * jnp.sign(per_example_grad)
  effectiveness, variance, increase = _run(lambda: (
      M.adversarial_effectiveness(loss_fn, images, fgsm, eps=EPS, reduce="none"),
      M.adversarial_variance(loss_fn, images, fgsm),
      M.adversarial_loss_increase(loss_fn, images, fgsm)))
  np.testing.assert_allclose(np.asarray(effectiveness), 1.0, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(increase), EPS * expected, rtol=1e-4)
  assert float(variance) == pytest.approx(float(np.var(EPS * expected)), rel=1e-3)


def test_hessian_eigenvalues_of_a_known_quadratic(images):
  spectrum = np.concatenate([[9.0, 6.0, 3.0], np.linspace(-0.5, 1.0, D - 3)])
  _, per_example = _quadratic_problem(spectrum)
  loss_fn = lambda x: jnp.mean(per_example(x))
  per_ex, whole = _run(lambda: (
      M.hessian_top_eigenvalues(loss_fn, images, jax.random.key(7), k=3, iters=60,
                                per_example=True),
      M.hessian_top_eigenvalues(loss_fn, images[:1], jax.random.key(8), k=2, iters=60)))
  assert per_ex.shape == (B, 3)
  np.testing.assert_allclose(np.asarray(per_ex), np.tile([9.0, 6.0, 3.0], (B, 1)), rtol=1e-3)
  # Whole-batch convention (batch of one here): the Hessian of the batch mean.
  np.testing.assert_allclose(np.asarray(whole), [9.0, 6.0], rtol=1e-3)
  # With B examples the batch-mean Hessian is block-diagonal with blocks A/B.
  top = _run(lambda: M.hessian_top_eigenvalues(loss_fn, images, jax.random.key(9), iters=60))
  np.testing.assert_allclose(np.asarray(top), [9.0 / B], rtol=1e-3)


def test_weight_change_norm():
  a = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  b = {"w": jnp.zeros((2, 3)), "b": jnp.full(3, 2.0)}
  assert float(M.weight_change_norm(a, b)) == pytest.approx(math.sqrt(6 + 12))
  assert float(M.weight_change_norm(a, b, relative=True)) == pytest.approx(
      math.sqrt(18) / math.sqrt(12))
  with pytest.raises(ValueError, match="leaves"):
    M.weight_change_norm(a, {"w": a["w"]})


@pytest.mark.parametrize("alpha", [0.0, EPS, 1.25 * EPS, 2.0 * EPS, 3.0 * EPS])
def test_lemma1_closed_form_matches_monte_carlo(alpha):
  dim = 3072
  bound = M.lemma1_fgsm_rs_norm_bound(EPS, alpha, dim)
  mean_norm, rms_norm = M.lemma1_monte_carlo(jax.random.key(10), eps=EPS, alpha=alpha,
                                             dim=dim, num_samples=400)
  assert float(rms_norm) == pytest.approx(bound, rel=0.01)
  assert float(mean_norm) <= bound * (1 + 1e-3)
  if alpha == 0.0:
    assert bound == pytest.approx(EPS * math.sqrt(dim / 3))
  if alpha >= 2 * EPS:
    assert bound == pytest.approx(EPS * math.sqrt(dim))
  # FGSM-RS moves less than FGSM with the same step (the point of Lemma 1).
  if 0 < alpha <= 2 * EPS:
    assert bound < EPS * math.sqrt(dim) + 1e-12


def test_lemma2_limit_matches_wide_single_layer_cnns():
  x = jax.random.uniform(jax.random.key(11), (2, 6, 6, 3))
  eps = 64 / 255  # large enough that the alignment is clearly below 1
  limit, wide, small_eps = _run(lambda: (
      M.lemma2_alignment_at_init(jax.random.key(12), x, eps=eps, num_samples=32),
      M.single_layer_cnn_alignment(jax.random.key(13), x, eps=eps, filters=256, num_inits=8),
      M.lemma2_alignment_at_init(jax.random.key(12), x, eps=2 / 255, num_samples=32)))
  limit, wide = np.asarray(limit), np.asarray(wide)
  assert ((limit > 0.5) & (limit < 0.95)).all()
  np.testing.assert_allclose(wide, limit, atol=0.01)
  assert (np.asarray(small_eps) > limit).all()  # less noise, better alignment


def test_bad_concrete_input_raises(images):
  loss_fn = lambda x: jnp.mean(x ** 2)
  with pytest.raises(ValueError, match="k=49 is larger than the input dimension 48"):
    M.hessian_top_eigenvalues(loss_fn, images, jax.random.key(0), k=D + 1, per_example=True)
  with pytest.raises(ValueError, match="k must be >= 1"):
    M.hessian_top_eigenvalues(loss_fn, images, jax.random.key(0), k=0)
  with pytest.raises(ValueError, match="fraction"):
    M.fixed_linf_perturbation(jax.random.key(0), images.shape, eps=EPS, fraction=0.0)
  with pytest.raises(ValueError, match="fraction"):
    M.fixed_linf_perturbation(jax.random.key(0), images.shape, eps=EPS, fraction=1.5)
  with pytest.raises(ValueError, match="Unknown reduce"):
    M.perturbation_l1_norm(images, reduce="sum")
  with pytest.raises(ValueError, match="Unknown direction"):
    M.linearization_error_curve(loss_fn, images, jax.random.key(0), eps=EPS, fractions=(0.5,),
                                direction="pgd")
  with pytest.raises(ValueError, match="pixel units"):
    M.gradient_alignment(loss_fn, images, jax.random.key(0), eps=8)
  with pytest.raises(ValueError, match="closures.LossFn"):
    M.linearization_error(loss_fn, images, images, per_example=True)


def test_pyhessian_solver_converges_deflates_and_reports(images):
  """PyHessian's power iteration with deflation and tol 1e-3 (AdvLC's copy):
  the top eigenvalues of a known quadratic, found in order, each converged in
  fewer than max_iter products; a too small budget is reported unconverged."""
  spectrum = np.concatenate([[9.0, 6.0, 3.0], np.linspace(-0.5, 1.0, D - 3)])
  _, per_example = _quadratic_problem(spectrum)
  loss_fn = lambda x: jnp.mean(per_example(x))
  one = images[:1]
  full, short = _run(lambda: (
      M.hessian_eigenvalues(loss_fn, one, jax.random.key(3), top_n=3),
      M.hessian_eigenvalues(loss_fn, one, jax.random.key(3), top_n=3, max_iter=2)))
  # The stopping rule bounds the relative change, not the error: the error is
  # about tol·(ratio of eigenvalues) at most, well within 1e-2 here.
  np.testing.assert_allclose(np.asarray(full.values), [9.0, 6.0, 3.0], rtol=1e-2)
  assert np.all(np.asarray(full.converged))
  assert np.all(np.asarray(full.iterations) < 100) and np.all(np.asarray(full.iterations) > 2)
  assert not np.any(np.asarray(short.converged))
  np.testing.assert_array_equal(np.asarray(short.iterations), 2)

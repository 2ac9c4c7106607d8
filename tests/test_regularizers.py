"""Tests for fastadv_jax.regularizers: exact parameter gradients, formulations, registry."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import closures
from fastadv_jax import regularizers as R

EPS = 8 / 255
B, H, W, C_IN, HIDDEN, CLASSES = 4, 2, 2, 2, 5, 3


# ---------------------------------------------------------------------------
# A tiny smooth (softplus) model, float64 finite differences
# ---------------------------------------------------------------------------

def _tiny_logits_fn(params):
  def logits_fn(x):
    h = jax.nn.softplus(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
    return h @ params["w2"]
  return logits_fn


def _tiny_problem(dtype):
  keys = jax.random.split(jax.random.key(0), 6)
  d = H * W * C_IN
  params = {
      "w1": jax.random.normal(keys[0], (d, HIDDEN), dtype) * 2.0,
      "b1": jax.random.normal(keys[1], (HIDDEN,), dtype),
      "w2": jax.random.normal(keys[2], (HIDDEN, CLASSES), dtype) * 2.0,
  }
  x = jax.random.uniform(keys[3], (B, H, W, C_IN), dtype, 0.1, 0.9)
  y = jnp.arange(B) % CLASSES
  delta = (EPS * jnp.sign(jax.random.normal(keys[4], x.shape))).astype(dtype)
  direction = jax.tree_util.tree_map(
      lambda p, k: jax.random.normal(k, p.shape, dtype), params,
      dict(zip(sorted(params), jax.random.split(keys[5], len(params)))))
  return params, x, y, delta, direction


def _cross_entropy_any_precision(logits, labels):
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]


def _regularizer_cases():
  """name -> function(logits_fn, labels, x, delta, g_start) -> scalar.

  `g_start` is GradAlign's first gradient computed at the base parameters: with
  the default stop-gradient it is a constant, so the finite differences must
  hold it fixed too.
  """
  key = jax.random.key(7)

  def ce(lf, y):
    # closures.cross_entropy computes in float32; this one keeps float64.
    return closures.LossFn(lf, y, _cross_entropy_any_precision, "ce")

  cases = {}
  for form in R.FORMULATIONS:
    cases[f"grad_align/{form}"] = functools.partial(
        lambda lf, y, x, d, g, form: R.grad_align(ce(lf, y), x, key, eps=EPS, formulation=form,
                                                  grad_start=g), form=form)
    cases[f"grad_align_both/{form}"] = functools.partial(
        lambda lf, y, x, d, g, form: R.grad_align(ce(lf, y), x, key, eps=EPS, formulation=form,
                                                  differentiate_both=True), form=form)
    cases[f"cure/{form}"] = functools.partial(
        lambda lf, y, x, d, g, form: R.cure(ce(lf, y), x, eps=EPS, formulation=form), form=form)
    cases[f"igr/{form}"] = functools.partial(
        lambda lf, y, x, d, g, form: R.input_grad_norm(ce(lf, y), x, formulation=form),
        form=form)
  for name in ("advlc", "advlc_l1", "advlc_l2", "advlc_kl", "advlc_js", "advlc_nuclear"):
    cases[name] = functools.partial(
        lambda lf, y, x, d, g, name: R.regularizer_value(
            name, R.RegularizerContext(lf, y, x, d, key, EPS)), name=name)
  return cases, ce


CASES, _CE64 = _regularizer_cases()


@pytest.fixture(scope="module")
def float64_results():
  """For every case: (analytic directional derivative, central finite difference)."""
  results = {}
  with jax.enable_x64(True):
    params, x, y, delta, direction = _tiny_problem(jnp.float64)
    g_start = jax.grad(_CE64(_tiny_logits_fn(params), y))(x)
    for name, fn in CASES.items():
      def objective(p, fn=fn):
        return fn(_tiny_logits_fn(p), y, x, delta, g_start)
      value_and_grad = jax.jit(jax.value_and_grad(objective))  # one compilation per case
      value, grad = value_and_grad(params)
      analytic = sum(jnp.vdot(grad[k], direction[k]) for k in params)
      h = 1e-5
      shifted = lambda s: jax.tree_util.tree_map(lambda p, u: p + s * u, params, direction)
      numeric = (value_and_grad(shifted(h))[0] - value_and_grad(shifted(-h))[0]) / (2 * h)
      results[name] = (float(value), float(analytic), float(numeric),
                       jax.tree_util.tree_map(np.asarray, grad))
  return results


@pytest.mark.parametrize("name", sorted(CASES))
def test_parameter_gradient_matches_finite_differences(float64_results, name):
  value, analytic, numeric, _ = float64_results[name]
  assert np.isfinite(value) and value > 0, (name, value)
  assert abs(numeric) > 1e-8, (name, numeric)  # the check is not vacuous
  np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("family", ["grad_align", "grad_align_both", "cure", "igr"])
def test_formulations_agree_in_float64(float64_results, family):
  a = float64_results[f"{family}/reverse_over_forward"]
  b = float64_results[f"{family}/reverse_over_reverse"]
  assert a[0] == pytest.approx(b[0], rel=1e-12)
  for k in a[3]:
    np.testing.assert_allclose(a[3][k], b[3][k], rtol=1e-9, atol=1e-13)


def test_differentiating_both_gradients_changes_the_gradient(float64_results):
  one = float64_results["grad_align/reverse_over_reverse"]
  both = float64_results["grad_align_both/reverse_over_reverse"]
  assert one[0] == pytest.approx(both[0], rel=1e-12)  # same value
  assert not np.allclose(one[3]["w1"], both[3]["w1"])  # different gradient


# ---------------------------------------------------------------------------
# A small PreActResNet with BatchNorm in batch mode, float32
# ---------------------------------------------------------------------------

def _small_model():
  models = pytest.importorskip("fastadv_jax.models")
  model = models.get_model("preact_resnet18", widths=(8, 16, 32, 64))
  variables = models.init_variables(model, jax.random.key(0), (16, 16, 3))
  return model, variables


@pytest.fixture(scope="module")
def resnet_results():
  model, variables = _small_model()
  x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
  y = jnp.array([0, 1, 2, 3])

  def loss_fn_of(params):
    lf = closures.logits_fn(model, {"params": params, "batch_stats": variables["batch_stats"]},
                            bn="batch")
    return closures.cross_entropy(lf, y)

  out = {}
  for form in R.FORMULATIONS:
    def total(params, form=form):
      return R.grad_align(loss_fn_of(params), x, jax.random.key(2), eps=EPS, formulation=form)
    out[form] = jax.jit(jax.value_and_grad(total))(variables["params"])
  return out


def _run(fn):
  """Evaluates a zero-argument function under jit: one compilation instead of
  many op-by-op dispatches (much faster for double backprop on CPU)."""
  return jax.jit(fn)()


def _flat_tree(tree):
  return jnp.concatenate([jnp.ravel(a) for a in jax.tree_util.tree_leaves(tree)])


def test_formulations_agree_on_preact_resnet_with_batchnorm(resnet_results):
  (va, ga), (vb, gb) = (resnet_results["reverse_over_forward"],
                        resnet_results["reverse_over_reverse"])
  assert 0 < float(va) < 2
  assert abs(float(va) - float(vb)) <= 1e-5 * abs(float(vb))
  fa, fb = _flat_tree(ga), _flat_tree(gb)
  assert float(jnp.linalg.norm(fb)) > 0
  rel = float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb))
  assert rel < 1e-5, rel


# ---------------------------------------------------------------------------
# GradAlign options, float32 on the tiny model
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny32():
  return _tiny_problem(jnp.float32)


def test_grad_align_is_zero_for_a_loss_linear_in_x():
  w = jax.random.normal(jax.random.key(3), (B, H, W, C_IN))
  linear_loss = lambda x: jnp.mean(jnp.sum(x * w, axis=(1, 2, 3)))
  x = jax.random.uniform(jax.random.key(4), (B, H, W, C_IN))
  values = _run(lambda: [R.grad_align(linear_loss, x, jax.random.key(5), eps=EPS,
                                      formulation=form) for form in R.FORMULATIONS])
  for value in values:
    assert float(value) == pytest.approx(0.0, abs=1e-6)


def test_grad_align_drops_examples_with_zero_gradient():
  # Example 0's loss does not depend on x: its gradient is exactly zero, so the
  # mean cosine runs over the three other examples only.
  w = jax.random.normal(jax.random.key(3), (B, H, W, C_IN)).at[0].set(0.0)
  curvature = jnp.ones((B, 1, 1, 1)).at[0].set(0.0)
  loss = lambda x: jnp.mean(jnp.sum(w * x + curvature * x ** 2, axis=(1, 2, 3)))
  x = jax.random.uniform(jax.random.key(4), (B, H, W, C_IN))
  key = jax.random.key(5)
  nothing = lambda x: jnp.mean(0.0 * x)

  def compute():
    eta = jax.random.uniform(key, x.shape, jnp.float32, -EPS, EPS)
    cos, valid = R.per_example_cosine(jax.grad(loss)(x), jax.grad(loss)(x + eta))
    return dict(cos=cos, valid=valid,
                got=[R.grad_align(loss, x, key, eps=EPS, formulation=f) for f in R.FORMULATIONS],
                nothing=R.grad_align(nothing, x, key, eps=EPS),
                grads=jax.grad(lambda z: R.grad_align(loss, z, key, eps=EPS))(x))

  r = _run(compute)
  assert r["valid"].tolist() == [False, True, True, True]
  expected = float(jnp.mean(1 - r["cos"][1:]))
  assert expected > 1e-5
  for got in r["got"]:
    np.testing.assert_allclose(float(got), expected, rtol=1e-3, atol=1e-7)
  assert float(r["nothing"]) == 0.0  # every example dropped
  assert bool(jnp.all(jnp.isfinite(r["grads"])))  # no NaN from the zero norms


def test_grad_align_reuses_grad_start_and_x_start(tiny32):
  params, x, y, _, _ = tiny32
  loss = closures.cross_entropy(_tiny_logits_fn(params), y)
  key = jax.random.key(9)
  x_start = jnp.clip(x + 0.01, 0, 1)
  a, b, c = _run(lambda: (
      R.grad_align(loss, x, key, eps=EPS, x_start=x_start),
      R.grad_align(loss, x, key, eps=EPS, grad_start=jax.grad(loss)(x_start)),
      R.grad_align(loss, x, key, eps=EPS)))
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
  assert abs(float(a) - float(c)) > 1e-3 * abs(float(c))


def test_grad_align_every_k_steps(tiny32):
  params, x, y, _, _ = tiny32

  @jax.jit
  def value_and_grad(p, step):
    def total(p):
      loss = closures.cross_entropy(_tiny_logits_fn(p), y)
      return R.grad_align(loss, x, jax.random.key(1), eps=EPS, every=3, step=step)
    return jax.value_and_grad(total)(p)

  loss = closures.cross_entropy(_tiny_logits_fn(params), y)
  full, scaled = _run(lambda: (
      R.grad_align(loss, x, jax.random.key(1), eps=EPS),
      R.grad_align(loss, x, jax.random.key(1), eps=EPS, every=3, step=0, scale_by_every=True)))
  on, g_on = value_and_grad(params, 6)
  off, g_off = value_and_grad(params, 7)
  np.testing.assert_allclose(float(on), float(full), rtol=1e-4)
  assert float(off) == 0.0
  assert float(jnp.linalg.norm(_flat_tree(g_off))) == 0.0
  assert float(jnp.linalg.norm(_flat_tree(g_on))) > 0.0
  np.testing.assert_allclose(float(scaled), 3 * float(full), rtol=1e-4)


def test_grad_align_subset(tiny32):
  params, x, y, _, _ = tiny32
  lf = _tiny_logits_fn(params)
  eps = 0.3  # a large radius: 1 - cos well above float32 rounding

  def both():
    half = R.grad_align(closures.cross_entropy(lf, y), x, jax.random.key(1), eps=eps,
                        subset_fraction=0.5)
    eta = jax.random.uniform(jax.random.key(1), (2, H, W, C_IN), jnp.float32, -eps, eps)
    loss_half = closures.cross_entropy(lf, y[:2])
    g1, g2 = jax.grad(loss_half)(x[:2]), jax.grad(loss_half)(x[:2] + eta)
    return half, 1 - jnp.mean(R.per_example_cosine(g1, g2)[0])

  half, expected = _run(both)
  assert float(expected) > 1e-4
  np.testing.assert_allclose(float(half), float(expected), rtol=1e-4)
  with pytest.raises(ValueError, match="LossFn"):
    R.grad_align(lambda z: jnp.mean(lf(z)), x, jax.random.key(1), eps=EPS, subset_fraction=0.5)


# ---------------------------------------------------------------------------
# CURE / IGR conventions, AdvLC selection, λ(ε), registry
# ---------------------------------------------------------------------------

def test_gradient_penalty_scales(tiny32):
  params, x, y, _, _ = tiny32
  loss = closures.cross_entropy(_tiny_logits_fn(params), y)

  def compute():
    g = jax.grad(loss)(x)
    # Per-example reading: mean_i ||grad_{x_i} l_i||^2, l_i the example's own loss.
    own = jax.vmap(jax.grad(lambda xi, yi: closures.cross_entropy_per_example(
        _tiny_logits_fn(params)(xi[None]), yi[None])[0]))(x, y)
    moved = x + EPS * jnp.sign(g)
    return dict(
        frob=jnp.sum(g ** 2), own=jnp.mean(jnp.sum(own ** 2, axis=(1, 2, 3))),
        per_example=R.input_grad_norm(loss, x),
        batch_mean=R.input_grad_norm(loss, x, scale="batch_mean"),
        averaged=R.input_grad_norm(loss, x, scale="batch_mean_averaged"),
        cure=R.cure(loss, x, eps=EPS),
        cure_expected=B * jnp.sum((jax.grad(loss)(moved) - g) ** 2))

  r = {k: float(v) for k, v in _run(compute).items()}
  np.testing.assert_allclose(r["per_example"], B * r["frob"], rtol=1e-5)
  np.testing.assert_allclose(r["per_example"], r["own"], rtol=1e-5)
  np.testing.assert_allclose(r["batch_mean"], r["frob"], rtol=1e-5)
  np.testing.assert_allclose(r["averaged"], r["frob"] / B, rtol=1e-5)
  assert r["cure_expected"] > 0
  np.testing.assert_allclose(r["cure"], r["cure_expected"], rtol=1e-4)


def test_advlc_selects_exactly_n_entries():
  batch, classes, fraction = 8, 10, 0.13   # N = floor(10.4) = 10
  z_clean = jax.random.normal(jax.random.key(0), (batch, classes))
  z_adv = z_clean + jax.random.normal(jax.random.key(1), (batch, classes))
  value, grad = jax.jit(jax.value_and_grad(
      lambda za: R.advlc_from_logits(z_clean, za, top_fraction=fraction)))(z_adv)
  diffs = np.sort(np.abs(np.asarray(z_adv - z_clean)).ravel())[::-1]
  assert int(np.sum(np.asarray(grad) != 0)) == 10
  np.testing.assert_allclose(float(value), diffs[:10].sum() / batch, rtol=1e-6)
  # Default 10% of B·C = 8 entries; fraction 1 is the plain L1 variant.
  grad_default = jax.jit(jax.grad(lambda za: R.advlc_from_logits(z_clean, za)))(z_adv)
  assert int(np.sum(np.asarray(grad_default) != 0)) == 8
  plain = R.advlc_from_logits(z_clean, z_adv, top_fraction=1.0)
  np.testing.assert_allclose(float(plain), diffs.sum() / batch, rtol=1e-6)


def test_advlc_clean_point_and_precomputed_logits(tiny32):
  params, x, y, delta, _ = tiny32
  lf = _tiny_logits_fn(params)
  x_start = jnp.clip(x + 0.02, 0, 1)
  ctx = R.RegularizerContext(lf, y, x, delta, jax.random.key(0), EPS, x_start=x_start)
  at_x, at_start, expected_x, expected_start, pre = _run(lambda: (
      R.regularizer_value("advlc", ctx),
      R.regularizer_value("advlc", ctx, clean_point="start"),
      R.advlc_from_logits(lf(x), lf(x + delta)),
      R.advlc_from_logits(lf(x_start), lf(x + delta)),
      R.adv_logit_consistency(lf, x, delta, logits_adv=lf(x + delta))))
  np.testing.assert_allclose(float(at_x), float(expected_x), rtol=1e-6)
  np.testing.assert_allclose(float(at_start), float(expected_start), rtol=1e-6)
  assert abs(float(at_x) - float(at_start)) > 1e-4
  np.testing.assert_allclose(float(pre), float(at_x), rtol=1e-6)


def test_lambda_for_eps():
  assert R.lambda_for_eps("cifar10", 8 / 255) == pytest.approx(0.2)
  assert R.lambda_for_eps("cifar10", 16 / 255) == pytest.approx(2.0)
  assert R.lambda_for_eps("svhn", 8 / 255) == pytest.approx(2.5)
  assert R.lambda_for_eps("cifar10", 4 / 255) == pytest.approx(0.02 * 10 ** 0.5)


def test_regularizer_value_matches_direct_call(tiny32):
  params, x, y, delta, _ = tiny32
  lf = _tiny_logits_fn(params)
  key = jax.random.key(3)
  ctx = R.RegularizerContext(lf, y, x, delta, key, EPS)
  r = _run(lambda: dict(
      direct=R.grad_align(closures.cross_entropy(lf, y), x, key, eps=EPS),
      adapter=R.regularizer_value("grad_align", ctx),
      weighted=R.regularizer_value("grad_align", ctx, weight=0.5),
      cure_adapter=R.regularizer_value("cure", ctx, scale="batch_mean"),
      cure=R.cure(closures.cross_entropy(lf, y), x, eps=EPS, scale="batch_mean")))
  r = {k: float(v) for k, v in r.items()}
  assert r["direct"] > 0
  np.testing.assert_allclose(r["adapter"], r["direct"], rtol=1e-6)
  np.testing.assert_allclose(r["weighted"], 0.5 * r["direct"], rtol=1e-6)
  np.testing.assert_allclose(r["cure_adapter"], r["cure"], rtol=1e-5)
  assert set(R.REGULARIZERS) >= {"grad_align", "cure", "input_grad_norm", "advlc", "advlc_l1",
                                 "advlc_l2", "advlc_kl", "advlc_js", "advlc_nuclear"}


def test_bad_concrete_input_raises(tiny32):
  params, x, y, delta, _ = tiny32
  lf = _tiny_logits_fn(params)
  loss = closures.cross_entropy(lf, y)
  key = jax.random.key(0)
  ctx = R.RegularizerContext(lf, y, x, delta, key, EPS)
  with pytest.raises(ValueError, match="lambda"):
    R.regularizer_value("grad_align", ctx, weight=-0.1)
  with pytest.raises(ValueError, match="Unknown regularizer 'gradalign'"):
    R.regularizer_value("gradalign", ctx)
  with pytest.raises(ValueError, match="Unknown formulation 'forward'"):
    R.grad_align(loss, x, key, eps=EPS, formulation="forward")
  with pytest.raises(ValueError, match="subset_fraction"):
    R.grad_align(loss, x, key, eps=EPS, subset_fraction=0.0)
  with pytest.raises(ValueError, match="top_fraction"):
    R.adv_logit_consistency(lf, x, delta, top_fraction=1.5)
  with pytest.raises(ValueError, match="top_fraction"):
    R.adv_logit_consistency(lf, x, delta, top_fraction=0.0)
  with pytest.raises(ValueError, match="top_fraction applies only"):
    R.adv_logit_consistency(lf, x, delta, distance="kl", top_fraction=0.5)
  with pytest.raises(ValueError, match="Unknown AdvLC distance"):
    R.adv_logit_consistency(lf, x, delta, distance="l3")
  with pytest.raises(ValueError, match="Unknown scale"):
    R.input_grad_norm(loss, x, scale="sum")
  with pytest.raises(ValueError, match="every"):
    R.grad_align(loss, x, key, eps=EPS, every=0)
  with pytest.raises(ValueError, match="step"):
    R.grad_align(loss, x, key, eps=EPS, every=2)
  with pytest.raises(ValueError, match="pixel units"):
    R.grad_align(loss, x, key, eps=8.0)
  with pytest.raises(ValueError, match="Unknown dataset"):
    R.lambda_for_eps("mnist", 8 / 255)
  with pytest.raises(ValueError, match="pixel units"):
    R.lambda_for_eps("cifar10", 8)
  with pytest.raises(ValueError, match="x_start"):
    R.regularizer_value("advlc", ctx, clean_point="start")

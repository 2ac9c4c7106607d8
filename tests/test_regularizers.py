"""Tests for fastadv_jax.regularizers: exact parameter gradients, formulations,
options, ELLE, the registry.

The generic tests run every regularizer registered in
`regularizers.REGULARIZER_SPECS`, called the way the train step calls it:
`fn(**consumed, **hyperparameters)`, the consumed quantities built by
`train_step_quantities` from a tiny conv net with BatchNorm in batch mode.
Their hyperparameters come from `REGULARIZER_ROWS` in `method_rows.py`, one row per
registered name (a
registered regularizer without a row fails those tests).
"""

import inspect
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import closures
from fastadv_jax import regularizers as R
from fastadv_jax.regularizers import elle as elle_lib
import method_rows
from method_rows import REGULARIZER_ROWS
from model_helpers import TinyConvNet, random_variables

EPS = 8 / 255

# Further settings run through the same checks (merged over the name's row);
# a regularizer that takes a `formulation` is also run with each formulation.
VARIANTS = {"grad_align_both": ("grad_align", {"differentiate_both": True})}


_hparams = method_rows.regularizer_row


def _takes_formulation(name):
  return "formulation" in inspect.signature(R.REGULARIZER_SPECS[name].fn).parameters


def _cases():
  """case -> (registered name, variant hyperparameters)."""
  bases = {name: (name, {}) for name in R.REGULARIZER_SPECS}
  bases.update(VARIANTS)
  cases = {}
  for case, (name, variant) in sorted(bases.items()):
    if _takes_formulation(name):
      for form in R.FORMULATIONS:
        cases[f"{case}/{form}"] = (name, {**variant, "formulation": form})
    else:
      cases[case] = (name, variant)
  return cases


CASES = _cases()
FORMULATION_FAMILIES = sorted({c.rsplit("/", 1)[0] for c in CASES if "/" in c})


# ---------------------------------------------------------------------------
# The train-step quantities, from a tiny conv net with BatchNorm
# ---------------------------------------------------------------------------

class Problem(NamedTuple):
  """A batch, a model and the constants of one train step."""
  model: Any
  params: Any
  batch_stats: Any
  x: jax.Array
  labels: jax.Array
  delta: jax.Array
  start: jax.Array
  key: jax.Array
  grad_at_start: jax.Array
  grad_at_clean: jax.Array
  direction: Any  # a random direction in parameter space


def _logits_fn(problem, params):
  return closures.logits_fn(problem.model, {"params": params,
                                            "batch_stats": problem.batch_stats}, bn="batch")


def make_problem(dtype, batch=4, image=(8, 8, 3), classes=3) -> Problem:
  model = TinyConvNet(filters=2, num_classes=classes)
  variables = jax.tree_util.tree_map(lambda v: jnp.asarray(v, dtype),
                                     random_variables(model, 0, image))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(0.1, 0.9, (batch,) + image), dtype)
  labels = jnp.arange(batch) % classes
  delta = jnp.asarray(EPS * np.sign(rng.normal(size=x.shape)), dtype)  # an FGSM corner
  start = jnp.clip(x + jnp.asarray(rng.uniform(-EPS, EPS, x.shape), dtype), 0, 1)
  direction = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.normal(size=p.shape), dtype), variables["params"])
  problem = Problem(model, variables["params"], variables["batch_stats"], x, labels, delta,
                    start, jax.random.key(7), None, None, direction)
  # The constant input gradients, at the base parameters (the train step
  # computes them before differentiating and stops their gradient).
  loss_fn = closures.cross_entropy(_logits_fn(problem, problem.params), labels)
  grads = jax.jit(lambda: (jax.grad(loss_fn)(start), jax.grad(loss_fn)(x)))()
  return problem._replace(grad_at_start=grads[0], grad_at_clean=grads[1])


def train_step_quantities(problem: Problem, params) -> dict[str, Any]:
  """Every name of `regularizers.TRAIN_STEP_QUANTITIES` -> its value, built as
  the train step builds it: closures of `params` (the parameters being
  differentiated), constants for the rest."""
  logits_fn = _logits_fn(problem, params)
  return dict(
      loss_fn=closures.cross_entropy(logits_fn, problem.labels),
      logits_fn=logits_fn,
      x=problem.x,
      labels=problem.labels,
      delta=problem.delta,
      start=problem.start,
      grad_at_start=jax.lax.stop_gradient(problem.grad_at_start),
      grad_at_clean=jax.lax.stop_gradient(problem.grad_at_clean),
      logits_adv=logits_fn(problem.x + problem.delta),
      key=problem.key,
      eps=EPS,
      step_index=jnp.int32(0))


def regularizer_value(problem, params, name, hparams):
  """`fn(**consumed, **hparams)` for the registered regularizer `name`."""
  spec = R.REGULARIZER_SPECS[name]
  quantities = train_step_quantities(problem, params)
  consumed = {arg: quantities[q] for arg, q in spec.consumes.items()}
  return spec.fn(**consumed, **hparams)


@pytest.fixture(scope="module")
def problem32():
  return make_problem(jnp.float32)


def test_quantity_helper_builds_every_train_step_quantity(problem32):
  problem = problem32
  built = set(train_step_quantities(problem, problem.params))
  assert built == set(R.TRAIN_STEP_QUANTITIES), (
      f"train_step_quantities in tests/test_regularizers.py does not build "
      f"{sorted(set(R.TRAIN_STEP_QUANTITIES) - built)} (or builds unknown "
      f"{sorted(built - set(R.TRAIN_STEP_QUANTITIES))}); add them.")


# ---------------------------------------------------------------------------
# Exact parameter gradients: float64 central finite differences
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def float64_results():
  """For every case: value, parameter gradient, and the directional derivative
  along a random direction, analytic and by central finite differences.

  The finite differences vary the parameters with the train step's constants
  (the gradients at start and x, the points, the key) held fixed, and use the
  reverse-over-reverse value when the regularizer has formulations: plain
  double backprop, which computes every gradient it differentiates itself (the
  reverse-over-forward value reuses a consumed gradient as the value of one it
  differentiates, equal to it only at the parameters it was computed with;
  both formulations' values and gradients are compared at those parameters
  by `test_formulations_agree_in_float64`).
  """
  with jax.enable_x64(True):
    problem = make_problem(jnp.float64)
    cases = {c: (n, {**REGULARIZER_ROWS[n], **v}) for c, (n, v) in CASES.items()
             if n in REGULARIZER_ROWS}  # a missing row fails in the test itself

    def fd_hparams(name, hparams):
      if _takes_formulation(name):
        return {**hparams, "formulation": "reverse_over_reverse"}
      return hparams

    # One compilation for all cases' gradients, one for all reference values.
    value_and_grad = jax.jit(lambda p: {
        c: jax.value_and_grad(lambda q, n=n, h=h: regularizer_value(problem, q, n, h))(p)
        for c, (n, h) in cases.items()})
    reference = jax.jit(lambda p: {
        c: regularizer_value(problem, p, n, fd_hparams(n, h)) for c, (n, h) in cases.items()})
    out = value_and_grad(problem.params)
    h = 1e-5
    shifted = lambda s: jax.tree_util.tree_map(lambda p, u: p + s * u, problem.params,
                                               problem.direction)
    plus, minus = reference(shifted(h)), reference(shifted(-h))
    results = {}
    for c, (value, grad) in out.items():
      analytic = sum(float(jnp.vdot(g, u)) for g, u in zip(
          jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(problem.direction)))
      numeric = float(plus[c] - minus[c]) / (2 * h)
      results[c] = (float(value), analytic, numeric, jax.tree_util.tree_map(np.asarray, grad))
  return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_parameter_gradient_matches_finite_differences(float64_results, case):
  name, _ = CASES[case]
  _hparams(name)
  value, analytic, numeric, _ = float64_results[case]
  assert np.isfinite(value) and value > 0, (case, value)
  assert abs(numeric) > 1e-8, (case, numeric)  # the check is not vacuous
  np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-10, err_msg=case)


@pytest.mark.parametrize("family", FORMULATION_FAMILIES)
def test_formulations_agree_in_float64(float64_results, family):
  _hparams(CASES[f"{family}/reverse_over_forward"][0])
  b = float64_results[f"{family}/reverse_over_reverse"]
  for form in R.FORMULATIONS:
    a = float64_results[f"{family}/{form}"]
    assert a[0] == pytest.approx(b[0], rel=1e-12), form
    chex.assert_trees_all_close(a[3], b[3], rtol=1e-9, atol=1e-13)


def test_differentiating_both_gradients_changes_the_gradient(float64_results):
  one = float64_results["grad_align/reverse_over_reverse"]
  both = float64_results["grad_align_both/reverse_over_reverse"]
  assert one[0] == pytest.approx(both[0], rel=1e-12)  # same value
  assert not np.allclose(one[3]["Conv_0"]["kernel"], both[3]["Conv_0"]["kernel"])


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------

def test_every_registered_regularizer_has_a_row_and_no_row_is_stale():
  method_rows.assert_rows_match("regularizer", R.REGULARIZER_SPECS, REGULARIZER_ROWS)


@pytest.mark.parametrize("name", sorted(R.REGULARIZER_SPECS))
def test_spec_consumes_train_step_quantities_that_fn_takes(name):
  spec = R.REGULARIZER_SPECS[name]
  assert R.REGULARIZERS[name] is spec.fn
  parameters = inspect.signature(spec.fn).parameters
  assert set(spec.consumes.values()) <= set(R.TRAIN_STEP_QUANTITIES), name
  assert set(spec.consumes) <= set(parameters), name
  hparams = _hparams(name)
  assert not set(hparams) & set(spec.consumes), name
  # Every required argument is consumed or set by the row.
  required = {n for n, p in parameters.items() if p.default is p.empty
              and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
  assert required <= set(spec.consumes) | set(hparams), (name, required)


def test_registration_is_checked():
  with pytest.raises(ValueError, match="already registered"):
    R.register_regularizer("grad_align", R.REGULARIZER_SPECS["grad_align"])
  with pytest.raises(ValueError, match="Unknown train-step quantities"):
    R.RegularizerSpec(R.grad_align, {"x": "images"})
  assert set(R.REGULARIZERS) == set(R.REGULARIZER_SPECS)


# ---------------------------------------------------------------------------
# A small PreActResNet with BatchNorm in batch mode, float32
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet_results():
  models = pytest.importorskip("fastadv_jax.models")
  model = models.get_model("preact_resnet18", widths=(8, 16, 32, 64))
  variables = random_variables(model, 0, (16, 16, 3))
  x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 3))
  y = jnp.array([0, 1, 2, 3])

  def loss_fn_of(params):
    lf = closures.logits_fn(model, {"params": params, "batch_stats": variables["batch_stats"]},
                            bn="batch")
    return closures.cross_entropy(lf, y)

  def total(params):
    return {form: R.grad_align(loss_fn_of(params), x, jax.random.key(2), eps=EPS,
                               formulation=form) for form in R.FORMULATIONS}

  # Both formulations in one compilation.
  return jax.jit(lambda p: {form: jax.value_and_grad(lambda q, f=form: total(q)[f])(p)
                            for form in R.FORMULATIONS})(variables["params"])


def _run(fn):
  """Evaluates a zero-argument function under jit: one compilation instead of
  many op-by-op dispatches (much faster for double backprop on CPU)."""
  return jax.jit(fn)()


def _flat_tree(tree):
  return jnp.concatenate([jnp.ravel(a) for a in jax.tree_util.tree_leaves(tree)])


def test_formulations_agree_on_preact_resnet_with_batchnorm(resnet_results):
  vb, gb = resnet_results["reverse_over_reverse"]
  fb = _flat_tree(gb)
  assert 0 < float(vb) < 2 and float(jnp.linalg.norm(fb)) > 0
  for form in ("reverse_over_forward", "forward_over_reverse"):
    va, ga = resnet_results[form]
    assert abs(float(va) - float(vb)) <= 1e-5 * abs(float(vb)), form
    rel = float(jnp.linalg.norm(_flat_tree(ga) - fb) / jnp.linalg.norm(fb))
    assert rel < 1e-5, (form, rel)


def test_weighted_penalty_gradient_is_exact_at_a_saturated_softmax():
  """λ·IGR of a linear classifier with logits of order 1e4 (a one-hot softmax in
  float32, so the cross-entropy's curvature is exactly 0): every formulation's
  parameter gradient, jitted, equals the analytic one, λ·(2/B²)·gᵀ(p − y). With
  λ not a power of two, reverse-over-forward without its unit cotangent left a
  rounding residue of the cancelling curvature terms (relative error 1.7e-4
  here; benchmarks/README.md, "Reverse-over-forward with a unit cotangent")."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(0, 1, (4, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, 3)) * 1e4, jnp.float32)
  labels = jnp.asarray([0, 1, 2, 0])
  weight = 3.90625
  residual = jax.nn.one_hot(jnp.argmax(x @ w, -1), 3) - jax.nn.one_hot(labels, 3)  # p − y
  g = residual @ w.T / 4                      # ∇ₓ of the batch-mean CE
  # penalty = (1/B)·Σ_i ‖g_i‖² (batch_mean_averaged); with p − y constant its
  # W-gradient is (2/B²)·gᵀ(p − y).
  expected = weight * 2 / 4**2 * (g.T @ residual)
  for form in R.FORMULATIONS:
    def weighted(w, form=form):
      loss_fn = closures.cross_entropy(lambda v: v @ w, labels)
      return weight * R.input_grad_norm(loss_fn, x, formulation=form)
    got = jax.jit(jax.grad(weighted))(w)
    rel = float(jnp.linalg.norm(got - expected) / jnp.linalg.norm(expected))
    assert rel < 1e-5, (form, rel)


# ---------------------------------------------------------------------------
# GradAlign options, float32 on a tiny softplus MLP
# ---------------------------------------------------------------------------

B, H, W, C_IN, HIDDEN, CLASSES = 4, 2, 2, 2, 5, 3


def _tiny_logits_fn(params):
  def logits_fn(x):
    h = jax.nn.softplus(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
    return h @ params["w2"]
  return logits_fn


@pytest.fixture(scope="module")
def tiny32():
  keys = jax.random.split(jax.random.key(0), 5)
  d = H * W * C_IN
  params = {
      "w1": jax.random.normal(keys[0], (d, HIDDEN)) * 2.0,
      "b1": jax.random.normal(keys[1], (HIDDEN,)),
      "w2": jax.random.normal(keys[2], (HIDDEN, CLASSES)) * 2.0,
  }
  x = jax.random.uniform(keys[3], (B, H, W, C_IN), jnp.float32, 0.1, 0.9)
  y = jnp.arange(B) % CLASSES
  delta = EPS * jnp.sign(jax.random.normal(keys[4], x.shape))
  return params, x, y, delta


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
  params, x, y, _ = tiny32
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
  params, x, y, _ = tiny32

  @jax.jit
  @chex.assert_max_traces(n=1)
  def value_and_grad(p, step_index):
    def total(p):
      loss = closures.cross_entropy(_tiny_logits_fn(p), y)
      return R.grad_align(loss, x, jax.random.key(1), eps=EPS, every=3,
                          step_index=step_index)
    return jax.value_and_grad(total)(p)

  chex.clear_trace_counter()
  loss = closures.cross_entropy(_tiny_logits_fn(params), y)
  full, scaled = _run(lambda: (
      R.grad_align(loss, x, jax.random.key(1), eps=EPS),
      R.grad_align(loss, x, jax.random.key(1), eps=EPS, every=3, step_index=0,
                   scale_by_every=True)))
  on, g_on = value_and_grad(params, 6)
  off, g_off = value_and_grad(params, 7)  # a traced step index: no recompile
  np.testing.assert_allclose(float(on), float(full), rtol=1e-4)
  assert float(off) == 0.0
  assert float(jnp.linalg.norm(_flat_tree(g_off))) == 0.0
  assert float(jnp.linalg.norm(_flat_tree(g_on))) > 0.0
  np.testing.assert_allclose(float(scaled), 3 * float(full), rtol=1e-4)


def test_grad_align_subset(tiny32):
  params, x, y, _ = tiny32
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
# CURE / IGR conventions, AdvLC selection, λ(ε)
# ---------------------------------------------------------------------------

def test_gradient_penalty_scales(tiny32):
  params, x, y, _ = tiny32
  loss = closures.cross_entropy(_tiny_logits_fn(params), y)

  def compute():
    g = jax.grad(loss)(x)
    # Per-example reading: mean_i ||grad_{x_i} l_i||^2, l_i the example's own loss.
    own = jax.vmap(jax.grad(lambda xi, yi: closures.cross_entropy_per_example(
        _tiny_logits_fn(params)(xi[None]), yi[None])[0]))(x, y)
    moved = x + EPS * jnp.sign(g)
    return dict(
        frob=jnp.sum(g ** 2), own=jnp.mean(jnp.sum(own ** 2, axis=(1, 2, 3))),
        per_example=R.input_grad_norm(loss, x, scale="per_example"),
        batch_mean=R.input_grad_norm(loss, x, scale="batch_mean"),
        averaged=R.input_grad_norm(loss, x, scale="batch_mean_averaged"),
        default=R.input_grad_norm(loss, x),
        cure=R.cure(loss, x, eps=EPS),
        cure_given_grad=R.cure(loss, x, eps=EPS, grad_x=g),
        # The CURE/GradAlign code's convention (the default): gradients of the
        # batch-mean loss, squared norm per example, averaged over the batch.
        cure_expected=jnp.mean(jnp.sum((jax.grad(loss)(moved) - g) ** 2, axis=(1, 2, 3))))

  r = {k: float(v) for k, v in _run(compute).items()}
  np.testing.assert_allclose(r["per_example"], B * r["frob"], rtol=1e-5)
  np.testing.assert_allclose(r["per_example"], r["own"], rtol=1e-5)
  np.testing.assert_allclose(r["batch_mean"], r["frob"], rtol=1e-5)
  np.testing.assert_allclose(r["averaged"], r["frob"] / B, rtol=1e-5)
  np.testing.assert_allclose(r["default"], r["averaged"], rtol=0)
  assert r["cure_expected"] > 0
  np.testing.assert_allclose(r["cure"], r["cure_expected"], rtol=1e-4)
  np.testing.assert_allclose(r["cure_given_grad"], r["cure"], rtol=1e-6)


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
  params, x, y, delta = tiny32
  lf = _tiny_logits_fn(params)
  x_start = jnp.clip(x + 0.02, 0, 1)
  advlc = R.REGULARIZER_SPECS["advlc"].fn
  at_x, at_start, expected_x, expected_start, pre, pre_spec = _run(lambda: (
      advlc(logits_fn=lf, x=x, delta=delta, start=x_start),
      advlc(logits_fn=lf, x=x, delta=delta, start=x_start, clean_point="start"),
      R.advlc_from_logits(lf(x), lf(x + delta)),
      R.advlc_from_logits(lf(x_start), lf(x + delta)),
      R.adv_logit_consistency(lf, x, delta, logits_adv=lf(x + delta)),
      advlc(logits_fn=lf, x=x, delta=delta, start=x_start, logits_adv=lf(x + delta))))
  np.testing.assert_allclose(float(at_x), float(expected_x), rtol=1e-6)
  np.testing.assert_allclose(float(at_start), float(expected_start), rtol=1e-6)
  assert abs(float(at_x) - float(at_start)) > 1e-4
  np.testing.assert_allclose(float(pre), float(at_x), rtol=1e-6)
  np.testing.assert_allclose(float(pre_spec), float(at_x), rtol=1e-6)


def test_lambda_for_eps():
  assert R.lambda_for_eps("cifar10", 8 / 255) == pytest.approx(0.2)
  assert R.lambda_for_eps("cifar10", 16 / 255) == pytest.approx(2.0)
  assert R.lambda_for_eps("svhn", 8 / 255) == pytest.approx(2.5)
  assert R.lambda_for_eps("cifar10", 4 / 255) == pytest.approx(0.02 * 10 ** 0.5)


# ---------------------------------------------------------------------------
# ELLE
# ---------------------------------------------------------------------------

def test_elle_draws_and_points():
  x = jax.random.uniform(jax.random.key(0), (B, H, W, C_IN))
  noise_a, noise_b, alpha = elle_lib.elle_draws(jax.random.key(1), x)
  chex.assert_shape([noise_a, noise_b], x.shape)
  chex.assert_shape(alpha, (B,))
  chex.assert_type([noise_a, noise_b, alpha], jnp.float32)
  assert float(jnp.min(noise_a)) >= -1 and float(jnp.max(noise_a)) <= 1
  assert float(jnp.min(alpha)) >= 0 and float(jnp.max(alpha)) <= 1
  x_a, x_b, x_c = elle_lib.elle_points(x, EPS, (noise_a, noise_b, alpha))
  np.testing.assert_allclose(np.asarray(x_a), np.asarray(x + EPS * noise_a), rtol=1e-6)
  a = np.asarray(alpha)[:, None, None, None]
  np.testing.assert_allclose(np.asarray(x_c), (1 - a) * np.asarray(x_a) + a * np.asarray(x_b),
                             rtol=1e-6, atol=1e-7)
  # The reference does not clip; with clip, x_a and x_b (hence x_c) are in the box.
  edge = jnp.zeros_like(x).at[:, 0].set(1.0)
  clipped = elle_lib.elle_points(edge, EPS, (noise_a, noise_b, alpha), clip=True)
  for p in clipped:
    assert float(jnp.min(p)) >= 0 and float(jnp.max(p)) <= 1
  assert float(jnp.min(elle_lib.elle_points(edge, EPS, (noise_a, noise_b, alpha))[0])) < 0


def test_elle_is_the_squared_linearity_violation(tiny32):
  params, x, y, _ = tiny32
  lf = _tiny_logits_fn(params)
  loss = closures.cross_entropy(lf, y)
  draws = elle_lib.elle_draws(jax.random.key(3), x)
  eps = 0.1

  def compute():
    x_a, x_b, x_c = elle_lib.elle_points(x, eps, draws)
    per_example = lambda p: closures.cross_entropy_per_example(lf(p), y)
    err = per_example(x_c) - ((1 - draws[2]) * per_example(x_a) + draws[2] * per_example(x_b))
    return dict(expected=jnp.mean(err ** 2),
                joint=elle_lib.elle(loss, x, eps=eps, draws=draws),
                separate=elle_lib.elle(loss, x, eps=eps, draws=draws, joint_forward=False),
                keyed=elle_lib.elle(loss, x, jax.random.key(3), eps=eps))

  r = {k: float(v) for k, v in _run(compute).items()}
  assert r["expected"] > 1e-8
  np.testing.assert_allclose(r["joint"], r["expected"], rtol=1e-5)
  # No BatchNorm: one batch of 3B or three of B give the same losses.
  np.testing.assert_allclose(r["separate"], r["expected"], rtol=1e-5)
  # The same draws (other draws differ at O(1)). ELLE squares a difference of
  # nearly equal losses (about 25x cancellation here), so the two programs'
  # reduction orders (XLA's or YNNPACK's, fastadv_jax.xla_cpu) show at 1e-5.
  np.testing.assert_allclose(r["keyed"], r["expected"], rtol=5e-5)


def test_elle_is_zero_for_a_loss_linear_in_x():
  w = jax.random.normal(jax.random.key(3), (H, W, C_IN))  # any batch (ELLE's is 3B)
  logits_fn = lambda z: jnp.stack([jnp.sum(z * w, axis=(1, 2, 3)),
                                   jnp.zeros(z.shape[0])], axis=1)
  loss = closures.LossFn(logits_fn, jnp.zeros((B,), jnp.int32),
                         lambda logits, labels: logits[:, 0], "linear")
  x = jax.random.uniform(jax.random.key(4), (B, H, W, C_IN))
  value = _run(lambda: elle_lib.elle(loss, x, jax.random.key(5), eps=0.1))
  assert float(value) == pytest.approx(0.0, abs=1e-9)


def test_elle_joint_forward_shares_the_batch_statistics(problem32):
  problem = problem32
  loss = closures.cross_entropy(_logits_fn(problem, problem.params), problem.labels)
  joint, separate = _run(lambda: (
      elle_lib.elle(loss, problem.x, problem.key, eps=EPS),
      elle_lib.elle(loss, problem.x, problem.key, eps=EPS, joint_forward=False)))
  assert float(joint) > 0 and float(separate) > 0
  assert abs(float(joint) - float(separate)) > 1e-3 * float(separate)


def _elle_a_reference(values, lambda_max, decay=0.99, sensitivity=2.0):
  """The reference rule (core/utils/train.py l. 216-227), in NumPy."""
  lam, history, lams = 0.0, [], []
  for v in values:
    if len(history) > 2 and v > np.mean(history) + sensitivity * np.std(history):
      lam = lambda_max
    else:
      lam = decay * lam
    history.append(v)
    lams.append(lam)
  return np.asarray(lams)


def test_elle_a_update_follows_the_reference_rule():
  rng = np.random.default_rng(0)
  values = rng.uniform(0.0, 1.0, 40).astype(np.float32)
  values[[5, 17, 30]] = [5.0, 8.0, 9.0]  # spikes
  update = jax.jit(lambda s, v: elle_lib.elle_a_update(s, v, lambda_max=4000.0))
  state, lams = elle_lib.elle_a_init(), []
  for v in values:
    state = update(state, v)
    lams.append(float(state.lam))
  expected = _elle_a_reference(values.astype(np.float64), 4000.0)
  np.testing.assert_allclose(lams, expected, rtol=1e-4)
  assert all(lams[i] == 4000.0 for i in (5, 17, 30))  # each spike sets λ_max
  assert lams[6] == pytest.approx(0.99 * 4000.0)        # then λ decays
  assert int(state.count) == len(values)
  np.testing.assert_allclose(float(state.mean), values.mean(), rtol=1e-5)


# ---------------------------------------------------------------------------
# Boundary checks
# ---------------------------------------------------------------------------

def test_bad_concrete_input_raises(tiny32):
  params, x, y, delta = tiny32
  lf = _tiny_logits_fn(params)
  loss = closures.cross_entropy(lf, y)
  key = jax.random.key(0)
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
  with pytest.raises(ValueError, match="step_index"):
    R.grad_align(loss, x, key, eps=EPS, every=2)
  with pytest.raises(ValueError, match="pixel units"):
    R.grad_align(loss, x, key, eps=8.0)
  with pytest.raises(ValueError, match="Unknown dataset"):
    R.lambda_for_eps("mnist", 8 / 255)
  with pytest.raises(ValueError, match="pixel units"):
    R.lambda_for_eps("cifar10", 8)
  with pytest.raises(ValueError, match="start"):
    R.adv_logit_consistency_at(lf, x, delta, clean_point="start")
  with pytest.raises(ValueError, match="clean_point"):
    R.adv_logit_consistency_at(lf, x, delta, x, clean_point="noisy")
  draws = elle_lib.elle_draws(key, x)
  with pytest.raises(ValueError, match="LossFn"):
    elle_lib.elle(lambda z: jnp.mean(lf(z)), x, key, eps=EPS)
  with pytest.raises(ValueError, match="key"):
    elle_lib.elle(loss, x, eps=EPS)
  with pytest.raises(ValueError, match="draws must be"):
    elle_lib.elle(loss, x, eps=EPS, draws=draws[:2])
  with pytest.raises(ValueError, match="alpha"):
    elle_lib.elle(loss, x, eps=EPS, draws=(draws[0], draws[1], draws[2] + 1.5))
  with pytest.raises(ValueError, match="alpha must have shape"):
    elle_lib.elle(loss, x, eps=EPS, draws=(draws[0], draws[1], draws[2][:2]))


# ---------------------------------------------------------------------------
# Explicit draws and the reference's train-mode forwards
# ---------------------------------------------------------------------------

def test_grad_align_with_the_keys_draw_passed_explicitly_is_bit_identical(tiny32):
  params, x, y, _ = tiny32
  loss_fn = closures.cross_entropy(_tiny_logits_fn(params), y)
  key = jax.random.key(11)
  drawn = R.grad_align(loss_fn, x, key, eps=EPS)
  given = R.grad_align(loss_fn, x, None, eps=EPS, noise=R.grad_align_noise(key, x, EPS))
  assert float(drawn) == float(given)
  other = R.grad_align(loss_fn, x, None, eps=EPS, noise=-R.grad_align_noise(key, x, EPS))
  assert float(other) != float(drawn)
  with pytest.raises(ValueError, match="noise"):
    R.grad_align(loss_fn, x, None, eps=EPS, noise=jnp.zeros((1,) + x.shape[1:]))
  with pytest.raises(ValueError, match="key"):
    R.grad_align(loss_fn, x, None, eps=EPS)


@pytest.mark.parametrize("name", sorted(R.REGULARIZER_SPECS))
def test_every_regularizer_describes_its_reference_forwards(problem32, name):
  """`forward_points` (what bn_updates="every_forward" replays) returns points of
  the batch's image shape; a regularizer with a random draw names its argument."""
  spec = R.REGULARIZER_SPECS[name]
  assert spec.forward_points is not None, name
  if "key" in spec.consumes.values():
    assert spec.draw_arg in inspect.signature(spec.fn).parameters, name
  params = problem32.params
  quantities = train_step_quantities(problem32, params)
  args = {arg: quantities[q] for arg, q in spec.consumes.items()}
  hparams = dict(method_rows.regularizer_row(name))
  points = spec.forward_points(args, hparams)
  for p in points:
    assert p.shape[1:] == quantities["x"].shape[1:] and p.dtype == quantities["x"].dtype


def test_grad_align_forward_point_is_x_plus_its_noise(problem32):
  quantities = train_step_quantities(problem32, problem32.params)
  spec = R.REGULARIZER_SPECS["grad_align"]
  args = {arg: quantities[q] for arg, q in spec.consumes.items()}
  (point,) = spec.forward_points(args, {})
  eta = R.grad_align_noise(args["key"], args["x"], args["eps"])
  np.testing.assert_array_equal(np.asarray(point), np.asarray(args["x"] + eta))

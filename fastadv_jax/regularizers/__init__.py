"""Regularizers added to the adversarial training loss, with exact double backprop.

Every regularizer is a pure function of closures and arrays that returns one
scalar. Called inside the function the train step differentiates with respect to
the parameters (the closures built there from the traced parameters), the scalar's
value is the regularizer and its parameter gradient is exact, whichever
formulation computes it:

* ``"reverse_over_reverse"``: the input gradients are computed with `jax.grad`
  and the penalty on them is differentiated again by the outer `jax.grad`
  (double backprop, what the PyTorch references do with ``create_graph=True``).
* ``"reverse_over_forward"``: the input gradients g and the penalty's cotangent
  v = ∂R/∂g are computed first and treated as constants; the forward-mode product
  ⟨∇ₓℓ(x'), v⟩ = d/dt ℓ(x' + t v) (one `jax.jvp`) is then differentiated by the
  outer `jax.grad`. Since d/dθ ⟨∇ₓℓ(x'; θ), v⟩ = (∂g/∂θ)ᵀ v = dR/dθ, the
  surrogate has exactly the parameter gradient of R; the returned scalar is
  ``stop_gradient(R) + (S - stop_gradient(S))``, so its value is R itself.
  The jvp's reverse pass runs with a unit cotangent and is scaled by the outer
  one (λ) afterwards (`_with_unit_cotangent`): the same gradient, but terms of
  the cross-entropy's curvature that cancel exactly at a saturated softmax
  stay exact (with λ inside XLA's program they left a residue amplified 1e8-fold
  in a diverged float64 run), and XLA counts fewer flops (PreActResNet-18's
  GradAlign step 2.01x FGSM's, against 2.15x with the jvp differentiated by
  the outer `jax.grad` itself). Being a `custom_vjp`, the result supports
  reverse-mode differentiation only (all the train step needs); differentiate
  it in forward mode with one of the other two formulations.
* ``"forward_over_reverse"``: g and v as above; then the mixed second
  derivative is taken directly, h = d/dt ∇_θ ℓ(x' + t v; θ) at t = 0 (one
  `jax.jvp` of `jax.grad` with respect to the traced values the loss closure
  captures, found by `jax.closure_convert`), which equals (∂g/∂θ)ᵀ v by the
  symmetry of second derivatives. The surrogate is S = ⟨stop_gradient(h), θ⟩
  (and the same for x'), returned as above. For PreActResNet-18 it has as few
  flops as reverse-over-forward (GradAlign's step 2.01x FGSM's by XLA's count)
  but ran no faster on a 2-core CPU, where its extra weight-gradient
  convolutions pay layout copies (benchmarks/README.md, "Forward-over-reverse");
  not measured on a GPU.

All three are exact (they agree to float rounding, checked by the tests on a
PreActResNet with BatchNorm in batch mode, where the batch statistics couple the
examples). Which one is faster depends on the backend; see
``benchmarks/bench_gradalign.py`` and `DEFAULT_FORMULATION`.

Regularizers:

* `grad_align` — GradAlign (Andriushchenko & Flammarion 2020, Eq. 7).
* `cure` — CURE (Moosavi-Dezfooli et al. 2019) as used in GradAlign Table 8.
* `input_grad_norm` — input-gradient L2 penalty (IGR).
* `adv_logit_consistency` — AdvLC (Li & Spratling 2023, Eq. 14) and its
  ablation variants (Table 3: L1, squared L2, KL, JS, nuclear).

Each regularizer is registered once with a `RegularizerSpec` naming what it
consumes from the train step (`TRAIN_STEP_QUANTITIES`: the gradient at x, at the
attack's start, the adversarial logits, ...); the train step builds exactly
those and nothing else. A regularizer in a module of its own inside this
package (e.g. `elle.py`) registers itself with `register_regularizer` and is
imported with the package. `lambda_for_eps` gives GradAlign's λ(ε).

Batch dependence: input gradients are gradients of the batch-mean loss with
BatchNorm in the mode the `logits_fn` was built with ("batch" in training, so
examples interact through the batch statistics), and AdvLC's top-k runs over
batch × classes. Under `pmap` everything is computed on the per-device batch.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import pkgutil
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from fastadv_jax import _checks
from fastadv_jax import closures

Array = jax.Array
LossClosure = Callable[[Array], Array]

FORMULATIONS = ("reverse_over_forward", "reverse_over_reverse", "forward_over_reverse")
# Measured with benchmarks/bench_gradalign.py and bench_train_step.py
# (PreActResNet-18, CIFAR-size inputs, CPU): reverse-over-forward is faster than
# double backprop and as fast as forward-over-reverse (benchmarks/README.md).
DEFAULT_FORMULATION = "reverse_over_forward"

# Conventions for penalties of input gradients (CURE, IGR); see `_scale_factor`.
GRAD_SCALES = ("per_example", "batch_mean", "batch_mean_averaged")

ADVLC_DISTANCES = ("l1", "l2sq", "kl", "js", "nuclear")
_ELEMENTWISE_DISTANCES = ("l1", "l2sq")
ADVLC_CLEAN_POINTS = ("x", "start")


# ---------------------------------------------------------------------------
# Boundary checks
# ---------------------------------------------------------------------------

def _check_fraction(what: str, value: Any) -> None:
  """A fraction of a batch (or of batch × classes) must lie in (0, 1]."""
  if isinstance(value, bool):
    raise ValueError(f"{what} must be a number in (0, 1], got {value!r}.")
  _checks.check_in_range(what, value, 0.0, 1.0, low_open=True)




def _count(fraction: float, total: int) -> int:
  """Number of entries a fraction keeps: floor(fraction·total), at least 1.

  Floor as in the AdvLC code (`int(numel * reg_top)`); a tiny tolerance keeps
  0.1 · 80 = 8 from becoming 7 through float rounding.
  """
  return max(1, int(math.floor(float(fraction) * total + 1e-9)))


# ---------------------------------------------------------------------------
# Exact penalties of input gradients
# ---------------------------------------------------------------------------

def exact_grad_penalty(loss_fn: LossClosure, points: Sequence[Array],
                       penalty_fn: Callable[..., Array], *,
                       formulation: str = DEFAULT_FORMULATION,
                       grads: Optional[Sequence[Array]] = None) -> Array:
  """R(∇ₓℓ(p₁), …, ∇ₓℓ(pₙ)) with an exact parameter gradient.

  Args:
    loss_fn: batch-mean loss closure `x -> scalar`, built inside the function
      being differentiated with respect to the parameters.
    points: the inputs at which the input gradients are taken.
    penalty_fn: `penalty_fn(*grads) -> scalar`, a differentiable function of
      the input gradients (anything it closes over is a constant for it).
    formulation: "reverse_over_forward" (surrogate from `jax.jvp`, see the
      module docstring), "forward_over_reverse" (surrogate from the mixed
      second derivative) or "reverse_over_reverse" (double backprop).
    grads: optional precomputed values of the input gradients at `points`
      (used only by the two surrogate formulations, which need their values but not
      their derivatives; saves one backward pass each).
  Returns:
    A scalar equal to the penalty whose gradient with respect to anything
    `loss_fn` closes over (and to the points) is that of the penalty.
  """
  _checks.check_choice("formulation", formulation, FORMULATIONS)
  points = tuple(points)
  grad_fn = jax.grad(loss_fn)
  if formulation == "reverse_over_reverse":
    return penalty_fn(*[grad_fn(p) for p in points])

  if grads is None:
    grads = [grad_fn(p) for p in points]
  grads = [jax.lax.stop_gradient(g) for g in grads]
  value, cotangents = jax.value_and_grad(
      lambda gs: penalty_fn(*gs))(list(grads))
  surrogate = 0.0
  for point, v in zip(points, cotangents):
    v = jax.lax.stop_gradient(v).astype(point.dtype)
    if formulation == "forward_over_reverse":
      surrogate = surrogate + _mixed_derivative_surrogate(loss_fn, point, v)
    else:
      # <∇ₓℓ(p), v> as a directional derivative: its gradient wrt the parameters
      # is (∂∇ₓℓ/∂θ)ᵀ v, the chain rule through the penalty.
      surrogate = surrogate + _with_unit_cotangent(
          lambda p, v=v: jax.jvp(loss_fn, (p,), (v,))[1], point)
  value = jax.lax.stop_gradient(value)
  # `value + (S - sg(S))` rather than `(value + S) - sg(S)`: S - S is exactly 0.
  return value + (surrogate - jax.lax.stop_gradient(surrogate))


def _with_unit_cotangent(fn: Callable[[Array], Array], point: Array) -> Array:
  """fn(point) for a scalar fn, whose reverse pass runs with cotangent 1 and is scaled after.

  Its gradient (with respect to the point and the traced values fn captures,
  found by `jax.closure_convert`) is the same as fn's; only the rounding
  differs. For the directional derivative of the cross-entropy, two terms of
  the reverse pass cancel exactly at a saturated softmax when they see the
  same cotangent; scaled by the outer cotangent (a regularizer's weight λ)
  inside XLA's compiled program they did not (a 1e8-fold amplified rounding
  in a diverged run; benchmarks/README.md, "Reverse-over-forward with a unit
  cotangent").
  """
  converted, captured = jax.closure_convert(fn, point)

  @jax.custom_vjp
  def call(x, *consts):
    return converted(x, *consts)

  def call_fwd(x, *consts):
    return jax.vjp(converted, x, *consts)

  def call_bwd(vjp, cotangent):
    return tuple(g if g.dtype == jax.dtypes.float0 else (cotangent * g).astype(g.dtype)
                 for g in vjp(jnp.ones_like(cotangent)))

  call.defvjp(call_fwd, call_bwd)
  return call(point, *captured)


def _mixed_derivative_surrogate(loss_fn: LossClosure, point: Array, v: Array) -> Array:
  """S = Σ_c ⟨stop_gradient(h_c), c⟩ with h_c = d/dt ∇_c ℓ(point + t v) at t = 0.

  c runs over the point and the floating-point values `loss_fn` captures that
  are traced (the parameters inside the train step's `jax.grad`), so
  ∂S/∂c = h_c = (∂∇ₓℓ/∂c)ᵀ v: the parameter gradient of ⟨∇ₓℓ(point), v⟩
  (symmetry of second derivatives), computed forward-over-reverse.
  """
  # A fresh lambda: closure_convert caches by the function, and a LossFn is unhashable.
  converted, captured = jax.closure_convert(lambda x: loss_fn(x), point)  # pylint: disable=unnecessary-lambda
  wrt = [i for i, c in enumerate(captured) if jnp.issubdtype(jnp.result_type(c), jnp.inexact)]
  held = [jax.lax.stop_gradient(c) for c in captured]

  def gradients(x):
    def loss(x, varied):
      values = list(held)
      for i, c in zip(wrt, varied):
        values[i] = c
      return converted(x, *values)
    return jax.grad(loss, argnums=(0, 1))(x, [held[i] for i in wrt])

  _, (h_point, h_captured) = jax.jvp(gradients, (jax.lax.stop_gradient(point),), (v,))
  surrogate = jnp.vdot(jax.lax.stop_gradient(h_point), point)
  for i, h in zip(wrt, h_captured):
    surrogate = surrogate + jnp.vdot(jax.lax.stop_gradient(h), captured[i])
  return surrogate


def _at_least_f32(a: Array) -> Array:
  """Promotes bf16/fp16 to float32 and keeps float64 (for float64 checks)."""
  return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def _flat(g: Array) -> Array:
  return _at_least_f32(g.reshape(g.shape[0], -1))


def per_example_cosine(a: Array, b: Array) -> tuple[Array, Array]:
  """Cosine per example and whether both vectors are nonzero.

  Examples where either vector is exactly zero get cosine 0 and `valid=False`;
  the norms are taken only where they are positive, so the gradient of the
  cosine is finite everywhere (no epsilon in the norms, as in the GradAlign code).

  Returns:
    (cos, valid), both of shape (B,).
  """
  a, b = _flat(a), _flat(b)
  na2 = jnp.sum(a * a, axis=1)
  nb2 = jnp.sum(b * b, axis=1)
  valid = (na2 > 0) & (nb2 > 0)
  na = jnp.sqrt(jnp.where(valid, na2, 1.0))
  nb = jnp.sqrt(jnp.where(valid, nb2, 1.0))
  cos = jnp.sum((a / na[:, None]) * (b / nb[:, None]), axis=1)
  return jnp.where(valid, cos, 0.0), valid


def _one_minus_mean_cosine(g1: Array, g2: Array) -> Array:
  """1 − mean cos over the examples where both gradients are nonzero (0 if none)."""
  cos, valid = per_example_cosine(g1, g2)
  count = jnp.sum(valid)
  return jnp.sum(jnp.where(valid, 1.0 - cos, 0.0)) / jnp.maximum(count, 1)


# ---------------------------------------------------------------------------
# GradAlign
# ---------------------------------------------------------------------------

def _subset_loss_fn(loss_fn: LossClosure, size: int) -> LossClosure:
  """The same loss closure on the first `size` examples of the batch."""
  if isinstance(loss_fn, closures.LossFn):
    return dataclasses.replace(loss_fn, labels=loss_fn.labels[:size])
  raise ValueError(
      "subset_fraction < 1 needs a closures.LossFn (e.g. closures.cross_entropy("
      f"logits_fn, labels)) to restrict its labels to the subset; got {type(loss_fn).__name__}.")


def _every_k(compute: Callable[[], Array], every: int, step_index: Any,
             scale_by_every: bool) -> Array:
  """Evaluates `compute` on training steps that are multiples of `every`, 0 otherwise."""
  if every == 1:
    return compute()
  if step_index is None:
    raise ValueError(f"every={every} needs the training step index (step_index=...).")
  # The skipped branch returns a zero of the computed value's dtype (float64 too).
  shape_dtype = jax.eval_shape(compute)
  value = jax.lax.cond(jnp.asarray(step_index) % every == 0, compute,
                       lambda: jnp.zeros(shape_dtype.shape, shape_dtype.dtype))
  return value * every if scale_by_every else value


def grad_align(loss_fn: LossClosure, x: Array, key: Optional[Array] = None, *, eps: Any,
               grad_start: Optional[Array] = None, x_start: Optional[Array] = None,
               formulation: str = DEFAULT_FORMULATION,
               differentiate_both: bool = False, clip_noise: bool = False,
               subset_fraction: float = 1.0, every: int = 1, step_index: Any = None,
               scale_by_every: bool = False, noise: Optional[Array] = None) -> Array:
  """GradAlign regularizer (Andriushchenko & Flammarion 2020, Eq. 7).

  Ω = 1 − mean_i cos(g₁ᵢ, g₂ᵢ), g₁ = ∇ₓℓ at the attack's starting point (the
  clean x for FGSM), g₂ = ∇ₓℓ(x + η), η ~ U[-ε, ε]^d. ℓ is the batch-mean loss
  (BatchNorm in the closure's mode couples the examples, as in the authors'
  code); the cosine is per example; examples where either gradient is exactly
  zero are dropped from the mean (Ω = 0 when none is left).

  Args:
    loss_fn: batch-mean loss closure built from the parameters being trained.
    x: clean images (B, H, W, C) in [0, 1].
    key: PRNG key for η.
    eps: L∞ radius in pixel units.
    grad_start: g₁ if the attack already computed it (an attack's
      `AttackOutput.grad_at_start`); otherwise it is computed at `x_start`.
    x_start: the attack's starting point (default: x).
    formulation: "reverse_over_forward" (default; on PreActResNet-18 on CPU as
      fast as "forward_over_reverse", with as few flops, and faster than
      double backprop), "forward_over_reverse" or
      "reverse_over_reverse" (double backprop); all exact.
    differentiate_both: False (the authors' code): g₁ is a constant
      (stop-gradient). True: both gradients are differentiated; g₁ is then
      recomputed at `x_start` so that its parameter derivative is exact and
      `grad_start` is ignored.
    clip_noise: clip x + η to the box [0, 1] (the authors' code does not).
    subset_fraction: regularize only the first ⌊fraction·B⌋ examples (a
      cheaper variant; the input gradients are then those of the subset's
      batch-mean loss, with the subset's own BatchNorm statistics). Needs a
      `closures.LossFn`.
    every: compute the regularizer only on steps that are multiples of `every`
      (0 on the others; a cheaper variant). Needs `step_index`.
    step_index: the training step index (a traced int is fine).
    scale_by_every: multiply the regularizer by `every` on the steps where it
      is computed, so that its average weight over steps is unchanged.
    noise: η itself (shape of x, pixel units; of the subset with
      subset_fraction < 1); None draws U[-ε, ε]^d from key
      (`grad_align_noise`). Parity tests pass the reference's draw here (the
      GradAlign code's `get_uniform_delta`, utils.py l.147-151).
  Returns:
    The scalar Ω (not yet multiplied by λ).
  """
  _checks.check_eps(eps)
  _checks.check_choice("formulation", formulation, FORMULATIONS)
  _check_fraction("subset_fraction", subset_fraction)
  _checks.check_int("every", every, 1)
  _checks.check_images(x)
  if grad_start is not None:
    _checks.check_same_shape("grad_start", grad_start, "x", x)
  if x_start is not None:
    _checks.check_same_shape("x_start", x_start, "x", x)
  if key is None and noise is None:
    raise ValueError("grad_align draws η and needs a jax.random key (or noise=...).")

  batch = x.shape[0]
  size = _count(subset_fraction, batch)
  if size < batch:
    loss_fn = _subset_loss_fn(loss_fn, size)
    x = x[:size]
    grad_start = None if grad_start is None else grad_start[:size]
    x_start = None if x_start is None else x_start[:size]
  start = x if x_start is None else x_start

  if noise is not None:
    _checks.check_same_shape("noise", noise, "x (of the regularized subset)", x)

  def compute() -> Array:
    x_noisy = _grad_align_point(x, key, eps, noise, clip_noise)
    if differentiate_both:
      return exact_grad_penalty(loss_fn, (start, x_noisy), _one_minus_mean_cosine,
                                formulation=formulation)
    g1 = jax.grad(loss_fn)(start) if grad_start is None else grad_start
    g1 = jax.lax.stop_gradient(g1)
    return exact_grad_penalty(loss_fn, (x_noisy,), lambda g2: _one_minus_mean_cosine(g1, g2),
                              formulation=formulation)

  return _every_k(compute, every, step_index, scale_by_every)


def grad_align_noise(key: Array, x: Array, eps: Any) -> Array:
  """GradAlign's η ~ U[-ε, ε]^d as `grad_align` draws it from `key`."""
  return jax.random.uniform(key, x.shape, jnp.float32, -eps, eps)


def _grad_align_point(x, key, eps, noise, clip_noise):
  eta = grad_align_noise(key, x, eps) if noise is None else jnp.asarray(noise)
  x_noisy = x + eta.astype(x.dtype)
  return jnp.clip(x_noisy, 0.0, 1.0) if clip_noise else x_noisy


def _grad_align_forward_points(args, hparams):
  """The train-mode forwards of `grad_align` in the GradAlign code: g₂ at x + η
  (train.py l.193); g₁ comes from the attack (recomputed at the start with
  differentiate_both). `every` > 1 is not replayed (every step counted)."""
  x, start = args["x"], args.get("x_start")
  size = _count(hparams.get("subset_fraction", 1.0), x.shape[0])
  x = x[:size]
  points = [_grad_align_point(x, args.get("key"), args["eps"], args.get("noise"),
                              hparams.get("clip_noise", False))]
  if hparams.get("differentiate_both", False):
    points.insert(0, (x if start is None else start[:size]))
  return points


# ---------------------------------------------------------------------------
# CURE and the input-gradient norm
# ---------------------------------------------------------------------------

# The default gradient convention of CURE and IGR (see `_scale_factor`).
DEFAULT_GRAD_SCALE = "batch_mean_averaged"


def _scale_factor(scale: str, batch: int) -> float:
  """Factor c with penalty = c · ‖∇ₓL‖²_F, L the batch-mean loss.

  The default, "batch_mean_averaged", is the convention of the code behind the
  published λ: the CURE authors' code (F-Salehi/CURE_robustness, CURE/CURE.py,
  `regularizer`: `nn.CrossEntropyLoss()` is the batch mean, the gradient of
  its difference is taken w.r.t. the batch tensor, then a norm per example,
  `torch.sum(λ·reg) / B`) and the GradAlign code, whose input gradients are
  those of the batch-mean CE (utils.py `get_input_grad`, l.70-88) reduced per
  example and then averaged (train.py l.194-200). GradAlign Table 8's λ (700,
  1000 at B = 128) then weigh a penalty B² = 16,384 times smaller than the
  per-example one, which at initialisation of the GradAlign PreActResNet-18
  made λ·IGR about 1e5 × the CE (issue 10's measurement; NaN within a few
  steps), i.e. about 6 × the CE with this default.

  * "per_example": mean_i ‖∇_{xᵢ} ℓᵢ‖₂², the per-example gradient of the
    per-example loss, summed over the input and averaged over the batch; with
    ∇_{xᵢ} ℓᵢ = B·∇_{xᵢ} L this is c = B. (Exact when the examples do not
    interact; with BatchNorm in batch mode it uses ∇ₓ Σⱼ ℓⱼ, which includes the
    examples' coupling through the batch statistics.)
  * "batch_mean": ‖∇ₓ L‖₂² over the whole batch tensor (torch:
    `grad(loss_mean, x).pow(2).sum()`), c = 1, i.e. 1/B of "per_example".
  * "batch_mean_averaged": the same summed per example and averaged over the
    batch (`.sum((1,2,3)).mean()`), c = 1/B, i.e. 1/B² of "per_example".
  """
  _checks.check_choice("scale", scale, GRAD_SCALES)
  return {"per_example": float(batch), "batch_mean": 1.0,
          "batch_mean_averaged": 1.0 / batch}[scale]


def input_grad_norm(loss_fn: LossClosure, x: Array, *, scale: str = DEFAULT_GRAD_SCALE,
                    formulation: str = DEFAULT_FORMULATION,
                    grad_x: Optional[Array] = None) -> Array:
  """Input-gradient L2 penalty (IGR; GradAlign Table 8, Li & Spratling Table 3).

  Default ("batch_mean_averaged"): mean_i ‖∇_{xᵢ} L‖₂² with L the batch-mean
  loss (torch: `grad(F.cross_entropy(out, y), x).pow(2).sum((1, 2, 3)).mean()`),
  the convention of the CURE and GradAlign code (see `_scale_factor`), for
  which the published λ (GradAlign Table 8: 1000 / 2000 at ε = 8 / 16) train
  stably. The others differ by constant factors: "per_example" = mean_i
  ‖∇_{xᵢ} ℓᵢ(xᵢ)‖₂² (each example's gradient of its own loss) = B² × the
  default, "batch_mean" = ‖∇ₓ L‖²_F = B × the default.

  Args:
    loss_fn: batch-mean loss closure.
    x: the point where the gradient is taken (B, ...).
    scale: "batch_mean_averaged" (default), "batch_mean" or "per_example".
    formulation: as in `exact_grad_penalty`.
    grad_x: ∇ₓℓ(x) if already known (FGSM's gradient at x): with
      reverse-over-forward it saves one forward and backward pass (see `cure`).
  Returns:
    The scalar penalty (not yet multiplied by λ).
  """
  c = _scale_factor(scale, x.shape[0])
  _checks.check_choice("formulation", formulation, FORMULATIONS)
  grads = None if grad_x is None else (grad_x,)
  return exact_grad_penalty(loss_fn, (x,), lambda g: c * jnp.sum(_flat(g) ** 2),
                            formulation=formulation, grads=grads)


def cure(loss_fn: LossClosure, x: Array, *, eps: Any, scale: str = DEFAULT_GRAD_SCALE,
         formulation: str = DEFAULT_FORMULATION, clip: bool = False,
         grad_x: Optional[Array] = None) -> Array:
  """CURE curvature penalty (Moosavi-Dezfooli et al. 2019).

  ‖∇ₓℓ(x + δ) − ∇ₓℓ(x)‖₂² with δ = ε·sign(∇ₓℓ(x)); the direction is a
  constant (its derivative is zero), both gradients are differentiated. The
  gradient convention is that of `input_grad_norm`: by default
  mean_i ‖∇_{xᵢ}L(x+δ) − ∇_{xᵢ}L(x)‖₂² with L the batch-mean loss (the CURE
  code's, CURE/CURE.py `regularizer`, with GradAlign Table 8's squared norm and
  δ = ε·sign); "batch_mean" is B times it, "per_example" B² times.

  Args:
    loss_fn: batch-mean loss closure.
    x: clean images.
    eps: the finite-difference step h, in pixel units (GradAlign Table 8 uses ε).
    scale: see `input_grad_norm`.
    formulation: as in `exact_grad_penalty`.
    clip: clip x + δ to the box [0, 1].
    grad_x: ∇ₓℓ(x) if already known (e.g. FGSM's `grad_at_start`), saves one
      backward pass. It must be the gradient at the current parameters: with
      the surrogate formulations it is used as the value of a gradient whose
      parameter derivative is taken (the train step guarantees this).
  Returns:
    The scalar penalty (not yet multiplied by λ).
  """
  _checks.check_eps(eps)
  c = _scale_factor(scale, x.shape[0])
  _checks.check_choice("formulation", formulation, FORMULATIONS)
  g_x = jax.grad(loss_fn)(x) if grad_x is None else grad_x
  direction = jax.lax.stop_gradient(jnp.sign(g_x))
  x_moved = x + (eps * direction).astype(x.dtype)
  if clip:
    x_moved = jnp.clip(x_moved, 0.0, 1.0)

  def penalty(g_clean, g_moved):
    return c * jnp.sum((_flat(g_moved) - _flat(g_clean)) ** 2)

  grads = None
  if formulation != "reverse_over_reverse":
    grads = (jax.lax.stop_gradient(g_x), jax.grad(loss_fn)(x_moved))
  return exact_grad_penalty(loss_fn, (x, x_moved), penalty, formulation=formulation,
                            grads=grads)


def _cure_forward_points(args, hparams):
  """CURE's train-mode forwards: at x (∇ℓ(x)) and at x + h·sign(∇ℓ(x))."""
  x, g_x = args["x"], args.get("grad_x")
  if g_x is None:
    g_x = jax.grad(args["loss_fn"])(x)
  moved = x + (args["eps"] * jnp.sign(g_x)).astype(x.dtype)
  if hparams.get("clip", False):
    moved = jnp.clip(moved, 0.0, 1.0)
  return [x, jax.lax.stop_gradient(moved)]


# ---------------------------------------------------------------------------
# AdvLC and its ablation variants
# ---------------------------------------------------------------------------

def _kl(p_logits: Array, q_logits: Array) -> Array:
  """KL(softmax p ‖ softmax q) per example."""
  log_p = jax.nn.log_softmax(p_logits, axis=-1)
  log_q = jax.nn.log_softmax(q_logits, axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _js(p_logits: Array, q_logits: Array) -> Array:
  """Jensen-Shannon divergence per example (natural log)."""
  log_p = jax.nn.log_softmax(p_logits, axis=-1)
  log_q = jax.nn.log_softmax(q_logits, axis=-1)
  log_m = jnp.logaddexp(log_p, log_q) - jnp.log(2.0)
  kl_pm = jnp.sum(jnp.exp(log_p) * (log_p - log_m), axis=-1)
  kl_qm = jnp.sum(jnp.exp(log_q) * (log_q - log_m), axis=-1)
  return 0.5 * (kl_pm + kl_qm)


def advlc_from_logits(logits_clean: Array, logits_adv: Array, *,
                      top_fraction: Optional[float] = None, distance: str = "l1") -> Array:
  """AdvLC (and variants) from the two logit matrices (B, C).

  * "l1" (AdvLC): o = |f(x+δ) − f(x)| over batch × classes; the N =
    ⌊top_fraction·B·C⌋ largest entries (hard top-k, default 10%) are summed
    and divided by B. top_fraction=1 is the plain L1 variant.
  * "l2sq": the same with squared differences (default top 10%; 1 = plain
    squared L2).
  * "kl": mean_i KL(softmax f(xᵢ) ‖ softmax f(xᵢ+δᵢ)).
  * "js": mean_i JS(softmax f(xᵢ), softmax f(xᵢ+δᵢ)).
  * "nuclear": ‖f(x+δ) − f(x)‖_* / B, the nuclear norm (sum of singular
    values) of the B × C difference matrix (the paper only calls the variant
    "Nuclear"; this is the natural reading).
  Gradients flow through both logit matrices.
  """
  _checks.check_choice("AdvLC distance", distance, ADVLC_DISTANCES)
  if distance in _ELEMENTWISE_DISTANCES:
    top_fraction = 0.1 if top_fraction is None else top_fraction
    _check_fraction("top_fraction", top_fraction)
  elif top_fraction is not None:
    raise ValueError(
        f"top_fraction applies only to the elementwise distances {list(_ELEMENTWISE_DISTANCES)}, "
        f"not to {distance!r}; got top_fraction={top_fraction!r}.")
  _checks.check_same_shape("logits_clean", logits_clean, "logits_adv", logits_adv)
  logits_clean = _at_least_f32(logits_clean)
  logits_adv = _at_least_f32(logits_adv)
  batch = logits_adv.shape[0]
  diff = logits_adv - logits_clean
  if distance in _ELEMENTWISE_DISTANCES:
    entries = jnp.abs(diff) if distance == "l1" else diff * diff
    entries = entries.reshape(-1)
    n = _count(top_fraction, entries.shape[0])
    if n == entries.shape[0]:
      return jnp.sum(entries) / batch
    top, _ = jax.lax.top_k(entries, n)
    return jnp.sum(top) / batch
  if distance == "kl":
    return jnp.mean(_kl(logits_clean, logits_adv))
  if distance == "js":
    return jnp.mean(_js(logits_clean, logits_adv))
  singular_values = jnp.linalg.svd(diff, compute_uv=False)
  return jnp.sum(singular_values) / batch


def adv_logit_consistency(logits_fn: closures.LogitsFn, x: Array, delta: Array, *,
                          top_fraction: Optional[float] = None, distance: str = "l1",
                          x_clean: Optional[Array] = None,
                          logits_adv: Optional[Array] = None) -> Array:
  """AdvLC regularizer (Li & Spratling 2023, Eq. 14) and its ablation variants.

  Defaults: reg = Σ top-N |f(x+δ) − f(x)| / B over the B·C logit entries,
  N = 10% of B·C. The adversarial logits are at x + δ; the "clean" ones at x
  (Eq. 14) or, with `x_clean`, at another point (the AdvLC code uses the noisy
  starting point clip(x + η) of FGSM-N). Computed on the (per-device) batch.

  Args:
    logits_fn: `x -> logits` built from the parameters being trained.
    x: clean images.
    delta: adversarial perturbation (x + delta is the adversarial point).
    top_fraction: fraction of B·C entries kept (default 0.1) for "l1"/"l2sq".
    distance: "l1" (AdvLC), "l2sq", "kl", "js", "nuclear"; see `advlc_from_logits`.
    x_clean: the point for the "clean" logits (default: x).
    logits_adv: f(x + δ) if already computed by the training loss (saves a
      forward pass; must come from the same parameters to be differentiated).
  Returns:
    The scalar regularizer (not yet multiplied by λ).
  """
  _checks.check_same_shape("delta", delta, "x", x)
  point_clean = x if x_clean is None else x_clean
  z_clean = logits_fn(point_clean)
  z_adv = logits_fn(x + delta) if logits_adv is None else logits_adv
  return advlc_from_logits(z_clean, z_adv, top_fraction=top_fraction, distance=distance)


# ---------------------------------------------------------------------------
# λ(ε) and the registry used by the train step
# ---------------------------------------------------------------------------

def lambda_for_eps(dataset: str, eps: Any) -> float:
  """GradAlign's λ as a function of ε (log-linear rule, GradAlign Table 2).

  CIFAR-10: λ = 0.02·10^(ε/8) with ε in /255 (0.2 at 8/255, 2.0 at 16/255);
  SVHN: λ = 1.5625·1.6^(ε/8) (2.5 at 8/255). Very large ε (24, 32) used λ = 2
  in the paper; that override is left to the config.

  Args:
    dataset: "cifar10" or "svhn".
    eps: L∞ radius in pixel units ([0, 1] scale), e.g. 8/255.
  Returns:
    λ as a Python float.
  """
  rules = {"cifar10": (0.02, 10.0), "svhn": (1.5625, 1.6)}
  _checks.check_choice("dataset for the GradAlign λ(ε) rule", dataset, rules)
  _checks.check_eps(eps)
  scale, base = rules[dataset]
  return float(scale * base ** (float(eps) * 255.0 / 8.0))


def adv_logit_consistency_at(logits_fn: closures.LogitsFn, x: Array, delta: Array,
                             start: Optional[Array] = None, *, clean_point: str = "x",
                             logits_adv: Optional[Array] = None, **kwargs) -> Array:
  """AdvLC (Li & Spratling 2023, Eq. 14) with its "clean" point chosen by name.

  clean_point="x": the clean logits f(x) (Eq. 14 of the paper); "start": the
  attack's starting point (the AdvLC code uses FGSM-N's noisy point
  clip(x + η)). Other keyword arguments as in `adv_logit_consistency`.
  """
  _checks.check_choice("AdvLC clean_point", clean_point, ADVLC_CLEAN_POINTS)
  if clean_point == "start" and start is None:
    raise ValueError("clean_point='start' needs the attack's starting point (start=...).")
  x_clean = start if clean_point == "start" else None
  return adv_logit_consistency(logits_fn, x, delta, x_clean=x_clean,
                               logits_adv=logits_adv, **kwargs)


TRAIN_STEP_QUANTITIES = {
    "loss_fn": "batch-mean CE closure of the parameters being trained (BatchNorm "
               "in batch mode, running averages not updated)",
    "logits_fn": "the logits closure behind loss_fn",
    "x": "the clean (augmented) images",
    "labels": "the labels",
    "delta": "the attack's perturbation (a constant)",
    "start": "the point where the attack took its gradient (a constant)",
    "grad_at_start": "the input gradient at start (a constant; the attack's own "
                     "when it took one in the same BatchNorm mode, else computed)",
    "grad_at_clean": "the input gradient at x (a constant; the attack's own when "
                     "it started at x, else computed)",
    "logits_adv": "the logits at x + delta of the CE term (differentiable)",
    "key": "a PRNG key for the regularizer's own randomness",
    "eps": "the L-inf radius in pixel units",
    "step_index": "the training step index (traced)",
}
"""What the train step can hand a regularizer, by name."""


@dataclasses.dataclass(frozen=True)
class RegularizerSpec:
  """A regularizer's registration.

  Attributes:
    fn: the regularizer, called as `fn(**consumed, **hyperparameters)` and
      returning one scalar (not yet multiplied by λ) with an exact parameter
      gradient.
    consumes: argument name of `fn` -> the train-step quantity it receives
      (a key of `TRAIN_STEP_QUANTITIES`).
    draw_arg: the keyword through which `fn` accepts its random draw
      explicitly (`noise` for GradAlign's η, `draws` for ELLE), or None for a
      deterministic regularizer. The train step passes a draw given in the
      batch (`batch["noise"][name]`) through it (parity tests).
    forward_points: `forward_points(args, hparams) -> [points]`: the inputs at
      which the reference runs the model in train mode for this regularizer,
      in order (`args` are the call's consumed arguments plus the draw). The
      train step replays them with `bn_updates="every_forward"` to update the
      BatchNorm running statistics as PyTorch does; None when the
      regularizer has no such description (that mode then refuses it).
  """
  fn: Callable[..., Array]
  consumes: Mapping[str, str]
  draw_arg: Optional[str] = None
  forward_points: Optional[Callable[[Mapping[str, Any], Mapping[str, Any]], list]] = None

  def __post_init__(self):
    unknown = set(self.consumes.values()) - set(TRAIN_STEP_QUANTITIES)
    if unknown:
      raise ValueError(f"Unknown train-step quantities {sorted(unknown)}; choose from "
                       f"{sorted(TRAIN_STEP_QUANTITIES)}.")


REGULARIZER_SPECS: dict[str, RegularizerSpec] = {}
"""Every registered regularizer by name (see `register_regularizer`)."""

REGULARIZERS: dict[str, Callable[..., Array]] = {}
"""name -> regularizer function, a view of `REGULARIZER_SPECS`."""


def register_regularizer(name: str, spec: RegularizerSpec) -> RegularizerSpec:
  """Registers `spec` under `name` (configs select it as regularizers.<name>)."""
  if name in REGULARIZER_SPECS:
    raise ValueError(f"A regularizer named {name!r} is already registered.")
  REGULARIZER_SPECS[name] = spec
  REGULARIZERS[name] = spec.fn
  return spec


register_regularizer("grad_align", RegularizerSpec(grad_align, dict(
    loss_fn="loss_fn", x="x", key="key", eps="eps", grad_start="grad_at_start",
    x_start="start", step_index="step_index"), draw_arg="noise",
    forward_points=_grad_align_forward_points))
register_regularizer("cure", RegularizerSpec(cure, dict(
    loss_fn="loss_fn", x="x", eps="eps", grad_x="grad_at_clean"),
    forward_points=_cure_forward_points))
register_regularizer("input_grad_norm", RegularizerSpec(input_grad_norm, dict(
    loss_fn="loss_fn", x="x", grad_x="grad_at_clean"),
    forward_points=lambda args, hp: [args["x"]]))
def _advlc_forward_points(args, hparams):
  """AdvLC's train-mode forwards beside the CE pass: none for clean_point="start"
  (the AdvLC code's `model(cle)` is the attack's own forward, src/utils/train.py
  l.189-195), the clean x for clean_point="x"."""
  return [] if hparams.get("clean_point", "x") == "start" else [args["x"]]


_ADVLC_CONSUMES = dict(logits_fn="logits_fn", x="x", delta="delta", start="start",
                       logits_adv="logits_adv")
for _name, _kwargs in (("advlc", dict(distance="l1", top_fraction=0.1)),
                       ("advlc_l1", dict(distance="l1", top_fraction=1.0)),
                       ("advlc_l2", dict(distance="l2sq", top_fraction=1.0)),
                       ("advlc_kl", dict(distance="kl")),
                       ("advlc_js", dict(distance="js")),
                       ("advlc_nuclear", dict(distance="nuclear"))):
  register_regularizer(_name, RegularizerSpec(
      functools.partial(adv_logit_consistency_at, **_kwargs), _ADVLC_CONSUMES,
      forward_points=_advlc_forward_points))


def _import_own_modules() -> None:
  """Regularizers in their own modules of this package register themselves."""
  for info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{info.name}")


_import_own_modules()

"""Adversarial attacks as pure functions of a loss closure.

Every attack here is a pure, jittable function with fixed shapes::

  out = attack(loss_fn, x, key, *, eps, ...)     # an AttackOutput
  out.delta           # the perturbation; x + out.delta is the adversarial point
  out.start           # the point at which the attack took its input gradient
  out.grad_at_start   # that gradient (None for attacks that take none)

* `loss_fn(x) -> scalar` is the batch-mean loss (see `fastadv_jax.closures`); PGD's
  per-example features (early stopping, restart selection, best iterates) need a
  `closures.LossFn`, whose `.with_aux(x)` also reports per-example losses and
  correctness.
* `x` is a batch of NHWC images in [0, 1]; `eps` and `step` are in pixel units.
* The returned `delta` is float32, has the shape of `x`, and `x + delta` lies in
  the box [0, 1]. `start` and `grad_at_start` let a regularizer reuse the
  attack's gradient (GradAlign's g1 at the FGSM starting point) instead of
  recomputing it. Perturbation arithmetic is float32 even when the model computes
  in bf16 (8/255 is only a handful of bf16 steps near 1.0): input gradients are
  cast to float32 before they are used.
* Input gradients are gradients of the *batch-mean* loss. With BatchNorm in batch
  mode the examples are coupled through the batch statistics, exactly as in the
  PyTorch references (which attack in `model.train()` mode); per-example losses
  then depend on the rest of the batch. Signs and normalised L2 steps do not
  depend on the 1/B factor of the mean.
* Concrete arguments (Python numbers, NumPy and committed JAX arrays) are checked
  at the call and a bad value raises a ValueError naming it; traced values inside
  `jax.jit` pass unchecked (a warmed-up ε or a step that starts at 0 never forces
  a recompile).

Each attack is registered once, beside its function, with an `AttackSpec`: its
default step as a multiple of ε, the radius of its perturbation set (ε for most,
2ε for FGSM-N, 3ε for N-FGSM), which hyperparameters are traced (the
catastrophic-overfitting monitor may change them without a recompile), whether
its gradient is taken at the clean x, and for AT for Free the per-run state. The
train step, the config validation and the tests read these specs; nothing
outside this module restates them.

Where the papers and their code differ, a keyword argument selects; the defaults
follow REFERENCE.md (the authors' code).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import _checks, xla_cpu

Array = jax.Array
LossClosure = Callable[[Array], Array]

NORMS = ("linf", "l2")
SELECT_RULES = ("strict", "max_loss")
ZEROGRAD_MASK_MODES = ("gradient", "perturbation")
# The input-gradient rule at the box boundary, for attacks whose reference takes
# the gradient through `clamp(x + delta, 0, 1)` (see `boundary_input_grad`).
BOX_GRAD_RULES = ("full", "zero", "half")


# ----------------------------------------------------------------------------
# Boundary checks (concrete values only; tracers pass).
# ----------------------------------------------------------------------------



def _check_key(key: Any, attack: str) -> None:
  if key is None:
    raise ValueError(
        f"{attack} draws random numbers and needs a jax.random key; got key=None.")


def _check_common(x: Any, eps: Any, step: Any = None, *, norm: str = "linf") -> None:
  _checks.check_images(x)
  if norm == "linf":
    _checks.check_eps(eps)
  else:
    # An l2 radius may exceed 1 (e.g. 3.0 on ImageNet); it only has to be >= 0.
    _checks.check_nonnegative("eps", eps)
  _checks.check_nonnegative("step", step)


def _require_aux(loss_fn: Any, feature: str) -> None:
  if not hasattr(loss_fn, "with_aux"):
    raise ValueError(
        f"{feature} needs per-example losses and correctness, but loss_fn "
        f"{loss_fn!r} is a plain callable; build it with fastadv_jax.closures "
        f"(e.g. closures.cross_entropy(logits_fn, labels)), whose LossFn has .with_aux.")


# ----------------------------------------------------------------------------
# Small building blocks (public: other modules reuse them).
# ----------------------------------------------------------------------------

def project_box(x: Array, delta: Array) -> Array:
  """Returns the delta closest to `delta` with x + delta in [0, 1].

  Written as a clip of delta to [-x, 1 - x], so that x + delta <= 1 holds exactly
  in float32 as well.
  """
  return jnp.clip(delta, -x, 1.0 - x)


def project_linf(delta: Array, eps: Any) -> Array:
  """Projection onto the l_inf ball of radius eps (a clip)."""
  return jnp.clip(delta, -eps, eps)


def _per_example_norm(v: Array) -> Array:
  """l2 norm over all non-batch axes, shaped for broadcasting against v."""
  axes = tuple(range(1, v.ndim))
  return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def project_l2(delta: Array, eps: Any) -> Array:
  """Per-example projection onto the l2 ball of radius eps."""
  norm = _per_example_norm(delta)
  factor = jnp.minimum(1.0, eps / jnp.maximum(norm, 1e-12))
  return delta * factor


def per_example_quantile(values: Array, q: Any) -> Array:
  """The q-quantile of each example's entries (all non-batch axes flattened).

  Uses the 'linear' rule of `torch.quantile` (its default, which the ZeroGrad
  authors' code uses) and of `numpy.quantile`: with the n entries sorted
  v_0 <= ... <= v_{n-1}, position p = q (n - 1), i = floor(p),
  quantile = v_i + (p - i) (v_{i+1} - v_i).

  Args:
    values: (B, ...) array.
    q: quantile level in [0, 1] (may be traced).
  Returns:
    (B,) float32 quantiles.
  """
  flat = values.reshape(values.shape[0], -1)
  flat = flat.astype(_work_dtype(flat))
  n = flat.shape[1]
  sorted_values = jnp.sort(flat, axis=1)
  position = jnp.asarray(q, flat.dtype) * (n - 1)
  below = jnp.clip(jnp.floor(position), 0, n - 1).astype(jnp.int32)
  above = jnp.minimum(below + 1, n - 1)
  weight = position - below.astype(flat.dtype)
  v_below = sorted_values[:, below]
  v_above = sorted_values[:, above]
  return v_below + weight * (v_above - v_below)


def _input_grad(loss_fn: LossClosure, point: Array) -> Array:
  """Gradient of the batch-mean loss with respect to the input point.

  float32 (float64 stays float64, for the float64 parity checks)."""
  dtype = _work_dtype(point)
  grad = jax.grad(lambda z: loss_fn(z))(point.astype(dtype))
  return grad.astype(dtype)


def boundary_input_grad(loss_fn: LossClosure, x: Array, delta: Array | None,
                        box_grad: str = "full") -> Array:
  """Input gradient at the box-clipped point x + delta, with a boundary rule.

  The GradAlign code feeds its model `utils.clamp(X + delta, 0, 1)` (utils.py
  l.20-30: `torch.max(torch.min(X, u), l)`) and differentiates with respect to
  delta, so the chain rule through the clamp multiplies the gradient at the
  clipped point p = clip(x + delta) by m(x + delta):

  * 1 strictly inside (0, 1), 0 strictly outside (every rule but "full");
  * at x + delta exactly 0 or 1 (a tie of the elementwise max/min) the
    framework's tie rule: "zero" = PyTorch <= 1.4 (`masked_fill_(self <= other,
    0)` in its derivatives.yaml; the GradAlign Dockerfile pins 1.4, so the
    published numbers used it: FGSM leaves those pixels unperturbed), "half" =
    PyTorch >= 1.5 (`grad / 2` at ties).
  * "full": no clamp in the graph, the gradient at the clipped point itself
    (Wong's, Rice's/ZeroGrad's and the AdvLC code, which clip delta and feed
    X + delta, or a box-clipped leaf, to the model).

  Args:
    loss_fn: batch-mean loss closure.
    x: images in [0, 1].
    delta: the perturbation; x + delta may leave the box (None: zero).
    box_grad: "full", "zero" or "half".
  Returns:
    The gradient with respect to delta, float32 (float64 kept).
  """
  _checks.check_choice("box_grad", box_grad, BOX_GRAD_RULES)
  # delta None: at x itself, written as x so that XLA can share this pass with
  # other computations at x in the same step (the regularizers' ∇ℓ(x)).
  point = x if delta is None else x + project_box(x, delta)
  grad = _input_grad(loss_fn, point)
  if box_grad == "full":
    return grad
  return grad * _boundary_factor(x if delta is None else x + delta,
                                 box_grad).astype(grad.dtype)


def _boundary_factor(point: Array, box_grad: str) -> Array:
  """m(point) of `boundary_input_grad` (1 everywhere for "full")."""
  if box_grad == "full":
    return jnp.ones_like(point)
  inside = (point > 0) & (point < 1)
  tie = (point == 0) | (point == 1)
  tie_factor = 0.0 if box_grad == "zero" else 0.5
  return jnp.where(inside, 1.0, jnp.where(tie, tie_factor, 0.0)).astype(point.dtype)


def _work_dtype(x: Any):
  """The dtype of perturbation arithmetic: float32, or float64 for float64 inputs."""
  return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def _uniform(key: Array, shape, radius: Any, dtype=jnp.float32) -> Array:
  return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0).astype(dtype) * radius


def _as_float32(x: Array) -> Array:
  """x as float32 (bf16/fp16 and integers promoted; float64 kept)."""
  x = jnp.asarray(x)
  return x.astype(_work_dtype(x)) if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _noise_or_draw(noise: Any, key: Array, shape, radius: Any, dtype, what: str) -> Array:
  """The given draw (checked for shape), or U[-radius, radius]^shape from key."""
  if noise is None:
    return _uniform(key, shape, radius, dtype)
  if tuple(np.shape(noise)) != tuple(shape):
    raise ValueError(f"{what}: noise has shape {tuple(np.shape(noise))}, expected {tuple(shape)}.")
  return jnp.asarray(noise).astype(dtype)


@flax.struct.dataclass
class AttackOutput:
  """What every attack returns (a pytree; passes through `jit` and `pmap`).

  Attributes:
    delta: the perturbation, float32, shape of x; x + delta lies in the box.
    start: the point at which the attack took its (first) input gradient: x for
      FGSM and PGD without random start, the box-clipped noisy point for
      FGSM-RS, ZeroGrad, N-FGSM and FGSM-N, the first random start for
      MultiGrad. GradAlign's g1 is the gradient here (GradAlign Sec. 4).
    grad_at_start: float32 input gradient of the batch-mean loss at `start`,
      or None when the attack takes no gradient (no attack, a pure random
      corner, PGD with zero steps).
    forward_points: the points at which the attack ran the model, in order,
      stacked (k, *x.shape); the train step replays them to update BatchNorm's
      running statistics once per forward (`bn_updates="every_forward"`, as
      PyTorch does in train mode). None for an attack that runs no forward.
      Unused values cost nothing under jit (dead code).
  """
  delta: Array
  start: Array
  grad_at_start: Optional[Array] = None
  forward_points: Optional[Array] = None


# ----------------------------------------------------------------------------
# Single-step attacks.
# ----------------------------------------------------------------------------

def no_attack(loss_fn: LossClosure, x: Array, key: Array | None = None, *,
              eps: Any = 0.0) -> AttackOutput:
  """The zero perturbation (standard training), for registries and configs."""
  del loss_fn, key, eps
  x = _as_float32(x)
  return AttackOutput(jnp.zeros(x.shape, x.dtype), x, None)


def fgsm(loss_fn: LossClosure, x: Array, key: Array | None = None, *, eps: Any,
         step: Any = None, box_grad: str = "full") -> AttackOutput:
  """FGSM (Goodfellow et al. 2015) from the clean point.

  delta = clip_eps(step * sign(grad_x loss(x))), then projected onto the box.

  Args:
    loss_fn: batch-mean loss closure.
    x: images (B, H, W, C) in [0, 1].
    key: unused (FGSM is deterministic); accepted for a uniform signature.
    eps: l_inf radius.
    step: step size alpha (default eps).
    box_grad: the gradient rule at pixels exactly 0 or 1 (`boundary_input_grad`):
      "full" (default), "zero" (the GradAlign code under PyTorch 1.4, train.py
      l.152-160: the gradient through `clamp(X + delta, 0, 1)` at delta = 0,
      which leaves those pixels unperturbed) or "half" (current PyTorch).
  Returns:
    AttackOutput; start = x, grad_at_start = the input gradient at x (with the
    boundary rule applied).
  """
  del key
  _check_common(x, eps, step)
  _checks.check_choice("box_grad", box_grad, BOX_GRAD_RULES)
  step = _step_or_default("fgsm", step, eps)
  x = _as_float32(x)
  grad = boundary_input_grad(loss_fn, x, None, box_grad)
  delta = project_box(x, project_linf(step * jnp.sign(grad), eps))
  return AttackOutput(delta, x, grad, x[None])


def fgsm_rs(loss_fn: LossClosure, x: Array, key: Array | None = None, *, eps: Any,
            step: Any = None, clip_init_to_box: bool = True, box_grad: str = "full",
            noise: Array | None = None) -> AttackOutput:
  """FGSM with a random start (FGSM-RS; Wong et al. 2020, Alg. 3).

  eta ~ U[-eps, eps]^d, delta = clip_eps(eta + step * sign(grad loss(x + eta))),
  then projected onto the box.

  Args:
    loss_fn: batch-mean loss closure.
    x: images in [0, 1].
    key: PRNG key for eta.
    eps: l_inf radius.
    step: step alpha (default 1.25 eps, i.e. 10/255 at eps = 8/255).
    clip_init_to_box: True (Wong's code) clips eta so that x + eta is in the box
      before the step; False (the GradAlign code) keeps the unclipped eta in the
      update, while the gradient is still taken at the box-clipped point.
    box_grad: the gradient rule through the box (`boundary_input_grad`):
      "full" (Wong's code: no clamp in the graph) or, for the GradAlign code
      (train.py l.146-160, `clamp(X + delta, 0, 1)`), "zero" (PyTorch 1.4) /
      "half" (current PyTorch); both give 0 where x + eta leaves the box.
    noise: the draw eta itself (shape of x, pixel units, before any box
      clipping); None draws U[-eps, eps]^d from key (parity tests pass the
      reference's draw here).
  Returns:
    AttackOutput; start = the box-clipped x + eta, grad_at_start = the input
    gradient there.
  """
  if noise is None:
    _check_key(key, "fgsm_rs")
  _check_common(x, eps, step)
  _checks.check_choice("box_grad", box_grad, BOX_GRAD_RULES)
  step = _step_or_default("fgsm_rs", step, eps)
  x = _as_float32(x)
  eta = _noise_or_draw(noise, key, x.shape, eps, x.dtype, "fgsm_rs")
  if clip_init_to_box:
    eta = project_box(x, eta)
  start = x + project_box(x, eta)
  grad = boundary_input_grad(loss_fn, x, eta, box_grad)
  delta = project_box(x, project_linf(eta + step * jnp.sign(grad), eps))
  return AttackOutput(delta, start, grad, start[None])


def zerograd(loss_fn: LossClosure, x: Array, key: Array | None = None, *, eps: Any,
             q: Any, step: Any = None, mask_mode: str = "gradient",
             clip_init_to_box: bool = True, noise: Array | None = None) -> AttackOutput:
  """ZeroGrad (Golgooni et al. 2021): FGSM-RS with small gradient entries zeroed.

  eta ~ U[-eps, eps]^d (box-clipped), g = grad loss(x + eta); per example,
  t = q-quantile of |g| over all C*H*W entries (`per_example_quantile`, torch's
  'linear' rule); the mask m = (|g| >= t) keeps the entries *not* strictly below t.

  * mask_mode="gradient" (Alg. 1 and the authors' code, default):
    delta = clip_eps(eta + step * sign(g * m)), so masked coordinates keep their
    random-init value eta.
  * mask_mode="perturbation" (Sec. 3.1, delta_bar = delta * 1(|g| >= t)): the
    FGSM-RS perturbation with masked coordinates zeroed entirely (noise included).

  Either way the result is projected onto the box.

  Args:
    loss_fn: batch-mean loss closure.
    x: images in [0, 1].
    key: PRNG key for eta.
    eps: l_inf radius.
    q: quantile level in [0, 1] (0.35 CIFAR-10, 0.45 CIFAR-100, 0.7 SVHN).
    step: step alpha (default 2 eps).
    mask_mode: "gradient" or "perturbation", see above.
    clip_init_to_box: clip eta to the box before the step (the authors' code).
    noise: the draw eta (shape of x, before box clipping); None draws it from key.
  Returns:
    AttackOutput; start = the box-clipped x + eta, grad_at_start = the
    unmasked input gradient g there.
  """
  if noise is None:
    _check_key(key, "zerograd")
  _check_common(x, eps, step)
  _checks.check_in_range("q", q, 0.0, 1.0)
  _checks.check_choice("ZeroGrad mask_mode", mask_mode, ZEROGRAD_MASK_MODES)
  step = _step_or_default("zerograd", step, eps)
  x = _as_float32(x)
  eta = _noise_or_draw(noise, key, x.shape, eps, x.dtype, "zerograd")
  if clip_init_to_box:
    eta = project_box(x, eta)
  start = x + project_box(x, eta)
  grad = _input_grad(loss_fn, start)
  threshold = per_example_quantile(jnp.abs(grad), q)
  keep = jnp.abs(grad) >= threshold.reshape((-1,) + (1,) * (grad.ndim - 1))
  if mask_mode == "gradient":
    delta = project_linf(eta + step * jnp.sign(jnp.where(keep, grad, 0.0)), eps)
  else:
    delta = jnp.where(keep, project_linf(eta + step * jnp.sign(grad), eps), 0.0)
  delta = project_box(x, delta)
  return AttackOutput(delta, start, grad, start[None])


def multigrad(loss_fn: LossClosure, x: Array, key: Array | None = None, *, eps: Any,
              num_starts: int = 3, step: Any = None,
              vectorize: bool = True, noise: Array | None = None) -> AttackOutput:
  """MultiGrad (Golgooni et al. 2021): keep coordinates whose gradient signs agree.

  Gradients g_1..g_N at N random starts x + eta_n, eta_n ~ U[-eps, eps]^d
  (box-clipped); coordinate i is kept only where all N signs agree (and are
  nonzero). delta = clip_eps(step * sign(g_1)) on kept coordinates and 0
  elsewhere, starting from x (not from a random point); then box-projected.

  Args:
    loss_fn: batch-mean loss closure.
    x: images in [0, 1].
    key: PRNG key for the starts.
    eps: l_inf radius.
    num_starts: N (3 in the paper).
    step: step alpha (default eps).
    vectorize: True computes the N gradients with `jax.vmap` (each start is its
      own batch, as in the authors' non-parallel code); False uses `lax.map`
      (sequential, N times less memory).
    noise: the draws eta_1..eta_N, shape (N, *x.shape), before box clipping;
      None draws them from key.
  Returns:
    AttackOutput; start = the first random start x + eta_1, grad_at_start = g_1.
  """
  if noise is None:
    _check_key(key, "multigrad")
  _check_common(x, eps, step)
  _checks.check_int("num_starts", num_starts, 1)
  step = _step_or_default("multigrad", step, eps)
  x = _as_float32(x)
  if noise is None:
    keys = jax.random.split(key, num_starts)
    etas = jax.vmap(lambda k: _uniform(k, x.shape, eps, x.dtype))(keys)
  else:
    etas = _noise_or_draw(noise, None, (num_starts,) + x.shape, eps, x.dtype, "multigrad")
  etas = jax.vmap(lambda e: project_box(x, e))(etas)
  grad_at = lambda eta: _input_grad(loss_fn, x + eta)
  grads = jax.vmap(grad_at)(etas) if vectorize else jax.lax.map(grad_at, etas)
  signs = jnp.sign(grads)
  agree = jnp.abs(jnp.sum(signs, axis=0)) >= num_starts
  delta = project_box(x, project_linf(step * jnp.where(agree, signs[0], 0.0), eps))
  return AttackOutput(delta, x + etas[0], grads[0], x[None] + etas)


def n_fgsm(loss_fn: LossClosure, x: Array, key: Array | None = None, *, eps: Any,
           noise_mag: Any = None, step: Any = None,
           clip_noise_to_box: bool = True, noise: Array | None = None) -> AttackOutput:
  """N-FGSM (de Jorge et al. 2022, "Make some noise").

  eta ~ U[-noise_mag, noise_mag]^d, clipped so that x + eta is in the box (as in
  the authors' code); delta = eta + step * sign(grad loss(x + eta)), projected
  onto the box only: there is **no** projection back to the eps-ball, so
  ||delta||_inf <= noise_mag + step (3 eps with the defaults).

  Args:
    loss_fn: batch-mean loss closure.
    x: images in [0, 1].
    key: PRNG key for eta.
    eps: nominal radius (sets the defaults).
    noise_mag: noise half-width (default 2 eps).
    step: step alpha (default eps).
    clip_noise_to_box: clip eta to the box before the gradient (authors' code);
      False keeps the raw eta in the update (the gradient is still taken at the
      box-clipped point).
    noise: the draw eta (shape of x, before box clipping); None draws
      U[-noise_mag, noise_mag]^d from key.
  Returns:
    AttackOutput; start = the box-clipped noisy point x + eta, grad_at_start
    = the input gradient there.
  """
  if noise is None:
    _check_key(key, "n_fgsm")
  _check_common(x, eps, step)
  _checks.check_nonnegative("noise_mag", noise_mag)
  noise_mag = _N_FGSM_NOISE * eps if noise_mag is None else noise_mag
  step = _step_or_default("n_fgsm", step, eps)
  return _noisy_fgsm(loss_fn, x, key, noise_mag, step, clip_noise_to_box, noise, "n_fgsm")


def fgsm_n(loss_fn: LossClosure, x: Array, key: Array | None = None, *, eps: Any,
           step: Any = None, noise_mag: Any = None,
           noise: Array | None = None) -> AttackOutput:
  """FGSM-N (Zhang et al. 2022), the single-step baseline of the AdvLC paper.

  Not N-FGSM: eta ~ U[-eps, eps]^d clipped to the box, one step of size eps from
  x + eta, no projection back to the eps-ball (box only), so ||delta||_inf can
  reach 2 eps. In the AdvLC code the regularizer's "clean" logits are taken at the
  noisy point x + eta (Eq. 14 of the paper uses f(x)); the output's `start` is
  that noisy point, so that the caller can do either.

  Args:
    loss_fn: batch-mean loss closure.
    x: images in [0, 1].
    key: PRNG key for eta.
    eps: l_inf radius of the noise and default step.
    step: step (default eps).
    noise_mag: noise half-width (default eps).
    noise: the draw eta (shape of x, before box clipping); None draws it from key.
  Returns:
    AttackOutput; start = the box-clipped noisy point x + eta, grad_at_start
    = the input gradient there.
  """
  if noise is None:
    _check_key(key, "fgsm_n")
  _check_common(x, eps, step)
  _checks.check_nonnegative("noise_mag", noise_mag)
  noise_mag = eps if noise_mag is None else noise_mag
  step = _step_or_default("fgsm_n", step, eps)
  return _noisy_fgsm(loss_fn, x, key, noise_mag, step, True, noise, "fgsm_n")


def _noisy_fgsm(loss_fn, x, key, noise_mag, step, clip_noise_to_box, noise,
                what) -> AttackOutput:
  x = _as_float32(x)
  eta = _noise_or_draw(noise, key, x.shape, noise_mag, x.dtype, what)
  if clip_noise_to_box:
    eta = project_box(x, eta)
  start = x + project_box(x, eta)
  grad = _input_grad(loss_fn, start)
  delta = project_box(x, eta + step * jnp.sign(grad))
  return AttackOutput(delta, start, grad, start[None])


def random_corner(loss_fn: LossClosure, x: Array, key: Array | None = None, *,
                  eps: Any, step: Any = None, noise: Array | None = None) -> AttackOutput:
  """A random vertex of the eps-ball (GradAlign paper, Sec. 3 baselines).

  The GradAlign code's `--attack random_corner` trains on delta = eps * sign(u),
  u ~ U[-eps, eps]^d: a uniformly random corner of the l_inf ball, no gradient
  step. That is the default here (`step=None`), box-projected (the authors' code
  feeds x + delta to the model unclipped; here x + delta stays in [0, 1]).

  With a `step`, one FGSM step is taken from the corner instead:
  delta = clip_eps(corner + step * sign(grad loss(x + corner))), box-projected.
  (To run PGD from a random corner, pass this function's result with `step=None`
  as `pgd(..., delta_init=...)`.)

  Args:
    loss_fn: batch-mean loss closure (used only with a step).
    x: images in [0, 1].
    key: PRNG key for the corner.
    eps: l_inf radius.
    step: None (pure random corner) or the FGSM step from the corner.
    noise: the corner itself (shape of x, entries +-eps, before box clipping);
      None draws it from key.
  Returns:
    AttackOutput. Without a step no gradient is taken: start = x (where the
    GradAlign code takes g1 for this attack) and grad_at_start = None. With a
    step: start = the corner point, grad_at_start = the gradient there.
  """
  if noise is None:
    _check_key(key, "random_corner")
  _check_common(x, eps, step)
  x = _as_float32(x)
  if noise is None:
    corner = eps * jax.random.rademacher(key, x.shape, jnp.float32).astype(x.dtype)
  else:
    corner = _noise_or_draw(noise, None, x.shape, eps, x.dtype, "random_corner")
  corner = project_box(x, corner)
  if step is None:
    return AttackOutput(corner, x, None)
  start = x + corner
  grad = _input_grad(loss_fn, start)
  delta = project_box(x, project_linf(corner + step * jnp.sign(grad), eps))
  return AttackOutput(delta, start, grad, start[None])


# ----------------------------------------------------------------------------
# AT for Free.
# ----------------------------------------------------------------------------

def free_update(x: Array, delta: Array, grad: Array, *, eps: Any,
                step: Any = None) -> Array:
  """One AT-for-Free perturbation update from an input gradient already at hand.

  new_delta = box(clip_eps(delta + step * sign(grad))). In the original
  (Shafahi et al. 2019, Alg. 1) one backward pass at x + delta gives both the
  weight gradient and `grad`; a train step that differentiates the loss with
  respect to (params, delta) together gets `grad` for free and calls this.

  Args:
    x: images in [0, 1].
    delta: the carried perturbation (for a new minibatch, the previous one's).
    grad: input gradient of the loss at the box-clipped x + delta.
    eps: l_inf radius.
    step: step (default eps, as in the paper).
  Returns:
    The new float32 delta.
  """
  _checks.check_eps(eps)
  _checks.check_nonnegative("step", step)
  step = _step_or_default("free", step, eps)
  x = _as_float32(x)
  grad = jnp.asarray(grad).astype(x.dtype)
  new = jnp.asarray(delta).astype(x.dtype) + step * jnp.sign(grad)
  return project_box(x, project_linf(new, eps))


def free_step(loss_fn: LossClosure, x: Array, key: Array | None = None, *,
              eps: Any, delta: Array, step: Any = None,
              box_grad: str = "full") -> AttackOutput:
  """AT for Free (Shafahi et al. 2019): one replay's update of the carried delta.

  g = grad loss at the box-clipped x + delta (delta carried over from the previous
  replay or minibatch; zeros at the very start); new delta =
  box(clip_eps(delta + step * sign(g))).

  How the train step uses it (through the spec's `CarriedPerturbation`): in the original algorithm
  the weight gradient is taken at x + delta *before* this update, from the same
  forward/backward pass, so one replay costs one pass; the train step does that
  by differentiating with respect to (params, delta) jointly and calling
  `free_update` with the input gradient. Calling `free_step` and then training at
  x + new_delta costs two passes, which is what the GradAlign code does.

  Args:
    loss_fn: batch-mean loss closure.
    x: images in [0, 1].
    key: unused (deterministic); accepted for a uniform signature.
    eps: l_inf radius.
    delta: carried perturbation, same shape as x.
    step: step (default eps).
    box_grad: the gradient rule through `clamp(X + delta, 0, 1)` (the GradAlign
      code's Free, train.py l.149-160; see `boundary_input_grad`).
  Returns:
    AttackOutput; delta = the new delta, start = the box-clipped x + delta
    (old), grad_at_start = g.
  """
  del key
  _check_common(x, eps, step)
  _checks.check_same_shape("delta", delta, "x", x)
  x = _as_float32(x)
  delta = jnp.asarray(delta).astype(x.dtype)
  start = x + project_box(x, delta)
  grad = boundary_input_grad(loss_fn, x, delta, box_grad)
  return AttackOutput(free_update(x, delta, grad, eps=eps, step=step), start, grad,
                      start[None])


# ----------------------------------------------------------------------------
# PGD.
# ----------------------------------------------------------------------------

def pgd(loss_fn: LossClosure, x: Array, key: Array | None = None, *, eps: Any,
        step: Any, steps: int, restarts: int = 1, random_start: bool = True,
        early_stop: bool = False, select: str = "strict",
        keep_best: bool = False, norm: str = "linf",
        delta_init: Array | None = None, clip_init_to_box: bool = True,
        unroll: bool | int | None = None, box_grad: str = "full",
        noise: Array | None = None) -> AttackOutput:
  """Projected gradient ascent (Madry et al. 2018) with restarts.

  Per restart: a start delta_0 (see below); then `steps` times
  delta <- box(ball(delta + step * d)), d = sign(g) ("linf") or g / ||g||_2
  ("l2"), with g the input gradient of the batch-mean loss at x + delta. For
  l_inf the order of the two projections does not matter (clips of two intervals
  that both contain 0); for l2 the box comes last, which keeps the point in the
  ball. Restarts run in a `lax.fori_loop`; restart r uses
  `jax.random.fold_in(key, r)`. Everything is masked, nothing changes shape.

  Start: delta_init when given (projected onto the ball, and onto the box with
  clip_init_to_box); else, with random_start, U[-eps, eps]^d ("linf") or a uniform
  direction times eps * U[0, 1] ("l2", as in Rice et al.'s code); else zero.

  Per-example options (need a `closures.LossFn`):
    * early_stop: examples already misclassified at the current iterate are not
      updated (Wong's and ZeroGrad's evaluation code).
    * keep_best: per example, the restart reports its iterate with the highest
      per-example loss seen, the start included, instead of its last iterate.
    * restarts > 1: per example one restart's point is returned:
      select="strict" (default): a restart whose reported point is misclassified
      if any does (the one of highest loss among those), else the one with the
      highest loss. Robust accuracy is then exactly the accuracy at x + delta,
      and an example counts as robust only if no restart fools it.
      select="max_loss": the highest final per-example loss (the GradAlign, Wong
      and ZeroGrad code; ties go to the later restart, as there).

  Reference settings: PGD-50-10 evaluation: steps=50, restarts=10, step=eps/4;
  GradAlign's training PGD-2 (step eps/2) and PGD-10 (step 2 eps/10) use
  random_start=False; AdvLC's PGD-10 training: step eps/4, random_start=False.

  The loss is always evaluated at the box-clipped point; with
  clip_init_to_box=False (the GradAlign training code) the unclipped start enters
  the first update.

  Args:
    loss_fn: batch-mean loss closure (a LossFn for the per-example options).
    x: images in [0, 1].
    key: PRNG key; may be None without random_start.
    eps: radius of the ball.
    step: step size.
    steps: number of steps (a Python int >= 0).
    restarts: number of restarts (a Python int >= 1; > 1 needs random_start).
    random_start: random start (ignored when delta_init is given).
    early_stop: freeze examples once misclassified.
    select: restart rule, "strict" or "max_loss".
    keep_best: report each restart's best iterate.
    norm: "linf" or "l2".
    unroll: `lax.fori_loop`'s unroll of the step loop. None: fully unrolled on
      the CPU backend for steps <= 10 when the loss gradient convolves (XLA's
      CPU convolutions run several times slower inside a loop body,
      jax-ml/jax#12868: PGD-10 training steps went from 14 s to about 5 s;
      `xla_cpu.unroll_loop`), a rolled loop otherwise.
    delta_init: optional start, same shape as x.
    clip_init_to_box: project the start onto the box.
    box_grad: the gradient rule through `clamp(X + delta, 0, 1)`
      (`boundary_input_grad`): "full" (default), "zero" / "half" for the
      GradAlign code's `attack_pgd_training` (utils.py l.166-190) under PyTorch
      1.4 / current PyTorch.
    noise: the random starts themselves, shape (restarts, *x.shape) (for
      "linf" U[-eps, eps]^d; for "l2" the starting delta), before box
      clipping; used with random_start and no delta_init, replacing the draws
      from key.
  Returns:
    AttackOutput: delta (float32, shape of x) with x + delta in [0, 1] and
    ||delta|| <= eps; start = the first restart's (box-clipped) starting point
    and grad_at_start = the gradient there (None when steps = 0).
  """
  _check_common(x, eps, step, norm=norm)
  _checks.check_choice("norm", norm, NORMS)
  _checks.check_choice("box_grad", box_grad, BOX_GRAD_RULES)
  _checks.check_choice("restart selection rule select", select, SELECT_RULES)
  _checks.check_int("steps", steps, 0)
  _checks.check_int("restarts", restarts, 1)
  if delta_init is not None:
    _checks.check_same_shape("delta_init", delta_init, "x", x)
    if restarts > 1:
      raise ValueError(
          f"restarts={restarts} with delta_init: every restart would start from "
          f"delta_init and give the same result; use restarts=1.")
  elif restarts > 1 and not random_start:
    raise ValueError(
        f"restarts={restarts} without random_start: all restarts would be "
        f"identical; set random_start=True or restarts=1.")
  needs_random = delta_init is None and random_start
  if needs_random and noise is not None:
    expected = (restarts,) + tuple(np.shape(x))
    if tuple(np.shape(noise)) != expected:
      raise ValueError(f"pgd: noise has shape {tuple(np.shape(noise))}, expected "
                       f"(restarts, *x.shape) = {expected}.")
  elif needs_random:
    _check_key(key, "pgd with random_start")
  if early_stop:
    _require_aux(loss_fn, "pgd(early_stop=True)")
  if keep_best:
    _require_aux(loss_fn, "pgd(keep_best=True)")
  if restarts > 1:
    _require_aux(loss_fn, f"pgd(restarts={restarts}) (per-example restart selection)")
  use_aux = early_stop or keep_best or restarts > 1

  x = _as_float32(x)
  dtype = x.dtype
  batch = x.shape[0]
  per_example_shape = (batch,) + (1,) * (x.ndim - 1)
  ball = project_linf if norm == "linf" else project_l2
  if key is None:
    key = jax.random.PRNGKey(0)  # unused: deterministic start

  def expand(mask):
    return mask.reshape(per_example_shape)

  def start(restart_key, r):
    if delta_init is not None:
      delta = ball(jnp.asarray(delta_init).astype(dtype), eps)
    elif random_start and noise is not None:
      delta = jnp.asarray(noise).astype(dtype)[r]
    elif random_start and norm == "linf":
      delta = _uniform(restart_key, x.shape, eps, dtype)
    elif random_start:
      direction = jax.random.normal(restart_key, x.shape, jnp.float32).astype(dtype)
      direction = direction / jnp.maximum(_per_example_norm(direction), 1e-12)
      radius = jax.random.uniform(jax.random.fold_in(restart_key, 1),
                                  per_example_shape, jnp.float32).astype(dtype)
      delta = direction * radius * eps
    else:
      delta = jnp.zeros(x.shape, dtype)
    return project_box(x, delta) if clip_init_to_box else delta

  def ascent_direction(grad):
    if norm == "linf":
      return jnp.sign(grad)
    return grad / jnp.maximum(_per_example_norm(grad), 1e-12)

  def evaluate(delta):
    """Batch-mean loss gradient and per-example info at the box-clipped point."""
    point = x + project_box(x, delta)
    if use_aux:
      (_, aux), grad = jax.value_and_grad(loss_fn.with_aux, has_aux=True)(point)
      grad = grad * _boundary_factor(x + delta, box_grad).astype(grad.dtype)
      return grad.astype(dtype), aux.losses.astype(dtype), aux.correct
    grad = boundary_input_grad(loss_fn, x, delta, box_grad)
    return grad, None, None

  if unroll is None:
    unroll = bool(steps <= 10 and xla_cpu.unroll_loop(evaluate, x)) or 1
  record = restarts == 1 and steps > 0

  def run_restart(restart_key, r=0):
    delta = start(restart_key, r)
    best_delta = delta
    best_loss = jnp.full((batch,), -jnp.inf, dtype)
    best_correct = jnp.ones((batch,), bool)
    points = jnp.zeros((steps,) + x.shape, dtype) if record else None

    def body(i, carry):
      delta, best_delta, best_loss, best_correct, first_grad, points = carry
      grad, losses, correct = evaluate(delta)
      if record:
        points = points.at[i].set(x + project_box(x, delta))
      # Kept for the output's grad_at_start: a select, no extra pass.
      first_grad = jnp.where(i == 0, grad, first_grad)
      if keep_best:
        # The iterate at which this gradient was taken; the start included.
        better = losses > best_loss
        best_delta = jnp.where(expand(better), delta, best_delta)
        best_loss = jnp.where(better, losses, best_loss)
        best_correct = jnp.where(better, correct, best_correct)
      new_delta = project_box(x, ball(delta + step * ascent_direction(grad), eps))
      if early_stop:
        new_delta = jnp.where(expand(correct), new_delta, delta)
      return new_delta, best_delta, best_loss, best_correct, first_grad, points

    start_point = x + project_box(x, delta)
    delta, best_delta, best_loss, best_correct, first_grad, points = jax.lax.fori_loop(
        0, steps, body,
        (delta, best_delta, best_loss, best_correct, jnp.zeros_like(x), points),
        unroll=unroll)
    first = (start_point, first_grad if steps else None)
    delta = project_box(x, delta)
    first = first + (points,)
    if not use_aux:
      return delta, None, None, first
    _, aux = loss_fn.with_aux(x + delta)
    losses, correct = aux.losses.astype(dtype), aux.correct
    if keep_best:
      better = losses > best_loss
      delta = jnp.where(expand(better), delta, project_box(x, best_delta))
      losses = jnp.where(better, losses, best_loss)
      correct = jnp.where(better, correct, best_correct)
    return delta, losses, correct, first

  if restarts == 1:
    delta, _, _, (start_point, first_grad, points) = run_restart(jax.random.fold_in(key, 0))
    return AttackOutput(delta, start_point, first_grad, points)

  def restart_body(r, carry):
    best_delta, best_loss, best_fooled, first = carry
    delta, losses, correct, first_r = run_restart(jax.random.fold_in(key, r), r)
    first_r = first_r[:2]  # forward points are recorded for one restart only
    first = jax.tree_util.tree_map(lambda a, b: jnp.where(r == 0, b, a), first, first_r)
    fooled = jnp.logical_not(correct)
    take = losses >= best_loss
    if select == "strict":
      take = jnp.where(fooled == best_fooled, take, fooled)
    best_delta = jnp.where(expand(take), delta, best_delta)
    best_loss = jnp.where(take, losses, best_loss)
    best_fooled = jnp.where(take, fooled, best_fooled)
    return best_delta, best_loss, best_fooled, first

  init = (jnp.zeros(x.shape, dtype),
          jnp.full((batch,), -jnp.inf, dtype),
          jnp.zeros((batch,), bool),
          (jnp.zeros_like(x), jnp.zeros_like(x) if steps else None))
  best_delta, _, _, (start_point, first_grad) = jax.lax.fori_loop(
      0, restarts, restart_body, init)
  return AttackOutput(best_delta, start_point, first_grad)


def pgd_corner(loss_fn: LossClosure, x: Array, key: Array | None = None, *,
               eps: Any, step: Any, steps: int, **pgd_kwargs) -> AttackOutput:
  """PGD projected onto the corners of the eps-ball (GradAlign paper, Sec. 3).

  The GradAlign code's `--attack pgd_corner`: delta_pgd = pgd(...), then
  delta = box(eps * sign(delta_pgd)); coordinates where PGD left delta at exactly
  0 stay 0 (sign(0) = 0, as in torch). It tests whether FGSM points lying on the
  corners explains catastrophic overfitting.

  Args:
    loss_fn, x, key, eps, step, steps: as for `pgd`.
    **pgd_kwargs: further `pgd` options (random_start, restarts, ...).
  Returns:
    AttackOutput: delta on the box-projected corners; start and grad_at_start
    those of the PGD run.
  """
  out = pgd(loss_fn, x, key, eps=eps, step=step, steps=steps, **pgd_kwargs)
  x = _as_float32(x)
  return out.replace(delta=project_box(x, eps * jnp.sign(out.delta)))


# ----------------------------------------------------------------------------
# Registry: one spec beside each attack.
# ----------------------------------------------------------------------------

def _eps_radius(eps, step, kwargs):
  del step, kwargs
  return eps


@dataclasses.dataclass(frozen=True)
class CarriedPerturbation:
  """How an attack carries its perturbation across train steps (AT for Free).

  The train step keeps the perturbation in the train state (zeros of the
  per-device batch shape at the start), trains on x + box(state), takes the
  weight gradient and the input gradient from one forward/backward pass
  (Shafahi et al. 2019, Alg. 1), and sets the state to
  `update(x, delta, input_grad, eps=, step=)`. Each minibatch is used for
  `replays_kwarg` consecutive train steps, all under one learning-rate schedule.
  """
  update: Callable[..., Array]
  replays_kwarg: str = "replays"


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """An attack's registration: what the train step, configs and tests need.

  Attributes:
    fn: `fn(loss_fn, x, key, *, eps, ...) -> AttackOutput`.
    default_step: the step used when none is given, as a multiple of ε; None
      when the attack takes no step by default (a pure random corner, no
      attack) or requires one (PGD).
    radius: `radius(eps, step, kwargs) -> float`, the largest l_inf norm of
      the perturbation for the resolved step and the call's other keyword
      arguments.
    traced: keyword arguments that may be traced values, carried in the train
      state so that the catastrophic-overfitting monitor can change them
      without a recompile.
    gradient_at_clean: `gradient_at_clean(kwargs) -> bool`: whether
      `grad_at_start` is the gradient at the clean x for these keyword
      arguments (a regularizer that needs ∇ℓ(x) then reuses it).
    carried: set for attacks whose perturbation is carried across train steps.
  """
  fn: Callable[..., AttackOutput]
  default_step: Optional[float] = None
  radius: Callable[[Any, Any, Mapping[str, Any]], Any] = _eps_radius
  traced: tuple[str, ...] = ()
  gradient_at_clean: Callable[[Mapping[str, Any]], bool] = lambda kwargs: False
  carried: Optional[CarriedPerturbation] = None


ATTACK_SPECS: dict[str, AttackSpec] = {}
"""Every registered attack by name (see `register_attack`)."""

ATTACKS: dict[str, Callable[..., AttackOutput]] = {}
"""name -> attack function, a view of `ATTACK_SPECS`."""


def register_attack(name: str, spec: AttackSpec) -> AttackSpec:
  """Registers `spec` under `name` (configs and the train step find it there)."""
  if name in ATTACK_SPECS:
    raise ValueError(f"An attack named {name!r} is already registered.")
  ATTACK_SPECS[name] = spec
  ATTACKS[name] = spec.fn
  return spec


def _step_or_default(name: str, step: Any, eps: Any) -> Any:
  return ATTACK_SPECS[name].default_step * eps if step is None else step


def _noise_plus_step(noise_ratio: float):
  def radius(eps, step, kwargs):
    noise = kwargs.get("noise_mag")
    return (noise_ratio * eps if noise is None else noise) + step
  return radius


# N-FGSM's default noise half-width, 2ε (de Jorge et al. 2022).
_N_FGSM_NOISE = 2.0

register_attack("none", AttackSpec(no_attack, radius=lambda eps, step, kw: 0.0 * eps))
register_attack("fgsm", AttackSpec(fgsm, default_step=1.0,
                                   gradient_at_clean=lambda kw: True))
# α = 1.25ε: 10/255 at ε = 8/255 (Wong et al. 2020).
register_attack("fgsm_rs", AttackSpec(fgsm_rs, default_step=1.25))
register_attack("pgd", AttackSpec(
    pgd, gradient_at_clean=lambda kw: (not kw.get("random_start", True)
                                       and kw.get("delta_init") is None)))
register_attack("zerograd", AttackSpec(zerograd, default_step=2.0, traced=("q",)))
register_attack("multigrad", AttackSpec(multigrad, default_step=1.0))
register_attack("n_fgsm", AttackSpec(n_fgsm, default_step=1.0,
                                     radius=_noise_plus_step(_N_FGSM_NOISE)))
register_attack("fgsm_n", AttackSpec(fgsm_n, default_step=1.0,
                                     radius=_noise_plus_step(1.0)))
register_attack("random_corner", AttackSpec(random_corner))
register_attack("pgd_corner", AttackSpec(
    pgd_corner, gradient_at_clean=ATTACK_SPECS["pgd"].gradient_at_clean))
# AT for Free: step ε (Shafahi et al. 2019), m = 8 replays in the GradAlign runs.
register_attack("free", AttackSpec(free_step, default_step=1.0,
                                   carried=CarriedPerturbation(free_update)))


def get_attack(name: str) -> Callable[..., AttackOutput]:
  """The attack registered under `name` (one of `ATTACKS`)."""
  _checks.check_choice("attack", name, ATTACKS)
  return ATTACKS[name]


def perturbation_set_radius(name: str, eps: Any, *, step: Any = None, **kwargs) -> Any:
  """Largest l_inf norm the attack `name` can return at radius eps.

  From the attack's spec: eps for the projected attacks; 0 for "none";
  noise_mag + step for the unprojected ones (3 eps for "n_fgsm" and 2 eps for
  "fgsm_n" with their defaults). For pgd with norm="l2" the l2 radius eps also
  bounds the l_inf norm.
  """
  _checks.check_choice("attack", name, ATTACK_SPECS)
  spec = ATTACK_SPECS[name]
  if step is None and spec.default_step is not None:
    step = spec.default_step * eps
  return spec.radius(eps, step, kwargs)

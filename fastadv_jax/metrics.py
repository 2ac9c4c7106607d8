"""Loss-landscape metrics of the four papers, as pure batched functions.

Everything here takes closures and arrays (`loss_fn(x) -> batch-mean scalar`,
`logits_fn(x) -> logits`), is jittable, and works inside a training step (under
`pmap`, on the per-device batch) as well as in a notebook.

* Gradient alignment (GradAlign Eq. 5), cos(δ_FGSM, δ_PGD), linearization
  error for δ of fixed ℓ∞ and varying ℓ2 norm (GradAlign App. C.1).
* Input-gradient ℓ1 norm (IG) and top-k Hessian eigenvalues with respect to the
  input (HS), adversarial loss increase, effectiveness and variance
  (Li & Spratling 2023, §3).
* Sign disagreement with a PGD perturbation and perturbation ℓ1 norm (ZeroGrad
  Tables 4 and 10), norm of the weight change between two parameter sets.
* Lemma 1 (expected ℓ2 norm of the FGSM-RS perturbation) in closed form and by
  Monte Carlo; Lemma 2 (gradient alignment of a single-layer ReLU CNN at random
  initialisation) by Monte Carlo.

Per-example gradients: input gradients are gradients of the batch-mean loss L.
Without interaction between examples (BatchNorm in eval mode),
∇_{xᵢ} ℓᵢ = B·∇_{xᵢ} L; cosines are invariant to that factor, norms are
rescaled where a per-example quantity is returned (documented per function).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import _checks
from fastadv_jax.regularizers import per_example_cosine

Array = jax.Array
LossClosure = Callable[[Array], Array]

REDUCTIONS = ("mean", "none")
LINEARIZATION_DIRECTIONS = ("random", "gradient")


def _flat(a: Array) -> Array:
  return a.reshape(a.shape[0], -1).astype(jnp.promote_types(a.dtype, jnp.float32))


def _reduce(values: Array, reduce: str) -> Array:
  _checks.check_choice("reduce", reduce, REDUCTIONS)
  return jnp.mean(values) if reduce == "mean" else values


def _per_example_losses(loss_fn: LossClosure, x: Array) -> Array:
  """(B,) per-example losses; needs a closure with `.with_aux` (closures.LossFn)."""
  if not hasattr(loss_fn, "with_aux"):
    raise ValueError(
        "per-example values need a loss closure with per-example losses "
        "(closures.LossFn, e.g. closures.cross_entropy(logits_fn, labels)); got "
        f"{type(loss_fn).__name__}.")
  return loss_fn.with_aux(x)[1].losses


# ---------------------------------------------------------------------------
# GradAlign paper
# ---------------------------------------------------------------------------

def gradient_alignment(loss_fn: LossClosure, x: Array, key: Optional[Array] = None, *,
                       eps: Any, clip_to_box: bool = True, grad_x: Optional[Array] = None,
                       reduce: str = "mean", eta: Optional[Array] = None,
                       return_valid: bool = False):
  """Gradient alignment E cos(∇ₓℓ(x), ∇ₓℓ(x + η)), η ~ U[-ε, ε]^d (GradAlign Eq. 5).

  Args:
    loss_fn: batch-mean loss closure (use eval-mode BatchNorm for monitoring
      a trained model, batch mode to see what the regularizer sees).
    x: clean images.
    key: PRNG key for η (`jax.random.uniform(key, x.shape, float32, -eps, eps)`);
      may be None when `eta` is given.
    eps: L∞ radius (pixel units).
    clip_to_box: clip x + η to [0, 1], as the authors' monitor does.
    grad_x: ∇ₓℓ(x) if already known.
    reduce: "mean" (over all examples; an example with a zero gradient counts
      as cosine 0, like torch's `cosine_similarity`) or "none" for (B,).
    eta: the draw η itself (same shape as x), instead of drawing it from `key`.
    return_valid: also return the (B,) bool mask of the examples where both
      gradients are nonzero (the others have cosine 0); a caller can then
      average over the valid examples only.
  Returns:
    Scalar mean cosine, or per-example cosines; with `return_valid`, the pair
    (cosines, valid).
  """
  _checks.check_eps(eps)
  if eta is None:
    if key is None:
      raise ValueError("gradient_alignment draws eta and needs a jax.random key "
                       "(or the draw itself as eta=); got key=None.")
    eta = jax.random.uniform(key, x.shape, jnp.float32, -eps, eps)
  else:
    _checks.check_same_shape("eta", eta, "x", x)
  g1 = jax.grad(loss_fn)(x) if grad_x is None else grad_x
  x_noisy = x + jnp.asarray(eta).astype(x.dtype)
  if clip_to_box:
    x_noisy = jnp.clip(x_noisy, 0.0, 1.0)
  g2 = jax.grad(loss_fn)(x_noisy)
  cos, valid = per_example_cosine(g1, g2)
  cos = _reduce(cos, reduce)
  return (cos, valid) if return_valid else cos


def perturbation_cosine(delta_a: Array, delta_b: Array, *, reduce: str = "none") -> Array:
  """cos(δ_a, δ_b) per example, e.g. cos(δ_FGSM, δ_PGD) (GradAlign Fig. 2).

  Returns 0 for an example where either perturbation is zero.
  """
  _checks.check_same_shape("delta_a", delta_a, "delta_b", delta_b)
  cos, _ = per_example_cosine(delta_a, delta_b)
  return _reduce(cos, reduce)


def linearization_error(loss_fn: LossClosure, x: Array, delta: Array, *,
                        per_example: bool = False, grad_x: Optional[Array] = None) -> Array:
  """|ℓ(x + δ) − ℓ(x) − ⟨δ, ∇ₓℓ(x)⟩| (GradAlign App. C.1).

  Args:
    loss_fn: batch-mean loss closure.
    x: images.
    delta: perturbation (same shape as x).
    per_example: False: the batch-mean loss and the whole-batch inner product
      (a scalar). True: per-example losses and ⟨δᵢ, ∇_{xᵢ} Σⱼ ℓⱼ⟩ (B,)
      (needs a closures.LossFn; equals the per-example linearization when the
      examples do not interact, e.g. BatchNorm in eval mode).
    grad_x: ∇ₓL(x) of the batch-mean loss, if already known.
  Returns:
    Scalar or (B,) absolute linearization errors.
  """
  _checks.check_same_shape("delta", delta, "x", x)
  g = jax.grad(loss_fn)(x) if grad_x is None else grad_x
  if not per_example:
    linear = jnp.sum(_flat(delta) * _flat(g))
    return jnp.abs(loss_fn(x + delta) - loss_fn(x) - linear)
  batch = x.shape[0]
  linear = batch * jnp.sum(_flat(delta) * _flat(g), axis=1)
  losses_moved = _per_example_losses(loss_fn, x + delta)
  losses = _per_example_losses(loss_fn, x)
  return jnp.abs(losses_moved - losses - linear)


def fixed_linf_perturbation(key: Array, shape: Sequence[int], *, eps: Any, fraction: float,
                            direction: Optional[Array] = None) -> Array:
  """δ with ‖δᵢ‖∞ = ε and ‖δᵢ‖₂ = ε·√n, n = round(fraction·d) per example.

  Exactly n coordinates per example (chosen uniformly at random) are ±ε, the
  rest 0; the signs are random, or those of `direction` (e.g. the input
  gradient, giving a partial FGSM step). Used to vary the ℓ2 norm at a fixed
  ℓ∞ norm (GradAlign App. C.1).

  Args:
    key: PRNG key.
    shape: (B, ...) shape of δ.
    eps: ℓ∞ radius.
    fraction: share of coordinates set to ±ε, in (0, 1].
    direction: optional array whose signs are used (zeros count as +).
  Returns:
    δ of `shape`, float32.
  """
  _checks.check_eps(eps)
  _checks.check_in_range("fraction", fraction, 0.0, 1.0, low_open=True)
  shape = tuple(shape)
  batch, dim = shape[0], int(np.prod(shape[1:]))
  n = max(1, int(round(float(fraction) * dim)))
  key_pick, key_sign = jax.random.split(key)
  # Ranks of i.i.d. uniforms: a uniformly random subset of exactly n coordinates.
  ranks = jnp.argsort(jnp.argsort(jax.random.uniform(key_pick, (batch, dim)), axis=1), axis=1)
  mask = ranks < n
  if direction is None:
    signs = jnp.where(jax.random.bernoulli(key_sign, 0.5, (batch, dim)), 1.0, -1.0)
  else:
    signs = jnp.where(_flat(direction) >= 0, 1.0, -1.0)
  return (eps * jnp.where(mask, signs, 0.0)).reshape(shape).astype(jnp.float32)


def linearization_error_curve(loss_fn: LossClosure, x: Array, key: Array, *, eps: Any,
                              fractions: Sequence[float], direction: str = "random",
                              per_example: bool = False) -> tuple[Array, Array]:
  """Linearization error for δ of ℓ∞ norm ε and growing ℓ2 norm (GradAlign App. C.1).

  Args:
    loss_fn: batch-mean loss closure.
    x: images.
    key: PRNG key (the same subsets are used for every fraction's prefix).
    eps: ℓ∞ norm of every δ.
    fractions: shares of coordinates set to ±ε (a static Python sequence).
    direction: "random" signs, or "gradient" (signs of ∇ₓℓ(x): partial FGSM).
    per_example: see `linearization_error`.
  Returns:
    (l2_norms, errors): the per-example ℓ2 norm ε·√n for each fraction
    (len(fractions),) and the errors (len(fractions),) or (len(fractions), B).
  """
  _checks.check_choice("direction", direction, LINEARIZATION_DIRECTIONS)
  g = jax.grad(loss_fn)(x)
  sign_source = g if direction == "gradient" else None
  dim = int(np.prod(x.shape[1:]))
  norms, errors = [], []
  for fraction in fractions:
    delta = fixed_linf_perturbation(key, x.shape, eps=eps, fraction=fraction,
                                    direction=sign_source).astype(x.dtype)
    n = max(1, int(round(float(fraction) * dim)))
    norms.append(eps * math.sqrt(n))
    errors.append(linearization_error(loss_fn, x, delta, per_example=per_example, grad_x=g))
  return jnp.asarray(norms, jnp.float32), jnp.stack(errors)


# ---------------------------------------------------------------------------
# Li & Spratling (AdvLC paper), §3
# ---------------------------------------------------------------------------

def input_gradient_l1(loss_fn: LossClosure, x: Array, *, reduce: str = "mean",
                      grad_x: Optional[Array] = None) -> Array:
  """Input-gradient ℓ1 norm (IG in Li & Spratling).

  With "mean": ‖∇ₓL‖₁ over the whole batch tensor, L the batch-mean loss (the
  AdvLC code's `norm(grad(loss, x), p=1)`), which equals mean_i ‖∇_{xᵢ}ℓᵢ‖₁
  when the examples do not interact. With "none": the per-example
  ‖∇_{xᵢ} Σⱼ ℓⱼ‖₁ = B·‖∇_{xᵢ}L‖₁, shape (B,).
  """
  _checks.check_choice("reduce", reduce, REDUCTIONS)
  g = jax.grad(loss_fn)(x) if grad_x is None else grad_x
  per_example = x.shape[0] * jnp.sum(jnp.abs(_flat(g)), axis=1)
  return _reduce(per_example, reduce)


def hessian_top_eigenvalues(loss_fn: LossClosure, x: Array, key: Array, *, k: int = 1,
                            iters: int = 20, per_example: bool = False) -> Array:
  """Dominant eigenvalues of the Hessian of the loss with respect to the input (HS).

  Block power (subspace) iteration with Hessian-vector products
  (forward-over-reverse, `jax.linearize` of `jax.grad`), then a Rayleigh-Ritz
  step. Converges to the k eigenvalues of largest magnitude, returned sorted by
  decreasing magnitude; the error shrinks like (|λ_{k+1}|/|λ_k|)^iters.

  Args:
    loss_fn: batch-mean loss closure.
    x: images (B, ...).
    key: PRNG key for the starting subspace.
    k: number of eigenvalues (1 <= k <= the input dimension d per example, or
      B·d for per_example=False).
    iters: iterations (fixed: jittable, no data-dependent stopping).
    per_example: False (Li & Spratling's code, PyHessian on the input): the
      Hessian of the batch-mean loss with respect to the whole batch tensor.
      True: per example, the Hessian of ℓᵢ with respect to xᵢ, taken as
      B × the diagonal block of that Hessian (exact when the examples do not
      interact, e.g. BatchNorm in eval mode); shape (B, k).
  Returns:
    (k,) or (B, k) eigenvalues.
  """
  _checks.check_int("k", k, 1)
  _checks.check_int("iters", iters, 1)
  batch = x.shape[0]
  dim = int(np.prod(x.shape[1:]))
  limit = dim if per_example else batch * dim
  if k > limit:
    raise ValueError(
        f"k={k} is larger than the input dimension {limit} "
        f"({'per example' if per_example else 'of the whole batch'}).")

  _, hvp = jax.linearize(jax.grad(loss_fn), x)
  hvp_many = jax.vmap(lambda v: hvp(v.reshape(x.shape).astype(x.dtype)).reshape(v.shape))

  # Vectors are laid out as (groups, d_group, k): one group per example, or a
  # single group holding the whole batch.
  groups, d_group = (batch, dim) if per_example else (1, batch * dim)

  def apply(v):  # (groups, d_group, k) -> same
    v_k = jnp.moveaxis(v, -1, 0).reshape(k, batch, dim)
    hv = hvp_many(v_k).astype(jnp.float32)
    return jnp.moveaxis(hv.reshape(k, groups, d_group), 0, -1)

  v0 = jax.random.normal(key, (groups, d_group, k), jnp.float32)
  v0, _ = jnp.linalg.qr(v0)

  def body(_, v):
    q, _ = jnp.linalg.qr(apply(v))
    return q

  v = jax.lax.fori_loop(0, iters, body, v0)
  ritz = jnp.einsum("gdi,gdj->gij", v, apply(v))
  ritz = 0.5 * (ritz + jnp.swapaxes(ritz, -1, -2))
  eigenvalues = jnp.linalg.eigvalsh(ritz)  # (groups, k), ascending
  order = jnp.argsort(-jnp.abs(eigenvalues), axis=-1)
  eigenvalues = jnp.take_along_axis(eigenvalues, order, axis=-1)
  if per_example:
    return batch * eigenvalues
  return eigenvalues[0]


class HessianEigen(NamedTuple):
  """Eigenvalues from `hessian_eigenvalues` and whether each converged."""
  values: Array      # (top_n,) in the order found (largest magnitude first)
  iterations: Array  # (top_n,) Hessian-vector products spent on each
  converged: Array   # (top_n,) bool: the relative change fell below tol


def hessian_eigenvalues(loss_fn: LossClosure, x: Array, key: Array, *, top_n: int = 1,
                        max_iter: int = 100, tol: float = 1e-3) -> HessianEigen:
  """Top Hessian eigenvalues w.r.t. the input, PyHessian's solver (with convergence).

  PyHessian's `hessian.eigenvalues(maxIter=100, tol=1e-3, top_n)` (the copy in
  TreeLLi/Combating-RO-AdvLC, src/utils/pyhessian/hessian.py l.112-170, which
  the AdvLC paper's Hessian spectra use): for each eigenvalue in turn, power
  iteration from a normalized Gaussian vector, deflated by Gram-Schmidt
  against the eigenvectors already found (`orthnormal`, utils.py l.90-97);
  per iteration λ = ⟨Hv, v⟩ and v ← Hv / (‖Hv‖ + 1e-6); it stops when
  |λ_prev − λ| / (|λ_prev| + 1e-6) < tol, keeping λ_prev (as PyHessian does),
  or after max_iter products, and reports which happened (`converged`).

  The Hessian is that of the batch-mean loss with respect to the whole batch
  tensor (as `hessian_top_eigenvalues(per_example=False)`), with
  forward-over-reverse Hessian-vector products. Jittable: the stopping test
  runs in a `lax.while_loop`.

  Args:
    loss_fn: batch-mean loss closure.
    x: images (B, ...).
    key: PRNG key for the starting vectors.
    top_n: number of eigenvalues (>= 1, at most the batch's dimension).
    max_iter: most Hessian-vector products per eigenvalue (PyHessian: 100).
    tol: relative tolerance of the stopping test (PyHessian: 1e-3).
  Returns:
    `HessianEigen(values, iterations, converged)`.
  """
  _checks.check_int("top_n", top_n, 1)
  _checks.check_int("max_iter", max_iter, 1)
  _checks.check_nonnegative("tol", tol)
  size = int(np.prod(x.shape))
  if top_n > size:
    raise ValueError(f"top_n={top_n} is larger than the input dimension {size}.")
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  _, hvp = jax.linearize(jax.grad(loss_fn), x)
  hvp_flat = lambda v: hvp(v.reshape(x.shape).astype(x.dtype)).reshape(-1).astype(dtype)
  normalize = lambda v: v / (jnp.linalg.norm(v) + 1e-6)

  found = jnp.zeros((top_n, size), dtype)
  values, iterations, converged = [], [], []
  for n in range(top_n):
    def orth(v, found=found, n=n):
      for j in range(n):  # Gram-Schmidt against the n eigenvectors found, in order
        v = v - jnp.vdot(v, found[j]) * found[j]
      return normalize(v)

    def cond(carry):
      i, _, _, done = carry
      return (i < max_iter) & ~done

    def body(carry, orth=orth):
      i, v, eig, _ = carry
      w = orth(v)
      hv = hvp_flat(w)
      tmp = jnp.vdot(hv, w)
      stop = (i > 0) & (jnp.abs(eig - tmp) / (jnp.abs(eig) + 1e-6) < tol)
      return i + 1, normalize(hv), jnp.where(stop, eig, tmp), stop

    v0 = normalize(jax.random.normal(jax.random.fold_in(key, n), (size,), dtype))
    i, v, eig, done = jax.lax.while_loop(
        cond, body, (jnp.int32(0), v0, jnp.zeros((), dtype), jnp.bool_(False)))
    found = found.at[n].set(v)
    values.append(eig)
    iterations.append(i)
    converged.append(done)
  return HessianEigen(jnp.stack(values), jnp.stack(iterations), jnp.stack(converged))


def adversarial_loss_increase(loss_fn: LossClosure, x: Array, delta: Array) -> Array:
  """ℓᵢ(x + δ) − ℓᵢ(x) per example (needs a closures.LossFn), shape (B,)."""
  _checks.check_same_shape("delta", delta, "x", x)
  return _per_example_losses(loss_fn, x + delta) - _per_example_losses(loss_fn, x)


def adversarial_effectiveness(loss_fn: LossClosure, x: Array, delta: Array, *, eps: Any,
                              reduce: str = "mean") -> Array:
  """Loss increase achieved by δ relative to the first-order bound ε‖∇ₓℓ‖₁.

  (ℓᵢ(x+δ) − ℓᵢ(x)) / (ε‖∇_{xᵢ}ℓᵢ(x)‖₁), the reading of Li & Spratling's
  §3 used here: adversarial training minimizes ℓ(x) + ε‖∇ₓℓ‖₁ to first order
  (the gradient-regularization effect); this ratio is 1 for a locally linear
  loss and δ = FGSM, and departs from 1 as curvature grows. Examples with a
  zero gradient get 0. Needs a closures.LossFn.
  """
  _checks.check_eps(eps)
  increase = adversarial_loss_increase(loss_fn, x, delta)
  first_order = eps * input_gradient_l1(loss_fn, x, reduce="none")
  safe = jnp.where(first_order > 0, first_order, 1.0)
  ratio = jnp.where(first_order > 0, increase / safe, 0.0)
  return _reduce(ratio, reduce)


def adversarial_variance(loss_fn: LossClosure, x: Array, delta: Array) -> Array:
  """Variance over the batch of the adversarial loss increase ℓᵢ(x+δ) − ℓᵢ(x).

  The reading of Li & Spratling's "adversarial variance" used here (how
  unevenly the perturbation raises the loss across examples). Needs a
  closures.LossFn. Returns a scalar.
  """
  return jnp.var(adversarial_loss_increase(loss_fn, x, delta))


# ---------------------------------------------------------------------------
# ZeroGrad paper and weights
# ---------------------------------------------------------------------------

def sign_disagreement(delta: Array, delta_ref: Array, *, ignore_zeros: bool = False,
                      reduce: str = "none") -> Array:
  """Fraction of coordinates where sign(δ) ≠ sign(δ_ref) (ZeroGrad Table 4).

  Args:
    delta: perturbation to compare (e.g. FGSM, ZeroGrad, MultiGrad).
    delta_ref: reference perturbation (e.g. PGD-50).
    ignore_zeros: False: a zero coordinate disagrees with a nonzero one (sign 0
      is its own class). True: only coordinates where both are nonzero count.
    reduce: "none" for (B,), "mean" for a scalar.
  """
  _checks.check_same_shape("delta", delta, "delta_ref", delta_ref)
  s, s_ref = jnp.sign(_flat(delta)), jnp.sign(_flat(delta_ref))
  differ = s != s_ref
  if ignore_zeros:
    counted = (s != 0) & (s_ref != 0)
    total = jnp.sum(counted, axis=1)
    frac = jnp.sum(differ & counted, axis=1) / jnp.maximum(total, 1)
  else:
    frac = jnp.mean(differ, axis=1)
  return _reduce(frac.astype(jnp.float32), reduce)


def perturbation_l1_norm(delta: Array, *, reduce: str = "none") -> Array:
  """‖δᵢ‖₁ per example (ZeroGrad Table 10)."""
  return _reduce(jnp.sum(jnp.abs(_flat(delta)), axis=1), reduce)


def weight_change_norm(params_a: Any, params_b: Any, *, relative: bool = False) -> Array:
  """‖θ_a − θ_b‖₂ over all leaves (optionally divided by ‖θ_b‖₂)."""
  leaves_a = jax.tree_util.tree_leaves(params_a)
  leaves_b = jax.tree_util.tree_leaves(params_b)
  if len(leaves_a) != len(leaves_b):
    raise ValueError(
        f"The parameter trees differ: {len(leaves_a)} leaves versus {len(leaves_b)}.")
  sq = sum(jnp.sum((jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)) ** 2)
           for a, b in zip(leaves_a, leaves_b))
  norm = jnp.sqrt(sq)
  if relative:
    ref = jnp.sqrt(sum(jnp.sum(jnp.asarray(b, jnp.float32) ** 2) for b in leaves_b))
    norm = norm / jnp.maximum(ref, 1e-30)
  return norm


# ---------------------------------------------------------------------------
# Lemma 1 (GradAlign §3): the norm of the FGSM-RS perturbation
# ---------------------------------------------------------------------------

def lemma1_fgsm_rs_expected_sq_norm(eps: float, alpha: float, dim: int) -> float:
  """E‖δ‖₂² for FGSM-RS, δ = clip_ε(η + α·sign(g)), η ~ U[-ε, ε]^d (Lemma 1).

  Per coordinate, for α ∈ [0, 2ε]: E δⱼ² = −α³/(6ε) + α²/2 + ε²/3; for α ≥ 2ε
  every coordinate is clipped to ±ε, so E δⱼ² = ε². (η not box-clipped.)
  """
  _checks.check_positive("eps", eps)
  _checks.check_nonnegative("alpha", alpha)
  _checks.check_positive("dim", dim)
  eps, alpha = float(eps), float(alpha)
  per_coord = eps ** 2 if alpha >= 2 * eps else (
      -alpha ** 3 / (6 * eps) + alpha ** 2 / 2 + eps ** 2 / 3)
  return float(dim) * per_coord


def lemma1_fgsm_rs_norm_bound(eps: float, alpha: float, dim: int) -> float:
  """√E‖δ_FGSM-RS‖₂², the paper's upper bound on E‖δ_FGSM-RS‖₂ (Lemma 1, by Jensen).

  Compare with ‖δ_FGSM‖₂ = α√d for FGSM with step α (ε√d at α = ε).
  """
  return math.sqrt(lemma1_fgsm_rs_expected_sq_norm(eps, alpha, dim))


def lemma1_monte_carlo(key: Array, *, eps: float, alpha: float, dim: int,
                       num_samples: int = 1000) -> tuple[Array, Array]:
  """Monte Carlo estimates of E‖δ_FGSM-RS‖₂ and √E‖δ_FGSM-RS‖₂² (Lemma 1).

  The gradient signs are fixed to +1 (the distribution of ‖δ‖₂ does not depend
  on them, by symmetry of η).

  Returns:
    (mean_norm, root_mean_sq_norm) as float32 scalars.
  """
  _checks.check_positive("eps", eps)
  _checks.check_nonnegative("alpha", alpha)
  eta = jax.random.uniform(key, (num_samples, dim), jnp.float32, -eps, eps)
  delta = jnp.clip(eta + alpha, -eps, eps)
  sq = jnp.sum(delta * delta, axis=1)
  return jnp.mean(jnp.sqrt(sq)), jnp.sqrt(jnp.mean(sq))


# ---------------------------------------------------------------------------
# Lemma 2 (GradAlign §4): gradient alignment of a single-layer CNN at init
# ---------------------------------------------------------------------------

def _patches(x: Array, kernel_size: int) -> Array:
  """(B, H, W, k·k·C) patches with zero padding k//2, stride 1 (NHWC)."""
  pad = kernel_size // 2
  return jax.lax.conv_general_dilated_patches(
      x, (kernel_size, kernel_size), (1, 1), [(pad, pad), (pad, pad)],
      dimension_numbers=("NHWC", "OIHW", "NHWC"))


def lemma2_alignment_at_init(key: Array, x: Array, *, eps: Any, kernel_size: int = 3,
                             num_samples: int = 32, clip_to_box: bool = False) -> Array:
  """Gradient alignment of a wide single-layer ReLU CNN at random init (Lemma 2).

  Model (GradAlign §4): f(x) = Σⱼ Σ_p u_{j,p} ReLU(⟨wⱼ, x_p⟩), x_p the k×k×C
  patches (zero padding, stride 1), filters wⱼ ~ N(0, σ²I), readout weights
  u_{j,p} i.i.d. zero-mean, no bias; for a single logit and the logistic loss
  the cosine of the loss gradients equals that of ∇ₓf. Taking the expectation
  over the weights (the limit of many filters), cross terms vanish and, by the
  Gaussian orthant probability P(⟨w,a⟩>0, ⟨w,b⟩>0) = (π − ∠(a,b))/(2π),

      ⟨∇f(x), ∇f(x+η)⟩ / (‖∇f(x)‖‖∇f(x+η)‖)
        → Σ_p (π − θ_p)/(2π) / √(Σ_p ½[x_p≠0] · Σ_p ½[x_p+η_p≠0]),

  θ_p = ∠(x_p, x_p + η_p). This depends only on the data and ε; it is
  averaged here over η ~ U[-ε, ε]^d by Monte Carlo. (REFERENCE.md does not
  restate the lemma; this derivation is ours, and `single_layer_cnn_alignment`
  measures the finite-width value for comparison.)

  Args:
    key: PRNG key for η.
    x: images (B, H, W, C).
    eps: L∞ radius of η.
    kernel_size: filter size k (3 in the paper).
    num_samples: Monte Carlo draws of η.
    clip_to_box: clip x + η to [0, 1].
  Returns:
    (B,) alignment per image.
  """
  _checks.check_eps(eps)
  patches_x = _patches(x.astype(jnp.float32), kernel_size)
  norm_x = jnp.linalg.norm(patches_x, axis=-1)

  def one(sample_key):
    eta = jax.random.uniform(sample_key, x.shape, jnp.float32, -eps, eps)
    x_noisy = x.astype(jnp.float32) + eta
    if clip_to_box:
      x_noisy = jnp.clip(x_noisy, 0.0, 1.0)
    patches_n = _patches(x_noisy, kernel_size)
    norm_n = jnp.linalg.norm(patches_n, axis=-1)
    both = (norm_x > 0) & (norm_n > 0)
    cos = jnp.sum(patches_x * patches_n, axis=-1) / jnp.where(both, norm_x * norm_n, 1.0)
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    p_both = jnp.where(both, (jnp.pi - theta) / (2 * jnp.pi), 0.0)
    num = jnp.sum(p_both, axis=(1, 2))
    den = jnp.sqrt(jnp.sum(0.5 * (norm_x > 0), axis=(1, 2)) *
                   jnp.sum(0.5 * (norm_n > 0), axis=(1, 2)))
    return num / jnp.maximum(den, 1e-30)

  return jnp.mean(jax.vmap(one)(jax.random.split(key, num_samples)), axis=0)


def single_layer_cnn_alignment(key: Array, x: Array, *, eps: Any, filters: int,
                               kernel_size: int = 3, num_inits: int = 8,
                               clip_to_box: bool = False) -> Array:
  """Monte Carlo gradient alignment of random single-layer ReLU CNNs (Lemma 2 check).

  f(x) = Σ u ⊙ ReLU(conv(x, w)) with w ~ N(0, 1), u ~ N(0, 1), no bias, one
  output; returns the average over `num_inits` draws of (w, u, η) of
  cos(∇ₓf(x), ∇ₓf(x + η)), shape (B,). Approaches `lemma2_alignment_at_init`
  as `filters` grows.
  """
  _checks.check_eps(eps)
  x = x.astype(jnp.float32)
  _, height, width, channels = x.shape
  pad = kernel_size // 2

  def f(w, u, images):
    z = jax.lax.conv_general_dilated(images, w, (1, 1), [(pad, pad), (pad, pad)],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(u * jax.nn.relu(z))

  def one(sample_key):
    kw, ku, ke = jax.random.split(sample_key, 3)
    w = jax.random.normal(kw, (kernel_size, kernel_size, channels, filters))
    u = jax.random.normal(ku, (height, width, filters))
    eta = jax.random.uniform(ke, x.shape, jnp.float32, -eps, eps)
    x_noisy = x + eta
    if clip_to_box:
      x_noisy = jnp.clip(x_noisy, 0.0, 1.0)
    # Examples do not interact, so one gradient of the sum gives all of them.
    g1 = jax.grad(lambda images: f(w, u, images))(x)
    g2 = jax.grad(lambda images: f(w, u, images))(x_noisy)
    return per_example_cosine(g1, g2)[0]

  return jnp.mean(jax.vmap(one)(jax.random.split(key, num_inits)), axis=0)

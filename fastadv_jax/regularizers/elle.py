"""ELLE: efficient local linearity regularization (Abad Rocamora et al., ICLR 2024).

Abad Rocamora, Liu, Chrysos, Olmos, Cevher, "Efficient local linearity
regularization to overcome catastrophic overfitting", ICLR 2024
(arXiv:2401.11618); reference code github.com/LIONS-EPFL/ELLE (commit 0f16c0e).

A function h is linear on a convex set iff h((1−α)x_a + αx_b) = (1−α)h(x_a) +
αh(x_b) for all x_a, x_b in the set and α ∈ [0, 1] (the paper's Eq. 1). ELLE
penalizes the squared violation of this identity by the loss, at one random
triplet per example:

  x_a, x_b ~ U(B∞[x, ε]),  α ~ U[0, 1],  x_c = (1−α)x_a + αx_b,
  E_Lin = mean_i |ℓᵢ(x_c) − (1−α_i)ℓᵢ(x_a) − α_iℓᵢ(x_b)|²,

ℓᵢ the per-example cross-entropy. The training loss is CE(x + δ_FGSM) + λ·E_Lin.
Every term is a loss *value*, so the parameter gradient is plain backprop (no
double backprop), which is the paper's point. Conventions, as in the reference
code (`core/utils/train.py`, `Trainer.loss`, the `reg == 'ELLE'` branch, lines
317-339, identical to the README snippet):

* x_a, x_b = x + ε·(2·U[0,1) − 1), independent per coordinate and per example
  (l. 326-327); no clipping to the box [0, 1] (nor anywhere in the branch).
* α: one scalar per example, shape (B, 1, 1, 1) (l. 328-330).
* ℓ: `CrossEntropyLoss(reduction='none')`, per example (l. 333-334).
* The three points go through the model as one batch of 3B (l. 334,
  `model(torch.cat((x_ab, x_c)))` in train mode): with BatchNorm the batch
  statistics are those of the 3B points together.
* The square is per example, then averaged over the batch: `nn.MSELoss()`
  with its default mean reduction (l. 337-338).
* λ multiplies it outside (l. 339, `loss += lin_reg * lin_err`).

Published λ (CIFAR-10, PreActResNet-18, 30 epochs, `scripts/run_elle_cifar10.sh`):
ELLE λ = 1000 for ε ≤ 8/255 (2, 4, 6, 8), 5000 for ε ∈ {10, ..., 20}/255,
10000 for ε ≥ 22/255. ELLE-A (`scripts/run_elle-a_cifar10.sh`, also with
N-FGSM in `scripts/run_N-FGSM+elle-a_cifar10.sh`): λ_max = 4000 at every ε.
The attack in those runs is FGSM from the clean x with step ε (`--attack-iter 1
--attack-step ε --attack-eps ε`, `--input_noise_rate` default 0, `--clamp`
default False: `parser.py` l. 45-63; the attack is `Trainer.loss` l. 295-306).

ELLE-A (the adaptive λ, `core/utils/train.py` l. 216-227, `train.py` l. 124-127,
defaults `parser.py` l. 75-77): λ starts at 0; after each step, with H the
E_Lin values of all earlier steps (never reset across epochs), if |H| > 2 and
E_Lin > mean(H) + 2·std(H) (population std), λ ← λ_max, else λ ← 0.99·λ; then
E_Lin is appended to H. The λ of step t therefore depends on steps < t only;
`elle_a_init` / `elle_a_update` implement this rule as a jittable state.

The regularizer is registered as "elle".
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import _checks
from fastadv_jax import closures
from fastadv_jax.regularizers import RegularizerSpec, register_regularizer

Array = jax.Array

# ELLE-A defaults of the reference code (parser.py l. 76-77).
ELLE_A_DECAY = 0.99
ELLE_A_SENSITIVITY = 2.0


def _check_draws(draws: Sequence[Any], x: Array) -> None:
  if len(draws) != 3:
    raise ValueError(
        "draws must be (noise_a, noise_b, alpha): two arrays shaped like x with "
        f"values in [-1, 1] and one of shape (B,) in [0, 1]; got {len(draws)} entries.")
  noise_a, noise_b, alpha = draws
  _checks.check_same_shape("draws noise_a", noise_a, "x", x)
  _checks.check_same_shape("draws noise_b", noise_b, "x", x)
  if np.shape(alpha) != (np.shape(x)[0],):
    raise ValueError(
        f"draws alpha must have shape (B,) = {(np.shape(x)[0],)}, got {np.shape(alpha)}.")
  for what, value, low in (("noise_a", noise_a, -1.0), ("noise_b", noise_b, -1.0),
                           ("alpha", alpha, 0.0)):
    if _checks.is_concrete(value) and np.size(value):
      arr = np.asarray(value, dtype=np.float64)
      lo, hi = float(arr.min()), float(arr.max())
      if not (lo >= low and hi <= 1.0):
        raise ValueError(f"draws {what} must lie in [{low}, 1.0]; its values span "
                         f"[{lo:.4g}, {hi:.4g}].")


def elle_draws(key: Array, x: Array) -> tuple[Array, Array, Array]:
  """The random numbers of one ELLE triplet per example.

  Returns:
    (noise_a, noise_b, alpha): noise_a, noise_b ~ U[-1, 1)^shape(x) (to be
    scaled by ε; the reference's `2*torch.rand(...) - 1`) and alpha ~ U[0, 1)
    of shape (B,), all float32.
  """
  key_a, key_b, key_alpha = jax.random.split(key, 3)
  noise_a = jax.random.uniform(key_a, x.shape, jnp.float32, -1.0, 1.0)
  noise_b = jax.random.uniform(key_b, x.shape, jnp.float32, -1.0, 1.0)
  alpha = jax.random.uniform(key_alpha, x.shape[:1], jnp.float32)
  return noise_a, noise_b, alpha


def elle_points(x: Array, eps: Any, draws: Sequence[Array], *,
                clip: bool = False) -> tuple[Array, Array, Array]:
  """x_a = x + ε·noise_a, x_b = x + ε·noise_b, x_c = (1−α)x_a + αx_b.

  With `clip`, x_a and x_b are clipped to the box [0, 1] (x_c, a convex
  combination of them, is then in the box too); the reference does not clip.
  """
  noise_a, noise_b, alpha = draws
  x_a = x + (eps * noise_a).astype(x.dtype)
  x_b = x + (eps * noise_b).astype(x.dtype)
  if clip:
    x_a = jnp.clip(x_a, 0.0, 1.0)
    x_b = jnp.clip(x_b, 0.0, 1.0)
  a = jnp.asarray(alpha).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
  x_c = (1 - a) * x_a + a * x_b
  return x_a, x_b, x_c


def elle(loss_fn: closures.LossFn, x: Array, key: Optional[Array] = None, *, eps: Any,
         clip: bool = False, joint_forward: bool = True,
         draws: Optional[Sequence[Array]] = None) -> Array:
  """ELLE regularizer E_Lin (Abad Rocamora et al., ICLR 2024), the squared
  violation of the paper's linearity identity (Eq. 1) by the loss.

  E_Lin = mean_i |ℓᵢ(x_c,i) − (1−α_i)ℓᵢ(x_a,i) − α_iℓᵢ(x_b,i)|² with x_a, x_b ~
  U(B∞[x, ε]) independently per coordinate, α_i ~ U[0, 1] one per example,
  x_c = (1−α)x_a + αx_b, and ℓᵢ the per-example loss of `loss_fn` (its
  `per_example`, cross-entropy in training). The square is per example, then
  averaged over the batch (`nn.MSELoss()` in the reference code,
  `core/utils/train.py` l. 337-338). The points are constants (they do not
  depend on the parameters), so the parameter gradient is plain autodiff.

  Published λ (CIFAR-10, `scripts/run_elle_cifar10.sh`): 1000 for ε ≤ 8/255,
  5000 for 10/255-20/255, 10000 for ≥ 22/255, paired with FGSM from x with
  step ε; ELLE-A uses λ_max = 4000 (see `elle_a_update`).

  Args:
    loss_fn: a `closures.LossFn` of the parameters being trained (its
      per-example losses are needed; a plain callable is refused).
    x: clean images (B, H, W, C) in [0, 1].
    key: PRNG key for x_a, x_b and α (unused when `draws` is given).
    eps: L∞ radius in pixel units (e.g. 8/255).
    clip: clip x_a and x_b to the box [0, 1] (default False: the reference
      code does not, `core/utils/train.py` l. 326-329).
    joint_forward: evaluate x_a, x_b, x_c as one batch of 3B (default; the
      reference's single `model(torch.cat(...))`, l. 334, so BatchNorm in batch
      mode uses the statistics of the 3B points); False: three forward passes
      of B, each with its own batch statistics.
    draws: optional `(noise_a, noise_b, alpha)` (see `elle_draws`): noise in
      [-1, 1] shaped like x (x_a = x + ε·noise_a) and alpha of shape (B,) in
      [0, 1]; replaces the draws from `key` (for parity tests).
  Returns:
    The scalar E_Lin (not yet multiplied by λ), at least float32.
  """
  if not isinstance(loss_fn, closures.LossFn):
    raise ValueError(
        "elle needs the per-example losses of a closures.LossFn (e.g. "
        f"closures.cross_entropy(logits_fn, labels)); got {type(loss_fn).__name__}.")
  _checks.check_eps(eps)
  _checks.check_images(x)
  _checks.check_same_batch("x", x, "loss_fn.labels", loss_fn.labels)
  if draws is None:
    if key is None:
      raise ValueError("elle draws random points and needs a jax.random key (or draws=...).")
    draws = elle_draws(key, x)
  else:
    _check_draws(draws, x)
  x_a, x_b, x_c = elle_points(x, eps, draws, clip=clip)
  alpha = draws[2]

  if joint_forward:
    batch = x.shape[0]
    labels = loss_fn.labels
    joint = dataclasses.replace(loss_fn, labels=jnp.concatenate([labels, labels, labels]))
    _, aux = joint.with_aux(jnp.concatenate([x_a, x_b, x_c]))
    losses = aux.losses
    loss_a, loss_b, loss_c = losses[:batch], losses[batch:2 * batch], losses[2 * batch:]
  else:
    loss_a, loss_b, loss_c = (loss_fn.with_aux(p)[1].losses for p in (x_a, x_b, x_c))

  dtype = jnp.promote_types(loss_c.dtype, jnp.float32)
  loss_a, loss_b, loss_c = (v.astype(dtype) for v in (loss_a, loss_b, loss_c))
  a = jnp.asarray(alpha).astype(dtype)
  err = loss_c - ((1 - a) * loss_a + a * loss_b)
  return jnp.mean(err * err)


# ---------------------------------------------------------------------------
# ELLE-A: the adaptive λ
# ---------------------------------------------------------------------------

class ElleAState(NamedTuple):
  """ELLE-A's λ and the running statistics of the past E_Lin values."""
  lam: Array    # λ for the next step
  count: Array  # number of past values
  mean: Array   # their mean
  m2: Array     # sum of squared deviations from the mean (Welford)


def elle_a_init() -> ElleAState:
  """λ = 0 and no history (reference `train.py` l. 124-127)."""
  zero = jnp.zeros((), jnp.float32)
  return ElleAState(zero, jnp.zeros((), jnp.int32), zero, zero)


def elle_a_update(state: ElleAState, value: Any, *, lambda_max: Any = 4000.0,
                  decay: float = ELLE_A_DECAY,
                  sensitivity: float = ELLE_A_SENSITIVITY) -> ElleAState:
  """One ELLE-A step: λ ← λ_max if E_Lin > mean + s·std of the earlier values
  (and more than 2 of them), else λ ← decay·λ; then E_Lin joins the history.

  Reference: `core/utils/train.py` l. 216-227 (std is NumPy's population std);
  defaults decay 0.99, s = 2 (`parser.py` l. 76-77), λ_max = 4000 for CIFAR-10
  (`scripts/run_elle-a_cifar10.sh`). Jittable; `value` is this step's E_Lin
  (computed with the λ of `state`, which is what the step used).
  """
  _checks.check_nonnegative("lambda_max", lambda_max)
  _checks.check_in_range("decay", decay, 0.0, 1.0)
  _checks.check_nonnegative("sensitivity", sensitivity)
  value = jnp.asarray(value, jnp.float32)
  std = jnp.sqrt(state.m2 / jnp.maximum(state.count, 1).astype(jnp.float32))
  spike = (state.count > 2) & (value > state.mean + sensitivity * std)
  lam = jnp.where(spike, jnp.asarray(lambda_max, jnp.float32), state.lam * decay)
  count = state.count + 1
  delta = value - state.mean
  mean = state.mean + delta / count.astype(jnp.float32)
  m2 = state.m2 + delta * (value - mean)
  return ElleAState(lam, count, mean, m2)


def _elle_forward_points(args, hparams):
  """ELLE's train-mode forwards: one of the 3B joint batch, or three of B."""
  x = args["x"]
  draws = args.get("draws")
  draws = elle_draws(args["key"], x) if draws is None else draws
  points = elle_points(x, args["eps"], draws, clip=hparams.get("clip", False))
  if hparams.get("joint_forward", True):
    return [jnp.concatenate(points)]
  return list(points)


register_regularizer("elle", RegularizerSpec(elle, dict(
    loss_fn="loss_fn", x="x", key="key", eps="eps"), draw_arg="draws",
    forward_points=_elle_forward_points))

"""AutoAttack in JAX: APGD, APGD-T, FAB-T, Square and the standard ensemble.

Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks" (reference: fra31/auto-attack).

Every attack is a function of a `logits_fn` and arrays::

  from fastadv_jax import closures

  # Eval-mode BatchNorm, float32; a pytree: the variables become jit arguments,
  # and another checkpoint of the same architecture reuses the compiled attacks.
  logits_fn = closures.eval_logits_fn(model, variables)
  result = autoattack.autoattack(logits_fn, x, y, key, eps=8/255, batch_size=500,
                                 progress=True)   # a tqdm bar per attack
  result.robust_accuracy   # {"clean": .., "apgd-ce": .., "apgd-t": .., "fab-t": .., "square": ..}
  res = autoattack.apgd(logits_fn, x, y, key, eps=8/255, loss="dlr")    # a single attack
  res.x_adv, res.fooled

Conventions (see `_common`): attacks return `AttackResult(x_adv, fooled, info)`
with x_adv = adversarial example where fooled and the clean x elsewhere; an
optional `mask` selects the points to attack; called eagerly, each target,
restart and block of queries runs only on the points still to fool, packed into
bucketed shapes (a few compiled programs serve every batch; a point's result
does not depend on its batch: `example_ids` pick its random draws); the inner
loops are jitted (`logits_fn` passes into them as
a pytree argument, so a `closures.LogitsFn` or a `jax.tree_util.Partial` makes
the model variables arguments rather than compile-time constants; a plain
Python callable is wrapped by `closures.as_pytree` and works too). Reliability warnings are `checks`
categories, e.g. `GradientMaskingWarning`.
"""

from fastadv_jax.autoattack._common import AttackResult
from fastadv_jax.autoattack._apgd import apgd, apgd_targeted, checkpoint_schedule, target_classes
from fastadv_jax.autoattack.checks import (
    AutoAttackWarning,
    GradientMaskingWarning,
    ProbabilityOutputWarning,
    RandomizedDefenseWarning,
)
from fastadv_jax.autoattack.ensemble import ATTACKS, VERSIONS, AutoAttackResult, autoattack
from fastadv_jax.autoattack._fab import fab_targeted, projection_linf
from fastadv_jax.autoattack._square import p_schedule, square

__all__ = [
    "ATTACKS", "VERSIONS", "AttackResult", "AutoAttackResult", "AutoAttackWarning",
    "GradientMaskingWarning", "ProbabilityOutputWarning", "RandomizedDefenseWarning",
    "apgd", "apgd_targeted", "autoattack", "checkpoint_schedule",
    "fab_targeted", "p_schedule", "projection_linf", "square", "target_classes",
]

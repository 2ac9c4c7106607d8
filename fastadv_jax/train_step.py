"""The train step: one attack and its regularizers, from a `methods.Method`.

`make_train_step(model, tx, method, ...)` returns a per-device function
`train_step(state, batch) -> (state, metrics)`, written with
``axis_name="batch"``: gradients and metrics are averaged with `lax.pmean`,
BatchNorm statistics are per device (as on one GPU in the references). Run it
under `jax.pmap(train_step, axis_name=AXIS)`.

What a step does:

1. Augments the batch (per example, keyed by the example's index in the
   epoch, so augmentation does not depend on the device count).
2. Runs the attack. A stateless attack returns an `attacks.AttackOutput`;
   an attack with a carried perturbation (AT for Free) trains on
   x + box(state) and updates the state from the input gradient of the same
   forward/backward pass.
3. Builds exactly the quantities the regularizers consume
   (`regularizers.TRAIN_STEP_QUANTITIES`): the gradient at the attack's start
   is the attack's own when it took one in the same BatchNorm mode, the
   gradient at x likewise when the attack started at x; otherwise they are
   computed.
4. Differentiates CE(x + δ) + Σ λ·R with respect to the parameters (and δ for
   carried perturbations) and applies the optimizer.

Randomness: one seed; the key of step t is `fold_in(PRNGKey(seed), t)`, folded
with the device index, then split for the attack and the regularizers (each
regularizer folds in its position). Augmentation uses `fold_in(PRNGKey(seed +
1), t // replays)`, so AT for Free's replays of one minibatch see the same
images. A resumed run continues exactly the same sequence.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from fastadv_jax import attacks
from fastadv_jax import closures
from fastadv_jax import methods
from fastadv_jax.train_state import AXIS, TrainState, model_variables


def step_keys(seed: int, step_index, device_index) -> tuple[jax.Array, jax.Array]:
  """(attack key, regularizer key) of a train step on one device."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), step_index)
  return jax.random.split(jax.random.fold_in(key, device_index))


def augmentation_key(seed: int, step_index, replays: int = 1) -> jax.Array:
  """The augmentation key of a train step (shared by a minibatch's replays)."""
  return jax.random.fold_in(jax.random.PRNGKey(seed + 1), step_index // replays)


def warmup_factor(step_index, warmup_steps: float):
  """Linear ramp 0 -> 1 over `warmup_steps` train steps; 1 without warm-up."""
  if warmup_steps <= 0:
    return jnp.float32(1.0)
  return jnp.minimum(1.0, step_index.astype(jnp.float32) / warmup_steps)


def regularizer_inputs(method: methods.Method, model, params, batch_stats, x, y,
                       out: attacks.AttackOutput) -> dict[str, Any]:
  """The constant quantities the regularizers consume (gradients at start and x).

  Reuses the attack's gradient where it is the same quantity: taken with the
  same parameters and BatchNorm mode ("batch", that of the regularizers), at
  the same point.
  """
  consumed = method.consumed
  wanted = {"grad_at_start", "grad_at_clean"} & consumed
  if not wanted:
    return {}
  loss_fn = closures.cross_entropy(
      closures.logits_fn(model, model_variables(params, batch_stats), bn="batch"), y)
  own = out.grad_at_start if method.attack.bn == "batch" else None
  inputs = {}
  if "grad_at_start" in wanted:
    inputs["grad_at_start"] = own if own is not None else jax.grad(loss_fn)(out.start)
  if "grad_at_clean" in wanted:
    reuse = own is not None and method.attack.gradient_at_clean
    inputs["grad_at_clean"] = own if reuse else jax.grad(loss_fn)(x)
  return jax.lax.stop_gradient(inputs)


def make_train_step(model, tx: optax.GradientTransformation, method: methods.Method, *,
                    steps_per_epoch: int | Sequence[int], seed: int,
                    augment: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
                    ) -> Callable:
  """Returns `train_step(state, batch) -> (state, metrics)`, written per device.

  Args:
    model: the Flax Linen model (`__call__(x, train)`).
    tx: the optimizer.
    method: the validated method (`methods.build_method(config)`).
    steps_per_epoch: train steps per epoch (for the warm-up ramp; the first
      phase's when it varies).
    seed: the run's seed.
    augment: `augment(images, example_indices, key) -> float images in [0, 1]`.
  Returns:
    The per-device step. `batch` holds "image" (uint8 or float, NHWC), "label"
    and "index" (the example's position in the epoch, for augmentation keys).
  """
  attack = method.attack
  carried = attack.spec.carried
  first_epoch_steps = (steps_per_epoch if isinstance(steps_per_epoch, int)
                       else steps_per_epoch[0])
  warmup_steps = method.warmup_epochs * first_epoch_steps
  eps_full = jnp.float32(method.eps)

  def run_attack(state, x, y, key, eps, step):
    if carried is not None:
      delta = attacks.project_box(x, state.attack_state)
      return attacks.AttackOutput(delta, x + delta, None)
    logits = closures.logits_fn(model, model_variables(state.params, state.batch_stats),
                                bn=attack.bn)
    kwargs = dict(attack.kwargs)
    kwargs.update({k: state.hparams[f"attack/{k}"] for k in attack.traced})
    if step is not None:
      kwargs["step"] = step
    out = attack.fn(closures.cross_entropy(logits, y), x, key, eps=eps, **kwargs)
    return jax.lax.stop_gradient(out)

  def train_step(state: TrainState, batch):
    attack_key, reg_key = step_keys(seed, state.step, jax.lax.axis_index(AXIS))
    x = augment(batch["image"], batch["index"],
                augmentation_key(seed, state.step, attack.replays))
    y = batch["label"]
    ramp = warmup_factor(state.step, warmup_steps)
    eps = eps_full * ramp if method.warmup_target == "eps" else eps_full
    step = attack.step
    if step is not None and method.warmup_target == "step":
      step = step * ramp
    out = run_attack(state, x, y, attack_key, eps, step)
    constants = regularizer_inputs(method, model, state.params, state.batch_stats, x, y, out)

    def loss_fn(params, delta):
      variables = model_variables(params, state.batch_stats)
      logits, mutated = model.apply(variables, x + delta, train=True,
                                    mutable=["batch_stats"])
      ce = jnp.mean(closures.cross_entropy_per_example(logits, y))
      total, values = ce, {}
      if method.regularizers:
        logits_fn = closures.logits_fn(model, variables, bn="batch")
        quantities = dict(
            constants, loss_fn=closures.cross_entropy(logits_fn, y), logits_fn=logits_fn,
            x=x, labels=y, delta=jax.lax.stop_gradient(delta), start=out.start,
            logits_adv=logits.astype(jnp.float32), eps=eps_full, step_index=state.step)
        for i, reg in enumerate(method.regularizers):
          quantities["key"] = jax.random.fold_in(reg_key, i)
          args = {arg: quantities[q] for arg, q in reg.spec.consumes.items()}
          values[reg.name] = reg.fn(**args, **reg.hparams)
          total = total + state.hparams[f"reg/{reg.name}"] * values[reg.name]
      new_stats = mutated.get("batch_stats", state.batch_stats)
      return total, (logits, new_stats, ce, values)

    argnums = (0, 1) if carried is not None else 0
    (total, (logits, new_stats, ce, values)), grads = jax.value_and_grad(
        loss_fn, argnums=argnums, has_aux=True)(state.params, out.delta)
    attack_state = state.attack_state
    if carried is not None:
      grads, grad_delta = grads
      attack_state = carried.update(x, out.delta, grad_delta, eps=eps, step=step)
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"train/loss": total, "train/ce": ce,
               "train/adv_acc": jnp.mean(jnp.argmax(logits, -1) == y),
               "train/eps": eps * 255.0}
    metrics.update({f"train/reg/{n}": v for n, v in values.items()})
    metrics = jax.lax.pmean(metrics, AXIS)
    return state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                         opt_state=opt_state, attack_state=attack_state), metrics

  return train_step

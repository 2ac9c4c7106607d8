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

Reference conventions (named options of the `Method`, reference values in the
paper configs):

* `method.bn_updates`: "once" updates the BatchNorm running statistics from
  the CE forward only; "every_forward" updates them once per train-mode
  forward the PyTorch reference makes, in its order: the attack's forwards
  (`AttackOutput.forward_points`; PGD-k: k), the CE forward at x + δ, then
  each regularizer's (`RegularizerSpec.forward_points`, which include the
  input gradients the regularizer computes in the reference). PyTorch
  updates the running averages on every forward in `model.train()`, so the
  GradAlign code's FGSM + GradAlign step updates them 3 times
  (`num_batches_tracked` += 3: the FGSM pass, train.py l.153, the CE pass,
  l.188, and g₂ at x + η, l.193 via utils.py l.84). The attack's and the
  regularizers' forwards are replayed outside the differentiated function
  (forward only, with the step's parameters); the CE forward's update is that
  of the differentiated forward itself, started from the statistics after the
  attack's (train mode normalizes with batch statistics, so the running ones
  change nothing else; a separate replay cost 14% more flops in the FGSM step
  of PreActResNet-18). Not replayed: the GradAlign code's monitoring pass at x for
  PGD / no attack / random corner (train.py l.182-184), which only feeds a log.
* `method.attack.order` (AT for Free): "single_pass" (Shafahi et al. 2019,
  Alg. 1; Wong's train_free.py l.106-118): one forward/backward at x + δ gives
  the weight gradient and the δ update; "step_first" (the GradAlign code,
  train.py l.149-170 then l.188): δ is updated first from the gradient at
  x + δ, then the weights are trained at x + δ_new (two passes).
* The input-gradient rule at the box boundary is an attack keyword
  (`box_grad`, see `attacks.boundary_input_grad`).

Explicit draws (parity tests): a batch may carry `batch["noise"]`, a dict
with "attack" (the attack's `noise=`) and regularizer names (passed through
their spec's `draw_arg`); the corresponding keys are then not used for those
draws. `make_train_step(..., trace=True)` adds the per-device δ and the
averaged parameter gradient to the metrics ("trace/delta", "trace/grads").

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
  the same point. The gradient at x is reused only when the attack's boundary
  rule is "full" (with another rule the attack's gradient is masked at the
  box boundary, while ∇ℓ(x) is not); GradAlign's g₁ (`grad_at_start`) is the
  attack's own gradient, mask included, as in the GradAlign code.
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
    reuse = (own is not None and method.attack.gradient_at_clean
             and method.attack.kwargs.get("box_grad", "full") == "full")
    inputs["grad_at_clean"] = own if reuse else jax.grad(loss_fn)(x)
  return jax.lax.stop_gradient(inputs)


def replay_forwards(model, params, batch_stats, points: Sequence[jax.Array]):
  """BatchNorm running statistics after train-mode forwards at `points`, in order."""
  if not batch_stats:
    return batch_stats
  for point in points:
    _, mutated = model.apply(model_variables(params, batch_stats),
                             jax.lax.stop_gradient(point), train=True,
                             mutable=["batch_stats"])
    batch_stats = mutated["batch_stats"]
  return batch_stats


def make_train_step(model, tx: optax.GradientTransformation, method: methods.Method, *,
                    steps_per_epoch: int | Sequence[int], seed: int,
                    augment: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                    trace: bool = False) -> Callable:
  """Returns `train_step(state, batch) -> (state, metrics)`, written per device.

  Args:
    model: the Flax Linen model (`__call__(x, train)`).
    tx: the optimizer.
    method: the validated method (`methods.build_method(config)`).
    steps_per_epoch: train steps per epoch (for the warm-up ramp; the first
      phase's when it varies).
    seed: the run's seed.
    augment: `augment(images, example_indices, key) -> float images in [0, 1]`.
    trace: add "trace/delta" (per device) and "trace/grads" (the averaged
      parameter gradient) to the metrics, for parity checks.
  Returns:
    The per-device step. `batch` holds "image" (uint8 or float, NHWC), "label"
    and "index" (the example's position in the epoch, for augmentation keys),
    and optionally "noise" (explicit draws, see the module docstring).
  """
  attack = method.attack
  carried = attack.spec.carried
  step_first = carried is not None and attack.order == "step_first"
  every_forward = method.bn_updates == "every_forward"
  if every_forward:
    missing = [r.name for r in method.regularizers if r.spec.forward_points is None]
    if missing:
      raise ValueError(f"bn_updates='every_forward' needs each regularizer's forward "
                       f"points; {missing} do not describe theirs (RegularizerSpec."
                       f"forward_points). Use bn_updates='once'.")
  first_epoch_steps = (steps_per_epoch if isinstance(steps_per_epoch, int)
                       else steps_per_epoch[0])
  warmup_steps = method.warmup_epochs * first_epoch_steps
  eps_full = jnp.float32(method.eps)

  def run_attack(state, x, y, key, eps, step, noise):
    if carried is not None and not step_first:
      delta = attacks.project_box(x, state.attack_state)
      return attacks.AttackOutput(delta, x + delta, None)
    logits = closures.logits_fn(model, model_variables(state.params, state.batch_stats),
                                bn=attack.bn)
    kwargs = dict(attack.kwargs)
    kwargs.update({k: state.hparams[f"attack/{k}"] for k in attack.traced})
    if step is not None:
      kwargs["step"] = step
    if carried is not None:
      kwargs["delta"] = state.attack_state
    if noise is not None:
      kwargs["noise"] = noise
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
    draws = batch.get("noise", {})
    out = run_attack(state, x, y, attack_key, eps, step, draws.get("attack"))
    constants = regularizer_inputs(method, model, state.params, state.batch_stats, x, y, out)
    # The running statistics the CE forward updates: with "every_forward",
    # those after the attack's forwards (module docstring).
    ce_stats = state.batch_stats
    if every_forward and out.forward_points is not None and attack.bn == "batch":
      ce_stats = replay_forwards(model, state.params, state.batch_stats, out.forward_points)

    def reg_args(params, delta, logits_adv):
      """Each regularizer's call arguments, built from `params`."""
      variables = model_variables(params, state.batch_stats)
      logits_fn = closures.logits_fn(model, variables, bn="batch")
      quantities = dict(
          constants, loss_fn=closures.cross_entropy(logits_fn, y), logits_fn=logits_fn,
          x=x, labels=y, delta=jax.lax.stop_gradient(delta), start=out.start,
          logits_adv=logits_adv, eps=eps_full, step_index=state.step)
      calls = []
      for i, reg in enumerate(method.regularizers):
        quantities["key"] = jax.random.fold_in(reg_key, i)
        args = {arg: quantities[q] for arg, q in reg.spec.consumes.items()}
        if reg.name in draws:
          args[reg.spec.draw_arg] = draws[reg.name]
        calls.append(args)
      return calls

    def loss_fn(params, delta):
      variables = model_variables(params, ce_stats)
      logits, mutated = model.apply(variables, x + delta, train=True,
                                    mutable=["batch_stats"])
      ce = jnp.mean(closures.cross_entropy_per_example(logits, y))
      total, values = ce, {}
      if method.regularizers:
        calls = reg_args(params, delta, logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))
        for reg, args in zip(method.regularizers, calls):
          values[reg.name] = reg.fn(**args, **reg.hparams)
          total = total + state.hparams[f"reg/{reg.name}"] * values[reg.name]
      new_stats = mutated.get("batch_stats", ce_stats)
      return total, (logits, new_stats, ce, values)

    argnums = (0, 1) if carried is not None and not step_first else 0
    (total, (logits, new_stats, ce, values)), grads = jax.value_and_grad(
        loss_fn, argnums=argnums, has_aux=True)(state.params, out.delta)
    attack_state = state.attack_state
    if step_first:
      attack_state = out.delta
    elif carried is not None:
      grads, grad_delta = grads
      attack_state = carried.update(x, out.delta, grad_delta, eps=eps, step=step)
    if every_forward and method.regularizers:
      # After the attack's forwards and the CE forward (above), the
      # regularizers' own, in order. Their descriptions cover the input
      # gradients they use (the reference computes them inside the
      # regularizer), so the constants computed above for them are not replayed.
      points = []
      for reg, args in zip(method.regularizers, reg_args(state.params, out.delta, None)):
        points += list(reg.spec.forward_points(args, reg.hparams))
      new_stats = replay_forwards(model, state.params, new_stats, points)
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"train/loss": total, "train/ce": ce,
               "train/adv_acc": jnp.mean(jnp.argmax(logits, -1) == y),
               "train/eps": eps * 255.0}
    metrics.update({f"train/reg/{n}": v for n, v in values.items()})
    metrics = jax.lax.pmean(metrics, AXIS)
    if trace:
      metrics["trace/delta"] = out.delta
      metrics["trace/grads"] = grads
    return state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                         opt_state=opt_state, attack_state=attack_state), metrics

  return train_step

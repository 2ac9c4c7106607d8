"""Adversarial training: the train state, the train step, and the loop.

Layout after flax `examples/imagenet`: small importable functions
(`create_train_state`, `make_train_step`, `make_eval_step`, `train_and_evaluate`)
that a notebook can call one by one, and a thin CLI around them (`cli.py`).

The train step is written per device with ``axis_name="batch"``: gradients and
metrics are averaged with `lax.pmean`, BatchNorm statistics are per device (as
on one GPU in the references) and averaged across devices before every
evaluation and checkpoint. It composes one attack (by name, `attacks.ATTACKS`, or
"free" for AT for Free) with zero or more regularizers (by name,
`regularizers.REGULARIZERS`), each weighted by a traced λ so the
catastrophic-overfitting monitor can change it without recompiling.

Randomness: one seed; the key of step t is `fold_in(PRNGKey(seed), t)`, then
split for augmentation (per example, folded with the example's index in the
epoch, so the augmentation does not depend on the device count), the attack and
the regularizers (folded with the device index). A resumed run therefore
continues exactly the same sequence.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import time
from typing import Any, Callable, Iterator

import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from fastadv_jax import attacks
from fastadv_jax import checkpoints
from fastadv_jax import closures
from fastadv_jax import config_base
from fastadv_jax import data as data_lib
from fastadv_jax import metrics as metrics_lib
from fastadv_jax import models
from fastadv_jax import monitor as monitor_lib
from fastadv_jax import regularizers
from fastadv_jax import schedules

AXIS = "batch"


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes. Checkpointed unreplicated."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  # Traced hyperparameters (regularizer weights, ZeroGrad q, ...), see
  # config_base.traced_hparam_names: the monitor may change them.
  hparams: dict[str, jax.Array]
  # AT for Free: the perturbation carried across replays and minibatches
  # (per device, shape of the per-device batch); a scalar placeholder otherwise.
  free_delta: jax.Array
  # Stochastic weight averaging (AdvLC's "+SWA" rows): {"params", "batch_stats",
  # "count"} when config.swa.enabled, else {}.
  swa: dict[str, Any]


# --------------------------------------------------------------------------
# Model, optimizer, state.


def create_model(config, *, dtype: str | None = None):
  """The model of `config`; `dtype` overrides the compute dtype (evaluation: float32)."""
  dtype = jnp.dtype(dtype or config.dtype)
  return models.get_model(config.model.name, num_classes=config.num_classes,
                          dtype=dtype, **dict(config.model.kwargs))


def total_steps(config, steps_per_epoch: int) -> int:
  """Iterations of the whole run (AT for Free: replayed iterations count)."""
  return int(config.num_epochs * steps_per_epoch)


def create_learning_rate_fn(config, steps_per_epoch: int) -> optax.Schedule:
  """The per-iteration learning-rate schedule named by `config.schedule`.

  `schedule.lr_max` is passed as the schedule's peak / initial value, the run's
  total number of steps and steps per epoch where the schedule takes them, and
  keyword arguments given in epochs (`boundary_epochs`, `drop_epoch`) are
  converted to steps.
  """
  kwargs = dict(config.schedule.kwargs)
  fn = schedules.SCHEDULES[config.schedule.name]
  accepted = inspect.signature(fn).parameters
  iters_per_epoch = steps_per_epoch * config.free.replays
  for name in ("lr_max", "init_value", "value", "peak_value"):
    if name in accepted:
      kwargs.setdefault(name, config.schedule.lr_max)
      break
  if "total_steps" in accepted:
    kwargs.setdefault("total_steps", total_steps(config, steps_per_epoch))
  if "steps_per_epoch" in accepted:
    kwargs.setdefault("steps_per_epoch", iters_per_epoch)
  if "phase_boundaries" in accepted and "imagenet_phases" in config:
    # Per-phase steps per epoch belong to the config's own phases.
    kwargs.setdefault("phase_boundaries",
                      list(config.imagenet_phases.start_epochs) + [config.num_epochs])
  if "boundary_epochs" in kwargs:
    kwargs["boundaries"] = [int(e * iters_per_epoch) for e in kwargs.pop("boundary_epochs")]
  if "drop_epoch" in kwargs:
    kwargs["drop_step"] = int(kwargs.pop("drop_epoch") * iters_per_epoch)
  return schedules.get_schedule(config.schedule.name, **kwargs)


def _decay_mask(params, decay_bn: bool):
  """Weight decay on every parameter, or on all but BatchNorm's scale and bias.

  BatchNorm layers are recognised by their parameters ({scale, bias} without a
  kernel), not by their names.
  """
  def mask(tree):
    if isinstance(tree, dict):
      is_bn = bool(tree) and set(tree) <= {"scale", "bias"}
      return {k: (decay_bn or not is_bn) if not isinstance(v, dict) else mask(v)
              for k, v in tree.items()}
    return True
  return mask(params)


def create_optimizer(config, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD (momentum, optional Nesterov) or Adam with *coupled* weight decay.

  Coupled as in PyTorch's `weight_decay` argument: the decay is added to the
  gradient before momentum / Adam's moments, which is what the references use.
  """
  lr_fn = create_learning_rate_fn(config, steps_per_epoch)
  opt = config.optimizer
  decay = optax.add_decayed_weights(
      opt.weight_decay, mask=functools.partial(_decay_mask, decay_bn=opt.decay_bn))
  if opt.name == "adam":
    return optax.chain(decay, optax.scale_by_adam(), optax.scale_by_learning_rate(lr_fn))
  if opt.cycle_momentum:
    # Wong et al.'s OneCycle scheduler cycles momentum 0.9 -> 0.8 -> 0.9,
    # inversely to the learning rate. optax.inject_hyperparams keeps it traced.
    momentum_fn = schedules.cyclic_momentum(
        total_steps=total_steps(config, steps_per_epoch),
        **{k: v for k, v in dict(config.schedule.kwargs).items() if k == "peak_fraction"})
    tx = optax.inject_hyperparams(optax.sgd)(
        learning_rate=lr_fn, momentum=momentum_fn, nesterov=opt.nesterov)
    return optax.chain(decay, tx)
  return optax.chain(decay, optax.sgd(lr_fn, momentum=opt.momentum, nesterov=opt.nesterov))


def initial_hparams(config) -> dict[str, jax.Array]:
  hp = {f"reg/{n}": jnp.float32(config_base.regularizer_weight(config, n))
        for n in config.regularizers}
  for k in config.attack.kwargs:
    if k in config_base.TRACED_ATTACK_KWARGS:
      hp[f"attack/{k}"] = jnp.float32(config.attack.kwargs[k])
  return hp


def create_train_state(config, model, tx, key, image_shape, host_batch: int
                       ) -> TrainState:
  """Initial (unreplicated) state; AT for Free's perturbation has the host batch shape."""
  variables = models.init_variables(model, key, image_shape)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  if config.attack.name == "free":
    free_delta = jnp.zeros((host_batch,) + tuple(image_shape), jnp.float32)
  else:
    free_delta = jnp.zeros((), jnp.float32)
  swa = {}
  if config.swa.enabled:
    swa = {"params": jax.tree_util.tree_map(jnp.copy, params),
           "batch_stats": jax.tree_util.tree_map(jnp.copy, batch_stats),
           "count": jnp.int32(0)}
  return TrainState(step=jnp.int32(0), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), hparams=initial_hparams(config),
                    free_delta=free_delta, swa=swa)


# --------------------------------------------------------------------------
# The train step.


def _variables(params, batch_stats):
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def _accepts(fn: Callable, name: str) -> bool:
  try:
    return name in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def _warmup_factor(config, step, steps_per_epoch: int):
  """Linear ramp 0 -> 1 over `warmup.epochs` (SVHN); 1 without warm-up."""
  if config.warmup.epochs <= 0:
    return jnp.float32(1.0)
  ramp_steps = config.warmup.epochs * steps_per_epoch * config.free.replays
  return jnp.minimum(1.0, step.astype(jnp.float32) / ramp_steps)


def augment_batch(config, images, indices, key):
  """Per-example augmentation keyed by the example's index (device-count independent)."""
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
  aug = functools.partial(data_lib.augment, padding=config.augment.padding,
                          pad_mode=config.augment.pad_mode, flip=config.augment.flip,
                          rotation_degrees=config.augment.rotation)
  return jax.vmap(lambda im, k: aug(im[None], k)[0])(images, keys)


# Each single-step attack's default step as a multiple of ε (REFERENCE.md), for
# the SVHN warm-up of the step when the config leaves the step to the attack.
_DEFAULT_STEP_RATIO = {"fgsm": 1.0, "fgsm_rs": 1.25, "zerograd": 2.0, "multigrad": 1.0,
                       "n_fgsm": 1.0, "fgsm_n": 1.0, "random_corner": 1.0}


def make_train_step(config, model, tx, steps_per_epoch: int) -> Callable:
  """Returns `train_step(state, batch) -> (state, metrics)`, written per device.

  `batch` holds "image" (uint8 or float, NHWC), "label" and "index" (the
  example's position in the epoch, for augmentation keys). Run it under
  `jax.pmap(..., axis_name="batch")`.
  """
  eps_full = config_base.eps_pixels(config)
  attack_name = config.attack.name
  is_free = attack_name == "free"
  attack_fn = None if is_free else attacks.get_attack(attack_name)
  static_attack_kwargs = {k: v for k, v in dict(config.attack.kwargs).items()
                          if k not in config_base.TRACED_ATTACK_KWARGS}
  traced_attack_kwargs = [k for k in config.attack.kwargs
                          if k in config_base.TRACED_ATTACK_KWARGS]
  step_pixels = config_base.step_pixels(config)
  reg_specs = {n: {k: v for k, v in dict(r).items() if k not in ("weight", "lambda_rule")}
               for n, r in config.regularizers.items()}
  # GradAlign reuses the attack's gradient at its starting point; AdvLC may take
  # its "clean" logits at the attack's noisy point (FGSM-N).
  want_start_grad = bool(reg_specs) and attack_fn is not None and _accepts(
      attack_fn, "return_grad")
  want_noise = bool(reg_specs) and attack_fn is not None and _accepts(
      attack_fn, "return_noise")
  replays = config.free.replays
  seed = config.seed

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    # Augmentation is keyed by the data step, so AT for Free's replays of one
    # minibatch see the same augmented images.
    data_step = state.step // replays
    aug_key = jax.random.fold_in(jax.random.PRNGKey(seed + 1), data_step)
    attack_key, reg_key = jax.random.split(
        jax.random.fold_in(key, jax.lax.axis_index(AXIS)))
    x = augment_batch(config, batch["image"], batch["index"], aug_key)
    y = batch["label"]
    hp = state.hparams
    warm = _warmup_factor(config, state.step, steps_per_epoch)
    eps = eps_full * warm if config.warmup.target == "eps" else jnp.float32(eps_full)

    attack_variables = _variables(state.params, state.batch_stats)
    grad_start, x_start = None, None
    if is_free:
      # The carried perturbation may come from another minibatch: box-project it.
      delta = attacks.project_box(x, state.free_delta)
    else:
      attack_logits = closures.logits_fn(model, attack_variables, bn=config.attack.bn)
      attack_loss = closures.cross_entropy(attack_logits, y)
      kwargs = dict(static_attack_kwargs)
      kwargs.update({k: hp[f"attack/{k}"] for k in traced_attack_kwargs})
      step = step_pixels
      if config.warmup.target == "step" and config.warmup.epochs > 0:
        step = (step_pixels if step_pixels is not None
                else _DEFAULT_STEP_RATIO[attack_name] * eps_full) * warm
      if step is not None:
        kwargs["step"] = step
      if want_start_grad:
        kwargs["return_grad"] = True
      if want_noise:
        kwargs["return_noise"] = True
      out = attack_fn(attack_loss, x, attack_key, eps=eps, **kwargs)
      # Extras come back in the order (delta, [grad], [eta]).
      out = list(out) if (want_start_grad or want_noise) else [out]
      delta = jax.lax.stop_gradient(out.pop(0))
      if want_start_grad:
        grad_start = jax.lax.stop_gradient(out.pop(0))
      if want_noise:
        x_start = jax.lax.stop_gradient(jnp.clip(x + out.pop(0), 0.0, 1.0))

    def loss_fn(params, delta):
      variables = _variables(params, state.batch_stats)
      logits, mutated = model.apply(variables, x + delta, train=True,
                                    mutable=["batch_stats"])
      ce = jnp.mean(closures.cross_entropy_per_example(logits, y))
      total = ce
      reg_values = {}
      if reg_specs:
        reg_logits = closures.logits_fn(model, variables, bn="batch")
        ctx = regularizers.RegularizerContext(
            logits_fn=reg_logits, labels=y, x=x, delta=jax.lax.stop_gradient(delta),
            key=reg_key, eps=jnp.float32(eps_full), grad_start=grad_start,
            x_start=x_start, step=state.step, logits_adv=logits.astype(jnp.float32))
        for name, spec in reg_specs.items():
          value = regularizers.regularizer_value(name, ctx, **spec)
          reg_values[name] = value
          total = total + hp[f"reg/{name}"] * value
      new_stats = mutated.get("batch_stats", state.batch_stats)
      return total, (logits, new_stats, ce, reg_values)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1) if is_free else 0, has_aux=True)
    (total, (logits, new_stats, ce, reg_values)), grads = grad_fn(state.params, delta)
    if is_free:
      grads, grad_delta = grads
      free_delta = attacks.free_update(x, delta, grad_delta, eps=eps, step=step_pixels)
    else:
      free_delta = state.free_delta
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "train/loss": total,
        "train/ce": ce,
        "train/adv_acc": jnp.mean(jnp.argmax(logits, -1) == y),
        "train/eps": eps * 255.0,
    }
    metrics.update({f"train/reg/{n}": v for n, v in reg_values.items()})
    metrics = jax.lax.pmean(metrics, AXIS)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_stats,
                              opt_state=opt_state, free_delta=free_delta)
    return new_state, metrics

  return train_step


# --------------------------------------------------------------------------
# Evaluation during training.


def make_eval_step(config, model) -> Callable:
  """Returns `eval_step(variables, batch, key) -> sums`, per device (pmap, psum).

  On a fixed subset: clean, FGSM and PGD-k accuracy (α = ε/4, random start),
  gradient alignment (GradAlign Eq. 5) and cos(δ_FGSM, δ_PGD), in float32 with
  BatchNorm in eval mode; sums over the unmasked examples.
  """
  eps = config_base.eps_pixels(config)
  pgd_steps = config.eval.pgd_steps
  pgd_restarts = config.eval.pgd_restarts

  def eval_step(variables, batch, key):
    key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
    k_pgd, k_align = jax.random.split(key)
    x, y, mask = batch["image"], batch["label"], batch["mask"].astype(jnp.float32)
    logits_fn = closures.logits_fn(model, variables, bn="eval")
    loss_fn = closures.cross_entropy(logits_fn, y)

    def correct(delta):
      return (jnp.argmax(logits_fn(x + delta), -1) == y).astype(jnp.float32)

    delta_fgsm, grad_x = attacks.fgsm(loss_fn, x, eps=eps, return_grad=True)
    delta_pgd = attacks.pgd(loss_fn, x, k_pgd, eps=eps, step=eps / 4, steps=pgd_steps,
                            restarts=pgd_restarts)
    align = metrics_lib.gradient_alignment(loss_fn, x, k_align, eps=eps, grad_x=grad_x,
                                           reduce="none")
    cos = metrics_lib.perturbation_cosine(delta_fgsm, delta_pgd)
    sums = {
        "clean_acc": correct(jnp.zeros_like(x)),
        "fgsm_acc": correct(delta_fgsm),
        "pgd_acc": correct(delta_pgd),
        "grad_alignment": align,
        "cos_fgsm_pgd": cos,
    }
    sums = {k: jnp.sum(v * mask) for k, v in sums.items()}
    sums["count"] = jnp.sum(mask)
    return jax.lax.psum(sums, AXIS)

  return eval_step


def make_pgd_step(config, model, steps: int, restarts: int, rule: str) -> Callable:
  """Per-device PGD-k-r accuracy on a padded batch (early stopping, final eval)."""
  eps = config_base.eps_pixels(config)

  def pgd_step(variables, batch, key):
    key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
    x, y, mask = batch["image"], batch["label"], batch["mask"].astype(jnp.float32)
    logits_fn = closures.logits_fn(model, variables, bn="eval")
    loss_fn = closures.cross_entropy(logits_fn, y)
    clean = jnp.argmax(logits_fn(x), -1) == y
    delta = attacks.pgd(loss_fn, x, key, eps=eps, step=eps / 4, steps=steps,
                        restarts=restarts, select=rule)
    robust = (jnp.argmax(logits_fn(x + delta), -1) == y) & clean
    return jax.lax.psum({"clean_acc": jnp.sum(clean * mask),
                         "pgd_acc": jnp.sum(robust * mask),
                         "count": jnp.sum(mask)}, AXIS)

  return pgd_step


def _sharded_eval_batches(images, labels, batch_size: int, num_devices: int
                          ) -> Iterator[dict]:
  """Fixed-shape batches (padded, with a mask) reshaped to (devices, per-device, ...)."""
  batch_size = max(num_devices, (batch_size // num_devices) * num_devices)
  for x, y, mask in data_lib.eval_batches(images, labels, batch_size):
    x = data_lib.to_float(x) if x.dtype == np.uint8 else x
    yield jax.tree_util.tree_map(
        lambda a: a.reshape((num_devices, -1) + a.shape[1:]),
        {"image": np.asarray(x, np.float32), "label": y, "mask": mask})


def run_eval(p_step, variables_replicated, images, labels, batch_size: int, key,
             num_devices: int) -> dict[str, float]:
  """Runs a psum-ing pmapped eval step over a dataset; returns means."""
  totals: dict[str, float] = {}
  for i, batch in enumerate(_sharded_eval_batches(images, labels, batch_size, num_devices)):
    keys = jax.random.split(jax.random.fold_in(key, i), num_devices)
    keys = jnp.broadcast_to(keys[0], keys.shape)  # same key; the step folds the device index
    sums = jax.device_get(jax.tree_util.tree_map(lambda a: a[0], p_step(
        variables_replicated, batch, keys)))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = totals.pop("count")
  return {k: v / count for k, v in totals.items()} | {"n": int(count)}


# --------------------------------------------------------------------------
# Replication helpers.


def _shard_leading_axis(tree, devices):
  """Places arrays whose leading axis has one entry per device, one per device.

  The mesh axis is named like pmap's (AXIS), so a state placed here has the very
  sharding a pmapped step returns, and the step is not traced again for it.
  """
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                                        jax.sharding.PartitionSpec(AXIS))
  return jax.device_put(tree, sharding)


def to_devices(state: TrainState, devices) -> TrainState:
  """Replicates the state; AT for Free's perturbation is split across devices."""
  n = len(devices)
  free = np.asarray(state.free_delta)
  stacked = jax.tree_util.tree_map(
      lambda a: np.broadcast_to(np.asarray(a), (n,) + np.shape(a)),
      state.replace(free_delta=np.zeros((), np.float32)))
  if free.ndim:
    stacked = stacked.replace(free_delta=free.reshape((n, -1) + free.shape[1:]))
  return _shard_leading_axis(stacked, devices)


def to_host(r_state: TrainState) -> TrainState:
  """The unreplicated host copy of a replicated state (inverse of `to_devices`)."""
  host = jax.device_get(r_state)
  free = np.asarray(host.free_delta)
  free = free.reshape((-1,) + free.shape[2:]) if free.ndim > 1 else free[0]
  single = jax.tree_util.tree_map(lambda a: np.asarray(a[0]), host.replace(free_delta=free[None]))
  return single.replace(free_delta=free)


def unreplicate(tree):
  return jax.tree_util.tree_map(lambda a: a[0], tree)


def _state_dict(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state, "hparams": state.hparams,
          "free_delta": state.free_delta, "swa": state.swa}


def _swa_update(state: TrainState) -> TrainState:
  """Adds the current weights to the equal-weight running average (Izmailov et al. 2018)."""
  count = state.swa["count"]
  params = jax.tree_util.tree_map(
      lambda avg, p: avg + (p - avg) / (count + 1).astype(p.dtype), state.swa["params"],
      state.params)
  return state.replace(swa=dict(state.swa, params=params, count=count + 1))


def recompute_batch_stats(model, params, batch_stats, batches) -> Any:
  """BatchNorm running statistics of `params`, averaged equally over `batches`.

  What `torch.optim.swa_utils.update_bn` does for an averaged model: the batch
  statistics of each batch (recovered from Flax's momentum update) are averaged
  with equal weights. `batches` yields float images in [0, 1].
  """
  momentum = 0.9  # fastadv_jax.models BatchNorm: PyTorch's 0.1
  zeros = jax.tree_util.tree_map(jnp.zeros_like, batch_stats)

  @jax.jit
  def batch_statistics(x):
    _, mutated = model.apply({"params": params, "batch_stats": zeros}, x, train=True,
                             mutable=["batch_stats"])
    return jax.tree_util.tree_map(lambda new: new / (1 - momentum), mutated["batch_stats"])

  total, n = None, 0
  for x in batches:
    stats = batch_statistics(x)
    total = stats if total is None else jax.tree_util.tree_map(jnp.add, total, stats)
    n += 1
  return jax.tree_util.tree_map(lambda t: t / n, total)


def _sync_batch_stats(state: TrainState) -> TrainState:
  """Averages per-device BatchNorm statistics (before evaluation and saving), under pmap."""
  return state.replace(batch_stats=jax.lax.pmean(state.batch_stats, AXIS))


# --------------------------------------------------------------------------
# Logging.


class MetricWriter:
  """JSON lines (metrics.jsonl) and TensorBoard events (tensorboardX), on host 0."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _jsonable(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _jsonable(v):
  if isinstance(v, (np.generic, jax.Array)):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()
  return v


def _truncate_metrics_log(path: str, last_step: int) -> None:
  """On resume, drops records written after the checkpoint we resume from."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [l for l in f if l.strip()]
  kept = [l for l in lines if json.loads(l).get("step", 0) <= last_step]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(kept)
  os.replace(tmp, path)


# --------------------------------------------------------------------------
# Config identity for resuming.

# Keys that may change between an interrupted run and its resumption.
_RESUME_FREE_KEYS = ("allow_config_change", "log_every_steps", "final_eval",
                     "eval.batch_size")


def _comparable(config_dict: dict) -> dict:
  d = json.loads(json.dumps(config_dict))
  for key in _RESUME_FREE_KEYS:
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
      node = node.get(p, {})
    node.pop(parts[-1], None)
  return d


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _config_diff(va, vb, prefix + k + ".")
    elif va != vb:
      out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
  return out


# --------------------------------------------------------------------------
# The loop.


class ArrayTrainData:
  """An in-memory training set (CIFAR-10/100, SVHN): one batch size throughout."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
    if len(images) < batch_size:
      raise ValueError(f"batch_size={batch_size} is larger than the training set "
                       f"({len(images)} examples).")
    self.images, self.labels = images, labels
    self.batch_size, self.seed = batch_size, seed

  def steps_in_epoch(self, epoch: int) -> int:
    del epoch
    return len(self.images) // self.batch_size

  def batch_size_at(self, epoch: int) -> int:
    del epoch
    return self.batch_size

  def image_shape_at(self, epoch: int) -> tuple[int, ...]:
    del epoch
    return tuple(self.images.shape[1:])

  @property
  def schedule_steps_per_epoch(self) -> int:
    return self.steps_in_epoch(0)

  def batches(self, epoch: int, start_step: int):
    return data_lib.train_batches(
        self.images, self.labels, batch_size=self.batch_size, seed=self.seed, epoch=epoch,
        start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count())


class ImageNetTrainData:
  """Streaming ImageNet with Wong et al.'s progressive resizing (config.imagenet_phases).

  Each phase has its own crop size and batch size, so the train step compiles
  once per phase.
  """

  def __init__(self, config):
    from fastadv_jax.data import imagenet  # pylint: disable=g-import-not-at-top
    self._imagenet = imagenet
    p = config.imagenet_phases
    ends = list(p.start_epochs[1:]) + [config.num_epochs]
    self.phases = tuple(
        imagenet.ResizePhase(int(s), int(e), int(c), int(b), int(r) if r else None)
        for s, e, c, b, r in zip(p.start_epochs, ends, p.crop_sizes, p.batch_sizes,
                                 p.resize_sizes))
    imagenet.check_phases(self.phases)
    self.seed = config.seed
    self.source = imagenet.imagenet_source("train", data_dir=config.data.data_dir or None)

  def phase(self, epoch: int):
    return self._imagenet.progressive_resize_phase(epoch, self.phases)

  def steps_in_epoch(self, epoch: int) -> int:
    return data_lib.steps_per_epoch(len(self.source), self.phase(epoch).batch_size)

  def batch_size_at(self, epoch: int) -> int:
    return self.phase(epoch).batch_size

  def image_shape_at(self, epoch: int) -> tuple[int, ...]:
    size = self.phase(epoch).image_size
    return (size, size, 3)

  @property
  def schedule_steps_per_epoch(self) -> tuple[int, ...]:
    return tuple(self.steps_in_epoch(p.start_epoch) for p in self.phases)

  def batches(self, epoch: int, start_step: int):
    return self._imagenet.train_batches(
        self.source, phase=self.phase(epoch), seed=self.seed, epoch=epoch,
        start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count())


def load_data(config):
  """(train data, (test images, test labels)): the training source and the evaluation set.

  In-memory datasets load whole; ImageNet streams its training set and decodes
  the first `max(eval.n, final_eval.n)` validation images (288 px centre crops).
  """
  if config.dataset == "imagenet2012":
    from fastadv_jax.data import imagenet  # pylint: disable=g-import-not-at-top
    train_data = ImageNetTrainData(config)
    val = imagenet.imagenet_source("validation", data_dir=config.data.data_dir or None)
    n = min(len(val), max(config.eval.n, config.final_eval.n))
    xs, ys = [], []
    for x, y, mask in imagenet.eval_batches(val, batch_size=config.eval.batch_size,
                                            image_size=config.imagenet_phases.eval_size,
                                            num_examples=n):
      xs.append(x[mask])
      ys.append(y[mask])
    return train_data, (np.concatenate(xs), np.concatenate(ys))
  kwargs = dict(source=config.data.source, data_dir=config.data.data_dir or None,
                local_path=config.data.local_path or None)
  train_images, train_labels = data_lib.load_split(config.dataset, "train", **kwargs)
  test_images, test_labels = data_lib.load_split(config.dataset, "test", **kwargs)
  if config.data.train_subset:
    train_images = train_images[:config.data.train_subset]
    train_labels = train_labels[:config.data.train_subset]
  return (ArrayTrainData(train_images, train_labels, config.batch_size, config.seed),
          (test_images, test_labels))


def _apply_adjustments(hparams: dict, adjust: dict) -> dict:
  hparams = dict(hparams)
  for name, adj in adjust.items():
    value = float(np.asarray(hparams[name]))
    if adj["op"] == "add":
      value += adj["value"]
    elif adj["op"] == "mul":
      value *= adj["value"]
    else:
      value = adj["value"]
    hparams[name] = np.float32(value)
  return hparams


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, max_steps: int | None = None, progress: bool = True
                       ) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its newest intact checkpoint.

  Args:
    config: a training config (see configs/ and config_base.base_config).
    workdir: where checkpoints, metrics.jsonl, TensorBoard events, plots and the
      final evaluation records go.
    max_steps: stop after this many steps in total (a budget for notebooks and
      tests; the schedule still spans the full config).
    progress: show tqdm progress bars.
  Returns:
    A summary dict: the final step, the last evaluation, the CO events, and the
    final PGD-50-10 records of the last and best states (when enabled).
  """
  devices = jax.local_devices()
  num_devices = len(devices)
  config_base.validate_config(config, num_devices * jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0

  train_data, (test_images, test_labels) = load_data(config)
  replays = config.free.replays
  # Iterations at which each epoch starts (AT for Free: replayed iterations).
  epoch_starts = np.concatenate([[0], np.cumsum(
      [train_data.steps_in_epoch(e) * replays for e in range(config.num_epochs)])])
  num_steps = int(epoch_starts[-1])
  if max_steps is not None:
    num_steps = min(num_steps, max_steps)
  steps_per_epoch = train_data.schedule_steps_per_epoch

  def epoch_of(step: int) -> int:
    return int(np.searchsorted(epoch_starts, step, side="right") - 1)

  def fractional_epoch(step: int) -> float:
    e = epoch_of(step)
    if e >= config.num_epochs:
      return float(config.num_epochs)
    return e + (step - epoch_starts[e]) / (epoch_starts[e + 1] - epoch_starts[e])

  def is_boundary(step: int, every: int) -> bool:
    """Every `every` steps, or at the end of each epoch when `every` is 0."""
    return step % every == 0 if every else step in epoch_starts

  model = create_model(config)
  eval_model = create_model(config, dtype="float32")
  tx = create_optimizer(config, steps_per_epoch)
  init_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), -1 % (2**31))
  state = create_train_state(config, model, tx, init_key, train_data.image_shape_at(0),
                             train_data.batch_size_at(0) // jax.process_count())

  config_dict = json.loads(config.to_json_best_effort())
  last_ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=config.keep_checkpoints)
  best_ckpt = checkpoints.Checkpointer(os.path.join(workdir, "best"), max_to_keep=1)
  co_monitor = monitor_lib.CatastrophicOverfittingMonitor(
      pgd_drop=config.co_monitor.pgd_drop, pgd_rel_drop=config.co_monitor.pgd_rel_drop,
      alignment_drop=config.co_monitor.alignment_drop,
      fgsm_over_clean=config.co_monitor.fgsm_over_clean)
  early = monitor_lib.EarlyStopping(drop=config.early_stopping.drop,
                                    stop_on_drop=config.early_stopping.stop_on_drop)
  meta_extra = {"rollbacks": 0, "stopped_early": False}

  restored = last_ckpt.restore(_state_dict(state))
  if restored is not None:
    step0, ckpt_state, meta = restored
    diff = _config_diff(_comparable(meta["config"]), _comparable(config_dict))
    if diff and not config.allow_config_change:
      raise ValueError(
          f"{workdir} holds a run with a different config ({'; '.join(diff[:10])}). "
          f"Use another --workdir, or pass --config.allow_config_change=True to resume "
          f"with the new config.")
    state = state.replace(**ckpt_state)
    co_monitor = monitor_lib.CatastrophicOverfittingMonitor.from_state_dict(meta["co_monitor"])
    early = monitor_lib.EarlyStopping.from_state_dict(meta["early_stopping"])
    meta_extra = meta["extra"]
    print(f"Resumed from {last_ckpt.directory} at step {step0}.", flush=True)
    if is_main:
      _truncate_metrics_log(os.path.join(workdir, "metrics.jsonl"), step0)
  elif is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_dict, f, indent=2)

  writer = MetricWriter(workdir, enabled=is_main)
  train_step = make_train_step(config, model, tx, steps_per_epoch)
  p_train_step = jax.pmap(train_step, axis_name=AXIS, donate_argnums=(0,))
  p_eval_step = jax.pmap(make_eval_step(config, eval_model), axis_name=AXIS)
  p_es_step = jax.pmap(make_pgd_step(config, eval_model, config.early_stopping.pgd_steps,
                                     1, "strict"), axis_name=AXIS)

  r_state = to_devices(state, devices)
  p_sync = jax.pmap(_sync_batch_stats, axis_name=AXIS, donate_argnums=(0,))
  p_swa = jax.pmap(_swa_update, axis_name=AXIS, donate_argnums=(0,))
  lr_fn = create_learning_rate_fn(config, steps_per_epoch)

  eval_n = min(config.eval.n, len(test_images))
  eval_x, eval_y = test_images[:eval_n], test_labels[:eval_n]
  if config.early_stopping.enabled:
    es_x, es_y = next(iter(train_data.batches(0, 0))) if isinstance(
        train_data, ImageNetTrainData) else (train_data.images, train_data.labels)
    es_x, es_y = es_x[:config.early_stopping.n_points], es_y[:config.early_stopping.n_points]
  eval_key = jax.random.PRNGKey(config.seed + 2)

  def save(step: int, r_state, checkpointer, extra_meta=None):
    meta = {"config": config_dict, "co_monitor": co_monitor.state_dict(),
            "early_stopping": early.state_dict(), "extra": meta_extra,
            "epoch": fractional_epoch(step)}
    meta.update(extra_meta or {})
    checkpointer.save(step, _state_dict(to_host(r_state)), meta)

  def variables_of(r_state):
    return {"params": r_state.params, "batch_stats": r_state.batch_stats} \
        if jax.tree_util.tree_leaves(r_state.batch_stats) else {"params": r_state.params}

  def check_finite(loss: float, step: int) -> None:
    if not np.isfinite(loss):
      # Stop before the diverged state reaches a checkpoint: the saved ones
      # stay intact, to resume from with a smaller learning rate.
      raise FloatingPointError(
          f"Training loss is {loss} at step {step} (learning rate "
          f"{float(lr_fn(step - 1)):.4g}); stopping. The checkpoints in {workdir} are "
          f"from before the divergence.")

  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  step = int(np.asarray(state.step))
  bar = tqdm(total=num_steps, initial=step, disable=not (progress and is_main),
             desc="train", unit="step", dynamic_ncols=True)
  last_eval: dict[str, Any] = {}
  train_t0 = time.time()
  while step < num_steps and not meta_extra["stopped_early"]:
    epoch = epoch_of(step)
    in_epoch = (step - int(epoch_starts[epoch])) // replays
    global_batch = train_data.batch_size_at(epoch)
    per_host_batch = global_batch // jax.process_count()
    per_device_batch = per_host_batch // num_devices
    rolled_back = False
    for images, labels in train_data.batches(epoch, in_epoch):
      # The example's position in the epoch keys its augmentation.
      idx = (in_epoch * global_batch + jax.process_index() * per_host_batch +
             np.arange(per_host_batch)).astype(np.int32)
      in_epoch += 1
      batch = {"image": images, "label": labels.astype(np.int32), "index": idx}
      batch = jax.tree_util.tree_map(
          lambda a: a.reshape((num_devices, per_device_batch) + a.shape[1:]), batch)
      for _ in range(replays - step % replays):
        r_state, train_metrics = p_train_step(r_state, batch)
        step += 1
        bar.update(1)
        if step % config.log_every_steps == 0 or step == num_steps:
          tm = jax.device_get(unreplicate(train_metrics))
          tm = {k: float(v) for k, v in tm.items()}
          check_finite(tm["train/loss"], step)
          tm["train/lr"] = float(lr_fn(step - 1))
          tm["epoch"] = fractional_epoch(step)
          writer.write(step, tm)
          bar.set_postfix(loss=f"{tm['train/loss']:.3f}", acc=f"{tm['train/adv_acc']:.3f}")
        do_eval = is_boundary(step, config.eval_every_steps) or step == num_steps
        do_es = (config.early_stopping.enabled and
                 step % config.early_stopping.every_steps == 0)
        do_ckpt = is_boundary(step, config.checkpoint_every_steps) or step == num_steps
        if config.swa.enabled and step in epoch_starts and epoch_of(step) > config.swa.start_epoch:
          r_state = p_swa(r_state)
        if do_eval or do_es or do_ckpt:
          check_finite(float(unreplicate(train_metrics)["train/loss"]), step)
          r_state = p_sync(r_state)
        if do_es:
          es = run_eval(p_es_step, variables_of(r_state), es_x, es_y,
                        config.eval.batch_size, jax.random.fold_in(eval_key, step),
                        num_devices)
          is_best, stop = early.update(step, es["pgd_acc"])
          writer.write(step, {"early_stopping/pgd_acc": es["pgd_acc"],
                              "early_stopping/clean_acc": es["clean_acc"]})
          if is_best:
            save(step, r_state, best_ckpt, {"early_stopping_acc": es["pgd_acc"]})
          if stop:
            meta_extra["stopped_early"] = True
            print(f"Early stopping at step {step} (PGD accuracy dropped).", flush=True)
        if do_eval:
          ev = run_eval(p_eval_step, variables_of(r_state), eval_x, eval_y,
                        config.eval.batch_size, jax.random.fold_in(eval_key, step),
                        num_devices)
          last_eval = {f"eval/{k}": v for k, v in ev.items()}
          last_eval["epoch"] = fractional_epoch(step)
          writer.write(step, last_eval)
          if not config.early_stopping.enabled and (
              early.update(step, ev["pgd_acc"])[0]):
            save(step, r_state, best_ckpt, {"eval": ev})
          event = co_monitor.update(step, ev) if config.co_monitor.enabled else None
          if event is not None:
            writer.write(step, {"co/detected": 1, **{f"co/{k}": v for k, v in event.items()}})
            tqdm.write(f"Catastrophic overfitting detected at step {step}: PGD accuracy "
                       f"{event['pgd_acc']:.3f} (best {event['best_pgd_acc']:.3f} at step "
                       f"{event['best_step']}), FGSM accuracy {event['fgsm_acc']:.3f}.")
            if (config.co_monitor.rollback and
                meta_extra["rollbacks"] < config.co_monitor.max_rollbacks and
                best_ckpt.all_steps()):
              r_state, step = _rollback(config, best_ckpt, state, devices)
              meta_extra["rollbacks"] += 1
              meta_extra.setdefault("adjusted_hparams", []).append(
                  {k: float(np.asarray(v)) for k, v in unreplicate(
                      jax.device_get(r_state.hparams)).items()})
              co_monitor.best, co_monitor.collapsed = None, False
              bar.n = step
              bar.refresh()
              save(step, r_state, last_ckpt)
              rolled_back = True
              break
        if do_ckpt:
          save(step, r_state, last_ckpt)
        if step >= num_steps or meta_extra["stopped_early"]:
          break
      if rolled_back or step >= num_steps or meta_extra["stopped_early"]:
        break
  bar.close()
  train_seconds = time.time() - train_t0
  finished = step >= int(epoch_starts[-1]) or meta_extra["stopped_early"]
  if finished and config.swa.enabled:
    r_state = _finalize_swa(config, eval_model, train_data, r_state, devices)
  save(step, r_state, last_ckpt)

  summary: dict[str, Any] = {"step": step, "last_eval": last_eval,
                             "co_events": co_monitor.events,
                             "stopped_early": meta_extra["stopped_early"],
                             "rollbacks": meta_extra["rollbacks"],
                             "train_seconds_this_session": train_seconds}
  if config.final_eval.enabled and finished:
    summary["final_eval"] = final_evaluation(config, workdir, last_ckpt, best_ckpt,
                                             (test_images, test_labels), progress)
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2, default=_jsonable)
    try:
      from fastadv_jax import plotting  # pylint: disable=g-import-not-at-top
      plotting.plot_training_curves(workdir)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Could not plot training curves: %s", e)
  writer.close()
  last_ckpt.close()
  best_ckpt.close()
  return summary


def _finalize_swa(config, model, train_data, r_state, devices) -> TrainState:
  """Recomputes the averaged model's BatchNorm statistics on training batches."""
  host = to_host(r_state)
  if not jax.tree_util.tree_leaves(host.swa["batch_stats"]):
    return r_state

  def batches():
    for i, (images, _) in enumerate(train_data.batches(0, 0)):
      if i >= config.swa.bn_batches:
        break
      yield data_lib.to_float(images)

  stats = recompute_batch_stats(model, host.swa["params"], host.swa["batch_stats"], batches())
  return to_devices(host.replace(swa=dict(host.swa, batch_stats=stats)), devices)


def _rollback(config, best_ckpt, template_state, devices):
  """Restores the best state and applies the configured hyperparameter changes."""
  step, restored, _ = best_ckpt.restore(_state_dict(template_state))
  restored["hparams"] = _apply_adjustments(
      restored["hparams"], {k: dict(v) for k, v in config.co_monitor.adjust.items()})
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  tqdm.write(f"Rolled back to step {step}; tunable settings now "
             f"{ {k: float(np.asarray(v)) for k, v in restored['hparams'].items()} }.")
  return to_devices(template_state.replace(**restored), devices), int(step)


def final_evaluation(config, workdir, last_ckpt, best_ckpt, test_data, progress=True
                     ) -> dict[str, Any]:
  """PGD-k-r (config.final_eval) of the last and the best state; records as JSON."""
  from fastadv_jax import evaluate  # pylint: disable=g-import-not-at-top
  results = {}
  candidates = [("last", last_ckpt), ("best", best_ckpt)]
  if config.swa.enabled:
    candidates.append(("swa", last_ckpt))
  for which, ckpt in candidates:
    if not ckpt.all_steps():
      continue
    model, variables, _ = restore_for_eval(workdir, which)
    # Weights as arguments, not baked-in constants: one compile for every state.
    logits_fn = evaluate.model_logits_fn(model, variables)
    record = evaluate.evaluate(
        logits_fn, test_data[0], test_data[1], config.seed, attack="pgd",
        eps=config_base.eps_pixels(config), n=config.final_eval.n, selection="first",
        steps=config.final_eval.steps, restarts=config.final_eval.restarts,
        rule=config.final_eval.rule, batch_size=config.final_eval.batch_size,
        dataset=config.dataset, progress=progress)
    record["checkpoint"] = which
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    evaluate.save_record(record, os.path.join(
        workdir, "eval", f"final_{which}_pgd{config.final_eval.steps}-"
        f"{config.final_eval.restarts}.json"))
    results[which] = record
  return results


def restore_for_eval(workdir: str, which: str = "best"):
  """Loads (model, variables, config) of the `which` state of a run.

  `which`: "best" (best monitored PGD accuracy), "last", or "swa" (the weight
  average of the last checkpoint, when the run used config.swa).

  The model is built in float32 for evaluation. Raises FileNotFoundError when the
  work directory has no such checkpoint, ValueError when none can be read.
  """
  if which not in ("best", "last", "swa"):
    raise ValueError(f"Unknown checkpoint {which!r}; choose one of ['best', 'last', 'swa'].")
  directory = os.path.join(workdir, "best" if which == "best" else "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f"No {which!r} checkpoint in {workdir!r}: {directory} does not exist. Is this "
        f"the --workdir of a fastadv-train run?")
  ckpt = checkpoints.Checkpointer(directory, max_to_keep=None)
  found = ckpt.restore_meta()
  if found is None:
    raise FileNotFoundError(f"No {which!r} checkpoint in {directory}.")
  _, meta = found
  config = ml_collections.ConfigDict(meta["config"])
  model = create_model(config, dtype="float32")
  # No template: orbax returns the saved arrays as nested dicts, whatever the
  # optimizer state or the AT-for-Free buffer looked like.
  full = ckpt.restore(None)
  ckpt.close()
  if full is None:
    raise FileNotFoundError(f"No {which!r} checkpoint in {directory}.")
  restored = full[1]
  if which == "swa":
    if not restored.get("swa"):
      raise ValueError(f"The run in {workdir!r} did not use SWA (config.swa.enabled).")
    restored = restored["swa"]
  variables = {"params": restored["params"]}
  if jax.tree_util.tree_leaves(restored.get("batch_stats", {})):
    variables["batch_stats"] = restored["batch_stats"]
  return model, variables, config

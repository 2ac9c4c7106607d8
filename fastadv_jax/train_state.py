"""The train state, the model, the optimizer and their placement on devices.

Layout after flax `examples/imagenet` (`create_train_state`): small functions a
notebook can call one by one. The state is checkpointed unreplicated (one copy,
independent of the device count); `to_devices` / `to_host` place it for the
per-device step and back. `DeviceMap` runs a per-device function on every
device, through `jax.pmap` or through `jax.shard_map` over a one-axis mesh of
all devices of all processes (`config.parallel`); both see the same
per-device arrays, so the step is written once.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import inspect
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fastadv_jax import models
from fastadv_jax import schedules

AXIS = "batch"


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes. Checkpointed unreplicated."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  # Traced hyperparameters (regularizer weights, ZeroGrad q, ...), see
  # methods.Method.initial_hparams: the monitor may change them.
  hparams: dict[str, jax.Array]
  # A carried perturbation (AT for Free; shape of the host batch), a scalar
  # placeholder for stateless attacks.
  attack_state: jax.Array
  # Stochastic weight averaging (AdvLC's "+SWA" rows): {"params", "batch_stats",
  # "count"} when config.swa.enabled, else {}.
  swa: dict[str, Any]


def model_variables(params, batch_stats) -> dict[str, Any]:
  """The variables dict of a model with or without BatchNorm statistics."""
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def create_model(config, *, dtype: str | None = None):
  """The model of `config`; `dtype` overrides the compute dtype (evaluation:
  float32; `closures.eval_logits_fn` adds the CPU backend's im2col stem)."""
  dtype = jnp.dtype(dtype or config.dtype)
  return models.get_model(config.model.name, num_classes=config.num_classes,
                          dtype=dtype, **dict(config.model.kwargs))


def total_steps(config, steps_per_epoch: int) -> int:
  """Train steps of the whole run (AT for Free: every replay is a step)."""
  return int(config.num_epochs * steps_per_epoch)


def create_learning_rate_fn(config, steps_per_epoch: int) -> optax.Schedule:
  """The per-iteration learning-rate schedule named by `config.schedule`.

  `schedule.lr_max` is passed as the schedule's peak / initial value, the run's
  total number of steps and steps per epoch where the schedule takes them, and
  keyword arguments given in epochs (`boundary_epochs`, `drop_epoch`) are
  converted to steps. An epoch is `steps_per_epoch` train steps; with AT for
  Free's replays a pass over the data is `replays` epochs, so the schedule
  spans exactly the steps run (GradAlign's Free: 96 x 390 = 37,440).
  """
  kwargs = dict(config.schedule.kwargs)
  fn = schedules.SCHEDULES[config.schedule.name]
  accepted = inspect.signature(fn).parameters
  iters_per_epoch = steps_per_epoch
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


def create_train_state(config, method, model, tx, key, image_shape, host_batch: int
                       ) -> TrainState:
  """Initial (unreplicated) state; a carried perturbation has the host batch shape."""
  variables = models.init_variables(model, key, image_shape)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  if method.attack.spec.carried is not None:
    attack_state = jnp.zeros((host_batch,) + tuple(image_shape), jnp.float32)
  else:
    attack_state = jnp.zeros((), jnp.float32)
  swa = {}
  if config.swa.enabled:
    swa = {"params": jax.tree_util.tree_map(jnp.copy, params),
           "batch_stats": jax.tree_util.tree_map(jnp.copy, batch_stats),
           "count": jnp.int32(0)}
  return TrainState(step=jnp.int32(0), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), hparams=method.initial_hparams(),
                    attack_state=attack_state, swa=swa)


# --------------------------------------------------------------------------
# Placement on devices.


PARALLEL_MODES = ("pmap", "shard_map")


def _shard_leading_axis(tree, devices):
  """Places arrays whose leading axis has one entry per local device, one per device.

  `devices`: a list of local devices (pmap's layout; the mesh axis is named like
  pmap's, AXIS, so a state placed here has the very sharding a pmapped step
  returns and the step is not traced again for it), or a `jax.sharding.Mesh`
  of all processes' devices: then each leaf becomes one global array whose
  rows are every process's local rows (`jax.make_array_from_process_local_data`).
  """
  if isinstance(devices, jax.sharding.Mesh):
    sharding = jax.sharding.NamedSharding(devices, jax.sharding.PartitionSpec(AXIS))
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)),
                                        jax.sharding.PartitionSpec(AXIS))
  return jax.device_put(tree, sharding)


def _num_local(devices) -> int:
  if isinstance(devices, jax.sharding.Mesh):
    return sum(d.process_index == jax.process_index() for d in devices.devices.flat)
  return len(devices)


def local_rows(a) -> np.ndarray:
  """This process's rows of an array with one leading entry per device, as NumPy.

  A global array spanning several processes (the shard_map path) is read from
  its addressable shards only, in device order.
  """
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    shards = sorted(a.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])
  return np.asarray(jax.device_get(a))


def _stack_copies(tree, n: int):
  """`n` copies of every leaf along a new leading axis (host arrays, no copy made)."""
  return jax.tree_util.tree_map(lambda a: np.broadcast_to(np.asarray(a), (n,) + np.shape(a)),
                                tree)


def replicate(tree, devices):
  """One copy of every leaf per device, placed as a mapped step returns it."""
  return _shard_leading_axis(_stack_copies(tree, _num_local(devices)), devices)


def to_devices(state: TrainState, devices) -> TrainState:
  """Replicates the state; a carried perturbation is split across devices.

  `devices`: local devices (pmap) or the mesh of all devices (shard_map).
  """
  n = _num_local(devices)
  free = np.asarray(state.attack_state)
  stacked = _stack_copies(state.replace(attack_state=np.zeros((), np.float32)), n)
  if free.ndim:
    stacked = stacked.replace(attack_state=free.reshape((n, -1) + free.shape[1:]))
  return _shard_leading_axis(stacked, devices)


def to_host(r_state: TrainState) -> TrainState:
  """The unreplicated host copy of a replicated state (inverse of `to_devices`).

  A carried perturbation comes back as this process's part of it.
  """
  host = jax.tree_util.tree_map(local_rows, r_state)
  free = np.asarray(host.attack_state)
  free = free.reshape((-1,) + free.shape[2:]) if free.ndim > 1 else free[0]
  single = jax.tree_util.tree_map(lambda a: np.asarray(a[0]), host.replace(attack_state=free[None]))
  return single.replace(attack_state=free)


class DeviceMap:
  """Runs a per-device function on every device: `jax.pmap` or `jax.shard_map`.

  The function is written once, for one device's arrays, with collectives over
  the axis AXIS (`lax.pmean(grads, AXIS)`); its arguments and results carry a
  leading axis of one entry per device, as under `jax.pmap`. With "shard_map"
  the arrays are global `jax.Array`s over a one-axis mesh of `jax.devices()`
  (process order), each process holding its devices' rows.

  Attributes:
    mode: "pmap" or "shard_map".
    placement: what `to_devices` and `place` take (local devices, or the mesh).
  """

  def __init__(self, mode: str = "pmap"):
    if mode not in PARALLEL_MODES:
      raise ValueError(f"Unknown parallel mode {mode!r}; choose one of {PARALLEL_MODES}.")
    self.mode = mode
    if mode == "pmap":
      self.placement = jax.local_devices()
    else:
      self.placement = jax.sharding.Mesh(np.array(jax.devices()), (AXIS,))

  @property
  def num_local_devices(self) -> int:
    return _num_local(self.placement)

  def place(self, tree):
    """Per-device rows (leading axis: local devices) placed for the mapped function."""
    if self.mode == "pmap":
      return tree  # pmap splits host arrays over its devices itself
    return _shard_leading_axis(tree, self.placement)

  def __call__(self, fn, donate_first: bool = True):
    """`fn` mapped over devices; the first argument's buffers are donated."""
    donate = (0,) if donate_first else ()
    if self.mode == "pmap":
      return jax.pmap(fn, axis_name=AXIS, donate_argnums=donate)
    spec = jax.sharding.PartitionSpec(AXIS)

    def per_device(*args):
      out = fn(*jax.tree_util.tree_map(lambda a: a[0], args))
      return jax.tree_util.tree_map(lambda a: a[None], out)

    mapped = jax.jit(jax.shard_map(per_device, mesh=self.placement, in_specs=spec,
                                   out_specs=spec), donate_argnums=donate)
    return lambda *args: mapped(*(self.place(a) if i else a for i, a in enumerate(args)))


def unreplicate(tree):
  """The first local device's copy of every leaf (NumPy)."""
  return jax.tree_util.tree_map(lambda a: local_rows(a)[0], tree)


def state_dict(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state, "hparams": state.hparams,
          "attack_state": state.attack_state, "swa": state.swa}


def swa_update(state: TrainState) -> TrainState:
  """Adds the current weights to the equal-weight running average (Izmailov et al. 2018)."""
  count = state.swa["count"]
  params = jax.tree_util.tree_map(
      lambda avg, p: avg + (p - avg) / (count + 1).astype(p.dtype), state.swa["params"],
      state.params)
  return state.replace(swa=dict(state.swa, params=params, count=count + 1))


def batch_statistics(model, params, batch_stats, x) -> Any:
  """The BatchNorm statistics of one batch `x` (float images in [0, 1]) under `params`.

  Recovered from Flax's momentum update of zero running statistics; the mean
  of these over batches is what `torch.optim.swa_utils.update_bn` (and the
  AdvLC code's `bn_update`, src/utils/swa.py) sets for an averaged model.
  """
  zeros = jax.tree_util.tree_map(jnp.zeros_like, batch_stats)
  _, mutated = model.apply({"params": params, "batch_stats": zeros}, x, train=True,
                           mutable=["batch_stats"])
  momentum = models.common.BN_MOMENTUM  # the weight of the old running statistics
  return jax.tree_util.tree_map(lambda new: new / (1 - momentum), mutated["batch_stats"])


def sync_batch_stats(state: TrainState) -> TrainState:
  """Averages per-device BatchNorm statistics (before evaluation and saving), under pmap."""
  return state.replace(batch_stats=jax.lax.pmean(state.batch_stats, AXIS))

"""The training loop: `train_and_evaluate(config, workdir)`.

Layout after flax `examples/imagenet`, one job per module:

* `train_state`: the state, the model, the optimizer, device placement;
* `train_step`: the per-device step built from a `methods.Method`;
* `train` (this module): the loop (restore, train, evaluate, checkpoint,
  monitor) and the training data;
* `restore`: restoring a trained state for evaluation.

The config is validated and turned into a method once, before anything is
written (`config_base.validate_config`). Evaluations during training are named
in `config.evals` and run by the one evaluation engine
(`evaluate.robustness_metrics`): robust accuracy everywhere means correct on
the clean and on the adversarial input. `config.best` names the evaluation and
metric that choose the best checkpoint (and stop early, with stop_on_drop);
`config.co_monitor.eval` the one the catastrophic-overfitting monitor reads.

Steps and epochs: an epoch is `steps_in_epoch` train steps. An attack with
replays (AT for Free) uses each minibatch for `replays` consecutive steps, so
a pass over the data spans `replays` epochs and the learning-rate schedule
spans exactly the steps run.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from fastadv_jax import _checks
from fastadv_jax import checkpoints
from fastadv_jax import closures
from fastadv_jax import config_base
from fastadv_jax import data as data_lib
from fastadv_jax import evaluate
from fastadv_jax import methods
from fastadv_jax import monitor as monitor_lib
from fastadv_jax import plotting
from fastadv_jax import restore
from fastadv_jax import train_state as state_lib
from fastadv_jax import train_step as step_lib
from fastadv_jax import workdir as workdir_lib


# --------------------------------------------------------------------------
# Config identity for resuming.

# Keys that may change between an interrupted run and its resumption.
_RESUME_FREE_KEYS = ("allow_config_change", "log_every_steps", "final_eval", "parallel")


def _comparable(config_dict: dict) -> dict:
  d = json.loads(json.dumps(config_dict))
  for key in _RESUME_FREE_KEYS:
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
      node = node.get(p, {})
    node.pop(parts[-1], None)
  return d


_MISSING = "<missing>"


def _config_diff(a: dict, b: dict, defaults: dict, prefix: str = "") -> list[str]:
  out = []
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k, _MISSING), b.get(k, _MISSING)
    path = prefix + k
    if isinstance(va, dict) and isinstance(vb, dict):
      out += _config_diff(va, vb, defaults, path + ".")
    elif va != vb and not (_MISSING in (va, vb) and path in defaults
                           and defaults[path] in (va, vb)):
      out.append(f"{path}: {va!r} -> {vb!r}")
  return out


def config_changes(stored: dict, config: ml_collections.ConfigDict) -> list[str]:
  """What differs between a workdir's stored config and `config`, "path: old -> new".

  Keys free to change on resumption (`_RESUME_FREE_KEYS`) are ignored, and so is
  a keyword one side lacks while the other sets it to the default of the
  function it is passed to (`methods.keyword_defaults`): a run written before
  the library added the keyword ran with that default.
  """
  current = json.loads(config.to_json_best_effort())
  return _config_diff(_comparable(stored), _comparable(current),
                      methods.keyword_defaults(config))


# --------------------------------------------------------------------------
# The loop.


# The console line's label of each evaluation metric (pgd_acc is labelled with
# its step count). The accuracy at the FGSM point is in metrics.jsonl only.
EVAL_LINE_LABELS = {"clean_acc": "clean", "fgsm_acc": "FGSM", "grad_alignment": "align",
                    "cos_fgsm_pgd": "cos(FGSM,PGD)", "input_grad_l1": "IG",
                    "hessian_top": "Hessian top"}


class ArrayTrainData:
  """An in-memory training set (CIFAR-10/100, SVHN): one batch size throughout."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int,
               validation: tuple[np.ndarray, np.ndarray] | None = None):
    if len(images) < batch_size:
      raise ValueError(f"batch_size={batch_size} is larger than the training set "
                       f"({len(images)} examples).")
    self.images, self.labels = images, labels
    # Held-out training examples (config.data.validation_size), never trained on.
    self.validation = (images[:0], labels[:0]) if validation is None else validation
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


def load_data(config, progress: bool = True):
  """(train data, (test images, test labels)): the training source and the evaluation set.

  In-memory datasets load whole; ImageNet streams its training set and decodes
  the first validation images the evaluations need (288 px centre crops).
  """
  if config.dataset == "imagenet2012":
    if config.data.validation_size:
      raise ValueError("data.validation_size holds out examples of in-memory datasets only; "
                       "ImageNet runs select models on its validation set's evaluations.")
    from fastadv_jax.data import imagenet  # pylint: disable=g-import-not-at-top
    train_data = ImageNetTrainData(config)
    val = imagenet.imagenet_source("validation", data_dir=config.data.data_dir or None)
    n = min(len(val), max([config.final_eval.n] + [
        e.n for e in config.evals.values() if e.split == "test"]))
    xs, ys = [], []
    for x, y, mask in imagenet.eval_batches(val, batch_size=config.final_eval.batch_size,
                                            image_size=config.imagenet_phases.eval_size,
                                            num_examples=n):
      xs.append(x[mask])
      ys.append(y[mask])
    return train_data, (np.concatenate(xs), np.concatenate(ys))
  kwargs = dict(source=config.data.source, data_dir=config.data.data_dir or None,
                local_path=config.data.local_path or None, progress=progress)
  train_images, train_labels = data_lib.load_split(config.dataset, "train", **kwargs)
  test_images, test_labels = data_lib.load_split(config.dataset, "test", **kwargs)
  held_out = config.data.validation_size
  if held_out >= len(train_images):
    raise ValueError(f"data.validation_size={held_out} leaves no training examples (the "
                     f"{config.dataset} training set has {len(train_images)}).")
  validation = (train_images[len(train_images) - held_out:],
                train_labels[len(train_images) - held_out:])
  train_images = train_images[:len(train_images) - held_out]
  train_labels = train_labels[:len(train_labels) - held_out]
  if config.data.train_subset:
    train_images = train_images[:config.data.train_subset]
    train_labels = train_labels[:config.data.train_subset]
  return (ArrayTrainData(train_images, train_labels, config.batch_size, config.seed,
                        validation), (test_images, test_labels))


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




def make_augment(config):
  """`augment(images, example_indices, key)`: per-example crop/flip keyed by the
  example's index in the epoch (independent of the device count)."""
  aug = functools.partial(data_lib.augment, padding=config.augment.padding,
                          pad_mode=config.augment.pad_mode, flip=config.augment.flip,
                          rotation_degrees=config.augment.rotation)

  def augment(images, indices, key):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    return jax.vmap(lambda im, k: aug(im[None], k)[0])(images, keys)

  return augment


_SWA_KEY = 0x5357  # folds the augmentation key of SWA's BatchNorm pass apart from training's


def _swa_batch_statistics(model, augment, seed: int, state: state_lib.TrainState, batch):
  """One device's part of a batch's BatchNorm statistics for SWA's averaged weights,
  averaged over devices; augmented with a key of its own (the state's step)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _SWA_KEY), state.step)
  x = augment(batch["image"], batch["index"], key)
  stats = state_lib.batch_statistics(model, state.swa["params"], state.swa["batch_stats"], x)
  return jax.lax.pmean(stats, state_lib.AXIS)


class _Run:
  """One training run in a workdir: its state, data, evaluations and records.

  `train_and_evaluate` is the sequence restore -> (train steps -> events) ->
  finish; the events at a step are, in order: logging, SWA, evaluations
  (best checkpoint, early stopping, the catastrophic-overfitting monitor and
  its rollback) and the checkpoint.
  """

  def __init__(self, config, method, workdir: str, progress: bool):
    self.config, self.method = config, method
    self.workdir, self.progress = workdir, progress
    self.device_map = state_lib.DeviceMap(config.parallel)
    self.is_main = jax.process_index() == 0
    self.train_data, self.test_data = load_data(config, progress)
    if isinstance(self.train_data, ArrayTrainData):
      config_base.check_sizes(config, len(self.train_data.images), len(self.test_data[0]),
                              len(self.train_data.validation[0]))
    self.replays = self.method.attack.replays
    # Step at which each epoch starts; also the first batch of each data epoch.
    self.epoch_starts = np.concatenate([[0], np.cumsum(
        [self.train_data.steps_in_epoch(e) for e in range(config.num_epochs)])])
    self.num_steps = int(self.epoch_starts[-1])
    steps_per_epoch = self.train_data.schedule_steps_per_epoch
    self.model = state_lib.create_model(config)
    self.eval_model = state_lib.create_model(config, dtype="float32")
    self.tx = state_lib.create_optimizer(config, steps_per_epoch)
    self.lr_fn = state_lib.create_learning_rate_fn(config, steps_per_epoch)
    init_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), -1 % (2**31))
    self.initial_state = state_lib.create_train_state(
        config, self.method, self.model, self.tx, init_key,
        self.train_data.image_shape_at(0),
        self.train_data.batch_size_at(0) // jax.process_count())
    self.config_dict = json.loads(config.to_json_best_effort())
    self.last_ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                              max_to_keep=config.keep_checkpoints)
    self.best_ckpt = checkpoints.Checkpointer(os.path.join(workdir, "best"), max_to_keep=1)
    mon = config.co_monitor
    self.co_monitor = monitor_lib.CatastrophicOverfittingMonitor(
        pgd_drop=mon.pgd_drop, pgd_rel_drop=mon.pgd_rel_drop,
        alignment_drop=mon.alignment_drop, fgsm_over_clean=mon.fgsm_over_clean)
    self.best = monitor_lib.EarlyStopping(drop=config.best.drop,
                                          stop_on_drop=config.best.stop_on_drop)
    self.extra = {"rollbacks": 0, "stopped_early": False}
    self.seconds: dict[str, float] = {}  # wall time by activity, this session (`timed`)
    self.evals = evaluate.resolve_evals(config.evals)
    self.last_eval: dict[str, Any] = {}
    train_step = step_lib.make_train_step(
        self.model, self.tx, self.method, steps_per_epoch=steps_per_epoch,
        seed=config.seed, augment=make_augment(config))
    self.p_train_step = self.device_map(train_step)
    self.p_sync = self.device_map(state_lib.sync_batch_stats)
    self.p_swa = self.device_map(state_lib.swa_update)
    self.p_swa_batch_stats = self.device_map(
        functools.partial(_swa_batch_statistics, self.eval_model, make_augment(config),
                          config.seed), donate_first=False)

  # -- epochs and periods ---------------------------------------------------

  def epoch_of(self, step: int) -> int:
    return int(np.searchsorted(self.epoch_starts, step, side="right") - 1)

  def fractional_epoch(self, step: int) -> float:
    e = self.epoch_of(step)
    if e >= self.config.num_epochs:
      return float(self.config.num_epochs)
    starts = self.epoch_starts
    return e + (step - starts[e]) / (starts[e + 1] - starts[e])

  def is_due(self, step: int, every_steps: int, every_epochs: int = 1) -> bool:
    """Every `every_steps` steps, else every `every_epochs` epochs (0: never)."""
    if every_steps:
      return step % every_steps == 0
    return bool(every_epochs) and step in self.epoch_starts and (
        self.epoch_of(step) % every_epochs == 0)

  # -- stochastic weight averaging -------------------------------------------

  def swa_due(self, step: int) -> bool:
    """Whether the weights after `step` steps join the average (config.swa).

    The AdvLC code (src/utils/train.py l.233) averages after iteration i of
    every epoch from `swa_start` on where i % swa_freq == 0.
    """
    swa = self.config.swa
    if not swa.enabled or step == 0:
      return False
    epoch = self.epoch_of(step - 1)
    in_epoch = step - 1 - int(self.epoch_starts[epoch])
    return epoch >= swa.start_epoch and (in_epoch % swa.every_steps == 0 if swa.every_steps
                                         else in_epoch == 0)

  def swa_batch_stats(self, step: int, r_state):
    """The averaged weights' BatchNorm statistics, re-estimated on the training data.

    The mean of their batch statistics over the augmented batches of the
    current epoch (`swa.bn_batches` of them, 0: all): the AdvLC code's
    `bn_update` (src/utils/swa.py), one pass of its augmented loader.
    """
    if not jax.tree_util.tree_leaves(r_state.swa["batch_stats"]):
      return r_state
    epoch = min(self.epoch_of(max(step - 1, 0)), self.config.num_epochs - 1)
    count = self.train_data.steps_in_epoch(epoch)
    if self.config.swa.bn_batches:
      count = min(count, self.config.swa.bn_batches)
    batches = self.device_batches(int(self.epoch_starts[epoch]) * self.replays)
    total = None
    for batch in itertools.islice(batches, count):
      stats = state_lib.unreplicate(self.p_swa_batch_stats(r_state, batch))
      total = stats if total is None else jax.tree_util.tree_map(np.add, total, stats)
    mean = jax.tree_util.tree_map(lambda t: t / count, total)
    return r_state.replace(swa=dict(
        r_state.swa, batch_stats=state_lib.replicate(mean, self.device_map.placement)))

  # -- restore --------------------------------------------------------------

  def restore(self) -> state_lib.TrainState:
    """The newest intact checkpoint's state (and monitors), or the initial state.

    The metrics log keeps the records up to the restored step (none on a fresh
    start), and config.json always describes the run that continues.
    """
    state = self.initial_state
    metrics_path = os.path.join(self.workdir, workdir_lib.METRICS_NAME)
    self.last_ckpt.recover()  # collective: process 0 repairs, the others wait
    self.best_ckpt.recover()
    restored = self.last_ckpt.restore(state_lib.state_dict(state))
    if restored is None:
      if self.is_main:
        workdir_lib.truncate_records(metrics_path, 0)
        workdir_lib.write_json(os.path.join(self.workdir, "config.json"), self.config_dict)
      return state
    step0, ckpt_state, meta = restored
    diff = config_changes(meta["config"], self.config)
    if diff and not self.config.allow_config_change:
      raise ValueError(
          f"{self.workdir} holds a run with a different config ({'; '.join(diff[:10])}). "
          f"Use another --workdir, or pass --config.allow_config_change=True to resume "
          f"with the new config.")
    self.co_monitor = monitor_lib.CatastrophicOverfittingMonitor.from_state_dict(
        meta["co_monitor"])
    self.best = monitor_lib.EarlyStopping.from_state_dict(meta["best"])
    self.extra = meta["extra"]
    print(f"Resumed from {self.last_ckpt.directory} at step {step0}.", flush=True)
    if diff:
      print(f"Resuming with a changed config: {'; '.join(diff[:10])}.", flush=True)
      if step0 >= self.num_steps:
        print(f"The checkpoint's step {step0} is at or past the end of the changed "
              f"run ({self.num_steps} steps): nothing left to train.", flush=True)
    if self.is_main:
      workdir_lib.truncate_records(metrics_path, step0)
      workdir_lib.write_json(os.path.join(self.workdir, "config.json"), self.config_dict)
    return state.replace(**ckpt_state)

  # -- training data ----------------------------------------------------------

  def device_batches(self, step: int):
    """Batches from the one that train step `step` uses on, reshaped per device.

    Step t trains on data batch t // replays; data epochs follow
    `epoch_starts` (counted in batches).
    """
    num_devices = self.device_map.num_local_devices
    b = step // self.replays
    while True:
      epoch = self.epoch_of(b)
      if epoch >= self.config.num_epochs:
        return
      in_epoch = b - int(self.epoch_starts[epoch])
      global_batch = self.train_data.batch_size_at(epoch)
      per_host = global_batch // jax.process_count()
      for images, labels in self.train_data.batches(epoch, in_epoch):
        # The example's position in the epoch keys its augmentation.
        idx = (in_epoch * global_batch + jax.process_index() * per_host +
               np.arange(per_host)).astype(np.int32)
        batch = {"image": images, "label": labels.astype(np.int32), "index": idx}
        yield jax.tree_util.tree_map(
            lambda a: a.reshape((num_devices, -1) + a.shape[1:]), batch)
        in_epoch += 1
        b += 1

  # -- evaluation -------------------------------------------------------------

  def split(self, name: str):
    """(images, labels) of a split for evaluation during training."""
    if name == "test":
      return self.test_data
    if name == "validation":
      if not isinstance(self.train_data, ArrayTrainData):
        raise ValueError("A validation split (data.validation_size) exists for in-memory "
                         "datasets only.")
      return self.train_data.validation
    if isinstance(self.train_data, ArrayTrainData):
      return self.train_data.images, self.train_data.labels
    # Streaming training data: the first batch of the first epoch.
    return next(iter(self.train_data.batches(0, 0)))

  def evals_due(self, step: int) -> list[str]:
    return sorted(name for name, e in self.evals.items()
                  if self.is_due(step, e["every_steps"], e["every_epochs"]) or
                  (step == self.num_steps and e["at_end"]))

  def run_evals(self, step: int, host: state_lib.TrainState) -> dict[str, dict[str, float]]:
    """The evaluations due at `step`, by name (one engine, eval-mode float32)."""
    due = self.evals_due(step)
    if not due:
      return {}
    logits_fn = closures.eval_logits_fn(
        self.eval_model, state_lib.model_variables(host.params, host.batch_stats))
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 2), step)
    return {name: evaluate.run_named_eval(
        self.evals[name], logits_fn, *self.split(self.evals[name]["split"]),
        # Folded with the evaluation's place among all (not among those due).
        jax.random.fold_in(key, sorted(self.evals).index(name)),
        eps=config_base.eps_pixels(self.config)) for name in due}

  # -- checkpoints ----------------------------------------------------------

  def save(self, step: int, host: state_lib.TrainState, checkpointer, extra_meta=None
           ) -> None:
    meta = {"config": self.config_dict, "co_monitor": self.co_monitor.state_dict(),
            "best": self.best.state_dict(), "extra": self.extra,
            "epoch": self.fractional_epoch(step)}
    meta.update(extra_meta or {})
    checkpointer.save(step, state_lib.state_dict(host), meta)

  def diverged(self, step: int, what: str) -> FloatingPointError:
    saved = self.last_ckpt.all_steps()
    advice = (f"the newest checkpoint, step {saved[-1]}, is finite: resume from it with a "
              f"smaller --config.schedule.lr_max and --config.allow_config_change=True"
              if saved else "no checkpoint was saved: start again with a smaller "
              "--config.schedule.lr_max")
    return FloatingPointError(
        f"{what} at step {step} (learning rate {float(self.lr_fn(step - 1)):.4g}); "
        f"training stopped before saving it; {advice}.")

  def host_state(self, step: int, r_state) -> state_lib.TrainState:
    """The host copy of the state after step `step`, checked to be finite."""
    host = state_lib.to_host(r_state)
    bad = checkpoints.first_nonfinite(checkpoints.to_host_state_dict(
        {"params": host.params, "batch_stats": host.batch_stats,
         "opt_state": host.opt_state, "swa": host.swa}))
    if bad is not None:
      raise self.diverged(step, f"{bad} is not finite")
    return host

  # -- monitor --------------------------------------------------------------

  def monitor(self, step: int, record: dict[str, float], r_state, writer):
    """Feeds the monitor; returns (r_state, step) after a rollback, else None."""
    event = self.co_monitor.update(step, record)
    if event is None:
      return None
    writer.write(step, {"co/detected": 1, **{f"co/{k}": v for k, v in event.items()}})
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    tqdm.write(f"Catastrophic overfitting detected at step {step}: PGD accuracy "
               f"{event['pgd_acc']:.3f} (best {event['best_pgd_acc']:.3f} at step "
               f"{event['best_step']}), FGSM accuracy {event['fgsm_acc']:.3f}.")
    mon = self.config.co_monitor
    if not (mon.rollback and self.extra["rollbacks"] < mon.max_rollbacks and
            self.best_ckpt.all_steps()):
      if mon.stop_after_epochs and "stop_at_step" not in self.extra:
        last = min(self.epoch_of(step) + mon.stop_after_epochs, self.config.num_epochs)
        self.extra["stop_at_step"] = int(self.epoch_starts[last])
      return None
    r_state, step = _rollback(self.config, self.best_ckpt, self.initial_state,
                              self.device_map.placement)
    self.extra["rollbacks"] += 1
    self.extra.setdefault("adjusted_hparams", []).append(
        {k: float(np.asarray(v)) for k, v in state_lib.unreplicate(
            r_state.hparams).items()})
    self.co_monitor.best, self.co_monitor.collapsed = None, False
    self.save(step, state_lib.to_host(r_state), self.last_ckpt)
    # Only once the rolled-back state is on disk: the abandoned trajectory goes.
    self.last_ckpt.delete_after(step)
    return r_state, step

  # -- events after a step ----------------------------------------------------

  def after_step(self, step: int, r_state, train_metrics, writer, bar):
    """Logging, SWA, evaluations, monitor and checkpoint due at `step`.

    The state is checked to be finite (parameters, BatchNorm statistics,
    optimizer state, after the update) before any evaluation or save.
    Returns (r_state, step); the step moves back after a rollback.
    """
    config = self.config
    if step % config.log_every_steps == 0 or step == self.num_steps:
      tm = {k: float(v) for k, v in state_lib.unreplicate(train_metrics).items()}
      if not np.isfinite(tm["train/loss"]):
        raise self.diverged(step, f"The training loss is {tm['train/loss']}")
      tm["train/lr"] = float(self.lr_fn(step - 1))
      tm["epoch"] = self.fractional_epoch(step)
      writer.write(step, tm)
      bar.set_postfix(loss=f"{tm['train/loss']:.3f}", acc=f"{tm['train/adv_acc']:.3f}")
    if config.model.name == "simple_cnn" and step in self.epoch_starts:
      # GradAlign Fig. 6: one filter's norms grow when catastrophic overfitting sets in.
      params = state_lib.unreplicate(r_state.params)
      writer.write(step, {**plotting.filter_norm_record(params),
                          "epoch": self.fractional_epoch(step)})
    if self.swa_due(step):
      r_state = self.p_swa(r_state)
      if config.swa.bn_update == "each_average":
        r_state = self.swa_batch_stats(step, r_state)
    if step == self.extra.get("stop_at_step") and step < self.num_steps:
      self.extra["stopped_early"] = True
      print(f"Stopping at step {step}, {config.co_monitor.stop_after_epochs} epoch(s) after "
            f"the monitor fired (co_monitor.stop_after_epochs).", flush=True)
    due_eval = bool(self.evals_due(step))
    do_ckpt = self.is_due(step, config.checkpoint_every_steps) or step == self.num_steps
    if not (due_eval or do_ckpt):
      return r_state, step
    r_state = self.p_sync(r_state)
    host = self.host_state(step, r_state)
    with self.timed("evaluation"):
      results = self.run_evals(step, host)
    for name, values in results.items():
      record = {f"{name}/{k}": v for k, v in values.items()}
      record["epoch"] = self.fractional_epoch(step)
      writer.write(step, record)
      self.last_eval[name] = record
    if config.best.eval in results:
      is_best, stop = self.best.update(step, results[config.best.eval][config.best.metric])
      if is_best:
        with self.timed("checkpoints"):
          self.save(step, host, self.best_ckpt, {"eval": results[config.best.eval]})
      if stop:
        self.extra["stopped_early"] = True
        print(f"Early stopping at step {step} ({config.best.eval} {config.best.metric} "
              f"dropped by more than {config.best.drop}).", flush=True)
    monitor_state = ""
    if config.co_monitor.enabled and config.co_monitor.eval in results:
      rolled_back = self.monitor(step, results[config.co_monitor.eval], r_state, writer)
      monitor_state = "collapsed" if self.co_monitor.collapsed else "ok"
      if rolled_back is not None:
        r_state, step = rolled_back
        bar.n = step
        bar.refresh()
        return r_state, step
    if results and self.is_main:
      bar.write(self.eval_line(step, results, monitor_state))
    if do_ckpt:
      with self.timed("checkpoints"):
        self.save(step, host, self.last_ckpt)
    return r_state, step

  def eval_line(self, step: int, results: dict, monitor_state: str) -> str:
    """One compact console line per evaluation: epoch, accuracies, alignment, monitor."""
    parts = [f"epoch {self.fractional_epoch(step):g}"]
    for name, values in sorted(results.items()):
      settings = self.evals[name]
      shown = []
      for metric, value in values.items():
        if metric == "pgd_acc":
          label = f"PGD-{settings['pgd_steps']}"
        elif metric in EVAL_LINE_LABELS:
          label = EVAL_LINE_LABELS[metric]
        else:
          continue
        shown.append(f"{label} {value:.3f}")
      parts.append(f"{name}: " + ", ".join(shown))
    if monitor_state:
      parts.append(f"monitor: {monitor_state}")
    return " | ".join(parts)

  # -- the end ----------------------------------------------------------------

  def finish(self, step: int, r_state, train_seconds: float) -> dict[str, Any]:
    config = self.config
    finished = step >= self.num_steps or self.extra["stopped_early"]
    if finished and config.swa.enabled and config.swa.bn_update == "at_end":
      r_state = self.swa_batch_stats(step, r_state)
      self.save(step, self.host_state(step, r_state), self.last_ckpt)
    elif step not in self.last_ckpt.all_steps():
      self.save(step, self.host_state(step, r_state), self.last_ckpt)
    summary: dict[str, Any] = {"step": step, "last_eval": self.last_eval,
                               "co_events": self.co_monitor.events,
                               "stopped_early": self.extra["stopped_early"],
                               "data": self.data_description(),
                               "rollbacks": self.extra["rollbacks"],
                               "train_seconds_this_session": train_seconds,
                               "time_split_this_session": self.time_split(train_seconds)}
    if config.final_eval.enabled and finished:
      summary["final_eval"] = final_evaluation(config, self.workdir, self.last_ckpt,
                                               self.best_ckpt, self.test_data,
                                               self.progress)
    if self.is_main:
      # The summary is the run's last file: its presence marks the run complete.
      try:
        plotting.plot_run(self.workdir)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not plot training curves: %s", e)
      workdir_lib.write_json(os.path.join(self.workdir, SUMMARY_NAME), summary)
    return summary

  @contextlib.contextmanager
  def timed(self, what: str):
    """Adds the wall time of the block to `self.seconds[what]` (this session)."""
    start = time.time()
    try:
      yield
    finally:
      self.seconds[what] = self.seconds.get(what, 0.0) + time.time() - start

  def time_split(self, loop_seconds: float) -> dict[str, float]:
    """Seconds of the training loop by activity; "train_steps" is the rest.

    The steps run asynchronously: the host waits for them where it first
    reads their results (the logged metrics, `host_state` before evaluations
    and checkpoints), and that wait counts as train steps; the timed blocks
    (data, evaluation, checkpoints) start after it.
    """
    split = {k: round(v, 3) for k, v in sorted(self.seconds.items())}
    split["train_steps_and_logging"] = round(loop_seconds - sum(self.seconds.values()), 3)
    outside = sum(v for k, v in split.items() if k != "train_steps_and_logging")
    split["fraction_outside_train_steps"] = round(outside / loop_seconds, 4) if (
        loop_seconds > 0) else None
    return split

  def data_description(self) -> dict[str, Any]:
    """Which examples trained, which were held out, what chose best/ (run metadata)."""
    best = self.config.best
    selection = f"{best.eval} ({self.evals[best.eval]['split']} split) / {best.metric}"
    if not isinstance(self.train_data, ArrayTrainData):
      return {"train": "streamed (data.imagenet)", "model_selection": selection}
    held_out = len(self.train_data.validation[0])
    return {"train_examples": len(self.train_data.images),
            "validation": (f"the last {held_out} examples of the training split, never "
                           f"trained on" if held_out else None),
            "model_selection": selection}

  def completed_summary(self, step: int, stop_at: int) -> dict[str, Any] | None:
    """The summary of a run that already ended at `step`, else None."""
    path = os.path.join(self.workdir, SUMMARY_NAME)
    if step < stop_at and not self.extra["stopped_early"]:
      return None
    summary = workdir_lib.read_json(path)
    if not isinstance(summary, dict):
      return None
    finished = step >= self.num_steps or self.extra["stopped_early"]
    if summary.get("step") != step or (
        finished and self.config.final_eval.enabled and "final_eval" not in summary):
      return None
    return summary


SUMMARY_NAME = "summary.json"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       *, max_steps: int | None = None, progress: bool = True
                       ) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its newest intact checkpoint.

  The config is validated and the workdir checked before anything is written;
  the workdir is then locked for the run (a second run on it is refused). A
  run that already ended (its summary.json matches the newest checkpoint) is
  left unchanged and its summary returned.

  Args:
    config: a training config (see configs/ and config_base.base_config).
    workdir: where checkpoints, metrics.jsonl, TensorBoard events, plots and the
      final evaluation records go.
    max_steps: stop after this many steps in total (a budget for notebooks and
      tests; the schedule still spans the full config).
    progress: show tqdm progress bars.
  Returns:
    A summary dict: the final step, the last evaluations, the CO events, and
    the final PGD-50-10 records of the last and best states (when enabled).
  Raises:
    ValueError: a bad config or workdir (nothing written).
    workdir.WorkdirLockedError: another run holds the workdir.
    FloatingPointError: the state diverged (the checkpoints on disk are finite).
  """
  method = config_base.validate_config(config, jax.local_device_count() * jax.process_count())
  if max_steps is not None:
    _checks.check_int("max_steps", max_steps, 1)
  workdir_lib.check_writable_dir(workdir)
  run = _Run(config, method, workdir, progress)  # loads the data, writes nothing
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--workdir={workdir} cannot be created: {e.strerror}.") from None
  lock = workdir_lib.WorkdirLock(workdir) if run.is_main else None
  if lock is not None:
    lock.acquire()
  try:
    return _train(run, max_steps)
  finally:
    if lock is not None:
      lock.release()


def _train(run: _Run, max_steps: int | None) -> dict[str, Any]:
  workdir, progress = run.workdir, run.progress
  state = run.restore()
  stop_at = run.num_steps if max_steps is None else min(run.num_steps, max_steps)
  step = int(np.asarray(state.step))
  done = run.completed_summary(step, stop_at)
  if done is not None:
    print(f"{workdir} holds a completed run (step {step}); nothing to do.", flush=True)
    return done
  r_state = state_lib.to_devices(state, run.device_map.placement)
  writer = workdir_lib.MetricWriter(workdir, enabled=run.is_main)
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  # smoothing=0: the estimate averages over the whole session, evaluations included.
  bar = tqdm(total=stop_at, initial=step, disable=not (progress and run.is_main),
             desc="train", unit="step", dynamic_ncols=True, smoothing=0)
  t0 = time.time()
  batches, batch = run.device_batches(step), None
  while step < stop_at and not run.extra["stopped_early"]:
    if batch is None or step % run.replays == 0:
      with run.timed("data"):
        batch = next(batches)
    r_state, train_metrics = run.p_train_step(r_state, batch)
    step += 1
    bar.update(1)
    new_r_state, new_step = run.after_step(step, r_state, train_metrics, writer, bar)
    if new_step != step:  # rolled back: the data continue from the restored step
      batches, batch = run.device_batches(new_step), None
    r_state, step = new_r_state, new_step
  bar.close()
  summary = run.finish(step, r_state, time.time() - t0)
  writer.close()
  return summary


def _rollback(config, best_ckpt, template_state, devices):
  """Restores the best state and applies the configured hyperparameter changes."""
  step, restored, _ = best_ckpt.restore(state_lib.state_dict(template_state))
  restored["hparams"] = _apply_adjustments(
      restored["hparams"], {k: dict(v) for k, v in config.co_monitor.adjust.items()})
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  tqdm.write(f"Rolled back to step {step}; tunable settings now "
             f"{ {k: float(np.asarray(v)) for k, v in restored['hparams'].items()} }.")
  return state_lib.to_devices(template_state.replace(**restored), devices), int(step)


def final_evaluation(config, workdir, last_ckpt, best_ckpt, test_data, progress=True
                     ) -> dict[str, Any]:
  """PGD-k-r (config.final_eval) of the last and the best state; records as JSON.

  A record already written for the same weights (their fingerprint) and the
  same settings is reused, so a run killed after its final evaluation does not
  evaluate again or write a second record when resumed.
  """
  results = {}
  candidates = [("last", last_ckpt), ("best", best_ckpt)]
  if config.swa.enabled:
    candidates.append(("swa", last_ckpt))
  settings = dict(config.final_eval.to_dict(), eps=float(config.eps), seed=int(config.seed))
  for which, ckpt in candidates:
    if not ckpt.all_steps():
      continue
    model, variables, _, ckpt_step = restore.restore_for_eval(workdir, which)
    path = os.path.join(workdir, "eval", f"final_{which}_pgd{config.final_eval.steps}-"
                        f"{config.final_eval.restarts}.json")
    fingerprint = checkpoints.fingerprint(variables)
    previous = workdir_lib.read_json(path)
    if (isinstance(previous, dict) and previous.get("checkpoint_fingerprint") == fingerprint
        and previous.get("final_eval_settings") == settings):
      results[which] = previous
      continue
    # Weights as arguments, not baked-in constants: one compile for every state.
    logits_fn = closures.eval_logits_fn(model, variables)
    record = evaluate.evaluate(
        logits_fn, test_data[0], test_data[1], config.seed, attack="pgd",
        eps=config_base.eps_pixels(config), n=config.final_eval.n, selection="first",
        steps=config.final_eval.steps, restarts=config.final_eval.restarts,
        rule=config.final_eval.rule, batch_size=config.final_eval.batch_size,
        dataset=config.dataset, progress=progress)
    record.update(checkpoint=which, checkpoint_step=ckpt_step,
                  checkpoint_fingerprint=fingerprint, final_eval_settings=settings)
    if jax.process_index() == 0:  # every process evaluates; one writes
      os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
      evaluate.save_record(record, path)
    results[which] = record
  return results

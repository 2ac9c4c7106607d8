"""Deterministic shuffling, batching and per-host sharding of in-memory arrays.

The order of every epoch is a pure function of `(seed, epoch)`, so a run
resumed at step `k` of an epoch sees exactly the batches it would have seen
(`train_batches(..., start_step=k)`). Batches are uint8 NHWC NumPy arrays; the
conversion to float and the augmentation happen on the device, inside the
jitted train step (`data.augment`), so only a quarter of the bytes cross to the
accelerator.

Multi-host: every host computes the same global permutation and keeps the
positions `process_index, process_index + P, ...` of it (`shard_for_host`); the
union over hosts of their step-`t` batches is exactly the single-host global
batch `t`, and all hosts run the same number of steps.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from fastadv_jax import _checks




def _check_process(process_index: int, process_count: int) -> None:
  _checks.check_int("process_count", process_count, 1)
  _checks.check_int("process_index", process_index, 0)
  if process_index >= process_count:
    raise ValueError(
        f"process_index must lie in [0, {process_count - 1}] for process_count="
        f"{process_count}, got {process_index}.")


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The example order of one epoch, a pure function of (seed, epoch).

  Uses NumPy's PCG64 seeded with the sequence `[seed, epoch]`, whose stream
  NumPy keeps stable across versions and platforms.

  Args:
    num_examples: N, the size of the split.
    seed: the run's seed (>= 0).
    epoch: the epoch (>= 0).
  Returns:
    An int64 permutation of `arange(N)`.
  """
  _checks.check_int("num_examples", num_examples, 0)
  _checks.check_int("seed", seed, 0)
  _checks.check_int("epoch", epoch, 0)
  rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch)])))
  return rng.permutation(int(num_examples)).astype(np.int64)


def shard_for_host(indices: np.ndarray, process_index: int,
                   process_count: int) -> np.ndarray:
  """This host's share of a global index sequence: positions `process_index::P`.

  The tail is cut to a multiple of `process_count` so that every host gets
  the same number of indices (and runs the same number of steps).

  Args:
    indices: the global order (e.g. `epoch_permutation(...)`).
    process_index: this host (`jax.process_index()`).
    process_count: the number of hosts P (`jax.process_count()`).
  Returns:
    `len(indices) // P` indices, disjoint across hosts.
  """
  _check_process(process_index, process_count)
  indices = np.asarray(indices)
  usable = len(indices) // process_count * process_count
  return indices[process_index:usable:process_count]


def _local_batch_size(batch_size: int, process_count: int) -> int:
  _checks.check_int("batch_size", batch_size, 1)
  if batch_size % process_count:
    raise ValueError(
        f"The global batch_size {batch_size} must be divisible by process_count "
        f"{process_count}.")
  return batch_size // process_count


def steps_per_epoch(num_examples: int, batch_size: int, *, drop_remainder: bool = True,
                    process_count: int = 1) -> int:
  """Number of (global) batches `train_batches` yields per epoch.

  Args:
    num_examples: N, the size of the split.
    batch_size: the global batch size (over all hosts).
    drop_remainder: drop the last incomplete batch (fixed shapes).
    process_count: the number of hosts.
  """
  _checks.check_int("num_examples", num_examples, 0)
  local_batch = _local_batch_size(batch_size, process_count)
  local_examples = num_examples // process_count
  if drop_remainder:
    return local_examples // local_batch
  return -(-local_examples // local_batch)


def train_batches(images: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int,
                  epoch: int, start_step: int = 0, drop_remainder: bool = True,
                  process_index: int = 0,
                  process_count: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Shuffled training batches of one epoch, resumable at any step.

  Args:
    images: (N, H, W, C) uint8 (any dtype is passed through).
    labels: (N,) integer labels.
    batch_size: the global batch size; each host yields `batch_size // P`.
    seed: the run's seed; with `epoch` it fixes the order.
    epoch: the epoch (>= 0).
    start_step: the first step to yield (0 <= start_step <= steps per epoch),
      for an exact resume in the middle of an epoch.
    drop_remainder: drop the last incomplete batch (every batch then has the
      same shape, so nothing recompiles); False yields it, smaller.
    process_index: this host (`jax.process_index()`).
    process_count: the number of hosts (`jax.process_count()`).
  Yields:
    `(images[idx], labels[idx])` with labels as int32, for steps
    `start_step, start_step + 1, ...` of the epoch.
  """
  _checks.check_same_batch("images", images, "labels", labels)
  _check_process(process_index, process_count)
  local_batch = _local_batch_size(batch_size, process_count)
  num_steps = steps_per_epoch(len(images), batch_size, drop_remainder=drop_remainder,
                              process_count=process_count)
  _checks.check_int("start_step", start_step, 0)
  if start_step > num_steps:
    raise ValueError(
        f"start_step={start_step} is past the end of the epoch ({num_steps} steps "
        f"of batch {batch_size} over {len(images)} examples).")
  order = shard_for_host(epoch_permutation(len(images), seed, epoch),
                         process_index, process_count)
  return _iterate(images, labels, order, local_batch, start_step, num_steps)


def _iterate(images, labels, order, local_batch, start_step, num_steps):
  # A generator behind a plain function: argument errors above are raised at
  # the call, not at the first next().
  for step in range(start_step, num_steps):
    idx = order[step * local_batch:(step + 1) * local_batch]
    yield images[idx], np.asarray(labels[idx], np.int32)

"""Deterministic shuffling, batching and per-host sharding of in-memory arrays.

The order of every epoch is a pure function of `(seed, epoch)`, so a run
resumed at step `k` of an epoch sees exactly the batches it would have seen
(`train_batches(..., start_step=k)`). Batches are uint8 NHWC NumPy arrays; the
conversion to float and the augmentation happen on the device, inside the
jitted train step (`data.augment`), so only a quarter of the bytes cross to the
accelerator.

Multi-host: every host computes the same global permutation and keeps, of every
global batch, its own contiguous block (`shard_for_host`: host p of P holds
positions `[p * B/P, (p + 1) * B/P)` of each batch of B). Host p's step-`t`
batch is then exactly block p of the single-host global batch `t`, and with
the devices of all hosts in process order (`jax.devices()`), every device sees
the examples it would see in one process with as many devices: per-device
terms (BatchNorm statistics, AdvLC's top-k) do not depend on the number of
hosts. All hosts run the same number of steps.
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


def shard_for_host(indices: np.ndarray, process_index: int, process_count: int,
                   batch_size: int) -> np.ndarray:
  """This host's share of a global index sequence cut into global batches.

  Of every full global batch of `batch_size` indices, host p keeps block p of
  P equal contiguous blocks; of a last partial batch of r indices, block p of
  r // P (the r % P left over are used by no host). Hosts get disjoint shares
  of equal length, and the union of their step-t batches is global batch t.

  Args:
    indices: the global order (e.g. `epoch_permutation(...)`).
    process_index: this host (`jax.process_index()`).
    process_count: the number of hosts P (`jax.process_count()`).
    batch_size: the global batch size B (divisible by P).
  Returns:
    This host's indices in order: `B/P` per full batch, then its tail block.
  """
  _check_process(process_index, process_count)
  local = _local_batch_size(batch_size, process_count)
  indices = np.asarray(indices)
  full = len(indices) // batch_size * batch_size
  head = indices[:full].reshape(-1, process_count, local)[:, process_index].reshape(-1)
  tail = indices[full:]
  tail_local = len(tail) // process_count
  return np.concatenate([head, tail[process_index * tail_local:
                                    (process_index + 1) * tail_local]])


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
                         process_index, process_count, batch_size)
  return _iterate(images, labels, order, local_batch, start_step, num_steps)


def _iterate(images, labels, order, local_batch, start_step, num_steps):
  # A generator behind a plain function: argument errors above are raised at
  # the call, not at the first next().
  for step in range(start_step, num_steps):
    idx = order[step * local_batch:(step + 1) * local_batch]
    yield images[idx], np.asarray(labels[idx], np.int32)

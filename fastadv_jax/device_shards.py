"""Evaluation drivers on several devices: the points split, one thread per device.

The strict PGD evaluation (`evaluate.pgd_accuracy`) and AutoAttack
(`autoattack.autoattack`) are Python drivers around compiled attacks: between
restarts and stages they look at which points are still robust and attack only
those (Croce & Hein 2020, `run_standard_evaluation`). Every random draw of a
point comes from the key and the point's id, so a point's result does not
depend on which other points it is attacked with. Splitting the points between
devices and running one driver per device therefore gives the same results as
one device, with no communication: each thread runs its driver under
`jax.default_device(device)`, so its arrays and compiled calls live there, and
the threads overlap because JAX releases the GIL while a device computes.

The compiled programs are shared: a jitted function compiled for one device is
reused on the others (a cache hit). Two threads that miss the cache at the
same time both compile, which costs host CPU rather than wall time on a host
with a core per accelerator; on the CPU backend the simulated devices share
the host's cores, so `resolve_devices(None)` uses one device there.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import jax
import numpy as np


def resolve_devices(num_devices: int | None) -> list:
  """The local devices a driver runs on.

  Args:
    num_devices: how many local devices; None: all local devices on an
      accelerator, one on the CPU backend (simulated CPU devices share the
      host's cores: more drivers only compile more).
  Returns:
    `jax.local_devices()[:num_devices]`.
  Raises:
    ValueError: num_devices outside [1, local device count].
  """
  devices = jax.local_devices()
  if num_devices is None:
    return devices[:1] if jax.default_backend() == "cpu" else devices
  if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) or not (
      1 <= num_devices <= len(devices)):
    raise ValueError(f"num_devices={num_devices!r} must be an integer in [1, {len(devices)}] "
                     f"(the local device count), or None.")
  return devices[:int(num_devices)]


def split(points: np.ndarray, count: int) -> list[np.ndarray]:
  """`count` interleaved shards of `points` (points[k::count]): balanced even
  when the points still to attack cluster (e.g. by class)."""
  return [points[k::count] for k in range(count)]


def run_on_devices(driver: Callable, points: np.ndarray, devices: Sequence) -> list:
  """`[(shard, driver(shard, device, position)) for each device]`, a thread each.

  `points` (indices) are split with `split`; `driver` runs under
  `jax.default_device(device)` and receives its shard, its device and its
  position (0, 1, ...; e.g. for a progress bar's line). With one device it runs
  in the calling thread. The first exception of any thread is raised here once
  all threads have ended.
  """
  points = np.asarray(points)
  if len(devices) == 1:
    with jax.default_device(devices[0]):
      return [(points, driver(points, devices[0], 0))]
  shards = split(points, len(devices))
  results: list = [None] * len(devices)
  errors: list = [None] * len(devices)

  def work(position):
    try:
      with jax.default_device(devices[position]):
        results[position] = driver(shards[position], devices[position], position)
    except BaseException as error:  # pylint: disable=broad-except
      errors[position] = error

  threads = [threading.Thread(target=work, args=(p,), name=f"fastadv-{devices[p]}")
             for p in range(len(devices))]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  for error in errors:
    if error is not None:
      raise error
  return list(zip(shards, results))

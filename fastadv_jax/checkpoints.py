"""Checkpoints: atomic, checksummed (state, meta) pairs written with orbax.

A `Checkpointer` owns one directory (``checkpoints/`` holds the newest few
states, so that a corrupt newest one can fall back to an intact one; ``best/``
holds the state with the best monitored robust accuracy). Each checkpoint
``<directory>/<step>/`` is an orbax composite of

* ``state``: the state as a nested dict of arrays
  (`flax.serialization.to_state_dict`: optimizer states become dicts, so a
  checkpoint reads back the same with or without a template),
* ``meta``: JSON (the config as a dict, the epoch, the monitors, ...) and the
  CRC-32 of every saved array (``meta["checksums"]``).

Nothing on disk is ever deleted before its replacement is complete:

* orbax writes a new step to a temporary directory and renames it when
  complete, so a kill mid-write leaves the older checkpoints untouched;
* a step that exists already (after a rollback, or SWA's final statistics) is
  written next to it as ``<step>.replacement``, then swapped in with two
  renames (``<step>`` -> ``<step>.replaced``, ``<step>.replacement`` ->
  ``<step>``); `recover` completes or undoes a swap a kill interrupted;
* older checkpoints beyond ``max_to_keep`` are removed only after the new one
  is in place.

Multi-host: every process calls `save` (orbax writes one copy of the host
arrays, from the primary process, and synchronizes the processes); the
renames, swaps and deletions are done by process 0 only, between barriers, so
no process reads a directory another is changing. The workdir must be a
file system shared by the processes.

Restore verifies the checksums; a checkpoint that fails to load or to verify
is reported with a `CheckpointCorruptWarning`, left in place, and the next
older one is used. A checkpoint whose arrays do not match the template's
structure (e.g. another optimizer) is not corrupt: `CheckpointMismatchError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
import zlib
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

_REPLACEMENT = ".replacement"
_REPLACED = ".replaced"
_ORBAX_TMP = ".orbax-checkpoint-tmp"


class CheckpointCorruptWarning(UserWarning):
  """A checkpoint could not be read or verified; an older intact one is used instead."""


class CheckpointMismatchError(ValueError):
  """A checkpoint's arrays do not fit the state they are restored into."""


def flatten_state(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"params/conv/kernel": leaf, ...} of a nested state dict (None and {} dropped)."""
  out = {}
  if isinstance(tree, dict):
    for k, v in tree.items():
      out.update(flatten_state(v, f"{prefix}{k}/"))
  elif tree is not None:
    out[prefix[:-1]] = tree
  return out


def checksums(state_dict: dict) -> dict[str, str]:
  """CRC-32 of the bytes of every array of a nested state dict, by path."""
  return {path: format(zlib.crc32(np.ascontiguousarray(leaf).tobytes()), "08x")
          for path, leaf in flatten_state(state_dict).items()}


def fingerprint(state_dict: dict) -> str:
  """A short digest of every array of a nested state dict (names, bytes)."""
  text = json.dumps(sorted(checksums(state_dict).items()))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def first_nonfinite(state_dict: dict) -> str | None:
  """The path of the first floating-point array with a NaN or inf, else None."""
  for path, leaf in flatten_state(state_dict).items():
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.floating) and not np.all(np.isfinite(leaf)):
      return path
  return None


def to_host_state_dict(state: Any) -> dict:
  """Host NumPy copies of `state` as a nested dict (what a checkpoint holds)."""
  state = flax.serialization.to_state_dict(jax.device_get(state))
  return jax.tree_util.tree_map(np.asarray, state)


def _fit_to_template(template: Any, restored: dict, where: str) -> Any:
  """`restored` (nested dicts) in the structure of `template`, shapes and dtypes checked."""
  target = to_host_state_dict(template)
  want, have = flatten_state(target), flatten_state(restored)
  missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
  wrong = [f"{p}: {np.shape(have[p])} {np.asarray(have[p]).dtype} saved, "
           f"{np.shape(want[p])} {np.asarray(want[p]).dtype} expected"
           for p in sorted(set(want) & set(have))
           if np.shape(want[p]) != np.shape(have[p]) or
           np.asarray(want[p]).dtype != np.asarray(have[p]).dtype]
  if missing or extra or wrong:
    details = [f"missing {missing[:3]}" if missing else "",
               f"unexpected {extra[:3]}" if extra else "", "; ".join(wrong[:3])]
    raise CheckpointMismatchError(
        f"The checkpoint {where} holds a different state than this config builds "
        f"({'; '.join(d for d in details if d)}): a changed model, optimizer or "
        f"method cannot resume from it. Use another --workdir.")

  def fill(node_target, node_restored):
    if isinstance(node_target, dict):
      return {k: fill(v, node_restored.get(k) if isinstance(node_restored, dict) else None)
              for k, v in node_target.items()}
    return node_target if node_restored is None else node_restored

  return flax.serialization.from_state_dict(template, fill(target, restored))


def barrier(name: str) -> None:
  """Waits until every process reaches this point (nothing with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _is_primary() -> bool:
  return jax.process_index() == 0


class Checkpointer:
  """Saves and restores (state, meta) pairs under `directory`.

  Only the run that owns the directory (holding the workdir lock; all its
  processes together) writes; readers (evaluation while training runs) never
  modify the directory.
  """

  def __init__(self, directory: str, max_to_keep: int | None = 3):
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep} must be >= 1 (or None: keep all).")
    self.directory = os.path.abspath(directory)
    self.max_to_keep = max_to_keep
    self._orbax = ocp.Checkpointer(ocp.CompositeCheckpointHandler())

  def _path(self, step: int, suffix: str = "") -> str:
    return os.path.join(self.directory, f"{int(step)}{suffix}")

  def all_steps(self) -> list[int]:
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory)
                  if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

  def recover(self) -> None:
    """Completes or undoes what a killed writer left: swaps and orbax temporaries.

    Collective: process 0 repairs, the others wait for it.
    """
    if _is_primary():
      self._recover()
    barrier(f"recovered {self.directory}")

  def _recover(self) -> None:
    if not os.path.isdir(self.directory):
      return
    for name in sorted(os.listdir(self.directory)):
      path = os.path.join(self.directory, name)
      step = name.split(".")[0]
      if _ORBAX_TMP in name:
        shutil.rmtree(path, ignore_errors=True)  # an incomplete write
      elif name.endswith(_REPLACEMENT) and step.isdigit():
        self._swap(int(step))  # the replacement is complete: finish the swap
    for name in sorted(os.listdir(self.directory)):
      step = name.split(".")[0]
      if name.endswith(_REPLACED) and step.isdigit():
        if os.path.isdir(self._path(int(step))):
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        else:
          os.rename(os.path.join(self.directory, name), self._path(int(step)))

  def _swap(self, step: int) -> None:
    current, new, old = self._path(step), self._path(step, _REPLACEMENT), self._path(
        step, _REPLACED)
    if os.path.isdir(current):
      if os.path.isdir(old):
        shutil.rmtree(old)
      os.rename(current, old)
    os.rename(new, current)
    shutil.rmtree(old, ignore_errors=True)

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves host copies of `state` and the JSON `meta` at `step`, atomically.

    A checkpoint already at `step` is replaced only once the new one is
    complete; then checkpoints beyond `max_to_keep` (the oldest) are removed.

    Raises:
      FloatingPointError: when `state` holds a NaN or inf (nothing is written).
    """
    state = to_host_state_dict(state)
    bad = first_nonfinite(state)
    if bad is not None:
      raise FloatingPointError(f"Refusing to save step {step}: {bad} is not finite.")
    meta = dict(meta, checksums=checksums(state))
    exists = os.path.isdir(self._path(step))
    target = self._path(step, _REPLACEMENT if exists else "")
    if _is_primary():
      os.makedirs(self.directory, exist_ok=True)
      if os.path.exists(target):
        shutil.rmtree(target)  # a stale replacement (recover() normally removes it)
    barrier(f"save {target}")
    # Collective in orbax: every process calls it, one copy is written.
    self._orbax.save(target, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    if _is_primary():
      if exists:
        self._swap(step)
      if self.max_to_keep is not None:
        for old in self.all_steps()[:-self.max_to_keep]:
          shutil.rmtree(self._path(old), ignore_errors=True)
    barrier(f"saved {target}")

  def delete_after(self, step: int) -> None:
    """Removes checkpoints newer than `step` (an abandoned trajectory after a rollback)."""
    if _is_primary():
      for s in self.all_steps():
        if s > step:
          shutil.rmtree(self._path(s), ignore_errors=True)
    barrier(f"deleted after {step} in {self.directory}")

  def _read(self, step: int, state: bool) -> dict:
    items = {"meta": ocp.args.JsonRestore()}
    if state:
      items["state"] = ocp.args.StandardRestore(None)
    return self._orbax.restore(self._path(step), args=ocp.args.Composite(**items))

  def restore(self, template: Any, step: int | None = None
              ) -> tuple[int, Any, dict] | None:
    """Restores the newest intact checkpoint (or exactly `step`).

    A checkpoint that fails to load or whose arrays do not match their saved
    checksums is reported with a `CheckpointCorruptWarning` naming its path,
    left in place, and the next older one is tried.

    Args:
      template: a state pytree to restore into (its structure, shapes and
        dtypes are checked), or None for the saved arrays as nested dicts.
      step: a specific step, or None for the newest intact one.
    Returns:
      (step, state, meta), or None when the directory holds no checkpoint.
    Raises:
      CheckpointMismatchError: an intact checkpoint does not fit `template`.
      ValueError: when checkpoints exist but none can be read.
    """
    steps = [s for s in self.all_steps() if step is None or s == step]
    if not steps:
      return None
    errors = []
    for s in reversed(steps):
      path = self._path(s)
      try:
        restored = self._read(s, state=True)
        state = jax.tree_util.tree_map(np.asarray, restored["state"])
        meta = dict(restored["meta"])
        saved = meta.pop("checksums", None)
        if saved is not None:
          now = checksums(state)
          bad = sorted(p for p in set(saved) | set(now) if saved.get(p) != now.get(p))
          if bad:
            raise ValueError(f"checksum mismatch in {len(bad)} array(s), e.g. {bad[0]}")
      except Exception as e:  # pylint: disable=broad-except
        warnings.warn(
            f"Checkpoint {path} is corrupt ({type(e).__name__}: {str(e)[:200]}); "
            f"leaving it in place and trying an older one.", CheckpointCorruptWarning)
        errors.append(path)
        continue
      if template is not None:
        state = _fit_to_template(template, state, path)
      return s, state, meta
    raise ValueError(
        f"No intact checkpoint in {self.directory}: every one failed to load "
        f"({', '.join(errors)}).")

  def restore_meta(self, step: int | None = None) -> tuple[int, dict] | None:
    """Reads only the JSON metadata of the newest (or given) checkpoint."""
    for s in reversed([s for s in self.all_steps() if step is None or s == step]):
      try:
        meta = dict(self._read(s, state=False)["meta"])
        meta.pop("checksums", None)
        return s, meta
      except Exception as e:  # pylint: disable=broad-except
        warnings.warn(
            f"Checkpoint metadata in {self._path(s)} could not be read "
            f"({type(e).__name__}); trying an older one.", CheckpointCorruptWarning)
    return None

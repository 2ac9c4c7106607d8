"""Checkpoints with orbax: unreplicated state plus the config it was trained with.

Two managers live under a work directory: ``checkpoints/`` holds the latest
states (periodic saves, the newest few kept so that a corrupt newest one can fall
back to an intact one), ``best/`` holds the state with the best monitored robust
accuracy. Each checkpoint is a composite of

* ``state``: a pytree of arrays (params, batch_stats, opt_state, step, ...),
* ``meta``: JSON (the config as a dict, the epoch, the monitor's history, ...).

Orbax writes to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoints untouched.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointCorruptWarning(UserWarning):
  """A checkpoint could not be read; an older intact one is used instead."""


def _manager(directory: str, max_to_keep: int | None) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=("state", "meta"))


class Checkpointer:
  """Saves and restores (state, meta) pairs under `directory`."""

  def __init__(self, directory: str, max_to_keep: int | None = 3):
    self.directory = os.path.abspath(directory)
    self._mngr = _manager(self.directory, max_to_keep)

  def all_steps(self) -> list[int]:
    self._mngr.reload()
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves host copies of `state` (unreplicated) and the JSON `meta` at `step`.

    A checkpoint already at `step` is replaced (after a rollback the same step
    holds changed settings).
    """
    state = jax.tree_util.tree_map(np.asarray, jax.device_get(state))
    if int(step) in self.all_steps():
      self._mngr.delete(int(step))
    self._mngr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True)
    self._mngr.wait_until_finished()

  def restore(self, template: Any, step: int | None = None
              ) -> tuple[int, Any, dict] | None:
    """Restores the newest intact checkpoint (or exactly `step`).

    A checkpoint that fails to load is reported with a `CheckpointCorruptWarning`
    naming its path, left in place, and the next older one is tried.

    Args:
      template: a pytree with the structure, shapes and dtypes of the state, or
        None to read the saved arrays back as nested dicts.
      step: a specific step, or None for the newest intact one.
    Returns:
      (step, state, meta), or None when the directory holds no checkpoint.
    Raises:
      ValueError: when checkpoints exist but none can be read.
    """
    steps = self.all_steps()
    if step is not None:
      steps = [s for s in steps if s == step]
    if not steps:
      return None
    abstract = None if template is None else jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), template)
    errors = []
    for s in reversed(steps):
      try:
        restored = self._mngr.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        state = jax.tree_util.tree_map(np.asarray, restored["state"])
        return s, state, dict(restored["meta"])
      except Exception as e:  # pylint: disable=broad-except
        path = os.path.join(self.directory, str(s))
        warnings.warn(
            f"Checkpoint {path} could not be restored ({type(e).__name__}: "
            f"{str(e)[:200]}); leaving it in place and trying an older one.",
            CheckpointCorruptWarning)
        errors.append(path)
    raise ValueError(
        f"No intact checkpoint in {self.directory}: every one failed to load "
        f"({', '.join(errors)}).")

  def restore_meta(self, step: int | None = None) -> tuple[int, dict] | None:
    """Reads only the JSON metadata of the newest (or given) checkpoint."""
    steps = self.all_steps()
    if step is not None:
      steps = [s for s in steps if s == step]
    for s in reversed(steps):
      try:
        restored = self._mngr.restore(s, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))
        return s, dict(restored["meta"])
      except Exception as e:  # pylint: disable=broad-except
        warnings.warn(
            f"Checkpoint metadata in {os.path.join(self.directory, str(s))} could "
            f"not be read ({type(e).__name__}); trying an older one.",
            CheckpointCorruptWarning)
    return None

  def close(self) -> None:
    self._mngr.close()

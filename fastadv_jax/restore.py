"""Restoring a trained state for evaluation (fastadv-eval, final evaluation, notebooks)."""

from __future__ import annotations

import os

from typing import Any, NamedTuple

import jax
import ml_collections

from fastadv_jax import checkpoints
from fastadv_jax.train_state import create_model

CHECKPOINTS = ("best", "last", "swa")


class Restored(NamedTuple):
  """A trained state ready for evaluation, and where it came from."""
  model: Any
  variables: dict
  config: ml_collections.ConfigDict
  step: int  # the training step of the checkpoint that was read


def restore_for_eval(workdir: str, which: str = "best"):
  """Loads `Restored(model, variables, config, step)` of the `which` state of a run.

  `which`: "best" (best monitored PGD accuracy), "last", or "swa" (the weight
  average of the last checkpoint, when the run used config.swa).

  The model is built in float32 for evaluation. Raises FileNotFoundError when the
  work directory has no such checkpoint, ValueError when none can be read.
  """
  if which not in CHECKPOINTS:
    raise ValueError(f"Unknown checkpoint {which!r}; choose one of {list(CHECKPOINTS)}.")
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
  if full is None:
    raise FileNotFoundError(f"No {which!r} checkpoint in {directory}.")
  step, restored = full[0], full[1]
  if which == "swa":
    if not restored.get("swa"):
      raise ValueError(f"The run in {workdir!r} did not use SWA (config.swa.enabled).")
    restored = restored["swa"]
  variables = {"params": restored["params"]}
  if jax.tree_util.tree_leaves(restored.get("batch_stats", {})):
    variables["batch_stats"] = restored["batch_stats"]
  return Restored(model, variables, config, int(step))

"""The files of a run's work directory: lock, metrics log, JSON records.

* `WorkdirLock`: one run per workdir. ``<workdir>/.lock`` holds the owner's
  process id, host and start time and an exclusive `fcntl.flock`, which the
  kernel releases when the owner dies, so a lock left by a killed run is
  detected as stale and taken over.
* `MetricWriter` / `read_records` / `truncate_records`: ``metrics.jsonl``, one
  JSON record per line; a torn last line (disk full, power loss, a kill inside
  a write) is skipped when read and cut off on resume.
* `write_json`: a JSON file replaced atomically (temporary file + rename),
  world-readable like the rest of the workdir.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import warnings
from typing import Any

import numpy as np

LOCK_NAME = ".lock"
METRICS_NAME = "metrics.jsonl"


class WorkdirLockedError(RuntimeError):
  """Another live run holds the work directory."""


def check_writable_dir(path: str, what: str = "--workdir") -> None:
  """Raises a ValueError unless `path` is, or can be created as, a writable directory.

  Creates nothing: the parents that exist must be writable.
  """
  path = os.path.abspath(path)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise ValueError(f"{what}={path} exists and is not a directory.")
    if not os.access(path, os.W_OK | os.X_OK):
      raise ValueError(f"{what}={path} is not writable.")
    return
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise ValueError(f"{what}={path} cannot be created: {parent} is not a writable "
                     f"directory.")


class WorkdirLock:
  """An exclusive lock on a work directory (a context manager).

  The lock is an `fcntl.flock` on ``<workdir>/.lock``; the file's content names
  the owner for the message a second run gets. Local filesystems only: on NFS
  flock may not be shared between hosts.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    self._fd = None

  def acquire(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
        os.close(fd)
        raise
      owner = os.read(fd, 4096).decode(errors="replace").strip()
      os.close(fd)
      raise WorkdirLockedError(
          f"{os.path.dirname(self.path)} is in use by another run ({owner or 'unknown'}). "
          f"Wait for it to finish, or use another --workdir.") from None
    previous = os.read(fd, 4096).decode(errors="replace").strip()
    if previous:
      warnings.warn(f"Taking over a stale lock on {os.path.dirname(self.path)} "
                    f"(its run is gone: {previous}).")
    owner = {"pid": os.getpid(), "host": socket.gethostname(),
             "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                 timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)  # an empty lock file: the run ended cleanly
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
    return False


def jsonable(value):
  """NumPy and JAX scalars and arrays as Python numbers and lists."""
  if isinstance(value, np.generic) or type(value).__module__.startswith("jax"):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


def read_json(path: str) -> Any | None:
  """The JSON value in `path`, or None when the file is absent or not JSON."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_json(path: str, obj: Any, indent: int | None = 2) -> None:
  """Writes `obj` as JSON to `path` atomically, mode 0644."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=indent, default=jsonable)
    f.write("\n")
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)


def read_records(path: str) -> list[dict]:
  """The records of a metrics log; a torn (unparseable) last line is skipped with a warning.

  Raises:
    ValueError: for an unparseable line before the last (the log is damaged,
      not merely torn).
  """
  with open(path) as f:
    lines = f.read().split("\n")
  records = []
  complete = [l for l in lines[:-1] if l.strip()]  # the text after the last newline is torn
  for i, line in enumerate(complete):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: line {i + 1} is not JSON ({e.msg}).") from None
  if lines[-1].strip():
    warnings.warn(f"{path}: ignoring a torn last line ({len(lines[-1])} characters).")
  return records


def truncate_records(path: str, last_step: int) -> None:
  """Keeps the complete records up to `last_step` (a resume, or a fresh start: 0)."""
  if not os.path.exists(path):
    return
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    records = read_records(path)
  kept = [r for r in records if r.get("step", 0) <= last_step]
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)


def _summary_writer_class():
  """tensorboardX's `SummaryWriter`, imported without importing PyTorch.

  tensorboardX's writer module imports torch at import time when it is
  installed, only for a type annotation (torch tensors are converted lazily, in
  `tensorboardX.x2num`); that import costs about 1.6 s of every run's start on
  a CPU. Where torch is not imported yet, it is hidden for the duration of the
  import (a `None` entry in `sys.modules` makes `import torch` raise
  ImportError, which tensorboardX catches).
  """
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """JSON lines (metrics.jsonl) and TensorBoard events (tensorboardX), on host 0.

  Each record is written with one `write` call of one complete line, so a kill
  leaves at most one torn last line.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_NAME)
    self._tb = None
    if enabled:
      self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: jsonable(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()

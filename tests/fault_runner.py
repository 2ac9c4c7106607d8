"""Runs fastadv-train with one injected fault: SIGKILL at a chosen point.

  python tests/fault_runner.py POINT:N [fastadv-train flags...]

POINT:
  rename   the N-th `os.rename` (orbax's renames inside a checkpoint write and
           its final rename into place; the two renames of a replacement)
           is not performed: the process dies instead;
  save     entry of the N-th `Checkpointer.save`;
  log      the N-th metrics record: half of its line is written, then death;
  replace  the N-th `os.replace` (config.json, summary.json, log truncation).

The library is not modified: the faults are patched in here, in the child
process only. The exit status is -9 (SIGKILL) when the fault fired. In a
multi-process job ($JAX_PROCESS_ID set), $FAULT_PROCESS names the one process
that gets the fault (default: every process).
"""

import os
import signal
import sys


def _die():
  sys.stdout.flush()
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _on_nth(n):
  count = [0]

  def hit():
    count[0] += 1
    return count[0] == n

  return hit


def install(point: str, n: int) -> None:
  from fastadv_jax import checkpoints
  from fastadv_jax import workdir

  hit = _on_nth(n)
  if point in ("rename", "replace"):
    original = getattr(os, point)

    def move(src, dst, *args, **kwargs):
      if hit():
        _die()
      return original(src, dst, *args, **kwargs)

    setattr(os, point, move)
  elif point == "save":
    original = checkpoints.Checkpointer.save

    def save(self, *args, **kwargs):
      if hit():
        _die()
      return original(self, *args, **kwargs)

    checkpoints.Checkpointer.save = save
  elif point == "log":
    original = workdir.MetricWriter.write

    def write(self, step, values):
      if self.enabled and hit():
        import json
        line = json.dumps({"step": int(step), **{k: workdir.jsonable(v)
                                                  for k, v in values.items()}})
        with open(self.path, "a") as f:
          f.write(line[:len(line) // 2])
        _die()
      return original(self, step, values)

    workdir.MetricWriter.write = write
  else:
    raise SystemExit(f"unknown fault point {point!r}")


def main():
  point, n = sys.argv[1].split(":")
  target = os.environ.get("FAULT_PROCESS")
  if target is None or target == os.environ.get("JAX_PROCESS_ID"):
    install(point, int(n))
  from fastadv_jax.cli import train_main
  train_main(["fastadv-train"] + sys.argv[2:])


if __name__ == "__main__":
  main()

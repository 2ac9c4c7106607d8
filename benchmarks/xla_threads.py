"""`--threads` for benchmarks that compare JAX and PyTorch on CPU threads.

Imported before JAX: XLA reads `XLA_FLAGS` once, when JAX creates its backend,
so the one-thread flags must be in the environment by then.
"""

from __future__ import annotations

import argparse
import os

ONE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def preparse_threads(argv) -> int:
  """The `--threads` value of `argv` (default 1); with 1, XLA:CPU's one-thread
  flags are appended to `XLA_FLAGS`. The script's own parser still defines
  `--threads` (for its help and its record)."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--threads", type=int, default=1)
  known, _ = pre.parse_known_args(argv)
  if known.threads == 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + ONE_THREAD_FLAGS).strip()
  return known.threads

"""Starts a multi-process JAX job on this machine: one command, P processes.

  python -m fastadv_jax.launch --processes 2 --devices_per_process 2 -- \\
      fastadv-train --multihost --config configs/cifar10.py:cnn_fgsm --workdir runs/mh

Each process gets JAX's coordinator address, the process count and its index
through $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES and $JAX_PROCESS_ID (read
by `fastadv-train --multihost`), and, with --devices_per_process, that many
simulated CPU devices. Their output is forwarded line by line with a
`[p<i>]` prefix. When one process fails, the others are stopped (SIGTERM,
then SIGKILL after --grace seconds) and the launcher exits with the failed
process's status; rerunning the same command resumes the job.

On SLURM (`srun`) and Cloud TPU pods no launcher is needed: every process runs
the same `fastadv-train --multihost ...` and JAX detects the cluster.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  """A TCP port nothing listens on now (for the coordinator)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(index: int, processes: int, port: int, devices_per_process: int | None,
                base: dict | None = None) -> dict:
  """The environment of process `index` of `processes`."""
  env = dict(os.environ if base is None else base)
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
             JAX_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")
  if devices_per_process:
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(
        flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    env.setdefault("JAX_PLATFORMS", "cpu")
  return env


def _forward(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, b""):
    out.write(prefix + line.decode(errors="replace"))
    out.flush()


def _stop(procs, grace: float) -> None:
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGTERM)
  deadline = time.time() + grace
  for p in procs:
    while p.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    if p.poll() is None:
      p.kill()
  for p in procs:
    p.wait()


def launch(command: list[str], processes: int, *, devices_per_process: int | None = None,
           port: int | None = None, grace: float = 10.0) -> int:
  """Runs `command` in `processes` processes; returns the job's exit status.

  0 when every process exits with 0; otherwise the status of the first
  process that failed (a negative number: killed by that signal), after the
  others were stopped.
  """
  if processes < 1:
    raise ValueError(f"--processes={processes} must be >= 1.")
  if devices_per_process is not None and devices_per_process < 1:
    raise ValueError(f"--devices_per_process={devices_per_process} must be >= 1.")
  if not command:
    raise ValueError("No command given: python -m fastadv_jax.launch --processes P -- CMD ...")
  port = port or free_port()
  procs, threads = [], []
  for i in range(processes):
    p = subprocess.Popen(command, env=process_env(i, processes, port, devices_per_process),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    t = threading.Thread(target=_forward, args=(p.stdout, f"[p{i}] ", sys.stdout), daemon=True)
    t.start()
    procs.append(p)
    threads.append(t)

  def on_signal(signum, frame):
    del frame
    _stop(procs, grace)
    sys.exit(128 + signum)

  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    status = 0
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, status = failed[0]
        sys.stdout.write(f"[launch] process {i} exited with status {status}; stopping the "
                         f"others.\n")
        sys.stdout.flush()
        _stop(procs, grace)
        break
      if all(c == 0 for c in codes):
        break
      time.sleep(0.1)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for t in threads:
    t.join(timeout=5)
  return status


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if "--" in argv:
    split = argv.index("--")
    own, command = argv[:split], argv[split + 1:]
  else:
    own, command = argv, []
  parser = argparse.ArgumentParser(
      prog="python -m fastadv_jax.launch",
      description="Run COMMAND in P local processes joined by JAX's distributed runtime.",
      usage="%(prog)s --processes P [--devices_per_process N] -- COMMAND ...")
  parser.add_argument("--processes", type=int, required=True, help="number of processes")
  parser.add_argument("--devices_per_process", type=int, default=None,
                      help="simulated CPU devices per process (CPU only)")
  parser.add_argument("--port", type=int, default=None, help="coordinator port (free one)")
  parser.add_argument("--grace", type=float, default=10.0,
                      help="seconds between SIGTERM and SIGKILL when stopping the others")
  args = parser.parse_args(own)
  try:
    status = launch(command, args.processes, devices_per_process=args.devices_per_process,
                    port=args.port, grace=args.grace)
  except ValueError as e:
    parser.error(str(e))
  sys.exit(status if status >= 0 else 128 - status)


if __name__ == "__main__":
  main()

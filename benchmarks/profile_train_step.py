"""Where a train step's time goes, JAX and PyTorch side by side, by kind of op.

  python benchmarks/profile_train_step.py --batch 128 --method fgsm

Builds the step exactly as `bench_train_step.py` does (same model, config
variant, batch), runs two warm-up steps, then profiles `--steps` steps:

* JAX with `jax.profiler.trace(..., create_perfetto_trace=True)`: the XLA:CPU
  thunks' events, summed per kind (convolution, transpose/copy, YNNPACK
  fusions, other fusions). On XLA:CPU a convolution's event covers its launch,
  not its work (Eigen runs it on its own pool, outside the trace), so the
  convolutions' time is reported as the step's wall time minus every other
  op's time ("convolution (rest of the step)").
* PyTorch with `torch.profiler` (CPU): self time per aten op, summed per kind.

Prints ms/step per kind for both, then JAX's `--top` slowest single ops with
their HLO (shape; window and dim_labels for convolutions): a convolution
XLA:CPU could not hand to Eigen runs as an emitted loop and shows there with
its whole time. Writes the JSON (`--out`).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train_step as bench  # pylint: disable=g-import-not-at-top,wrong-import-position


def _jax_kind(name: str) -> str | None:
  if name.startswith(("$", "ThunkExecutor", "SlinkyThreadPool", "PjitFunction",
                      "CommonPjRt", "ParseArguments")):
    return None  # Python frames and the executor's own spans, not ops
  base = re.sub(r"\.\d+$", "", name)
  if base.startswith(("convolution", "conv_general_dilated")):
    return "convolution (launch)"
  if "transpose" in base or base.startswith("copy"):
    return "transpose/copy"
  if base.startswith("ynn_fusion"):
    return "YNNPACK fusions (reductions)"
  if "fusion" in base or base.startswith("wrapped"):
    return "other fusions (elementwise)"
  return "other"


def profile_jax(method: str, args, steps: int, top: int = 10) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  case = bench.JaxCase(method, args)
  for _ in range(2):
    case.step()
  start = time.perf_counter()
  for _ in range(steps):
    case.step()
  step_ms = (time.perf_counter() - start) / steps * 1000
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(steps):
        case.step()
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                            recursive=True))[-1]
    with gzip.open(path) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  kinds, ops = collections.Counter(), collections.Counter()
  for event in events:
    if event.get("ph") == "X":
      kind = _jax_kind(event["name"])
      if kind is not None:
        kinds[kind] += event.get("dur", 0) / 1000 / steps
        ops[event["name"]] += event.get("dur", 0) / 1000 / steps
  traced = sum(v for k, v in kinds.items() if k != "convolution (launch)")
  kinds["convolution (rest of the step)"] = step_ms - traced
  kinds.pop("convolution (launch)", None)
  hlo = hlo_attributes(case.compiled.as_text())
  slowest = [{"op": name, "ms": ms, "hlo": hlo.get(name, "")}
             for name, ms in ops.most_common(top)]
  return {"step_ms": step_ms, "kinds_ms": dict(kinds), "slowest_ops": slowest}


def hlo_attributes(text: str) -> dict[str, str]:
  """Per instruction name, its shape and, for convolutions, window and dim_labels.

  A convolution XLA:CPU hands to Eigen shows in the trace as its launch only;
  one it cannot (window reversal, a non-canonical layout) runs as an emitted
  loop and shows with its full time, so the slowest-ops list finds it.
  """
  out = {}
  for line in text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w-]*)\(", line)
    if not match:
      continue
    name, shape, opcode = match.groups()
    extra = " ".join(re.findall(r"(window=\{[^}]*\}|dim_labels=[^,\s]+)", line))
    out[name] = f"{opcode} {shape} {extra}".strip()
  return out


def _torch_kind(name: str) -> str:
  if "conv" in name or "mkldnn" in name:
    return "convolution"
  if "batch_norm" in name:
    return "batch norm"
  if "copy" in name or "contiguous" in name:
    return "transpose/copy"
  return "other"


def profile_torch(method: str, args, steps: int) -> dict:
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=g-import-not-at-top
  step = bench.TorchBench(args).make_step(method)
  for _ in range(2):
    step()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  step_ms = (time.perf_counter() - start) / steps * 1000
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step()
  kinds = collections.Counter()
  for event in prof.key_averages():
    kinds[_torch_kind(event.key)] += event.self_cpu_time_total / 1000 / steps
  return {"step_ms": step_ms, "kinds_ms": dict(kinds)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--method", default="fgsm")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--model", default=None,
                      help="a bench_train_step.py model (default: its PreActResNet-18)")
  parser.add_argument("--widths", default=None, help="e.g. 16,32,64,128")
  parser.add_argument("--set", dest="settings", action="append", default=[],
                      help="name=value: a config setting of the JAX step (as in bench_train_step.py)")
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--top", type=int, default=10, help="slowest single JAX ops to list")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                   "profile_train_step.json"))
  args = parser.parse_args(argv)
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  bench_argv = ["--batch", str(args.batch), "--methods", args.method]
  if args.model:
    bench_argv += ["--model", args.model]
  if args.widths:
    bench_argv += ["--widths", args.widths]
  for setting in args.settings:
    bench_argv += ["--set", setting]
  bench_args = bench.parse_args(bench_argv)
  bench_args.torch_device = "cpu"
  jax_result = profile_jax(args.method, bench_args, args.steps, args.top)
  torch_result = profile_torch(args.method, bench_args, args.steps)
  print(f"{args.method}, batch {args.batch}, ms/step: JAX {jax_result['step_ms']:.0f}, "
        f"PyTorch {torch_result['step_ms']:.0f} "
        f"({jax_result['step_ms'] / torch_result['step_ms']:.2f}x); load average "
        f"{tuple(round(v, 2) for v in os.getloadavg())}")
  for name, result in (("JAX", jax_result), ("PyTorch", torch_result)):
    # Shares of the profiled total (the profiler's own overhead inflates
    # PyTorch's op times over the unprofiled step time).
    total = sum(result["kinds_ms"].values())
    print(f"  {name} (profiled total {total:.0f} ms):")
    for kind, ms in sorted(result["kinds_ms"].items(), key=lambda kv: -kv[1]):
      print(f"    {kind:32s} {ms:8.0f} ms  {100 * ms / total:5.1f}%")
  print("  JAX's slowest single ops (ms/step; Eigen convolutions count their launch only):")
  for row in jax_result["slowest_ops"]:
    print(f"    {row['ms']:8.1f} ms  {row['op']:32s} {row['hlo'][:110]}")
  record = {"benchmark": "profile_train_step", "method": args.method, "batch": args.batch,
            "model": args.model, "settings": args.settings, "widths": args.widths, "steps": args.steps,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": bench.machine_info(bench_args), "load_average_end": os.getloadavg(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "jax": jax_result, "torch": torch_result}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=2, default=str)
  print(f"Wrote {args.out}")


if __name__ == "__main__":
  main()

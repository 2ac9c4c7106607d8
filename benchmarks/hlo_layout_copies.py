"""The transposes and copies in a compiled train step, and what consumes them.

  python benchmarks/hlo_layout_copies.py --batch 128 --method fgsm

Compiles the step exactly as `bench_train_step.py` does (nothing is run) and
reads XLA's optimized HLO: every `transpose` or `copy` of a float array, the
bytes it writes per step, by shape, and for the fusions holding them the kind
of instruction their result feeds (a convolution, ...). This is the op-by-op
check behind `profile_train_step.py`'s "transposes and copies" share
(benchmarks/README.md, "Where the JAX step loses"). JSON goes to `--out`.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_train_step as bench  # pylint: disable=g-import-not-at-top,wrong-import-position
import records  # pylint: disable=g-import-not-at-top,wrong-import-position

_LAYOUT_OP = re.compile(r"\s*%?(\S+) = (f32|bf16|f16)\[([\d,]*)\]\{[\d,]*\} (transpose|copy)\(")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2}


def _computations(text: str) -> dict[str, list[str]]:
  """HLO text split into its computations' instruction lines, by name."""
  comps, current = {}, None
  for line in text.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if header:
      current = header.group(1)
      comps[current] = []
    elif current is not None:
      comps[current].append(line)
  return comps


def _layout_ops(lines):
  """(op, shape, bytes) of each transpose / copy among `lines`."""
  for line in lines:
    m = _LAYOUT_OP.match(line)
    if m:
      shape = tuple(int(d) for d in m.group(3).split(",") if d)
      size = _BYTES[m.group(2)]
      for d in shape:
        size *= d
      yield m.group(4), shape, size


def analyse(text: str, min_bytes: int = 1 << 20) -> dict:
  """Per-shape totals of the transposes and copies, and their fusions' consumers."""
  comps = _computations(text)
  by_shape = collections.Counter()
  count = collections.Counter()
  for lines in comps.values():
    for op, shape, size in _layout_ops(lines):
      by_shape[(op, shape)] += size
      count[(op, shape)] += 1
  fused_bytes = {name: sum(size for _, _, size in _layout_ops(lines))
                 for name, lines in comps.items()}
  all_lines = text.splitlines()
  consumers = collections.Counter()
  for line in all_lines:
    m = re.match(r"\s*%?([\w.\-]+) = .*? fusion\(.*calls=%?([\w.\-]+)", line)
    if not m or fused_bytes.get(m.group(2), 0) < min_bytes:
      continue
    name, kinds = m.group(1), set()
    for other in all_lines:
      if (re.search(rf"[(,\s]%{re.escape(name)}[,)\s]", other)
          and not re.match(rf"\s*%?{re.escape(name)} =", other)):
        op = re.match(r"\s*%?[\w.\-]+ = \S+ (\w[\w\-]*)\(", other)
        kinds.add(op.group(1) if op else "other")
    consumers[",".join(sorted(kinds)) or "the output"] += fused_bytes[m.group(2)]
  return {
      "total_mib": sum(by_shape.values()) / 2**20,
      "instructions": sum(count.values()),
      "by_shape": [{"op": op, "shape": list(shape), "count": count[(op, shape)],
                    "mib": size / 2**20} for (op, shape), size in by_shape.most_common()],
      "fusion_consumers_mib": {k: v / 2**20 for k, v in consumers.most_common()},
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--method", default="fgsm")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--widths", default=None, help="e.g. 16,32,64,128")
  parser.add_argument("--top", type=int, default=12, help="shapes to print")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "hlo_layout_copies.json"))
  args = parser.parse_args(argv)
  bench_argv = ["--batch", str(args.batch), "--no-torch", "--methods", args.method]
  if args.widths:
    bench_argv += ["--widths", args.widths]
  bench_args = bench.parse_args(bench_argv)
  case = bench.JaxCase(args.method, bench_args)
  result = analyse(case.compiled.as_text())
  print(f"{args.method}, batch {args.batch}: {result['instructions']} transposes/copies, "
        f"{result['total_mib']:.0f} MiB written per step")
  for row in result["by_shape"][:args.top]:
    print(f"  {row['mib']:8.1f} MiB  {row['count']:3d}x {row['op']:9s} {tuple(row['shape'])}")
  print("fusions holding them (>= 1 MiB), by what their result feeds:")
  for kind, mib in result["fusion_consumers_mib"].items():
    print(f"  {mib:8.1f} MiB  {kind}")
  record = {"benchmark": "hlo_layout_copies", "method": args.method, "batch": args.batch,
            "widths": args.widths, "date": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"), "machine": bench.machine_info(bench_args), **result}
  records.write_record(args.out, record)


if __name__ == "__main__":
  main()

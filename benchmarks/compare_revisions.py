"""Train-step cost of two revisions of the library, side by side in one run.

Answers "is any method slower than before this change?": runs
`benchmarks/bench_train_step.py --no-torch` from a git revision (`--base`,
exported with `git archive` into a temporary directory) and from this checkout
(its working tree), alternating A B B A ... for `--rounds` rounds so that a
change in the machine's load spreads over both, and prints per method the
median ms/step of each side and their ratio (< 1: this checkout faster).
First, XLA's cost analysis of each side's compiled steps (flops and bytes
accessed: deterministic, unlike timings on a shared machine).

  python benchmarks/compare_revisions.py --base 72f1096 --rounds 2 \\
      --head-set bn_updates=once -- --widths 16,32,64,128 --batch 16 --repeats 5

Arguments after `--` go to both benchmarks (model, batch, repeats, methods);
`--head-set` only to this checkout's (a config setting the base revision may
not have, e.g. `bn_updates=once` to compare with a revision from before that
option existed). Methods only one side knows are listed without a ratio.
Results: the table and benchmarks/results/compare_revisions.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BENCH = os.path.join("benchmarks", "bench_train_step.py")


def export_revision(rev: str, dest: str) -> str:
  """The tree of `rev` written to `dest` (no git metadata); its full commit hash."""
  commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--verify", f"{rev}^{{commit}}"],
                          capture_output=True, text=True)
  if commit.returncode != 0:
    raise SystemExit(f"--base {rev!r} is not a commit of {REPO}: {commit.stderr.strip()}")
  archive = subprocess.Popen(["git", "-C", REPO, "archive", rev], stdout=subprocess.PIPE)
  subprocess.run(["tar", "-x", "-C", dest], stdin=archive.stdout, check=True)
  if archive.wait() != 0:
    raise SystemExit(f"git archive {rev} failed")
  return commit.stdout.strip()


def run_bench(root: str, bench_args: list[str], out: str) -> dict:
  """One run of `root`'s train-step benchmark (its own fastadv_jax), JAX only."""
  env = dict(os.environ, PYTHONPATH=root)
  cmd = [sys.executable, os.path.join(root, BENCH), "--no-torch", "--out", out, *bench_args]
  print("  $ " + " ".join(cmd[1:]), flush=True)
  res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
  if res.returncode != 0:
    raise SystemExit(f"benchmark in {root} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
  with open(out) as f:
    return json.load(f)


# Run inside a revision's checkout: its benchmark's own JaxCase builds and
# compiles each method's step; XLA's cost analysis of the compiled step is
# deterministic, unlike timings on a shared machine.
_COST_DRIVER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("bench", "benchmarks/bench_train_step.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["bench"] = bench
spec.loader.exec_module(bench)
args = bench.parse_args(sys.argv[1:])
out = {}
for name in args.methods_list:
  try:
    out[name] = bench.JaxCase(name, args).info["xla_cost"]
  except Exception as e:  # pylint: disable=broad-except
    out[name] = {"error": f"{type(e).__name__}: {e}"}
print("COST " + json.dumps(out))
"""


def run_cost_analysis(root: str, bench_args: list[str]) -> dict:
  """XLA's flops and bytes accessed of every method's compiled step in `root`."""
  env = dict(os.environ, PYTHONPATH=root)
  cmd = [sys.executable, "-c", _COST_DRIVER, "--no-torch", *bench_args]
  res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
  lines = [l for l in res.stdout.splitlines() if l.startswith("COST ")]
  if res.returncode != 0 or not lines:
    raise SystemExit(f"cost analysis in {root} failed:\n{res.stderr[-3000:]}")
  return json.loads(lines[-1][5:])


def ms_per_step(record: dict) -> dict[str, float]:
  return {name: r["jax"]["ms_per_step"] for name, r in record["results"].items()
          if "ms_per_step" in r.get("jax", {})}


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
  own = argv[:argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--base", required=True, help="git revision to compare against")
  parser.add_argument("--rounds", type=int, default=2,
                      help="timed runs per side, alternating (0: the cost analysis only)")
  parser.add_argument("--head-set", action="append", default=[],
                      help="name=value passed as --set to this checkout's benchmark only")
  parser.add_argument("--out", default=os.path.join(HERE, "results", "compare_revisions.json"))
  parser.add_argument("--rounds-only", action="store_true",
                      help="skip XLA's cost analysis (flops, bytes) of each side's steps")
  args = parser.parse_args(own)
  if args.rounds < 0 or (args.rounds == 0 and args.rounds_only):
    parser.error(f"--rounds={args.rounds}: give >= 1 (0: the cost analysis only)")
  head_args = bench_args + [f"--set={s}" for s in args.head_set]
  times: dict[str, dict[str, list[float]]] = {"base": {}, "head": {}}
  records = []
  with tempfile.TemporaryDirectory(prefix="compare_revisions_") as tmp:
    base_root = os.path.join(tmp, "base")
    os.makedirs(base_root)
    base_commit = export_revision(args.base, base_root)
    print(f"base {args.base} ({base_commit[:12]}) vs this checkout ({REPO}), "
          f"{args.rounds} round(s) each", flush=True)
    costs = {}
    if not args.rounds_only:
      costs = {"base": run_cost_analysis(base_root, bench_args),
               "head": run_cost_analysis(REPO, head_args)}
      print(f"\nXLA cost analysis of the compiled step (deterministic):\n"
            f"{'method':24s} {'GFLOP base':>11s} {'head':>8s} {'ratio':>6s} "
            f"{'GB accessed base':>17s} {'head':>7s} {'ratio':>6s}")
      for name in dict.fromkeys([*costs["head"], *costs["base"]]):
        b, h = costs["base"].get(name, {}), costs["head"].get(name, {})
        cells = []
        for key, scale in (("flops", 1e9), ("bytes accessed", 1e9)):
          if key in b and key in h:
            cells.append(f"{b[key] / scale:11.2f} {h[key] / scale:8.2f} {h[key] / b[key]:6.2f}")
          else:
            cells.append(f"{'-':>11s} {'-':>8s} {'-':>6s}")
        print(f"{name:24s} {cells[0]} {cells[1]:>32s}")
    for r in range(args.rounds):
      order = ("base", "head") if r % 2 == 0 else ("head", "base")
      for side in order:
        root, extra = (base_root, bench_args) if side == "base" else (REPO, head_args)
        record = run_bench(root, extra, os.path.join(tmp, f"{side}_{r}.json"))
        records.append({"side": side, "round": r, "load_average": record.get(
            "load_average_now"), "ms_per_step": ms_per_step(record)})
        for name, ms in ms_per_step(record).items():
          times[side].setdefault(name, []).append(ms)
  methods = list(dict.fromkeys([*times["head"], *times["base"]]))
  rows = []
  print(f"\n{'method':24s} {'base ms':>9s} {'head ms':>9s} {'head/base':>10s}")
  for name in methods:
    b, h = times["base"].get(name), times["head"].get(name)
    mb = statistics.median(b) if b else None
    mh = statistics.median(h) if h else None
    ratio = mh / mb if mb and mh else None
    rows.append({"method": name, "base_ms": mb, "head_ms": mh, "head_over_base": ratio,
                 "base_runs": b, "head_runs": h})
    fmt = lambda v: f"{v:9.1f}" if v is not None else f"{'-':>9s}"
    print(f"{name:24s} {fmt(mb)} {fmt(mh)} "
          f"{(f'{ratio:10.2f}' if ratio is not None else '         -')}")
  head_commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                               text=True).stdout.strip()
  dirty = bool(subprocess.run(["git", "-C", REPO, "status", "--porcelain"],
                              capture_output=True, text=True).stdout.strip())
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"benchmark": "compare_revisions",
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds"),
               "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
               "base": {"revision": args.base, "commit": base_commit},
               "head": {"commit": head_commit, "dirty": dirty, "set": args.head_set},
               "bench_args": bench_args, "cpu_count": os.cpu_count(),
               "cost_analysis": costs, "runs": records, "rows": rows}, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()

"""Lockstep parity of the train step with the authors' PyTorch steps: the table.

For every method (FGSM, FGSM-RS, PGD-2, GradAlign, CURE, IGR, ZeroGrad,
MultiGrad, N-FGSM, FGSM-N + AdvLC, AT for Free) on the single-layer CNN and a
small PreActResNet with BatchNorm in train mode, runs fastadv_jax's train step
and the reference step of `tests/torch_reference/torch_steps.py` side by side
from the same weights, batches and random draws (`tests/torch_reference/
lockstep.py`) and records the relative differences after 1, 10 and 100 steps,
in float64 and float32, with the reference conventions (BatchNorm running
statistics updated on every train-mode forward, the PyTorch 1.4 tie rule at
the box boundary, AT for Free's step-first order). Extra rows show what the
conventions change: `bn_updates="once"`, the current-PyTorch tie rule and
PyTorch's own BatchNorm (unbiased running variance).

  python benchmarks/parity_train_step.py            # ~20 min on 2 CPU cores
  python benchmarks/parity_train_step.py --steps 10 --models cnn   # quick

Writes benchmarks/results/parity_train_step.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
LOCKSTEP = os.path.join(os.path.dirname(HERE), "tests", "torch_reference", "lockstep.py")


def run(args_list, dtype):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if dtype == "float64":
    env["JAX_ENABLE_X64"] = "1"
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    path = f.name
  subprocess.run([sys.executable, LOCKSTEP, "--dtype", dtype, "--json", path] + args_list,
                 env=env, check=True)
  with open(path) as f:
    rows = json.load(f)
  os.unlink(path)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--models", default="cnn,preact")
  parser.add_argument("--methods", default="all")
  parser.add_argument("--out", default=os.path.join(HERE, "results", "parity_train_step.json"))
  args = parser.parse_args()
  common = ["--steps", str(args.steps), "--models", args.models, "--methods", args.methods]
  rows = []
  for dtype in ("float64", "float32"):
    rows += run(common, dtype)
  # What the conventions change (one step, float64, PreActResNet).
  variants = [
      ("bn_updates=once", ["--bn_updates", "once"]),
      ("tie_rule=current", ["--tie_rule", "current"]),
      ("torch BatchNorm (unbiased running var)", ["--unbiased_running_var"]),
  ]
  for label, extra in variants:
    for row in run(["--steps", "1", "--models", "preact",
                    "--methods", "fgsm,pgd2,grad_align,fgsm_n_advlc"] + extra, "float64"):
      row["variant"] = label
      rows.append(row)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"steps": args.steps, "rows": rows}, f, indent=1)
  print(f"\nwrote {args.out}\n")
  print(table(rows))


def table(rows) -> str:
  """Markdown: max relative difference per method, model, dtype and step."""
  main_rows = [r for r in rows if "variant" not in r]
  steps = sorted({r["step"] for r in main_rows})
  lines = ["| model | method | " + " | ".join(f"f64 @{s}" for s in steps) + " | "
           + " | ".join(f"f32 @{s}" for s in steps) + " |",
           "|---|---|" + "---|" * (2 * len(steps))]
  keys = sorted({(r["model"], r["method"]) for r in main_rows},
                key=lambda k: ([r["model"] for r in main_rows].index(k[0]),
                               [r["method"] for r in main_rows].index(k[1])))
  for model, method in keys:
    cells = []
    for dtype in ("float64", "float32"):
      for s in steps:
        match = [r for r in main_rows if (r["model"], r["method"], r["dtype"], r["step"])
                 == (model, method, dtype, s)]
        cells.append(f"{match[0]['max_rel']:.1e}" if match else "-")
    lines.append(f"| {model} | {method} | " + " | ".join(cells) + " |")
  variant_rows = [r for r in rows if "variant" in r]
  if variant_rows:
    lines += ["", "| variant (float64, PreActResNet, 1 step) | method | max rel | BN stats rel |",
              "|---|---|---|---|"]
    for r in variant_rows:
      lines.append(f"| {r['variant']} | {r['method']} | {r['max_rel']:.1e} | {r['bn_stats']:.1e} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()

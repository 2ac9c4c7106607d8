"""How sensitive each exact formulation's parameter gradient is to rounding.

Runs the lockstep harness's JAX train step (`tests/torch_reference/lockstep.py`:
its model, batches, draws and optimizer, float64) and, before every step,
evaluates the step's parameter gradient twice: at the current parameters and
at the parameters multiplied by (1 + 1e-15·z), z ~ N(0, 1), i.e. a change at
the level of float64 rounding. The relative change of the gradient,
‖g(θ') − g(θ)‖ / ‖g(θ)‖, is the rounding error a formulation's arithmetic
amplifies at that state: about 1e-15 for a well-conditioned computation. The
three formulations of `regularizers.exact_grad_penalty` compute the same
mathematical gradient, so where they differ here, the difference is in their
arithmetic, not in the problem.

  JAX_ENABLE_X64=1 python benchmarks/formulation_conditioning.py \\
      --model preact --method igr --steps 10

Writes benchmarks/results/formulation_conditioning_<model>_<method>.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "torch_reference"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lockstep  # noqa: E402
from fastadv_jax import regularizers  # noqa: E402
import records  # noqa: E402

PERTURBATION = 1e-15
EXACT = ("grad_align", "cure", "input_grad_norm")


def _flat_grads(metrics) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(leaf))
                         for leaf in jax.tree_util.tree_leaves(metrics["trace/grads"])])


def sensitivities(model: str, method: str, formulation: str, steps: int, seed: int = 0):
  """Per step: the gradient's relative change under the perturbation, and the CE."""
  case = lockstep.cases()[method]
  for reg in EXACT:
    if reg in case.regularizers:
      case.regularizers[reg] = {**case.regularizers[reg], "formulation": formulation}
  run = lockstep.Lockstep(case, model, "float64", seed=seed)
  rng = np.random.RandomState(seed)  # the harness's own stream of batches and draws
  xs, ys = lockstep._images(rng, steps)  # pylint: disable=protected-access
  perturb = np.random.RandomState(seed + 1)
  rows = []
  for t in range(steps):
    draws = lockstep._draws(case, rng, run.eps)  # pylint: disable=protected-access
    batch = {"image": jnp.asarray(xs[t])[None], "label": jnp.asarray(ys[t], jnp.int32)[None],
             "index": jnp.arange(lockstep.BATCH)[None],
             "noise": {k: jnp.asarray(v)[None] for k, v in draws.items()}}
    state = run.state
    _, metrics = run.step_fn(state, batch)
    moved = state.replace(params=jax.tree_util.tree_map(
        lambda p: p * (1 + PERTURBATION * perturb.standard_normal(p.shape)), state.params))
    _, metrics_moved = run.step_fn(moved, batch)
    g, g_moved = _flat_grads(metrics), _flat_grads(metrics_moved)
    rows.append(dict(step=t + 1, ce=float(np.asarray(metrics["train/ce"])[0]),
                     grad_norm=float(np.linalg.norm(g)),
                     relative_change=float(np.linalg.norm(g_moved - g) / np.linalg.norm(g))))
    run.jax_step(xs[t], ys[t], draws)  # the harness's own step (the PyTorch side is not needed)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="preact", choices=sorted(lockstep.MODELS))
  parser.add_argument("--method", default="igr",
                      choices=[n for n, c in lockstep.cases().items()
                               if set(c.regularizers) & set(EXACT)])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  if not jax.config.jax_enable_x64:
    parser.error("run with JAX_ENABLE_X64=1 in the environment (float64).")
  record = dict(model=args.model, method=args.method, steps=args.steps,
                perturbation=PERTURBATION, machine=platform.processor() or platform.machine(),
                jax=jax.__version__, rows={})
  for formulation in regularizers.FORMULATIONS:
    record["rows"][formulation] = sensitivities(args.model, args.method, formulation, args.steps)
  print(f"{'step':>4} {'CE':>10} " + " ".join(f"{f:>22}" for f in regularizers.FORMULATIONS))
  for t in range(args.steps):
    ce = record["rows"][regularizers.FORMULATIONS[0]][t]["ce"]
    print(f"{t + 1:4d} {ce:10.3g} " + " ".join(
        f"{record['rows'][f][t]['relative_change']:22.1e}" for f in regularizers.FORMULATIONS))
  out = args.out or os.path.join(
      HERE, "results", f"formulation_conditioning_{args.model}_{args.method}.json")
  records.write_record(out, record)


if __name__ == "__main__":
  main()

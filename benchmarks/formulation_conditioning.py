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
      --model preact --method igr --steps 10 [--isolate_at 10]

With `--isolate_at N` it also differentiates λ·penalty alone at the state
before step N, jitted and op by op, for several λ, and the cross-entropy's
curvature term alone at large logits (`cross_entropy_curvature`).

Writes benchmarks/results/formulation_conditioning_<model>_<method>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "torch_reference"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import lockstep  # noqa: E402
from fastadv_jax import closures  # noqa: E402
from fastadv_jax import regularizers  # noqa: E402
import records  # noqa: E402

PERTURBATION = 1e-15


def _flat_grads(metrics) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(leaf))
                         for leaf in jax.tree_util.tree_leaves(metrics["trace/grads"])])


def sensitivities(model: str, method: str, formulation: str, steps: int, seed: int = 0):
  """Per step: the gradient's relative change under the perturbation, and the CE."""
  case = lockstep.with_formulation(lockstep.cases()[method], formulation)
  run = lockstep.Lockstep(case, model, "float64", seed=seed)
  rng = np.random.RandomState(seed)  # the harness's own stream of batches and draws
  xs, ys = lockstep._images(rng, steps)  # pylint: disable=protected-access
  perturb = np.random.RandomState(seed + 1)
  rows = []
  for t in range(steps):
    draws = lockstep._draws(case, rng, run.eps)  # pylint: disable=protected-access
    state = run.state
    moved = state.replace(params=jax.tree_util.tree_map(
        lambda p: p * (1 + PERTURBATION * perturb.standard_normal(p.shape)), state.params))
    _, metrics_moved = run.step_fn(moved, run.batch(xs[t], ys[t], draws))
    metrics = run.jax_step(xs[t], ys[t], draws)  # at `state`; advances the harness
    g, g_moved = _flat_grads(metrics), _flat_grads(metrics_moved)
    rows.append(dict(step=t + 1, ce=float(metrics["train/ce"]),
                     grad_norm=float(np.linalg.norm(g)),
                     relative_change=float(np.linalg.norm(g_moved - g) / np.linalg.norm(g))))
  return rows


def isolated(model: str, method: str, at_step: int, weights, seed: int = 0):
  """At the state before step `at_step`: the sensitivity of λ·penalty's gradient alone.

  The penalty (IGR or CURE, batch-mode BatchNorm, the step's clean batch) is
  differentiated jitted and op by op (`jax.disable_jit`), for each λ in
  `weights` and each formulation; also its distance to double backprop.
  """
  case = lockstep.cases()[method]
  (name, hparams), = [(n, h) for n, h in case.regularizers.items()
                      if n in lockstep.EXACT_PENALTIES]
  fn = regularizers.REGULARIZER_SPECS[name].fn
  hparams = {k: v for k, v in hparams.items() if k != "weight"}
  run = lockstep.Lockstep(case, model, "float64", seed=seed)
  rng = np.random.RandomState(seed)
  xs, ys = lockstep._images(rng, at_step)  # pylint: disable=protected-access
  for t in range(at_step - 1):
    run.jax_step(xs[t], ys[t], lockstep._draws(case, rng, run.eps))  # pylint: disable=protected-access
  host = jax.tree_util.tree_map(lambda a: np.asarray(a[0]), run.state)
  x, y = jnp.asarray(xs[at_step - 1]), jnp.asarray(ys[at_step - 1])
  perturb = np.random.RandomState(seed + 1)
  moved = jax.tree_util.tree_map(
      lambda p: p * (1 + PERTURBATION * perturb.standard_normal(p.shape)), host.params)
  extra = {"eps": run.eps} if name == "cure" else {}

  def penalty_grad(formulation, weight):
    def weighted(params):
      variables = {"params": params, "batch_stats": host.batch_stats}
      logits_fn = closures.logits_fn(run.jax_model, variables, bn="batch")
      loss_fn = closures.cross_entropy(logits_fn, y)
      return weight * fn(loss_fn, x, formulation=formulation, **extra, **hparams)
    return jax.grad(weighted)

  def flat(tree):
    return np.concatenate([np.ravel(np.asarray(l)) for l in jax.tree_util.tree_leaves(tree)])

  rows = []
  for weight in weights:
    for eager in (False, True):
      grads = {}
      for formulation in regularizers.FORMULATIONS:
        grad = penalty_grad(formulation, weight)
        with (jax.disable_jit() if eager else contextlib.nullcontext()):
          g = flat((grad if eager else jax.jit(grad))(host.params))
          g_moved = flat((grad if eager else jax.jit(grad))(moved))
        grads[formulation] = g
        rows.append(dict(weight=weight, jit=not eager, formulation=formulation,
                         relative_change=float(np.linalg.norm(g_moved - g) / np.linalg.norm(g))))
      reference = grads["reverse_over_reverse"]
      for row in rows[-len(grads):]:
        row["vs_double_backprop"] = float(np.linalg.norm(grads[row["formulation"]] - reference)
                                          / np.linalg.norm(reference))
  return rows


def cross_entropy_curvature(scales=(1.0, 1e6, 1e11), weights=(1.0, 3.90625), seed: int = 0):
  """The cross-entropy alone: ∇_l of λ·d/dt CE(l + t v) (a plain `jax.jvp` under
  `jax.grad`, without the library's unit cotangent) against ∇_l of
  λ·⟨∇_l CE(l), v⟩ (double backprop), jitted, logits and v of the given scale.

  At large logits the softmax is one-hot in float64 and the exact value is 0.
  """
  rng = np.random.RandomState(seed)
  labels = jnp.asarray(rng.randint(0, 10, 8))
  loss = closures.cross_entropy(lambda logits: logits, labels)
  rows = []
  for scale in scales:
    logits, v = (jnp.asarray(rng.randn(8, 10) * scale) for _ in range(2))
    for weight in weights:
      rof = jax.jit(jax.grad(lambda l, w=weight: w * jax.jvp(loss, (l,), (v,))[1]))(logits)
      ror = jax.jit(jax.grad(lambda l, w=weight: w * jnp.vdot(jax.grad(loss)(l), v)))(logits)
      rows.append(dict(scale=scale, weight=weight,
                       reverse_over_forward_norm=float(jnp.linalg.norm(rof)),
                       reverse_over_reverse_norm=float(jnp.linalg.norm(ror)),
                       difference=float(jnp.linalg.norm(rof - ror))))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="preact", choices=sorted(lockstep.MODELS))
  parser.add_argument("--method", default="igr",
                      choices=[n for n, c in lockstep.cases().items()
                               if set(c.regularizers) & set(lockstep.EXACT_PENALTIES)])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--isolate_at", type=int, default=0,
                      help="also differentiate λ·penalty alone at the state before this "
                           "step, jitted and op by op, for each --weights λ")
  parser.add_argument("--weights", default="1,2,3.90625,0.1")
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
  if args.isolate_at:
    weights = [float(w) for w in args.weights.split(",")]
    record["isolated"] = dict(at_step=args.isolate_at, rows=isolated(
        args.model, args.method, args.isolate_at, weights))
    print(f"\nλ·penalty alone at the state before step {args.isolate_at}: relative change "
          f"(distance to double backprop)")
    for row in record["isolated"]["rows"]:
      print(f"  λ={row['weight']:<8g} {'jit ' if row['jit'] else 'eager'} "
            f"{row['formulation']:22s} {row['relative_change']:.1e} "
            f"({row['vs_double_backprop']:.1e})")
    record["cross_entropy_curvature"] = cross_entropy_curvature()
    print("\nThe cross-entropy alone, ∇_l λ·(curvature along v), logits of scale s: "
          "norms plain jvp under grad / double backprop")
    for row in record["cross_entropy_curvature"]:
      print(f"  s={row['scale']:<6g} λ={row['weight']:<8g} {row['reverse_over_forward_norm']:.2e}"
            f" / {row['reverse_over_reverse_norm']:.2e}")
  out = args.out or os.path.join(
      HERE, "results", f"formulation_conditioning_{args.model}_{args.method}.json")
  records.write_record(out, record)


if __name__ == "__main__":
  main()

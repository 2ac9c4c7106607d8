r"""Linearization error vs the ℓ2 norm of δ at a fixed ℓ∞ norm (GradAlign App. C.1).

The GradAlign paper argues that what matters for catastrophic overfitting is
the ℓ2 norm of the perturbation (FGSM-RS works at ε = 8/255 because its δ is
shorter, Lemma 1): for δ of fixed ℓ∞ norm ε, the linearization error
|ℓ(x+δ) − ℓ(x) − ⟨δ, ∇ℓ(x)⟩| of a network grows with ‖δ‖₂, and far faster for a
network after catastrophic overfitting, whose loss is highly non-linear inside
the ε-ball.

δ has exactly a fraction f of its coordinates at ±ε and the rest 0, so
‖δ‖∞ = ε and ‖δ‖₂ = ε√(f·d) (metrics.linearization_error_curve); the signs are
random or those of the input gradient (a partial FGSM step). Measured per
example (the CNN has no BatchNorm) on n random CIFAR-10 test points for the
"best" (before CO) and "last" (after CO) checkpoints of a
`configs/cifar10.py:cnn_fgsm` run.

  python experiments/linearization_error.py                  # /tmp/runs/cnn_fgsm, ~2 min
  python experiments/linearization_error.py --workdir runs/cnn_fgsm --full   # n=1000

Writes experiments/results/linearization_error.json and .png.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import _common

FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  _common.add_common_args(parser, full_help="n=1000 test points, 5 draws of δ")
  parser.add_argument("--workdir", default="/tmp/runs/cnn_fgsm",
                      help="work directory of a cnn_fgsm run")
  parser.add_argument("--checkpoints", nargs="+", default=["best", "last"],
                      choices=["best", "last"])
  parser.add_argument("--n", type=int, default=None, help="test points (256; --full 1000)")
  parser.add_argument("--draws", type=int, default=None,
                      help="random draws of δ per point (2; --full 5)")
  parser.add_argument("--eps", type=float, default=10.0, help="ℓ∞ norm in /255 (the run's: 10)")
  parser.add_argument("--batch", type=int, default=256)
  args = parser.parse_args(argv)
  n = args.n or (1000 if args.full else 256)
  draws = args.draws or (5 if args.full else 2)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  from fastadv_jax import closures, metrics, restore  # pylint: disable=g-import-not-at-top
  from cnn_filters import checkpoint_info  # pylint: disable=g-import-not-at-top

  rec = _common.Record("linearization_error", args)
  x_all, y_all, idx = _common.random_test_points(n, args.seed)
  eps = args.eps / 255.0
  d = int(np.prod(x_all.shape[1:]))

  results = {}
  for which in args.checkpoints:
    try:
      model, variables, _, _ = restore.restore_for_eval(args.workdir, which)
    except FileNotFoundError as e:
      print(f"skipping {which}: {e}")
      continue
    logits_fn = closures.eval_logits_fn(model, variables)

    @jax.jit
    def curves(logits_fn, xb, yb, key):
      loss_fn = closures.cross_entropy(logits_fn, yb)
      out = {}
      for direction in metrics.LINEARIZATION_DIRECTIONS:
        norms, errors = metrics.linearization_error_curve(
            loss_fn, xb, key, eps=eps, fractions=FRACTIONS, direction=direction,
            per_example=True)
        out[direction] = errors          # (fractions, B)
      return norms, out, loss_fn.with_aux(xb)[1].losses

    errs = {k: [] for k in metrics.LINEARIZATION_DIRECTIONS}
    clean_losses = []
    norms = None
    steps = [(draw, i) for draw in range(draws) for i in range(0, n, args.batch)]
    for draw, i in tqdm(steps, desc=which, disable=args.no_progress):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(args.seed), draw), i)
      norms, out, losses = curves(logits_fn, jnp.asarray(x_all[i:i + args.batch]),
                                  jnp.asarray(y_all[i:i + args.batch]), key)
      for k, v in out.items():
        errs[k].append(np.asarray(v))
      if draw == 0:
        clean_losses.append(np.asarray(losses))
    norms = np.asarray(norms)
    entry = {"checkpoint": checkpoint_info(args.workdir, which),
             "clean_loss_mean": float(np.mean(np.concatenate(clean_losses))),
             "l2_norms": norms.tolist(), "curves": {}}
    for k, v in errs.items():
      e = np.concatenate(v, axis=1)       # (fractions, n * draws)
      entry["curves"][k] = {"mean": e.mean(1).tolist(), "median": np.median(e, 1).tolist(),
                            "q25": np.quantile(e, 0.25, 1).tolist(),
                            "q75": np.quantile(e, 0.75, 1).tolist()}
    results[which] = entry

  if not results:
    raise SystemExit(f"No checkpoint to analyse in {args.workdir}.")
  rec["setting"] = {
      "workdir": os.path.abspath(args.workdir), "eps_255": args.eps, "dim": d, "n": n,
      "draws_per_point": draws, "fractions": list(FRACTIONS),
      "selection": f"random CIFAR-10 test points, seed {args.seed}",
      "test_indices_head": idx[:16].tolist(), "seed": args.seed,
      "error": "|l_i(x+δ) − l_i(x) − <δ, ∇l_i(x)>| per example, CE, eval mode, x+δ not "
               "box-clipped", "fgsm_l2_norm": eps * np.sqrt(d),
      "fgsm_rs_l2_norm_lemma1_alpha_1.25eps": metrics.lemma1_fgsm_rs_norm_bound(
          eps, 1.25 * eps, d)}
  rec["results"] = results

  plt = _common.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, direction in zip(axes, metrics.LINEARIZATION_DIRECTIONS):
    for k, (which, res) in enumerate(results.items()):
      c = res["curves"][direction]
      label = f"{which} (epoch {res['checkpoint'].get('epoch', 0):.0f})"
      ax.plot(res["l2_norms"], c["mean"], marker="o", ms=3, color=f"C{k}",
              label=label + ", mean")
      ax.plot(res["l2_norms"], c["median"], ls="--", color=f"C{k}", label=label + ", median")
      ax.fill_between(res["l2_norms"], c["q25"], c["q75"], color=f"C{k}", alpha=0.15)
    ax.axvline(rec["setting"]["fgsm_l2_norm"], color="gray", ls=":", lw=1)
    ax.axvline(rec["setting"]["fgsm_rs_l2_norm_lemma1_alpha_1.25eps"], color="gray",
               ls="-.", lw=1)
    ax.text(rec["setting"]["fgsm_l2_norm"], 1e-3, " FGSM", fontsize=7, color="gray")
    ax.text(rec["setting"]["fgsm_rs_l2_norm_lemma1_alpha_1.25eps"], 3e-3, "FGSM-RS ",
            fontsize=7, color="gray", ha="right")
    ax.set(xlabel=r"$\|\delta\|_2$ (with $\|\delta\|_\infty$ = ε = "
                  f"{args.eps:g}/255)", yscale="log",
           title=f"{direction} signs" + (" (partial FGSM)" if direction == "gradient" else ""))
    ax.legend(fontsize=7)
  axes[0].set_ylabel("linearization error (shaded: 25-75%)")
  fig.suptitle(f"Single-layer CNN (FGSM-trained): linearization error, n={n} x {draws} draws",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(rec.path("png"), dpi=120)

  rows = []
  for which, res in results.items():
    for j, norm in enumerate(res["l2_norms"]):
      if FRACTIONS[j] in (0.01, 0.1, 0.5, 1.0):
        rows.append([which, f"{FRACTIONS[j]:g}", f"{norm:.3f}",
                     f"{res['curves']['random']['mean'][j]:.4f}",
                     f"{res['curves']['gradient']['mean'][j]:.4f}"])
  table = _common.fmt_table(["checkpoint", "fraction of ±ε coords", "‖δ‖₂",
                             "error, random signs (mean)", "error, gradient signs (mean)"],
                            rows)
  print(table)
  rec["table_markdown"] = table
  rec.save()


if __name__ == "__main__":
  main()

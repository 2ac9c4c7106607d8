r"""Single-step methods and catastrophic overfitting (GradAlign Fig. 1 / Table 4's message).

FGSM and FGSM-RS suffer catastrophic overfitting (CO) at larger ε (PGD accuracy
collapses to ~0 while the accuracy at the FGSM point x + δ_FGSM rises), FGSM +
GradAlign does not. This
script trains each method at ε = 8/255 and 16/255 with
`fastadv_jax.train.train_and_evaluate` (config overrides on
configs/cifar10.py variants) and reports the final clean and PGD accuracy, the
gradient alignment, and whether the catastrophic-overfitting monitor fired.

Two scales:

* CPU (default, ~20 min on a loaded 2-core machine): the single-layer CNN of
  GradAlign §4 (`simple_cnn`, 4 filters, Adam lr_max 0.003, cyclic schedule) —
  the paper's own minimal CO model — on a random 10,000-image subset of the
  CIFAR-10 training set for 8 epochs, 1 seed; per-epoch evaluation on 500
  random test points (PGD-10), final PGD-20-1 on 1,000 random test points.
  A PreActResNet does not train to a meaningful accuracy in that budget.
* GPU (`--full`): the published setting of each method (configs/cifar10.py
  variants unchanged: PreActResNet-18, 30 epochs, full training set), final
  PGD-50-10 on 1,000 random test points, 5 seeds.

Methods (--methods): fgsm, fgsm_rs, gradalign (default), and zerograd,
multigrad, n_fgsm (configs/cifar10.py variants of the same names).

The library's subsets (`data.train_subset`, the per-epoch evaluation set) take
the first examples of the split, so the script trains and evaluates from a
seeded shuffled .npz (`data.local_path`): random subsets, recorded by seed.

The CO monitor (fastadv_jax.monitor) looks for a *drop* of PGD accuracy; when
CO sets in before any PGD accuracy has built up there is nothing to drop from,
so the table also reports the signature that remains: accuracy at x + δ_FGSM
above clean accuracy while PGD accuracy is ~0.

The per-epoch evaluation is the run's named evaluation `test`
(`config.evals.test`; metrics.jsonl keys `test/...`, runs from before named
evaluations logged `eval/...` and are read too). Each run's "curve" holds
`fgsm_point` (accuracy at x + δ_FGSM whatever the clean prediction: the CO
signature, what older logs called FGSM accuracy) and `fgsm_robust` (correct at
x and at x + δ_FGSM; None for old logs); "last_eval" the last evaluation's
metrics with the library's names (`fgsm_acc` robust, `fgsm_point_acc`), and the
summary `fgsm_point_acc_last_eval_mean`.

  python experiments/co_single_vs_multi.py
  python experiments/co_single_vs_multi.py --full          # GPU, hours
  python experiments/co_single_vs_multi.py --methods fgsm n_fgsm --eps 16

Writes experiments/results/co_single_vs_multi.json and .png (runs' work
directories under $FASTADV_EXPERIMENTS_SCRATCH, default /tmp/fastadv_experiments).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

import _common

METHODS = ("fgsm", "fgsm_rs", "gradalign", "zerograd", "multigrad", "n_fgsm")


def make_config(method: str, eps: float, seed: int, args, data_path: str):
  """The config of one run: the method's variant, then the experiment's overrides."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = _common.load_cifar10_config(method)
  config.eps = float(eps)
  config.seed = int(seed)
  config.data.source = "local"
  config.data.local_path = data_path
  config.data.train_subset = 0
  config.log_every_steps = 20
  # The per-epoch evaluation ("test", read by the CO monitor): the first eval_n
  # points of the shuffled test split (= random points), PGD-10-1.
  config.evals.test.update(n=args.eval_n, pgd_steps=10, pgd_restarts=1)
  config.final_eval.update(enabled=True, n=args.final_n, steps=args.final_steps,
                           restarts=args.final_restarts, rule="strict")
  if args.epochs:
    config.num_epochs = args.epochs
  if not args.full:
    # One training setup for every method: the single-layer CNN of GradAlign §4.
    config.model.name = "simple_cnn"
    config.model.kwargs = ml_collections.ConfigDict(dict(filters=args.filters))
    config.dtype = "float32"
    config.optimizer.update(name="adam", weight_decay=5e-4, momentum=0.9, nesterov=False,
                            cycle_momentum=False)
    config.schedule.name = "cyclic"
    config.schedule.lr_max = args.lr_max
    config.schedule.kwargs = ml_collections.ConfigDict(dict(peak_fraction=0.4))
    config.augment.update(padding=4, pad_mode="zero", flip=True, rotation=0.0)
    config.batch_size = 128
    # best/ = the state of highest per-epoch test PGD accuracy: here the
    # pre-collapse state to analyse, not a model selection (its accuracy is
    # optimistic: chosen on the points it is measured on); no early stop.
    config.best.update(eval="test", metric="pgd_acc", stop_on_drop=False)
  return config


def run_one(method, eps, seed, args, data_path, progress):
  from fastadv_jax import methods  # pylint: disable=g-import-not-at-top
  from fastadv_jax import monitor  # pylint: disable=g-import-not-at-top
  from fastadv_jax import plotting  # pylint: disable=g-import-not-at-top
  from fastadv_jax import train  # pylint: disable=g-import-not-at-top
  config = make_config(method, eps, seed, args, data_path)
  scale = "full" if args.full else "cpu"
  workdir = os.path.join(_common.SCRATCH_DIR, "co_single_vs_multi",
                         f"{scale}_{method}_eps{eps:g}_seed{seed}")
  summary_path = os.path.join(workdir, "summary.json")
  if args.fresh and os.path.isdir(workdir):
    shutil.rmtree(workdir)
  wall_path = os.path.join(workdir, "experiment_wall_time.json")
  t0 = time.time()
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    reused = True
    wall = None
    if os.path.exists(wall_path):
      with open(wall_path) as f:
        wall = json.load(f)["wall_time_s"]
  else:
    summary = train.train_and_evaluate(config, workdir, progress=progress)
    reused = False
    wall = time.time() - t0
    with open(wall_path, "w") as f:
      json.dump({"wall_time_s": wall}, f)
  records = plotting.read_metrics(workdir)
  # The per-epoch "test" evaluation (runs from before named evaluations, reused
  # from the scratch directory, logged it as "eval/..."; read both).
  evals = _common.eval_curve(records, "test")
  last = _common.last_eval(summary, "test")
  final = summary.get("final_eval", {}).get("last", {})
  final_best = summary.get("final_eval", {}).get("best", {})
  events = summary.get("co_events") or monitor.replay(records, eval_name="test")
  built = methods.build_method(config)
  lam = {r.name: r.weight for r in built.regularizers}
  return {
      "method": method, "eps_255": eps, "seed": seed, "workdir": workdir,
      "reused_finished_run": reused,
      "wall_time_s": None if wall is None else round(wall, 1),  # training + evaluations
      "model": config.model.name, "model_kwargs": dict(config.model.kwargs),
      "attack": config.attack.name, "attack_step_255": (
          None if built.attack.step is None else built.attack.step * 255),
      "regularizers": lam, "epochs": config.num_epochs, "steps": summary.get("step"),
      "final_clean_acc": final.get("clean_acc"),
      "final_clean_n": final.get("n_clean"),
      "final_pgd_acc": final.get("robust_acc"),
      "final_pgd_n": final.get("n_robust"),
      "best_checkpoint_clean_acc": final_best.get("clean_acc"),
      "best_checkpoint_pgd_acc": final_best.get("robust_acc"),
      "final_pgd_attack": (f"PGD-{config.final_eval.steps}-{config.final_eval.restarts} "
                           f"(α=ε/4, {config.final_eval.rule} restart rule)"),
      # The last per-epoch evaluation, unprefixed: fgsm_acc is robust (correct at
      # x and x+δ_FGSM), fgsm_point_acc the accuracy at x+δ_FGSM.
      "last_eval": last,
      "max_eval_pgd_acc": max((r["pgd_acc"] for r in evals), default=None),
      "train_seconds": summary.get("train_seconds_this_session"),
      "co_monitor_fired": bool(events),
      # The monitor looks for a *drop* of PGD accuracy; when CO comes before any
      # robustness has built up (the CNN at ε=16) there is nothing to drop from.
      # The signature that remains: the training attack's perturbation *raises*
      # accuracy (accuracy at the FGSM point x+δ_FGSM above clean accuracy) while
      # PGD accuracy ~ 0.
      "co_signature_last_eval": bool(evals) and (
          evals[-1]["fgsm_point_acc"] > evals[-1]["clean_acc"] and
          evals[-1]["pgd_acc"] < 0.02),
      "co_events": events,
      # fgsm_point: accuracy at x+δ_FGSM whatever the clean prediction (the CO
      # signature; the old logs' "FGSM accuracy"); fgsm_robust: correct at x and
      # at x+δ_FGSM (None for runs from before named evaluations).
      "curve": [{"epoch": r["epoch"], "clean": r["clean_acc"],
                 "fgsm_point": r["fgsm_point_acc"], "fgsm_robust": r.get("fgsm_acc"),
                 "pgd": r["pgd_acc"], "grad_alignment": r["grad_alignment"],
                 "cos_fgsm_pgd": r.get("cos_fgsm_pgd")} for r in evals],
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  _common.add_common_args(parser, full_help="published GPU setting: each variant's config, "
                          "30 epochs, full data, PGD-50-10 on 1000 points, 5 seeds")
  parser.add_argument("--methods", nargs="+", default=["fgsm", "fgsm_rs", "gradalign"],
                      choices=METHODS)
  parser.add_argument("--eps", type=float, nargs="+", default=[8.0, 16.0], help="ε in /255")
  parser.add_argument("--seeds", type=int, nargs="+", default=None,
                      help="default: [0] (CPU), 0 1 2 3 4 (--full)")
  parser.add_argument("--epochs", type=int, default=None, help="default 8 (CPU), 30 (--full)")
  parser.add_argument("--train-n", type=int, default=None,
                      help="random training subset (default 10000 CPU, 0 = all for --full)")
  parser.add_argument("--eval-n", type=int, default=None,
                      help="per-epoch evaluation points (default 500 CPU, 1000 --full)")
  parser.add_argument("--final-n", type=int, default=1000, help="final PGD points")
  parser.add_argument("--final-steps", type=int, default=None, help="default 20 CPU, 50 --full")
  parser.add_argument("--final-restarts", type=int, default=None, help="default 1 CPU, 10 --full")
  parser.add_argument("--filters", type=int, default=4, help="CPU model: simple_cnn filters")
  parser.add_argument("--lr-max", type=float, default=0.003, help="CPU model: Adam lr_max")
  parser.add_argument("--fresh", action="store_true",
                      help="delete earlier work directories instead of reusing finished runs")
  args = parser.parse_args(argv)
  args.seeds = args.seeds or ([0, 1, 2, 3, 4] if args.full else [0])
  args.epochs = args.epochs or (None if args.full else 8)
  args.train_n = (0 if args.full else 10000) if args.train_n is None else args.train_n
  args.eval_n = args.eval_n or (1000 if args.full else 500)
  args.final_steps = args.final_steps or (50 if args.full else 20)
  args.final_restarts = args.final_restarts or (10 if args.full else 1)

  rec = _common.Record("co_single_vs_multi", args)
  data_path = _common.shuffled_cifar10_npz(args.train_n, 0, args.seed)
  runs = []
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  grid = [(e, m, s) for e in args.eps for m in args.methods for s in args.seeds]
  for eps, method, seed in tqdm(grid, desc="runs", disable=args.no_progress):
    r = run_one(method, eps, seed, args, data_path, progress=not args.no_progress)
    runs.append(r)
    tqdm.write(f"{method} ε={eps:g} seed={seed}: clean {r['final_clean_acc']:.3f}, "
               f"PGD {r['final_pgd_acc']:.3f}, CO fired: {r['co_monitor_fired']} "
               f"({r['wall_time_s']} s)")
    rec["runs"] = runs
    rec.save()  # partial results survive an interrupted sweep

  # Aggregate over seeds.
  table_rows, summary = [], []
  for eps in args.eps:
    for method in args.methods:
      rs = [r for r in runs if r["method"] == method and r["eps_255"] == eps]
      clean = np.array([r["final_clean_acc"] for r in rs], float) * 100
      pgd = np.array([r["final_pgd_acc"] for r in rs], float) * 100
      align = np.array([r["last_eval"].get("grad_alignment", np.nan) for r in rs], float)
      fired = sum(r["co_monitor_fired"] for r in rs)
      signature = sum(r["co_signature_last_eval"] for r in rs)
      # Accuracy at the FGSM point (not the robust FGSM accuracy): the CO signature.
      fgsm_last = np.array([r["last_eval"].get("fgsm_point_acc", np.nan) for r in rs],
                           float) * 100
      summary.append({"method": method, "eps_255": eps, "n_seeds": len(rs),
                      "clean_mean": clean.mean(), "clean_std": clean.std(),
                      "pgd_mean": pgd.mean(), "pgd_std": pgd.std(),
                      "grad_alignment_last_mean": float(np.nanmean(align)),
                      "fgsm_point_acc_last_eval_mean": float(np.nanmean(fgsm_last)),
                      "co_fired_runs": fired, "co_signature_runs": signature})

      def pm(v):
        return f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f}±{v.std():.1f}"
      table_rows.append([method, f"{eps:g}", pm(clean), pm(pgd), pm(fgsm_last),
                         f"{np.nanmean(align):.3f}", f"{fired}/{len(rs)}",
                         f"{signature}/{len(rs)}"])
  attack = runs[0]["final_pgd_attack"] if runs else ""
  table = _common.fmt_table(
      ["method", "ε (/255)", "clean % (full test set)",
       f"robust % ({attack}, n={args.final_n})",
       f"acc. at x+δ_FGSM % (last eval, n={args.eval_n})", "grad. alignment (last eval)",
       "CO monitor fired", "CO signature (acc. at x+δ_FGSM > clean, PGD < 2%)"], table_rows)
  print(table)
  rec["setting"] = {
      "scale": "full (GPU)" if args.full else "cpu",
      "model": runs[0]["model"] if runs else None,
      "train_subset": args.train_n or "all 50000", "train_selection": "random (shuffled npz)",
      "epochs": args.epochs or "variant default (30)",
      "eval_n_per_epoch": args.eval_n, "final_pgd": attack, "final_n": args.final_n,
      "final_selection": "first n of a seeded shuffle of the test set = random points",
      "seeds": args.seeds, "data_shuffle_seed": args.seed}
  rec["summary"] = summary
  rec["table_markdown"] = table

  plt = _common.pyplot()
  fig, axes = plt.subplots(len(args.eps), 2, figsize=(11, 3.8 * len(args.eps)), squeeze=False)
  for i, eps in enumerate(args.eps):
    for j, (key, label) in enumerate((("pgd", "PGD-10 accuracy (%)"),
                                      ("grad_alignment", "gradient alignment"))):
      ax = axes[i, j]
      for k, method in enumerate(args.methods):
        for r in (r for r in runs if r["method"] == method and r["eps_255"] == eps):
          xs = [c["epoch"] for c in r["curve"]]
          ys = [c[key] * (100 if key == "pgd" else 1) for c in r["curve"]]
          ax.plot(xs, ys, marker="o", ms=3, color=f"C{k}",
                  label=method if r["seed"] == args.seeds[0] else None)
          if key == "pgd":
            ax.plot(xs, [c["fgsm_point"] * 100 for c in r["curve"]], ls=":", color=f"C{k}")
      ax.set(xlabel="epoch", ylabel=label, title=f"ε = {eps:g}/255" + (
          " (dotted: accuracy at x+δ_FGSM)" if key == "pgd" else ""))
      if key == "grad_alignment":
        ax.set_ylim(0, 1.02)
      ax.legend(fontsize=8)
  fig.suptitle(f"{rec.data['setting']['model']}, {rec.data['setting']['scale']} scale: "
               f"single-step methods and catastrophic overfitting")
  fig.tight_layout()
  fig.savefig(rec.path("png"), dpi=110)
  rec.save()


if __name__ == "__main__":
  main()

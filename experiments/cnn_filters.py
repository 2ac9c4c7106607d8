r"""The single-layer CNN after catastrophic overfitting (GradAlign §4, App. C.2).

GradAlign trains a one-layer CNN (3×3 conv, 4 filters, ReLU, linear) with FGSM
at ε = 10/255 and observes catastrophic overfitting (CO): PGD accuracy drops to
~0 while the accuracy at the FGSM point x + δ_FGSM rises, gradient alignment
falls, and one filter becomes
a Laplace-like edge detector whose norm and outgoing weights grow; zeroing that
filter lifts gradient alignment from 0.08 back to 0.71 (REFERENCE.md).

Given the work directory of `fastadv-train --config configs/cifar10.py:cnn_fgsm`
this script measures, for the "best" (highest monitored PGD accuracy, before CO)
and "last" (end of training) checkpoints:

* each filter's ℓ2 norm, bias, the ℓ2 norm of its outgoing linear weights, and
  its |cosine| with the 4- and 8-neighbour Laplace kernels (channel-averaged);
* gradient alignment E cos(∇ℓ(x), ∇ℓ(x+η)) (metrics.gradient_alignment, η ~
  U[-ε, ε], x+η clipped to the box), clean accuracy, FGSM accuracy (both the
  accuracy at the FGSM point, `fgsm_point_acc`, the CO signature, and the
  robust one, `fgsm_robust_acc`: correct at x and x + δ_FGSM) and PGD-k-r
  accuracy on n random CIFAR-10 test points;
* the same after zeroing the filter of largest norm (its kernel, bias and
  outgoing weights), and after zeroing each other filter in turn;

and plots the filters (3×3×3 as RGB, each normalized to [0, 1]) and the run's
training curves (metrics.jsonl, the evaluation its CO monitor read, `test` by
default: clean accuracy, accuracy at the FGSM point, robust FGSM and PGD
accuracy, gradient alignment per epoch; runs from before named evaluations
logged `eval/...`, where "FGSM accuracy" was the accuracy at the FGSM point).
If the run has not finished, it waits for
<workdir>/summary.json up to --wait-minutes, then analyses whatever checkpoints
exist and records their step and epoch. With --train it first trains its own
short CPU-scale run (a random 10k-image subset; see --train-epochs).

  python experiments/cnn_filters.py                        # /tmp/runs/cnn_fgsm, ~5 min
  python experiments/cnn_filters.py --workdir runs/cnn_fgsm --full   # n=10000, PGD-50-10
  python experiments/cnn_filters.py --train                # own short run first

Writes experiments/results/cnn_filters.json, cnn_filters.png and
cnn_filters_curves.png.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import _common

LAPLACE_4 = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float64)
LAPLACE_8 = np.array([[1, 1, 1], [1, -8, 1], [1, 1, 1]], np.float64)


def _abs_cos(a, b):
  a, b = np.ravel(a), np.ravel(b)
  return float(abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def checkpoint_info(workdir: str, which: str) -> dict:
  """Step and epoch of the `which` checkpoint (restore.restore_for_eval does not say).

  "monitored": the evaluation that made a "best" checkpoint best (checkpoint
  meta "eval"; None for "last"); "selected_by" (best only): the run's
  config.best (older runs: the per-epoch evaluation's PGD accuracy, or early
  stopping).
  """
  from fastadv_jax import checkpoints  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, "best" if which == "best" else "checkpoints")
  ckpt = checkpoints.Checkpointer(directory, max_to_keep=None)
  found = ckpt.restore_meta()
  if found is None:
    return {}
  step, meta = found
  info = {"step": int(step), "epoch": meta.get("epoch"),
          "monitored": meta.get("eval") or meta.get("early_stopping_acc")}
  if which == "best":
    cfg = meta.get("config") or {}
    if "best" in cfg:
      info["selected_by"] = f"{cfg['best']['eval']}/{cfg['best']['metric']}"
    elif (cfg.get("early_stopping") or {}).get("enabled"):
      info["selected_by"] = "early_stopping (PGD on training points)"
    else:
      info["selected_by"] = "eval/pgd_acc"
  return info


def filter_stats(params) -> list[dict]:
  kernel = np.asarray(params["conv"]["kernel"], np.float64)   # (3, 3, C, F)
  bias = np.asarray(params["conv"]["bias"], np.float64)
  dense = np.asarray(params["linear"]["kernel"], np.float64)   # (H*W*F, classes)
  filters = kernel.shape[-1]
  out_w = dense.reshape(-1, filters, dense.shape[-1])          # NHWC flattening
  stats = []
  for c in range(filters):
    w = kernel[..., c]
    mean_over_channels = w.mean(axis=-1)
    stats.append({
        "filter": c,
        "norm": float(np.linalg.norm(w)),
        "bias": float(bias[c]),
        "outgoing_norm": float(np.linalg.norm(out_w[:, c])),
        "laplace4_abs_cos": _abs_cos(mean_over_channels, LAPLACE_4),
        "laplace8_abs_cos": _abs_cos(mean_over_channels, LAPLACE_8),
        # A colour-independent (edge) filter has the same sign pattern in R, G, B.
        "rgb_channel_cos": float(np.mean([
            np.ravel(w[..., i]) @ np.ravel(w[..., j]) /
            (np.linalg.norm(w[..., i]) * np.linalg.norm(w[..., j]) + 1e-30)
            for i, j in ((0, 1), (0, 2), (1, 2))])),
    })
  return stats


def zero_filter(variables, c: int):
  """A copy of the variables with filter c, its bias and its outgoing weights zeroed."""
  import jax  # pylint: disable=g-import-not-at-top
  params = jax.tree_util.tree_map(np.array, variables["params"])
  filters = params["conv"]["kernel"].shape[-1]
  params["conv"]["kernel"][..., c] = 0.0
  params["conv"]["bias"][c] = 0.0
  dense = params["linear"]["kernel"]
  view = dense.reshape(-1, filters, dense.shape[-1])
  view[:, c] = 0.0
  params["linear"]["kernel"] = view.reshape(dense.shape)
  return {**variables, "params": params}


def measure(model, variables, x, y, *, eps, seed, pgd_steps, pgd_restarts, batch,
            progress):
  """Gradient alignment, clean / FGSM (at the FGSM point, robust) / PGD accuracy."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fastadv_jax import attacks, closures, evaluate, metrics  # pylint: disable=g-import-not-at-top

  logits_fn = closures.eval_logits_fn(model, variables)

  @jax.jit
  def batch_stats(logits_fn, xb, yb, key):
    loss_fn = closures.cross_entropy(logits_fn, yb)
    out = attacks.fgsm(loss_fn, xb, eps=eps)  # FGSM starts at x: its gradient is ∇ℓ(x)
    delta, grad = out.delta, out.grad_at_start
    align = metrics.gradient_alignment(loss_fn, xb, key, eps=eps, grad_x=grad,
                                       clip_to_box=True, reduce="none")
    fgsm_ok = jnp.argmax(logits_fn(xb + delta), -1) == yb
    clean_ok = jnp.argmax(logits_fn(xb), -1) == yb
    return align, fgsm_ok, fgsm_ok & clean_ok

  aligns, fgsm_ok, fgsm_robust = [], [], []
  key = jax.random.PRNGKey(seed)
  for i in range(0, len(x), batch):
    a, f, fr = batch_stats(logits_fn, jnp.asarray(x[i:i + batch]),
                           jnp.asarray(y[i:i + batch]), jax.random.fold_in(key, i))
    aligns.append(np.asarray(a))
    fgsm_ok.append(np.asarray(f))
    fgsm_robust.append(np.asarray(fr))
  clean = evaluate.clean_accuracy(logits_fn, x, y, batch_size=batch)
  pgd = evaluate.pgd_accuracy(logits_fn, x, y, jax.random.PRNGKey(seed + 1), eps=eps,
                              steps=pgd_steps, restarts=pgd_restarts, batch_size=batch,
                              clean_correct=clean.correct, progress=progress)
  align = np.concatenate(aligns)
  return {"grad_alignment": float(align.mean()),
          "grad_alignment_sem": float(align.std() / np.sqrt(len(align))),
          "clean_acc": clean.accuracy,
          # Accuracy at the FGSM point x + δ_FGSM whatever the clean prediction
          # (the CO signature: after CO it exceeds clean accuracy; the training
          # logs' fgsm_point_acc) and robust accuracy (correct at x and x + δ).
          "fgsm_point_acc": float(np.mean(np.concatenate(fgsm_ok))),
          "fgsm_robust_acc": float(np.mean(np.concatenate(fgsm_robust))),
          "pgd_acc": pgd.accuracy}


def wait_for_run(workdir: str, minutes: float) -> bool:
  """Polls for <workdir>/summary.json; True when the run has finished."""
  path = os.path.join(workdir, "summary.json")
  deadline = time.time() + 60 * minutes
  while not os.path.exists(path) and time.time() < deadline:
    print(f"waiting for {path} ...", flush=True)
    time.sleep(30)
  return os.path.exists(path)


def train_short(args) -> str:
  """A CPU-scale cnn_fgsm run (random 10k training subset) for --train."""
  from fastadv_jax import train  # pylint: disable=g-import-not-at-top
  config = _common.load_cifar10_config("cnn_fgsm")
  config.data.source = "local"
  config.data.local_path = _common.shuffled_cifar10_npz(args.train_n, 0, args.seed)
  config.num_epochs = args.train_epochs
  config.seed = args.seed
  config.evals.test.n = 500
  config.final_eval.enabled = False
  workdir = os.path.join(_common.SCRATCH_DIR, f"cnn_fgsm_short_{args.train_n}_"
                         f"{args.train_epochs}ep_s{args.seed}")
  train.train_and_evaluate(config, workdir, progress=not args.no_progress)
  return workdir


def plot_filters(rec, results, path):
  plt = _common.pyplot()
  whiches = list(results)
  filters = len(results[whiches[0]]["filters"])
  fig, axes = plt.subplots(len(whiches), filters + 1, figsize=(2.3 * (filters + 1) + 1.5,
                                                                2.6 * len(whiches)),
                           squeeze=False, gridspec_kw={"width_ratios": [1] * filters + [1.6]})
  for i, which in enumerate(whiches):
    res = results[which]
    kernel = np.asarray(res["kernel"])
    top = res["largest_norm_filter"]
    for c in range(filters):
      w = kernel[..., c]
      img = (w - w.min()) / (w.max() - w.min() + 1e-12)
      ax = axes[i, c]
      ax.imshow(img, interpolation="nearest")
      # The channel-mean 3x3 pattern (scaled to max |.| = 1): a Laplace-like
      # filter shows a centre of one sign surrounded by the other.
      mean = w.mean(-1) / (np.abs(w.mean(-1)).max() + 1e-12)
      for (r, q), v in np.ndenumerate(mean):
        ax.text(q, r, f"{v:+.1f}", ha="center", va="center", fontsize=6.5,
                color="white", bbox=dict(boxstyle="round,pad=0.1", fc="black", alpha=0.35,
                                         lw=0))
      st = res["filters"][c]
      ax.set_title(f"filter {c}{' (largest)' if c == top else ''}\n‖w‖={st['norm']:.2f} "
                   f"‖out‖={st['outgoing_norm']:.2f}\n|cos Laplace8|={st['laplace8_abs_cos']:.2f}",
                   fontsize=7.5, color="red" if c == top else "black")
      ax.set_xticks([])
      ax.set_yticks([])
    axes[i, 0].set_ylabel(f"{which}\nstep {res['checkpoint'].get('step')}, "
                          f"epoch {res['checkpoint'].get('epoch', 0):.0f}", fontsize=8)
    ax = axes[i, filters]
    labels = ["full model"] + [f"zero f{c}" for c in range(filters)]
    vals = [res["full"]["grad_alignment"]] + [res["zeroed"][str(c)]["grad_alignment"]
                                              for c in range(filters)]
    colors = ["gray"] + ["red" if c == top else "C0" for c in range(filters)]
    ax.barh(labels[::-1], vals[::-1], color=colors[::-1])
    for k, v in enumerate(vals[::-1]):
      ax.text(min(v, 0.98), k, f"{v:.2f}", va="center", ha="right" if v > 0.2 else "left",
              fontsize=7, color="white" if v > 0.2 else "black")
    ax.set_xlim(0, 1)
    ax.set_title("gradient alignment", fontsize=8)
    ax.tick_params(labelsize=7)
  fig.suptitle(f"Single-layer CNN, FGSM ε={rec['setting']['eps_255']:g}/255: filters "
               f"(RGB, each normalized) before CO (best) and after (last)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_curves(workdir, results, path, eval_name="test"):
  """The run's per-epoch evaluation `eval_name` (old runs: "eval/...") as curves.

  Returns (curve, events): curve entries hold "fgsm_point" (accuracy at
  x + δ_FGSM whatever the clean prediction, the CO signature; what old logs
  called FGSM accuracy) and "fgsm_robust" (correct at x and at x + δ_FGSM; None
  for old logs).
  """
  from fastadv_jax import monitor, plotting  # pylint: disable=g-import-not-at-top
  plt = _common.pyplot()
  records = plotting.read_metrics(workdir)
  evals = _common.eval_curve(records, eval_name)
  events = [r for r in records if r.get("co/detected")] or [
      {"step": e["step"]} for e in monitor.replay(records, eval_name=eval_name)]
  step_to_epoch = {r["step"]: r["epoch"] for r in evals}
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  ep = [r["epoch"] for r in evals]
  for key, label in (("clean_acc", "clean"), ("fgsm_point_acc", "at x+δ_FGSM"),
                     ("fgsm_acc", "FGSM (robust)"), ("pgd_acc", "PGD (robust)")):
    if evals and evals[0].get(key) is not None:
      axes[0].plot(ep, [100 * r[key] for r in evals], marker="o", ms=3, label=label)
  axes[0].set(xlabel="epoch", ylabel="accuracy (%)",
              title=f"evaluation {_common.eval_prefix(records, eval_name)!r} "
                    f"(n={evals[-1].get('n') if evals else '?'})")
  for key, label in (("grad_alignment", "gradient alignment"),
                     ("cos_fgsm_pgd", "cos(δ_FGSM, δ_PGD)")):
    axes[1].plot(ep, [r.get(key, np.nan) for r in evals], marker="o", ms=3, label=label)
  axes[1].set(xlabel="epoch", ylabel="cosine", ylim=(-0.05, 1.05), title="alignment")
  for ax in axes:
    for e in events:
      ax.axvline(step_to_epoch.get(e["step"], np.nan), color="red", ls="--", alpha=0.6)
    for which, res in results.items():
      epoch = res["checkpoint"].get("epoch")
      if epoch is not None:
        ax.axvline(epoch, color="gray", ls=":", alpha=0.8)
        ax.text(epoch, ax.get_ylim()[1], f" {which}", fontsize=7, va="top", color="gray")
    ax.legend(fontsize=8)
  fig.suptitle(f"{os.path.abspath(workdir)}: training curves (red dashed: CO detected)",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return [{"epoch": r["epoch"], "step": r["step"], "clean": r["clean_acc"],
           "fgsm_point": r.get("fgsm_point_acc"), "fgsm_robust": r.get("fgsm_acc"),
           "pgd": r["pgd_acc"], "grad_alignment": r.get("grad_alignment"),
           "cos_fgsm_pgd": r.get("cos_fgsm_pgd")} for r in evals], [
               {"step": e["step"], "epoch": step_to_epoch.get(e["step"])} for e in events]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  _common.add_common_args(parser, full_help="n=10000 test points (default 1000)")
  parser.add_argument("--workdir", default="/tmp/runs/cnn_fgsm",
                      help="work directory of a cnn_fgsm run")
  parser.add_argument("--checkpoints", nargs="+", default=["best", "last"],
                      choices=["best", "last"])
  parser.add_argument("--n", type=int, default=None, help="test points (1000; --full 10000)")
  parser.add_argument("--eps", type=float, default=10.0, help="ε in /255 (the run's: 10)")
  parser.add_argument("--pgd-steps", type=int, default=50)
  parser.add_argument("--pgd-restarts", type=int, default=None, help="PGD restarts (default 10)")
  parser.add_argument("--batch", type=int, default=500)
  parser.add_argument("--wait-minutes", type=float, default=30.0,
                      help="wait this long for <workdir>/summary.json before analysing "
                           "whatever checkpoints exist")
  parser.add_argument("--train", action="store_true",
                      help="train a short CPU-scale cnn_fgsm run first and analyse it")
  parser.add_argument("--train-n", type=int, default=10000)
  parser.add_argument("--train-epochs", type=int, default=10)
  args = parser.parse_args(argv)
  n = args.n or (10000 if args.full else 1000)
  restarts = args.pgd_restarts or 10

  rec = _common.Record("cnn_filters", args)
  workdir = train_short(args) if args.train else args.workdir
  finished = wait_for_run(workdir, 0 if args.train else args.wait_minutes)

  x, y, idx = _common.random_test_points(n, args.seed)
  eps = args.eps / 255.0
  kw = dict(eps=eps, seed=args.seed, pgd_steps=args.pgd_steps, pgd_restarts=restarts,
            batch=args.batch, progress=not args.no_progress)
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  from fastadv_jax import restore  # pylint: disable=g-import-not-at-top

  results = {}
  config = None
  for which in args.checkpoints:
    try:
      model, variables, config, _ = restore.restore_for_eval(workdir, which)
    except FileNotFoundError as e:
      print(f"skipping {which}: {e}")
      continue
    info = checkpoint_info(workdir, which)
    stats = filter_stats(variables["params"])
    top = int(np.argmax([s["norm"] for s in stats]))
    full = measure(model, variables, x, y, **kw)
    zeroed = {}
    for c in tqdm(range(len(stats)), desc=f"{which}: zeroing filters",
                  disable=args.no_progress):
      zeroed[str(c)] = measure(model, zero_filter(variables, c), x, y, **kw)
    results[which] = {"checkpoint": info, "filters": stats, "largest_norm_filter": top,
                      "full": full, "zeroed": zeroed,
                      "kernel": np.asarray(variables["params"]["conv"]["kernel"]).tolist()}
    print(f"{which} (step {info.get('step')}, epoch {info.get('epoch')}): alignment "
          f"{full['grad_alignment']:.3f} -> {zeroed[str(top)]['grad_alignment']:.3f} after "
          f"zeroing filter {top}; PGD {full['pgd_acc']:.3f} -> {zeroed[str(top)]['pgd_acc']:.3f}")

  if not results:
    raise SystemExit(f"No checkpoint to analyse in {workdir}.")
  rec["setting"] = {
      "workdir": os.path.abspath(workdir), "run_finished": finished,
      "run_config_variant": config.get("variant") if config else None,
      "eps_255": args.eps, "n": n, "selection": f"random CIFAR-10 test points, seed {args.seed}",
      "test_indices_head": idx[:16].tolist(),
      "pgd": f"PGD-{args.pgd_steps}-{restarts}, step ε/4, strict restart rule",
      "fgsm": "α = ε from x", "alignment": "η ~ U[-ε, ε], x+η clipped to [0,1], "
      "cos per example, zero gradients count as 0", "seed": args.seed,
      "zeroing": "conv kernel[..., c], conv bias[c] and the outgoing linear weights of "
                 "filter c set to 0"}
  rec["results"] = results
  # The run's per-epoch evaluation (metrics.jsonl): the evaluation its CO
  # monitor read (config.evals.<co_monitor.eval>, "test" by default: the first
  # n test points of its data source; old runs: config.eval, the first eval.n).
  # Record their classes (the local JPEG copy is sorted by class, so the first
  # points may all be airplanes).
  eval_name = _common.monitored_eval_name(config) if config is not None else "test"
  if config is not None:
    try:
      from fastadv_jax import data, evaluate  # pylint: disable=g-import-not-at-top
      es = _common.eval_settings(config, eval_name)
      _, labels = data.load_split(
          "cifar10", es["split"], source=config.data.source,
          local_path=config.data.local_path or None, progress=False)
      idx_eval = evaluate.select_indices(len(labels), es["n"], es["selection"], es["seed"])
      rec["training_curve_eval_subset"] = {
          **es, "selection": (f"{es['selection']} {es['n']} {es['split']} points of the "
                              f"run's source" + (f" (seed {es['seed']})"
                                                 if es["selection"] == "random" else "")),
          "class_counts": np.bincount(labels[idx_eval], minlength=10).tolist()}
    except Exception as e:  # pylint: disable=broad-except
      rec["training_curve_eval_subset"] = {"error": str(e)}
  curves, events = plot_curves(workdir, results, rec.path("png").replace(".png", "_curves.png"),
                               eval_name)
  rec["training_curve"] = curves
  rec["co_events"] = events
  plot_filters(rec, results, rec.path("png"))

  rows = []
  for which, res in results.items():
    top = res["largest_norm_filter"]
    for c, st in enumerate(res["filters"]):
      z = res["zeroed"][str(c)]
      rows.append([f"{which} (ep {res['checkpoint'].get('epoch', 0):.0f})", c + 0,
                   f"{st['norm']:.3f}", f"{st['outgoing_norm']:.3f}",
                   f"{st['laplace8_abs_cos']:.2f}", f"{z['grad_alignment']:.3f}",
                   f"{100 * z['clean_acc']:.1f}", f"{100 * z['fgsm_point_acc']:.1f}",
                   f"{100 * z['pgd_acc']:.1f}" + (" ←largest" if c == top else "")])
    f = res["full"]
    rows.append([f"{which} (ep {res['checkpoint'].get('epoch', 0):.0f})", "none", "", "", "",
                 f"{f['grad_alignment']:.3f}", f"{100 * f['clean_acc']:.1f}",
                 f"{100 * f['fgsm_point_acc']:.1f}", f"{100 * f['pgd_acc']:.1f}"])
  table = _common.fmt_table(["checkpoint", "zeroed filter", "‖w‖ of that filter",
                             "‖outgoing‖", "|cos Laplace8|", "grad. alignment",
                             "clean %", "acc. at x+δ_FGSM %", "PGD %"], rows)
  print(table)
  rec["table_markdown"] = table
  rec.save()


if __name__ == "__main__":
  main()

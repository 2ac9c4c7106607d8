"""A resumable grid of training runs (methods x ε x seeds) and its results table.

  python experiments/sweep.py run cnn_seeds                # every cell, one after another
  python experiments/sweep.py run cnn_seeds --jobs 2       # two cells at a time
  python experiments/sweep.py run cnn_seeds --methods fgsm --seeds 0,1
  python experiments/sweep.py report cnn_seeds             # the table and figure so far
  python experiments/sweep.py run eps_sweep --full         # the published scale (a GPU)
  python experiments/sweep.py run cnn_seeds --set num_epochs=2 --results /tmp/r  # any setting

Each cell is one `fastadv-train` run of the grid's base config with the
method's attack and regularizers, the cell's ε and seed (`run-cell` builds it
in a subprocess), in its own workdir under `--scratch`: a cell killed at any
point resumes where it stopped when the command is run again (the run state
of `fastadv_jax.train`). When a cell ends, its summary, metrics log, config and
final-evaluation records are copied to
`experiments/results/sweep_<grid>[_full]/cells/<cell>/`; a cell whose results
are there is done and never rerun, so a sweep spread over several sessions
(or machines) only needs those small files committed. `report` builds
`table.json`, `table.md` and `curves.png` from them: per method, the collapse
epoch of every seed under the catastrophic-overfitting monitor's criterion
(`fastadv_jax.monitor`: PGD accuracy of the per-epoch evaluation collapses
while the accuracy at the FGSM point does not), its median and range, the
final PGD-50-10 and clean accuracy of the last and best states (median,
range), and gradient alignment at its best and at the end.

Grids (`GRIDS`):

* `cnn_seeds`: GradAlign §4's single-layer CNN (configs/cifar10.py:cnn_fgsm:
  4 filters, Adam, 30 epochs, ε = 10/255) under FGSM, FGSM-RS (α = 1.25ε),
  FGSM + GradAlign (λ from the paper's rule, 0.36 at 10/255) with 5 seeds, and
  ZeroGrad, MultiGrad, N-FGSM and ELLE with 3; the FGSM-type runs stop 3
  epochs after the monitor fires (`co_monitor.stop_after_epochs`),
  GradAlign and ELLE go the full 30 epochs. About 5-7 minutes per FGSM-type
  run on this 2-core CPU, 2-3x that for GradAlign. `--full` is the same grid
  (it is already the paper's scale).
* `advlc_ro`: AdvLC Table 1 in small, robust overfitting with and without
  the regularizer: PreActResNet-18 (Wong's) at widths (16, 32, 64, 128),
  FGSM-N at ε = 8/255 with and without AdvLC (λ = 0.55), 1,000 training
  images, 200 epochs with the learning rate divided by 10 at epochs 100 and
  150 (the paper's schedule on the full set), best/ chosen on 500 held-out
  training images, 2 seeds; PGD-10 on 500 test points every 5 epochs and,
  every 20, IG and the input Hessian's top eigenvalue on 200 test points.
  Measured: training loops of 39-56 minutes a cell, two cells side by side
  on this 2-core CPU; FGSM-N's robust overfitting shows from epoch ~50.
  An earlier design (5,000 images, 40 epochs) underfit and showed no robust
  overfitting: `experiments/results/sweep_advlc_ro_5k_40ep/`. `--full`: the
  `advlc` variant as published (200 epochs, full data), 1 seed.
* `eps_sweep`: GradAlign Fig. 1/8 in small: PreActResNet-18 at widths
  (16, 32, 64, 128), 10,000 training images, 10 epochs, ε in {8, 12, 16}/255, FGSM,
  FGSM-RS, FGSM + GradAlign, N-FGSM, ZeroGrad, PGD-2, 2 seeds; `--full`: the
  full network and training set, 30 epochs, ε in {4, 8, 12, 16}, 5 seeds
  (GradAlign's setting). Sized for about 10 minutes a cell; measured on this
  2-core CPU next to other work: training loops of 12 minutes (24 for
  GradAlign) at 8/255 with two cells side by side, 36-85 minutes at 16/255
  at low priority (the first cell, FGSM at 16/255: 78 minutes, a third of it
  the per-epoch evaluations on 500 test points and the model selection,
  PGD-10 on 256 training points every 200 steps); 19-20 minutes a cell at
  12/255, two side by side at low priority.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position
from fastadv_jax import config_base  # pylint: disable=g-import-not-at-top,wrong-import-position

CELL_FILES = ("summary.json", "metrics.jsonl", "config.json")


@dataclasses.dataclass(frozen=True)
class Method:
  """A method of a grid: the attack and regularizers of a config variant."""
  donor: str                     # configs/cifar10.py variant giving attack + regularizers
  seeds: int                     # seeds run by default
  overrides: tuple = ()          # (dotted name, value) applied after the donor's sections
  runs_to_the_end: bool = False  # not stopped after the monitor fires


@dataclasses.dataclass(frozen=True)
class Grid:
  base: str                       # configs/cifar10.py variant: model, optimizer, schedule
  methods: dict[str, Method]
  eps: tuple[float, ...]
  overrides: tuple = ()           # applied to every cell
  full_eps: tuple[float, ...] = ()
  full_seeds: int | None = None
  full_overrides: tuple = ()


_CNN_COMMON = (("co_monitor.stop_after_epochs", 3),)
_SMALL_PREACT = (("model.kwargs", {"widths": (16, 32, 64, 128)}),
                 ("data.train_subset", 10000), ("num_epochs", 10),
                 ("dtype", "float32"), ("evals.test.n", 500), ("final_eval.n", 1000))

# AdvLC's loss-landscape metrics (IG, the input Hessian's top eigenvalue) on
# 200 test points every 2 epochs.
_LANDSCAPE = (("evals.landscape", {"n": 200, "every_epochs": 2, "batch_size": 100,
                                   "metrics": ["input_grad_l1", "hessian_top"]}),)
# Robust overfitting needs a network that can fit its training set
# adversarially: 1,000 images for 200 epochs (AdvLC's schedule, the learning
# rate divided by 10 at 100 and 150). With 5,000 images and 40 epochs FGSM-N
# underfit (training adversarial accuracy 0.38) and showed none (README).
_SMALL_ADVLC = (("model.kwargs", {"widths": (16, 32, 64, 128)}),
                ("data.train_subset", 1000), ("data.validation_size", 500),
                ("evals.validation.n", 500), ("evals.test.n", 500),
                ("evals.validation.every_epochs", 5), ("evals.test.every_epochs", 5),
                ("num_epochs", 200), ("schedule.kwargs.boundary_epochs", [100, 150]),
                ("evals.landscape", {"n": 200, "every_epochs": 20, "batch_size": 100,
                                     "metrics": ["input_grad_l1", "hessian_top"]}))

GRIDS = {
    "cnn_seeds": Grid(
        base="cnn_fgsm", eps=(10.0,), overrides=_CNN_COMMON,
        methods={
            "fgsm": Method("cnn_fgsm", 5),
            "fgsm_rs": Method("fgsm_rs", 5, (("attack.step", None),
                                             ("attack.step_eps_ratio", 1.25))),
            "gradalign": Method("gradalign", 5, runs_to_the_end=True),
            "zerograd": Method("zerograd", 3),
            "multigrad": Method("multigrad", 3),
            "n_fgsm": Method("n_fgsm", 3),
            "elle": Method("fgsm_elle", 3, runs_to_the_end=True),
        }),
    "eps_sweep": Grid(
        base="fgsm", eps=(8.0, 12.0, 16.0), overrides=_SMALL_PREACT,
        methods={
            "fgsm": Method("fgsm", 2),
            "fgsm_rs": Method("fgsm_rs", 2),
            "gradalign": Method("gradalign", 2, runs_to_the_end=True),
            "n_fgsm": Method("n_fgsm", 2),
            "zerograd": Method("zerograd", 2),
            "pgd2": Method("pgd2", 2, runs_to_the_end=True),
        },
        full_eps=(4.0, 8.0, 12.0, 16.0), full_seeds=5,
        full_overrides=(("data.train_subset", 0), ("num_epochs", 30))),
    "advlc_ro": Grid(
        base="advlc", eps=(8.0,), overrides=_SMALL_ADVLC,
        methods={
            "fgsm_n": Method("advlc", 2, (("regularizers", {}),), runs_to_the_end=True),
            "fgsm_n_advlc": Method("advlc", 2, runs_to_the_end=True),
        },
        full_seeds=1, full_overrides=_LANDSCAPE),
}


def build_config(grid_name: str, method_name: str, eps: float, seed: int, full: bool,
                 settings=()):
  """The config of one cell: the grid's base, the method's sections, ε and seed,
  then `settings` ((dotted name, value) pairs, from --set)."""
  grid = GRIDS[grid_name]
  method = grid.methods[method_name]
  config = _common.load_cifar10_config(grid.base)
  donor = _common.load_cifar10_config(method.donor)
  with config.unlocked():
    config.attack = donor.attack
    config.regularizers = donor.regularizers
    config.eps = float(eps)
    config.seed = int(seed)
    config.variant = f"sweep:{grid_name}:{method_name}"
  if not full:
    for name, value in grid.overrides:
      config_base.set_dotted(config, name, value)
  else:
    for name, value in grid.full_overrides:
      config_base.set_dotted(config, name, value)
  if method.runs_to_the_end:
    config_base.set_dotted(config, "co_monitor.stop_after_epochs", 0)
  for name, value in tuple(method.overrides) + tuple(settings):
    config_base.set_dotted(config, name, value)
  return config


@dataclasses.dataclass(frozen=True)
class Cell:
  method: str
  eps: float
  seed: int

  @property
  def name(self) -> str:
    return f"{self.method}_eps{self.eps:g}_seed{self.seed}"


def cells(grid_name: str, full: bool, methods=None, seeds=None, eps=None) -> list[Cell]:
  grid = GRIDS[grid_name]
  out = []
  for method_name, method in grid.methods.items():
    if methods and method_name not in methods:
      continue
    count = grid.full_seeds if (full and grid.full_seeds) else method.seeds
    for e in (grid.full_eps if (full and grid.full_eps) else grid.eps):
      if eps and e not in eps:
        continue
      for seed in range(count):
        if seeds is None or seed in seeds:
          out.append(Cell(method_name, e, seed))
  return out


def results_dir(args) -> str:
  return os.path.join(args.results, f"sweep_{args.grid}" + ("_full" if args.full else ""))


def cell_done(args, cell: Cell) -> bool:
  return os.path.exists(os.path.join(results_dir(args), "cells", cell.name, "summary.json"))


def _collect(workdir: str, dest: str) -> None:
  """Copies a finished cell's small result files into the committed results."""
  os.makedirs(os.path.join(dest, "eval"), exist_ok=True)
  for name in CELL_FILES:
    shutil.copy2(os.path.join(workdir, name), os.path.join(dest, name))
  for name in os.listdir(os.path.join(workdir, "eval")):
    shutil.copy2(os.path.join(workdir, "eval", name), os.path.join(dest, "eval", name))
  # The code that produced the cell (an uncommitted change would say "dirty").
  git = ["git", "-C", _common.REPO_DIR]
  commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True)
  status = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"],
                          capture_output=True, text=True)
  with open(os.path.join(dest, "code.json"), "w") as f:
    json.dump({"commit": commit.stdout.strip() or None,
               "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None,
               "machine": _common.machine_info()}, f, indent=2)


def run(args) -> None:
  todo = [c for c in cells(args.grid, args.full, args.methods, args.seeds, args.eps)
          if not cell_done(args, c)]
  print(f"{args.grid}: {len(todo)} cell(s) to run", flush=True)
  procs: list[tuple[Cell, subprocess.Popen, str]] = []
  failed = []

  def reap(block: bool) -> None:
    for item in list(procs):
      cell, proc, workdir = item
      if block or proc.poll() is not None:
        code = proc.wait()
        procs.remove(item)
        if code == 0 and os.path.exists(os.path.join(workdir, "summary.json")):
          _collect(workdir, os.path.join(results_dir(args), "cells", cell.name))
          print(f"done: {cell.name}", flush=True)
        else:
          failed.append(cell.name)
          print(f"FAILED ({code}): {cell.name}; see {workdir}/sweep.log", flush=True)

  import time  # pylint: disable=g-import-not-at-top
  for cell in todo:
    while len(procs) >= args.jobs:
      reap(block=False)
      time.sleep(1)
    workdir = os.path.join(args.scratch, f"sweep_{args.grid}" + ("_full" if args.full else ""),
                           cell.name)
    os.makedirs(workdir, exist_ok=True)
    cmd = [sys.executable, os.path.abspath(__file__), "run-cell", args.grid, cell.method,
           str(cell.eps), str(cell.seed), "--workdir", workdir] + (
               ["--full"] if args.full else []) + [
                   f"--set={name}={value!r}" for name, value in args.settings]
    print(f"start: {cell.name} ({workdir})", flush=True)
    log = open(os.path.join(workdir, "sweep.log"), "a")  # pylint: disable=consider-using-with
    procs.append((cell, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), workdir))
  while procs:
    reap(block=False)
    time.sleep(1)
  report(args)
  if failed:
    raise SystemExit(f"{len(failed)} cell(s) failed: {', '.join(failed)}")


def run_cell(args) -> None:
  from fastadv_jax import train  # pylint: disable=g-import-not-at-top
  config = build_config(args.grid, args.method, args.cell_eps, args.seed, args.full,
                        args.settings)
  train.train_and_evaluate(config, args.workdir, progress=False)


# ---------------------------------------------------------------------------
# The report.


def _median_range(values) -> dict[str, Any]:
  values = [v for v in values if v is not None]
  if not values:
    return {"median": None, "min": None, "max": None, "n": 0}
  return {"median": float(np.median(values)), "min": float(min(values)),
          "max": float(max(values)), "n": len(values)}


def _cell_summary(cell_dir: str) -> dict[str, Any]:
  with open(os.path.join(cell_dir, "summary.json")) as f:
    summary = json.load(f)
  from fastadv_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  records = workdir_lib.read_records(os.path.join(cell_dir, "metrics.jsonl"))
  evals = [r for r in records if "test/pgd_acc" in r]
  epoch_of_step = {r["step"]: r["epoch"] for r in evals}
  events = summary.get("co_events") or []
  collapse = epoch_of_step.get(events[0]["step"]) if events else None
  final = summary.get("final_eval", {})
  with open(os.path.join(cell_dir, "config.json")) as f:
    evals_config = json.load(f).get("evals", {})
  out = {
      # Points of the per-epoch evaluations, for the figures' and table's labels.
      "pgd10_n": evals_config.get("test", {}).get("n"),
      "landscape_n": evals_config.get("landscape", {}).get("n"),
      "collapse_epoch": collapse, "stopped_early": summary.get("stopped_early"),
      "epochs_run": evals[-1]["epoch"] if evals else None,
      "pgd10_curve": [(r["epoch"], r["test/pgd_acc"]) for r in evals],
      "max_grad_alignment": max((r["test/grad_alignment"] for r in evals), default=None),
      "last_grad_alignment": evals[-1]["test/grad_alignment"] if evals else None,
      "model_selection": summary.get("data", {}).get("model_selection"),
      # AdvLC's loss-landscape metrics, where the grid logs them (evals.landscape).
      "landscape_curve": [(r["epoch"], r["landscape/input_grad_l1"],
                           r["landscape/hessian_top"])
                          for r in records if "landscape/input_grad_l1" in r],
      # Accuracy at the training attack's points, as logged during training: its
      # rise against a falling test PGD accuracy is robust overfitting.
      "train_adv_curve": [(r["epoch"], r["train/adv_acc"])
                          for r in records if "train/adv_acc" in r],
  }
  for which in ("last", "best"):
    rec = final.get(which)
    out[f"{which}_pgd50_10"] = rec["robust_acc"] if rec else None
    out[f"{which}_clean"] = rec["clean_acc"] if rec else None
    out[f"{which}_n_robust"] = rec["n_robust"] if rec else None
  return out


def _points(per_cell, key: str) -> str:
  """'1,000', or '500-1,000' where the cells differ: the points behind a label."""
  values = sorted({c[key] for c in per_cell.values() if c.get(key)})
  if not values:
    return "?"
  return f"{values[0]:,}" if len(values) == 1 else f"{values[0]:,}-{values[-1]:,}"


def report(args) -> None:
  root = results_dir(args)
  cell_root = os.path.join(root, "cells")
  if not os.path.isdir(cell_root):
    print(f"No finished cells in {cell_root}.")
    return
  all_cells = cells(args.grid, args.full)
  per_cell = {c.name: _cell_summary(os.path.join(cell_root, c.name)) for c in all_cells
              if cell_done(args, c)}
  rows = []
  for method in GRIDS[args.grid].methods:
    for eps in sorted({c.eps for c in all_cells}):
      names = [c.name for c in all_cells if c.method == method and c.eps == eps]
      done = [n for n in names if n in per_cell]
      if not done:
        continue
      runs = [per_cell[n] for n in done]
      rows.append({
          "method": method, "eps": eps, "seeds_done": len(done), "seeds_planned": len(names),
          "collapsed": sum(r["collapse_epoch"] is not None for r in runs),
          "collapse_epochs": [r["collapse_epoch"] for r in runs],
          "collapse_epoch": _median_range([r["collapse_epoch"] for r in runs]),
          **{f"{k}": _median_range([r[k] for r in runs]) for k in (
              "last_pgd50_10", "best_pgd50_10", "last_clean", "best_clean",
              "max_grad_alignment", "last_grad_alignment")},
          "best_selected_on": sorted({str(r["model_selection"]) for r in runs}),
      })
  table = {"grid": args.grid, "full": args.full, "rows": rows, "cells": per_cell,
           "criterion": "first event of fastadv_jax.monitor.CatastrophicOverfittingMonitor "
                        "on the per-epoch PGD-10 evaluation (first "
                        f"{_points(per_cell, 'pgd10_n')} test points)",
           "machine": _common.machine_info(), "versions": _common.versions()}
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "table.json"), "w") as f:
    json.dump(table, f, indent=2)

  def fmt(stat, scale=1.0, digits=1):
    if stat["median"] is None:
      return "-"
    m, lo, hi = (scale * stat[k] for k in ("median", "min", "max"))
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"

  lines = [f"# Sweep `{args.grid}`" + (" (full)" if args.full else ""), "",
           "Median [min, max] over seeds. Collapse: the monitor's first event (epoch); "
           f"PGD-50-10 on the first {_points(per_cell, 'last_n_robust')} test points, clean on "
           f"all 10,000; per-epoch PGD-10 on the first {_points(per_cell, 'pgd10_n')}.", "",
           "| method | ε | seeds | collapsed | collapse epoch | last PGD-50-10 % | "
           "best PGD-50-10 % | last clean % | alignment max → last |",
           "|---|---:|---:|---:|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {r['method']} | {r['eps']:g} | {r['seeds_done']}/{r['seeds_planned']} | "
        f"{r['collapsed']} | {fmt(r['collapse_epoch'], digits=0)} | "
        f"{fmt(r['last_pgd50_10'], 100)} | {fmt(r['best_pgd50_10'], 100)} | "
        f"{fmt(r['last_clean'], 100)} | {fmt(r['max_grad_alignment'], digits=2)} → "
        f"{fmt(r['last_grad_alignment'], digits=2)} |")
  lines += ["", "best: the state selected by (evaluation (split) / metric):"]
  lines += [f"- {r['method']} (ε {r['eps']:g}): {'; '.join(r['best_selected_on'])}"
            for r in rows]
  with open(os.path.join(root, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))
  _plot_curves(args.grid, per_cell, all_cells, os.path.join(root, "curves.png"))
  if any(c["landscape_curve"] for c in per_cell.values()):
    _plot_landscape(args.grid, per_cell, all_cells, os.path.join(root, "landscape.png"))


def _plot_curves(grid_name, per_cell, all_cells, path) -> None:
  methods = [m for m in GRIDS[grid_name].methods
             if any(c.name in per_cell for c in all_cells if c.method == m)]
  if not methods:
    return
  plt = _common.pyplot()
  cols = min(4, len(methods))
  rows = -(-len(methods) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(max(4 * cols, 7), 3.2 * rows + 0.6),
                           squeeze=False, sharey=True)
  for ax, method in zip(axes.flat, methods):
    for c in all_cells:
      if c.method != method or c.name not in per_cell:
        continue
      curve = np.asarray(per_cell[c.name]["pgd10_curve"])
      label = f"ε={c.eps:g} seed {c.seed}"
      line, = ax.plot(curve[:, 0], 100 * curve[:, 1], lw=1.2, label=label)
      collapse = per_cell[c.name]["collapse_epoch"]
      if collapse is not None:
        ax.axvline(collapse, color=line.get_color(), ls=":", lw=0.8)
    ax.set(title=method, xlabel="epoch",
           ylabel=f"PGD-10 accuracy % (test, n={_points(per_cell, 'pgd10_n')})")
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(methods):]:
    ax.axis("off")
  fig.suptitle(f"Sweep {grid_name}: per-epoch PGD-10 accuracy of every seed\n"
               f"(dotted: the monitor's collapse)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


def _plot_landscape(grid_name, per_cell, all_cells, path) -> None:
  """AdvLC Fig. 3 in small: PGD-10 accuracy, IG and the input Hessian's top
  eigenvalue over training, and the training attack's accuracy, every seed of
  every method."""
  plt = _common.pyplot()
  fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
  colors = dict(zip(GRIDS[grid_name].methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for c in all_cells:
    cell = per_cell.get(c.name)
    if not cell or not cell["landscape_curve"]:
      continue
    style = dict(color=colors[c.method], ls=("-", "--", ":", "-.")[c.seed % 4], lw=1.2,
                 label=f"{c.method} ε={c.eps:g} seed {c.seed}")
    pgd = np.asarray(cell["pgd10_curve"])
    land = np.asarray(cell["landscape_curve"])
    axes[0].plot(pgd[:, 0], 100 * pgd[:, 1], **style)
    # Few points (every `evals.landscape.every_epochs`): marked.
    axes[1].plot(land[:, 0], land[:, 1], marker="o", ms=3, **style)
    axes[2].plot(land[:, 0], land[:, 2], marker="o", ms=3, **style)
    if cell.get("train_adv_curve"):
      train_adv = np.asarray(cell["train_adv_curve"])
      axes[3].plot(train_adv[:, 0], 100 * train_adv[:, 1], **style)
  axes[0].set(xlabel="epoch", ylabel=f"PGD-10 accuracy % (test, n={_points(per_cell, 'pgd10_n')})")
  axes[3].set(xlabel="epoch", ylabel="training attack's accuracy % (one batch)")
  landscape_n = _points(per_cell, "landscape_n")
  axes[1].set(xlabel="epoch", ylabel=f"IG: mean ‖∇ₓℓ(x)‖₁ (test, n={landscape_n})")
  axes[2].set(xlabel="epoch", ylabel=f"input Hessian top eigenvalue (n={landscape_n})")
  axes[0].legend(fontsize=7)
  fig.suptitle(f"Sweep {grid_name}: robustness and loss-landscape metrics over training",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name in ("run", "report"):
    p = sub.add_parser(name)
    p.add_argument("grid", choices=sorted(GRIDS))
    p.add_argument("--full", action="store_true", help="the published scale (accelerators)")
    p.add_argument("--results", default=_common.RESULTS_DIR,
                   help="where sweep_<grid>/ goes (default: %(default)s)")
    if name == "run":
      p.add_argument("--set", dest="settings", type=config_base.parse_setting, action="append",
                     default=[], help="name=value: a config setting for every cell")
      p.add_argument("--jobs", type=int, default=1, help="cells run at the same time")
      p.add_argument("--methods", type=lambda s: s.split(","), default=None)
      p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None)
      p.add_argument("--eps", type=lambda s: [float(x) for x in s.split(",")], default=None)
      p.add_argument("--scratch", default=_common.SCRATCH_DIR,
                     help="where the cells' workdirs go (default: %(default)s)")
  p = sub.add_parser("run-cell")
  p.add_argument("grid", choices=sorted(GRIDS))
  p.add_argument("method")
  p.add_argument("cell_eps", type=float)
  p.add_argument("seed", type=int)
  p.add_argument("--workdir", required=True)
  p.add_argument("--full", action="store_true")
  p.add_argument("--set", dest="settings", type=config_base.parse_setting, action="append", default=[])
  args = parser.parse_args(argv)
  if args.command == "run":
    if args.jobs < 1:
      parser.error(f"--jobs={args.jobs} must be >= 1")
    unknown = set(args.methods or ()) - set(GRIDS[args.grid].methods)
    if unknown:
      parser.error(f"unknown method(s) {sorted(unknown)} for grid {args.grid}; choose from "
                   f"{sorted(GRIDS[args.grid].methods)}")
    run(args)
  elif args.command == "report":
    report(args)
  else:
    run_cell(args)


if __name__ == "__main__":
  main()

"""experiments/sweep.py on a tiny local dataset: cells run, collected, reported, not rerun."""

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(REPO, "experiments", "sweep.py")


def tiny_npz(path, n_train: int, n_test: int, seed: int) -> str:
  """A local dataset file of random 8x8 images and labels."""
  rng = np.random.default_rng(seed)
  def make(n):
    return (rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8),
            rng.integers(0, 10, n).astype(np.int32))
  (x_tr, y_tr), (x_te, y_te) = make(n_train), make(n_test)
  np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
  return str(path)


def run_sweep(tmp_path, grid: str, flags: list[str], settings: dict):
  """`sweep.py run grid` with `--set` settings; asserts success, returns (cmd, env)."""
  cmd = [sys.executable, SWEEP, "run", grid, *flags, f"--scratch={tmp_path / 'scratch'}",
         f"--results={tmp_path / 'results'}"]
  cmd += [f"--set={k}={v!r}" for k, v in settings.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  return cmd, env


def test_sweep_runs_collects_reports_and_resumes(tmp_path):
  npz = tiny_npz(tmp_path / "tiny.npz", 32, 16, seed=2)
  settings = {"data.source": "local", "data.local_path": npz,
              "model.kwargs.filters": 2, "batch_size": 8, "num_epochs": 2,
              "evals.test.n": 16, "evals.test.batch_size": 16, "evals.test.pgd_steps": 2,
              "evals.train_pgd.n": 16, "evals.train_pgd.batch_size": 16,
              "evals.train_pgd.pgd_steps": 2, "evals.train_pgd.every_steps": 2,
              "final_eval.n": 16, "final_eval.steps": 2, "final_eval.restarts": 1,
              "final_eval.batch_size": 16}
  cmd, env = run_sweep(tmp_path, "cnn_seeds", ["--methods=fgsm,gradalign", "--seeds=0,1",
                                               "--jobs=2"], settings)
  root = tmp_path / "results" / "sweep_cnn_seeds"
  cells = sorted(os.listdir(root / "cells"))
  assert cells == ["fgsm_eps10_seed0", "fgsm_eps10_seed1", "gradalign_eps10_seed0",
                   "gradalign_eps10_seed1"]
  for cell in cells:
    files = set(os.listdir(root / "cells" / cell))
    assert {"summary.json", "metrics.jsonl", "config.json", "eval"} <= files
    with open(root / "cells" / cell / "config.json") as f:
      config = json.load(f)
    assert config["seed"] == int(cell[-1]) and config["eps"] == 10.0
    assert bool(config["regularizers"]) == cell.startswith("gradalign")
  with open(root / "table.json") as f:
    table = json.load(f)
  assert [(r["method"], r["seeds_done"], r["seeds_planned"]) for r in table["rows"]] == [
      ("fgsm", 2, 5), ("gradalign", 2, 5)]
  assert all(r["last_pgd50_10"]["n"] == 2 for r in table["rows"])
  # best/ is chosen on training points (the GradAlign code), never on test points.
  assert all(r["best_selected_on"] == ["train_pgd (train split) / pgd_acc"]
             and r["best_pgd50_10"]["n"] == 2 for r in table["rows"])
  assert (root / "table.md").exists() and (root / "curves.png").exists()
  # The table names the points the cells were evaluated on, read from their configs.
  assert "PGD-50-10 on the first 16 test points" in (root / "table.md").read_text()
  assert "per-epoch PGD-10 evaluation (first 16 test points)" in table["criterion"]
  # Finished cells are never rerun.
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
  assert res.returncode == 0 and "0 cell(s) to run" in res.stdout


def test_advlc_grid_logs_and_plots_the_landscape_metrics(tmp_path):
  """The robust-overfitting grid (a tiny PreActResNet): IG and the Hessian's top
  eigenvalue are logged over training and plotted; best/ is chosen on held-out
  training images."""
  npz = tiny_npz(tmp_path / "tiny.npz", 48, 16, seed=3)
  settings = {"data.source": "local", "data.local_path": npz,
              "model.kwargs": {"widths": (4, 4, 4, 4), "stage_sizes": (1, 1, 1, 1)},
              "batch_size": 8, "num_epochs": 2, "schedule.kwargs.boundary_epochs": [1, 2],
              "data.train_subset": 32, "data.validation_size": 16,
              "evals.validation.n": 16, "evals.validation.pgd_steps": 1,
              "evals.test.n": 16, "evals.test.batch_size": 16, "evals.test.pgd_steps": 1,
              "evals.landscape.n": 4, "evals.landscape.batch_size": 4,
              "evals.landscape.every_epochs": 1, "evals.test.every_epochs": 1,
              "evals.validation.every_epochs": 1,
              "final_eval.n": 8, "final_eval.steps": 1, "final_eval.restarts": 1,
              "final_eval.batch_size": 8}
  run_sweep(tmp_path, "advlc_ro", ["--methods=fgsm_n_advlc", "--seeds=0"], settings)
  root = tmp_path / "results" / "sweep_advlc_ro"
  with open(root / "table.json") as f:
    table = json.load(f)
  cell = table["cells"]["fgsm_n_advlc_eps8_seed0"]
  assert [epoch for epoch, _, _ in cell["landscape_curve"]] == [1.0, 2.0]
  assert all(ig > 0 and np.isfinite(top) for _, ig, top in cell["landscape_curve"])
  assert cell["train_adv_curve"] and all(0 <= acc <= 1 for _, acc in cell["train_adv_curve"])
  assert table["rows"][0]["best_selected_on"] == ["validation (validation split) / pgd_acc"]
  assert (root / "landscape.png").exists()
  assert cell["pgd10_n"] == 16 and cell["landscape_n"] == 4
  assert "PGD-50-10 on the first 8 test points" in (root / "table.md").read_text()

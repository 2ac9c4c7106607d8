"""examples/composition.ipynb runs from top to bottom and computes what it claims.

The notebook is executed with nbclient in a fresh kernel, in its small setting
(FASTADV_NB_SMALL=1: a tiny CNN trained for a few seconds) on its synthetic
data (FASTADV_NB_DATA=synthetic: deterministic, and no decoding of CIFAR-10 on
a fresh machine), with matplotlib's Agg backend. It writes its figures and a
results.json to FASTADV_NB_OUT, which the assertions read.
"""

import json
import os
import sys

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "examples", "composition.ipynb")
EPS = 10 / 255
FIGURES = ["accuracy_vs_eps", "alignment_map", "filter_norms", "loss_surface", "training"]


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)
  assert any("parameters" in c.metadata.get("tags", []) for c in code)
  assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code) // 2


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
  out = tmp_path_factory.mktemp("notebook")
  env = {
      "FASTADV_NB_SMALL": "1", "FASTADV_NB_DATA": "synthetic", "FASTADV_NB_OUT": str(out),
      "FASTADV_NB_SEED": "0", "MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu",
      # The kernel is a new process: it finds the package from the repository (also
      # when the editable install points elsewhere) and shares the tests' compilation
      # cache (a cache never changes results, it only skips compiling).
      "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
      "XLA_FLAGS": "",
  }
  import jax  # pylint: disable=g-import-not-at-top  (conftest configured it)
  cache = jax.config.jax_compilation_cache_dir
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  with pytest.MonkeyPatch.context() as mp:   # the kernel inherits this environment
    for name, value in env.items():
      mp.setenv(name, value)
    for name in ("FASTADV_NB_N_TRAIN", "FASTADV_NB_STEPS", "FASTADV_NB_N_EVAL"):
      mp.delenv(name, raising=False)
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3",
        resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
  with open(out / "results.json") as f:
    return nb, json.load(f), out


def test_runs_and_writes_its_figures(executed):
  nb, results, out = executed
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  assert results["small"] and results["data"] == "synthetic"
  assert results["figures"] == FIGURES
  for name in FIGURES:
    assert os.path.getsize(out / f"{name}.png") > 1000, name


def test_training_composed_methods_learned(executed):
  _, results, _ = executed
  assert set(results["train"]) == {"FGSM", "FGSM + GradAlign"}
  for name, r in results["train"].items():
    assert r["last_ce"] < 0.7 * r["first_ce"], (name, r)
  # GradAlign adds λ·Ω > 0 to the CE; FGSM's total is its CE.
  assert results["train"]["FGSM"]["last_total"] == results["train"]["FGSM"]["last_ce"]
  ga = results["train"]["FGSM + GradAlign"]
  assert ga["last_total"] > ga["last_ce"]


def test_attacks_stay_in_the_eps_ball_and_the_box(executed):
  _, results, _ = executed
  assert set(results["max_abs_delta"]) == {"FGSM", "FGSM-RS", "ZeroGrad", "PGD-10"}
  for label, m in results["max_abs_delta"].items():
    assert 0.5 * EPS < m <= EPS + 1e-6, (label, m)
    assert results["box_violation"][label] <= 1e-7, label
  for name, acc in results["accuracy"].items():
    assert acc["clean"] > 0.5, (name, acc)               # the synthetic task is learned
    for label in results["max_abs_delta"]:
      assert 0.0 <= acc[label] <= acc["clean"], (name, label, acc)   # robust = clean & adv
    assert acc["PGD-10"] < acc["clean"]                  # and the attacks do bite
  for name, curve in results["accuracy_vs_eps"].items():
    fgsm, pgd = zip(*curve)
    assert fgsm[0] >= fgsm[-1] and pgd[0] >= pgd[-1], name


def test_metrics_regularizers_and_maps_agree_with_the_library(executed):
  _, results, _ = executed
  for name in results["accuracy"]:
    assert -1.0 <= results["gradient_alignment"][name] <= 1.0
    assert -1.0 <= results["cos_fgsm_pgd"][name] <= 1.0
    amap = results["alignment_map"][name]
    # The map's per-image cosines are metrics.gradient_alignment(..., reduce="none").
    assert amap["max_diff_vs_library"] < 1e-4
    lo, hi = amap["local_range"]
    assert -1.0 - 1e-5 <= lo <= hi <= 1.0 + 1e-5
    surface = results["loss_surface"][name]
    assert abs(surface["at_x"] - surface["direct_at_x"]) < 1e-4 * max(1.0, surface["at_x"])
    assert surface["min"] <= surface["at_x"] <= surface["max"]
    assert surface["at_fgsm"] > surface["at_x"]          # FGSM's step raises the loss
    assert surface["linearization_error"] >= 0.0
  assert all(v >= 0.0 for v in results["regularizers"].values())
  assert set(results["regularizers"]) == {"grad_align", "cure", "input_grad_norm"}
  formulations = results["grad_align_formulations"]
  assert formulations["max_abs_grad"] > 0.0
  assert formulations["max_abs_diff"] <= 1e-4 * formulations["max_abs_grad"] + 1e-8


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q"]))

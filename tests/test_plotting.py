"""Training-curve and filter-norm figures: labels, subtitle, files, and filter_norms."""

import json
import os

import jax
import numpy as np
import pytest

from fastadv_jax import models
from fastadv_jax import plotting
from fastadv_jax.models.simple_cnn import filter_norms

CONFIG = {
    "variant": "cnn_fgsm", "eps": 10.0, "seed": 3,
    "attack": {"name": "fgsm", "kwargs": {}},
    "regularizers": {},
    "evals": {"test": {"n": 1000, "pgd_steps": 10, "pgd_restarts": 1}},
    "co_monitor": {"eval": "test"},
}


def run_records(eval_name="test", reg=False, filters=None):
  """A small CO-like run: 2 steps per epoch, collapse at epoch 4, an event there."""
  records = []
  pgd = [0.05, 0.15, 0.18, 0.02, 0.0]
  fgsm = [0.05, 0.16, 0.19, 0.30, 0.45]
  align = [0.92, 0.90, 0.88, 0.20, 0.08]
  for e in range(1, 6):
    ce = 2.5 - 0.3 * e
    train = {"step": 2 * e - 1, "epoch": e - 0.5, "train/ce": ce,
             "train/loss": ce + (0.1 if reg else 0.0), "train/eps": 10.0}
    if reg:
      train["train/reg/grad_align"] = 0.5
    records.append(train)
    records.append({"step": 2 * e, "epoch": float(e), f"{eval_name}/clean_acc": 0.3,
                    f"{eval_name}/fgsm_acc": fgsm[e - 1],
                    f"{eval_name}/fgsm_point_acc": fgsm[e - 1],
                    f"{eval_name}/pgd_acc": pgd[e - 1],
                    f"{eval_name}/grad_alignment": align[e - 1],
                    f"{eval_name}/cos_fgsm_pgd": align[e - 1] - 0.05,
                    f"{eval_name}/n": 500})
    if filters is not None:
      records.append({"step": 2 * e, "epoch": float(e),
                      plotting.FILTER_CONV_KEY: list(filters[0][e - 1]),
                      plotting.FILTER_OUT_KEY: list(filters[1][e - 1])})
  records.append({"step": 8, "co/detected": 1, "co/step": 8, "co/trigger": "pgd_collapse",
                  "co/pgd_acc": 0.02})
  return records


def legend_texts(ax):
  legend = ax.get_legend()
  assert legend is not None, ax.get_title()
  return [t.get_text() for t in legend.get_texts()]


def write_run(tmp_path, records, config=CONFIG):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  if config is not None:
    with open(tmp_path / "config.json", "w") as f:
      json.dump(config, f)
  return str(tmp_path)


def test_every_line_and_event_has_a_legend_entry_and_pgd_states_its_steps():
  fig = plotting.training_curves_figure(run_records(), config=CONFIG)
  acc, loss, align = fig.axes[:3]
  for ax in (acc, loss, align):
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels and not any(l.startswith("_") for l in labels), labels   # all labelled
    assert sorted(legend_texts(ax)) == sorted(labels)
    # The monitor's event (step 8 = epoch 4) is a labelled red line in every panel.
    events = [l for l in ax.get_lines() if l.get_label().startswith("CO detected")]
    assert len(events) == 1 and events[0].get_xdata()[0] == 4.0
    assert "epoch 4" in events[0].get_label()
  assert {"clean", "FGSM (robust)", "PGD-10 (robust)"} <= set(legend_texts(acc))
  assert "cos(δ_FGSM, δ_PGD-10)" in legend_texts(align)


def test_total_loss_visible_when_it_equals_the_ce():
  fig = plotting.training_curves_figure(run_records(), config=CONFIG)
  lines = {l.get_label(): l for l in fig.axes[1].get_lines()}
  total = lines["total loss (= CE: no regularizer)"]
  ce = lines["CE at x+δ (adversarial)"]
  np.testing.assert_allclose(total.get_ydata(), ce.get_ydata())
  # Drawn under the dashed CE as a wider band, so both stay visible.
  assert total.get_linewidth() > 2 * ce.get_linewidth() and ce.get_linestyle() == "--"

  fig = plotting.training_curves_figure(run_records(reg=True), config=CONFIG)
  labels = legend_texts(fig.axes[1])
  assert "total loss" in labels and "regularizer term λ·Ω (total − CE)" in labels
  reg_line = [l for l in fig.axes[1].get_lines() if l.get_label().startswith("regularizer")][0]
  np.testing.assert_allclose(reg_line.get_ydata(), 0.1, atol=1e-12)


def test_subtitle_names_method_eps_n_and_seed():
  fig = plotting.training_curves_figure(run_records(), config=CONFIG, title="run")
  text = fig._suptitle.get_text()  # pylint: disable=protected-access
  assert text.startswith("run\n")
  # n from the records (what was evaluated) over the config's.
  for part in ("cnn_fgsm: fgsm", "ε = 10/255", "n = 500", "seed 3"):
    assert part in text, text
  config = dict(CONFIG, variant="", eps=8.0,
                regularizers={"grad_align": {"weight": 0.2, "lambda_rule": ""}})
  meta = plotting.run_metadata(config, run_records(), "test",
                               metadata={"seed": 7, "pgd_steps": 50, "pgd_restarts": 10})
  assert plotting.subtitle(meta) == (
      "method fgsm + grad_align (λ=0.2) · ε = 8/255 · n = 500 · seed 7")
  assert plotting.pgd_label(meta) == "PGD-50-10"
  assert plotting.pgd_label({}) == "PGD"


def test_without_config_falls_back_to_records_and_old_eval_prefix(tmp_path):
  workdir = write_run(tmp_path, run_records(eval_name="eval"), config=None)
  out = plotting.plot_training_curves(workdir)
  assert out == os.path.join(workdir, "training_curves.png") and os.path.getsize(out) > 0
  fig = plotting.training_curves_figure(plotting.read_metrics(workdir))
  assert "PGD (robust)" in legend_texts(fig.axes[0])           # steps unknown
  text = fig._suptitle.get_text()  # pylint: disable=protected-access
  assert "ε = 10/255" in text and "n = 500" in text           # train/eps, eval/n
  # An empty run (no evaluation yet) still plots, with a note instead of a legend.
  fig = plotting.training_curves_figure([{"step": 1, "epoch": 0.1, "train/loss": 2.0}])
  assert fig.axes[0].get_legend() is None


def test_filter_norms_matches_numpy():
  model = models.get_model("simple_cnn", filters=3)
  variables = models.init_variables(model, jax.random.PRNGKey(0), (8, 8, 3))
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  kernel = params["conv"]["kernel"].astype(np.float64)          # (3, 3, 3, F)
  dense = params["linear"]["kernel"].astype(np.float64)         # (8*8*F, 10)
  conv_ref = [np.linalg.norm(kernel[..., c]) for c in range(3)]
  # NHWC flattening: input index (h * W + w) * F + c reads filter c.
  out_ref = [np.linalg.norm(dense[c::3]) for c in range(3)]
  for got in (filter_norms(params), filter_norms(variables), jax.jit(filter_norms)(params)):
    np.testing.assert_allclose(got["conv_norm"], conv_ref, rtol=1e-5)
    np.testing.assert_allclose(got["out_norm"], out_ref, rtol=1e-5)
  # Rows c::F are filter c's outgoing weights: zeroing them changes the logits exactly
  # as silencing filter c itself (kernel and bias 0, so ReLU outputs 0) does.
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 8, 8, 3))
  no_out = jax.tree_util.tree_map(np.copy, params)
  no_out["linear"]["kernel"][1::3] = 0.0
  no_filter = jax.tree_util.tree_map(np.copy, params)
  no_filter["conv"]["kernel"][..., 1] = 0.0
  no_filter["conv"]["bias"][1] = 0.0
  logits = [model.apply({"params": p}, x) for p in (params, no_out, no_filter)]
  assert not np.allclose(logits[0], logits[1])
  np.testing.assert_allclose(logits[1], logits[2], rtol=1e-5, atol=1e-6)
  record = plotting.filter_norm_record(params)
  assert set(record) == {plotting.FILTER_CONV_KEY, plotting.FILTER_OUT_KEY}
  np.testing.assert_allclose(record[plotting.FILTER_OUT_KEY], out_ref, rtol=1e-5)
  json.dumps(record)                                             # plain floats
  with pytest.raises(ValueError, match="SimpleCNN"):
    filter_norms({"Dense_0": {}})


def test_plot_filter_norms_from_records_and_arrays(tmp_path):
  rng = np.random.default_rng(0)
  conv = np.abs(rng.normal(size=(5, 4))) + np.linspace(0, 3, 5)[:, None] * [0, 0, 1, 0]
  out = np.abs(rng.normal(size=(5, 4)))
  records = run_records(filters=(conv, out))
  fig = plotting.filter_norms_figure(records, config=CONFIG)
  for ax, values in zip(fig.axes[:2], (conv, out)):
    filter_lines = [l for l in ax.get_lines() if l.get_label().startswith("filter")]
    assert len(filter_lines) == 4
    for c, line in enumerate(filter_lines):
      np.testing.assert_allclose(line.get_xdata(), [1, 2, 3, 4, 5])
      np.testing.assert_allclose(line.get_ydata(), values[:, c])
    labels = legend_texts(ax)
    assert "filter 2 (largest ‖w‖ at the end)" in labels
    assert any(l.startswith("CO detected (epoch 4") for l in labels)
  assert "ε = 10/255" in fig._suptitle.get_text()  # pylint: disable=protected-access

  path = plotting.plot_filter_norms({"conv_norm": conv, "out_norm": out},
                                    str(tmp_path / "f.png"))
  assert os.path.getsize(path) > 0
  with pytest.raises(ValueError, match="filters/conv_norm"):
    plotting.plot_filter_norms(run_records(), str(tmp_path / "g.png"))

  workdir = write_run(tmp_path, records)
  paths = plotting.plot_run(workdir)
  assert [os.path.basename(p) for p in paths] == ["training_curves.png", "filter_norms.png"]
  assert all(os.path.getsize(p) > 0 for p in paths)

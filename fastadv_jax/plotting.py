"""Training curves in the layout of GradAlign Fig. 4, from a run's metrics.jsonl."""

from __future__ import annotations

import json
import os


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"No metrics.jsonl in {workdir!r}: not a fastadv-train workdir?")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_training_curves(workdir: str, out: str | None = None) -> str:
  """Writes `training_curves.png`: accuracies, losses, alignment, cos(FGSM, PGD).

  Panels (GradAlign Fig. 4 layout): (a) clean / FGSM / PGD accuracy on the fixed
  evaluation subset, (b) the training loss and its cross-entropy part, (c)
  gradient alignment and cos(δ_FGSM, δ_PGD), each against epochs; catastrophic
  overfitting events are marked with vertical lines.
  Returns the path of the PNG.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = read_metrics(workdir)
  # The catastrophic-overfitting monitor's evaluation ("test" by default; runs
  # before named evaluations logged "eval/...").
  name = _monitored_eval(workdir, records)
  evals = [r for r in records if f"{name}/pgd_acc" in r]
  trains = [r for r in records if "train/loss" in r]
  events = [r for r in records if r.get("co/detected")]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  ax = axes[0]
  for key, label in (("clean_acc", "clean"), ("fgsm_point_acc", "at the FGSM point"),
                     ("fgsm_acc", "FGSM (robust)"), ("pgd_acc", "PGD (robust)")):
    if evals and f"{name}/{key}" in evals[0]:
      ax.plot([r["epoch"] for r in evals], [100 * r[f"{name}/{key}"] for r in evals],
              marker="o", label=label)
  ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy (evaluation subset)")
  ax.legend()
  ax = axes[1]
  for key, label in (("train/loss", "train loss (total)"), ("train/ce", "train CE (adversarial)")):
    ax.plot([r["epoch"] for r in trains], [r[key] for r in trains], label=label)
  ax.set(xlabel="epoch", ylabel="loss", title="Training loss")
  ax.legend()
  ax = axes[2]
  for key, label in (("grad_alignment", "gradient alignment"),
                     ("cos_fgsm_pgd", "cos(FGSM, PGD)")):
    if evals and f"{name}/{key}" in evals[0]:
      ax.plot([r["epoch"] for r in evals], [r[f"{name}/{key}"] for r in evals],
              marker="o", label=label)
  ax.set(xlabel="epoch", ylabel="cosine", title="Alignment", ylim=(-0.05, 1.05))
  ax.legend()
  step_to_epoch = {r["step"]: r["epoch"] for r in evals}
  for e in events:
    for a in axes:
      a.axvline(step_to_epoch.get(e["step"], 0), color="red", ls="--", alpha=0.6)
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  out = out or os.path.join(workdir, "training_curves.png")
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def _monitored_eval(workdir: str, records: list[dict]) -> str:
  """The name of the evaluation the run's monitor read (config.co_monitor.eval)."""
  name = "test"
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      name = json.load(f).get("co_monitor", {}).get("eval", name)
  except (OSError, ValueError):
    pass
  if not any(f"{name}/pgd_acc" in r for r in records) and any(
      "eval/pgd_acc" in r for r in records):
    return "eval"
  return name

"""Figures of a training run, from its metrics.jsonl (and config.json when present).

* `plot_training_curves(workdir)`: `training_curves.png` in the layout of
  GradAlign Fig. 4 (Andriushchenko & Flammarion 2020): accuracies, training
  loss, gradient alignment and cos(δ_FGSM, δ_PGD) per epoch, the
  catastrophic-overfitting monitor's events as labelled vertical lines, and a
  subtitle with the method, ε (in /255), the number of evaluation points and
  the seed.
* `plot_filter_norms(records_or_arrays, path)`: for the single-layer CNN of
  GradAlign §4, the norm of every conv filter and of its outgoing linear
  weights per epoch (one filter's norms grow when catastrophic overfitting
  sets in).
* `plot_run(workdir)`: both, where the records allow.

Record format (one JSON object per line of metrics.jsonl, as
`train.MetricWriter` writes them; every record has "step"):

* training records: "train/loss" (total), "train/ce" (cross-entropy at the
  adversarial point), optionally "train/reg/<name>" (each regularizer's value
  before its weight λ), "epoch" (fractional);
* evaluation records: "<eval>/clean_acc", "<eval>/fgsm_acc",
  "<eval>/fgsm_point_acc", "<eval>/pgd_acc", "<eval>/grad_alignment",
  "<eval>/cos_fgsm_pgd", "<eval>/n", optionally "<eval>/pgd_steps" and
  "<eval>/pgd_restarts", and "epoch"; <eval> is the evaluation the monitor
  reads (config.co_monitor.eval, "test" by default; runs before named
  evaluations wrote "eval/...");
* monitor events: "co/detected": 1 and "co/<field>" (see
  `monitor.CatastrophicOverfittingMonitor`), at the step where it fired;
* per-filter norms of the single-layer CNN, one record per epoch:
  "filters/conv_norm" and "filters/out_norm" (lists of one float per filter,
  `filter_norm_record(params)`, from
  `fastadv_jax.models.simple_cnn.filter_norms`), and "epoch".

Figures are built with the object-oriented `matplotlib.figure.Figure` (no
pyplot, no backend switch), so these functions can be called from a training
process, a test or a notebook alike; the `*_figure` functions return the
figure for inspection, the `plot_*` functions write a PNG and return its path.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

FILTER_CONV_KEY = "filters/conv_norm"
FILTER_OUT_KEY = "filters/out_norm"
TRAINING_CURVES = "training_curves.png"
FILTER_NORMS = "filter_norms.png"

_ACCURACIES = (("clean_acc", "clean"), ("fgsm_point_acc", "at the FGSM point x+δ"),
               ("fgsm_acc", "FGSM (robust)"), ("pgd_acc", None))   # None: PGD label


# ----------------------------------------------------------------------------- reading


def read_metrics(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl`, in order (a torn last line is skipped)."""
  from fastadv_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, workdir_lib.METRICS_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No metrics.jsonl in {workdir!r}: not a fastadv-train workdir?")
  return workdir_lib.read_records(path)


def read_config(workdir: str) -> dict | None:
  """The run's `config.json` as a dict, or None when absent or unreadable."""
  from fastadv_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  config = workdir_lib.read_json(os.path.join(workdir, "config.json"))
  return config if isinstance(config, dict) else None


def filter_norm_record(params: Any) -> dict[str, list[float]]:
  """The per-epoch record of the single-layer CNN's filter norms.

  `{"filters/conv_norm": [...], "filters/out_norm": [...]}`, one float per
  filter (see `fastadv_jax.models.simple_cnn.filter_norms`); add "epoch" and
  write it to metrics.jsonl once per epoch for `plot_filter_norms`.
  """
  from fastadv_jax.models.simple_cnn import filter_norms  # pylint: disable=g-import-not-at-top
  norms = filter_norms(params)
  return {FILTER_CONV_KEY: [float(v) for v in np.asarray(norms["conv_norm"])],
          FILTER_OUT_KEY: [float(v) for v in np.asarray(norms["out_norm"])]}


# ----------------------------------------------------------------------------- metadata


def _get(mapping: Any, *keys: str, default: Any = None) -> Any:
  for key in keys:
    if not isinstance(mapping, Mapping) or key not in mapping:
      return default
    mapping = mapping[key]
  return mapping


def _method_from_config(config: Mapping[str, Any]) -> str | None:
  attack = _get(config, "attack", "name")
  if attack is None:
    return _get(config, "variant") or None
  steps = _get(config, "attack", "kwargs", "steps")
  parts = [f"{attack}-{steps}" if steps else str(attack)]
  for name, spec in sorted((_get(config, "regularizers") or {}).items()):
    weight = _get(spec, "weight", default=0.0) or 0.0
    if weight:
      parts.append(f"{name} (λ={weight:g})")
    elif _get(spec, "lambda_rule"):
      parts.append(f"{name} (λ from ε, {spec['lambda_rule']} rule)")
  method = " + ".join(parts)
  variant = _get(config, "variant")
  return f"{variant}: {method}" if variant else method


def run_metadata(config: Mapping[str, Any] | None = None, records: Sequence[dict] = (),
                 eval_name: str = "test", metadata: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
  """What the figures say about a run: method, ε, n, seed and the PGD attack.

  Read from the run's config (as in config.json) and records, then overridden
  by `metadata`. Keys (each None when unknown):
    method: "variant: attack + regularizer (λ=...)", e.g. "cnn_fgsm: fgsm";
    eps: ε in /255 (config.eps; else the largest logged "train/eps");
    n: points of the evaluation `eval_name` ("<eval>/n", else the config's);
    seed: config.seed;
    pgd_steps, pgd_restarts: the evaluation's PGD ("<eval>/pgd_steps" or the
      config's evals.<eval>.pgd_steps / pgd_restarts).
  """
  config = config or {}
  eval_cfg = _get(config, "evals", eval_name) or {}

  def last(key):
    return next((r[key] for r in reversed(records) if r.get(key) is not None), None)

  eps = _get(config, "eps")
  if eps is None:
    logged = [r["train/eps"] for r in records if r.get("train/eps") is not None]
    eps = max(logged) if logged else None
  meta = {
      "method": _method_from_config(config) if config else None,
      "eps": eps,
      "n": last(f"{eval_name}/n") or _get(eval_cfg, "n"),
      "seed": _get(config, "seed"),
      "pgd_steps": last(f"{eval_name}/pgd_steps") or _get(eval_cfg, "pgd_steps"),
      "pgd_restarts": last(f"{eval_name}/pgd_restarts") or _get(eval_cfg, "pgd_restarts"),
  }
  meta.update({k: v for k, v in (metadata or {}).items()})
  return meta


def pgd_label(metadata: Mapping[str, Any] | None) -> str:
  """"PGD-10" (steps), "PGD-50-10" (steps and restarts > 1), or "PGD" when unknown."""
  steps = _get(metadata, "pgd_steps")
  if not steps:
    return "PGD"
  restarts = _get(metadata, "pgd_restarts")
  return f"PGD-{int(steps)}" + (f"-{int(restarts)}" if restarts and int(restarts) > 1 else "")


def _format_number(value: Any) -> str:
  if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()):
    return str(int(value))
  return f"{float(value):.3g}"


def subtitle(metadata: Mapping[str, Any] | None) -> str:
  """"method fgsm · ε = 10/255 · n = 1000 · seed 0", from what is known."""
  meta = metadata or {}
  parts = []
  if meta.get("method"):
    parts.append(f"method {meta['method']}")
  if meta.get("eps") is not None:
    parts.append(f"ε = {_format_number(meta['eps'])}/255")
  if meta.get("n") is not None:
    parts.append(f"n = {_format_number(meta['n'])}")
  if meta.get("seed") is not None:
    parts.append(f"seed {_format_number(meta['seed'])}")
  return " · ".join(parts)


# ----------------------------------------------------------------------------- events


def _epoch_of_step(records: Sequence[dict]):
  """step -> epoch, exact where a record has both, else by the run's steps per epoch."""
  exact = {r["step"]: r["epoch"] for r in records
           if r.get("epoch") is not None and "step" in r}
  ratios = [r["step"] / r["epoch"] for r in records
            if r.get("epoch") and r.get("step") is not None]
  per_epoch = float(np.median(ratios)) if ratios else None

  def epoch(step):
    if step in exact:
      return exact[step]
    return step / per_epoch if per_epoch else float("nan")
  return epoch


def co_events(records: Sequence[dict]) -> list[dict[str, Any]]:
  """The monitor's logged events: [{"step", "epoch", "trigger"}, ...]."""
  epoch = _epoch_of_step(records)
  return [{"step": r["step"], "epoch": epoch(r["step"]), "trigger": r.get("co/trigger")}
          for r in records if r.get("co/detected")]


def _event_label(event: Mapping[str, Any]) -> str:
  e = event["epoch"]
  where = f"epoch {e:.3g}" if e == e else f"step {event['step']}"
  trigger = {"pgd_collapse": "PGD collapse", "fgsm_above_clean": "FGSM > clean"}.get(
      event.get("trigger"), "")
  return f"CO detected ({where}{', ' + trigger if trigger else ''})"


def _draw_events(ax, events: Sequence[Mapping[str, Any]]) -> None:
  for event in events:
    if event["epoch"] == event["epoch"]:   # not NaN
      ax.axvline(event["epoch"], color="red", ls="--", alpha=0.7, label=_event_label(event))


def _legend(ax, **kwargs) -> None:
  handles, labels = ax.get_legend_handles_labels()
  if handles:
    ax.legend(fontsize=8, **kwargs)
  else:
    ax.text(0.5, 0.5, "no records yet", ha="center", va="center", transform=ax.transAxes,
            color="gray")


# ----------------------------------------------------------------------------- curves


def _monitored_eval_name(records: Sequence[dict], config: Mapping[str, Any] | None) -> str:
  name = _get(config, "co_monitor", "eval") or "test"
  if not any(f"{name}/pgd_acc" in r for r in records) and any(
      "eval/pgd_acc" in r for r in records):
    return "eval"
  return name


def _monitored_eval(workdir: str, records: list[dict]) -> str:
  """The name of the evaluation the run's monitor read (config.co_monitor.eval)."""
  return _monitored_eval_name(records, read_config(workdir))


def training_curves_figure(records: Sequence[dict], *, config: Mapping[str, Any] | None = None,
                           metadata: Mapping[str, Any] | None = None,
                           eval_name: str | None = None, title: str | None = None):
  """The figure of `plot_training_curves` (a `matplotlib.figure.Figure`).

  Panels: (a) clean, at-the-FGSM-point, FGSM and PGD-k accuracy on the
  evaluation subset; (b) the training loss: total, the cross-entropy at the
  adversarial point and, with a regularizer, their difference; when they are
  equal (no regularizer) the total is drawn as a wide band under the dashed CE
  and its label says so; (c) gradient alignment and cos(δ_FGSM, δ_PGD). Every
  line has a legend entry, the monitor's events included (red dashed).

  Args:
    records: metrics.jsonl records (see the module docstring).
    config: the run's config as a dict (config.json), for the subtitle, the
      evaluation's PGD steps and the monitored evaluation's name.
    metadata: overrides of `run_metadata` (method, eps in /255, n, seed,
      pgd_steps, pgd_restarts).
    eval_name: the evaluation to plot (default: the monitor's).
    title: first line of the title (the second is `subtitle(...)`).
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  records = list(records)
  name = eval_name or _monitored_eval_name(records, config)
  meta = run_metadata(config, records, name, metadata)
  pgd = pgd_label(meta)
  evals = [r for r in records if f"{name}/pgd_acc" in r]
  trains = [r for r in records if "train/loss" in r]
  events = co_events(records)
  fig = Figure(figsize=(15, 4.4))
  axes = fig.subplots(1, 3)

  ax = axes[0]
  ep = [r.get("epoch", math.nan) for r in evals]
  for key, label in _ACCURACIES:
    if any(f"{name}/{key}" in r for r in evals):
      ax.plot(ep, [100 * r.get(f"{name}/{key}", math.nan) for r in evals], marker="o", ms=3,
              label=label or f"{pgd} (robust)")
  _draw_events(ax, events)
  ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"(a) accuracy, evaluation {name!r}")
  _legend(ax)

  ax = axes[1]
  te = [r.get("epoch", math.nan) for r in trains]
  total = np.array([r["train/loss"] for r in trains], float)
  if any("train/ce" in r for r in trains):
    ce = np.array([r.get("train/ce", math.nan) for r in trains], float)
    has_reg = any(k.startswith("train/reg/") for r in trains for k in r)
    equal = not has_reg and np.allclose(total, ce, rtol=1e-6, atol=1e-7, equal_nan=True)
    if equal:
      ax.plot(te, total, color="C0", lw=6, alpha=0.3,
              label="total loss (= CE: no regularizer)")
    else:
      ax.plot(te, total, color="C0", label="total loss")
    ax.plot(te, ce, color="C1", ls="--", marker="." if len(te) < 60 else None,
            label="CE at x+δ (adversarial)")
    if not equal:
      ax.plot(te, total - ce, color="C2", ls=":", label="regularizer term λ·Ω (total − CE)")
  elif trains:
    ax.plot(te, total, color="C0", label="total loss")
  _draw_events(ax, events)
  ax.set(xlabel="epoch", ylabel="loss", title="(b) training loss")
  _legend(ax)

  ax = axes[2]
  for key, label in (("grad_alignment", "gradient alignment"),
                     ("cos_fgsm_pgd", f"cos(δ_FGSM, δ_{pgd})")):
    if any(f"{name}/{key}" in r for r in evals):
      ax.plot(ep, [r.get(f"{name}/{key}", math.nan) for r in evals], marker="o", ms=3,
              label=label)
  _draw_events(ax, events)
  ax.set(xlabel="epoch", ylabel="cosine", title="(c) alignment", ylim=(-0.05, 1.05))
  _legend(ax, loc="lower left")

  sub = subtitle(meta)
  fig.suptitle(f"{title or 'Training curves'}\n{sub}" if sub else (title or "Training curves"),
               fontsize=10)
  fig.tight_layout()
  return fig


def plot_training_curves(workdir: str, out: str | None = None, *,
                         config: Mapping[str, Any] | None = None,
                         metadata: Mapping[str, Any] | None = None) -> str:
  """Writes `training_curves.png` (see `training_curves_figure`); returns its path.

  Args:
    workdir: the run's directory (metrics.jsonl; config.json read when
      `config` is not given).
    out: the PNG's path (default `workdir/training_curves.png`).
    config: the run's config as a dict, instead of config.json.
    metadata: overrides for the subtitle and labels (`run_metadata`).
  """
  records = read_metrics(workdir)
  config = read_config(workdir) if config is None else config
  fig = training_curves_figure(records, config=config, metadata=metadata,
                               title=os.path.basename(os.path.abspath(workdir)))
  out = out or os.path.join(workdir, TRAINING_CURVES)
  fig.savefig(out, dpi=110)
  return out


# ----------------------------------------------------------------------------- filters


def _filter_series(records_or_arrays: Any):
  """(epochs (E,), conv (E, F), out (E, F), records) from the accepted inputs."""
  if isinstance(records_or_arrays, (str, os.PathLike)):
    records_or_arrays = read_metrics(os.fspath(records_or_arrays))
  if isinstance(records_or_arrays, Mapping):
    arrays = records_or_arrays

    def pick(short):
      for key in (short, f"filters/{short}"):
        if key in arrays:
          return np.asarray(arrays[key], float)
      raise ValueError(f"Filter-norm arrays need {short!r} (or 'filters/{short}'); got "
                       f"keys {sorted(arrays)}.")
    conv, out = np.atleast_2d(pick("conv_norm")), np.atleast_2d(pick("out_norm"))
    epochs = np.asarray(arrays.get("epoch", np.arange(1, len(conv) + 1)), float)
    records = []
  else:
    records = list(records_or_arrays)
    rows = [r for r in records if FILTER_CONV_KEY in r and FILTER_OUT_KEY in r]
    if not rows:
      raise ValueError(f"No records with {FILTER_CONV_KEY!r} and {FILTER_OUT_KEY!r}: log "
                       f"plotting.filter_norm_record(params) once per epoch.")
    epochs = np.array([r.get("epoch", r.get("step", i)) for i, r in enumerate(rows)], float)
    conv = np.array([r[FILTER_CONV_KEY] for r in rows], float)
    out = np.array([r[FILTER_OUT_KEY] for r in rows], float)
  if conv.shape != out.shape or conv.ndim != 2 or len(epochs) != len(conv):
    raise ValueError(f"Filter norms must be (epochs, filters) arrays of equal shapes with "
                     f"one epoch each; got conv {conv.shape}, out {out.shape}, "
                     f"epochs {np.shape(epochs)}.")
  return epochs, conv, out, records


def filter_norms_figure(records_or_arrays: Any, *, config: Mapping[str, Any] | None = None,
                        metadata: Mapping[str, Any] | None = None, title: str | None = None):
  """The figure of `plot_filter_norms` (a `matplotlib.figure.Figure`)."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  epochs, conv, out, records = _filter_series(records_or_arrays)
  events = co_events(records)
  largest = int(np.argmax(conv[-1]))
  fig = Figure(figsize=(11, 4.2))
  axes = fig.subplots(1, 2)
  for ax, values, what in ((axes[0], conv, "‖w_c‖₂ of conv filter c"),
                           (axes[1], out, "‖outgoing linear weights of filter c‖₂")):
    for c in range(values.shape[1]):
      ax.plot(epochs, values[:, c], marker="o" if len(epochs) < 40 else None, ms=3,
              lw=2.2 if c == largest else 1.2,
              label=f"filter {c}" + (" (largest ‖w‖ at the end)" if c == largest else ""))
    _draw_events(ax, events)
    ax.set(xlabel="epoch", ylabel="l2 norm", title=what)
    _legend(ax)
  meta = run_metadata(config, records, _monitored_eval_name(records, config), metadata)
  sub = subtitle(meta)
  head = title or "Single-layer CNN: per-filter norms (GradAlign §4)"
  fig.suptitle(f"{head}\n{sub}" if sub else head, fontsize=10)
  fig.tight_layout()
  return fig


def plot_filter_norms(records_or_arrays: Any, path: str, *,
                      config: Mapping[str, Any] | None = None,
                      metadata: Mapping[str, Any] | None = None,
                      title: str | None = None) -> str:
  """Writes the per-filter norms of the single-layer CNN per epoch; returns `path`.

  Two panels, one line per filter: the l2 norm of the filter's 3x3xC kernel and
  that of its outgoing linear weights (`models.simple_cnn.filter_norms`), with
  the monitor's events (GradAlign §4: under catastrophic overfitting one filter
  becomes a Laplace-like edge detector whose two norms grow).

  Args:
    records_or_arrays: metrics.jsonl records (those with "filters/conv_norm"
      and "filters/out_norm", one list of per-filter floats each, and "epoch";
      "co/detected" records give the event lines), a workdir, or a mapping of
      arrays {"conv_norm": (E, F), "out_norm": (E, F), "epoch": (E,)} (the
      keys may carry the "filters/" prefix; epochs default to 1..E).
    path: the PNG to write.
    config, metadata: for the subtitle (see `run_metadata`).
    title: the first title line.
  Raises:
    ValueError: no filter norms in the input, or inconsistent shapes.
  """
  fig = filter_norms_figure(records_or_arrays, config=config, metadata=metadata, title=title)
  fig.savefig(path, dpi=110)
  return path


def has_filter_norms(records: Iterable[dict]) -> bool:
  return any(FILTER_CONV_KEY in r and FILTER_OUT_KEY in r for r in records)


def plot_run(workdir: str, *, config: Mapping[str, Any] | None = None,
             metadata: Mapping[str, Any] | None = None) -> list[str]:
  """Every figure the run's records allow: training curves, and filter norms when logged.

  Returns the paths written (`workdir/training_curves.png`, and
  `workdir/filter_norms.png` when the records hold per-filter norms).
  """
  config = read_config(workdir) if config is None else config
  paths = [plot_training_curves(workdir, config=config, metadata=metadata)]
  records = read_metrics(workdir)
  if has_filter_norms(records):
    paths.append(plot_filter_norms(records, os.path.join(workdir, FILTER_NORMS),
                                   config=config, metadata=metadata,
                                   title=os.path.basename(os.path.abspath(workdir))
                                   + ": per-filter norms (GradAlign §4)"))
  return paths

"""Catastrophic-overfitting monitor and early stopping, on concrete host values.

Catastrophic overfitting (Wong et al. 2020; Andriushchenko & Flammarion 2020,
Fig. 1 and 4): within a few hundred iterations the accuracy under a multi-step
attack (PGD) collapses while the accuracy under the training attack (FGSM) rises,
and gradient alignment and cos(FGSM, PGD) fall. The monitor watches the periodic
evaluation records and reports the step at which that pattern appears.

Early stopping follows the references: Wong et al. stop when PGD accuracy on
fixed training points drops by more than 0.2 from its best; GradAlign keeps the
state with the best PGD accuracy on the first training points.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class CatastrophicOverfittingMonitor:
  """Detects the collapse from successive evaluation records.

  A record is a dict with at least "pgd_acc" and "fgsm_acc" (fractions) and
  optionally "fgsm_point_acc", "grad_alignment" and "cos_fgsm_pgd". "FGSM
  accuracy" below is the accuracy at the FGSM point, "fgsm_point_acc", when the
  record has it (robust accuracy, "fgsm_acc", also requires the clean point to
  be correct, so it can never exceed clean accuracy), else "fgsm_acc". Catastrophic overfitting is
  declared at a record when

  * PGD accuracy fell by more than `pgd_drop` below its best so far and to
    less than `1 - pgd_rel_drop` of it (relative, because small models such as
    the single-layer CNN peak at under 20% PGD accuracy), and
  * FGSM accuracy is above the FGSM accuracy at that best record (the FGSM
    accuracy rises while PGD accuracy collapses: the defining signature), and
  * if the record has gradient alignment (or cos(FGSM, PGD)), it fell by more
    than `alignment_drop` below its value at the best record;

  or, when catastrophic overfitting strikes before any robustness was gained
  (large ε: PGD accuracy never rises, so it cannot drop), when

  * FGSM accuracy exceeds clean accuracy by more than `fgsm_over_clean` (the
    FGSM perturbation *helps* the model: the label-leaking signature of a
    model fitted to its own single-step attack, GradAlign Fig. 1), and
  * gradient alignment (or cos(FGSM, PGD)) fell by more than `alignment_drop`
    below the highest value seen.

  Attributes:
    pgd_drop: absolute drop of PGD accuracy below its best.
    pgd_rel_drop: relative drop of PGD accuracy below its best.
    alignment_drop: absolute drop of gradient alignment / cos(FGSM, PGD).
    fgsm_over_clean: margin by which FGSM accuracy must exceed clean accuracy
      for the second trigger.
  """
  pgd_drop: float = 0.05
  pgd_rel_drop: float = 0.5
  alignment_drop: float = 0.1
  fgsm_over_clean: float = 0.05
  best: dict[str, Any] | None = None
  max_alignment: float | None = None
  events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  # True while the collapse lasts: it is reported once, at its first record.
  collapsed: bool = False

  def update(self, step: int, record: dict[str, float]) -> dict[str, Any] | None:
    """Feeds one evaluation record; returns an event dict when CO is detected."""
    fgsm = _fgsm_key(record)
    aligned_key = next((k for k in ("grad_alignment", "cos_fgsm_pgd") if k in record), None)
    if aligned_key is not None:
      value = record[aligned_key]
      self.max_alignment = value if self.max_alignment is None else max(
          self.max_alignment, value)
    if self.best is None or record["pgd_acc"] > self.best["pgd_acc"]:
      self.best = dict(record, step=int(step))
      if not self._leaking(record, aligned_key):
        self.collapsed = False
        return None
    best = self.best
    collapsed = (record["pgd_acc"] < best["pgd_acc"] - self.pgd_drop and
                 record["pgd_acc"] < (1.0 - self.pgd_rel_drop) * best["pgd_acc"])
    fgsm_rising = record[fgsm] > best[_fgsm_key(best)]
    alignment_fell = (aligned_key is None or aligned_key not in best or
                      record[aligned_key] < best[aligned_key] - self.alignment_drop)
    detected = (collapsed and fgsm_rising and alignment_fell) or self._leaking(
        record, aligned_key)
    if not detected:
      self.collapsed = False
      return None
    if self.collapsed:
      return None
    self.collapsed = True
    event = {
        "step": int(step), "pgd_acc": record["pgd_acc"], "fgsm_acc": record[fgsm],
        "best_step": best["step"], "best_pgd_acc": best["pgd_acc"],
        "best_fgsm_acc": best[_fgsm_key(best)],
        "trigger": "pgd_collapse" if collapsed and fgsm_rising and alignment_fell
                   else "fgsm_above_clean"}
    if "clean_acc" in record:
      event["clean_acc"] = record["clean_acc"]
    if aligned_key:
      event[aligned_key] = record[aligned_key]
      event["max_" + aligned_key] = self.max_alignment
      if aligned_key in best:
        event["best_" + aligned_key] = best[aligned_key]
    self.events.append(event)
    return event

  def _leaking(self, record: dict[str, float], aligned_key: str | None) -> bool:
    """FGSM accuracy above clean accuracy while alignment fell from its maximum."""
    if "clean_acc" not in record or aligned_key is None:
      return False
    return (record[_fgsm_key(record)] > record["clean_acc"] + self.fgsm_over_clean and
            record[aligned_key] < self.max_alignment - self.alignment_drop)

  def state_dict(self) -> dict[str, Any]:
    return {"pgd_drop": self.pgd_drop, "pgd_rel_drop": self.pgd_rel_drop,
            "alignment_drop": self.alignment_drop, "fgsm_over_clean": self.fgsm_over_clean,
            "best": self.best, "max_alignment": self.max_alignment,
            "events": list(self.events), "collapsed": self.collapsed}

  @classmethod
  def from_state_dict(cls, d: dict[str, Any]) -> "CatastrophicOverfittingMonitor":
    return cls(pgd_drop=d["pgd_drop"], pgd_rel_drop=d.get("pgd_rel_drop", 0.5),
               alignment_drop=d["alignment_drop"],
               fgsm_over_clean=d.get("fgsm_over_clean", 0.05), best=d["best"],
               max_alignment=d.get("max_alignment"), events=list(d["events"]),
               collapsed=d.get("collapsed", False))


def _fgsm_key(record) -> str:
  return "fgsm_point_acc" if "fgsm_point_acc" in record else "fgsm_acc"


def replay(records, *, eval_name: str = "test", **kwargs) -> list[dict[str, Any]]:
  """Runs the monitor over logged evaluation records (a run's metrics.jsonl lines).

  Records are the dicts `train_and_evaluate` writes, with "<eval_name>/pgd_acc"
  etc. (runs before named evaluations wrote "eval/pgd_acc", read when present);
  returns the events the monitor (with `kwargs`) would have reported.
  """
  monitor = CatastrophicOverfittingMonitor(**kwargs)
  for r in records:
    prefix = next((p for p in (eval_name, "eval") if f"{p}/pgd_acc" in r), None)
    if prefix is not None:
      monitor.update(r["step"], {k[len(prefix) + 1:]: v for k, v in r.items()
                                 if k.startswith(prefix + "/")})
  return monitor.events


@dataclasses.dataclass
class EarlyStopping:
  """Tracks PGD accuracy on fixed training points (Wong et al.; GradAlign).

  `update` returns (is_best, should_stop): is_best when the accuracy is the
  best so far (the state is saved as "best"), should_stop when `stop_on_drop` is
  set and the accuracy dropped by more than `drop` below the best (Wong et al.).
  """
  drop: float = 0.2
  stop_on_drop: bool = False
  best_acc: float = -1.0
  best_step: int = -1

  def update(self, step: int, acc: float) -> tuple[bool, bool]:
    if acc > self.best_acc:
      self.best_acc, self.best_step = float(acc), int(step)
      return True, False
    return False, bool(self.stop_on_drop and acc < self.best_acc - self.drop)

  def state_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_state_dict(cls, d: dict[str, Any]) -> "EarlyStopping":
    return cls(**d)

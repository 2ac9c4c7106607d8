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
  optionally "grad_alignment" and "cos_fgsm_pgd". Catastrophic overfitting is
  declared at a record when

  * PGD accuracy fell by more than `pgd_drop` below its best so far and to
    less than `1 - pgd_rel_drop` of it (relative, because small models such as
    the single-layer CNN peak at under 20% PGD accuracy), and
  * FGSM accuracy is above the FGSM accuracy at that best record (the FGSM
    accuracy rises while PGD accuracy collapses: the defining signature), and
  * if the record has gradient alignment (or cos(FGSM, PGD)), it fell by more
    than `alignment_drop` below its value at the best record.

  Attributes:
    pgd_drop: absolute drop of PGD accuracy below its best.
    pgd_rel_drop: relative drop of PGD accuracy below its best.
    alignment_drop: absolute drop of gradient alignment / cos(FGSM, PGD).
  """
  pgd_drop: float = 0.05
  pgd_rel_drop: float = 0.5
  alignment_drop: float = 0.1
  best: dict[str, Any] | None = None
  events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  # True while the collapse lasts: it is reported once, at its first record.
  collapsed: bool = False

  def update(self, step: int, record: dict[str, float]) -> dict[str, Any] | None:
    """Feeds one evaluation record; returns an event dict when CO is detected."""
    if self.best is None or record["pgd_acc"] > self.best["pgd_acc"]:
      self.best = dict(record, step=int(step))
      self.collapsed = False
      return None
    best = self.best
    collapsed = (record["pgd_acc"] < best["pgd_acc"] - self.pgd_drop and
                 record["pgd_acc"] < (1.0 - self.pgd_rel_drop) * best["pgd_acc"])
    fgsm_rising = record["fgsm_acc"] > best["fgsm_acc"]
    aligned_key = next((k for k in ("grad_alignment", "cos_fgsm_pgd")
                        if k in record and k in best), None)
    alignment_fell = (aligned_key is None or
                      record[aligned_key] < best[aligned_key] - self.alignment_drop)
    if not collapsed:
      self.collapsed = False
    if collapsed and fgsm_rising and alignment_fell and not self.collapsed:
      self.collapsed = True
      event = {
          "step": int(step), "pgd_acc": record["pgd_acc"], "fgsm_acc": record["fgsm_acc"],
          "best_step": best["step"], "best_pgd_acc": best["pgd_acc"],
          "best_fgsm_acc": best["fgsm_acc"]}
      if aligned_key:
        event[aligned_key] = record[aligned_key]
        event["best_" + aligned_key] = best[aligned_key]
      self.events.append(event)
      return event
    return None

  def state_dict(self) -> dict[str, Any]:
    return {"pgd_drop": self.pgd_drop, "pgd_rel_drop": self.pgd_rel_drop,
            "alignment_drop": self.alignment_drop, "best": self.best,
            "events": list(self.events), "collapsed": self.collapsed}

  @classmethod
  def from_state_dict(cls, d: dict[str, Any]) -> "CatastrophicOverfittingMonitor":
    return cls(pgd_drop=d["pgd_drop"], pgd_rel_drop=d.get("pgd_rel_drop", 0.5),
               alignment_drop=d["alignment_drop"], best=d["best"], events=list(d["events"]),
               collapsed=d.get("collapsed", False))


def replay(records, **kwargs) -> list[dict[str, Any]]:
  """Runs the monitor over logged evaluation records (a run's metrics.jsonl lines).

  Records are the dicts `train_and_evaluate` writes, with "eval/pgd_acc" etc.;
  returns the events the monitor (with `kwargs`) would have reported.
  """
  monitor = CatastrophicOverfittingMonitor(**kwargs)
  for r in records:
    if "eval/pgd_acc" in r:
      monitor.update(r["step"], {k[len("eval/"):]: v for k, v in r.items()
                                 if k.startswith("eval/")})
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

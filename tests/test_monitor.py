"""The catastrophic-overfitting monitor and early stopping, on synthetic records."""

from fastadv_jax import monitor


def record(pgd, fgsm, align):
  return {"pgd_acc": pgd, "fgsm_acc": fgsm, "grad_alignment": align}


# A run like the single-layer CNN's: PGD peaks at 0.18, then collapses while FGSM rises.
CO_RUN = [record(0.02, 0.02, 0.93), record(0.15, 0.17, 0.88), record(0.18, 0.19, 0.87),
          record(0.16, 0.18, 0.85), record(0.10, 0.19, 0.52), record(0.03, 0.22, 0.22),
          record(0.0, 0.34, 0.09), record(0.0, 0.43, 0.05)]


def test_collapse_is_reported_once_at_its_first_record():
  m = monitor.CatastrophicOverfittingMonitor()
  events = [m.update(step, r) for step, r in enumerate(CO_RUN)]
  fired = [i for i, e in enumerate(events) if e is not None]
  assert fired == [5]
  assert events[5]["best_step"] == 2 and events[5]["best_pgd_acc"] == 0.18
  assert m.collapsed


def test_no_collapse_without_rising_fgsm_or_falling_alignment():
  # Robustness lost everywhere (FGSM falls too): plain divergence, not CO.
  diverging = [record(0.4, 0.5, 0.9), record(0.1, 0.2, 0.5)]
  m = monitor.CatastrophicOverfittingMonitor()
  assert all(m.update(i, r) is None for i, r in enumerate(diverging))
  # FGSM rises, PGD collapses, but gradients stay aligned: not reported.
  aligned = [record(0.4, 0.5, 0.9), record(0.1, 0.6, 0.88)]
  m = monitor.CatastrophicOverfittingMonitor()
  assert all(m.update(i, r) is None for i, r in enumerate(aligned))
  # A small relative wiggle is not a collapse.
  m = monitor.CatastrophicOverfittingMonitor()
  assert all(m.update(i, r) is None for i, r in enumerate(
      [record(0.45, 0.5, 0.9), record(0.38, 0.55, 0.7)]))


def test_state_round_trip_and_replay():
  m = monitor.CatastrophicOverfittingMonitor()
  for i, r in enumerate(CO_RUN[:5]):
    m.update(i, r)
  resumed = monitor.CatastrophicOverfittingMonitor.from_state_dict(m.state_dict())
  assert [resumed.update(i, r) is not None for i, r in enumerate(CO_RUN[5:], 5)] == [
      True, False, False]
  logged = [{"step": i, **{f"eval/{k}": v for k, v in r.items()}} for i, r in enumerate(CO_RUN)]
  logged.insert(1, {"step": 0, "train/loss": 2.0})
  assert [e["step"] for e in monitor.replay(logged)] == [5]


def test_early_stopping_wong_rule():
  es = monitor.EarlyStopping(drop=0.2, stop_on_drop=True)
  assert es.update(0, 0.40) == (True, False)
  assert es.update(1, 0.45) == (True, False)
  assert es.update(2, 0.30) == (False, False)
  assert es.update(3, 0.20) == (False, True)
  assert es.best_step == 1


def test_collapse_before_any_robustness_is_caught_by_fgsm_above_clean():
  """Large ε: PGD accuracy never rises, but FGSM accuracy overtakes clean accuracy."""
  run = [dict(record(0.010, 0.05, 0.90), clean_acc=0.30),
         dict(record(0.016, 0.10, 0.85), clean_acc=0.26),
         dict(record(0.000, 0.40, 0.30), clean_acc=0.20),
         dict(record(0.000, 0.60, 0.20), clean_acc=0.18)]
  m = monitor.CatastrophicOverfittingMonitor()
  events = [m.update(i, r) for i, r in enumerate(run)]
  assert [i for i, e in enumerate(events) if e] == [2]
  assert events[2]["trigger"] == "fgsm_above_clean"
  assert events[2]["max_grad_alignment"] == 0.90
  # FGSM above clean with gradients still aligned is not reported.
  m = monitor.CatastrophicOverfittingMonitor()
  assert m.update(0, dict(record(0.0, 0.40, 0.88), clean_acc=0.20)) is None

"""The test table of the registered methods: one row per attack and per regularizer.

Every registry-driven test reads its per-method settings here (the attack
tests, the regularizer gradient checks, the train-step wiring test), so adding
a method to the library adds exactly one row to this file; a registered method
without a row fails those tests with a message naming this file.
"""

import pytest

_PGD_RANDOM = lambda kwargs: kwargs.get("random_start", True)

ATTACK_ROWS = {
    # name: the keyword arguments (besides eps, and delta for a carried attack)
    # needed to call it, the step in pixel units; and whether its result
    # depends on the key (a bool, or a function of the call's keyword arguments).
    "none": dict(kwargs={}, random=False),
    "fgsm": dict(kwargs={}, random=False),
    "fgsm_rs": dict(kwargs={}, random=True),
    "pgd": dict(kwargs={"step": 2 / 255, "steps": 3}, random=_PGD_RANDOM),
    "zerograd": dict(kwargs={"q": 0.35}, random=True),
    "multigrad": dict(kwargs={}, random=True),
    "n_fgsm": dict(kwargs={}, random=True),
    "fgsm_n": dict(kwargs={}, random=True),
    "random_corner": dict(kwargs={}, random=True),
    "pgd_corner": dict(kwargs={"step": 2 / 255, "steps": 2}, random=_PGD_RANDOM),
    "free": dict(kwargs={}, random=False),
}

REGULARIZER_ROWS = {
    # name: its hyperparameters (besides what it consumes from the train step).
    "grad_align": {},
    "cure": {},
    "input_grad_norm": {},
    "advlc": {},
    "advlc_l1": {"clean_point": "start"},
    "advlc_l2": {},
    "advlc_kl": {},
    "advlc_js": {},
    "advlc_nuclear": {},
    "elle": {},
}


def attack_row(name):
  if name not in ATTACK_ROWS:
    pytest.fail(f"attack {name!r} is registered in attacks.ATTACK_SPECS but has no row in "
                f"ATTACK_ROWS of tests/method_rows.py; add the keyword arguments needed to "
                f"call it (and whether it is random).")
  return ATTACK_ROWS[name]


def regularizer_row(name):
  if name not in REGULARIZER_ROWS:
    pytest.fail(f"regularizer {name!r} is registered in regularizers.REGULARIZER_SPECS but "
                f"has no row in REGULARIZER_ROWS of tests/method_rows.py; add its "
                f"hyperparameters for the generic checks.")
  return REGULARIZER_ROWS[name]


def assert_rows_match(kind: str, registry, rows) -> None:
  """Every registered `kind` has a row and every row a registered `kind`."""
  missing = sorted(set(registry) - set(rows))
  stale = sorted(set(rows) - set(registry))
  assert not missing, f"registered {kind}s without a row in tests/method_rows.py: {missing}"
  assert not stale, f"rows in tests/method_rows.py for {kind}s not registered: {stale}"

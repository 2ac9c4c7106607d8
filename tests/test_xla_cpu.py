"""The XLA:CPU defaults added at import (fastadv_jax.xla_cpu): when, and when not."""

import os

import pytest

from fastadv_jax import xla_cpu

FLAG = xla_cpu.CPU_DEFAULTS[0]


@pytest.fixture
def fresh(monkeypatch):
  """No backend yet, a measured jaxlib."""
  monkeypatch.setattr(xla_cpu, "_backend_exists", lambda: False)
  monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: xla_cpu.MEASURED_JAXLIB[0])


def test_the_suite_runs_with_the_defaults():
  assert FLAG in os.environ.get("XLA_FLAGS", "")


def test_added_after_existing_flags(fresh):
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_cpu.add_cpu_defaults(environ) == [FLAG]
  assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
  assert xla_cpu.add_cpu_defaults(environ) == []  # once
  assert environ["XLA_FLAGS"].count("ynn") == 1


@pytest.mark.parametrize("environ", [
    {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="},   # the user's own choice
    {xla_cpu.OPT_OUT: "0"},
])
def test_the_user_decides(fresh, environ):
  before = dict(environ)
  assert xla_cpu.add_cpu_defaults(environ) == []
  assert environ == before


def test_not_once_a_backend_exists_or_for_an_unmeasured_jaxlib(monkeypatch):
  monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda: xla_cpu.MEASURED_JAXLIB[0])
  monkeypatch.setattr(xla_cpu, "_backend_exists", lambda: True)
  assert xla_cpu.add_cpu_defaults({}) == []
  monkeypatch.setattr(xla_cpu, "_backend_exists", lambda: False)
  for version in (xla_cpu.MEASURED_JAXLIB[1], (0, 4), None):
    monkeypatch.setattr(xla_cpu, "_jaxlib_version", lambda v=version: v)
    assert xla_cpu.add_cpu_defaults({}) == []


def test_a_backend_is_detected():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  jnp.zeros(()).block_until_ready()
  assert xla_cpu._backend_exists()  # pylint: disable=protected-access

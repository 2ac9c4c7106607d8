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


def test_loops_are_unrolled_where_they_convolve():
  """`unroll_loop`: on CPU, a loop whose body has an XLA convolution (also
  nested in a jit) is unrolled; a body without one, such as the input
  gradient of the im2col convolution, stays a rolled loop."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fastadv_jax.models import common  # pylint: disable=g-import-not-at-top
  x, kernel = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
  padding = ((1, 1), (1, 1))
  xla = jax.jit(lambda z: jax.lax.conv_general_dilated(
      z, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")))
  input_grad = lambda conv: jax.grad(lambda z: jnp.sum(jnp.sin(conv(z))))
  on_cpu = jax.default_backend() == "cpu"
  assert xla_cpu.unroll_loop(input_grad(xla), x) == on_cpu
  assert not xla_cpu.unroll_loop(input_grad(
      lambda z: common.image_conv(z, kernel, (1, 1), padding)), x)
  assert not xla_cpu.unroll_loop(lambda z: jnp.tanh(z) @ jnp.ones((3, 3)), x)
  # Nor its kernel gradient (a train step on an im2col stem): no convolution.
  assert not xla_cpu.unroll_loop(jax.grad(lambda k: jnp.sum(
      common.image_conv(x, k, (1, 1), padding))), kernel)

"""XLA:CPU settings this library turns on when it is imported first, and the
rule for unrolling the attacks' loops on CPU (`unroll_loop`).

`--xla_cpu_experimental_ynn_fusion_type=reduce` runs XLA:CPU's reductions
(BatchNorm's batch statistics and their gradients, the losses' means) through
YNNPACK. On a 2-core x86 CPU it made PreActResNet-18's FGSM train step at
batch 64 22-25% faster (alternating runs), with the same memory, deterministic
results and gradients as close to a float64 reference as XLA's own reductions
(`benchmarks/README.md`, "XLA:CPU flags"); the single-layer CNN (no
BatchNorm) is unchanged. Adding the other fusion types (dot, eltwise) was
slower than `reduce` alone, and eltwise raised the memory. The flag only
concerns the CPU backend. Part of the gain is not the reductions: with any
YNN fusion type turned on, XLA:CPU ran a lone 3x3 convolution (batch 128,
32x32, 64 channels) on both cores (CPU/wall time 1.84, 49 ms) instead of one
(1.00, 103 ms); why was not established (benchmarks/README.md).

XLA reads `XLA_FLAGS` once, when JAX first creates a backend, and stops the
process on a flag it does not know; so the flag is added only

* if no backend exists yet (import fastadv_jax before running any JAX code),
* if `XLA_FLAGS` does not set it already (`--xla_cpu_experimental_ynn_fusion_type=`
  with no value there opts out; FASTADV_JAX_XLA_CPU_DEFAULTS=0 leaves
  `XLA_FLAGS` alone),
* for the jaxlib versions it was measured with (`MEASURED_JAXLIB`): an
  experimental flag may be renamed in another version.
"""

from __future__ import annotations

import os
import re

CPU_DEFAULTS = ("--xla_cpu_experimental_ynn_fusion_type=reduce",)
MEASURED_JAXLIB = ((0, 10), (0, 11))  # [first, past-the-end) (major, minor)
OPT_OUT = "FASTADV_JAX_XLA_CPU_DEFAULTS"


def _jaxlib_version() -> tuple[int, ...] | None:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return tuple(int(p) for p in re.findall(r"\d+", metadata.version("jaxlib"))[:2])
  except Exception:  # pylint: disable=broad-except
    return None


def _backend_exists() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge._backends)  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    return True  # unknown: leave XLA_FLAGS alone


def add_cpu_defaults(environ=None) -> list[str]:
  """Appends `CPU_DEFAULTS` to `XLA_FLAGS` where that is safe (see above).

  Returns:
    The flags added (empty when none was).
  """
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT, "1") == "0" or _backend_exists():
    return []
  version = _jaxlib_version()
  if version is None or not MEASURED_JAXLIB[0] <= version < MEASURED_JAXLIB[1]:
    return []
  current = environ.get("XLA_FLAGS", "")
  added = [flag for flag in CPU_DEFAULTS if flag.split("=")[0] not in current]
  if added:
    environ["XLA_FLAGS"] = " ".join([current] + added).strip()
  return added


# Loops. XLA:CPU runs a convolution's input gradient inside a while-loop body
# 2-2.5x slower than the same computation at the top level of a program
# (jax-ml/jax#12868), so the attacks unroll their short loops on CPU, but only
# when the loop body convolves: a model whose input gradient has no XLA
# convolution left (an im2col stem, `models.common.image_conv`) ran 100
# APGD-CE iterations 2x faster rolled than unrolled (0.30 vs 0.64 s, batch 96,
# benchmarks/README_parity.md).


def _has_convolution(jaxpr) -> bool:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      return True
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(inner, "eqns") and _has_convolution(inner):
          return True
  return False


def unroll_loop(body, *args) -> bool:
  """Whether a short loop of `body(*args)` runs faster unrolled: on the CPU
  backend when `body` (traced on the shapes of `args`, nothing is computed)
  has a convolution, see above."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != "cpu":
    return False
  return _has_convolution(jax.make_jaxpr(body)(*args).jaxpr)

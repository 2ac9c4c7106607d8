"""Test configuration: CPU only, 8 simulated devices, persistent compilation cache.

The XLA flag must be set before JAX initialises its backends, so it is set here,
at import time of the first conftest, before any test module imports jax.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

import fastadv_jax  # noqa: E402,F401  (its XLA:CPU defaults, before any backend exists)

_CACHE = os.environ.get(
    "FASTADV_JAX_TEST_CACHE",
    os.path.join(os.path.expanduser("~"), ".cache", "fastadv_jax", "jax_test_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

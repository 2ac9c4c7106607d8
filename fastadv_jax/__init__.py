"""fastadv_jax: fast adversarial training in JAX/Flax.

Attacks, regularizers and metrics are pure functions of closures (`closures`);
the train step, the loop and evaluation sit around them (`train`, `evaluate`).
"""

__version__ = "0.1.0"

# Before anything below can create a JAX backend (see xla_cpu's docstring).
from fastadv_jax import xla_cpu  # pylint: disable=g-bad-import-order
xla_cpu.add_cpu_defaults()

from fastadv_jax import attacks
from fastadv_jax import closures
from fastadv_jax import metrics
from fastadv_jax import models
from fastadv_jax import regularizers
from fastadv_jax import schedules

__all__ = ["attacks", "closures", "metrics", "models", "regularizers", "schedules",
           "__version__"]

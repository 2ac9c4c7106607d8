"""fastadv_jax: fast adversarial training in JAX/Flax."""

from fastadv_jax import closures

__version__ = "0.1.0"

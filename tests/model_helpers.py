"""Helpers shared by the model and interop tests."""

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import models


def random_variables(model, seed, image_shape=(32, 32, 3)):
  """Seeded random variables of the right shapes, without compiling `model.init`.

  (Compiling the random initialisers of a whole network is the slowest thing
  on CPU; most tests only need some well-scaled weights.)
  """
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name in ("bias", "mean"):
      value = rng.uniform(-0.2, 0.2, leaf.shape)
    else:  # kernels, He-like scale
      value = rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, models.abstract_variables(model, image_shape))

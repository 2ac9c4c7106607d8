"""Helpers shared by the model, interop and regularizer tests."""

import flax.linen as nn
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


def far_running_statistics(variables, seed):
  """`variables` with BatchNorm_0's running mean and variance drawn far from any
  batch's statistics, so eval mode and batch mode give different logits."""
  rng = np.random.default_rng(seed)
  stats = variables["batch_stats"]["BatchNorm_0"]
  return {"params": variables["params"], "batch_stats": {"BatchNorm_0": {
      "mean": jnp.asarray(rng.uniform(-0.5, 0.5, stats["mean"].shape), jnp.float32),
      "var": jnp.asarray(rng.uniform(0.2, 2.0, stats["var"].shape), jnp.float32)}}}


class TinyConvNet(nn.Module):
  """A 2-filter conv net with BatchNorm and smooth activations (for float64
  finite-difference checks: softplus keeps second derivatives continuous).

  `__call__(x, train)` like the library's models, so `closures.logits_fn` and
  `models.abstract_variables` work with it.
  """
  filters: int = 2
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.filters, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.softplus(x)
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))

"""Tests for fastadv_jax.closures: one pytree closure type, inside and outside jit.

A conv + BatchNorm net on 8x8 images with running statistics far from any
batch's, so batch mode and eval mode give different logits.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import closures
from model_helpers import far_running_statistics


class BNNet(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(10, dtype=self.dtype)(x)


def _variables(seed):
  return far_running_statistics(BNNet().init(jax.random.key(seed), jnp.zeros((1, 8, 8, 3))),
                                seed)


@pytest.fixture(scope="module")
def x():
  return jax.random.uniform(jax.random.key(9), (4, 8, 8, 3))


def test_logits_fn_is_a_pytree_of_the_variables(x):
  variables = _variables(0)
  f = closures.logits_fn(BNNet(), variables, bn="eval")
  assert isinstance(f, closures.LogitsFn)
  leaves = jax.tree_util.tree_leaves(f)
  assert len(leaves) == len(jax.tree_util.tree_leaves(variables))
  # the module, mode and dtype are static: a map over the leaves keeps them
  doubled = jax.tree_util.tree_map(lambda v: v, f)
  assert doubled.model == f.model and doubled.bn == "eval" and doubled.dtype is None
  np.testing.assert_allclose(doubled(x), f(x))


def test_batch_and_eval_modes(x):
  model, variables = BNNet(), _variables(0)
  batch = closures.logits_fn(model, variables, bn="batch")(x)
  expected, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(batch, expected, rtol=1e-6)
  evaluated = closures.logits_fn(model, variables, bn="eval")(x)
  np.testing.assert_allclose(evaluated, model.apply(variables, x, train=False), rtol=1e-6)
  assert not np.allclose(batch, evaluated)
  # the running averages are not updated by a batch-mode call
  f = closures.logits_fn(model, variables, bn="batch")
  f(x)
  chex.assert_trees_all_equal(f.variables, variables)
  with pytest.raises(ValueError, match="bn.*'train'.*batch.*eval"):
    closures.logits_fn(model, variables, bn="train")


def test_dtypes_and_eval_logits_fn(x):
  variables = _variables(0)
  bf16 = BNNet(dtype=jnp.bfloat16)
  promoted = closures.logits_fn(bf16, variables)(x)
  assert promoted.dtype == jnp.float32  # bf16 logits promoted to float32
  assert closures.logits_fn(bf16, variables, dtype=jnp.bfloat16)(x).dtype == jnp.bfloat16
  # evaluation closure: float32 model, float32 variables, eval mode
  half_variables = jax.tree_util.tree_map(lambda v: v.astype(jnp.bfloat16), variables)
  f = closures.eval_logits_fn(bf16, half_variables)
  assert f.model.dtype == jnp.float32 and f.bn == "eval"
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(f))
  exact = closures.logits_fn(BNNet(), jax.tree_util.tree_map(
      lambda v: v.astype(jnp.bfloat16).astype(jnp.float32), variables))(x)
  np.testing.assert_allclose(f(x), exact, rtol=1e-6)
  assert f(x).dtype == jnp.float32


def test_jit_and_pmap_argument_reuses_compilation_for_another_checkpoint(x):
  model = BNNet()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def predict(logits_fn, x):
    return jnp.argmax(logits_fn(x), -1)

  first = closures.eval_logits_fn(model, _variables(0))
  second = closures.eval_logits_fn(BNNet(), _variables(1))  # an equal module
  np.testing.assert_array_equal(predict(first, x), jnp.argmax(first(x), -1))
  np.testing.assert_array_equal(predict(second, x), jnp.argmax(second(x), -1))
  assert hash(jax.tree_util.tree_structure(first)) == hash(
      jax.tree_util.tree_structure(second))

  @functools.partial(jax.pmap, in_axes=(None, 0))
  @chex.assert_max_traces(n=1)
  def sharded(logits_fn, x):
    return logits_fn(x)

  devices = jax.local_device_count()
  xs = jnp.broadcast_to(x[:1], (devices,) + x[:1].shape)
  for f in (first, second):
    np.testing.assert_allclose(sharded(f, xs)[0], f(x[:1]), rtol=1e-5, atol=1e-6)


def test_loss_fn_is_a_pytree(x):
  f = closures.eval_logits_fn(BNNet(), _variables(0))
  y = jnp.array([0, 1, 2, 3])
  t = jnp.array([5, 6, 7, 8])

  @jax.jit
  @chex.assert_max_traces(n=2)  # one per loss (static per-example function)
  def value_and_grad(loss_fn, x):
    return jax.value_and_grad(loss_fn)(x)

  for make, per_example in ((closures.cross_entropy, closures.cross_entropy_per_example),
                            (closures.dlr, closures.dlr_per_example)):
    for labels in (y, (y + 1) % 10):  # new labels: no retrace
      value, grad = value_and_grad(make(f, labels), x)
      np.testing.assert_allclose(value, jnp.mean(per_example(f(x), labels)), rtol=1e-6)
      assert grad.shape == x.shape
  targeted = closures.dlr_targeted(f, y, t)
  assert jax.tree_util.tree_leaves(targeted)[-1] is t  # targets are a leaf
  np.testing.assert_allclose(
      jax.jit(lambda loss_fn, x: loss_fn(x))(targeted, x),
      jnp.mean(closures.dlr_targeted_per_example(f(x), y, t)), rtol=1e-6)
  value, aux = targeted.with_aux(x)
  assert aux.losses.shape == (4,) and aux.correct.dtype == jnp.bool_
  np.testing.assert_array_equal(aux.correct, jnp.argmax(f(x), -1) == y)


def test_plain_callables_become_static_partials(x):
  w = jax.random.normal(jax.random.key(0), (8 * 8 * 3, 10))

  def linear(z):
    return z.reshape(z.shape[0], -1) @ w

  wrapped = closures.as_pytree(linear)
  assert isinstance(wrapped, jax.tree_util.Partial) and not jax.tree_util.tree_leaves(wrapped)
  f = closures.eval_logits_fn(BNNet(), _variables(0))
  assert closures.as_pytree(f) is f
  # a loss closure of a plain callable can be passed into jit too
  loss = closures.cross_entropy(linear, jnp.array([0, 1, 2, 3]))
  np.testing.assert_allclose(jax.jit(lambda l, z: l(z))(loss, x), loss(x), rtol=1e-6)
  with pytest.raises(ValueError, match="callable"):
    closures.as_pytree(3.0)


@pytest.mark.parametrize("labels,message", [
    (np.array([0, 1, 2, 10]), r"labels holds 10, outside \[0, 9\] for a model with 10 classes"),
    (np.array([0, -1, 2, 3]), r"-1"),
    (np.array([0, 1, 2]), r"labels has shape \(3,\); expected \(4,\)"),
    (np.array([[0, 1, 2, 3]]), r"labels has shape \(1, 4\)"),
    (np.array([0.0, 1.0, 2.0, 3.0]), "must be integers"),
])
def test_labels_that_do_not_fit_the_logits_are_refused(x, labels, message):
  loss = closures.cross_entropy(closures.eval_logits_fn(BNNet(), _variables(0)), labels)
  with pytest.raises(ValueError, match=message):
    loss(x)


def test_batch_size_of_traced_labels_is_checked_while_tracing(x):
  f = closures.eval_logits_fn(BNNet(), _variables(0))
  with pytest.raises(ValueError, match=r"expected \(4,\)"):
    jax.jit(lambda x, y: closures.cross_entropy(f, y)(x))(x, jnp.zeros((3,), jnp.int32))

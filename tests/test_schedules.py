"""Tests of fastadv_jax.schedules: values at the key points, jit, registry errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fastadv_jax import schedules


def _at(schedule, steps):
  return np.asarray([float(schedule(s)) for s in steps])


def test_cyclic_gradalign_and_wong_shapes():
  total = 1000
  lr = schedules.cyclic(0.2, total, peak_fraction=2 / 5)
  np.testing.assert_allclose(_at(lr, [0, 200, 400, 700, 1000, 1200]),
                             [0.0, 0.1, 0.2, 0.1, 0.0, 0.0], atol=1e-7)
  assert float(lr(0)) == 0.0  # Wong's "first step at lr 0", without a special case
  shifted = schedules.cyclic(0.2, total, peak_fraction=2 / 5, step_offset=1)
  np.testing.assert_allclose(float(shifted(0)), 0.2 / 400, rtol=1e-6)  # GradAlign code
  np.testing.assert_allclose(float(shifted(999)), 0.0, atol=1e-7)
  middle = schedules.cyclic(0.2, 30, peak_fraction=0.5)
  assert int(np.argmax(_at(middle, range(31)))) == 15
  momentum = schedules.cyclic_momentum(30)
  np.testing.assert_allclose(_at(momentum, [0, 15, 30]), [0.9, 0.8, 0.9], atol=1e-7)
  np.testing.assert_allclose(float(momentum(7.5)), 0.85, atol=1e-6)


def test_schedules_are_jittable_and_vectorized():
  lr = schedules.cyclic(0.3, 100)
  jitted = jax.jit(lr)
  steps = jnp.arange(0, 101, 10)
  np.testing.assert_allclose(jitted(steps), _at(lr, range(0, 101, 10)), atol=1e-7)
  assert jitted(jnp.int32(40)).dtype == jnp.float32
  drops = schedules.piecewise(0.1, [3, 6])
  np.testing.assert_allclose(jax.jit(drops)(jnp.arange(8)),
                             [0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
  # Works as an optax learning rate.
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=schedules.cyclic_momentum(100))
  state = tx.init({"w": jnp.zeros(())})
  assert float(state.hyperparams["learning_rate"]) == 0.0
  assert float(state.hyperparams["momentum"]) == pytest.approx(0.9)


def test_piecewise_advlc_and_one_drop():
  steps_per_epoch = 500
  lr = schedules.piecewise(0.1, [100 * steps_per_epoch, 150 * steps_per_epoch])
  values = _at(lr, [0, 100 * 500 - 1, 100 * 500, 150 * 500 - 1, 150 * 500, 200 * 500])
  np.testing.assert_allclose(values, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
  drop = schedules.one_drop(0.05, 10, factor=0.2)
  np.testing.assert_allclose(_at(drop, [0, 9, 10, 50]), [0.05, 0.05, 0.01, 0.01], rtol=1e-6)
  with pytest.raises(ValueError, match="strictly increasing"):
    schedules.piecewise(0.1, [5, 5])


def test_imagenet_wong_with_phase_steps():
  steps = (10, 20, 40)  # steps per epoch in each phase (batch 512, 224, 128)
  lr = schedules.imagenet_wong(steps)
  # Epoch knots in steps: 0, 1*10, 6*10, 60 + 6*20, 180 + 3*40.
  knots = [0, 10, 60, 180, 300]
  np.testing.assert_allclose(_at(lr, knots), [0.0, 0.4, 0.04, 0.004, 0.0004], rtol=1e-5,
                             atol=1e-9)
  np.testing.assert_allclose(float(lr(5)), 0.2, rtol=1e-6)
  np.testing.assert_allclose(float(lr(120)), (0.04 + 0.004) / 2, rtol=1e-5)
  np.testing.assert_allclose(float(lr(240)), (0.004 + 0.0004) / 2, rtol=1e-5)
  assert schedules.epochs_to_steps(7.5, steps, (0, 6, 12, 15)) == 60 + 1.5 * 20
  single = schedules.imagenet_wong(100)
  np.testing.assert_allclose(float(single(600)), 0.04, rtol=1e-6)
  with pytest.raises(ValueError, match="phase_boundaries"):
    schedules.epochs_to_steps(1, (1, 2), (0, 6, 12, 15))


def test_imagenet_config_lr_max_sets_the_peak():
  """`schedule.lr_max` of the ImageNet config scales the whole 3-phase recipe."""
  import os  # pylint: disable=g-import-not-at-top
  from fastadv_jax import config_base, train_state  # pylint: disable=g-import-not-at-top
  config = config_base.load_config_file(
      os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "imagenet.py"),
      "fgsm_rs")
  config.schedule.lr_max = 0.8
  lr = train_state.create_learning_rate_fn(config, (10, 20, 40))
  np.testing.assert_allclose(_at(lr, [0, 10, 60, 180, 300]), [0.0, 0.8, 0.08, 0.008, 0.0008],
                             rtol=1e-5, atol=1e-9)


def test_warmup_is_a_traced_ramp():
  eps = schedules.warmup(8 / 255, 50)
  np.testing.assert_allclose(_at(eps, [0, 25, 50, 80]), [0, 4 / 255, 8 / 255, 8 / 255],
                             rtol=1e-6, atol=1e-9)
  traced = jax.jit(lambda step: eps(step) * 2)(jnp.int32(25))
  np.testing.assert_allclose(float(traced), 8 / 255, rtol=1e-6)
  np.testing.assert_allclose(float(schedules.warmup(0.5, 0)(0)), 0.5)


def test_registry_and_argument_errors():
  lr = schedules.get_schedule("cyclic", lr_max=0.2, total_steps=10)
  np.testing.assert_allclose(float(lr(4)), 0.2, rtol=1e-6)
  with pytest.raises(ValueError, match="Unknown schedule 'cosine'.*cyclic"):
    schedules.get_schedule("cosine")
  with pytest.raises(ValueError, match="Bad arguments.*'cyclic'.*lr_max"):
    schedules.get_schedule("cyclic", lr_max=0.2, total_step=10)
  with pytest.raises(ValueError, match="total_steps must be >= 1"):
    schedules.cyclic(0.2, 0)
  with pytest.raises(ValueError, match="total_steps must be an integer"):
    schedules.cyclic(0.2, 10.5)
  with pytest.raises(ValueError, match="peak_fraction"):
    schedules.cyclic(0.2, 10, peak_fraction=1.0)
  with pytest.raises(ValueError, match="lr_max must be >= 0"):
    schedules.cyclic(-0.1, 10)
  with pytest.raises(ValueError, match="non-decreasing"):
    schedules.piecewise_linear([0, 5, 3], [0, 1, 0])

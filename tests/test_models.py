"""Tests of the model zoo: shapes, parameter counts, dtypes, BatchNorm, registry.

Large models are only traced (jax.eval_shape); the tiny ones run eagerly on a
batch of 4.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastadv_jax import models
from fastadv_jax.models import common
from model_helpers import random_variables

TINY = dict(widths=(8, 16, 32, 64))
# One stage of width 64: cheap to initialise, and layer1_0/conv2 is 3x3x64x64
# (fan_in = fan_out = 576) for the initialiser statistics.
ONE_STAGE = dict(stage_sizes=(1,), widths=(64,))
BATCH = 4


def apply_eval(model, variables, x):
  """Eval-mode logits, compiled (one compile per model beats op-by-op dispatch)."""
  return jax.jit(model.apply)(variables, x)


def apply_train(model, variables, x, mutable=("batch_stats",), **kwargs):
  """Batch-statistics forward; returns (logits, mutated collections)."""
  fn = lambda v, x: model.apply(v, x, train=True, mutable=list(mutable), **kwargs)
  return jax.jit(fn)(variables, x)


@pytest.fixture(scope="module")
def images():
  return jax.random.uniform(jax.random.key(0), (BATCH, 32, 32, 3), jnp.float32)


@pytest.fixture(scope="module")
def tiny_preact():
  model = models.get_model("preact_resnet18", final_bn=True, **TINY)
  return model, random_variables(model, seed=1)


def test_registry_has_the_planned_names():
  assert set(models.MODELS) >= {
      "preact_resnet18", "preact_resnet18_gradalign", "preact_resnet18_wong",
      "preact_resnet18_rice", "resnet50", "wide_resnet", "wrn34_10", "wrn28_10",
      "simple_cnn"}


@pytest.mark.parametrize("name, kwargs, expected", [
    ("preact_resnet18_gradalign", {}, 11_171_146),
    ("preact_resnet18", dict(final_bn=False), 11_171_146),
    ("preact_resnet18", dict(final_bn=True), 11_172_170),
    ("preact_resnet18_wong", {}, 11_172_170),
    ("preact_resnet18_rice", {}, 11_172_170),
    ("resnet50", dict(num_classes=1000), 25_557_032),
    ("wrn34_10", {}, 46_160_474),
    ("wrn28_10", {}, 36_479_194),
    ("simple_cnn", {}, 4 * 3 * 9 + 4 + 4 * 32 * 32 * 10 + 10),
])
def test_param_counts(name, kwargs, expected):
  model = models.get_model(name, **kwargs)
  shape = (64, 64, 3) if name == "resnet50" else (32, 32, 3)
  variables = models.abstract_variables(model, shape)
  assert models.count_params(variables) == expected
  assert models.count_params(variables["params"]) == expected


@pytest.mark.parametrize("name, kwargs, image_shape, num_classes", [
    ("preact_resnet18_gradalign", {}, (32, 32, 3), 10),
    ("preact_resnet18_wong", {}, (32, 32, 3), 100),
    ("preact_resnet18_rice", {}, (32, 32, 3), 10),
    ("resnet50", {}, (224, 224, 3), 1000),
    ("wrn34_10", {}, (32, 32, 3), 10),
    ("wrn28_10", {}, (32, 32, 3), 100),
    ("wide_resnet", dict(depth=16, widen_factor=2), (32, 32, 3), 10),
])
def test_large_models_forward_shapes_traced(name, kwargs, image_shape, num_classes):
  model = models.get_model(name, num_classes=num_classes, **kwargs)
  variables = models.abstract_variables(model, image_shape)
  assert set(variables) == {"params", "batch_stats"}
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
  x = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  assert out.shape == (2, num_classes) and out.dtype == jnp.float32
  out, updates = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
  assert out.shape == (2, num_classes)
  assert jax.tree_util.tree_structure(updates["batch_stats"]) == (
      jax.tree_util.tree_structure(variables["batch_stats"]))


@pytest.mark.parametrize("name, kwargs", [
    ("simple_cnn", {}),
    ("preact_resnet18_gradalign", TINY),
    ("preact_resnet18_wong", TINY),
    ("preact_resnet18_rice", TINY),
    ("wide_resnet", dict(depth=10, widen_factor=1)),
    ("resnet50", dict(stage_sizes=(1, 1, 1, 1), widths=(4, 8, 8, 16))),
])
def test_small_models_run(name, kwargs, images):
  model = models.get_model(name, **kwargs)
  variables = random_variables(model, seed=2)
  logits = apply_eval(model, variables, images)
  assert logits.shape == (BATCH, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # Different images give different logits (the model is not constant).
  assert float(jnp.max(jnp.abs(logits[0] - logits[1]))) > 1e-6


def test_init_variables_collections():
  model = models.get_model("preact_resnet18", **ONE_STAGE)
  variables = models.init_variables(model, jax.random.key(4))
  assert type(variables) is dict and set(variables) == {"params", "batch_stats"}
  stats = variables["batch_stats"]["layer1_0"]["bn1"]
  np.testing.assert_array_equal(stats["mean"], np.zeros(64))
  np.testing.assert_array_equal(stats["var"], np.ones(64))
  bn = variables["params"]["layer1_0"]["bn2"]
  np.testing.assert_array_equal(bn["scale"], np.ones(64))
  np.testing.assert_array_equal(bn["bias"], np.zeros(64))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
  cnn_vars = models.init_variables(models.get_model("simple_cnn"), jax.random.key(0))
  assert set(cnn_vars) == {"params"}
  assert set(cnn_vars["params"]) == {"conv", "linear"}
  assert cnn_vars["params"]["conv"]["kernel"].shape == (3, 3, 3, 4)
  assert cnn_vars["params"]["linear"]["kernel"].shape == (32 * 32 * 4, 10)


def test_final_bn_and_shortcut_structure():
  with_bn = models.abstract_variables(models.get_model("preact_resnet18_wong", **TINY))
  without = models.abstract_variables(models.get_model("preact_resnet18_gradalign", **TINY))
  assert "bn" in with_bn["params"] and "bn" not in without["params"]
  for params in (with_bn["params"], without["params"]):
    # Projection shortcuts exactly where stride or width changes (stages 2-4).
    assert "shortcut" not in params["layer1_0"] and "shortcut" not in params["layer2_1"]
    for stage in (2, 3, 4):
      assert "shortcut" in params[f"layer{stage}_0"]
    assert params["layer2_0"]["shortcut"]["kernel"].shape == (1, 1, 8, 16)


def test_shortcut_variants_compute_different_functions(tiny_preact, images):
  model, variables = tiny_preact
  activated = models.get_model("preact_resnet18", final_bn=True, shortcut="activated", **TINY)
  out_preact = apply_eval(model, variables, images)
  out_activated = apply_eval(activated, variables, images)  # same parameter tree
  assert float(jnp.max(jnp.abs(out_preact - out_activated))) > 1e-4


def test_bn_train_differs_from_eval_and_updates_with_torch_momentum(tiny_preact, images):
  model, variables = tiny_preact
  eval_logits = apply_eval(model, variables, images)
  train_logits, updates = apply_train(
      model, variables, images, mutable=("batch_stats", "intermediates"),
      capture_intermediates=lambda mdl, _: mdl.scope.path == ("conv1",))
  assert float(jnp.max(jnp.abs(train_logits - eval_logits))) > 1e-4
  # Eval mode changes nothing.
  _, eval_updates = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))(
      variables, images)
  np.testing.assert_array_equal(
      eval_updates["batch_stats"]["layer1_0"]["bn1"]["mean"],
      variables["batch_stats"]["layer1_0"]["bn1"]["mean"])
  # layer1_0/bn1 normalizes the stem output: running = 0.9 * old + 0.1 * batch stat.
  stem = updates["intermediates"]["conv1"]["__call__"][0]
  batch_mean = jnp.mean(stem, axis=(0, 1, 2))
  batch_var = jnp.var(stem, axis=(0, 1, 2))
  old = variables["batch_stats"]["layer1_0"]["bn1"]
  new = updates["batch_stats"]["layer1_0"]["bn1"]
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * batch_mean,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * batch_var,
                             rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stride, pad", [(1, 1), (2, 1), (1, 0)])
def test_image_conv_matches_xla_convolution_to_second_order(stride, pad):
  """im2col (`common.image_conv`) against `lax.conv_general_dilated`: the value,
  both gradients, a forward-mode derivative, and the parameter gradient of an
  input-gradient penalty (GradAlign's double backprop)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(3, 8, 8, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  strides, padding = (stride, stride), ((pad, pad), (pad, pad))

  def conv_fns(conv):
    f = lambda x, k: jnp.sum(jnp.sin(conv(x, k, strides, padding)))
    penalty = lambda k: jnp.sum(jax.grad(f)(x, k) ** 2)
    along_x = lambda k: jax.jvp(lambda z: f(z, k), (x,), (x,))[1]
    return (f(x, kernel), *jax.grad(f, argnums=(0, 1))(x, kernel),
            jax.grad(penalty)(kernel), jax.grad(along_x)(kernel))

  got = conv_fns(common.image_conv)
  want = conv_fns(lambda x, k, s, p: jax.lax.conv_general_dilated(
      x, k, s, p, dimension_numbers=("NHWC", "HWIO", "NHWC")))
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * float(jnp.max(jnp.abs(b))))


def test_im2col_stem_is_the_same_model(images):
  """`im2col_stem` changes how the stem convolution is computed, nothing else:
  the same logits, input and parameter gradients. The evaluation closure sets
  it on CPU; the train step's model has it only when the config asks."""
  from fastadv_jax import closures, config_base, train_state  # pylint: disable=g-import-not-at-top
  model = models.get_model("simple_cnn", filters=4)
  variables = random_variables(model, seed=2)
  im2col = models.get_model("simple_cnn", filters=4, im2col_stem=True)
  labels = jnp.arange(BATCH) % 10

  def grads(m):
    loss = lambda v, x: -jnp.mean(jax.nn.log_softmax(m.apply(v, x))[jnp.arange(BATCH),
                                                                   labels])
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, images)

  np.testing.assert_allclose(apply_eval(im2col, variables, images),
                             apply_eval(model, variables, images), rtol=1e-5, atol=1e-6)
  got, want = grads(im2col), grads(model)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7 * float(jnp.max(jnp.abs(b))) + 1e-9)
  config = config_base.load_config_file(
      os.path.join(os.path.dirname(__file__), "..", "configs", "cifar10.py"), "cnn_fgsm")
  for dtype in (None, "float32"):
    built = train_state.create_model(config, dtype=dtype)
    assert not built.im2col_stem
    assert closures.eval_logits_fn(built, variables).model.im2col_stem == (
        jax.default_backend() == "cpu")
  config.model.kwargs.im2col_stem = True
  assert train_state.create_model(config).im2col_stem
  with pytest.raises(ValueError, match="im2col_stem 'yes'"):
    models.get_model("simple_cnn", im2col_stem="yes")


def test_remat_is_the_same_function_and_gradients(tiny_preact, images):
  """Recomputing the blocks in the backward pass changes neither the parameters
  nor the train-mode logits, batch statistics, input or parameter gradients."""
  model, variables = tiny_preact
  remat_model = models.get_model("preact_resnet18", final_bn=True, remat=True, **TINY)
  labels = jnp.arange(BATCH) % 10

  def loss_and_grads(m):
    def loss(params, x):
      logits, state = m.apply({**variables, "params": params}, x, train=True,
                              mutable=["batch_stats"])
      ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(BATCH), labels])
      return ce, (logits, state)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        variables["params"], images)

  (_, (logits, state)), grads = loss_and_grads(model)
  (_, (logits_r, state_r)), grads_r = loss_and_grads(remat_model)
  assert (jax.tree_util.tree_structure(models.abstract_variables(remat_model, (32, 32, 3)))
          == jax.tree_util.tree_structure(variables))
  np.testing.assert_allclose(logits_r, logits, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves((state_r, grads_r)),
                  jax.tree_util.tree_leaves((state, grads))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert float(jnp.max(jnp.abs(grads[1]))) > 0  # the input gradient is not trivially zero


def test_bfloat16_compute_keeps_float32_params(tiny_preact, images):
  model32, variables = tiny_preact
  model16 = models.get_model("preact_resnet18", final_bn=True, dtype=jnp.bfloat16, **TINY)
  variables16 = models.abstract_variables(model16)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables16))
  assert jax.tree_util.tree_structure(variables16) == jax.tree_util.tree_structure(variables)
  logits16 = apply_eval(model16, variables, images)
  assert logits16.dtype == jnp.float32 and np.all(np.isfinite(logits16))
  logits32 = apply_eval(model32, variables, images)
  scale = float(jnp.max(jnp.abs(logits32)))
  assert float(jnp.max(jnp.abs(logits16 - logits32))) < 0.1 * scale + 1e-2
  assert float(jnp.max(jnp.abs(logits16 - logits32))) > 0  # it really ran in bf16
  jaxpr = str(jax.make_jaxpr(lambda x: model16.apply(variables, x))(images))
  assert "conv_general_dilated" in jaxpr and "bf16" in jaxpr
  _, updates = apply_train(model16, variables, images)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(updates))


def test_normalization_inside_the_model(images):
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  plain = models.get_model("simple_cnn")
  normalized = models.get_model("simple_cnn", mean=mean, std=std)
  variables = models.init_variables(plain, jax.random.key(3))
  expected = plain.apply(variables, (images - jnp.array(mean)) / jnp.array(std))
  np.testing.assert_allclose(normalized.apply(variables, images), expected, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(plain.apply(variables, images) - expected))) > 1e-3
  rice = models.get_model("preact_resnet18_rice")
  assert rice.mean == common.CIFAR10_MEAN and rice.std == common.CIFAR10_STD
  assert models.get_model("preact_resnet18_gradalign").mean is None
  assert models.get_model("preact_resnet18_wong", mean=None, std=None).mean is None


def test_initialisation_schemes():
  torch_init = models.get_model("preact_resnet18", init="torch", final_bn=True, **ONE_STAGE)
  he_init = models.get_model("preact_resnet18", init="he_fan_out", **ONE_STAGE)
  torch_params = models.init_variables(torch_init, jax.random.key(4))["params"]
  he_params = models.init_variables(he_init, jax.random.key(4))["params"]
  # PyTorch default: U(+-1/sqrt(fan_in)), std = bound / sqrt(3).
  kernel = np.asarray(torch_params["layer1_0"]["conv2"]["kernel"])
  bound = 1 / np.sqrt(576)
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
  np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.05)
  # GradAlign: N(0, 2 / (k*k*out)).
  kernel = np.asarray(he_params["layer1_0"]["conv2"]["kernel"])
  np.testing.assert_allclose(kernel.std(), np.sqrt(2 / 576), rtol=0.05)
  assert np.abs(kernel).max() > 3 * np.sqrt(2 / 576)  # normal, not uniform
  # Linear: PyTorch default U(+-1/sqrt(64)) with a uniform bias vs N(0, 2/64) with zero bias.
  linear_bias = np.asarray(torch_params["linear"]["bias"])
  assert np.all(np.abs(linear_bias) <= 1 / 8) and np.any(linear_bias != 0)
  np.testing.assert_array_equal(he_params["linear"]["bias"], np.zeros(10))
  he_linear = np.asarray(he_params["linear"]["kernel"])
  assert 0.7 * np.sqrt(2 / 64) < he_linear.std() < 1.3 * np.sqrt(2 / 64)
  cnn_params = models.init_variables(models.get_model("simple_cnn"), jax.random.key(4))["params"]
  np.testing.assert_array_equal(cnn_params["conv"]["bias"], np.zeros(4))


def test_init_variables_is_deterministic_per_key():
  model = models.get_model("simple_cnn")
  a = models.init_variables(model, jax.random.key(7))
  b = models.init_variables(model, jax.random.key(7))
  c = models.init_variables(model, jax.random.key(8))
  np.testing.assert_array_equal(a["params"]["conv"]["kernel"], b["params"]["conv"]["kernel"])
  assert not np.array_equal(a["params"]["conv"]["kernel"], c["params"]["conv"]["kernel"])


def test_unknown_name_lists_the_choices():
  with pytest.raises(ValueError, match="preact_resnet18_gradalign") as info:
    models.get_model("resnet18")
  assert "resnet18" in str(info.value) and "simple_cnn" in str(info.value)


@pytest.mark.parametrize("name, kwargs, match", [
    ("preact_resnet18", dict(shortcut="post"), "shortcut"),
    ("preact_resnet18", dict(init="xavier"), "init"),
    ("preact_resnet18", dict(mean=(0.5, 0.5, 0.5)), "std"),
    ("preact_resnet18", dict(widths=(8, 16)), "stage_sizes"),
    ("preact_resnet18", dict(filters=3), "Unknown keyword"),
    ("preact_resnet18", dict(remat="yes"), "remat"),
    ("simple_cnn", dict(filters=0), "filters"),
    ("wide_resnet", dict(depth=30), "depth"),
    ("wrn34_10", dict(depth=28), "depth"),
    ("simple_cnn", dict(num_classes=0), "num_classes"),
    ("simple_cnn", dict(dtype=jnp.int32), "floating"),
])
def test_bad_arguments_raise_value_errors(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.get_model(name, **kwargs)


def test_mean_std_channel_mismatch_raises(images):
  model = models.get_model("simple_cnn", mean=(0.5, 0.5), std=(0.2, 0.2))
  with pytest.raises(ValueError, match="channels"):
    models.init_variables(model, jax.random.key(0))

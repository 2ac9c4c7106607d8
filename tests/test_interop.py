"""PyTorch <-> Flax checkpoint conversion: same logits both ways, clear errors.

The PyTorch twins (tests/torch_reference/torch_models.py) use the reference state-dict
layouts; tiny widths and a batch of 4 keep this fast.
"""

import importlib.util
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fastadv_jax import interop, models  # noqa: E402
from model_helpers import random_variables  # noqa: E402

_TWINS_PATH = os.path.join(os.path.dirname(__file__), "torch_reference", "torch_models.py")


def _load_twins():
  spec = importlib.util.spec_from_file_location("fastadv_torch_twins", _TWINS_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


twins = _load_twins()

TINY = dict(widths=(8, 16, 32, 64))
CASES = [
    ("preact_resnet18_gradalign", TINY),   # no final BN, shortcut on x, He init
    ("preact_resnet18_wong", TINY),        # final BN, shortcut on x, normalization
    ("preact_resnet18_rice", TINY),        # final BN, shortcut on relu(bn1(x))
    ("simple_cnn", {}),
    ("wide_resnet", dict(depth=10, widen_factor=1)),
    ("resnet50", dict(stage_sizes=(1, 1, 1, 1), widths=(4, 8, 8, 16))),
]
IDS = [name for name, _ in CASES]


@pytest.fixture(scope="module")
def images():
  return np.random.RandomState(0).rand(4, 32, 32, 3).astype(np.float32)


def _torch_logits(model, images):
  model.eval()
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def _randomize_batchnorm(model, seed=0):
  """Non-trivial BN statistics and affine parameters, so eval mode matters."""
  gen = torch.Generator().manual_seed(seed)
  for module in model.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      n = module.num_features
      module.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
      module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
      module.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
      module.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)


def _assert_logits_close(actual, expected):
  scale = max(1.0, float(np.abs(expected).max()))
  np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_torch_to_flax_gives_the_same_logits(name, kwargs, images):
  torch.manual_seed(0)
  torch_model = twins.build_torch_model(name, **kwargs)
  _randomize_batchnorm(torch_model)
  expected = _torch_logits(torch_model, images)
  model = models.get_model(name, **kwargs)
  variables = interop.torch_state_dict_to_flax(torch_model.state_dict(), model)
  assert set(variables) == ({"params"} if name == "simple_cnn" else {"params", "batch_stats"})
  _assert_logits_close(np.asarray(jax.jit(model.apply)(variables, images)), expected)
  # The same through a model name and a DataParallel ("module.") state dict.
  wrapped = {"module." + k: v.numpy() for k, v in torch_model.state_dict().items()}
  by_name = interop.torch_state_dict_to_flax(wrapped, name, **kwargs)
  jax.tree_util.tree_map(np.testing.assert_array_equal, by_name, variables)


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_flax_to_torch_gives_the_same_logits(name, kwargs, images):
  model = models.get_model(name, **kwargs)
  variables = random_variables(model, seed=5)
  expected = np.asarray(jax.jit(model.apply)(variables, images))
  state_dict = interop.flax_to_torch_state_dict(variables, model)
  torch_model = twins.build_torch_model(name, **kwargs)
  torch_model.load_state_dict(state_dict, strict=True)
  _assert_logits_close(_torch_logits(torch_model, images), expected)
  # NumPy output and the round trip back are exact.
  numpy_dict = interop.flax_to_torch_state_dict(variables, model, as_torch=False)
  assert all(isinstance(v, np.ndarray) for v in numpy_dict.values())
  back = interop.torch_state_dict_to_flax(numpy_dict, model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, variables)


def test_reference_key_names():
  model = models.get_model("preact_resnet18_rice", **TINY)
  variables = random_variables(model, seed=0)
  keys = set(interop.flax_to_torch_state_dict(variables, model, as_torch=False))
  for key in ["conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.running_var",
              "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight", "bn.running_mean",
              "bn.num_batches_tracked", "linear.weight", "linear.bias"]:
    assert key in keys
  cnn = models.get_model("simple_cnn")
  cnn_keys = interop.flax_to_torch_state_dict(random_variables(cnn, seed=0), cnn, as_torch=False)
  assert set(cnn_keys) == {"_model.0.weight", "_model.0.bias", "_model.3.weight", "_model.3.bias"}
  assert cnn_keys["_model.3.weight"].shape == (10, 4 * 32 * 32)


def test_simple_cnn_linear_weight_is_permuted_per_filter():
  """Filter c's outgoing weights (PyTorch rows [c*HW, (c+1)*HW)) land on channel c."""
  torch_model = twins.SimpleCNNTorch()
  weight = torch_model._model[3].weight.detach().numpy()
  variables = interop.torch_state_dict_to_flax(torch_model.state_dict(), "simple_cnn")
  kernel = np.asarray(variables["params"]["linear"]["kernel"]).reshape(32, 32, 4, 10)
  for c in range(4):
    np.testing.assert_array_equal(kernel[:, :, c, :].transpose(2, 0, 1).reshape(10, -1),
                                  weight[:, c * 1024:(c + 1) * 1024])


def test_missing_key_is_reported():
  state = twins.build_torch_model("preact_resnet18_wong", **TINY).state_dict()
  del state["layer3.1.conv2.weight"]
  with pytest.raises(ValueError, match=r"missing key\(s\): layer3\.1\.conv2\.weight"):
    interop.torch_state_dict_to_flax(state, "preact_resnet18_wong", **TINY)


def test_final_bn_mismatch_gives_a_hint():
  wong_state = twins.build_torch_model("preact_resnet18_wong", **TINY).state_dict()
  with pytest.raises(ValueError, match="unexpected key.*bn.weight(.|\n)*final_bn=True"):
    interop.torch_state_dict_to_flax(wong_state, "preact_resnet18_gradalign", **TINY)
  # strict=False drops the unused final BN.
  variables = interop.torch_state_dict_to_flax(
      wong_state, "preact_resnet18_gradalign", strict=False, **TINY)
  assert "bn" not in variables["params"]
  gradalign_state = twins.build_torch_model("preact_resnet18_gradalign", **TINY).state_dict()
  with pytest.raises(ValueError, match="final_bn=False"):
    interop.torch_state_dict_to_flax(gradalign_state, "preact_resnet18_wong", **TINY)


def test_shape_mismatch_is_reported():
  state = twins.build_torch_model("preact_resnet18_gradalign", **TINY).state_dict()
  with pytest.raises(ValueError, match=r"shape mismatch(.|\n)*conv1\.weight"):
    interop.torch_state_dict_to_flax(state, "preact_resnet18_gradalign",
                                     widths=(8, 16, 32, 32))


def test_wide_resnet_drops_the_unused_sub_block(images):
  torch_model = twins.WideResNetTorch(depth=10, widen_factor=1, sub_block1=True)
  assert any(k.startswith("sub_block1.") for k in torch_model.state_dict())
  variables = interop.torch_state_dict_to_flax(
      torch_model.state_dict(), "wide_resnet", depth=10, widen_factor=1)
  model = models.get_model("wide_resnet", depth=10, widen_factor=1)
  _assert_logits_close(np.asarray(jax.jit(model.apply)(variables, images)),
                       _torch_logits(torch_model, images))


def test_load_torch_checkpoint(tmp_path, images):
  torch_model = twins.build_torch_model("preact_resnet18_gradalign", **TINY)
  _randomize_batchnorm(torch_model, seed=1)
  expected = _torch_logits(torch_model, images)
  model = models.get_model("preact_resnet18_gradalign", **TINY)
  plain = tmp_path / "model.pth"
  torch.save(torch_model.state_dict(), plain)
  variables = interop.load_torch_checkpoint(plain, "preact_resnet18_gradalign", **TINY)
  _assert_logits_close(np.asarray(jax.jit(model.apply)(variables, images)), expected)
  # The GradAlign code saves {"last": ..., "best": ...}: the entry must be named.
  both = tmp_path / "gradalign.pth"
  torch.save({"last": torch_model.state_dict(), "best": torch_model.state_dict()}, both)
  with pytest.raises(ValueError, match="checkpoint_key"):
    interop.load_torch_checkpoint(both, model)
  variables = interop.load_torch_checkpoint(both, model, checkpoint_key="last")
  _assert_logits_close(np.asarray(jax.jit(model.apply)(variables, images)), expected)
  with pytest.raises(FileNotFoundError):
    interop.load_torch_checkpoint(tmp_path / "absent.pth", model)
  with pytest.raises(ValueError, match="only used with a model name"):
    interop.load_torch_checkpoint(plain, model, final_bn=True)


def test_flax_to_torch_rejects_foreign_variables():
  small = random_variables(models.get_model("preact_resnet18", **TINY), seed=0)
  with pytest.raises(ValueError, match="do not match"):
    interop.flax_to_torch_state_dict(small, "preact_resnet18", final_bn=True, **TINY)


@pytest.mark.parametrize("name, kwargs", [
    ("preact_resnet18_gradalign", {}), ("preact_resnet18_wong", {}),
    ("preact_resnet18_rice", {}), ("simple_cnn", {}), ("wrn34_10", {}),
])
def test_torch_twins_have_the_flax_parameter_counts(name, kwargs):
  torch_count = twins.count_torch_params(twins.build_torch_model(name, **kwargs))
  flax_count = models.count_params(models.abstract_variables(models.get_model(name, **kwargs)))
  assert torch_count == flax_count


def _with_gradalign_aliases(state_dict, name):
  """A state dict as the GradAlign code saves it: its models register
  `model_preact_hl1` (models.py l.81, l.148-149), reusing modules, so the same
  tensors appear a second time under alias keys."""
  aliases = ({"model_preact_hl1.0.": "_model.0."} if name == "simple_cnn" else
             {"model_preact_hl1.1.": "conv1.", "model_preact_hl1.2.": "layer1.0.bn1."})
  out = dict(state_dict)
  for alias, original in aliases.items():
    for key, value in state_dict.items():
      if key.startswith(original):
        out[alias + key[len(original):]] = value
  return out


@pytest.mark.parametrize("name, kwargs", [CASES[0], CASES[3]], ids=[IDS[0], IDS[3]])
def test_gradalign_checkpoints_with_alias_keys_load_in_strict_mode(name, kwargs, images):
  torch.manual_seed(0)
  torch_model = twins.build_torch_model(name, **kwargs)
  _randomize_batchnorm(torch_model)
  state = _with_gradalign_aliases(torch_model.state_dict(), name)
  assert any(k.startswith("model_preact_hl1.") for k in state)
  model = models.get_model(name, **kwargs)
  variables = interop.torch_state_dict_to_flax(state, model, strict=True)
  _assert_logits_close(np.asarray(jax.jit(model.apply)(variables, images)),
                       _torch_logits(torch_model, images))
  # An alias that does not duplicate its original is an error, not silently dropped.
  alias = next(k for k in state if k.startswith("model_preact_hl1.") and k.endswith("weight"))
  corrupt = dict(state, **{alias: state[alias] + 1})
  with pytest.raises(ValueError, match="model_preact_hl1"):
    interop.torch_state_dict_to_flax(corrupt, model, strict=True)

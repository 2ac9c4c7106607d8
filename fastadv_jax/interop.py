"""PyTorch interop: published checkpoints in, parity weights out.

The reference implementations are PyTorch code; their checkpoints (and the
PyTorch twins in `tests/torch_reference/torch_models.py`) use these state-dict layouts:

* PreActResNet-18 (Wong et al., GradAlign, Rice et al.): `conv1.weight`,
  `layer1.0.bn1.{weight,bias,running_mean,running_var}`, `layer1.0.conv1.weight`,
  `layer2.0.shortcut.0.weight`, `bn.*` (final BN, Wong / Rice only),
  `linear.{weight,bias}`.
* Single-layer CNN (GradAlign `CNN`): `_model.0.{weight,bias}` (conv),
  `_model.3.{weight,bias}` (linear on the NCHW-flattened map).
* WideResNet (Madry / TRADES / Rice): `conv1`, `block1.layer.0.{bn1,conv1,bn2,
  conv2,convShortcut}`, `bn1`, `fc`; the references' unused `sub_block1.*` is
  dropped.
* ResNet-50 (torchvision): `conv1`, `bn1`, `layer1.0.{conv1,bn1,...,bn3}`,
  `layer1.0.downsample.{0,1}`, `fc`.

A "module." prefix (DataParallel) is stripped; `num_batches_tracked` is ignored.
Conversion: conv weight OIHW -> kernel HWIO; linear weight (out, in) -> kernel
(in, out) (for the CNN also permuting the flattened NCHW input order to NHWC);
BN weight/bias/running_mean/running_var -> scale/bias (params) and mean/var
(batch_stats). Which PreActResNet *shortcut* variant a checkpoint needs cannot
be read off its keys: build the model with the source's variant (Wong and
GradAlign: "preact"; Rice: "activated"), e.g. through the presets.

Torch is imported lazily, only inside `load_torch_checkpoint` and
`flax_to_torch_state_dict(..., as_torch=True)`.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from fastadv_jax import models
from fastadv_jax.models.preact_resnet import PreActResNet
from fastadv_jax.models.resnet import ResNet
from fastadv_jax.models.simple_cnn import SimpleCNN
from fastadv_jax.models.wide_resnet import WideResNet

ModelSpec = Union[str, nn.Module]

# Flax submodule name -> PyTorch module path, per architecture (regex, replacement).
_MODULE_RENAMES: dict[type, list[tuple[str, str]]] = {
    PreActResNet: [(r"^layer(\d+)_(\d+)$", r"layer\1.\2"), (r"^shortcut$", "shortcut.0")],
    ResNet: [(r"^layer(\d+)_(\d+)$", r"layer\1.\2"), (r"^downsample_conv$", "downsample.0"),
             (r"^downsample_bn$", "downsample.1")],
    WideResNet: [(r"^block(\d+)_(\d+)$", r"block\1.layer.\2")],
    SimpleCNN: [(r"^conv$", "_model.0"), (r"^linear$", "_model.3")],
}

# Keys of reference checkpoints that have no counterpart here, by architecture.
_IGNORED_KEYS: dict[type, list[str]] = {
    WideResNet: [r"^sub_block1\."],  # built but never called in the references' forward
}

# Alias keys: the GradAlign code (tml-epfl/understanding-fast-adv-training,
# models.py l.81 and l.148-149) registers `model_preact_hl1`, a Sequential that
# reuses modules (CNN: `_model[0]`; PreActResNet: normalize, conv1,
# layer1[0].bn1), so every state dict it saves carries the same tensors twice.
# alias prefix -> the key prefix it duplicates; the values must be equal.
_ALIAS_KEYS: dict[type, list[tuple[str, str]]] = {
    SimpleCNN: [("model_preact_hl1.0.", "_model.0.")],
    PreActResNet: [("model_preact_hl1.1.", "conv1."), ("model_preact_hl1.2.", "layer1.0.bn1.")],
}


def _drop_aliases(arch: type, state: dict[str, Any]) -> dict[str, Any]:
  """Removes the GradAlign code's alias keys after checking they duplicate their
  originals (a ValueError names any alias whose value differs or whose
  original is absent)."""
  bad, kept = [], {}
  for key, value in state.items():
    alias = next(((a, o) for a, o in _ALIAS_KEYS.get(arch, []) if key.startswith(a)), None)
    if alias is None:
      kept[key] = value
      continue
    original = alias[1] + key[len(alias[0]):]
    if original not in state or not np.array_equal(_to_numpy(state[original]), _to_numpy(value)):
      bad.append(f"{key} (alias of {original})")
  if bad:
    raise ValueError(f"Alias keys that do not duplicate their original: {_listed(bad)}")
  return kept

_PARAM_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_STATS_LEAVES = {"mean": "running_mean", "var": "running_var"}

_MAX_LISTED = 12


def _architecture(model: nn.Module) -> type:
  for cls in _MODULE_RENAMES:
    if isinstance(model, cls):
      return cls
  raise ValueError(
      f"No PyTorch layout is known for {type(model).__name__}; supported: "
      f"{sorted(c.__name__ for c in _MODULE_RENAMES)}.")


def _resolve_model(model_name_or_model: ModelSpec, model_kwargs: Mapping[str, Any]) -> nn.Module:
  if isinstance(model_name_or_model, str):
    return models.get_model(model_name_or_model, **model_kwargs)
  if model_kwargs:
    raise ValueError(
        f"Model keywords {sorted(model_kwargs)} are only used with a model name, "
        f"not with a model instance.")
  return model_name_or_model


def _torch_key(arch: type, path: Sequence[str]) -> str:
  """Torch state-dict key of the Flax variable at `path` = (collection, *modules, leaf)."""
  collection, *modules, leaf = path
  renamed = []
  for name in modules:
    for pattern, replacement in _MODULE_RENAMES[arch]:
      if re.match(pattern, name):
        name = re.sub(pattern, replacement, name)
        break
    renamed.append(name)
  leaves = _PARAM_LEAVES if collection == "params" else _STATS_LEAVES
  return ".".join(renamed + [leaves[leaf]])


def _flatten(tree: Mapping[str, Any], prefix: tuple = ()) -> dict[tuple, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _to_numpy(value: Any) -> np.ndarray:
  """A float32 NumPy copy of a NumPy array, JAX array or torch tensor."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()  # also covers bf16/fp16 checkpoints (apex O2)
    value = value.numpy()
  return np.asarray(value)


def _flatten_order(model: nn.Module, image_shape: Sequence[int]) -> Optional[tuple[int, int, int]]:
  """(H, W, C) of the map the SimpleCNN flattens (conv: stride 1, padding 1)."""
  if isinstance(model, SimpleCNN):
    return int(image_shape[0]), int(image_shape[1]), model.filters
  return None


def _torch_to_flax_leaf(value: np.ndarray, path: tuple,
                        hwc: Optional[tuple[int, int, int]]) -> np.ndarray:
  if path[-1] != "kernel":
    return value
  if value.ndim == 4:  # conv OIHW -> HWIO
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:  # linear (out, in) -> (in, out)
    if hwc is not None and path[-2] == "linear" and value.shape[1] == np.prod(hwc):
      h, w, c = hwc
      # PyTorch flattens (C, H, W); the Flax model flattens (H, W, C).
      return value.reshape(value.shape[0], c, h, w).transpose(2, 3, 1, 0).reshape(
          h * w * c, value.shape[0])
    return value.T
  return value


def _flax_to_torch_leaf(value: np.ndarray, path: tuple,
                        hwc: Optional[tuple[int, int, int]]) -> np.ndarray:
  if path[-1] != "kernel":
    return value
  if value.ndim == 4:  # HWIO -> OIHW
    return value.transpose(3, 2, 0, 1)
  if value.ndim == 2:
    if hwc is not None and path[-2] == "linear" and value.shape[0] == np.prod(hwc):
      h, w, c = hwc
      return value.reshape(h, w, c, value.shape[1]).transpose(3, 2, 0, 1).reshape(
          value.shape[1], c * h * w)
    return value.T
  return value


def _listed(keys: Sequence[str]) -> str:
  keys = sorted(keys)
  shown = ", ".join(keys[:_MAX_LISTED])
  return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _strip_prefix(state: dict[str, Any], prefix: Optional[str]) -> dict[str, Any]:
  if prefix:
    if not all(k.startswith(prefix) for k in state):
      raise ValueError(
          f"prefix={prefix!r} given, but not every key starts with it: "
          f"{_listed([k for k in state if not k.startswith(prefix)])}.")
    return {k[len(prefix):]: v for k, v in state.items()}
  if state and all(k.startswith("module.") for k in state):  # DataParallel
    return {k[len("module."):]: v for k, v in state.items()}
  return state


def _hints(arch: type, missing: Sequence[str], unexpected: Sequence[str]) -> str:
  hints = []
  if arch is PreActResNet:
    if any(k.startswith("bn.") for k in unexpected):
      hints.append("the checkpoint has a final BatchNorm `bn`: build the model with "
                   "final_bn=True (e.g. preset preact_resnet18_wong / _rice)")
    if any(k.startswith("bn.") for k in missing):
      hints.append("the checkpoint has no final BatchNorm `bn`: build the model with "
                   "final_bn=False (e.g. preset preact_resnet18_gradalign)")
  return ("\nHint: " + "; ".join(hints) + ".") if hints else ""


def torch_state_dict_to_flax(state_dict: Mapping[str, Any], model_name_or_model: ModelSpec,
                             *, image_shape: Sequence[int] = (32, 32, 3),
                             strict: bool = True, prefix: Optional[str] = None,
                             **model_kwargs) -> dict:
  """Converts a PyTorch state dict of a reference model into Flax variables.

  Args:
    state_dict: key -> torch tensor or array, in one of the layouts of the module
      docstring (a "module." prefix is stripped automatically).
    model_name_or_model: a `fastadv_jax.models` name (built with
      `**model_kwargs`) or a model instance; it fixes the expected keys/shapes.
    image_shape: (H, W, C) of the inputs; sets the shapes of the SimpleCNN's
      linear layer (and is used to trace the model's variable shapes).
    strict: raise on checkpoint keys the model does not use (as PyTorch's
      `load_state_dict(strict=True)`); missing keys and shape mismatches
      always raise.
    prefix: a key prefix to strip (e.g. "model." for a wrapped model).
    **model_kwargs: keywords of `get_model` when a name is given.
  Returns:
    `{"params": ..., "batch_stats": ...}` (no "batch_stats" for the CNN) of
    float32 jnp arrays, ready for `model.apply`.
  Raises:
    ValueError: missing or unexpected keys, or shape mismatches, all listed.
  """
  model = _resolve_model(model_name_or_model, model_kwargs)
  arch = _architecture(model)
  target = _flatten(models.abstract_variables(model, image_shape))
  hwc = _flatten_order(model, image_shape)

  state = _strip_prefix({str(k): v for k, v in state_dict.items()}, prefix)
  state = _drop_aliases(arch, state)
  ignored = [r"(^|\.)num_batches_tracked$"] + _IGNORED_KEYS.get(arch, [])
  state = {k: v for k, v in state.items() if not any(re.search(p, k) for p in ignored)}

  converted, missing, mismatched, used = {}, [], [], set()
  for path, spec in target.items():
    key = _torch_key(arch, path)
    if key not in state:
      missing.append(key)
      continue
    used.add(key)
    value = _torch_to_flax_leaf(_to_numpy(state[key]), path, hwc)
    if tuple(value.shape) != tuple(spec.shape):
      mismatched.append(
          f"{key}: checkpoint {tuple(_to_numpy(state[key]).shape)} -> {tuple(value.shape)}, "
          f"model needs {tuple(spec.shape)} (Flax {'/'.join(path)})")
      continue
    converted[path] = jnp.asarray(value, jnp.float32)
  unexpected = sorted(set(state) - used) if strict else []

  if missing or unexpected or mismatched:
    parts = [f"Cannot load the PyTorch state dict into {type(model).__name__}:"]
    if missing:
      parts.append(f"  {len(missing)} missing key(s): {_listed(missing)}")
    if unexpected:
      parts.append(f"  {len(unexpected)} unexpected key(s) (strict=False ignores them): "
                   f"{_listed(unexpected)}")
    if mismatched:
      parts.append(f"  {len(mismatched)} shape mismatch(es): "
                   + "; ".join(mismatched[:_MAX_LISTED]))
    raise ValueError("\n".join(parts) + _hints(arch, missing, unexpected))
  return _unflatten(converted)


def flax_to_torch_state_dict(variables: Mapping[str, Any], model_name_or_model: ModelSpec,
                             *, image_shape: Sequence[int] = (32, 32, 3),
                             as_torch: bool = True, dtype: Any = np.float32,
                             **model_kwargs) -> "collections.OrderedDict":
  """Converts Flax variables into the reference PyTorch state-dict layout.

  The inverse of `torch_state_dict_to_flax`; the result loads with
  `load_state_dict(..., strict=True)` into the twins of
  `tests/torch_reference/torch_models.py` and into the references' own modules. Each
  BatchNorm also gets `num_batches_tracked = 0`.

  Args:
    variables: `{"params": ..., "batch_stats": ...}` of the model.
    model_name_or_model: a `fastadv_jax.models` name (with `**model_kwargs`) or
      the model instance the variables belong to.
    image_shape: (H, W, C) of the inputs (SimpleCNN flatten order).
    as_torch: torch tensors (imports torch) if True, NumPy arrays if False.
    dtype: floating dtype of the result (float32; float64 keeps float64
      variables exact, for the parity checks).
  Returns:
    An OrderedDict key -> tensor/array (`dtype`; int64 for num_batches_tracked).
  Raises:
    ValueError: when the variables do not match the model's structure or shapes.
  """
  model = _resolve_model(model_name_or_model, model_kwargs)
  arch = _architecture(model)
  target = _flatten(models.abstract_variables(model, image_shape))
  given = _flatten({c: variables[c] for c in ("params", "batch_stats") if c in variables})
  missing = sorted("/".join(p) for p in set(target) - set(given))
  extra = sorted("/".join(p) for p in set(given) - set(target))
  wrong = [f"{'/'.join(p)}: {tuple(np.shape(given[p]))} vs {tuple(s.shape)}"
           for p, s in target.items() if p in given and tuple(np.shape(given[p])) != tuple(s.shape)]
  if missing or extra or wrong:
    raise ValueError(
        f"The variables do not match {type(model).__name__}: missing {_listed(missing)}; "
        f"unexpected {_listed(extra)}; shape mismatches {wrong[:_MAX_LISTED]}.")
  hwc = _flatten_order(model, image_shape)

  out: "collections.OrderedDict[str, Any]" = collections.OrderedDict()
  bn_prefixes = []
  for path in sorted(target, key=lambda p: (p[0] != "params", p)):
    value = np.asarray(given[path], dtype)
    key = _torch_key(arch, path)
    out[key] = np.array(_flax_to_torch_leaf(value, path, hwc), dtype, order="C")
    if path[0] == "batch_stats" and path[-1] == "mean":
      bn_prefixes.append(key[: -len("running_mean")])
  for bn in bn_prefixes:
    out[bn + "num_batches_tracked"] = np.zeros((), np.int64)
  if as_torch:
    torch = _import_torch()
    out = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in out.items())
  return out


def _import_torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "PyTorch is needed to read or write PyTorch checkpoints: "
        "pip install 'fastadv-jax[torch]' (or pip install torch).") from e
  return torch


_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")


def _find_state_dict(checkpoint: Any, checkpoint_key: Optional[str],
                     path: str) -> Mapping[str, Any]:
  if not isinstance(checkpoint, Mapping):
    raise ValueError(
        f"{path} holds a {type(checkpoint).__name__}, not a state dict (a whole pickled "
        f"nn.Module?). Save `model.state_dict()` instead.")
  if checkpoint_key is not None:
    if checkpoint_key not in checkpoint:
      raise ValueError(
          f"checkpoint_key {checkpoint_key!r} is not in {path}; its top-level keys: "
          f"{_listed(list(map(str, checkpoint)))}.")
    return checkpoint[checkpoint_key]
  if all(hasattr(v, "shape") for v in checkpoint.values()):
    return checkpoint
  for key in _STATE_DICT_KEYS:
    if key in checkpoint and isinstance(checkpoint[key], Mapping):
      return checkpoint[key]
  nested = [str(k) for k, v in checkpoint.items() if isinstance(v, Mapping)]
  raise ValueError(
      f"Cannot tell which entry of {path} is the state dict; pass checkpoint_key= one of "
      f"{nested} (the GradAlign code saves {{'last': ..., 'best': ...}}).")


def load_torch_checkpoint(path: Union[str, os.PathLike], model_name_or_model: ModelSpec, *,
                          checkpoint_key: Optional[str] = None,
                          image_shape: Sequence[int] = (32, 32, 3), strict: bool = True,
                          prefix: Optional[str] = None, weights_only: bool = True,
                          **model_kwargs) -> dict:
  """Loads a PyTorch checkpoint file of a reference model as Flax variables.

  Args:
    path: a file written by `torch.save`.
    model_name_or_model: a `fastadv_jax.models` name (with `**model_kwargs`) or
      a model instance, e.g. "preact_resnet18_wong" for Wong et al.'s
      `model.pth`, "preact_resnet18_gradalign" with checkpoint_key="last" for
      the GradAlign code's checkpoints.
    checkpoint_key: the entry holding the state dict when the file holds a dict
      of several things; by default a plain state dict, or the entry named
      "state_dict", "model_state_dict", "model" or "net".
    image_shape, strict, prefix: as in `torch_state_dict_to_flax`.
    weights_only: passed to `torch.load` (True refuses arbitrary pickles).
  Returns:
    Flax variables `{"params": ..., "batch_stats": ...}`.
  """
  torch = _import_torch()
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No PyTorch checkpoint at {path!r}.")
  try:
    checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
  except Exception as e:  # corrupt file, unsupported pickle, ...
    raise ValueError(f"Could not read the PyTorch checkpoint {path!r}: {e}") from e
  state_dict = _find_state_dict(checkpoint, checkpoint_key, path)
  return torch_state_dict_to_flax(state_dict, model_name_or_model, image_shape=image_shape,
                                  strict=strict, prefix=prefix, **model_kwargs)

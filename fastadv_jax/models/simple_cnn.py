"""The single-layer CNN of the GradAlign paper (Andriushchenko & Flammarion 2020,
§4 and App. C.2; `models.CNN` with `n_conv=1` in the authors' code).

One 3x3 conv with `filters` filters (4 in the paper), stride 1, padding 1, with
bias -> ReLU -> a linear layer on the flattened filters x H x W map, no pooling.
The model on which catastrophic overfitting is analysed: one filter turns into
a Laplace-like edge detector whose norm and outgoing weights grow.

The flattening is NHWC (height, width, channel order), so
`kernel.reshape(H, W, filters, num_classes)[:, :, c]` are the outgoing weights
of filter c. PyTorch flattens NCHW; `fastadv_jax.interop` permutes the linear
weight accordingly.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastadv_jax.models import common


class SimpleCNN(nn.Module):
  """conv3x3(filters, bias) -> ReLU -> flatten -> linear.

  Attributes:
    num_classes: number of logits.
    filters: number of conv filters (4 in GradAlign §4; the code's default is 16).
    init_scheme: "he_fan_out" (the GradAlign code's `initialize_weights`: conv
      N(0, 2/(9*filters)), linear N(0, 2/in), zero biases) or "torch".
    mean, std: per-channel normalization inside the model (None: none, as in
      the paper).
    dtype: compute dtype; parameters and logits are float32.
    im2col_stem: compute the stem convolution (the image) as im2col
      (`common.image_conv`): the same function and parameters, faster
      gradients on CPU, slower double backprop; the evaluation closure
      (`closures.eval_logits_fn`) sets it on CPU, training takes it as the
      model keyword `im2col_stem` (`models.get_model`).
  """
  num_classes: int = 10
  filters: int = 4
  init_scheme: str = "he_fan_out"
  mean: Optional[Sequence[float]] = None
  std: Optional[Sequence[float]] = None
  dtype: Any = jnp.float32
  im2col_stem: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits (float32) for NHWC images in [0, 1]; `train` is unused (no BatchNorm)."""
    del train
    x = common.normalize(x, self.mean, self.std, self.dtype)
    x = common.conv(self.filters, 3, 1, padding=1, in_features=x.shape[-1],
                    init=self.init_scheme, use_bias=True, dtype=self.dtype,
                    im2col=self.im2col_stem, name="conv")(x)
    x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    x = common.dense(self.num_classes, in_features=x.shape[-1], init=self.init_scheme,
                     dtype=self.dtype, name="linear")(x)
    return x.astype(jnp.promote_types(self.dtype, jnp.float32))  # float64 kept (parity checks)


def filter_norms(params: Any) -> dict[str, jax.Array]:
  """Per-filter norms of the single-layer CNN (GradAlign §4, Fig. 6).

  For each conv filter c: the l2 norm of its 3x3xC kernel (bias excluded) and
  the l2 norm of its outgoing weights, the rows of the linear layer that read
  filter c's feature map (`kernel.reshape(H*W, filters, classes)[:, c]`, NHWC
  flattening). Under catastrophic overfitting one filter's two norms grow far
  above the others' (the Laplace-like edge detector).

  Args:
    params: the `SimpleCNN` parameters (`{"conv": ..., "linear": ...}`), or its
      variables (`{"params": {...}}`). Works on host arrays and under `jax.jit`.
  Returns:
    {"conv_norm": (filters,), "out_norm": (filters,)} float32 arrays.
  Raises:
    ValueError: `params` are not those of a `SimpleCNN`.
  """
  if "params" in params and "conv" not in params:
    params = params["params"]
  if "conv" not in params or "linear" not in params:
    raise ValueError(f"filter_norms needs SimpleCNN parameters with 'conv' and 'linear' "
                     f"entries, got keys {sorted(params)}.")
  kernel = jnp.asarray(params["conv"]["kernel"], jnp.float32)    # (3, 3, C, F)
  dense = jnp.asarray(params["linear"]["kernel"], jnp.float32)   # (H*W*F, classes)
  filters = kernel.shape[-1]
  if dense.shape[0] % filters:
    raise ValueError(f"The linear layer's {dense.shape[0]} inputs are not a multiple of "
                     f"the {filters} conv filters.")
  conv_norm = jnp.sqrt(jnp.sum(kernel.reshape(-1, filters) ** 2, axis=0))
  out = dense.reshape(-1, filters, dense.shape[-1])
  out_norm = jnp.sqrt(jnp.sum(out ** 2, axis=(0, 2)))
  return {"conv_norm": conv_norm, "out_norm": out_norm}

"""WideResNet (Zagoruyko & Komodakis 2016) in the layout of the adversarial
training code of Madry et al. / TRADES / Rice et al. (`wideresnet.py`).

WRN-depth-k: a 3x3 stem conv with 16 channels, three stages of n = (depth-4)/6
pre-activation basic blocks with 16k, 32k, 64k channels (strides 1, 2, 2), a
final BN + ReLU, global average pool and a linear layer. WRN-34-10 is the
AdvLC paper's analysis model and Rice et al.'s robust-overfitting model;
WRN-28-10 the usual TRADES / AutoAttack benchmark size.

Block semantics follow that code exactly: when input and output widths differ,
the 1x1 projection shortcut takes the *activated* input relu(bn1(x)); when they
match, the identity shortcut carries the raw input. The reference class also
builds an unused `sub_block1` (never called in `forward`); it has no
counterpart here and `fastadv_jax.interop` drops its keys.

Submodule names follow the PyTorch state-dict keys: `conv1`,
`block1_0/bn1` for `block1.layer.0.bn1`, `block1_0/convShortcut`, `bn1`, `fc`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastadv_jax.models import common


class WideBasicBlock(nn.Module):
  """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with the reference's shortcut rule.

  Attributes:
    features: output channels.
    stride: stride of the first conv and the projection shortcut.
    init_scheme: initialisation scheme name (`common.INITS`).
    dtype: compute dtype.
  """
  features: int
  stride: int = 1
  init_scheme: str = "wrn"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    in_features = x.shape[-1]
    activated = nn.relu(common.batch_norm(train, dtype=self.dtype, name="bn1")(x))
    # The reference tests only in == out (`equalInOut`), not the stride.
    if in_features != self.features:
      residual = common.conv(self.features, 1, self.stride, padding=0,
                             in_features=in_features, init=self.init_scheme, dtype=self.dtype,
                             name="convShortcut")(activated)
    else:
      residual = x
    out = common.conv(self.features, 3, self.stride, padding=1, in_features=in_features,
                      init=self.init_scheme, dtype=self.dtype, name="conv1")(activated)
    out = nn.relu(common.batch_norm(train, dtype=self.dtype, name="bn2")(out))
    out = common.conv(self.features, 3, 1, padding=1, in_features=self.features,
                      init=self.init_scheme, dtype=self.dtype, name="conv2")(out)
    return out + residual


class WideResNet(nn.Module):
  """WRN-depth-widen_factor for 32x32 images.

  Attributes:
    depth: total depth; (depth - 4) must be divisible by 6 (34, 28, 16, 10, ...).
    widen_factor: channel multiplier k (10 for WRN-34-10).
    num_classes: number of logits.
    init_scheme: "wrn" (the reference: He fan-out convs, PyTorch-default linear weight,
      zero linear bias) or another `common.INITS` name.
    mean, std: per-channel normalization inside the model (None: none).
    dtype: compute dtype; parameters and logits are float32.
    im2col_stem: compute the stem convolution (the image) as im2col
      (`common.image_conv`): the same function and parameters, faster
      gradients on CPU, slower double backprop; the evaluation closure
      (`closures.eval_logits_fn`) sets it on CPU, training takes it as the
      model keyword `im2col_stem` (`models.get_model`).
  """
  depth: int = 34
  widen_factor: int = 10
  num_classes: int = 10
  init_scheme: str = "wrn"
  mean: Optional[Sequence[float]] = None
  std: Optional[Sequence[float]] = None
  dtype: Any = jnp.float32
  im2col_stem: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits (float32) for NHWC images in [0, 1]; `train` selects BN batch statistics."""
    if (self.depth - 4) % 6 != 0 or self.depth < 10:
      raise ValueError(
          f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, ...), "
          f"got {self.depth}.")
    blocks_per_stage = (self.depth - 4) // 6
    widths = (16 * self.widen_factor, 32 * self.widen_factor, 64 * self.widen_factor)
    x = common.normalize(x, self.mean, self.std, self.dtype)
    x = common.conv(16, 3, 1, padding=1, in_features=x.shape[-1], init=self.init_scheme,
                    dtype=self.dtype, im2col=self.im2col_stem, name="conv1")(x)
    for stage, width in enumerate(widths):
      for block in range(blocks_per_stage):
        stride = (1 if stage == 0 else 2) if block == 0 else 1
        x = WideBasicBlock(width, stride, init_scheme=self.init_scheme, dtype=self.dtype,
                           name=f"block{stage + 1}_{block}")(x, train)
    x = nn.relu(common.batch_norm(train, dtype=self.dtype, name="bn1")(x))
    x = common.global_avg_pool(x)
    x = common.dense(self.num_classes, in_features=x.shape[-1], init=self.init_scheme,
                     dtype=self.dtype, name="fc")(x)
    return x.astype(jnp.float32)

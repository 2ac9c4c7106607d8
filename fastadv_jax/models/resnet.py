"""ResNet-50 for ImageNet in torchvision's layout (He et al. 2016, "Deep Residual
Learning"; the "v1.5" bottleneck with the stride on the 3x3 conv).

Wong et al.'s fast ImageNet training and the GradAlign ImageNet runs use
torchvision's `resnet50` (25,557,032 parameters for 1000 classes): 7x7/2 stem
conv, BN, ReLU, 3x3/2 max-pool, bottleneck stages (3, 4, 6, 3) of widths 64,
128, 256, 512 (x4 expansion), global average pool, linear. Submodule names
follow the torchvision state-dict keys (`conv1`, `bn1`, `layer1_0/conv1`,
`layer1_0/downsample_conv` for `layer1.0.downsample.0`, `fc`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastadv_jax.models import common


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand, each followed by BN; ReLU after the sum.

  Attributes:
    features: width of the 3x3 conv; the block outputs `features * expansion`.
    stride: stride of the 3x3 conv and of the projection shortcut.
    expansion: output channel multiplier (4 in ResNet-50).
    init_scheme: initialisation scheme name (`common.INITS`).
    dtype: compute dtype.
  """
  features: int
  stride: int = 1
  expansion: int = 4
  init_scheme: str = "torchvision"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    in_features = x.shape[-1]
    out_features = self.features * self.expansion
    bn = lambda name: common.batch_norm(train, dtype=self.dtype, name=name)
    out = common.conv(self.features, 1, 1, padding=0, in_features=in_features,
                      init=self.init_scheme, dtype=self.dtype, name="conv1")(x)
    out = nn.relu(bn("bn1")(out))
    out = common.conv(self.features, 3, self.stride, padding=1, in_features=self.features,
                      init=self.init_scheme, dtype=self.dtype, name="conv2")(out)
    out = nn.relu(bn("bn2")(out))
    out = common.conv(out_features, 1, 1, padding=0, in_features=self.features,
                      init=self.init_scheme, dtype=self.dtype, name="conv3")(out)
    out = bn("bn3")(out)
    if self.stride != 1 or in_features != out_features:
      residual = common.conv(out_features, 1, self.stride, padding=0,
                             in_features=in_features, init=self.init_scheme, dtype=self.dtype,
                             name="downsample_conv")(x)
      residual = bn("downsample_bn")(residual)
    else:
      residual = x
    return nn.relu(out + residual)


class ResNet(nn.Module):
  """ImageNet ResNet with bottleneck blocks (ResNet-50 by default).

  Attributes:
    num_classes: number of logits.
    stage_sizes: bottleneck blocks per stage ((3, 4, 6, 3) is ResNet-50).
    widths: bottleneck widths per stage; the stem has widths[0] channels.
    init_scheme: "torchvision" (He fan-out convs, PyTorch-default linear) or another
      `common.INITS` name.
    mean, std: per-channel normalization inside the model (None: none).
    dtype: compute dtype; parameters and logits are float32.
    im2col_stem: compute the stem convolution (the image) as im2col
      (`common.image_conv`): the same function and parameters, faster
      gradients on CPU, slower double backprop; the evaluation closure
      (`closures.eval_logits_fn`) sets it on CPU, training takes it as the
      model keyword `im2col_stem` (`models.get_model`).
  """
  num_classes: int = 1000
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (64, 128, 256, 512)
  init_scheme: str = "torchvision"
  mean: Optional[Sequence[float]] = None
  std: Optional[Sequence[float]] = None
  dtype: Any = jnp.float32
  im2col_stem: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits (float32) for NHWC images in [0, 1]; `train` selects BN batch statistics."""
    x = common.normalize(x, self.mean, self.std, self.dtype)
    x = common.conv(self.widths[0], 7, 2, padding=3, in_features=x.shape[-1],
                    init=self.init_scheme, dtype=self.dtype, im2col=self.im2col_stem,
                    name="conv1")(x)
    x = nn.relu(common.batch_norm(train, dtype=self.dtype, name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(num_blocks):
        stride = (1 if stage == 0 else 2) if block == 0 else 1
        x = Bottleneck(width, stride, init_scheme=self.init_scheme, dtype=self.dtype,
                       name=f"layer{stage + 1}_{block}")(x, train)
    x = common.global_avg_pool(x)
    x = common.dense(self.num_classes, in_features=x.shape[-1], init=self.init_scheme,
                     dtype=self.dtype, name="fc")(x)
    return x.astype(jnp.float32)

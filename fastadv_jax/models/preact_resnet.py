"""PreActResNet-18 for 32x32 images (He et al. 2016, "Identity Mappings in Deep
Residual Networks"), in the three variants the fast-adversarial-training
references use.

The variants differ in three places (see REFERENCE.md, "Initialisation"):

* `final_bn`: a BatchNorm + ReLU after the last stage, before pooling. Present
  in Wong et al.'s and Rice et al.'s code (11,172,170 parameters for 10
  classes), absent in the GradAlign code (11,171,146).
* `shortcut`: what the 1x1 projection shortcut of a downsampling block is
  applied to. "preact": the block input `x` itself (Wong's and the GradAlign
  code: `shortcut = self.shortcut(x)`); "activated": `relu(bn1(x))` (Rice et
  al.'s code and the original kuangliu/pytorch-cifar block:
  `shortcut = self.shortcut(out)`). The identity shortcut always carries the
  un-activated `x`, in every variant.
* `init_scheme` (`init` in `get_model`): "torch" (PyTorch defaults; Wong,
  Rice, AdvLC) or "he_fan_out" (GradAlign's `initialize_weights`: conv
  N(0, 2/(k*k*out)), linear N(0, 2/in), biases 0).

Submodule names follow the PyTorch state-dict keys (`conv1`, `layer1_0/bn1`,
`layer2_0/shortcut`, `bn`, `linear`), which is what `fastadv_jax.interop`
relies on to convert checkpoints.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fastadv_jax.models import common

SHORTCUTS = ("preact", "activated")


class PreActBlock(nn.Module):
  """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut.

  Attributes:
    features: output channels.
    stride: stride of the first 3x3 conv and of the projection shortcut.
    shortcut: "preact" (projection applied to the block input) or "activated"
      (projection applied to relu(bn1(input))).
    init_scheme: initialisation scheme name, see `common.INITS`.
    dtype: compute dtype (parameters stay float32).
  """
  features: int
  stride: int = 1
  shortcut: str = "preact"
  init_scheme: str = "torch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    in_features = x.shape[-1]
    activated = nn.relu(common.batch_norm(train, dtype=self.dtype, name="bn1")(x))
    if self.stride != 1 or in_features != self.features:
      source = x if self.shortcut == "preact" else activated
      residual = common.conv(self.features, 1, self.stride, padding=0,
                             in_features=in_features, init=self.init_scheme,
                             dtype=self.dtype, name="shortcut")(source)
    else:
      residual = x
    out = common.conv(self.features, 3, self.stride, padding=1, in_features=in_features,
                      init=self.init_scheme, dtype=self.dtype, name="conv1")(activated)
    out = nn.relu(common.batch_norm(train, dtype=self.dtype, name="bn2")(out))
    out = common.conv(self.features, 3, 1, padding=1, in_features=self.features,
                      init=self.init_scheme, dtype=self.dtype, name="conv2")(out)
    return out + residual


class PreActResNet(nn.Module):
  """PreActResNet for CIFAR-sized inputs: 3x3 stem, four stages, global pool, linear.

  Attributes:
    num_classes: number of logits.
    stage_sizes: blocks per stage ((2, 2, 2, 2) is PreActResNet-18).
    widths: channels per stage ((64, 128, 256, 512); the stem has widths[0]).
      Stage strides are 1, 2, 2, 2.
    final_bn: BatchNorm + ReLU before pooling (Wong, Rice) or not (GradAlign).
    shortcut: "preact" or "activated", see the module docstring.
    init_scheme: "torch" or "he_fan_out" (or any name in `common.INITS`).
    mean, std: per-channel normalization applied inside the model to inputs in
      [0, 1]; None for none.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters and the returned
      logits are float32.
    remat: recompute each block's activations in the backward pass (`nn.remat`,
      only the block inputs kept). The same function and parameters. On a
      2-core CPU it made PreActResNet-18's single-step train steps (FGSM,
      FGSM-RS, ...) faster and GradAlign's double backprop slower
      (benchmarks/README.md, "Rematerialization").
    im2col_stem: compute the stem convolution (the image) as im2col
      (`common.image_conv`): the same function and parameters, faster
      gradients on CPU, slower double backprop; the evaluation closure
      (`closures.eval_logits_fn`) sets it on CPU, training takes it as the
      model keyword `im2col_stem` (`models.get_model`).
  """
  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  final_bn: bool = True
  shortcut: str = "preact"
  init_scheme: str = "torch"
  mean: Optional[Sequence[float]] = None
  std: Optional[Sequence[float]] = None
  dtype: Any = jnp.float32
  im2col_stem: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Logits (float32) for a batch of NHWC images in [0, 1].

    Args:
      x: images, shape (B, H, W, C).
      train: BatchNorm uses batch statistics and updates "batch_stats" when
        True (apply with `mutable=["batch_stats"]`), running averages when False.
    """
    x = common.normalize(x, self.mean, self.std, self.dtype)
    x = common.conv(self.widths[0], 3, 1, padding=1, in_features=x.shape[-1],
                    init=self.init_scheme, dtype=self.dtype, im2col=self.im2col_stem,
                    name="conv1")(x)
    # `train` (argument 2, counting the module) decides Python control flow.
    block_cls = nn.remat(PreActBlock, static_argnums=(2,)) if self.remat else PreActBlock
    for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(num_blocks):
        stride = (1 if stage == 0 else 2) if block == 0 else 1
        x = block_cls(width, stride, shortcut=self.shortcut, init_scheme=self.init_scheme,
                      dtype=self.dtype, name=f"layer{stage + 1}_{block}")(x, train)
    if self.final_bn:
      x = nn.relu(common.batch_norm(train, dtype=self.dtype, name="bn")(x))
    x = common.global_avg_pool(x)
    x = common.dense(self.num_classes, in_features=x.shape[-1], init=self.init_scheme,
                     dtype=self.dtype, name="linear")(x)
    return x.astype(jnp.promote_types(self.dtype, jnp.float32))  # float64 kept (parity checks)

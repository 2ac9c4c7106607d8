"""Data augmentation in JAX, run on the device inside the jitted train step.

`augment` takes the uint8 batch the input pipeline yields and a key, and
returns float32 images in [0, 1]: a random crop of the zero- or reflect-padded
image (torchvision `RandomCrop(32, padding=4, padding_mode=...)`), a random
horizontal flip (`RandomHorizontalFlip()`), and optionally a random rotation
(`RandomRotation(15)`, the ZeroGrad paper's CIFAR-100 recipe), in that order.
Everything is one gather per transform with fixed shapes, deterministic from
the key, and jittable (the keyword arguments are static).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fastadv_jax import _checks

Array = jax.Array

PAD_MODES = ("zero", "reflect")
ROTATION_ORDERS = (0, 1)


def to_float(images: Array) -> Array:
  """uint8 images -> float32 in [0, 1] (x / 255); float images -> float32 unchanged."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def _reflect(index: Array, size: int) -> Array:
  # NumPy "reflect" (edge not repeated): -1 -> 1, size -> size - 2.
  if size == 1:
    return jnp.zeros_like(index)
  period = 2 * (size - 1)
  index = jnp.mod(index, period)
  return jnp.where(index >= size, period - index, index)


def random_crop_flip(images: Array, key: Array, *, padding: int = 4,
                     pad_mode: str = "zero", flip: bool = True) -> Array:
  """Random crop of the padded image followed by a random horizontal flip.

  Equivalent to torchvision's `RandomCrop(H, padding, padding_mode)` then
  `RandomHorizontalFlip(0.5)`, per example, without materializing the padded
  batch: each output pixel gathers its source pixel (zero outside for
  `pad_mode="zero"`, mirrored for `"reflect"`).

  Args:
    images: (B, H, W, C), any dtype (kept).
    key: a `jax.random` key.
    padding: pixels of padding on each side (0: no crop).
    pad_mode: "zero" or "reflect".
    flip: apply random horizontal flips.
  Returns:
    (B, H, W, C) with the dtype of `images`.
  """
  _checks.check_choice("pad_mode", pad_mode, PAD_MODES)
  if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
    raise ValueError(f"padding must be an integer >= 0, got {padding!r}.")
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be a batch (B, H, W, C), got shape {images.shape}.")
  batch, height, width, _ = images.shape
  crop_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(crop_key, (2, batch), 0, 2 * padding + 1) - padding
  rows = offsets[0][:, None] + jnp.arange(height)[None, :]          # (B, H)
  cols_out = jnp.arange(width)[None, :]
  if flip:
    flipped = jax.random.bernoulli(flip_key, 0.5, (batch,))
    cols_out = jnp.where(flipped[:, None], width - 1 - cols_out, cols_out)
  cols = offsets[1][:, None] + cols_out                               # (B, W)
  if pad_mode == "reflect":
    rows, cols = _reflect(rows, height), _reflect(cols, width)
    valid = None
  else:
    valid = (((rows >= 0) & (rows < height))[:, :, None]
             & ((cols >= 0) & (cols < width))[:, None, :])            # (B, H, W)
    rows, cols = jnp.clip(rows, 0, height - 1), jnp.clip(cols, 0, width - 1)
  out = images[jnp.arange(batch)[:, None, None], rows[:, :, None], cols[:, None, :]]
  if valid is not None:
    out = jnp.where(valid[..., None], out, jnp.zeros((), out.dtype))
  return out


def rotate(images: Array, angles: Array, *, order: int = 0) -> Array:
  """Rotates each image counter-clockwise by its angle (radians) about its centre.

  Like torchvision's `rotate` (positive = counter-clockwise, `expand=False`,
  fill 0): each output pixel samples the source at the inversely rotated
  position, with nearest-neighbour (`order=0`, torchvision's default for
  `RandomRotation`) or bilinear (`order=1`) interpolation; outside is 0.

  Args:
    images: (B, H, W, C) float.
    angles: (B,) angles in radians.
    order: 0 (nearest) or 1 (bilinear).
  Returns:
    (B, H, W, C) float32.
  """
  _checks.check_choice("rotation order", order, ROTATION_ORDERS)
  images = to_float(images)
  batch, height, width, _ = images.shape
  cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) - cy,
                        jnp.arange(width, dtype=jnp.float32) - cx, indexing="ij")
  cos, sin = jnp.cos(angles)[:, None, None], jnp.sin(angles)[:, None, None]
  # Rows grow downwards, so a visually counter-clockwise rotation by θ maps a
  # source offset (x, y) to (x cos θ + y sin θ, -x sin θ + y cos θ); invert it.
  src_x = xx * cos - yy * sin + cx
  src_y = xx * sin + yy * cos + cy
  batch_idx = jnp.arange(batch)[:, None, None]

  def sample(y, x):
    inside = (y >= 0) & (y <= height - 1) & (x >= 0) & (x <= width - 1)
    yi = jnp.clip(y, 0, height - 1).astype(jnp.int32)
    xi = jnp.clip(x, 0, width - 1).astype(jnp.int32)
    return jnp.where(inside[..., None], images[batch_idx, yi, xi], 0.0)

  if order == 0:
    return sample(jnp.round(src_y), jnp.round(src_x))
  y0, x0 = jnp.floor(src_y), jnp.floor(src_x)
  wy, wx = (src_y - y0)[..., None], (src_x - x0)[..., None]
  return ((1 - wy) * (1 - wx) * sample(y0, x0) + (1 - wy) * wx * sample(y0, x0 + 1)
          + wy * (1 - wx) * sample(y0 + 1, x0) + wy * wx * sample(y0 + 1, x0 + 1))


def random_rotation(images: Array, key: Array, degrees: float, *, order: int = 0) -> Array:
  """torchvision `RandomRotation(degrees)`: angle ~ U[-degrees, degrees] per example."""
  _checks.check_nonnegative("rotation degrees", degrees)
  batch = jnp.shape(images)[0]
  limit = math.radians(degrees)
  angles = jax.random.uniform(key, (batch,), jnp.float32, -limit, limit)
  return rotate(images, angles, order=order)


def augment(images: Array, key: Array, *, padding: int = 4, pad_mode: str = "zero",
            flip: bool = True, rotation_degrees: float = 0.0,
            rotation_order: int = 0) -> Array:
  """The CIFAR/SVHN training augmentation: crop with padding, flip, optional rotation.

  GradAlign and Wong et al.: `padding=4, pad_mode="zero", flip=True`. ZeroGrad
  (Golgooni et al.): reflect padding on CIFAR-10, plus `rotation_degrees=15`
  on CIFAR-100. SVHN in the GradAlign paper: no flip. No augmentation at all:
  `padding=0, flip=False` (then this is `to_float`).

  Args:
    images: (B, H, W, C) uint8 or float in [0, 1].
    key: a `jax.random` key; the same key gives the same augmentation.
    padding: pixels of padding for the random crop (0: no crop).
    pad_mode: "zero" or "reflect".
    flip: random horizontal flips.
    rotation_degrees: maximum rotation angle (0: no rotation).
    rotation_order: 0 (nearest, torchvision's default) or 1 (bilinear).
  Returns:
    (B, H, W, C) float32 in [0, 1].
  """
  crop_key, rotation_key = jax.random.split(key)
  out = images
  if padding or flip:
    out = random_crop_flip(out, crop_key, padding=padding, pad_mode=pad_mode, flip=flip)
  else:
    _checks.check_choice("pad_mode", pad_mode, PAD_MODES)
  out = to_float(out)
  if rotation_degrees:
    out = random_rotation(out, rotation_key, rotation_degrees, order=rotation_order)
  return out

"""The train step with the im2col stem's convolution written other ways (CPU).

Runs `bench_train_step.py` (its arguments after the variant's name) with
`fastadv_jax.models.common.image_conv`, the function every model's
`im2col_stem=True` calls, replaced by one of

* `im2col`: the library's own (patches times the flattened kernel, one dot);
* `shift_add`: 27 shifted input channels times their kernel row, added up
  (elementwise; `bench_input_conv.py`'s form);
* `shift_dot`: 9 shifted inputs, each times its (C, F) kernel slice;
* `groups8`, `groups16`: im2col with the batch split into G groups and the
  kernel broadcast to G copies, so that the kernel gradient is G batched dots
  and a sum instead of one dot contracting over batch x pixels.

All compute the same function (checked against `lax.conv_general_dilated`
before timing). Why: issue 9's target for the single-layer CNN's FGSM step
(benchmarks/README.md, "The single-layer CNN with an im2col stem").

  python benchmarks/bench_stem_variants.py groups8 --model simple_cnn --batch 128 \\
      --methods fgsm --repeats 40 --no-torch-memory --set model.kwargs.im2col_stem=True \\
      --out benchmarks/results/stem_variants/groups8_run1.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastadv_jax  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from fastadv_jax.models import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _views(x, kernel_hw, strides, padding):
  """The kh x kw shifted (strided) views of the padded x, each (B, H', W', C)."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  out_h = (x.shape[1] - kh) // sh + 1
  out_w = (x.shape[2] - kw) // sw + 1
  return [(i, j, x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :])
          for i in range(kh) for j in range(kw)]


def shift_add(x, kernel, strides, padding):
  kh, kw, c, _ = kernel.shape
  out = 0.0
  for i, j, view in _views(x, (kh, kw), strides, padding):
    for ch in range(c):
      out = out + view[..., ch:ch + 1] * kernel[i, j, ch]
  return out


def shift_dot(x, kernel, strides, padding):
  kh, kw, _, _ = kernel.shape
  out = 0.0
  for i, j, view in _views(x, (kh, kw), strides, padding):
    out = out + jnp.dot(view, kernel[i, j])
  return out


def grouped(groups):
  def conv(x, kernel, strides, padding):
    kh, kw, c, f = kernel.shape
    patches = common._patches(x, (kh, kw), strides, padding)  # pylint: disable=protected-access
    g = groups if patches.shape[0] % groups == 0 else 1
    flat = kernel.reshape(kh * kw * c, f)
    out = jnp.einsum("gpc,gcf->gpf", patches.reshape(g, -1, patches.shape[-1]),
                     jnp.broadcast_to(flat, (g,) + flat.shape))
    return out.reshape(patches.shape[:3] + (f,))
  return conv


VARIANTS = {"im2col": common.image_conv, "shift_add": shift_add, "shift_dot": shift_dot,
            "groups8": grouped(8), "groups16": grouped(16)}


def _check(conv) -> float:
  """Largest difference from XLA's convolution (batch 16, 4 filters)."""
  x = jax.random.uniform(jax.random.PRNGKey(0), (16, 32, 32, 3))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4))
  pad = ((1, 1), (1, 1))
  want = jax.lax.conv_general_dilated(x, kernel, (1, 1), pad,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return float(np.max(np.abs(np.asarray(conv(x, kernel, (1, 1), pad) - want))))


def main(argv):
  if not argv or argv[0] not in VARIANTS:
    raise SystemExit(f"usage: bench_stem_variants.py VARIANT [bench_train_step args]; "
                     f"VARIANT one of {sorted(VARIANTS)}, got {argv[:1]!r}")
  conv = VARIANTS[argv[0]]
  diff = _check(conv)
  print(f"{argv[0]}: largest difference from lax.conv_general_dilated {diff:.2e}")
  if diff > 1e-4:
    raise SystemExit(f"{argv[0]} does not compute the convolution (difference {diff}).")
  common.image_conv = conv
  import bench_train_step  # pylint: disable=g-import-not-at-top
  bench_train_step.main(argv[1:])


if __name__ == "__main__":
  main(sys.argv[1:])

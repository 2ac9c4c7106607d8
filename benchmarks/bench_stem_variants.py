"""The train step with the im2col stem's convolution written other ways (CPU).

Runs `bench_train_step.py` (its arguments after the variant's name) with
`fastadv_jax.models.common.image_conv`, the function every model's
`im2col_stem=True` calls, replaced by one of

* `im2col`: the library's own (patches times the flattened kernel, one dot);
* `shift_add`: 27 shifted input channels times their kernel row, added up
  (elementwise), and `shift_dot`: 9 shifted inputs, each times its (C, F)
  kernel slice (both `bench_input_conv.py`'s forms, stride 1 and padding 1);
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

import bench_input_conv  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from fastadv_jax.models import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _same_padding_only(form):
  """`bench_input_conv.py`'s form (stride 1, padding 1: the models' stems) as an
  `image_conv` replacement."""
  def conv(x, kernel, strides, padding):
    if tuple(strides) != (1, 1) or tuple(map(tuple, padding)) != ((1, 1), (1, 1)):
      raise ValueError(f"this form takes stride 1 and padding 1, got {strides}, {padding}.")
    return form(x, kernel)
  return conv


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


VARIANTS = {"im2col": common.image_conv,
            "shift_add": _same_padding_only(bench_input_conv.shift_add_conv),
            "shift_dot": _same_padding_only(bench_input_conv.shift_dot_conv),
            "groups8": grouped(8), "groups16": grouped(16)}


def _check(conv) -> float:
  """Largest difference from XLA's convolution (batch 16, 4 filters)."""
  x = jax.random.uniform(jax.random.PRNGKey(0), (16, 32, 32, 3))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 3, 4))
  got = conv(x, kernel, (1, 1), ((1, 1), (1, 1)))
  return float(np.max(np.abs(np.asarray(got - bench_input_conv.xla_conv(x, kernel)))))


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

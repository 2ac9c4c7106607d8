"""Why GradAlign's reverse-over-reverse step is slow on XLA:CPU: one convolution.

  python benchmarks/bench_conv_second_order.py          # batch 128, 32x32, 64 -> 128, stride 2

Double backprop differentiates the input gradient of every convolution with
respect to its kernel. For a strided convolution JAX writes that input
gradient with `lhs_dilation` (the output gradient dilated by the stride), and
its kernel derivative is then a convolution whose "kernel" operand (the
cotangent of the input gradient, 32x32) is larger than its "input" (the
undilated output gradient, 16x16). XLA's algebraic simplifier swaps such
operands, which adds a window reversal; XLA:CPU hands convolutions with window
reversal not to Eigen but to an emitted loop. This script times, for the
first strided convolution of PreActResNet-18's second stage:

* `input_grad` and `input_grad_explicit`: the input gradient itself, as JAX
  writes it (`lhs_dilation`) and by hand (below), what a first-order step pays;
* `weight_grad`: the ordinary (first-order) kernel gradient, same flops;
* `second_order`: d/dw <d/dx <conv(x, w), u>, v> as `jax.grad` writes it;
* `second_order_explicit`: the same derivative with the input gradient written
  by hand as a stride-1 convolution of the explicitly zero-interleaved output
  gradient (`lax.pad` with interior padding), so no operand swap happens.

It checks that the two forms of each agree, prints each compiled
convolution's window and ms, and writes JSON (`--out`). The train step's
profile (`profile_train_step.py --method fgsm+grad_align_ror`) finds these
convolutions as its slowest ops.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import fastadv_jax  # pylint: disable=unused-import  (its XLA:CPU defaults)
import jax
import jax.numpy as jnp
import numpy as np

# Next to this script: benchmarks/records.py, and two benchmarks' helpers.
from bench_conv_weight_grad import _best_ms  # pylint: disable=g-bad-import-order
from profile_train_step import hlo_attributes  # pylint: disable=g-bad-import-order
import records  # pylint: disable=g-bad-import-order

HERE = os.path.dirname(os.path.abspath(__file__))
DIMS = ("NHWC", "HWIO", "NHWC")


def strided_conv(x, w):
  """3x3 convolution, stride 2, padding 1 (PreActResNet's downsampling conv)."""
  return jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=DIMS)


def input_grad(w, x, u):
  """d/dx <conv(x, w), u>, as `jax.grad` writes it (lhs_dilation = stride)."""
  return jax.grad(lambda x: jnp.sum(strided_conv(x, w) * u))(x)


def input_grad_explicit(w, u):
  """The same input gradient: u zero-interleaved by hand, then a stride-1 conv.

  x index i = 2 o + a - 1, so dx[i] = sum_a w[a] u_dilated[i + 1 - a]: the
  dilated u padded by (k - 1 - pad, pad + 1) = (1, 2) and correlated with the
  spatially flipped kernel, its in/out channels exchanged.
  """
  u_dilated = jax.lax.pad(u, jnp.zeros((), u.dtype),
                          ((0, 0, 0), (1, 2, 1), (1, 2, 1), (0, 0, 0)))
  w_flipped = jnp.swapaxes(w[::-1, ::-1], 2, 3)
  return jax.lax.conv_general_dilated(u_dilated, w_flipped, (1, 1), "VALID",
                                      dimension_numbers=DIMS)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--size", type=int, default=32, help="input height = width")
  parser.add_argument("--in_channels", type=int, default=64)
  parser.add_argument("--out_channels", type=int, default=128)
  parser.add_argument("--out", default=os.path.join(HERE, "results",
                                                    "bench_conv_second_order.json"))
  args = parser.parse_args(argv)
  b, s, ci, co = args.batch, args.size, args.in_channels, args.out_channels
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, s, s, ci)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, ci, co)) / np.sqrt(9 * ci), jnp.float32)
  u = jnp.asarray(rng.normal(size=(b, s // 2, s // 2, co)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, s, s, ci)), jnp.float32)

  forms = {
      # What a first-order step pays for each way of writing the input gradient.
      "input_grad": (input_grad, (w, x, u)),
      "input_grad_explicit": (input_grad_explicit, (w, u)),
      "weight_grad": (jax.grad(lambda w, x, u: jnp.sum(strided_conv(x, w) * u)), (w, x, u)),
      "second_order": (jax.grad(lambda w, x, u, v: jnp.sum(input_grad(w, x, u) * v)),
                       (w, x, u, v)),
      "second_order_explicit": (jax.grad(lambda w, u, v: jnp.sum(input_grad_explicit(w, u) * v)),
                                (w, u, v)),
  }
  rows, values = {}, {}
  for name, (fn, fn_args) in forms.items():
    compiled = jax.jit(fn).lower(*fn_args).compile()
    values[name] = compiled(*fn_args)
    convolutions = [attrs for attrs in hlo_attributes(compiled.as_text()).values()
                    if attrs.startswith("convolution ")]
    rows[name] = {"ms": _best_ms(compiled, *fn_args, repeats=2, inner=1),
                  "convolutions": convolutions}
    print(f"{name:22s} {rows[name]['ms']:9.1f} ms   {'; '.join(convolutions)}")
  np.testing.assert_allclose(values["input_grad_explicit"], values["input_grad"], rtol=1e-4,
                             atol=1e-4)
  scale = float(jnp.max(jnp.abs(values["second_order"])))
  np.testing.assert_allclose(values["second_order_explicit"], values["second_order"],
                             rtol=1e-4, atol=1e-4 * scale)
  print(f"input_grad_explicit / input_grad: "
        f"{rows['input_grad_explicit']['ms'] / rows['input_grad']['ms']:.2f}x; "
        f"second_order / weight_grad: {rows['second_order']['ms'] / rows['weight_grad']['ms']:.0f}x"
        f"; second_order_explicit / weight_grad: "
        f"{rows['second_order_explicit']['ms'] / rows['weight_grad']['ms']:.1f}x "
        f"(the two second-order forms agree); load average "
        f"{tuple(round(a, 2) for a in os.getloadavg())}")
  records.write_record(args.out, {
      "benchmark": "bench_conv_second_order", "batch": b, "size": s, "in_channels": ci,
      "out_channels": co, "date": datetime.datetime.now(datetime.timezone.utc)
      .isoformat(timespec="seconds"), "jax": jax.__version__, "processor": platform.processor(),
      "cpu_count": os.cpu_count(), "load_average_end": os.getloadavg(), "rows": rows})


if __name__ == "__main__":
  main()

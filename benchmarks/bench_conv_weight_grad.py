"""One 3x3 convolution's passes on this CPU: XLA against oneDNN (PyTorch).

  python benchmarks/bench_conv_weight_grad.py            # batch 128, 32x32, 64 -> 64 channels
  python benchmarks/bench_conv_weight_grad.py --channels 128 --size 16

Why PreActResNet-18's train step is slower in JAX on CPU (issue 9): the
forward pass, the input gradient and the weight gradient of one convolution
of the first stage, timed alone, and the weight gradient written three other
ways in JAX: im2col patches times the output gradient (one dot contracting
over batch and pixels), that dot alone on ready-made patches (the GEMM's own
speed), and nine dots on shifted views; then the three passes again with
channel-major operands (NCHW, OIHW). JSON goes to `--out`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import fastadv_jax  # pylint: disable=unused-import  (its XLA:CPU defaults)
import jax
import jax.numpy as jnp
import numpy as np

import records  # benchmarks/records.py, next to this script

HERE = os.path.dirname(os.path.abspath(__file__))


def _best_ms(fn, *args, repeats=3, inner=5):
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / inner * 1e3)
  return best


def _torch_best_ms(fn, repeats=3, inner=5):
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(inner):
      fn()
    best = min(best, (time.perf_counter() - start) / inner * 1e3)
  return best


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--size", type=int, default=32, help="height = width")
  parser.add_argument("--channels", type=int, default=64, help="in = out channels")
  parser.add_argument("--out", default=os.path.join(HERE, "results", "bench_conv_weight_grad.json"))
  args = parser.parse_args(argv)
  b, s, c = args.batch, args.size, args.channels
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, s, s, c)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(b, s, s, c)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, c, c)), jnp.float32)
  pad = ((1, 1), (1, 1))

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), pad,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def patches(x):
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    views = [xp[:, i:i + s, j:j + s, :] for i in range(3) for j in range(3)]
    return jnp.stack(views, axis=3).reshape(b * s * s, 9 * c)

  def over_pixels(lhs, rhs):  # lhs^T rhs, contracting the (batch x pixels) rows
    return jax.lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())))

  forms = {
      "forward": (jax.jit(conv), (x, k)),
      "input_grad": (jax.jit(lambda g: jax.vjp(lambda z: conv(z, k), x)[1](g)[0]), (g,)),
      "weight_grad": (jax.jit(lambda x, g: jax.vjp(lambda kk: conv(x, kk), k)[1](g)[0]), (x, g)),
      "weight_grad_im2col": (jax.jit(lambda x, g: over_pixels(
          patches(x), g.reshape(-1, c)).reshape(3, 3, c, c)), (x, g)),
      "weight_grad_gemm_only": (jax.jit(over_pixels),
                                (jax.jit(patches)(x), g.reshape(-1, c))),
      "weight_grad_9_dots": (jax.jit(lambda x, g: jnp.stack([
          jnp.einsum("bhwc,bhwf->cf", jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))[
              :, i:i + s, j:j + s, :], g) for i in range(3) for j in range(3)]
      ).reshape(3, 3, c, c)), (x, g)),
  }
  # The same three passes with channel-major operands (PyTorch's NCHW and
  # OIHW): whether XLA:CPU's layout copies depend on the logical layout.
  x_cm, g_cm = x.transpose(0, 3, 1, 2), g.transpose(0, 3, 1, 2)
  k_cm = k.transpose(3, 2, 0, 1)

  def conv_cm(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), pad,
                                        dimension_numbers=("NCHW", "OIHW", "NCHW"))

  forms["forward_nchw"] = (jax.jit(conv_cm), (x_cm, k_cm))
  forms["input_grad_nchw"] = (
      jax.jit(lambda g: jax.vjp(lambda z: conv_cm(z, k_cm), x_cm)[1](g)[0]), (g_cm,))
  forms["weight_grad_nchw"] = (
      jax.jit(lambda x, g: jax.vjp(lambda kk: conv_cm(x, kk), k_cm)[1](g)[0]), (x_cm, g_cm))
  reference = forms["weight_grad"][0](x, g)
  rows = {}
  for name, (fn, fn_args) in forms.items():
    if name.startswith("weight_grad") and name != "weight_grad_gemm_only":
      value = fn(*fn_args)
      if name.endswith("_nchw"):
        value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      np.testing.assert_allclose(value, reference, rtol=1e-3,
                                 atol=1e-3 * float(jnp.max(jnp.abs(reference))))
    rows[name] = {"jax_ms": _best_ms(fn, *fn_args)}

  import torch  # pylint: disable=g-import-not-at-top
  tx = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous()
  tg = torch.tensor(np.asarray(g)).permute(0, 3, 1, 2).contiguous()
  tk = torch.tensor(np.asarray(k)).permute(3, 2, 0, 1).contiguous()
  with torch.no_grad():
    rows["forward"]["torch_ms"] = _torch_best_ms(
        lambda: torch.nn.functional.conv2d(tx, tk, padding=1))
    rows["input_grad"]["torch_ms"] = _torch_best_ms(
        lambda: torch.nn.grad.conv2d_input(tx.shape, tk, tg, padding=1))
    rows["weight_grad"]["torch_ms"] = _torch_best_ms(
        lambda: torch.nn.grad.conv2d_weight(tx, tk.shape, tg, padding=1))
  tp = torch.tensor(np.asarray(forms["weight_grad_gemm_only"][1][0]))
  tg2 = tg.permute(0, 2, 3, 1).reshape(-1, c).contiguous()
  rows["weight_grad_gemm_only"]["torch_ms"] = _torch_best_ms(lambda: tp.T @ tg2)

  print(f"3x3 convolution, batch {b}, {s}x{s}, {c} -> {c} channels, float32; "
        f"JAX {jax.__version__} on {jax.default_backend()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)")
  print(f"{'pass':24s} {'JAX ms':>8s} {'torch ms':>9s} {'JAX/torch':>10s}")
  for name, row in rows.items():
    torch_ms = row.get("torch_ms")
    ratio = f"{row['jax_ms'] / torch_ms:9.2f}x" if torch_ms else ""
    print(f"{name:24s} {row['jax_ms']:8.1f} {torch_ms if torch_ms else float('nan'):9.1f} "
          f"{ratio:>10s}")
  record = {"benchmark": "bench_conv_weight_grad", "batch": b, "size": s, "channels": c,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average": os.getloadavg(), "cpu_count": os.cpu_count(),
            "versions": {"jax": jax.__version__, "torch": torch.__version__},
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows}
  records.write_record(args.out, record)


if __name__ == "__main__":
  main()

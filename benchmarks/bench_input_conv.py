"""The single-layer CNN's input convolution (3 channels in), four ways, on this CPU.

Why the attacks on GradAlign's single-layer CNN stay below torchattacks' speed
(issue 9): its 3x3 convolution with 3 input channels. This script times the
CNN's forward pass, its input gradient and its full gradient (parameters and
input) with the convolution written as

* `xla`: `lax.conv_general_dilated` (NHWC / HWIO), what the model uses;
* `im2col`: the 9 shifted views concatenated along channels, one matmul;
* `shift_add`: 27 shifted inputs times their kernel row, added up (elementwise);
* `shift_dot`: 9 shifted inputs, each times its (3, F) kernel slice;

and PyTorch's `conv2d` forward for scale; batch 48 and 128, 4 and 16 filters.
All four JAX forms compute the same function (the largest difference is
printed). JSON goes to `results/bench_input_conv.json`.

  python benchmarks/bench_input_conv.py              # both frameworks on one thread
  python benchmarks/bench_input_conv.py --threads 0  # their defaults
"""

from __future__ import annotations

import argparse
import os
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import records  # pylint: disable=g-import-not-at-top,wrong-import-position
import xla_threads  # pylint: disable=g-import-not-at-top,wrong-import-position

THREADS = xla_threads.preparse_threads(sys.argv[1:]) if __name__ == "__main__" else 0

import fastadv_jax  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))


def xla_conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _shifted(x, kh, kw):
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return [(i, j, xp[:, i:i + h, j:j + w, :]) for i in range(kh) for j in range(kw)]


def im2col_conv(x, w):
  kh, kw, c, f = w.shape
  patches = jnp.concatenate([v for _, _, v in _shifted(x, kh, kw)], axis=-1)
  return jnp.dot(patches, w.reshape(kh * kw * c, f))


def shift_add_conv(x, w):
  out = 0.0
  for i, j, v in _shifted(x, w.shape[0], w.shape[1]):
    for ch in range(w.shape[2]):
      out = out + v[..., ch:ch + 1] * w[i, j, ch]
  return out


def shift_dot_conv(x, w):
  return sum(v @ w[i, j] for i, j, v in _shifted(x, w.shape[0], w.shape[1]))


FORMS = {"xla": xla_conv, "im2col": im2col_conv, "shift_add": shift_add_conv,
         "shift_dot": shift_dot_conv}


def _median_ms(fn, repeats):
  for _ in range(3):
    out = fn()
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1e3)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--threads", type=int, default=1, help="1 (default) or 0 (defaults)")
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--out", default=os.path.join(HERE, "results", "bench_input_conv.json"))
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  if args.threads > 0:
    torch.set_num_threads(args.threads)
  rng = np.random.default_rng(0)
  rows = []
  for batch in (48, 128):
    for filters in (4, 16):
      xn = rng.uniform(size=(batch, 32, 32, 3)).astype(np.float32)
      wn = (rng.normal(size=(3, 3, 3, filters)) * 0.1).astype(np.float32)
      vn = (rng.normal(size=(32 * 32 * filters, 10)) * 0.01).astype(np.float32)
      x, w, v = map(jnp.asarray, (xn, wn, vn))
      y = jnp.asarray(rng.integers(0, 10, batch))
      row = {"batch": batch, "filters": filters, "jax_ms": {}}
      reference = None
      for name, conv in FORMS.items():
        def logits(params, x, conv=conv):
          return jax.nn.relu(conv(x, params[0])).reshape(x.shape[0], -1) @ params[1]

        def loss(params, x, logits=logits):
          return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits(params, x)),
                                               y[:, None], 1))
        fwd = jax.jit(logits)
        grad_x = jax.jit(jax.grad(loss, argnums=1))
        grad_all = jax.jit(jax.grad(loss, argnums=(0, 1)))
        out = fwd((w, v), x)
        reference = out if reference is None else reference
        row["jax_ms"][name] = {
            "forward": _median_ms(lambda: fwd((w, v), x), args.repeats),
            "input_grad": _median_ms(lambda: grad_x((w, v), x), args.repeats),
            "all_grads": _median_ms(lambda: grad_all((w, v), x), args.repeats),
            "max_abs_diff_vs_xla": float(jnp.max(jnp.abs(out - reference)))}
      tx = torch.from_numpy(xn.transpose(0, 3, 1, 2).copy())
      tw = torch.from_numpy(wn.transpose(3, 2, 0, 1).copy())
      tv = torch.from_numpy(vn)
      with torch.no_grad():
        row["torch_forward_ms"] = _median_ms(
            lambda: torch.relu(torch.nn.functional.conv2d(tx, tw, padding=1)).reshape(
                batch, -1) @ tv, args.repeats)
      rows.append(row)
      cells = "  ".join(f"{n} {r['forward']:.2f}/{r['input_grad']:.2f}/{r['all_grads']:.2f}"
                        for n, r in row["jax_ms"].items())
      print(f"batch {batch:3d} filters {filters:2d} | ms forward/input grad/all grads: "
            f"{cells} | torch forward {row['torch_forward_ms']:.2f}", flush=True)
  record = {"benchmark": "bench_input_conv", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": "python " + " ".join(sys.argv), "threads": args.threads,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "repeats": args.repeats,
            "load_average_end": list(os.getloadavg()), "cpu_count": os.cpu_count(),
            "versions": {"jax": jax.__version__, "torch": torch.__version__}, "rows": rows}
  records.write_record(args.out, record)


if __name__ == "__main__":
  main()

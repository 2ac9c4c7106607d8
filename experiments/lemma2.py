r"""Lemma 2 of GradAlign (§4): gradient alignment of a single-layer CNN at init.

For f(x) = Σⱼ Σ_p u_{j,p} ReLU(⟨wⱼ, x_p⟩) with Gaussian filters wⱼ (3×3×3,
zero padding, stride 1) and random readout weights, the alignment
cos(∇ₓf(x), ∇ₓf(x + η)), η ~ U[-ε, ε]^d, is high at initialisation: a filter
changes its ReLU pattern on a patch only if η moves the patch across the
filter's hyperplane, which for natural images and small ε is rare. So
catastrophic overfitting, when gradient alignment collapses, is something
*training* does to the filters (see cnn_filters.py), not a property of the
architecture.

Measured here on real CIFAR-10 test images:

* `metrics.lemma2_alignment_at_init`: the limit of many filters (expectation
  over the weights in closed form via the Gaussian orthant probability,
  Monte Carlo over η), per image; the library's derivation of the lemma's
  quantity (see its docstring);
* `metrics.single_layer_cnn_alignment`: Monte Carlo over random finite-width
  networks (w ~ N(0, I), u ~ N(0, 1), no bias) with `filters` filters, which
  should approach the limit as `filters` grows.

Both against the number of filters and ε. The paper's setting is 4 filters and
ε = 10/255.

  python experiments/lemma2.py            # CPU, ~2-4 min: n=64 images, 8 inits
  python experiments/lemma2.py --full     # n=512 images, 32 inits, more filters

Writes experiments/results/lemma2.json and lemma2.png.
"""

from __future__ import annotations

import argparse

import numpy as np

import _common


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  _common.add_common_args(parser, full_help="n=512 images, 32 random networks, up to 512 filters")
  parser.add_argument("--n", type=int, default=None, help="test images (default 64; --full 512)")
  parser.add_argument("--inits", type=int, default=None,
                      help="random networks per (filters, ε) (default 8; --full 32)")
  parser.add_argument("--eps", type=float, nargs="+", default=[4.0, 8.0, 10.0, 16.0],
                      help="ε values in /255")
  parser.add_argument("--filters", type=int, nargs="+", default=None,
                      help="numbers of filters (default 1 2 4 8 16 64; --full adds 256 512)")
  parser.add_argument("--eta-samples", type=int, default=32,
                      help="Monte Carlo draws of η for the many-filter limit")
  parser.add_argument("--clip-to-box", action="store_true",
                      help="clip x + η to [0, 1] (the lemma does not)")
  args = parser.parse_args(argv)
  n = args.n or (512 if args.full else 64)
  inits = args.inits or (32 if args.full else 8)
  filters_list = args.filters or ([1, 2, 4, 8, 16, 64, 256, 512] if args.full
                                  else [1, 2, 4, 8, 16, 64])

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  from fastadv_jax import metrics  # pylint: disable=g-import-not-at-top

  rec = _common.Record("lemma2", args)
  x_np, _, idx = _common.random_test_points(n, args.seed)
  x = jnp.asarray(x_np)
  key = jax.random.PRNGKey(args.seed)

  limit_fn = jax.jit(lambda k, e: metrics.lemma2_alignment_at_init(
      k, x, eps=e, num_samples=args.eta_samples, clip_to_box=args.clip_to_box))

  rows = []
  total = len(args.eps) * (1 + len(filters_list))
  bar = tqdm(total=total, desc="(ε, filters)", disable=args.no_progress)
  for ie, eps_255 in enumerate(args.eps):
    eps = eps_255 / 255.0
    limit = np.asarray(limit_fn(jax.random.fold_in(key, 1000 + ie), jnp.float32(eps)))
    bar.update(1)
    row = {"eps_255": eps_255, "limit_mean": float(limit.mean()),
           "limit_std_over_images": float(limit.std()),
           "limit_min_over_images": float(limit.min()), "finite": []}
    for jf, filters in enumerate(filters_list):
      # Networks are drawn a few at a time (vmapped inside the metric) to bound
      # memory: n x 32 x 32 x filters activations per network.
      chunk = max(1, min(inits, int(2 ** 24 // (n * 1024 * filters))))
      fn = jax.jit(lambda k, e, f=filters, c=chunk: metrics.single_layer_cnn_alignment(
          k, x, eps=e, filters=f, num_inits=c, clip_to_box=args.clip_to_box))
      per_image = []
      done = 0
      while done < inits:
        k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, ie), jf), done)
        per_image.append(np.asarray(fn(k, jnp.float32(eps))) * chunk)
        done += chunk
      per_image = np.sum(per_image, axis=0) / done
      row["finite"].append({"filters": filters, "num_inits": done,
                            "mean": float(per_image.mean()),
                            "std_over_images": float(per_image.std()),
                            "min_over_images": float(per_image.min())})
      bar.update(1)
    rows.append(row)
  bar.close()

  rec["setting"] = {
      "n_images": n, "selection": f"random CIFAR-10 test points, seed {args.seed}",
      "test_indices_head": idx[:16].tolist(), "random_networks_per_point": inits,
      "eta_samples_for_limit": args.eta_samples, "seed": args.seed,
      "clip_to_box": args.clip_to_box, "kernel_size": 3,
      "finite_network": "w ~ N(0, I) 3x3x3 filters, readout u ~ N(0, 1) per (pixel, filter), "
                        "no bias, one output; cos of input gradients (logistic loss gives the "
                        "same cosine)"}
  rec["rows"] = rows
  paper_row = next((r for r in rows if r["eps_255"] == 10.0), None)
  if paper_row:
    four = next((f for f in paper_row["finite"] if f["filters"] == 4), None)
    rec["paper_setting_eps10"] = {"limit_mean": paper_row["limit_mean"],
                                  "four_filters_mean": four and four["mean"]}

  plt = _common.pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for i, row in enumerate(rows):
    fs = [f["filters"] for f in row["finite"]]
    ax.errorbar(fs, [f["mean"] for f in row["finite"]],
                yerr=[f["std_over_images"] for f in row["finite"]], marker="o",
                color=f"C{i}", capsize=2, label=f"ε={row['eps_255']:g}/255, finite width")
    ax.axhline(row["limit_mean"], color=f"C{i}", ls="--", lw=1)
  ax.plot([], [], "k--", lw=1, label="many-filter limit (Lemma 2)")
  ax.set_xscale("log", base=2)
  ax.set(xlabel="number of filters", ylabel=r"E cos($\nabla f(x), \nabla f(x+\eta)$)",
         title=f"Lemma 2: alignment of a random single-layer CNN (n={n} images)")
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(rec.path("png"), dpi=120)

  headers = ["ε (/255)", "limit"] + [f"{f} filters" for f in filters_list]
  table = _common.fmt_table(headers, [
      [f"{r['eps_255']:g}", f"{r['limit_mean']:.3f}"] +
      [f"{f['mean']:.3f}±{f['std_over_images']:.3f}" for f in r["finite"]] for r in rows])
  print(table)
  rec["table_markdown"] = table
  rec.save()


if __name__ == "__main__":
  main()

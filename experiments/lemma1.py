r"""Lemma 1 of GradAlign (Andriushchenko & Flammarion 2020, §3): the FGSM-RS norm.

FGSM-RS takes δ = clip_ε(η + α·sign(∇ℓ(x+η))) with η ~ U[-ε, ε]^d. Lemma 1
gives E‖δ‖₂² = d·(−α³/(6ε) + α²/2 + ε²/3) for α ∈ [0, 2ε] (ε²d beyond), so
E‖δ‖₂ ≤ √E‖δ‖₂² < ε√d = ‖δ_FGSM‖₂ for every α < 2ε: the random step's main
effect is a *smaller* perturbation than FGSM's. This script tabulates the
closed form (metrics.lemma1_fgsm_rs_norm_bound) against Monte Carlo estimates of
E‖δ‖₂ and √E‖δ‖₂² (metrics.lemma1_monte_carlo) on a grid of α/ε at d = 3072
(CIFAR-10), all in units of ε√d, and adds FGSM with step α (‖δ‖₂ = min(α, ε)√d).

Optionally (--real-images n > 0) it also measures ‖δ‖₂ on real CIFAR-10 test
images with x + δ projected onto the box [0, 1] as in Wong et al.'s code (the
lemma ignores the box), with gradient signs set at random.

  python experiments/lemma1.py            # CPU, ~1 min
  python experiments/lemma1.py --full     # 100k samples per α, finer grid

Writes experiments/results/lemma1.json and lemma1.png.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

import _common


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  _common.add_common_args(parser, full_help="100k Monte Carlo samples, α/ε step 0.05")
  parser.add_argument("--eps", type=float, default=8.0, help="ε in /255")
  parser.add_argument("--dim", type=int, default=3072, help="input dimension d")
  parser.add_argument("--samples", type=int, default=None,
                      help="Monte Carlo samples per α (default 2000; --full 100000)")
  parser.add_argument("--real-images", type=int, default=512,
                      help="also measure on this many real CIFAR-10 test images with "
                           "box projection (0: skip)")
  args = parser.parse_args(argv)
  samples = args.samples or (100_000 if args.full else 2000)
  step = 0.05 if args.full else 0.125
  ratios = np.round(np.arange(0.0, 2.5 + 1e-9, step), 4)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  from fastadv_jax import metrics  # pylint: disable=g-import-not-at-top

  rec = _common.Record("lemma1", args)
  eps = args.eps / 255.0
  d = args.dim
  unit = eps * math.sqrt(d)
  key = jax.random.PRNGKey(args.seed)
  chunk = min(samples, 2000)  # bounds memory: chunk x d floats
  mc = jax.jit(lambda k, a: metrics.lemma1_monte_carlo(k, eps=eps, alpha=a, dim=d,
                                                       num_samples=chunk),
               static_argnums=())

  rows = []
  for i, r in enumerate(tqdm(ratios, desc="α/ε grid", disable=args.no_progress)):
    alpha = float(r) * eps
    closed = metrics.lemma1_fgsm_rs_norm_bound(eps, alpha, d)
    means, sqs = [], []
    for c in range(max(1, samples // chunk)):
      m, rms = mc(jax.random.fold_in(jax.random.fold_in(key, i), c), jnp.float32(alpha))
      means.append(float(m))
      sqs.append(float(rms) ** 2)
    rows.append({
        "alpha_over_eps": float(r),
        "closed_form_sqrt_E_sq": closed / unit,
        "mc_E_norm": float(np.mean(means)) / unit,
        "mc_sqrt_E_sq": math.sqrt(float(np.mean(sqs))) / unit,
        "fgsm_same_step": min(float(r), 1.0),
        "rel_error_mc_vs_closed": abs(math.sqrt(float(np.mean(sqs))) - closed) / closed
                                  if closed else 0.0,
    })

  real = None
  if args.real_images > 0:
    x, _, idx = _common.random_test_points(args.real_images, args.seed)
    x = jnp.asarray(x)

    @jax.jit
    def box_norms(k, a):
      k1, k2 = jax.random.split(k)
      eta = jax.random.uniform(k1, x.shape, jnp.float32, -eps, eps)
      eta = jnp.clip(x + eta, 0.0, 1.0) - x           # Wong et al. clip x + η to the box
      sign = jnp.where(jax.random.bernoulli(k2, 0.5, x.shape), 1.0, -1.0)
      delta = jnp.clip(eta + a * sign, -eps, eps)
      delta = jnp.clip(x + delta, 0.0, 1.0) - x       # and x + δ
      return jnp.sqrt(jnp.sum(delta.reshape(len(x), -1) ** 2, axis=1))

    @jax.jit
    def fgsm_box_norms(k, a):
      sign = jnp.where(jax.random.bernoulli(k, 0.5, x.shape), 1.0, -1.0)
      delta = jnp.clip(x + jnp.clip(a * sign, -eps, eps), 0.0, 1.0) - x
      return jnp.sqrt(jnp.sum(delta.reshape(len(x), -1) ** 2, axis=1))

    real = {"n": int(len(x)), "selection": "random test points, seed %d" % args.seed,
            "rows": []}
    for i, r in enumerate(tqdm(ratios, desc="real images", disable=args.no_progress)):
      k = jax.random.fold_in(jax.random.PRNGKey(args.seed + 1), i)
      n_rs = box_norms(k, jnp.float32(r * eps))
      n_fgsm = fgsm_box_norms(k, jnp.float32(r * eps))
      real["rows"].append({"alpha_over_eps": float(r),
                           "fgsm_rs_E_norm": float(jnp.mean(n_rs)) / unit,
                           "fgsm_E_norm": float(jnp.mean(n_fgsm)) / unit})

  at = {r["alpha_over_eps"]: r for r in rows}
  key_points = {
      "fgsm_rs_alpha_1.25eps_sqrt_E_sq_over_eps_sqrt_d": metrics.lemma1_fgsm_rs_norm_bound(
          eps, 1.25 * eps, d) / unit,
      "fgsm_rs_alpha_1.25eps_mc_E_norm_over_eps_sqrt_d": at.get(1.25, {}).get("mc_E_norm"),
      "fgsm_rs_alpha_1.0eps_sqrt_E_sq_over_eps_sqrt_d": metrics.lemma1_fgsm_rs_norm_bound(
          eps, eps, d) / unit,
      "max_rel_error_mc_vs_closed": max(r["rel_error_mc_vs_closed"] for r in rows),
  }
  rec["setting"] = {"eps_255": args.eps, "eps": eps, "dim": d, "eps_sqrt_d": unit,
                    "mc_samples_per_alpha": max(1, samples // chunk) * chunk,
                    "seed": args.seed, "eta": "U[-eps, eps]^d, not box-clipped (Lemma 1)",
                    "units": "every norm divided by eps*sqrt(d) = ||delta_FGSM||_2 at alpha=eps"}
  rec["rows"] = rows
  rec["key_points"] = key_points
  rec["real_images_box_projected"] = real

  plt = _common.pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  rs = [r["alpha_over_eps"] for r in rows]
  ax.plot(rs, [r["closed_form_sqrt_E_sq"] for r in rows], "k-", lw=2,
          label=r"closed form $\sqrt{E\|\delta\|_2^2}$ (Lemma 1)")
  ax.plot(rs, [r["mc_sqrt_E_sq"] for r in rows], "o", mfc="none", color="C0",
          label=r"Monte Carlo $\sqrt{E\|\delta\|_2^2}$")
  ax.plot(rs, [r["mc_E_norm"] for r in rows], "x", color="C1",
          label=r"Monte Carlo $E\|\delta\|_2$")
  ax.plot(rs, [r["fgsm_same_step"] for r in rows], "--", color="C2",
          label=r"FGSM with step $\alpha$: $\min(\alpha,\epsilon)\sqrt{d}$")
  if real:
    ax.plot(rs, [r["fgsm_rs_E_norm"] for r in real["rows"]], ":", color="C3",
            label=f"FGSM-RS, real images, box-projected (n={real['n']})")
  ax.axvline(1.25, color="gray", lw=0.8, ls="--")
  ax.text(1.27, 0.45, r"Wong et al. $\alpha=1.25\epsilon$", color="gray", fontsize=8)
  ax.set(xlabel=r"$\alpha/\epsilon$", ylabel=r"$\ell_2$ norm / $(\epsilon\sqrt{d})$",
         title=f"Lemma 1: FGSM-RS perturbation norm (d={d}, ε={args.eps:g}/255)",
         ylim=(0, 1.08))
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  fig.savefig(rec.path("png"), dpi=120)

  table = _common.fmt_table(
      ["α/ε", "closed √E‖δ‖²", "MC √E‖δ‖²", "MC E‖δ‖", "FGSM(α)"],
      [[f"{r['alpha_over_eps']:.3g}", f"{r['closed_form_sqrt_E_sq']:.4f}",
        f"{r['mc_sqrt_E_sq']:.4f}", f"{r['mc_E_norm']:.4f}", f"{r['fgsm_same_step']:.3f}"]
       for r in rows if (r["alpha_over_eps"] * 4) % 1 == 0])
  print(table)
  print({k: round(v, 4) if isinstance(v, float) else v for k, v in key_points.items()})
  rec["table_markdown"] = table
  rec.save()


if __name__ == "__main__":
  main()

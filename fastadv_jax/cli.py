"""Thin command-line entry points: fastadv-train, fastadv-eval, fastadv-plot.

  fastadv-train --config configs/cifar10.py:gradalign --workdir DIR [--config.eps=16]
  fastadv-eval --workdir DIR [--checkpoint best|last] [--attack pgd|autoattack] [--n 1000] [--seed 0]
  fastadv-plot --workdir DIR

JAX's persistent compilation cache is on (FASTADV_JAX_CACHE or
~/.cache/fastadv_jax/jax_cache), so a second run of the same config starts fast.
"""

from __future__ import annotations

import os
import sys


def _enable_compilation_cache() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  cache = os.environ.get("FASTADV_JAX_CACHE",
                         os.path.join(os.path.expanduser("~"), ".cache", "fastadv_jax"))
  jax.config.update("jax_compilation_cache_dir", os.path.join(cache, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _maybe_initialize_distributed(enabled: bool) -> None:
  """Multi-host pods: every host runs the same command with --multihost."""
  if enabled:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()


def train_main(argv=None) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
  flags.DEFINE_integer("max_steps", None, "Stop after this many steps (a budget).")
  flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")
  flags.DEFINE_bool("progress", True, "Show progress bars.")
  config_flags.DEFINE_config_file(
      "config", None, "Training config, e.g. configs/cifar10.py:gradalign.",
      lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    del argv
    import json  # pylint: disable=g-import-not-at-top
    from absl import logging  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    _enable_compilation_cache()
    _maybe_initialize_distributed(flags.FLAGS.multihost)
    from fastadv_jax import train  # pylint: disable=g-import-not-at-top
    summary = train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir,
                                       max_steps=flags.FLAGS.max_steps,
                                       progress=flags.FLAGS.progress)
    print(json.dumps({k: summary[k] for k in ("step", "last_eval", "co_events",
                                              "stopped_early")}, indent=2, default=str))
    if "final_eval" in summary:
      for which, rec in summary["final_eval"].items():
        print(f"final {which}: clean {rec['clean_acc']:.4f} (n={rec['n_clean']}), "
              f"PGD-{rec['attack']['steps']}-{rec['attack']['restarts']} "
              f"{rec['robust_acc']:.4f} (n={rec['n_robust']})")

  app.run(main, argv=argv or sys.argv)


def eval_main(argv=None) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("workdir", None, "Work directory of a fastadv-train run.")
  flags.DEFINE_enum("checkpoint", "best", ["best", "last", "swa"],
                    "Which state to evaluate (swa: runs with config.swa).")
  flags.DEFINE_string("attack", "pgd", "pgd or autoattack.")
  flags.DEFINE_integer("n", 1000, "Robust accuracy on n test points.")
  flags.DEFINE_integer("seed", 0, "Seed for the point selection and the attacks.")
  flags.DEFINE_integer("steps", 50, "PGD steps.")
  flags.DEFINE_integer("restarts", 10, "PGD restarts.")
  flags.DEFINE_enum("rule", "strict", ["strict", "max_loss"], "PGD restart rule.")
  flags.DEFINE_integer("batch_size", 500, "Evaluation batch size.")
  flags.DEFINE_float("eps", None, "Override ε (in /255); default: the run's config.")
  flags.mark_flags_as_required(["workdir"])

  def main(argv):
    del argv
    import json  # pylint: disable=g-import-not-at-top
    _enable_compilation_cache()
    from fastadv_jax import evaluate  # pylint: disable=g-import-not-at-top
    f = flags.FLAGS
    record = evaluate.evaluate_workdir(
        f.workdir, checkpoint=f.checkpoint, attack=f.attack, n=f.n, seed=f.seed,
        eps=None if f.eps is None else f.eps / 255.0, batch_size=f.batch_size,
        steps=f.steps, restarts=f.restarts, rule=f.rule)
    print(json.dumps(record, indent=2, default=str))

  app.run(main, argv=argv or sys.argv)


def plot_main(argv=None) -> None:
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Work directory of a fastadv-train run.")
  flags.mark_flags_as_required(["workdir"])

  def main(argv):
    del argv
    from fastadv_jax import plotting  # pylint: disable=g-import-not-at-top
    print(plotting.plot_training_curves(flags.FLAGS.workdir))

  app.run(main, argv=argv or sys.argv)

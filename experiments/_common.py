"""Shared helpers for the experiment scripts: result records, data, configs, plots.

Every script writes `experiments/results/<name>.json` (the measured numbers, n,
seeds, the machine, library versions, wall time and the command line) and,
where a picture says more, `<name>.png`. GPU-scale runs (`--full`) write
`<name>_full.json` / `.png` so they do not overwrite the committed CPU results.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import shlex
import sys
import time
from typing import Any

import numpy as np

EXPERIMENTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(EXPERIMENTS_DIR)
sys.path.insert(0, REPO_DIR)  # this checkout's fastadv_jax, installed or not
RESULTS_DIR = os.path.join(EXPERIMENTS_DIR, "results")
SCRATCH_DIR = os.environ.get("FASTADV_EXPERIMENTS_SCRATCH", "/tmp/fastadv_experiments")


def add_common_args(parser, *, full_help: str) -> None:
  """--full, --seed, --out-dir: the flags every script shares."""
  parser.add_argument("--full", action="store_true", help=full_help)
  parser.add_argument("--seed", type=int, default=0, help="base random seed")
  parser.add_argument("--out-dir", default=RESULTS_DIR,
                      help="where <name>.json and <name>.png go (default: %(default)s)")
  parser.add_argument("--no-progress", action="store_true", help="hide tqdm bars")


def result_name(name: str, args) -> str:
  return f"{name}_full" if getattr(args, "full", False) else name


def machine_info() -> dict[str, Any]:
  """The machine the numbers were measured on (host and JAX devices)."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return {
      "host": platform.node(),
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "jax_backend": jax.default_backend(),
      "jax_devices": [str(d) for d in devices],
      "device_kind": devices[0].device_kind,
  }


def versions() -> dict[str, str | None]:
  out = {}
  for name in ("fastadv_jax", "jax", "jaxlib", "flax", "optax", "numpy"):
    try:
      out[name] = __import__(name).__version__
    except (ImportError, AttributeError):
      out[name] = None
  return out


class Record:
  """Collects a script's results and writes them, with provenance, as JSON."""

  def __init__(self, name: str, args):
    self.name = result_name(name, args)
    self.args = args
    self.t0 = time.time()
    self.data: dict[str, Any] = {
        "experiment": self.name,
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "args": {k: v for k, v in vars(args).items()},
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
    }
    os.makedirs(args.out_dir, exist_ok=True)

  def path(self, ext: str) -> str:
    return os.path.join(self.args.out_dir, f"{self.name}.{ext}")

  def __setitem__(self, key, value):
    self.data[key] = value

  def __getitem__(self, key):
    return self.data[key]

  def save(self) -> str:
    self.data["machine"] = machine_info()
    self.data["versions"] = versions()
    self.data["wall_time_s"] = round(time.time() - self.t0, 2)
    path = self.path("json")
    with open(path, "w") as f:
      json.dump(self.data, f, indent=2, default=_jsonable)
      f.write("\n")
    print(f"wrote {path} ({self.data['wall_time_s']:.0f} s)")
    return path


def _jsonable(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if hasattr(value, "__array__"):
    return np.asarray(value).tolist()
  raise TypeError(f"not JSON-able: {type(value).__name__}")


def pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def load_cifar10_config(variant: str):
  """configs/cifar10.py:<variant>, loaded by path (configs/ is not a package)."""
  path = os.path.join(REPO_DIR, "configs", "cifar10.py")
  spec = importlib.util.spec_from_file_location("fastadv_configs_cifar10", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def random_test_points(n: int, seed: int, *, progress: bool = False):
  """n CIFAR-10 test images (float32 in [0,1]) and labels, chosen at random.

  The indices are `evaluate.select_indices(10000, n, "random", seed)` into the
  library's test split, whose order is fixed; the selection is recorded.
  Returns (images, labels, indices).
  """
  from fastadv_jax import data  # pylint: disable=g-import-not-at-top
  from fastadv_jax import evaluate  # pylint: disable=g-import-not-at-top
  images, labels = data.load_split("cifar10", "test", progress=progress)
  idx = evaluate.select_indices(len(images), n, "random", seed)
  return images[idx].astype(np.float32) / 255.0, labels[idx].astype(np.int32), idx


def shuffled_cifar10_npz(train_n: int, test_n: int, seed: int) -> str:
  """A CIFAR-10 .npz with a random train subset and a random test subset.

  `config.data.train_subset` and the training loop's evaluation subset take the
  *first* examples of the library's (fixed) order; a shuffled .npz passed as
  `data.local_path` makes the subsets a seeded random draw that does not depend
  on the loader's order. 0 means the whole split (shuffled). Returns the path
  (cached under SCRATCH_DIR).
  """
  from fastadv_jax import data  # pylint: disable=g-import-not-at-top
  os.makedirs(SCRATCH_DIR, exist_ok=True)
  path = os.path.join(SCRATCH_DIR, f"cifar10_shuffled_tr{train_n}_te{test_n}_s{seed}.npz")
  if os.path.exists(path):
    return path
  out = {}
  for split, n in (("train", train_n), ("test", test_n)):
    images, labels = data.load_split("cifar10", split, progress=False)
    order = np.random.default_rng([seed, 0 if split == "train" else 1]).permutation(
        len(images))
    if n:
      order = order[:n]
    out[f"x_{split}"], out[f"y_{split}"] = images[order], labels[order]
  tmp = path + ".tmp.npz"
  np.savez(tmp, **out)
  os.replace(tmp, path)
  return path


def fmt_table(headers, rows) -> str:
  """A GitHub-markdown table."""
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for r in rows:
    lines.append("| " + " | ".join(str(c) for c in r) + " |")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Reading a run's evaluation records: named evaluations and old logs.
#
# Runs since named evaluations (config.evals) log "<name>/clean_acc",
# "<name>/fgsm_acc" (ROBUST: correct at x and at x + δ_FGSM),
# "<name>/fgsm_point_acc" (correct at x + δ_FGSM whatever the clean prediction:
# the catastrophic-overfitting signature), "<name>/pgd_acc", ... and keep
# summary["last_eval"] = {name: {"<name>/clean_acc": ..., ...}}. Older runs
# (and the logs committed under results/) logged "eval/..." and kept
# summary["last_eval"] = {"eval/clean_acc": ...}; their "eval/fgsm_acc" was the
# accuracy at the FGSM point. The helpers below return unprefixed metrics in
# the new meaning: "fgsm_point_acc" whenever either spelling logged it,
# "fgsm_acc" (robust) only where the run computed it.

LEGACY_EVAL_PREFIX = "eval"


def _unprefixed(record: dict, prefix: str) -> dict:
  metrics = {k[len(prefix) + 1:]: v for k, v in record.items()
             if k.startswith(prefix + "/")}
  if prefix == LEGACY_EVAL_PREFIX and "fgsm_point_acc" not in metrics:
    if "fgsm_acc" in metrics:  # the old "FGSM accuracy" was the accuracy at the FGSM point
      metrics["fgsm_point_acc"] = metrics.pop("fgsm_acc")
  return metrics


def eval_prefix(records, eval_name: str = "test") -> str:
  """The prefix under which `records` (metrics.jsonl lines) logged `eval_name`:
  `eval_name` itself, or "eval" for runs from before named evaluations."""
  if any(f"{eval_name}/pgd_acc" in r for r in records):
    return eval_name
  if any(f"{LEGACY_EVAL_PREFIX}/pgd_acc" in r for r in records):
    return LEGACY_EVAL_PREFIX
  return eval_name


def eval_curve(records, eval_name: str = "test") -> list[dict]:
  """The evaluation records of one named evaluation, oldest first.

  Each is {"step", "epoch", <metric>: value, ...} with unprefixed metric names
  in the current meaning (see above); old "eval/" logs are read too.
  """
  prefix = eval_prefix(records, eval_name)
  return [{"step": r["step"], "epoch": r.get("epoch"), **_unprefixed(r, prefix)}
          for r in records if f"{prefix}/pgd_acc" in r]


def last_eval(summary: dict, eval_name: str = "test") -> dict:
  """summary["last_eval"] of a run, unprefixed, for `eval_name` ({} if none).

  Reads both {name: {"<name>/...": ...}} (named evaluations) and the old flat
  {"eval/...": ...}.
  """
  le = summary.get("last_eval") or {}
  if isinstance(le.get(eval_name), dict):
    return _unprefixed(le[eval_name], eval_name)
  return _unprefixed(le, LEGACY_EVAL_PREFIX)


def monitored_eval_name(config) -> str:
  """The evaluation the run's catastrophic-overfitting monitor read ("test" by
  default; configs from before named evaluations had only one)."""
  try:
    return str(config.co_monitor.eval)
  except (AttributeError, KeyError):
    return "test"


def eval_settings(config, eval_name: str = "test") -> dict:
  """n, selection and seed of a run's evaluation `eval_name`, from its config
  (config.evals.<name>; old configs: config.eval, the first eval.n points)."""
  if "evals" in config and eval_name in config.evals:
    e = config.evals[eval_name]
    return {"name": eval_name, "split": e.get("split", "test"), "n": int(e.n),
            "selection": e.get("selection", "first"), "seed": int(e.get("seed", 0))}
  if "eval" in config:
    return {"name": LEGACY_EVAL_PREFIX, "split": "test", "n": int(config.eval.n),
            "selection": "first", "seed": 0}
  raise KeyError(f"The config has no evaluation {eval_name!r}.")

"""Thin command-line entry points: fastadv-train, fastadv-eval, fastadv-plot.

  fastadv-train --config configs/cifar10.py:gradalign --workdir DIR [--config.eps=16]
  fastadv-eval --workdir DIR [--checkpoint best|last|swa] [--attack pgd|autoattack]
               [--n 1000] [--selection first|random] [--seed 0]
  fastadv-plot --workdir DIR

Every command:
* `--help` lists its own flags (and, for fastadv-train, the config variants
  and how to override settings) and exits 0; `--helpfull` adds absl's flags;
* bad usage (an unknown variant, a bad setting, an unusable workdir, a
  workdir in use) prints one line naming the problem and exits 2; the
  traceback is printed with `--verbosity=1` or FASTADV_JAX_TRACEBACK=1;
* library logs (JAX, orbax, TFDS) are quiet unless `--verbosity` is given.

JAX's persistent compilation cache is on (FASTADV_JAX_CACHE or
~/.cache/fastadv_jax/jax_cache), so a second run of the same config starts fast.
"""

from __future__ import annotations

import difflib
import glob
import logging as py_logging
import os
import re
import sys
import traceback

EXIT_USAGE = 2
_REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "configs")


class UsageError(ValueError):
  """Bad command-line usage detected by the CLI itself."""


def _enable_compilation_cache() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  cache = os.environ.get("FASTADV_JAX_CACHE",
                         os.path.join(os.path.expanduser("~"), ".cache", "fastadv_jax"))
  jax.config.update("jax_compilation_cache_dir", os.path.join(cache, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise UsageError(f"${name}={value!r} is not an integer.") from None


def _initialize_distributed(coordinator: str | None, num_processes: int | None,
                            process_id: int | None, heartbeat_timeout: int) -> None:
  """Joins JAX's multi-controller runtime (every process runs the same command).

  Flags first, then $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES,
  $JAX_PROCESS_ID (what `python -m fastadv_jax.launch` sets); left unset, JAX
  detects SLURM (srun) and Cloud TPU pods itself.
  """
  import jax  # pylint: disable=g-import-not-at-top
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  if num_processes is not None and num_processes < 1:
    raise UsageError(f"--num_processes={num_processes} must be >= 1.")
  if process_id is not None and num_processes is not None and not (
      0 <= process_id < num_processes):
    raise UsageError(f"--process_id={process_id} must lie in [0, {num_processes - 1}].")
  jax.distributed.initialize(
      coordinator_address=coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None,
      num_processes=num_processes, process_id=process_id,
      heartbeat_timeout_seconds=heartbeat_timeout)


def _verbose(argv) -> bool:
  return (os.environ.get("FASTADV_JAX_TRACEBACK", "") not in ("", "0") or
          any(a.startswith(("--verbosity", "-v=")) for a in argv))


def _quiet_libraries(argv) -> None:
  """Library INFO logs (orbax saves, 'Unable to initialize backend', TFDS) off."""
  if any(a.startswith("--verbosity") for a in argv):
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)
  for name in ("jax", "jax._src.xla_bridge", "orbax", "absl", "tensorflow",
               "tensorflow_datasets"):
    py_logging.getLogger(name).setLevel(py_logging.ERROR)


def config_variants(config_file: str | None = None) -> dict[str, tuple[str, ...]]:
  """{config file: its VARIANTS} for one file, or for every file in configs/."""
  from fastadv_jax import config_base  # pylint: disable=g-import-not-at-top
  if config_file:
    files = [config_file.split(":")[0]]
  else:
    here = os.path.join(os.getcwd(), "configs")
    directory = here if os.path.isdir(here) else _REPO_CONFIGS
    files = sorted(glob.glob(os.path.join(directory, "*.py")))
  out = {}
  for path in files:
    try:
      out[os.path.relpath(path)] = tuple(config_base.load_config_file(path).VARIANTS)
    except Exception:  # pylint: disable=broad-except
      continue
  return out


def _config_argument(argv) -> str | None:
  """The value of --config in `argv` (`--config=F` or `--config F`), else None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _help_text(prog: str, summary: str, argv, examples: list[str],
               with_variants: bool) -> str:
  from absl import flags  # pylint: disable=g-import-not-at-top
  lines = [f"usage: {prog} [flags]", "", summary, "", "flags:"]
  for flag in flags.FLAGS.get_flags_for_module(__name__):
    default = "" if flag.default is None else f" (default: {flag.default!r})"
    required = " (required)" if flag.name in ("workdir", "config") else ""
    lines.append(f"  --{flag.name}: {flag.help}{default}{required}")
  if with_variants:
    chosen = _config_argument(argv)
    lines += ["", "config variants (--config FILE:VARIANT):"]
    for path, variants in config_variants(chosen).items():
      lines.append(f"  {path}: {', '.join(variants)}")
    lines += ["", "Any config setting can be overridden with --config.<name>=<value>."]
  lines += ["", "examples:"] + [f"  {e}" for e in examples]
  lines += ["", "--helpfull lists absl's flags as well."]
  return "\n".join(lines)


def _unknown_config_field(args: list[str]) -> ValueError | None:
  """The `--config.a.b=...` override naming a field the config does not have,
  as an error listing the fields there (ml_collections says only the key)."""
  try:
    import ml_collections  # pylint: disable=g-import-not-at-top
    from fastadv_jax import config_base  # pylint: disable=g-import-not-at-top
    spec = next(a.split("=", 1)[1] if a.startswith("--config=") else args[i + 1]
                for i, a in enumerate(args) if a.startswith("--config=") or a == "--config")
    path, sep, variant = spec.rpartition(":")
    module = config_base.load_config_file(path if sep else spec)
    config = module.get_config(variant) if sep else module.get_config()
    for arg in args:
      if not arg.startswith("--config."):
        continue
      dotted = arg[len("--config."):].split("=", 1)[0]
      node, parts = config, dotted.split(".")
      for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "the config"
        if not isinstance(node, ml_collections.ConfigDict):
          return ValueError(f"--config.{dotted}: {where} is a value "
                            f"({node!r}), not a section with fields.")
        if part not in node:
          close = difflib.get_close_matches(part, list(node.keys()), n=1)
          hint = f" Did you mean {close[0]!r}?" if close else ""
          return ValueError(
              f"--config.{dotted}: {where} has no field {part!r}.{hint} Its fields: "
              f"{', '.join(sorted(node.keys())) or '(none)'}.")
        node = node[part]
  except Exception:  # pylint: disable=broad-except
    return None  # fall back to ml_collections' own message
  return None


def _config_file_error(error: BaseException) -> BaseException:
  """The cause, in one sentence, of ml_collections' errors loading a config file.

  ml_collections reports a missing file as "Failed loading config file ..." with
  the paths it attempted, and an error raised by `get_config` (an unknown
  variant) as "Error whilst parsing config file:" followed by the traceback.
  """
  message = str(error)
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  if "Failed loading config file" in message:
    return UsageError(f"--config: {lines[-1]}")
  if "Error whilst parsing config file" in message:
    # The traceback's last line is "ExceptionType: message".
    return UsageError(lines[-1].split(": ", 1)[-1])
  return error


_PARSE_ERRORS = (ValueError, AttributeError, KeyError, OSError)


def _parse_error(error: BaseException, args: list[str]) -> BaseException:
  """The error to print, in one line, for a command line absl or ml_collections refused.

  absl wraps the cause (a config file's error, a value that does not parse) in
  a flags.Error; the cause is shown where it says more, otherwise absl's own
  message, which names the flag and the value (the cause of `--n=abc`, "invalid
  literal for int() with base 10: 'abc'", names neither the flag nor the type).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  cause = error
  if isinstance(error, flags.Error):
    inner = error.__cause__ or error.__context__
    if isinstance(inner, _PARSE_ERRORS):
      cause = inner
  if isinstance(cause, (KeyError, AttributeError)):  # a config field that is not there
    return _unknown_config_field(args) or cause
  described = _config_file_error(cause)
  if described is not cause or cause is error:
    return described
  if isinstance(error, flags.IllegalFlagValueError):
    message = str(error).removeprefix("flag ")
    # absl's bool parser says ('Non-boolean argument to boolean flag', 'maybe').
    message = re.sub(r"\('Non-boolean argument to boolean flag', '.*'\)",
                     "expected true or false", message)
    return UsageError(message)
  return cause


def _run(prog: str, summary: str, main, argv, examples: list[str],
         with_variants: bool = False) -> None:
  """Parses flags and runs `main`, with the help and error behaviour above."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  argv = list(argv or sys.argv)
  args = argv[1:]
  if any(a in ("--help", "-h", "--helpshort", "-?") for a in args):
    print(_help_text(prog, summary, args, examples, with_variants))
    sys.exit(0)
  verbose = _verbose(args)

  def fail(error: BaseException, code: int) -> None:
    if verbose:
      traceback.print_exception(error)
    message = str(error).strip().replace("\n", " ")
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(code)

  def parse(argv):
    try:
      parsed = flags.FLAGS(argv)
      if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
        # ml_collections defers a config file's load error to the first access.
        getattr(flags.FLAGS.config, "keys")
      return parsed
    except (flags.Error, *_PARSE_ERRORS) as e:
      fail(_parse_error(e, args), EXIT_USAGE)

  def guarded(argv):
    _quiet_libraries(args)
    from fastadv_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    try:
      main(argv)
    except (ValueError, FileNotFoundError, workdir_lib.WorkdirLockedError) as e:
      fail(e, EXIT_USAGE)
    except FloatingPointError as e:
      fail(e, 1)

  app.run(guarded, argv=argv, flags_parser=parse)


# --------------------------------------------------------------------------
# fastadv-train


def train_main(argv=None) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots "
                      "(re-run the same command to resume).")
  flags.DEFINE_integer("max_steps", None, "Stop after this many steps (a budget).")
  flags.DEFINE_bool("multihost", False, "Join JAX's multi-process runtime first (every "
                    "process runs the same command; see README, Multi-host).")
  flags.DEFINE_string("coordinator_address", None, "With --multihost: host:port of process "
                      "0 (default: $JAX_COORDINATOR_ADDRESS, or detected on SLURM/TPU).")
  flags.DEFINE_integer("num_processes", None, "With --multihost: number of processes "
                       "(default: $JAX_NUM_PROCESSES, or detected).")
  flags.DEFINE_integer("process_id", None, "With --multihost: this process's index "
                       "(default: $JAX_PROCESS_ID, or detected).")
  flags.DEFINE_integer("heartbeat_timeout", 100, "With --multihost: seconds after which "
                       "the others stop when a process stopped responding.")
  flags.DEFINE_bool("progress", True, "Show progress bars.")
  config_flags.DEFINE_config_file(
      "config", None, "Training config FILE:VARIANT, e.g. configs/cifar10.py:gradalign.",
      lock_config=True)

  def main(argv):
    del argv
    import json  # pylint: disable=g-import-not-at-top
    f = flags.FLAGS
    for name in ("config", "workdir"):
      if f[name].value is None:
        raise UsageError(f"--{name} is required (see --help).")
    _enable_compilation_cache()
    if f.multihost:
      _initialize_distributed(f.coordinator_address, f.num_processes, f.process_id,
                              f.heartbeat_timeout)
    from fastadv_jax import train  # pylint: disable=g-import-not-at-top
    summary = train.train_and_evaluate(f.config, f.workdir, max_steps=f.max_steps,
                                       progress=f.progress)
    print(json.dumps({k: summary[k] for k in ("step", "last_eval", "co_events",
                                              "stopped_early")}, indent=2, default=str))
    for which, rec in summary.get("final_eval", {}).items():
      print(f"final {which}: clean {rec['clean_acc']:.4f} (n={rec['n_clean']}), "
            f"PGD-{rec['attack']['steps']}-{rec['attack']['restarts']} "
            f"{rec['robust_acc']:.4f} (n={rec['n_robust']})")

  _run("fastadv-train", "Adversarial training of a config variant, resumable.", main, argv,
       ["fastadv-train --config configs/cifar10.py:cnn_fgsm --workdir runs/cnn_fgsm",
        "fastadv-train --config configs/cifar10.py:gradalign --workdir runs/ga16 "
        "--config.eps=16 --config.regularizers.grad_align.weight=0.5"],
       with_variants=True)


# --------------------------------------------------------------------------
# fastadv-eval


def eval_main(argv=None) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("workdir", None, "Work directory of a fastadv-train run.")
  flags.DEFINE_enum("checkpoint", "best", ["best", "last", "swa"],
                    "Which state to evaluate (swa: runs with config.swa).")
  flags.DEFINE_enum("attack", "pgd", ["pgd", "autoattack"], "The attack.")
  flags.DEFINE_integer("n", 1000, "Robust accuracy on n test points.")
  flags.DEFINE_enum("selection", "first", ["first", "random"],
                    "The first n test points (as training's final evaluation) or n "
                    "random ones (seeded by --seed).")
  flags.DEFINE_integer("seed", 0, "Seed for the point selection and the attacks.")
  flags.DEFINE_integer("steps", 50, "PGD steps.")
  flags.DEFINE_integer("restarts", 10, "PGD restarts.")
  flags.DEFINE_enum("rule", "strict", ["strict", "max_loss"], "PGD restart rule.")
  flags.DEFINE_integer("batch_size", 500, "Evaluation batch size.")
  flags.DEFINE_float("eps", None, "Override ε in /255 units (e.g. 8), in (0, 255]; "
                     "default: the run's config.")
  flags.DEFINE_integer("num_devices", 0, "Local devices to evaluate on (0: all on an "
                       "accelerator, one on CPU); the result does not depend on it.")
  flags.DEFINE_bool("progress", True, "Show progress bars.")

  def main(argv):
    del argv
    import json  # pylint: disable=g-import-not-at-top
    f = flags.FLAGS
    if f.workdir is None:
      raise UsageError("--workdir is required (see --help).")
    if f.eps is not None and not 0 < f.eps <= 255:
      raise UsageError(f"--eps={f.eps} is outside (0, 255]: give ε in /255 units, "
                       f"e.g. --eps=8 for 8/255.")
    for name, minimum in (("n", 1), ("steps", 1), ("restarts", 1), ("batch_size", 1),
                          ("seed", 0), ("num_devices", 0)):
      if f[name].value < minimum:
        raise UsageError(f"--{name}={f[name].value} must be >= {minimum}.")
    _enable_compilation_cache()
    from fastadv_jax import evaluate  # pylint: disable=g-import-not-at-top
    record = evaluate.evaluate_workdir(
        f.workdir, checkpoint=f.checkpoint, attack=f.attack, n=f.n, seed=f.seed,
        eps=None if f.eps is None else f.eps / 255.0, batch_size=f.batch_size,
        steps=f.steps, restarts=f.restarts, rule=f.rule, selection=f.selection,
        num_devices=f.num_devices or None, progress=f.progress)
    print(json.dumps(record, indent=2, default=str))

  _run("fastadv-eval", "Robust accuracy (PGD-k-r or AutoAttack) of a trained run.", main,
       argv, ["fastadv-eval --workdir runs/cnn_fgsm --checkpoint best --n 1000",
              "fastadv-eval --workdir runs/cnn_fgsm --attack autoattack --n 200"])


# --------------------------------------------------------------------------
# fastadv-plot


def plot_main(argv=None) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("workdir", None, "Work directory of a fastadv-train run.")

  def main(argv):
    del argv
    if flags.FLAGS.workdir is None:
      raise UsageError("--workdir is required (see --help).")
    from fastadv_jax import plotting  # pylint: disable=g-import-not-at-top
    for path in plotting.plot_run(flags.FLAGS.workdir):
      print(path)

  _run("fastadv-plot", "Training curves (training_curves.png) of a run, and the single-layer CNN's "
       "per-filter norms (filter_norms.png) where logged.", main, argv,
       ["fastadv-plot --workdir runs/cnn_fgsm"])

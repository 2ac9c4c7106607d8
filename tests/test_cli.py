"""The command lines' own help: flags, config variants, examples, exit code 0.

Each command runs in its own process, as a user starts it (absl flags are
process-global).
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(main, *args):
  """`<command> *args` in its own process; `main` names its entry point."""
  return subprocess.run(
      [sys.executable, "-c", f"from fastadv_jax.cli import {main}; {main}()", *args],
      capture_output=True, text=True, timeout=120)


def _help(main, *args):
  """(exit code, stdout) of `<command> *args --help`."""
  res = _command(main, *args, "--help")
  return res.returncode, res.stdout


@pytest.mark.parametrize("main,prog,own_flags", [
    ("train_main", "fastadv-train", ["--workdir", "--config", "--max_steps", "--progress"]),
    ("eval_main", "fastadv-eval", ["--workdir", "--checkpoint", "--attack", "--selection",
                                     "--n", "--eps", "--num_devices"]),
    ("plot_main", "fastadv-plot", ["--workdir"]),
])
def test_help_lists_own_flags_and_examples(main, prog, own_flags):
  code, out = _help(main)
  assert code == 0
  assert out.startswith(f"usage: {prog} [flags]")
  for flag in own_flags:
    assert f"  {flag}: " in out, flag
  assert "examples:" in out
  assert f"  {prog} --workdir" in out or f"  {prog} --config" in out
  assert "--logtostderr" not in out  # absl's own flags only under --helpfull


def test_train_help_lists_variants_of_every_config_file():
  code, out = _help("train_main")
  assert code == 0
  for name in ("cifar10", "cifar100", "svhn", "imagenet"):
    assert f"configs/{name}.py: " in out
  cifar10 = next(l for l in out.splitlines() if "configs/cifar10.py: " in l)
  assert {"cnn_fgsm", "gradalign", "advlc_swa", "free"} <= set(cifar10.split(": ")[1].split(", "))
  assert "--config.<name>=<value>" in out


@pytest.mark.parametrize("spelling", ["--config={path}", "--config={path}:gradalign"])
def test_train_help_with_a_config_lists_only_its_variants(spelling):
  path = os.path.join(REPO, "configs", "svhn.py")
  code, out = _help("train_main", spelling.format(path=path))
  assert code == 0
  assert "svhn.py: gradalign, fgsm_rs" in out and "cifar10.py: " not in out


def test_train_help_with_a_separate_config_argument():
  path = os.path.join(REPO, "configs", "svhn.py")
  code, out = _help("train_main", "--config", path)
  assert code == 0 and "svhn.py: gradalign" in out and "cifar10.py: " not in out


@pytest.mark.parametrize("main,args,message", [
    ("eval_main", ["--workdir=/nonexistent", "--n=abc"],
     "--n=abc: invalid literal for int() with base 10: 'abc'"),
    ("eval_main", ["--workdir=/nonexistent", "--attack=autoatack"],
     "--attack=autoatack: value should be one of <pgd|autoattack>"),
    ("train_main", ["--workdir=/nonexistent", "--progress=maybe"],
     "--progress=maybe: expected true or false"),
    ("train_main", ["--workdir=/nonexistent", f"--config={REPO}/configs/cifar10.py:cnn_fgsm",
                    "--config.batch_size=abc"],
     "--config.batch_size=abc: invalid literal for int() with base 10: 'abc'"),
])
def test_a_flag_value_that_does_not_parse_is_named_in_one_line(main, args, message):
  res = _command(main, *args)
  prog = {"eval_main": "fastadv-eval", "train_main": "fastadv-train"}[main]
  assert res.returncode == 2
  assert res.stderr.strip() == f"{prog}: error: {message}", res.stderr[-2000:]

"""Run state you can trust: fault injection, atomic checkpoints, checksums,
finite states, the workdir lock, torn logs, and re-running a finished run.

The end-to-end runs go through the CLI in subprocesses (`tests/fault_runner.py`
kills them at chosen points with SIGKILL) on a tiny local dataset.
"""

import hashlib
import json
import os
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from fastadv_jax import checkpoints
from fastadv_jax import config_base
from fastadv_jax import restore
from fastadv_jax import train
from fastadv_jax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "cifar10.py")
RUNNER = os.path.join(REPO, "tests", "fault_runner.py")
SHAPE, BATCH, N_TRAIN, N_TEST = (8, 8, 3), 8, 32, 16
EPOCHS = 3
TOTAL_STEPS = EPOCHS * N_TRAIN // BATCH


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
  rng = np.random.default_rng(1)
  def make(n):
    return (rng.integers(0, 100, (n,) + SHAPE).astype(np.uint8),
            rng.integers(0, 10, n).astype(np.int32))
  (x_tr, y_tr), (x_te, y_te) = make(N_TRAIN), make(N_TEST)
  path = tmp_path_factory.mktemp("data") / "tiny.npz"
  np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
  return str(path)


def flags(npz_path, workdir, extra=()):
  return [f"--config={CONFIG}:cnn_fgsm", f"--workdir={workdir}", "--progress=false",
          "--config.data.source=local", f"--config.data.local_path={npz_path}",
          "--config.model.kwargs.filters=2", f"--config.batch_size={BATCH}",
          f"--config.num_epochs={EPOCHS}", "--config.checkpoint_every_steps=1",
          "--config.evals.test.n=16", "--config.evals.test.pgd_steps=2",
          "--config.evals.test.batch_size=16", "--config.log_every_steps=2",
          "--config.evals.train_pgd.n=16", "--config.best.eval=test",
          "--config.keep_checkpoints=1", "--config.swa.enabled=True",
          "--config.final_eval.n=16", "--config.final_eval.steps=2",
          "--config.final_eval.restarts=1", "--config.final_eval.batch_size=16", *extra]


def env():
  e = dict(os.environ, JAX_PLATFORMS="cpu",
           XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return e


def train_cli(npz_path, workdir, fault=None, extra=(), check=True):
  if fault is None:
    cmd = [sys.executable, "-c", "from fastadv_jax.cli import train_main; train_main()"]
  else:
    cmd = [sys.executable, RUNNER, fault]
  res = subprocess.run(cmd + flags(npz_path, workdir, extra), env=env(),
                       capture_output=True, text=True, timeout=600)
  if check and res.returncode != 0:
    raise AssertionError(f"exit {res.returncode}\n{res.stderr[-3000:]}")
  return res


def records(workdir):
  return workdir_lib.read_records(os.path.join(workdir, "metrics.jsonl"))


def final_states(workdir):
  return {which: restore.restore_for_eval(str(workdir), which).variables
          for which in ("last", "best", "swa")}


def file_hashes(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope="module")
def reference(npz, tmp_path_factory):
  """An uninterrupted run (final evaluation included)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  res = train_cli(npz, workdir)
  (workdir.parent / "stdout.txt").write_text(res.stdout)
  return workdir


def test_each_evaluation_prints_one_console_line(reference):
  lines = (reference.parent / "stdout.txt").read_text().splitlines()
  evals = [l for l in lines if l.startswith("epoch ")]
  assert [l.split(" | ")[0] for l in evals] == ["epoch 1", "epoch 2", "epoch 3"]
  assert all("test: clean " in l and ", FGSM " in l and ", PGD-2 " in l and ", align " in l
             and l.endswith("monitor: ok") for l in evals), evals


def _tensorboard_scalars(directory):
  """{(tag, step): value} of every scalar in the TensorBoard event files under `directory`."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):  # TFRecord framing: length, its CRC, payload, its CRC
      length = int.from_bytes(data[pos:pos + 8], "little")
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars[(value.tag, event.step)] = value.simple_value
  return scalars


def test_tensorboard_events_hold_the_logged_scalars_and_torch_is_not_imported(reference, tmp_path):
  logged = {(k, r["step"]): v for r in records(reference) for k, v in r.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
  scalars = _tensorboard_scalars(reference / "tensorboard")
  assert logged and scalars.keys() == logged.keys()
  for key, value in logged.items():
    assert scalars[key] == pytest.approx(value, rel=1e-6), key
  # tensorboardX imports torch (installed with the test extras) when it can:
  # 1.6 s of every run's start, for nothing the writer uses.
  code = ("import sys; from fastadv_jax import workdir; "
          f"workdir.MetricWriter({str(tmp_path)!r}).write(1, {{'a': 1.0}}); "
          "print('torch' in sys.modules)")
  res = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True,
                       timeout=120)
  assert res.stdout.strip() == "False", res.stderr[-2000:]


# --------------------------------------------------------------------------
# Fault injection: SIGKILL at many points, resumed to the end each time.

# Kill points along one workdir's life, each counted from the start of its own
# process (tests/fault_runner.py). Most make at most one step of progress, so
# every one of them fires: fresh start (config.json, first save and its orbax
# renames, torn first record), a resume's log truncation, the best checkpoint
# written ahead of the last one and then atomically replaced (killed between
# the two renames of the swap), per-epoch evaluation records, the final step's
# replacement by the SWA state, and summary.json.
FAULTS = ["replace:1", "save:1", "rename:1", "rename:3", "log:1", "replace:2", "save:2",
          "rename:2", "save:2", "rename:3", "rename:4", "rename:5", "log:2", "save:3",
          "rename:6", "save:2", "log:1", "rename:6", "save:3", "log:2", "save:2",
          "rename:4", "rename:5", "replace:2", "replace:3"]


def test_sigkill_anywhere_then_resume_equals_uninterrupted(npz, reference, tmp_path):
  workdir = tmp_path / "run"
  for fault in FAULTS:
    res = train_cli(npz, workdir, fault=fault, check=False)
    assert res.returncode == -9, (fault, res.returncode, res.stderr[-3000:])
    # After every kill, what is on disk is consistent: every checkpoint loads.
    for directory in ("checkpoints", "best"):
      ckpt = checkpoints.Checkpointer(str(workdir / directory))
      for step in ckpt.all_steps():
        with warnings.catch_warnings():
          warnings.simplefilter("error", checkpoints.CheckpointCorruptWarning)
          assert ckpt.restore(None, step) is not None
  train_cli(npz, workdir)
  for which, variables in final_states(reference).items():
    resumed = final_states(workdir)[which]
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(resumed)):
      np.testing.assert_array_equal(a, b, err_msg=which)
  # The log is complete: the same records, each once, as the uninterrupted run.
  assert records(workdir) == records(reference)
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  assert summary["step"] == TOTAL_STEPS and set(summary["final_eval"]) == {"last", "best", "swa"}
  for which in ("last", "best", "swa"):
    with open(reference / "eval" / f"final_{which}_pgd2-1.json") as f:
      want = json.load(f)
    with open(workdir / "eval" / f"final_{which}_pgd2-1.json") as f:
      got = json.load(f)
    assert got["robust_acc"] == want["robust_acc"]
  # Killed after the final evaluation, before the summary: the records are reused.
  assert sorted(os.listdir(workdir / "eval")) == sorted(os.listdir(reference / "eval"))


def test_rerunning_a_finished_run_changes_nothing(npz, reference, tmp_path):
  workdir = tmp_path / "copy"
  import shutil
  shutil.copytree(reference, workdir)
  before = file_hashes(workdir)
  res = train_cli(npz, workdir)
  assert "completed run" in res.stdout
  assert file_hashes(workdir) == before


# --------------------------------------------------------------------------
# Checkpoints: atomic replacement, recovery, checksums, structure.


def _state(value):
  return {"params": {"w": np.full((3, 2), value, np.float32)}, "step": np.int32(3)}


def test_replacement_is_atomic_and_recovered(tmp_path, monkeypatch):
  ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), max_to_keep=1)
  ckpt.save(5, _state(1.0), {"v": 1})
  real_rename = os.rename
  calls = []

  def failing_rename(src, dst):
    calls.append((src, dst))
    if str(src).endswith(".replacement"):  # killed between the two renames of the swap
      raise KeyboardInterrupt
    return real_rename(src, dst)

  monkeypatch.setattr(os, "rename", failing_rename)
  with pytest.raises(KeyboardInterrupt):
    ckpt.save(5, _state(2.0), {"v": 2})
  monkeypatch.setattr(os, "rename", real_rename)
  # Step 5 is missing under its name only until recovery; both copies are on disk.
  names = sorted(os.listdir(tmp_path / "c"))
  assert names == ["5.replaced", "5.replacement"]
  ckpt.recover()
  assert sorted(os.listdir(tmp_path / "c")) == ["5"]
  step, state, meta = ckpt.restore(None)
  assert (step, meta["v"]) == (5, 2) and state["params"]["w"][0, 0] == 2.0


def test_incomplete_write_leaves_previous_checkpoints(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), max_to_keep=2)
  ckpt.save(1, _state(1.0), {})
  os.makedirs(tmp_path / "c" / "2.orbax-checkpoint-tmp" / "state")  # a kill mid-write
  assert ckpt.all_steps() == [1]
  ckpt.recover()
  assert sorted(os.listdir(tmp_path / "c")) == ["1"]


def test_keep_checkpoints_removes_oldest_after_saving(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), max_to_keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _state(float(step)), {})
  assert ckpt.all_steps() == [2, 3]
  with pytest.raises(ValueError, match="max_to_keep=0"):
    checkpoints.Checkpointer(str(tmp_path / "d"), max_to_keep=0)


def _data_files(step_dir):
  out = []
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    out += [os.path.join(root, f) for f in files]
  return sorted(out, key=os.path.getsize)


def test_flipped_bytes_are_detected_and_an_older_checkpoint_used(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), max_to_keep=3)
  big = {"params": {"w": np.arange(4096, dtype=np.float32)}}
  ckpt.save(1, big, {})
  ckpt.save(2, big, {})
  largest = _data_files(tmp_path / "c" / "2")[-1]
  with open(largest, "r+b") as f:
    f.seek(os.path.getsize(largest) // 2)
    chunk = bytearray(f.read(64))
    f.seek(os.path.getsize(largest) // 2)
    f.write(bytes(b ^ 0xFF for b in chunk))
  with pytest.warns(checkpoints.CheckpointCorruptWarning, match=str(tmp_path / "c" / "2")):
    step, state, _ = ckpt.restore(None)
  assert step == 1
  np.testing.assert_array_equal(state["params"]["w"], big["params"]["w"])
  assert os.path.isdir(tmp_path / "c" / "2")  # left in place


def test_checksum_mismatch_is_corruption(tmp_path, monkeypatch):
  ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), max_to_keep=3)
  ckpt.save(1, _state(1.0), {})
  ckpt.save(2, _state(2.0), {})
  real = checkpoints.Checkpointer._read

  def altered(self, step, state):
    out = real(self, step, state)
    if state and step == 2:
      out["state"]["params"]["w"][0, 0] = 7.0  # what a silent bit flip would do
    return out

  monkeypatch.setattr(checkpoints.Checkpointer, "_read", altered)
  with pytest.warns(checkpoints.CheckpointCorruptWarning, match="checksum mismatch"):
    step, _, _ = ckpt.restore(None)
  assert step == 1


def test_structure_mismatch_is_not_corruption(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path / "c"))
  ckpt.save(1, _state(1.0), {})
  template = {"params": {"w": np.zeros((4, 2), np.float32)}, "step": np.int32(0)}
  with warnings.catch_warnings():
    warnings.simplefilter("error", checkpoints.CheckpointCorruptWarning)
    with pytest.raises(checkpoints.CheckpointMismatchError, match=r"params/w: \(3, 2\)"):
      ckpt.restore(template)


def test_nonfinite_state_is_never_saved(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path / "c"))
  with pytest.raises(FloatingPointError, match="params/w is not finite"):
    ckpt.save(1, _state(np.inf), {})
  assert ckpt.all_steps() == []


# --------------------------------------------------------------------------
# Divergence: the state is checked after the update, before any save.


def _tiny_config(npz_path, **changes):
  config = config_base.load_config_file(CONFIG, "cnn_fgsm")
  config.data.update(source="local", local_path=npz_path)
  config.model.kwargs.filters = 2
  config.batch_size = BATCH
  config.num_epochs = 2
  config.checkpoint_every_steps = 1
  config.evals.test.update(n=16, batch_size=16, pgd_steps=1)
  config.evals.train_pgd.update(n=16, batch_size=16, pgd_steps=1)
  config.best.eval = "test"
  config.final_eval.enabled = False
  for dotted, value in changes.items():
    node = config
    *parents, leaf = dotted.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.mark.parametrize("optimizer,lr_max", [("adam", 1e30), ("sgd", 1e36)])
def test_divergence_leaves_only_finite_checkpoints(npz, tmp_path, optimizer, lr_max):
  config = _tiny_config(npz, **{"optimizer.name": optimizer, "schedule.lr_max": lr_max})
  workdir = str(tmp_path / "nan")
  with pytest.raises(FloatingPointError, match=r"(is not finite|loss is \w+) at step \d+"):
    train.train_and_evaluate(config, workdir, progress=False)
  for directory in ("checkpoints", "best"):
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, directory))
    for step in ckpt.all_steps():
      _, state, _ = ckpt.restore(None, step)
      assert checkpoints.first_nonfinite(state) is None, (directory, step)


# --------------------------------------------------------------------------
# Model selection on held-out training examples, never on test data.


def test_best_checkpoint_chosen_on_held_out_training_examples(npz, tmp_path):
  config = _tiny_config(npz, **{"data.validation_size": 8, "best.eval": "validation"})
  with config.evals.unlocked():
    config.evals.validation = dict(config.evals.test.to_dict(), split="validation", n=8,
                                   batch_size=8)
  summary = train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  # 32 examples, 8 held out: 24 train, 3 steps of 8 per epoch.
  assert summary["step"] == 2 * 3
  assert summary["data"]["train_examples"] == 24
  assert "last 8 examples" in summary["data"]["validation"]
  assert summary["data"]["model_selection"] == "validation (validation split) / pgd_acc"
  split = summary["time_split_this_session"]
  assert {"data", "evaluation", "checkpoints", "train_steps_and_logging"} <= set(split)
  assert 0 < split["fraction_outside_train_steps"] < 1
  _, meta = checkpoints.Checkpointer(str(tmp_path / "run" / "best")).restore_meta()
  assert meta["eval"]["n"] == 8  # chosen on the 8 held-out points
  with pytest.raises(ValueError, match="validation_size=32 leaves no training examples"):
    train.train_and_evaluate(_tiny_config(npz, **{"data.validation_size": 32}),
                             str(tmp_path / "none"), progress=False)
  assert not (tmp_path / "none").exists()


# --------------------------------------------------------------------------
# The workdir lock.


def test_second_run_on_a_workdir_is_refused(npz, tmp_path):
  workdir = tmp_path / "locked"
  workdir.mkdir()
  with workdir_lib.WorkdirLock(str(workdir)):
    res = train_cli(npz, workdir, check=False)
  assert res.returncode == 2
  assert "in use by another run" in res.stderr and '"pid"' in res.stderr
  assert len(res.stderr.strip().splitlines()) == 1  # one line, no traceback
  assert sorted(os.listdir(workdir)) == [".lock"]


def test_stale_lock_is_taken_over(tmp_path):
  with open(tmp_path / ".lock", "w") as f:
    f.write('{"pid": 999999, "host": "gone"}')  # written by a run that was killed
  with pytest.warns(UserWarning, match="stale lock"):
    lock = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  with pytest.raises(workdir_lib.WorkdirLockedError):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  lock.release()
  workdir_lib.WorkdirLock(str(tmp_path)).acquire().release()


# --------------------------------------------------------------------------
# Torn metrics log.


def test_torn_last_line_is_skipped_and_cut_on_resume(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
  with pytest.warns(UserWarning, match="torn last line"):
    assert [r["step"] for r in workdir_lib.read_records(path)] == [1, 2]
  workdir_lib.truncate_records(path, 1)
  with open(path) as f:
    assert f.read() == '{"step": 1, "a": 1}\n'
  with open(path, "a") as f:
    f.write('not json\n{"step": 5}\n')
  with pytest.raises(ValueError, match="line 2 is not JSON"):
    workdir_lib.read_records(path)


# --------------------------------------------------------------------------
# Settings and workdirs that cannot work: one line, exit 2, nothing written.

CLI_MISTAKES = [
    (["--config.seed=-1"], "seed=-1 must be in"),
    (["--config.log_every_steps=0"], "log_every_steps=0 must be >= 1"),
    (["--config.keep_checkpoints=0"], "keep_checkpoints=0 must be >= 1"),
    (["--config.data.train_subset=-5"], "data.train_subset=-5 must be >= 0"),
    (["--config.final_eval.n=17"], "final_eval.n=17 is larger than the cifar10 test set"),
    (["--config.evals.test.n=0"], r"evals\['test'\].n=0"),
    (["--config.attack.name=fgsmm"], "Unknown attack.name 'fgsmm'. Did you mean 'fgsm'"),
    (["--config.epss=3"], r"--config.epss: the config has no field 'epss'. Did you mean 'eps'\?"),
    (["--config.schedule.lr_maxx=0.1"],
     r"schedule has no field 'lr_maxx'. Did you mean 'lr_max'\? Its fields: .*lr_max"),
    (["--config.eps.x=1"], r"--config.eps.x: eps is a value \(10.0\), not a section"),
    (["--config=%s:cnn_fgms" % CONFIG], r"error: Unknown CIFAR-10 variant 'cnn_fgms'. Did you mean"),
    (["--config=configs/nothere.py:cnn_fgsm"],
     r"--config: \[Errno 2\] No such file or directory: 'configs/nothere.py'$"),
    (["--config=configs/nothere.py:cnn_fgsm", "--config.eps=4"], "No such file or directory"),
]


@pytest.mark.parametrize("extra,message", CLI_MISTAKES)
def test_cli_mistakes_fail_in_one_line_before_the_workdir(npz, tmp_path, extra, message):
  workdir = tmp_path / "never"
  res = train_cli(npz, workdir, extra=extra, check=False)
  assert res.returncode == 2, res.stderr[-2000:]
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("fastadv-train: error: "), res.stderr
  assert __import__("re").search(message, lines[0]), lines[0]
  assert not workdir.exists()


def test_unusable_workdirs(npz, tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  res = train_cli(npz, a_file, check=False)
  assert res.returncode == 2 and "is not a directory" in res.stderr
  res = train_cli(npz, "/proc/fastadv/x", check=False)
  assert res.returncode == 2 and "cannot be created" in res.stderr

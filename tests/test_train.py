"""Training: every config variant steps, devices agree, kill-and-resume equality."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import chex
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import pytest

from fastadv_jax import checkpoints
from fastadv_jax import config_base
from fastadv_jax import restore
from fastadv_jax import train
from fastadv_jax import train_state
from fastadv_jax import train_step
from fastadv_jax.train_state import AXIS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (8, 8, 3)
BATCH = 8


def load_config_module(name):
  return config_base.load_config_file(os.path.join(REPO, "configs", f"{name}.py"))


ALL_VARIANTS = [(ds, v) for ds in ("cifar10", "cifar100", "svhn", "imagenet")
                for v in load_config_module(ds).VARIANTS]


def tiny(config, model="simple_cnn"):
  """Shrinks a config to a tiny model, keeping its method."""
  config.model.name = model
  config.model.kwargs = ({"filters": 2} if model == "simple_cnn"
                         else {"widths": (4, 4, 4, 4), "stage_sizes": (1, 1, 1, 1)})
  config.batch_size = BATCH
  return config


def synthetic_batch(n=BATCH, num_classes=10, seed=0, devices=1):
  rng = np.random.default_rng(seed)
  batch = {"image": rng.integers(0, 256, (n,) + SHAPE).astype(np.uint8),
           "label": rng.integers(0, num_classes, n).astype(np.int32),
           "index": np.arange(n, dtype=np.int32)}
  return jax.tree_util.tree_map(lambda a: a.reshape((devices, -1) + a.shape[1:]), batch)


def run_steps(config, num_steps=2, devices=1, seed_batch=0, steps_per_epoch=10,
              max_traces=None):
  """Builds the state and the pmapped step of `config`, runs a few steps.

  With `max_traces`, tracing the step more often fails (chex.assert_max_traces).
  """
  devs = jax.local_devices()[:devices]
  method = config_base.validate_config(config)
  model = train_state.create_model(config)
  tx = train_state.create_optimizer(config, steps_per_epoch)
  state = train_state.create_train_state(config, method, model, tx, jax.random.PRNGKey(0),
                                         SHAPE, BATCH)
  step = train_step.make_train_step(model, tx, method, steps_per_epoch=steps_per_epoch,
                                    seed=config.seed, augment=train.make_augment(config))

  if max_traces is not None:
    step = chex.assert_max_traces(step, n=max_traces)
  step_fn = jax.pmap(step, axis_name=AXIS, devices=devs)
  r_state = train_state.to_devices(state, devs)
  metrics = None
  for i in range(num_steps):
    batch = synthetic_batch(num_classes=config.num_classes, seed=seed_batch + i,
                            devices=devices)
    r_state, metrics = step_fn(r_state, batch)
  return train_state.to_host(r_state), jax.device_get(train_state.unreplicate(metrics))


@pytest.mark.parametrize("dataset,variant", ALL_VARIANTS)
def test_every_variant_builds_and_steps(dataset, variant):
  config = load_config_module(dataset).get_config(variant)
  config_base.validate_config(config)
  # Regularizers and the batch-statistics attack path need BatchNorm coverage.
  model = "preact_resnet18" if variant in ("gradalign", "zerograd", "advlc") else "simple_cnn"
  config = tiny(config, model)
  state, metrics = run_steps(config)
  assert int(state.step) == 2
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  for name in config.regularizers:
    assert f"train/reg/{name}" in metrics


def test_gradalign_formulations_train_the_same_parameters():
  """The pmapped GradAlign step (FGSM + λ·Ω, BatchNorm in batch mode) gives the
  same parameters after two steps whichever surrogate formulation computes
  Ω's parameter gradient (float32: they differ by rounding only)."""
  def run(form, num_steps=2):
    config = tiny(load_config_module("cifar10").get_config("gradalign"), "preact_resnet18")
    config.dtype = "float32"
    config.regularizers.grad_align.formulation = form
    state, metrics = run_steps(config, num_steps=num_steps)
    return ravel_pytree(state.params)[0], metrics

  (p_a, m_a), (p_b, m_b) = run("reverse_over_forward"), run("forward_over_reverse")
  assert m_a["train/reg/grad_align"] > 1e-3  # the regularizer is active
  assert m_b["train/reg/grad_align"] == pytest.approx(m_a["train/reg/grad_align"], rel=1e-4)
  moved = np.linalg.norm(p_a - run("reverse_over_forward", num_steps=0)[0])
  assert moved > 0
  assert np.linalg.norm(p_a - p_b) <= 1e-4 * moved


def test_full_size_gradalign_step_traces():
  """The real PreActResNet-18 GradAlign step, through jax.eval_shape only."""
  config = load_config_module("cifar10").get_config("gradalign")
  method = config_base.validate_config(config)
  model = train_state.create_model(config)
  tx = train_state.create_optimizer(config, 390)
  state = jax.eval_shape(lambda: train_state.create_train_state(
      config, method, model, tx, jax.random.PRNGKey(0), (32, 32, 3), 128))
  batch = {"image": jax.ShapeDtypeStruct((1, 128, 32, 32, 3), jnp.uint8),
           "label": jax.ShapeDtypeStruct((1, 128), jnp.int32),
           "index": jax.ShapeDtypeStruct((1, 128), jnp.int32)}
  step = jax.pmap(train_step.make_train_step(
      model, tx, method, steps_per_epoch=390, seed=0, augment=train.make_augment(config)),
      axis_name=AXIS)
  state1 = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct((1,) + s.shape, s.dtype), state)
  out_state, metrics = jax.eval_shape(step, state1, batch)
  assert metrics["train/reg/grad_align"].shape == (1,)
  n_params = sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(out_state.params))
  assert n_params == 11_171_146


def test_one_device_equals_eight_devices():
  """Same update on 1 and 8 devices: no BatchNorm, no batch-dependent term (FGSM)."""
  config = tiny(load_config_module("cifar10").get_config("cnn_fgsm"))
  config.batch_size = 16
  global BATCH
  old, BATCH = BATCH, 16
  try:
    # The state a step returns has the structure and dtypes it takes: one
    # trace for three batches.
    one, m1 = run_steps(config, devices=1, num_steps=3, max_traces=1)
    eight, m8 = run_steps(config, devices=8, num_steps=3)
  finally:
    BATCH = old
  chex.assert_trees_all_close(one.params, eight.params, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(m1["train/loss"], m8["train/loss"], rtol=1e-5)


BAD_SETTINGS = [
    # (variant, {dotted field: value}, message)
    ("gradalign", {"attack.name": "fgsmm"}, r"Unknown attack.name 'fgsmm'. Did you mean 'fgsm'"),
    ("gradalign", {"model.name": "resnet19"}, "Unknown model.name"),
    ("gradalign", {"eps": 300.0}, "eps=300.0"),
    ("gradalign", {"optimizer.name": "lion"}, "Unknown optimizer.name"),
    ("gradalign", {"schedule.name": "cosine"}, "Unknown schedule.name"),
    ("gradalign", {"regularizers.grad_align.lambda_rule": "",
                   "regularizers.grad_align.weight": -1.0}, r"weight=-1.0 must be a number >= 0"),
    ("gradalign", {"regularizers.grad_align.formulation": "forward"}, "formulation"),
    ("gradalign", {"regularizers.grad_align.eps": 0.1}, "supplied by the train step"),
    ("gradalign", {"regularizers.grad_align.stepp": 1}, r"unknown keyword 'stepp'"),
    ("cure", {"regularizers.cure.scale": "per_batch"}, "scale"),
    ("fgsm", {"attack.name": "pgd"}, r"attack 'pgd' .*missing required keyword\(s\) \['steps'\]"),
    ("pgd2", {"attack.step_eps_ratio": None}, r"attack 'pgd' needs a step"),
    ("pgd2", {"attack.kwargs.steps": -1}, r"steps must be >= 0, got -1"),
    ("zerograd", {"attack.kwargs.q": 1.5}, r"q must lie in \[0.0, 1.0\], got 1.5"),
    ("zerograd", {"attack.kwargs.qq": 0.3}, r"unknown keyword 'qq'. Did you mean 'q'"),
    ("fgsm", {"attack.kwargs.step": 0.1}, "give the step as attack.step"),
    ("fgsm", {"attack.step": 8.0, "attack.step_eps_ratio": 1.0}, "both set"),
    ("free", {"attack.kwargs.replays": 0}, r"replays=0 must be an integer >= 1"),
    ("pgd2", {"warmup.epochs": 1.0, "warmup.target": "step", "attack.name": "random_corner",
              "attack.step_eps_ratio": None, "attack.kwargs": {}}, "takes no step"),
    ("advlc", {"regularizers.advlc.clean_point": "noisy"}, "clean_point"),
    ("gradalign", {"co_monitor.adjust": {"attack/q": {"op": "add", "value": 0.1}}},
     r"Unknown co_monitor.adjust setting 'attack/q'"),
    ("gradalign", {"best.eval": "tset"}, r"Unknown best.eval 'tset'. Did you mean 'test'"),
    ("gradalign", {"evals.test.metrics": ["pgd_accuracy"]}, "pgd_accuracy"),
    ("fgsm", {"model.kwargs": {"remat": "yes"}}, r"Unknown remat 'yes'"),
]


def _set(config, field, value):
  node = config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  with node.unlocked() if hasattr(node, "unlocked") else _null():
    node[leaf] = value


@pytest.mark.parametrize("variant,settings,message", BAD_SETTINGS)
def test_bad_configs_fail_before_compiling(variant, settings, message):
  config = load_config_module("cifar10").get_config(variant)
  for field, value in settings.items():
    _set(config, field, value)
  t0 = time.time()
  with pytest.raises(ValueError, match=message):
    config_base.validate_config(config)
  assert time.time() - t0 < 5


def test_unknown_variant_suggests():
  with pytest.raises(ValueError, match="Unknown CIFAR-10 variant 'gradalgn'. Did you mean "
                     "'gradalign'"):
    load_config_module("cifar10").get_config("gradalgn")


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


# --------------------------------------------------------------------------
# End-to-end runs on a small local dataset, through the CLI.


@pytest.fixture(scope="module")
def npz_dataset(tmp_path_factory):
  rng = np.random.default_rng(0)
  n_train, n_test = 64, 16
  # Learnable: the label is the brightest of 10 stripes.
  def make(n):
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = rng.integers(0, 100, (n,) + SHAPE).astype(np.uint8)
    return images, labels
  x_tr, y_tr = make(n_train)
  x_te, y_te = make(n_test)
  path = tmp_path_factory.mktemp("data") / "tiny.npz"
  np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
  return str(path)


def cli_args(npz, workdir, epochs=8, extra=()):
  return [sys.executable, "-c", "from fastadv_jax.cli import train_main; train_main()",
          f"--config={os.path.join(REPO, 'configs', 'cifar10.py')}:cnn_fgsm",
          f"--workdir={workdir}", "--progress=false",
          "--config.data.source=local", f"--config.data.local_path={npz}",
          "--config.model.kwargs.filters=2", f"--config.batch_size={BATCH}",
          f"--config.num_epochs={epochs}", "--config.checkpoint_every_steps=1",
          "--config.evals.test.n=16", "--config.evals.test.pgd_steps=2",
          "--config.evals.test.batch_size=16", "--config.evals.train_pgd.n=16",
          "--config.best.eval=test",
          "--config.final_eval.enabled=False", "--config.log_every_steps=4",
          "--config.keep_checkpoints=2", *extra]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def final_params(workdir):
  _, variables, _, _ = restore.restore_for_eval(workdir, "last")
  return variables["params"]


def test_kill_and_resume_equals_uninterrupted(npz_dataset, tmp_path):
  full = tmp_path / "full"
  subprocess.run(cli_args(npz_dataset, full), check=True, env=_env(),
                 capture_output=True, timeout=600)
  killed = tmp_path / "killed"
  proc = subprocess.Popen(cli_args(npz_dataset, killed), env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_dir = killed / "checkpoints"
  deadline = time.time() + 300
  killed_at = None
  while time.time() < deadline and proc.poll() is None:
    steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if ckpt_dir.exists() else []
    steps = [s for s in steps if s >= 20]
    if steps:
      proc.send_signal(signal.SIGKILL)
      killed_at = max(steps)
      break
    time.sleep(0.02)
  proc.wait()
  assert killed_at is not None, "the run finished before it could be killed"
  total = 8 * (64 // BATCH)
  assert killed_at < total
  subprocess.run(cli_args(npz_dataset, killed), check=True, env=_env(),
                 capture_output=True, timeout=600)
  a, b = final_params(full), final_params(killed)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  # The metrics log of the resumed run has each step once.
  with open(killed / "metrics.jsonl") as f:
    steps = [json.loads(l)["step"] for l in f if "train/loss" in l]
  assert steps == sorted(set(steps))
  assert (killed / "training_curves.png").exists()

  # Resuming with a different config is refused, the run left untouched.
  before = sorted(os.listdir(killed / "checkpoints"))
  res = subprocess.run(cli_args(npz_dataset, killed, extra=["--config.eps=12"]),
                       env=_env(), capture_output=True, text=True, timeout=600)
  assert res.returncode != 0
  assert "different config" in res.stderr and "eps: 10.0 -> 12.0" in res.stderr
  assert sorted(os.listdir(killed / "checkpoints")) == before


def test_resuming_a_run_stored_before_a_keyword_existed():
  """A stored config without a keyword the library added later (it ran with the
  function's default) resumes when the key holds that default, not otherwise."""
  cifar10 = load_config_module("cifar10")
  for variant, section, key, other in [
      ("gradalign", ("regularizers", "grad_align"), "formulation", "forward_over_reverse"),
      ("cnn_fgsm", ("model", "kwargs"), "im2col_stem", True)]:
    config = cifar10.get_config(variant)
    stored = json.loads(config.to_json_best_effort())
    stored[section[0]][section[1]].pop(key)
    assert train.config_changes(stored, config) == []
    with config.unlocked():
      config[section[0]][section[1]][key] = other
    assert train.config_changes(stored, config) == [
        f"{'.'.join(section)}.{key}: '<missing>' -> {other!r}"]
  # Other differences still count, a missing key without a known default too.
  config = cifar10.get_config("gradalign")
  stored = json.loads(config.to_json_best_effort())
  stored["eps"] = 10.0
  stored["schedule"].pop("lr_max")
  assert train.config_changes(stored, config) == [
      f"eps: 10.0 -> {config.eps!r}",
      f"schedule.lr_max: '<missing>' -> {config.schedule.lr_max!r}"]


def test_corrupt_newest_checkpoint_falls_back(npz_dataset, tmp_path):
  workdir = tmp_path / "run"
  subprocess.run(cli_args(npz_dataset, workdir, epochs=1), check=True, env=_env(),
                 capture_output=True, timeout=600)
  ckpt = checkpoints.Checkpointer(str(workdir / "checkpoints"))
  steps = ckpt.all_steps()
  assert len(steps) == 2
  newest = workdir / "checkpoints" / str(steps[-1])
  for root, _, files in os.walk(newest / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"corrupt")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _, variables, _, _ = restore.restore_for_eval(str(workdir), "last")
  assert any(str(newest) in str(w.message) for w in caught
             if issubclass(w.category, checkpoints.CheckpointCorruptWarning))
  assert newest.exists()  # left in place
  assert variables["params"]


def test_short_real_run_single_layer_cnn_learns(tmp_path):
  """The README's main job in small: the single-layer CNN on real CIFAR-10 (JPEG)."""
  from fastadv_jax import data
  try:
    data.load_split("cifar10", "test[:16]", source="auto", progress=False)
  except data.DatasetNotFoundError as e:
    pytest.fail(f"CIFAR-10 (JPEG) from ../shared/data is needed: {e}")
  config = load_config_module("cifar10").get_config("cnn_fgsm")
  config.data.train_subset = 5120
  config.num_epochs = 4
  config.evals.test.update(n=500, batch_size=250, pgd_steps=2)
  config.final_eval.enabled = False
  config.log_every_steps = 20
  summary = train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert summary["step"] == 4 * (5120 // 128)
  # Chance is 0.10; the FGSM-trained single-layer CNN learns well above it.
  assert summary["last_eval"]["test"]["test/clean_acc"] > 0.25, summary["last_eval"]
  assert summary["last_eval"]["test"]["test/n"] == 500


def test_swa_average_and_batch_statistics():
  """SWA is the equal-weight mean of the weights; BN statistics are batch averages."""
  config = tiny(load_config_module("cifar10").get_config("advlc_swa"), "preact_resnet18")
  method = config_base.validate_config(config)
  model = train_state.create_model(config)
  tx = train_state.create_optimizer(config, 10)
  state = train_state.create_train_state(config, method, model, tx, jax.random.PRNGKey(0),
                                         SHAPE, BATCH)
  snapshots = []
  for i in range(3):
    params = jax.tree_util.tree_map(lambda p, i=i: p + i + 1.0, state.params)
    snapshots.append(params)
    state = train_state.swa_update(state.replace(params=params))
  expected = jax.tree_util.tree_map(lambda *ps: sum(ps) / 3, *snapshots)
  for a, b in zip(jax.tree_util.tree_leaves(state.swa["params"]),
                  jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert int(state.swa["count"]) == 3

  rng = np.random.default_rng(0)
  batches = [rng.uniform(size=(4,) + SHAPE).astype(np.float32) for _ in range(3)]
  stats = jax.tree_util.tree_map(lambda *b: sum(b) / 3, *[
      train_state.batch_statistics(model, state.params, state.batch_stats, x)
      for x in batches])
  # The stem's first BatchNorm sees the first conv's output: check it directly.
  first_bn = sorted(stats)[0]
  per_batch = []
  for x in batches:
    _, mutated = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                             train=True, mutable=["batch_stats"])
    old = state.batch_stats[first_bn]
    new = mutated["batch_stats"][first_bn]
    per_batch.append(jax.tree_util.tree_map(lambda n, o: (n - 0.9 * o) / 0.1, new, old))
  mean_of_batches = jax.tree_util.tree_map(lambda *b: sum(b) / 3, *per_batch)
  for a, b in zip(jax.tree_util.tree_leaves(stats[first_bn]),
                  jax.tree_util.tree_leaves(mean_of_batches)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_swa_schedule_and_batchnorm_reestimation_in_the_loop(npz_dataset, tmp_path):
  """The AdvLC code's SWA: weights after the first step of every epoch from
  swa.start_epoch on, BatchNorm statistics re-estimated on a pass of the
  training set after each average; best/ chosen on held-out training examples."""
  config = tiny(load_config_module("cifar10").get_config("advlc_swa"), "preact_resnet18")
  config.data.update(source="local", local_path=npz_dataset, validation_size=16)
  config.evals.validation.update(n=16, batch_size=16, pgd_steps=1)
  config.evals.test.update(n=16, batch_size=16, pgd_steps=1)
  config.augment.update(padding=0, flip=False)  # so the statistics are order-free
  config.schedule.lr_max = 0.01  # lr 0.1 diverges on this data without augmentation
  config.num_epochs = 3
  config.swa.start_epoch = 1
  config.checkpoint_every_steps = 1
  config.keep_checkpoints = 100
  config.final_eval.enabled = False
  workdir = str(tmp_path / "swa")
  summary = train.train_and_evaluate(config, workdir, progress=False)
  steps_per_epoch = (64 - 16) // BATCH
  assert summary["step"] == 3 * steps_per_epoch
  assert summary["data"]["train_examples"] == 48
  assert summary["data"]["model_selection"].startswith("validation (validation split)")

  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  swa = ckpt.restore(None)[1]["swa"]
  assert int(swa["count"]) == 2
  # The average of the weights after the first step of epochs 1 and 2.
  averaged = [ckpt.restore(None, e * steps_per_epoch + 1)[1]["params"] for e in (1, 2)]
  expected = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *averaged)
  chex.assert_trees_all_close(swa["params"], expected, rtol=1e-6, atol=1e-7)
  # The first BatchNorm sees the stem convolution's output: the means of equal
  # batches average to its mean over the whole (unaugmented) training set,
  # whatever the order. (Deeper ones see batch-normalized inputs.)
  images = np.load(npz_dataset)["x_train"][:48].astype(np.float32) / 255.0
  model = train_state.create_model(config, dtype="float32")
  whole = train_state.batch_statistics(model, swa["params"], swa["batch_stats"], images)
  got = jax.tree_util.tree_map(np.asarray, swa["batch_stats"])
  np.testing.assert_allclose(got["layer1_0"]["bn1"]["mean"], whole["layer1_0"]["bn1"]["mean"],
                             rtol=1e-5, atol=1e-6)
  last = restore.restore_for_eval(workdir, "last").variables
  assert not np.allclose(jax.tree_util.tree_leaves(last["batch_stats"])[0],
                         jax.tree_util.tree_leaves(got)[0])


def test_imagenet_progressive_resizing_loop(tmp_path, monkeypatch):
  """The ImageNet path of the loop: three phases of crop size and batch size.

  The TFDS source is replaced by in-memory records (uint8 arrays, which the
  ImageNet loader accepts like JPEG bytes); everything else is the real loop.
  """
  from fastadv_jax.data import imagenet
  rng = np.random.default_rng(0)
  records = [{"image": rng.integers(0, 256, (40, 48, 3)).astype(np.uint8),
              "label": int(rng.integers(0, 1000))} for _ in range(48)]
  monkeypatch.setattr(imagenet, "imagenet_source", lambda split, data_dir=None: records)
  config = load_config_module("imagenet").get_config("fgsm_rs")
  config.model.name = "preact_resnet18"
  config.model.kwargs = {"widths": (4, 4, 4, 4), "stage_sizes": (1, 1, 1, 1)}
  config.dtype = "float32"
  config.num_epochs = 3
  config.imagenet_phases.update(start_epochs=[0, 1, 2], crop_sizes=[8, 12, 16],
                                resize_sizes=[12, 16, 0], batch_sizes=[16, 8, 8],
                                eval_size=16)
  config.schedule.kwargs = {"epoch_knots": [0, 1, 2, 3], "values": [0, 0.01, 0.001, 1e-4]}
  config.evals.test.update(n=16, batch_size=16, pgd_steps=1)
  config.evals.train_pgd.update(n=16, batch_size=16, pgd_steps=1)
  config.final_eval.enabled = False
  config.log_every_steps = 1
  summary = train.train_and_evaluate(config, str(tmp_path / "in"), progress=False)
  assert summary["step"] == 48 // 16 + 48 // 8 + 48 // 8
  with open(tmp_path / "in" / "metrics.jsonl") as f:
    records = [json.loads(l) for l in f]
  assert [r["epoch"] for r in records if "test/pgd_acc" in r] == [1.0, 2.0, 3.0]
  # best/ is chosen on the first training batch, never on validation (test) images.
  assert [r["epoch"] for r in records if "train_pgd/pgd_acc" in r] == [1.0, 2.0, 3.0]
  assert summary["data"]["model_selection"] == "train_pgd (train split) / pgd_acc"


def test_co_rollback_restores_best_and_strengthens_setting(npz_dataset, tmp_path, monkeypatch):
  """On a (forced) collapse the run rolls back to the best state and raises ZeroGrad's q."""
  from fastadv_jax import monitor
  fired = []

  def fake_update(self, step, record):
    if step == 16 and not fired:  # the second evaluation: pretend PGD accuracy collapsed
      fired.append(step)
      event = {"step": step, "pgd_acc": 0.0, "fgsm_acc": 1.0, "best_step": 8,
               "best_pgd_acc": 0.5, "best_fgsm_acc": 0.5}
      self.events.append(event)
      return event
    if self.best is None:
      self.best = dict(record, step=step)
    return None

  monkeypatch.setattr(monitor.CatastrophicOverfittingMonitor, "update", fake_update)
  config = tiny(load_config_module("cifar10").get_config("zerograd"))
  config.data.update(source="local", local_path=npz_dataset, validation_size=0)
  del config.evals.validation  # 1,000 held-out examples do not fit in 64
  config.best.eval = "test"
  config.num_epochs = 3
  config.evals.test.update(n=16, batch_size=16, pgd_steps=1)
  config.final_eval.enabled = False
  config.co_monitor.update(rollback=True, max_rollbacks=1)
  config.co_monitor.adjust = {"attack/q": {"op": "add", "value": 0.1}}
  workdir = str(tmp_path / "rb")
  summary = train.train_and_evaluate(config, workdir, progress=False)
  assert summary["rollbacks"] == 1 and fired == [16]
  assert summary["step"] == 3 * (64 // BATCH)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"))
  _, restored, meta = ckpt.restore(None)
  np.testing.assert_allclose(restored["hparams"]["attack/q"], 0.35 + 0.1, rtol=1e-6)
  assert meta["extra"]["adjusted_hparams"][0]["attack/q"] == pytest.approx(0.45)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert any("co/detected" in line for line in f)


def test_weight_decay_mask_spares_batchnorm_only_when_asked():
  from fastadv_jax import models
  params = models.abstract_variables(models.get_model("resnet50"), (224, 224, 3))["params"]
  leaves = jax.tree_util.tree_leaves_with_path(train_state._decay_mask(params, decay_bn=False))
  spared = {jax.tree_util.keystr(p) for p, keep in leaves if not keep}
  assert len(spared) == 2 * 53  # scale and bias of ResNet-50's 53 BatchNorm layers
  assert all("bn" in name for name in spared)
  assert "['fc']['bias']" not in spared
  everything = jax.tree_util.tree_leaves(train_state._decay_mask(params, decay_bn=True))
  assert all(everything)


def test_every_metric_is_labelled_on_the_console_line():
  """The per-evaluation console line names every metric an evaluation can ask
  for (pgd_acc by its step count; the FGSM-point accuracy only in metrics.jsonl),
  so a configured metric such as AdvLC's landscape metrics is never dropped."""
  from fastadv_jax import evaluate  # pylint: disable=g-import-not-at-top
  missing = set(evaluate.METRICS) - {"pgd_acc", "fgsm_point_acc"} - set(train.EVAL_LINE_LABELS)
  assert not missing, f"metrics without a console label: {sorted(missing)}"

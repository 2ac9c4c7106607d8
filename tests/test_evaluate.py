"""Tests for fastadv_jax.evaluate: batching, padding, devices, records, errors,
the robustness metrics and the named-evaluation schema.

Tiny models (the single-layer CNN with 4 filters on 8x8 images, and a conv +
BatchNorm net for eval-mode BatchNorm), 10 points, PGD-5-2 or PGD-3: every
compiled shape is shared across the module through fixtures.
"""

import json
import os
import re
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import fastadv_jax
from fastadv_jax import closures
from fastadv_jax import evaluate
from fastadv_jax import metrics
from fastadv_jax import models
from fastadv_jax import restore
from model_helpers import far_running_statistics

EPS = 8 / 255
PGD = dict(steps=5, restarts=2)
NUM = 10


@pytest.fixture(scope="module")
def setup():
  model = models.get_model("simple_cnn", filters=4)
  variables = models.init_variables(model, jax.random.key(0), (8, 8, 3))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (NUM, 8, 8, 3), dtype=np.uint8)
  logits_fn = closures.eval_logits_fn(model, variables)
  predictions = np.asarray(jnp.argmax(logits_fn(images.astype(np.float32) / 255), -1))
  labels = predictions.copy()
  labels[:3] = (labels[:3] + 1) % 10  # three clean mistakes
  return model, variables, logits_fn, images, labels.astype(np.int32)


@pytest.fixture(scope="module")
def pgd_batch4(setup):
  _, _, logits_fn, images, labels = setup
  return evaluate.pgd_accuracy(logits_fn, images, labels, 0, eps=EPS, batch_size=4,
                               num_devices=1, progress=False, **PGD)


def test_clean_accuracy_matches_direct_computation(setup):
  _, _, logits_fn, images, labels = setup
  result = evaluate.clean_accuracy(logits_fn, images, labels, batch_size=4,
                                   num_devices=1)
  expected = np.asarray(jnp.argmax(logits_fn(images / 255.0), -1)) == labels
  np.testing.assert_array_equal(result.correct, expected)
  assert result.accuracy == pytest.approx(0.7)
  # float images in [0, 1] give the same as uint8
  as_float = evaluate.clean_accuracy(logits_fn, images.astype(np.float32) / 255,
                                     labels, batch_size=4, num_devices=1)
  np.testing.assert_array_equal(as_float.correct, expected)


def test_robust_accuracy_at_most_clean_and_attack_bites(setup, pgd_batch4):
  _, _, logits_fn, images, labels = setup
  clean = evaluate.clean_accuracy(logits_fn, images, labels, batch_size=4,
                                  num_devices=1)
  robust = pgd_batch4
  assert robust.correct.dtype == bool and robust.correct.shape == (NUM,)
  assert not np.any(robust.correct & ~clean.correct)  # robust implies clean-correct
  assert robust.accuracy <= clean.accuracy
  assert robust.accuracy < clean.accuracy  # the attack fools some correct points
  assert robust.accuracy == pytest.approx(np.mean(robust.correct))


def test_larger_eps_is_not_more_robust(setup, pgd_batch4):
  _, _, logits_fn, images, labels = setup
  small = evaluate.pgd_accuracy(logits_fn, images, labels, 0, eps=1 / 255,
                                batch_size=4, num_devices=1, progress=False, **PGD)
  assert small.accuracy > pgd_batch4.accuracy
  assert not np.any(pgd_batch4.correct & ~small.correct)


def test_same_seed_same_result(setup, pgd_batch4):
  _, _, logits_fn, images, labels = setup
  again = evaluate.pgd_accuracy(logits_fn, images, labels, jax.random.key(0), eps=EPS,
                                batch_size=4, num_devices=1, progress=False, **PGD)
  np.testing.assert_array_equal(again.correct, pgd_batch4.correct)


def test_ragged_batches_equal_unbatched_and_compile_once(setup, pgd_batch4):
  model, variables, _, images, labels = setup
  traces = []

  def counting_logits_fn():
    closure = closures.logits_fn(model, variables, bn="eval")

    def apply(x):
      traces.append(x.shape)  # runs only while tracing
      return closure(x)
    return apply

  def count(images, labels, batch_size):
    traces.clear()
    result = evaluate.pgd_accuracy(counting_logits_fn(), images, labels, 0, eps=EPS,
                                   batch_size=batch_size, num_devices=1,
                                   progress=False, **PGD)
    return result, len(traces)

  # 10 points in batches of 4 (4 + 4 + 2 padded to 4) vs one batch of 4.
  ragged, ragged_traces = count(images, labels, 4)
  one_batch, one_batch_traces = count(images[:4], labels[:4], 4)
  assert one_batch_traces > 0
  assert ragged_traces == one_batch_traces  # traced (so compiled) once
  np.testing.assert_array_equal(ragged.correct, pgd_batch4.correct)
  np.testing.assert_array_equal(one_batch.correct, pgd_batch4.correct[:4])
  # all 10 in one unpadded batch
  _, _, logits_fn, _, _ = setup
  unbatched = evaluate.pgd_accuracy(logits_fn, images, labels, 0, eps=EPS,
                                    batch_size=NUM, num_devices=1, progress=False,
                                    **PGD)
  np.testing.assert_array_equal(unbatched.correct, pgd_batch4.correct)


def test_example_ids_select_the_random_keys(setup, pgd_batch4):
  """A point's result depends on its test-set index, not its position."""
  _, _, logits_fn, images, labels = setup
  order = np.array([9, 2, 5, 0])
  sub = evaluate.pgd_accuracy(logits_fn, images[order], labels[order], 0, eps=EPS,
                              batch_size=4, num_devices=1, example_ids=order,
                              progress=False, **PGD)
  np.testing.assert_array_equal(sub.correct, pgd_batch4.correct[order])


def test_strict_pgd_prints_a_run_time_estimate(setup, pgd_batch4, capsys):
  """After the first compiled chunk of steps, and after the first restart."""
  _, _, logits_fn, images, labels = setup
  again = evaluate.pgd_accuracy(logits_fn, images, labels, 0, eps=EPS, batch_size=4,
                                num_devices=1, progress=True, **PGD)
  np.testing.assert_array_equal(again.correct, pgd_batch4.correct)
  out = capsys.readouterr().out
  assert re.search(r"PGD-5-2 on 10 points: about \d+ s left if no restart fools a point", out)
  robust_after_first = re.search(r"PGD-5-2: (\d+) of (\d+) points robust after the first "
                                 r"restart; about \d+ s left if they all stay robust", out)
  assert robust_after_first is not None
  assert int(robust_after_first[1]) >= pgd_batch4.correct.sum()


def test_eight_devices_equal_one_device(setup, pgd_batch4):
  assert jax.local_device_count() == 8
  _, _, logits_fn, images, labels = setup
  # The generic engine (max-loss rule): batch 8 over 8 devices, 8 + 2 padded
  # to 8, one example per device.
  max_loss = dict(PGD, rule="max_loss")
  sharded = evaluate.pgd_accuracy(logits_fn, images, labels, 0, eps=EPS,
                                  batch_size=8, num_devices=8, progress=False, **max_loss)
  one = evaluate.pgd_accuracy(logits_fn, images, labels, 0, eps=EPS,
                              batch_size=4, num_devices=1, progress=False, **max_loss)
  np.testing.assert_array_equal(sharded.correct, one.correct)
  # The strict driver: the points split between 3 devices, a thread each.
  split = evaluate.pgd_accuracy(logits_fn, images, labels, 0, eps=EPS,
                                batch_size=4, num_devices=3, progress=False, **PGD)
  np.testing.assert_array_equal(split.correct, pgd_batch4.correct)
  clean8 = evaluate.clean_accuracy(logits_fn, images, labels, batch_size=8,
                                   num_devices=8)
  clean1 = evaluate.clean_accuracy(logits_fn, images, labels, batch_size=4,
                                   num_devices=1)
  np.testing.assert_array_equal(clean8.correct, clean1.correct)


REQUIRED_FIELDS = (
    "dataset", "threat_model", "eps", "eps_255", "clean_acc", "robust_acc", "n_clean",
    "n_robust", "selection", "seed", "attack", "library_version", "jax_version",
    "device", "timestamp", "wall_time_s")


def test_record_fields_json_and_save(setup, pgd_batch4, tmp_path):
  _, _, logits_fn, images, labels = setup
  record = evaluate.evaluate(logits_fn, images, labels, 0, attack="pgd", eps=EPS, n=6,
                             selection="random", batch_size=4, num_devices=1,
                             dataset="toy", progress=False, **PGD)
  for field in REQUIRED_FIELDS:
    assert field in record, field
  assert record["threat_model"] == "Linf"
  assert record["eps_255"] == pytest.approx(8.0)
  assert record["n_clean"] == NUM and record["n_robust"] == 6
  assert record["attack"]["restart_rule"] == "strict"
  assert record["attack"]["step"] == pytest.approx(EPS / 4)
  assert record["library_version"] == fastadv_jax.__version__
  assert record["jax_version"] == jax.__version__
  assert record["device"]["count"] == 8 and record["device"]["platform"] == "cpu"
  assert record["clean_acc"] == pytest.approx(0.7)
  # the robust points are the seeded selection, with their own keys
  indices = evaluate.select_indices(NUM, 6, "random", 0)
  assert record["robust_acc"] == pytest.approx(np.mean(pgd_batch4.correct[indices]))
  assert record["robust_acc"] <= record["clean_acc_on_attacked_points"]
  assert json.loads(json.dumps(record)) == record  # JSON-able as is

  path = str(tmp_path / "eval" / "rec.json")
  assert evaluate.save_record(record, path) == path
  with open(path) as f:
    assert json.load(f) == record
  assert evaluate.save_record(record, path) == path  # identical: nothing new
  other = dict(record, seed=1)
  with pytest.warns(UserWarning, match="different record"):
    second = evaluate.save_record(other, path)
  assert second == str(tmp_path / "eval" / "rec-1.json")
  with open(path) as f:
    assert json.load(f) == record  # the first record is untouched
  with open(second) as f:
    assert json.load(f)["seed"] == 1
  assert sorted(os.listdir(tmp_path / "eval")) == ["rec-1.json", "rec.json"]


def test_select_indices():
  np.testing.assert_array_equal(evaluate.select_indices(100, 5, "first"), np.arange(5))
  a = evaluate.select_indices(100, 20, "random", 3)
  assert len(np.unique(a)) == 20 and np.all(np.diff(a) > 0) and a.max() < 100
  np.testing.assert_array_equal(a, evaluate.select_indices(100, 20, "random", 3))
  assert not np.array_equal(a, evaluate.select_indices(100, 20, "random", 4))


def test_bad_inputs_raise_before_compiling(setup):
  _, _, logits_fn, images, labels = setup
  with pytest.raises(ValueError, match="attack.*autoattack.*pgd"):
    evaluate.evaluate(logits_fn, images, labels, attack="cw", eps=EPS, n=4)
  with pytest.raises(ValueError, match="eps"):
    evaluate.evaluate(logits_fn, images, labels, attack="pgd", eps=0.0, n=4)
  with pytest.raises(ValueError, match="eps"):
    evaluate.pgd_accuracy(logits_fn, images, labels, 0, eps=-1 / 255)
  with pytest.raises(ValueError, match="pixel units"):
    evaluate.pgd_accuracy(logits_fn, images, labels, 0, eps=8.0)
  with pytest.raises(ValueError, match="n=11.*10"):
    evaluate.evaluate(logits_fn, images, labels, attack="pgd", eps=EPS, n=11)
  with pytest.raises(ValueError, match="restart rule.*max_loss.*strict"):
    evaluate.pgd_accuracy(logits_fn, images, labels, 0, eps=EPS, rule="best")
  with pytest.raises(ValueError, match="selection"):
    evaluate.evaluate(logits_fn, images, labels, eps=EPS, n=4, selection="last")
  with pytest.raises(ValueError, match="batch size"):
    evaluate.clean_accuracy(logits_fn, images, labels[:5])
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    evaluate.clean_accuracy(logits_fn, images.astype(np.float32), labels)
  with pytest.raises(ValueError, match="num_devices"):
    evaluate.clean_accuracy(logits_fn, images, labels, num_devices=9)


@pytest.fixture
def fake_run(setup, monkeypatch, tmp_path):
  """A work directory whose restore_for_eval and load_split are stand-ins."""
  model, variables, _, images, labels = setup
  calls = {"restore": 0, "load": 0}
  config = ml_collections.ConfigDict(dict(
      dataset="toy", eps=8.0, model=dict(name="simple_cnn", kwargs=dict(filters=4)),
      attack=dict(name="fgsm"),
      data=dict(source="local", data_dir="", local_path="/nowhere")))

  def restore_for_eval(workdir, which="best"):
    calls["restore"] += 1
    if which != "best":
      raise FileNotFoundError(f"No {which!r} checkpoint in {workdir!r}.")
    return restore.Restored(model, variables, config, 7)

  def load_split(dataset, split, progress=True, **kwargs):
    calls["load"] += 1
    assert (dataset, split) == ("toy", "test")
    assert kwargs["local_path"] == "/nowhere"
    return images, labels

  for name, attr, fn in (("restore", "restore_for_eval", restore_for_eval),
                         ("data", "load_split", load_split)):
    try:
      module = __import__(f"fastadv_jax.{name}", fromlist=[attr])
    except ImportError:
      module = types.ModuleType(f"fastadv_jax.{name}")
      monkeypatch.setitem(sys.modules, f"fastadv_jax.{name}", module)
      monkeypatch.setattr(fastadv_jax, name, module, raising=False)
    monkeypatch.setattr(module, attr, fn, raising=False)
  workdir = tmp_path / "run"
  workdir.mkdir()
  return str(workdir), calls


def test_evaluate_workdir_writes_record(fake_run, pgd_batch4):
  workdir, calls = fake_run
  record = evaluate.evaluate_workdir(workdir, checkpoint="best", n=6, seed=0,
                                     selection="random", batch_size=4, num_devices=1,
                                     progress=False, **PGD)
  path = os.path.join(workdir, "eval", "best_pgd_n6_random_seed0.json")
  assert record["path"] == path
  with open(path) as f:
    saved = json.load(f)
  assert saved["eps"] == pytest.approx(EPS)  # from config.eps = 8 (in /255)
  assert saved["metadata"]["checkpoint"] == "best"
  assert saved["metadata"]["checkpoint_step"] == 7
  assert os.stat(path).st_mode & 0o777 == 0o644
  assert saved["metadata"]["model"] == "simple_cnn"
  indices = evaluate.select_indices(NUM, 6, "random", 0)
  assert saved["robust_acc"] == pytest.approx(np.mean(pgd_batch4.correct[indices]))
  assert calls == {"restore": 1, "load": 1}


def test_evaluate_workdir_bad_arguments_load_nothing(fake_run):
  workdir, calls = fake_run
  with pytest.raises(ValueError, match="attack.*autoattack.*pgd"):
    evaluate.evaluate_workdir(workdir, attack="fgsm")
  with pytest.raises(ValueError, match="eps"):
    evaluate.evaluate_workdir(workdir, eps=0.0)
  with pytest.raises(ValueError, match="checkpoint"):
    evaluate.evaluate_workdir(workdir, checkpoint="newest")
  with pytest.raises(ValueError, match="n=0"):
    evaluate.evaluate_workdir(workdir, n=0)
  assert calls == {"restore": 0, "load": 0}
  with pytest.raises(FileNotFoundError, match="'last' checkpoint"):
    evaluate.evaluate_workdir(workdir, checkpoint="last")
  with pytest.raises(FileNotFoundError, match="work directory"):
    evaluate.evaluate_workdir(os.path.join(workdir, "missing"))
  # n larger than the (toy, 10-example) test set: found once the data is known
  with pytest.raises(ValueError, match="n=11.*10"):
    evaluate.evaluate_workdir(workdir, n=11)
  assert not os.path.exists(os.path.join(workdir, "eval"))


AA = dict(n_iter=3, n_queries=40, checks=False)


def test_autoattack_accuracy_and_record(setup):
  _, _, logits_fn, images, labels = setup
  clean = evaluate.clean_accuracy(logits_fn, images, labels, batch_size=4,
                                  num_devices=1)
  result = evaluate.autoattack_accuracy(logits_fn, images, labels, 0, eps=EPS,
                                        batch_size=4, progress=False, **AA)
  assert result.correct.shape == (NUM,) and result.correct.dtype == bool
  assert not np.any(result.correct & ~clean.correct)
  assert result.accuracy < clean.accuracy
  record = evaluate.evaluate(logits_fn, images, labels, 0, attack="autoattack", eps=EPS,
                             n=NUM, selection="first", batch_size=4, num_devices=1,
                             autoattack_kwargs=AA, progress=False)
  # same key (seed 0), points and chunking: the same result
  assert record["robust_acc"] == pytest.approx(result.accuracy)
  assert record["attack"]["name"] == "autoattack"
  assert record["attack"]["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
  assert record["attack"]["n_iter"] == 3 and record["attack"]["n_queries"] == 40
  stages = record["attack"]["robust_acc_after_stage"]
  assert stages["clean"] == pytest.approx(0.7)
  assert stages["square"] == pytest.approx(result.accuracy)
  assert json.loads(json.dumps(record)) == record
  with pytest.raises(ValueError, match="num_devices=9"):
    evaluate.autoattack_accuracy(logits_fn, images, labels, 0, eps=EPS, num_devices=9)


# ----------------------------------------------------------------------------
# robustness_metrics: one engine, one definition.

METRIC_PGD = dict(pgd_steps=3, pgd_restarts=2)
TRACES = []  # shapes seen by BNNet.__call__ (eager calls, init and traces under jit)


class BNNet(nn.Module):
  """conv -> BatchNorm -> ReLU -> dense; records every (traced) call."""

  @nn.compact
  def __call__(self, x, train=False):
    TRACES.append(x.shape)
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(10)(x)


def _bn_variables(seed):
  """Variables of BNNet with running statistics far from a batch's, so eval
  mode differs from batch mode."""
  return far_running_statistics(BNNet().init(jax.random.key(seed), jnp.zeros((1, 8, 8, 3))),
                                seed)


@pytest.fixture(scope="module")
def bn_setup(setup):
  _, _, _, images, _ = setup
  logits_fn = closures.eval_logits_fn(BNNet(), _bn_variables(1))
  labels = np.asarray(jnp.argmax(logits_fn(images / 255.0), -1)).astype(np.int32)
  labels[:3] = (labels[:3] + 1) % 10
  return logits_fn, images, labels


@pytest.fixture(scope="module")
def bn_metrics(bn_setup):
  logits_fn, images, labels = bn_setup
  return evaluate.robustness_metrics(logits_fn, images, labels, 0, eps=EPS,
                                     batch_size=4, num_devices=1, **METRIC_PGD)


def test_robustness_metrics_definitions(bn_setup, bn_metrics):
  logits_fn, images, labels = bn_setup
  m = bn_metrics
  assert set(m) == set(evaluate.DEFAULT_METRICS) | {"n", "grad_alignment_n"}
  assert m["n"] == NUM and m["grad_alignment_n"] == NUM
  assert m["clean_acc"] == pytest.approx(0.7)
  # robust means correct at x and at x + delta
  assert m["pgd_acc"] <= m["clean_acc"] and m["fgsm_acc"] <= m["clean_acc"]
  assert m["pgd_acc"] < m["clean_acc"]  # the attack bites
  assert -1 <= m["cos_fgsm_pgd"] <= 1 and -1 <= m["grad_alignment"] <= 1
  # the same per-example code as pgd_accuracy (which attacks only the
  # clean-correct points): the same key and ids give the same accuracy
  pgd = evaluate.pgd_accuracy(logits_fn, images, labels, 0, eps=EPS, batch_size=4,
                              num_devices=1, steps=3, restarts=2, progress=False)
  assert m["pgd_acc"] == pytest.approx(pgd.accuracy)
  clean = evaluate.clean_accuracy(logits_fn, images, labels, batch_size=4,
                                  num_devices=1)
  assert m["clean_acc"] == pytest.approx(clean.accuracy)
  # only the requested metrics are computed and returned
  only = evaluate.robustness_metrics(logits_fn, images, labels, 0, eps=EPS,
                                     metrics=["pgd_acc", "clean_acc"], batch_size=4,
                                     num_devices=1, **METRIC_PGD)
  assert only == {"clean_acc": m["clean_acc"], "pgd_acc": m["pgd_acc"], "n": NUM}


def test_landscape_metrics_match_their_definitions(bn_setup):
  """AdvLC's IG and input-Hessian top eigenvalue, per example: the engine's
  values equal ‖∇ₓℓ(x)‖₁ and the exact Hessian's largest-magnitude eigenvalue."""
  logits_fn, images, labels = bn_setup
  m = evaluate.robustness_metrics(logits_fn, images, labels, 0, eps=EPS,
                                  metrics=["input_grad_l1", "hessian_top"], batch_size=4,
                                  num_devices=1)
  assert set(m) == {"input_grad_l1", "hessian_top", "n"}
  x = images.astype(np.float32) / 255.0
  l1, top = [], []
  for xi, yi in zip(x, labels):
    loss = lambda v, yi=yi: closures.cross_entropy(logits_fn, jnp.asarray([yi]))(v[None])
    l1.append(float(jnp.sum(jnp.abs(jax.grad(loss)(xi)))))
    eig = np.linalg.eigvalsh(np.asarray(jax.hessian(loss)(xi)).reshape(xi.size, xi.size))
    top.append(float(eig[np.argmax(np.abs(eig))]))
  assert m["input_grad_l1"] == pytest.approx(np.mean(l1), rel=1e-5)
  assert m["hessian_top"] == pytest.approx(np.mean(top), rel=1e-3)


def test_robustness_metrics_independent_of_batch_and_devices(bn_setup, bn_metrics):
  assert jax.local_device_count() == 8
  logits_fn, images, labels = bn_setup
  for batch_size, num_devices in ((NUM, 1), (8, 8)):
    other = evaluate.robustness_metrics(logits_fn, images, labels, 0, eps=EPS,
                                        batch_size=batch_size, num_devices=num_devices,
                                        **METRIC_PGD)
    for name in ("clean_acc", "fgsm_acc", "pgd_acc", "n", "grad_alignment_n"):
      assert other[name] == bn_metrics[name], (name, batch_size, num_devices)
    for name in ("grad_alignment", "cos_fgsm_pgd"):
      assert other[name] == pytest.approx(bn_metrics[name], abs=1e-5)
  # another key gives other draws
  other = evaluate.robustness_metrics(logits_fn, images, labels, 1, eps=EPS,
                                      metrics=["grad_alignment"], batch_size=4,
                                      num_devices=1)
  assert other["grad_alignment"] != bn_metrics["grad_alignment"]


def test_grad_alignment_matches_metrics_by_hand(bn_setup, bn_metrics):
  """GradAlign Eq. 5 per example equals metrics.gradient_alignment on the batch
  (eval-mode BatchNorm: the examples do not interact) with the same eta."""
  logits_fn, images, labels = bn_setup
  x = jnp.asarray(images, jnp.float32) / 255.0
  key = jax.random.key(0)

  def eta(i):
    key_eta = jax.random.split(jax.random.fold_in(key, i))[1]
    return jax.random.uniform(key_eta, (1,) + x.shape[1:], jnp.float32, -EPS, EPS)[0]

  etas = jnp.stack([eta(i) for i in range(NUM)])
  cos, valid = metrics.gradient_alignment(closures.cross_entropy(logits_fn, labels), x,
                                          eps=EPS, eta=etas, reduce="none",
                                          return_valid=True)
  assert bool(jnp.all(valid))
  assert bn_metrics["grad_alignment"] == pytest.approx(float(jnp.mean(cos)), abs=1e-5)


def test_grad_alignment_mean_drops_zero_gradients(setup):
  """Examples with an exactly zero input gradient are left out of the mean; a
  plain Python callable works as the closure."""
  _, _, _, images, _ = setup
  w = jnp.asarray(np.random.default_rng(0).normal(size=(8 * 8 * 3, 10)), jnp.float32)

  def dead_below_half(x):  # ReLU dead everywhere below 0.6: zero gradient there
    return jax.nn.relu(x - 0.6).reshape(x.shape[0], -1) @ w

  x = images.astype(np.float32) / 255.0
  x[:4] *= 0.5  # all pixels < 0.5, also after eta: zero gradients
  labels = np.zeros(NUM, np.int32)
  m = evaluate.robustness_metrics(dead_below_half, x, labels, 0, eps=EPS,
                                  metrics=["grad_alignment"], batch_size=NUM,
                                  num_devices=1)
  assert m["grad_alignment_n"] == NUM - 4
  by_hand = evaluate.robustness_metrics(dead_below_half, x[4:], labels[4:], 0, eps=EPS,
                                        metrics=["grad_alignment"], batch_size=NUM,
                                        num_devices=1, example_ids=np.arange(4, NUM))
  assert m["grad_alignment"] == pytest.approx(by_hand["grad_alignment"], abs=1e-6)


def test_eps_and_checkpoint_do_not_retrace(bn_setup):
  """eps and the step are traced arguments, the weights are leaves of the
  closure: a new radius or another checkpoint of the model reuses the program."""
  _, images, _ = bn_setup
  kwargs = dict(metrics=["clean_acc", "pgd_acc"], batch_size=4, num_devices=1,
                pgd_steps=2)
  first = closures.eval_logits_fn(BNNet(), _bn_variables(2))
  second = closures.eval_logits_fn(BNNet(), _bn_variables(3))  # (init traces too)
  labels = np.asarray(jnp.argmax(first(images / 255.0), -1)).astype(np.int32)
  labels2 = np.asarray(jnp.argmax(second(images / 255.0), -1)).astype(np.int32)
  labels2[:3] = (labels2[:3] + 1) % 10
  result = evaluate.robustness_metrics(first, images, labels, 0, eps=EPS, **kwargs)
  assert result["clean_acc"] == 1.0  # all points attacked
  traced = len(TRACES)
  evaluate.robustness_metrics(first, images, labels, 0, eps=2 / 255, **kwargs)
  # another checkpoint, another key, step and radius; fewer clean-correct
  # points (the attacked subset keeps the batch shape)
  other = evaluate.robustness_metrics(second, images, labels2, 3, eps=4 / 255,
                                      pgd_step=1 / 255, **kwargs)
  assert 0 < other["clean_acc"] < 1  # a subset is attacked
  assert len(TRACES) == traced
  # a different static setting does compile anew
  evaluate.robustness_metrics(first, images, labels, 0, eps=EPS,
                              **dict(kwargs, pgd_steps=1))
  assert len(TRACES) > traced


def test_robustness_metrics_bad_arguments(bn_setup):
  logits_fn, images, labels = bn_setup
  with pytest.raises(ValueError, match="metric.*'pgd'.*clean_acc"):
    evaluate.robustness_metrics(logits_fn, images, labels, 0, eps=EPS, metrics=["pgd"])
  with pytest.raises(ValueError, match="metrics"):
    evaluate.robustness_metrics(logits_fn, images, labels, 0, eps=EPS, metrics=[])
  with pytest.raises(ValueError, match="pgd_steps.*0"):
    evaluate.robustness_metrics(logits_fn, images, labels, 0, eps=EPS, pgd_steps=0)
  with pytest.raises(ValueError, match="restart rule.*'best'"):
    evaluate.robustness_metrics(logits_fn, images, labels, 0, eps=EPS, rule="best")


# ----------------------------------------------------------------------------
# Named evaluations.


def test_resolve_evals_fills_defaults_and_accepts_configdict():
  evals = ml_collections.ConfigDict({"test": {"n": 500, "metrics": ["pgd_acc"]},
                                     "final": {"every_epochs": 0, "at_end": True,
                                               "pgd_steps": 50, "pgd_restarts": 10}})
  resolved = evaluate.resolve_evals(evals, split_sizes={"test": 10000, "train": 50000})
  assert resolved["test"] == dict(evaluate.EVAL_DEFAULTS, n=500, metrics=["pgd_acc"])
  assert resolved["final"]["pgd_restarts"] == 10 and resolved["final"]["at_end"]
  assert json.loads(json.dumps(resolved)) == resolved  # serializable
  evaluate.validate_evals({})  # no evaluations is fine


BAD_EVALS = [
    # (entry, split_sizes, message fragments: the eval, the key, the value, the choices)
    ({"spilt": "test"}, None, r"evals\['e'\].*unknown key 'spilt'.*'split'"),
    ({"split": "val"}, None, r"evals\['e'\]\.split='val'.*'test'"),
    ({"split": "val"}, {"test": 10, "holdout": 5}, r"split='val'.*'holdout'"),
    ({"n": 0}, None, r"evals\['e'\]\.n=0.*>= 1"),
    ({"n": 2.5}, None, r"n=2\.5.*integer"),
    ({"n": 11}, {"test": 10}, r"n=11.*'test' split \(10 examples\)"),
    ({"selection": "last"}, None, r"selection='last'.*\['random', 'first'\]"),
    ({"every_epochs": -1}, None, r"every_epochs=-1.*>= 0"),
    ({"every_epochs": 1, "every_steps": 100}, None, r"every_epochs=1 and every_steps=100"),
    ({"every_epochs": 0}, None, r"never run"),
    ({"at_end": "yes"}, None, r"at_end='yes'"),
    ({"batch_size": 0}, None, r"batch_size=0"),
    ({"metrics": ["pgd_acc", "auto_acc"]}, None, r"metric 'auto_acc'.*'clean_acc'"),
    ({"metrics": []}, None, r"metrics=\[\].*non-empty"),
    ({"metrics": "pgd_acc"}, None, r"metrics='pgd_acc'"),
    ({"metrics": ["pgd_acc", "pgd_acc"]}, None, r"twice"),
    ({"pgd_steps": 0}, None, r"pgd_steps=0"),
    ({"pgd_restarts": True}, None, r"pgd_restarts=True"),
    ({"pgd_step_fraction": 0.0}, None, r"pgd_step_fraction=0\.0"),
    ({"rule": "best"}, None, r"rule='best'.*\['strict', 'max_loss'\]"),
]


@pytest.mark.parametrize("entry,split_sizes,message", BAD_EVALS)
def test_validate_evals_rejects(entry, split_sizes, message):
  with pytest.raises(ValueError, match=message):
    evaluate.validate_evals({"e": entry}, split_sizes=split_sizes)


def test_validate_evals_rejects_bad_names_and_entries():
  with pytest.raises(ValueError, match="name 'test/pgd'"):
    evaluate.validate_evals({"test/pgd": {}})
  with pytest.raises(ValueError, match=r"evals\['e'\] must be a dict.*list"):
    evaluate.validate_evals({"e": ["n", 3]})
  with pytest.raises(ValueError, match="evals must be a dict"):
    evaluate.validate_evals([("e", {})])


def test_run_named_eval_selects_points_with_their_ids(bn_setup, bn_metrics):
  logits_fn, images, labels = bn_setup
  settings = dict(n=6, selection="random", seed=0, batch_size=4, pgd_steps=3,
                  pgd_restarts=2)
  result = evaluate.run_named_eval(settings, logits_fn, images, labels, 0, eps=EPS,
                                   num_devices=1)
  indices = evaluate.select_indices(NUM, 6, "random", 0)
  direct = evaluate.robustness_metrics(
      logits_fn, images[indices], labels[indices], 0, eps=EPS, batch_size=4,
      num_devices=1, example_ids=indices, **METRIC_PGD)
  assert result == direct and result["n"] == 6
  with pytest.raises(ValueError, match="n=11"):
    evaluate.run_named_eval(dict(settings, n=11), logits_fn, images, labels, 0, eps=EPS)

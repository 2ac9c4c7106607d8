"""The method contract: config -> Method -> train step, for every registered method.

* Wiring: for every (attack, regularizer) pair, the regularizer's value inside
  the train step equals the standalone function evaluated at what its spec
  says it consumes, each quantity computed here from its definition.
* AT for Free runs the published number of steps under one schedule.
* A bad keyword in an attack or regularizer section fails before the workdir
  exists (through the CLI).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fastadv_jax import attacks
from fastadv_jax import closures
from fastadv_jax import config_base
from fastadv_jax import methods
from fastadv_jax import regularizers
from fastadv_jax import train
from fastadv_jax import train_state
from fastadv_jax import train_step
from fastadv_jax.train_state import AXIS
import method_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (8, 8, 3)
BATCH = 8

def pair_config(attack_name, *reg_names):
  config = config_base.load_config_file(os.path.join(REPO, "configs", "cifar10.py"), "fgsm")
  config.model.name = "simple_cnn"
  config.model.kwargs = ml_collections.ConfigDict({"filters": 2})
  config.dtype = "float32"
  config.batch_size = BATCH
  # The attack's test-table row, as a config section (the step in /255).
  kwargs = dict(method_rows.attack_row(attack_name)["kwargs"])
  config.attack.name = attack_name
  config.attack.step = kwargs.pop("step") * 255 if "step" in kwargs else None
  config.attack.kwargs = ml_collections.ConfigDict(kwargs)
  config.regularizers = ml_collections.ConfigDict(
      {name: dict(method_rows.regularizer_row(name), weight=1.0, lambda_rule="")
       for name in reg_names})
  return config


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (BATCH,) + SHAPE).astype(np.uint8),
          "label": rng.integers(0, 10, BATCH).astype(np.int32),
          "index": np.arange(BATCH, dtype=np.int32)}


def step_and_standalone(attack_name):
  """{regularizer: (value in the train step, value from the spec's definitions)}.

  One train step with every registered regularizer at once: each reports its
  own value, and the quantities it consumes do not depend on the others.
  """
  config = pair_config(attack_name, *sorted(regularizers.REGULARIZER_SPECS))
  method = config_base.validate_config(config)
  model = train_state.create_model(config)
  tx = train_state.create_optimizer(config, 10)
  state = train_state.create_train_state(config, method, model, tx, jax.random.PRNGKey(0),
                                         SHAPE, BATCH)
  # A nonzero carried perturbation, so that its start differs from x.
  if method.attack.spec.carried is not None:
    state = state.replace(attack_state=jax.random.uniform(
        jax.random.PRNGKey(5), state.attack_state.shape, minval=-method.eps,
        maxval=method.eps))
  augment = train.make_augment(config)
  step = train_step.make_train_step(model, tx, method, steps_per_epoch=10,
                                    seed=config.seed, augment=augment)
  batch = _batch()
  # vmap with the axis name: the per-device step on one device.
  _, metrics = jax.jit(jax.vmap(step, axis_name=AXIS))(
      jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], state),
      jax.tree_util.tree_map(lambda a: a[None], batch))

  # The same quantities, each from its definition.
  attack_key, reg_key = train_step.step_keys(config.seed, jnp.int32(0), 0)
  x = augment(jnp.asarray(batch["image"]), jnp.asarray(batch["index"]),
              train_step.augmentation_key(config.seed, jnp.int32(0), method.attack.replays))
  y = jnp.asarray(batch["label"])
  variables = train_state.model_variables(state.params, state.batch_stats)
  logits_fn = closures.logits_fn(model, variables, bn="batch")
  loss_fn = closures.cross_entropy(logits_fn, y)
  spec = method.attack.spec
  if spec.carried is not None:
    delta = attacks.project_box(x, state.attack_state)
    start = x + delta
  else:
    kwargs = dict(method.attack.kwargs, **method.attack.traced)
    if method.attack.step is not None:
      kwargs["step"] = method.attack.step
    out = spec.fn(loss_fn, x, attack_key, eps=method.eps, **kwargs)
    delta, start = out.delta, out.start
  quantities = {
      "loss_fn": loss_fn, "logits_fn": logits_fn, "x": x, "labels": y, "delta": delta,
      "start": start, "grad_at_start": jax.grad(loss_fn)(start),
      "grad_at_clean": jax.grad(loss_fn)(x), "logits_adv": logits_fn(x + delta),
      "eps": method.eps, "step_index": jnp.int32(0)}
  values = {}
  for i, reg in enumerate(method.regularizers):
    quantities["key"] = jax.random.fold_in(reg_key, i)
    args = {arg: quantities[q] for arg, q in reg.spec.consumes.items()}
    values[reg.name] = (float(metrics[f"train/reg/{reg.name}"][0]),
                        float(reg.fn(**args, **reg.hparams)))
  return values


@pytest.mark.parametrize("attack_name", sorted(attacks.ATTACK_SPECS))
def test_regularizer_values_in_the_step_equal_their_definitions(attack_name):
  """Every (attack, regularizer) pair: the step builds what each spec consumes."""
  mismatches = [f"{reg}: step {a:.6g} vs definition {b:.6g}"
                for reg, (a, b) in step_and_standalone(attack_name).items()
                if not np.isclose(a, b, rtol=2e-4, atol=1e-6)]
  assert not mismatches, "\n".join(mismatches)


def test_gradient_reuse_follows_the_spec():
  """CURE's ∇ℓ(x) is the attack's own gradient only when the attack started at x."""
  for name, expect in (("fgsm", True), ("fgsm_rs", False), ("zerograd", False),
                       ("multigrad", False)):
    method = methods.build_method(pair_config(name, "cure"))
    assert method.attack.gradient_at_clean is expect, name
  pgd = pair_config("pgd", "cure")
  assert not methods.build_method(pgd).attack.gradient_at_clean  # random start
  pgd.attack.kwargs.random_start = False
  assert methods.build_method(pgd).attack.gradient_at_clean


def test_method_converts_units_once():
  config = pair_config("fgsm_rs", "grad_align")
  config.eps = 16.0
  method = methods.build_method(config)
  assert method.eps == pytest.approx(16 / 255)
  assert method.attack.step == pytest.approx(1.25 * 16 / 255)  # the spec's default
  config.attack.step = 4.0
  assert methods.build_method(config).attack.step == pytest.approx(4 / 255)
  config = pair_config("zerograd", "grad_align")
  assert methods.build_method(config).hparam_names == ["attack/q", "reg/grad_align"]


# --------------------------------------------------------------------------
# AT for Free: replays are steps of one schedule.


def test_free_runs_the_published_number_of_steps(monkeypatch, tmp_path):
  """GradAlign's Free: 96 epochs of 390 steps (37,440), m = 8, one schedule."""
  config = config_base.load_config_file(os.path.join(REPO, "configs", "cifar10.py"), "free")
  config.model.name = "simple_cnn"
  config.model.kwargs = ml_collections.ConfigDict({"filters": 2})
  images = np.zeros((50000,) + SHAPE, np.uint8)
  labels = np.zeros((50000,), np.int32)
  monkeypatch.setattr(train, "load_data", lambda c, progress=True: (
      train.ArrayTrainData(images, labels, c.batch_size, c.seed), (images[:1000], labels[:1000])))
  method = config_base.validate_config(config)
  run = train._Run(config, method, str(tmp_path), progress=False)
  assert run.num_steps == 96 * 390 == 37440
  assert run.replays == 8
  # The schedule spans exactly the steps run: positive until its end (read one
  # step ahead, as in the GradAlign code, so the last step has its last value, 0).
  assert float(run.lr_fn(37438)) > 0
  assert float(run.lr_fn(37439)) == 0.0
  peak = int(np.argmax([float(run.lr_fn(s)) for s in range(0, 37440, 39)])) * 39
  assert abs(peak - 0.4 * 37440) <= 39
  # Step t trains on data batch t // 8: 12 passes over the data in all.
  batches = run.device_batches(8 * 390 - 1)  # the 8th replay of epoch 0's last batch
  first = next(batches)
  np.testing.assert_array_equal(first["index"].reshape(-1),
                                np.arange(390 * 128 - 128, 390 * 128))
  assert next(batches)["index"].reshape(-1)[0] == 0  # the next pass over the data


def test_free_replays_one_minibatch_and_updates_its_perturbation(tmp_path):
  config = pair_config("free", "grad_align")
  config.regularizers = ml_collections.ConfigDict()
  config.attack.kwargs.replays = 3
  method = config_base.validate_config(config)
  model = train_state.create_model(config)
  tx = train_state.create_optimizer(config, 10)
  state = train_state.create_train_state(config, method, model, tx, jax.random.PRNGKey(0),
                                         SHAPE, BATCH)
  augment = train.make_augment(config)
  step = jax.pmap(train_step.make_train_step(model, tx, method, steps_per_epoch=10,
                                             seed=0, augment=augment), axis_name=AXIS,
                  devices=jax.local_devices()[:1])
  r_state = train_state.to_devices(state, jax.local_devices()[:1])
  batch = jax.tree_util.tree_map(lambda a: a[None], _batch())
  deltas = []
  for _ in range(3):
    r_state, _ = step(r_state, batch)
    deltas.append(np.asarray(r_state.attack_state[0]))
  x = np.asarray(augment(jnp.asarray(batch["image"][0]), jnp.asarray(batch["index"][0]),
                         train_step.augmentation_key(0, jnp.int32(0), 3)))
  for d in deltas:
    assert np.abs(d).max() <= method.eps + 1e-7
    assert (x + d).min() >= 0 and (x + d).max() <= 1
  # Each replay moves δ by one signed step of ε (clipped): it accumulates.
  assert not np.allclose(deltas[0], deltas[1])


# --------------------------------------------------------------------------
# Bad method settings through the CLI: refused before the workdir exists.


@pytest.mark.parametrize("flag,message", [
    ("--config.attack.kwargs.q=1.5", "q must lie in [0.0, 1.0], got 1.5"),
    ("--config.regularizers.grad_align.formulation=fast", "formulation"),
])
def test_bad_method_settings_fail_before_the_workdir_exists(tmp_path, flag, message):
  variant = "zerograd" if "attack" in flag else "gradalign"
  workdir = tmp_path / "run"
  res = subprocess.run(
      [sys.executable, "-c", "from fastadv_jax.cli import train_main; train_main()",
       f"--config={os.path.join(REPO, 'configs', 'cifar10.py')}:{variant}",
       f"--workdir={workdir}", flag],
      capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert res.returncode != 0
  assert message in res.stderr, res.stderr[-2000:]
  assert not workdir.exists()

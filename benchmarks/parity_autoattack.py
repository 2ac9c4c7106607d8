"""AutoAttack parity: fastadv_jax (JAX) against torchattacks (PyTorch).

The same small model in Flax and in PyTorch with identical weights (the PyTorch
twin from `tests/torch_reference/torch_models.py`, weights copied by
`fastadv_jax.interop.flax_to_torch_state_dict`), the same CIFAR-10 (JPEG) test
points, and for each attack (APGD-CE, APGD-T, FAB-T, Square, the standard
AutoAttack ensemble, and PGD-50-10) the robust accuracy in both frameworks and
the speed in images per second, side by side.

The model: an attack comparison on a model with 0% robust accuracy says nothing,
so the script adversarially trains (PGD-2, random start, in JAX) the single-layer
CNN of the GradAlign paper (`simple_cnn`, `--filters` filters) on CIFAR-10 for a
few epochs and caches the weights in `~/.cache/fastadv_jax/parity_autoattack/`.

Attack settings are the same on both sides (they are printed and stored):
APGD-CE, APGD-T (9 targets) and FAB-T (9 targets) with `--aa-iters` iterations
and Square with `--square-queries` queries, p_init 0.8, *without* rescaling the
p schedule (fra31/auto-attack; torchattacks' `Square` rescales by default,
switched off here). The defaults fit a small shared CPU: 10 iterations (what
torchattacks' own `AutoAttack` class uses; Croce & Hein use 100) and 1,000
Square queries (AutoAttack: 5,000); on a GPU run `--aa-iters 100
--square-queries 5000` for the standard ensemble. The ensemble on the PyTorch
side is torchattacks' `MultiAttack` of the four attacks, each run on the points
still robust, exactly like its `AutoAttack` class; on the JAX side
`fastadv_jax.autoattack.autoattack`. PGD-50-10 uses step ε/4 and random starts;
on the PyTorch side torchattacks' `PGD` is run 10 times and a point is robust
only if no restart fools it (the "strict" rule of `fastadv_jax.evaluate`).

Robust accuracy is measured the same way on both sides: a point counts as robust
if the model classifies it correctly at x and at the returned adversarial point.

Work: only correctly classified points are attacked, on both sides (the
others are not robust), as AutoAttack does. Speed is reported as test points
evaluated per second (all n points, misclassified ones included), wall clock,
JAX without its compilation (lowering and compile seconds, from
`jax.monitoring` events, are subtracted; the time with them is stored too).
Both frameworks run with one CPU thread by default (`--threads`), and the ratio
is also given from process CPU seconds, which a shared machine's load disturbs
much less than wall time.

Usage (from the repository root):

  python benchmarks/parity_autoattack.py                # n=500, the full check
  python benchmarks/parity_autoattack.py --quick        # n=64, reduced budgets
  python benchmarks/parity_autoattack.py --standard --n 1000 --threads 0 \
      --batch-size 500 --torch-device cuda             # a GPU: torchattacks on it too

Results: printed table, and JSON in benchmarks/results/parity_autoattack.json
(or --out). Exit status 1 when parity fails (see --tolerance).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import time
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "torch_reference"))  # torch_models
sys.path.insert(0, os.path.dirname(HERE))  # fastadv_jax from a checkout
sys.path.insert(0, HERE)  # xla_threads


import xla_threads  # pylint: disable=g-import-not-at-top,wrong-import-position

THREADS = xla_threads.preparse_threads(sys.argv[1:]) if __name__ == "__main__" else 0

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from fastadv_jax import attacks  # noqa: E402
from fastadv_jax import closures  # noqa: E402
from fastadv_jax import evaluate  # noqa: E402
from fastadv_jax import interop  # noqa: E402
from fastadv_jax import models  # noqa: E402
from fastadv_jax.autoattack.ensemble import padded_chunks  # noqa: E402

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "fastadv_jax",
                         "parity_autoattack")
ENSEMBLE = ("apgd-ce", "apgd-t", "fab-t", "square")


# ----------------------------------------------------------------------------
# Data and model.


def load_cifar10(split: str):
  from fastadv_jax import data  # pylint: disable=g-import-not-at-top
  images, labels = data.load_split("cifar10", split, source="local", progress=False)
  return np.asarray(images), np.asarray(labels, np.int32)


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def _unflatten(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    parts = path.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = jnp.asarray(value)
  return tree


def model_cache(args):
  """(training settings, cache path): the weights are cached by their settings."""
  settings = dict(model="simple_cnn", filters=args.filters, train_eps=args.train_eps,
                  epochs=args.epochs, batch=128, lr=args.lr, seed=args.train_seed,
                  attack="pgd2_rs", augment="crop4_flip", version=1)
  tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
  return settings, os.path.join(CACHE_DIR, f"simple_cnn_f{args.filters}_{tag}.npz")


def train_or_load(args):
  """PGD-2 adversarially trained simple_cnn: from the cache, else trained here.

  Returns:
    (model, variables, settings, cache path, training seconds).
  """
  settings, path = model_cache(args)
  model = models.get_model("simple_cnn", filters=args.filters)
  if os.path.exists(path) and not args.retrain:
    with np.load(path) as f:
      variables = _unflatten({k: f[k] for k in f.files})
    print(f"Loaded the trained model from {path}")
    return model, variables, settings, path, 0.0

  from fastadv_jax import data  # pylint: disable=g-import-not-at-top
  print(f"Training simple_cnn({args.filters}) with PGD-2 at eps {args.train_eps:g}/255 "
        f"for {args.epochs} epochs (cached afterwards)")
  train_images, train_labels = load_cifar10("train")
  start = time.time()
  key = jax.random.key(args.train_seed)
  variables = models.init_variables(model, jax.random.fold_in(key, 0))
  params = variables["params"]
  steps_per_epoch = len(train_images) // 128
  total = steps_per_epoch * args.epochs
  # GradAlign's single-layer CNN recipe: Adam, cyclic learning rate, wd 5e-4.
  schedule = optax.linear_onecycle_schedule(total, args.lr, pct_start=0.4,
                                            div_factor=1e4, final_div_factor=1e4)
  tx = optax.adamw(schedule, weight_decay=5e-4)
  opt_state = tx.init(params)
  eps = args.train_eps / 255

  @jax.jit
  def train_step(params, opt_state, images, labels, step_key):
    aug_key, attack_key = jax.random.split(step_key)
    x = data.augment(images, aug_key, padding=4, flip=True)
    logits_fn = closures.logits_fn(model, {"params": params}, bn="eval")
    delta = attacks.pgd(closures.cross_entropy(logits_fn, labels), x, attack_key,
                        eps=eps, step=eps / 2, steps=2).delta
    x_adv = jax.lax.stop_gradient(x + delta)

    def loss(p):
      logits = model.apply({"params": p}, x_adv)
      return closures.cross_entropy_per_example(logits, labels).mean(), logits

    (value, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return optax.apply_updates(params, updates), opt_state, value, acc

  rng = np.random.default_rng(args.train_seed)
  for epoch in range(args.epochs):
    order = rng.permutation(len(train_images))
    losses, accs = [], []
    for i in range(steps_per_epoch):
      idx = order[i * 128:(i + 1) * 128]
      params, opt_state, value, acc = train_step(
          params, opt_state, train_images[idx], train_labels[idx],
          jax.random.fold_in(key, 1 + epoch * steps_per_epoch + i))
      losses.append(value)
      accs.append(acc)
    print(f"  epoch {epoch + 1}/{args.epochs}: adv. loss {np.mean(losses):.3f}, "
          f"adv. train acc {np.mean(accs):.3f} ({time.time() - start:.0f} s)", flush=True)
  variables = {"params": params}
  os.makedirs(CACHE_DIR, exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **_flatten(jax.device_get(variables)))
  os.replace(tmp, path)
  print(f"Saved the trained model to {path}")
  return model, variables, settings, path, time.time() - start


def torch_twin(model, variables, filters):
  import torch  # pylint: disable=g-import-not-at-top
  import torch_models  # pylint: disable=g-import-not-at-top
  net = torch_models.build_torch_model("simple_cnn", filters=filters)
  state = interop.flax_to_torch_state_dict(jax.device_get(variables), model)
  net.load_state_dict(state, strict=True)
  net.to(TORCH_DEVICE)
  net.eval()
  for p in net.parameters():
    p.requires_grad_(False)
  return net


# ----------------------------------------------------------------------------
# Running attacks in batches, timed.


class CompileClock:
  """Seconds JAX spends lowering and compiling (from `jax.monitoring` events).

  Lowering to MLIR and the backend compile (including persistent-cache reads)
  are counted; tracing is not (inner jits trace inside outer ones, so their
  durations would overlap), which errs on the side of a slower JAX.
  """
  EVENTS = ("/jax/core/compile/backend_compile_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration")

  def __init__(self):
    self.seconds = 0.0
    self.events = []  # (time.perf_counter() at the end, duration)
    jax.monitoring.register_event_duration_secs_listener(self._record)

  def _record(self, event, duration, **kwargs):
    del kwargs
    if event in self.EVENTS:
      self.seconds += duration
      self.events.append((time.perf_counter(), duration))

  def within(self, start, end):
    """Compile seconds of the events that ended in [start, end]."""
    return sum(d for t, d in self.events if start <= t <= end)


COMPILE_CLOCK = None
TORCH_DEVICE = "cpu"  # --torch-device


class Timer:
  """Wall-clock and process CPU seconds of an attack, and JAX compile seconds.

  CPU time is the fairer measure on a shared machine (with one thread per
  framework it counts the work done, not the waiting for a core).
  """

  def __init__(self):
    self.wall_s = 0.0
    self.cpu_s = 0.0
    self.compile_s = 0.0

  def run(self, fn):
    compiled_before = COMPILE_CLOCK.seconds if COMPILE_CLOCK else 0.0
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    self.wall_s += time.perf_counter() - wall
    self.cpu_s += time.process_time() - cpu
    if COMPILE_CLOCK:
      self.compile_s += COMPILE_CLOCK.seconds - compiled_before
    return out

  def rates(self, n):
    """Images per second: wall, wall without compilation, CPU without compilation."""
    wall = max(self.wall_s, 1e-9)
    wall_run = max(self.wall_s - self.compile_s, 1e-9)
    # Compile events give wall seconds only: remove the same share of CPU time.
    cpu_run = max(self.cpu_s * wall_run / wall, 1e-9)
    return n / wall, n / wall_run, n / cpu_run


def run_jax_attack(name, logits_fn, images, labels, clean_correct, key, args, timer):
  """Robust mask (N,) of one JAX attack; only clean-correct points are attacked.

  Standalone attacks run in padded, masked chunks of `--batch-size` (the shape
  the ensemble's driver uses, so the ensemble reuses their compiled loops).
  """
  from fastadv_jax import autoattack as aa  # pylint: disable=g-import-not-at-top
  eps = args.eps / 255
  x_all = images.astype(np.float32) / 255
  if name == "autoattack":
    def ensemble():
      return aa.autoattack(logits_fn, x_all, labels, key, eps=eps, version="standard",
                           batch_size=args.batch_size, n_iter=args.aa_iters,
                           n_target_classes=9, n_queries=args.square_queries,
                           square_rescale_schedule=False, checks=False,
                           verbose=False)
    result = timer.run(ensemble)
    counts = _stage_counts(result.stage_fooled, clean_correct)
    timer.stages = {}
    for i, (name_, (t0, t1)) in enumerate(result.stage_times.items()):
      compile_s = COMPILE_CLOCK.within(t0, t1) if COMPILE_CLOCK else 0.0
      timer.stages[name_] = dict(points=int(counts[i]), wall_s=t1 - t0, compile_s=compile_s,
                                 run_s=max(t1 - t0 - compile_s, 1e-9),
                                 robust_after=int(counts[i + 1]))
    x_adv = np.asarray(result.x_adv)
    _check_ball("JAX", name, x_adv, x_all, eps)
    adv_ok = np.asarray(evaluate.clean_accuracy(
        logits_fn, x_adv, labels, batch_size=args.batch_size, num_devices=1).correct)
    robust = clean_correct & adv_ok
    if not np.array_equal(robust, np.asarray(result.robust)):
      print("   note: the ensemble's own robust mask differs from re-evaluation")
    return robust, {k: 100 * v for k, v in result.robust_accuracy.items()}

  attacked = np.flatnonzero(clean_correct)
  robust = np.zeros(len(images), bool)
  b = min(args.batch_size, len(images))  # the ensemble driver's chunk size
  if name == "pgd-50-10":
    # The library's evaluation: per-example keys, balanced padded batches,
    # strict restart rule; it attacks the clean-correct points only.
    def pgd():
      return evaluate.pgd_accuracy(
          logits_fn, images, labels, key, eps=eps, steps=50, restarts=10,
          rule="strict", batch_size=b, num_devices=1, clean_correct=clean_correct,
          progress=False).correct
    return timer.run(pgd), None

  for i, (chunk, n) in enumerate(padded_chunks(attacked, b)):
    x = jnp.asarray(x_all[chunk])
    y = jnp.asarray(labels[chunk])
    mask = jnp.arange(b) < n
    k = jax.random.fold_in(key, i)

    def attack():
      common = dict(eps=eps, mask=mask)
      if name == "apgd-ce":
        res = aa.apgd(logits_fn, x, y, k, loss="ce", n_iter=args.aa_iters, **common)
      elif name == "apgd-t":
        res = aa.apgd_targeted(logits_fn, x, y, k, n_iter=args.aa_iters,
                               n_target_classes=9, **common)
      elif name == "fab-t":
        res = aa.fab_targeted(logits_fn, x, y, k, n_iter=args.aa_iters,
                              n_target_classes=9, **common)
      elif name == "square":
        res = aa.square(logits_fn, x, y, k, n_queries=args.square_queries, p_init=0.8,
                        rescale_schedule=False, **common)
      else:
        raise ValueError(name)
      x_adv = np.asarray(res.x_adv)
      _check_ball("JAX", name, x_adv, np.asarray(x), eps)
      return np.asarray(jnp.argmax(logits_fn(jnp.asarray(x_adv)), -1) == y)

    robust[chunk[:n]] = timer.run(attack)[:n]
  return robust & clean_correct, None


def _stage_counts(stage_fooled, clean_correct):
  """Points entering each stage (stage 1: the clean-correct ones) and robust at the end."""
  stage_fooled = np.asarray(stage_fooled)
  counts = [int(np.sum(clean_correct))]
  for k in range(1, len(ENSEMBLE) + 1):
    counts.append(int(np.sum((stage_fooled == -1) | (stage_fooled > k))))
  return counts


def _check_ball(framework, name, x_adv, x, eps):
  linf = float(np.max(np.abs(x_adv - x)))
  if linf > eps + 1e-5 or x_adv.min() < 0 or x_adv.max() > 1:
    raise AssertionError(f"{framework} {name} left the eps-ball or the box: "
                         f"||delta|| = {linf * 255:.4f}/255")


def torch_attack(name, net, args):
  import torchattacks  # pylint: disable=g-import-not-at-top
  eps = args.eps / 255
  seed = args.seed
  if name == "apgd-ce":
    return torchattacks.APGD(net, norm="Linf", eps=eps, steps=args.aa_iters,
                             n_restarts=1, seed=seed, loss="ce", rho=0.75)
  if name == "apgd-t":
    return torchattacks.APGDT(net, norm="Linf", eps=eps, steps=args.aa_iters,
                              n_restarts=1, seed=seed, rho=0.75, n_classes=10)
  if name == "fab-t":
    return torchattacks.FAB(net, norm="Linf", eps=eps, steps=args.aa_iters,
                            n_restarts=1, seed=seed, multi_targeted=True, n_classes=10)
  if name == "square":
    return torchattacks.Square(net, norm="Linf", eps=eps, n_queries=args.square_queries,
                               n_restarts=1, p_init=0.8, loss="margin",
                               resc_schedule=False, seed=seed)
  if name == "autoattack":
    # torchattacks.AutoAttack(version="standard") with our iteration counts.
    return torchattacks.MultiAttack([torch_attack(a, net, args) for a in ENSEMBLE])
  raise ValueError(name)


def run_torch_attack(name, net, images, labels, clean_correct, args, timer):
  """Robust mask (N,) of one torchattacks attack, in batches of `--batch-size`.

  Standalone attacks and PGD get the clean-correct points only (as the JAX
  side); the ensemble gets all points (MultiAttack and APGD skip the
  misclassified ones themselves, as the JAX driver does).
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torchattacks  # pylint: disable=g-import-not-at-top
  eps = args.eps / 255
  torch.manual_seed(args.seed)
  if name == "autoattack":
    return run_torch_ensemble(net, images, labels, clean_correct, args, timer)
  attack = None if name == "pgd-50-10" else torch_attack(name, net, args)
  if name == "autoattack":
    points = np.arange(len(images))
  else:
    points = np.flatnonzero(clean_correct)
  robust = np.zeros(len(images), bool)
  for start in range(0, len(points), args.torch_batch_size):
    idx = points[start:start + args.torch_batch_size]
    x = torch.from_numpy(images[idx].astype(np.float32) / 255).permute(0, 3, 1, 2)
    x = x.contiguous().to(TORCH_DEVICE)
    y = torch.from_numpy(labels[idx].astype(np.int64)).to(TORCH_DEVICE)

    def run():
      if name == "pgd-50-10":
        pgd = torchattacks.PGD(net, eps=eps, alpha=eps / 4, steps=50, random_start=True)
        ok = torch.ones(len(idx), dtype=torch.bool, device=TORCH_DEVICE)
        for _ in range(10):  # strict rule: robust only if no restart fools it
          x_adv = pgd(x, y)
          with torch.no_grad():
            ok &= net(x_adv).argmax(1) == y
        return ok.cpu().numpy()
      x_adv = attack(x, y)
      x_adv = x_adv.detach()
      _check_ball("torch", name, x_adv.cpu().numpy(), x.cpu().numpy(), eps)
      with torch.no_grad():
        return (net(x_adv).argmax(1) == y).cpu().numpy()

    robust[idx] = timer.run(run)
  return robust & clean_correct


def run_torch_ensemble(net, images, labels, clean_correct, args, timer):
  """torchattacks' AutoAttack: `MultiAttack([APGD, APGDT, FAB, Square])`, timed per stage.

  The loop of `torchattacks.MultiAttack.forward`, line for line (each attack on
  the points its predecessors did not fool, decided by the model's argmax at
  the returned point), with a clock around each stage. All n points enter, as
  MultiAttack gets them (APGD skips the misclassified ones itself).
  """
  import torch  # pylint: disable=g-import-not-at-top
  eps = args.eps / 255
  torch.manual_seed(args.seed)
  x = torch.from_numpy(images.astype(np.float32) / 255).permute(0, 3, 1, 2).contiguous()
  x = x.to(TORCH_DEVICE)
  y = torch.from_numpy(labels.astype(np.int64)).to(TORCH_DEVICE)
  fails = torch.arange(len(images), device=TORCH_DEVICE)
  final = x.clone()
  timer.stages = {}
  for name in ENSEMBLE:
    attack = torch_attack(name, net, args)
    points = int(np.sum(clean_correct[fails.cpu().numpy()]))

    def stage():
      adv = attack(x[fails], y[fails]).detach()
      with torch.no_grad():
        pre = net(adv).argmax(1)
      pre.cpu()  # waits for the device: the stage's clock includes its kernels
      return adv, pre

    wall0 = timer.wall_s
    adv, pre = timer.run(stage)
    corrects = pre == y[fails]
    final[fails[~corrects]] = adv[~corrects]
    fails = fails[corrects]
    timer.stages[name] = dict(points=points, wall_s=timer.wall_s - wall0,
                              run_s=timer.wall_s - wall0,
                              robust_after=int(np.sum(clean_correct[fails.cpu().numpy()])))
    if len(fails) == 0:
      break
  _check_ball("torch", "autoattack", final.cpu().numpy(), x.cpu().numpy(), eps)
  with torch.no_grad():
    robust = (net(final).argmax(1) == y).cpu().numpy()
  return robust & clean_correct


# ----------------------------------------------------------------------------
# Main.


def machine_info():
  import torch  # pylint: disable=g-import-not-at-top
  import torchattacks  # pylint: disable=g-import-not-at-top
  info = {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
          "torch_device": str(TORCH_DEVICE),
          "torchattacks": torchattacks.__version__, "jax_device": evaluate.device_info()}
  try:
    info["load_average"] = os.getloadavg()
  except OSError:
    pass
  info.update(evaluate._versions())  # pylint: disable=protected-access
  return info


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--n", type=int, default=None,
                 help="test points (default 500; 64 with --quick)")
  p.add_argument("--quick", action="store_true",
                 help="n=64, 1 training epoch, fewer iterations/queries (smoke test)")
  p.add_argument("--eps", type=float, default=8.0, help="attack radius in /255")
  p.add_argument("--train-eps", type=float, default=8.0, help="training radius in /255")
  p.add_argument("--filters", type=int, default=16, help="simple_cnn filters")
  p.add_argument("--epochs", type=int, default=None, help="training epochs (default 3)")
  p.add_argument("--lr", type=float, default=0.003)
  p.add_argument("--train-seed", type=int, default=0)
  p.add_argument("--retrain", action="store_true", help="ignore the cached weights")
  p.add_argument("--seed", type=int, default=0, help="point selection and attacks")
  p.add_argument("--batch-size", type=int, default=100,
                 help="JAX chunk size (padded, masked; the ensemble's batch_size)")
  p.add_argument("--torch-batch-size", type=int, default=None,
                 help="points per torchattacks call (default: all n in one call, "
                 "the fastest: its attacks shrink to the unfooled points)")
  p.add_argument("--threads", type=int, default=1,
                 help="CPU threads for each framework: 1 (default; on a shared, "
                 "oversubscribed CPU multi-threaded torch was 8-12x slower) or 0 "
                 "(each framework's default)")
  p.add_argument("--aa-iters", type=int, default=10,
                 help="APGD/APGD-T/FAB-T iterations: 10 = torchattacks' AutoAttack "
                 "(default, CPU budget); 100 = Croce & Hein's")
  p.add_argument("--square-queries", type=int, default=None,
                 help="Square queries, standalone and in the ensemble (default 1000 "
                 "on this CPU budget; 5000 is AutoAttack's; 200 quick)")
  p.add_argument("--standard", action="store_true",
                 help="AutoAttack's standard budgets: --aa-iters 100 --square-queries 5000, "
                 "attacks autoattack,pgd-50-10 (the ensemble timed per stage)")
  p.add_argument("--attacks", default=None,
                 help="comma-separated (default apgd-ce,apgd-t,fab-t,square,autoattack,"
                 "pgd-50-10; with --standard autoattack,pgd-50-10)")
  p.add_argument("--repeats", type=int, default=1,
                 help="runs of each attack per framework, alternating; the fastest counts "
                 "(2 or more on a loaded machine; JAX's later runs are compiled already)")
  p.add_argument("--torch-device", default="cpu",
                 help="where torchattacks runs: cpu (default) or cuda (with JAX on a GPU)")
  p.add_argument("--tolerance", type=float, default=1.0, help="percentage points")
  p.add_argument("--out", default=os.path.join(HERE, "results", "parity_autoattack.json"))
  args = p.parse_args(argv)
  if args.standard:
    if args.quick:
      p.error("--standard and --quick exclude each other")
    args.aa_iters = 100
    if args.square_queries is None:
      args.square_queries = 5000
    if args.attacks is None:
      args.attacks = "autoattack,pgd-50-10"
  if args.attacks is None:
    args.attacks = "apgd-ce,apgd-t,fab-t,square,autoattack,pgd-50-10"
  quick = args.quick
  if args.n is None:
    args.n = 64 if quick else 500
  if args.epochs is None:
    args.epochs = 1 if quick else 3
  if args.square_queries is None:
    args.square_queries = 200 if quick else 1000
  if args.torch_batch_size is None:
    args.torch_batch_size = args.n
  args.attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
  known = list(ENSEMBLE) + ["autoattack", "pgd-50-10"]
  for a in args.attacks:
    if a not in known:
      p.error(f"unknown attack {a!r}; choose from {known}")
  if not 0 < args.eps <= 255:
    p.error(f"--eps={args.eps} must lie in (0, 255] (it is in /255)")
  return args


def main(argv=None):
  args = parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top
  global TORCH_DEVICE
  TORCH_DEVICE = torch.device(args.torch_device)
  if args.threads > 0:
    torch.set_num_threads(args.threads)
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(os.path.dirname(CACHE_DIR), "jax_cache"))
  global COMPILE_CLOCK
  COMPILE_CLOCK = CompileClock()
  wall = time.time()
  load_start = os.getloadavg()
  print(f"load average at the start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads")
  test_images, test_labels = load_cifar10("test")
  model, variables, train_settings, model_path, train_s = train_or_load(args)
  logits_fn = closures.eval_logits_fn(model, variables)
  net = torch_twin(model, variables, args.filters)

  indices = evaluate.select_indices(len(test_images), args.n, "random", args.seed)
  images, labels = test_images[indices], test_labels[indices]

  # Same function in both frameworks?
  x = images[:200].astype(np.float32) / 255
  jax_logits = np.asarray(logits_fn(jnp.asarray(x)))
  with torch.no_grad():
    torch_logits = net(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
                       .to(TORCH_DEVICE)).cpu().numpy()
  logit_diff = float(np.max(np.abs(jax_logits - torch_logits)))
  print(f"max |logits JAX - torch| on 200 points: {logit_diff:.2e}")

  clean_full = evaluate.clean_accuracy(logits_fn, test_images, test_labels,
                                       batch_size=1000, num_devices=1).accuracy
  clean = evaluate.clean_accuracy(logits_fn, images, labels, batch_size=args.batch_size,
                                  num_devices=1)
  print(f"clean accuracy: {100 * clean_full:.2f}% (10,000 test points), "
        f"{100 * clean.accuracy:.2f}% on the {args.n} selected")

  key = jax.random.key(args.seed)
  clean_correct = np.asarray(clean.correct)
  rows = []
  for name in args.attacks:
    print(f"-- {name}", flush=True)
    jax_timers, torch_timers = [], []
    for rep in range(args.repeats):
      # Alternating JAX and torch runs; the fastest of each counts (the load of
      # a shared machine only ever slows a run down).
      jax_timer, torch_timer = Timer(), Timer()
      jax_robust, stages = run_jax_attack(
          name, logits_fn, images, labels, clean_correct,
          jax.random.fold_in(key, zlib.crc32(name.encode())), args, jax_timer)
      print(f"   JAX   {100 * jax_robust.mean():6.2f}%  {jax_timer.wall_s:7.1f} s "
            f"({jax_timer.compile_s:.1f} s compiling)", flush=True)
      torch_robust = run_torch_attack(name, net, images, labels, clean_correct, args,
                                      torch_timer)
      print(f"   torch {100 * torch_robust.mean():6.2f}%  {torch_timer.wall_s:7.1f} s",
            flush=True)
      jax_timers.append(jax_timer)
      torch_timers.append(torch_timer)
    first_jax_wall = jax_timers[0].wall_s
    jax_timer = min(jax_timers, key=lambda t: t.wall_s - t.compile_s)
    torch_timer = min(torch_timers, key=lambda t: t.wall_s)
    if getattr(jax_timer, "stages", None):
      jax_timer.stages = _fastest_stages([t.stages for t in jax_timers])
      torch_timer.stages = _fastest_stages([t.stages for t in torch_timers])
    n = len(images)
    jax_wall, jax_run, jax_cpu = jax_timer.rates(n)
    torch_wall, _, torch_cpu = torch_timer.rates(n)
    row = dict(
        attack=name, jax_robust_acc=100 * float(jax_robust.mean()),
        torch_robust_acc=100 * float(torch_robust.mean()),
        diff=100 * float(jax_robust.mean() - torch_robust.mean()),
        both_robust=int(np.sum(jax_robust & torch_robust)),
        only_jax_robust=int(np.sum(jax_robust & ~torch_robust)),
        only_torch_robust=int(np.sum(~jax_robust & torch_robust)),
        jax_images_per_s=jax_run, jax_images_per_s_with_compile=jax_wall,
        jax_images_per_cpu_s=jax_cpu, jax_wall_s=jax_timer.wall_s,
        jax_cpu_s=jax_timer.cpu_s, jax_compile_s=jax_timer.compile_s,
        torch_images_per_s=torch_wall, torch_images_per_cpu_s=torch_cpu,
        torch_wall_s=torch_timer.wall_s, torch_cpu_s=torch_timer.cpu_s,
        repeats=args.repeats, jax_first_run_wall_s=first_jax_wall,
        jax_wall_s_runs=[t.wall_s for t in jax_timers],
        jax_compile_s_runs=[t.compile_s for t in jax_timers],
        torch_wall_s_runs=[t.wall_s for t in torch_timers])
    if stages is not None:
      row["jax_robust_acc_after_stage"] = stages
    if getattr(jax_timer, "stages", None) and getattr(torch_timer, "stages", None):
      row["stages"] = _stage_rows(jax_timer.stages, torch_timer.stages, n)
    rows.append(row)
  args.load_start = load_start
  return _report(args, rows, clean_full, clean, logit_diff, train_settings, model_path,
                 train_s, wall)


def _fastest_stages(runs):
  """Per stage, the run with the shortest time (without compilation)."""
  out = {}
  for name in runs[0]:
    out[name] = min((r[name] for r in runs if name in r), key=lambda st: st["run_s"])
  return out


def _stage_rows(jax_stages, torch_stages, n):
  """Per-stage comparison of the ensemble: points in, seconds, images/s, ratio."""
  out = []
  for name in ENSEMBLE:
    j, t = jax_stages.get(name), torch_stages.get(name)
    if j is None or t is None:
      continue
    out.append(dict(
        stage=name, jax_points=j["points"], torch_points=t["points"],
        jax_s=j["run_s"], jax_compile_s=j["compile_s"], torch_s=t["run_s"],
        jax_images_per_s=n / j["run_s"], torch_images_per_s=n / max(t["run_s"], 1e-9),
        speed_ratio_jax_over_torch=t["run_s"] / j["run_s"],
        jax_robust_after=j["robust_after"], torch_robust_after=t["robust_after"]))
  return out


def _report(args, rows, clean_full, clean, logit_diff, train_settings, model_path,
            train_s, wall):
  tol = args.tolerance
  header = (f"{'attack':<12}{'JAX acc':>9}{'torch acc':>11}{'diff':>8}"
            f"{'JAX img/s':>11}{'torch img/s':>13}{'JAX/torch':>11}{'(CPU time)':>12}")
  print()
  print(f"Robust accuracy (%) on {args.n} random CIFAR-10 test points, eps = "
        f"{args.eps:g}/255; simple_cnn({args.filters} filters), clean "
        f"{100 * clean.accuracy:.2f}% on these points")
  print(header)
  print("-" * len(header))
  failures = []
  for r in rows:
    r["speed_ratio_jax_over_torch"] = r["jax_images_per_s"] / r["torch_images_per_s"]
    r["speed_ratio_jax_over_torch_cpu_time"] = (r["jax_images_per_cpu_s"] /
                                                r["torch_images_per_cpu_s"])
    print(f"{r['attack']:<12}{r['jax_robust_acc']:9.2f}{r['torch_robust_acc']:11.2f}"
          f"{r['diff']:+8.2f}{r['jax_images_per_s']:11.1f}{r['torch_images_per_s']:13.1f}"
          f"{r['speed_ratio_jax_over_torch']:10.2f}x"
          f"{r['speed_ratio_jax_over_torch_cpu_time']:11.2f}x")
    if abs(r["diff"]) > tol:
      failures.append(f"{r['attack']}: |diff| = {abs(r['diff']):.2f} > {tol} pp")
    if r["attack"] == "autoattack" and r["diff"] > tol:
      failures.append(f"autoattack: the JAX ensemble is weaker by {r['diff']:.2f} pp")
  print("img/s: test points evaluated per second, wall clock (all n points, the "
        "misclassified ones included; JAX without its compile time: "
        + ", ".join(f"{r['attack']} {r['jax_compile_s']:.0f} s" for r in rows)
        + "). (CPU time): the same ratio from process CPU seconds, robust to "
        "the load of a shared machine.")
  for r in rows:
    if r.get("stages"):
      head = (f"{'stage':<10}{'points J/T':>12}{'JAX s':>9}{'(compile)':>11}{'torch s':>9}"
              f"{'JAX img/s':>11}{'torch img/s':>13}{'JAX/torch':>11}{'robust J/T':>12}")
      print(f"\n{r['attack']} per stage (img/s: all n points over the stage's time):")
      print(head)
      print("-" * len(head))
      for st in r["stages"]:
        print(f"{st['stage']:<10}{st['jax_points']:>6}/{st['torch_points']:<5}"
              f"{st['jax_s']:9.1f}{st['jax_compile_s']:11.1f}{st['torch_s']:9.1f}"
              f"{st['jax_images_per_s']:11.1f}{st['torch_images_per_s']:13.1f}"
              f"{st['speed_ratio_jax_over_torch']:10.2f}x"
              f"{st['jax_robust_after']:>6}/{st['torch_robust_after']:<5}")
  passed = not failures
  print("PARITY " + ("PASSED" if passed else "FAILED: " + "; ".join(failures)))
  result = {
      "benchmark": "parity_autoattack",
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "passed": passed, "failures": failures, "tolerance_pp": tol,
      "n": args.n, "selection": "random", "seed": args.seed,
      "selection_rule": "sorted(numpy.random.default_rng(seed).permutation(10000)[:n])",
      "eps_255": args.eps, "quick": args.quick, "standard": args.standard,
      "command": " ".join(["python", "benchmarks/parity_autoattack.py"] + sys.argv[1:]), "batch_size": args.batch_size,
      "torch_batch_size": args.torch_batch_size, "threads_per_framework": args.threads,
      "settings": {"aa_iters": args.aa_iters, "square_queries": args.square_queries,
                   "square_p_init": 0.8, "square_rescale_schedule": False,
                   "n_target_classes": 9, "pgd": "50 steps, 10 restarts, step eps/4, "
                   "strict rule"},
      "model": {"name": "simple_cnn", "filters": args.filters, "training": train_settings,
                "weights": model_path, "train_seconds": train_s,
                "clean_acc_full_test": 100 * clean_full,
                "clean_acc_selected": 100 * clean.accuracy,
                "max_abs_logit_diff_jax_torch": logit_diff},
      "rows": rows, "machine": machine_info(),
      "load_average_start": list(getattr(args, "load_start", ())), "wall_time_s": time.time() - wall,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, args.out)
  print(f"Wrote {args.out} (total {time.time() - wall:.0f} s)")
  return 0 if passed else 1


if __name__ == "__main__":
  sys.exit(main())

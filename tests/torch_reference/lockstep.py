"""Lockstep harness: fastadv_jax's train step against the PyTorch reference steps.

Both sides start from the same weights (the PyTorch twin's, converted by
`fastadv_jax.interop`), see the same batches (already augmented: both sides
get the same crops and flips because they get the same arrays) and the same
random draws (drawn here with NumPy and passed explicitly: to the reference
functions of `torch_steps.py` as arguments, to the JAX train step through
`batch["noise"]`, i.e. the attacks' and regularizers' `noise=` arguments).
After every step both states are compared: δ, CE, regularizer value,
parameter gradients, parameters, optimizer state and BatchNorm running
statistics, as relative differences ‖a − b‖ / ‖b‖ (largest over the tensors of
each group).

Run as a script (it is also `benchmarks/parity_train_step.py`'s engine)::

  JAX_ENABLE_X64=1 python tests/torch_reference/lockstep.py --dtype float64 \
      --steps 1 --json /tmp/parity.json

float64 needs `JAX_ENABLE_X64=1` in the environment of a fresh process (it is
never switched on inside the pytest process, where it would change other
tests' dtypes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # fastadv_jax from a checkout

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from fastadv_jax import config_base, interop, methods  # noqa: E402
from fastadv_jax import train_state as state_lib  # noqa: E402
from fastadv_jax import train_step as step_lib  # noqa: E402
import torch_models  # noqa: E402
import torch_steps  # noqa: E402

TIE_TO_BOX_GRAD = {"torch1.4": "zero", "current": "half"}
IMAGE = (16, 16, 3)
BATCH = 8
NUM_CLASSES = 10
EPS = 8 / 255
MODELS = {
    # name: (fastadv_jax model name, its kwargs, optimizer, lr)
    "cnn": ("simple_cnn", dict(filters=4), "adam", 0.003),
    "preact": ("preact_resnet18_gradalign",
               dict(widths=(4, 8, 8, 8), stage_sizes=(1, 1, 1, 1)), "sgd", 0.05),
}


# GradAlign Table 8's λ (700 CURE, 1000 IGR) are for batches of 128; under the
# batch-mean convention (regularizers.DEFAULT_GRAD_SCALE) the penalty scales as
# 1/B², so the same weighting at this harness's batch of 8 is λ·(8/128)².
CURE_LAMBDA = 700.0 * (BATCH / 128) ** 2
IGR_LAMBDA = 1000.0 * (BATCH / 128) ** 2


@dataclasses.dataclass(frozen=True)
class Case:
  """One method as both sides run it."""
  name: str
  attack: str
  attack_kwargs: dict
  step_ratio: Optional[float]          # attack step / ε (None: the attack's default)
  regularizers: dict                   # name -> hparams incl. weight
  reference: str                       # torch_steps function
  reference_kwargs: dict
  replays: int = 1


def cases(tie_rule: str = "torch1.4") -> dict[str, Case]:
  """Every method of the lockstep table, with the reference's conventions."""
  box = TIE_TO_BOX_GRAD[tie_rule]
  ga = dict(tie_rule=tie_rule)
  return {c.name: c for c in [
      Case("fgsm", "fgsm", dict(box_grad=box), 1.0, {}, "ga_fgsm_step", dict(init="zero", **ga)),
      Case("fgsm_rs", "fgsm_rs", dict(box_grad=box, clip_init_to_box=False), 1.25, {},
           "ga_fgsm_step", dict(init="random", **ga)),
      Case("pgd2", "pgd", dict(box_grad=box, steps=2, random_start=False), 0.5, {},
           "ga_pgd_step", dict(steps=2, **ga)),
      Case("grad_align", "fgsm", dict(box_grad=box), 1.0, {"grad_align": dict(weight=0.2)},
           "ga_fgsm_step", dict(init="zero", grad_align_lambda=0.2, **ga)),
      Case("cure", "fgsm", dict(box_grad=box), 1.0, {"cure": dict(weight=CURE_LAMBDA)},
           "ga_fgsm_reg_step", dict(reg="cure", lam=CURE_LAMBDA, **ga)),
      Case("igr", "fgsm", dict(box_grad=box), 1.0, {"input_grad_norm": dict(weight=IGR_LAMBDA)},
           "ga_fgsm_reg_step", dict(reg="input_grad_norm", lam=IGR_LAMBDA, **ga)),
      Case("zerograd", "zerograd", dict(q=0.35), 2.0, {}, "zerograd_step", dict(q=0.35)),
      Case("multigrad", "multigrad", dict(num_starts=3), 1.0, {}, "multigrad_step", {}),
      Case("n_fgsm", "n_fgsm", {}, 1.0, {}, "n_fgsm_step", {}),
      Case("fgsm_n_advlc", "fgsm_n", {}, 1.0,
           {"advlc": dict(weight=0.55, clean_point="start")},
           "fgsm_n_advlc_step", dict(lam=0.55)),
      Case("free", "free", dict(box_grad=box, order="step_first"), 1.0, {}, "ga_free_step",
           dict(**ga), replays=4),
  ]}


# The regularizers with an exact formulation (regularizers.FORMULATIONS).
EXACT_PENALTIES = ("grad_align", "cure", "input_grad_norm")


def with_formulation(case: Case, formulation: str) -> Case:
  """`case` with its exact penalties computed in `formulation`."""
  return dataclasses.replace(case, regularizers={
      name: ({**hp, "formulation": formulation} if name in EXACT_PENALTIES else hp)
      for name, hp in case.regularizers.items()})


def _config(case: Case, model_key: str, bn_updates: str):
  name, kwargs, opt, lr = MODELS[model_key]
  c = config_base.base_config()
  c.model.name = name
  c.model.kwargs = dict(kwargs)
  c.eps = EPS * 255
  c.attack.name = case.attack
  c.attack.kwargs = dict(case.attack_kwargs, **({"replays": case.replays}
                                                 if case.replays > 1 else {}))
  if case.step_ratio is not None:
    c.attack.step_eps_ratio = case.step_ratio
  for reg, hp in case.regularizers.items():
    c.regularizers[reg] = dict(hp)
  c.optimizer.name = opt
  c.optimizer.weight_decay = 5e-4
  c.schedule.name = "constant"
  c.schedule.lr_max = lr
  c.schedule.kwargs = {}
  c.bn_updates = bn_updates
  return c


def _draws(case: Case, rng: np.random.RandomState, eps: float) -> dict[str, np.ndarray]:
  """The step's random numbers (NHWC float64), named as `batch["noise"]` names them."""
  shape = (BATCH,) + IMAGE
  out = {}
  if case.attack in ("fgsm_rs", "zerograd", "fgsm_n"):
    out["attack"] = rng.uniform(-eps, eps, shape)
  elif case.attack == "n_fgsm":
    out["attack"] = rng.uniform(-2 * eps, 2 * eps, shape)
  elif case.attack == "multigrad":
    out["attack"] = rng.uniform(-eps, eps, (case.attack_kwargs["num_starts"],) + shape)
  if "grad_align" in case.regularizers:
    out["grad_align"] = rng.uniform(-eps, eps, shape)
  return out


def _nchw(a) -> torch.Tensor:
  a = np.asarray(a)
  axes = (0, 3, 1, 2) if a.ndim == 4 else (0, 1, 4, 2, 3)
  return torch.from_numpy(np.ascontiguousarray(a.transpose(axes)))


def _images(rng, steps):
  """Batches with many pixels exactly 0 or 1 (as zero-padded crops have)."""
  x = np.clip(rng.uniform(-0.25, 1.25, (steps, BATCH) + IMAGE), 0.0, 1.0)
  y = rng.randint(0, NUM_CLASSES, (steps, BATCH))
  return x, y


def _rel(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  nb = np.linalg.norm(b)
  diff = np.linalg.norm(a - b)
  if nb == 0:
    return float(diff)
  return float(diff / nb)


def _max_rel(pairs) -> float:
  return max((_rel(a, b) for a, b in pairs), default=0.0)


def _opt_leaves(opt_state):
  """(kind, {field: params-shaped tree}) of the optax state."""
  for leaf in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda s: isinstance(s, (optax.TraceState, optax.ScaleByAdamState))):
    if isinstance(leaf, optax.TraceState):
      return "sgd", {"momentum_buffer": leaf.trace}
    if isinstance(leaf, optax.ScaleByAdamState):
      return "adam", {"exp_avg": leaf.mu, "exp_avg_sq": leaf.nu}
  raise ValueError("no optimizer moments found")


class Lockstep:
  """Both sides of one (method, model, dtype) run."""

  def __init__(self, case: Case, model_key: str, dtype: str, *, bn_updates="every_forward",
               biased_running_var: bool = True, seed: int = 0):
    self.case, self.model_key, self.dtype = case, model_key, np.dtype(dtype)
    if self.dtype == np.float64 and not jax.config.jax_enable_x64:
      raise RuntimeError("float64 needs JAX_ENABLE_X64=1 (run in a fresh process).")
    self.torch_dtype = torch.float64 if self.dtype == np.float64 else torch.float32
    name, kwargs, opt_name, lr = MODELS[model_key]
    self.config = _config(case, model_key, bn_updates)
    self.method = methods.build_method(self.config)
    self.model_kwargs = dict(kwargs)

    torch.manual_seed(seed)
    twin = torch_models.build_torch_model(
        name, num_classes=NUM_CLASSES,
        **(dict(image_size=IMAGE[0], **kwargs) if name == "simple_cnn" else kwargs))
    if biased_running_var:
      torch_steps.use_biased_running_var(twin)
    state_dict = {k: v.clone() for k, v in twin.state_dict().items()}
    self.torch_model = twin.to(self.torch_dtype).train()
    lr32 = float(np.float32(lr))
    if opt_name == "sgd":
      self.torch_opt = torch.optim.SGD(self.torch_model.parameters(), lr=lr32, momentum=0.9,
                                       weight_decay=5e-4)
    else:
      self.torch_opt = torch.optim.Adam(self.torch_model.parameters(), lr=lr32,
                                        weight_decay=5e-4)
    self.opt_name = opt_name

    # The JAX side: the same weights, through interop.
    self.jax_model = state_lib.create_model(self.config, dtype=self.dtype.name)
    variables = interop.torch_state_dict_to_flax(state_dict, name, image_shape=IMAGE,
                                                 **kwargs)
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, self.dtype), variables)
    tx = state_lib.create_optimizer(self.config, steps_per_epoch=10)
    state = state_lib.create_train_state(self.config, self.method, self.jax_model, tx,
                                         jax.random.PRNGKey(0), IMAGE, BATCH)
    attack_state = state.attack_state
    if np.ndim(attack_state):
      attack_state = jnp.zeros(attack_state.shape, self.dtype)
    state = state.replace(params=variables["params"],
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=tx.init(variables["params"]), attack_state=attack_state)
    self.state = jax.tree_util.tree_map(lambda a: jnp.asarray(a)[None], state)
    step = step_lib.make_train_step(
        self.jax_model, tx, self.method, steps_per_epoch=10, seed=seed,
        augment=lambda images, idx, key: images, trace=True)
    self.step_fn = jax.pmap(step, axis_name=state_lib.AXIS, devices=jax.local_devices()[:1])
    self.free_delta = (torch.zeros((BATCH, IMAGE[2], IMAGE[0], IMAGE[1]), dtype=self.torch_dtype)
                       if case.attack == "free" else None)
    self.eps = float(np.float32(self.method.eps))
    self.alpha = self.method.attack.step

  # -- one step on each side ------------------------------------------------
  def torch_step(self, x, y, draws):
    fn = getattr(torch_steps, self.case.reference)
    kwargs = dict(self.case.reference_kwargs)
    X = _nchw(x).to(self.torch_dtype)
    Y = torch.from_numpy(np.asarray(y, np.int64))
    if self.case.attack == "pgd":
      kwargs["alpha"] = self.alpha
    elif self.case.attack == "fgsm_n":
      kwargs["step"] = self.alpha
    else:
      kwargs["alpha"] = self.alpha
    if "attack" in draws:
      kwargs["noise"] = _nchw(draws["attack"]).to(self.torch_dtype)
    if "grad_align" in draws:
      kwargs["grad_align_noise"] = _nchw(draws["grad_align"]).to(self.torch_dtype)
    if self.free_delta is not None:
      kwargs["free_delta"] = self.free_delta
    return fn(self.torch_model, self.torch_opt, X, Y, eps=self.eps, **kwargs)

  def batch(self, x, y, draws):
    """The JAX step's (one-device) batch of images, labels and draws."""
    return {"image": jnp.asarray(x, self.dtype)[None],
            "label": jnp.asarray(y, jnp.int32)[None],
            "index": jnp.arange(BATCH)[None],
            "noise": {k: jnp.asarray(v, self.dtype)[None] for k, v in draws.items()}}

  def jax_step(self, x, y, draws):
    self.state, metrics = self.step_fn(self.state, self.batch(x, y, draws))
    return jax.tree_util.tree_map(lambda a: np.asarray(a[0]), metrics)

  # -- comparison -------------------------------------------------------------
  def _to_torch_layout(self, params, batch_stats):
    name = MODELS[self.model_key][0]
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    return interop.flax_to_torch_state_dict(variables, name, image_shape=IMAGE, as_torch=False,
                                            dtype=np.float64, **self.model_kwargs)

  def compare(self, ref, metrics) -> dict[str, float]:
    host = jax.tree_util.tree_map(lambda a: np.asarray(a[0]), self.state)
    ours = self._to_torch_layout(host.params, host.batch_stats)
    theirs = {k: v.detach().double().numpy() for k, v in self.torch_model.state_dict().items()}
    param_names = [n for n, _ in self.torch_model.named_parameters()]
    stat_names = [k for k in theirs if k.endswith(("running_mean", "running_var"))]
    grads = self._to_torch_layout(metrics["trace/grads"], host.batch_stats)
    kind, moments = _opt_leaves(host.opt_state)
    opt_pairs = []
    for field, tree in moments.items():
      converted = self._to_torch_layout(tree, host.batch_stats)
      for n, p in self.torch_model.named_parameters():
        opt_pairs.append((converted[n], self.torch_opt.state[p][field].double().numpy()))
    reg_names = list(self.case.regularizers)
    reg_ours = float(metrics[f"train/reg/{reg_names[0]}"]) if reg_names else 0.0
    delta_ref = ref["delta"].double().numpy().transpose(0, 2, 3, 1)
    out = {
        "delta": _rel(metrics["trace/delta"], delta_ref),
        "ce": _rel(metrics["train/ce"], ref["ce"]),
        "reg": _rel(reg_ours, ref["reg"]),
        "grads": _max_rel((grads[n], ref["grads"][n].double().numpy()) for n in param_names),
        # All gradients as one vector: a tensor whose own gradient is tiny next to the
        # others' (a cancellation) can show a large per-tensor difference at rounding level.
        "grads_total": _rel(np.concatenate([np.ravel(grads[n]) for n in param_names]),
                            np.concatenate([ref["grads"][n].double().numpy().ravel()
                                            for n in param_names])),
        "params": _max_rel((ours[n], theirs[n]) for n in param_names),
        "opt_state": _max_rel(opt_pairs),
        "bn_stats": _max_rel((ours[n], theirs[n]) for n in stat_names),
    }
    tracked = [int(v) for k, v in self.torch_model.state_dict().items()
               if k.endswith("num_batches_tracked")]
    out["num_batches_tracked"] = tracked[0] if tracked else None
    # The reference's loss itself: a run that has diverged (CE ≫ log 10) compares
    # ill-conditioned states.
    out["ce_ref"] = float(ref["ce"])
    return out

  def run(self, steps: int, report_at=(1, 10, 100), seed: int = 0) -> dict[int, dict]:
    rng = np.random.RandomState(seed)
    xs, ys = _images(rng, (steps + self.case.replays - 1) // self.case.replays)
    results = {}
    for t in range(steps):
      b = t // self.case.replays
      draws = _draws(self.case, rng, self.eps)
      ref = self.torch_step(xs[b], ys[b], draws)
      metrics = self.jax_step(xs[b], ys[b], draws)
      if (t + 1) in report_at or t + 1 == steps:
        results[t + 1] = self.compare(ref, metrics)
    return results


TOLERANCE = {"float64": 1e-6, "float32": 1e-4}
COMPARED = ("delta", "ce", "reg", "grads", "params", "opt_state", "bn_stats")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dtype", default="float64", choices=("float64", "float32"))
  parser.add_argument("--steps", type=int, default=1)
  parser.add_argument("--methods", default="all")
  parser.add_argument("--models", default="cnn,preact")
  parser.add_argument("--extra", default="",
                      help="further model:method pairs, e.g. preact:grad_align,preact:pgd2")
  parser.add_argument("--tie_rule", default="torch1.4", choices=torch_steps.TIE_RULES)
  parser.add_argument("--bn_updates", default="every_forward")
  parser.add_argument("--unbiased_running_var", action="store_true",
                      help="keep PyTorch's own BatchNorm (unbiased running variance)")
  parser.add_argument("--formulation", default="",
                      help="the exact formulation of GradAlign, CURE and IGR "
                           "(regularizers.FORMULATIONS; default: the library's)")
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  torch.set_num_threads(1)
  table = cases(args.tie_rule)
  if args.formulation:
    table = {name: with_formulation(case, args.formulation) for name, case in table.items()}
  names = list(table) if args.methods == "all" else args.methods.split(",")
  rows = []
  pairs = [(m, n) for m in args.models.split(",") if m for n in names]
  pairs += [tuple(p.split(":")) for p in args.extra.split(",") if p]
  for model_key, name in pairs:
    t0 = time.time()
    run = Lockstep(table[name], model_key, args.dtype, bn_updates=args.bn_updates,
                   biased_running_var=not args.unbiased_running_var)
    res = run.run(args.steps)
    for step, diffs in res.items():
      row = dict(method=name, model=model_key, dtype=args.dtype, step=step,
                 tie_rule=args.tie_rule, bn_updates=args.bn_updates,
                 formulation=args.formulation or "default", **diffs)
      row["max_rel"] = max(diffs[k] for k in COMPARED)
      rows.append(row)
      print(f"{model_key:7s} {name:13s} step {step:4d}  max rel {row['max_rel']:.2e}  " +
            " ".join(f"{k}={diffs[k]:.1e}" for k in COMPARED) +
            f"  grads_total={diffs['grads_total']:.1e}  CE_ref={diffs['ce_ref']:.3g}"
            f"  nbt={diffs['num_batches_tracked']}  ({time.time() - t0:.1f}s)", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()

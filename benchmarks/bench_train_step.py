"""Per-minibatch cost of one full train step, every method, JAX and PyTorch side by side.

One train step = the attack + the forward/backward pass of the training loss
(regularizers included) + the optimizer update. On the JAX side it is exactly
what `fastadv-train` runs: `fastadv_jax.train_step.make_train_step` for a config
variant of `configs/cifar10.py`, under `jax.pmap` on one device, with the state
donated; the step includes the uint8 -> float conversion and the crop/flip
augmentation. On the PyTorch side it is the step as the reference code writes
it, eagerly, on the twin model of `tests/torch_reference/torch_models.py` (data already
float, augmentation left to the data loader), SGD with momentum and weight
decay; GradAlign, CURE and the input-gradient norm use `create_graph=True`
double backprop as the GradAlign authors do.

Methods (`--methods`, default all):

  fgsm, fgsm_rs, n_fgsm, fgsm_n, zerograd, multigrad, pgd2, pgd10,
  free (one replay of AT for Free = one step),
  fgsm+grad_align_rof / fgsm+grad_align_ror / fgsm+grad_align_for (GradAlign,
    formulations "reverse_over_forward" / "reverse_over_reverse" /
    "forward_over_reverse" in JAX; PyTorch runs its one double-backprop step
    on every row, timed once per row),
  fgsm+cure, fgsm+input_grad_norm, fgsm_n+advlc.

Every method uses the same model (`--model`, `--widths`), batch and dtype, so
the ratios compare methods, not settings; the other hyperparameters (steps,
λ, optimizer) are those of the config variant.

How it measures: every JAX step is compiled first (compile time, XLA's
memory analysis of the compiled step, `compiled.memory_analysis()`, and XLA's
flop count, `compiled.cost_analysis()`, recorded per method: the flop ratio
to FGSM is the floor a method's time ratio could reach); then `--warmup`
untimed and `--repeats` timed rounds, each round
running every method once, JAX then PyTorch back to back, so that a change in
the machine's load (shared machines) spreads over all methods and both
frameworks instead of biasing one. Reported per method: the median ms/step, the
ratio to FGSM in the same framework, the JAX/PyTorch time ratio (< 1: JAX
faster; also the median of the per-round ratios in the JSON), XLA's
temporaries and total (arguments + unaliased outputs + temporaries), and
PyTorch's peak-memory increase during one step, measured afterwards in a fresh
process per method (CPU: peak resident set size over the size before the step,
via /proc/self/clear_refs and VmHWM; CUDA: `torch.cuda.max_memory_allocated`).
PyTorch runs with OMP_WAIT_POLICY=PASSIVE unless the environment sets it:
spinning OpenMP threads are pathological on a shared machine.

Usage (from the repository root):

  python benchmarks/bench_train_step.py --batch 16 --repeats 3           # CPU
  python benchmarks/bench_train_step.py --widths 16,32,64,128 --batch 16   # quicker
  python benchmarks/bench_train_step.py --batch 128 --repeats 20 --warmup 3   # a GPU
  python benchmarks/bench_train_step.py --methods fgsm,fgsm+grad_align_rof --no-torch
  python benchmarks/bench_train_step.py --batch 128 --no-torch --repeats 0 \
      --methods fgsm,fgsm+grad_align_rof,fgsm+grad_align_ror   # flop counts only

Results: the printed table and benchmarks/results/bench_train_step.json
(or --out), with the machine, versions, load average and settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "torch_reference"))  # torch_models
sys.path.insert(0, REPO)  # fastadv_jax from a checkout
from fastadv_jax import config_base  # pylint: disable=g-import-not-at-top,wrong-import-position

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
STEPS_PER_EPOCH = 390  # only shapes the learning-rate schedule; no effect on cost


@dataclasses.dataclass(frozen=True)
class Method:
  """A benchmarked method: its CIFAR-10 config variant and the changes to it."""
  variant: str
  drop_regularizers: bool = False
  reg_hparams: tuple = ()  # ((regularizer, hparam, value), ...)
  torch_step: str = ""     # name of the PyTorch step (see `_torch_step`)


METHODS: dict[str, Method] = {
    "fgsm": Method("fgsm", torch_step="fgsm"),
    "fgsm_rs": Method("fgsm_rs", torch_step="fgsm_rs"),
    "n_fgsm": Method("n_fgsm", torch_step="n_fgsm"),
    "fgsm_n": Method("advlc", drop_regularizers=True, torch_step="fgsm_n"),
    "zerograd": Method("zerograd", torch_step="zerograd"),
    "multigrad": Method("multigrad", torch_step="multigrad"),
    "pgd2": Method("pgd2", torch_step="pgd2"),
    "pgd10": Method("pgd10", torch_step="pgd10"),
    "free": Method("free", torch_step="free"),
    "fgsm+grad_align_rof": Method(
        "gradalign", reg_hparams=(("grad_align", "formulation", "reverse_over_forward"),),
        torch_step="grad_align"),
    "fgsm+grad_align_ror": Method(
        "gradalign", reg_hparams=(("grad_align", "formulation", "reverse_over_reverse"),),
        torch_step="grad_align"),
    "fgsm+grad_align_for": Method(
        "gradalign", reg_hparams=(("grad_align", "formulation", "forward_over_reverse"),),
        torch_step="grad_align"),
    "fgsm+cure": Method("cure", torch_step="cure"),
    "fgsm+input_grad_norm": Method("igr", torch_step="input_grad_norm"),
    "fgsm_n+advlc": Method("advlc", torch_step="advlc"),
}
BASELINE = "fgsm"


def _median(values):
  return statistics.median(values) if values else float("nan")


def _load_config_module():
  path = os.path.join(REPO, "configs", "cifar10.py")
  spec = importlib.util.spec_from_file_location("cfg_cifar10", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def method_config(name: str, args):
  """The config of method `name` with the benchmark's model, batch and dtype."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  method = METHODS[name]
  config = _load_config_module().get_config(method.variant)
  config.model.name = args.model
  kwargs = {} if args.widths is None else {"widths": tuple(args.widths)}
  config.model.kwargs = ml_collections.ConfigDict(kwargs)
  config.dtype = args.dtype
  config.batch_size = args.batch
  if method.drop_regularizers:
    config.regularizers = ml_collections.ConfigDict()
  for reg, hparam, value in method.reg_hparams:
    config.regularizers[reg][hparam] = value
  for dotted, value in args.settings:
    config_base.set_dotted(config, dotted, value)
  return config


# ---------------------------------------------------------------------------
# JAX
# ---------------------------------------------------------------------------

def _memory_analysis(compiled) -> dict[str, int]:
  try:
    analysis = compiled.memory_analysis()
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {e}"}
  if analysis is None:
    return {"error": "memory_analysis() returned None on this backend"}
  fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes",
            "host_temp_size_in_bytes", "peak_memory_in_bytes")
  out = {f: int(getattr(analysis, f)) for f in fields if hasattr(analysis, f)}
  if {"temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
      "alias_size_in_bytes"} <= out.keys():
    # Live at once, at most: arguments + outputs not aliased to them + temporaries.
    out["total_estimate_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                   - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out


def xla_cost(compiled) -> dict[str, float]:
  """XLA's own count of the compiled step's work: flops, bytes accessed."""
  try:
    cost = compiled.cost_analysis()
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {e}"}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost:
    return {"error": "cost_analysis() returned nothing on this backend"}
  return {k: float(cost[k]) for k in ("flops", "bytes accessed", "transcendentals") if k in cost}


class JaxCase:
  """The compiled, pmapped train step of one method and its (donated) state."""

  def __init__(self, name: str, args):
    import jax  # pylint: disable=g-import-not-at-top
    from fastadv_jax import train, train_state, train_step  # pylint: disable=g-import-not-at-top

    config = method_config(name, args)
    method = config_base.validate_config(config)
    devices = jax.local_devices()[:1]
    model = train_state.create_model(config)
    tx = train_state.create_optimizer(config, STEPS_PER_EPOCH)
    state = train_state.create_train_state(config, method, model, tx, jax.random.PRNGKey(0),
                                           IMAGE_SHAPE, args.batch)
    self.info = {
        "num_params": int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(state.params))),
        "variant": config.variant, "attack": config.attack.name,
        "regularizers": {k: dict(v) for k, v in config.regularizers.items()}}
    step = train_step.make_train_step(model, tx, method, steps_per_epoch=STEPS_PER_EPOCH,
                                      seed=config.seed, augment=train.make_augment(config))
    step_fn = jax.pmap(step, axis_name=train_state.AXIS, devices=devices, donate_argnums=(0,))
    rng = np.random.default_rng(0)
    self.batch = jax.device_put(
        {"image": rng.integers(0, 256, (1, args.batch) + IMAGE_SHAPE, dtype=np.uint8),
         "label": rng.integers(0, NUM_CLASSES, (1, args.batch)).astype(np.int32),
         "index": np.arange(args.batch, dtype=np.int32)[None]}, devices[0])
    self.r_state = train_state.to_devices(state, devices)
    start = time.perf_counter()
    self.compiled = step_fn.lower(self.r_state, self.batch).compile()
    self.info["compile_s"] = time.perf_counter() - start
    self.info["memory"] = _memory_analysis(self.compiled)
    self.info["xla_cost"] = xla_cost(self.compiled)
    self.metrics = None

  def step(self) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    self.r_state, self.metrics = self.compiled(self.r_state, self.batch)
    jax.block_until_ready((self.r_state, self.metrics))

  def metrics_finite(self) -> bool:
    import jax  # pylint: disable=g-import-not-at-top
    return bool(all(np.isfinite(np.asarray(v)).all()
                    for v in jax.device_get(self.metrics).values()))


# ---------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------

def _torch_step(kind: str, model, opt, x, y, eps: float, hp: dict) -> Callable[[], None]:
  """The PyTorch train step `kind` as a closure over a fixed batch.

  Written the way the reference code does it: attacks in train mode (BatchNorm
  batch statistics), `torch.autograd.grad` for input gradients, the adversarial
  point clamped to [0, 1], `create_graph=True` double backprop for gradient
  penalties.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  def input_grad(point, create_graph=False):
    point = point.detach().requires_grad_(True) if not create_graph else point
    loss = F.cross_entropy(model(point), y)
    return torch.autograd.grad(loss, point, create_graph=create_graph)[0]

  def uniform(radius):
    return torch.empty_like(x).uniform_(-radius, radius)

  def box(delta):  # delta such that x + delta is in [0, 1]
    return torch.clamp(x + delta, 0.0, 1.0) - x

  def fgsm_delta(step=eps):
    g = input_grad(x)
    return box(torch.clamp(step * torch.sign(g), -eps, eps)), g

  def rs_delta(step, project=True, noise=eps):
    eta = box(uniform(noise))
    g = input_grad(x + eta)
    delta = eta + step * torch.sign(g)
    return box(torch.clamp(delta, -eps, eps) if project else delta)

  def pgd_delta(steps, step):
    delta = torch.zeros_like(x)
    for _ in range(steps):
      g = input_grad(x + delta)
      delta = box(torch.clamp(delta + step * torch.sign(g), -eps, eps))
    return delta

  def zerograd_delta(q=hp.get("q", 0.35), step=2 * eps):
    eta = box(uniform(eps))
    g = input_grad(x + eta)
    flat = g.abs().flatten(1)
    threshold = torch.quantile(flat, q, dim=1).view(-1, 1, 1, 1)
    masked = torch.where(g.abs() >= threshold, g, torch.zeros_like(g))
    return box(torch.clamp(eta + step * torch.sign(masked), -eps, eps))

  def multigrad_delta(n=hp.get("num_starts", 3)):
    signs = [torch.sign(input_grad(x + box(uniform(eps)))) for _ in range(n)]
    agree = torch.stack(signs).sum(0).abs() >= n
    return box(torch.where(agree, eps * signs[0], torch.zeros_like(x)))

  def update(loss):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  def ce_at(delta):
    return F.cross_entropy(model(x + delta), y)

  if kind in ("fgsm", "fgsm_rs", "n_fgsm", "fgsm_n", "zerograd", "multigrad", "pgd2", "pgd10"):
    make_delta = {
        "fgsm": lambda: fgsm_delta()[0],
        "fgsm_rs": lambda: rs_delta(1.25 * eps),
        "n_fgsm": lambda: rs_delta(eps, project=False, noise=2 * eps),
        "fgsm_n": lambda: rs_delta(eps, project=False),
        "zerograd": zerograd_delta,
        "multigrad": multigrad_delta,
        "pgd2": lambda: pgd_delta(2, eps / 2),
        "pgd10": lambda: pgd_delta(10, eps / 5),
    }[kind]
    return lambda: update(ce_at(make_delta()))

  if kind == "free":
    # One replay: one forward/backward gives the weight and the input gradient.
    carried = {"delta": torch.zeros_like(x)}

    def free():
      delta = box(carried["delta"]).requires_grad_(True)
      opt.zero_grad(set_to_none=True)
      ce_at(delta).backward()
      carried["delta"] = box(torch.clamp(delta.detach() + eps * torch.sign(delta.grad),
                                         -eps, eps))
      opt.step()
    return free

  if kind == "grad_align":
    # The GradAlign code: g1 = the FGSM gradient at x (no graph); g2 at
    # x + η, η ~ U[-ε, ε] not clipped, with create_graph=True.
    lam = hp["grad_align"]

    def grad_align():
      delta, g1 = fgsm_delta()
      loss = ce_at(delta)
      x2 = (x + uniform(eps)).requires_grad_(True)
      g2 = input_grad(x2, create_graph=True)
      g1f, g2f = g1.flatten(1), g2.flatten(1)
      cos = F.cosine_similarity(g1f, g2f, dim=1, eps=1e-12)
      update(loss + lam * (1.0 - cos.mean()))
    return grad_align

  if kind == "cure":
    # ∇ℓ(x) with a graph serves both the FGSM direction and the penalty.
    lam, batch = hp["cure"], x.shape[0]

    def cure():
      x1 = x.clone().requires_grad_(True)
      g_x = input_grad(x1, create_graph=True)
      direction = torch.sign(g_x.detach())
      delta = box(torch.clamp(eps * direction, -eps, eps))
      loss = ce_at(delta)
      x_moved = (x + eps * direction).requires_grad_(True)
      g_moved = input_grad(x_moved, create_graph=True)
      update(loss + lam * batch * (g_moved - g_x).pow(2).sum())
    return cure

  if kind == "input_grad_norm":
    lam, batch = hp["input_grad_norm"], x.shape[0]

    def igr():
      delta, _ = fgsm_delta()
      loss = ce_at(delta)
      g = input_grad(x.clone().requires_grad_(True), create_graph=True)
      update(loss + lam * batch * g.pow(2).sum())
    return igr

  if kind == "advlc":
    # FGSM-N, then CE(f(x+δ)) + λ · Σ top-10% |f(x+δ) − f(x)| / B (Eq. 14, clean x).
    lam, batch = hp["advlc"], x.shape[0]

    def advlc():
      delta = rs_delta(eps, project=False)
      logits_adv = model(x + delta)
      logits_clean = model(x)
      diff = (logits_adv - logits_clean).abs().flatten()
      top = torch.topk(diff, max(1, int(0.1 * diff.numel()))).values
      update(F.cross_entropy(logits_adv, y) + lam * top.sum() / batch)
    return advlc

  raise ValueError(f"No PyTorch step {kind!r}.")


class TorchBench:
  """One PyTorch model, optimizer and batch shared by every method's step.

  Sharing keeps the process small; the weights drifting from step to step does
  not change the cost of a step.
  """

  def __init__(self, args):
    import torch  # pylint: disable=g-import-not-at-top
    import torch_models  # pylint: disable=g-import-not-at-top

    torch.set_num_threads(args.torch_threads)
    self.device = torch.device(args.torch_device)
    if self.device.type == "cuda":
      torch.backends.cudnn.benchmark = True  # as the reference training scripts do
    torch.manual_seed(0)
    kwargs = {} if args.widths is None else {"widths": tuple(args.widths)}
    self.model = torch_models.build_torch_model(args.model, num_classes=NUM_CLASSES, **kwargs)
    self.model = self.model.to(self.device).train()
    self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9,
                               weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    self.x = torch.rand((args.batch, 3) + IMAGE_SHAPE[:2], generator=gen).to(self.device)
    self.y = torch.randint(0, NUM_CLASSES, (args.batch,), generator=gen).to(self.device)
    self.num_params = int(sum(p.numel() for p in self.model.parameters()))
    self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) \
        if args.dtype == "bfloat16" else (lambda: torch.autocast(self.device.type, enabled=False))
    self.args = args

  def make_step(self, name: str) -> Callable[[], None]:
    import torch  # pylint: disable=g-import-not-at-top
    from fastadv_jax import methods  # pylint: disable=g-import-not-at-top
    method = methods.build_method(method_config(name, self.args))
    hp = {r.name: r.weight for r in method.regularizers}
    hp.update(method.attack.kwargs)
    hp.update(method.attack.traced)  # e.g. ZeroGrad's q
    step = _torch_step(METHODS[name].torch_step, self.model, self.opt, self.x, self.y,
                       method.eps, hp)
    cuda = self.device.type == "cuda"

    def timed_step():
      with self.autocast():
        step()
      if cuda:
        torch.cuda.synchronize()
    return timed_step


def _proc_status_kb(field: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def torch_memory_worker(name: str, args) -> dict[str, Any]:
  """Peak memory of one PyTorch step of `name`, in a fresh process.

  One warm-up step first (one-time allocations), then the measured step. CPU:
  the peak resident set size during the step (VmHWM, reset through
  /proc/self/clear_refs) over the resident size before it; the caller sets a
  fixed malloc mmap threshold, so freed tensors go back to the system instead of
  staying resident and hiding the next step's peak. CUDA:
  `torch.cuda.max_memory_allocated` over the memory allocated before the step.
  """
  import torch  # pylint: disable=g-import-not-at-top
  bench = TorchBench(args)
  step = bench.make_step(name)
  step()  # warm-up
  if bench.device.type == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    return {"peak_increase_bytes": int(torch.cuda.max_memory_allocated() - before),
            "how": "torch.cuda.max_memory_allocated"}
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets VmHWM to the current resident size
  except OSError as e:
    return {"error": f"cannot reset the peak RSS: {e}"}
  before = _proc_status_kb("VmRSS")
  step()
  peak = _proc_status_kb("VmHWM")
  if before is None or peak is None:
    return {"error": "no /proc/self/status"}
  return {"peak_increase_bytes": int((peak - before) * 1024), "how": "VmHWM - VmRSS"}


def torch_memory(name: str, args) -> dict[str, Any]:
  """Runs `torch_memory_worker` for `name` in a fresh process."""
  cmd = [sys.executable, os.path.abspath(__file__), "--torch-memory-worker", name,
         *args.forwarded]
  # No JAX device in the worker. A fixed mmap threshold (glibc) returns every
  # large freed block to the system, so that the resident size tracks live tensors.
  env = dict(os.environ, JAX_PLATFORMS="cpu", MALLOC_MMAP_THRESHOLD_="131072")
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if proc.returncode != 0:
    lines = proc.stderr.strip().splitlines()
    return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
  return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def machine_info(args) -> dict[str, Any]:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  info = {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "jax_backend": jax.default_backend(), "jax_device": jax.devices()[0].device_kind,
          "versions": {"jax": jax.__version__, "jaxlib": jax.lib.__version__
                       if hasattr(jax.lib, "__version__") else None,
                       "flax": flax.__version__, "optax": optax.__version__,
                       "numpy": np.__version__},
          # As JAX read it, the library's CPU defaults included: every number depends on it.
          "xla_flags": os.environ.get("XLA_FLAGS", "")}
  try:
    with open("/proc/meminfo") as f:
      info["mem_total_kb"] = int(f.readline().split()[1])
  except OSError:
    pass
  if not args.no_torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top
      info["versions"]["torch"] = torch.__version__
    except ImportError:
      info["versions"]["torch"] = None
  return info


def _fmt(value, spec, width):
  if value is None or (isinstance(value, float) and not np.isfinite(value)):
    return "-".rjust(width)
  return format(value, spec).rjust(width)


def print_table(results: dict[str, dict]) -> None:
  def ms(res, side):
    return res.get(side, {}).get("ms_per_step")
  jax_base, torch_base = ms(results.get(BASELINE, {}), "jax"), ms(results.get(BASELINE, {}), "torch")
  flops_base = results.get(BASELINE, {}).get("jax", {}).get("xla_cost", {}).get("flops")
  header = (f"{'method':22s} {'JAX ms':>9s} {'xFGSM':>6s} {'GFLOP':>7s} {'xFGSM':>6s} "
            f"{'compile s':>9s} "
            f"{'XLA temp MB':>11s} {'XLA total MB':>12s} | {'torch ms':>9s} {'xFGSM':>6s} "
            f"{'peak+ MB':>8s} | {'JAX/torch':>9s}")
  print(header)
  print("-" * len(header))
  mb = 1.0 / 2**20
  for name, res in results.items():
    j, t = res.get("jax", {}), res.get("torch", {})
    jm, tm = ms(res, "jax"), ms(res, "torch")
    mem = j.get("memory", {})
    temp, total = mem.get("temp_size_in_bytes"), mem.get("total_estimate_bytes")
    peak_t = t.get("memory", {}).get("peak_increase_bytes")
    flops = j.get("xla_cost", {}).get("flops")
    print(f"{name:22s} {_fmt(jm, '.1f', 9)} "
          f"{_fmt(jm / jax_base if jm and jax_base else None, '.2f', 6)} "
          f"{_fmt(flops / 1e9 if flops else None, '.0f', 7)} "
          f"{_fmt(flops / flops_base if flops and flops_base else None, '.2f', 6)} "
          f"{_fmt(j.get('compile_s'), '.1f', 9)} {_fmt(temp * mb if temp else None, '.1f', 11)} "
          f"{_fmt(total * mb if total else None, '.1f', 12)} | "
          f"{_fmt(tm, '.1f', 9)} {_fmt(tm / torch_base if tm and torch_base else None, '.2f', 6)} "
          f"{_fmt(peak_t * mb if peak_t is not None else None, '.1f', 8)} | "
          f"{_fmt(res.get('jax_over_torch'), '.2f', 9)}")
    for side, r in (("JAX", j), ("torch", t), ("torch memory", t.get("memory", {}))):
      if "error" in r:
        print(f"  {side} error: {r['error']}")


def published_comparison(results: dict[str, dict]) -> list[str]:
  """GradAlign's published cost ratios next to the measured ones."""
  rows = [("fgsm+grad_align_rof", "fgsm", "≈3× on average (V100; 3.25× in the rebuttal)"),
          ("fgsm+grad_align_ror", "fgsm", "(the same, double backprop as the authors)"),
          ("fgsm+grad_align_for", "fgsm", "(the same)"),
          ("fgsm+grad_align_rof", "fgsm_rs", "3.9× (T4, half precision; ZeroGrad paper)"),
          ("fgsm+grad_align_rof", "fgsm_n", "3.4× per minibatch (V100; AdvLC paper)"),
          ("fgsm_n+advlc", "fgsm_n", "(no published ratio)")]
  lines = []
  for num, den, published in rows:
    if num not in results or den not in results:
      continue
    parts = []
    for side in ("jax", "torch"):
      a = results[num].get(side, {}).get("ms_per_step")
      b = results[den].get(side, {}).get("ms_per_step")
      if a and b:
        parts.append(f"{side} {a / b:.2f}×")
    a, b = (results[n].get("jax", {}).get("xla_cost", {}).get("flops") for n in (num, den))
    if a and b:
      parts.append(f"XLA's flop count {a / b:.2f}×")
    lines.append(f"  {num} / {den}: {', '.join(parts) or '-'}   published: {published}")
  return lines


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="preact_resnet18",
                      help="a fastadv_jax.models name with a PyTorch twin (default: "
                           "PreActResNet-18, GradAlign layout, full size)")
  parser.add_argument("--widths", type=lambda s: [int(v) for v in s.split(",")], default=None,
                      help="channel widths of the four stages, e.g. 16,32,64,128 (smaller model)")
  parser.add_argument("--batch", type=int, default=32, help="per-step batch (one device)")
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds (steps per method); 0: compile and count only")
  parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute dtype: JAX config.dtype; PyTorch autocast")
  parser.add_argument("--methods", default=",".join(METHODS),
                      help=f"comma-separated subset of: {', '.join(METHODS)}")
  parser.add_argument("--no-torch", action="store_true", help="time JAX only")
  parser.add_argument("--set", dest="settings", type=config_base.parse_setting,
                      action="append", default=[],
                      help="name=value: a config setting for every method's JAX step, "
                           "e.g. --set bn_updates=once (repeatable)")
  parser.add_argument("--no-torch-memory", action="store_true",
                      help="skip PyTorch's peak-memory measurement (one fresh process per method)")
  parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
  parser.add_argument("--torch-device", default=None, help="default: cuda if available, else cpu")
  parser.add_argument("--out", default=os.path.join(HERE, "results", "bench_train_step.json"))
  parser.add_argument("--no-compilation-cache", action="store_true",
                      help="disable JAX's persistent compilation cache (compile times then "
                           "are those of a cold start)")
  parser.add_argument("--torch-memory-worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
  if BASELINE not in methods:
    methods.insert(0, BASELINE)  # the ratios need it
  args.methods_list = list(dict.fromkeys(methods))
  for flag, minimum in (("batch", 1), ("repeats", 0), ("warmup", 0), ("torch_threads", 1)):
    if getattr(args, flag) < minimum:
      parser.error(f"--{flag.replace('_', '-')} must be >= {minimum}, got {getattr(args, flag)}")
  return args


def _forwarded(args) -> list[str]:
  """The flags the PyTorch memory worker needs to rebuild the same setting."""
  out = ["--model", args.model, "--batch", str(args.batch), "--dtype", args.dtype,
         "--torch-threads", str(args.torch_threads), "--torch-device", args.torch_device]
  if args.widths is not None:
    out += ["--widths", ",".join(map(str, args.widths))]
  return out


def main(argv=None):
  args = parse_args(argv)
  # Spinning OpenMP threads make PyTorch several times slower when other jobs
  # share the cores (measured here: 2.1 s -> 6-8 s per FGSM step of
  # PreActResNet-18 on 2 loaded cores); passive waiting costs nothing on an idle
  # machine. Read when torch loads its OpenMP runtime; an explicit value wins.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  if args.torch_memory_worker is not None:
    print(json.dumps(torch_memory_worker(args.torch_memory_worker, args)))
    return
  if not args.no_torch:
    # On a GPU, leave memory to PyTorch (JAX preallocates 75% by default).
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import torch  # pylint: disable=g-import-not-at-top
    if args.torch_device is None:
      args.torch_device = "cuda" if torch.cuda.is_available() else "cpu"
  args.forwarded = [] if args.no_torch else _forwarded(args)
  import jax  # pylint: disable=g-import-not-at-top
  if not args.no_compilation_cache:
    cache = os.environ.get("FASTADV_JAX_CACHE",
                           os.path.join(os.path.expanduser("~"), ".cache", "fastadv_jax"))
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  info = machine_info(args)
  load_start = os.getloadavg()
  size = "full size" if args.widths is None else f"widths {tuple(args.widths)}"
  print(f"Train-step cost: {args.model} ({size}), batch {args.batch}, {args.dtype}, "
        f"median of {args.repeats} rounds after {args.warmup} warm-up; JAX on "
        f"{info['jax_backend']} ({info['jax_device']}), PyTorch "
        f"{'off' if args.no_torch else args.torch_device} with {args.torch_threads} threads "
        f"(OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}); {info['cpu_count']} CPU cores, "
        f"load average {tuple(round(v, 2) for v in load_start)}", flush=True)

  t0 = time.time()
  results: dict[str, dict] = {name: {} for name in args.methods_list}
  rounds: list[dict] = []

  def write_record(stage: str) -> None:
    record = {
        "benchmark": "bench_train_step", "stage": stage,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": info,
        "settings": {"model": args.model, "widths": args.widths, "batch": args.batch,
                     "config_settings": dict(args.settings),
                     "repeats": args.repeats, "warmup": args.warmup, "dtype": args.dtype,
                     "image_shape": IMAGE_SHAPE, "torch": not args.no_torch,
                     "torch_threads": args.torch_threads, "torch_device": args.torch_device,
                     "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
                     "methods": args.methods_list,
                     "compilation_cache": not args.no_compilation_cache},
        "load_average_start": load_start, "load_average_now": os.getloadavg(),
        "wall_s": time.time() - t0, "baseline": BASELINE,
        "rounds": rounds, "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(record, f, indent=2, default=str)

  # 1. Build and compile every JAX step; build every PyTorch step.
  jax_cases: dict[str, JaxCase] = {}
  torch_steps: dict[str, Callable[[], None]] = {}
  torch_bench = None if args.no_torch else TorchBench(args)
  for name in args.methods_list:
    try:
      jax_cases[name] = JaxCase(name, args)
      results[name]["jax"] = dict(jax_cases[name].info)
    except Exception as e:  # pylint: disable=broad-except
      results[name]["jax"] = {"error": f"{type(e).__name__}: {e}"}
    if torch_bench is not None:
      try:
        torch_steps[name] = torch_bench.make_step(name)
        results[name]["torch"] = {"step": METHODS[name].torch_step,
                                  "num_params": torch_bench.num_params}
      except Exception as e:  # pylint: disable=broad-except
        results[name]["torch"] = {"error": f"{type(e).__name__}: {e}"}
    print(f"  compiled {name:22s} {results[name]['jax'].get('compile_s', float('nan')):6.1f} s"
          f"   [{time.time() - t0:5.0f} s]", flush=True)
  write_record("compiled")

  # 2. Rounds: every method once per round, JAX then PyTorch, so that a change
  # in the machine's load spreads over all methods and both frameworks.
  timings = {name: {"jax": [], "torch": []} for name in args.methods_list}

  def run(side, name, fn):
    try:
      start = time.perf_counter()
      fn()
      return time.perf_counter() - start
    except Exception as e:  # pylint: disable=broad-except
      results[name][side] = {**results[name].get(side, {}), "error": f"{type(e).__name__}: {e}"}
      return None

  for r in range(args.warmup + args.repeats):
    timed = r >= args.warmup
    round_start = time.time()
    for name in args.methods_list:
      for side, fns in (("jax", {n: c.step for n, c in jax_cases.items()}),
                        ("torch", torch_steps)):
        if name not in fns or "error" in results[name].get(side, {}):
          continue
        seconds = run(side, name, fns[name])
        if seconds is not None and timed:
          timings[name][side].append(seconds * 1e3)
    rounds.append({"round": r, "timed": timed, "wall_s": time.time() - round_start,
                   "load_average": os.getloadavg()})
    fgsm = timings[BASELINE]
    print(f"  round {r + 1}/{args.warmup + args.repeats} ({'timed' if timed else 'warm-up'}) "
          f"{time.time() - round_start:6.0f} s, load {rounds[-1]['load_average'][0]:.2f}"
          + (f", FGSM JAX {fgsm['jax'][-1]:.0f} ms" if timed and fgsm["jax"] else "")
          + (f", PyTorch {fgsm['torch'][-1]:.0f} ms" if timed and fgsm["torch"] else ""),
          flush=True)
    for name in args.methods_list:
      for side in ("jax", "torch"):
        if timings[name][side]:
          results[name][side]["times_ms"] = list(timings[name][side])
          results[name][side]["ms_per_step"] = _median(timings[name][side])
      j, t = timings[name]["jax"], timings[name]["torch"]
      if j and t:
        results[name]["jax_over_torch"] = _median(j) / _median(t)
        # Per round: the two steps ran back to back, under the same load.
        results[name]["jax_over_torch_paired_median"] = _median(
            [a / b for a, b in zip(j, t)])
    write_record("timing")
  for name, case in jax_cases.items():
    if case.metrics is not None:
      results[name]["jax"]["metrics_finite"] = case.metrics_finite()
  del jax_cases, torch_steps, torch_bench

  # 3. PyTorch peak memory, one fresh process per method.
  if not args.no_torch and not args.no_torch_memory:
    for name in args.methods_list:
      if "torch" in results[name] and "error" not in results[name]["torch"]:
        results[name]["torch"]["memory"] = torch_memory(name, args)
    write_record("memory")

  print()
  print_table(results)
  lines = published_comparison(results)
  if lines:
    print("\nCost ratios against the published ones (same framework, same model and batch):")
    print("\n".join(lines))
  jp = results[BASELINE].get("jax", {}).get("num_params")
  tp = results[BASELINE].get("torch", {}).get("num_params")
  if jp and tp and jp != tp:
    print(f"\nWARNING: parameter counts differ: JAX {jp}, PyTorch {tp}.")
  load_end = os.getloadavg()
  print(f"\nLoad average at the end: {tuple(round(v, 2) for v in load_end)} on "
        f"{info['cpu_count']} cores. When it exceeds the core count, other jobs share the "
        f"machine: trust the ratios (measured round by round) more than absolute times.")
  write_record("complete")
  print(f"Wrote {args.out}")


if __name__ == "__main__":
  main()

"""Cost of GradAlign's exact double backprop: the three formulations side by side.

Times one jitted parameter gradient of

    CE(f(x)) + λ · GradAlign(x)          (GradAlign with g₁ given, as an FGSM
                                          attack's AttackOutput.grad_at_start provides)

for GradAlign's exact formulations ("reverse_over_forward": a jvp-based
surrogate differentiated by reverse mode; "reverse_over_reverse": grad of grad;
"forward_over_reverse": a jvp of the parameter gradient),
and the parameter gradient of plain CE as the baseline, on PreActResNet-18 at
CIFAR-10 size with BatchNorm in batch mode. Prints the median time of each and
the ratios. With --torch it also times the same step in PyTorch the way the
authors' code computes it (`create_graph=True` double backprop) and plain CE.

  python benchmarks/bench_gradalign.py --batch 32            # CPU default
  python benchmarks/bench_gradalign.py --batch 128 --torch   # a GPU, both libraries

Compilation time is reported separately and excluded from the step times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import closures, models
from fastadv_jax import regularizers as R


def _median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_jax(args) -> dict[str, float]:
  model = models.get_model(args.model)
  variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
  params, batch_stats = variables["params"], variables["batch_stats"]
  x = jax.random.uniform(jax.random.key(1), (args.batch, 32, 32, 3))
  y = jax.random.randint(jax.random.key(2), (args.batch,), 0, 10)
  eps = args.eps / 255

  def loss_fn_of(p):
    lf = closures.logits_fn(model, {"params": p, "batch_stats": batch_stats}, bn="batch")
    return closures.cross_entropy(lf, y)

  grad_start = jax.jit(jax.grad(loss_fn_of(params)))(x)

  def make(formulation):
    def total(p, key):
      loss_fn = loss_fn_of(p)
      value = loss_fn(x)
      if formulation is not None:
        value = value + args.lam * R.grad_align(loss_fn, x, key, eps=eps, grad_start=grad_start,
                                                formulation=formulation)
      return value
    return jax.jit(jax.value_and_grad(total))

  results = {}
  for name, formulation in [("ce", None)] + [(f, f) for f in R.FORMULATIONS]:
    step = make(formulation)
    key = jax.random.key(3)
    start = time.perf_counter()
    jax.block_until_ready(step(params, key))
    compile_s = time.perf_counter() - start
    seconds = _median_time(lambda: jax.block_until_ready(step(params, key)), args.repeats)
    results[name] = seconds
    print(f"  jax   {name:22s} {seconds * 1e3:9.1f} ms/step   (first call incl. compile "
          f"{compile_s:6.1f} s)", flush=True)
  return results


def bench_torch(args) -> dict[str, float]:
  import torch
  import torch.nn as tnn
  import torch.nn.functional as F

  class Block(tnn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.bn1, self.conv1 = tnn.BatchNorm2d(cin), tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn2, self.conv2 = tnn.BatchNorm2d(cout), tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.shortcut = (tnn.Conv2d(cin, cout, 1, stride, bias=False)
                       if stride != 1 or cin != cout else None)

    def forward(self, x):
      out = F.relu(self.bn1(x))
      shortcut = self.shortcut(x) if self.shortcut is not None else x
      out = self.conv1(out)
      out = self.conv2(F.relu(self.bn2(out)))
      return out + shortcut

  class PreActResNet18(tnn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = tnn.Conv2d(3, 64, 3, 1, 1, bias=False)
      layers, cin = [], 64
      for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
      self.layers = tnn.Sequential(*layers)
      self.linear = tnn.Linear(512, 10)

    def forward(self, x):
      out = self.layers(self.conv1(x))
      return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))

  torch.manual_seed(0)
  model = PreActResNet18().train()
  x = torch.rand(args.batch, 3, 32, 32)
  y = torch.randint(0, 10, (args.batch,))
  eps = args.eps / 255
  x.requires_grad_(True)
  grad1 = torch.autograd.grad(F.cross_entropy(model(x), y), x)[0].detach()
  x = x.detach()

  def step_ce():
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()

  def step_grad_align():
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    x2 = (x + torch.empty_like(x).uniform_(-eps, eps)).requires_grad_(True)
    grad2 = torch.autograd.grad(F.cross_entropy(model(x2), y), x2, create_graph=True)[0]
    g1, g2 = grad1.flatten(1), grad2.flatten(1)
    cos = (g1 / g1.norm(dim=1, keepdim=True) * (g2 / g2.norm(dim=1, keepdim=True))).sum(1)
    (loss + args.lam * (1.0 - cos.mean())).backward()

  results = {}
  for name, fn in [("ce", step_ce), ("double_backprop", step_grad_align)]:
    fn()  # warm-up
    seconds = _median_time(fn, args.repeats)
    results[name] = seconds
    print(f"  torch {name:22s} {seconds * 1e3:9.1f} ms/step", flush=True)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--eps", type=float, default=8.0, help="in /255")
  parser.add_argument("--lam", type=float, default=0.2)
  parser.add_argument("--model", default="preact_resnet18_gradalign")
  parser.add_argument("--torch", action="store_true", help="also time PyTorch (authors' way)")
  args = parser.parse_args()

  print(f"GradAlign step cost: {args.model}, batch {args.batch}, 32x32x3, "
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"median of {args.repeats}")
  res = bench_jax(args)
  ce = res["ce"]
  print("  ratios: " + ", ".join(f"{form} / CE = {res[form] / ce:5.2f}x"
                               for form in R.FORMULATIONS))
  fastest = min(R.FORMULATIONS, key=lambda form: res[form])
  print(f"  fastest formulation here: {fastest} (library default: {R.DEFAULT_FORMULATION})")
  if args.torch:
    tres = bench_torch(args)
    print(f"  torch ratio: double_backprop / CE = {tres['double_backprop'] / tres['ce']:5.2f}x; "
          f"jax {R.DEFAULT_FORMULATION} / torch double_backprop = "
          f"{res[R.DEFAULT_FORMULATION] / tres['double_backprop']:5.2f}x, "
          f"jax CE / torch CE = {ce / tres['ce']:5.2f}x")


if __name__ == "__main__":
  main()

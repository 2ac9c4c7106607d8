"""Input-pipeline throughput on this machine, next to one CPU train step.

Measures, at CIFAR size (32x32x3) and batch 128:

1. host batching: `data.train_batches` over one epoch of uint8 arrays;
2. on-device augmentation: `data.augment` jitted (crop with zero or reflect
   padding + flip; with a 15-degree rotation as in the ZeroGrad CIFAR-100 recipe),
   including the host-to-device copy of the uint8 batch;
3. the whole input side of a step (next batch + copy + augment);
4. for scale, one plain SGD step (forward + backward) of a model, default
   PreActResNet-18 (`--model none` skips it).

The input side must be a small fraction of the step: it runs on the host
thread while the device computes, and here it is timed on the same CPU that
would compute the step.

  python benchmarks/bench_input_pipeline.py [--model preact_resnet18|simple_cnn|none]
      [--source cifar10|random] [--repeats 20]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from fastadv_jax import data

BATCH = 128


def _images(source: str):
  if source == "cifar10":
    try:
      return data.load_split("cifar10", "train")
    except data.DatasetNotFoundError as e:
      print(f"(CIFAR-10 not available, using random arrays: {str(e).splitlines()[0]})")
  rng = np.random.default_rng(0)
  return (rng.integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8),
          rng.integers(0, 10, (50_000,)).astype(np.int32))


def _time(fn, repeats: int) -> float:
  """Median seconds of `fn()` over `repeats` calls after one warm-up call."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _train_step_seconds(model_name: str, repeats: int) -> float | None:
  if model_name == "none":
    return None
  from fastadv_jax import models  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  model = models.get_model(model_name)
  variables = models.init_variables(model, jax.random.key(0), (32, 32, 3))
  params = variables["params"]
  others = {k: v for k, v in variables.items() if k != "params"}

  @jax.jit
  def step(params, x, y):
    def loss_fn(p):
      logits, _ = model.apply({"params": p, **others}, x, train=True,
                              mutable=list(others))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads), loss

  x = jnp.zeros((BATCH, 32, 32, 3), jnp.float32)
  y = jnp.zeros((BATCH,), jnp.int32)
  return _time(lambda: jax.block_until_ready(step(params, x, y)), repeats)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="preact_resnet18")
  parser.add_argument("--source", default="cifar10", choices=("cifar10", "random"))
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  print(f"devices: {jax.devices()}; batch {BATCH}, 32x32x3 uint8")
  images, labels = _images(args.source)

  start = time.perf_counter()
  steps = sum(1 for _ in data.train_batches(images, labels, batch_size=BATCH, seed=0, epoch=0))
  batching_s = (time.perf_counter() - start) / steps
  print(f"host batching (train_batches): {batching_s * 1e3:8.3f} ms/batch "
        f"= {BATCH / batching_s:12,.0f} img/s")

  batch_x, batch_y = next(data.train_batches(images, labels, batch_size=BATCH, seed=0,
                                             epoch=0))
  key = jax.random.key(0)
  results = {}
  for name, kwargs in (("crop(zero)+flip", dict(padding=4, pad_mode="zero")),
                       ("crop(reflect)+flip", dict(padding=4, pad_mode="reflect")),
                       ("crop+flip+rotate(15)", dict(padding=4, rotation_degrees=15.0))):
    fn = jax.jit(functools.partial(data.augment, **kwargs))
    seconds = _time(lambda: fn(jax.device_put(batch_x), key).block_until_ready(),
                    args.repeats)
    results[name] = seconds
    print(f"augment {name:22s} (jit, incl. copy): {seconds * 1e3:8.3f} ms/batch "
          f"= {BATCH / seconds:12,.0f} img/s")

  fn = jax.jit(functools.partial(data.augment, padding=4, pad_mode="zero"))
  iterator = iter(data.train_batches(images, labels, batch_size=BATCH, seed=0, epoch=1))

  def whole():
    x, y = next(iterator)
    return fn(jax.device_put(x), key).block_until_ready(), jax.device_put(y)
  input_s = _time(whole, args.repeats)
  print(f"input side of one step (batch+copy+augment): {input_s * 1e3:8.3f} ms/batch "
        f"= {BATCH / input_s:12,.0f} img/s")

  step_s = _train_step_seconds(args.model, max(3, args.repeats // 5))
  if step_s is not None:
    print(f"{args.model} SGD step (fwd+bwd, jit, batch {BATCH}): {step_s * 1e3:10.1f} ms "
          f"= {BATCH / step_s:10,.0f} img/s")
    print(f"input side / train step = {input_s / step_s:.2%} (an FGSM/GradAlign step "
          f"costs 2-4x this plain step, so the ratio is smaller still)")


if __name__ == "__main__":
  main()

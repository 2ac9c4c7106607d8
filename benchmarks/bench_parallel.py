"""The train step through `jax.pmap` and through `jax.shard_map`, side by side.

Both run the same per-device step (`fastadv_jax.train_step.make_train_step`)
on the same state and batch, through `train_state.DeviceMap(mode)`; the
results must be equal (checked here, and in tests/test_multihost.py), so the
only question is speed. Rounds alternate the two modes so that load changes
on a shared machine spread over both.

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/bench_parallel.py
  python benchmarks/bench_parallel.py --variants cnn_fgsm,gradalign --batch 64 --repeats 10

Results: the printed table and benchmarks/results/bench_parallel.json.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import jax
import numpy as np

from fastadv_jax import config_base
from fastadv_jax import train
from fastadv_jax import train_state
from fastadv_jax import train_step

import records  # benchmarks/records.py, next to this script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SHAPE = (32, 32, 3)
STEPS_PER_EPOCH = 390


def build(variant: str, mode: str, batch: int, widths):
  config = config_base.load_config_file(os.path.join(REPO, "configs", "cifar10.py"), variant)
  if widths and config.model.name != "simple_cnn":
    config.model.kwargs = dict(widths=widths)
  method = config_base.validate_config(config, jax.device_count())
  model = train_state.create_model(config)
  tx = train_state.create_optimizer(config, STEPS_PER_EPOCH)
  state = train_state.create_train_state(config, method, model, tx, jax.random.PRNGKey(0),
                                         IMAGE_SHAPE, batch)
  step = train_step.make_train_step(model, tx, method, steps_per_epoch=STEPS_PER_EPOCH,
                                    seed=0, augment=train.make_augment(config))
  device_map = train_state.DeviceMap(mode)
  n = device_map.num_local_devices
  rng = np.random.default_rng(0)
  batch_arrays = {
      "image": rng.integers(0, 256, (n, batch // n) + IMAGE_SHAPE, dtype=np.uint8),
      "label": rng.integers(0, 10, (n, batch // n)).astype(np.int32),
      "index": np.arange(batch, dtype=np.int32).reshape(n, -1)}
  return device_map(step), train_state.to_devices(state, device_map.placement), batch_arrays


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default="cnn_fgsm,fgsm")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--widths", default="16,32,64,128",
                      help="PreActResNet widths (empty: the config's)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
  parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results",
                                                    "bench_parallel.json"))
  args = parser.parse_args()
  widths = tuple(int(w) for w in args.widths.split(",")) if args.widths else None
  rows = []
  for variant in args.variants.split(","):
    runs = {}
    for mode in train_state.PARALLEL_MODES:
      fn, state, batch = build(variant, mode, args.batch, widths)
      start = time.perf_counter()
      state, metrics = fn(state, batch)
      jax.block_until_ready(state)
      runs[mode] = {"fn": fn, "state": state, "batch": batch, "times": [],
                    "first_call_s": time.perf_counter() - start}
    for _ in range(args.repeats):
      for mode, run in runs.items():
        start = time.perf_counter()
        for _ in range(args.steps):
          run["state"], metrics = run["fn"](run["state"], run["batch"])
        jax.block_until_ready(run["state"])
        run["times"].append((time.perf_counter() - start) / args.steps)
    same = all(np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(train_state.to_host(runs["pmap"]["state"]).params),
        jax.tree_util.tree_leaves(train_state.to_host(runs["shard_map"]["state"]).params)))
    row = {"variant": variant, "equal_params": bool(same)}
    for mode, run in runs.items():
      row[f"{mode}_ms"] = 1e3 * statistics.median(run["times"])
      row[f"{mode}_first_call_s"] = run["first_call_s"]
    row["shard_map_over_pmap"] = row["shard_map_ms"] / row["pmap_ms"]
    rows.append(row)
    print(f"{variant:12s} pmap {row['pmap_ms']:8.1f} ms  shard_map {row['shard_map_ms']:8.1f} ms"
          f"  ratio {row['shard_map_over_pmap']:.3f}  equal params: {same}", flush=True)
  result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "load_avg": os.getloadavg(), "devices": jax.device_count(),
                        "backend": jax.default_backend()},
            "versions": {"jax": jax.__version__},
            "settings": vars(args), "rows": rows}
  records.write_record(args.out, result, indent=2)


if __name__ == "__main__":
  main()

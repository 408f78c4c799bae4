"""Costs of measuring DNR inside the train step, of AP's selection, and of vmapped runs.

Prints and records, in one run on one machine:
  (a) the median time of the jitted train step without DNR instrumentation
      (`return_activations=False`) and with DNR accumulated inside the step, for
      LeNet-300-100 (28x28x1) and ResNet-20 (32x32x3) at batch 128:
      dnr_overhead = median over interleaved rounds of with / without - 1 (target:
      within 5 %; ResNet-20 gets three times the rounds, its figure is the headline);
  (b) the median time of AP's selection (`ap.ap_prune`, q = 2 % of ResNet-20's
      weights) against one IMP cycle of the reference setting (CIFAR-10, batch 64,
      50 epochs), estimated as steps_per_epoch * epochs * median step time:
      ap_overhead = AP time / cycle time (target: <= 1 %);
  (c) several runs trained side by side with `jax.vmap` against one after another:
      vmap_speedup = sequential time / vmapped time, per model.
Timings of compared programs are interleaved, so drifting machine load hits both alike.

Run:
  python -m benchmarks.pruning            # a few minutes on 2 CPU cores
  python -m benchmarks.pruning --quick    # small batches, a smoke run

Writes benchmarks/results/pruning.json (or --out).
"""

import argparse
import os
import platform
import statistics
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import output
from pruning_jax import ap
from pruning_jax import masks as masks_lib
from pruning_jax import models
from pruning_jax import scoring
from pruning_jax import train

CIFAR10_TRAIN = 50_000


def _setup(name: str, shape: tuple[int, int, int], batch: int, track_dnr: bool,
           members: int = 1, seed: int = 0):
  """(jitted step, state, batch) for one model; `members` > 1 stacks vmapped runs."""
  model = models.build_model(name, input_shape=shape, rngs=nnx.Rngs(seed))
  graphdef, params, batch_stats = train.split_model(model)
  masks = masks_lib.init_masks(params)
  config = train.TrainConfig(batch_size=batch, augment=shape[0] == 32)
  optimizer = train.make_optimizer(config, masks)
  step = train.make_train_step(graphdef, optimizer, train.learning_rate_schedule(config, 100),
                               mean=(0.5,) * shape[2], std=(0.25,) * shape[2],
                               augment=config.augment, track_dnr=track_dnr)
  state = train.init_train_state(params, batch_stats, masks, optimizer,
                                 models.activation_shapes(model), jax.random.key(seed))
  if members > 1:
    state = jax.tree.map(lambda x: jnp.stack([x] * members), state)
  rng = np.random.default_rng(seed)
  data = {"image": rng.integers(0, 256, (batch, *shape), dtype=np.uint8),
          "label": rng.integers(0, 10, batch).astype(np.int32)}
  mesh = train.make_mesh(1)
  fn = train.jit_train_step(step, mesh, members=members > 1)
  # Committed inputs from the start: a first call on uncommitted arrays would compile a
  # second program for the committed outputs fed back in.
  return fn, jax.device_put(state, train.replicated(mesh)), data


def interleaved_times(cases: dict, repeats: int) -> dict[str, list[float]]:
  """Seconds per call of each `name: (fn, state, batch)` in interleaved rounds.

  In each round every case runs twice back to back and the second call is timed (a
  training loop calls its step back to back; the first call after another program pays
  for that program's cache state).
  """
  states = {}
  for name, (fn, state, batch) in cases.items():
    states[name], _ = fn(state, batch)  # compile and warm up
    jax.block_until_ready(states[name])
  times = {name: [] for name in cases}
  for _ in range(repeats):
    for name, (fn, _, batch) in cases.items():
      for _call in range(2):
        t0 = time.perf_counter()
        states[name], _ = fn(states[name], batch)
        jax.block_until_ready(states[name])
      times[name].append(time.perf_counter() - t0)
  return times


def interleaved_medians(cases: dict, repeats: int) -> dict[str, float]:
  """Median seconds per call of each `name: (fn, state, batch)`, rounds interleaved."""
  return {name: statistics.median(t) for name, t in interleaved_times(cases, repeats).items()}


def bench_dnr(name: str, shape, batch: int, repeats: int) -> dict:
  times = interleaved_times({"without_dnr": _setup(name, shape, batch, False),
                             "with_dnr": _setup(name, shape, batch, True)}, repeats)
  medians = {n: statistics.median(t) for n, t in times.items()}
  round_ratios = [w / wo for w, wo in zip(times["with_dnr"], times["without_dnr"])]
  return {"batch": batch, "seconds": medians, "rounds": repeats,
          "ratio_of_medians_minus_1": medians["with_dnr"] / medians["without_dnr"] - 1.0,
          "dnr_overhead": statistics.median(round_ratios) - 1.0}


def bench_ap(batch: int, epochs: int, repeats: int) -> dict:
  fn, state, data = _setup("resnet20", (32, 32, 3), batch, True)
  step_time = interleaved_medians({"step": (fn, state, data)}, repeats)["step"]
  steps_per_epoch = CIFAR10_TRAIN // batch
  cycle = steps_per_epoch * epochs * step_time
  _, params, _ = train.split_model(
      models.build_model("resnet20", input_shape=(32, 32, 3), rngs=nnx.Rngs(1)))
  masks = masks_lib.init_masks(params)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  # Stand-in for a cycle's training: every weight moved by a little noise.
  end = jax.tree.unflatten(treedef, [p + 0.01 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  start = params
  n_remove = scoring.round_half_up(0.02 * int(masks_lib.num_remaining(masks)))
  jax.block_until_ready(ap.ap_prune(end, start, masks, n_remove))  # compiles
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(ap.ap_prune(end, start, masks, n_remove))
    times.append(time.perf_counter() - t0)
  ap_time = statistics.median(times)
  return {"batch": batch, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
          "step_seconds": step_time, "cycle_seconds_estimate": cycle,
          "ap_prune_seconds": ap_time, "ap_removed": n_remove,
          "prunable": masks_lib.num_prunable(masks), "ap_overhead": ap_time / cycle}


def bench_vmap(name: str, shape, batch: int, members: int, repeats: int) -> dict:
  single = _setup(name, shape, batch, True)
  stacked = _setup(name, shape, batch, True, members=members)
  medians = interleaved_medians({"one_run": single, "vmapped": stacked}, repeats)
  sequential = members * medians["one_run"]
  return {"batch": batch, "members": members,
          "seconds": {"sequential": sequential, "vmapped": medians["vmapped"]},
          "vmap_speedup": sequential / medians["vmapped"]}


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--quick", action="store_true", help="small batches, a smoke run")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "pruning.json"))
  args = parser.parse_args(argv)
  batch, ap_batch, repeats = (16, 16, 2) if args.quick else (128, 64, args.repeats)
  print(f"devices={jax.devices()} repeats={repeats}", flush=True)
  dnr = {"lenet300100": bench_dnr("lenet300100", (28, 28, 1), batch, 5 * repeats),
         "resnet20": bench_dnr("resnet20", (32, 32, 3), batch, 3 * repeats)}
  for name, row in dnr.items():
    s = row["seconds"]
    print(f"{name:<12} batch {row['batch']}: step {1e3 * s['without_dnr']:.2f} ms without "
          f"DNR, {1e3 * s['with_dnr']:.2f} ms with; dnr_overhead "
          f"{100 * row['dnr_overhead']:+.2f} %", flush=True)
  ap_row = bench_ap(ap_batch, 50, repeats)
  print(f"AP selection {1e3 * ap_row['ap_prune_seconds']:.1f} ms for {ap_row['ap_removed']} "
        f"of {ap_row['prunable']} weights; one cycle ({ap_row['steps_per_epoch']} steps x "
        f"{ap_row['epochs']} epochs x {1e3 * ap_row['step_seconds']:.1f} ms) "
        f"{ap_row['cycle_seconds_estimate']:.0f} s; ap_overhead "
        f"{100 * ap_row['ap_overhead']:.4f} %", flush=True)
  vmap = {"lenet300100": bench_vmap("lenet300100", (28, 28, 1), batch, 6, 5 * repeats),
          "conv4": bench_vmap("conv4", (28, 28, 1), 16 if args.quick else 32, 2,
                              max(2, repeats // 2))}
  for name, row in vmap.items():
    s = row["seconds"]
    print(f"{name:<12} {row['members']} runs, batch {row['batch']}: one after another "
          f"{1e3 * s['sequential']:.1f} ms, vmapped {1e3 * s['vmapped']:.1f} ms; "
          f"vmap_speedup {row['vmap_speedup']:.2f}x", flush=True)
  result = {
      "benchmark": "pruning",
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": os.cpu_count(), "jax": jax.__version__,
                  "backend": jax.default_backend(),
                  "devices": [str(d) for d in jax.devices()],
                  "load_average": list(os.getloadavg())},
      "repeats": repeats,
      "dnr_overhead": {name: row["dnr_overhead"] for name, row in dnr.items()},
      "ap_overhead": ap_row["ap_overhead"],
      "vmap_speedup": {name: row["vmap_speedup"] for name, row in vmap.items()},
      "dnr": dnr, "ap": ap_row, "vmap": vmap,
  }
  output.write_result(result, args.out)
  return result


if __name__ == "__main__":
  main()

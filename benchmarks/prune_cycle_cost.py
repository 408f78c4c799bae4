"""What one IMP training cycle of each model costs: seconds per step, epoch and cycle.

Times the jitted training step (DNR tracking and masks included, as the experiment runs
it) of every model of an AP experiment preset on its dataset, and multiplies by the
preset's steps per epoch and epochs per cycle. A budget for `experiments.prune_ap` follows:
a run trains `cycles + 1` rounds, an arm of a seed `cycles` of them after the shared one.

Run:
  python -m benchmarks.prune_cycle_cost                  # the cpu-long preset's models
  python -m benchmarks.prune_cycle_cost --preset paper   # needs the CIFAR archives

Writes ``benchmarks/results/prune_cycle_cost.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from flax import nnx
import jax

from benchmarks import output
from experiments import prune_ap
from pruning_jax import masks as masks_lib
from pruning_jax import models
from pruning_jax import pipeline
from pruning_jax import train as train_lib


def step_seconds(model_entry: dict, data, steps: int) -> tuple[float, int]:
  """(mean seconds per step over `steps` consecutive timed steps, steps per epoch)."""
  config = train_lib.TrainConfig(**model_entry["train"])
  model = models.build_model(model_entry["model"], num_classes=data.num_classes,
                             input_shape=data.train_images.shape[1:], rngs=nnx.Rngs(0))
  graphdef, params, batch_stats = train_lib.split_model(model)
  masks = masks_lib.init_masks(params)
  iterator = pipeline.EpochIterator(data.train_images, data.train_labels, config.batch_size,
                                    seed=0)
  mesh = train_lib.make_mesh(1)
  compiled = train_lib.compile_steps(graphdef, config, iterator.steps_per_epoch, mesh,
                                     masks=masks, mean=data.mean, std=data.std)
  state = train_lib.init_train_state(params, batch_stats, masks, compiled.optimizer,
                                     models.activation_shapes(model), jax.random.key(0))
  state = jax.device_put(state, train_lib.replicated(mesh))
  state, _ = compiled.train(state, next(iterator))  # compiles
  jax.block_until_ready(state)
  batches = [next(iterator) for _ in range(steps)]
  t0 = time.perf_counter()
  for batch in batches:
    state, _ = compiled.train(state, batch)
  jax.block_until_ready(state)
  return (time.perf_counter() - t0) / steps, iterator.steps_per_epoch


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="cpu-long", choices=prune_ap.PRESETS[1:])
  parser.add_argument("--models", nargs="+", default=None, help="subset of the preset")
  parser.add_argument("--steps", type=int, default=30,
                      help="timed steps per model (LeNet-300-100 gets 10x as many)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "prune_cycle_cost.json"))
  args = parser.parse_args(argv)
  preset = prune_ap.load_preset(args.preset)
  rows = {}
  for entry in preset["models"]:
    if args.models and entry["model"] not in args.models:
      continue
    data = prune_ap.load_data(entry, None, False)
    steps = args.steps * (10 if entry["model"] == "lenet300100" else 1)
    per_step, spe = step_seconds(entry, data, steps)
    epochs = entry["train"]["epochs"]
    arms = len(preset.get("arms", prune_ap.DEFAULT_ARMS))
    rounds = arms * preset["cycles"] + 1  # per seed: the shared round 0, then every arm
    rows[entry["model"]] = {
        "batch_size": entry["train"]["batch_size"], "steps_per_epoch": spe,
        "seconds_per_step": per_step, "seconds_per_epoch": per_step * spe,
        "epochs_per_cycle": epochs, "seconds_per_cycle": per_step * spe * epochs,
        "hours_per_seed": per_step * spe * epochs * rounds / 3600,
        "seeds": len(entry["seeds"]),
        "hours_all_seeds": per_step * spe * epochs * rounds * len(entry["seeds"]) / 3600}
    print(f"{entry['model']:<12} {per_step:8.4f} s/step  {per_step * spe:8.1f} s/epoch  "
          f"{per_step * spe * epochs / 60:7.1f} min/cycle  "
          f"{rows[entry['model']]['hours_all_seeds']:8.1f} h for the preset", flush=True)
  result = {"benchmark": "prune_cycle_cost", "preset": args.preset, "models": rows,
            "method": "mean of consecutive jitted train steps (DNR tracking on, dense masks) "
                      "after one compiling step, times the preset's steps per epoch and "
                      "epochs per cycle; evaluation and pruning not included",
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count(), "jax": jax.__version__,
                        "backend": jax.default_backend(),
                        "devices": [str(d) for d in jax.devices()]}}
  output.write_result(result, args.out)
  return result


if __name__ == "__main__":
  main()

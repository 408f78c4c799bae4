"""AP against its host pruning methods and controls: accuracy and DNR at every sparsity.

Run:
  python -m experiments.prune_ap --preset cpu --out runs/ap_cpu     # < 15 min, 2 CPU cores
  python -m experiments.prune_ap --preset cpu-long --out runs/ap_cpu_long   # hours, resumable
  python -m experiments.prune_ap --preset paper --out runs/ap_paper # ResNet-20, VGG-19; GPU/TPU
  python -m experiments.prune_ap --preset smoke --out /tmp/ap       # seconds, synthetic data

For every model of the preset, seed, host method and arm, `pruning_jax.rounds.run_rounds`
trains the IMP rounds in `OUT/runs/<run>/` (checkpointed, so an interrupted experiment
resumes where it stopped: run the same command again). Runs of one model and seed share
their dense round 0. Arms (each removes exactly p of the remaining weights per cycle):
  host             the host method alone removes p (AP with q = 0)
  ap               host p - q, then AP's q: negative survivors that moved least
  ap_relu_fed      AP restricted to layers whose inputs are ReLU outputs
  random_q         host p - q, then q uniformly random survivors
  most_negative_q  host p - q, then the q most negative survivors
Models with BatchNorm can also be evaluated after BatchNorm recalibration
(`bn_recalibration_batches` in the preset), the control for repairs by statistics alone.
results.json and results.md are rewritten after every finished run, so a long preset
has partial results while it runs. Writes into OUT:
  results.json   {"runs": [one object per (model, method, arm, seed, cycle)], ...}
  results.md     verdicts; paired differences arm − host with 95 % CIs per sparsity
  *.png          accuracy and DNR vs sparsity with bands, DNR per layer, cycle curves

Presets live in experiments/configs/prune_ap_<name>.json (smoke is built in); the flags
below override them.

References:
  Liu, Ghosh, Tan & Motani, 2023, "AP: Selective Activation for De-sparsifying Pruned
  Neural Networks", TMLR, arXiv 2212.06145.
"""

import argparse
import json
import os
import shlex
import sys
import time

import numpy as np

from experiments import prune_ap_report as report
from experiments import reporting
from pruning_jax import datasets
from pruning_jax import rounds
from pruning_jax import train as train_lib

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
PRESETS = ("smoke", "cpu", "cpu-long", "paper")
# Arm name -> RoundsConfig overrides; "host" prunes with the host alone.
ARMS = {
    "host": {"ap_rate": None},
    "ap": {"ap_selection": "least_moved", "ap_scope": "all"},
    "ap_relu_fed": {"ap_selection": "least_moved", "ap_scope": "relu_fed"},
    "random_q": {"ap_selection": "random", "ap_scope": "all"},
    "most_negative_q": {"ap_selection": "most_negative", "ap_scope": "all"},
}
DEFAULT_ARMS = ("host", "ap")
SMOKE = {
    "name": "smoke",
    "description": "A few steps of LeNet-300-100 on synthetic data, for tests.",
    "cycles": 2, "rate": 0.2, "ap_rate": 0.02, "rewind_step": 0,
    "models": [{"model": "lenet300100", "dataset": "fashion_mnist",
                "methods": ["magnitude"], "seeds": [0], "train_subset": 0,
                "test_subset": 0, "eval_batch_size": 64,
                "train": {"optimizer": "adam", "learning_rate": 1.2e-3,
                          "weight_decay": 0.0, "warmup_steps": 0, "decay_epochs": [],
                          "epochs": 2, "batch_size": 32, "augment": False}}],
}


def load_preset(name: str) -> dict:
  """The preset's settings: built in for "smoke", else configs/prune_ap_<name>.json."""
  if name not in PRESETS:
    raise ValueError(f"preset must be one of {PRESETS}, got {name!r}.")
  if name == "smoke":
    return json.loads(json.dumps(SMOKE))
  with open(os.path.join(CONFIG_DIR, f"prune_ap_{name.replace('-', '_')}.json")) as fh:
    return json.load(fh)


def synthetic_dataset(num_train: int = 256, num_test: int = 128,
                      shape: tuple[int, int, int] = (28, 28, 1), num_classes: int = 10,
                      seed: int = 0) -> datasets.Dataset:
  """A learnable stand-in for image data: noisy copies of a faint pattern per class."""
  rng = np.random.default_rng(seed)
  # Classes differ by a faint pattern on a shared image, so accuracy is not trivially 1.
  prototypes = rng.integers(64, 192, shape) + rng.normal(0, 8, (num_classes, *shape))
  labels = rng.integers(0, num_classes, num_train + num_test).astype(np.int32)
  noise = rng.normal(0, 64, (num_train + num_test, *shape))
  images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
  mean, std = datasets.channel_stats(images[:num_train])
  return datasets.Dataset(images[:num_train], labels[:num_train], images[num_train:],
                          labels[num_train:], num_classes, mean, std,
                          tuple(f"class {i}" for i in range(num_classes)), "synthetic")


def _run_name(model: str, dataset: str, method: str, arm: str, seed: int) -> str:
  # The first two arms keep the folder names of runs made before the controls existed.
  tag = {"host": "noap", "ap": "ap"}.get(arm, arm)
  return f"{model}-{dataset}-{method}-{tag}-s{seed}"


def rounds_config(preset: dict, model: dict, dataset: str, method: str, arm: str,
                   seed: int, synthetic: bool, data_dir: str | None) -> rounds.RoundsConfig:
  """The `RoundsConfig` of one run: a preset's model entry, host method, arm and seed."""
  overrides = dict(ARMS[arm])
  if "ap_rate" not in overrides:
    overrides["ap_rate"] = preset["ap_rate"]
  return rounds.RoundsConfig(
      model=model["model"], dataset=dataset, data_dir=data_dir,
      train=train_lib.TrainConfig(**model["train"]), method=method,
      rate=preset["rate"], cycles=preset["cycles"], rewind_step=preset["rewind_step"],
      seed=seed, train_subset=0 if synthetic else model["train_subset"],
      test_subset=0 if synthetic else model["test_subset"],
      eval_batch_size=model["eval_batch_size"],
      eval_every_epoch=model.get("eval_every_epoch", False),
      bn_recalibration_batches=model.get("bn_recalibration_batches", 0),
      save_every_steps=model.get("save_every_steps", 0), **overrides)


def load_data(model: dict, data_dir: str | None, synthetic: bool) -> datasets.Dataset:
  """The dataset of a preset's model entry (padded to `pad_to` if set), or synthetic images."""
  if synthetic:
    shape = tuple(model.get("input_shape", (28, 28, 1)))
    return synthetic_dataset(shape=shape)
  data = datasets.load_dataset(model["dataset"], data_dir)
  pad = model.get("pad_to")
  if pad:
    data = datasets.pad_images(data, pad)
  return data


def run_experiment(preset: dict, out: str, *, data_dir: str | None = None,
                   synthetic: bool = False, progress: bool = True,
                   command: str = "") -> dict:
  """Runs every (model, seed, method, arm) of `preset`; returns the results.json dict.

  After each finished run, results.json, results.md and the plots are rewritten with
  the runs finished so far.
  """
  rows, timings, cycle_seconds = [], {}, {}
  start = time.perf_counter()
  arms = tuple(preset.get("arms", DEFAULT_ARMS))
  unknown = sorted(set(arms) - set(ARMS))
  if unknown:
    raise ValueError(f"arms {unknown} are unknown; choose from {sorted(ARMS)}.")
  if arms[0] != "host":
    raise ValueError(f"arms must start with 'host' (the baseline every arm is paired "
                     f"with), got {list(arms)}.")
  results = {}
  for model in preset["models"]:
    data = load_data(model, data_dir, synthetic)
    dataset = "synthetic" if synthetic else model["dataset"]
    for seed in model["seeds"]:
      round0 = None
      for method in model["methods"]:
        for arm in arms:
          config = rounds_config(preset, model, dataset, method, arm, seed, synthetic,
                                  data_dir)
          name = _run_name(model["model"], dataset, method, arm, seed)
          run_dir = os.path.join(out, "runs", name)
          t0 = time.perf_counter()
          result = rounds.run_rounds(config, run_dir, data=data, progress=progress,
                                     round0_from=round0)
          timings[name] = time.perf_counter() - t0
          round0 = round0 or run_dir
          epochs = _epoch_lines(run_dir)
          for e in result.evals:
            by_epoch = epochs.get(e["round"], [])
            rows.append({"model": model["model"], "dataset": dataset,
                         "method": method, "arm": arm, "ap": arm != "host",
                         "ap_rate": config.ap_rate or 0.0,
                         "ap_selection": config.ap_selection, "ap_scope": config.ap_scope,
                         "seed": seed, "cycle": e["round"],
                         "train_dnr_by_epoch": [l["dnr"] for l in by_epoch],
                         "test_accuracy_by_epoch": [l["test_accuracy"] for l in by_epoch
                                                    if "test_accuracy" in l],
                         **{k: v for k, v in e.items() if k not in ("kind", "round")}})
          cycle_seconds.setdefault(model["model"], []).extend(_cycle_seconds(run_dir))
          print(f"{name}: {timings[name]:.1f} s, final accuracy "
                f"{result.evals[-1]['test_accuracy']:.4f} at sparsity "
                f"{result.evals[-1]['sparsity']:.4f}", flush=True)
          results = {
              "preset": preset["name"], "settings": preset, "synthetic": synthetic,
              "command": command, "wall_seconds": time.perf_counter() - start,
              "run_seconds": timings,
              "cycle_seconds": {m: float(np.median(v)) for m, v in cycle_seconds.items() if v},
              "machine": reporting.machine(),
              "runs": rows}
          write_outputs(results, out)
  return results


def write_outputs(results: dict, out: str) -> list[str]:
  """results.json, results.md and the plots; returns the PNG paths."""
  tmp = os.path.join(out, "results.json.tmp")
  with open(tmp, "w") as fh:
    json.dump(results, fh, indent=1)
  os.replace(tmp, os.path.join(out, "results.json"))
  with open(os.path.join(out, "results.md"), "w") as fh:
    fh.write(report.markdown(results))
  return report.plots(results, out)


def _epoch_lines(run_dir: str) -> dict[int, list[dict]]:
  out: dict[int, list[dict]] = {}
  with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
    for line in map(json.loads, fh):
      if line["kind"] == "epoch":
        out.setdefault(line["round"], []).append(line)
  return out


def _cycle_seconds(run_dir: str) -> list[float]:
  """Wall seconds of each round this run trained itself (from its metrics log)."""
  out = []
  with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
    for line in map(json.loads, fh):
      if line["kind"] == "time":
        out.append(line["train_seconds"])
  return out


def _override(preset: dict, args: argparse.Namespace) -> dict:
  for model in preset["models"]:
    if args.methods:
      model["methods"] = list(args.methods)
    if args.seeds:
      model["seeds"] = list(args.seeds)
    if args.epochs:
      model["train"]["epochs"] = args.epochs
  if args.models:
    unknown = set(args.models) - {m["model"] for m in preset["models"]}
    if unknown:
      raise ValueError(f"--models {sorted(unknown)} are not in the preset; choose from "
                       f"{[m['model'] for m in preset['models']]}.")
    preset["models"] = [m for m in preset["models"] if m["model"] in args.models]
  if args.cycles is not None:
    preset["cycles"] = args.cycles
  if args.arms:
    preset["arms"] = list(args.arms)
  return preset


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=PRESETS, default="cpu")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--data-dir", default=None, help="dataset folder (default locations)")
  parser.add_argument("--methods", nargs="+", default=None, help="host methods")
  parser.add_argument("--arms", nargs="+", default=None,
                      help=f"arms, 'host' first; any of {sorted(ARMS)}")
  parser.add_argument("--seeds", nargs="+", type=int, default=None)
  parser.add_argument("--cycles", type=int, default=None, help="pruning cycles")
  parser.add_argument("--epochs", type=int, default=None, help="epochs per cycle")
  parser.add_argument("--models", nargs="+", default=None, help="subset of the preset")
  parser.add_argument("--synthetic", action="store_true",
                      help="synthetic images instead of the dataset (smoke tests)")
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  try:
    preset = _override(load_preset(args.preset), args)
    os.makedirs(args.out, exist_ok=True)
    command = "python -m experiments.prune_ap " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    results = run_experiment(preset, args.out, data_dir=args.data_dir,
                             synthetic=args.synthetic or args.preset == "smoke",
                             progress=not args.quiet, command=command)
  except (ValueError, FileNotFoundError) as err:
    if argv is not None:
      raise
    parser.exit(2, f"prune_ap: error: {err}\n")
  print(f"{len(results['runs'])} result rows, wall time {results['wall_seconds']:.1f} s; "
        f"wrote {args.out}/results.json, results.md and plots")
  return results


if __name__ == "__main__":
  main()

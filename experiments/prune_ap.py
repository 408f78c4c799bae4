"""AP against its host pruning methods: test accuracy and DNR at every IMP sparsity level.

Run:
  python -m experiments.prune_ap --preset cpu --out runs/ap_cpu     # < 15 min, 2 CPU cores
  python -m experiments.prune_ap --preset paper --out runs/ap_paper # ResNet-20, VGG-19; GPU/TPU
  python -m experiments.prune_ap --preset smoke --out /tmp/ap       # seconds, synthetic data

For every model of the preset, seed, host method and AP setting (off: the host prunes
p = 20 % of the remaining weights per cycle; on: the host prunes p - q and AP q = 2 %),
`pruning_jax.rounds.run_rounds` trains the IMP rounds in `OUT/runs/<run>/` (checkpointed,
so an interrupted experiment resumes where it stopped). Runs of one model and seed share
their dense round 0. Writes into OUT:
  results.json   {"runs": [one object per (model, method, ap, seed, cycle)], ...}
  results.md     mean and spread over seeds, and the AP gain, per sparsity level
  *.png          accuracy vs sparsity, DNR vs sparsity, DNR over the epochs of the cycles

Presets live in experiments/configs/prune_ap_<name>.json (smoke is built in); the flags
below override them.

References:
  Liu, Ghosh, Tan & Motani, 2023, "AP: Selective Activation for De-sparsifying Pruned
  Neural Networks", TMLR, arXiv 2212.06145.
"""

import argparse
import json
import os
import platform
import time

import jax
import matplotlib
import numpy as np

from pruning_jax import datasets
from pruning_jax import rounds
from pruning_jax import train as train_lib

matplotlib.use("Agg")
from matplotlib import pyplot as plt

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
PRESETS = ("smoke", "cpu", "paper")
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
  with open(os.path.join(CONFIG_DIR, f"prune_ap_{name}.json")) as fh:
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


def _run_name(model: str, dataset: str, method: str, ap_on: bool, seed: int) -> str:
  return f"{model}-{dataset}-{method}-{'ap' if ap_on else 'noap'}-s{seed}"


def run_experiment(preset: dict, out: str, *, data_dir: str | None = None,
                   synthetic: bool = False, progress: bool = True) -> dict:
  """Runs every (model, seed, method, AP) of `preset`; returns the results.json dict."""
  rows, timings = [], {}
  start = time.perf_counter()
  for model in preset["models"]:
    data = (synthetic_dataset() if synthetic
            else datasets.load_dataset(model["dataset"], data_dir))
    dataset = "synthetic" if synthetic else model["dataset"]
    for seed in model["seeds"]:
      round0 = None
      for method in model["methods"]:
        for ap_on in (False, True):
          config = rounds.RoundsConfig(
              model=model["model"], dataset=dataset, data_dir=data_dir,
              train=train_lib.TrainConfig(**model["train"]), method=method,
              rate=preset["rate"], ap_rate=preset["ap_rate"] if ap_on else None,
              cycles=preset["cycles"], rewind_step=preset["rewind_step"], seed=seed,
              train_subset=0 if synthetic else model["train_subset"],
              test_subset=0 if synthetic else model["test_subset"],
              eval_batch_size=model["eval_batch_size"])
          name = _run_name(model["model"], dataset, method, ap_on, seed)
          run_dir = os.path.join(out, "runs", name)
          t0 = time.perf_counter()
          result = rounds.run_rounds(config, run_dir, data=data, progress=progress,
                                     round0_from=round0)
          timings[name] = time.perf_counter() - t0
          round0 = round0 or run_dir
          epochs = _epoch_dnr(run_dir)
          for e in result.evals:
            rows.append({"model": model["model"], "dataset": dataset,
                         "method": method, "ap": ap_on, "ap_rate": config.ap_rate or 0.0,
                         "seed": seed, "cycle": e["round"],
                         "train_dnr_by_epoch": epochs.get(e["round"], []),
                         **{k: v for k, v in e.items() if k not in ("kind", "round")}})
          print(f"{name}: {timings[name]:.1f} s, final accuracy "
                f"{result.evals[-1]['test_accuracy']:.4f} at sparsity "
                f"{result.evals[-1]['sparsity']:.4f}", flush=True)
  return {"preset": preset["name"], "settings": preset, "synthetic": synthetic,
          "wall_seconds": time.perf_counter() - start, "run_seconds": timings,
          "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                      "jax": jax.__version__, "backend": jax.default_backend()},
          "runs": rows}


def _epoch_dnr(run_dir: str) -> dict[int, list[float]]:
  out: dict[int, list[float]] = {}
  with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
    for line in map(json.loads, fh):
      if line["kind"] == "epoch":
        out.setdefault(line["round"], []).append(line["dnr"])
  return out


def _groups(rows: list[dict]) -> dict:
  """{(model, dataset): {(method, ap): {cycle: [rows over seeds]}}}."""
  out: dict = {}
  for r in rows:
    by_cycle = out.setdefault((r["model"], r["dataset"]), {}).setdefault(
        (r["method"], r["ap"]), {})
    by_cycle.setdefault(r["cycle"], []).append(r)
  return out


def _stat(values: list[float]) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _cell(values: list[float], scale: float = 100.0) -> str:
  mean, spread = _stat(values)
  return (f"{scale * mean:.2f} ± {scale * spread:.2f}" if len(values) > 1
          else f"{scale * mean:.2f}")


def write_markdown(results: dict, path: str) -> None:
  """results.md: per model and method, accuracy and DNR per level, with and without AP."""
  lines = [f"# AP results, preset {results['preset']}", "",
           f"Wall time {results['wall_seconds']:.0f} s on {results['machine']['platform']}"
           f" ({results['machine']['cpu_count']} CPUs, jax {results['machine']['jax']}"
           f"{', synthetic data' if results['synthetic'] else ''}). Accuracy and DNR in %,"
           " mean ± sample std over seeds; the AP gain is the mean paired difference"
           " (same seed).", ""]
  for (model, dataset), by_run in _groups(results["runs"]).items():
    for method in dict.fromkeys(m for m, _ in by_run):
      off, on = by_run.get((method, False), {}), by_run.get((method, True), {})
      seeds = len(next(iter(off.values()), []))
      lines += [f"## {model} on {dataset}, {method} (seeds: {seeds})", "",
                "| cycle | sparsity | acc | acc + AP | AP gain | DNR | DNR + AP |",
                "|---:|---:|---:|---:|---:|---:|---:|"]
      for cycle in sorted(set(off) | set(on)):
        a, b = off.get(cycle, []), on.get(cycle, [])
        by_seed = {r["seed"]: r["test_accuracy"] for r in a}
        gains = [r["test_accuracy"] - by_seed[r["seed"]] for r in b if r["seed"] in by_seed]
        sparsity = (a or b)[0]["sparsity"]
        cells = [_cell([r["test_accuracy"] for r in a]) if a else "–",
                 _cell([r["test_accuracy"] for r in b]) if b else "–",
                 _cell(gains) if gains else "–",
                 _cell([r["dnr"] for r in a]) if a else "–",
                 _cell([r["dnr"] for r in b]) if b else "–"]
        lines.append(f"| {cycle} | {100 * sparsity:.1f} | " + " | ".join(cells) + " |")
      lines.append("")
  with open(path, "w") as fh:
    fh.write("\n".join(lines))


def make_plots(results: dict, out: str) -> list[str]:
  """Accuracy and DNR vs sparsity, and training DNR per epoch; returns the PNG paths."""
  paths = []
  for (model, dataset), by_run in _groups(results["runs"]).items():
    tag = f"{model}_{dataset}"
    for key, label, name in (("test_accuracy", "test accuracy", "accuracy"),
                             ("dnr", "test DNR (fraction of zero ReLU outputs)", "dnr")):
      fig, ax = plt.subplots(figsize=(6.4, 4.2))
      for i, ((method, ap_on), by_cycle) in enumerate(sorted(by_run.items())):
        cycles = sorted(by_cycle)
        x = [100 * by_cycle[c][0]["sparsity"] for c in cycles]
        stats = [_stat([r[key] for r in by_cycle[c]]) for c in cycles]
        ax.errorbar(x, [s[0] for s in stats], yerr=[s[1] for s in stats],
                    color=f"C{i // 2}", linestyle="--" if ap_on else "-", marker="o",
                    markersize=3, capsize=2, label=f"{method}{' + AP' if ap_on else ''}")
      ax.set(xlabel="sparsity (%)", ylabel=label, title=f"{model} on {dataset}")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
      paths.append(os.path.join(out, f"{name}_vs_sparsity_{tag}.png"))
      fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
      plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    method = next(iter(by_run))[0]
    for ap_on in (False, True):
      by_cycle = by_run.get((method, ap_on), {})
      series, bounds = [], []
      for c in sorted(by_cycle):
        row = next(r for r in by_cycle[c] if r["seed"] == by_cycle[c][0]["seed"])
        bounds.append(len(series))
        series += row["train_dnr_by_epoch"]
      ax.plot(range(1, len(series) + 1), series, linestyle="--" if ap_on else "-",
              marker=".", label=f"{method}{' + AP' if ap_on else ''}")
    for b in bounds[1:]:
      ax.axvline(b + 0.5, color="gray", alpha=0.2)
    ax.set(xlabel="epoch (cycles separated by grey lines)", ylabel="training DNR",
           title=f"{model} on {dataset}: DNR over the epochs of each cycle")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(os.path.join(out, f"dnr_over_epochs_{tag}.png"))
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
  return paths


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
  return preset


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=PRESETS, default="cpu")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--data-dir", default=None, help="dataset folder (default locations)")
  parser.add_argument("--methods", nargs="+", default=None, help="host methods")
  parser.add_argument("--seeds", nargs="+", type=int, default=None)
  parser.add_argument("--cycles", type=int, default=None, help="pruning cycles")
  parser.add_argument("--epochs", type=int, default=None, help="epochs per cycle")
  parser.add_argument("--models", nargs="+", default=None, help="subset of the preset")
  parser.add_argument("--synthetic", action="store_true",
                      help="synthetic images instead of the dataset (smoke tests)")
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  args = parser.parse_args(argv)
  preset = _override(load_preset(args.preset), args)
  os.makedirs(args.out, exist_ok=True)
  results = run_experiment(preset, args.out, data_dir=args.data_dir,
                           synthetic=args.synthetic or args.preset == "smoke",
                           progress=not args.quiet)
  with open(os.path.join(args.out, "results.json"), "w") as fh:
    json.dump(results, fh, indent=1)
  write_markdown(results, os.path.join(args.out, "results.md"))
  paths = make_plots(results, args.out)
  print(f"{len(results['runs'])} result rows, {len(paths)} plots, wall time "
        f"{results['wall_seconds']:.1f} s; wrote {args.out}/results.json and results.md")
  return results


if __name__ == "__main__":
  main()

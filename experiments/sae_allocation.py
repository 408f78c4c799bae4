"""Allocation strategies compared on real MiniLM activations: TopK, MC/BatchTopK, FC.

Run:
  python -m experiments.sae_allocation --preset cpu --out runs/sae_allocation
  python experiments/sae_allocation.py --preset cpu --out runs/sae_allocation
  python -m experiments.sae_allocation --preset paper --store PATH --out DIR   # GPU/TPU

Pipeline: harvest the residual stream after block ``layer`` of all-MiniLM-L6-v2 (pure
JAX, real weights) on the default text corpora into an activation store (cached; an
interrupted harvest resumes), then train every strategy at the same mean L0 on the same
batches, evaluate each in batched and thresholded (batch-independent) mode, and splice
reconstructions back into MiniLM to measure downstream fidelity. Writes ``results.json``
(list ``runs``), ``results.md`` and PNG plots into ``--out``; every SAE is also exported
in the SAELens layout under ``--out/saes/``.

Presets (``--preset``): ``cpu`` fits 15 minutes on 2 CPU cores; ``paper`` is the
GPT-2-small-scale setting of the paper (d=768 activations from ``--store``, 32768
features, k=32, batch 4096) for GPU/TPU; ``smoke`` is a seconds-long end-to-end check.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import pathlib
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from sae_jax import evaluate
from sae_jax import export
from sae_jax import model
from sae_jax import plots
from sae_jax import train
from sae_jax import trainer
from sae_jax.data import batches as batches_lib
from sae_jax.data import corpus
from sae_jax.data import harvest
from sae_jax.data import minilm
from sae_jax.data import store as store_lib


@dataclasses.dataclass(frozen=True)
class Preset:
  """Everything a preset fixes; CLI flags override single fields."""

  layer: int = 3
  window: int = 64
  harvest_tokens: int = 160_000
  eval_windows: int = 48
  expansion: int = 4
  k: int = 16
  k_sweep: tuple[int, ...] = (8, 32)
  batch_size: int = 512
  steps: int = 400
  learning_rate: float = 2e-3
  dead_after_tokens: int = 50_000
  l1_coefficient: float = 5e-3
  eval_batches: int = 8
  seed: int = 0


PRESETS = {
    "cpu": Preset(),
    "smoke": Preset(harvest_tokens=4_000, eval_windows=4, expansion=2, k=8, k_sweep=(4,),
                    batch_size=128, steps=6, dead_after_tokens=256, eval_batches=2),
    "paper": Preset(layer=3, window=128, harvest_tokens=200_000_000, eval_windows=512,
                    expansion=0, k=32, k_sweep=(16, 64), batch_size=4096, steps=50_000,
                    learning_rate=4e-4, dead_after_tokens=10_000_000, eval_batches=64),
}
PAPER_D_SAE = 32768

# (allocation, aux loss) pairs of the main table, all at the preset's k.
MAIN_RUNS = (
    ("topk", "none"), ("topk", "aux_k"), ("topk", "aux_zipf"),
    ("mutual_choice", "none"), ("mutual_choice", "aux_zipf"),
    ("feature_choice", "none"), ("feature_choice", "aux_zipf"),
    ("feature_choice_zipf", "none"), ("feature_choice_zipf", "aux_zipf"),
    ("relu", "none"),
)
SWEEP_ALLOCATIONS = ("topk", "mutual_choice", "feature_choice", "feature_choice_zipf")
CALIBRATED = ("mutual_choice", "batch_topk", "feature_choice", "feature_choice_zipf")


class ScaledBatches:
  """Rescales store batches so the mean squared norm is d (input normalisation)."""

  def __init__(self, inner, scale: float):
    self.inner, self.scale = inner, scale

  def __next__(self):
    return next(self.inner) * np.float32(self.scale)

  def __iter__(self):
    return self

  def state(self):
    return self.inner.state()

  def restore(self, s):
    self.inner.restore(s)


BUILTIN_CORPORA = ("bible-kjv", "fortunes", "python-doc")


def corpus_specs(text_paths) -> list:
  """One spec per source: the user's paths, else the installed Debian corpora."""
  if text_paths:
    return [corpus.CorpusSpec(sources=(p,)) for p in text_paths]
  specs = []
  for name in BUILTIN_CORPORA:
    try:
      next(corpus.iter_documents(corpus.CorpusSpec(sources=(name,))))
      specs.append(corpus.CorpusSpec(sources=(name,)))
    except (FileNotFoundError, StopIteration):
      pass
  # With none installed, "default" falls back to the standard library with a notice.
  return specs or [corpus.CorpusSpec(sources=("default",))]


def balanced_documents(specs, held_out: bool, every: int = 25):
  """Documents of every source, the one with the fewest characters emitted next.

  Every ``every``-th document is held out for evaluation (``held_out=True`` yields only
  those); the stream is deterministic, so a resumed harvest sees the same windows.
  """
  iters = [corpus.iter_documents(spec) for spec in specs]
  chars = [0] * len(iters)
  alive = list(range(len(iters)))
  i = 0
  while alive:
    j = min(alive, key=lambda a: (chars[a], a))
    doc = next(iters[j], None)
    if doc is None:
      alive.remove(j)
      continue
    chars[j] += len(doc[1])
    if (i % every == 0) == held_out:
      yield doc[1]
    i += 1


def windows(tokenizer, texts, window: int, docs_per_chunk: int = 16):
  """``(ids, mask)`` chunks of fixed-length windows from a document stream."""
  while True:
    chunk = list(itertools.islice(texts, docs_per_chunk))
    if not chunk:
      return
    ids, mask = minilm.text_windows(tokenizer, chunk, window)
    if len(ids):
      yield ids, mask


def harvest_store(args, preset: Preset, bert_params, bert_cfg, tokenizer, specs):
  """The cached activation store of the preset (harvested on first use, resumable)."""
  if args.store:
    return store_lib.StoreReader(args.store)
  name = f"minilm_l{preset.layer}_w{preset.window}_{preset.harvest_tokens}"
  path = pathlib.Path(args.cache) / name
  layer = preset.layer

  @jax.jit
  def activations(ids, mask):
    return minilm.bert_forward(bert_params, bert_cfg, ids, mask,
                               output_layer=layer).hidden_states[layer]

  return harvest.harvest(
      activations, windows(tokenizer, balanced_documents(specs, held_out=False), preset.window),
      path, model_name="sentence-transformers/all-MiniLM-L6-v2", layer=layer,
      hook=f"blocks.{layer}.hook_resid_post", max_tokens=preset.harvest_tokens, batch_size=32,
      keep_fn=harvest.exclude_tokens([101, 102]), progress=not args.quiet,
      meta={"corpora": [list(s.sources) for s in specs], "window": preset.window})


def eval_set(preset: Preset, bert_params, bert_cfg, tokenizer, specs):
  """Held-out windows and their real-token activations (never seen in training)."""
  ids, mask = [], []
  for i, m in windows(tokenizer, balanced_documents(specs, held_out=True), preset.window):
    ids.append(i)
    mask.append(m)
    if sum(len(x) for x in ids) >= preset.eval_windows:
      break
  ids = np.concatenate(ids)[:preset.eval_windows]
  mask = np.concatenate(mask)[:preset.eval_windows]
  hidden = minilm.bert_forward(bert_params, bert_cfg, ids, mask,
                               output_layer=preset.layer).hidden_states[preset.layer]
  keep = harvest.exclude_tokens([101, 102])(ids, mask)
  return ids, mask, np.asarray(hidden)[keep]


def run_configs(preset: Preset, d_model: int, d_sae: int):
  """(name, SAEConfig, TrainConfig) of every run: the main table, then the k sweep."""
  runs = []
  for (allocation, aux), k in itertools.chain(
      ((r, preset.k) for r in MAIN_RUNS),
      (((a, "none"), k) for k in preset.k_sweep for a in SWEEP_ALLOCATIONS)):
    cfg = model.SAEConfig(d_model=d_model, d_sae=d_sae, allocation=allocation, k=k,
                          l1_coefficient=preset.l1_coefficient if allocation == "relu" else 0.0)
    tcfg = train.TrainConfig(learning_rate=preset.learning_rate,
                             warmup_steps=max(1, preset.steps // 20), total_steps=preset.steps,
                             aux_loss=aux, dead_after_tokens=preset.dead_after_tokens)
    runs.append((f"{allocation}-{aux}-k{k}", cfg, tcfg))
  return runs


def evaluate_run(state, cfg, preset, eval_x, scale, bert, eval_ids, eval_mask,
                 mean_activation):
  bs = min(preset.batch_size, len(eval_x))
  n_batches = max(1, min(preset.eval_batches, len(eval_x) // bs))
  batches = [eval_x[i * bs:(i + 1) * bs] * np.float32(scale) for i in range(n_batches)]
  # TopK and ReLU are batch-independent already; MC and FC get the calibrated path.
  theta = state.threshold if cfg.allocation in CALIBRATED else None
  stats = evaluate.evaluate_sae(state.params, cfg, iter(batches), threshold=theta,
                                num_batches=n_batches)
  fid = evaluate.fidelity(state.params, cfg, bert[0], bert[1], eval_ids, eval_mask,
                          preset.layer, normalization={"mean": 0.0, "scale": 1.0 / scale},
                          threshold=theta, mean_activation=mean_activation)
  return stats, fid


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--out", required=True, help="run folder for results, plots, SAEs")
  parser.add_argument("--store", help="an existing activation store (bring your own)")
  parser.add_argument("--text", nargs="*", help="text files/folders instead of the default corpora")
  parser.add_argument("--cache", default=os.path.join("runs", "activation_cache"),
                      help="where harvested stores are kept between runs")
  parser.add_argument("--steps", type=int)
  parser.add_argument("--k", type=int)
  parser.add_argument("--only", nargs="*", help="run names to train (default: all)")
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args(argv)
  preset = PRESETS[args.preset]
  preset = dataclasses.replace(preset, **{k: v for k, v in (("steps", args.steps), ("k", args.k))
                                          if v is not None})
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  bert_params, bert_cfg = minilm.load_minilm()
  tokenizer = minilm.load_tokenizer()
  specs = corpus_specs(args.text)
  reader = harvest_store(args, preset, bert_params, bert_cfg, tokenizer, specs)
  t_harvest = time.perf_counter() - t0
  d_model = reader.d
  d_sae = PAPER_D_SAE if preset.expansion == 0 else preset.expansion * d_model
  scale = float(np.sqrt(d_model) / reader.stats.norm_mean)
  eval_ids, eval_mask, eval_x = eval_set(preset, bert_params, bert_cfg, tokenizer, specs)
  init_sample = reader.read(0, min(reader.count, 4096)) * np.float32(scale)

  rows, curves = [], {}
  for name, cfg, tcfg in run_configs(preset, d_model, d_sae):
    if args.only and name not in args.only:
      continue
    t_run = time.perf_counter()
    batches = ScaledBatches(batches_lib.ShuffledBatches(reader, preset.batch_size, preset.seed),
                            scale)
    rcfg = trainer.RunConfig(steps=preset.steps, seed=preset.seed,
                             checkpoint_every=max(preset.steps // 4, 1), log_every=10,
                             progress=not args.quiet)
    state, _ = trainer.fit(out / "runs" / name, cfg, tcfg, rcfg, batches,
                           init_sample=init_sample)
    stats, fid = evaluate_run(state, cfg, preset, eval_x, scale, (bert_params, bert_cfg),
                              eval_ids, eval_mask, reader.stats.mean)
    export.export_saelens(out / "saes" / name, state.params, cfg, layer=preset.layer,
                          context_size=preset.window,
                          threshold=(np.asarray(state.threshold)
                                     if cfg.allocation in CALIBRATED else None),
                          normalization={"mean": 0.0, "scale": 1.0 / scale})
    row = {"name": name, "strategy": cfg.allocation, "aux_loss": tcfg.aux_loss, "k": cfg.k,
           "d_sae": d_sae, "steps": preset.steps, "batch_size": preset.batch_size,
           "train_seconds": time.perf_counter() - t_run}
    row.update({k: v for k, v in stats.items() if _is_scalar(v)})
    row.update({k: v for k, v in fid.items() if _is_scalar(v)})
    rows.append(row)
    curves[name] = stats
    if not args.quiet:
      print(f"{name:<36} nmse={row['nmse']:.4f} l0={row['l0_mean']:.2f} "
            f"dead={row['dead_fraction']:.3f} fid={row['fidelity_recovered']:.3f}")

  result = {"experiment": "sae_allocation", "preset": args.preset,
            "preset_config": dataclasses.asdict(preset), "d_model": d_model, "d_sae": d_sae,
            "store": str(reader.path), "store_tokens": reader.count,
            "corpora": [list(s.sources) for s in specs], "input_scale": scale,
            "harvest_seconds": t_harvest, "total_seconds": time.perf_counter() - t0,
            "jax": jax.__version__, "devices": [str(d) for d in jax.devices()], "runs": rows}
  with open(out / "results.json", "w") as fh:
    json.dump(result, fh, indent=2)
  (out / "results.md").write_text(results_markdown(result))
  write_plots(out, rows, curves, preset)
  if not args.quiet:
    print((out / "results.md").read_text())
  return result


def _is_scalar(v) -> bool:
  return isinstance(v, (int, float, bool, str)) or (np.ndim(v) == 0 and np.isreal(v))


def results_markdown(result: dict) -> str:
  cols = [("strategy", "strategy", "{}"), ("aux", "aux_loss", "{}"), ("k", "k", "{}"),
          ("L0", "l0_mean", "{:.2f}"), ("NMSE", "nmse", "{:.4f}"),
          ("dead", "dead_fraction", "{:.3f}"), ("underused", "underutilised_fraction", "{:.3f}"),
          ("fidelity", "fidelity_recovered", "{:.3f}"),
          ("thr. L0", "threshold_l0_mean", "{:.2f}"), ("thr. NMSE", "threshold_nmse", "{:.4f}"),
          ("thr. fidelity", "threshold_fidelity_recovered", "{:.3f}")]
  lines = [f"# SAE allocation strategies ({result['preset']} preset)", "",
           f"MiniLM-L6 layer {result['preset_config']['layer']} residual stream, "
           f"{result['store_tokens']} harvested tokens, d={result['d_model']}, "
           f"F={result['d_sae']}, {result['preset_config']['steps']} steps x "
           f"{result['preset_config']['batch_size']} tokens per run; total "
           f"{result['total_seconds'] / 60:.1f} min.", "",
           "| " + " | ".join(c[0] for c in cols) + " |",
           "|" + "|".join("---" for _ in cols) + "|"]
  for r in result["runs"]:
    cells = []
    for _, key, fmt in cols:
      v = r.get(key)
      cells.append("n/a" if v is None else fmt.format(v))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_plots(out: pathlib.Path, rows, curves, preset: Preset) -> None:
  plots.plot_nmse_vs_l0(rows, out / "nmse_vs_l0.png")
  main = [r for r in rows if r["k"] == preset.k]
  plots.plot_dead_fraction(main, out / "dead_fraction.png")
  plots.plot_l0_histograms({r["name"]: curves[r["name"]]["l0_histogram"] for r in main},
                           out / "l0_histograms.png")
  plots.plot_density_vs_rank({r["name"]: curves[r["name"]]["feature_density"] for r in main},
                             {r["name"]: (curves[r["name"]]["zipf_C"], curves[r["name"]]["zipf_s"])
                              for r in main}, out / "density_vs_rank.png")


if __name__ == "__main__":
  main()

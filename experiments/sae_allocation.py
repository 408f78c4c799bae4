"""Allocation strategies compared: TopK, MC/BatchTopK, FC, FC-Zipf, with and without aux losses.

Run:
  python -m experiments.sae_allocation --preset cpu --out runs/sae_allocation
  python -m experiments.sae_allocation --preset cpu-long --out runs/sae_cpu_long  # resumes
  python experiments/sae_allocation.py --preset cpu --out runs/sae_allocation
  python -m experiments.sae_allocation --preset paper --model-dir GPT2_DIR --out DIR  # GPU/TPU

Sources (``--sources``): ``minilm`` harvests the residual stream after block ``layer`` of
all-MiniLM-L6-v2 (pure JAX, real weights) on the default text corpora into an activation
store (cached; an interrupted harvest resumes), evaluates on held-out documents, splices
reconstructions back into MiniLM (fidelity against zero and mean ablation) and probes the
codes for the corpus a token came from (k-sparse probing); ``synthbench`` draws
activations with known features (`sae_jax.data.synthbench`) once into a store and scores
every SAE against the truth (`sae_jax.evaluation.recovery`: MCC, F1 at |cos| >= 0.8).

Every strategy trains at the same k on the same batches; with several ``--seeds`` each
seed has its own data order and initialisation, shared by all strategies, so
differences are paired. Each finished run leaves its row under ``--out/rows/``; a rerun of
the same command skips finished runs and resumes an interrupted one from its checkpoint,
and ``results.json`` (list ``runs``), ``results.md`` (means, spreads, paired 95 %
intervals and verdicts, `experiments.sae_report`) and PNG plots in ``--out`` are rewritten
after every run. ``--rows-from RESULTS_JSON`` takes the finished rows of an earlier
``results.json`` (for example the committed ``docs/results/sae/results.json``), so a fresh
checkout continues the plan instead of starting it again. The first seed's SAEs are exported in the SAELens layout under
``--out/saes/``.

Presets (``--preset``): ``cpu`` fits 15 minutes on 2 CPU cores (MiniLM, one seed, the
main table at k=16 plus a k sweep); ``cpu-long`` trains TopK, MC, FC and FC-Zipf, each with
no aux loss, aux_k and aux_zipf, at k in {16, 8, 32} (in that order), then the k sweep
{4, 64} without aux loss, on the synthetic ``cpu`` benchmark and on 2M MiniLM tokens,
seeds 0-2, 4000 steps x 512 tokens per run: many hours on 2 cores, so it is meant to be
rerun until done; ``paper`` is the GPT-2-small setting of the paper (the layer-8 residual
stream, ``blocks.8.hook_resid_pre``, of the model in ``--model-dir``, harvested from the
corpora in 128-token contexts, or read from ``--store``; 32768 features, k=32, batch 4096)
for GPU/TPU, and with ``--sources synthbench`` the synthetic ``paper`` benchmark (d=768,
16384 true features, fresh tokens drawn on the device for every batch); ``smoke`` is a
seconds-long end-to-end check. ``--sources lm --model-dir DIR``
runs any preset on a local GPT-2 or GPT-NeoX / Pythia model.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shlex
import shutil
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from experiments import reporting
from experiments import sae_report as report
from experiments import sae_sources as sources_lib
from sae_jax import metrics
from sae_jax import model
from sae_jax.evaluation import evaluate
from sae_jax.evaluation import export
from sae_jax.evaluation import recovery
from sae_jax.training import loop
from sae_jax.training import train_state


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
  seeds: tuple[int, ...] = (0,)
  sources: tuple[str, ...] = ("minilm",)
  grid: str = "main"
  k_values: tuple[int, ...] = ()
  synthbench: str = "cpu"
  synth_tokens: int = 2_000_000
  synth_eval_tokens: int = 4096
  synth_width: float = 0.25
  probe_windows: int = 32
  lm_stream: bool = False
  # Every shuffle block of a store takes a slice of every shard (ShuffledBatches); off in
  # the cpu-long grid, whose rows were trained with the shard-by-shard layout.
  mix_shards: bool = False


PRESETS = {
    "cpu": Preset(),
    "smoke": Preset(harvest_tokens=4_000, eval_windows=4, expansion=2, k=8, k_sweep=(4,),
                    batch_size=128, steps=6, dead_after_tokens=256, eval_batches=2,
                    synthbench="smoke", synth_tokens=2048, synth_eval_tokens=256,
                    probe_windows=4),
    "paper": Preset(layer=8, window=128, harvest_tokens=200_000_000, eval_windows=512,
                    expansion=0, k=32, k_sweep=(16, 64), batch_size=4096, steps=50_000,
                    learning_rate=4e-4, dead_after_tokens=10_000_000, eval_batches=64,
                    sources=("lm",), lm_stream=True, synthbench="paper", synth_tokens=0,
                    synth_eval_tokens=16384),
}
PRESETS["cpu-long"] = Preset(
    harvest_tokens=2_000_000, eval_windows=96, expansion=4, k=16, k_values=(16, 8, 32),
    k_sweep=(4, 64), batch_size=512, steps=4000, learning_rate=2e-3,
    dead_after_tokens=200_000, eval_batches=8, seeds=(0, 1, 2),
    sources=("synthbench", "minilm"), grid="full", synth_tokens=2_000_000)
AUX_LOSSES = train_state.AUX_LOSSES

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


def run_configs(preset: Preset, d_model: int, d_sae: int):
  """(name, SAEConfig, TrainConfig) of every run, in the order they train.

  ``grid="main"``: the main table at ``k``, then the k sweep without aux loss.
  ``grid="full"``: every allocation of ``SWEEP_ALLOCATIONS`` with every aux loss of
  ``AUX_LOSSES`` at each k of ``k_values`` (the first k first), then the k sweep.
  """
  if preset.grid == "main":
    pairs = [(r, preset.k) for r in MAIN_RUNS]
  else:
    pairs = [((a, aux), k) for k in preset.k_values for a in SWEEP_ALLOCATIONS
             for aux in AUX_LOSSES]
  pairs += [((a, "none"), k) for k in preset.k_sweep for a in SWEEP_ALLOCATIONS]
  runs = []
  for (allocation, aux), k in pairs:
    cfg = model.SAEConfig(d_model=d_model, d_sae=d_sae, allocation=allocation, k=k,
                          l1_coefficient=preset.l1_coefficient if allocation == "relu" else 0.0)
    tcfg = train_state.TrainConfig(learning_rate=preset.learning_rate,
                                   warmup_steps=max(1, preset.steps // 20),
                                   total_steps=preset.steps, aux_loss=aux,
                                   dead_after_tokens=preset.dead_after_tokens)
    runs.append((f"{allocation}-{aux}-k{k}", cfg, tcfg))
  return runs


def evaluate_run(state, cfg, preset: Preset, source: sources_lib.Source) -> dict:
  """Scalar results of one trained SAE on its source's held-out tokens."""
  scale, eval_x = source.scale, source.eval_x
  bs = min(preset.batch_size, len(eval_x))
  n_batches = max(1, min(preset.eval_batches, len(eval_x) // bs))
  batches = [eval_x[i * bs:(i + 1) * bs] * np.float32(scale) for i in range(n_batches)]
  # TopK and ReLU are batch-independent already; MC and FC get the calibrated path.
  theta = state.threshold if cfg.allocation in CALIBRATED else None
  stats = evaluate.evaluate_sae(state.params, cfg, iter(batches), threshold=theta,
                                num_batches=n_batches)
  row = {k: v for k, v in stats.items() if _is_scalar(v)}
  row["l0_histogram"] = np.asarray(stats["l0_histogram"]).tolist()
  if source.fidelity is not None:
    row.update({k: v for k, v in source.fidelity(state, cfg, theta).items() if _is_scalar(v)})
  if source.features is not None:
    x = np.concatenate(batches)
    out = model.forward(state.params, x, cfg)
    scores = recovery.recovery_scores(np.asarray(state.params.W_dec), source.features, x,
                                      np.asarray(out.recon), np.asarray(out.codes),
                                      source.eval_codes[:len(x)])
    row.update({f"recovery_{k}": float(v) for k, v in scores._asdict().items()})
  if source.probe_x is not None:
    codes = model.inference_codes(state.params, jnp.asarray(source.probe_x * np.float32(scale)),
                                  cfg, theta)
    row.update({f"probe_k{k}": v for k, v in sources_lib.probe_accuracy(np.asarray(codes), source.probe_labels).items()})
  if cfg.allocation == "mutual_choice":
    row["mc_equals_batch_topk"] = mutual_choice_matches_batch_topk(state.params, cfg, batches)
  return row


def mutual_choice_matches_batch_topk(params, cfg, batches) -> float:
  """Fraction of batches whose Mutual Choice mask equals an independent BatchTopK mask.

  The reference flattens the ``[b, f]`` pre-activations and keeps the ``round(k * b)``
  largest positive entries with ``lax.top_k`` (Bussmann et al. 2024's BatchTopK), written
  apart from ``model.allocate``. Ties between equal scores are broken differently by the
  two, so a batch with tied scores at the cut could differ; with float32 scores that is
  rare and is counted against the claim.
  """
  same = []
  for x in batches:
    pre = model.encode_pre(params, jnp.asarray(x), cfg)
    budget = int(round(cfg.k * pre.shape[0]))
    values, flat_idx = jax.lax.top_k(pre.reshape(-1), budget)
    ref = jnp.zeros(pre.size, bool).at[flat_idx].set(values > 0).reshape(pre.shape)
    mc = model.forward(params, jnp.asarray(x), cfg).codes > 0
    same.append(bool(jnp.array_equal(ref, mc)))
  return float(np.mean(same))


def training_curve(run_dir: pathlib.Path, batch_size: int) -> list[dict]:
  """The run's logged training metrics against tokens seen."""
  curve = []
  with open(run_dir / loop.METRICS_FILE) as fh:
    for line in map(json.loads, fh):
      curve.append({"tokens": line["step"] * batch_size, "nmse": line["nmse"],
                    "dead_fraction": line["dead_fraction"], "l0": line["l0"],
                    "aux_loss": line["aux_loss"]})
  return curve


def _seek(batches, index: int) -> None:
  """Moves a batch iterator of the trainer's state/restore protocol to batch ``index``."""
  state = batches.state()
  key = next((k for k in ("step", "index") if k in state), None)
  if key is None:
    raise ValueError(f"cannot seek a batch iterator whose state has no 'step' or 'index' "
                     f"(keys: {sorted(state)}).")
  batches.restore({**state, key: index})


@functools.partial(jax.jit, static_argnames="cfg")
def _nmse(params, x, cfg):
  return metrics.normalized_mse(model.forward(params, x, cfg).recon, x)


def final_model_nmse(params_list, cfg, batches, steps) -> list[float]:
  """Mean NMSE of the models ``params_list`` on the batches behind the curve's ``steps``.

  The curve's point at step ``s`` is the training NMSE of batch ``s - 1`` (0-based), so
  ``batches`` (a fresh iterator of the run's data, scaled as in training) is moved there
  for each point; each batch is read once for all models.
  """
  out = []
  for s in steps:
    _seek(batches, int(s) - 1)
    x = jnp.asarray(next(batches))
    out.append(float(np.mean([_nmse(p, x, cfg) for p in params_list])))
  return out


def _run_config(preset: Preset, seed: int, progress: bool) -> loop.RunConfig:
  return loop.RunConfig(steps=preset.steps, seed=seed,
                        checkpoint_every=max(preset.steps // 4, 1),
                        log_every=max(1, min(50, preset.steps // 8)), keep=1,
                        progress=progress)


def _make_batches(preset: Preset, source, seed: int) -> ScaledBatches:
  return ScaledBatches(source.make_batches(preset.batch_size, seed), source.scale)


def add_reference_nmse(out: pathlib.Path, preset: Preset, source, name: str, cfg, tcfg,
                       rows: dict[int, dict]) -> bool:
  """Adds ``nmse_ref`` along the training curve of every seed's row of one configuration.

  Each curve point is the training NMSE of one batch, and batches differ in difficulty:
  a store's shards differ in content (on MiniLM's store a fixed model's NMSE ranges over
  0.21-0.28 from shard to shard) and a seed fixes their order. ``nmse_ref`` is the mean
  NMSE of the same configuration's final models of the *other* seeds on that batch: a
  fixed model's view of the batch's difficulty, which a curve can be divided by. A run's
  own final model would not do: it fits the shards it saw last better than the rest.

  Needs the final checkpoints of the other seeds (``runs/<source>/<run>/checkpoints``);
  rows are rewritten in place. Returns whether any row changed.
  """
  todo = [seed for seed, row in rows.items()
          if row.get("curve") and "nmse_ref" not in row["curve"][0]]
  if not todo:
    return False
  params = {}
  for seed in rows:
    run_dir = out / "runs" / source.name / _run_name(preset, name, seed)
    if (run_dir / "checkpoints" / str(preset.steps)).exists():
      # A finished run's checkpoint gives its final parameters (fit trains no step).
      state, _ = loop.fit(run_dir, cfg, tcfg, _run_config(preset, seed, False),
                          _make_batches(preset, source, seed),
                          init_sample=source.init_sample * np.float32(source.scale))
      params[seed] = state.params
  changed = False
  for seed in todo:
    others = sorted(s for s in params if s != seed)
    if not others:
      continue
    row = rows[seed]
    steps = [p["tokens"] // preset.batch_size for p in row["curve"]]
    ref = final_model_nmse([params[s] for s in others], cfg,
                           _make_batches(preset, source, seed), steps)
    row["curve"] = [{**p, "nmse_ref": float(r)} for p, r in zip(row["curve"], ref)]
    row["reference_seeds"] = others
    _write_row(row_path(out, preset, source.name, name, seed), row)
    changed = True
  return changed


def train_and_evaluate(args, preset: Preset, source: sources_lib.Source, name: str, cfg, tcfg,
                       seed: int, out: pathlib.Path) -> tuple[dict, bool]:
  """One run: trained (or resumed), evaluated, exported; its row is kept on disk.

  Returns the row and whether it was trained by this call (False: found on disk).
  """
  run_name = _run_name(preset, name, seed)
  path = row_path(out, preset, source.name, name, seed)
  run_dir = out / "runs" / source.name / run_name
  digest = capacity_digest(cfg, preset.batch_size)
  if path.exists():
    row = json.loads(path.read_text())
    if row.get("capacity_digest") == digest:
      return row, False
    # A Feature Choice run trained with other capacities than the library gives this
    # config now is another experiment: it is trained again, from scratch.
    print(f"{source.name} {run_name}: its row was trained with other Feature Choice "
          "capacities; training it again", file=sys.stderr, flush=True)
    path.unlink()
    shutil.rmtree(run_dir, ignore_errors=True)
  t_run = time.perf_counter()
  state, _ = loop.fit(run_dir, cfg, tcfg, _run_config(preset, seed, not args.quiet),
                      _make_batches(preset, source, seed),
                      init_sample=source.init_sample * np.float32(source.scale))
  row = {"name": name, "source": source.name, "seed": seed, "strategy": cfg.allocation,
         "aux_loss": tcfg.aux_loss, "k": cfg.k, "d_sae": cfg.d_sae, "steps": preset.steps,
         "batch_size": preset.batch_size, "mix_shards": preset.mix_shards}
  if digest is not None:
    row["capacity_digest"] = digest
  row.update(evaluate_run(state, cfg, preset, source))
  row["train_seconds"] = time.perf_counter() - t_run
  row["curve"] = training_curve(run_dir, preset.batch_size)
  if seed == preset.seeds[0]:
    export_dir = out / "saes" / (name if len(preset.sources) == 1 else f"{source.name}-{name}")
    export.export_saelens(export_dir, state.params, cfg, layer=source.layer,
                          context_size=source.context_size,
                          threshold=(np.asarray(state.threshold)
                                     if cfg.allocation in CALIBRATED else None),
                          normalization={"mean": 0.0, "scale": 1.0 / source.scale},
                          **(source.export_names or {}),
                          **({} if source.layer is not None
                             else {"source": f"synthbench:{preset.synthbench}"}))
  _write_row(path, row)
  return row, True


def _write_row(path: pathlib.Path, row: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(row))
  os.replace(tmp, path)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument("--out", required=True, help="run folder for results, plots, SAEs")
  parser.add_argument("--store", help="an existing activation store (bring your own)")
  parser.add_argument("--model-dir", help="local Hugging Face GPT-2 / GPT-NeoX folder for the "
                                          "lm source (config.json, safetensors, tokenizer.json)")
  parser.add_argument("--hook", help="TransformerLens hook of the lm source (default: "
                                     "blocks.<preset layer>.hook_resid_pre)")
  parser.add_argument("--stream", action="store_true",
                      help="lm source: train straight from the model, no activation store "
                           "(the paper preset always does: 200M tokens would take 600 GB)")
  parser.add_argument("--text", nargs="*", help="text files/folders instead of the default corpora")
  parser.add_argument("--cache", default=os.path.join("runs", "activation_cache"),
                      help="where harvested and synthetic stores are kept between runs")
  parser.add_argument("--steps", type=int)
  parser.add_argument("--k", type=int)
  parser.add_argument("--sources", nargs="*", choices=sorted(sources_lib.SOURCES),
                      help="activation sources (default: the preset's)")
  parser.add_argument("--seeds", nargs="*", type=int, help="seeds (default: the preset's)")
  parser.add_argument("--only", nargs="*", help="run names to train (default: all)")
  parser.add_argument("--quiet", action="store_true", help="no progress bars or tables")
  parser.add_argument("--rows-from", metavar="RESULTS_JSON",
                      help="count the runs of an earlier results.json as finished")
  parser.add_argument("--mix-shards", action="store_true",
                      help="store sources: build every shuffle block from a slice of every "
                           "shard, for stores whose shards differ in content")
  parser.add_argument("--log-runs", action="store_true",
                      help="one line per finished run even with --quiet (for log files)")
  args = parser.parse_args(argv)
  preset = PRESETS[args.preset]
  overrides = {"steps": args.steps, "k": args.k,
               "sources": tuple(args.sources) if args.sources else None,
               "seeds": tuple(args.seeds) if args.seeds else None,
               "mix_shards": True if args.mix_shards else None}
  preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})
  if args.store and not {"minilm", "lm"} & set(preset.sources):
    parser.error("--store replaces the MiniLM or LM harvest; add minilm or lm to --sources or "
                 "drop --store.")
  if args.store and {"minilm", "lm"} <= set(preset.sources):
    parser.error("--store would replace both the MiniLM and the LM harvest; run one of them.")
  if "lm" in preset.sources and not args.model_dir:
    parser.error("the lm source needs --model-dir (a local GPT-2 or GPT-NeoX folder); "
                 "add it or choose other --sources.")
  if (args.model_dir or args.hook or args.stream) and "lm" not in preset.sources:
    parser.error("--model-dir, --hook and --stream belong to the lm source; add lm to "
                 "--sources.")
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.rows_from:
    try:
      import_rows(pathlib.Path(args.rows_from), out, preset)
    except (OSError, ValueError, KeyError) as e:
      parser.error(f"--rows-from {args.rows_from}: {e}")
  command = "python -m experiments.sae_allocation " + shlex.join(
      sys.argv[1:] if argv is None else argv)
  t0 = time.perf_counter()
  sources = {}
  for name in preset.sources:
    sources[name] = sources_lib.SOURCES[name](args, preset)
  t_data = time.perf_counter() - t0
  plan = []
  for k_block in _k_blocks(preset):
    for seed in preset.seeds:
      for name, source in sources.items():
        for run_name, cfg, tcfg in run_configs(preset, source.d, source.d_sae):
          if cfg.k in k_block and (not args.only or run_name in args.only):
            plan.append((source, run_name, cfg, tcfg, seed))
  rows = []
  written = False
  for i, (source, run_name, cfg, tcfg, seed) in enumerate(plan):
    row, trained_now = train_and_evaluate(args, preset, source, run_name, cfg, tcfg, seed,
                                          out)
    rows.append(row)
    if not args.quiet or args.log_runs:
      print(f"[{i + 1}/{len(plan)}] {source.name} {run_name} seed {seed}: "
            f"fvu={row['fvu']:.4f} l0={row['l0_mean']:.2f} dead={row['dead_fraction']:.3f}",
            flush=True)
    # Once every seed of a configuration has its row, each curve gets the other seeds'
    # final models' NMSE on its batches (seconds per seed).
    siblings = {r["seed"]: r for r in rows
                if r["source"] == source.name and r["name"] == run_name}
    if set(siblings) == set(preset.seeds) and len(siblings) > 1:
      trained_now |= add_reference_nmse(out, preset, source, run_name, cfg, tcfg, siblings)
    # Outputs (tables and plots, seconds each) are rewritten after every run trained in
    # this sitting; rows found on disk are only collected.
    written = trained_now
    if trained_now:
      write_outputs(_result(args, command, preset, sources, rows, t_data,
                            time.perf_counter() - t0, len(plan)), out)
  result = _result(args, command, preset, sources, rows, t_data, time.perf_counter() - t0,
                   len(plan))
  if not written:
    write_outputs(result, out)
  if not args.quiet:
    print((out / "results.md").read_text())
  return result


def capacity_digest(cfg, batch_size: int) -> str | None:
  """A short hash of the per-feature capacities a Feature Choice run trains with.

  Kept in each Feature Choice row, so that a row trained under another capacity rule is
  recognised and trained again rather than reported beside runs it cannot be compared
  with. ``None`` for the other allocations.
  """
  if cfg.allocation not in model.FEATURE_CHOICE:
    return None
  caps = np.ascontiguousarray(model.feature_capacities(cfg, batch_size), dtype=np.int32)
  return hashlib.sha256(caps.tobytes()).hexdigest()[:16]


def row_path(out: pathlib.Path, preset: Preset, source: str, name: str, seed: int
             ) -> pathlib.Path:
  """Where a finished run's row is kept."""
  return out / "rows" / source / f"{_run_name(preset, name, seed)}.json"


def _run_name(preset: Preset, name: str, seed: int) -> str:
  """A run's folder and row name: the seed is named when the preset has several, and
  ``-mixed`` marks runs that read their store with ``mix_shards`` (another data order, so
  they never share a folder or a row with the others)."""
  run = name if len(preset.seeds) == 1 else f"{name}-s{seed}"
  return f"{run}-mixed" if preset.mix_shards else run


def import_rows(results_json: pathlib.Path, out: pathlib.Path, preset: Preset) -> int:
  """Writes the rows of an earlier results.json as finished runs under ``out``.

  Rows must come from the same preset configuration (steps, batch size, sizes): a row
  of another configuration would be reported beside runs it cannot be compared with.
  Rows already present under ``out`` are kept. Returns the number of rows written.
  """
  earlier = json.loads(results_json.read_text())
  if "runs" not in earlier:
    raise ValueError("not a results.json of this experiment (no 'runs' list)")
  written = 0
  for row in earlier["runs"]:
    if row.get("mix_shards", False) != preset.mix_shards:  # rows before the flag: False
      raise ValueError(
          f"row {row['source']}/{row['name']} seed {row['seed']} was trained with mix_shards="
          f"{row.get('mix_shards', False)}, this run with mix_shards={preset.mix_shards}; "
          f"they read the store in another order")
    if (row["steps"], row["batch_size"]) != (preset.steps, preset.batch_size):
      raise ValueError(
          f"row {row['source']}/{row['name']} seed {row['seed']} has steps={row['steps']}, "
          f"batch_size={row['batch_size']}; this preset has steps={preset.steps}, "
          f"batch_size={preset.batch_size}")
    path = row_path(out, preset, row["source"], row["name"], row["seed"])
    if path.exists():
      continue
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(row))
    os.replace(tmp, path)
    written += 1
  return written


def _k_blocks(preset: Preset) -> list[tuple[int, ...]]:
  """Groups of k trained seed by seed: each k of the main grid alone, then the sweep."""
  main = (preset.k,) if preset.grid == "main" else preset.k_values
  blocks = [(k,) for k in main]
  sweep = tuple(k for k in preset.k_sweep if k not in main)
  return blocks + ([sweep] if sweep else [])


def _result(args, command, preset, sources, rows, t_data, total, planned) -> dict:
  first = next(iter(sources.values()))
  return {"experiment": "sae_allocation", "preset": args.preset, "command": command,
          "preset_config": dataclasses.asdict(preset),
          "sources": {n: {"description": s.description, "d_model": s.d, "d_sae": s.d_sae,
                          "probe_raw": s.probe_raw,
                          "store": s.store, "store_tokens": s.store_tokens,
                          "input_scale": s.scale} for n, s in sources.items()},
          "d_model": first.d, "d_sae": first.d_sae, "store": first.store,
          "store_tokens": first.store_tokens, "input_scale": first.scale,
          "data_seconds": t_data, "total_seconds": total, "runs_planned": planned,
          "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
          "machine": reporting.machine(), "runs": rows}


def write_outputs(result: dict, out: pathlib.Path) -> None:
  """results.json, results.md and the plots, rewritten after every run."""
  tmp = out / "results.json.tmp"
  tmp.write_text(json.dumps(result, indent=1))
  os.replace(tmp, out / "results.json")
  (out / "results.md").write_text(report.markdown(result))
  report.plots(result, out)


def _is_scalar(v) -> bool:
  return isinstance(v, (int, float, bool, str)) or (np.ndim(v) == 0 and np.isreal(v))


def cli() -> None:
  """The command line: bad input and unreadable stores print one line, not a traceback."""
  try:
    main()
  except (ValueError, FileNotFoundError) as err:
    sys.exit(f"sae_allocation: error: {err}")


if __name__ == "__main__":
  cli()

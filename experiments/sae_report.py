"""Tables, verdicts and plots of the SAE allocation experiment (`experiments.sae_allocation`).

Rows are the dicts of `results.json["runs"]`: one per (source, strategy, aux loss, k,
seed) with the held-out evaluation (`sae_jax.evaluation.evaluate.evaluate_sae`; fidelity for the LM
source, `sae_jax.evaluation.recovery` scores for the synthetic one) and the training curve.

Every comparison is paired: two runs with the same seed share the data order and the
initialisation seed, so a difference (e.g. Mutual Choice minus TopK at the same k) removes
much of the seed-to-seed spread. Differences are reported as mean and 95 % Student-t
interval over seeds; with one seed there is no interval and the report says so.
"""

from __future__ import annotations

import math
import pathlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from experiments.reporting import confidence_interval
from experiments.reporting import holds
from sae_jax.evaluation import plots as sae_plots

BASELINE = "topk"
CHALLENGERS = ("mutual_choice", "feature_choice", "feature_choice_zipf")
STRATEGY_ORDER = ("topk", "mutual_choice", "feature_choice", "feature_choice_zipf", "relu",
                  "batch_topk")
AUX_ORDER = ("none", "aux_k", "aux_zipf")


def with_derived(rows: Sequence[dict]) -> list[dict]:
  """Rows plus ``train_dead_fraction``: the share of features that had not fired in the
  last ``dead_after_tokens`` training tokens at the end of training (the trainer's own dead
  counter, from the last point of the training curve). ``dead_fraction`` counts features
  that never fire on the held-out tokens, which also counts rare live features when the
  evaluation set is short (a few thousand tokens against densities down to 1e-4)."""
  out = []
  for row in rows:
    row = dict(row)
    if row.get("curve") and "train_dead_fraction" not in row:
      row["train_dead_fraction"] = row["curve"][-1]["dead_fraction"]
    out.append(row)
  return out


def _key(row: dict) -> tuple:
  return (row.get("source", "minilm"), row["strategy"], row["aux_loss"], row["k"])


def groups(rows: Sequence[dict]) -> dict[tuple, dict[int, dict]]:
  """(source, strategy, aux, k) -> {seed: row}."""
  out: dict[tuple, dict[int, dict]] = defaultdict(dict)
  for row in rows:
    out[_key(row)][row.get("seed", 0)] = row
  return out


def _sort_key(key: tuple) -> tuple:
  source, strategy, aux, k = key
  rank = lambda seq, v: seq.index(v) if v in seq else len(seq)
  return (source, k, rank(STRATEGY_ORDER, strategy), rank(AUX_ORDER, aux))


def paired(by_key: dict, a: tuple, b: tuple, metric: str) -> list[float]:
  """``metric`` of run group ``a`` minus group ``b`` for every seed both have."""
  ra, rb = by_key.get(a, {}), by_key.get(b, {})
  return [ra[s][metric] - rb[s][metric] for s in sorted(ra.keys() & rb.keys())
          if metric in ra[s] and metric in rb[s]]


def _mean_std(vals: Sequence[float], fmt: str) -> str:
  if not vals:
    return "–"
  if len(vals) == 1:
    return fmt.format(vals[0])
  sd = fmt.format(float(np.std(vals, ddof=1))).lstrip("+")  # a spread carries no sign
  return f"{fmt.format(float(np.mean(vals)))} ± {sd}"


def _diff_cell(diffs: Sequence[float], scale: float = 1.0, digits: int = 4) -> str:
  if not diffs:
    return "–"
  mean, low, high, n = confidence_interval(np.asarray(diffs) * scale)
  if n < 2:
    return f"{mean:+.{digits}f} (1 seed)"
  return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}] (n={n})"


def flattening(curve: Sequence[dict], key: str = "nmse", decay_fraction: float = 0.2
               ) -> float:
  """Relative fall of the training ``key`` over the last stretch before the LR decay.

  The learning rate decays linearly to 0 over the last ``decay_fraction`` of training,
  which lowers the loss whether or not training had converged, so the window ends where
  the decay starts. With ``a`` and ``b`` the means over the two eighths of the run just
  before the decay, the result is ``(a - b) / b``: about 0 for a curve that has
  flattened, 0.05 for one still falling 5 % per eighth of training.
  """
  return _flattening(np.asarray([p[key] for p in curve], np.float64), decay_fraction)


def adjusted_flattening(curve: Sequence[dict], decay_fraction: float = 0.2) -> float:
  """``flattening`` of the training NMSE divided by a fixed model's NMSE on each batch.

  Every point of the training curve is one batch. Where batches differ in difficulty by
  where they come from (a store whose shards differ in content, read in a seeded shard
  order), the raw curve moves with the data order. ``nmse_ref`` (the other seeds' final
  models on the same batch) moves with it too, so the ratio keeps what training changed.
  NaN for a curve without ``nmse_ref``.
  """
  if not curve or any(not p.get("nmse_ref", 0) > 0 for p in curve):
    return math.nan
  ratio = np.asarray([p["nmse"] / p["nmse_ref"] for p in curve], np.float64)
  return _flattening(ratio, decay_fraction)


def _flattening(values: np.ndarray, decay_fraction: float) -> float:
  stop = int(round(len(values) * (1.0 - decay_fraction)))
  eighth = len(values) // 8
  if eighth < 1 or stop - 2 * eighth < 0:
    return math.nan
  a = values[stop - 2 * eighth:stop - eighth].mean()
  b = values[stop - eighth:stop].mean()
  return float((a - b) / b) if b > 0 else math.nan


COLUMNS = (("L0", "l0_mean", "{:.2f}"), ("FVU", "fvu", "{:.4f}"),
           ("dead (eval)", "dead_fraction", "{:.3f}"),
           ("dead (train)", "train_dead_fraction", "{:.3f}"), ("underused", "underutilised_fraction", "{:.3f}"),
           ("fidelity", "fidelity_recovered", "{:.3f}"), ("MCC", "recovery_mcc", "{:.3f}"),
           ("F1", "recovery_f1", "{:.3f}"), ("probe k=1", "probe_k1", "{:.3f}"),
           ("probe k=5", "probe_k5", "{:.3f}"), ("probe k=20", "probe_k20", "{:.3f}"),
           ("thr. L0", "threshold_l0_mean", "{:.2f}"), ("thr. FVU", "threshold_fvu", "{:.4f}"))


def _source_table(by_key: dict, source: str) -> list[str]:
  keys = sorted((k for k in by_key if k[0] == source), key=_sort_key)
  present = [c for c in COLUMNS if any(c[1] in r for k in keys for r in by_key[k].values())]
  lines = ["| strategy | aux | k | seeds | " + " | ".join(c[0] for c in present)
           + " | flattening | flattening (adj.) |",
           "|" + "---|" * (6 + len(present))]
  for key in keys:
    runs = [by_key[key][s] for s in sorted(by_key[key])]
    cells = [_mean_std([r[c[1]] for r in runs if c[1] in r], c[2]) for c in present]
    flat = [flattening(r["curve"]) for r in runs if r.get("curve")]
    adj = [a for a in (adjusted_flattening(r.get("curve") or []) for r in runs)
           if not math.isnan(a)]
    lines.append(f"| {key[1]} | {key[2]} | {key[3]} | {len(runs)} | " + " | ".join(cells)
                 + f" | {_mean_std(flat, '{:+.3f}')} | {_mean_std(adj, '{:+.3f}')}"
                 + ("" if len(adj) in (0, len(runs)) else f" ({len(adj)} seeds)") + " |")
  return lines


def verdicts(rows: Sequence[dict]) -> list[dict]:
  """One entry per claim, source and k: the paired difference, its interval, the verdict."""
  rows = with_derived(rows)
  by_key = groups(rows)
  out = []
  sources = sorted({k[0] for k in by_key})
  for source in sources:
    ks = sorted({k[3] for k in by_key if k[0] == source})
    for k in ks:
      for metric, claim in (
          ("train_dead_fraction", "fewer dead features than TopK (dead in training)"),
          ("dead_fraction", "fewer dead features than TopK (never fired on held-out tokens)"),
          ("fvu", "lower reconstruction error (FVU) than TopK")):
        for strategy in CHALLENGERS:
          diffs = paired(by_key, (source, strategy, "none", k), (source, BASELINE, "none", k),
                         metric)
          if diffs:
            mean, low, high, n = confidence_interval(diffs)
            out.append({"claim": f"{strategy} has {claim}", "source": source, "k": k,
                        "metric": metric, "comparison": f"{strategy} − topk, no aux",
                        "mean": mean, "low": low, "high": high, "n": n,
                        "verdict": holds(low, high, -1)})
      for strategy in (BASELINE,) + CHALLENGERS:
        for metric in ("train_dead_fraction", "dead_fraction", "underutilised_fraction"):
          diffs = paired(by_key, (source, strategy, "aux_zipf", k),
                         (source, strategy, "aux_k", k), metric)
          if diffs:
            mean, low, high, n = confidence_interval(diffs)
            what = {"train_dead_fraction": "dead (in training)",
                    "dead_fraction": "dead (on held-out tokens)",
                    "underutilised_fraction": "underutilised"}[metric]
            out.append({"claim": f"aux_zipf leaves fewer {what} features than aux_k",
                        "source": source, "k": k, "metric": metric,
                        "comparison": f"{strategy}: aux_zipf − aux_k",
                        "mean": mean, "low": low, "high": high, "n": n,
                        "verdict": holds(low, high, -1)})
    same = [r["mc_equals_batch_topk"] for r in rows
            if r.get("source", "minilm") == source and "mc_equals_batch_topk" in r]
    if same:
      share = float(np.mean(same))
      out.append({"claim": "Mutual Choice selects what BatchTopK selects", "source": source,
                  "k": None, "metric": "mc_equals_batch_topk",
                  "comparison": f"{len(same)} MC runs, identical masks on every eval batch",
                  "mean": share, "low": share, "high": share, "n": len(same),
                  "verdict": "holds" if share == 1.0 else "not shown (masks differ)"})
  return out


def verdict_lines(rows: Sequence[dict]) -> list[str]:
  lines = ["| claim | source | k | comparison | mean [95 % CI] | verdict |",
           "|---|---|---|---|---|---|"]
  for v in verdicts(rows):
    if v["metric"] == "mc_equals_batch_topk":
      cell = f"{100 * v['mean']:.1f} % of runs"
    elif math.isnan(v["low"]):
      cell = f"{v['mean']:+.4f} (1 seed)"
    else:
      cell = f"{v['mean']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}] (n={v['n']})"
    k = "all" if v["k"] is None else v["k"]
    lines.append(f"| {v['claim']} | {v['source']} | {k} | {v['comparison']} | {cell} | "
                 f"{v['verdict']} |")
  return lines


def markdown(result: dict) -> str:
  """results.md: setting, per-source tables (mean ± std over seeds), verdicts."""
  cfg = result["preset_config"]
  rows = with_derived(result["runs"])
  by_key = groups(rows)
  machine = result.get("machine", {})
  lines = [f"# SAE allocation strategies ({result['preset']} preset)", "",
           f"Command: `{result.get('command', '')}`  ",
           f"Machine: {machine.get('processor', '?')}, {machine.get('cpu_count', '?')} cores, "
           f"JAX {machine.get('jax', result.get('jax', '?'))} ({machine.get('backend', '?')}).  ",
           f"{cfg['steps']} steps x {cfg['batch_size']} tokens per run "
           f"({cfg['steps'] * cfg['batch_size'] / 1e6:.2f}M tokens), learning rate "
           f"{cfg['learning_rate']}, dead after {cfg['dead_after_tokens']} tokens; "
           f"{len(rows)} of {result.get('runs_planned', len(rows))} runs done, "
           f"{result['total_seconds'] / 60:.1f} min in this sitting.", ""]
  for name, info in result.get("sources", {}).items():
    lines.append(f"- **{name}**: {info['description']}; SAE width {info['d_sae']}.")
    if info.get("probe_raw"):
      accs = ", ".join(f"k={k}: {v:.3f}" for k, v in info["probe_raw"].items())
      lines.append(f"  k-sparse probing of the raw activations (which corpus a held-out "
                   f"token came from, one-vs-rest, test accuracy): {accs}.")
  lines += ["", "Columns: mean ± sample std over seeds; FVU is textbook (squared error over "
            "the variance about the evaluation-set mean); dead (eval) = never fired on the "
            "held-out tokens (rare live features count too); dead (train) = not fired in the "
            "last dead-after tokens of training, the trainer's own counter; underused = below the Zipf law fitted to the feature densities; MCC / F1 "
            "score decoder rows against the true features (|cos| >= 0.8 for F1); probe k = "
            "k-sparse probing accuracy of the batch-independent codes for the corpus of a "
            "held-out token (one-vs-rest, averaged); thr. = the "
            "calibrated batch-independent inference path (MC/FC); flattening = relative fall "
            "of the training NMSE between the two eighths of the run before the learning-rate "
            "decay (0: flat); flattening (adj.) = the same for the training NMSE divided by "
            "the NMSE of the other seeds' final models on the same batch, which removes "
            "the batches' own difficulty (the data order) from the curve.", ""]
  for source in sorted({k[0] for k in by_key}):
    lines += [f"## {source}", ""] + _source_table(by_key, source) + [""]
  lines += ["## Verdicts", "",
            "Paired differences over seeds (same seed = same data order and init seed); "
            "negative favours the claim.", ""] + verdict_lines(rows) + [""]
  return "\n".join(lines)


def _mean_curve(runs: Sequence[dict], key: str) -> list[dict]:
  curves = [r["curve"] for r in runs if r.get("curve")]
  if not curves:
    return []
  n = min(len(c) for c in curves)
  return [{"tokens": curves[0][i]["tokens"], key: float(np.mean([c[i][key] for c in curves]))}
          for i in range(n)]


def plots(result: dict, out: str | pathlib.Path) -> list[pathlib.Path]:
  """Per source: FVU vs L0 (mean ± std over seeds), L0 distributions, training curves."""
  out = pathlib.Path(out)
  rows = result["runs"]
  by_key = groups(rows)
  paths = []
  for source in sorted({k[0] for k in by_key}):
    plain = [r for r in rows if r.get("source", "minilm") == source and r["aux_loss"] == "none"
             and r["strategy"] != "relu"]
    if plain:
      paths.append(sae_plots.plot_fvu_vs_l0_pareto(
          plain, out / f"fvu_vs_l0_{source}.png",
          title=f"{source}: FVU vs L0, no aux loss (mean over seeds; error bars: sd over seeds)"))
    keys = [k for k in sorted(by_key, key=_sort_key) if k[0] == source]
    main_k = result["preset_config"].get("k")
    at_k = [k for k in keys if k[3] == main_k] or keys
    first = {f"{k[1]} {k[2]} k{k[3]}": by_key[k][min(by_key[k])] for k in at_k}
    hists = {name: np.asarray(r["l0_histogram"]) for name, r in first.items()
             if r.get("l0_histogram")}
    if hists:
      paths.append(sae_plots.plot_l0_distributions(hists, out / f"l0_distributions_{source}.png"))
    curves = {}
    for k in at_k:
      runs = list(by_key[k].values())
      nmse, dead = _mean_curve(runs, "nmse"), _mean_curve(runs, "dead_fraction")
      if nmse:
        curves[f"{k[1]} {k[2]}"] = [{**a, **b} for a, b in zip(nmse, dead)]
    if curves:
      paths.append(sae_plots.plot_training_curves(
          curves, out / f"training_curves_{source}.png", keys=("nmse", "dead_fraction")))
  return paths

"""Statistics, tables, verdicts and plots of the AP experiment (`experiments.prune_ap`).

Every comparison is paired: an arm (AP, a control) and the host alone share the seed,
the initialisation, the data order and the trained round 0, so the difference of their
results at the same cycle removes most of the seed-to-seed spread. Differences are
reported as mean and 95 % confidence interval over seeds (Student t with n - 1 degrees
of freedom); with one seed there is no interval and the report says so.

Rows are the dicts of `results.json["runs"]`: one per (model, dataset, method, arm, seed,
cycle) with the eval metrics of `pruning_jax.rounds` ("test_accuracy", "dnr",
"layer_dnr", ...) and the per-epoch training curves.
"""

from collections.abc import Sequence
import math
import os

import matplotlib
import numpy as np

matplotlib.use("Agg")
from matplotlib import pyplot as plt

from experiments.reporting import confidence_interval
from experiments.reporting import holds

HOST = "host"
ARM_LABELS = {
    "host": "host alone (q = 0)",
    "ap": "AP (least-moved negatives)",
    "ap_relu_fed": "AP, ReLU-fed layers only",
    "random_q": "random-q control",
    "most_negative_q": "most-negative-q control",
}


def groups(rows: list[dict]) -> dict:
  """{(model, dataset, method): {arm: {cycle: {seed: row}}}}."""
  out: dict = {}
  for r in rows:
    by_arm = out.setdefault((r["model"], r["dataset"], r["method"]), {})
    by_arm.setdefault(r["arm"], {}).setdefault(r["cycle"], {})[r["seed"]] = r
  return out


def paired(by_arm: dict, arm: str, cycle: int, key: str, base: str = HOST,
           base_key: str | None = None) -> list[float]:
  """arm's `key` minus base's `base_key` (default: the same key), per shared seed."""
  a = by_arm.get(arm, {}).get(cycle, {})
  b = by_arm.get(base, {}).get(cycle, {})
  base_key = base_key or key
  return [a[s][key] - b[s][base_key] for s in sorted(set(a) & set(b))
          if a[s].get(key) is not None and b[s].get(base_key) is not None]


def values(by_arm: dict, arm: str, cycle: int, key: str) -> list[float]:
  rows = by_arm.get(arm, {}).get(cycle, {})
  return [rows[s][key] for s in sorted(rows) if rows[s].get(key) is not None]


def _pct(x: float) -> str:
  return "–" if math.isnan(x) else f"{100 * x:.2f}"


def _mean_cell(vals: Sequence[float]) -> str:
  if not vals:
    return "–"
  mean, _, _, n = confidence_interval(vals)
  spread = f" ± {100 * np.std(vals, ddof=1):.2f}" if n > 1 else ""
  return f"{_pct(mean)}{spread}"


def _diff_cell(diffs: Sequence[float]) -> str:
  if not diffs:
    return "–"
  mean, low, high, n = confidence_interval(diffs)
  if n < 2:
    return f"{100 * mean:+.2f} (1 seed)"
  return f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"


def _cycles(by_arm: dict) -> list[int]:
  return sorted({c for arm in by_arm.values() for c in arm})


def _sparsity(by_arm: dict, cycle: int) -> float:
  for arm in by_arm.values():
    rows = arm.get(cycle)
    if rows:
      return next(iter(rows.values()))["sparsity"]
  return math.nan


def _arms(by_arm: dict) -> list[str]:
  order = list(ARM_LABELS)
  return sorted(by_arm, key=lambda a: order.index(a) if a in order else len(order))


def _table(by_arm: dict, key: str, title: str, base_key: str | None = None) -> list[str]:
  arms = [a for a in _arms(by_arm) if a != HOST]
  head = ["cycle", "sparsity %", f"host {title}"] + [f"{a} − host" for a in arms]
  extra_recal = base_key is None and key == "test_accuracy" and any(
      r.get("test_accuracy_bn_recal") is not None
      for c in by_arm.get(HOST, {}).values() for r in c.values())
  if extra_recal:
    head.append("host + BN recalibration − host")
  lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
  for cycle in _cycles(by_arm):
    cells = [str(cycle), f"{100 * _sparsity(by_arm, cycle):.1f}",
             _mean_cell(values(by_arm, HOST, cycle, key))]
    cells += [_diff_cell(paired(by_arm, a, cycle, key)) for a in arms]
    if extra_recal:
      cells.append(_diff_cell(paired(by_arm, HOST, cycle, "test_accuracy_bn_recal",
                                     base_key="test_accuracy")))
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _layer_table(by_arm: dict, cycle: int) -> list[str]:
  arms = _arms(by_arm)
  rows = by_arm.get(HOST, {}).get(cycle, {})
  if not rows:
    return []
  layers = list(next(iter(rows.values()))["layer_dnr"])
  head = ["layer", "host DNR %"] + [f"{a} − host" for a in arms if a != HOST]
  lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
  for layer in layers:
    per_arm = {a: {s: r["layer_dnr"][layer] for s, r in by_arm.get(a, {}).get(cycle, {}).items()}
               for a in arms}
    cells = [layer, _mean_cell(list(per_arm[HOST].values()))]
    for a in arms:
      if a == HOST:
        continue
      shared = sorted(set(per_arm[a]) & set(per_arm[HOST]))
      cells.append(_diff_cell([per_arm[a][s] - per_arm[HOST][s] for s in shared]))
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _mean_over_pruned(by_arm: dict, arm: str, key: str) -> list[float]:
  """Per seed, the arm-minus-host difference averaged over the pruned cycles (>= 1)."""
  cycles = [c for c in _cycles(by_arm) if c >= 1]
  per_seed: dict[int, list[float]] = {}
  for c in cycles:
    a, b = by_arm.get(arm, {}).get(c, {}), by_arm.get(HOST, {}).get(c, {})
    for s in set(a) & set(b):
      per_seed.setdefault(s, []).append(a[s][key] - b[s][key])
  full = len(cycles)
  return [float(np.mean(v)) for s, v in sorted(per_seed.items()) if len(v) == full]


def verdicts(rows: list[dict]) -> list[dict]:
  """One verdict per (claim, model, method) with the numbers behind it.

  Claims (Liu et al. 2023's abstract): the dynamic DNR falls as sparsity rises; AP
  lowers the DNR; AP raises the accuracy of pruned networks. Each is judged on the
  paired 95 % interval: "holds" when it excludes zero in the claimed direction.
  """
  out = []
  for (model, dataset, method), by_arm in groups(rows).items():
    cycles = _cycles(by_arm)
    if len(cycles) < 2:
      continue
    last = cycles[-1]
    host = by_arm.get(HOST, {})
    shared = sorted(set(host.get(0, {})) & set(host.get(last, {})))
    fall = [host[last][s]["dnr"] - host[0][s]["dnr"] for s in shared]
    mean, low, high, n = confidence_interval(fall)
    where = f"{model} / {dataset} / {method}"
    out.append({"claim": "DNR falls as sparsity rises (host, last cycle − dense)",
                "where": where, "mean": mean, "low": low, "high": high, "seeds": n,
                "sparsity": _sparsity(by_arm, last), "verdict": holds(low, high, -1)})
    for arm in _arms(by_arm):
      if arm == HOST:
        continue
      for key, claim, sign in (("dnr", "lowers DNR", -1),
                               ("test_accuracy", "raises accuracy", +1)):
        for label, diffs in (
            (f"at {100 * _sparsity(by_arm, last):.1f} % sparsity",
             paired(by_arm, arm, last, key)),
            ("averaged over pruned cycles", _mean_over_pruned(by_arm, arm, key))):
          mean, low, high, n = confidence_interval(diffs)
          out.append({"claim": f"{arm} {claim} ({label})", "where": where, "arm": arm,
                      "key": key, "mean": mean, "low": low, "high": high, "seeds": n,
                      "verdict": holds(low, high, sign)})
  return out


def verdict_lines(rows: list[dict]) -> list[str]:
  lines = ["| claim | where | difference (points) | 95 % CI | seeds | verdict |",
           "|---|---|---:|---|---:|---|"]
  for v in verdicts(rows):
    ci = ("–" if math.isnan(v["low"])
          else f"[{100 * v['low']:+.2f}, {100 * v['high']:+.2f}]")
    lines.append(f"| {v['claim']} | {v['where']} | {100 * v['mean']:+.2f} | {ci} | "
                 f"{v['seeds']} | {v['verdict']} |")
  return lines


def markdown(results: dict) -> str:
  """results.md: verdicts, then per model and method accuracy, DNR and per-layer DNR."""
  m = results["machine"]
  lines = [f"# AP results, preset {results['preset']}", "",
           f"Command: `{results.get('command', '')}`", "",
           f"Wall time of this invocation {results['wall_seconds']:.0f} s on {m['platform']}"
           f" ({m['cpu_count']} CPUs, jax {m['jax']}"
           f"{', synthetic data' if results['synthetic'] else ''}). Accuracy and DNR in %;"
           " host columns are mean ± sample std over seeds; arm columns are the paired"
           " difference arm − host (same seed, same round 0), mean and 95 % CI (Student t)"
           " over seeds.", "",
           "Arms: " + "; ".join(f"`{a}`: {ARM_LABELS.get(a, a)}"
                                for a in dict.fromkeys(r["arm"] for r in results["runs"])),
           "", "## Verdicts", ""] + verdict_lines(results["runs"]) + [""]
  for (model, dataset, method), by_arm in groups(results["runs"]).items():
    seeds = sorted({s for a in by_arm.values() for c in a.values() for s in c})
    cost = results.get("cycle_seconds", {}).get(model)
    lines += [f"## {model} on {dataset}, host {method} (seeds {seeds})", ""]
    if cost:
      lines += [f"One training cycle costs {cost:.1f} s here (median over runs).", ""]
    lines += ["### Test accuracy", ""] + _table(by_arm, "test_accuracy", "acc") + [""]
    lines += ["### Dynamic dead neuron rate (test set, element level)", ""]
    lines += _table(by_arm, "dnr", "DNR") + [""]
    lines += ["### Never-active units over the test set (static DNR)", ""]
    lines += _table(by_arm, "dnr_static", "static DNR") + [""]
    last = _cycles(by_arm)[-1]
    layer = _layer_table(by_arm, last)
    if layer:
      lines += [f"### DNR per layer at cycle {last} "
                f"({100 * _sparsity(by_arm, last):.1f} % sparsity)", ""] + layer + [""]
  return "\n".join(lines)


def _band(ax, x, by_cycle_vals, color, label, linestyle="-"):
  stats = [confidence_interval(v) for v in by_cycle_vals]
  mean = np.array([s[0] for s in stats])
  low = np.array([s[1] for s in stats])
  high = np.array([s[2] for s in stats])
  ax.plot(x, 100 * mean, color=color, linestyle=linestyle, marker="o", markersize=3,
          label=label)
  if not np.all(np.isnan(low)):
    ax.fill_between(x, 100 * low, 100 * high, color=color, alpha=0.15, linewidth=0)


def plots(results: dict, out: str) -> list[str]:
  """Accuracy and DNR vs sparsity (95 % bands), per-layer DNR, per-cycle test curves."""
  paths = []
  for (model, dataset, method), by_arm in groups(results["runs"]).items():
    tag = f"{model}_{dataset}_{method}"
    cycles = _cycles(by_arm)
    # Weights remaining on a log axis, densest left: equal steps per IMP cycle, as
    # lottery-ticket plots draw them, so the high-sparsity cycles are not crowded.
    x = [100 * (1 - _sparsity(by_arm, c)) for c in cycles]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, arm in enumerate(_arms(by_arm)):
      for ax, key in zip(axes, ("test_accuracy", "dnr")):
        _band(ax, x, [values(by_arm, arm, c, key) for c in cycles], f"C{i}",
              ARM_LABELS.get(arm, arm), "-" if arm == HOST else "--")
    if any(values(by_arm, HOST, c, "test_accuracy_bn_recal") for c in cycles):
      _band(axes[0], x, [values(by_arm, HOST, c, "test_accuracy_bn_recal") for c in cycles],
            "k", "host + BN recalibration", ":")
    axes[0].set(xlabel="weights remaining (%)", ylabel="test accuracy (%)")
    axes[1].set(xlabel="weights remaining (%)", ylabel="test DNR (% of ReLU outputs at 0)")
    for ax in axes:
      ax.set_xscale("log")
      ax.invert_xaxis()
      ax.set_xticks([100, 50, 20, 10, 5, 2], ["100", "50", "20", "10", "5", "2"])
      ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{model} on {dataset}, host {method}: mean and 95 % CI over seeds")
    paths.append(os.path.join(out, f"accuracy_dnr_vs_sparsity_{tag}.png"))
    fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
    plt.close(fig)

    host_last = by_arm.get(HOST, {}).get(cycles[-1], {})
    if host_last:
      layers = list(next(iter(host_last.values()))["layer_dnr"])
      fig, ax = plt.subplots(figsize=(6.4, 4.0))
      bars = [("host, dense", "0.6", by_arm[HOST].get(0, {}))]
      bars += [(f"{arm}, {100 * _sparsity(by_arm, cycles[-1]):.1f} % sparse", f"C{i}",
                by_arm[arm].get(cycles[-1], {})) for i, arm in enumerate(_arms(by_arm))]
      bars = [b for b in bars if b[2]]
      width = 0.8 / len(bars)
      for i, (label, color, rows) in enumerate(bars):
        means = [100 * np.mean([r["layer_dnr"][l] for r in rows.values()]) for l in layers]
        ax.bar(np.arange(len(layers)) + (i - (len(bars) - 1) / 2) * width, means, width,
               color=color, label=label)
      ax.set_xticks(range(len(layers)), layers, rotation=30, fontsize=8)
      ax.set(ylabel="test DNR (%)", title=f"{model}: DNR per layer")
      ax.legend(fontsize=7)
      ax.grid(alpha=0.3, axis="y")
      paths.append(os.path.join(out, f"layer_dnr_{tag}.png"))
      fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
      plt.close(fig)

    curves = {c: r for c, rows in by_arm.get(HOST, {}).items()
              for s, r in rows.items() if s == min(rows) and r.get("test_accuracy_by_epoch")}
    if curves:
      fig, ax = plt.subplots(figsize=(6.4, 4.0))
      cmap = plt.get_cmap("viridis")
      for c in sorted(curves):
        acc = curves[c]["test_accuracy_by_epoch"]
        ax.plot(range(1, len(acc) + 1), 100 * np.asarray(acc), color=cmap(c / max(cycles)),
                label=f"cycle {c} ({100 * curves[c]['sparsity']:.1f} %)")
      ax.set(xlabel="epoch of the cycle", ylabel="test accuracy (%)",
             title=f"{model}, host {method}: training curve of every cycle (seed "
                   f"{min(next(iter(by_arm[HOST].values())))})")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=6, ncol=2)
      paths.append(os.path.join(out, f"cycle_curves_{tag}.png"))
      fig.savefig(paths[-1], dpi=110, bbox_inches="tight")
      plt.close(fig)
  return paths

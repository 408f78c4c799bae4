"""Figures of SAE evaluations, written as PNG files.

Figures are drawn on a bare ``matplotlib.figure.Figure`` rendered by the Agg canvas, so
nothing is shown, no pyplot state is touched and the process-wide backend is left as it
is. Every function checks its input, writes one PNG and returns its path.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _png_path(path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  if path.suffix.lower() != ".png":
    raise ValueError(f"path must end in .png; got {str(path)!r}.")
  path.parent.mkdir(parents=True, exist_ok=True)
  return path


def _figure(width: float = 6.0, height: float = 4.0):
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig, fig.add_subplot()


def _save(fig: Figure, path: pathlib.Path) -> pathlib.Path:
  fig.tight_layout()
  # bbox "tight" keeps a legend placed outside the axes inside the image.
  fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
  return path


def _finite(name: str, value: Any, low: float = -math.inf) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not (
      math.isfinite(value) and value >= low):
    raise ValueError(f"{name} must be a finite number >= {low}; got {value!r}.")
  return float(value)


def _nonempty(name: str, value: Any) -> None:
  if not value:
    raise ValueError(f"{name} must not be empty; got {value!r}.")


def plot_density_vs_rank(densities_by_run: Mapping[str, np.ndarray],
                         fits: Mapping[str, tuple[float, float]] | None,
                         path: str | os.PathLike) -> pathlib.Path:
  """Feature firing density against frequency rank, log-log, with fitted Zipf lines.

  References:
    Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature Choice
    Sparse Autoencoders", arXiv 2411.02124.

  Args:
    densities_by_run: label -> ``[f]`` firing densities (e.g. ``evaluate_sae``'s
      ``feature_density``); dead features (density 0) cannot appear on log axes.
    fits: label -> ``(C, s)`` of ``density = C * rank^-s`` (e.g. ``zipf_C``, ``zipf_s``),
      drawn dashed in the run's colour; labels must be runs. None or empty draws none.
    path: PNG file to write.

  Raises:
    ValueError: on empty input, densities that are not 1-D, negative or non-finite, a
      run without a positive density, or a fit for an unknown run or with ``C <= 0``.
  """
  path = _png_path(path)
  _nonempty("densities_by_run", densities_by_run)
  fits = dict(fits or {})
  unknown = sorted(set(fits) - set(densities_by_run))
  if unknown:
    raise ValueError(f"fits has labels {unknown} that are not in densities_by_run "
                     f"{sorted(densities_by_run)}.")
  fig, ax = _figure(7.5, 4.5)
  for i, (label, densities) in enumerate(densities_by_run.items()):
    density_F = np.asarray(densities, np.float64)
    if density_F.ndim != 1 or not np.all(np.isfinite(density_F)) or np.any(density_F < 0):
      raise ValueError(f"densities_by_run[{label!r}] must be a 1-D array of finite values "
                       f">= 0; got shape {density_F.shape}.")
    sorted_F = np.sort(density_F)[::-1]
    live = int(np.sum(sorted_F > 0))
    if live == 0:
      raise ValueError(f"densities_by_run[{label!r}] has no positive density to draw on log "
                       "axes (every feature is dead).")
    ranks = np.arange(1, live + 1)
    color = f"C{i % 10}"
    line_label = label
    if label in fits:
      c, s = fits[label]
      c = _finite(f"fits[{label!r}] C", c, 0.0)
      s = _finite(f"fits[{label!r}] s", s)
      if c == 0:
        raise ValueError(f"fits[{label!r}] C must be > 0 to draw on log axes; got 0.")
      full = np.arange(1, density_F.shape[0] + 1)
      # One legend entry per run: the dashed fit shares its colour and names its exponent.
      ax.loglog(full, np.minimum(c * full ** (-s), 1.0), color=color, linestyle="--",
                linewidth=0.8)
      line_label = f"{label} (Zipf s={s:.2f})"
    ax.loglog(ranks, sorted_F[:live], color=color, label=line_label)
  ax.set_xlabel("feature rank")
  ax.set_ylabel("firing density")
  ax.set_title("Feature density by rank (dashed: fitted Zipf law, capped at 1)")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return _save(fig, path)


def plot_l0_histograms(l0_by_run: Mapping[str, np.ndarray],
                       path: str | os.PathLike) -> pathlib.Path:
  """Distribution of the number of active features per token, one line per run.

  Args:
    l0_by_run: label -> token counts per L0 value (index = L0), e.g. ``evaluate_sae``'s
      ``l0_histogram``; drawn as fractions of tokens.
    path: PNG file to write.

  Raises:
    ValueError: on empty input or counts that are not 1-D, negative, non-finite or all 0.
  """
  path = _png_path(path)
  _nonempty("l0_by_run", l0_by_run)
  fig, ax = _figure()
  for label, counts in l0_by_run.items():
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 1 or not np.all(np.isfinite(counts)) or np.any(counts < 0) or not (
        counts.sum() > 0):
      raise ValueError(f"l0_by_run[{label!r}] must be 1-D non-negative token counts per L0 "
                       f"value with a positive total; got shape {counts.shape}.")
    ax.step(np.arange(counts.shape[0]), counts / counts.sum(), where="mid", label=label)
  ax.set_xlabel("active features per token (L0)")
  ax.set_ylabel("fraction of tokens")
  ax.set_title("Per-token L0")
  ax.legend(fontsize="small")
  return _save(fig, path)


def _rows(name: str, rows: Sequence[Mapping[str, Any]], keys: tuple[str, ...]) -> None:
  _nonempty(name, rows)
  for i, row in enumerate(rows):
    missing = [key for key in keys if not isinstance(row, Mapping) or key not in row]
    if missing:
      raise ValueError(f"{name}[{i}] lacks the keys {missing}; each entry needs {list(keys)}.")


def plot_nmse_vs_l0(points: Sequence[Mapping[str, Any]],
                    path: str | os.PathLike) -> pathlib.Path:
  """Reconstruction error against sparsity: one marker per run.

  Colour encodes the allocation strategy, marker shape the auxiliary loss.

  Args:
    points: dicts with ``strategy``, ``aux_loss``, ``l0_mean`` and ``nmse`` (numbers >= 0).
    path: PNG file to write.

  Raises:
    ValueError: on empty input, a missing key, or a negative or non-finite number.
  """
  path = _png_path(path)
  _rows("points", points, ("strategy", "aux_loss", "l0_mean", "nmse"))
  strategies = list(dict.fromkeys(str(p["strategy"]) for p in points))
  auxes = list(dict.fromkeys(str(p["aux_loss"]) for p in points))
  fig, ax = _figure()
  seen = set()
  for i, p in enumerate(points):
    l0 = _finite(f"points[{i}]['l0_mean']", p["l0_mean"], 0.0)
    nmse = _finite(f"points[{i}]['nmse']", p["nmse"], 0.0)
    label = f"{p['strategy']} + {p['aux_loss']}"
    ax.scatter([l0], [nmse], color=f"C{strategies.index(str(p['strategy'])) % 10}",
               marker=_MARKERS[auxes.index(str(p["aux_loss"])) % len(_MARKERS)],
               label=None if label in seen else label)
    seen.add(label)
  ax.set_xlabel("mean L0 (active features per token)")
  ax.set_ylabel("normalised MSE")
  ax.set_title("Reconstruction vs sparsity")
  ax.legend(fontsize="small")
  return _save(fig, path)


def plot_dead_fraction(rows: Sequence[Mapping[str, Any]],
                       path: str | os.PathLike) -> pathlib.Path:
  """Bar chart of dead (and, when given, underutilised) feature fractions per run.

  Args:
    rows: dicts with ``strategy``, ``aux_loss`` and ``dead_fraction`` in [0, 1]; an
      ``underutilised_fraction`` in [0, 1] adds a second bar (in every row or none).
    path: PNG file to write.

  Raises:
    ValueError: on empty input, a missing key, a fraction outside [0, 1], or
      ``underutilised_fraction`` in some rows only.
  """
  path = _png_path(path)
  _rows("rows", rows, ("strategy", "aux_loss", "dead_fraction"))
  has_under = ["underutilised_fraction" in row for row in rows]
  if any(has_under) and not all(has_under):
    raise ValueError("underutilised_fraction must be given in every row or in none; rows "
                     f"{[i for i, h in enumerate(has_under) if not h]} lack it.")
  columns = ["dead_fraction"] + (["underutilised_fraction"] if all(has_under) else [])
  values = np.zeros((len(rows), len(columns)))
  for i, row in enumerate(rows):
    for j, key in enumerate(columns):
      values[i, j] = _finite(f"rows[{i}][{key!r}]", row[key], 0.0)
      if values[i, j] > 1:
        raise ValueError(f"rows[{i}][{key!r}] must lie in [0, 1]; got {values[i, j]}.")
  fig, ax = _figure(max(6.0, 0.8 * len(rows) + 2), 4.0)
  x = np.arange(len(rows))
  width = 0.8 / len(columns)
  for j, key in enumerate(columns):
    ax.bar(x + (j - (len(columns) - 1) / 2) * width, values[:, j], width,
           label=key.replace("_", " "))
  ax.set_xticks(x, [f"{r['strategy']}\n{r['aux_loss']}" for r in rows], fontsize="small")
  ax.set_ylabel("fraction of features")
  ax.set_ylim(0, 1)
  ax.set_title("Dead and underutilised features")
  ax.legend(fontsize="small")
  return _save(fig, path)


def _panels(count: int, width: float, panel_height: float):
  fig = Figure(figsize=(width, panel_height * count + 1.0))
  FigureCanvasAgg(fig)
  return fig, fig.subplots(count, 1, sharex=True, squeeze=False)[:, 0]


def _distinct_names(name: str, values: Any) -> tuple[str, ...]:
  if isinstance(values, str) or not isinstance(values, Sequence) or not values or not all(
      isinstance(v, str) and v for v in values) or len(set(values)) != len(values):
    raise ValueError(f"{name} must be a non-empty sequence of distinct non-empty strings "
                     f"(e.g. ('fvu',)); got {values!r}.")
  return tuple(values)


def plot_fvu_vs_l0_pareto(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                          x: str = "l0_mean", y: str = "fvu", group: str = "strategy",
                          point: str = "k", title: str | None = None) -> pathlib.Path:
  """Reconstruction against sparsity: the frontier of each strategy over its ``k`` values.

  Rows sharing ``(row[group], row[point])`` (e.g. seeds of one strategy at one ``k``) make
  one point at their mean with error bars of one sample standard deviation (``ddof=1``;
  none for a single row) in both ``x`` and ``y``. The points of one ``group`` are joined
  in order of mean ``x`` and labelled with their ``point`` value, plus ``(n=...)`` where a
  point has fewer rows than the figure's largest point. The x axis is log.

  Args:
    rows: dicts with the keys ``x``, ``y``, ``group`` and ``point`` (e.g. evaluation rows
      from several seeds); ``x`` values finite and > 0, ``y`` values finite.
    path: PNG file to write.
    x: key of the x value (e.g. ``l0_mean``).
    y: key of the y value (e.g. ``fvu``, ``explained_variance``).
    group: key naming the line a row belongs to (e.g. ``strategy``).
    point: key naming the point within a line (e.g. ``k``).
    title: figure title (e.g. the source and the rows it shows); by default one that names
      ``x``, ``y`` and the error bars.

  Raises:
    ValueError: on empty input, a missing key, key names that are not distinct strings, a
      ``title`` that is not a non-empty string,
      an ``x`` value <= 0 or non-finite, or a non-finite ``y`` value.
  """
  path = _png_path(path)
  names = (x, y, group, point)
  if not all(isinstance(v, str) and v for v in names) or len(set(names)) != 4:
    raise ValueError(f"x, y, group and point must be four distinct non-empty key names; got "
                     f"{names!r}.")
  if title is not None and not (isinstance(title, str) and title.strip()):
    raise ValueError(f"title must be a non-empty string or None; got {title!r}.")
  _rows("rows", rows, (x, y, group, point))
  cells: dict[str, dict[str, list[tuple[float, float]]]] = {}
  for i, row in enumerate(rows):
    xv = _finite(f"rows[{i}][{x!r}]", row[x], 0.0)
    if xv == 0:
      raise ValueError(f"rows[{i}][{x!r}] must be > 0 to draw on a log axis; got 0.")
    yv = _finite(f"rows[{i}][{y!r}]", row[y])
    cells.setdefault(str(row[group]), {}).setdefault(str(row[point]), []).append((xv, yv))
  most = max(len(values) for points in cells.values() for values in points.values())
  fig, ax = _figure(7.5, 4.5)
  for i, (name, points) in enumerate(cells.items()):
    stats = []
    for label, values in points.items():
      v = np.asarray(values)
      std = v.std(0, ddof=1) if len(v) > 1 else np.zeros(2)
      label = f"{point}={label}" + (f" (n={len(v)})" if len(v) < most else "")
      stats.append((*v.mean(0), *std, label))
    stats.sort(key=lambda s: s[0])
    xs, ys, x_err, y_err, labels = zip(*stats)
    color = f"C{i % 10}"
    ax.errorbar(xs, ys, xerr=x_err, yerr=y_err, color=color, marker=_MARKERS[i % len(_MARKERS)],
                capsize=3, linewidth=1.2, markersize=5, label=name)
    for xv, yv, label in zip(xs, ys, labels):
      ax.annotate(label, (xv, yv), textcoords="offset points", xytext=(4, 4),
                  fontsize=6, color=color)
  ax.set_xscale("log")
  # Plain numbers at 1, 2 and 5 per decade: L0 ranges often span less than a decade.
  ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
  ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
  ax.xaxis.set_minor_formatter(NullFormatter())
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  ax.set_title(title or f"{y} vs {x} (mean, error bars: std over rows sharing {group} and "
               f"{point})", fontsize="medium")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return _save(fig, path)


def plot_l0_distributions(l0_histograms_by_run: Mapping[str, np.ndarray],
                          path: str | os.PathLike, *, log_y: bool = False) -> pathlib.Path:
  """Per-token L0 distributions, one small panel per run on a shared L0 axis.

  Each panel has its own y scale, so TopK's single spike and the spread of Mutual or
  Feature Choice are both readable; a dashed line marks the run's mean L0.

  Args:
    l0_histograms_by_run: label -> token counts per L0 value (index = L0), e.g.
      ``evaluate_sae``'s ``l0_histogram``; drawn as fractions of tokens.
    path: PNG file to write.
    log_y: draw the fractions on a log axis (empty L0 values then vanish).

  Raises:
    ValueError: on empty input or counts that are not 1-D, negative, non-finite or all 0.
  """
  path = _png_path(path)
  _nonempty("l0_histograms_by_run", l0_histograms_by_run)
  histograms = {}
  for label, counts in l0_histograms_by_run.items():
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 1 or not np.all(np.isfinite(counts)) or np.any(counts < 0) or not (
        counts.sum() > 0):
      raise ValueError(f"l0_histograms_by_run[{label!r}] must be 1-D non-negative token "
                       f"counts per L0 value with a positive total; got shape {counts.shape}.")
    histograms[label] = counts / counts.sum()
  fig, axes = _panels(len(histograms), 7.0, 1.4)
  for i, (ax, (label, fraction)) in enumerate(zip(axes, histograms.items())):
    l0 = np.arange(fraction.shape[0])
    mean = float(np.dot(l0, fraction))
    ax.bar(l0, fraction, width=1.0, color=f"C{i % 10}", linewidth=0)
    ax.axvline(mean, color="black", linestyle="--", linewidth=0.8)
    ax.set_title(f"{label} (mean L0 {mean:.3g})", fontsize="small", loc="left")
    ax.set_ylabel("fraction", fontsize="small")
    if log_y:
      ax.set_yscale("log")
  axes[-1].set_xlabel("active features per token (L0)")
  return _save(fig, path)


def plot_training_curves(curves_by_run: Mapping[str, Sequence[Mapping[str, Any]]],
                         path: str | os.PathLike, *,
                         keys: Sequence[str] = ("fvu", "dead_fraction")) -> pathlib.Path:
  """Training curves: one panel per metric, one line per run, against tokens seen.

  Args:
    curves_by_run: run name -> list of dicts, each with ``tokens`` (finite, >= 0) and
      any of ``keys``; an entry without a key (or with None) is skipped in that key's
      panel, so metrics logged at different intervals can share the list. Points are
      joined in order of ``tokens``.
    path: PNG file to write.
    keys: names of the metrics, one panel each, in this order.

  Raises:
    ValueError: on empty input, a run that is not a non-empty list of dicts with
      ``tokens``, bad ``keys``, a non-finite value, or a key no run has a value for.
  """
  path = _png_path(path)
  keys = _distinct_names("keys", keys)
  _nonempty("curves_by_run", curves_by_run)
  if not isinstance(curves_by_run, Mapping):
    raise ValueError("curves_by_run must map run names to lists of dicts; got "
                     f"{type(curves_by_run).__name__}.")
  lines: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {key: {} for key in keys}
  for run, entries in curves_by_run.items():
    if isinstance(entries, (str, Mapping)) or not isinstance(entries, Sequence):
      raise ValueError(f"curves_by_run[{run!r}] must be a list of dicts; got "
                       f"{type(entries).__name__}.")
    _rows(f"curves_by_run[{run!r}]", entries, ("tokens",))
    tokens = [_finite(f"curves_by_run[{run!r}][{i}]['tokens']", e["tokens"], 0.0)
              for i, e in enumerate(entries)]
    for key in keys:
      points = [(t, _finite(f"curves_by_run[{run!r}][{i}][{key!r}]", e[key]))
                for i, (t, e) in enumerate(zip(tokens, entries)) if e.get(key) is not None]
      if points:
        points.sort(key=lambda p: p[0])
        lines[key][run] = tuple(np.asarray(v) for v in zip(*points))
  missing = [key for key in keys if not lines[key]]
  if missing:
    raise ValueError(f"no run has a value for keys {missing}; drop them from keys or log "
                     "them in curves_by_run.")
  fig, axes = _panels(len(keys), 7.5, 2.2)
  colors = {run: f"C{i % 10}" for i, run in enumerate(curves_by_run)}
  for ax, key in zip(axes, keys):
    for run, (t, v) in lines[key].items():
      ax.plot(t, v, color=colors[run], marker="." if len(t) < 30 else None, label=run)
    ax.set_ylabel(key)
  axes[0].set_title("Training curves")
  drawn = [run for run in curves_by_run if any(run in lines[key] for key in keys)]
  axes[0].legend(handles=[Line2D([], [], color=colors[run], label=run) for run in drawn],
                 fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  axes[-1].set_xlabel("tokens")
  return _save(fig, path)

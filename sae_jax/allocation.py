"""Allocation strategies: which (token, feature) pairs of a score matrix stay active.

An SAE encoder yields a score matrix ``scores[b, f]`` for a batch of b tokens and f
features. Under a total budget of ``k * b`` active pairs the strategies differ only in
the constraints they add (Ayonrinde 2024):

* :func:`topk`: every token (row) keeps its k best features.
* :func:`feature_choice`: every feature (column) keeps its best ``capacity[f]`` tokens.
* :func:`mutual_choice` (= :func:`batch_topk`): the ``round(k * b)`` best entries of the
  whole matrix, with no per-row or per-column cap.
* :func:`threshold`: the batch-independent inference path, ``scores > theta``.

Every function returns a boolean mask shaped like ``scores``. Selections are exact: the
number of kept entries is exactly the budget, and ties go to the lower index
(row-major flat index for Mutual Choice, row index for Feature Choice, column index for
TopK). Scores are ordered by the IEEE total order, as ``lax.top_k`` does: -0.0 ranks just
below +0.0. Budgets that fix shapes (``k``, capacities) are static Python values.

Performance notes (XLA:CPU): a flat ``lax.top_k`` over ``b * f`` entries costs several
times a per-row top-k, and full sorts of ``b * f`` are unusable. Mutual Choice therefore
selects per-row candidates first and runs the global selection over the candidates only,
which is exact whenever no row needs more than its candidates; that is checked on every
call, with an exact fallback.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

__all__ = [
    "topk",
    "mutual_choice",
    "batch_topk",
    "feature_choice",
    "feature_choice_ranked",
    "zipf_capacities",
    "threshold",
    "mutual_choice_budget",
]

# Default number of per-row candidates Mutual Choice keeps, as a multiple of k. A row
# that would need more than this many entries triggers the exact flat fallback.
DEFAULT_CANDIDATE_FACTOR = 4


def _check_scores(scores: Array) -> None:
  if not hasattr(scores, "ndim") or scores.ndim != 2:
    shape = getattr(scores, "shape", None)
    raise ValueError(
        f"scores must be a 2-D [tokens, features] array; got shape {shape}. "
        "Reshape leading dimensions into the token axis first.")
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    raise ValueError(
        f"scores must have a floating dtype (float32, bfloat16, ...); got {scores.dtype}. "
        "Cast integer scores with .astype(jnp.float32).")


def _static_number(value, name: str) -> float:
  if isinstance(value, (jax.Array, np.ndarray)) and not isinstance(value, np.generic):
    if getattr(value, "ndim", 1) != 0 or isinstance(value, jax.core.Tracer):
      raise ValueError(
          f"{name} must be a static Python number (it fixes output shapes); got an array "
          f"of type {type(value).__name__}. Pass a Python int/float, and mark it static "
          "under jax.jit (static_argnames).")
    value = value.item()
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name} must be a real number; got {value!r}.")
  return value


def _rows_mask(shape: tuple[int, int], rows: Int[Array, "n"], cols: Int[Array, "n"],
               keep: Bool[Array, "n"] | None = None) -> Bool[Array, "b f"]:
  values = True if keep is None else keep
  return jnp.zeros(shape, dtype=bool).at[rows, cols].set(
      values, unique_indices=True, indices_are_sorted=False)


def _rows_topk(scores: Float[Array, "b f"], k: int) -> tuple[Array, Int[Array, "b k"]]:
  """Per-row top-k values and columns, ties to the lower column.

  A single place for the row selection that TopK, the Mutual Choice candidate stage and
  the sparse step share. A grouped variant (rank column groups by their maximum key, then
  select inside the k best groups) is exact, but TopK built on it took 0.67 s against
  0.24 s for plain ``lax.top_k`` on an idle 2-core CPU at B=4096, F=32768, k=32
  (``benchmarks/allocation.py``), so plain ``lax.top_k`` it is.
  """
  return lax.top_k(scores, k)


def topk(scores: Float[Array, "b f"], k: int) -> Bool[Array, "b f"]:
  """Keeps the k highest-scoring features of every token.

  Args:
    scores: ``[b, f]`` floating scores.
    k: static number of features kept per row, ``1 <= k <= f``.

  Returns:
    Boolean mask with exactly ``k`` True entries per row; ties go to the lower column.

  References:
    Makhzani & Frey 2013, "k-Sparse Autoencoders", arXiv 1312.5663; Gao et al. 2024,
    "Scaling and evaluating sparse autoencoders", arXiv 2406.04093.
  """
  _check_scores(scores)
  b, f = scores.shape
  k = _static_number(k, "k")
  if k != int(k) or not 1 <= k <= f:
    raise ValueError(f"k must be an integer in [1, {f}] (the number of features); got {k}.")
  k = int(k)
  _, idx_BxK = _rows_topk(scores, k)
  rows_BxK = jnp.broadcast_to(jnp.arange(b, dtype=idx_BxK.dtype)[:, None], idx_BxK.shape)
  return _rows_mask((b, f), rows_BxK.reshape(-1), idx_BxK.reshape(-1))


def mutual_choice_budget(num_tokens: int, k: float) -> int:
  """The number of entries Mutual Choice keeps for ``num_tokens`` rows: ``round(k * b)``."""
  return int(round(k * num_tokens))


def _sortable_key(values: Float[Array, "..."]) -> Array:
  """Order-preserving map from floats to uint32 (larger float -> larger key)."""
  bits = lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)
  sign = bits >> 31
  return jnp.where(sign == 1, ~bits, bits | jnp.uint32(0x80000000))


def bisect_uint32(count_at_least, n) -> Array:
  """Largest uint32 t with ``count_at_least(t) >= n``, for a count non-increasing in t.

  32 halvings of the key space; each step calls ``count_at_least`` once (a counting pass,
  or a counting pass plus a ``psum`` when sharded), so nothing is ever sorted.
  """
  def body(_, lo_hi):
    lo, hi = lo_hi
    span = hi - lo  # no overflow: hi >= lo
    mid = lo + span // jnp.uint32(2) + (span & jnp.uint32(1))  # ceil midpoint, <= hi
    ok = count_at_least(mid) >= n
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - jnp.uint32(1))

  lo, _ = lax.fori_loop(0, 32, body, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))
  return lo


def _kth_largest_key(keys: Array, n: int) -> Array:
  """The key of the n-th largest entry of ``keys``."""
  return bisect_uint32(lambda u: jnp.sum(keys >= u, dtype=jnp.int32), n)


def _select_top_n_flat(values: Float[Array, "m"], n: int) -> Bool[Array, "m"]:
  """Exactly the n largest entries of a 1-D array; ties go to the lower index."""
  keys = _sortable_key(values)
  t = _kth_largest_key(keys, n)
  above = keys > t
  n_ties_needed = n - jnp.sum(above, dtype=jnp.int32)
  at = keys == t
  tie_rank = jnp.cumsum(at, dtype=jnp.int32)  # 1-based rank among ties, in index order
  return above | (at & (tie_rank <= n_ties_needed))


def _mutual_choice_flat(scores: Float[Array, "b f"], n: int) -> Bool[Array, "b f"]:
  b, f = scores.shape
  _, idx = lax.top_k(scores.reshape(-1), n)
  return jnp.zeros((b * f,), dtype=bool).at[idx].set(True, unique_indices=True).reshape(b, f)


def mutual_choice(scores: Float[Array, "b f"], k: float, *,
                  max_per_row: int | None = None) -> Bool[Array, "b f"]:
  """Keeps the ``round(k * b)`` highest entries of the whole score matrix.

  Mutual Choice lets tokens and features share the total budget freely: a token may get
  any number of features. It is the same selection as BatchTopK.

  The selection runs in two stages: each row proposes its ``max_per_row`` best entries,
  and the global budget is chosen among the proposals by an exact count-based threshold.
  This equals the flat selection whenever no row has all of its proposals kept; when one
  does, the flat ``lax.top_k`` runs instead (checked on device, every call).

  Args:
    scores: ``[b, f]`` floating scores.
    k: static mean number of active features per token, ``0 < k <= f``; may be
      fractional (the budget is ``round(k * b)``, at least 1).
    max_per_row: static number of per-row candidates; default
      ``min(f, 4 * ceil(k))``. Larger is slower but falls back less often.

  Returns:
    Boolean mask with exactly ``round(k * b)`` True entries; ties go to the lower
    row-major index.

  References:
    Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature Choice
    Sparse Autoencoders", arXiv 2411.02124; Bussmann, Leask & Nanda 2024, "BatchTopK
    Sparse Autoencoders", arXiv 2412.06410.
  """
  _check_scores(scores)
  b, f = scores.shape
  k = _static_number(k, "k")
  if not 0 < k <= f:
    raise ValueError(f"k must be in (0, {f}] (mean features per token, at most the number of "
                     f"features); got {k}.")
  n = mutual_choice_budget(b, k)
  if n < 1:
    raise ValueError(f"k * num_tokens must round to at least 1; got k={k} with {b} tokens.")
  if max_per_row is None:
    cap = min(f, DEFAULT_CANDIDATE_FACTOR * math.ceil(k))
  else:
    cap = _static_number(max_per_row, "max_per_row")
    if cap != int(cap) or not 1 <= cap <= f:
      raise ValueError(f"max_per_row must be an integer in [1, {f}]; got {max_per_row}.")
    cap = int(cap)
  if cap >= f or b * cap <= n:
    return _mutual_choice_flat(scores, n)

  mask, saturated = _mutual_choice_candidates(scores, n, cap)
  return lax.cond(saturated, lambda s: _mutual_choice_flat(s, n), lambda _: mask, scores)


def _mutual_choice_candidates(scores, n: int, cap: int) -> tuple[Array, Array]:
  """The candidate-stage Mutual Choice mask and whether any row was saturated.

  The mask is exact when ``saturated`` is False.
  """
  b, f = scores.shape
  cand_BxC, col_BxC = _rows_topk(scores, cap)
  # Candidates in row-major order, each row's proposals by value then by column: among
  # equal values this is the row-major flat order, so ties resolve as in the flat case.
  keep_BxC = _select_top_n_flat(cand_BxC.reshape(-1), n).reshape(b, cap)
  saturated = jnp.any(jnp.all(keep_BxC, axis=1))
  rows_BxC = jnp.broadcast_to(jnp.arange(b, dtype=col_BxC.dtype)[:, None], col_BxC.shape)
  mask = _rows_mask((b, f), rows_BxC.reshape(-1), col_BxC.reshape(-1), keep_BxC.reshape(-1))
  return mask, saturated


batch_topk = mutual_choice


def _capacity_array(capacity, b: int, f: int, max_capacity) -> tuple[Array | np.ndarray | int, int]:
  """Validates a capacity argument; returns (capacity, static maximum capacity).

  The capacity comes back as an int, a NumPy array (concrete, so tiers can be planned on
  the host) or a traced array.
  """
  if isinstance(capacity, jax.core.Tracer):
    if capacity.shape != (f,) or not jnp.issubdtype(capacity.dtype, jnp.integer):
      raise ValueError(f"capacity must be an int or an integer array of shape ({f},); got "
                       f"{capacity.dtype}{list(capacity.shape)}.")
    if max_capacity is None:
      raise ValueError("capacity is a traced array, so its maximum is unknown at trace time: "
                       "pass max_capacity=<static int upper bound on capacity, <= num tokens>.")
    m = _static_number(max_capacity, "max_capacity")
    if m != int(m) or not 0 <= m <= b:
      raise ValueError(f"max_capacity must be an integer in [0, {b}] (the number of tokens); "
                       f"got {max_capacity}.")
    return capacity, int(m)
  if isinstance(capacity, numbers.Integral) or (
      isinstance(capacity, (np.ndarray, jax.Array)) and np.ndim(capacity) == 0):
    m = int(capacity)
    if not 0 <= m <= b:
      raise ValueError(f"capacity must be in [0, {b}] (the number of tokens); got {m}.")
    return m, m
  cap = np.asarray(capacity)
  if cap.shape != (f,) or not np.issubdtype(cap.dtype, np.integer):
    raise ValueError(f"capacity must be an int or an integer array of shape ({f},); got "
                     f"{cap.dtype}{list(cap.shape)}.")
  if cap.size and (cap.min() < 0 or cap.max() > b):
    raise ValueError(f"every capacity must be in [0, {b}] (the number of tokens); got range "
                     f"[{cap.min()}, {cap.max()}].")
  m = int(cap.max()) if cap.size else 0
  if max_capacity is not None and m > max_capacity:
    raise ValueError(f"max_capacity={max_capacity} is below the largest capacity {m}.")
  return cap, m


def feature_choice(scores: Float[Array, "b f"], capacity: int | Int[Array, "f"], *,
                   max_capacity: int | None = None) -> Bool[Array, "b f"]:
  """Keeps, for every feature, its ``capacity[f]`` highest-scoring tokens.

  Feature Choice is the SAE analogue of Expert-Choice routing: features pick tokens, so
  every feature is used in every batch and the number of features per token varies.

  A concrete capacity array is split statically into tiers of similar capacity: the
  many small-capacity columns share one narrow per-column top-k over all columns, and
  the few wide columns (the head of a Zipf profile) are gathered and selected with their
  own widths, so a Zipf profile costs about as much as a uniform one.

  Args:
    scores: ``[b, f]`` floating scores.
    capacity: a static int (uniform capacity) or an integer array ``[f]`` of per-feature
      capacities, each in ``[0, b]`` (see :func:`zipf_capacities`). A traced array needs
      ``max_capacity``; for a traced assignment of a static profile (capacities permuted
      by feature frequency rank) use :func:`feature_choice_ranked`, which is faster.
    max_capacity: static upper bound on ``capacity`` when it is a traced array.

  Returns:
    Boolean mask whose column f has exactly ``capacity[f]`` True entries; ties go to the
    lower row.

  References:
    Ayonrinde 2024, arXiv 2411.02124; Zhou et al. 2022, "Mixture-of-Experts with Expert
    Choice Routing", arXiv 2202.09368.
  """
  _check_scores(scores)
  b, f = scores.shape
  cap, m = _capacity_array(capacity, b, f, max_capacity)
  if isinstance(cap, int):
    return _columns_topk(scores, None, m, None, jnp.zeros((b, f), bool))
  if not isinstance(cap, np.ndarray):  # traced: only the static bound is known
    return _columns_topk(scores, None, m, cap, jnp.zeros((b, f), bool))
  order = np.lexsort((np.arange(f), -cap))  # features by capacity, descending
  return _feature_choice_tiered(scores, cap[order], jnp.asarray(order, jnp.int32))


def feature_choice_ranked(scores: Float[Array, "b f"], profile, feature_of_rank: Int[Array, "f"]
                          ) -> Bool[Array, "b f"]:
  """Feature Choice with a static capacity profile assigned to features by rank.

  The feature ``feature_of_rank[r]`` gets capacity ``profile[r]``. The profile (e.g.
  :func:`zipf_capacities`) fixes shapes and is static; the assignment (e.g. features
  ordered by their firing-density EMA) is a traced permutation and never recompiles.

  Args:
    scores: ``[b, f]`` floating scores.
    profile: static non-increasing integer capacities ``[f]``, each in ``[0, b]``.
    feature_of_rank: traced int permutation of ``range(f)``.

  Returns:
    Boolean mask; column ``feature_of_rank[r]`` has exactly ``profile[r]`` entries.

  References:
    Ayonrinde 2024, arXiv 2411.02124.
  """
  _check_scores(scores)
  b, f = scores.shape
  prof = np.asarray(profile)
  if prof.shape != (f,) or not np.issubdtype(prof.dtype, np.integer):
    raise ValueError(f"profile must be a static integer array of shape ({f},); got "
                     f"{prof.dtype}{list(prof.shape)}.")
  if f and (prof.min() < 0 or prof.max() > b):
    raise ValueError(f"every profile entry must be in [0, {b}] (the number of tokens); got "
                     f"range [{prof.min()}, {prof.max()}].")
  if np.any(np.diff(prof) > 0):
    raise ValueError("profile must be non-increasing (capacity of rank 0 first); sort it "
                     "descending, e.g. zipf_capacities(...) already is.")
  if jnp.shape(feature_of_rank) != (f,):
    raise ValueError(f"feature_of_rank must have shape ({f},); got "
                     f"{jnp.shape(feature_of_rank)}.")
  return _feature_choice_tiered(scores, prof, jnp.asarray(feature_of_rank, jnp.int32))


def _columns_topk(scores, cols, width, cap_of_col, mask):
  """Sets in ``mask`` the top-``width`` rows of the given columns, limited per column."""
  if width == 0:
    return mask
  if cols is None:  # every column, in natural order: no gather
    cols = jnp.arange(scores.shape[1])
    sub_FxB = scores.T
  else:
    sub_FxB = scores[:, cols].T
  _, row_FxW = lax.top_k(sub_FxB, width)
  col_FxW = jnp.broadcast_to(cols[:, None].astype(row_FxW.dtype), row_FxW.shape)
  if cap_of_col is None:
    return mask.at[row_FxW.reshape(-1), col_FxW.reshape(-1)].set(True, unique_indices=True)
  keep_FxW = jnp.arange(width)[None, :] < cap_of_col[:, None]
  # OR in the kept entries; a dropped entry leaves whatever is already there.
  rows, cols_flat = row_FxW.reshape(-1), col_FxW.reshape(-1)
  return mask.at[rows, cols_flat].max(keep_FxW.reshape(-1), unique_indices=True)


# Columns whose capacity exceeds the shared narrow width are handled in tiers whose
# widths halve; the shared width is the capacity at this quantile of the ranks.
_FC_NARROW_QUANTILE = 0.875


def _feature_choice_tiered(scores, profile: np.ndarray, feature_of_rank: Array):
  b, f = scores.shape
  narrow_rank = min(f - 1, int(_FC_NARROW_QUANTILE * f))
  narrow = int(profile[narrow_rank])
  cap_of_feature = jnp.zeros((f,), jnp.int32).at[feature_of_rank].set(
      jnp.asarray(profile, jnp.int32))
  # Narrow tier over every column; for wide columns its rows are a prefix of their own
  # selection (same order: value, then row), so OR-ing the tiers stays exact.
  mask = _columns_topk(scores, None, narrow, cap_of_feature, jnp.zeros((b, f), bool))
  r = 0
  while r < f and profile[r] > narrow:
    width = int(profile[r])
    end = r
    while end < f and profile[end] > max(narrow, width // 2):
      end += 1
    cols = feature_of_rank[r:end]
    mask = _columns_topk(scores, cols, width, jnp.asarray(profile[r:end], jnp.int32), mask)
    r = end
  return mask


def zipf_capacities(num_features: int, total: int, exponent: float = 1.0, *,
                    max_capacity: int | None = None) -> np.ndarray:
  """Integer per-feature capacities following a Zipf law, summing exactly to ``total``.

  Capacity of the feature at rank r (1-based) is proportional to ``r ** -exponent``;
  ``exponent=0`` gives the uniform split. Rounding is largest-remainder (ties to the lower
  rank), which keeps the result non-increasing. With ``max_capacity`` (e.g. the number
  of tokens in a batch), capacities above the cap are clipped and the excess is
  redistributed over the other features in proportion to their Zipf weights.

  Args:
    num_features: number of features f >= 1.
    total: total budget, e.g. ``k * b``; ``0 <= total <= f * max_capacity``.
    exponent: Zipf exponent s >= 0.
    max_capacity: optional per-feature cap.

  Returns:
    NumPy int32 array ``[num_features]``, non-increasing, summing to ``total``. Assign
    entries to features by frequency rank (entry 0 to the most frequent feature).

  References:
    Ayonrinde 2024, arXiv 2411.02124 (Zipf-distributed Feature Choice capacities).
  """
  if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) \
      or num_features < 1:
    raise ValueError(f"num_features must be an integer >= 1; got {num_features!r}.")
  if isinstance(total, bool) or not isinstance(total, numbers.Integral) or total < 0:
    raise ValueError(f"total must be an integer >= 0; got {total!r}.")
  if not isinstance(exponent, numbers.Real) or not math.isfinite(exponent) or exponent < 0:
    raise ValueError(f"exponent must be a finite number >= 0; got {exponent!r}.")
  cap = max_capacity
  if cap is not None:
    if isinstance(cap, bool) or not isinstance(cap, numbers.Integral) or cap < 0:
      raise ValueError(f"max_capacity must be an integer >= 0; got {cap!r}.")
    if total > num_features * cap:
      raise ValueError(f"total={total} cannot fit in {num_features} features of max_capacity="
                       f"{cap}; raise max_capacity or lower total.")
  weights = np.arange(1, num_features + 1, dtype=np.float64) ** (-float(exponent))
  out = np.zeros(num_features, dtype=np.int64)
  free = np.ones(num_features, dtype=bool)
  remaining = total
  while True:
    ideal = remaining * weights[free] / weights[free].sum()
    if cap is not None and np.any(ideal > cap):
      # Water-filling: the features whose share exceeds the cap are pinned at the cap,
      # then the rest is re-split. Pinned features are always a prefix (weights decrease).
      pinned = np.flatnonzero(free)[ideal > cap]
      out[pinned] = cap
      free[pinned] = False
      remaining -= cap * len(pinned)
      continue
    base = np.floor(ideal).astype(np.int64)
    short = remaining - int(base.sum())
    frac = ideal - base
    order = np.lexsort((np.arange(len(frac)), -frac))  # largest remainder, then lower rank
    base[order[:short]] += 1
    out[free] = base
    break
  return out.astype(np.int32)


def threshold(scores: Float[Array, "b f"], theta: float | Float[Array, "f"]) -> Bool[Array, "b f"]:
  """Keeps the entries above a threshold: batch-independent inference for MC and FC.

  Args:
    scores: ``[b, f]`` floating scores.
    theta: a scalar (one global threshold, as calibrated for Mutual Choice/BatchTopK) or
      an ``[f]`` vector (per-feature thresholds, as calibrated for Feature Choice).

  Returns:
    ``scores > theta``.
  """
  _check_scores(scores)
  f = scores.shape[1]
  theta = jnp.asarray(theta)
  if theta.ndim not in (0, 1) or (theta.ndim == 1 and theta.shape[0] != f):
    raise ValueError(f"theta must be a scalar or a vector of shape ({f},); got shape "
                     f"{theta.shape}.")
  # Compare in float32: a bfloat16 cast of a calibrated threshold could move it.
  return scores.astype(jnp.float32) > theta.astype(jnp.float32)

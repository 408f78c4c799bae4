"""Feature Choice: every feature keeps its best ``capacity[f]`` tokens.

Feature Choice is the SAE analogue of Expert-Choice routing (Ayonrinde 2024): features
pick tokens, so every feature is used in every batch and the number of features per
token varies. Capacities are uniform (``k * b / f`` each) or follow a Zipf law over the
features' frequency ranks (:func:`zipf_capacities`).

The selection is a per-feature top-k over the tokens, i.e. a row top-k of the
*feature-major* score matrix ``[f, b]``. :func:`feature_choice_fb` takes scores in that
layout (an encoder emits it at the cost of its ordinary matmul, ``W_enc^T x^T``) and
returns a feature-major mask; :func:`feature_choice` takes the token-major ``[b, f]``
scores that the rest of the library uses. Both run the grouped exact top-k kernels of
:mod:`sae_jax.allocation.grouped` (by rows and by columns respectively), never a transpose of
the score matrix.

Ties go to the lower token (row of ``[b, f]``), as ``lax.top_k`` over a column would.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from sae_jax.allocation import grouped
from sae_jax.allocation import validation

__all__ = [
    "feature_choice",
    "feature_choice_fb",
    "feature_choice_ranked",
    "zipf_capacities",
]


def capacity_array(capacity, b: int, f: int, max_capacity) -> tuple[Array | np.ndarray | int, int]:
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
    m = validation.static_number(max_capacity, "max_capacity")
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

  Token-major entry point: the per-feature top-k runs down the columns without
  transposing the scores (:func:`sae_jax.allocation.cols_topk`). An encoder that can
  emit ``[f, b]`` scores directly may call :func:`feature_choice_fb` instead.

  A concrete capacity array is split statically into tiers of similar capacity: the
  many small-capacity features share one narrow top-k over all features, and the few
  wide ones (the head of a Zipf profile) are gathered and selected with their own
  widths, so a Zipf profile costs about as much as a uniform one.

  Args:
    scores: ``[b, f]`` floating scores.
    capacity: a static int (uniform capacity) or an integer array ``[f]`` of per-feature
      capacities, each in ``[0, b]`` (see :func:`zipf_capacities`). A traced array needs
      ``max_capacity``; for a traced assignment of a static profile (capacities permuted
      by feature frequency rank) use :func:`feature_choice_ranked`, which is faster.
    max_capacity: static upper bound on ``capacity`` when it is a traced array.

  Returns:
    Boolean ``[b, f]`` mask whose column f has exactly ``capacity[f]`` True entries; ties
    go to the lower row.

  References:
    Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature Choice
    Sparse Autoencoders", arXiv 2411.02124; Zhou et al. 2022, "Mixture-of-Experts with
    Expert Choice Routing", arXiv 2202.09368.
  """
  validation.check_scores(scores)
  b, f = scores.shape
  entries = _select(scores, capacity, max_capacity, feature_major=False)
  return _mask(entries, (b, f), feature_major=False)


def feature_choice_fb(scores_FxB: Float[Array, "f b"], capacity: int | Int[Array, "f"], *,
                      max_capacity: int | None = None) -> Bool[Array, "f b"]:
  """:func:`feature_choice` on feature-major scores, returning a feature-major mask.

  The same selection with no transpose: ``feature_choice_fb(s.T, c) == feature_choice(s,
  c).T``. Use it when the encoder computes ``W_enc^T (x - b_dec)^T + b_enc`` (the same
  matmul cost as the token-major form).

  Args:
    scores_FxB: ``[f, b]`` floating scores (features x tokens).
    capacity: as in :func:`feature_choice`.
    max_capacity: as in :func:`feature_choice`.

  Returns:
    Boolean ``[f, b]`` mask whose row f has exactly ``capacity[f]`` True entries; ties go
    to the lower token.

  References:
    Ayonrinde 2024, arXiv 2411.02124.
  """
  validation.check_scores(scores_FxB, "scores_FxB", "[features, tokens]")
  entries = _select(scores_FxB, capacity, max_capacity, feature_major=True)
  return _mask(entries, scores_FxB.shape, feature_major=True)


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
  validation.check_scores(scores)
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
  entries = _tiered(scores, False, prof, jnp.asarray(feature_of_rank, jnp.int32))
  return _mask(entries, (b, f), feature_major=False)


# An entry list: (features [n_f, w], tokens [n_f, w], keep [n_f, w] or None).
_Entries = list[tuple[Array, Array, Array | None]]


def _select(scores, capacity, max_capacity, feature_major: bool) -> _Entries:
  f, b = scores.shape if feature_major else scores.shape[::-1]
  cap, m = capacity_array(capacity, b, f, max_capacity)
  if isinstance(cap, int):
    return _top_tokens(scores, feature_major, None, m, None)
  if not isinstance(cap, np.ndarray):  # traced: only the static bound is known
    return _top_tokens(scores, feature_major, None, m, cap)
  order = np.lexsort((np.arange(f), -cap))  # features by capacity, descending
  return _tiered(scores, feature_major, cap[order], jnp.asarray(order, jnp.int32))


def _top_tokens(scores, feature_major: bool, feats, width, cap_of_feat) -> _Entries:
  """The top-``width`` tokens of the given features (all when ``feats`` is None).

  Feature-major scores ``[f, b]`` need a row top-k; token-major ``[b, f]`` a column
  top-k, which :func:`sae_jax.allocation.cols_topk` runs without a transpose.
  """
  if width == 0:
    return []
  f = scores.shape[0] if feature_major else scores.shape[1]
  if feats is None:  # every feature, in natural order: no gather
    feats = jnp.arange(f, dtype=jnp.int32)
    sub = scores
  else:
    sub = scores[feats] if feature_major else scores[:, feats]
  select = grouped.rows_topk if feature_major else grouped.cols_topk
  _, tok_FxW = select(sub, width)
  feat_FxW = jnp.broadcast_to(feats[:, None].astype(tok_FxW.dtype), tok_FxW.shape)
  keep = None if cap_of_feat is None else jnp.arange(width)[None, :] < cap_of_feat[:, None]
  return [(feat_FxW, tok_FxW, keep)]


def _mask(entries: _Entries, shape, feature_major: bool) -> Array:
  mask = jnp.zeros(shape, bool)
  for feat, tok, keep in entries:
    idx = (feat.reshape(-1), tok.reshape(-1)) if feature_major else (tok.reshape(-1),
                                                                      feat.reshape(-1))
    if keep is None:
      mask = mask.at[idx].set(True, unique_indices=True)
    else:  # OR in the kept entries; a dropped entry leaves whatever is already there
      mask = mask.at[idx].max(keep.reshape(-1), unique_indices=True)
  return mask


# Features whose capacity exceeds the shared narrow width are handled in tiers whose
# widths halve; the shared width is the capacity at this quantile of the ranks.
_FC_NARROW_QUANTILE = 0.875


def _tiered(scores, feature_major: bool, profile: np.ndarray, feature_of_rank: Array
            ) -> _Entries:
  f = scores.shape[0] if feature_major else scores.shape[1]
  narrow_rank = min(f - 1, int(_FC_NARROW_QUANTILE * f))
  narrow = int(profile[narrow_rank])
  cap_of_feature = jnp.zeros((f,), jnp.int32).at[feature_of_rank].set(
      jnp.asarray(profile, jnp.int32))
  # Narrow tier over every feature; for wide features its tokens are a prefix of their
  # own selection (same order: value, then token), so OR-ing the tiers stays exact.
  entries = _top_tokens(scores, feature_major, None, narrow, cap_of_feature)
  r = 0
  while r < f and profile[r] > narrow:
    width = int(profile[r])
    end = r
    while end < f and profile[end] > max(narrow, width // 2):
      end += 1
    entries += _top_tokens(scores, feature_major, feature_of_rank[r:end], width,
                           jnp.asarray(profile[r:end], jnp.int32))
    r = end
  return entries


def zipf_capacities(num_features: int, total: int, exponent: float = 1.0, *,
                    max_capacity: int | None = None, min_capacity: int = 0) -> np.ndarray:
  """Integer per-feature capacities following a Zipf law, summing exactly to ``total``.

  Capacity of the feature at rank r (1-based) is proportional to ``r ** -exponent``;
  ``exponent=0`` gives the uniform split. Rounding is largest-remainder (ties to the lower
  rank), which keeps the result non-increasing. With ``max_capacity`` (e.g. the number
  of tokens in a batch), capacities above the cap are clipped and the excess is
  redistributed over the other features in proportion to their Zipf weights. With
  ``min_capacity`` the tail is raised to that floor the same way (the features that
  would round below it get the floor; the rest is re-split in Zipf proportion), so that
  no feature is left without capacity, and so dead by construction, when the budget is
  small: at k=8, b=512 and 1536 features, the unfloored 1/r law gives 451 features a
  capacity of 0.

  Args:
    num_features: number of features f >= 1.
    total: total budget, e.g. ``k * b``;
      ``f * min_capacity <= total <= f * max_capacity``.
    exponent: Zipf exponent s >= 0.
    max_capacity: optional per-feature cap.
    min_capacity: per-feature floor, ``0 <= min_capacity`` (``<= max_capacity``).

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
  lo = min_capacity
  if isinstance(lo, bool) or not isinstance(lo, numbers.Integral) or lo < 0:
    raise ValueError(f"min_capacity must be an integer >= 0; got {lo!r}.")
  if cap is not None and lo > cap:
    raise ValueError(f"min_capacity={lo} exceeds max_capacity={cap}; lower min_capacity.")
  if total < num_features * lo:
    raise ValueError(f"total={total} cannot give {num_features} features min_capacity={lo} "
                     f"each; lower min_capacity or raise total.")
  weights = np.arange(1, num_features + 1, dtype=np.float64) ** (-float(exponent))
  # The features that would round under the floor (a suffix, since the split is
  # non-increasing) are pinned at it and the rest is split again, until none does; pinning
  # only lowers the others' shares, so the pinned suffix only grows. A split that already
  # rounds to the floor or above is left exactly as it is.
  floored = num_features
  while True:
    out = np.full(num_features, lo, dtype=np.int64)
    out[:floored] = _capped_split(weights[:floored], total - lo * (num_features - floored),
                                  cap)
    below = np.flatnonzero(out[:floored] < lo)
    if lo == 0 or below.size == 0:
      return out.astype(np.int32)
    floored = int(below[0])


def _capped_split(weights: np.ndarray, total: int, cap: int | None) -> np.ndarray:
  """``total`` split in proportion to ``weights`` (non-increasing), each share at most
  ``cap``, rounded by largest remainder (ties to the lower rank)."""
  out = np.zeros(len(weights), dtype=np.int64)
  free = np.ones(len(weights), dtype=bool)
  remaining = total
  while free.any():
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
  return out



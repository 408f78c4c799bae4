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
times a per-row top-k, and full sorts of ``b * f`` are unusable. The selections run the
grouped kernels of :mod:`sae_jax.allocation.grouped` instead: TopK and Feature Choice a grouped
exact row top-k, Mutual Choice a global threshold search over group maxima followed by
an exact selection among the entries of the chosen groups. Mutual Choice checks on every
call that its candidate groups fit (they do unless a huge number of group maxima tie)
and otherwise falls back to per-row proposals, then to the flat ``lax.top_k``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from sae_jax.allocation import grouped
from sae_jax.allocation import validation

__all__ = [
    "topk",
    "mutual_choice",
    "batch_topk",
    "threshold",
    "mutual_choice_budget",
]

# Default number of per-row candidates Mutual Choice keeps, as a multiple of k. A row
# that would need more than this many entries triggers the exact flat fallback.
DEFAULT_CANDIDATE_FACTOR = 4


def _rows_mask(shape: tuple[int, int], rows: Int[Array, "n"], cols: Int[Array, "n"],
               keep: Bool[Array, "n"] | None = None) -> Bool[Array, "b f"]:
  values = True if keep is None else keep
  return jnp.zeros(shape, dtype=bool).at[rows, cols].set(
      values, unique_indices=True, indices_are_sorted=False)


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
  validation.check_scores(scores)
  b, f = scores.shape
  k = validation.static_number(k, "k")
  if k != int(k) or not 1 <= k <= f:
    raise ValueError(f"k must be an integer in [1, {f}] (the number of features); got {k}.")
  k = int(k)
  _, idx_BxK = grouped.rows_topk(scores, k)
  rows_BxK = jnp.broadcast_to(jnp.arange(b, dtype=idx_BxK.dtype)[:, None], idx_BxK.shape)
  return _rows_mask((b, f), rows_BxK.reshape(-1), idx_BxK.reshape(-1))


def mutual_choice_budget(num_tokens: int, k: float) -> int:
  """The number of entries Mutual Choice keeps for ``num_tokens`` rows: ``round(k * b)``."""
  return int(round(k * num_tokens))


def mutual_choice(scores: Float[Array, "b f"], k: float, *,
                  max_per_row: int | None = None) -> Bool[Array, "b f"]:
  """Keeps the ``round(k * b)`` highest entries of the whole score matrix.

  Mutual Choice lets tokens and features share the total budget freely: a token may get
  any number of features. It is the same selection as BatchTopK.

  The selection ranks groups of adjacent columns by their maximum, finds the threshold
  of the n-th best group by a count-based bisection, and selects exactly among the
  entries of the groups above it (:func:`sae_jax.allocation.grouped.top_n_groups`); no per-row
  cap applies. If more than ``n / 8`` extra groups tie at that threshold the candidates
  do not fit; then each row proposes its ``max_per_row`` best entries and the budget is
  chosen among them, and if some row needs all of its proposals the flat ``lax.top_k``
  runs (both checked on device, every call).

  Args:
    scores: ``[b, f]`` floating scores.
    k: static mean number of active features per token, ``0 < k <= f``; may be
      fractional (the budget is ``round(k * b)``, at least 1).
    max_per_row: static number of per-row proposals of the first fallback; default
      ``min(f, 4 * ceil(k))``.

  Returns:
    Boolean mask with exactly ``round(k * b)`` True entries; ties go to the lower
    row-major index.

  References:
    Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature Choice
    Sparse Autoencoders", arXiv 2411.02124; Bussmann, Leask & Nanda 2024, "BatchTopK
    Sparse Autoencoders", arXiv 2412.06410.
  """
  validation.check_scores(scores)
  b, f = scores.shape
  k = validation.static_number(k, "k")
  if not 0 < k <= f:
    raise ValueError(f"k must be in (0, {f}] (mean features per token, at most the number of "
                     f"features); got {k}.")
  n = mutual_choice_budget(b, k)
  if n < 1:
    raise ValueError(f"k * num_tokens must round to at least 1; got k={k} with {b} tokens.")
  if max_per_row is None:
    cap = min(f, DEFAULT_CANDIDATE_FACTOR * math.ceil(k))
  else:
    cap = validation.static_number(max_per_row, "max_per_row")
    if cap != int(cap) or not 1 <= cap <= f:
      raise ValueError(f"max_per_row must be an integer in [1, {f}]; got {max_per_row}.")
    cap = int(cap)

  g = grouped.group_size_for(f)
  if g is None:
    return _rows_mask((b, f), *_unravel(_mutual_choice_fallback(scores, n, cap), f))
  groups, keep, ok = grouped.top_n_groups(scores, n)
  # The branches return the small group form, so the [b, f] mask is written once.
  groups, keep = lax.cond(
      ok, lambda s: (groups, keep),
      lambda s: grouped.indices_as_groups(_mutual_choice_fallback(s, n, cap), g,
                                           groups.shape[0]), scores)
  return grouped.groups_to_mask(groups, keep, (b, f))


def _unravel(flat_idx, f):
  return flat_idx // f, flat_idx % f


def _mutual_choice_fallback(scores, n: int, cap: int) -> Int[Array, "n"]:
  """Flat indices of the n best entries: per-row proposals, else the flat top-k."""
  b, f = scores.shape
  flat = lambda s: lax.top_k(s.reshape(-1), n)[1].astype(jnp.int32)
  if cap >= f or b * cap <= n:
    return flat(scores)
  idx, saturated = _mutual_choice_candidates(scores, n, cap)
  return lax.cond(saturated, flat, lambda _: idx, scores)


def _mutual_choice_candidates(scores, n: int, cap: int) -> tuple[Array, Array]:
  """Flat indices selected among per-row proposals, and whether a row was saturated.

  The indices are exact when ``saturated`` is False.
  """
  b, f = scores.shape
  cand_BxC, col_BxC = grouped.rows_topk(scores, cap)
  # Candidates in row-major order, each row's proposals by value then by column: among
  # equal values this is the row-major flat order, so ties resolve as in the flat case.
  keep_BxC = grouped.select_top_n_flat(cand_BxC.reshape(-1), n).reshape(b, cap)
  saturated = jnp.any(jnp.all(keep_BxC, axis=1))
  pos = jnp.nonzero(keep_BxC.reshape(-1), size=n, fill_value=0)[0]
  flat_BxC = jnp.arange(b, dtype=jnp.int32)[:, None] * f + col_BxC
  return flat_BxC.reshape(-1)[pos].astype(jnp.int32), saturated


batch_topk = mutual_choice


def threshold(scores: Float[Array, "b f"], theta: float | Float[Array, "f"]) -> Bool[Array, "b f"]:
  """Keeps the entries above a threshold: batch-independent inference for MC and FC.

  Args:
    scores: ``[b, f]`` floating scores.
    theta: a scalar (one global threshold, as calibrated for Mutual Choice/BatchTopK) or
      an ``[f]`` vector (per-feature thresholds, as calibrated for Feature Choice).

  Returns:
    ``scores > theta``.
  """
  validation.check_scores(scores)
  f = scores.shape[1]
  theta = jnp.asarray(theta)
  if theta.ndim not in (0, 1) or (theta.ndim == 1 and theta.shape[0] != f):
    raise ValueError(f"theta must be a scalar or a vector of shape ({f},); got shape "
                     f"{theta.shape}.")
  # Compare in float32: a bfloat16 cast of a calibrated threshold could move it.
  return scores.astype(jnp.float32) > theta.astype(jnp.float32)

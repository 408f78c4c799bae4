"""Exact allocation over a score matrix sharded on a ("data", "model") mesh.

Tokens are split over the "data" axis and features over the "model" axis, so each device
holds a block ``[b / n_data, f / n_model]``. TopK, Mutual Choice and Feature Choice are
*global* selections: the functions here run inside ``jax.shard_map`` and communicate only
small things (candidate lists, counts), never the score matrix, and return the same mask
as the single-device functions of :mod:`sae_jax.allocation`, ties included:

* TopK: each device proposes its local top-k per row; the proposals are all-gathered over
  "model" (k * n_model per row) and the row's top-k is taken among them.
* Feature Choice: each device proposes its local top-m per column; proposals are
  all-gathered over "data" and each column keeps its top-m.
* Mutual Choice: each device proposes per-row candidates; the global k*b-th largest value
  is found by a count-based bisection over the 32-bit order-preserving keys with a
  ``psum`` of counts per step, and ties at the threshold are resolved by a second
  bisection over global flat indices. A row that would need more entries than its
  candidates triggers an exact fallback that uses the whole local block.

Gathered candidates are ordered by device index, which is the global index order, so
ties go to the lower global index exactly as in the unsharded functions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from sae_jax.allocation import feature_choice_ops
from sae_jax.allocation import grouped
from sae_jax.allocation import validation
from sae_jax.allocation import strategies

DATA = "data"
MODEL = "model"
_SPEC = P(DATA, MODEL)


def _axis_sizes(mesh: Mesh) -> tuple[int, int]:
  missing = [a for a in (DATA, MODEL) if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"mesh must have axes ('data', 'model'); missing {missing} in "
                     f"{mesh.axis_names}. Build it with sae_jax.training.sharding.make_mesh.")
  return mesh.shape[DATA], mesh.shape[MODEL]


def _check_divisible(scores, mesh: Mesh) -> tuple[int, int]:
  validation.check_scores(scores)
  n_data, n_model = _axis_sizes(mesh)
  b, f = scores.shape
  if b % n_data or f % n_model:
    raise ValueError(f"scores shape {scores.shape} must divide evenly over the mesh "
                     f"(data={n_data}, model={n_model}); pick a batch size divisible by "
                     f"{n_data} and a dictionary size divisible by {n_model}.")
  return n_data, n_model


# Jitted shard_maps by their static settings. Outside jit, shard_map would run its
# loops (the bisections) op by op: about 100 s instead of 2 for a 64 x 64 Mutual Choice
# on 8 simulated devices. Inside a caller's jit the inner jit is simply inlined.
_PROGRAMS: dict[tuple, object] = {}


def _run(key: tuple, block_fn, mesh: Mesh, in_specs, *args):
  """``shard_map(block_fn)(*args)``, jitted once per ``key`` (every static setting)."""
  key = key + (mesh, tuple((a.shape, str(a.dtype)) for a in args))
  if key not in _PROGRAMS:
    _PROGRAMS[key] = jax.jit(jax.shard_map(block_fn, mesh=mesh, in_specs=in_specs,
                                           out_specs=_SPEC))
  return _PROGRAMS[key](*args)


def _scatter_block(shape, rows, cols, keep):
  return jnp.zeros(shape, bool).at[rows.reshape(-1), cols.reshape(-1)].max(
      keep.reshape(-1), unique_indices=True)


def topk_sharded(scores: Float[Array, "b f"], k: int, mesh: Mesh) -> Bool[Array, "b f"]:
  """:func:`sae_jax.allocation.topk` over scores sharded ``P("data", "model")``."""
  n_data, n_model = _check_divisible(scores, mesh)
  b, f = scores.shape
  k = validation.static_number(k, "k")
  if k != int(k) or not 1 <= k <= f:
    raise ValueError(f"k must be an integer in [1, {f}] (the number of features); got {k}.")
  k = int(k)
  f_loc = f // n_model
  k_loc = min(k, f_loc)

  def block_fn(block):
    col0 = lax.axis_index(MODEL) * f_loc
    vals, cols = lax.top_k(block, k_loc)
    all_vals = lax.all_gather(vals, MODEL, axis=1, tiled=True)       # [b_loc, n_model*k_loc]
    all_cols = lax.all_gather(cols + col0, MODEL, axis=1, tiled=True)
    _, pos = lax.top_k(all_vals, k)
    chosen = jnp.take_along_axis(all_cols, pos, axis=1)              # global columns
    local = chosen - col0
    inside = (local >= 0) & (local < f_loc)
    rows = jnp.broadcast_to(jnp.arange(block.shape[0])[:, None], chosen.shape)
    return _scatter_block(block.shape, rows, jnp.clip(local, 0, f_loc - 1), inside)

  return _run(("topk", k), block_fn, mesh, _SPEC, scores)


def feature_choice_sharded(scores: Float[Array, "b f"], capacity: int | Int[Array, "f"],
                           mesh: Mesh, *, max_capacity: int | None = None
                           ) -> Bool[Array, "b f"]:
  """:func:`sae_jax.allocation.feature_choice` over scores sharded ``P("data", "model")``."""
  n_data, n_model = _check_divisible(scores, mesh)
  b, f = scores.shape
  cap, m = feature_choice_ops.capacity_array(capacity, b, f, max_capacity)
  if m == 0:
    return jnp.zeros((b, f), bool)
  cap_arr = jnp.full((f,), m, jnp.int32) if isinstance(cap, int) else jnp.asarray(cap, jnp.int32)
  b_loc = b // n_data
  m_loc = min(m, b_loc)

  def block_fn(block, cap_loc):
    row0 = lax.axis_index(DATA) * b_loc
    vals, rows = lax.top_k(block.T, m_loc)                           # [f_loc, m_loc]
    all_vals = lax.all_gather(vals, DATA, axis=1, tiled=True)        # [f_loc, n_data*m_loc]
    all_rows = lax.all_gather(rows + row0, DATA, axis=1, tiled=True)
    _, pos = lax.top_k(all_vals, m)
    chosen = jnp.take_along_axis(all_rows, pos, axis=1)              # global rows [f_loc, m]
    keep = jnp.arange(m)[None, :] < cap_loc[:, None]
    local = chosen - row0
    inside = keep & (local >= 0) & (local < b_loc)
    cols = jnp.broadcast_to(jnp.arange(block.shape[1])[:, None], chosen.shape)
    return _scatter_block(block.shape, jnp.clip(local, 0, b_loc - 1), cols, inside)

  return _run(("feature_choice", m), block_fn, mesh, (_SPEC, P(MODEL)), scores,
              jnp.asarray(cap_arr))


def select_global_top_n(keys, flat, n: int, axes) -> Bool[Array, "..."]:
  """Exactly the n largest keys over all devices; ties to the lower global flat index.

  Runs inside ``shard_map``: ``keys`` are order-preserving uint32 keys
  (``grouped.sortable_key``) of this device's candidates, ``flat`` their distinct
  global uint32 indices, ``axes`` the mesh axes the candidates are spread over. Two count
  bisections with a ``psum`` per step; returns this device's kept candidates.
  """
  psum = lambda x: lax.psum(jnp.sum(x, dtype=jnp.int32), axes)
  t = grouped.bisect_uint32(lambda u: psum(keys >= u), n)
  above = keys > t
  need = n - psum(above)
  tied = keys == t
  # Ties at t: the `need` smallest flat indices. Bisect on the complement so the same
  # "largest u with count >= n" search applies: count(~flat >= ~u) = count(flat <= u).
  inv = ~flat
  u_inv = grouped.bisect_uint32(lambda u: psum(tied & (inv >= u)), need)
  take_tied = tied & (inv >= u_inv) & (need > 0)
  return above | take_tied


def mutual_choice_sharded(scores: Float[Array, "b f"], k: float, mesh: Mesh, *,
                          max_per_row: int | None = None) -> Bool[Array, "b f"]:
  """:func:`sae_jax.allocation.mutual_choice` over scores sharded ``P("data", "model")``."""
  n_data, n_model = _check_divisible(scores, mesh)
  b, f = scores.shape
  k = validation.static_number(k, "k")
  if not 0 < k <= f:
    raise ValueError(f"k must be in (0, {f}] (mean features per token, at most the number of "
                     f"features); got {k}.")
  n = strategies.mutual_choice_budget(b, k)
  if n < 1:
    raise ValueError(f"k * num_tokens must round to at least 1; got k={k} with {b} tokens.")
  if b * f >= 2**32:
    raise ValueError(f"scores has {b * f} entries; the sharded Mutual Choice indexes them "
                     "with 32 bits. Use a smaller batch per step.")
  b_loc, f_loc = b // n_data, f // n_model
  cap = max_per_row
  if cap is None:
    cap = strategies.DEFAULT_CANDIDATE_FACTOR * math.ceil(k)
  cap = int(min(cap, f_loc))
  axes = (DATA, MODEL)

  def block_fn(block):
    row0 = (lax.axis_index(DATA) * b_loc).astype(jnp.uint32)
    col0 = (lax.axis_index(MODEL) * f_loc).astype(jnp.uint32)
    rows_loc = jnp.arange(b_loc, dtype=jnp.uint32)[:, None]

    def select(vals, cols_loc):
      keys = grouped.sortable_key(vals)
      flat = (row0 + rows_loc) * jnp.uint32(f) + col0 + cols_loc.astype(jnp.uint32)
      return select_global_top_n(keys, flat, n, axes)

    def full(_):
      cols = jnp.broadcast_to(jnp.arange(f_loc, dtype=jnp.int32)[None, :], block.shape)
      return select(block, cols)

    if cap >= f_loc:
      return full(None)
    vals, cols = lax.top_k(block, cap)
    keep = select(vals, cols)
    saturated = lax.psum(jnp.any(jnp.all(keep, axis=1)).astype(jnp.int32), axes) > 0

    def from_candidates(_):
      rows = jnp.broadcast_to(rows_loc.astype(jnp.int32), cols.shape)
      return _scatter_block(block.shape, rows, cols, keep)

    return lax.cond(saturated, full, from_candidates, None)

  return _run(("mutual_choice", n, cap), block_fn, mesh, _SPEC, scores)

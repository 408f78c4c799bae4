"""Chunked selection of the sparse training step: the kept entries as flat triples.

:func:`select` runs the encoder over chunks of tokens and reduces each chunk at once to
the allocation's candidates (the row top-k for TopK, the per-row proposals of Mutual
Choice, the per-column top tokens for Feature Choice, and the auxiliary top-k), so
peak memory holds one chunk of pre-activations, never the ``[b, f]`` matrix. The
candidates then become a :class:`Selection` of static length whose kept entries equal
the dense path's (ties included). Mutual Choice offers ``4k`` proposals per token;
tokens that claim all of theirs are recomputed (up to one chunk of them) with ``16k``,
and only if one claims all of those too does an exact threshold search over recomputed
chunks run (~34 encoder passes).

:mod:`sae_jax.training.sparse_step` builds the loss, gradients and update on these triples.

References:
  Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093;
  Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature Choice Sparse
  Autoencoders", arXiv 2411.02124.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int

from sae_jax import allocation
from sae_jax import losses
from sae_jax import model
from sae_jax import params as sae_params

FAST_ALLOCATIONS = ("topk", "batch_topk", "mutual_choice", "feature_choice",
                    "feature_choice_zipf")
DEFAULT_CHUNK_TOKENS = 512
# Feature Choice capacities are grouped into tiers of contiguous features whose
# capacities lie within this factor of the tier's largest; every feature of a tier
# offers that largest capacity's worth of entries (the rest marked invalid), so at most
# this fraction of padding enters decoding and the encoder gradient.
TIER_RATIO = 1.25
# Entries per block when the exact Mutual Choice fallback collects a chunk's winners.
EXACT_BLOCK_ENTRIES = 1 << 20


class Selection(NamedTuple):
  """Selected entries as flat triples of static length ``n``.

  Attributes:
    rows: token of each entry ``[n]`` int32.
    cols: feature of each entry ``[n]`` int32.
    pre: pre-activation of each entry ``[n]`` (raw, before any ReLU).
    valid: ``[n]`` bool; False marks padding (Feature Choice columns below the widest
      capacity). Valid ``(rows, cols)`` pairs are distinct.
  """

  rows: Int[Array, "n"]
  cols: Int[Array, "n"]
  pre: Float[Array, "n"]
  valid: Bool[Array, "n"]


def column_order(cols: Int[Array, "n"], num_features: int) -> Int[Array, "n"]:
  """A permutation putting ``cols`` in ascending order within blocks of entries.

  Each entry's column and its position in its block are packed into one uint32 key
  (``bits(num_features - 1)`` bits of column, the rest position), so a keys-only sort
  orders every block by column, ties by position. Blocks hold ``2**(32 - column bits)``
  consecutive entries (131072 at 32768 features). Measured at 1.6M entries, f=32768 on
  2 cores: 0.06 s, against 0.40 s for ``jnp.argsort`` (which sorts key-index pairs).
  """
  n = cols.shape[0]
  col_bits = max(1, (int(num_features) - 1).bit_length())
  if col_bits > 31:
    raise ValueError(f"num_features must be below 2**31; got {num_features}.")
  block = min(1 << (32 - col_bits), n)
  nb = -(-n // block)
  # Padding takes the largest key of the last block, so it sorts after every real entry.
  padded = jnp.pad(cols.astype(jnp.uint32), (0, nb * block - n),
                   constant_values=(1 << col_bits) - 1).reshape(nb, block)
  keys = (padded << (32 - col_bits)) | jnp.arange(block, dtype=jnp.uint32)
  pos = lax.sort(keys, dimension=1) & jnp.uint32((1 << (32 - col_bits)) - 1)
  order = pos.astype(jnp.int32) + (jnp.arange(nb, dtype=jnp.int32) * block)[:, None]
  return order.reshape(-1)[:n]


def by_column(sel: Selection, num_features: int) -> Selection:
  """The same triples, ordered by feature within blocks (:func:`column_order`).

  The passes over a selection gather decoder rows and scatter into the ``[f, d]``
  weight gradients by column. With columns in order they walk the weights front to back
  instead of jumping between random rows, which pays for the sort when the triples are
  many: the auxiliary losses' ``b * k_aux`` entries. Measured at b=4096, k_aux=384,
  f=32768, d=768 (2 cores): gradient scatter 0.65 -> 0.22 s, decoder gathers 0.50 ->
  0.27 s, decode 0.34 -> 0.20 s.
  """
  order = column_order(sel.cols, num_features)
  return Selection(*(a[order] for a in sel))


# Compute and parameter dtypes of the sparse steps. With bfloat16 compute the encoder's
# inputs, weights and scores are bfloat16 (as in model.encode_pre) and the selection is
# exact on those scores; everything after the selection runs in float32.
DTYPES = (jnp.float32, jnp.bfloat16)


def supports(cfg: model.SAEConfig) -> bool:
  """Whether the sparse steps run this configuration (allocation and dtypes)."""
  return (cfg.allocation in FAST_ALLOCATIONS and jnp.dtype(cfg.dtype) in DTYPES
          and jnp.dtype(cfg.param_dtype) in DTYPES)


def check_fast_config(cfg: model.SAEConfig, batch_size: int, chunk_tokens: int) -> int:
  """Validates what the fast step supports; returns the chunk size it will use.

  The chunk is the largest divisor of ``batch_size`` not above ``chunk_tokens``.
  """
  if cfg.allocation not in FAST_ALLOCATIONS:
    raise ValueError(f"cfg.allocation must be one of {FAST_ALLOCATIONS} for the fast step; "
                     f"got {cfg.allocation!r}. Use train.train_step for the others.")
  for name in ("dtype", "param_dtype"):
    if jnp.dtype(getattr(cfg, name)) not in DTYPES:
      raise ValueError(f"cfg.{name} must be float32 or bfloat16 for the sparse step; got "
                       f"{getattr(cfg, name)}. Use train.train_step for other dtypes.")
  if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
    raise ValueError(f"chunk_tokens must be a static int >= 1; got {chunk_tokens!r}.")
  return max(c for c in range(1, min(chunk_tokens, batch_size) + 1) if batch_size % c == 0)


class Tier(NamedTuple):
  """Features ``[start, stop)`` selected with one static width (see :func:`capacity_tiers`).

  Attributes:
    start, stop: the tier's feature range.
    capacity: the largest capacity in the tier: entries kept per feature, padded.
    width: proposals per feature and chunk, ``min(capacity, chunk)``.
  """

  start: int
  stop: int
  capacity: int
  width: int


def capacity_tiers(capacity_F: np.ndarray, chunk: int, ratio: float = TIER_RATIO
                   ) -> list[Tier]:
  """Static tiers of a non-increasing capacity profile (zero capacities get none).

  Uniform capacities (``m`` and ``m + 1``) form a single tier; a Zipf profile over
  32768 features forms a few dozen. Static shapes per tier keep the Feature Choice
  selection exact and cheap: a column top-``width`` per chunk on the tier's features,
  then a top-``capacity`` over each feature's proposals.

  Raises:
    ValueError: if the profile increases anywhere (assign capacities by rank first).
  """
  cap = np.asarray(capacity_F, np.int64)
  if np.any(np.diff(cap) > 0):
    raise ValueError("capacities must be non-increasing over features for the sparse "
                     "Feature Choice step (as model.feature_capacities returns them).")
  tiers, start, f = [], 0, len(cap)
  while start < f and cap[start] > 0:
    top = int(cap[start])
    stop = start + 1
    while stop < f and cap[stop] > 0 and cap[stop] * ratio >= top:
      stop += 1
    tiers.append(Tier(start, stop, top, min(top, chunk)))
    start = stop
  return tiers


def chunk_pre(centred_CxD, W_enc, b_enc):
  """Pre-activations of one chunk of centred inputs, in float32.

  The matmul runs in the inputs' dtype (``cfg.dtype``, see :func:`encoder_inputs`), so
  bfloat16 scores are rounded exactly as ``model.encode_pre`` rounds them; the upcast to
  float32 is exact and keeps their order and ties.
  """
  return (centred_CxD @ W_enc + b_enc).astype(jnp.float32)


def encoder_inputs(params: sae_params.SAEParams, x, cfg: model.SAEConfig):
  """``(x - b_dec, W_enc, b_enc)`` in ``cfg.dtype``, as ``model.encode_pre`` forms them."""
  dt = cfg.dtype
  return x.astype(dt) - params.b_dec.astype(dt), params.W_enc.astype(dt), params.b_enc.astype(dt)


def selection_scores(pre, cfg: model.SAEConfig):
  """The values the allocation ranks: ``relu(pre)`` or ``pre`` (``cfg.select_on``)."""
  return jax.nn.relu(pre) if cfg.select_on == "relu" else pre


def _flat_rows(b: int, k: int) -> Array:
  return jnp.repeat(jnp.arange(b, dtype=jnp.int32), k)


def exact_block_rows(chunk: int, num_features: int) -> int:
  """Rows per block when the exact Mutual Choice search collects a chunk's kept entries.

  The most rows that divide ``chunk`` with at most :data:`EXACT_BLOCK_ENTRIES` entries
  (at least one row), so the index arithmetic of this rarely taken branch (keys, flat
  indices, the compaction's prefix counts) does not add chunk-sized buffers to the
  step's peak memory: XLA sizes a ``lax.cond`` for its largest branch.
  """
  return max(r for r in range(1, chunk + 1)
             if chunk % r == 0 and (r == 1 or r * num_features <= EXACT_BLOCK_ENTRIES))


def _mutual_choice_exact(centred_NxCxD, W_enc, b_enc, n: int, cfg) -> Selection:
  """Exact flat Mutual Choice by a threshold search over recomputed chunks.

  Memory stays at one chunk; the cost is about 34 encoder passes, so it only runs when
  the per-row candidates cannot be shown exact.
  """
  nc, bc, _ = centred_NxCxD.shape
  f = W_enc.shape[1]

  def chunk(c):
    pre = chunk_pre(centred_NxCxD[c], W_enc, b_enc)
    return allocation.sortable_key(selection_scores(pre, cfg)), pre

  def count(pred):
    return lax.fori_loop(0, nc, lambda c, acc: acc + jnp.sum(pred(chunk(c)[0]),
                                                              dtype=jnp.int32), jnp.int32(0))

  t = allocation.bisect_uint32(lambda u: count(lambda key: key >= u), n)
  need = n - count(lambda key: key > t)  # ties at t kept in row-major order

  sub = exact_block_rows(bc, f)
  m = min(n, sub * f)

  def body(c, carry):
    keys, pre = chunk(c)
    keys, pre = keys.reshape(bc // sub, sub * f), pre.reshape(bc // sub, sub * f)

    def block(j, carry):
      ties_before, kept_before, rows, cols, pre_out = carry
      keys_j = keys[j]
      at = keys_j == t
      tie_rank = ties_before + jnp.cumsum(at, dtype=jnp.int32)
      keep = (keys_j > t) | (at & (tie_rank <= need))
      pos = jnp.nonzero(keep, size=m, fill_value=0)[0].astype(jnp.int32)
      count_j = jnp.sum(keep, dtype=jnp.int32)
      slot = jnp.where(jnp.arange(m) < count_j, kept_before + jnp.arange(m), n)
      rows = rows.at[slot].set(c * bc + j * sub + pos // f, mode="drop")
      cols = cols.at[slot].set(pos % f, mode="drop")
      pre_out = pre_out.at[slot].set(pre[j][pos], mode="drop")
      return (ties_before + jnp.sum(at, dtype=jnp.int32), kept_before + count_j, rows, cols,
              pre_out)

    return lax.fori_loop(0, bc // sub, block, carry)

  init = (jnp.int32(0), jnp.int32(0), jnp.zeros((n,), jnp.int32), jnp.zeros((n,), jnp.int32),
          jnp.zeros((n,), jnp.float32))
  _, _, rows, cols, pre = lax.fori_loop(0, nc, body, init)
  return Selection(rows, cols, pre, jnp.ones((n,), bool))


def select(params: sae_params.SAEParams, x: Float[Array, "b d"], cfg: model.SAEConfig, *,
           chunk_tokens: int = DEFAULT_CHUNK_TOKENS, aux_candidates: Bool[Array, "f"] | None = None,
           aux_weights: Float[Array, "f"] | None = None, k_aux: int = 0
           ) -> tuple[Selection, Selection | None]:
  """The allocation's selection (and the auxiliary top-k) as triples, chunk by chunk.

  The kept entries equal ``model.allocate(model.encode_pre(params, x, cfg), cfg)``
  (ties to the lower column for TopK, row-major index for Mutual Choice, row for Feature
  Choice). With ``aux_candidates`` it also returns each token's top-``k_aux`` entries of
  ``where(aux_candidates, pre * aux_weights, -inf)``, ties to the lower column, as
  ``lax.top_k`` over the full matrix would.

  Args:
    params: SAE parameters (no gradient flows through the selection).
    x: inputs ``[b, d]``.
    cfg: configuration with an allocation in ``FAST_ALLOCATIONS``.
    chunk_tokens: static maximum number of tokens per encoder chunk.
    aux_candidates: optional bool ``[f]`` candidate features of the auxiliary loss.
    aux_weights: optional ``[f]`` weights of the auxiliary scores.
    k_aux: static auxiliary top-k, in ``[1, f]`` when ``aux_candidates`` is given.

  Returns:
    ``(selection, aux_selection or None)``.

  Raises:
    ValueError: on an unsupported configuration, bad shapes or a bad ``k_aux``.
  """
  params = jax.lax.stop_gradient(params)
  pre_shape_check = jax.eval_shape(lambda p, v: model.encode_pre(p, v, cfg), params, x)
  b, f = pre_shape_check.shape
  bc = check_fast_config(cfg, b, chunk_tokens)
  nc = b // bc
  use_aux = aux_candidates is not None
  if use_aux and not (isinstance(k_aux, int) and 1 <= k_aux <= f):
    raise ValueError(f"k_aux must be a static int in [1, {f}] with aux_candidates; got "
                     f"{k_aux!r}.")
  centred_BxD, W_enc, b_enc = encoder_inputs(params, x, cfg)
  centred_NxCxD = centred_BxD.reshape(nc, bc, -1)
  fc = cfg.allocation in model.FEATURE_CHOICE
  n = allocation.mutual_choice_budget(b, cfg.k)
  if cfg.allocation == "topk":
    width = int(cfg.k)
  elif fc:
    capacity_F = model.feature_capacities(cfg, b)
    tiers = capacity_tiers(capacity_F, bc)
  else:
    width = min(f, allocation.DEFAULT_CANDIDATE_FACTOR * math.ceil(cfg.k))

  def per_chunk(args):
    c, centred_CxD = args
    out = {}
    pre_CxF = chunk_pre(centred_CxD, W_enc, b_enc)
    scores_CxF = selection_scores(pre_CxF, cfg)
    if fc:  # per-feature top tokens: a column top-k, run without transposing the chunk
      out["main"] = []
      for t in tiers:
        vals_FxW, local_FxW = allocation.cols_topk(scores_CxF[:, t.start:t.stop], t.width)
        feats_FxW = jnp.arange(t.start, t.stop, dtype=local_FxW.dtype)[:, None]
        out["main"].append((vals_FxW, local_FxW + c * bc, pre_CxF[local_FxW, feats_FxW]))
    else:
      vals_CxW, cols_CxW = allocation.rows_topk(scores_CxF, width)
      out["main"] = (vals_CxW, cols_CxW, jnp.take_along_axis(pre_CxF, cols_CxW, axis=1))
    if use_aux:
      aux_scores_CxF = losses.aux_scores(pre_CxF, aux_candidates, aux_weights)
      _, aux_cols = allocation.rows_topk(aux_scores_CxF, k_aux)
      out["aux"] = (aux_cols, jnp.take_along_axis(pre_CxF, aux_cols, axis=1))
    return out

  outs = lax.map(per_chunk, (jnp.arange(nc, dtype=jnp.int32), centred_NxCxD))
  if not fc:
    vals, idx, pre = outs["main"]
  if cfg.allocation == "topk":
    main = Selection(_flat_rows(b, width), idx.reshape(-1), pre.reshape(-1),
                     jnp.ones((b * width,), bool))
  elif fc:
    main = _concat([_feature_choice_tier(t, outs["main"][i], capacity_F, nc)
                    for i, t in enumerate(tiers)])
  else:
    main = _mutual_choice_select(vals.reshape(b, width), idx.reshape(b, width),
                                 pre.reshape(b, width), n, centred_NxCxD, W_enc, b_enc, cfg)
  aux = None
  if use_aux:
    aux_cols, aux_pre = outs["aux"]
    aux = Selection(_flat_rows(b, k_aux), aux_cols.reshape(-1), aux_pre.reshape(-1),
                    jnp.ones((b * k_aux,), bool))
  return main, aux


def _feature_choice_tier(t: Tier, proposals, capacity_F: np.ndarray, nc: int) -> Selection:
  """The kept entries of one tier from its per-chunk proposals ``[nc, features, width]``."""
  vals, idx, pre = proposals
  nf = t.stop - t.start
  # Chunks in row order, each column's proposals by value then row: lax.top_k's
  # lower-position tie rule then picks the lower row, as the dense path does.
  cand_vals = jnp.moveaxis(vals, 0, 1).reshape(nf, nc * t.width)
  cand_rows = jnp.moveaxis(idx, 0, 1).reshape(nf, nc * t.width)
  cand_pre = jnp.moveaxis(pre, 0, 1).reshape(nf, nc * t.width)
  _, pos_FxM = lax.top_k(cand_vals, t.capacity)
  rows_FxM = jnp.take_along_axis(cand_rows, pos_FxM, axis=1)
  valid_FxM = np.arange(t.capacity)[None, :] < capacity_F[t.start:t.stop, None]
  return Selection(rows_FxM.reshape(-1).astype(jnp.int32),
                   jnp.repeat(jnp.arange(t.start, t.stop, dtype=jnp.int32), t.capacity),
                   jnp.take_along_axis(cand_pre, pos_FxM, axis=1).reshape(-1),
                   jnp.asarray(valid_FxM.reshape(-1)))


def _concat(parts: list[Selection]) -> Selection:
  if len(parts) == 1:
    return parts[0]
  return Selection(*(jnp.concatenate(field) for field in zip(*parts)))


# When a few rows claim all of their per-row proposals (a token that takes more than
# 4k of the Mutual Choice budget), those rows' pre-activations are recomputed, up to one
# chunk of rows at once, and offered with this many times more proposals before the
# exact (but ~34 encoder passes) search is used.
EXPAND_FACTOR = 4


def _mutual_choice_select(vals_BxC, cols_BxC, pre_BxC, n, centred_NxCxD, W_enc, b_enc,
                          cfg) -> Selection:
  b, cap = vals_BxC.shape
  _, bc, d = centred_NxCxD.shape
  f = W_enc.shape[1]
  exact = lambda: _mutual_choice_exact(centred_NxCxD, W_enc, b_enc, n, cfg)
  if cap >= f or b * cap <= n:
    return exact()
  # Rows in order, each row's proposals by value then column: among equal values this
  # is the row-major order, so the flat tie rule carries over.
  keep = allocation.select_top_n_flat(vals_BxC.reshape(-1), n)
  saturated_B = jnp.all(keep.reshape(b, cap), axis=1)
  n_saturated = jnp.sum(saturated_B, dtype=jnp.int32)
  pos = jnp.nonzero(keep, size=n, fill_value=0)[0].astype(jnp.int32)
  fast = Selection(pos // cap, cols_BxC.reshape(-1)[pos].astype(jnp.int32),
                   pre_BxC.reshape(-1)[pos], jnp.ones((n,), bool))
  wide = min(f, EXPAND_FACTOR * cap)

  def expand():
    return _mutual_choice_expand(vals_BxC, cols_BxC, pre_BxC, saturated_B, n,
                                 centred_NxCxD.reshape(b, d), W_enc, b_enc, cfg, bc, wide)

  no_widening = lambda: (fast, jnp.bool_(True))  # the exact search decides

  def second_stage():
    if wide <= cap:  # the rows cannot be widened (4 * cap >= f is excluded above)
      return no_widening()
    return lax.cond(n_saturated <= bc, expand, no_widening)

  sel, need_exact = lax.cond(n_saturated == 0, lambda: (fast, jnp.bool_(False)), second_stage)
  return lax.cond(need_exact, exact, lambda: sel)


def _mutual_choice_expand(vals_BxC, cols_BxC, pre_BxC, saturated_B, n, centred_BxD, W_enc,
                          b_enc, cfg, rows: int, wide: int) -> tuple[Selection, Array]:
  """Mutual Choice with the saturated rows' proposals widened to ``wide``.

  Up to ``rows`` saturated rows are recomputed as one chunk-shaped encoder matmul (the
  same shape as the chunks, so their values are bitwise those of the first pass) and
  give ``wide`` proposals each; the other rows keep theirs. The n best of the union are
  exact when no recomputed row is saturated again: a row that was not saturated kept
  fewer than all of its proposals, and widening other rows only raises the threshold.
  Ties at the threshold are cut in row-major order from per-row tie counts. Returns
  ``(selection, still_saturated)``.
  """
  b, cap = vals_BxC.shape
  idx_S = jnp.nonzero(saturated_B, size=rows, fill_value=0)[0].astype(jnp.int32)
  valid_S = jnp.arange(rows) < jnp.sum(saturated_B, dtype=jnp.int32)
  pre_SxF = chunk_pre(centred_BxD[idx_S], W_enc, b_enc)
  vals_SxW, cols_SxW = allocation.rows_topk(selection_scores(pre_SxF, cfg), wide)
  pre_SxW = jnp.take_along_axis(pre_SxF, cols_SxW, axis=1)
  # Candidates as order-preserving keys; key 0 (below every score's key) marks the
  # saturated rows' old proposals and the padding rows, which are never selected.
  key1 = jnp.where(saturated_B[:, None], jnp.uint32(0), allocation.sortable_key(vals_BxC))
  key2 = jnp.where(valid_S[:, None], allocation.sortable_key(vals_SxW), jnp.uint32(0))
  t = allocation.bisect_uint32(
      lambda u: allocation.count_at_least(key1, u) + allocation.count_at_least(key2, u), n)
  above1, above2 = key1 > t, key2 > t
  need = n - jnp.sum(above1, dtype=jnp.int32) - jnp.sum(above2, dtype=jnp.int32)
  at1, at2 = key1 == t, key2 == t
  # Every row's candidates are in value-then-column order, so within a row the ties come
  # in column order; across rows they are ranked by the counts of the rows before.
  ties_B = (jnp.sum(at1, axis=1, dtype=jnp.int32)
            + jnp.zeros((b,), jnp.int32).at[idx_S].add(
                jnp.where(valid_S, jnp.sum(at2, axis=1, dtype=jnp.int32), 0)))
  before_B = jnp.cumsum(ties_B) - ties_B
  keep1 = above1 | (at1 & (before_B[:, None] + jnp.cumsum(at1, axis=1, dtype=jnp.int32)
                           <= need))
  keep2 = valid_S[:, None] & (above2 | (at2 & (
      before_B[idx_S][:, None] + jnp.cumsum(at2, axis=1, dtype=jnp.int32) <= need)))
  still_saturated = jnp.any(valid_S & jnp.all(keep2, axis=1))
  count1 = jnp.sum(keep1, dtype=jnp.int32)
  pos1 = jnp.nonzero(keep1.reshape(-1), size=n, fill_value=0)[0].astype(jnp.int32)
  pos2 = jnp.nonzero(keep2.reshape(-1), size=n, fill_value=0)[0].astype(jnp.int32)
  slot = jnp.arange(n, dtype=jnp.int32)
  first = slot < count1
  p2 = pos2[jnp.maximum(slot - count1, 0)]
  sel = Selection(
      rows=jnp.where(first, pos1 // cap, idx_S[p2 // wide]),
      cols=jnp.where(first, cols_BxC.reshape(-1)[pos1], cols_SxW.reshape(-1)[p2]
                     ).astype(jnp.int32),
      pre=jnp.where(first, pre_BxC.reshape(-1)[pos1], pre_SxW.reshape(-1)[p2]),
      valid=jnp.ones((n,), bool))
  return sel, still_saturated

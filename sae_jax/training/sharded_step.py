"""The sparse SAE training step on a ("data", "model") mesh of any shape.

:func:`sharded_sparse_step` computes the update of the dense reference
:func:`sae_jax.training.dense_step.train_step` (same selection, same parameters up to
float32 rounding) with the work of :func:`sae_jax.training.sparse_step.fast_train_step`
spread over devices: tokens over "data", the dictionary over "model". It runs inside
``jax.shard_map``; each device holds ``[b / n_data, d]`` tokens, the encoder columns,
decoder rows, Adam moments, usage statistics and thresholds of ``f / n_model`` features, and
a replicated ``b_dec``. Nothing of size ``[b, f]`` is communicated:

1. Selection, exact across shards (ties as in :mod:`sae_jax.allocation`). Each device
   runs its encoder over chunks of its tokens and keeps per-chunk proposals, as the
   one-device step does; then
   * TopK (and the auxiliary top-``k_aux``): each token's local top-k proposals are
     all-gathered over "model" and the token's top-k taken among them;
   * Mutual Choice: the ``round(k * b)`` largest of all devices' per-token proposals by a
     count bisection with a ``psum`` per step
     (:func:`sae_jax.allocation.select_global_top_n`); when a token might need
     more entries than it proposed on some device, the same searches run over every
     device's recomputed chunks (exact; memory one chunk, about 66 encoder passes);
   * Feature Choice (uniform or Zipf capacities): each feature's per-chunk top tokens
     are all-gathered over "data" and the feature keeps its top ``capacity``. Zipf
     capacities differ between the model shards, so each shard's static capacity tiers
     (:func:`sae_jax.training.selection.capacity_tiers`) form one branch of a ``lax.switch``
     on the shard index, padded to a common length.
   The result on each device is a flat list of ``(token, feature, pre-activation)``
   triples of its own block (others marked invalid).
2. Loss and gradients. The reconstruction is the ``psum`` over "model" of each device's
   sparse decode; each device differentiates a local surrogate whose gradient with
   respect to its own triples and decoder rows is its share of the global gradient
   (the other shards' part of the reconstruction enters as a constant). Weight
   gradients are scattered locally into the device's own features and reduced over
   "data"; the loss value, usage counts and thresholds are reduced with ``psum`` /
   ``pmin``. The formulas are those of :mod:`sae_jax.training.objective`.
3. The in-place Adam update of :mod:`sae_jax.training.adam` on each shard, clipped by the
   global gradient norm.

Auxiliary losses (aux_k, aux_zipf) take their candidates from the gathered usage
statistics (the Zipf fit ranks every feature) and are skipped on steps without a
candidate; with at most ``k_aux // 8`` candidates each token takes its top ``k_aux // 8``
(the same codes, :func:`sae_jax.training.objective.aux_k_tiers`). Their entries are
decoded as triples.

Dtypes (this step and :mod:`sae_jax.training.sparse_step` alike): ``cfg.param_dtype`` float32 or
bfloat16 for the parameters as stored; Adam's moments always float32. ``cfg.dtype``
float32 or bfloat16 for the encoder: ``x - b_dec``, ``W_enc``, ``b_enc`` and the
pre-activations (the scores) are in ``cfg.dtype``, rounded as ``model.encode_pre`` rounds
them, and the selection is exact on those scores. Everything after the selection is
float32: the selected pre-activations (an exact upcast), codes, decode and
reconstruction, losses, every gradient and its reduction over devices, the gradient
norm, the Adam update (rounded to ``param_dtype`` when stored), usage and threshold
statistics.

Supported: every allocation of :data:`sae_jax.training.selection.FAST_ALLOCATIONS`, float32 or
bfloat16, ``b`` divisible by the data axis and ``f`` by the model axis. The ReLU+L1 baseline keeps
every positive entry, a number that depends on the data, so it has no static sparse
form and trains with the dense step.

References:
  Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093;
  Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature Choice Sparse
  Autoencoders", arXiv 2411.02124.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from sae_jax import allocation
from sae_jax import losses
from sae_jax import metrics
from sae_jax import model
from sae_jax import params as sae_params
from sae_jax.training import adam
from sae_jax.training import objective
from sae_jax.training import selection
from sae_jax.training import sparse_kernels
from sae_jax.training import sparse_step
from sae_jax.training import train_state
from sae_jax.training.selection import Selection

DATA = "data"
MODEL = "model"
BOTH = (DATA, MODEL)


def check_config(cfg: model.SAEConfig, mesh: Mesh, batch_size: int,
                 chunk_tokens: int) -> int:
  """Validates a configuration for the sharded sparse step; returns the chunk size.

  Raises:
    ValueError: unsupported allocation or dtype, a mesh without ("data", "model"), or a
      batch / dictionary that does not divide over the mesh.
  """
  missing = [a for a in BOTH if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"mesh must have axes ('data', 'model'); missing {missing} in "
                     f"{mesh.axis_names}. Build it with sae_jax.training.sharding.make_mesh.")
  n_data, n_model = mesh.shape[DATA], mesh.shape[MODEL]
  if batch_size % n_data:
    raise ValueError(f"batch size {batch_size} must be divisible by the data axis size "
                     f"{n_data}; pick a multiple of {n_data}.")
  if cfg.d_sae % n_model:
    raise ValueError(f"d_sae={cfg.d_sae} must be divisible by the model axis size {n_model}.")
  if cfg.allocation in ("batch_topk", "mutual_choice") and batch_size * cfg.d_sae >= 2**32:
    raise ValueError(f"batch x d_sae = {batch_size * cfg.d_sae} entries; the sharded Mutual "
                     "Choice indexes them with 32 bits. Use a smaller batch per step.")
  return selection.check_fast_config(cfg, batch_size // n_data, chunk_tokens)


def _row_top(vals, cols, pre, k: int, col0, f_loc: int, n_model: int) -> Selection:
  """Each token's top-k of the gathered local proposals; the entries of this shard valid."""
  b_loc = vals.shape[0]
  cols = cols.astype(jnp.int32)
  if n_model > 1:
    gather = lambda a: lax.all_gather(a, MODEL, axis=1, tiled=True)  # [b_loc, n_model * w]
    vals, cols, pre = gather(vals), gather(cols + col0), gather(pre)
    _, pos = lax.top_k(vals, k)  # gathered in device order = column order: ties -> lower
    cols = jnp.take_along_axis(cols, pos, axis=1) - col0
    pre = jnp.take_along_axis(pre, pos, axis=1)
  mine = (cols >= 0) & (cols < f_loc)
  return Selection(jnp.repeat(jnp.arange(b_loc, dtype=jnp.int32), k),
                   jnp.clip(cols, 0, f_loc - 1).reshape(-1).astype(jnp.int32),
                   pre.reshape(-1), mine.reshape(-1))


def _compact(keep, rows, cols, pre, size: int) -> Selection:
  """The kept entries of ``[r, c]`` candidate arrays as ``size`` triples (rest invalid)."""
  flat = keep.reshape(-1)
  pos = jnp.nonzero(flat, size=size, fill_value=0)[0]
  valid = jnp.arange(size) < jnp.sum(flat, dtype=jnp.int32)
  return Selection(rows.reshape(-1)[pos].astype(jnp.int32), cols.reshape(-1)[pos].astype(jnp.int32),
                   pre.reshape(-1)[pos], valid)


class _Layout:
  """Static shapes of one device's selection (the same program runs on every device)."""

  def __init__(self, cfg: model.SAEConfig, b: int, n_data: int, n_model: int, chunk: int):
    self.b, self.n_data, self.n_model, self.chunk = b, n_data, n_model, chunk
    self.b_loc, self.f_loc = b // n_data, cfg.d_sae // n_model
    self.nc = self.b_loc // chunk
    self.n = allocation.mutual_choice_budget(b, cfg.k)
    self.kind = ("fc" if cfg.allocation in model.FEATURE_CHOICE
                 else "topk" if cfg.allocation == "topk" else "mc")
    if self.kind == "topk":
      self.k = int(cfg.k)
      self.width = min(self.k, self.f_loc)
    elif self.kind == "mc":
      self.width = min(self.f_loc, allocation.DEFAULT_CANDIDATE_FACTOR * math.ceil(cfg.k))
      self.size = min(self.n, self.b_loc * self.f_loc)
    else:
      self.capacity_F = model.feature_capacities(cfg, b)
      self.tiers = [selection.capacity_tiers(
          self.capacity_F[j * self.f_loc:(j + 1) * self.f_loc], chunk) for j in range(n_model)]
      # Per shard: its proposals per chunk and its selected entries, padded to the widest.
      self.proposals = [sum((t.stop - t.start) * t.width for t in ts) for ts in self.tiers]
      self.entries = [sum((t.stop - t.start) * t.capacity for t in ts) for ts in self.tiers]
      self.shared = all(ts == self.tiers[0] for ts in self.tiers)
      self.size = max(self.entries)


def _fc_proposals(scores_CxF, pre_CxF, row_base, *, tiers, pad: int):
  """One chunk's per-feature top tokens for one shard's tiers, flat and padded."""
  vals, rows, pre = [], [], []
  for t in tiers:
    v, r = allocation.cols_topk(scores_CxF[:, t.start:t.stop], t.width)
    feats = jnp.arange(t.start, t.stop, dtype=r.dtype)[:, None]
    vals.append(v.reshape(-1))
    rows.append((r + row_base).reshape(-1))
    pre.append(pre_CxF[r, feats].reshape(-1))
  out = [jnp.concatenate(a) if a else jnp.zeros((0,), dt)
         for a, dt in ((vals, scores_CxF.dtype), (rows, jnp.int32), (pre, pre_CxF.dtype))]
  fill = (-jnp.inf, 0, 0.0)
  return tuple(jnp.pad(a, (0, pad - a.shape[0]), constant_values=c) for a, c in zip(out, fill))


def _fc_decide(vals, rows, pre, capacity_loc, row0, *, tiers, lay: _Layout):
  """One shard's Feature Choice from the gathered proposals ``[n_data, nc, pad]``."""
  out_rows, out_cols, out_pre, out_valid = [], [], [], []
  offset = 0
  for t in tiers:
    nf = t.stop - t.start
    span = nf * t.width
    arrange = lambda a: jnp.moveaxis(
        a[..., offset:offset + span].reshape(lay.n_data, lay.nc, nf, t.width), 2, 0
    ).reshape(nf, lay.n_data * lay.nc * t.width)
    cand_vals, cand_rows, cand_pre = arrange(vals), arrange(rows), arrange(pre)
    # Proposals by data shard, chunk, then value and row: the lower-position tie rule of
    # lax.top_k picks the lower global row, as the dense path does.
    _, pos = lax.top_k(cand_vals, t.capacity)
    rows_FxM = jnp.take_along_axis(cand_rows, pos, axis=1) - row0
    in_cap = jnp.arange(t.capacity)[None, :] < capacity_loc[t.start:t.stop, None]
    valid = in_cap & (rows_FxM >= 0) & (rows_FxM < lay.b_loc)
    out_rows.append(jnp.clip(rows_FxM, 0, lay.b_loc - 1).reshape(-1))
    out_cols.append(jnp.repeat(jnp.arange(t.start, t.stop, dtype=jnp.int32), t.capacity))
    out_pre.append(jnp.take_along_axis(cand_pre, pos, axis=1).reshape(-1))
    out_valid.append(valid.reshape(-1))
    offset += span
  size = lay.size
  parts = []
  for a, fill in ((out_rows, 0), (out_cols, 0), (out_pre, 0.0), (out_valid, False)):
    a = jnp.concatenate(a) if a else jnp.zeros((0,), jnp.int32)
    parts.append(jnp.pad(a, (0, size - a.shape[0]), constant_values=fill))
  rows_N, cols_N, pre_N, valid_N = parts
  return Selection(rows_N.astype(jnp.int32), cols_N.astype(jnp.int32),
                   pre_N.astype(pre.dtype), valid_N.astype(bool))


def _select(p, x, cfg: model.SAEConfig, lay: _Layout, aux) -> tuple[Selection, Selection | None]:
  """This device's selected triples (and auxiliary triples) with exact global decisions."""
  row0 = lax.axis_index(DATA) * lay.b_loc
  col0 = lax.axis_index(MODEL) * lay.f_loc
  shard = lax.axis_index(MODEL)
  centred, W_enc, b_enc = selection.encoder_inputs(lax.stop_gradient(p), x, cfg)
  centred = centred.reshape(lay.nc, lay.chunk, -1)
  p = p._replace(W_enc=W_enc, b_enc=b_enc)  # in cfg.dtype, for the encoder only
  pad = max(lay.proposals) if lay.kind == "fc" else 0

  def per_chunk(args):
    c, centred_CxD = args
    out = {}
    pre_CxF = selection.chunk_pre(centred_CxD, p.W_enc, p.b_enc)
    scores_CxF = selection.selection_scores(pre_CxF, cfg)
    if lay.kind == "fc":
      base = row0 + c * lay.chunk
      branches = [functools.partial(_fc_proposals, tiers=ts, pad=pad)
                  for ts in (lay.tiers[:1] if lay.shared else lay.tiers)]
      out["main"] = _by_shard(shard, branches, scores_CxF, pre_CxF, base)
    else:
      vals, cols = allocation.rows_topk(scores_CxF, lay.width)
      out["main"] = (vals, cols, jnp.take_along_axis(pre_CxF, cols, axis=1))
    if aux is not None:
      cand_loc, weights_loc, k_aux_loc, _ = aux
      vals, cols = allocation.rows_topk(losses.aux_scores(pre_CxF, cand_loc, weights_loc),
                                        k_aux_loc)
      out["aux"] = (vals, cols, jnp.take_along_axis(pre_CxF, cols, axis=1))
    return out

  outs = lax.map(per_chunk, (jnp.arange(lay.nc, dtype=jnp.int32), centred))
  flat_rows = lambda a: a.reshape(lay.b_loc, -1)
  if lay.kind == "topk":
    vals, cols, pre = (flat_rows(a) for a in outs["main"])
    main = _row_top(vals, cols, pre, lay.k, col0, lay.f_loc, lay.n_model)
  elif lay.kind == "mc":
    vals, cols, pre = (flat_rows(a) for a in outs["main"])
    main = _mutual_choice(vals, cols, pre, centred, p, cfg, lay, row0, col0)
  else:
    vals, rows, pre = (lax.all_gather(a, DATA, axis=0, tiled=False) for a in outs["main"])
    branches = [functools.partial(_fc_decide, tiers=ts, lay=lay)
                for ts in (lay.tiers[:1] if lay.shared else lay.tiers)]
    capacity_loc = lax.dynamic_slice_in_dim(jnp.asarray(lay.capacity_F, jnp.int32), col0,
                                            lay.f_loc)
    main = _by_shard(shard, branches, vals, rows, pre, capacity_loc, row0)
  aux_sel = None
  if aux is not None:
    vals, cols, pre = (flat_rows(a) for a in outs["aux"])
    aux_sel = _row_top(vals, cols, pre, aux[3], col0, lay.f_loc, lay.n_model)
  return main, aux_sel


def _by_shard(shard, branches, *args):
  """``branches[shard](*args)``: one branch per model shard's static layout, or one for all."""
  if len(branches) == 1:
    return branches[0](*args)
  return lax.switch(shard, branches, *args)


def _mutual_choice(vals, cols, pre, centred, p, cfg, lay: _Layout, row0, col0) -> Selection:
  """Exactly the ``round(k * b)`` largest scores over the mesh, as this device's triples."""
  rows = jnp.broadcast_to(jnp.arange(lay.b_loc, dtype=jnp.int32)[:, None], vals.shape)
  f = lay.f_loc * lay.n_model
  keys = allocation.sortable_key(vals)
  flat = ((row0 + rows).astype(jnp.uint32) * jnp.uint32(f) + col0.astype(jnp.uint32)
          + cols.astype(jnp.uint32))
  keep = allocation.select_global_top_n(keys, flat, lay.n, BOTH)
  fast = lambda _: _compact(keep, rows, cols, pre, lay.size)
  if lay.width >= lay.f_loc:  # every entry of the block was proposed
    return fast(None)
  # A token whose proposals on some device were all kept might deserve more of them.
  saturated = lax.psum(jnp.any(jnp.all(keep, axis=1)).astype(jnp.int32), BOTH) > 0
  exact = lambda _: _mutual_choice_exact(centred, p, cfg, lay, row0, col0)
  return lax.cond(saturated, exact, fast, None)


def _mutual_choice_exact(centred, p, cfg, lay: _Layout, row0, col0) -> Selection:
  """Mutual Choice by threshold searches over recomputed chunks (memory: one chunk).

  The largest key ``t`` with at least ``n`` keys at or above it over the mesh, then among
  the keys equal to ``t`` the ones with the lowest global flat indices, both by count
  bisections with a ``psum`` per step (about 66 encoder passes over the device's chunks);
  then one more pass collects the kept entries. Runs only when the per-token proposals
  cannot be shown exact.
  """
  f = lay.f_loc * lay.n_model
  bc, f_loc = lay.chunk, lay.f_loc
  local_rows = jnp.arange(bc, dtype=jnp.uint32)[:, None]
  local_cols = jnp.arange(f_loc, dtype=jnp.uint32)[None, :]

  def chunk(c):
    pre = selection.chunk_pre(centred[c], p.W_enc, p.b_enc)
    keys = allocation.sortable_key(selection.selection_scores(pre, cfg))
    flat = ((row0 + c * bc).astype(jnp.uint32) + local_rows) * jnp.uint32(f) + (
        col0.astype(jnp.uint32) + local_cols)
    return keys, flat, pre

  def count(pred):
    local = lax.fori_loop(0, lay.nc, lambda c, acc: acc + jnp.sum(
        pred(*chunk(c)[:2]), dtype=jnp.int32), jnp.int32(0))
    return lax.psum(local, BOTH)

  t = allocation.bisect_uint32(lambda u: count(lambda k, _: k >= u), lay.n)
  need = lay.n - count(lambda k, _: k > t)
  # Ties at t: the `need` lowest flat indices, i.e. the largest complements ~flat.
  u_inv = allocation.bisect_uint32(lambda u: count(lambda k, fl: (k == t) & (~fl >= u)),
                                   need)
  # Collected in blocks of whole rows (selection.exact_block_rows): keys, flat indices
  # and the compaction exist per block, so only the chunk's pre-activations are
  # chunk-sized.
  sub = selection.exact_block_rows(bc, f_loc)
  m = min(lay.size, sub * f_loc)
  block_rows = jnp.arange(sub, dtype=jnp.uint32)[:, None]

  def collect(c, carry):
    pre_blocks = selection.chunk_pre(centred[c], p.W_enc, p.b_enc).reshape(
        bc // sub, sub * f_loc)

    def block(j, carry):
      before, rows_N, cols_N, pre_N = carry
      pre = pre_blocks[j]
      keys = allocation.sortable_key(selection.selection_scores(pre, cfg))
      row_0 = (row0 + c * bc + j * sub).astype(jnp.uint32)
      flat = ((row_0 + block_rows) * jnp.uint32(f) + (col0.astype(jnp.uint32)
                                                      + local_cols)).reshape(-1)
      kept = (keys > t) | ((keys == t) & (~flat >= u_inv) & (need > 0))
      pos = jnp.nonzero(kept, size=m, fill_value=0)[0].astype(jnp.int32)
      n_kept = jnp.sum(kept, dtype=jnp.int32)
      slot = jnp.where(jnp.arange(m) < n_kept, before + jnp.arange(m, dtype=jnp.int32),
                       lay.size)
      rows_N = rows_N.at[slot].set(c * bc + j * sub + pos // f_loc, mode="drop")
      cols_N = cols_N.at[slot].set(pos % f_loc, mode="drop")
      pre_N = pre_N.at[slot].set(pre[pos], mode="drop")
      return before + n_kept, rows_N, cols_N, pre_N

    return lax.fori_loop(0, bc // sub, block, carry)

  init = (jnp.int32(0), jnp.zeros((lay.size,), jnp.int32), jnp.zeros((lay.size,), jnp.int32),
          jnp.zeros((lay.size,), jnp.float32))
  total, rows_N, cols_N, pre_N = lax.fori_loop(0, lay.nc, collect, init)
  return Selection(rows_N, cols_N, pre_N, jnp.arange(lay.size) < total)


def _surrogate(dec, pre_N, aux_pre_N, x, variance, sel: Selection, aux_sel, aux, cfg, tcfg,
               b: int):
  """This device's share of the loss: its gradient is this device's part of the gradient.

  The reconstruction of a token is the sum over model shards of their decodes; the other
  shards' part enters as a constant. Returns the surrogate and this device's partial sums
  for the loss value: ``(codes, squared_error, l1, aux_squared_error, aux_variance)``.
  """
  W_dec, b_dec = dec
  b_loc = x.shape[0]
  codes_N = jnp.where(sel.valid, jax.nn.relu(pre_N), jnp.zeros_like(pre_N))
  if aux_sel is None:
    part = sparse_kernels.sparse_decode(codes_N, sel.rows, sel.cols, W_dec, b_loc)
  else:  # both decodes at once: one decoder-gradient buffer
    cand_loc, weights_loc, any_cand = aux
    scores_N = losses.aux_scores(aux_pre_N, cand_loc[aux_sel.cols],
                                 None if weights_loc is None else weights_loc[aux_sel.cols])
    aux_codes_N = jnp.where(aux_sel.valid, jax.nn.relu(scores_N), 0.0)
    part, aux_part = sparse_kernels.sparse_decode_pair(
        codes_N, sel.rows, sel.cols, aux_codes_N, aux_sel.rows, aux_sel.cols, W_dec, b_loc)
  recon = part + lax.stop_gradient(lax.psum(part, MODEL) - part) + b_dec
  squared_error = jnp.sum(jnp.square(recon - x))
  local = squared_error / variance
  l1 = jnp.zeros((), jnp.float32)
  if cfg.l1_coefficient > 0:
    l1 = jnp.sum(jnp.abs(codes_N) * losses.decoder_row_norms(W_dec)[sel.cols]) / b
    local = local + cfg.l1_coefficient * l1
  aux_sq = aux_var = jnp.zeros((), jnp.float32)
  if aux_sel is not None:
    residual = x - lax.stop_gradient(recon)
    residual_hat = aux_part + lax.stop_gradient(lax.psum(aux_part, MODEL) - aux_part)
    aux_sq = jnp.sum(jnp.square(residual_hat - residual))
    mean = lax.psum(jnp.sum(residual, axis=0), DATA) / b
    aux_var = lax.stop_gradient(lax.psum(jnp.sum(jnp.square(residual - mean)), DATA))
    local = local + tcfg.aux_coefficient * losses.residual_loss(aux_sq, aux_var, any_cand)
  return local, (codes_N, squared_error, l1, aux_sq, aux_var)


def _local_gradients(state: train_state.TrainState, x, aux_in, cfg: model.SAEConfig,
                     tcfg: train_state.TrainConfig, lay: _Layout, k_aux: int | None = None
                     ) -> sparse_step.Gradients:
  """Gradients and statistics of one device's block (summed over devices where they are
  shared); ``aux_in`` = (candidates, weights, any) or None; ``k_aux`` the static
  auxiliary top-k (default the full one)."""
  p = state.params
  x32 = x.astype(jnp.float32)
  aux = None
  if aux_in is not None:
    cand_loc, weights_loc, any_cand = aux_in
    k_aux = objective.k_aux(cfg, tcfg) if k_aux is None else k_aux
    aux = (cand_loc, weights_loc, min(k_aux, lay.f_loc), k_aux)
  sel, aux_sel = _select(p, x, cfg, lay, aux)
  if aux_sel is not None:  # many entries: walk the weights in column order
    aux_sel = selection.by_column(aux_sel, lay.f_loc)
  p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p)  # no copy for float32 parameters
  mean = lax.psum(jnp.sum(x32, axis=0), DATA) / lay.b
  variance = lax.psum(jnp.sum(jnp.square(x32 - mean)), DATA)
  (_, (codes_N, sq, l1, aux_sq, aux_var)), (g_dec, g_pre, g_aux_pre) = jax.value_and_grad(
      _surrogate, argnums=(0, 1, 2), has_aux=True)(
          (p32.W_dec, p32.b_dec), sel.pre, None if aux_sel is None else aux_sel.pre, x32,
          variance, sel, aux_sel, aux_in, cfg, tcfg, lay.b)
  nmse = lax.psum(sq, DATA) / variance
  l1_total = lax.psum(l1, BOTH) if cfg.l1_coefficient > 0 else None
  aux_loss = jnp.zeros((), jnp.float32)
  more = None
  if aux_sel is not None:  # both losses' entries scattered into one gradient buffer
    aux_loss = losses.residual_loss(lax.psum(aux_sq, DATA), aux_var, aux_in[2])
    more = (aux_sel.rows, aux_sel.cols, g_aux_pre)
  loss = objective.total_loss(nmse, l1_total, aux_loss, cfg, tcfg)
  dW_enc, db_enc, db_dec_enc = sparse_kernels.encoder_grads(
      x32, p32.W_enc, p32.b_dec, sel.rows, sel.cols, g_pre, more=more)
  grads = sae_params.SAEParams(
      W_enc=_psum_rows_in_place(dW_enc, DATA), b_enc=lax.psum(db_enc, DATA),
      W_dec=_psum_rows_in_place(g_dec[0], DATA),
      b_dec=lax.psum(g_dec[1], DATA) + lax.psum(db_dec_enc, BOTH))
  codes_N = lax.stop_gradient(codes_N)
  counts = lax.psum(sparse_step.feature_counts(sel, codes_N, lay.f_loc), DATA)
  usage = metrics.feature_usage_from_counts(state.usage, counts, lay.b, decay=tcfg.usage_decay)
  batch_min = sparse_step.batch_min(state.threshold, sel, codes_N, cfg)
  batch_min = lax.pmin(batch_min, DATA if objective.per_feature_threshold(cfg) else BOTH)
  threshold = objective.threshold_from_batch_min(state.threshold, batch_min,
                                                 tcfg.threshold_decay)
  l0 = lax.psum(jnp.sum(codes_N > 0, dtype=jnp.int32), BOTH).astype(jnp.float32) / lay.b
  return sparse_step.Gradients(grads=grads, loss=loss, nmse=nmse, aux_loss=aux_loss, l0=l0,
                               usage=usage, threshold=threshold)


def _apply(state: train_state.TrainState, x, out, tcfg: train_state.TrainConfig):
  """The optimiser update in place on this device's shard, and the step's metrics."""
  new_params, opt_state, grad_norm = adam.update(
      state.params, out.grads, state.opt_state, tcfg,
      sum_over_shards=lambda v: lax.psum(v, MODEL))
  step_metrics = objective.step_metrics(
      loss=out.loss, nmse=out.nmse, aux=out.aux_loss, l0=out.l0, usage=out.usage, tcfg=tcfg,
      learning_rate=train_state.learning_rate_schedule(tcfg)(state.step), grad_norm=grad_norm,
      batch_finite=lax.pmin(jnp.all(jnp.isfinite(x)).astype(jnp.float32), DATA))
  step_metrics["dead_fraction"] = lax.pmean(step_metrics["dead_fraction"], MODEL)
  return (train_state.TrainState(new_params, opt_state, out.usage, out.threshold,
                                 state.step + 1), step_metrics)


# Rows per block when a weight gradient is summed over devices in place.
REDUCE_BLOCK = 512


def _psum_rows_in_place(g_FxD, axis):
  """``lax.psum(g, axis)`` block of rows by block of rows, written back into ``g``.

  A plain ``psum`` of a ``[f, d]`` gradient holds its result beside its input: a second
  gradient-sized buffer at the step's peak. Here each block's sum replaces the block in
  the loop-carried buffer, so only one block is extra.
  """
  f = g_FxD.shape[0]
  if f % REDUCE_BLOCK or f == REDUCE_BLOCK:
    return lax.psum(g_FxD, axis)

  def body(i, g):
    block = lax.dynamic_slice_in_dim(g, i * REDUCE_BLOCK, REDUCE_BLOCK, 0)
    return lax.dynamic_update_slice_in_dim(g, lax.psum(block, axis), i * REDUCE_BLOCK, 0)

  return lax.fori_loop(0, f // REDUCE_BLOCK, body, g_FxD)


def _gathered_usage(usage: metrics.FeatureUsageState) -> metrics.FeatureUsageState:
  return metrics.FeatureUsageState(
      lax.all_gather(usage.density_ema, MODEL, tiled=True),
      lax.all_gather(usage.tokens_since_fired, MODEL, tiled=True), usage.num_tokens)


def _device_step(state, x, cfg, tcfg, lay: _Layout):
  cands = objective.aux_candidates(_gathered_usage(state.usage), tcfg)
  if cands is None:
    return _apply(state, x, _local_gradients(state, x, None, cfg, tcfg, lay), tcfg)
  cand_F, weights_F = cands
  col0 = lax.axis_index(MODEL) * lay.f_loc
  local = lambda a: None if a is None else lax.dynamic_slice_in_dim(a, col0, lay.f_loc)
  aux_in = (local(cand_F), local(weights_F), jnp.any(cand_F))
  # Gradients in the branches, the state updated in place after them (see sparse_step):
  # branch 0 without auxiliary work, the others at a static tier of k_aux.
  tiers = objective.aux_k_tiers(cfg, tcfg)
  with_aux = lambda k: lambda s, v: _local_gradients(s, v, aux_in, cfg, tcfg, lay, k_aux=k)
  out = lax.switch(objective.aux_branch(cand_F, tiers),
                   [lambda s, v: _local_gradients(s, v, None, cfg, tcfg, lay)]
                   + [with_aux(k) for k in tiers], state, x)
  return _apply(state, x, out, tcfg)


def sharded_sparse_step(state: train_state.TrainState, x: Float[Array, "b d"],
                        cfg: model.SAEConfig, tcfg: train_state.TrainConfig, mesh: Mesh,
                        state_specs, chunk_tokens: int = selection.DEFAULT_CHUNK_TOKENS
                        ) -> tuple[train_state.TrainState, dict[str, Array]]:
  """One training step of the sparse path over ``mesh``; same update as ``train_step``.

  Jit it with the state's shardings (``sharding.jit_sharded_step`` does, and picks this
  step on every mesh of several devices); ``state_specs`` are the state's
  ``PartitionSpec`` tree (``sharding.state_shardings``' specs).

  Args:
    state: the sharded training state.
    x: batch ``[b, d]``, sharded over "data".
    cfg: SAE configuration (allocation in ``FAST_ALLOCATIONS``, float32).
    tcfg: optimisation settings.
    mesh: the ("data", "model") mesh.
    state_specs: PartitionSpecs of ``state``.
    chunk_tokens: static maximum tokens per encoder chunk on each device.

  Returns:
    ``(new_state, metrics)`` with the metrics of ``dense_step.train_step``, replicated.
  """
  b = x.shape[0]
  chunk = check_config(cfg, mesh, b, chunk_tokens)
  lay = _Layout(cfg, b, mesh.shape[DATA], mesh.shape[MODEL], chunk)
  fn = functools.partial(_device_step, cfg=cfg, tcfg=tcfg, lay=lay)
  return jax.shard_map(fn, mesh=mesh, in_specs=(state_specs, P(DATA, None)),
                       out_specs=(state_specs, P()), check_vma=False)(state, x)


def selection_mask(params: sae_params.SAEParams, x: Float[Array, "b d"], cfg: model.SAEConfig,
                   mesh: Mesh, chunk_tokens: int = selection.DEFAULT_CHUNK_TOKENS):
  """The ``[b, f]`` mask the sharded sparse step selects, sharded ``P("data", "model")``.

  Equal to ``model.allocate(model.encode_pre(params, x, cfg), cfg)`` (ties included);
  for tests and inspection, the step itself never forms it. Jitted once per
  configuration, mesh and shapes.
  """
  check_config(cfg, mesh, x.shape[0], chunk_tokens)
  return _jit_selection_mask(params, x, cfg, mesh, chunk_tokens)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "chunk_tokens"))
def _jit_selection_mask(params, x, cfg, mesh, chunk_tokens):
  b = x.shape[0]
  lay = _Layout(cfg, b, mesh.shape[DATA], mesh.shape[MODEL],
                check_config(cfg, mesh, b, chunk_tokens))

  def block(p, x_loc):
    sel, _ = _select(p, x_loc, cfg, lay, None)
    return jnp.zeros((lay.b_loc, lay.f_loc), bool).at[sel.rows, sel.cols].max(sel.valid)

  specs = sae_params.SAEParams(W_enc=P(None, MODEL), b_enc=P(MODEL), W_dec=P(MODEL, None),
                               b_dec=P())
  return jax.shard_map(block, mesh=mesh, in_specs=(specs, P(DATA, None)),
                       out_specs=P(DATA, MODEL), check_vma=False)(params, x)

"""Sparse SAE kernels over a flat list of selected ``(token, feature)`` entries.

An allocation rule keeps a fixed number of entries of the ``[b, f]`` pre-activations,
and only those carry signal forward and backward. Here a selection is a flat list of
``n`` triples ``(rows[i], cols[i], value[i])`` of static length ``n`` (e.g. ``k * b``),
and the two linear maps of the SAE are written over it with ``jax.custom_vjp``:

* :func:`sparse_decode` computes ``codes @ W_dec`` for codes that are zero outside the
  triples by gathering ``n`` decoder rows (``n * d`` multiply-adds instead of
  ``b * f * d``); its backward scatters ``value * dresid`` into the selected decoder
  rows.
* :func:`selected_pre` returns the pre-activations at the triples; its backward is the
  encoder gradient ``x^T dpre`` for a ``dpre`` with ``n`` non-zero entries, computed as a
  scatter of ``n`` outer-product rows into the selected columns. No ``[b, f]`` gradient
  is ever formed.

When the entries are a fixed number per token (the auxiliary top-``k_aux`` of
:mod:`sae_jax.training.sparse_step`) and cover a sizeable fraction of the features, gathering and
scattering one ``d``-row per entry costs more than dense matmuls of the same ``[b, f]``
shape. :func:`row_block_decode` and the ``row_cols``/``row_dpre`` arguments of
:func:`encoder_grads` take such entries as ``[b, k]`` arrays and work on dense
``[block_rows, f]`` blocks of codes instead (one block of rows at a time, so peak memory
holds one block, never the ``[b, f]`` matrix).

Triples must be distinct. Padding entries (for selections of fewer than ``n`` entries)
carry value 0 and any in-range indices: they add nothing forward, and their cotangent
is zeroed by the caller's ``where`` before it reaches these kernels.

References:
  Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093
  (sparse decoder kernels for TopK SAEs).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _check_triples(rows: Array, cols: Array, values: Array | None) -> None:
  for name, arr in (("rows", rows), ("cols", cols)):
    if arr.ndim != 1 or not jnp.issubdtype(arr.dtype, jnp.integer):
      raise ValueError(f"{name} must be a 1-D integer array [n]; got {arr.dtype}"
                       f"{list(arr.shape)}.")
  if rows.shape != cols.shape:
    raise ValueError(f"rows and cols must have the same shape [n]; got {list(rows.shape)} "
                     f"and {list(cols.shape)}.")
  if values is not None and values.shape != rows.shape:
    raise ValueError(f"values must have shape {list(rows.shape)} like rows; got "
                     f"{list(values.shape)}.")


def _check_static_rows(num_rows) -> int:
  if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 1:
    raise ValueError(f"num_rows must be a static Python int >= 1 (the number of tokens); "
                     f"got {num_rows!r}.")
  return num_rows


# Triples are processed in blocks of this many entries, so the gathered [block, d] rows
# stay in cache and no [n, d] intermediate is ever materialised.
BLOCK = 2048


def _blocks(n_entries: int) -> tuple[int, int]:
  block = min(BLOCK, n_entries)
  return block, -(-n_entries // block)


def _pad(arr_N, total: int):
  return jnp.pad(arr_N, (0, total - arr_N.shape[0]))


def _scatter_rows(num_out: int, idx_N, coef_N, src_SxD, src_idx_N, init_MxD=None,
                  shift_D=None):
  """``out[idx[i]] += coef[i] * (src[src_idx[i]] - shift)`` into zeros ``[num_out, d]`` (or
  into ``init_MxD``, updated in place), by blocks; ``shift`` defaults to none."""
  block, num = _blocks(idx_N.shape[0])
  src_SxD = jnp.asarray(src_SxD)
  # Padding entries have coefficient 0: they add exact zeros to row 0.
  idx_N, src_idx_N = _pad(idx_N, block * num), _pad(src_idx_N, block * num)
  coef_N = _pad(coef_N, block * num)
  # A zero accumulator of its own for every call: XLA merges identical zero broadcasts,
  # and two loops starting from one shared broadcast each copy it (an extra
  # [num_out, d] buffer). The fill depends on this call's coefficients: +0, or -0 when
  # the first one is NaN (the result then holds NaN anyway).
  if init_MxD is None:
    zero = jnp.where(coef_N[0] != coef_N[0], -0.0, 0.0).astype(src_SxD.dtype)
    out_MxD = jnp.full((num_out, src_SxD.shape[1]), zero, src_SxD.dtype)
  else:
    out_MxD = init_MxD
  coef_N = coef_N.astype(src_SxD.dtype)

  def body(i, acc):
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * block, block)
    src = src_SxD[sl(src_idx_N)]
    if shift_D is not None:
      src = src - shift_D
    terms = sl(coef_N)[:, None] * src
    return acc.at[sl(idx_N)].add(terms)

  return jax.lax.fori_loop(0, num, body, out_MxD)


def _gather_dot(a_MxD, a_idx_N, b_SxD, b_idx_N):
  """``<a[a_idx[i]], b[b_idx[i]]>`` for every i, block by block."""
  n = a_idx_N.shape[0]
  block, num = _blocks(n)
  a_MxD, b_SxD = jnp.asarray(a_MxD), jnp.asarray(b_SxD)
  a_idx_N, b_idx_N = _pad(a_idx_N, block * num), _pad(b_idx_N, block * num)

  def body(i, out):
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * block, block)
    dots = jnp.sum(a_MxD[sl(a_idx_N)] * b_SxD[sl(b_idx_N)], axis=-1)
    return jax.lax.dynamic_update_slice_in_dim(out, dots.astype(out.dtype), i * block, 0)

  out = jax.lax.fori_loop(0, num, body, jnp.zeros((block * num,), a_MxD.dtype))
  return out[:n]


# Rows per block of the materialised transpose (measured fastest among 64..4096 at
# f=32768, d=768: small blocks transpose inside the L1/L2 caches).
_TRANSPOSE_BLOCK = 64


def _materialised_transpose(a_FxD):
  """``a.T``, computed once block by block.

  Left to itself XLA:CPU fuses a transpose into every consumer (here Adam's moments, the
  update and the global norm), each then reading the gradient with a stride of f: that
  cost about four times one transpose at f=32768 (and XLA:CPU drops
  ``optimization_barrier``). The blocks are transposed inside a loop, whose results
  cannot be fused away; consumers then read the stacked ``[f / blk, d, blk]`` blocks in
  contiguous runs of ``blk`` values. (``adam._tiled_transpose`` tiles the other
  axis: for its [512, 768] blocks that measured 123 ms a step against 139 ms with this
  tiling, while for a whole [32768, 768] matrix this one takes 82 ms against 171 ms.)
  """
  f, d = a_FxD.shape
  blk = _TRANSPOSE_BLOCK if f % _TRANSPOSE_BLOCK == 0 else f
  blocks = jax.lax.map(lambda a_BxD: a_BxD.T, a_FxD.reshape(f // blk, blk, d))
  return jnp.transpose(blocks, (1, 0, 2)).reshape(d, f)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _decode(values_N, rows_N, cols_N, W_dec_FxD, num_rows):
  return _decode_fwd(values_N, rows_N, cols_N, W_dec_FxD, num_rows)[0]


def _decode_fwd(values_N, rows_N, cols_N, W_dec_FxD, num_rows):
  out_BxD = _scatter_rows(num_rows, rows_N, values_N, W_dec_FxD, cols_N)
  return out_BxD, (values_N, rows_N, cols_N, W_dec_FxD)


def _decode_bwd(num_rows, res, dout_BxD):
  values_N, rows_N, cols_N, W_dec_FxD = res
  dvalues_N = _gather_dot(dout_BxD, rows_N, W_dec_FxD, cols_N)
  # Several entries may share a decoder row (one per token): the scatter accumulates.
  dW_FxD = _scatter_rows(W_dec_FxD.shape[0], cols_N, values_N, dout_BxD, rows_N)
  return dvalues_N.astype(values_N.dtype), None, None, dW_FxD


_decode.defvjp(_decode_fwd, _decode_bwd)


def sparse_decode(values: Float[Array, "n"], rows: Int[Array, "n"], cols: Int[Array, "n"],
                  W_dec: Float[Array, "f d"], num_rows: int) -> Float[Array, "b d"]:
  """``codes @ W_dec`` for codes given as distinct triples, without the bias.

  ``out[b] = sum_{i: rows[i] = b} values[i] * W_dec[cols[i]]``: ``n * d`` multiply-adds.
  Differentiable in ``values`` and ``W_dec`` (custom VJP, gather/scatter only).

  References:
    Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093.

  Args:
    values: code values ``[n]``.
    rows: token index of each value ``[n]``, in ``[0, num_rows)``.
    cols: feature index of each value ``[n]``, in ``[0, f)``; ``(rows, cols)`` distinct.
    W_dec: decoder ``[f, d]``.
    num_rows: static number of tokens ``b``.

  Returns:
    ``[b, d]`` in the dtype of ``W_dec``.

  Raises:
    ValueError: on mismatched shapes or a non-static ``num_rows``.
  """
  _check_triples(rows, cols, values)
  num_rows = _check_static_rows(num_rows)
  if W_dec.ndim != 2:
    raise ValueError(f"W_dec must be [f, d]; got shape {list(W_dec.shape)}.")
  return _decode(values.astype(W_dec.dtype), rows, cols, W_dec, num_rows)


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _decode_pair(values_N, rows_N, cols_N, values_M, rows_M, cols_M, W_dec_FxD, num_rows):
  return _decode_pair_fwd(values_N, rows_N, cols_N, values_M, rows_M, cols_M, W_dec_FxD,
                          num_rows)[0]


def _decode_pair_fwd(values_N, rows_N, cols_N, values_M, rows_M, cols_M, W_dec_FxD, num_rows):
  out = (_scatter_rows(num_rows, rows_N, values_N, W_dec_FxD, cols_N),
         _scatter_rows(num_rows, rows_M, values_M, W_dec_FxD, cols_M))
  return out, (values_N, rows_N, cols_N, values_M, rows_M, cols_M, W_dec_FxD)


def _decode_pair_bwd(num_rows, res, douts):
  values_N, rows_N, cols_N, values_M, rows_M, cols_M, W_dec_FxD = res
  dout_N, dout_M = douts
  dvalues_N = _gather_dot(dout_N, rows_N, W_dec_FxD, cols_N)
  dvalues_M = _gather_dot(dout_M, rows_M, W_dec_FxD, cols_M)
  f = W_dec_FxD.shape[0]
  # One accumulator for both decodes: the second scatter continues the first in place.
  dW_FxD = _scatter_rows(f, cols_N, values_N, dout_N, rows_N)
  dW_FxD = _scatter_rows(f, cols_M, values_M, dout_M, rows_M, init_MxD=dW_FxD)
  return (dvalues_N.astype(values_N.dtype), None, None, dvalues_M.astype(values_M.dtype),
          None, None, dW_FxD)


_decode_pair.defvjp(_decode_pair_fwd, _decode_pair_bwd)


def sparse_decode_pair(values: Float[Array, "n"], rows: Int[Array, "n"], cols: Int[Array, "n"],
                       values2: Float[Array, "m"], rows2: Int[Array, "m"],
                       cols2: Int[Array, "m"], W_dec: Float[Array, "f d"], num_rows: int
                       ) -> tuple[Float[Array, "b d"], Float[Array, "b d"]]:
  """Two :func:`sparse_decode` of the same decoder, one decoder-gradient buffer.

  Equal to ``(sparse_decode(values, rows, cols, W_dec, num_rows), sparse_decode(values2,
  rows2, cols2, W_dec, num_rows))`` and to their gradients up to float32 rounding, but the
  backward pass accumulates both ``[f, d]`` decoder gradients into one buffer instead of
  two summed afterwards (the main and auxiliary decodes of a step: 100 MiB less at
  f=32768, d=768).
  """
  _check_triples(rows, cols, values)
  _check_triples(rows2, cols2, values2)
  num_rows = _check_static_rows(num_rows)
  if W_dec.ndim != 2:
    raise ValueError(f"W_dec must be [f, d]; got shape {list(W_dec.shape)}.")
  return _decode_pair(values.astype(W_dec.dtype), rows, cols, values2.astype(W_dec.dtype),
                      rows2, cols2, W_dec, num_rows)


def _check_row_entries(values_BxK, cols_BxK, block_rows) -> None:
  """Validates ``[b, k]`` per-token entries and a ``block_rows`` that divides ``b``."""
  if cols_BxK.ndim != 2 or not jnp.issubdtype(cols_BxK.dtype, jnp.integer):
    raise ValueError(f"cols must be a 2-D integer array [b, k]; got {cols_BxK.dtype}"
                     f"{list(cols_BxK.shape)}.")
  if values_BxK.shape != cols_BxK.shape:
    raise ValueError(f"values must have the shape {list(cols_BxK.shape)} of cols; got "
                     f"{list(values_BxK.shape)}.")
  b = cols_BxK.shape[0]
  if (isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1
      or b % block_rows):
    raise ValueError(f"block_rows must be a static int >= 1 dividing the {b} rows; got "
                     f"{block_rows!r}.")


def _block_codes(values_RxK, cols_RxK, f: int, transposed: bool = False):
  """The dense ``[r, f]`` block (``[f, r]`` when transposed) holding row i's ``k`` values
  at columns ``cols[i]``, zeros elsewhere. Columns are distinct within a row."""
  r = cols_RxK.shape[0]
  rows_Rx1 = jnp.arange(r, dtype=cols_RxK.dtype)[:, None]
  if transposed:
    return jnp.zeros((f, r), values_RxK.dtype).at[cols_RxK, rows_Rx1].set(
        values_RxK, unique_indices=True)
  return jnp.zeros((r, f), values_RxK.dtype).at[rows_Rx1, cols_RxK].set(
      values_RxK, unique_indices=True)


def _by_blocks(a, nb: int):
  return a.reshape((nb, a.shape[0] // nb) + a.shape[1:])


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _row_decode(values_BxK, cols_BxK, W_dec_FxD, block_rows):
  return _row_decode_fwd(values_BxK, cols_BxK, W_dec_FxD, block_rows)[0]


def _row_decode_fwd(values_BxK, cols_BxK, W_dec_FxD, block_rows):
  b, _ = cols_BxK.shape
  f, d = W_dec_FxD.shape
  nb = b // block_rows
  decode = lambda v, c: _block_codes(v, c, f) @ W_dec_FxD
  if nb == 1:
    out_BxD = decode(values_BxK, cols_BxK)
  else:
    out_BxD = jax.lax.map(lambda vc: decode(*vc), (_by_blocks(values_BxK, nb),
                                                   _by_blocks(cols_BxK, nb))).reshape(b, d)
  return out_BxD, (values_BxK, cols_BxK, W_dec_FxD)


def _row_decode_bwd(block_rows, res, dout_BxD):
  values_BxK, cols_BxK, W_dec_FxD = res
  b, _ = cols_BxK.shape
  f, _ = W_dec_FxD.shape
  nb = b // block_rows

  def block(v_RxK, c_RxK, g_RxD):
    # Both products are plain (non-transposed) matmuls: the codes are scattered
    # directly in the [f, r] layout that the decoder gradient needs.
    dW_FxD = _block_codes(v_RxK, c_RxK, f, transposed=True) @ g_RxD
    dv_RxK = jnp.take_along_axis(g_RxD @ W_dec_FxD.T, c_RxK, axis=1)
    return dW_FxD, dv_RxK

  if nb == 1:
    dW_FxD, dv_BxK = block(values_BxK, cols_BxK, dout_BxD)
  else:
    v, c, g = (_by_blocks(a, nb) for a in (values_BxK, cols_BxK, dout_BxD))
    dW_FxD, dv0 = block(v[0], c[0], g[0])

    def body(dW, args):
      dW_i, dv_i = block(*args)
      return dW + dW_i, dv_i

    dW_FxD, dv_rest = jax.lax.scan(body, dW_FxD, (v[1:], c[1:], g[1:]))
    dv_BxK = jnp.concatenate([dv0[None], dv_rest]).reshape(values_BxK.shape)
  return dv_BxK.astype(values_BxK.dtype), None, dW_FxD.astype(W_dec_FxD.dtype)


_row_decode.defvjp(_row_decode_fwd, _row_decode_bwd)


def row_block_decode(values: Float[Array, "b k"], cols: Int[Array, "b k"],
                     W_dec: Float[Array, "f d"], block_rows: int) -> Float[Array, "b d"]:
  """``codes @ W_dec`` for codes holding ``k`` values per token, as dense matmuls.

  ``out[i] = sum_j values[i, j] * W_dec[cols[i, j]]``, the same as :func:`sparse_decode`
  of the flattened entries, but computed block by block of ``block_rows`` tokens as a
  dense ``[block_rows, f]`` code matrix times ``W_dec`` (``b * f * d`` multiply-adds in
  matmuls instead of ``b * k * d`` in row gathers and scatters; the better choice when
  ``k / f`` is a sizeable fraction). The backward pass is two more matmuls per block
  (decoder gradient and code cotangent) and a gather of the ``[b, k]`` cotangents.
  Peak memory holds one block's ``[block_rows, f]`` codes, not ``[b, f]``.

  Args:
    values: code values ``[b, k]``.
    cols: feature of each value ``[b, k]``; distinct within a row.
    W_dec: decoder ``[f, d]``.
    block_rows: static number of tokens per dense block; divides ``b``.

  Returns:
    ``[b, d]`` in the dtype of ``W_dec``.

  Raises:
    ValueError: on mismatched shapes or a bad ``block_rows``.
  """
  _check_row_entries(values, cols, block_rows)
  if W_dec.ndim != 2:
    raise ValueError(f"W_dec must be [f, d]; got shape {list(W_dec.shape)}.")
  return _row_decode(values.astype(W_dec.dtype), cols, W_dec, block_rows)


def _row_encoder_grad(centred_BxD, cols_BxK, dpre_BxK, f: int, block_rows: int,
                      rows_N=None, cols_N=None, dpre_N=None):
  """``sum_blocks P^T @ centred`` with ``P`` the dense ``[block_rows, f]`` cotangent block.

  The per-token cotangents ``dpre_BxK`` fill each block; the flat triples
  ``(rows_N, cols_N, dpre_N)`` (any order, any rows) are added into the block that holds
  their row, so the whole encoder gradient is one matmul per block.
  """
  b, d = centred_BxD.shape
  nb = b // block_rows

  def block(i, c_RxK, g_RxK, x_RxD):
    pt_FxR = _block_codes(g_RxK, c_RxK, f, transposed=True)
    if rows_N is not None:
      local_N = rows_N - i * block_rows
      inside_N = (local_N >= 0) & (local_N < block_rows)
      # Out-of-block triples go to an out-of-range column and are dropped.
      local_N = jnp.where(inside_N, local_N, block_rows)
      pt_FxR = pt_FxR.at[cols_N, local_N].add(dpre_N.astype(pt_FxR.dtype), mode="drop")
    return pt_FxR @ x_RxD

  if nb == 1:
    return block(0, cols_BxK, dpre_BxK, centred_BxD)
  c, g, x = (_by_blocks(a, nb) for a in (cols_BxK, dpre_BxK, centred_BxD))
  first = block(0, c[0], g[0], x[0])
  return jax.lax.fori_loop(
      1, nb, lambda i, acc: acc + block(i, c[i], g[i], x[i]), first)


@jax.custom_vjp
def _selected(pre_N, rows_N, cols_N, x_BxD, W_enc_DxF, b_enc_F, b_dec_D):
  del rows_N, cols_N, x_BxD, W_enc_DxF, b_enc_F, b_dec_D
  return pre_N


def _selected_fwd(pre_N, rows_N, cols_N, x_BxD, W_enc_DxF, b_enc_F, b_dec_D):
  return pre_N, (rows_N, cols_N, x_BxD, W_enc_DxF, b_dec_D)


def encoder_grads(x: Float[Array, "b d"], W_enc: Float[Array, "d f"],
                  b_dec: Float[Array, "d"], rows: Int[Array, "n"], cols: Int[Array, "n"],
                  dpre: Float[Array, "n"], *, row_cols: Int[Array, "b k"] | None = None,
                  row_dpre: Float[Array, "b k"] | None = None, block_rows: int | None = None,
                  more: tuple[Array, Array, Array] | None = None
                  ) -> tuple[Array, Array, Array]:
  """Encoder gradients for a pre-activation cotangent that is non-zero only at triples.

  With ``pre = (x - b_dec) @ W_enc + b_enc`` and ``dpre`` given at ``(rows, cols)``:
  ``dW_enc.T[c] += dpre * (x[r] - b_dec)`` (a scatter of ``n`` contiguous ``d``-rows),
  ``db_enc[c] += dpre`` and ``db_dec = -W_enc db_enc``. Pairs may repeat (e.g. a main
  and an auxiliary selection concatenated): their contributions add up.

  ``row_cols``/``row_dpre`` (``[b, k]``, with a static ``block_rows`` dividing ``b``) add
  a cotangent of ``k`` entries per token computed densely: per block of ``block_rows``
  tokens the cotangent is scattered into a ``[f, block_rows]`` matrix, the triples of
  those tokens are added into it, and ``dW_enc.T += P^T (x - b_dec)`` is one matmul.
  The triples' row scatter is then skipped entirely (see :func:`row_block_decode` for
  when this pays).

  ``more`` = ``(rows, cols, dpre)`` of a second cotangent (an auxiliary loss's entries)
  is scattered into the same gradient buffer after the first: the result of
  concatenating the two lists, without the concatenated copies.

  Returns:
    ``(dW_enc_FxD, db_enc, db_dec)``; the weight gradient in the transposed ``[f, d]``
    layout in which it is scattered (transpose it, or hand it to
    :func:`sae_jax.training.adam.update`, which takes that layout).
  """
  _check_triples(rows, cols, dpre)
  d, f = W_enc.shape
  if row_cols is None and row_dpre is None:
    # Rows of x - b_dec formed per block as they are gathered: no [b, d] copy.
    x_BxD, shift_D = x.astype(W_enc.dtype), b_dec.astype(W_enc.dtype)
    if x.dtype != W_enc.dtype or b_dec.dtype != W_enc.dtype:  # round as (x - b_dec) would
      x_BxD, shift_D = (x - b_dec).astype(W_enc.dtype), None
    dW_FxD = _scatter_rows(f, cols, dpre, x_BxD, rows, shift_D=shift_D)
    db_enc_F = jnp.zeros((f,), W_enc.dtype).at[cols].add(dpre)
    if more is not None:
      rows2, cols2, dpre2 = more
      _check_triples(rows2, cols2, dpre2)
      dW_FxD = _scatter_rows(f, cols2, dpre2, x_BxD, rows2, init_MxD=dW_FxD, shift_D=shift_D)
      db_enc_F = db_enc_F.at[cols2].add(dpre2)
  else:
    centred_BxD = (x - b_dec).astype(W_enc.dtype)
    if more is not None:
      raise ValueError("more goes with triples only, not with row_cols / row_dpre.")
    if row_cols is None or row_dpre is None or block_rows is None:
      raise ValueError("row_cols, row_dpre and block_rows go together.")
    _check_row_entries(row_dpre, row_cols, block_rows)
    if row_cols.shape[0] != x.shape[0]:
      raise ValueError(f"row_cols must have the {x.shape[0]} rows of x; got "
                       f"{list(row_cols.shape)}.")
    dW_FxD = _row_encoder_grad(centred_BxD, row_cols, row_dpre.astype(W_enc.dtype), f,
                               block_rows, rows, cols, dpre)
    db_enc_F = jnp.zeros((f,), W_enc.dtype).at[cols].add(dpre).at[row_cols.reshape(-1)].add(
        row_dpre.reshape(-1).astype(W_enc.dtype))
  # pre = (x - b_dec) W_enc + b_enc, so sum_b dpre[b] W_enc^T = W_enc db_enc.
  db_dec_D = -(W_enc @ db_enc_F).astype(b_dec.dtype)
  return dW_FxD, db_enc_F, db_dec_D


def _selected_bwd(res, dpre_N):
  rows_N, cols_N, x_BxD, W_enc_DxF, b_dec_D = res
  dW_FxD, db_enc_F, db_dec_D = encoder_grads(x_BxD, W_enc_DxF, b_dec_D, rows_N, cols_N,
                                             dpre_N)
  dx_BxD = _scatter_rows(x_BxD.shape[0], rows_N, dpre_N, W_enc_DxF.T, cols_N)
  return (jnp.zeros_like(dpre_N), None, None, dx_BxD, _materialised_transpose(dW_FxD),
          db_enc_F, db_dec_D)


_selected.defvjp(_selected_fwd, _selected_bwd)


def selected_pre(x: Float[Array, "b d"], W_enc: Float[Array, "d f"], b_enc: Float[Array, "f"],
                 b_dec: Float[Array, "d"], rows: Int[Array, "n"], cols: Int[Array, "n"],
                 values: Float[Array, "n"] | None = None) -> Float[Array, "n"]:
  """Pre-activations ``((x - b_dec) @ W_enc + b_enc)[rows, cols]`` with a sparse gradient.

  The backward pass is the encoder gradient for a cotangent that is non-zero only at the
  triples: ``dW_enc[:, c] += dpre * (x[r] - b_dec)``, ``db_enc[c] += dpre``,
  ``db_dec = -W_enc db_enc`` and ``dx[r] += dpre * W_enc[:, c]`` (``n * d`` each; an
  unused ``dx`` is removed by the compiler).

  Args:
    x: inputs ``[b, d]``.
    W_enc: encoder ``[d, f]``.
    b_enc: encoder bias ``[f]``.
    b_dec: decoder bias ``[d]``, subtracted from ``x`` before encoding.
    rows: token index of each entry ``[n]``.
    cols: feature index of each entry ``[n]``; ``(rows, cols)`` distinct.
    values: the pre-activations at the triples when already computed (e.g. by the
      chunked encoder that selected them); they must equal the formula above, and are
      treated as constants. When None they are computed here by a gathered dot product.

  Returns:
    ``[n]`` pre-activations in the dtype of ``W_enc``.

  Raises:
    ValueError: on mismatched shapes.
  """
  _check_triples(rows, cols, values)
  if x.ndim != 2 or W_enc.ndim != 2 or x.shape[1] != W_enc.shape[0]:
    raise ValueError(f"x must be [b, d] and W_enc [d, f] with the same d; got "
                     f"{list(x.shape)} and {list(W_enc.shape)}.")
  if b_enc.shape != (W_enc.shape[1],) or b_dec.shape != (W_enc.shape[0],):
    raise ValueError(f"b_enc must be [{W_enc.shape[1]}] and b_dec [{W_enc.shape[0]}]; got "
                     f"{list(b_enc.shape)} and {list(b_dec.shape)}.")
  if values is None:
    centred_NxD = jax.lax.stop_gradient(x[rows] - b_dec)
    values = (jnp.sum(centred_NxD * jax.lax.stop_gradient(W_enc).T[cols], axis=-1)
              + jax.lax.stop_gradient(b_enc)[cols])
  values = jax.lax.stop_gradient(values.astype(W_enc.dtype))
  return _selected(values, rows, cols, x, W_enc, b_enc, b_dec)


def selection_mask(rows: Int[Array, "n"], cols: Int[Array, "n"], valid: Array | None,
                   shape: tuple[int, int]) -> Array:
  """The boolean ``[b, f]`` mask of a selection (for checks; not used by the fast step)."""
  _check_triples(rows, cols, None)
  keep = True if valid is None else valid
  return jnp.zeros(shape, bool).at[rows, cols].max(keep)

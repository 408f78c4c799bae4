"""A sparse SAE training step whose only dense work is the encoder matmul.

:func:`fast_train_step` computes the same update as
:func:`sae_jax.training.dense_step.train_step` (same selection, same parameters up to
float32 rounding) without ever holding a ``[b, f]`` array other than one chunk of
pre-activations:

1. The encoder runs over chunks of ``chunk_tokens`` tokens and the selection becomes a
   flat list of ``(token, feature, pre-activation)`` triples of static length, exactly
   the dense path's kept entries (:func:`sae_jax.training.selection.select`). Peak memory
   holds one chunk of pre-activations, not the batch.
2. Loss and gradients run through the kernels of :mod:`sae_jax.training.sparse_kernels`:
   decoding costs ``n * d`` and the encoder gradient is a scatter of ``n`` rows.
3. Decoder-gradient projection, clipping, Adam and decoder renormalisation run in place, two
   passes per weight (:mod:`sae_jax.training.adam`, optax's formulas and state), so the only
   large temporaries are the two weight gradients and one chunk. The usage/threshold
   statistics are the reference's, computed from the triples.

The auxiliary losses (aux_k, aux_zipf) take their per-token top-``k_aux`` over candidate
features chunk by chunk. Their ``b * k_aux`` entries are then decoded in one of two forms,
chosen per static shape by :func:`aux_form` (same result up to float32 rounding):

* "triples": the flat-triple kernels of the main loss (``b * k_aux * d`` row gathers and
  scatters), right when ``k_aux`` is a small fraction of the features (Gao et al.'s
  ``k_aux = 384`` of ``f = 32768``: 1.2 %);
* "dense": per encoder chunk, a dense ``[chunk, f]`` block of auxiliary codes multiplied
  by ``W_dec``; the backward pass and the encoder gradient (into which the main
  triples are folded) are matmuls of the same shape (:func:`sparse_kernels.row_block_decode`).
  At small widths (``k_aux = d / 2`` is 12.5 % of ``f = 4 d``) gathering and scattering
  one ``d``-row per entry costs several times these matmuls.

Supported: allocations "topk", "batch_topk"/"mutual_choice", "feature_choice" and
"feature_choice_zipf" (capacities in static tiers, :func:`selection.capacity_tiers`),
float32 or bfloat16 compute and parameters (which tensor is in which dtype: see
:mod:`sae_jax.training.sharded_step`), one device (no mesh;
:mod:`sae_jax.training.sharded_step` runs the same work on a mesh).

References:
  Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093;
  Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature Choice Sparse
  Autoencoders", arXiv 2411.02124.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from sae_jax import losses
from sae_jax import metrics
from sae_jax import model
from sae_jax import params as sae_params
from sae_jax.training import adam
from sae_jax.training import objective
from sae_jax.training import selection
from sae_jax.training import sparse_kernels
from sae_jax.training import train_state

__all__ = ["fast_train_step", "jit_fast_train_step", "aux_form", "AUX_FORMS",
           "DENSE_AUX_MIN_FRACTION", "usage_update", "threshold_update", "feature_counts",
           "batch_min", "Gradients"]


AUX_FORMS = ("auto", "dense", "triples")
# The auxiliary loss runs in the dense form when k_aux is at least this fraction of the
# features. Cost model: the triple form does 4 * b * k_aux * d multiply-adds as gathered
# and scattered d-rows (decode, its two backward products, encoder gradient), the dense
# form 4 * b * f * d in matmuls, so the dense form wins above a fraction c_dense/c_triple
# (cost per multiply-add). Measured on XLA:CPU (2 loaded cores, b=512, decode fwd+bwd
# plus encoder gradient, dense vs triples): d=256: f=1024 38 vs 72 ms, f=2048 67 vs 59;
# d=384: f=1536 83 vs 228, f=3072 152 vs 187, f=6144 293 vs 204; d=768: f=4096 624 vs
# 1366, f=8192 928 vs 1052, f=12288 1185 vs 990, f=16384 1666 vs 1067. Break-even lies
# near k_aux / f = 1/12 at d=256 (its decoder stays in cache, so gathers are cheap)
# and 1/20-1/25 at d=384-768. 1/16 puts the default k_aux = d/2 in the dense form up to
# f = 8 d; Gao et al.'s f = 32768, k_aux = 384 (1.2 %) stays in triples. The dense
# blocks are one encoder chunk of tokens, so either form keeps peak memory at a few
# [chunk, f] buffers, never [b, f].
DENSE_AUX_MIN_FRACTION = 1 / 16


def aux_form(num_features: int, k_aux: int) -> str:
  """The static form of the auxiliary loss: "dense" or "triples" (see the module doc).

  "dense" when ``k_aux >= DENSE_AUX_MIN_FRACTION * num_features``: e.g. d=384, f=1536,
  k_aux=192 (12.5 %) is dense; d=768, f=32768, k_aux=384 (1.2 %) stays in triples.
  """
  return "dense" if k_aux >= DENSE_AUX_MIN_FRACTION * num_features else "triples"


def _sparse_loss(dec: tuple[Array, Array], pre_N, aux_pre_N, x, sel: selection.Selection,
                 aux_sel: selection.Selection | None, aux_candidates, aux_weights,
                 cfg: model.SAEConfig, tcfg: train_state.TrainConfig,
                 aux_block_rows: int | None = None):
  """The training loss as a function of the decoder and of the selected pre-activations.

  The encoder enters only through ``pre_N`` and ``aux_pre_N`` (the pre-activations at
  the triples), so their gradients are the sparse score cotangents from which
  :func:`sparse_kernels.encoder_grads` builds the encoder gradients. With ``aux_block_rows``
  the auxiliary entries (``k_aux`` per token, row-major) are decoded in the dense form,
  blocks of that many tokens.
  """
  W_dec, b_dec = dec
  b = x.shape[0]
  codes_N = jnp.where(sel.valid, jax.nn.relu(pre_N), jnp.zeros_like(pre_N))
  aux_codes_N = aux_hat_BxD = None
  if aux_sel is not None:
    aux_codes_N = jax.nn.relu(losses.aux_scores(
        aux_pre_N, aux_candidates[aux_sel.cols],
        None if aux_weights is None else aux_weights[aux_sel.cols]))
  if aux_sel is not None and aux_block_rows is None:  # both decodes, one gradient buffer
    recon_BxD, aux_hat_BxD = sparse_kernels.sparse_decode_pair(
        codes_N, sel.rows, sel.cols, aux_codes_N, aux_sel.rows, aux_sel.cols, W_dec, b)
  else:
    recon_BxD = sparse_kernels.sparse_decode(codes_N, sel.rows, sel.cols, W_dec, b)
  recon_BxD = recon_BxD + b_dec
  nmse = metrics.normalized_mse(recon_BxD, x)
  l1 = None
  if cfg.l1_coefficient > 0:
    l1 = jnp.sum(jnp.abs(codes_N) * losses.decoder_row_norms(W_dec)[sel.cols]) / b
  aux = jnp.zeros((), jnp.float32)
  if aux_sel is not None:
    residual_BxD = x - jax.lax.stop_gradient(recon_BxD)
    if aux_block_rows is None:
      residual_hat_BxD = aux_hat_BxD
    else:
      residual_hat_BxD = sparse_kernels.row_block_decode(
          aux_codes_N.reshape(b, -1), aux_sel.cols.reshape(b, -1), W_dec, aux_block_rows)
    aux = losses.residual_loss(
        *metrics.reconstruction_error_terms(residual_hat_BxD, residual_BxD),
        jnp.any(aux_candidates))
  loss = objective.total_loss(nmse, l1, aux, cfg, tcfg)
  return loss, (codes_N, nmse, aux)


def usage_update(state: metrics.FeatureUsageState, sel: selection.Selection,
                 codes: Float[Array, "n"], num_tokens: int, decay: float
                 ) -> metrics.FeatureUsageState:
  """``metrics.feature_usage_update`` from the triples instead of a ``[b, f]`` code matrix."""
  return metrics.feature_usage_from_counts(state, feature_counts(sel, codes,
                                                                 state.density_ema.shape[0]),
                                           num_tokens, decay=decay)


def feature_counts(sel: selection.Selection, codes: Float[Array, "n"], num_features: int
                   ) -> Float[Array, "f"]:
  """Per-feature number of positive codes among the triples (float32, exact to 2**24)."""
  return jnp.zeros((num_features,), jnp.float32).at[sel.cols].add(
      (codes > 0).astype(jnp.float32))


def threshold_update(threshold: Float[Array, "f"], sel: selection.Selection,
                     codes: Float[Array, "n"], cfg: model.SAEConfig, decay: float
                     ) -> Float[Array, "f"]:
  """``dense_step.update_threshold`` from the triples: EMA of the smallest kept positive code."""
  return objective.threshold_from_batch_min(threshold, batch_min(threshold, sel, codes, cfg),
                                            decay)


def batch_min(threshold: Float[Array, "f"], sel: selection.Selection, codes: Float[Array, "n"],
              cfg: model.SAEConfig) -> Float[Array, "f"]:
  """The smallest kept positive code, per feature (Feature Choice) or broadcast; +inf if none."""
  positive_N = jnp.where(codes > 0, codes, jnp.inf)
  if objective.per_feature_threshold(cfg):
    return jnp.full(threshold.shape, jnp.inf, jnp.float32).at[sel.cols].min(positive_N)
  return jnp.broadcast_to(positive_N.min(), threshold.shape)


def fast_train_step(state: train_state.TrainState, x: Float[Array, "b d"], cfg: model.SAEConfig,
                    tcfg: train_state.TrainConfig,
                    chunk_tokens: int = selection.DEFAULT_CHUNK_TOKENS, aux_form: str = "auto"
                    ) -> tuple[train_state.TrainState, dict[str, Array]]:
  """One optimisation step equal to ``dense_step.train_step`` without dense ``[b, f]`` work.

  Jit with ``static_argnames=("cfg", "tcfg", "chunk_tokens", "aux_form")`` (or use
  :data:`jit_fast_train_step`). Same state, same metrics as the reference step. With an
  auxiliary loss, a step on which no feature is a candidate (nothing dead for aux_k,
  nothing underutilised for aux_zipf) takes a branch without the auxiliary selection,
  decode and gradient, whose loss and gradient would be exactly zero; a step with at most
  ``k_aux // 8`` candidates takes each token's top ``k_aux // 8`` instead of ``k_aux``, the
  same codes (:func:`sae_jax.training.objective.aux_k_tiers`).

  References:
    Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093;
    Ayonrinde 2024, arXiv 2411.02124.

  Args:
    state: training state of :func:`sae_jax.training.train_state.init_train_state`.
    x: batch ``[b, d]``.
    cfg: SAE configuration; allocation in ``selection.FAST_ALLOCATIONS``, float32.
    tcfg: optimisation settings.
    chunk_tokens: static maximum tokens per encoder chunk (peak memory holds one
      ``[chunk, f]`` block of pre-activations).
    aux_form: static form of the auxiliary loss: "auto" (:func:`aux_form`'s rule),
      "dense" or "triples" (same result up to float32 rounding; for tests and timing).

  Returns:
    ``(new_state, metrics)`` as :func:`sae_jax.training.dense_step.train_step`.

  Raises:
    ValueError: on an unsupported configuration or bad shapes.
  """
  if aux_form not in AUX_FORMS:
    raise ValueError(f"aux_form must be one of {AUX_FORMS}; got {aux_form!r}.")
  aux = objective.aux_candidates(state.usage, tcfg)
  if aux is None:
    out = _gradients(state, x, None, cfg, tcfg, chunk_tokens, aux_form)
  else:
    # The branches return gradients and statistics only: the state is updated in place
    # after the branch (XLA:CPU copies state a branch returns instead of updating it).
    # Branch 0 has no auxiliary work; the others take the top-k of a static tier.
    candidates, weights = aux
    tiers = objective.aux_k_tiers(cfg, tcfg)
    with_aux = lambda k: lambda s, v: _gradients(s, v, (candidates, weights), cfg, tcfg,
                                                 chunk_tokens, aux_form, k_aux=k)
    out = jax.lax.switch(
        objective.aux_branch(candidates, tiers),
        [lambda s, v: _gradients(s, v, None, cfg, tcfg, chunk_tokens, aux_form)]
        + [with_aux(k) for k in tiers],
        state, x)
  return _apply(state, x, out, tcfg)


class Gradients(NamedTuple):
  """What a sparse step computes before its optimiser update (also the sharded step's)."""

  grads: sae_params.SAEParams
  loss: Array
  nmse: Array
  aux_loss: Array
  l0: Array
  usage: metrics.FeatureUsageState
  threshold: Array


def _gradients(state: train_state.TrainState, x, aux, cfg: model.SAEConfig,
               tcfg: train_state.TrainConfig, chunk_tokens: int, form: str = "auto",
               k_aux: int | None = None) -> Gradients:
  """Gradients and statistics with the auxiliary loss's ``(candidates, weights)``, or
  without it (None); ``k_aux`` is the static auxiliary top-k (default the full one)."""
  b = x.shape[0]
  aux_cands = aux_weights = None
  block_rows = None
  if aux is None:
    k_aux = 0
  else:
    aux_cands, aux_weights = aux
    k_aux = objective.k_aux(cfg, tcfg) if k_aux is None else k_aux
    if form == "auto":
      form = aux_form(cfg.d_sae, k_aux)
    if form == "dense":  # dense blocks of one encoder chunk of tokens
      block_rows = selection.check_fast_config(cfg, b, chunk_tokens)
  sel, aux_sel = selection.select(state.params, x, cfg, chunk_tokens=chunk_tokens,
                                  aux_candidates=aux_cands, aux_weights=aux_weights, k_aux=k_aux)
  if aux_sel is not None and block_rows is None:
    aux_sel = selection.by_column(aux_sel, cfg.d_sae)
  p = state.params
  p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p)  # no copy for float32 parameters
  x32 = x.astype(jnp.float32)
  aux_pre = None if aux_sel is None else aux_sel.pre
  (loss, (codes_N, nmse, aux_loss)), (g_dec, g_pre, g_aux_pre) = jax.value_and_grad(
      _sparse_loss, argnums=(0, 1, 2), has_aux=True)(
          (p32.W_dec, p32.b_dec), sel.pre, aux_pre, x32, sel, aux_sel, aux_cands,
          aux_weights, cfg, tcfg, block_rows)
  if aux_sel is None:
    aux_grads = {}
  elif block_rows is None:  # both losses' entries scattered into one gradient buffer
    aux_grads = {"more": (aux_sel.rows, aux_sel.cols, g_aux_pre)}
  else:  # dense per-chunk blocks of the auxiliary cotangent, the main triples folded in
    aux_grads = {"row_cols": aux_sel.cols.reshape(b, k_aux),
                 "row_dpre": g_aux_pre.reshape(b, k_aux), "block_rows": block_rows}
  dW_enc_FxD, db_enc, db_dec_enc = sparse_kernels.encoder_grads(
      x32, p32.W_enc, p32.b_dec, sel.rows, sel.cols, g_pre, **aux_grads)
  grads = sae_params.SAEParams(W_enc=dW_enc_FxD, b_enc=db_enc, W_dec=g_dec[0],
                               b_dec=g_dec[1] + db_dec_enc)
  codes_N = jax.lax.stop_gradient(codes_N)
  return Gradients(
      grads=grads, loss=loss, nmse=nmse, aux_loss=aux_loss,
      l0=jnp.sum(codes_N > 0, dtype=jnp.int32).astype(jnp.float32) / b,
      usage=usage_update(state.usage, sel, codes_N, b, tcfg.usage_decay),
      threshold=threshold_update(state.threshold, sel, codes_N, cfg, tcfg.threshold_decay))


def _apply(state: train_state.TrainState, x, out: Gradients, tcfg: train_state.TrainConfig):
  """The optimiser update in place, and the step's metrics."""
  new_params, opt_state, grad_norm = adam.update(state.params, out.grads, state.opt_state,
                                                 tcfg)
  step_metrics = objective.step_metrics(
      loss=out.loss, nmse=out.nmse, aux=out.aux_loss, l0=out.l0, usage=out.usage, tcfg=tcfg,
      learning_rate=train_state.learning_rate_schedule(tcfg)(state.step), grad_norm=grad_norm,
      batch_finite=jnp.all(jnp.isfinite(x)).astype(jnp.float32))
  return (train_state.TrainState(new_params, opt_state, out.usage, out.threshold,
                                 state.step + 1), step_metrics)


jit_fast_train_step = jax.jit(fast_train_step,
                              static_argnames=("cfg", "tcfg", "chunk_tokens", "aux_form"),
                              donate_argnames=("state",))

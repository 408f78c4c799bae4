"""The SAE training objective, written once for every training step.

Every step (the dense reference :func:`sae_jax.training.dense_step.train_step`, the
one-device sparse :func:`sae_jax.training.sparse_step.fast_train_step` and the mesh-sharded
sparse :func:`sae_jax.training.sharded_step.sharded_sparse_step`) computes the same
quantities; they differ only in how they obtain the selected pre-activations and the
gradients, and in where partial sums live (a ``[b, f]`` code matrix, flat triples, or
triples spread over devices and reduced with ``psum``). The formulas live here:

* the auxiliary loss's candidate features and weights (:func:`aux_candidates`) and its
  per-token top-``k_aux`` (:func:`k_aux`); its scores and its value from the residual's
  error sums are :func:`sae_jax.losses.aux_scores` and
  :func:`sae_jax.losses.residual_loss`, which the functional ``aux_k_loss`` and
  ``aux_zipf_loss`` use too;
* the total loss from its terms (:func:`total_loss`): normalised MSE, the L1 penalty
  (decoder-norm weighted, :func:`sae_jax.losses.decoder_row_norms`) and the auxiliary
  loss;
* the feature-usage statistics from per-feature firing counts
  (:func:`sae_jax.metrics.feature_usage_from_counts`, which
  ``metrics.feature_usage_update`` uses too) and the inference-threshold calibration from
  the batch's smallest kept codes (:func:`threshold_from_batch_min`);
* the step's metrics (:func:`step_metrics`).

References:
  Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093;
  Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature Choice Sparse
  Autoencoders", arXiv 2411.02124;
  Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders", arXiv 2412.06410.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from sae_jax import losses
from sae_jax import metrics
from sae_jax import model
from sae_jax.training import train_state


def k_aux(cfg: model.SAEConfig, tcfg: train_state.TrainConfig) -> int:
  """The auxiliary top-k per token: ``tcfg.k_aux`` or ``d_model // 2``, at most ``d_sae``."""
  return min(tcfg.k_aux or losses.default_k_aux(cfg.d_model), cfg.d_sae)


# The auxiliary loss's smaller static top-k: a step with at most k_aux // AUX_SMALL_TIER
# candidate features selects only that many entries per token.
AUX_SMALL_TIER = 8


def aux_k_tiers(cfg: model.SAEConfig, tcfg: train_state.TrainConfig) -> tuple[int, ...]:
  """The static per-token auxiliary top-k of the sparse steps' branches, ascending.

  ``(k_aux // 8, k_aux)`` (one tier when they coincide). A token's top-``k_aux`` over the
  candidates holds every candidate when there are at most ``t`` of them, the rest being
  non-candidates whose score is ``-inf`` and whose code is 0; so on such a step the top-``t``
  gives the same codes, loss and gradients at an eighth of the auxiliary work (aux_k with
  a few dead features: the common case once training has settled).
  """
  k = k_aux(cfg, tcfg)
  return tuple(sorted({max(1, k // AUX_SMALL_TIER), k}))


def aux_branch(candidates: Bool[Array, "f"], tiers: tuple[int, ...]) -> Array:
  """Index of a step's branch: 0 without candidates, else ``1 + i`` for the first tier
  ``tiers[i]`` at least the number of candidates."""
  n = jnp.sum(candidates, dtype=jnp.int32)
  above = sum((n > t).astype(jnp.int32) for t in tiers[:-1])
  return jnp.where(n == 0, 0, 1 + above)


def aux_candidates(usage: metrics.FeatureUsageState, tcfg: train_state.TrainConfig
                   ) -> tuple[Bool[Array, "f"], Float[Array, "f"] | None] | None:
  """``(candidates [f] bool, weights [f] or None)`` of the auxiliary loss; None without one.

  aux_k: the dead features (no firing for ``dead_after_tokens`` tokens); aux_zipf: the
  features below ``zipf_tau`` times the Zipf law fitted to the density profile (dead ones
  included), weighted by their deficit when ``zipf_weighted``. ``usage`` must cover every
  feature (a sharded step gathers it first): the Zipf fit ranks the whole profile.
  """
  if tcfg.aux_loss == "none":
    return None
  if tcfg.aux_loss == "aux_k":
    return metrics.dead_features(usage, tcfg.dead_after_tokens), None
  c, s = metrics.fit_zipf(usage.density_ema)
  under = metrics.underutilised_features(usage.density_ema, c, s, tcfg.zipf_tau)
  weights = metrics.zipf_deficit(usage.density_ema, c, s) if tcfg.zipf_weighted else None
  return under, weights


def total_loss(nmse: Float[Array, ""], l1: Float[Array, ""] | None, aux: Float[Array, ""],
               cfg: model.SAEConfig, tcfg: train_state.TrainConfig) -> Float[Array, ""]:
  """``nmse + l1_coefficient * l1 + aux_coefficient * aux`` (L1 only when its weight > 0)."""
  loss = nmse
  if cfg.l1_coefficient > 0:
    loss = loss + cfg.l1_coefficient * l1
  return loss + tcfg.aux_coefficient * aux


def per_feature_threshold(cfg: model.SAEConfig) -> bool:
  """Whether the inference threshold is per feature (Feature Choice) or one global value."""
  return cfg.allocation in model.FEATURE_CHOICE


def threshold_from_batch_min(threshold: Float[Array, "f"], batch_min: Float[Array, "f"],
                             decay: float) -> Float[Array, "f"]:
  """EMA of the batch's smallest kept positive code: the batch-independent threshold.

  ``batch_min`` is ``+inf`` where nothing was kept; those entries keep their value. The
  first observation replaces the initial ``+inf`` outright. A global threshold (TopK,
  Mutual Choice) passes one value broadcast to ``[f]``.
  """
  batch_min = batch_min.astype(jnp.float32)
  seen = jnp.isfinite(batch_min)
  ema = jnp.where(jnp.isinf(threshold), batch_min, decay * threshold + (1 - decay) * batch_min)
  return jnp.where(seen, ema, threshold)


def step_metrics(*, loss, nmse, aux, l0, usage: metrics.FeatureUsageState,
                 tcfg: train_state.TrainConfig, learning_rate, grad_norm, batch_finite
                 ) -> dict[str, Array]:
  """The scalar metrics every step returns, by name.

  ``batch_finite`` (1.0 or 0.0) is checked by the training loop on every process, so a
  bad batch on one host stops them all.
  """
  return {
      "loss": loss,
      "nmse": nmse,
      "aux_loss": aux,
      "l0": l0,
      "dead_fraction": metrics.dead_fraction(usage, tcfg.dead_after_tokens),
      "learning_rate": learning_rate,
      "grad_norm": grad_norm,
      "batch_finite": batch_finite,
  }

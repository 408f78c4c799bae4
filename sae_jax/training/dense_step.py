"""The dense reference step: a pure ``(state, batch) -> (state, metrics)`` function.

One step computes the reconstruction loss (normalised MSE, plus L1 for the ReLU baseline
and an optional auxiliary loss for dead or underutilised features) on the full ``[b, f]``
codes of :func:`sae_jax.model.forward`, removes the gradient component parallel to each
decoder row, applies Adam with warm-up and decay, renormalises the decoder rows and
updates the feature-usage state and the inference thresholds. The objective's pieces
come from :mod:`sae_jax.training.objective`, shared with the sparse steps
(:mod:`sae_jax.training.sparse_step`, :mod:`sae_jax.training.sharded_step`), which tests
compare against this one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Float

from sae_jax import losses
from sae_jax import metrics
from sae_jax import model
from sae_jax import params as sae_params
from sae_jax.training import objective
from sae_jax.training.train_state import TrainConfig
from sae_jax.training.train_state import TrainState
from sae_jax.training.train_state import learning_rate_schedule
from sae_jax.training.train_state import make_optimizer


def update_threshold(threshold: Float[Array, "f"], codes: Float[Array, "b f"],
                     cfg: model.SAEConfig, decay: float) -> Float[Array, "f"]:
  """EMA of the smallest kept positive code: the batch-independent inference threshold.

  For TopK and Mutual Choice one global value (BatchTopK-style), for Feature Choice one
  value per feature (the smallest activation each feature kept). Runs in float32 even
  when codes are bfloat16. Entries with nothing kept this batch keep their value; the
  first observation replaces the initial +inf outright.

  References:
    Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders", arXiv 2412.06410.
  """
  codes32 = codes.astype(jnp.float32)
  positive = jnp.where(codes32 > 0, codes32, jnp.float32(jnp.inf))
  if objective.per_feature_threshold(cfg):
    batch_min = positive.min(axis=0)
  else:
    batch_min = jnp.broadcast_to(positive.min(), threshold.shape)
  return objective.threshold_from_batch_min(threshold, batch_min, decay)


def _loss(p: sae_params.SAEParams, x, usage: metrics.FeatureUsageState,
          cfg: model.SAEConfig, tcfg: TrainConfig, mesh: Mesh | None):
  out = model.forward(p, x, cfg, mesh=mesh)
  x32 = x.astype(jnp.float32)
  recon32 = out.recon.astype(jnp.float32)
  nmse = metrics.normalized_mse(recon32, x32)
  l1 = None
  if cfg.l1_coefficient > 0:
    l1 = losses.l1_penalty(out.codes.astype(jnp.float32), p.W_dec)
  aux = jnp.zeros((), jnp.float32)
  candidates = objective.aux_candidates(usage, tcfg)
  if candidates is not None:
    candidates, weights = candidates
    k_aux = objective.k_aux(cfg, tcfg)

    def aux_loss(pre, recon, W_dec):
      if tcfg.aux_loss == "aux_k":
        return losses.aux_k_loss(pre, x32, recon, W_dec, candidates, k_aux)
      return losses.aux_zipf_loss(pre, x32, recon, W_dec, candidates, k_aux, weights)

    # With no candidate the loss and its gradient are exactly 0: skip its top-k and decode.
    aux = jax.lax.cond(jnp.any(candidates), aux_loss,
                       lambda *_: jnp.zeros((), jnp.float32),
                       out.pre.astype(jnp.float32), recon32, p.W_dec)
  loss = objective.total_loss(nmse, l1, aux, cfg, tcfg)
  return loss, (out, nmse, aux)


def train_step(state: TrainState, x: Float[Array, "b d"], cfg: model.SAEConfig,
               tcfg: TrainConfig, mesh: Mesh | None = None
               ) -> tuple[TrainState, dict[str, Array]]:
  """One optimisation step; jit with ``static_argnames=("cfg", "tcfg", "mesh")``.

  With a ("data", "model") ``mesh`` the allocation runs exactly over the global batch
  (the sharded selections of :mod:`sae_jax.allocation`);
  :func:`sae_jax.training.sharding.jit_sharded_step` jits this with explicit shardings.

  Returns the new state and scalar metrics: loss, nmse, aux_loss, l0, dead_fraction,
  learning_rate, grad_norm.
  """
  (loss, (out, nmse, aux)), grads = jax.value_and_grad(_loss, has_aux=True)(
      state.params, x, state.usage, cfg, tcfg, mesh)
  grads = sae_params.project_decoder_grads(grads, state.params.W_dec)
  updates, opt_state = make_optimizer(tcfg).update(grads, state.opt_state, state.params)
  new_params = sae_params.normalize_decoder(optax.apply_updates(state.params, updates))
  usage = metrics.feature_usage_update(state.usage, out.codes, decay=tcfg.usage_decay)
  threshold = update_threshold(state.threshold, jax.lax.stop_gradient(out.codes), cfg,
                               tcfg.threshold_decay)
  step_metrics = objective.step_metrics(
      loss=loss, nmse=nmse, aux=aux, l0=metrics.mean_l0(out.codes), usage=usage, tcfg=tcfg,
      learning_rate=learning_rate_schedule(tcfg)(state.step),
      grad_norm=optax.tree.norm(grads),
      batch_finite=jnp.all(jnp.isfinite(x)).astype(jnp.float32))
  return TrainState(new_params, opt_state, usage, threshold, state.step + 1), step_metrics


jit_train_step = jax.jit(train_step, static_argnames=("cfg", "tcfg", "mesh"),
                         donate_argnames=("state",))

"""Training configuration and state: what a step reads and writes, and how it starts.

:class:`TrainConfig` holds the optimisation settings (Adam with warm-up and linear decay,
clipping, the auxiliary loss and its candidates, usage and threshold decays);
:class:`TrainState` is the pytree every step of :mod:`sae_jax.training` maps to its
successor; :func:`init_train_state` builds it (tied initialisation, ``b_dec`` at the
geometric median of a sample, float32 Adam moments whatever the parameters' dtype).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from sae_jax import losses
from sae_jax import metrics
from sae_jax import model
from sae_jax import params as sae_params

AUX_LOSSES = ("none", "aux_k", "aux_zipf")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation settings; frozen so it can be a static jit argument.

  Attributes:
    learning_rate: peak Adam learning rate.
    warmup_steps: linear warm-up steps from 0.
    total_steps: schedule length; the rate decays linearly to 0 over the last
      ``decay_fraction`` of it.
    decay_fraction: fraction of ``total_steps`` spent decaying.
    adam_b1, adam_b2, adam_eps: Adam settings (Gao et al. 2024 use eps 6.25e-10).
    grad_clip: global-norm clip (0 disables).
    aux_loss: "none", "aux_k" (dead features, Gao et al. 2024) or "aux_zipf"
      (underutilised features against a Zipf fit, Ayonrinde 2024).
    aux_coefficient: weight of the auxiliary loss (default 1/32).
    k_aux: auxiliary top-k; 0 means ``d_model // 2``.
    dead_after_tokens: a feature is dead after this many tokens without firing.
    zipf_tau: underutilised when density < tau * fitted Zipf density at its rank.
    zipf_weighted: weight aux_zipf candidates by their Zipf deficit.
    usage_decay: EMA decay of per-feature firing densities.
    threshold_decay: EMA decay of the calibrated inference thresholds.
  """

  learning_rate: float = 4e-4
  warmup_steps: int = 100
  total_steps: int = 10_000
  decay_fraction: float = 0.2
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 6.25e-10
  grad_clip: float = 1.0
  aux_loss: str = "none"
  aux_coefficient: float = losses.DEFAULT_AUX_COEFFICIENT
  k_aux: int = 0
  dead_after_tokens: int = 10_000_000
  zipf_tau: float = 1.0
  zipf_weighted: bool = False
  usage_decay: float = 0.99
  threshold_decay: float = 0.99

  def __post_init__(self):
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0; got {self.learning_rate}.")
    if self.total_steps < 1:
      raise ValueError(f"total_steps must be >= 1; got {self.total_steps}.")
    if not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}]; got "
                       f"{self.warmup_steps}.")
    if not 0 <= self.decay_fraction <= 1:
      raise ValueError(f"decay_fraction must be in [0, 1]; got {self.decay_fraction}.")
    if self.aux_loss not in AUX_LOSSES:
      raise ValueError(f"aux_loss must be one of {AUX_LOSSES}; got {self.aux_loss!r}.")
    if self.aux_coefficient < 0:
      raise ValueError(f"aux_coefficient must be >= 0; got {self.aux_coefficient}.")
    if self.k_aux < 0:
      raise ValueError(f"k_aux must be >= 0 (0 = d_model // 2); got {self.k_aux}.")
    if self.dead_after_tokens < 1:
      raise ValueError(f"dead_after_tokens must be >= 1; got {self.dead_after_tokens}.")
    if not 0 < self.usage_decay < 1:
      raise ValueError(f"usage_decay must be in (0, 1); got {self.usage_decay}.")
    if not 0 <= self.threshold_decay < 1:
      raise ValueError(f"threshold_decay must be in [0, 1); got {self.threshold_decay}.")
    if self.grad_clip < 0:
      raise ValueError(f"grad_clip must be >= 0 (0 disables); got {self.grad_clip}.")


class TrainState(NamedTuple):
  """Everything a step reads and writes; a pytree, so it jits, shards and checkpoints.

  ``threshold`` ``[f]`` float32 holds the calibrated inference thresholds: one global
  value repeated for TopK/MC, per feature for FC; +inf where nothing was kept yet, so a
  feature that training never selected does not fire at inference either.
  """

  params: sae_params.SAEParams
  opt_state: optax.OptState
  usage: metrics.FeatureUsageState
  threshold: Array
  step: Array


def learning_rate_schedule(tcfg: TrainConfig) -> optax.Schedule:
  """Linear warm-up, constant, then linear decay to 0 over the last decay_fraction."""
  decay_steps = int(round(tcfg.decay_fraction * tcfg.total_steps))
  hold = max(tcfg.total_steps - tcfg.warmup_steps - decay_steps, 0)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, tcfg.learning_rate, max(tcfg.warmup_steps, 1)),
       optax.constant_schedule(tcfg.learning_rate),
       optax.linear_schedule(tcfg.learning_rate, 0.0, max(decay_steps, 1))],
      boundaries=[tcfg.warmup_steps, tcfg.warmup_steps + hold])


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(tcfg.grad_clip)] if tcfg.grad_clip > 0 else []
  parts.append(optax.adam(learning_rate_schedule(tcfg), b1=tcfg.adam_b1, b2=tcfg.adam_b2,
                          eps=tcfg.adam_eps))
  return optax.chain(*parts)


def init_train_state(key: Array, cfg: model.SAEConfig, tcfg: TrainConfig,
                     sample: Float[Array, "n d"] | None = None) -> TrainState:
  """Tied initialisation; ``b_dec`` from the geometric median of ``sample`` if given."""
  p = sae_params.tied_init(key, cfg.d_model, cfg.d_sae, cfg.param_dtype)
  if sample is not None:
    p = p._replace(b_dec=sae_params.geometric_median(sample).astype(cfg.param_dtype))
  # Adam's moments are float32 whatever the parameters' dtype (bfloat16 moments lose
  # the small second moments of rarely selected features).
  p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p)
  return TrainState(params=p, opt_state=make_optimizer(tcfg).init(p32),
                    usage=metrics.feature_usage_init(cfg.d_sae),
                    threshold=jnp.full((cfg.d_sae,), jnp.inf, jnp.float32),
                    step=jnp.zeros((), jnp.int32))

"""Synthetic activations with a known sparse dictionary, for demos and tests.

Each token is a sparse non-negative combination of ground-truth unit directions whose
firing probabilities follow a Zipf law (a few common features, a long tail of rare
ones), plus isotropic Gaussian noise. Tokens differ in how many features they use, so
allocation strategies that adapt per-token L0 have something to adapt to.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Shape and statistics of the generative model.

  Attributes:
    d_model: activation width.
    num_features: number of ground-truth directions.
    mean_active: expected number of active features per token.
    zipf_exponent: firing probability of the feature at rank r is proportional to
      ``r ** -zipf_exponent``.
    noise_std: standard deviation of the additive Gaussian noise.
  """

  d_model: int = 64
  num_features: int = 256
  mean_active: float = 6.0
  zipf_exponent: float = 0.8
  noise_std: float = 0.02

  def __post_init__(self):
    if self.d_model < 1 or self.num_features < 1:
      raise ValueError(f"d_model and num_features must be >= 1; got {self.d_model}, "
                       f"{self.num_features}.")
    if not 0 < self.mean_active <= self.num_features:
      raise ValueError(f"mean_active must be in (0, num_features={self.num_features}]; got "
                       f"{self.mean_active}.")
    if self.noise_std < 0:
      raise ValueError(f"noise_std must be >= 0; got {self.noise_std}.")


def ground_truth(key: Array, cfg: SyntheticConfig) -> tuple[Float[Array, "f d"], Float[Array, "f"]]:
  """Unit-norm ground-truth directions ``[f, d]`` and firing probabilities ``[f]``."""
  dirs = jax.random.normal(key, (cfg.num_features, cfg.d_model))
  dirs = dirs / jnp.linalg.norm(dirs, axis=1, keepdims=True)
  ranks = jnp.arange(1, cfg.num_features + 1, dtype=jnp.float32)
  weights = ranks ** (-cfg.zipf_exponent)
  probs = jnp.clip(cfg.mean_active * weights / weights.sum(), 0.0, 1.0)
  return dirs, probs


def sample_batch(key: Array, dirs: Float[Array, "f d"], probs: Float[Array, "f"],
                 batch_size: int, noise_std: float) -> Float[Array, "b d"]:
  """Draws ``batch_size`` tokens from the generative model."""
  k_on, k_mag, k_noise = jax.random.split(key, 3)
  on = jax.random.bernoulli(k_on, probs, (batch_size, probs.shape[0]))
  magnitude = jax.random.exponential(k_mag, on.shape) + 0.5
  codes = jnp.where(on, magnitude, 0.0)
  return codes @ dirs + noise_std * jax.random.normal(k_noise, (batch_size, dirs.shape[1]))


class SyntheticBatches:
  """Endless, resumable batches from the generative model (the trainer's data protocol).

  Batch i is drawn with ``fold_in(key(seed), i)``, so ``state()`` is just the index and a
  restored iterator yields exactly the batches an uninterrupted one would. With several
  processes, the global batch has ``batch_size * process_count`` rows and process p
  yields rows ``[p * batch_size, (p + 1) * batch_size)`` of it.
  """

  def __init__(self, cfg: SyntheticConfig, batch_size: int, seed: int = 0, *,
               process_index: int = 0, process_count: int = 1):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, process_count={process_count}); got "
                       f"{process_index}.")
    self.cfg, self.batch_size, self.seed, self.index = cfg, batch_size, seed, 0
    self.process_index, self.process_count = process_index, process_count
    self.dirs, self.probs = ground_truth(jax.random.key(seed), cfg)
    self._key = jax.random.fold_in(jax.random.key(seed), 1)
    self._sample = jax.jit(sample_batch, static_argnums=(3, 4))

  def sample(self, n: int, offset: int = 2**30):
    """``n`` tokens from a stream disjoint from the training batches (init/eval)."""
    return self._sample(jax.random.fold_in(self._key, offset), self.dirs, self.probs, n,
                        self.cfg.noise_std)

  def state(self) -> dict:
    return {"index": self.index}

  def restore(self, state) -> None:
    self.index = int(state["index"])

  def __iter__(self):
    return self

  def __next__(self):
    x = self._sample(jax.random.fold_in(self._key, self.index), self.dirs, self.probs,
                     self.batch_size * self.process_count, self.cfg.noise_std)
    x = x[self.process_index * self.batch_size:(self.process_index + 1) * self.batch_size]
    self.index += 1
    return np.asarray(x, np.float32)  # host batches, as a store reader yields them

"""The drawn generative model (:func:`make_synthbench`) and tokens sampled from it.

References:
  Chanin & Garriga-Alonso 2026, "SynthSAEBench", arXiv 2602.14687.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from sae_jax.data.synthbench.config import HierarchyLevel
from sae_jax.data.synthbench.config import SynthBenchConfig
from sae_jax.data.synthbench.config import firing_probabilities
from sae_jax.data.synthbench.config import hierarchy_levels
from sae_jax.data.synthbench.geometry import push_overlaps
from sae_jax.data.synthbench.geometry import random_directions


class SynthBench(NamedTuple):
  """A drawn generative model (a pytree; pass it to :func:`sample_synthbench`).

  Attributes:
    features: unit feature vectors, ``[f, d]``; row ``i`` is the ``i``-th most frequent.
    probabilities: marginal firing probability of each feature, ``[f]``, non-increasing.
    thresholds: copula threshold ``Phi^-1(p)`` of each feature without a parent and
      ``-inf`` for children (they fire through the hierarchy only), ``[f]``.
    loadings: shared-factor loadings of each firing latent, ``[f, rank]``; every row has
      squared norm ``correlation_share``.
    magnitude_mean: mean magnitude of each feature, ``[f]``.
    magnitude_jitter: scalar; see :class:`SynthBenchConfig`.
    noise_std: scalar; see :class:`SynthBenchConfig`.
    hierarchy: one :class:`HierarchyLevel` per depth below the roots, top first.
    mean_max_cos: the achieved mean over features of the max ``|cos|``, scalar.
  """

  features: Float[Array, "f d"]
  probabilities: Float[Array, " f"]
  thresholds: Float[Array, " f"]
  loadings: Float[Array, "f r"]
  magnitude_mean: Float[Array, " f"]
  magnitude_jitter: Float[Array, ""]
  noise_std: Float[Array, ""]
  hierarchy: tuple[HierarchyLevel, ...]
  mean_max_cos: Float[Array, ""]



def make_synthbench(key: PRNGKeyArray, cfg: SynthBenchConfig) -> SynthBench:
  """Draws the generative model: feature vectors, copula loadings and the fixed layout.

  The probabilities, the hierarchy and the magnitudes follow from ``cfg`` alone; the key
  draws the feature vectors and the shared-factor loadings. Nothing is cached or written:
  call it once per run and keep the result (the paper preset takes about 30 s on 2 CPU
  cores, nearly all of it one ``f x f`` cosine pass; each push step costs two).

  References:
    Chanin & Garriga-Alonso 2026, "SynthSAEBench", arXiv 2602.14687.

  Args:
    key: PRNG key.
    cfg: the generative model's config.

  Returns:
    A :class:`SynthBench` pytree.

  Raises:
    ValueError: the hierarchy does not fit under the probability curve.
  """
  probs = firing_probabilities(cfg)
  levels = hierarchy_levels(cfg, probs)
  directions, loading_directions = random_directions(
      key, num_features=cfg.num_features, d_model=cfg.d_model, rank=cfg.correlation_rank)
  vectors, achieved = push_overlaps(directions, cfg)

  thresholds = scipy.special.ndtri(probs)
  for level in levels:
    thresholds[np.asarray(level.child)] = -np.inf
  # Loadings of squared norm correlation_share plus independent noise of the remaining
  # variance give every latent a standard normal marginal, so P(z < Phi^-1(p)) = p exactly
  # while latents sharing factor directions fire together.
  loadings = loading_directions * np.float32(math.sqrt(cfg.correlation_share))

  if cfg.p_max > cfg.p_min:
    position = (np.log(cfg.p_max) - np.log(probs)) / (np.log(cfg.p_max) - np.log(cfg.p_min))
  else:
    position = np.zeros_like(probs)
  magnitude = cfg.magnitude_max + position * (cfg.magnitude_min - cfg.magnitude_max)
  return SynthBench(
      features=vectors, probabilities=jnp.asarray(probs, jnp.float32),
      thresholds=jnp.asarray(thresholds, jnp.float32),
      loadings=loadings, magnitude_mean=jnp.asarray(magnitude, jnp.float32),
      magnitude_jitter=jnp.float32(cfg.magnitude_jitter), noise_std=jnp.float32(cfg.noise_std),
      hierarchy=levels, mean_max_cos=achieved)


def _sample_row(key: PRNGKeyArray, bench: SynthBench
                ) -> tuple[Float[Array, " d"], Float[Array, " f"]]:
  f, d = bench.features.shape
  rank = bench.loadings.shape[1]
  groups = [level.group_parent.shape[0] for level in bench.hierarchy]
  # One draw of random words feeds every random quantity of the token: each random op adds
  # about half a second of XLA:CPU compile time, and generating the words is most of the
  # sampling time, so the jitter reuses the 9 low bits of the latent words (the uniforms
  # take the 23 high ones; the bits of a word are independent).
  words = jax.random.bits(key, (rank + f + d + sum(groups),), jnp.uint32)
  unit = ((words >> 9).astype(jnp.float32) + 0.5) / 2.0**23  # in (0, 1), symmetric
  normals = np.float32(np.sqrt(2)) * lax.erf_inv(2.0 * unit[:rank + f + d] - 1.0)
  factors_R, own_F, noise_D = jnp.split(normals, [rank, rank + f])
  group_draws = jnp.split(unit[rank + f + d:], np.cumsum(groups[:-1], dtype=np.int64))
  jitter_unit_F = ((words[rank:rank + f] & 511).astype(jnp.float32) + 0.5) / 512.0

  own_scale_F = jnp.sqrt(1.0 - jnp.sum(jnp.square(bench.loadings), axis=1))
  latent_F = bench.loadings @ factors_R + own_scale_F * own_F
  fires_F = latent_F < bench.thresholds
  # The group draws are independent of everything else: that independence is what makes a
  # child's marginal exactly its parent's times its share.
  for level, draw_G in zip(bench.hierarchy, group_draws):
    draw_M = draw_G[level.child_group]
    parent_fires_M = fires_F[level.group_parent][level.child_group]
    child_fires_M = parent_fires_M & (draw_M >= level.lower) & (draw_M < level.upper)
    fires_F = fires_F.at[level.child].set(child_fires_M)
  jitter_F = 1.0 + bench.magnitude_jitter * (2.0 * jitter_unit_F - 1.0)
  codes_F = jnp.where(fires_F, bench.magnitude_mean * jitter_F, 0.0)
  x_D = codes_F @ bench.features + bench.noise_std * noise_D
  return x_D, codes_F


def sample_synthbench_rows(keys: PRNGKeyArray, bench: SynthBench
                           ) -> tuple[Float[Array, "b d"], Float[Array, "b f"]]:
  """One token per key: activations ``[b, d]`` float32 and true codes ``[b, f]``.

  Row ``i`` depends on ``keys[i]`` only, so any slice of a batch can be drawn alone (each
  process draws just its rows, and the global batch does not depend on the process count).
  """
  return jax.vmap(_sample_row, in_axes=(0, None))(keys, bench)


def sample_synthbench(key: PRNGKeyArray, bench: SynthBench, batch_size: int
                      ) -> tuple[Float[Array, "b d"], Float[Array, "b f"]]:
  """Draws ``batch_size`` tokens: activations ``[b, d]`` and their true codes ``[b, f]``.

  Jittable with ``batch_size`` static. A code is the feature's magnitude when it fires and
  0 otherwise; ``x = codes @ features + noise``. The codes are dense: 1024 tokens of the
  ``cpu`` preset take about 0.3 s on 2 CPU cores, mostly random-bit generation (one 32-bit
  word per feature and token), and 256 tokens of the ``paper`` preset about 0.4 s.

  References:
    Chanin & Garriga-Alonso 2026, "SynthSAEBench", arXiv 2602.14687.
  """
  return sample_synthbench_rows(jax.random.split(key, batch_size), bench)


def true_l0(bench: SynthBench, top: int | None = None) -> float:
  """Expected number of firing features per token, over all or the ``top`` most frequent.

  The marginals are exact, so this is ``sum(p)`` over the features counted. SynthSAEBench
  trains SAEs of width ``f / 4`` with ``k = true_l0(bench, top=f // 4)``.
  """
  probs = np.asarray(bench.probabilities, np.float64)
  if top is not None and not 1 <= top <= len(probs):
    raise ValueError(f"top must be in [1, num_features={len(probs)}] or None; got {top}.")
  return float(probs[:top].sum())


def hierarchy_parents(bench: SynthBench) -> Int[np.ndarray, " f"]:
  """The parent feature of each feature, ``-1`` for roots and features outside the trees."""
  parents = np.full(bench.probabilities.shape[0], -1, np.int64)
  for level in bench.hierarchy:
    group_parent = np.asarray(level.group_parent)
    parents[np.asarray(level.child)] = group_parent[np.asarray(level.child_group)]
  return parents

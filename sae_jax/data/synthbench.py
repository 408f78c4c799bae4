"""Ground-truth activations in the style of SynthSAEBench, for measuring feature recovery.

Every token is a sparse non-negative sum of ``f`` known unit feature vectors in ``d``
dimensions (``f > d``: superposition), so a trained SAE can be scored against the truth
(:mod:`sae_jax.evaluation.recovery`). The ingredients follow the published description of
SynthSAEBench; wherever it is silent the choice made here is documented where it is made:

- feature vectors: random Gaussian directions whose pairwise overlaps are pushed down until
  the mean over features of the max ``|cos|`` to any other feature reaches a target
  (:func:`make_synthbench`);
- firing probabilities: a Zipf law over frequency rank, from ``p_max`` down to ``p_min``
  (:func:`firing_probabilities`); feature ``i`` is the ``i``-th most frequent;
- a hierarchy: trees of mutually exclusive children that fire only when their parent
  fires (:func:`hierarchy_layout`);
- low-rank correlated firing through a Gaussian copula, which keeps every marginal exact;
- magnitudes that fall from about 5.0 for the most frequent features to 4.0 for the rarest.

Every feature, child or not, fires with exactly its Zipf probability, so the expected L0
is ``sum(p)`` (:func:`true_l0`) and the frequency profile an SAE sees is the Zipf law
itself. With the default curve the ``paper`` preset carries a true L0 of 25.3 (16.0 in
its 4096 most frequent features) where the published generator reports about 34; the
published figures do not pin the curve down (see ``zipf_exponent`` in
:class:`SynthBenchConfig` for the alternative, 59.1). Sampling is pure JAX from a key;
:class:`SynthBenchBatches` serves the trainer's data protocol.

References:
  Chanin & Garriga-Alonso 2026, "SynthSAEBench", arXiv 2602.14687.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
from jax import lax
from jaxtyping import Array, Float, Int, PRNGKeyArray

# Rows of the pairwise-cosine matrix computed at once: a block is block * f float32 values
# (64 MB at f = 16384), small next to the dictionary itself.
COSINE_BLOCK = 1024
# The overlap push stops once the mean max-cos is within this relative distance of its
# target: the fixed-threshold iteration approaches the target geometrically from above
# and never quite reaches it.
MAX_COS_RTOL = 0.01
# Each push moves every over-threshold pair half-way: the two feature vectors of a single
# offending pair both move, so their cosine lands on the threshold.
PUSH_STEP = 0.5


@dataclasses.dataclass(frozen=True)
class SynthBenchConfig:
  """The generative model's shape and statistics.

  Attributes:
    d_model: activation width ``d``.
    num_features: number of true features ``f``.
    target_mean_max_cos: upper target for the mean over features of the max ``|cos|`` to
      any other feature; ``None`` keeps plain random directions. Directions that start
      below the target are kept as they are (nothing pulls them together): random
      directions at d=768, f=16384 already sit at 0.148, while at d=256, f=4096 they start
      at 0.235.
    max_cos_steps: most push steps spent reaching the target.
    p_max, p_min: firing probabilities of the most and the least frequent feature.
    zipf_exponent: shape of the probability curve over rank ``r = 1..f``. ``None``: log p
      is linear in log r between ``(1, p_max)`` and ``(f, p_min)``, a pure Zipf law whose
      exponent follows from the endpoints (``ln(p_max / p_min) / ln f``, 0.69 at
      ``f = 16384``). A number ``a``: the Zipf weights ``r ** -a`` mapped affinely onto
      ``[p_min, p_max]``, which keeps the exponent but flattens towards ``p_min`` in the
      tail and carries more L0 (59 instead of 25 at the paper size with ``a = 0.5``).
    hierarchy_roots: number of trees; 0 disables the hierarchy.
    hierarchy_branching: children per parent.
    hierarchy_depth: levels per tree, roots included (1: roots without children).
    correlation_rank: rank of the shared factors behind correlated firing; 0 for
      independent firing.
    correlation_share: share of each firing latent's variance carried by the shared
      factors, in ``[0, 1)``.
    magnitude_max, magnitude_min: mean magnitude of the most and the least frequent
      feature; in between the mean is linear in log p.
    magnitude_jitter: each firing's magnitude is its mean times a uniform factor in
      ``[1 - jitter, 1 + jitter]``.
    noise_std: standard deviation of isotropic Gaussian noise added to every token.
  """

  d_model: int = 256
  num_features: int = 4096
  target_mean_max_cos: float | None = 0.15
  max_cos_steps: int = 8
  p_max: float = 0.4
  p_min: float = 5e-4
  zipf_exponent: float | None = None
  hierarchy_roots: int = 32
  hierarchy_branching: int = 4
  hierarchy_depth: int = 3
  correlation_rank: int = 25
  correlation_share: float = 0.5
  magnitude_max: float = 5.0
  magnitude_min: float = 4.0
  magnitude_jitter: float = 0.1
  noise_std: float = 0.0

  def __post_init__(self):
    for name, low in (("d_model", 1), ("num_features", 2), ("max_cos_steps", 0),
                      ("hierarchy_roots", 0), ("hierarchy_branching", 1),
                      ("hierarchy_depth", 1), ("correlation_rank", 0)):
      value = getattr(self, name)
      if not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
    target = self.target_mean_max_cos
    if target is not None and not 0.0 < target < 1.0:
      raise ValueError(f"target_mean_max_cos must be in (0, 1) or None; got {target}.")
    if not 0.0 < self.p_min <= self.p_max < 1.0:
      raise ValueError(f"need 0 < p_min <= p_max < 1; got p_min={self.p_min}, "
                       f"p_max={self.p_max}.")
    if self.zipf_exponent is not None and not self.zipf_exponent > 0:
      raise ValueError(f"zipf_exponent must be > 0 or None; got {self.zipf_exponent}.")
    if self.hierarchy_size > self.num_features:
      raise ValueError(
          f"the hierarchy needs hierarchy_roots * (1 + b + ... + b^(depth-1)) = "
          f"{self.hierarchy_size} features but num_features={self.num_features}; use fewer "
          f"roots, a smaller branching or depth, or more features.")
    if not 0.0 <= self.correlation_share < 1.0:
      raise ValueError(f"correlation_share must be in [0, 1); got {self.correlation_share}.")
    if not 0.0 <= self.magnitude_min <= self.magnitude_max:
      raise ValueError(f"need 0 <= magnitude_min <= magnitude_max; got "
                       f"magnitude_min={self.magnitude_min}, "
                       f"magnitude_max={self.magnitude_max}.")
    if not 0.0 <= self.magnitude_jitter < 1.0:
      raise ValueError(f"magnitude_jitter must be in [0, 1) so magnitudes stay positive; got "
                       f"{self.magnitude_jitter}.")
    if self.noise_std < 0:
      raise ValueError(f"noise_std must be >= 0; got {self.noise_std}.")

  @property
  def hierarchy_size(self) -> int:
    """Features inside the trees (roots included)."""
    per_tree = sum(self.hierarchy_branching ** level for level in range(self.hierarchy_depth))
    return self.hierarchy_roots * per_tree


# The published setting keeps 128 roots at f = 16384; the CPU preset keeps the same share of
# features in the trees (1 root per 128 features).
PRESETS: Mapping[str, SynthBenchConfig] = {
    "cpu": SynthBenchConfig(d_model=256, num_features=4096, hierarchy_roots=32),
    "paper": SynthBenchConfig(d_model=768, num_features=16384, hierarchy_roots=128),
    # Seconds-long end-to-end checks only.
    "smoke": SynthBenchConfig(d_model=32, num_features=256, hierarchy_roots=2,
                              correlation_rank=4, max_cos_steps=2, p_min=5e-3),
}


def synthbench_preset(name: str) -> SynthBenchConfig:
  """The config of a named preset: ``"cpu"`` (d=256, f=4096), ``"paper"`` (d=768,
  f=16384) or ``"smoke"`` (d=32, f=256, for seconds-long checks)."""
  if name not in PRESETS:
    raise ValueError(f"name must be one of {sorted(PRESETS)}; got {name!r}.")
  return PRESETS[name]


class HierarchyLevel(NamedTuple):
  """The children at one depth of every tree, grouped by parent.

  A group is one parent's children. Given that the parent fired, one uniform draw ``u`` per
  group picks at most one child: child ``c`` fires when ``lower[c] <= u < upper[c]``; the
  intervals of a group are disjoint, so children are mutually exclusive.

  Attributes:
    child: feature index of each child, ``[m]``.
    child_group: group of each child, ``[m]``.
    group_parent: feature index of each group's parent, ``[g]``.
    lower, upper: the child's interval of the group's uniform draw, ``[m]``.
  """

  child: Int[Array, " m"]
  child_group: Int[Array, " m"]
  group_parent: Int[Array, " g"]
  lower: Float[Array, " m"]
  upper: Float[Array, " m"]


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


def firing_probabilities(cfg: SynthBenchConfig) -> Float[np.ndarray, " f"]:
  """Marginal firing probability of each feature by frequency rank, float64 ``[f]``.

  The first is ``p_max`` and the last ``p_min``; see ``zipf_exponent`` in
  :class:`SynthBenchConfig` for the curve in between.
  """
  ranks = np.arange(1, cfg.num_features + 1, dtype=np.float64)
  if cfg.zipf_exponent is None:
    position = np.log(ranks) / np.log(cfg.num_features)
    return np.exp(np.log(cfg.p_max) + position * (np.log(cfg.p_min) - np.log(cfg.p_max)))
  weights = ranks ** -cfg.zipf_exponent
  position = (weights[0] - weights) / (weights[0] - weights[-1])
  return cfg.p_max + position * (cfg.p_min - cfg.p_max)


def hierarchy_layout(cfg: SynthBenchConfig
                     ) -> list[tuple[Int[np.ndarray, " m"], Int[np.ndarray, " m"]]]:
  """Which features form the trees: ``(children, their parents)`` per depth, top first.

  Every feature keeps its Zipf probability as its marginal, so a parent must fire at least
  as often as all its children together (they are mutually exclusive and fire only with
  it). The construction makes that hold: the roots are the ``hierarchy_roots`` most
  frequent features (broad concepts are the common ones), and level by level each parent,
  most frequent first, takes as children the most frequent unused features whose
  probability is at most its own divided by the branching factor. The trees therefore
  reach from the head of the Zipf curve into its tail, and children stay frequent enough
  for an SAE at width ``f / 4`` to meet many of them (with the paper preset all 512
  first-level and 1156 of the 2048 second-level children are among the 4096 most frequent
  features). The layout depends on the config only, not on a key.

  Raises:
    ValueError: the trees do not fit under the probability curve.
  """
  if cfg.hierarchy_roots == 0:
    return []
  probs = firing_probabilities(cfg)
  used = np.zeros(cfg.num_features, bool)
  parents = np.arange(cfg.hierarchy_roots)
  used[parents] = True
  levels = []
  for _ in range(1, cfg.hierarchy_depth):
    children, their_parents = [], []
    for parent in parents:
      limit = probs[parent] / cfg.hierarchy_branching
      first = int(np.searchsorted(-probs, -limit, side="left"))  # first p <= limit
      chosen = first + np.flatnonzero(~used[first:])[:cfg.hierarchy_branching]
      if len(chosen) < cfg.hierarchy_branching:
        raise ValueError(
            f"the hierarchy does not fit: feature {parent} (p={probs[parent]:.3g}) needs "
            f"{cfg.hierarchy_branching} unused children with p <= {limit:.3g}; use fewer "
            f"hierarchy_roots, a smaller hierarchy_branching or hierarchy_depth, a smaller "
            f"p_min, or more num_features.")
      used[chosen] = True
      children.append(chosen)
      their_parents.append(np.full(len(chosen), parent))
    levels.append((np.concatenate(children), np.concatenate(their_parents)))
    parents = np.sort(levels[-1][0])
  return levels


def _hierarchy_levels(cfg: SynthBenchConfig,
                      probs: Float[np.ndarray, " f"]) -> tuple[HierarchyLevel, ...]:
  levels = []
  for children, parents in hierarchy_layout(cfg):
    group_parent, child_group = np.unique(parents, return_inverse=True)
    # Given its parent fired, child c fires with p_c / p_parent, which makes its marginal
    # exactly p_c; its siblings' shares stack into disjoint intervals of one draw.
    share = probs[children] / probs[parents]
    upper = np.zeros_like(share)
    for group in range(len(group_parent)):
      members = np.flatnonzero(child_group == group)
      upper[members] = np.cumsum(share[members])
    levels.append(HierarchyLevel(
        child=jnp.asarray(children, jnp.int32), child_group=jnp.asarray(child_group, jnp.int32),
        group_parent=jnp.asarray(group_parent, jnp.int32),
        lower=jnp.asarray(upper - share, jnp.float32), upper=jnp.asarray(upper, jnp.float32)))
  return tuple(levels)


@functools.partial(jax.jit, static_argnames=("block", "push"))
def _cosine_pass(vectors: Float[Array, "f d"], threshold: Float[Array, ""], *, block: int,
                 push: bool) -> tuple[Float[Array, " f"], Float[Array, "f d"] | None]:
  """Max ``|cos|`` of each row to any other row and, with ``push``, the overlap gradient.

  Rows are unit vectors. The gradient of ``sum_{i != j} relu(|c_ij| - threshold)^2 / 4``
  with respect to row ``i`` is ``sum_j relu(|c_ij| - threshold) sign(c_ij) v_j``; it is
  built block by block so the ``f x f`` cosine matrix never exists whole.
  """
  f, d = vectors.shape
  num_blocks = -(-f // block)
  # Zero rows pad the last block: their cosines are 0, below any max and any threshold.
  padded_FxD = jnp.zeros((num_blocks * block, d), vectors.dtype).at[:f].set(vectors)

  def one_block(index):
    rows_BxD = lax.dynamic_slice_in_dim(padded_FxD, index * block, block)
    cos_BxF = rows_BxD @ vectors.T
    own = index * block + jnp.arange(block)
    cos_BxF = jnp.where(own[:, None] == jnp.arange(f)[None, :], 0.0, cos_BxF)
    abs_BxF = jnp.abs(cos_BxF)
    max_B = abs_BxF.max(axis=1)
    if not push:
      return max_B, None
    excess_BxF = jnp.sign(cos_BxF) * jnp.maximum(abs_BxF - threshold, 0.0)
    return max_B, excess_BxF @ vectors

  max_NB, grad_NBxD = lax.map(one_block, jnp.arange(num_blocks))
  max_F = max_NB.reshape(-1)[:f]
  return max_F, None if grad_NBxD is None else grad_NBxD.reshape(-1, d)[:f]


def _unit_rows(vectors: Float[Array, "f d"]) -> Float[Array, "f d"]:
  norm_Fx1 = jnp.linalg.norm(vectors, axis=1, keepdims=True)
  return vectors / jnp.maximum(norm_Fx1, 1e-12)


def mean_max_cosine(vectors: Float[Array, "f d"], block: int = COSINE_BLOCK) -> float:
  """Mean over rows of the max ``|cos|`` to any other row (rows normalised first).

  The superposition statistic of SynthSAEBench; computed in float32 blocks of ``block``
  rows, so memory stays at ``block * f`` values.
  """
  vectors = jnp.asarray(vectors, jnp.float32)
  if vectors.ndim != 2 or vectors.shape[0] < 2:
    raise ValueError(f"vectors must be [f, d] with f >= 2; got shape {tuple(vectors.shape)}.")
  if block < 1:
    raise ValueError(f"block must be >= 1; got {block}.")
  max_F, _ = _cosine_pass(_unit_rows(vectors), jnp.float32(0), block=min(block, len(vectors)),
                          push=False)
  return float(max_F.mean())


@functools.partial(jax.jit, static_argnames=("num_features", "d_model", "rank"))
def _random_directions(key: PRNGKeyArray, *, num_features: int, d_model: int, rank: int
                       ) -> tuple[Float[Array, "f d"], Float[Array, "f r"]]:
  """Unit Gaussian feature directions and unit loading directions, from one key."""
  key_vectors, key_loadings = jax.random.split(key)
  vectors = jax.random.normal(key_vectors, (num_features, d_model), jnp.float32)
  loadings = jax.random.normal(key_loadings, (num_features, rank), jnp.float32)
  return _unit_rows(vectors), _unit_rows(loadings)


@jax.jit
def _push_step(vectors: Float[Array, "f d"], grad: Float[Array, "f d"]) -> Float[Array, "f d"]:
  return _unit_rows(vectors - PUSH_STEP * grad)


def _push_overlaps(vectors: Float[Array, "f d"], cfg: SynthBenchConfig
                   ) -> tuple[Float[Array, "f d"], Float[Array, ""]]:
  """Pushes unit directions apart until their mean max-cos reaches the target.

  Each step moves every feature away from every other feature it overlaps by more than the
  target, by half the excess (:data:`PUSH_STEP`), then renormalises: a pair alone above
  the threshold lands exactly on it, and the max-cos of all features converges
  geometrically to the target from above (0.235 -> 0.151 in 4 steps at d=256, f=4096).
  Steps stop once the mean max-cos is within :data:`MAX_COS_RTOL` of the target or after
  ``max_cos_steps``; every step costs two ``f x f x d`` matmuls.
  """
  target = cfg.target_mean_max_cos
  threshold = jnp.float32(0.0 if target is None else target)
  block = min(COSINE_BLOCK, cfg.num_features)
  for step in range(cfg.max_cos_steps + 1):
    done = target is None or step == cfg.max_cos_steps
    max_F, grad_FxD = _cosine_pass(vectors, threshold, block=block, push=not done)
    achieved = max_F.mean()
    if done or float(achieved) <= target * (1 + MAX_COS_RTOL):
      break
    vectors = _push_step(vectors, grad_FxD)
  return vectors, achieved


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
  levels = _hierarchy_levels(cfg, probs)
  directions, loading_directions = _random_directions(
      key, num_features=cfg.num_features, d_model=cfg.d_model, rank=cfg.correlation_rank)
  vectors, achieved = _push_overlaps(directions, cfg)

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


@functools.partial(jax.jit, static_argnames=("total", "start", "stop"))
def _batch_rows(key: PRNGKeyArray, bench: SynthBench, *, total: int, start: int, stop: int
                ) -> tuple[Float[Array, "b d"], Float[Array, "b f"]]:
  """Rows ``[start, stop)`` of ``sample_synthbench(key, bench, total)``."""
  return sample_synthbench_rows(jax.random.split(key, total)[start:stop], bench)


class SynthBenchBatches:
  """Endless, resumable batches of activations (the trainer's data protocol).

  Batch ``i`` is drawn from ``fold_in(stream_key, i)`` with ``stream_key =
  fold_in(key(seed), 1)``, so ``state()`` is just the step and a restored iterator yields
  exactly the batches an uninterrupted one would. With several processes the global batch
  has ``batch_size * process_count`` rows, each drawn from its own key, and process ``p``
  draws only rows ``[p * batch_size, (p + 1) * batch_size)`` of it.

  Args:
    bench: the generative model (:func:`make_synthbench`).
    batch_size: rows per batch and process.
    seed: non-negative integer seed of the stream.
    process_index, process_count: this process and the number of processes.
  """

  def __init__(self, bench: SynthBench, batch_size: int, seed: int = 0, *,
               process_index: int = 0, process_count: int = 1):
    for name, value, low in (("batch_size", batch_size, 1), ("seed", seed, 0),
                             ("process_count", process_count, 1)):
      if not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, process_count={process_count}); got "
                       f"{process_index}.")
    self.bench, self.batch_size, self.seed, self.step = bench, batch_size, seed, 0
    self.process_index, self.process_count = process_index, process_count
    self._key = jax.random.fold_in(jax.random.key(seed), 1)

  @property
  def global_batch(self) -> int:
    return self.batch_size * self.process_count

  def _rows(self, key: PRNGKeyArray, total: int, start: int, stop: int):
    return _batch_rows(key, self.bench, total=total, start=start, stop=stop)

  def sample(self, n: int, offset: int = 2**30) -> Float[np.ndarray, "b d"]:
    """``n`` tokens from a stream disjoint from the training batches (init/eval)."""
    return self.sample_with_codes(n, offset)[0]

  def sample_with_codes(self, n: int, offset: int = 2**30
                        ) -> tuple[Float[np.ndarray, "b d"], Float[np.ndarray, "b f"]]:
    """Like :meth:`sample`, with the true codes ``[n, f]`` of the same tokens."""
    x, codes = self._rows(jax.random.fold_in(self._key, offset), n, 0, n)
    return np.asarray(x, np.float32), np.asarray(codes, np.float32)

  def state(self) -> dict:
    """A small JSON-able position; ``restore`` on it continues exactly from here."""
    return {"step": self.step, "seed": self.seed, "global_batch": self.global_batch}

  def restore(self, state: Mapping) -> None:
    """Continues from ``state`` (taken on any process of the same run)."""
    for key in ("seed", "global_batch"):
      if state.get(key) != getattr(self, key):
        raise ValueError(f"state[{key!r}] = {state.get(key)!r} but this iterator has "
                         f"{key}={getattr(self, key)!r}; restore needs the same setting.")
    if not isinstance(state.get("step"), int) or state["step"] < 0:
      raise ValueError(f"state['step'] must be an int >= 0; got {state.get('step')!r}.")
    self.step = state["step"]

  def __iter__(self) -> SynthBenchBatches:
    return self

  def __next__(self) -> Float[np.ndarray, "b d"]:
    start = self.process_index * self.batch_size
    x, _ = self._rows(jax.random.fold_in(self._key, self.step), self.global_batch, start,
                      start + self.batch_size)
    self.step += 1
    return np.asarray(x, np.float32)  # host batches, as a store reader yields them


def write_synthbench_store(path, bench: SynthBench, num_tokens: int, *, seed: int = 0,
                           chunk_rows: int = 16384, source: str = "synthbench",
                           progress: bool = False):
  """Draws ``num_tokens`` tokens into an activation store (resumable, deterministic).

  Chunk ``i`` holds rows ``[i * chunk_rows, (i + 1) * chunk_rows)`` of the stream of
  ``SynthBenchBatches(bench, chunk_rows, seed)``; each chunk is committed as one shard, so
  an interrupted write resumes after its last shard and ends byte-identical to an
  uninterrupted one. A finite store lets every SAE of a comparison see the same tokens,
  as a harvested store does, and costs the sampling once instead of once per run.

  Args:
    path: the store folder (:mod:`sae_jax.data.store` format, float32).
    bench: the generative model (:func:`make_synthbench`).
    num_tokens: rows to write, ``>= 1``.
    seed: seed of the token stream.
    chunk_rows: rows drawn and committed at once.
    source: the ``model`` name recorded in the manifest (the store has no layer: -1).
    progress: show a progress bar.

  Returns:
    A :class:`sae_jax.data.store.StoreReader` on the finished store.
  """
  from sae_jax.data import store as store_lib  # the store depends on nothing here
  from tqdm.auto import tqdm
  for name, value in (("num_tokens", num_tokens), ("chunk_rows", chunk_rows)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
  f, d = bench.features.shape
  meta = {"synthbench": {"seed": seed, "chunk_rows": chunk_rows, "num_features": int(f)}}
  manifest = pathlib.Path(path) / store_lib.MANIFEST
  if manifest.exists():
    written = store_lib.read_manifest(path).get("meta", {}).get("synthbench")
    if written != meta["synthbench"]:
      raise ValueError(f"{path} holds a store written with synthbench settings {written}, "
                       f"not {meta['synthbench']}; use another path or those settings.")
  with store_lib.StoreWriter(path, int(d), "float32", source, -1, "synthetic",
                             shard_rows=chunk_rows, meta=meta) as writer:
    batches = SynthBenchBatches(bench, chunk_rows, seed)
    done = writer.count
    if done % chunk_rows and done < num_tokens:
      raise ValueError(f"{path} ends inside a chunk ({done} rows); it was closed early. "
                       f"Delete it and write it again.")
    batches.restore({"step": done // chunk_rows, "seed": seed, "global_batch": chunk_rows})
    bar = tqdm(total=num_tokens, initial=min(done, num_tokens), disable=not progress,
               desc="synthbench store", unit="tok", unit_scale=True)
    with bar:
      while done < num_tokens:
        rows = next(batches)[:num_tokens - done]
        writer.add(rows)
        done += len(rows)
        bar.update(len(rows))
  return store_lib.StoreReader(path)

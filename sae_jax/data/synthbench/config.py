"""The generative model's configuration and what follows from it alone: the Zipf
firing probabilities and the hierarchy of mutually exclusive children.

References:
  Chanin & Garriga-Alonso 2026, "SynthSAEBench", arXiv 2602.14687.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


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


def hierarchy_levels(cfg: SynthBenchConfig,
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

"""Per-layer sparsity allocation for a target sparsity over the prunable leaves.

Three distributions are supported:

- "global": no per-layer allocation; `masks.prune_lowest` ranks all prunable entries
  together, so layers end up with whatever sparsity their scores imply.
- "uniform": every prunable leaf gets the target sparsity.
- "erk": Erdos-Renyi-Kernel; a leaf's density is proportional to
  sum(shape) / prod(shape), so small layers stay denser.

`uniform` and `erk` return per-leaf target sparsities (floats in [0, 1]) in leaf
order: a dict keyed by `masks.path_str` when given masks (the keys of
`masks.layer_sparsities`), a dict with the same keys when given a mapping name ->
shape, and a list when given a sequence of shapes. `layer_remove_counts` turns targets
into per-leaf counts for `masks.prune_lowest_per_leaf`; `prune_to_sparsity` does the
whole step for any of the three distributions.
"""

from collections.abc import Mapping, Sequence
import math

import jax
import jax.numpy as jnp
from jaxtyping import PyTree
import numpy as np

from pruning_jax import masks as masks_lib

DISTRIBUTIONS = ("global", "uniform", "erk")


def _is_shape(x) -> bool:
  return isinstance(x, tuple | list) and all(isinstance(d, int | np.integer) for d in x)


def _shapes(masks_or_shapes) -> tuple[list | None, list[tuple[int, ...]]]:
  """Keys (None for a plain sequence) and shapes of the prunable leaves."""
  if isinstance(masks_or_shapes, Mapping) and masks_or_shapes and all(
      _is_shape(v) for v in masks_or_shapes.values()):
    keys, shapes = list(masks_or_shapes), list(masks_or_shapes.values())
  elif isinstance(masks_or_shapes, Sequence) and masks_or_shapes and all(
      _is_shape(v) for v in masks_or_shapes):
    keys, shapes = None, list(masks_or_shapes)
  else:
    flat = jax.tree_util.tree_flatten_with_path(masks_or_shapes)[0]
    keys = [masks_lib.path_str(p) for p, _ in flat]
    shapes = [np.shape(m) for _, m in flat]
  shapes = [tuple(int(d) for d in s) for s in shapes]
  if not shapes or any(math.prod(s) == 0 for s in shapes):
    raise ValueError(f"masks_or_shapes must hold at least one non-empty prunable leaf (masks, "
                     f"a sequence of shapes or a mapping name -> shape), got {shapes}.")
  return keys, shapes


def _pack(keys: list | None, values: list):
  return list(values) if keys is None else dict(zip(keys, values))


def _check_sparsity(sparsity: float) -> float:
  sparsity = float(sparsity)
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f"sparsity must be in [0, 1), got {sparsity}.")
  return sparsity


def uniform(masks_or_shapes, sparsity: float):
  """The same target sparsity for every prunable leaf.

  Args:
    masks_or_shapes: masks, a sequence of shapes, or a mapping name -> shape.
    sparsity: target in [0, 1).

  Returns:
    Per-leaf target sparsities (dict or list, following the input).
  """
  sparsity = _check_sparsity(sparsity)
  keys, shapes = _shapes(masks_or_shapes)
  return _pack(keys, [sparsity] * len(shapes))


def erk(masks_or_shapes, sparsity: float, power_scale: float = 1.0):
  """Erdos-Renyi-Kernel per-leaf sparsities for an overall target `sparsity`.

  A leaf's density is eps * (sum(shape) / prod(shape)) ** power_scale, with eps chosen
  so that the kept weights total (1 - sparsity) * (all prunable weights). Leaves whose
  density would exceed 1 are made dense (those with the largest raw density first, one
  level at a time, as in the reference implementation) and eps is solved again for the
  rest. After rounding each leaf's count to the nearest integer (`layer_remove_counts`),
  the kept total is off the target by at most one weight per leaf.

  References:
    Evci, Gale, Menick, Castro, Elsen (2020), "Rigging the Lottery: Making All Tickets
    Winners", arXiv:1911.11134.

  Args:
    masks_or_shapes: masks, a sequence of shapes, or a mapping name -> shape.
    sparsity: overall target in [0, 1).
    power_scale: exponent on the raw density; 1 is ERK, 0 makes every leaf equal
      (uniform), values in between interpolate.

  Returns:
    Per-leaf target sparsities (dict or list, following the input).
  """
  sparsity = _check_sparsity(sparsity)
  if not (math.isfinite(power_scale) and power_scale >= 0):
    raise ValueError(f"power_scale must be a finite number >= 0, got {power_scale}.")
  keys, shapes = _shapes(masks_or_shapes)
  size = np.array([math.prod(s) for s in shapes], np.float64)
  raw = (np.array([sum(s) for s in shapes], np.float64) / size) ** power_scale
  dense = np.zeros(len(shapes), bool)
  eps = 0.0
  while not dense.all():
    sparse = ~dense
    budget = (1.0 - sparsity) * size.sum() - size[dense].sum()
    eps = budget / np.sum(raw[sparse] * size[sparse])
    top = raw[sparse].max()
    if eps * top <= 1.0:
      break
    dense |= sparse & (raw == top)
  density = np.where(dense, 1.0, np.clip(eps * raw, 0.0, 1.0))
  return _pack(keys, [float(1.0 - d) for d in density])


def layer_remove_counts(masks: PyTree, targets) -> dict[str, int]:
  """Per-leaf counts to prune so each leaf reaches its target sparsity.

  Args:
    masks: current masks.
    targets: per-leaf sparsities in [0, 1]: a dict keyed by `masks.path_str` (as from
      `uniform` / `erk` on masks) or a sequence in leaf order.

  Returns:
    Dict path -> count, each round(target * leaf size) (halves up) minus the entries
    already pruned, never negative; accepted by `masks.prune_lowest_per_leaf`.
  """
  flat = jax.tree_util.tree_flatten_with_path(masks)[0]
  paths = [masks_lib.path_str(p) for p, _ in flat]
  if isinstance(targets, Mapping):
    if set(targets) != set(paths):
      raise ValueError(f"targets must have the prunable paths {paths} as keys, "
                       f"got {sorted(targets)}.")
    targets = [targets[p] for p in paths]
  if len(targets) != len(paths):
    raise ValueError(f"targets need one sparsity per prunable leaf ({len(paths)}), "
                     f"got {len(targets)}.")
  counts = {}
  for path, target, (_, m) in zip(paths, targets, flat):
    if not 0.0 <= float(target) <= 1.0:
      raise ValueError(f"target sparsity of {path!r} must be in [0, 1], got {target}.")
    pruned = m.size - int(jnp.sum(m, dtype=jnp.int32))
    counts[path] = max(0, math.floor(float(target) * m.size + 0.5) - pruned)
  return counts


def prune_to_sparsity(scores: PyTree, masks: PyTree, sparsity: float,
                      distribution: str = "global", power_scale: float = 1.0) -> PyTree:
  """Prunes the lowest-score entries until the prunable sparsity reaches `sparsity`.

  Args:
    scores: pytree like params (lower = pruned first).
    masks: current masks.
    sparsity: overall target in [0, 1).
    distribution: "global" (one ranking over all prunable entries), "uniform" or "erk"
      (per-leaf targets, each leaf ranked on its own).
    power_scale: ERK exponent (only for "erk").

  Returns:
    New masks. Leaves already sparser than their target are left as they are.
  """
  sparsity = _check_sparsity(sparsity)
  if distribution == "global":
    return masks_lib.prune_lowest(scores, masks, masks_lib.remove_count(masks, sparsity))
  if distribution == "uniform":
    targets = uniform(masks, sparsity)
  elif distribution == "erk":
    targets = erk(masks, sparsity, power_scale)
  else:
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
  return masks_lib.prune_lowest_per_leaf(scores, masks, layer_remove_counts(masks, targets))

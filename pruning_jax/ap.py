"""Activate-while-Pruning (AP): the AP metric and one combined pruning cycle.

Pruning tends to leave more ReLU units dead. AP's premise is that negative
weights push pre-activations below zero, so it removes, among the weights that
end a training cycle negative, those that changed least during the cycle, to
reactivate units. A cycle lets the host method remove its share by its own
scores, then AP removes a small share among the survivors; the total removal
per cycle equals that of the host alone.
"""

from collections.abc import Callable
import numbers
from typing import Any, NamedTuple
import warnings

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray, PyTree

from pruning_jax import masks as masks_lib
from pruning_jax import scoring

Params = PyTree[Float[Array, "..."]]
Masks = PyTree[Bool[Array, "..."] | None]
Scores = PyTree[Float[Array, "..."]]

DEFAULT_RATE = 0.2
DEFAULT_AP_RATE = 0.02

# How the q share is chosen among the host's survivors. "least_moved" is AP; the other
# two are controls that keep AP's budget and change only its choice of weights.
SELECTIONS = ("least_moved", "most_negative", "random")

ScopeFn = Callable[[str], bool]


class CycleInfo(NamedTuple):
  """Counts of one :func:`prune_cycle`.

  Attributes:
    n_remaining_before: unpruned prunable weights when the cycle began.
    host_removed: weights the host method removed (its share plus any
      AP shortfall it filled in).
    ap_removed: weights AP removed.
    ap_shortfall: AP's share that found no negative candidate and was
      removed by the host instead.
  """
  n_remaining_before: int
  host_removed: int
  ap_removed: int
  ap_shortfall: int


def _map_with_masks(fn: Callable[..., Any], masks: Masks, *trees: Params):
  # Masks go first: their `None` leaves would otherwise not match the arrays.
  return jax.tree.map(lambda m, *leaves: fn(m, *leaves), masks, *trees,
                      is_leaf=lambda x: x is None)


def _ap_leaf(m: Bool[Array, "..."] | None, end: Float[Array, "..."],
             start: Float[Array, "..."]) -> Float[Array, "..."]:
  if m is None:
    return jnp.full(jnp.shape(end), jnp.inf, jnp.result_type(end, jnp.float32))
  candidate = m & (end < 0)
  return jnp.where(candidate, jnp.abs(end - start), jnp.inf)


def ap_scores(params_end: Params, params_start: Params,
              masks: Masks) -> Scores:
  """AP scores: |w_end - w_start| on candidates, +inf elsewhere.

  Candidates are unpruned prunable weights that are negative at the end of
  the cycle's training. AP removes the candidates with the smallest score;
  non-candidates (positive or zero, pruned, or non-prunable) score +inf so
  they are never picked.

  Args:
    params_end: weights at the end of the cycle's training.
    params_start: weights at the start of the cycle's training.
    masks: current masks.

  Returns:
    Scores shaped like ``params_end``.

  References:
    Liu, Ghosh, Tan, Motani (2023, TMLR), arXiv:2212.06145.
  """
  return _map_with_masks(_ap_leaf, masks, params_end, params_start)


def _most_negative_leaf(m, end, start):
  del start
  if m is None:
    return jnp.full(jnp.shape(end), jnp.inf, jnp.result_type(end, jnp.float32))
  return jnp.where(m & (end < 0), end, jnp.inf)


def most_negative_scores(params_end: Params, params_start: Params,
                         masks: Masks) -> Scores:
  """Control for AP: the same candidates (negative survivors) ranked by value.

  The most negative candidates score lowest and are removed first; non-candidates
  score +inf. Removing them instead of AP's least-moved ones tests whether AP's
  gain comes from its |delta w| criterion or merely from removing negative weights.
  """
  return _map_with_masks(_most_negative_leaf, masks, params_end, params_start)


def random_survivor_scores(key: PRNGKeyArray, params_end: Params,
                           masks: Masks) -> Scores:
  """Control for AP: uniform random scores on every survivor, +inf elsewhere.

  Every unpruned prunable weight is a candidate, negative or not, so removing the
  lowest q of these is the host's p - q plus q random survivors.
  """
  leaves, treedef = jax.tree.flatten(params_end)
  keys = jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))

  def leaf(m, end, k):
    if m is None:
      return jnp.full(jnp.shape(end), jnp.inf, jnp.float32)
    return jnp.where(m, jax.random.uniform(k, jnp.shape(end)), jnp.inf)

  return _map_with_masks(leaf, masks, params_end, keys)


def _scoped(masks: Masks, scope: ScopeFn | None) -> Masks:
  """Masks with every leaf outside `scope` (a predicate on the path) set to None."""
  if scope is None:
    return masks
  return jax.tree_util.tree_map_with_path(
      lambda path, m: m if m is not None and scope(masks_lib.path_str(path)) else None,
      masks, is_leaf=lambda x: x is None)


@jax.jit
def _count_candidates(params_end: Params, masks: Masks):
  counts = _map_with_masks(
      lambda m, end: None if m is None else jnp.sum(m & (end < 0)), masks,
      params_end)
  return sum(jax.tree.leaves(counts), jnp.int32(0))


def num_ap_candidates(params_end: Params, masks: Masks) -> int:
  """Number of unpruned prunable weights that are negative in ``params_end``."""
  return int(_count_candidates(params_end, masks))


_SCORE_FNS = {"least_moved": jax.jit(ap_scores),
              "most_negative": jax.jit(most_negative_scores)}
_random_scores_jit = jax.jit(random_survivor_scores)


def _check_count(name: str, value: Any, upper: int) -> int:
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or not 0 <= value <= upper):
    raise ValueError(f"{name} must be an int in [0, {upper}] (the remaining "
                     f"prunable weights), got {value!r}.")
  return int(value)


def _ap_prune_counted(params_end, params_start, masks, n_remove, *,
                      selection: str = "least_moved", scope: ScopeFn | None = None,
                      key: PRNGKeyArray | None = None):
  n_remove = _check_count("n_remove", n_remove,
                          int(masks_lib.num_remaining(masks)))
  check_selection(selection, key)
  eligible = _scoped(masks, scope)
  if selection == "random":
    n_candidates = int(masks_lib.num_remaining(eligible))
  else:
    n_candidates = num_ap_candidates(params_end, eligible)
  n_take = min(n_remove, n_candidates)
  if n_take == 0:
    return masks, 0
  if selection == "random":
    scores = _random_scores_jit(key, params_end, eligible)
  else:
    scores = _SCORE_FNS[selection](params_end, params_start, eligible)
  # Leaves outside the scope scored +inf, so pruning against the full masks only
  # ever removes eligible weights.
  return masks_lib.prune_lowest(scores, masks, n_take), n_take


def check_selection(selection: str, key: PRNGKeyArray | None = None) -> None:
  """Validates an AP selection name (and that "random" comes with a key)."""
  if selection not in SELECTIONS:
    raise ValueError(f"ap_selection must be one of {SELECTIONS}, got {selection!r}.")
  if selection == "random" and key is None:
    raise ValueError('ap_selection="random" needs ap_key, a jax.random key.')


def ap_prune(params_end: Params, params_start: Params, masks: Masks,
             n_remove: int, *, selection: str = "least_moved",
             scope: ScopeFn | None = None,
             key: PRNGKeyArray | None = None) -> Masks:
  """Removes the ``n_remove`` AP candidates with the smallest |delta w|.

  Ties go to the lower (leaf order, flat index) position. If fewer than
  ``n_remove`` candidates exist, all of them are removed and a
  ``UserWarning`` reports the shortfall (:func:`prune_cycle` instead hands
  the shortfall to the host and records it in :class:`CycleInfo`).

  Args:
    params_end: weights at the end of the cycle's training.
    params_start: weights at the start of the cycle's training.
    masks: current masks.
    n_remove: int in [0, num_remaining(masks)].
    selection: "least_moved" (AP), or the controls "most_negative" and "random"
      (see :func:`prune_cycle`).
    scope: predicate on a leaf's path; only leaves where it holds lose weights.
    key: PRNG key, required by ``selection="random"``.

  Returns:
    Masks with ``min(n_remove, candidates)`` fewer unpruned entries.

  References:
    Liu, Ghosh, Tan, Motani (2023, TMLR), arXiv:2212.06145.
  """
  new_masks, removed = _ap_prune_counted(params_end, params_start, masks,
                                         n_remove, selection=selection,
                                         scope=scope, key=key)
  if removed < n_remove:
    warnings.warn(
        f"AP asked to remove {n_remove} weights but only {removed} "
        f"candidates remain; shortfall {n_remove - removed}.", stacklevel=2)
  return new_masks


def check_rates(rate: float, ap_rate: float | None) -> float:
  """Validates (p, q) = (rate, ap_rate) and returns q, 0.0 meaning no AP."""
  if not isinstance(rate, numbers.Real) or not 0.0 < rate < 1.0:
    raise ValueError(f"rate must be in (0, 1), got {rate!r}.")
  if ap_rate is None or ap_rate == 0:
    return 0.0
  if not isinstance(ap_rate, numbers.Real) or not 0.0 < ap_rate < 1.0:
    raise ValueError(
        f"ap_rate must be None, 0 or in (0, 1), got {ap_rate!r}.")
  if ap_rate > rate:
    raise ValueError(
        f"ap_rate must not exceed rate (AP takes a share of the host's "
        f"removal), got ap_rate={ap_rate!r} > rate={rate!r}.")
  return float(ap_rate)


def cycle_counts(n_remaining: int, rate: float = DEFAULT_RATE,
                 ap_rate: float | None = DEFAULT_AP_RATE) -> tuple[int, int]:
  """(host, AP) removal counts for one cycle from ``n_remaining`` weights.

  The total is ``round_half_up(rate * n_remaining)``, what the host alone
  would remove; AP's share is ``round_half_up(ap_rate * n_remaining)`` and the
  host takes the difference, so the two always sum to the total.
  """
  ap_rate = check_rates(rate, ap_rate)
  total = scoring.round_half_up(rate * n_remaining)
  n_ap = min(scoring.round_half_up(ap_rate * n_remaining), total)
  return total - n_ap, n_ap


def prune_cycle(method: str, params_end: Params, params_start: Params,
                masks: Masks, *, rate: float = DEFAULT_RATE,
                ap_rate: float | None = DEFAULT_AP_RATE,
                ap_selection: str = "least_moved", ap_scope: ScopeFn | None = None,
                ap_key: PRNGKeyArray | None = None,
                **host_kwargs: Any) -> tuple[Masks, CycleInfo]:
  """One pruning cycle: host method, then AP among the survivors.

  With ``n_rem`` weights remaining before the cycle (measured before host
  pruning), AP removes ``round_half_up(ap_rate * n_rem)`` among the host's
  survivors and the host, scoring ``params_end``, removes the rest of the
  host-alone total ``round_half_up(rate * n_rem)`` (see :func:`cycle_counts`),
  so the cycle removes exactly that total. When AP finds too few negative
  candidates, the host removes the shortfall so the total stays exact.
  ``ap_rate=None`` or ``0`` is the host alone. Defaults p = 0.2, q = 0.02
  follow the reference implementation.

  Args:
    method: host method name, one of :data:`pruning_jax.scoring.METHODS`.
    params_end: weights at the end of the cycle's training.
    params_start: weights at the start of the cycle's training.
    masks: current masks.
    rate: per-cycle pruning fraction p of the remaining weights, in (0, 1).
    ap_rate: AP's share q, ``None``/0 or in (0, rate].
    ap_selection: how the q share is chosen: "least_moved" (AP), or the controls
      "most_negative" (the most negative survivors) and "random" (uniformly random
      survivors, negative or not; needs ``ap_key``).
    ap_scope: predicate on a weight's path ("hidden/1/kernel"); AP only removes
      weights of leaves where it is True (None: every prunable leaf). Used for the
      AP variant restricted to layers whose inputs come from a ReLU.
    ap_key: PRNG key of the "random" control.
    **host_kwargs: passed to :func:`pruning_jax.scoring.host_prune`.

  Returns:
    The new masks and the cycle's :class:`CycleInfo`.

  References:
    Liu, Ghosh, Tan, Motani (2023, TMLR), arXiv:2212.06145.
  """
  check_selection(ap_selection, ap_key)
  n_rem = int(masks_lib.num_remaining(masks))
  n_host, n_ap = cycle_counts(n_rem, rate, ap_rate)
  masks = scoring.host_prune(method, params_end, masks, n_host, **host_kwargs)
  masks, ap_removed = _ap_prune_counted(params_end, params_start, masks, n_ap,
                                        selection=ap_selection, scope=ap_scope,
                                        key=ap_key)
  shortfall = n_ap - ap_removed
  if shortfall:
    masks = scoring.host_prune(method, params_end, masks, shortfall,
                               **host_kwargs)
  return masks, CycleInfo(n_remaining_before=n_rem,
                          host_removed=n_host + shortfall,
                          ap_removed=ap_removed, ap_shortfall=shortfall)

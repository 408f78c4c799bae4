"""Host pruning criteria as pure scoring rules.

Every rule maps parameters (plus masks, a loss or an apply function where the
criterion needs them) to a scores pytree shaped like ``params``; higher means
more important. Pruning removes the lowest-scoring unpruned prunable entries
(:func:`pruning_jax.masks.prune_lowest`), so only leaves whose mask is not
``None`` are consulted; the others carry the same rule evaluated on the leaf.
:func:`compute_scores` dispatches on a method name and :func:`host_prune`
turns scores into masks with an exact removal count.
"""

from collections.abc import Callable, Sequence
import itertools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray, PyTree

from pruning_jax import distributions
from pruning_jax import masks as masks_lib
from pruning_jax import schedules

Params = PyTree[Float[Array, "..."]]
Masks = PyTree[Bool[Array, "..."] | None]
Scores = PyTree[Float[Array, "..."]]
LossFn = Callable[[Params, Any], Float[Array, ""]]
ApplyFn = Callable[[Params, Float[Array, "1 ..."]], Float[Array, "1 ..."]]

METHODS = ("magnitude", "layerwise_magnitude", "random", "lamp", "snip", "grasp", "synflow")


def _map_with_masks(fn, params, masks):
  # Masks go first: their `None` leaves would otherwise not match the arrays.
  return jax.tree.map(lambda m, p: fn(p, m), masks, params,
                      is_leaf=lambda x: x is None)


def round_half_up(x: float) -> int:
  """Rounds to the nearest integer, halves upwards (Python rounds to even)."""
  return int(math.floor(x + 0.5))


def magnitude_scores(params: Params) -> Scores:
  """Plain unnormalised magnitude |w| of every leaf.

  Pruned globally with ``prune_lowest`` or layer-wise with
  ``prune_lowest_per_leaf`` (the ``"layerwise_magnitude"`` method).

  References:
    Han, Pool, Tran, Dally (2015), arXiv:1506.02626.
  """
  return jax.tree.map(jnp.abs, params)


def random_scores(key: PRNGKeyArray, params: Params) -> Scores:
  """Independent U[0, 1) float32 scores: the random-pruning baseline.

  The same ``key`` gives the same scores; ``params`` fixes only the shapes.
  """
  leaves, treedef = jax.tree.flatten(params)
  sizes = [math.prod(jnp.shape(leaf)) for leaf in leaves]
  # One draw split into leaves: a single random program however many leaves.
  flat_N = jax.random.uniform(key, (sum(sizes),), jnp.float32)
  offsets = list(itertools.accumulate(sizes))[:-1]
  return jax.tree.unflatten(treedef, [
      part.reshape(jnp.shape(leaf))
      for part, leaf in zip(jnp.split(flat_N, offsets), leaves)
  ])


def _lamp_leaf(w: Float[Array, "..."],
               m: Bool[Array, "..."] | None) -> Float[Array, "..."]:
  kept = w if m is None else jnp.where(m, w, 0)
  w2_N = jnp.reshape(kept, -1).astype(jnp.result_type(w, jnp.float32))**2
  # Stable sort: among equal weights the lower flat index gets the smaller
  # score, matching prune_lowest's tie rule.
  order_N = jnp.argsort(w2_N, stable=True)
  sorted_N = w2_N[order_N]
  suffix_N = jnp.cumsum(sorted_N[::-1])[::-1]
  # A zero suffix sum only follows zero weights, which then score 0 / 1.
  ratio_N = sorted_N / jnp.where(suffix_N > 0, suffix_N, 1.0)
  scores_N = jnp.zeros_like(ratio_N).at[order_N].set(ratio_N)
  return scores_N.reshape(jnp.shape(w))


def lamp_scores(params: Params, masks: Masks) -> Scores:
  """Layer-adaptive magnitude (LAMP) scores.

  Within each leaf, with the unpruned weights sorted by w^2 ascending,
  ``score(u) = w_u^2 / sum_{v >= u} w_v^2``; equal weights are ordered by
  flat index, so the earlier one scores lower. Pruned entries score 0. The
  largest weight of every leaf scores exactly 1, so global pruning of the
  lowest scores never empties a layer while another still has a score below 1.

  Non-prunable leaves are scored unmasked.

  References:
    Lee, Park, Mo, Ahn, Shin (2021), arXiv:2010.07611.
  """
  return _map_with_masks(_lamp_leaf, params, masks)


def snip_scores(loss_fn: LossFn, params: Params, masks: Masks,
                batch: Any) -> Scores:
  """SNIP connection sensitivity |g * w| at the masked parameters.

  The paper's normalisation by the total sensitivity is a global constant and
  does not change the ranking, so it is left out.

  ``loss_fn(params, batch) -> scalar``; pruned entries score 0.

  References:
    Lee, Ajanthan, Torr (2019), arXiv:1810.02340.
  """
  masked = masks_lib.apply_masks(params, masks)
  grads = jax.grad(loss_fn)(masked, batch)
  return jax.tree.map(lambda g, w: jnp.abs(g * w), grads, masked)


def grasp_scores(loss_fn: LossFn, params: Params, masks: Masks,
                 batch: Any) -> Scores:
  """GraSP gradient-flow scores, signed so that the LOWEST are removed.

  GraSP defines ``S(-w) = -w * (H g)`` and removes the weights with the
  HIGHEST S, the ones whose removal reduces the gradient norm the least. This
  returns ``w * (H g) = -S(-w)``, so removing the lowest returned scores is
  exactly GraSP's rule. ``H g`` comes from forward-over-reverse
  differentiation (``jax.jvp`` of ``jax.grad``) at the masked parameters, with
  the gradient direction restricted to unpruned entries because pruned
  weights are frozen at zero.

  ``loss_fn(params, batch) -> scalar`` must be twice differentiable.

  References:
    Wang, Zhang, Grosse (2020), arXiv:2002.07376.
  """
  masked = masks_lib.apply_masks(params, masks)
  grad_fn = lambda p: jax.grad(loss_fn)(p, batch)
  direction = masks_lib.apply_masks(grad_fn(masked), masks)
  _, hg = jax.jvp(grad_fn, (masked,), (direction,))
  return jax.tree.map(lambda w, h: w * h, masked, hg)


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
  shape = tuple(input_shape) if isinstance(input_shape, Sequence) else None
  if not shape or not all(
      isinstance(s, numbers.Integral) and s > 0 for s in shape):
    raise ValueError(
        f"input_shape must be a non-empty sequence of positive ints (one "
        f"example, without batch axis), got {input_shape!r}.")
  return tuple(int(s) for s in shape)


def synflow_scores(apply_fn: ApplyFn, params: Params, masks: Masks,
                   input_shape: Sequence[int]) -> Scores:
  """Data-free SynFlow scores |dR/dw * w|.

  Every parameter (prunable or not) is replaced by its absolute value and an
  all-ones input of shape ``[1, *input_shape]`` is fed forward; ``R`` is the
  sum of the outputs. ``apply_fn(params, x)`` must not use batch statistics:
  models with BatchNorm are evaluated in inference mode (e.g. an NNX model
  after ``model.eval()``), where BatchNorm is a fixed affine map of its
  running statistics, which stay as they are since they are not in
  ``params``. Deep networks can overflow float32 in ``R``; enable
  ``jax_enable_x64`` and pass float64 params for those.

  Pruned entries score 0.

  References:
    Tanaka, Kunin, Yamins, Ganguli (2020), arXiv:2006.05467.
  """
  shape = _check_input_shape(input_shape)
  positive = jax.tree.map(jnp.abs, masks_lib.apply_masks(params, masks))
  dtype = jnp.result_type(*jax.tree.leaves(positive))
  x = jnp.ones((1, *shape), dtype)
  grads = jax.grad(lambda p: jnp.sum(apply_fn(p, x)))(positive)
  return jax.tree.map(lambda g, w: jnp.abs(g * w), grads, positive)


# Host-side entry points call compiled rules: op-by-op dispatch of the sorts
# and scatters would otherwise dominate a pruning round.
_magnitude_jit = jax.jit(magnitude_scores)
_random_jit = jax.jit(random_scores)
_lamp_jit = jax.jit(lamp_scores)
_snip_jit = jax.jit(snip_scores, static_argnums=0)
_grasp_jit = jax.jit(grasp_scores, static_argnums=0)
_synflow_jit = jax.jit(synflow_scores, static_argnums=(0, 3))


def _synflow_iterative(apply_fn, params, masks, input_shape, n_remove,
                       iterations):
  shape = _check_input_shape(input_shape)
  n_start = int(masks_lib.num_remaining(masks))
  n_final = n_start - n_remove
  if n_remove == 0:
    return masks
  for i in range(1, iterations + 1):
    keep = n_final if i == iterations else round_half_up(
        n_start * (n_final / n_start)**(i / iterations))
    n_now = int(masks_lib.num_remaining(masks))
    if n_now > keep:
      # One compilation serves every round: only mask values change.
      scores = _synflow_jit(apply_fn, params, masks, shape)
      masks = masks_lib.prune_lowest(scores, masks, n_now - keep)
  return masks


def _check_iterations(iterations: int) -> None:
  if (isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral)
      or iterations < 1):
    raise ValueError(f"iterations must be an int >= 1, got {iterations!r}.")


def synflow_prune(apply_fn: ApplyFn, params: Params, masks: Masks,
                  input_shape: Sequence[int], target_sparsity: float,
                  iterations: int = 100) -> Masks:
  """Iterative SynFlow: rescore after each of ``iterations`` pruning rounds.

  With ``n0`` weights remaining at the start and ``n_final`` at the target,
  round ``i`` of ``n`` keeps ``round_half_up(n0 * (n_final / n0)^(i / n))``
  weights (the paper's exponential schedule; from dense masks the kept
  fraction is ``(1 - target)^(i / n)``) and the last round lands exactly on
  ``remove_count(masks, target_sparsity)`` removals. Masks already at or
  above the target are returned unchanged.

  Args:
    apply_fn: as for :func:`synflow_scores`.
    params: parameter pytree.
    masks: starting masks.
    input_shape: shape of one example, without the batch axis.
    target_sparsity: final prunable sparsity in [0, 1).
    iterations: number of score-and-prune rounds, >= 1.

  Returns:
    Masks at exactly the target count.

  References:
    Tanaka, Kunin, Yamins, Ganguli (2020), arXiv:2006.05467.
  """
  _check_input_shape(input_shape)
  _check_iterations(iterations)
  # remove_count checks the range and is never negative.
  n_remove = masks_lib.remove_count(masks, target_sparsity)
  return _synflow_iterative(apply_fn, params, masks, input_shape, n_remove,
                            iterations)


def layerwise_counts(masks: Masks, n_remove: int) -> list[int]:
  """Splits ``n_remove`` over prunable leaves in proportion to what remains.

  Each leaf ideally loses ``n_remove * r_l / R`` of its ``r_l`` remaining
  weights (the same fraction everywhere). Rounding uses the largest-remainder
  rule in exact integer arithmetic: every leaf gets the floor, then the
  leftover units go to the largest fractional parts, ties to the earlier leaf,
  so the counts sum exactly to ``n_remove`` and never exceed ``r_l``.

  Returns one count per prunable leaf, in leaf order.
  """
  remaining = [int(jnp.sum(m)) for m in jax.tree.leaves(masks)]
  total = sum(remaining)
  _check_n_remove(n_remove, total)
  if total == 0:
    return [0] * len(remaining)
  base = [n_remove * r // total for r in remaining]
  frac = [n_remove * r % total for r in remaining]
  leftover = n_remove - sum(base)
  order = sorted(range(len(remaining)), key=lambda l: (-frac[l], l))
  for leaf in order[:leftover]:
    base[leaf] += 1
  return base


def _check_n_remove(n_remove: int, n_remaining: int) -> None:
  if (isinstance(n_remove, bool) or not isinstance(n_remove, numbers.Integral)
      or not 0 <= n_remove <= n_remaining):
    raise ValueError(f"n_remove must be an int in [0, {n_remaining}] (the "
                     f"remaining prunable weights), got {n_remove!r}.")


def gradual_magnitude_masks(params: Params, masks: Masks, step: int,
                            schedule_kwargs: dict[str, Any], *,
                            distribution: str = "global") -> Masks:
  """One step of gradual magnitude pruning on the cubic schedule.

  The target sparsity ``s_t = schedules.zhu_gupta(step, **schedule_kwargs)``
  is reached by removing the smallest magnitudes globally
  (``distribution="global"``) or layer-wise, every prunable leaf brought to
  ``s_t`` on its own (``"uniform"``; ``"erk"`` allocates per-leaf targets by
  Erdos-Renyi-Kernel). Leaves or masks already at or above their target are
  left unchanged, so calling this at every step is safe.

  Args:
    params: parameter pytree.
    masks: current masks.
    step: training step.
    schedule_kwargs: the remaining arguments of ``schedules.zhu_gupta``.
    distribution: one of ``distributions.DISTRIBUTIONS``.

  Returns:
    Masks at the schedule's sparsity for ``step``.

  References:
    Zhu, Gupta (2017), arXiv:1710.01878.
  """
  if distribution not in distributions.DISTRIBUTIONS:
    raise ValueError(f"distribution must be one of "
                     f"{distributions.DISTRIBUTIONS}, got {distribution!r}.")
  target = float(schedules.zhu_gupta(step, **schedule_kwargs))
  return distributions.prune_to_sparsity(_magnitude_jit(params), masks, target,
                                         distribution)


def _require(method: str, **named: Any) -> None:
  for name, value in named.items():
    if value is None:
      raise ValueError(f"method {method!r} needs `{name}`, got None.")


def compute_scores(method: str, params: Params, masks: Masks, *,
                   key: PRNGKeyArray | None = None,
                   loss_fn: LossFn | None = None, batch: Any = None,
                   apply_fn: ApplyFn | None = None,
                   input_shape: Sequence[int] | None = None) -> Scores:
  """Scores of a host method named in :data:`METHODS`; higher is kept.

  ``"random"`` needs ``key``; ``"snip"`` and ``"grasp"`` need ``loss_fn``
  and ``batch``; ``"synflow"`` needs ``apply_fn`` and ``input_shape``.
  ``"layerwise_magnitude"`` shares the magnitude scores (it differs only in
  how :func:`host_prune` allocates the removals). Rules run compiled, once
  per structure and callable.

  Args:
    method: host method name.
    params: parameter pytree.
    masks: current masks.
    key, loss_fn, batch, apply_fn, input_shape: see the rules above.

  Returns:
    Scores shaped like ``params``.
  """
  if method in ("magnitude", "layerwise_magnitude"):
    return _magnitude_jit(params)
  if method == "random":
    _require(method, key=key)
    return _random_jit(key, params)
  if method == "lamp":
    return _lamp_jit(params, masks)
  if method in ("snip", "grasp"):
    _require(method, loss_fn=loss_fn, batch=batch)
    fn = _snip_jit if method == "snip" else _grasp_jit
    return fn(loss_fn, params, masks, batch)
  if method == "synflow":
    _require(method, apply_fn=apply_fn, input_shape=input_shape)
    return _synflow_jit(apply_fn, params, masks,
                        _check_input_shape(input_shape))
  raise ValueError(f"method must be one of {METHODS}, got {method!r}.")


def host_prune(method: str, params: Params, masks: Masks, n_remove: int, *,
               iterations: int = 1, **kwargs: Any) -> Masks:
  """Removes exactly ``n_remove`` unpruned prunable weights by ``method``.

  All methods prune the lowest scores globally, except
  ``"layerwise_magnitude"``, which removes the same fraction of the remaining
  weights from every prunable leaf with the counts of
  :func:`layerwise_counts`. For ``"synflow"``, ``iterations > 1`` runs the
  iterative schedule of :func:`synflow_prune` towards the same count.

  Args:
    method: host method name, one of :data:`METHODS`.
    params: parameter pytree (e.g. the weights at the end of training).
    masks: current masks.
    n_remove: int in [0, num_remaining(masks)].
    iterations: SynFlow rounds (1 is one-shot); only ``"synflow"`` takes > 1.
    **kwargs: keyword arguments of :func:`compute_scores`.

  Returns:
    Masks with exactly ``n_remove`` fewer unpruned entries.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  _check_iterations(iterations)
  if iterations > 1 and method != "synflow":
    raise ValueError(f"iterations > 1 is only defined for method 'synflow', "
                     f"got iterations={iterations} with method {method!r}.")
  _check_n_remove(n_remove, int(masks_lib.num_remaining(masks)))
  if method == "layerwise_magnitude":
    counts = layerwise_counts(masks, n_remove)
    return masks_lib.prune_lowest_per_leaf(_magnitude_jit(params), masks, counts)
  if method == "synflow" and iterations > 1:
    _require(method, apply_fn=kwargs.get("apply_fn"),
             input_shape=kwargs.get("input_shape"))
    return _synflow_iterative(kwargs["apply_fn"], params, masks,
                              kwargs["input_shape"], n_remove, iterations)
  scores = compute_scores(method, params, masks, **kwargs)
  return masks_lib.prune_lowest(scores, masks, n_remove)

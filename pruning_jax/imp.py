"""Iterative magnitude pruning (IMP) cycles with rewinding or re-initialisation.

A cycle trains the masked network, prunes with a host method (optionally
combined with AP, :func:`pruning_jax.ap.prune_cycle`) and resets the
surviving weights: rewound to their initial values (lottery tickets), to the
weights saved at step t of the first training run (rewinding), or freshly
re-initialised (the random re-initialisation control).
"""

from collections.abc import Callable
import dataclasses
import numbers
from typing import Any, NamedTuple

import jax
from jaxtyping import Array, Bool, Float, PRNGKeyArray, PyTree

from pruning_jax import ap
from pruning_jax import masks as masks_lib

Params = PyTree[Float[Array, "..."]]
Masks = PyTree[Bool[Array, "..."] | None]
# train_fn(params, masks, cycle) -> (params_end, params_at_rewind_step).
TrainFn = Callable[[Params, Masks, int], tuple[Params, Params]]


@dataclasses.dataclass(frozen=True)
class IMPConfig:
  """Settings of an IMP run.

  Attributes:
    rate: fraction p of the remaining weights removed per cycle, in (0, 1).
    ap_rate: AP's share q of that removal, ``None``/0 (host alone) or in
      (0, rate].
    cycles: number of train-prune-reset cycles, >= 1.
    rewind_step: training step whose weights survivors are rewound to; 0
      rewinds to initialisation.
  """
  rate: float = ap.DEFAULT_RATE
  ap_rate: float | None = ap.DEFAULT_AP_RATE
  cycles: int = 10
  rewind_step: int = 0

  def __post_init__(self):
    ap.check_rates(self.rate, self.ap_rate)
    if not _is_int(self.cycles) or self.cycles < 1:
      raise ValueError(f"cycles must be an int >= 1, got {self.cycles!r}.")
    if not _is_int(self.rewind_step) or self.rewind_step < 0:
      raise ValueError(
          f"rewind_step must be an int >= 0, got {self.rewind_step!r}.")

  def expected_sparsity(self, cycle: int) -> float:
    """Sparsity ``1 - (1 - rate)^cycle`` after ``cycle`` cycles from dense."""
    return 1.0 - (1.0 - self.rate)**cycle


class IMPResult(NamedTuple):
  """Outcome of :func:`run_imp`.

  Attributes:
    params: reset survivors after the last pruning, ready for final training.
    masks: masks after the last pruning.
    history: one :class:`pruning_jax.ap.CycleInfo` per cycle.
    rewind_params: the rewind target (unused by the re-initialisation
      control).
  """
  params: Params
  masks: Masks
  history: tuple[ap.CycleInfo, ...]
  rewind_params: Params


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_same_shapes(name: str, tree: Params, reference: Params,
                       reference_name: str) -> None:
  if jax.tree.structure(tree) != jax.tree.structure(reference):
    raise ValueError(
        f"{name} must have the structure of {reference_name}, got "
        f"{jax.tree.structure(tree)} vs {jax.tree.structure(reference)}.")
  for leaf, ref in zip(jax.tree.leaves(tree), jax.tree.leaves(reference)):
    if leaf.shape != ref.shape:
      raise ValueError(f"{name} must have the leaf shapes of {reference_name},"
                       f" got {leaf.shape} where {ref.shape} is expected.")


def rewind(params: Params, rewind_params: Params, masks: Masks) -> Params:
  """Rewinds every parameter to ``rewind_params`` and re-applies ``masks``.

  Survivors take their values from ``rewind_params`` (initialisation, or the
  weights saved at step t), pruned weights are zero, and non-prunable
  parameters (biases, norms) are restored from ``rewind_params`` too.
  ``params`` (the trained weights) only fixes the expected structure.

  Args:
    params: trained parameters.
    rewind_params: parameters to rewind to, shaped like ``params``.
    masks: current masks.

  Returns:
    ``rewind_params`` with the pruned entries zeroed.

  References:
    Frankle, Carbin (2019), arXiv:1803.03635.
    Frankle, Dziugaite, Roy, Carbin (2020), arXiv:1912.05671.
  """
  _check_same_shapes("rewind_params", rewind_params, params, "params")
  masks_lib.check_masks(rewind_params, masks, "rewind_params")
  return masks_lib.apply_masks(rewind_params, masks)


def reinit(key: PRNGKeyArray, init_params_fn: Callable[[PRNGKeyArray],
                                                         Params],
           masks: Masks) -> Params:
  """Freshly initialised parameters under the same ``masks``.

  The random re-initialisation control: same sparsity pattern, new values.

  Args:
    key: PRNG key for the new initialisation.
    init_params_fn: ``init_params_fn(key) -> params``.
    masks: current masks.

  Returns:
    ``init_params_fn(key)`` with the pruned entries zeroed.

  References:
    Frankle, Carbin (2019), arXiv:1803.03635.
  """
  params = init_params_fn(key)
  masks_lib.check_masks(params, masks, "init_params_fn(key)")
  return masks_lib.apply_masks(params, masks)


def run_imp(config: IMPConfig, train_fn: TrainFn, init_params: Params,
            masks: Masks, *, method: str = "magnitude",
            reinit_key: PRNGKeyArray | None = None,
            init_params_fn: Callable[[PRNGKeyArray], Params] | None = None,
            **host_kwargs: Any) -> IMPResult:
  """Runs ``config.cycles`` train-prune-reset cycles.

  Each cycle calls ``train_fn(params, masks, cycle)``, which trains the masked
  network and returns ``(params_end, params_at_rewind_step)``; the second
  item is only read in cycle 0 when ``config.rewind_step > 0`` and is the
  snapshot all later cycles rewind to. Pruning is :func:`ap.prune_cycle`
  with AP's start weights being those the cycle's training started from. A
  ``key`` in ``host_kwargs`` (random host) is folded with the cycle index so
  each cycle draws fresh scores. Passing ``reinit_key`` and
  ``init_params_fn`` replaces rewinding by :func:`reinit`. The returned
  params still need the final training run.

  Args:
    config: rates, number of cycles and rewind step.
    train_fn: ``train_fn(params, masks, cycle) -> (params_end,
      params_at_rewind_step)``, keeping pruned weights at zero.
    init_params: the initial (dense or masked) parameters.
    masks: starting masks.
    method: host method name, one of :data:`pruning_jax.scoring.METHODS`.
    reinit_key: with ``init_params_fn``, re-initialise instead of rewinding.
    init_params_fn: ``init_params_fn(key) -> params``.
    **host_kwargs: passed to :func:`pruning_jax.scoring.host_prune`.

  Returns:
    An :class:`IMPResult`.

  References:
    Frankle, Carbin (2019), arXiv:1803.03635.
    Frankle, Dziugaite, Roy, Carbin (2020), arXiv:1912.05671.
    Liu, Ghosh, Tan, Motani (2023, TMLR), arXiv:2212.06145.
  """
  if not isinstance(config, IMPConfig):
    raise ValueError(f"config must be an IMPConfig, got {type(config)}.")
  if (reinit_key is None) != (init_params_fn is None):
    raise ValueError(
        "reinit_key and init_params_fn must be given together, got "
        f"reinit_key={reinit_key!r}, init_params_fn={init_params_fn!r}.")
  masks_lib.check_masks(init_params, masks, "init_params")
  params = masks_lib.apply_masks(init_params, masks)
  rewind_params = init_params
  history = []
  for cycle in range(config.cycles):
    params_end, snapshot = train_fn(params, masks, cycle)
    if cycle == 0 and config.rewind_step > 0:
      rewind_params = snapshot
    kwargs = dict(host_kwargs)
    if kwargs.get("key") is not None:
      kwargs["key"] = jax.random.fold_in(kwargs["key"], cycle)
    masks, info = ap.prune_cycle(method, params_end, params, masks,
                                 rate=config.rate, ap_rate=config.ap_rate,
                                 **kwargs)
    history.append(info)
    if reinit_key is None:
      params = rewind(params_end, rewind_params, masks)
    else:
      params = reinit(jax.random.fold_in(reinit_key, cycle), init_params_fn,
                      masks)
  return IMPResult(params=params, masks=masks, history=tuple(history),
                   rewind_params=rewind_params)

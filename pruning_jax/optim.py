"""Optimizer wrapper that keeps pruned weights exactly zero.

`masked_optimizer` wraps any optax transformation. The masks live in the optimizer
state (`MaskedState`), so they are checkpointed, sharded and donated with it, and a
jitted train step picks up new masks without retracing (same shapes, new values).

Each update zeros the gradients of pruned entries before the inner transformation and
the resulting updates after it. The first keeps pruned entries out of the inner
statistics (Adam moments, global-norm clipping); the second is what guarantees
exactness: momentum accumulated before an entry was pruned, weight decay and any other
term the inner transformation adds never reach a pruned weight, so a weight that is 0.0
when pruned stays exactly 0.0.

Inner state is never edited. When masks change, entries of momentum-like buffers at
newly pruned positions keep their old values but are masked out of every update and,
since their gradients are zero from then on, decay geometrically under momentum or
Adam; should a pruned entry be re-enabled later, it resumes from that decayed value.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import PyTree
import optax

from pruning_jax import masks as masks_lib


class MaskedState(NamedTuple):
  """State of `masked_optimizer`.

  Attributes:
    masks: pytree like params, bool at prunable leaves (True = kept), None elsewhere.
    inner_state: the state of the wrapped transformation.
  """
  masks: PyTree
  inner_state: optax.OptState


def _zero_pruned(tree: PyTree, masks: PyTree) -> PyTree:
  return masks_lib.tree_map_masked(lambda x, m: jnp.where(m, x, jnp.zeros_like(x)), tree, masks)


def masked_optimizer(inner: optax.GradientTransformation,
                     masks: PyTree) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so pruned entries (mask False) get exactly zero updates.

  Args:
    inner: any optax transformation, e.g. `optax.chain(optax.add_decayed_weights(5e-4),
      optax.sgd(0.1, momentum=0.9))` or `optax.adam(1e-3)`.
    masks: initial masks (see `masks.init_masks`), stored in the state; replace them with
      `set_masks` or `prune_params_and_state`.

  Returns:
    An optax transformation whose state is a `MaskedState`; extra keyword arguments of
    `update` are forwarded to `inner` when it accepts them.
  """
  if not jax.tree.leaves(masks):
    raise ValueError("masks hold no prunable leaf; build them with masks.init_masks(params).")

  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    masks_lib.check_masks(params, masks)
    return MaskedState(masks=masks, inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    masks_lib.check_masks(updates, state.masks, name="updates")
    updates = _zero_pruned(updates, state.masks)
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    return _zero_pruned(updates, state.masks), MaskedState(state.masks, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _masked_states(opt_state) -> list[MaskedState]:
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MaskedState))
           if isinstance(s, MaskedState)]
  if len(found) != 1:
    raise ValueError(f"opt_state must contain exactly one MaskedState (from masked_optimizer), "
                     f"found {len(found)}.")
  return found


def get_masks(opt_state: optax.OptState) -> PyTree:
  """The masks stored in `opt_state` (a `MaskedState`, possibly nested in a chain)."""
  return _masked_states(opt_state)[0].masks


def set_masks(opt_state: optax.OptState, new_masks: PyTree) -> optax.OptState:
  """Returns `opt_state` with its masks replaced; the inner state is left as it is.

  Args:
    opt_state: state holding one `MaskedState`, possibly nested.
    new_masks: masks with the structure and shapes of the current ones.

  Returns:
    The updated optimizer state. Params are not touched: zero newly pruned weights
    with `prune_params_and_state` (or `masks.apply_masks`), since masked updates only
    keep weights where they are.
  """
  old = get_masks(opt_state)
  masks_lib.check_masks(old, new_masks, name="current masks")
  is_none = lambda x: x is None
  for (path, o), n in zip(jax.tree_util.tree_flatten_with_path(old, is_leaf=is_none)[0],
                          jax.tree.leaves(new_masks, is_leaf=is_none)):
    if (o is None) != (n is None):
      raise ValueError(f"new_masks must keep the prunable leaves of the current masks; "
                       f"{masks_lib.path_str(path)!r} is {'' if o is None else 'not '}None in "
                       f"the current masks but {n!r:.40} in new_masks.")
  return jax.tree.map(lambda s: s._replace(masks=new_masks) if isinstance(s, MaskedState) else s,
                      opt_state, is_leaf=lambda x: isinstance(x, MaskedState))


def prune_params_and_state(params: PyTree, opt_state: optax.OptState,
                           new_masks: PyTree) -> tuple[PyTree, optax.OptState]:
  """Applies new masks to params and optimizer state together.

  Args:
    params: current params.
    opt_state: state holding one `MaskedState`.
    new_masks: the new masks (e.g. from `masks.prune_lowest`).

  Returns:
    `(params with pruned entries set to 0, opt_state holding new_masks)`.
  """
  masks_lib.check_masks(params, new_masks)
  return masks_lib.apply_masks(params, new_masks), set_masks(opt_state, new_masks)

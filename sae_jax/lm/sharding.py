"""Tensor-parallel partition specs for the language-model parameters.

Megatron-style: the query/key/value projections are split over attention heads
and the MLP input over its hidden width (column parallel); the attention output
projection and the MLP output over the same axes (row parallel), so each device
computes whole heads and a slice of the MLP, and one reduction per sublayer
restores the residual stream. Everything else (embeddings, LayerNorms,
unembedding, output biases) is replicated. Build the mesh with Auto axes
(``jax.sharding.AxisType.Auto``, as ``runkit.make_mesh`` does) so that XLA
inserts those reductions::

  mesh = jax.sharding.Mesh(devices, ("model",), axis_types=(AxisType.Auto,))
  specs = param_partition_specs(params, cfg, axis_size=mesh.shape["model"])
  params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)

References:
  Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language
  Models Using Model Parallelism", arXiv 1909.08053.
"""

from collections.abc import Mapping
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from sae_jax.lm import models

MODEL = "model"

# (block parameter, leaf) -> index of the sharded axis in the stacked [l, ...] leaf.
_SHARDED_AXIS = {
    ("qkv", "kernel"): 3,      # [l, d, 3, h, e]
    ("qkv", "bias"): 2,        # [l, 3, h, e]
    ("attn_out", "kernel"): 1,  # [l, h, e, d]
    ("mlp_in", "kernel"): 2,   # [l, d, i]
    ("mlp_in", "bias"): 1,     # [l, i]
    ("mlp_out", "kernel"): 1,  # [l, i, d]
}


def param_partition_specs(params: Mapping[str, Any], cfg: models.LMConfig, *,
                          axis_name: str = MODEL,
                          axis_size: int | None = None) -> dict[str, Any]:
  """``PartitionSpec`` per parameter leaf: heads and MLP width over ``axis_name``.

  Every spec has one entry per axis of its leaf (``None`` = replicated).

  Args:
    params: parameter pytree from ``load_model`` (or its ``jax.eval_shape``).
    cfg: the model's config.
    axis_name: mesh axis for tensor parallelism.
    axis_size: size of that mesh axis; when given, it must divide both
      ``cfg.num_heads`` and ``cfg.intermediate_size``.

  Returns:
    A pytree of ``PartitionSpec`` with the structure of ``params``.

  Raises:
    ValueError: when ``axis_size`` does not divide the heads or MLP width.
  """
  if axis_size is not None:
    for name in ("num_heads", "intermediate_size"):
      if getattr(cfg, name) % axis_size:
        raise ValueError(f"axis_size={axis_size} must divide cfg.{name}={getattr(cfg, name)} to "
                         f"shard it over {axis_name!r}; pick a mesh axis size that divides it.")

  def spec(path, leaf):
    keys = tuple(getattr(k, "key", None) for k in path)
    axes = [None] * len(leaf.shape)
    if len(keys) == 3 and keys[0] == "layers" and keys[1:] in _SHARDED_AXIS:
      axes[_SHARDED_AXIS[keys[1:]]] = axis_name
    return P(*axes)

  return jax.tree_util.tree_map_with_path(spec, params)

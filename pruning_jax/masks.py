"""Pruning masks over parameter pytrees and exact global lowest-score pruning.

Masks share their params tree's structure: bool arrays (True = kept) at prunable leaves,
None elsewhere (an empty subtree to JAX: `jax.tree.leaves(masks)` lists the prunable
masks in leaf order; paths read "layers/0/kernel"). Map over both with None as a leaf:
  jax.tree.map(lambda p, m: p if m is None else p * m, params, masks,
               is_leaf=lambda x: x is None)  # or tree_map_masked(fn, params, masks)

Selection is exact and sort-free: scores map to uint32 keys ordered like the floats (-0.0
ties +0.0, NaN above +inf); a 32-step count-based binary search finds the n-th smallest
key and ties there go by global position (leaf order, then row-major index). Each step is
one fused count (tens of ms for ~1M parameters on CPU, under an argsort), and the count is
traced, unlike `lax.top_k`'s, so rounds reuse one program; `shard_map` `psum`s the counts.
"""

from collections.abc import Callable, Mapping, Sequence
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int, PyTree
import numpy as np

Predicate = Callable[[tuple, object], bool]
_DEAD = 0xFFFFFFFF  # key of pruned entries: above every score key, NaN included


def _is_none(x) -> bool:
  return x is None


def _names(path) -> list[str]:
  names = [str(next((getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)), k))
           for k in path]
  # nnx.Param keeps its array in the attribute `value`, which names no layer.
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
    names.pop()
  return names


def path_str(path) -> str:
  """Formats a pytree key path as "a/b/kernel"."""
  return "/".join(_names(path)) or "<root>"


def _matches(pattern: str, names: list[str]) -> bool:
  parts = pattern.strip("/").split("/")
  return any(names[i:i + len(parts)] == parts for i in range(len(names) - len(parts) + 1))


def default_prunable(path, leaf) -> bool:
  """Conv and dense kernels: the last path key is "kernel" and the leaf has ndim >= 2."""
  return bool(_names(path)[-1:] == ["kernel"] and jnp.ndim(leaf) >= 2)


def prunable_predicate(include_bn_scale: bool = False, include_last_layer: bool = True,
                       exclude: str | Sequence[str] = (),
                       last_layer: str | None = None) -> Predicate:
  """Builds a prunable-leaf predicate for `init_masks`.

  A pattern ("head", "layers/3") matches leaves whose path contains its components.

  Args:
    include_bn_scale: also prune 1-D "scale" leaves (BatchNorm, as AP's reference code
      does; LayerNorm scales match too, so exclude those by pattern if needed).
    include_last_layer: prune the output layer. When False, `last_layer` must name it:
      nnx State orders leaves by attribute name, so leaf order does not reveal it.
    exclude: patterns of leaves never pruned.
    last_layer: pattern of the output layer (ignored when include_last_layer=True).

  Returns:
    A `(path, leaf) -> bool` predicate.
  """
  exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
  if not all(isinstance(p, str) and p.strip("/") for p in exclude):
    raise ValueError(f"exclude must hold non-empty path patterns, got {exclude!r}.")
  if not include_last_layer and not last_layer:
    raise ValueError("include_last_layer=False needs last_layer='<path of the output layer>' "
                     "(e.g. 'head' or 'layers/3'): leaves are ordered by name, so the output "
                     "layer cannot be inferred from leaf order.")
  excluded = exclude + (() if include_last_layer else (last_layer,))

  def predicate(path, leaf) -> bool:
    names = _names(path)
    if any(_matches(p, names) for p in excluded):
      return False
    scale = include_bn_scale and names[-1:] == ["scale"] and jnp.ndim(leaf) == 1
    return default_prunable(path, leaf) or bool(scale)

  return predicate


def check_masks(params: PyTree, masks: PyTree, name: str = "params") -> None:
  """Raises ValueError naming the first path where `masks` does not fit `params`.

  Masks fit when both trees have the same structure (None counted as a leaf) and every
  non-None mask is a bool array of its param's shape; a None mask accepts any leaf.
  """
  p_flat, p_def = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_none)
  m_flat, m_def = jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)
  if p_def != m_def:
    pad = [(None, None)] * abs(len(p_flat) - len(m_flat))
    first = next(((pp, mp) for (pp, _), (mp, _) in zip(p_flat + pad, m_flat + pad)
                  if pp != mp), ((), ()))
    p_path, m_path = ("<missing>" if q is None else path_str(q) for q in first)
    raise ValueError(f"masks do not match {name}: first mismatching path is {p_path!r} in "
                     f"{name} vs {m_path!r} in masks; build masks with init_masks({name}).")
  for (path, p), (_, m) in zip(p_flat, m_flat):
    if m is not None and (p is None or jnp.shape(p) != jnp.shape(m)
                          or jnp.result_type(m) != jnp.bool_):
      raise ValueError(f"masks do not match {name} at {path_str(path)!r}: {name} shape "
                       f"{None if p is None else jnp.shape(p)}, mask shape {jnp.shape(m)}, "
                       f"dtype {jnp.result_type(m)} (need the same shape, bool).")


def init_masks(params: PyTree, predicate: Predicate = default_prunable) -> PyTree:
  """All-True bool masks at the leaves `predicate(path, leaf)` selects, None elsewhere."""
  masks = jax.tree_util.tree_map_with_path(  # ones_like keeps each leaf's sharding
      lambda p, x: None if x is None or not predicate(p, x) else jnp.ones_like(x, bool),
      params, is_leaf=_is_none)
  if not jax.tree.leaves(masks):
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    raise ValueError(f"the predicate selects no prunable parameter among {len(paths)} leaves "
                     f"(e.g. {paths[:4]}); use a predicate matching at least one leaf.")
  return masks


def tree_map_masked(fn: Callable, params: PyTree, masks: PyTree) -> PyTree:
  """Returns params with `fn(param, mask)` at prunable leaves, other leaves untouched."""
  check_masks(params, masks)
  return jax.tree.map(lambda p, m: p if m is None else fn(p, m), params, masks, is_leaf=_is_none)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """Zeros the pruned entries of params (dtype kept; NaN or inf there become 0 too)."""
  return tree_map_masked(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def num_prunable(masks: PyTree) -> int:
  """Number of prunable entries (static: shapes only)."""
  return sum(int(np.prod(jnp.shape(m))) for m in jax.tree.leaves(masks))


def num_remaining(masks: PyTree) -> Int[Array, ""]:
  """Number of unpruned prunable entries."""
  return sum((jnp.sum(m, dtype=jnp.int32) for m in jax.tree.leaves(masks)), jnp.int32(0))


def sparsity(masks: PyTree) -> Float[Array, ""]:
  """Pruned fraction of the prunable entries (non-prunable leaves do not count)."""
  total = num_prunable(masks)
  if total == 0:
    raise ValueError("masks hold no prunable leaf; build them with init_masks(params).")
  return 1.0 - num_remaining(masks).astype(jnp.float32) / total


def layer_sparsities(masks: PyTree) -> dict[str, float]:
  """Pruned fraction per prunable leaf, keyed by `path_str`, in leaf order (host floats)."""
  return {path_str(p): (m.size - int(jnp.sum(m, dtype=jnp.int32))) / max(m.size, 1)
          for p, m in jax.tree_util.tree_flatten_with_path(masks)[0]}


def remove_count(masks: PyTree, target_sparsity: float) -> int:
  """How many more entries to prune so the prunable sparsity becomes `target_sparsity`.

  The pruned total round(target_sparsity * num_prunable) rounds halves up; never negative.
  """
  target_sparsity = float(target_sparsity)
  if not 0.0 <= target_sparsity < 1.0:
    raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}.")
  total = num_prunable(masks)
  pruned = total - int(num_remaining(masks))
  return max(0, int(np.floor(target_sparsity * total + 0.5)) - pruned)


def _order_keys(scores: Array, alive: Array) -> Array:
  x = jnp.asarray(scores).astype(jnp.float32)
  x = jnp.where(x == 0, jnp.float32(0), x)  # -0.0 must tie with +0.0
  x = jnp.where(jnp.isnan(x), jnp.float32(np.nan), x)  # one NaN pattern: above +inf
  bits = lax.bitcast_convert_type(x, jnp.uint32)
  # Negative floats order reversed by magnitude: flip all bits; positives: set the sign.
  key = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))
  return jnp.where(alive, key, jnp.uint32(_DEAD))


def _global_counts(per_leaf: list, sharded: list, axis_name) -> Int[Array, "l"]:
  """Per-leaf totals over all devices, typed device-invariant (replicas count once)."""
  zero = jnp.int32(0)
  total_L = jnp.stack([zero if s else c for c, s in zip(per_leaf, sharded)])
  if any(sharded):
    total_L = total_L + lax.psum(
        jnp.stack([c if s else zero for c, s in zip(per_leaf, sharded)]), axis_name)
  return total_L


def _tie_rank(tie: Array, dim: int | None, axis_name) -> Array:
  """Exclusive rank of each tie among the leaf's ties in global row-major order."""
  tie_RxI = tie.reshape(int(np.prod(tie.shape[:dim or 0])), -1).astype(jnp.int32)
  within_RxI = jnp.cumsum(tie_RxI, axis=1) - tie_RxI
  if dim is None:
    return within_RxI
  # For each index of the dims before `dim` (a "row"), global row-major order visits the
  # devices' blocks in mesh order, so per-row tie counts of every device fix the offsets.
  count_DxR = lax.all_gather(jnp.sum(tie_RxI, axis=1), axis_name)
  earlier_D = jnp.arange(count_DxR.shape[0]) < lax.axis_index(axis_name)
  before_me_R = jnp.sum(jnp.where(earlier_D[:, None], count_DxR, 0), axis=0)
  row_R = jnp.sum(count_DxR, axis=0)
  return (jnp.cumsum(row_R) - row_R + before_me_R)[:, None] + within_RxI


def _select(keys, n_G, groups, dims, axis_name=None):
  """Per group g, bool arrays marking the n_G[g] lowest keys (ties by global position)."""
  sharded = [d is not None for d in dims]
  # same_LxL[l, j]: leaf j precedes leaf l within l's group (static, for tie offsets).
  same_LxL = np.array([[j < l and gj == gl for j, gj in enumerate(groups)]
                       for l, gl in enumerate(groups)], np.int32).reshape(len(groups), -1)

  def group_count(per_leaf):
    total_L = _global_counts(per_leaf, sharded, axis_name)
    return jnp.zeros(n_G.shape, jnp.int32).at[jnp.asarray(groups)].add(total_L)

  def body(_, bounds):
    lo_G, hi_G = bounds
    mid_G = lo_G + (hi_G - lo_G) // 2
    enough_G = group_count([jnp.sum(k <= mid_G[g], dtype=jnp.int32)
                            for k, g in zip(keys, groups)]) >= n_G
    return jnp.where(enough_G, lo_G, mid_G + 1), jnp.where(enough_G, mid_G, hi_G)

  # Smallest key t with count(key <= t) >= n; 32 halvings close the uint32 range.
  bounds = (jnp.zeros(n_G.shape, jnp.uint32), jnp.full(n_G.shape, _DEAD, jnp.uint32))
  thr_G, _ = lax.fori_loop(0, 32, body, bounds)
  need_G = n_G - group_count([jnp.sum(k < thr_G[g], dtype=jnp.int32)
                              for k, g in zip(keys, groups)])
  ties = [k == thr_G[g] for k, g in zip(keys, groups)]
  offset_L = same_LxL @ _global_counts([jnp.sum(t, dtype=jnp.int32) for t in ties],
                                       sharded, axis_name)
  return [(k < thr_G[g])
          | (t & ((offset_L[l] + _tie_rank(t, d, axis_name)).reshape(t.shape) < need_G[g]))
          for l, (k, t, g, d) in enumerate(zip(keys, ties, groups, dims))]


@jax.jit
def prune_lowest_leaves(scores: Sequence[Float[Array, "..."]],
                        masks: Sequence[Bool[Array, "..."]],
                        n_remove: Int[Array, ""] | Int[Array, "l"]) -> list[Bool[Array, "..."]]:
  """Pure, jitted core of `prune_lowest` and `prune_lowest_per_leaf` over leaf lists.

  Args:
    scores: one array per prunable leaf (compared as float32).
    masks: bool arrays of the same shapes; only True entries can be pruned.
    n_remove: traced scalar (global) or per-leaf vector, in [0, unpruned] (unchecked).

  Returns:
    The new masks: exactly n_remove more lowest-score entries set to False.
  """
  n_remove = jnp.asarray(n_remove, jnp.int32)
  per_leaf = n_remove.ndim == 1
  groups = tuple(range(len(scores))) if per_leaf else (0,) * len(scores)
  keys = [_order_keys(s, m) for s, m in zip(scores, masks)]
  removed = _select(keys, n_remove if per_leaf else n_remove[None], groups, (None,) * len(keys))
  return [m & ~r for m, r in zip(masks, removed)]


def _concrete_count(value, name: str, upper: Callable[[], int]) -> int:
  if (isinstance(value, jax.core.Tracer) or np.ndim(value)
      or np.asarray(value).dtype.kind not in "iu"):
    raise ValueError(f"{name} must be a concrete int, got {value!r}.")
  if not 0 <= int(value) <= (upper := upper()):
    raise ValueError(f"{name} must be in [0, {upper}] (entries still unpruned), got {int(value)}.")
  return int(value)


def _per_leaf(values, masks: PyTree, name: str) -> list:
  """Per-leaf values from a leaf-order sequence, a path dict or a pytree like masks."""
  flat, m_def = jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)
  paths = [path_str(p) for p, m in flat if m is not None]
  if isinstance(values, Mapping) and set(values) == set(paths):
    return [values[p] for p in paths]
  if isinstance(values, Sequence) and not isinstance(values, str):
    if len(values) != len(paths):
      raise ValueError(f"{name} needs one value per prunable leaf ({len(paths)}: {paths}), "
                       f"got {len(values)}.")
    return list(values)
  v_flat, v_def = jax.tree_util.tree_flatten_with_path(values, is_leaf=_is_none)
  if v_def != m_def or any((v is None) != (m is None) for (_, v), (_, m) in zip(v_flat, flat)):
    raise ValueError(f"{name} must be a sequence in leaf order, a dict keyed by the prunable "
                     f"paths {paths}, or a pytree like masks; got {values!r}.")
  return [v for (_, v), (_, m) in zip(v_flat, flat) if m is not None]


def _prunable_scores(scores: PyTree, masks: PyTree) -> list[Array]:
  check_masks(scores, masks, name="scores")
  pairs = zip(jax.tree.leaves(scores, is_leaf=_is_none), jax.tree.leaves(masks, is_leaf=_is_none))
  return [s for s, m in pairs if m is not None]


def prune_lowest(scores: PyTree, masks: PyTree, n_remove: int) -> PyTree:
  """Prunes exactly `n_remove` unpruned entries with the lowest scores, globally.

  Ties go to the lower global position (leaf order, then row-major index); pruned
  entries' scores are ignored. Host-side: `prune_lowest_leaves` is the jitted core.

  Args:
    scores: pytree like params (float leaves; non-prunable leaves are ignored).
    masks: current masks (see `init_masks`).
    n_remove: concrete int in [0, num_remaining(masks)].

  Returns:
    New masks with the same structure.
  """
  leaves = _prunable_scores(scores, masks)
  n = _concrete_count(n_remove, "n_remove", lambda: int(num_remaining(masks)))
  new = prune_lowest_leaves(leaves, jax.tree.leaves(masks), jnp.int32(n))
  return jax.tree.unflatten(jax.tree.structure(masks), new)


def prune_lowest_per_leaf(scores: PyTree, masks: PyTree, n_remove_per_leaf) -> PyTree:
  """Like `prune_lowest`, with an exact count for each prunable leaf.

  Args:
    scores: pytree like params.
    masks: current masks.
    n_remove_per_leaf: one concrete int per prunable leaf, in [0, unpruned in the leaf]:
      a sequence in leaf order, a dict keyed by `path_str` (as `layer_sparsities`), or a
      pytree shaped like masks with ints at prunable leaves and None elsewhere.

  Returns:
    New masks with the same structure.
  """
  leaves = _prunable_scores(scores, masks)
  flat = jax.tree_util.tree_flatten_with_path(masks)[0]
  counts = [_concrete_count(c, f"n_remove_per_leaf[{path_str(p)!r}]",
                            lambda m=m: int(jnp.sum(m, dtype=jnp.int32)))
            for c, (p, m) in zip(_per_leaf(n_remove_per_leaf, masks, "n_remove_per_leaf"), flat)]
  new = prune_lowest_leaves(leaves, [m for _, m in flat], jnp.asarray(counts, jnp.int32))
  return jax.tree.unflatten(jax.tree.structure(masks), new)


def _sharded_dim(spec: PartitionSpec, axis_name: str, shape, axis_size: int, path: str):
  if not isinstance(spec, PartitionSpec):
    raise ValueError(f"partition_specs at {path!r} must be a PartitionSpec, got {spec!r}.")
  dims = [i for i, entry in enumerate(spec) if entry is not None]
  if any(spec[i] not in (axis_name, (axis_name,)) for i in dims) or len(dims) > 1:
    raise ValueError(f"partition spec {spec} of {path!r} must shard at most one dimension, "
                     f"over {axis_name!r} only (other mesh axes hold replicas).")
  if len(spec) > len(shape) or (dims and shape[dims[0]] % axis_size):
    raise ValueError(f"partition spec {spec} does not fit {path!r} of shape {shape}: the "
                     f"sharded dimension must divide by the {axis_size} devices of {axis_name!r}.")
  return dims[0] if dims else None


@functools.lru_cache(maxsize=32)
def _sharded_program(mesh: Mesh, axis_name: str, specs: tuple, dims: tuple):
  def local(scores, masks, n):
    keys = [_order_keys(s, m) for s, m in zip(scores, masks)]
    removed = _select(keys, n[None], (0,) * len(keys), dims, axis_name)
    return [m & ~r for m, r in zip(masks, removed)]

  in_specs = (list(specs), list(specs), PartitionSpec())
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=list(specs)))


def sharded_prune_lowest(scores: PyTree, masks: PyTree, n_remove: int, mesh: Mesh,
                         axis_name: str, partition_specs: PyTree | None = None) -> PyTree:
  """`prune_lowest` for parameters sharded over a mesh axis, without gathering them.

  Inside `jax.shard_map`, each binary-search step `psum`s per-device counts; ties at the
  threshold are ranked by global position from all-gathered per-row tie counts (a small
  vector per leaf) and prefix sums. The selection equals `prune_lowest` exactly.

  Args:
    scores: pytree like params.
    masks: current masks.
    n_remove: concrete int in [0, num_remaining(masks)].
    mesh: the device mesh; axes other than `axis_name` hold replicas.
    axis_name: the mesh axis the leaves are sharded over.
    partition_specs: a PartitionSpec per prunable leaf (given as `prune_lowest_per_leaf`
      takes counts), each sharding at most one dimension over `axis_name`; by default
      the masks' own NamedSharding specs on `mesh`, else replicated.

  Returns:
    New masks, each leaf sharded by its partition spec.
  """
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}.")
  leaves = _prunable_scores(scores, masks)
  n = _concrete_count(n_remove, "n_remove", lambda: int(num_remaining(masks)))
  flat = jax.tree_util.tree_flatten_with_path(masks)[0]
  if partition_specs is None:
    specs = [m.sharding.spec if isinstance(getattr(m, "sharding", None), NamedSharding)
             and m.sharding.mesh == mesh else PartitionSpec() for _, m in flat]
  else:
    specs = _per_leaf(partition_specs, masks, "partition_specs")
  dims = tuple(_sharded_dim(s, axis_name, m.shape, mesh.shape[axis_name], path_str(p))
               for s, (p, m) in zip(specs, flat))
  program = _sharded_program(mesh, axis_name, tuple(specs), dims)
  new = program(leaves, [m for _, m in flat], jnp.int32(n))
  return jax.tree.unflatten(jax.tree.structure(masks), new)

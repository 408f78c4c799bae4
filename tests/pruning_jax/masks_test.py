"""Tests for pruning masks and exact lowest-score pruning (pruning_jax.masks)."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from pruning_jax import masks as masks_lib


def _at_masks(tree, masks):
  """Leaves of a params-like tree at the prunable positions, in leaf order."""
  is_none = lambda x: x is None
  return [x for x, m in zip(jax.tree.leaves(tree, is_leaf=is_none),
                            jax.tree.leaves(masks, is_leaf=is_none)) if m is not None]


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _golden_params():
  # Global positions of the prunable entries: a/kernel row-major 0..5, b/kernel 6..9.
  return {"a": {"bias": _f32([9.0, 9.0, 9.0]), "kernel": _f32([[3, 1, 2], [1, 0, 5]])},
          "b": {"kernel": _f32([[1, 4], [-2, 1]])}}


def _golden_masks():
  # a/kernel[1, 1] (score 0, the global minimum) is already pruned.
  return {"a": {"bias": None, "kernel": jnp.array([[1, 1, 1], [1, 0, 1]], bool)},
          "b": {"kernel": jnp.ones((2, 2), bool)}}


def _as_int(masks):
  return [np.asarray(m).astype(int).tolist() for m in jax.tree.leaves(masks)]


def _reference(scores, masks, n_remove):
  """Stable argsort over (score, global position) of the alive entries."""
  leaves = _at_masks(scores, masks)
  s = np.concatenate([np.asarray(x, np.float32).ravel() for x in leaves]) + 0.0  # -0 -> +0
  alive = np.concatenate([np.asarray(m).ravel() for m in jax.tree.leaves(masks)])
  idx = np.flatnonzero(alive)
  alive[idx[np.argsort(s[idx], kind="stable")][:n_remove]] = False
  return alive


def _flat(masks):
  return np.concatenate([np.asarray(m).ravel() for m in jax.tree.leaves(masks)])


class _Net(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)


class InitMasksTest(chex.TestCase):

  def test_nnx_model_masks_kernels_only(self):
    _, params, _ = nnx.split(_Net(nnx.Rngs(0)), nnx.Param, ...)
    masks = masks_lib.init_masks(params)
    is_none = lambda x: x is None
    self.assertEqual(jax.tree.structure(params, is_leaf=is_none),
                     jax.tree.structure(masks, is_leaf=is_none))
    self.assertEqual(list(masks_lib.layer_sparsities(masks)), ["conv/kernel", "head/kernel"])
    self.assertIsNone(masks["conv"]["bias"].get_value())
    self.assertIsNone(masks["bn"]["scale"].get_value())
    self.assertEqual(masks_lib.num_prunable(masks), 3 * 3 * 2 * 4 + 4 * 3)
    for m in jax.tree.leaves(masks):
      self.assertEqual(m.dtype, jnp.bool_)
      self.assertTrue(bool(m.all()))

  def test_predicate_options(self):
    _, params, _ = nnx.split(_Net(nnx.Rngs(0)), nnx.Param, ...)
    with_bn = masks_lib.init_masks(params, masks_lib.prunable_predicate(
        include_bn_scale=True, include_last_layer=False, last_layer="head"))
    self.assertEqual(list(masks_lib.layer_sparsities(with_bn)), ["bn/scale", "conv/kernel"])
    no_conv = masks_lib.init_masks(params, masks_lib.prunable_predicate(exclude="conv"))
    self.assertEqual(list(masks_lib.layer_sparsities(no_conv)), ["head/kernel"])
    dict_params = {"blocks": [{"dense": {"kernel": jnp.ones((2, 2))}}] * 2}
    only_first = masks_lib.init_masks(
        dict_params, masks_lib.prunable_predicate(exclude=["blocks/1"]))
    self.assertEqual(list(masks_lib.layer_sparsities(only_first)), ["blocks/0/dense/kernel"])

  def test_one_dimensional_kernel_is_not_prunable(self):
    self.assertFalse(masks_lib.default_prunable(
        (jax.tree_util.DictKey("kernel"),), jnp.ones(3)))
    self.assertTrue(masks_lib.default_prunable(
        (jax.tree_util.DictKey("kernel"),), jnp.ones((3, 2))))

  def test_predicate_errors(self):
    with self.assertRaisesRegex(ValueError, "last_layer"):
      masks_lib.prunable_predicate(include_last_layer=False)
    with self.assertRaisesRegex(ValueError, "exclude"):
      masks_lib.prunable_predicate(exclude=["", "head"])

  def test_no_prunable_leaf_raises(self):
    with self.assertRaisesRegex(ValueError, "selects no prunable parameter"):
      masks_lib.init_masks({"dense": {"bias": jnp.ones(3), "kernel": jnp.ones(3)}})


class CheckMasksTest(chex.TestCase):

  def test_structure_mismatch_names_path(self):
    params, masks = _golden_params(), _golden_masks()
    masks["c"] = {"kernel": jnp.ones((1, 1), bool)}
    with self.assertRaisesRegex(ValueError, "'c/kernel'"):
      masks_lib.apply_masks(params, masks)
    renamed = {"a": _golden_masks()["a"], "z": _golden_masks()["b"]}
    with self.assertRaisesRegex(ValueError, "'b/kernel' in scores vs 'z/kernel'"):
      masks_lib.prune_lowest(params, renamed, 1)

  def test_shape_and_dtype_mismatch_names_path(self):
    params, masks = _golden_params(), _golden_masks()
    masks["b"]["kernel"] = jnp.ones((2, 3), bool)
    with self.assertRaisesRegex(ValueError, "'b/kernel'.*shape \\(2, 2\\).*\\(2, 3\\)"):
      masks_lib.check_masks(params, masks)
    masks["b"]["kernel"] = jnp.ones((2, 2), jnp.float32)
    with self.assertRaisesRegex(ValueError, "'b/kernel'.*float32"):
      masks_lib.tree_map_masked(lambda p, m: p, params, masks)

  def test_none_param_under_mask_raises(self):
    with self.assertRaisesRegex(ValueError, "'w'"):
      masks_lib.check_masks({"w": None}, {"w": jnp.ones(2, bool)})


class MaskStatisticsTest(chex.TestCase):

  def test_apply_and_tree_map_masked(self):
    params, masks = _golden_params(), _golden_masks()
    applied = jax.jit(masks_lib.apply_masks)(params, masks)
    np.testing.assert_array_equal(applied["a"]["kernel"], [[3, 1, 2], [1, 0, 5]])
    self.assertIs(masks_lib.tree_map_masked(lambda p, m: p * 0, params, masks)["a"]["bias"],
                  params["a"]["bias"])
    nan_params = {"w": _f32([[jnp.nan, 1.0]])}
    zeroed = masks_lib.apply_masks(nan_params, {"w": jnp.array([[False, True]])})
    np.testing.assert_array_equal(zeroed["w"], [[0.0, 1.0]])

  def test_counts(self):
    masks = _golden_masks()
    self.assertEqual(masks_lib.num_prunable(masks), 10)
    self.assertEqual(int(masks_lib.num_remaining(masks)), 9)
    self.assertAlmostEqual(float(masks_lib.sparsity(masks)), 0.1, places=6)
    self.assertEqual(masks_lib.layer_sparsities(masks), {"a/kernel": 1 / 6, "b/kernel": 0.0})
    with self.assertRaisesRegex(ValueError, "no prunable leaf"):
      masks_lib.sparsity({"w": None})

  def test_remove_count(self):
    masks = _golden_masks()  # 10 prunable, 1 pruned
    self.assertEqual(masks_lib.remove_count(masks, 0.5), 4)
    self.assertEqual(masks_lib.remove_count(masks, 0.25), 2)  # 2.5 rounds half up to 3
    self.assertEqual(masks_lib.remove_count(masks, 0.34), 2)  # 3.4 rounds to 3
    self.assertEqual(masks_lib.remove_count(masks, 0.0), 0)  # never negative
    for bad in (1.0, -0.1, 1.5):
      with self.assertRaisesRegex(ValueError, f"target_sparsity must be in \\[0, 1\\), got {bad}"):
        masks_lib.remove_count(masks, bad)


class PruneLowestTest(chex.TestCase):

  @parameterized.parameters(
      # Alive entries by (score, position): -2@8, 1@1, 1@3, 1@6, 1@9, 2@2, 3@0, 4@7, 5@5;
      # position 4 (score 0) is already pruned and must not count.
      (0, [[[1, 1, 1], [1, 0, 1]], [[1, 1], [1, 1]]]),
      (3, [[[1, 0, 1], [0, 0, 1]], [[1, 1], [0, 1]]]),
      (4, [[[1, 0, 1], [0, 0, 1]], [[0, 1], [0, 1]]]),
      (9, [[[0, 0, 0], [0, 0, 0]], [[0, 0], [0, 0]]]),
  )
  def test_golden(self, n_remove, expected):
    new = masks_lib.prune_lowest(_golden_params(), _golden_masks(), n_remove)
    self.assertEqual(_as_int(new), expected)
    self.assertIsNone(new["a"]["bias"])

  def test_exact_counts_against_stable_sort(self):
    rng = np.random.default_rng(0)
    params = {"x": {"kernel": _f32(rng.integers(-2, 3, (5, 7)))},
              "y": {"kernel": _f32(rng.integers(-2, 3, (3, 2, 4))), "bias": jnp.zeros(4)}}
    masks = jax.tree.map(lambda m: jnp.asarray(rng.random(m.shape) < 0.7),
                         masks_lib.init_masks(params))
    remaining = int(masks_lib.num_remaining(masks))
    for n in (0, 1, 7, remaining // 2, remaining - 1, remaining):
      new = masks_lib.prune_lowest(params, masks, n)
      self.assertEqual(int(masks_lib.num_remaining(new)), remaining - n)
      np.testing.assert_array_equal(_flat(new), _reference(params, masks, n))
    # Per leaf: each leaf equals a global selection restricted to that leaf alone.
    left = [int(m.sum()) for m in jax.tree.leaves(masks)]
    for counts in ([0, left[1]], [left[0] // 2, 3], [left[0], 0]):
      new = masks_lib.prune_lowest_per_leaf(params, masks, counts)
      for key, n, m in zip(("x", "y"), counts, jax.tree.leaves(new)):
        only = {key: params[key]}, {key: masks[key]}
        np.testing.assert_array_equal(np.asarray(m).ravel(), _reference(*only, n))

  def test_all_tied_takes_leaf_order_then_row_major(self):
    scores = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 3))}}
    new = masks_lib.prune_lowest(scores, masks_lib.init_masks(scores), 5)
    self.assertEqual(_as_int(new), [[[0, 0], [0, 0]], [[0, 1, 1], [1, 1, 1]]])

  def test_float_order_signed_zero_inf_nan(self):
    scores = {"w": {"kernel": _f32([[jnp.nan, jnp.inf, 0.0, -0.0, -jnp.inf, -1e-30, 1e30]])}}
    masks = masks_lib.init_masks(scores)
    # Order: -inf@4, -1e-30@5, then the tie -0.0 == 0.0 by position (@2 before @3).
    self.assertEqual(_as_int(masks_lib.prune_lowest(scores, masks, 3)), [[[1, 1, 0, 1, 0, 0, 1]]])
    # NaN sorts last, after +inf.
    self.assertEqual(_as_int(masks_lib.prune_lowest(scores, masks, 6)), [[[1, 0, 0, 0, 0, 0, 0]]])

  def test_n_remove_errors(self):
    params, masks = _golden_params(), _golden_masks()
    for bad in (-1, 10, 2.0, True, jnp.ones(2, jnp.int32)):
      with self.assertRaisesRegex(ValueError, "n_remove must be"):
        masks_lib.prune_lowest(params, masks, bad)

    @jax.jit
    def traced(n):
      return masks_lib.prune_lowest(params, masks, n)

    with self.assertRaisesRegex(ValueError, "n_remove must be a concrete int"):
      traced(3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_leaf_list_kernel(self):
    scores = [_f32([[3, 1, 2], [1, 0, 5]]), _f32([[1, 4], [-2, 1]])]
    kernel = self.variant(masks_lib.prune_lowest_leaves)
    kept = kernel(scores, jax.tree.leaves(_golden_masks()), jnp.int32(3))
    self.assertEqual(_as_int(kept), [[[1, 0, 1], [0, 0, 1]], [[1, 1], [0, 1]]])
    # Per leaf: a drops 1@[0,1] (the first of the tied 1s); b drops -2, then 1@[0,0].
    kept = kernel(scores, jax.tree.leaves(_golden_masks()), jnp.array([1, 2]))
    self.assertEqual(_as_int(kept), [[[1, 0, 1], [1, 0, 1]], [[0, 1], [0, 1]]])

  def test_count_is_traced_without_recompiling(self):
    chex.clear_trace_counter()

    def kernel(scores, masks, n):
      return masks_lib.prune_lowest_leaves(scores, masks, n)

    fn = jax.jit(chex.assert_max_traces(kernel, n=1))
    scores, masks = [_f32(np.arange(12.0).reshape(3, 4))], [jnp.ones((3, 4), bool)]
    for n in range(0, 13, 3):
      kept = fn(scores, masks, jnp.int32(n))[0]
      np.testing.assert_array_equal(kept, np.arange(12).reshape(3, 4) >= n)


class PruneLowestPerLeafTest(chex.TestCase):

  def test_golden_and_input_formats(self):
    params, masks = _golden_params(), _golden_masks()
    # a: alive 1@1, 1@3, 2@2 ... -> drop positions 1 and 3; b: lowest is -2 at [1, 0].
    expected = [[[1, 0, 1], [0, 0, 1]], [[1, 1], [0, 1]]]
    by_pytree = {"a": {"bias": None, "kernel": 2}, "b": {"kernel": 1}}
    for counts in ([2, 1], {"a/kernel": 2, "b/kernel": 1}, by_pytree):
      self.assertEqual(_as_int(masks_lib.prune_lowest_per_leaf(params, masks, counts)), expected)
    # b ties 1@[0,0] and 1@[1,1] after -2: the lower position goes first.
    new = masks_lib.prune_lowest_per_leaf(params, masks, [0, 3])
    self.assertEqual(_as_int(new), [[[1, 1, 1], [1, 0, 1]], [[0, 1], [0, 0]]])

  def test_errors(self):
    params, masks = _golden_params(), _golden_masks()
    with self.assertRaisesRegex(ValueError, "one value per prunable leaf"):
      masks_lib.prune_lowest_per_leaf(params, masks, [1])
    message = "n_remove_per_leaf\\['a/kernel'\\] must be in \\[0, 5\\].*got 6"
    with self.assertRaisesRegex(ValueError, message):
      masks_lib.prune_lowest_per_leaf(params, masks, [6, 0])
    with self.assertRaisesRegex(ValueError, "pytree like masks"):
      masks_lib.prune_lowest_per_leaf(params, masks, {"a": {"kernel": 1}, "b": {"kernel": 1}})


def _mesh(shape, names):
  return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


class ShardedPruneLowestTest(chex.TestCase):

  def _problem(self, seed):
    rng = np.random.default_rng(seed)
    params = {"a": {"kernel": _f32(rng.integers(0, 3, (3, 8))), "bias": jnp.zeros(8)},
              "b": {"kernel": _f32(rng.integers(0, 3, (8, 4)))},
              "c": {"kernel": _f32(rng.integers(0, 3, (2, 3, 2, 8)))},
              "d": {"kernel": _f32(rng.integers(0, 3, (5, 3)))}}
    specs = {"a": {"kernel": P(None, "model"), "bias": None}, "b": {"kernel": P("model")},
             "c": {"kernel": P(None, None, None, "model")}, "d": {"kernel": P()}}
    masks = jax.tree.map(lambda m: jnp.asarray(rng.random(m.shape) < 0.8),
                         masks_lib.init_masks(params))
    return params, masks, specs

  @parameterized.parameters(((2, 4), ("data", "model")), ((8,), ("model",)))
  def test_matches_single_device_with_ties(self, shape, names):
    mesh = _mesh(shape, names)
    params, masks, specs = self._problem(seed=len(shape))
    put = lambda x, s: x if s is None else jax.device_put(x, NamedSharding(mesh, s))
    is_none = lambda x: x is None
    sharded_params = jax.tree.map(put, params, specs, is_leaf=is_none)
    sharded_masks = jax.tree.map(put, masks, specs, is_leaf=is_none)
    remaining = int(masks_lib.num_remaining(masks))
    for n in (0, 1, 17, remaining // 2, remaining):
      new = masks_lib.sharded_prune_lowest(sharded_params, sharded_masks, n, mesh, "model")
      single = masks_lib.prune_lowest(params, masks, n)
      np.testing.assert_array_equal(_flat(new), _flat(single))
      self.assertEqual(int(masks_lib.num_remaining(new)), remaining - n)
    self.assertIsNone(new["a"]["bias"])
    self.assertEqual(new["a"]["kernel"].sharding.spec, P(None, "model"))
    self.assertEqual(new["c"]["kernel"].sharding.spec, P(None, None, None, "model"))
    explicit = masks_lib.sharded_prune_lowest(sharded_params, sharded_masks, 17, mesh, "model",
                                              partition_specs=specs)
    np.testing.assert_array_equal(_flat(explicit), _flat(masks_lib.prune_lowest(params, masks, 17)))

  def test_errors(self):
    mesh = _mesh((2, 4), ("data", "model"))
    params, masks, specs = self._problem(seed=0)
    with self.assertRaisesRegex(ValueError, "axis_name 'rows' is not an axis"):
      masks_lib.sharded_prune_lowest(params, masks, 1, mesh, "rows")
    specs["b"]["kernel"] = P("data")
    with self.assertRaisesRegex(ValueError, "'b/kernel' must shard at most one dimension"):
      masks_lib.sharded_prune_lowest(params, masks, 1, mesh, "model", partition_specs=specs)
    specs["b"]["kernel"] = P()
    specs["d"]["kernel"] = P("model")  # 5 rows over 4 devices
    with self.assertRaisesRegex(ValueError, "'d/kernel' of shape \\(5, 3\\)"):
      masks_lib.sharded_prune_lowest(params, masks, 1, mesh, "model", partition_specs=specs)
    specs["d"]["kernel"] = "model"
    with self.assertRaisesRegex(ValueError, "at 'd/kernel' must be a PartitionSpec, got 'model'"):
      masks_lib.sharded_prune_lowest(params, masks, 1, mesh, "model", partition_specs=specs)
    with self.assertRaisesRegex(ValueError, "n_remove must be in"):
      masks_lib.sharded_prune_lowest(params, masks, -1, mesh, "model")


if __name__ == "__main__":
  absltest.main()

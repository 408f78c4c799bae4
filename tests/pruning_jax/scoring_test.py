"""Tests for the host pruning scoring rules (pruning_jax.scoring)."""

import functools
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np

from pruning_jax import masks as masks_lib
from pruning_jax import scoring


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _mlp_params(seed=0, widths=(3, 4, 5, 2), bias=True):
  rng = np.random.default_rng(seed)
  params = {}
  for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
    layer = {"kernel": _f32(rng.normal(size=(fan_in, fan_out)))}
    if bias:
      layer["bias"] = _f32(rng.normal(size=(fan_out,)))
    params[f"dense{i}"] = layer
  return params


def _mlp_apply(params, x):
  names = sorted(params)
  for i, name in enumerate(names):
    x = x @ params[name]["kernel"] + params[name].get("bias", 0.0)
    if i < len(names) - 1:
      x = jax.nn.relu(x)
  return x


def _mlp_loss(params, batch):
  x, y = batch
  return jnp.mean((_mlp_apply(params, x) - y)**2)


def _mlp_kwargs():
  rng = np.random.default_rng(1)
  batch = (_f32(rng.normal(size=(4, 3))), _f32(rng.normal(size=(4, 2))))
  return dict(key=jax.random.key(0), loss_fn=_mlp_loss, batch=batch,
              apply_fn=_mlp_apply, input_shape=(3,))


def _count(masks):
  return int(masks_lib.num_remaining(masks))


class MagnitudeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_scores_are_absolute_values(self):
    params = _mlp_params()
    scores = self.variant(scoring.magnitude_scores)(params)
    chex.assert_trees_all_close(scores, jax.tree.map(jnp.abs, params))

  def test_global_and_layerwise_golden_masks_differ(self):
    # Layer "a" holds the four smallest magnitudes overall.
    params = {"a": {"kernel": _f32([[0.1, -0.2], [0.3, 0.4]]),
                    "bias": _f32([5.0, -5.0])},
              "b": {"kernel": _f32([[1.0, -2.0], [3.0, 4.0]])}}
    masks = masks_lib.init_masks(params)
    global_masks = scoring.host_prune("magnitude", params, masks, 2)
    layer_masks = scoring.host_prune("layerwise_magnitude", params, masks, 2)
    chex.assert_trees_all_equal(global_masks, {
        "a": {"kernel": jnp.array([[False, False], [True, True]]),
              "bias": None},
        "b": {"kernel": jnp.ones((2, 2), bool)}})
    # Same fraction (1 of 4) from each layer: its smallest entry.
    chex.assert_trees_all_equal(layer_masks, {
        "a": {"kernel": jnp.array([[False, True], [True, True]]),
              "bias": None},
        "b": {"kernel": jnp.array([[False, True], [True, True]])}})


class LayerwiseCountsTest(parameterized.TestCase):

  def _masks(self, remaining, size=6):
    return {f"l{i}": {"kernel": jnp.arange(size).reshape(2, 3) < r}
            for i, r in enumerate(remaining)}

  def test_largest_remainder_golden(self):
    # remaining [3, 5, 2], n = 5: ideal 1.5, 2.5, 1.0 -> floors [1, 2, 1],
    # one leftover; remainders tie (0.5, 0.5) and go to the earlier leaf.
    self.assertEqual(scoring.layerwise_counts(self._masks([3, 5, 2]), 5), [2, 2, 1])
    # remaining [3, 4], n = 3: ideal 9/7, 12/7 -> floors [1, 1], leftover to
    # the larger fraction 5/7.
    self.assertEqual(scoring.layerwise_counts(self._masks([3, 4]), 3), [1, 2])

  @parameterized.parameters(0, 1, 7, 13, 19, 20)
  def test_sums_exactly_and_respects_capacity(self, n_remove):
    remaining = [1, 6, 4, 0, 6, 3]
    counts = scoring.layerwise_counts(self._masks(remaining), n_remove)
    self.assertEqual(sum(counts), n_remove)
    for c, r in zip(counts, remaining):
      self.assertBetween(c, 0, r)

  def test_layerwise_prune_with_prior_pruning(self):
    params = {"a": {"kernel": _f32([[1.0, 2.0], [3.0, 4.0]])},
              "b": {"kernel": _f32([[8.0, 7.0], [6.0, 5.0]])}}
    masks = {"a": {"kernel": jnp.array([[False, True], [True, True]])},
             "b": {"kernel": jnp.ones((2, 2), bool)}}
    new = scoring.host_prune("layerwise_magnitude", params, masks, 3)
    # Counts [1, 2] (see the golden case above): a drops 2, b drops 5 and 6.
    chex.assert_trees_all_equal(new, {
        "a": {"kernel": jnp.array([[False, False], [True, True]])},
        "b": {"kernel": jnp.array([[True, True], [False, False]])}})

  def test_rejects_bad_n_remove(self):
    with self.assertRaisesRegex(ValueError, r"n_remove.*\[0, 8\].*9"):
      scoring.layerwise_counts(self._masks([3, 5]), 9)


class RandomTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_deterministic_per_key_and_uniform_range(self):
    params = _mlp_params(widths=(3, 2, 2))
    fn = self.variant(scoring.random_scores)
    a = fn(jax.random.key(3), params)
    chex.assert_trees_all_equal(a, fn(jax.random.key(3), params))
    chex.assert_trees_all_equal_shapes(a, params)
    leaves = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
    self.assertTrue(np.all((leaves >= 0) & (leaves < 1)))
    b = fn(jax.random.key(4), params)
    self.assertFalse(np.array_equal(a["dense0"]["kernel"], b["dense0"]["kernel"]))
    # Leaves take disjoint parts of one draw, so equal-shaped leaves differ.
    self.assertFalse(np.array_equal(a["dense0"]["bias"], a["dense1"]["bias"]))


class LampTest(chex.TestCase):

  def _params(self):
    return {"l1": {"kernel": _f32([[10.0, -11.0, 12.0]])},
            "l2": {"kernel": _f32([[0.5, 4.0, -5.0]])}}

  @chex.variants(with_jit=True, without_jit=True)
  def test_worked_example(self):
    params = self._params()
    masks = masks_lib.init_masks(params)
    scores = self.variant(scoring.lamp_scores)(params, masks)
    # w^2 sorted ascending with suffix sums:
    # l1: 100, 121, 144 / 365, 265, 144 -> 100/365, 121/265, 1.
    # l2: 0.25, 16, 25 / 41.25, 41, 25 -> 0.25/41.25, 16/41, 1.
    chex.assert_trees_all_close(scores, {
        "l1": {"kernel": _f32([[100 / 365, 121 / 265, 1.0]])},
        "l2": {"kernel": _f32([[0.25 / 41.25, 16 / 41, 1.0]])}}, rtol=1e-6)

  def test_global_lamp_differs_from_global_magnitude(self):
    params = self._params()
    masks = masks_lib.init_masks(params)
    lamp = scoring.host_prune("lamp", params, masks, 2)
    mag = scoring.host_prune("magnitude", params, masks, 2)
    # LAMP: 0.25/41.25 (l2[0]) then 100/365 (l1[0]); magnitude: 0.5 and 4.
    chex.assert_trees_all_equal(lamp, {
        "l1": {"kernel": jnp.array([[False, True, True]])},
        "l2": {"kernel": jnp.array([[False, True, True]])}})
    chex.assert_trees_all_equal(mag, {
        "l1": {"kernel": jnp.ones((1, 3), bool)},
        "l2": {"kernel": jnp.array([[False, False, True]])}})

  @chex.variants(with_jit=True, without_jit=True)
  def test_pruned_entries_score_zero_and_leave_the_sums(self):
    params = self._params()
    masks = {"l1": {"kernel": jnp.array([[False, True, True]])},
             "l2": {"kernel": jnp.ones((1, 3), bool)}}
    scores = self.variant(scoring.lamp_scores)(params, masks)
    # l1 survivors 121, 144: suffix sums 265, 144.
    chex.assert_trees_all_close(scores["l1"]["kernel"], _f32([[0.0, 121 / 265, 1.0]]), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ties_give_the_lower_index_the_lower_score(self):
    params = {"l": {"kernel": _f32([[2.0, -2.0]])}}
    scores = self.variant(scoring.lamp_scores)(params, masks_lib.init_masks(params))
    # Sorted (4, 4) with suffix sums (8, 4).
    chex.assert_trees_all_close(scores["l"]["kernel"], _f32([[0.5, 1.0]]))

  def test_no_layer_is_ever_emptied(self):
    params = _mlp_params(seed=5, bias=False)
    masks = masks_lib.init_masks(params)
    scores = scoring.compute_scores("lamp", params, masks)
    for name in scores:
      leaf = np.sort(np.ravel(scores[name]["kernel"]))
      self.assertEqual(leaf[-1], 1.0)
      self.assertLess(leaf[-2], 1.0)
    kept = scoring.host_prune("lamp", params, masks, 42 - 3)
    self.assertEqual([int(np.sum(m)) for m in jax.tree.leaves(kept)], [1, 1, 1])


def _linear_loss(params, batch):
  x, y = batch
  pred = x @ params["lin"]["kernel"] + params["lin"]["bias"]
  return 0.5 * jnp.sum((pred - y)**2)


class SnipTest(chex.TestCase):

  def _setup(self):
    params = {"lin": {"kernel": _f32([[1.0], [-1.0]]), "bias": _f32([0.5])}}
    batch = (_f32([[1.0, 2.0]]), _f32([[1.0]]))
    return params, masks_lib.init_masks(params), batch

  @chex.variants(with_jit=True, without_jit=True)
  def test_linear_model_golden(self):
    params, masks, batch = self._setup()
    scores = self.variant(functools.partial(scoring.snip_scores,
                                            _linear_loss))(params, masks,
                                                           batch)
    # r = x W + b - y = (1 - 2 + 0.5) - 1 = -1.5; dL/dW = x^T r = [-1.5, -3];
    # |g w| = [1.5, 3]; bias |r b| = 0.75.
    chex.assert_trees_all_close(scores, {
        "lin": {"kernel": _f32([[1.5], [3.0]]), "bias": _f32([0.75])}})

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradient_taken_at_masked_params(self):
    params, _, batch = self._setup()
    masks = {"lin": {"kernel": jnp.array([[True], [False]]), "bias": None}}
    scores = self.variant(functools.partial(scoring.snip_scores,
                                            _linear_loss))(params, masks,
                                                           batch)
    # W = [1, 0]: r = 1 + 0.5 - 1 = 0.5; g = [0.5, 1]; |g w| = [0.5, 0].
    chex.assert_trees_all_close(scores, {
        "lin": {"kernel": _f32([[0.5], [0.0]]), "bias": _f32([0.25])}})


_A = np.array([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 1.0]], np.float32)
_B = np.array([0.0, -9.0, 0.0], np.float32)


def _quadratic_loss(params, batch):
  del batch
  w = params["q"]["kernel"][:, 0]
  return 0.5 * w @ _A @ w + _B @ w


class GraspTest(chex.TestCase):

  def _params(self):
    return {"q": {"kernel": _f32([[1.0], [1.0], [2.0]])}}

  @chex.variants(with_jit=True, without_jit=True)
  def test_quadratic_golden_and_sign_convention(self):
    params = self._params()
    masks = masks_lib.init_masks(params)
    fn = self.variant(functools.partial(scoring.grasp_scores, _quadratic_loss))
    scores = fn(params, masks, None)
    # g = A w + b = [3, 6, 3] + b = [3, -3, 3]; H g = A g = [3, -3, 0];
    # returned w * Hg = [3, -3, 0] = -S(-w).
    chex.assert_trees_all_close(scores["q"]["kernel"][:, 0], _f32([3.0, -3.0, 0.0]))

  def test_host_removes_grasp_highest_s(self):
    params = self._params()
    masks = scoring.host_prune("grasp", params, masks_lib.init_masks(params),
                               1, loss_fn=_quadratic_loss, batch=0)
    # S(-w) = [-3, 3, 0]: GraSP drops index 1, not the smallest |score|.
    np.testing.assert_array_equal(masks["q"]["kernel"][:, 0], [True, False, True])

  @chex.variants(with_jit=True, without_jit=True)
  def test_direction_restricted_to_unpruned(self):
    params = self._params()
    masks = {"q": {"kernel": jnp.array([[True], [True], [False]])}}
    fn = self.variant(functools.partial(scoring.grasp_scores, _quadratic_loss))
    scores = fn(params, masks, None)
    # w = [1, 1, 0]: g = [3, -5, 1], masked direction [3, -5, 0],
    # A d = [1, -12, -5], w * A d = [1, -12, 0] (unmasked d gives -11).
    chex.assert_trees_all_close(scores["q"]["kernel"][:, 0], _f32([1.0, -12.0, 0.0]))

  def test_matches_explicit_hessian_on_nonlinear_loss(self):
    params = _mlp_params(seed=2, widths=(3, 4, 2))
    masks = masks_lib.init_masks(params)
    batch = _mlp_kwargs()["batch"]
    scores = jax.jit(functools.partial(scoring.grasp_scores, _mlp_loss))(params, masks, batch)
    flat, unravel = flatten_util.ravel_pytree(params)
    loss = lambda v: _mlp_loss(unravel(v), batch)
    expected = jax.jit(lambda v: v * (jax.hessian(loss)(v) @ jax.grad(loss)(v)))(flat)
    chex.assert_trees_all_close(scores, unravel(expected), rtol=1e-4, atol=1e-6)


def _chain_apply(params, x):
  x = jax.nn.relu(x @ params["dense0"]["kernel"])
  x = jax.nn.relu(x @ params["dense1"]["kernel"])
  return x @ params["dense2"]["kernel"]


class SynflowTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_two_layer_golden(self):
    params = {"dense0": {"kernel": _f32([[-1.0, 2.0]])}, "dense1": {"kernel": _f32([[3.0], [4.0]])}}
    apply = lambda p, x: jax.nn.relu(x @ p["dense0"]["kernel"]) @ (p["dense1"]["kernel"])
    fn = self.variant(functools.partial(scoring.synflow_scores, apply, input_shape=(1,)))
    scores = fn(params, masks_lib.init_masks(params))
    # R = |w0| . |w1| = 1*3 + 2*4 = 11; dR/dw0_j = |w1_j|, dR/dw1_j = |w0_j|.
    chex.assert_trees_all_close(scores, {
        "dense0": {"kernel": _f32([[3.0, 8.0]])},
        "dense1": {"kernel": _f32([[3.0], [8.0]])}})

  def test_conservation_per_unit_and_per_layer(self):
    params = _mlp_params(seed=3, bias=False)
    masks = masks_lib.init_masks(params)
    scores = scoring.compute_scores("synflow", params, masks,
                                    apply_fn=_chain_apply, input_shape=(3,))
    s0, s1, s2 = (scores[f"dense{i}"]["kernel"] for i in range(3))
    # Incoming score of each hidden unit equals its outgoing score.
    chex.assert_trees_all_close(s0.sum(0), s1.sum(1), rtol=1e-5)
    chex.assert_trees_all_close(s1.sum(0), s2.sum(1), rtol=1e-5)
    r = jnp.sum(_chain_apply(jax.tree.map(jnp.abs, params), jnp.ones((1, 3))))
    for s in (s0, s1, s2):
      chex.assert_trees_all_close(s.sum(), r, rtol=1e-5)

  def test_pruned_weights_score_zero(self):
    params = _mlp_params(seed=3, bias=False)
    masks = scoring.host_prune("random", params, masks_lib.init_masks(params),
                               15, key=jax.random.key(1))
    scores = scoring.compute_scores("synflow", params, masks,
                                    apply_fn=_chain_apply, input_shape=(3,))
    for s, m in zip(jax.tree.leaves(scores), jax.tree.leaves(masks)):
      self.assertTrue(bool(jnp.all(jnp.where(m, True, s == 0))))

  @parameterized.parameters((0.8, 4), (0.5, 1), (0.9, 7))
  def test_iterative_reaches_exact_target(self, target, iterations):
    params = _mlp_params(seed=4, bias=False)
    masks = masks_lib.init_masks(params)
    new = scoring.synflow_prune(_chain_apply, params, masks, (3,), target, iterations)
    # 42 weights; the target count rounds half up as remove_count does.
    self.assertEqual(_count(new), 42 - int(np.floor(target * 42 + 0.5)))
    self.assertTrue(bool(jnp.all(jnp.asarray(jax.tree.leaves(
        jax.tree.map(lambda a, b: jnp.all(a <= b), new, masks))))))

  def test_exponential_schedule_golden(self):
    params = _mlp_params(seed=4, bias=False)
    masks = masks_lib.init_masks(params)
    with mock.patch.object(masks_lib, "prune_lowest", wraps=masks_lib.prune_lowest) as spy:
      scoring.synflow_prune(_chain_apply, params, masks, (3,), 0.8, 3)
    # Keep 42 * (8 / 42)^(i / 3) = 24.17, 13.90, 8 -> 24, 14, 8 weights.
    self.assertEqual([c.args[2] for c in spy.call_args_list], [18, 10, 6])

  def test_one_iteration_equals_one_shot(self):
    params = _mlp_params(seed=4, bias=False)
    masks = masks_lib.init_masks(params)
    iterative = scoring.synflow_prune(_chain_apply, params, masks, (3,), 0.5, iterations=1)
    one_shot = scoring.host_prune("synflow", params, masks, 21,
                                  apply_fn=_chain_apply, input_shape=(3,))
    chex.assert_trees_all_equal(iterative, one_shot)

  @parameterized.named_parameters(
      ("target_one", dict(target_sparsity=1.0), r"target_sparsity.*1\.0"),
      ("target_negative", dict(target_sparsity=-0.1),
       r"target_sparsity.*-0\.1"),
      ("iterations_zero", dict(iterations=0), "iterations.*>= 1.*0"),
      ("empty_shape", dict(input_shape=()), r"input_shape.*\(\)"),
      ("zero_dim", dict(input_shape=(0,)), r"input_shape.*\(0,\)"),
  )
  def test_rejects_bad_arguments(self, override, name):
    params = _mlp_params(bias=False)
    kwargs = dict(apply_fn=_chain_apply, params=params,
                  masks=masks_lib.init_masks(params), input_shape=(3,),
                  target_sparsity=0.5, iterations=2)
    kwargs.update(override)
    with self.assertRaisesRegex(ValueError, name):
      scoring.synflow_prune(**kwargs)


_SCHEDULE = dict(initial_sparsity=0.0, final_sparsity=0.8, begin_step=0, end_step=4, frequency=1)


class GradualMagnitudeTest(parameterized.TestCase):

  def test_global_follows_cubic_schedule(self):
    params = _mlp_params()
    masks = masks_lib.init_masks(params)
    # s_2 = 0.8 - 0.8 * (1 - 2/4)^3 = 0.7: round(0.7 * 42) = 29 removed.
    mid = scoring.gradual_magnitude_masks(params, masks, 2, _SCHEDULE)
    chex.assert_trees_all_equal(mid, scoring.host_prune("magnitude", params, masks, 29))
    # s_4 = 0.8: round(33.6) = 34 removed in total.
    end = scoring.gradual_magnitude_masks(params, mid, 4, _SCHEDULE)
    chex.assert_trees_all_equal(end, scoring.host_prune("magnitude", params, masks, 34))
    # An earlier step asks for less sparsity: nothing changes.
    chex.assert_trees_all_equal(scoring.gradual_magnitude_masks(params, end, 1, _SCHEDULE), end)

  def test_uniform_brings_every_layer_to_the_target(self):
    params = _mlp_params()
    masks = scoring.gradual_magnitude_masks(
        params, masks_lib.init_masks(params), 4, _SCHEDULE,
        distribution="uniform")
    # Leaves of 12, 20, 10 weights keep 12 - round(9.6), 20 - 16, 10 - 8.
    self.assertEqual([int(jnp.sum(m)) for m in jax.tree.leaves(masks)], [2, 4, 2])
    # Within a layer the survivors are its largest magnitudes.
    kernel = np.abs(np.asarray(params["dense1"]["kernel"]))
    kept = np.asarray(masks["dense1"]["kernel"])
    self.assertGreaterEqual(kernel[kept].min(), kernel[~kept].max())

  def test_rejects_unknown_distribution(self):
    params = _mlp_params()
    with self.assertRaisesRegex(ValueError, "distribution.*'layer'"):
      scoring.gradual_magnitude_masks(params, masks_lib.init_masks(params), 4,
                                      _SCHEDULE, distribution="layer")


class DispatchTest(chex.TestCase):

  @parameterized.parameters(*scoring.METHODS)
  def test_compute_scores_matches_direct_rule(self, method):
    params = _mlp_params(widths=(3, 2))
    masks = masks_lib.init_masks(params)
    kw = _mlp_kwargs()
    direct = {
        "magnitude": lambda p, m: scoring.magnitude_scores(p),
        "layerwise_magnitude": lambda p, m: scoring.magnitude_scores(p),
        "random": lambda p, m: scoring.random_scores(kw["key"], p),
        "lamp": scoring.lamp_scores,
        "snip": lambda p, m: scoring.snip_scores(_mlp_loss, p, m,
                                                 kw["batch"]),
        "grasp": lambda p, m: scoring.grasp_scores(_mlp_loss, p, m,
                                                   kw["batch"]),
        "synflow": lambda p, m: scoring.synflow_scores(_mlp_apply, p, m,
                                                       (3,)),
    }[method]
    chex.assert_trees_all_close(
        scoring.compute_scores(method, params, masks, **kw),
        jax.jit(direct)(params, masks))

  @parameterized.parameters(
      ("random", "key"), ("snip", "loss_fn"), ("grasp", "batch"),
      ("synflow", "apply_fn"), ("synflow", "input_shape"))
  def test_missing_argument_is_named(self, method, missing):
    params = _mlp_params()
    kw = _mlp_kwargs()
    kw[missing] = None
    with self.assertRaisesRegex(ValueError, f"{method}.*{missing}"):
      scoring.compute_scores(method, params, masks_lib.init_masks(params), **kw)

  def test_unknown_method(self):
    params = _mlp_params()
    with self.assertRaisesRegex(ValueError, "method.*'obd'"):
      scoring.compute_scores("obd", params, masks_lib.init_masks(params))
    with self.assertRaisesRegex(ValueError, "method.*'obd'"):
      scoring.host_prune("obd", params, masks_lib.init_masks(params), 1)


class HostPruneTest(chex.TestCase):

  @parameterized.parameters(*scoring.METHODS)
  def test_exact_count_from_dense_and_sparse(self, method):
    params = _mlp_params()
    masks = masks_lib.init_masks(params)
    kw = _mlp_kwargs()
    for n_remove in (0, 1, 9, 13):
      before = _count(masks)
      new = scoring.host_prune(method, params, masks, n_remove, **kw)
      self.assertEqual(_count(new), before - n_remove)
      # Pruned entries stay pruned.
      for old, cur in zip(jax.tree.leaves(masks), jax.tree.leaves(new)):
        self.assertFalse(bool(jnp.any(cur & ~old)))
      masks = new
    self.assertEqual(_count(masks), 42 - 23)

  def test_iterative_synflow_exact_count(self):
    params = _mlp_params()
    masks = scoring.host_prune("synflow", params,
                               masks_lib.init_masks(params), 30,
                               iterations=5, **_mlp_kwargs())
    self.assertEqual(_count(masks), 12)

  @parameterized.named_parameters(
      ("negative", dict(n_remove=-1), r"n_remove.*\[0, 42\].*-1"),
      ("too_many", dict(n_remove=43), r"n_remove.*\[0, 42\].*43"),
      ("float", dict(n_remove=2.0), r"n_remove.*2\.0"),
      ("bool", dict(n_remove=True), r"n_remove.*True"),
      ("iterations_zero", dict(iterations=0), "iterations.*0"),
      ("iterations_not_synflow", dict(method="magnitude", iterations=3),
       "iterations.*synflow"),
      ("iterative_without_apply_fn", dict(iterations=3, apply_fn=None),
       "synflow.*apply_fn"),
  )
  def test_rejects_bad_arguments(self, override, pattern):
    params = _mlp_params()
    kwargs = dict(method="synflow", params=params,
                  masks=masks_lib.init_masks(params), n_remove=3,
                  **_mlp_kwargs())
    kwargs.update(override)
    with self.assertRaisesRegex(ValueError, pattern):
      scoring.host_prune(**kwargs)

  def test_nnx_state_params(self):
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    masks = masks_lib.init_masks(params)
    apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)
    for method in ("lamp", "synflow"):
      new = scoring.host_prune(method, params, masks, 4, apply_fn=apply_fn, input_shape=(3,))
      self.assertIsInstance(new, nnx.State)
      self.assertEqual(_count(new), 2)
    # One layer, x = ones: SynFlow scores |w| * 1 per weight, so it keeps
    # the two largest magnitudes, as magnitude pruning does.
    chex.assert_trees_all_equal(new, scoring.host_prune("magnitude", params, masks, 4))

  def test_accepts_numpy_ints(self):
    params = _mlp_params()
    masks = scoring.host_prune("magnitude", params, masks_lib.init_masks(params), np.int64(5))
    self.assertEqual(_count(masks), 37)

  def test_jitted_scores_do_not_retrace_across_masks(self):
    params = _mlp_params(widths=(3, 2))
    masks = masks_lib.init_masks(params)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def lamp(p, m):
      return scoring.lamp_scores(p, m)

    first = lamp(params, masks)
    masks = scoring.host_prune("lamp", params, masks, 3)
    second = lamp(params, masks)
    self.assertFalse(np.array_equal(first["dense0"]["kernel"], second["dense0"]["kernel"]))


if __name__ == "__main__":
  absltest.main()

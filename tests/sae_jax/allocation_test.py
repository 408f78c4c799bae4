"""Tests for sae_jax.allocation: exact counts, ties, NumPy agreement, gradients, errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from sae_jax import allocation

from sae_jax.allocation import strategies


def _order(values: np.ndarray) -> np.ndarray:
  """Indices of a 1-D array by value descending, ties by lower index (the reference)."""
  return np.lexsort((np.arange(values.size), -values.astype(np.float64)))


def ref_topk(s, k):
  m = np.zeros(s.shape, bool)
  for i, row in enumerate(s):
    m[i, _order(row)[:k]] = True
  return m


def ref_mutual_choice(s, k):
  n = int(round(k * s.shape[0]))
  m = np.zeros(s.size, bool)
  m[_order(s.reshape(-1))[:n]] = True
  return m.reshape(s.shape)


def ref_feature_choice(s, capacity):
  cap = np.broadcast_to(np.asarray(capacity), (s.shape[1],))
  m = np.zeros(s.shape, bool)
  for j in range(s.shape[1]):
    m[_order(s[:, j])[:cap[j]], j] = True
  return m


def _scores(rng, b, f, kind):
  if kind == "normal":
    return rng.normal(size=(b, f)).astype(np.float32)
  if kind == "ties":  # few distinct values: many ties
    return rng.integers(-2, 3, size=(b, f)).astype(np.float32)
  if kind == "constant":
    return np.zeros((b, f), np.float32)
  if kind == "relu":  # ReLU'd scores: most entries tie at zero
    return np.maximum(rng.normal(size=(b, f)) - 1.0, 0.0).astype(np.float32)
  raise ValueError(kind)


KINDS = ("normal", "ties", "constant", "relu")


class TopKTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(kind=KINDS, k=(1, 7))
  def test_matches_reference(self, kind, k):
    s = _scores(np.random.default_rng(0), 9, 13, kind)
    mask = self.variant(functools.partial(allocation.topk, k=k))(s)
    np.testing.assert_array_equal(np.asarray(mask), ref_topk(s, k))
    np.testing.assert_array_equal(np.asarray(mask).sum(1), np.full(9, k))

  def test_ties_go_to_lower_column(self):
    s = jnp.array([[1.0, 3.0, 3.0, 3.0, 2.0]])
    np.testing.assert_array_equal(allocation.topk(s, 2), [[False, True, True, False, False]])

  def test_bfloat16(self):
    s = jnp.asarray(_scores(np.random.default_rng(1), 16, 32, "normal"), jnp.bfloat16)
    mask = jax.jit(allocation.topk, static_argnums=1)(s, 5)
    np.testing.assert_array_equal(np.asarray(mask),
                                  ref_topk(np.asarray(s.astype(jnp.float32)), 5))

  def test_k_equal_f_keeps_everything(self):
    s = jnp.ones((3, 4))
    self.assertTrue(bool(allocation.topk(s, 4).all()))


class MutualChoiceTest(chex.TestCase):

  @chex.variants(with_jit=True)
  @parameterized.product(kind=KINDS, k=(0.5, 2.5, 4), max_per_row=(None, 1, 40))
  def test_matches_reference(self, kind, k, max_per_row):
    s = _scores(np.random.default_rng(2), 11, 40, kind)
    fn = functools.partial(allocation.mutual_choice, k=k, max_per_row=max_per_row)
    mask = np.asarray(self.variant(fn)(s))
    np.testing.assert_array_equal(mask, ref_mutual_choice(s, k))
    self.assertEqual(mask.sum(), int(round(k * 11)))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("normal", "ties")
  def test_jit_and_eager_agree(self, kind):
    s = _scores(np.random.default_rng(11), 7, 16, kind)
    mask = self.variant(lambda x: allocation.mutual_choice(x, 2, max_per_row=3))(s)
    np.testing.assert_array_equal(np.asarray(mask), ref_mutual_choice(s, 2))

  @parameterized.parameters("normal", "ties", "relu")
  def test_wide_rows_exact(self, kind):
    s = _scores(np.random.default_rng(16), 16, 1024, kind)
    mask = jax.jit(lambda x: allocation.mutual_choice(x, 2))(s)
    np.testing.assert_array_equal(np.asarray(mask), ref_mutual_choice(s, 2))

  @parameterized.parameters("normal", "relu")
  def test_candidate_path_is_exact_without_fallback(self, kind):
    # The fast path alone (no fallback) must already be exact on ordinary inputs, and
    # must report no saturation there; otherwise every call silently pays for the
    # flat top-k.
    s = _scores(np.random.default_rng(14), 64, 128, kind)
    idx, saturated = jax.jit(
        lambda x: strategies._mutual_choice_candidates(x, 64 * 4, 16))(s)
    self.assertFalse(bool(saturated))
    mask = np.zeros(s.shape, bool).reshape(-1)
    mask[np.asarray(idx)] = True
    np.testing.assert_array_equal(mask.reshape(s.shape), ref_mutual_choice(s, 4))

  def test_kth_largest_key(self):
    keys = allocation.sortable_key(jnp.array([3.0, -1.0, 7.0, 0.0, 7.0, -5.0]))
    for n, want in ((1, 7.0), (2, 7.0), (3, 3.0), (4, 0.0), (6, -5.0)):
      self.assertEqual(int(allocation.bisect_uint32(lambda u: jnp.sum(keys >= u), n)),
                       int(allocation.sortable_key(jnp.float32(want))))

  def test_row_needing_more_than_its_candidates_falls_back_exactly(self):
    # Row 0 dominates: under MC it takes 12 entries while only 2 candidates per row
    # are proposed, so the candidate stage is saturated and the flat path must run.
    rng = np.random.default_rng(3)
    s = rng.normal(size=(6, 20)).astype(np.float32)
    s[0] += 100.0
    mask = jax.jit(lambda x: allocation.mutual_choice(x, 2, max_per_row=2))(s)
    np.testing.assert_array_equal(np.asarray(mask), ref_mutual_choice(s, 2))
    self.assertEqual(int(np.asarray(mask)[0].sum()), 12)

  def test_variable_l0_per_token(self):
    s = np.zeros((4, 8), np.float32)
    s[0, :6] = 10.0  # a "hard" token wants many features
    s[1, :2] = 5.0
    mask = np.asarray(allocation.mutual_choice(s, 2))
    np.testing.assert_array_equal(mask.sum(1), [6, 2, 0, 0])

  def test_batch_topk_is_the_same_selection(self):
    self.assertIs(allocation.batch_topk, allocation.mutual_choice)

  def test_bfloat16_ties(self):
    # bfloat16 has few mantissa bits: many distinct float32 scores collapse into ties.
    s32 = _scores(np.random.default_rng(4), 32, 64, "normal")
    s = jnp.asarray(s32, jnp.bfloat16)
    mask = jax.jit(lambda x: allocation.mutual_choice(x, 3))(s)
    np.testing.assert_array_equal(np.asarray(mask),
                                  ref_mutual_choice(np.asarray(s.astype(jnp.float32)), 3))

  @parameterized.parameters(None, 2, 6)
  def test_signed_zero_and_extremes_follow_total_order(self, max_per_row):
    # Both lax.top_k and the candidate path order floats by the IEEE total order, so
    # -0.0 ranks below +0.0 (a documented choice); infinities and subnormals order as
    # numbers. Expected: +inf, 1e-38, +0.0 (index 1) beat -0.0 (index 0).
    s = jnp.array([[-0.0, 0.0, -jnp.inf, jnp.inf, -1e-38, 1e-38], [-5.0] * 6], jnp.float32)
    mask = np.asarray(allocation.mutual_choice(s, 1.5, max_per_row=max_per_row))
    np.testing.assert_array_equal(mask, [[False, True, False, True, False, True],
                                         [False, False, False, False, False, False]])


class FeatureChoiceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(kind=KINDS, capacity=(0, 1, 3, 9))
  def test_uniform_matches_reference(self, kind, capacity):
    s = _scores(np.random.default_rng(5), 9, 12, kind)
    mask = self.variant(functools.partial(allocation.feature_choice, capacity=capacity))(s)
    np.testing.assert_array_equal(np.asarray(mask), ref_feature_choice(s, capacity))
    np.testing.assert_array_equal(np.asarray(mask).sum(0), np.full(12, capacity))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*KINDS)
  def test_per_feature_capacities(self, kind):
    s = _scores(np.random.default_rng(6), 10, 12, kind)
    cap = allocation.zipf_capacities(12, 30, 1.0, max_capacity=10)
    mask = self.variant(lambda x: allocation.feature_choice(x, cap))(s)
    np.testing.assert_array_equal(np.asarray(mask), ref_feature_choice(s, cap))
    np.testing.assert_array_equal(np.asarray(mask).sum(0), cap)

  @parameterized.product(kind=("normal", "ties"), exponent=(0.5, 1.0, 2.0))
  def test_zipf_tiers_match_reference(self, kind, exponent):
    # A Zipf profile spans many capacity tiers (wide head, narrow tail): exercises the
    # tiered path on a shuffled assignment of capacities to features.
    rng = np.random.default_rng(12)
    s = _scores(rng, 64, 48, kind)
    cap = rng.permutation(allocation.zipf_capacities(48, 64 * 3, exponent, max_capacity=64))
    mask = jax.jit(lambda x: allocation.feature_choice(x, cap))(s)
    np.testing.assert_array_equal(np.asarray(mask), ref_feature_choice(s, cap))

  @parameterized.parameters("normal", "ties")
  def test_ranked_profile_with_traced_permutation(self, kind):
    rng = np.random.default_rng(13)
    s = _scores(rng, 32, 20, kind)
    profile = allocation.zipf_capacities(20, 32 * 2, 1.0, max_capacity=32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fn(x, perm):
      return allocation.feature_choice_ranked(x, profile, perm)

    chex.clear_trace_counter()
    for _ in range(3):
      perm = rng.permutation(20).astype(np.int32)
      cap = np.zeros(20, np.int64)
      cap[perm] = profile
      np.testing.assert_array_equal(np.asarray(fn(s, perm)), ref_feature_choice(s, cap))

  def test_ranked_profile_errors(self):
    s = jnp.zeros((4, 3))
    with self.assertRaisesRegex(ValueError, "non-increasing"):
      allocation.feature_choice_ranked(s, np.array([1, 2, 0]), jnp.arange(3))
    with self.assertRaisesRegex(ValueError, r"profile entry must be in \[0, 4\]"):
      allocation.feature_choice_ranked(s, np.array([5, 2, 0]), jnp.arange(3))

  def test_traced_capacity_needs_and_uses_max_capacity(self):
    s = _scores(np.random.default_rng(7), 8, 6, "normal")
    cap = np.array([3, 0, 1, 2, 3, 1], np.int32)
    fn = jax.jit(lambda x, c: allocation.feature_choice(x, c, max_capacity=3))
    np.testing.assert_array_equal(np.asarray(fn(s, cap)), ref_feature_choice(s, cap))
    with self.assertRaisesRegex(ValueError, "max_capacity"):
      jax.jit(allocation.feature_choice)(s, cap)

  def test_ties_go_to_lower_row(self):
    s = jnp.array([[1.0], [2.0], [2.0], [2.0]])
    np.testing.assert_array_equal(allocation.feature_choice(s, 2)[:, 0],
                                  [False, True, True, False])


class ZipfCapacitiesTest(parameterized.TestCase):

  @parameterized.product(f=(1, 7, 100, 4096), total=(0, 5, 1000, 131072),
                         exponent=(0.0, 0.5, 1.0, 2.0))
  def test_sum_monotone_nonnegative(self, f, total, exponent):
    cap = allocation.zipf_capacities(f, total, exponent)
    self.assertEqual(cap.shape, (f,))
    self.assertEqual(int(cap.sum()), total)
    self.assertTrue(np.all(cap >= 0))
    self.assertTrue(np.all(np.diff(cap) <= 0))

  @parameterized.product(exponent=(0.5, 1.0, 1.5), max_capacity=(16, 64))
  def test_max_capacity(self, exponent, max_capacity):
    cap = allocation.zipf_capacities(256, 256 * 8, exponent, max_capacity=max_capacity)
    self.assertEqual(int(cap.sum()), 256 * 8)
    self.assertLessEqual(int(cap.max()), max_capacity)
    self.assertTrue(np.all(np.diff(cap) <= 0))

  @parameterized.product(f=(300, 1024, 1536), k=(4, 8, 16), exponent=(0.5, 1.0, 2.0))
  def test_min_capacity_floors_the_tail(self, f, k, exponent):
    b = 512
    cap = allocation.zipf_capacities(f, k * b, exponent, max_capacity=b, min_capacity=1)
    self.assertEqual(int(cap.sum()), k * b)
    self.assertGreaterEqual(int(cap.min()), 1)
    self.assertLessEqual(int(cap.max()), b)
    self.assertTrue(np.all(np.diff(cap) <= 0))
    plain = allocation.zipf_capacities(f, k * b, exponent, max_capacity=b)
    if plain.min() >= 1:  # a split that already rounds to >= 1 is left exactly as it is
      np.testing.assert_array_equal(cap, plain)
    else:  # the slots the floor takes come from the head, never added to it
      self.assertTrue(np.all(cap[plain >= 1] <= plain[plain >= 1]))

  def test_min_capacity_golden(self):
    # 10 over ranks 1..8 with weights 1/r (sum 2.718): ideal 3.68, 1.84, 1.23, 0.92, 0.74,
    # 0.61, 0.53, 0.46 rounds (largest remainder) to [4, 2, 1, 1, 1, 1, 0, 0]. Floored at
    # 1: ranks 7-8 are pinned and 8 is re-split over ranks 1..6 -> [3, 2, 1, 1, 1, 0];
    # rank 6 is pinned and 7 is re-split over ranks 1..5 (3.07, 1.53, 1.02, 0.77, 0.61)
    # -> [3, 1, 1, 1, 1].
    np.testing.assert_array_equal(allocation.zipf_capacities(8, 10, 1.0),
                                  [4, 2, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(allocation.zipf_capacities(8, 10, 1.0, min_capacity=1),
                                  [3, 1, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(
        allocation.zipf_capacities(3, 6, 5.0, min_capacity=2), [2, 2, 2])

  def test_golden(self):
    # 37 split over ranks 1..4 with weights 1, 1/2, 1/3, 1/4 (sum 25/12): ideal shares
    # 17.76, 8.88, 5.92, 4.44 -> floors 17, 8, 5, 4 (34) + the 3 largest remainders.
    np.testing.assert_array_equal(allocation.zipf_capacities(4, 37, 1.0), [18, 9, 6, 4])
    np.testing.assert_array_equal(allocation.zipf_capacities(3, 10, 0.0), [4, 3, 3])

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "num_features"):
      allocation.zipf_capacities(0, 10)
    with self.assertRaisesRegex(ValueError, "total"):
      allocation.zipf_capacities(4, -1)
    with self.assertRaisesRegex(ValueError, "exponent"):
      allocation.zipf_capacities(4, 10, -1.0)
    with self.assertRaisesRegex(ValueError, "max_capacity"):
      allocation.zipf_capacities(4, 10, max_capacity=2)
    with self.assertRaisesRegex(ValueError, "min_capacity"):
      allocation.zipf_capacities(4, 10, min_capacity=3)
    with self.assertRaisesRegex(ValueError, "min_capacity=3 exceeds max_capacity=2"):
      allocation.zipf_capacities(4, 8, max_capacity=2, min_capacity=3)
    with self.assertRaisesRegex(ValueError, "min_capacity"):
      allocation.zipf_capacities(4, 8, min_capacity=-1)


class ThresholdTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_scalar_and_vector(self):
    s = jnp.array([[0.5, 1.5], [2.5, 0.1]])
    np.testing.assert_array_equal(self.variant(allocation.threshold)(s, 1.0),
                                  [[False, True], [True, False]])
    np.testing.assert_array_equal(self.variant(allocation.threshold)(s, jnp.array([0.2, 2.0])),
                                  [[True, False], [True, False]])

  def test_bfloat16_scores_compared_in_float32(self):
    s = jnp.array([[1.0]], jnp.bfloat16)
    # 1.0 > 0.999 in float32; a bfloat16 cast of 0.999 would round to 1.0 and fail.
    self.assertTrue(bool(allocation.threshold(s, jnp.float32(0.999))[0, 0]))


class GradientAndTracingTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    # assert_max_traces counts per definition site; parameterized cases share one site.
    chex.clear_trace_counter()

  @parameterized.parameters(
      ("topk", lambda s: allocation.topk(s, 2)),
      ("mc", lambda s: allocation.mutual_choice(s, 2)),
      ("fc", lambda s: allocation.feature_choice(s, 3)),
  )
  def test_gradient_only_through_selected(self, _, select):
    s = jnp.asarray(_scores(np.random.default_rng(8), 6, 10, "normal"))
    w = jnp.asarray(np.random.default_rng(9).normal(size=s.shape), jnp.float32)

    def loss(x):
      mask = jax.lax.stop_gradient(select(x))
      return jnp.sum(jnp.where(mask, jax.nn.relu(x), 0.0) * w)

    grad = np.asarray(jax.grad(loss)(s))
    mask = np.asarray(select(s))
    self.assertTrue(np.all(grad[~mask] == 0.0))
    np.testing.assert_allclose(grad[mask], (np.asarray(w) * (np.asarray(s) > 0))[mask])

  @parameterized.parameters(
      ("topk", lambda s: allocation.topk(s, 2)),
      ("mc", lambda s: allocation.mutual_choice(s, 1.5)),
      ("fc", lambda s: allocation.feature_choice(s, np.array([2, 1, 1, 0, 2], np.int32))),
      ("threshold", lambda s: allocation.threshold(s, 0.3)),
  )
  def test_no_recompilation_when_values_change(self, _, select):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def fn(s):
      return select(s)

    rng = np.random.default_rng(10)
    for _ in range(3):
      fn(jnp.asarray(rng.normal(size=(4, 5)), jnp.float32))

  def test_traced_capacity_values_do_not_recompile(self):
    @functools.partial(jax.jit, static_argnames="m")
    @chex.assert_max_traces(n=1)
    def fn(s, cap, m):
      return allocation.feature_choice(s, cap, max_capacity=m)

    s = jnp.zeros((4, 3))
    for cap in ([1, 2, 0], [0, 0, 2], [2, 2, 2]):
      out = fn(s, jnp.array(cap, jnp.int32), m=2)
      np.testing.assert_array_equal(np.asarray(out).sum(0), cap)


class BadArgumentsTest(parameterized.TestCase):

  def test_scores_rank_and_dtype(self):
    for fn in (lambda s: allocation.topk(s, 1), lambda s: allocation.mutual_choice(s, 1),
               lambda s: allocation.feature_choice(s, 1), lambda s: allocation.threshold(s, 0.)):
      with self.assertRaisesRegex(ValueError, "2-D"):
        fn(jnp.zeros((2, 3, 4)))
      with self.assertRaisesRegex(ValueError, "floating dtype"):
        fn(jnp.zeros((2, 3), jnp.int32))

  @parameterized.parameters(0, -1, 5, 1.5)
  def test_topk_k(self, k):
    with self.assertRaisesRegex(ValueError, r"k must be an integer in \[1, 4\]"):
      allocation.topk(jnp.zeros((2, 4)), k)

  @parameterized.parameters(0, -1, 4.5)
  def test_mutual_choice_k(self, k):
    with self.assertRaisesRegex(ValueError, r"k must be in \(0, 4\]"):
      allocation.mutual_choice(jnp.zeros((2, 4)), k)

  def test_mutual_choice_budget_rounds_to_zero(self):
    with self.assertRaisesRegex(ValueError, "at least 1"):
      allocation.mutual_choice(jnp.zeros((2, 4)), 0.1)

  def test_traced_k(self):
    with self.assertRaisesRegex(ValueError, "static Python number"):
      jax.jit(allocation.topk)(jnp.zeros((2, 4)), 2)

  @parameterized.parameters(-1, 3)
  def test_capacity_range(self, cap):
    with self.assertRaisesRegex(ValueError, r"capacity must be in \[0, 2\]"):
      allocation.feature_choice(jnp.zeros((2, 4)), cap)

  def test_capacity_array(self):
    with self.assertRaisesRegex(ValueError, r"every capacity must be in \[0, 2\]"):
      allocation.feature_choice(jnp.zeros((2, 3)), np.array([0, 1, 3]))
    with self.assertRaisesRegex(ValueError, r"shape \(3,\)"):
      allocation.feature_choice(jnp.zeros((2, 3)), np.array([0, 1]))

  def test_threshold_shape(self):
    with self.assertRaisesRegex(ValueError, "theta"):
      allocation.threshold(jnp.zeros((2, 3)), jnp.zeros((2,)))


if __name__ == "__main__":
  from absl.testing import absltest
  absltest.main()

"""Tests for sae_jax.allocation.grouped: the grouped kernels equal plain lax.top_k selections.

Shapes are chosen so that grouping really happens (at least 4k groups per row), with
adversarial inputs: many ties, constant rows, ReLU zeros, signed zeros and infinities,
all of a row's winners inside one group, and one row taking most of a global budget.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from jax import lax

from sae_jax import allocation
from sae_jax.allocation import grouped

from tests.sae_jax.allocation_test import ref_feature_choice
from tests.sae_jax.allocation_test import ref_mutual_choice


def _scores(rng, b, f, kind):
  if kind == "normal":
    return rng.normal(size=(b, f)).astype(np.float32)
  if kind == "ties":  # few distinct values: ties everywhere, also among group maxima
    return rng.integers(-2, 3, size=(b, f)).astype(np.float32)
  if kind == "constant":
    return np.full((b, f), 0.5, np.float32)
  if kind == "relu":
    return np.maximum(rng.normal(size=(b, f)) - 1.0, 0.0).astype(np.float32)
  if kind == "signed":  # +0.0, -0.0, +-inf and a few finite values
    choices = np.array([0.0, -0.0, np.inf, -np.inf, 1.0, -1.0], np.float32)
    return choices[rng.integers(0, 6, size=(b, f))]
  if kind == "clustered":  # each row's best entries packed into one group
    s = rng.normal(size=(b, f)).astype(np.float32)
    s[:, 40:56] += 10.0
    return s
  raise ValueError(kind)


KINDS = ("normal", "ties", "constant", "relu", "signed", "clustered")


def _bits(x):
  """Values compared bit for bit, so -0.0 != +0.0."""
  return np.asarray(x).view(np.uint32)


class RowsTopKTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(kind=KINDS, k=(1, 2, 7))
  def test_equals_lax_top_k(self, kind, k):
    s = jnp.asarray(_scores(np.random.default_rng(0), 6, 256, kind))
    vals, cols = self.variant(functools.partial(allocation.rows_topk, k=k))(s)
    want_vals, want_cols = lax.top_k(s, k)
    np.testing.assert_array_equal(np.asarray(cols), np.asarray(want_cols))
    np.testing.assert_array_equal(_bits(vals), _bits(want_vals))

  def test_group_sizes_used(self):
    # k=2 groups by 32, k=7 needs 28 groups so by 8; k=40 cannot group 256 columns.
    self.assertEqual(grouped._group_size(256, 2), 32)
    self.assertEqual(grouped._group_size(256, 7), 8)
    self.assertIsNone(grouped._group_size(256, 40))

  def test_ungrouped_shapes_fall_back(self):
    s = jnp.asarray(_scores(np.random.default_rng(1), 4, 13, "ties"))
    np.testing.assert_array_equal(np.asarray(allocation.rows_topk(s, 3)[1]),
                                  np.asarray(lax.top_k(s, 3)[1]))

  def test_bfloat16(self):
    s = jnp.asarray(_scores(np.random.default_rng(2), 4, 512, "normal"), jnp.bfloat16)
    vals, cols = jax.jit(allocation.rows_topk, static_argnums=1)(s, 4)
    want_vals, want_cols = lax.top_k(s, 4)
    np.testing.assert_array_equal(np.asarray(cols), np.asarray(want_cols))
    np.testing.assert_array_equal(np.asarray(vals, np.float32), np.asarray(want_vals, np.float32))


class ColsTopKTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(kind=KINDS, k=(1, 3))
  def test_equals_lax_top_k_of_transpose(self, kind, k):
    s = jnp.asarray(_scores(np.random.default_rng(3), 128, 24, kind))
    vals, rows = self.variant(functools.partial(allocation.cols_topk, k=k))(s)
    want_vals, want_rows = lax.top_k(s.T, k)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(want_rows))
    np.testing.assert_array_equal(_bits(vals), _bits(want_vals))


class CompactTest(parameterized.TestCase):

  @parameterized.parameters((0.0,), (0.01,), (0.3,), (1.0,))
  def test_matches_flatnonzero(self, density):
    mask = np.random.default_rng(4).random((37, 64)) < density
    size = 500
    idx, count = jax.jit(grouped.compact, static_argnums=1)(jnp.asarray(mask), size)
    want = np.flatnonzero(mask)
    self.assertEqual(int(count), want.size)
    m = min(size, want.size)
    np.testing.assert_array_equal(np.asarray(idx)[:m], want[:m])

  def test_prefix_counts_exact(self):
    mask = np.random.default_rng(5).random((50, 96)) < 0.5
    got = jax.jit(grouped._inclusive_prefix_counts)(jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(got).reshape(-1), np.cumsum(mask.reshape(-1)))


class TopNTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(kind=KINDS, k=(0.5, 3, 9))
  def test_exact_when_ok(self, kind, k):
    s = _scores(np.random.default_rng(6), 16, 256, kind)
    n = allocation.mutual_choice_budget(16, k)
    mask, ok = self.variant(functools.partial(grouped.top_n_mask, n=n))(jnp.asarray(s))
    if kind in ("normal", "relu", "clustered"):
      self.assertTrue(bool(ok))  # ordinary inputs never need the fallback
    if bool(ok):
      np.testing.assert_array_equal(np.asarray(mask), ref_mutual_choice(s, k))

  def test_ties_beyond_slack_report_not_ok(self):
    s = jnp.full((8, 256), 1.0)  # all 64 group maxima tie; 18 candidate slots
    _, ok = grouped.top_n_mask(s, 16)
    self.assertFalse(bool(ok))

  def test_one_row_takes_most_of_the_budget(self):
    # No per-row cap: row 2 holds 200 of the 256 selected entries.
    rng = np.random.default_rng(7)
    s = rng.normal(size=(32, 256)).astype(np.float32)
    s[2, :200] += 50.0
    mask, ok = grouped.top_n_mask(jnp.asarray(s), 256)
    self.assertTrue(bool(ok))
    np.testing.assert_array_equal(np.asarray(mask), ref_mutual_choice(s, 8))
    self.assertEqual(int(np.asarray(mask)[2].sum()), 200)

  def test_indices_as_groups_round_trip(self):
    rng = np.random.default_rng(8)
    flat = rng.choice(16 * 64, size=100, replace=False)
    groups, keep = grouped.indices_as_groups(jnp.asarray(flat), 8, 120)
    got = grouped.groups_to_mask(groups, keep, (16, 64))
    want = np.zeros(16 * 64, bool)
    want[flat] = True
    np.testing.assert_array_equal(np.asarray(got).reshape(-1), want)


class MutualChoiceFastPathTest(chex.TestCase):

  @chex.variants(with_jit=True)
  @parameterized.product(kind=KINDS, k=(1, 4))
  def test_mutual_choice_exact_on_grouped_shapes(self, kind, k):
    # Covers the grouped path, its per-row fallback and the flat fallback (constant
    # and tied inputs make more groups tie than the slack allows).
    s = _scores(np.random.default_rng(9), 16, 256, kind)
    mask = np.asarray(self.variant(lambda x: allocation.mutual_choice(x, k))(s))
    np.testing.assert_array_equal(mask, ref_mutual_choice(s, k))
    self.assertEqual(mask.sum(), 16 * k)

  def test_fallback_with_saturated_row(self):
    # All groups tie (fallback), and row 0 needs more than max_per_row proposals.
    s = np.ones((8, 64), np.float32)
    s[0] = 2.0
    mask = jax.jit(lambda x: allocation.mutual_choice(x, 10, max_per_row=4))(s)
    np.testing.assert_array_equal(np.asarray(mask), ref_mutual_choice(s, 10))


class FeatureChoiceLayoutTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(kind=KINDS, zipf=(False, True))
  def test_both_layouts_match_reference(self, kind, zipf):
    b, f = 256, 16
    s = _scores(np.random.default_rng(10), b, f, kind)
    cap = (allocation.zipf_capacities(f, 4 * b // 8, 1.0, max_capacity=b) if zipf else 2)
    want = ref_feature_choice(s, cap)
    got = self.variant(lambda x: allocation.feature_choice(x, cap))(jnp.asarray(s))
    np.testing.assert_array_equal(np.asarray(got), want)
    got_fb = self.variant(lambda x: allocation.feature_choice_fb(x, cap))(jnp.asarray(s.T))
    np.testing.assert_array_equal(np.asarray(got_fb), want.T)

  def test_traced_capacity_feature_major(self):
    b, f = 128, 8
    s = _scores(np.random.default_rng(11), b, f, "ties")
    cap = np.array([5, 0, 3, 1, 2, 4, 1, 1], np.int32)
    got = jax.jit(lambda x, c: allocation.feature_choice_fb(x, c, max_capacity=5))(
        jnp.asarray(s.T), jnp.asarray(cap))
    np.testing.assert_array_equal(np.asarray(got), ref_feature_choice(s, cap).T)

  def test_feature_major_shape_error_names_argument(self):
    with self.assertRaisesRegex(ValueError, "scores_FxB"):
      allocation.feature_choice_fb(jnp.ones((3,)), 1)

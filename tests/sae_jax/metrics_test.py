"""Tests for sae_jax.metrics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from sae_jax import metrics

INT32_MAX = np.iinfo(np.int32).max


class ReconstructionMetricsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_normalized_mse_golden(self):
    # By hand: x mean is [2, 3], so sum((x - mean)^2) = 4; the only error is
    # 5 - 4 = 1 in the last entry, so the ratio is 1 / 4.
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    recon = jnp.array([[1.0, 2.0], [3.0, 5.0]])
    out = self.variant(metrics.normalized_mse)(recon, x)
    chex.assert_shape(out, ())
    np.testing.assert_allclose(out, 0.25, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_normalized_mse_batch_mean_is_one_and_perfect_is_zero(self):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(7, 5)), jnp.float32)
    nmse = self.variant(metrics.normalized_mse)
    mean_recon = jnp.broadcast_to(x.mean(axis=0), x.shape)
    np.testing.assert_allclose(nmse(mean_recon, x), 1.0, rtol=1e-6)
    self.assertEqual(float(nmse(x, x)), 0.0)

  def test_normalized_mse_bfloat16_reduces_in_float32(self):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16)
    recon = jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16)
    out = metrics.normalized_mse(recon, x)
    self.assertEqual(out.dtype, jnp.float32)
    # Independent float64 reference on the same (bfloat16-rounded) values.
    x64 = np.asarray(x, np.float64)
    r64 = np.asarray(recon, np.float64)
    expected = np.sum((r64 - x64) ** 2) / np.sum((x64 - x64.mean(0)) ** 2)
    np.testing.assert_allclose(out, expected, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_fvu_with_fixed_mean_golden(self):
    # By hand: with mean 0 the denominator is 1 + 4 + 9 + 16 = 30 and the
    # squared error is 1, so FVU = 1 / 30.
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    recon = jnp.array([[1.0, 2.0], [3.0, 5.0]])
    out = self.variant(metrics.fvu)(recon, x, jnp.zeros(2))
    np.testing.assert_allclose(out, 1.0 / 30.0, rtol=1e-6)

  def test_fvu_without_mean_equals_normalized_mse(self):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    recon = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    np.testing.assert_array_equal(
        metrics.fvu(recon, x), metrics.normalized_mse(recon, x))

  def test_error_terms_accumulate_over_batches(self):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(10, 3)), jnp.float32)
    recon = jnp.asarray(rng.normal(size=(10, 3)), jnp.float32)
    mean = x.mean(axis=0)
    first = metrics.reconstruction_error_terms(recon[:4], x[:4], mean)
    second = metrics.reconstruction_error_terms(recon[4:], x[4:], mean)
    pooled = (first[0] + second[0]) / (first[1] + second[1])
    np.testing.assert_allclose(pooled, metrics.fvu(recon, x, mean), rtol=1e-6)

  @parameterized.named_parameters(
      ("recon_1d", (4,), (4,), None, "recon"),
      ("x_3d", (2, 3), (2, 3, 1), None, "x"),
      ("shape_mismatch", (2, 3), (3, 3), None, "same shape"),
      ("mean_shape", (2, 3), (2, 3), (2,), "mean"),
  )
  def test_reconstruction_errors(self, recon_shape, x_shape, mean_shape, message):
    mean = None if mean_shape is None else jnp.zeros(mean_shape)
    with self.assertRaisesRegex(ValueError, message):
      metrics.fvu(jnp.zeros(recon_shape), jnp.zeros(x_shape), mean)


class SparsityMetricsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_l0_counts_and_mean(self):
    codes = jnp.array([[0.0, 0.5, 2.0, 0.0],
                       [0.0, 0.0, 0.0, 0.0],
                       [0.1, 0.2, 0.3, 0.4]])
    l0 = self.variant(metrics.l0_per_token)(codes)
    self.assertEqual(l0.dtype, jnp.int32)
    np.testing.assert_array_equal(l0, [2, 0, 4])
    # Strictly greater than eps: 0.2 with eps 0.2 does not count.
    l0_eps = self.variant(metrics.l0_per_token)(codes, 0.2)
    np.testing.assert_array_equal(l0_eps, [2, 0, 2])
    np.testing.assert_allclose(self.variant(metrics.mean_l0)(codes), 2.0)

  def test_l0_errors(self):
    with self.assertRaisesRegex(ValueError, "codes"):
      metrics.l0_per_token(jnp.zeros(3))
    with self.assertRaisesRegex(ValueError, "eps"):
      metrics.mean_l0(jnp.zeros((2, 3)), eps=-0.1)


class FeatureUsageTest(chex.TestCase):

  def test_init(self):
    state = metrics.feature_usage_init(5)
    chex.assert_shape([state.density_ema, state.tokens_since_fired], (5,))
    self.assertEqual(state.density_ema.dtype, jnp.float32)
    self.assertEqual(state.tokens_since_fired.dtype, jnp.int32)
    self.assertEqual(int(state.num_tokens), 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ema_and_dead_counter_over_updates(self):
    update = self.variant(
        lambda s, c: metrics.feature_usage_update(s, c, decay=0.5))
    state = metrics.feature_usage_init(3)
    # Feature 0 fires on both tokens, feature 1 on one, feature 2 never.
    batch_a = jnp.array([[1.0, 0.0, 0.0], [2.0, 3.0, 0.0]])
    state = update(state, batch_a)
    # The first update takes the batch density as is (no pull towards 0).
    np.testing.assert_allclose(state.density_ema, [1.0, 0.5, 0.0])
    np.testing.assert_array_equal(state.tokens_since_fired, [0, 0, 2])
    self.assertEqual(int(state.num_tokens), 2)

    batch_b = jnp.array([[0.0, 0.0, 0.0], [0.0, 0.0, 4.0]])
    state = update(state, batch_b)
    # By hand: 0.5 * old + 0.5 * [0, 0, 0.5].
    np.testing.assert_allclose(state.density_ema, [0.5, 0.25, 0.25])
    np.testing.assert_array_equal(state.tokens_since_fired, [2, 2, 0])

    state = update(state, jnp.zeros((2, 3)))
    np.testing.assert_allclose(state.density_ema, [0.25, 0.125, 0.125])
    np.testing.assert_array_equal(state.tokens_since_fired, [4, 4, 2])
    self.assertEqual(int(state.num_tokens), 6)
    np.testing.assert_array_equal(metrics.dead_features(state, 4), [True, True, False])
    np.testing.assert_allclose(metrics.dead_fraction(state, 4), 2.0 / 3.0)
    np.testing.assert_array_equal(metrics.dead_features(state, 5), [False] * 3)

  def test_fire_threshold(self):
    state = metrics.feature_usage_init(2)
    codes = jnp.array([[0.3, 0.05], [0.2, 0.0]])
    state = metrics.feature_usage_update(state, codes, fire_threshold=0.1)
    np.testing.assert_allclose(state.density_ema, [1.0, 0.0])
    np.testing.assert_array_equal(state.tokens_since_fired, [0, 2])

  def test_counters_saturate(self):
    state = metrics.FeatureUsageState(
        density_ema=jnp.zeros(2, jnp.float32),
        tokens_since_fired=jnp.array([INT32_MAX - 1, 5], jnp.int32),
        num_tokens=jnp.array(INT32_MAX - 2, jnp.int32))
    state = metrics.feature_usage_update(state, jnp.zeros((3, 2)))
    np.testing.assert_array_equal(state.tokens_since_fired, [INT32_MAX, 8])
    self.assertEqual(int(state.num_tokens), INT32_MAX)
    state = metrics.feature_usage_update(state, jnp.zeros((3, 2)))
    np.testing.assert_array_equal(state.tokens_since_fired, [INT32_MAX, 11])
    self.assertEqual(int(state.num_tokens), INT32_MAX)
    np.testing.assert_array_equal(
        metrics.dead_features(state, INT32_MAX), [True, False])

  def test_traced_decay_does_not_retrace(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def update(state, codes, decay):
      return metrics.feature_usage_update(state, codes, decay=decay)

    chex.clear_trace_counter()
    state = metrics.feature_usage_init(3)
    codes = jnp.array([[1.0, 0.0, 0.0]])
    for decay in (0.9, 0.99, 0.999):
      state = update(state, codes, jnp.float32(decay))
    np.testing.assert_allclose(state.density_ema, [1.0, 0.0, 0.0])

  @parameterized.named_parameters(
      ("zero", 0.0), ("one", 1.0), ("negative", -0.5), ("above", 1.5))
  def test_decay_errors(self, decay):
    with self.assertRaisesRegex(ValueError, "decay"):
      metrics.feature_usage_update(
          metrics.feature_usage_init(2), jnp.zeros((1, 2)), decay=decay)

  def test_usage_errors(self):
    state = metrics.feature_usage_init(2)
    with self.assertRaisesRegex(ValueError, "num_features"):
      metrics.feature_usage_init(0)
    with self.assertRaisesRegex(ValueError, "feature_usage_init"):
      metrics.feature_usage_update(state, jnp.zeros((1, 3)))
    with self.assertRaisesRegex(ValueError, "codes"):
      metrics.feature_usage_update(state, jnp.zeros((0, 2)))
    with self.assertRaisesRegex(ValueError, "codes"):
      metrics.feature_usage_update(state, jnp.zeros(2))
    with self.assertRaisesRegex(ValueError, "dead_after_tokens"):
      metrics.dead_features(state, 0)
    with self.assertRaisesRegex(ValueError, "dead_after_tokens"):
      metrics.dead_fraction(state, INT32_MAX + 1)


class ZipfTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_fit_recovers_law_and_ignores_zeros(self):
    num_features, scale, exponent = 40, 0.3, 1.2
    law = scale * np.arange(1, num_features + 1) ** -exponent
    law[-7:] = 0.0  # dead features must not enter the fit
    densities = np.random.default_rng(4).permutation(law)
    C, s = self.variant(metrics.fit_zipf)(jnp.asarray(densities, jnp.float32))
    np.testing.assert_allclose(C, scale, rtol=1e-5)
    np.testing.assert_allclose(s, exponent, rtol=1e-5)

  def test_fit_min_density_excludes_tail(self):
    law = 0.5 * np.arange(1, 21, dtype=np.float64) ** -0.8
    law[-5:] = 1e-9  # off-law tail, below min_density
    C, s = metrics.fit_zipf(jnp.asarray(law, jnp.float32), min_density=1e-6)
    np.testing.assert_allclose([C, s], [0.5, 0.8], rtol=1e-5)
    _, s_all = metrics.fit_zipf(jnp.asarray(law, jnp.float32))
    self.assertGreater(float(s_all), 1.5)

  def test_fit_degenerate_inputs(self):
    C, s = metrics.fit_zipf(jnp.array([0.0, 0.2, 0.0]))
    np.testing.assert_allclose([C, s], [0.2, 0.0], rtol=1e-6)
    C, s = metrics.fit_zipf(jnp.zeros(4))
    np.testing.assert_array_equal([C, s], [0.0, 0.0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_zipf_expected_golden(self):
    out = self.variant(lambda c, s: metrics.zipf_expected(4, c, s))(0.5, 1.0)
    np.testing.assert_allclose(out, [0.5, 0.25, 0.5 / 3.0, 0.125], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_underutilised_hand_example(self):
    # Ranks by descending density: f1=1, f3=2, f4=3, f0=4, f2=5. With
    # C=0.5, s=1 the law at those ranks is 0.5, 0.25, 1/6, 0.125, 0.1.
    densities = jnp.array([0.1, 0.5, 0.0, 0.3, 0.2])
    under = self.variant(metrics.underutilised_features)
    np.testing.assert_array_equal(
        under(densities, 0.5, 1.0), [True, False, True, False, False])
    np.testing.assert_array_equal(under(densities, 0.5, 1.0, 2.0), [True] * 5)
    np.testing.assert_array_equal(
        under(densities, 0.5, 1.0, 0.5), [False, False, True, False, False])
    # A zero law still marks dead features.
    np.testing.assert_array_equal(
        under(densities, 0.0, 0.0), [False, False, True, False, False])

  def test_underutilised_ties_rank_lower_index_first(self):
    # Equal densities: index 0 gets rank 1 (law 0.3), index 1 rank 2 (0.15).
    out = metrics.underutilised_features(jnp.array([0.2, 0.2]), 0.3, 1.0)
    np.testing.assert_array_equal(out, [True, False])

  def test_zipf_deficit_golden(self):
    # Law at own rank (C=0.5, s=1): [0.125, 0.5, 0.1, 0.25, 1/6].
    densities = jnp.array([0.1, 0.5, 0.0, 0.3, 0.2])
    out = metrics.zipf_deficit(densities, 0.5, 1.0, max_ratio=10.0)
    np.testing.assert_allclose(
        out, [1.25, 1.0, 10.0, 0.25 / 0.3, (1 / 6) / 0.2], rtol=1e-6)
    # 0.9 has rank 1 (law 0.5); 1e-4 has rank 2 (law 0.25, ratio 2500 -> 4).
    clipped = metrics.zipf_deficit(jnp.array([1e-4, 0.9]), 0.5, 1.0, max_ratio=4.0)
    np.testing.assert_allclose(clipped, [4.0, 0.5 / 0.9], rtol=1e-6)
    tiny = metrics.zipf_deficit(jnp.array([0.9, 0.8]), 0.01, 0.0, max_ratio=4.0)
    np.testing.assert_allclose(tiny, [0.25, 0.25], rtol=1e-6)

  def test_zipf_errors(self):
    with self.assertRaisesRegex(ValueError, "tau"):
      metrics.underutilised_features(jnp.ones(3), 1.0, 1.0, tau=0.0)
    with self.assertRaisesRegex(ValueError, "tau"):
      metrics.underutilised_features(jnp.ones(3), 1.0, 1.0, tau=-1.0)
    with self.assertRaisesRegex(ValueError, "densities"):
      metrics.fit_zipf(jnp.ones((2, 2)))
    with self.assertRaisesRegex(ValueError, "min_density"):
      metrics.fit_zipf(jnp.ones(3), min_density=-1.0)
    with self.assertRaisesRegex(ValueError, "num_features"):
      metrics.zipf_expected(0, 1.0, 1.0)
    with self.assertRaisesRegex(ValueError, "max_ratio"):
      metrics.zipf_deficit(jnp.ones(3), 1.0, 1.0, max_ratio=0.5)
    with self.assertRaisesRegex(ValueError, "densities"):
      metrics.zipf_deficit(jnp.ones((1, 3)), 1.0, 1.0)

"""Tests for sae_jax.evaluation.recovery: Hungarian MCC, best-match precision/recall, report."""

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from sae_jax.evaluation import recovery


def _unit(rows):
  rows = np.asarray(rows, np.float64)
  return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _features(n=40, d=12, seed=0):
  return _unit(np.random.default_rng(seed).normal(size=(n, d)))


class CosineMatrixTest(parameterized.TestCase):

  @parameterized.parameters(1, 3, 1024)
  def test_blocks_match_one_product(self, block):
    rng = np.random.default_rng(1)
    decoder = rng.normal(size=(7, 5)) * 3.0
    features = rng.normal(size=(4, 5))
    expected = np.abs(_unit(decoder) @ _unit(features).T)
    out = recovery.abs_cosine_matrix(decoder, features, block=block)
    self.assertEqual(out.dtype, np.float32)
    np.testing.assert_allclose(out, expected, atol=1e-6)

  def test_zero_row_has_zero_cosines(self):
    decoder = np.array([[0.0, 0.0], [3.0, 4.0]])
    out = recovery.abs_cosine_matrix(decoder, np.eye(2))
    np.testing.assert_allclose(out, [[0.0, 0.0], [0.6, 0.8]], atol=1e-7)


class MccTest(parameterized.TestCase):

  def test_signed_permutation_scores_one(self):
    features = _features()
    rng = np.random.default_rng(2)
    signs = rng.choice([-1.0, 1.0], size=(40, 1))
    scales = rng.uniform(0.5, 2.0, size=(40, 1))
    decoder = features[rng.permutation(40)] * signs * scales
    self.assertAlmostEqual(recovery.mcc(decoder, features), 1.0, places=6)

  def test_narrower_and_wider_dictionaries_score_one_over_matched_pairs(self):
    features = _features()
    # Width 10 < 40: each of the 10 latents is a distinct true feature.
    self.assertAlmostEqual(recovery.mcc(features[[3, 17, 5, 9, 0, 21, 33, 8, 2, 39]], features),
                           1.0, places=6)
    # Width 50 > 40: the 40 true features are all matched; the 10 extra rows are unmatched.
    extra = np.random.default_rng(3).normal(size=(10, 12))
    self.assertAlmostEqual(recovery.mcc(np.concatenate([extra, features]), features), 1.0,
                           places=6)

  def test_hungarian_beats_greedy_golden(self):
    # Two true features e1, e2 and two latents with |cos| [[0.7, 0.6], [0.6, 0.1]]. Greedy
    # best-match gives latent 0 feature e1 (0.7) and leaves latent 1 with e2 (0.1): mean
    # 0.4. The one-to-one optimum crosses over: (0.6 + 0.6) / 2 = 0.6.
    features = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    decoder = np.array([[0.7, 0.6, np.sqrt(1 - 0.85)], [0.6, -0.1, np.sqrt(1 - 0.37)]])
    self.assertAlmostEqual(recovery.mcc(decoder, features), 0.6, places=6)
    cosines = recovery.abs_cosine_matrix(decoder, features)
    self.assertAlmostEqual(recovery.mcc_from_cosines(cosines), 0.6, places=6)

  def test_orthogonal_dictionary_scores_zero(self):
    self.assertAlmostEqual(recovery.mcc(np.eye(4)[2:], np.eye(4)[:2]), 0.0)


class FeatureRecoveryTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.features = np.eye(3, dtype=np.float32)
    # Latent 0 is e1, latent 1 halfway between e1 and e2 (|cos| 0.707 < 0.8 with both),
    # latent 2 is -e3 (|cos| 1).
    self.decoder = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, -1.0]])

  def test_golden_all_live(self):
    out = recovery.feature_recovery(self.decoder, self.features, threshold=0.8)
    # Latents 0 and 2 pass: 2/3. Features e1 and e3 have a passing latent: 2/3.
    self.assertAlmostEqual(out.precision, 2 / 3)
    self.assertAlmostEqual(out.recall, 2 / 3)
    self.assertAlmostEqual(out.f1, 2 / 3)
    self.assertEqual(out.threshold, 0.8)

  def test_golden_dead_latent_left_out(self):
    live = np.array([False, True, True])
    out = recovery.feature_recovery(self.decoder, self.features, threshold=0.8, live=live)
    # Live latents 1 and 2: only 2 passes, 1/2. e1's best live latent is latent 1 (0.707):
    # only e3 is recovered, 1/3. F1 = 2 * (1/2)(1/3) / (1/2 + 1/3) = 2/5.
    self.assertAlmostEqual(out.precision, 1 / 2)
    self.assertAlmostEqual(out.recall, 1 / 3)
    self.assertAlmostEqual(out.f1, 2 / 5)
    cosines = recovery.abs_cosine_matrix(self.decoder, self.features)
    self.assertEqual(recovery.feature_recovery_from_cosines(cosines, threshold=0.8, live=live),
                     out)

  def test_threshold_is_inclusive_and_lower_threshold_admits_more(self):
    out = recovery.feature_recovery(self.decoder, self.features, threshold=np.sqrt(0.5) - 1e-6)
    self.assertEqual((out.precision, out.recall, out.f1), (1.0, 1.0, 1.0))

  def test_duplicates_count_for_precision_once_for_recall(self):
    decoder = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    out = recovery.feature_recovery(decoder, self.features)
    self.assertEqual(out.precision, 1.0)
    self.assertAlmostEqual(out.recall, 1 / 3)

  def test_no_live_latent_scores_zero(self):
    out = recovery.feature_recovery(self.decoder, self.features, live=np.zeros(3, bool))
    self.assertEqual((out.precision, out.recall, out.f1), (0.0, 0.0, 0.0))

  def test_blocked_path_matches_matrix_path(self):
    features = _features(n=50, d=8)
    rng = np.random.default_rng(4)
    decoder = np.concatenate([features[:20] + 0.3 * rng.normal(size=(20, 8)),
                              rng.normal(size=(2100, 8))])
    live = rng.random(2120) < 0.9
    cosines = recovery.abs_cosine_matrix(decoder, features)
    for threshold in (0.5, 0.8, 0.95):
      self.assertEqual(
          recovery.feature_recovery(decoder, features, threshold=threshold, live=live),
          recovery.feature_recovery_from_cosines(cosines, threshold=threshold, live=live))


class RecoveryScoresTest(absltest.TestCase):

  def test_perfect_sae_with_a_dead_latent(self):
    rng = np.random.default_rng(5)
    features = _features(n=6, d=5)
    true_codes = rng.uniform(1.0, 2.0, size=(100, 6)) * (rng.random((100, 6)) < 0.4)
    true_codes[:, 5] = 0.0  # feature 5 never fires on this set
    x = (true_codes @ features).astype(np.float32)
    out = recovery.recovery_scores(features, features, x, x, true_codes, true_codes)
    self.assertAlmostEqual(out.mcc, 1.0, places=6)
    # The latent of feature 5 is dead: left out of precision, and feature 5 is not found.
    self.assertEqual(out.precision, 1.0)
    self.assertAlmostEqual(out.recall, 5 / 6)
    self.assertAlmostEqual(out.dead_fraction, 1 / 6)
    self.assertEqual(out.fvu, 0.0)
    expected_l0 = (true_codes > 0).sum(axis=1).mean()
    self.assertAlmostEqual(out.sae_l0, expected_l0, places=5)
    self.assertAlmostEqual(out.true_l0, expected_l0, places=5)
    self.assertEqual(out.threshold, recovery.DEFAULT_THRESHOLD)

  def test_fvu_is_textbook_over_the_whole_set(self):
    features = _features(n=6, d=5)
    rng = np.random.default_rng(6)
    codes = rng.uniform(size=(50, 6))
    x = (codes @ features + 3.0).astype(np.float32)
    recon = np.broadcast_to(x.mean(axis=0), x.shape)  # predicting the mean explains nothing
    out = recovery.recovery_scores(features, features, x, recon, codes, codes)
    self.assertAlmostEqual(out.fvu, 1.0, places=5)


class ErrorTest(parameterized.TestCase):

  def test_bad_arguments_raise(self):
    features = np.eye(3)
    with self.assertRaisesRegex(ValueError, "same width d"):
      recovery.mcc(np.ones((2, 4)), features)
    with self.assertRaisesRegex(ValueError, "decoder must be"):
      recovery.mcc(np.ones(3), features)
    with self.assertRaisesRegex(ValueError, "features must be"):
      recovery.feature_recovery(np.ones((2, 3)), np.zeros((0, 3)))
    with self.assertRaisesRegex(ValueError, "threshold"):
      recovery.feature_recovery(np.ones((2, 3)), features, threshold=0.0)
    with self.assertRaisesRegex(ValueError, "live must be a bool array of shape \\(2,\\)"):
      recovery.feature_recovery(np.ones((2, 3)), features, live=np.ones(3, bool))
    with self.assertRaisesRegex(ValueError, "live must be"):
      recovery.feature_recovery(np.ones((2, 3)), features, live=np.ones(2))
    with self.assertRaisesRegex(ValueError, "abs_cos"):
      recovery.mcc_from_cosines(np.ones(3))
    with self.assertRaisesRegex(ValueError, "block"):
      recovery.abs_cosine_matrix(np.ones((2, 3)), features, block=0)
    x = np.zeros((4, 3))
    with self.assertRaisesRegex(ValueError, "sae_codes must be"):
      recovery.recovery_scores(np.ones((2, 3)), features, x, x, np.zeros((4, 3)),
                               np.zeros((4, 3)))
    with self.assertRaisesRegex(ValueError, "true_codes must be"):
      recovery.recovery_scores(np.ones((2, 3)), features, x, x, np.zeros((4, 2)),
                               np.zeros((4, 2)))


if __name__ == "__main__":
  absltest.main()

"""Tests for sae_jax.evaluation.probing (k-sparse probing)."""

import numpy as np
from absl.testing import parameterized

from sae_jax.evaluation import probing


def _labelled(n=400, f=12, seed=0, classes=2):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, size=n)
  return rng.normal(size=(n, f)).astype(np.float32), labels


class SplitAndRankingTest(parameterized.TestCase):

  def test_stratified_split_is_deterministic_and_stratified(self):
    labels = np.array([0] * 10 + [1] * 5 + [2] * 2)
    train, test = probing.stratified_split(labels, 0.8, seed=3)
    again_train, again_test = probing.stratified_split(labels, 0.8, seed=3)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(test, again_test)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(17))
    # round(0.8 * n_c) per class, clipped to [1, n_c - 1]: 8, 4 and 1.
    self.assertEqual([int(np.sum(labels[train] == c)) for c in range(3)], [8, 4, 1])
    other, _ = probing.stratified_split(labels, 0.8, seed=4)
    self.assertFalse(np.array_equal(train, other))

  def test_mean_difference_ranking(self):
    labels = np.array([0, 0, 1, 1])
    features = np.array([[0.0, 1.0, 5.0], [0.0, 3.0, 5.0], [1.0, 0.0, 5.0], [1.0, 0.0, 5.0]])
    order, scores = probing.mean_difference_ranking(features, labels == 1)
    # Class means [0, 2, 5] and [1, 0, 5]: differences 1, 2 and 0.
    np.testing.assert_array_equal(order, [1, 0, 2])
    np.testing.assert_allclose(scores, [1.0, 2.0, 0.0])

  def test_logistic_regression_matches_its_optimality_condition(self):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3))
    y = (x @ [1.5, -2.0, 0.0] + 0.3 + rng.normal(size=300) > 0).astype(int)
    w, b = probing.fit_logistic_regression(x, y, l2=0.01)
    p = 1 / (1 + np.exp(-(x @ w + b)))
    # Zero gradient: X^T (p - y) / n + l2 w = 0 and sum(p - y) = 0.
    np.testing.assert_allclose(x.T @ (p - y) / 300 + 0.01 * w, 0, atol=1e-9)
    np.testing.assert_allclose(np.mean(p - y), 0, atol=1e-9)
    self.assertGreater(w[0], 0.5)
    self.assertLess(w[1], -0.5)

  def test_separable_data_gives_finite_weights(self):
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    w, b = probing.fit_logistic_regression(x, np.array([0, 0, 1, 1]), l2=1e-3)
    self.assertTrue(np.all(np.isfinite(w)) and np.isfinite(b))
    self.assertGreater(w[0], 1.0)


class KSparseProbeTest(parameterized.TestCase):

  def test_a_column_carrying_the_label_is_found_at_k1(self):
    features, labels = _labelled(seed=2)
    features[:, 7] = labels * 0.5 + 0.2  # Exactly the label, shifted and scaled.
    acc = probing.k_sparse_probe(features, labels, ks=(1, 2, 5))
    self.assertEqual(list(acc), [1, 2, 5])
    self.assertEqual(acc[1], 1.0)
    self.assertGreaterEqual(acc[5], 0.97)
    train, test = probing.stratified_split(labels, 0.8, 0)
    fit = probing.fit_sparse_probe(features[train], labels[train], features[test],
                                   labels[test], 1)
    np.testing.assert_array_equal(fit.columns, [7])
    self.assertEqual(fit.test_accuracy, 1.0)

  def test_random_labels_are_near_chance(self):
    features, labels = _labelled(n=2000, f=30, seed=3)
    for k, acc in probing.k_sparse_probe(features, labels, ks=(1, 5, 20), seed=1).items():
      self.assertLess(abs(acc - 0.5), 0.06, k)  # 400 test rows: 1 std is 0.025.

  def test_multiclass_is_one_vs_rest_averaged(self):
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, size=600)
    features = rng.normal(size=(600, 8))
    features[:, 2] += 4.0 * (labels == 0)  # Column j + 2 marks class j.
    features[:, 3] += 4.0 * (labels == 1)
    features[:, 4] += 4.0 * (labels == 2)
    acc = probing.k_sparse_probe(features, labels, ks=(1,))
    self.assertGreater(acc[1], 0.95)
    train, test = probing.stratified_split(labels, 0.8, 0)
    expected = np.mean([probing.fit_sparse_probe(
        features[train], labels[train] == c, features[test], labels[test] == c, 1).test_accuracy
                        for c in range(3)])
    self.assertAlmostEqual(acc[1], expected, places=12)
    # Random multi-class labels: chance is the mean majority share, 2/3 here.
    noise, random = _labelled(n=1200, f=10, seed=5, classes=3)
    self.assertLess(abs(probing.k_sparse_probe(noise, random, ks=(2,))[2] - 2 / 3), 0.06)

  def test_selection_uses_training_rows_only(self):
    rng = np.random.default_rng(6)
    n = 1000
    labels = rng.integers(0, 2, size=n)
    train, test = probing.stratified_split(labels, 0.8, seed=0)
    features = rng.normal(size=(n, 2))
    # Column 0: noise on training rows, 10 x label on test rows (a mean difference of
    # about 2 over all rows, about 0 over training rows).
    features[test, 0] = 10.0 * labels[test]
    # Column 1: a noisy copy of the label everywhere (a mean difference of 1).
    features[:, 1] += labels
    fit = probing.fit_sparse_probe(features[train], labels[train], features[test],
                                   labels[test], 1)
    np.testing.assert_array_equal(fit.columns, [1])
    order, _ = probing.mean_difference_ranking(features, labels)
    self.assertEqual(order[0], 0)  # Over all rows column 0 would have won.
    acc = probing.k_sparse_probe(features, labels, ks=(1,), seed=0)[1]
    self.assertAlmostEqual(acc, fit.test_accuracy, places=12)
    self.assertGreater(acc, 0.62)  # Column 1 alone; column 0 would give about 1/2.

  @parameterized.named_parameters(
      ("features_1d", dict(features=np.zeros(5)), r"features must be 2-D \[n, f\]"),
      ("features_nan", dict(features=np.full((20, 3), np.nan)), "features must be finite"),
      ("labels_float", dict(labels=np.zeros(20)), "labels must be a 1-D integer"),
      ("labels_length", dict(labels=np.zeros(5, int)), "of length n=20"),
      ("one_class", dict(labels=np.zeros(20, int)), "at least 2 classes"),
      ("tiny_class", dict(labels=np.r_[np.zeros(19, int), 1]),
       r"at least 2 rows .* classes \[1\]"),
      ("k_too_big", dict(ks=(1, 4)), r"ks must be distinct ints in \[1, f=3\]"),
      ("k_zero", dict(ks=(0,)), "ks must be distinct ints"),
      ("k_duplicate", dict(ks=(1, 1)), "ks must be distinct ints"),
      ("k_empty", dict(ks=()), "ks must be distinct ints"),
      ("train_fraction", dict(train_fraction=1.0), r"train_fraction must be a number in \(0, 1\)"),
      ("seed", dict(seed=-1), "seed must be an int >= 0"),
      ("l2", dict(l2=0.0), "l2 must be a finite number > 0"))
  def test_rejects_bad_arguments(self, overrides, pattern):
    kwargs = dict(features=np.random.default_rng(0).normal(size=(20, 3)),
                  labels=np.arange(20) % 2, ks=(1, 2)) | overrides
    with self.assertRaisesRegex(ValueError, pattern):
      probing.k_sparse_probe(**kwargs)

  def test_rejects_bad_binary_inputs(self):
    x = np.zeros((4, 2))
    with self.assertRaisesRegex(ValueError, "labels must take exactly 2 values"):
      probing.mean_difference_ranking(x, np.array([0, 1, 2, 2]))
    with self.assertRaisesRegex(ValueError, "y must be binary .* both values present"):
      probing.fit_logistic_regression(x, np.zeros(4, int))
    with self.assertRaisesRegex(ValueError, "steps must be an int >= 1"):
      probing.fit_logistic_regression(x, np.array([0, 1, 0, 1]), steps=0)
    with self.assertRaisesRegex(ValueError, "test_features must have the f=2 columns"):
      probing.fit_sparse_probe(x, np.array([0, 1, 0, 1]), np.zeros((2, 3)), np.array([0, 1]), 1)
    with self.assertRaisesRegex(ValueError, "test_labels must be binary"):
      probing.fit_sparse_probe(x, np.array([0, 1, 0, 1]), x, np.array([0, 1, 2, 1]), 1)


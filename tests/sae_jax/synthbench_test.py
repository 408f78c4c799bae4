"""Tests for sae_jax.data.synthbench: marginals, hierarchy, overlaps, magnitudes, resume."""

import dataclasses
import json
import tempfile

import chex
import jax
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from sae_jax.data import synthbench

# Small enough to sample tens of thousands of tokens in a second; p_min is raised so every
# feature fires often enough for its rate to be checked.
SMALL = synthbench.SynthBenchConfig(
    d_model=16, num_features=64, target_mean_max_cos=None, p_min=0.01, hierarchy_roots=2,
    hierarchy_branching=3, hierarchy_depth=3, correlation_rank=4, correlation_share=0.5)
TOKENS = 16384
# A rate estimated from TOKENS independent tokens is binomial: 5 standard deviations
# bound every one of the 64 features with probability above 1 - 64 * 6e-7.
SIGMAS = 5.0


_SAMPLE = jax.jit(synthbench.sample_synthbench, static_argnums=2)


def _sample(bench, tokens, seed=1):
  x, codes = _SAMPLE(jax.random.key(seed), bench, tokens)
  return np.asarray(x), np.asarray(codes)


class SampleTest(chex.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.bench = synthbench.make_synthbench(jax.random.key(0), SMALL)
    cls.x, cls.codes = _sample(cls.bench, TOKENS)

  def test_marginal_rates_match_zipf_probabilities(self):
    probs = synthbench.firing_probabilities(SMALL)
    np.testing.assert_allclose(self.bench.probabilities, probs, rtol=1e-6)
    self.assertAlmostEqual(probs[0], SMALL.p_max)
    self.assertAlmostEqual(probs[-1], SMALL.p_min)
    self.assertTrue(np.all(np.diff(probs) < 0))
    # A pure Zipf law: log p is linear in log rank.
    slopes = np.diff(np.log(probs)) / np.diff(np.log(np.arange(1, 65)))
    np.testing.assert_allclose(slopes, np.log(SMALL.p_min / SMALL.p_max) / np.log(64))
    rates = (self.codes > 0).mean(axis=0)
    tolerance = SIGMAS * np.sqrt(probs * (1 - probs) / TOKENS)
    np.testing.assert_array_less(np.abs(rates - probs), tolerance)

  def test_children_fire_only_with_parent_and_one_per_parent(self):
    parents = synthbench.hierarchy_parents(self.bench)
    self.assertEqual(int((parents >= 0).sum()), 2 * (3 + 9))
    np.testing.assert_array_equal(parents[:2], [-1, -1])  # the most frequent are roots
    fires = self.codes > 0
    children = np.flatnonzero(parents >= 0)
    self.assertFalse(np.any(fires[:, children] & ~fires[:, parents[children]]))
    for parent in np.unique(parents[children]):
      self.assertLessEqual(fires[:, parents == parent].sum(axis=1).max(), 1)
      # Every parent fires at least as often as its children together.
      self.assertLessEqual(self.bench.probabilities[parents == parent].sum(),
                           self.bench.probabilities[parent] * (1 + 1e-6))
    # Children do fire, so the exclusivity above is not vacuous.
    self.assertTrue(np.all(fires[:, children].any(axis=0)))

  def test_magnitudes_in_range_and_falling_with_frequency(self):
    mean = np.asarray(self.bench.magnitude_mean)
    self.assertAlmostEqual(mean[0], 5.0, places=5)
    self.assertAlmostEqual(mean[-1], 4.0, places=5)
    self.assertTrue(np.all(np.diff(mean) <= 0))
    on = self.codes > 0
    jitter = SMALL.magnitude_jitter
    codes_on = self.codes[on]
    self.assertGreaterEqual(codes_on.min(), 4.0 * (1 - jitter))
    self.assertLessEqual(codes_on.max(), 5.0 * (1 + jitter))
    self.assertTrue(np.all(self.codes >= 0))
    # Per feature, every magnitude lies within its own jitter band.
    low, high = mean * (1 - jitter) - 1e-5, mean * (1 + jitter) + 1e-5
    self.assertTrue(np.all(np.where(on, (self.codes >= low) & (self.codes <= high), True)))

  def test_activations_are_codes_times_features(self):
    chex.assert_shape(self.x, (TOKENS, SMALL.d_model))
    self.assertEqual(self.x.dtype, np.float32)
    np.testing.assert_allclose(self.x, self.codes @ np.asarray(self.bench.features),
                               atol=1e-4)

  def test_mean_l0_matches_true_l0(self):
    l0 = (self.codes > 0).sum(axis=1)
    expected = synthbench.true_l0(self.bench)
    self.assertAlmostEqual(expected, synthbench.firing_probabilities(SMALL).sum(), places=5)
    # Correlated firing widens the spread of L0, so the tolerance uses the measured spread.
    self.assertLess(abs(l0.mean() - expected), SIGMAS * l0.std() / np.sqrt(TOKENS))
    self.assertAlmostEqual(synthbench.true_l0(self.bench, top=16),
                           synthbench.firing_probabilities(SMALL)[:16].sum(), places=5)

  def test_same_key_same_tokens(self):
    chex.assert_trees_all_equal(_sample(self.bench, TOKENS, seed=1), (self.x, self.codes))
    self.assertFalse(np.array_equal(_sample(self.bench, TOKENS, seed=2)[1], self.codes))

  def test_rows_depend_on_their_own_key_only(self):
    keys = jax.random.split(jax.random.key(1), TOKENS)[5:9]
    x, codes = jax.jit(synthbench.sample_synthbench_rows)(keys, self.bench)
    np.testing.assert_array_equal(codes, self.codes[5:9])
    np.testing.assert_allclose(x, self.x[5:9], atol=1e-5)


class CorrelationTest(absltest.TestCase):

  def test_shared_factor_couples_firing_without_changing_marginals(self):
    # One factor carrying 80 % of the variance: features loading on it with the same sign
    # fire together more often than independent ones would, opposite signs less often.
    cfg = dataclasses.replace(SMALL, hierarchy_roots=0, correlation_rank=1,
                              correlation_share=0.8)
    bench = synthbench.make_synthbench(jax.random.key(0), cfg)
    fires = (_sample(bench, TOKENS)[1] > 0).astype(np.float64)
    probs = synthbench.firing_probabilities(cfg)
    tolerance = SIGMAS * np.sqrt(probs * (1 - probs) / TOKENS)
    np.testing.assert_array_less(np.abs(fires.mean(axis=0) - probs), tolerance)
    sign = np.sign(np.asarray(bench.loadings)[:8, 0])
    joint = fires[:, :8].T @ fires[:, :8] / TOKENS
    lift = joint / np.outer(probs[:8], probs[:8])
    same = (np.outer(sign, sign) > 0) & ~np.eye(8, dtype=bool)
    self.assertGreater(lift[same].min(), 1.2)
    self.assertLess(lift[np.outer(sign, sign) < 0].max(), 0.8)


class FeatureVectorTest(parameterized.TestCase):

  def test_overlap_push_reaches_target(self):
    # Random directions at d=32, f=256 have mean max-cos about 0.6.
    cfg = dataclasses.replace(SMALL, d_model=32, num_features=256, target_mean_max_cos=0.35,
                              max_cos_steps=30)
    random = synthbench.make_synthbench(
        jax.random.key(0), dataclasses.replace(cfg, target_mean_max_cos=None))
    bench = synthbench.make_synthbench(jax.random.key(0), cfg)
    self.assertGreater(float(random.mean_max_cos), 0.5)
    achieved = float(bench.mean_max_cos)
    self.assertLessEqual(achieved, 0.35 * (1 + synthbench.MAX_COS_RTOL))
    self.assertGreater(achieved, 0.30)
    self.assertAlmostEqual(synthbench.mean_max_cosine(bench.features), achieved, places=6)
    np.testing.assert_allclose(np.linalg.norm(bench.features, axis=1), 1.0, rtol=1e-5)

  def test_no_push_below_target(self):
    # Directions already below the target are kept as drawn.
    cfg = dataclasses.replace(SMALL, target_mean_max_cos=0.99)
    pushed = synthbench.make_synthbench(jax.random.key(3), cfg)
    plain = synthbench.make_synthbench(
        jax.random.key(3), dataclasses.replace(cfg, target_mean_max_cos=None))
    np.testing.assert_array_equal(pushed.features, plain.features)

  @parameterized.parameters(1, 7, 64, 1024)
  def test_mean_max_cosine_matches_brute_force(self, block):
    vectors = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cos = np.abs(unit @ unit.T)
    np.fill_diagonal(cos, 0.0)
    self.assertAlmostEqual(synthbench.mean_max_cosine(vectors, block=block),
                           cos.max(axis=1).mean(), places=5)

  def test_same_key_same_model(self):
    first = synthbench.make_synthbench(jax.random.key(5), SMALL)
    second = synthbench.make_synthbench(jax.random.key(5), SMALL)
    chex.assert_trees_all_equal(first, second)


class PresetTest(absltest.TestCase):

  def test_presets_and_their_hierarchies_fit(self):
    paper = synthbench.synthbench_preset("paper")
    self.assertEqual((paper.d_model, paper.num_features, paper.hierarchy_roots), (768, 16384, 128))
    self.assertEqual((paper.hierarchy_branching, paper.hierarchy_depth), (4, 3))
    self.assertEqual((paper.correlation_rank, paper.target_mean_max_cos), (25, 0.15))
    cpu = synthbench.synthbench_preset("cpu")
    self.assertEqual((cpu.d_model, cpu.num_features), (256, 4096))
    for cfg in (paper, cpu):
      levels = synthbench.hierarchy_layout(cfg)
      self.assertEqual([len(children) for children, _ in levels],
                       [cfg.hierarchy_roots * 4, cfg.hierarchy_roots * 16])
      probs = synthbench.firing_probabilities(cfg)
      for children, parents in levels:
        self.assertTrue(np.all(parents < children))  # parents are the more frequent
        sums = np.bincount(parents, weights=probs[children], minlength=len(probs))
        self.assertTrue(np.all(sums[np.unique(parents)] <= probs[np.unique(parents)]))
      every = np.concatenate([np.arange(cfg.hierarchy_roots)]
                             + [children for children, _ in levels])
      self.assertEqual(len(np.unique(every)), cfg.hierarchy_size)

  def test_affine_zipf_keeps_exponent_and_endpoints(self):
    cfg = dataclasses.replace(SMALL, zipf_exponent=0.5)
    probs = synthbench.firing_probabilities(cfg)
    self.assertAlmostEqual(probs[0], cfg.p_max)
    self.assertAlmostEqual(probs[-1], cfg.p_min)
    ranks = np.arange(1, 65)
    # p is affine in r ** -0.5.
    slopes = np.diff(probs) / np.diff(ranks ** -0.5)
    np.testing.assert_allclose(slopes, slopes[0], rtol=1e-9)


class BatchesTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.bench = synthbench.make_synthbench(jax.random.key(0), SMALL)

  def test_deterministic_per_step_and_resumes_bitwise(self):
    data = synthbench.SynthBenchBatches(self.bench, batch_size=8, seed=3)
    straight = [next(data) for _ in range(5)]
    self.assertEqual(straight[0].dtype, np.float32)
    chex.assert_shape(straight, (8, SMALL.d_model))
    self.assertFalse(np.array_equal(straight[0], straight[1]))
    again = synthbench.SynthBenchBatches(self.bench, batch_size=8, seed=3)
    np.testing.assert_array_equal(next(again), straight[0])
    for _ in range(2):
      next(again)
    position = json.loads(json.dumps(again.state()))
    resumed = synthbench.SynthBenchBatches(self.bench, batch_size=8, seed=3)
    resumed.restore(position)
    np.testing.assert_array_equal(next(resumed), straight[3])
    np.testing.assert_array_equal(next(resumed), straight[4])
    other = synthbench.SynthBenchBatches(self.bench, batch_size=8, seed=4)
    self.assertFalse(np.array_equal(next(other), straight[0]))

  def test_processes_split_one_global_batch(self):
    whole = synthbench.SynthBenchBatches(self.bench, batch_size=8, seed=1)
    parts = [synthbench.SynthBenchBatches(self.bench, batch_size=4, seed=1, process_index=p,
                                          process_count=2) for p in range(2)]
    for _ in range(2):
      np.testing.assert_array_equal(np.concatenate([next(p) for p in parts]), next(whole))
    self.assertEqual(parts[1].state(), whole.state())

  def test_held_out_sample_with_codes(self):
    data = synthbench.SynthBenchBatches(self.bench, batch_size=8, seed=3)
    x, codes = data.sample_with_codes(8)
    chex.assert_shape([x, codes], [(8, SMALL.d_model), (8, SMALL.num_features)])
    np.testing.assert_array_equal(data.sample(8), x)
    np.testing.assert_allclose(x, codes @ np.asarray(self.bench.features), atol=1e-4)
    self.assertFalse(np.array_equal(x, next(data)))
    self.assertEqual(data.state()["step"], 1)

  def test_restore_refuses_other_settings(self):
    data = synthbench.SynthBenchBatches(self.bench, batch_size=8, seed=3)
    for bad, message in (({"step": 1, "seed": 4, "global_batch": 8}, "seed"),
                         ({"step": 1, "seed": 3, "global_batch": 16}, "global_batch"),
                         ({"step": -1, "seed": 3, "global_batch": 8}, "step")):
      with self.assertRaisesRegex(ValueError, message):
        data.restore(bad)

  def test_bad_arguments_raise(self):
    with self.assertRaisesRegex(ValueError, "batch_size"):
      synthbench.SynthBenchBatches(self.bench, batch_size=0)
    with self.assertRaisesRegex(ValueError, "process_index"):
      synthbench.SynthBenchBatches(self.bench, batch_size=2, process_index=2, process_count=2)


class StoreTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.bench = synthbench.make_synthbench(jax.random.key(0), SMALL)

  def test_store_holds_the_stream_and_resumes_to_the_same_bytes(self):
    with tempfile.TemporaryDirectory() as tmp:
      whole = synthbench.write_synthbench_store(f"{tmp}/whole", self.bench, 100, seed=2,
                                                chunk_rows=32)
      stream = synthbench.SynthBenchBatches(self.bench, 32, seed=2)
      expected = np.concatenate([next(stream) for _ in range(4)])[:100]
      self.assertEqual(whole.count, 100)
      np.testing.assert_array_equal(whole.read(0, 100), expected)
      # Written in two sittings: 64 rows (two whole chunks), then extended to 100.
      part = synthbench.write_synthbench_store(f"{tmp}/part", self.bench, 64, seed=2,
                                               chunk_rows=32)
      self.assertEqual(part.count, 64)
      resumed = synthbench.write_synthbench_store(f"{tmp}/part", self.bench, 100, seed=2,
                                                  chunk_rows=32)
      np.testing.assert_array_equal(resumed.read(0, 100), expected)
      self.assertEqual(resumed.stats.norm_mean, whole.stats.norm_mean)
      self.assertEqual(resumed.manifest["model"], "synthbench")

  def test_refuses_other_settings_and_bad_sizes(self):
    with tempfile.TemporaryDirectory() as tmp:
      synthbench.write_synthbench_store(f"{tmp}/s", self.bench, 32, seed=2, chunk_rows=32)
      with self.assertRaisesRegex(ValueError, "use another path"):
        synthbench.write_synthbench_store(f"{tmp}/s", self.bench, 64, seed=3, chunk_rows=32)
      with self.assertRaisesRegex(ValueError, "num_tokens"):
        synthbench.write_synthbench_store(f"{tmp}/t", self.bench, 0)


class ConfigErrorTest(parameterized.TestCase):

  @parameterized.parameters(
      ({"d_model": 0}, "d_model"),
      ({"num_features": 1}, "num_features"),
      ({"target_mean_max_cos": 1.5}, "target_mean_max_cos"),
      ({"max_cos_steps": -1}, "max_cos_steps"),
      ({"p_min": 0.5}, "p_min"),
      ({"p_max": 1.0}, "p_max"),
      ({"zipf_exponent": 0.0}, "zipf_exponent"),
      ({"hierarchy_branching": 0}, "hierarchy_branching"),
      ({"hierarchy_roots": 8}, "hierarchy needs"),
      ({"correlation_rank": -1}, "correlation_rank"),
      ({"correlation_share": 1.0}, "correlation_share"),
      ({"magnitude_min": 6.0}, "magnitude_min"),
      ({"magnitude_jitter": 1.0}, "magnitude_jitter"),
      ({"noise_std": -0.1}, "noise_std"),
  )
  def test_bad_config_raises(self, change, message):
    with self.assertRaisesRegex(ValueError, message):
      dataclasses.replace(SMALL, **change)

  def test_hierarchy_that_does_not_fit_the_curve_raises(self):
    # With p_min close to p_max no feature is a quarter as frequent as a root.
    cfg = dataclasses.replace(SMALL, p_min=0.3, hierarchy_roots=1, hierarchy_branching=4)
    with self.assertRaisesRegex(ValueError, "does not fit.*hierarchy_roots"):
      synthbench.make_synthbench(jax.random.key(0), cfg)

  def test_other_bad_arguments_raise(self):
    with self.assertRaisesRegex(ValueError, "name must be one of"):
      synthbench.synthbench_preset("gpu")
    bench = synthbench.make_synthbench(jax.random.key(0), SMALL)
    with self.assertRaisesRegex(ValueError, "top"):
      synthbench.true_l0(bench, top=0)
    with self.assertRaisesRegex(ValueError, "vectors"):
      synthbench.mean_max_cosine(np.ones((1, 3)))


if __name__ == "__main__":
  absltest.main()

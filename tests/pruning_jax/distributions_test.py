"""Tests for per-layer sparsity allocation (pruning_jax.distributions)."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from pruning_jax import distributions
from pruning_jax import masks as masks_lib

# Hand-made ERK case. raw = sum(shape) / prod(shape): (10, 10) -> 0.2, (10, 40) -> 0.125,
# (2, 3) -> 5/6; sizes 100, 400, 6. At sparsity 0.5 the kept budget is 253:
#   pass 1: eps = 253 / (20 + 50 + 5) = 3.373..., and 5/6 * eps = 2.81 > 1 -> (2, 3) dense;
#   pass 2: eps = (253 - 6) / (20 + 50) = 247 / 70, densities 0.2 * 247/70 = 247/350 and
#           0.125 * 247/70 = 247/560, so sparsities 103/350 and 313/560 (and 0).
_SHAPES = [(10, 10), (10, 40), (2, 3)]
_ERK_HALF = [103 / 350, 313 / 560, 0.0]


def _masks(shapes=_SHAPES):
  return {f"l{i}": {"kernel": jnp.ones(s, bool), "bias": None} for i, s in enumerate(shapes)}


def _params(shapes=_SHAPES, seed=0):
  rng = np.random.default_rng(seed)
  return {f"l{i}": {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32),
                    "bias": jnp.zeros(s[-1])} for i, s in enumerate(shapes)}


class UniformTest(chex.TestCase):

  def test_values_and_containers(self):
    self.assertEqual(distributions.uniform(_SHAPES, 0.3), [0.3, 0.3, 0.3])
    self.assertEqual(distributions.uniform(_masks(), 0.3),
                     {"l0/kernel": 0.3, "l1/kernel": 0.3, "l2/kernel": 0.3})
    self.assertEqual(distributions.uniform({"conv": (3, 3, 2, 4)}, 0.0), {"conv": 0.0})


class ErkTest(chex.TestCase):

  def test_golden(self):
    np.testing.assert_allclose(distributions.erk(_SHAPES, 0.5), _ERK_HALF, rtol=1e-12)
    by_path = distributions.erk(_masks(), 0.5)
    self.assertEqual(list(by_path), ["l0/kernel", "l1/kernel", "l2/kernel"])
    np.testing.assert_allclose(list(by_path.values()), _ERK_HALF, rtol=1e-12)

  def test_golden_remove_counts(self):
    counts = distributions.layer_remove_counts(_masks(), distributions.erk(_masks(), 0.5))
    # 103/350 * 100 = 29.43 -> 29; 313/560 * 400 = 223.57 -> 224; total 253 = half of 506.
    self.assertEqual(counts, {"l0/kernel": 29, "l1/kernel": 224, "l2/kernel": 0})

  @parameterized.parameters(0.1, 0.5, 0.8, 0.95, 0.99)
  def test_total_matches_target_within_one_per_layer(self, sparsity):
    shapes = [(3, 3, 3, 16), (3, 3, 16, 32), (3, 3, 32, 32), (32, 10), (10, 10, 2)]
    targets = distributions.erk(shapes, sparsity)
    sizes = [math.prod(s) for s in shapes]
    kept = sum(n - math.floor(t * n + 0.5) for t, n in zip(targets, sizes))
    self.assertLessEqual(abs(kept - (1 - sparsity) * sum(sizes)), len(shapes))
    self.assertTrue(all(0.0 <= t < 1.0 for t in targets))
    # Denser where sum(shape) / prod(shape) is larger (fewer parameters per fan).
    dense_order = np.argsort([sum(s) / math.prod(s) for s in shapes])
    self.assertTrue(np.all(np.diff(np.asarray(targets)[dense_order]) <= 1e-12))

  def test_zero_sparsity_and_power_scale(self):
    self.assertEqual(distributions.erk(_SHAPES, 0.0), [0.0, 0.0, 0.0])
    np.testing.assert_allclose(distributions.erk(_SHAPES, 0.4, power_scale=0.0),
                               [0.4, 0.4, 0.4], rtol=1e-12)

  def test_errors(self):
    for bad in (1.0, -0.2):
      with self.assertRaisesRegex(ValueError, f"sparsity must be in \\[0, 1\\), got {bad}"):
        distributions.erk(_SHAPES, bad)
      with self.assertRaisesRegex(ValueError, "sparsity must be in"):
        distributions.uniform(_SHAPES, bad)
    with self.assertRaisesRegex(ValueError, "power_scale must be a finite number >= 0, got -1"):
      distributions.erk(_SHAPES, 0.5, power_scale=-1.0)
    with self.assertRaisesRegex(ValueError, "non-empty prunable leaf"):
      distributions.erk([(3, 0)], 0.5)
    with self.assertRaisesRegex(ValueError, "non-empty prunable leaf"):
      distributions.uniform({"w": None}, 0.5)


class LayerRemoveCountsTest(chex.TestCase):

  def test_accounts_for_already_pruned(self):
    masks = _masks([(2, 5), (4, 4)])
    masks["l0"]["kernel"] = masks["l0"]["kernel"].at[0].set(False)  # 5 of 10 pruned
    # l0 target 0.3 -> 3 pruned wanted, already 5 -> 0; l1 target 0.25 -> 4.
    self.assertEqual(distributions.layer_remove_counts(masks, [0.3, 0.25]),
                     {"l0/kernel": 0, "l1/kernel": 4})
    self.assertEqual(distributions.layer_remove_counts(masks, {"l0/kernel": 0.75,
                                                               "l1/kernel": 0.0}),
                     {"l0/kernel": 3, "l1/kernel": 0})  # 7.5 rounds half up to 8

  def test_errors(self):
    masks = _masks([(2, 5), (4, 4)])
    with self.assertRaisesRegex(ValueError, "prunable paths"):
      distributions.layer_remove_counts(masks, {"l0/kernel": 0.5})
    with self.assertRaisesRegex(ValueError, "one sparsity per prunable leaf \\(2\\), got 1"):
      distributions.layer_remove_counts(masks, [0.5])
    with self.assertRaisesRegex(ValueError, "'l1/kernel' must be in \\[0, 1\\], got 1.5"):
      distributions.layer_remove_counts(masks, [0.5, 1.5])


class PruneToSparsityTest(chex.TestCase):

  @parameterized.parameters("global", "uniform", "erk")
  def test_reaches_target(self, distribution):
    params, masks = _params(), masks_lib.init_masks(_params())
    scores = jax.tree.map(jnp.abs, params)
    new = distributions.prune_to_sparsity(scores, masks, 0.5, distribution)
    self.assertEqual(int(masks_lib.num_remaining(new)), 253)  # exactly half of 506
    per_layer = list(masks_lib.layer_sparsities(new).values())
    if distribution == "uniform":
      self.assertEqual(per_layer, [0.5, 0.5, 0.5])
    if distribution == "erk":
      self.assertEqual(per_layer, [0.29, 0.56, 0.0])  # counts 29, 224, 0 of 100, 400, 6
    # Within each layer the smallest magnitudes go first.
    for p, m in zip([scores[k]["kernel"] for k in sorted(scores)], jax.tree.leaves(new)):
      kept, dropped = np.asarray(p)[np.asarray(m)], np.asarray(p)[~np.asarray(m)]
      if dropped.size and kept.size and distribution != "global":
        self.assertLessEqual(dropped.max(), kept.min())

  def test_bad_distribution(self):
    params = _params()
    with self.assertRaisesRegex(ValueError, "distribution must be one of.*got 'random'"):
      distributions.prune_to_sparsity(params, masks_lib.init_masks(params), 0.5, "random")


if __name__ == "__main__":
  absltest.main()

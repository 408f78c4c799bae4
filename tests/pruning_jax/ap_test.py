"""Tests for Activate-while-Pruning (pruning_jax.ap)."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from pruning_jax import ap
from pruning_jax import masks as masks_lib
from pruning_jax import scoring

_INF = np.inf


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _golden():
  """One prunable 2x3 kernel and a non-prunable bias (binary fractions: exact).

  end   = [[-0.5,  0.25, -0.125], [-0.25, 0.5,   -0.75]]
  start = [[-0.25, 0.25,  0.375], [-0.25, 0.125, -0.5]]
  |end - start| on negative entries: (0,0) 0.25, (0,2) 0.5, (1,0) 0.0,
  (1,2) 0.25; (0,1) is positive with delta 0 and (1,1) positive.
  """
  end = {"fc": {"kernel": _f32([[-0.5, 0.25, -0.125], [-0.25, 0.5, -0.75]]),
                "bias": _f32([-1.0, -2.0, -3.0])}}
  start = {"fc": {"kernel": _f32([[-0.25, 0.25, 0.375],
                                  [-0.25, 0.125, -0.5]]),
                  "bias": _f32([-1.0, -2.0, -3.0])}}
  return end, start, masks_lib.init_masks(end)


def _kernel_mask(rows):
  return {"fc": {"kernel": jnp.array(rows, bool), "bias": None}}


def _count(masks):
  return int(masks_lib.num_remaining(masks))


class APScoresTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_golden_scores(self):
    end, start, masks = _golden()
    scores = self.variant(ap.ap_scores)(end, start, masks)
    # Candidates from _golden's docstring; +inf for positives and the bias.
    chex.assert_trees_all_close(scores, {
        "fc": {"kernel": _f32([[0.25, _INF, 0.5], [0.0, _INF, 0.25]]),
               "bias": _f32([_INF] * 3)}})

  @chex.variants(with_jit=True, without_jit=True)
  def test_pruned_entries_are_not_candidates(self):
    end, start, _ = _golden()
    masks = _kernel_mask([[True, True, True], [False, True, True]])
    scores = self.variant(ap.ap_scores)(end, start, masks)
    self.assertEqual(float(scores["fc"]["kernel"][1, 0]), _INF)
    self.assertEqual(ap.num_ap_candidates(end, masks), 3)


class APPruneTest(parameterized.TestCase):

  @parameterized.parameters(
      # Smallest |delta| first: (1,0) 0.0; then (0,0) and (1,2) tie at 0.25
      # and the lower flat index (0,0) goes first; then (1,2), then (0,2).
      (1, [[True, True, True], [False, True, True]]),
      (2, [[False, True, True], [False, True, True]]),
      (3, [[False, True, True], [False, True, False]]),
      (4, [[False, True, False], [False, True, False]]),
  )
  def test_golden_picks(self, n_remove, expected):
    end, start, masks = _golden()
    new = ap.ap_prune(end, start, masks, n_remove)
    chex.assert_trees_all_equal(new, _kernel_mask(expected))

  def test_ties_across_leaves_go_to_the_earlier_leaf(self):
    end = {"a": {"kernel": _f32([[1.0, -1.0]])}, "b": {"kernel": _f32([[-1.0, 1.0]])}}
    start = jax.tree.map(lambda x: x - 0.5, end)
    new = ap.ap_prune(end, start, masks_lib.init_masks(end), 1)
    np.testing.assert_array_equal(new["a"]["kernel"], [[True, False]])
    np.testing.assert_array_equal(new["b"]["kernel"], [[True, True]])

  def test_previously_pruned_never_repicked(self):
    end, start, _ = _golden()
    masks = _kernel_mask([[True, True, True], [False, True, True]])
    new = ap.ap_prune(end, start, masks, 1)
    # (1,0) (delta 0) is already pruned; next is (0,0).
    chex.assert_trees_all_equal(new, _kernel_mask([[False, True, True], [False, True, True]]))

  def test_shortfall_removes_all_candidates_and_warns(self):
    end, start, masks = _golden()
    with self.assertWarnsRegex(UserWarning, "only 4 .* shortfall 2"):
      new = ap.ap_prune(end, start, masks, 6)
    # Only the two positive entries survive; positives are never picked.
    chex.assert_trees_all_equal(new, _kernel_mask([[False, True, False], [False, True, False]]))

  def test_positive_and_zero_weights_never_picked(self):
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(4, 5))
    kernel[0] = 0.0  # zero is not negative: never a candidate either
    end = {"fc": {"kernel": _f32(kernel)}}
    start = {"fc": {"kernel": end["fc"]["kernel"]}}  # every delta is 0
    masks = masks_lib.init_masks(end)
    n_neg = int(jnp.sum(end["fc"]["kernel"] < 0))
    with self.assertWarns(UserWarning):
      new = ap.ap_prune(end, start, masks, 20)
    np.testing.assert_array_equal(new["fc"]["kernel"], end["fc"]["kernel"] >= 0)
    self.assertEqual(_count(new), 20 - n_neg)

  @parameterized.parameters(-1, 7, 1.0)
  def test_rejects_bad_n_remove(self, n_remove):
    end, start, masks = _golden()
    with self.assertRaisesRegex(ValueError, rf"n_remove.*\[0, 6\].*{n_remove}"):
      ap.ap_prune(end, start, masks, n_remove)


def _random_tree(rng, shapes):
  return {f"l{i}": {"kernel": _f32(rng.normal(size=s)),
                    "bias": _f32(rng.normal(size=s[-1:]))}
          for i, s in enumerate(shapes)}


class PruneCycleTest(parameterized.TestCase):

  @parameterized.parameters(
      (100, 0.2, 0.02, (18, 2)),
      (25, 0.2, 0.02, (4, 1)),  # 0.5 rounds up for AP, total 5
      (10, 0.2, None, (2, 0)),
      (10, 0.2, 0, (2, 0)),
      (12, 0.25, 0.25, (0, 3)),
  )
  def test_cycle_counts_golden(self, n, rate, ap_rate, expected):
    self.assertEqual(ap.cycle_counts(n, rate, ap_rate), expected)

  def test_cycle_counts_sum_to_host_alone(self):
    for n in range(0, 300):
      for rate, ap_rate in ((0.2, 0.02), (0.5, 0.3), (0.1, 0.1)):
        n_host, n_ap = ap.cycle_counts(n, rate, ap_rate)
        self.assertEqual(n_host + n_ap, ap.cycle_counts(n, rate, None)[0])
        self.assertGreaterEqual(n_host, 0)
        self.assertEqual(n_ap, scoring.round_half_up(ap_rate * n))

  def test_composition_of_host_then_ap(self):
    rng = np.random.default_rng(1)
    shapes = [(5, 6), (6, 4), (4, 5)]  # 74 prunable weights
    end, start = _random_tree(rng, shapes), _random_tree(rng, shapes)
    masks = masks_lib.init_masks(end)
    new, info = ap.prune_cycle("magnitude", end, start, masks)
    # round(0.2 * 74) = 15 in total, round(0.02 * 74) = 1 by AP.
    self.assertEqual(info, ap.CycleInfo(74, 14, 1, 0))
    expected = ap.ap_prune(end, start, scoring.host_prune("magnitude", end, masks, 14), 1)
    chex.assert_trees_all_equal(new, expected)
    host_alone, info_alone = ap.prune_cycle("magnitude", end, start, masks, ap_rate=None)
    self.assertEqual(info_alone, ap.CycleInfo(74, 15, 0, 0))
    self.assertEqual(_count(new), _count(host_alone))
    chex.assert_trees_all_equal(host_alone, scoring.host_prune("magnitude", end, masks, 15))

  def test_sparsity_after_cycles_follows_geometric_rule(self):
    rng = np.random.default_rng(2)
    shapes = [(10, 10), (10, 15)]  # 250 prunable weights
    start = _random_tree(rng, shapes)
    masks = masks_lib.init_masks(start)
    remaining = []
    for cycle in range(1, 6):
      end = _random_tree(rng, shapes)
      masks, info = ap.prune_cycle("magnitude", end, start, masks)
      self.assertEqual(info.host_removed + info.ap_removed,
                       scoring.round_half_up(0.2 * info.n_remaining_before))
      remaining.append(_count(masks))
      self.assertLessEqual(abs(float(masks_lib.sparsity(masks)) - (1 - 0.8**cycle)), 2.5 / 250)
      start = end
    # 250 -> 200 -> 160 -> 128 -> 102 (25.6 rounds to 26) -> 82 (20.4 -> 20).
    self.assertEqual(remaining, [200, 160, 128, 102, 82])

  def test_host_fills_ap_shortfall(self):
    rng = np.random.default_rng(3)
    end = {"fc": {"kernel": _f32(np.abs(rng.normal(size=(10, 10))) + 0.1)}}
    masks = masks_lib.init_masks(end)
    new, info = ap.prune_cycle("magnitude", end, end, masks, rate=0.2, ap_rate=0.05)
    self.assertEqual(info, ap.CycleInfo(100, 20, 0, 5))
    chex.assert_trees_all_equal(new, scoring.host_prune("magnitude", end, masks, 20))

  def test_host_kwargs_reach_the_host(self):
    rng = np.random.default_rng(4)
    shapes = [(5, 6), (6, 4)]
    end, start = _random_tree(rng, shapes), _random_tree(rng, shapes)
    masks = masks_lib.init_masks(end)
    key = jax.random.key(7)
    new, info = ap.prune_cycle("random", end, start, masks, key=key)
    self.assertEqual(info.host_removed + info.ap_removed, 11)  # 0.2 * 54
    expected = ap.ap_prune(end, start, scoring.host_prune("random", end, masks, 10, key=key), 1)
    chex.assert_trees_all_equal(new, expected)

  @parameterized.named_parameters(
      ("rate_zero", dict(rate=0.0), "rate must be in"),
      ("rate_one", dict(rate=1.0), "rate must be in"),
      ("rate_negative", dict(rate=-0.2), "rate must be in"),
      ("rate_string", dict(rate="0.2"), "rate must be in.*'0.2'"),
      ("ap_rate_one", dict(ap_rate=1.0), "ap_rate must be"),
      ("ap_rate_negative", dict(ap_rate=-0.01), "ap_rate must be"),
      ("q_above_p", dict(rate=0.1, ap_rate=0.2), "ap_rate=0.2 > rate=0.1"),
      ("unknown_method", dict(method="obd"), "method"),
  )
  def test_rejects_bad_arguments(self, override, pattern):
    end, start, masks = _golden()
    kwargs = dict(method="magnitude", params_end=end, params_start=start, masks=masks)
    kwargs.update(override)
    with self.assertRaisesRegex(ValueError, pattern):
      ap.prune_cycle(**kwargs)



def _two_layer():
  """Two prunable kernels; "b" is the only leaf in the ReLU-input scope below."""
  end = {"a": {"kernel": _f32([[-0.5, 0.25], [-0.125, 0.75]])},
         "b": {"kernel": _f32([[-0.25, -1.0], [0.5, -0.0625]])}}
  start = {"a": {"kernel": _f32([[-0.5, 0.25], [0.0, 0.75]])},
           "b": {"kernel": _f32([[0.0, -1.5], [0.5, -0.0625]])}}
  return end, start, masks_lib.init_masks(end)


class APControlsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_most_negative_scores_rank_candidates_by_value(self):
    end, start, masks = _golden()
    scores = self.variant(ap.most_negative_scores)(end, start, masks)
    chex.assert_trees_all_close(scores, {
        "fc": {"kernel": _f32([[-0.5, _INF, -0.125], [-0.25, _INF, -0.75]]),
               "bias": _f32([_INF] * 3)}})

  def test_most_negative_removes_the_most_negative_survivors(self):
    end, start, masks = _golden()
    new = ap.ap_prune(end, start, masks, 2, selection="most_negative")
    self.assertEqual(_count(new), 4)
    # -0.75 at (1,2) and -0.5 at (0,0); AP itself would take (1,0) and (0,0).
    np.testing.assert_array_equal(new["fc"]["kernel"],
                                  [[False, True, True], [True, True, False]])

  def test_random_removes_survivors_of_any_sign_and_follows_the_key(self):
    end, start, masks = _golden()
    picks = set()
    for seed in range(12):
      new = ap.ap_prune(end, start, masks, 1, selection="random", key=jax.random.key(seed))
      self.assertEqual(_count(new), 5)
      picks.add(int(np.flatnonzero(~np.asarray(new["fc"]["kernel"]).ravel())[0]))
      again = ap.ap_prune(end, start, masks, 1, selection="random", key=jax.random.key(seed))
      np.testing.assert_array_equal(new["fc"]["kernel"], again["fc"]["kernel"])
    # Positive weights (flat 1 and 4) are eligible too, unlike AP's candidates.
    self.assertTrue(picks & {1, 4}, picks)
    self.assertGreater(len(picks), 2)

  def test_random_never_removes_pruned_weights(self):
    end, start, _ = _golden()
    masks = _kernel_mask([[True, False, False], [False, False, True]])
    new = ap.ap_prune(end, start, masks, 2, selection="random", key=jax.random.key(3))
    self.assertEqual(_count(new), 0)

  def test_random_without_key_is_refused(self):
    end, start, masks = _golden()
    with self.assertRaisesRegex(ValueError, "ap_key"):
      ap.prune_cycle("magnitude", end, start, masks, rate=0.5, ap_rate=0.2,
                     ap_selection="random")

  def test_unknown_selection_is_refused(self):
    end, start, masks = _golden()
    with self.assertRaisesRegex(ValueError, "ap_selection must be one of"):
      ap.prune_cycle("magnitude", end, start, masks, ap_selection="largest")

  def test_scope_restricts_ap_to_the_chosen_leaves(self):
    end, start, masks = _two_layer()
    scope = lambda path: path.startswith("b/")
    new = ap.ap_prune(end, start, masks, 2, scope=scope)
    self.assertEqual(_count(new), 6)
    # Unscoped, AP would take a[0,0] (delta 0) first; scoped, b's two least moved
    # negatives: b[1,1] (delta 0) and b[0,0] (delta 0.25).
    np.testing.assert_array_equal(new["a"]["kernel"], np.ones((2, 2), bool))
    np.testing.assert_array_equal(new["b"]["kernel"], [[False, True], [True, False]])

  def test_scope_shortfall_goes_to_the_host(self):
    end, start, masks = _two_layer()
    # Three negative survivors in b; AP's share of 4 finds only those three.
    new, info = ap.prune_cycle("magnitude", end, start, masks, rate=0.5, ap_rate=0.5,
                               ap_scope=lambda path: path.startswith("b/"))
    self.assertEqual((info.ap_removed, info.ap_shortfall, info.host_removed), (3, 1, 1))
    self.assertEqual(_count(new), 4)

  def test_q_zero_is_the_host_alone(self):
    end, start, masks = _two_layer()
    for selection, key in (("least_moved", None), ("random", jax.random.key(0))):
      new, info = ap.prune_cycle("magnitude", end, start, masks, rate=0.5, ap_rate=0.0,
                                 ap_selection=selection, ap_key=key)
      host = scoring.host_prune("magnitude", end, masks, 4)
      chex.assert_trees_all_equal(new, host)
      self.assertEqual(info.ap_removed, 0)


if __name__ == "__main__":
  absltest.main()

"""Tests for the IMP cycle logic (pruning_jax.imp)."""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from pruning_jax import ap
from pruning_jax import imp
from pruning_jax import masks as masks_lib

_SHAPES = ((4, 5), (5, 3))  # 35 prunable weights


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {f"l{i}": {"kernel": _f32(rng.normal(size=s)),
                    "bias": _f32(rng.normal(size=s[-1:]))}
          for i, s in enumerate(_SHAPES)}


@jax.jit
def _init_params_fn(key):
  # One draw sliced into leaves keeps the compiled program small.
  flat = iter(jnp.split(jax.random.normal(key, (43,)), [20, 25, 40]))
  return {f"l{i}": {"kernel": next(flat).reshape(s), "bias": next(flat)}
          for i, s in enumerate(_SHAPES)}


def _train_fn(calls):
  """Deterministic stand-in for training; records the params it starts from.

  Cycle c adds the fixed update _tree(100 + c) (pruned weights stay zero) and
  reports the halfway point as the weights at the rewind step.
  """
  def train(params, masks, cycle):
    calls.append(params)
    update = _tree(100 + cycle)
    end = masks_lib.apply_masks(jax.tree.map(jnp.add, params, update), masks)
    half = jax.tree.map(lambda p, u: p + 0.5 * u, params, update)
    return end, half

  return train


def _masked_zeros_hold(params, masks):
  leaves = jax.tree.leaves(jax.tree.map(
      lambda m, p: None if m is None else bool(np.all(np.asarray(p)[~np.asarray(m)] == 0)),
      masks, params, is_leaf=lambda x: x is None))
  return all(leaves)


class IMPConfigTest(parameterized.TestCase):

  def test_defaults_follow_the_reference_code(self):
    config = imp.IMPConfig()
    self.assertEqual((config.rate, config.ap_rate, config.rewind_step), (0.2, 0.02, 0))

  def test_frozen(self):
    with self.assertRaises(dataclasses.FrozenInstanceError):
      imp.IMPConfig().rate = 0.5

  def test_expected_sparsity(self):
    # 1 - 0.8^3 = 1 - 0.512.
    self.assertAlmostEqual(imp.IMPConfig(cycles=3).expected_sparsity(3), 0.488)
    self.assertEqual(imp.IMPConfig().expected_sparsity(0), 0.0)

  @parameterized.named_parameters(
      ("rate_zero", dict(rate=0.0), "rate must be in"),
      ("rate_one", dict(rate=1.0), "rate must be in"),
      ("q_above_p", dict(rate=0.1, ap_rate=0.2), "ap_rate=0.2 > rate=0.1"),
      ("ap_rate_one", dict(ap_rate=1.5), "ap_rate must be"),
      ("cycles_zero", dict(cycles=0), "cycles.*>= 1.*0"),
      ("cycles_float", dict(cycles=2.0), "cycles.*2.0"),
      ("rewind_negative", dict(rewind_step=-1), "rewind_step.*>= 0.*-1"),
  )
  def test_rejects_bad_values(self, kwargs, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      imp.IMPConfig(**kwargs)


class RewindReinitTest(chex.TestCase):

  def _masks(self):
    masks = masks_lib.init_masks(_tree(0))
    return masks_lib.prune_lowest(jax.tree.map(jnp.abs, _tree(5)), masks, 12)

  def test_rewind_restores_survivors_and_non_prunable(self):
    masks = self._masks()
    trained, initial = _tree(1), _tree(2)
    out = imp.rewind(trained, initial, masks)
    chex.assert_trees_all_equal(out, masks_lib.apply_masks(initial, masks))
    for name in ("l0", "l1"):
      chex.assert_trees_all_equal(out[name]["bias"], initial[name]["bias"])
      kernel = out[name]["kernel"]
      np.testing.assert_array_equal(
          kernel, np.where(masks[name]["kernel"], initial[name]["kernel"], 0))
    self.assertTrue(_masked_zeros_hold(out, masks))
    self.assertEqual(int(masks_lib.num_remaining(masks)), 23)

  def test_rewind_works_on_nnx_state(self):
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    initial = jax.tree.map(lambda x: x + 1.0, params)
    masks = masks_lib.init_masks(params)
    masks = masks_lib.prune_lowest(jax.tree.map(jnp.abs, params), masks, 2)
    out = imp.rewind(params, initial, masks)
    kernel_mask = masks["kernel"].get_value()
    np.testing.assert_array_equal(
        out["kernel"].get_value(),
        np.where(kernel_mask, initial["kernel"].get_value(), 0))
    np.testing.assert_array_equal(out["bias"].get_value(), initial["bias"].get_value())

  def test_rewind_rejects_mismatches(self):
    masks = self._masks()
    with self.assertRaisesRegex(ValueError, "rewind_params.*structure"):
      imp.rewind(_tree(1), {"l0": _tree(2)["l0"]}, masks)
    bad = _tree(2)
    bad["l1"]["bias"] = jnp.zeros((4,))
    with self.assertRaisesRegex(ValueError, r"rewind_params.*\(4,\).*\(3,\)"):
      imp.rewind(_tree(1), bad, masks)

  def test_reinit_keeps_masks_and_zeros(self):
    masks = self._masks()
    out = imp.reinit(jax.random.key(0), _init_params_fn, masks)
    chex.assert_trees_all_equal(
        out, masks_lib.apply_masks(_init_params_fn(jax.random.key(0)), masks))
    self.assertTrue(_masked_zeros_hold(out, masks))
    other = imp.reinit(jax.random.key(1), _init_params_fn, masks)
    self.assertFalse(np.array_equal(out["l0"]["bias"], other["l0"]["bias"]))

  def test_reinit_rejects_mismatched_init(self):
    masks = self._masks()
    wrong = lambda key: {"l0": _init_params_fn(key)["l0"]}
    with self.assertRaisesRegex(ValueError, "init_params_fn"):
      imp.reinit(jax.random.key(0), wrong, masks)


class RunIMPTest(parameterized.TestCase):

  def test_matches_manual_cycles(self):
    init = _tree(0)
    masks = masks_lib.init_masks(init)
    calls = []
    config = imp.IMPConfig(cycles=3)
    result = imp.run_imp(config, _train_fn(calls), init, masks)
    # Manual replay: train, prune_cycle against the start weights, rewind.
    params, m, history = masks_lib.apply_masks(init, masks), masks, []
    for cycle in range(3):
      end, _ = _train_fn([])(params, m, cycle)
      m, info = ap.prune_cycle("magnitude", end, params, m)
      history.append(info)
      params = masks_lib.apply_masks(init, m)
    chex.assert_trees_all_equal(result.masks, m)
    chex.assert_trees_all_equal(result.params, params)
    self.assertEqual(result.history, tuple(history))
    # 35 -> 28 -> 22 (5.6 rounds to 6) -> 18 (4.4 rounds to 4).
    self.assertEqual([h.n_remaining_before for h in result.history], [35, 28, 22])
    self.assertEqual(int(masks_lib.num_remaining(result.masks)), 18)
    self.assertLen(calls, 3)
    chex.assert_trees_all_equal(calls[0], init)
    for started in calls[1:]:
      chex.assert_trees_all_equal(started["l0"]["bias"], init["l0"]["bias"])

  def test_rewind_step_uses_first_cycle_snapshot(self):
    init = _tree(0)
    masks = masks_lib.init_masks(init)
    calls = []
    result = imp.run_imp(imp.IMPConfig(cycles=2, rewind_step=5), _train_fn(calls), init, masks)
    snapshot = _train_fn([])(init, masks, 0)[1]
    chex.assert_trees_all_equal(result.rewind_params, snapshot)
    chex.assert_trees_all_equal(result.params, masks_lib.apply_masks(snapshot, result.masks))
    # Cycle 1 starts from the snapshot under the cycle-0 masks.
    chex.assert_trees_all_equal(calls[1]["l1"]["bias"], snapshot["l1"]["bias"])

  def test_reinit_control(self):
    init = _tree(0)
    masks = masks_lib.init_masks(init)
    key = jax.random.key(3)
    result = imp.run_imp(imp.IMPConfig(cycles=2, ap_rate=None),
                         _train_fn([]), init, masks, reinit_key=key,
                         init_params_fn=_init_params_fn)
    expected = imp.reinit(jax.random.fold_in(key, 1), _init_params_fn, result.masks)
    chex.assert_trees_all_equal(result.params, expected)
    self.assertEqual([h.ap_removed for h in result.history], [0, 0])

  def test_random_host_draws_fresh_scores_each_cycle(self):
    init = _tree(0)
    masks = masks_lib.init_masks(init)
    key = jax.random.key(9)
    result = imp.run_imp(imp.IMPConfig(cycles=2, ap_rate=None),
                         _train_fn([]), init, masks, method="random", key=key)
    first, _ = ap.prune_cycle("random", init, init, masks, ap_rate=None,
                              key=jax.random.fold_in(key, 0))
    second, _ = ap.prune_cycle("random", init, init, first, ap_rate=None,
                               key=jax.random.fold_in(key, 1))
    chex.assert_trees_all_equal(result.masks, second)

  @parameterized.named_parameters(
      ("not_a_config", dict(config=(0.2, 0.02, 2, 0)), "IMPConfig"),
      ("reinit_key_alone", dict(reinit_key=jax.random.key(0)),
       "reinit_key and init_params_fn"),
      ("init_fn_alone", dict(init_params_fn=_init_params_fn),
       "reinit_key and init_params_fn"),
  )
  def test_rejects_bad_arguments(self, override, pattern):
    init = _tree(0)
    kwargs = dict(config=imp.IMPConfig(cycles=1), train_fn=_train_fn([]),
                  init_params=init, masks=masks_lib.init_masks(init))
    kwargs.update(override)
    with self.assertRaisesRegex(ValueError, pattern):
      imp.run_imp(**kwargs)


if __name__ == "__main__":
  absltest.main()

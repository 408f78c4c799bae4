"""Tests for sparsity schedules (pruning_jax.schedules)."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from pruning_jax import schedules


class ImpTest(chex.TestCase):

  def test_golden(self):
    # 1 - 0.8^c: 0.2, 0.36, 0.488, 0.5904.
    for cycle, expected in enumerate([0.0, 0.2, 0.36, 0.488, 0.5904]):
      self.assertAlmostEqual(schedules.imp_sparsity(cycle), expected, places=12)
    self.assertAlmostEqual(schedules.imp_sparsity(2, rate=0.5), 0.75, places=12)

  @chex.variants(with_jit=True, without_jit=True)
  def test_array_cycle(self):
    fn = self.variant(lambda c: schedules.imp_sparsity(c, 0.2))
    chex.assert_trees_all_close(fn(jnp.arange(4)), jnp.asarray([0.0, 0.2, 0.36, 0.488]),
                                rtol=1e-6)

  def test_cycles_to_reach(self):
    # 1 - 0.8^2 = 0.36 reaches 0.36; 0.8^10 = 0.107 and 0.8^11 = 0.086, so 0.9 needs 11.
    self.assertEqual(schedules.cycles_to_reach(0.0), 0)
    self.assertEqual(schedules.cycles_to_reach(0.36), 2)
    self.assertEqual(schedules.cycles_to_reach(0.361), 3)
    self.assertEqual(schedules.cycles_to_reach(0.488), 3)  # 1 - 0.8^3 is 0.48799999...
    self.assertEqual(schedules.cycles_to_reach(0.9), 11)
    self.assertEqual(schedules.cycles_to_reach(0.75, rate=0.5), 2)

  def test_errors(self):
    for bad in (0.0, 1.0, -0.1):
      with self.assertRaisesRegex(ValueError, f"rate must be in \\(0, 1\\), got {bad}"):
        schedules.imp_sparsity(1, rate=bad)
      with self.assertRaisesRegex(ValueError, "rate must be in \\(0, 1\\)"):
        schedules.cycles_to_reach(0.5, rate=bad)
    for bad in (-1, 1.5):
      with self.assertRaisesRegex(ValueError, "cycle must be"):
        schedules.imp_sparsity(bad)
    with self.assertRaisesRegex(ValueError, "cycle must be >= 0, got -2"):
      schedules.imp_sparsity(jnp.int32(-2))
    for bad in (1.0, -0.5):
      with self.assertRaisesRegex(ValueError, f"target must be in \\[0, 1\\), got {bad}"):
        schedules.cycles_to_reach(bad)


_SCHEDULE = dict(initial_sparsity=0.0, final_sparsity=0.8, begin_step=10, end_step=50,
                 frequency=10)


class ZhuGuptaTest(chex.TestCase):

  def test_golden(self):
    # s_t = 0.8 - 0.8 (1 - (t - 10) / 40)^3, held between updates at 10, 20, 30, 40, 50:
    # t=20: 0.8 - 0.8 * 0.75^3 = 0.4625; t=30: 0.8 - 0.8 * 0.125 = 0.7; t=40: 0.7875.
    steps = [0, 9, 10, 19, 20, 29, 30, 45, 49, 50, 51, 1000]
    expected = [0.0, 0.0, 0.0, 0.0, 0.4625, 0.4625, 0.7, 0.7875, 0.7875, 0.8, 0.8, 0.8]
    got = [float(schedules.zhu_gupta(t, **_SCHEDULE)) for t in steps]
    np.testing.assert_allclose(got, expected, rtol=1e-6)

  def test_nonzero_initial_and_unaligned_end(self):
    # Span 25 with frequency 10: updates at 5, 15, 25 and at the end step 30.
    kwargs = dict(initial_sparsity=0.2, final_sparsity=0.6, begin_step=5, end_step=30,
                  frequency=10)
    got = [float(schedules.zhu_gupta(t, **kwargs)) for t in (0, 14, 15, 29, 30)]
    # t=15: 0.6 - 0.4 * 0.6^3 = 0.5136; t=25: 0.6 - 0.4 * 0.2^3 = 0.5968; t=30: 0.6.
    np.testing.assert_allclose(got, [0.2, 0.2, 0.5136, 0.5968, 0.6], rtol=1e-6)
    updates = [t for t in range(40) if bool(schedules.is_update_step(t, 5, 30, 10))]
    self.assertEqual(updates, [5, 15, 25, 30])

  def test_traced_step_does_not_recompile(self):
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def schedule(step):
      return (schedules.zhu_gupta(step, **_SCHEDULE),
              schedules.is_update_step(step, 10, 50, 10))

    values = [schedule(jnp.int32(t)) for t in range(0, 60, 5)]
    self.assertEqual([bool(u) for _, u in values],
                     [False, False, True, False, True, False, True, False, True, False, True,
                      False])
    sparsities = np.asarray([float(s) for s, _ in values])
    self.assertTrue(np.all(np.diff(sparsities) >= 0.0))
    self.assertAlmostEqual(sparsities[-1], 0.8, places=6)

  @parameterized.parameters(
      (dict(initial_sparsity=1.0), "initial_sparsity must be in \\[0, 1\\), got 1.0"),
      (dict(final_sparsity=-0.1), "final_sparsity must be in \\[0, 1\\), got -0.1"),
      (dict(initial_sparsity=0.9), "initial_sparsity \\(0.9\\) must not exceed"),
      (dict(end_step=10), "end_step must be > begin_step \\(10\\), got 10"),
      (dict(begin_step=-1), "begin_step must be an int >= 0, got -1"),
      (dict(frequency=0), "frequency must be an int >= 1, got 0"),
      (dict(frequency=2.5), "frequency must be an int >= 1, got 2.5"),
  )
  def test_errors(self, override, message):
    with self.assertRaisesRegex(ValueError, message):
      schedules.zhu_gupta(0, **{**_SCHEDULE, **override})

  def test_update_step_errors(self):
    with self.assertRaisesRegex(ValueError, "end_step must be > begin_step \\(5\\), got 3"):
      schedules.is_update_step(0, 5, 3, 1)


class PerCycleRemoveCountsTest(chex.TestCase):

  def test_golden_imp(self):
    # 100 weights at rate 0.2: pruned totals 20, 36, 48.8 -> 49, 59.04 -> 59, 67.232 -> 67.
    targets = [schedules.imp_sparsity(c) for c in range(1, 6)]
    self.assertEqual(schedules.per_cycle_remove_counts(100, targets), [20, 16, 13, 10, 8])

  def test_no_drift(self):
    targets = [schedules.imp_sparsity(c, 0.15) for c in range(1, 30)]
    counts = schedules.per_cycle_remove_counts(12345, targets)
    self.assertEqual(sum(counts), round(targets[-1] * 12345))
    self.assertTrue(all(c >= 0 for c in counts))

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "non-decreasing"):
      schedules.per_cycle_remove_counts(10, [0.5, 0.4])
    with self.assertRaisesRegex(ValueError, "sparsities\\[1\\] must be in \\[0, 1\\), got 1.0"):
      schedules.per_cycle_remove_counts(10, [0.5, 1.0])
    with self.assertRaisesRegex(ValueError, "num_prunable must be an int >= 1, got 0"):
      schedules.per_cycle_remove_counts(0, [0.5])


if __name__ == "__main__":
  absltest.main()

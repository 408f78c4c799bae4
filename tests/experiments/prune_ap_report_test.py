"""Tests of the shared interval (experiments.reporting) and the AP report's verdicts."""

import math

from absl.testing import absltest
import numpy as np
from scipy import stats

from experiments import prune_ap_report as report
from experiments import reporting as exp_stats


def _row(arm, seed, cycle, acc, dnr, sparsity=None):
  return {"model": "m", "dataset": "d", "method": "magnitude", "arm": arm, "seed": seed,
          "cycle": cycle, "sparsity": 1 - 0.8 ** cycle if sparsity is None else sparsity,
          "test_accuracy": acc, "dnr": dnr, "dnr_static": 0.0,
          "layer_dnr": {"fc1.relu": dnr, "fc2.relu": dnr}}


class ConfidenceIntervalTest(absltest.TestCase):

  def test_golden_three_values(self):
    # Mean 2, sample std 1; t(0.975, 2) = 4.302653 (scipy.stats.t.ppf), so the half
    # width is 4.302653 / sqrt(3) = 2.484138.
    mean, low, high, n = exp_stats.confidence_interval([1.0, 2.0, 3.0])
    self.assertEqual((mean, n), (2.0, 3))
    self.assertAlmostEqual(high - mean, 2.484138, places=5)
    self.assertAlmostEqual(mean - low, 2.484138, places=5)

  def test_matches_scipy_interval(self):
    x = np.random.default_rng(0).normal(size=7)
    _, low, high, _ = exp_stats.confidence_interval(x)
    ref = stats.t.interval(0.95, 6, loc=x.mean(), scale=stats.sem(x))
    np.testing.assert_allclose([low, high], ref, rtol=1e-12)

  def test_one_value_has_no_interval(self):
    mean, low, high, n = exp_stats.confidence_interval([0.5])
    self.assertEqual((mean, n), (0.5, 1))
    self.assertTrue(math.isnan(low) and math.isnan(high))


class VerdictTest(absltest.TestCase):

  def _rows(self, ap_gain):
    rows = []
    for seed, noise in enumerate((0.0, 0.004, -0.003)):
      for cycle in range(3):
        host_acc, host_dnr = 0.9 - 0.01 * cycle + noise, 0.6 - 0.1 * cycle + noise
        rows.append(_row("host", seed, cycle, host_acc, host_dnr))
        gain = ap_gain + noise / 4 if cycle else 0.0
        rows.append(_row("ap", seed, cycle, host_acc + gain, host_dnr - gain))
    return rows

  def test_pairing_removes_the_seed_spread(self):
    rows = self._rows(0.02)
    by_arm = report.groups(rows)[("m", "d", "magnitude")]
    diffs = report.paired(by_arm, "ap", 2, "test_accuracy")
    np.testing.assert_allclose(diffs, [0.02, 0.021, 0.01925])

  def test_clear_gain_holds_and_dnr_fall_holds(self):
    found = {v["claim"]: v["verdict"] for v in report.verdicts(self._rows(0.02))}
    self.assertEqual(found["DNR falls as sparsity rises (host, last cycle − dense)"], "holds")
    self.assertEqual(found["ap raises accuracy (at 36.0 % sparsity)"], "holds")
    self.assertEqual(found["ap lowers DNR (averaged over pruned cycles)"], "holds")

  def test_a_loss_is_reported_as_the_opposite(self):
    found = {v["claim"]: v["verdict"] for v in report.verdicts(self._rows(-0.02))}
    self.assertEqual(found["ap raises accuracy (at 36.0 % sparsity)"], "opposite holds")

  def test_no_effect_is_not_shown(self):
    rows = self._rows(0.0)
    for r in rows:
      if r["arm"] == "ap" and r["cycle"]:
        r["test_accuracy"] += {0: 0.01, 1: -0.01, 2: 0.001}[r["seed"]]
    found = {v["claim"]: v["verdict"] for v in report.verdicts(rows)}
    self.assertEqual(found["ap raises accuracy (at 36.0 % sparsity)"],
                     "not shown (CI spans 0)")

  def test_markdown_names_every_arm_and_the_command(self):
    results = {"preset": "x", "command": "python -m experiments.prune_ap --preset x",
               "wall_seconds": 1.0, "synthetic": False, "runs": self._rows(0.01),
               "machine": {"platform": "p", "cpu_count": 2, "jax": "0"}}
    text = report.markdown(results)
    self.assertIn("`python -m experiments.prune_ap --preset x`", text)
    self.assertIn("| 2 | 36.0 | 88.03 ± 0.35 | +1.01 [", text)
    self.assertIn("### DNR per layer at cycle 2", text)


if __name__ == "__main__":
  absltest.main()

"""Tests of the SAE report's pairing, verdicts and convergence figure (experiments.sae_report)."""

import math

from absl.testing import absltest
import numpy as np

from experiments import reporting
from experiments import sae_report


def _row(strategy, aux, seed, dead, fvu, under=0.3, k=16, source="synthbench"):
  return {"source": source, "strategy": strategy, "aux_loss": aux, "k": k, "seed": seed,
          "dead_fraction": dead, "fvu": fvu, "underutilised_fraction": under, "l0_mean": k,
          "curve": [{"tokens": i, "nmse": 1.0, "dead_fraction": 0.0} for i in range(16)]}


class VerdictTest(absltest.TestCase):

  def test_paired_by_seed(self):
    rows = [_row("topk", "none", s, 0.2 + s, 0.3) for s in range(3)]
    rows += [_row("mutual_choice", "none", s, 0.1 + s, 0.3) for s in (2, 0)]
    diffs = sae_report.paired(sae_report.groups(rows), ("synthbench", "mutual_choice", "none", 16),
                              ("synthbench", "topk", "none", 16), "dead_fraction")
    np.testing.assert_allclose(diffs, [-0.1, -0.1])  # seeds 0 and 2 only, in seed order

  def test_verdicts_follow_the_interval(self):
    rows = []
    for s, noise in enumerate((0.0, 0.01, -0.01)):
      rows += [_row("topk", "none", s, 0.30 + noise, 0.20),
               # MC: clearly fewer dead; FVU equal up to noise of both signs.
               _row("mutual_choice", "none", s, 0.10 + noise, 0.20 + (0.01, -0.02, 0.01)[s]),
               _row("topk", "aux_k", s, 0.2, 0.2, under=0.30 + noise),
               _row("topk", "aux_zipf", s, 0.2, 0.2, under=0.40 + noise + 0.01 * s)]
    by = {(v["claim"], v["comparison"]): v for v in sae_report.verdicts(rows)}
    dead = by[("mutual_choice has fewer dead features than TopK (never fired on held-out tokens)",
               "mutual_choice − topk, no aux")]
    self.assertEqual(dead["verdict"], "holds")
    self.assertAlmostEqual(dead["mean"], -0.2)
    fvu = by[("mutual_choice has lower reconstruction error (FVU) than TopK",
              "mutual_choice − topk, no aux")]
    self.assertEqual(fvu["verdict"], "not shown (CI spans 0)")
    under = by[("aux_zipf leaves fewer underutilised features than aux_k",
                "topk: aux_zipf − aux_k")]
    self.assertEqual(under["verdict"], "opposite holds")
    self.assertEqual(under["n"], 3)
    lines = "\n".join(sae_report.verdict_lines(rows))
    self.assertIn("| mutual_choice has fewer dead features than TopK (never fired on held-out "
                  "tokens) | synthbench | 16 |", lines)
    # The trainer's own dead counter comes from the last point of the training curve.
    train_dead = by[("mutual_choice has fewer dead features than TopK (dead in training)",
                     "mutual_choice − topk, no aux")]
    self.assertEqual((train_dead["mean"], train_dead["verdict"]),
                     (0.0, "tie (equal on every seed)"))

  def test_mutual_choice_equals_batch_topk_row(self):
    rows = [dict(_row("mutual_choice", "none", s, 0.1, 0.2), mc_equals_batch_topk=v)
            for s, v in enumerate((1.0, 1.0))]
    (v,) = [v for v in sae_report.verdicts(rows) if v["metric"] == "mc_equals_batch_topk"]
    self.assertEqual(v["verdict"], "holds")
    rows[1]["mc_equals_batch_topk"] = 0.5
    (v,) = [v for v in sae_report.verdicts(rows) if v["metric"] == "mc_equals_batch_topk"]
    self.assertEqual(v["verdict"], "not shown (masks differ)")

  def test_holds_rule(self):
    self.assertEqual(reporting.holds(-2.0, -1.0, -1), "holds")
    self.assertEqual(reporting.holds(1.0, 2.0, -1), "opposite holds")
    self.assertEqual(reporting.holds(-1.0, 1.0, -1), "not shown (CI spans 0)")
    self.assertEqual(reporting.holds(0.0, 0.0, -1), "tie (equal on every seed)")
    self.assertEqual(reporting.holds(-0.0, 1e-9, -1), "not shown (CI spans 0)")
    self.assertEqual(reporting.holds(math.nan, math.nan, 1), "undecided (one seed)")


class FlatteningTest(absltest.TestCase):

  def test_flat_and_falling_curves(self):
    flat = [{"nmse": 0.5} for _ in range(40)]
    self.assertAlmostEqual(sae_report.flattening(flat), 0.0)
    # 40 points, decay over the last 8: the window is points 22-26 (a) and 27-31 (b).
    falling = [{"nmse": 1.0 / (1 + i)} for i in range(40)]
    a, b = np.mean([1 / (1 + i) for i in range(22, 27)]), np.mean([1 / (1 + i) for i in range(27, 32)])
    self.assertAlmostEqual(sae_report.flattening(falling), (a - b) / b)
    self.assertTrue(math.isnan(sae_report.flattening(flat[:4])))

  def test_adjusted_flattening_removes_the_batches_difficulty(self):
    # A converged model on data whose second eighth before the decay is 10 % harder: the
    # raw curve reads -0.09 (rising), the curve divided by a fixed model's NMSE on the
    # same batches reads 0.
    hard = [1.1 if 27 <= i < 32 else 1.0 for i in range(40)]
    curve = [{"nmse": 0.5 * h, "nmse_ref": 0.4 * h} for h in hard]
    self.assertAlmostEqual(sae_report.flattening(curve), 1 / 1.1 - 1)
    self.assertAlmostEqual(sae_report.adjusted_flattening(curve), 0.0)
    # Still falling 5 % on equally hard batches: the adjusted value keeps it.
    falling = [{"nmse": 0.5 * (1.05 if i < 27 else 1.0), "nmse_ref": 0.4} for i in range(40)]
    self.assertAlmostEqual(sae_report.adjusted_flattening(falling), 0.05)
    # A curve without the reference has no adjusted value.
    self.assertTrue(math.isnan(sae_report.adjusted_flattening([{"nmse": 0.5}] * 40)))
    self.assertTrue(math.isnan(sae_report.adjusted_flattening([])))


if __name__ == "__main__":
  absltest.main()

"""End-to-end smoke run of experiments/sae_allocation.py on a tiny config."""

import json
import pathlib
import tempfile

from absl.testing import absltest

from experiments import sae_allocation

REQUIRED = ("strategy", "aux_loss", "k", "l0_mean", "nmse", "dead_fraction",
            "underutilised_fraction", "fidelity_recovered")


class SaeAllocationSmokeTest(absltest.TestCase):

  def test_smoke_preset_writes_results_plots_and_saes(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = pathlib.Path(tmp) / "out"
      runs = ["mutual_choice-aux_zipf-k8", "feature_choice_zipf-none-k8", "topk-none-k4"]
      result = sae_allocation.main(["--preset", "smoke", "--out", str(out), "--cache",
                                    str(pathlib.Path(tmp) / "cache"), "--quiet", "--only",
                                    *runs])
      saved = json.loads((out / "results.json").read_text())
      self.assertEqual([r["name"] for r in saved["runs"]], runs)
      for r in saved["runs"]:
        for key in REQUIRED:
          self.assertIn(key, r)
        self.assertEqual(r["l0_mean"] > 0, True)
      mc = saved["runs"][0]
      # Mutual Choice keeps exactly k * b entries per training batch; on held-out batches
      # of the same size its mean L0 is k (up to tokens whose kept codes are 0).
      self.assertLessEqual(mc["l0_mean"], 8.0 + 1e-9)
      self.assertIn("threshold_nmse", mc)
      self.assertNotIn("threshold_nmse", saved["runs"][2])  # TopK needs no calibration
      for png in ("nmse_vs_l0.png", "dead_fraction.png", "l0_histograms.png",
                  "density_vs_rank.png"):
        self.assertGreater((out / png).stat().st_size, 1000)
      self.assertIn("| mutual_choice | aux_zipf | 8 |", (out / "results.md").read_text())
      for name in runs:
        self.assertTrue((out / "saes" / name / "cfg.json").exists())
      self.assertEqual(result["store_tokens"], 4000)


if __name__ == "__main__":
  absltest.main()

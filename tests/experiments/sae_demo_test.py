"""The synthetic SAE demo runs every strategy through the dense reference step."""

from absl.testing import absltest

from experiments import sae_demo


class SaeDemoTest(absltest.TestCase):

  def test_every_strategy_trains_and_reports(self):
    rows = sae_demo.main(["--steps", "3"])
    self.assertEqual([(r["allocation"], r["aux_loss"]) for r in rows],
                     list(sae_demo.STRATEGIES))
    for r in rows:
      # After 3 steps: finite and positive (the ReLU baseline is still above 1).
      self.assertTrue(0.0 < r["nmse"] < 10.0, r)
      self.assertGreater(r["l0"], 0.0)
    # Mutual Choice keeps exactly k entries per token on average.
    mc = next(r for r in rows if r["allocation"] == "mutual_choice")
    self.assertAlmostEqual(mc["l0"], 6.0, places=4)


if __name__ == "__main__":
  absltest.main()

"""End-to-end smoke test of the AP experiment (experiments.prune_ap)."""

import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from experiments import prune_ap
from pruning_jax import rounds
from pruning_jax import schedules
from pruning_jax import train

_KEYS = {"model", "dataset", "method", "ap", "ap_rate", "seed", "cycle", "sparsity",
         "test_accuracy", "test_loss", "dnr", "dnr_channel", "dnr_static", "layer_dnr",
         "layer_dnr_channel", "layer_dnr_static", "train_dnr_by_epoch"}


class PruneAPTest(parameterized.TestCase):

  def test_smoke_run_writes_results_tables_and_plots(self):
    holder = tempfile.TemporaryDirectory()
    self.addCleanup(holder.cleanup)
    out = holder.name
    results = prune_ap.main(["--preset", "smoke", "--out", out, "--quiet"])
    with open(os.path.join(out, "results.json")) as fh:
      saved = json.load(fh)
    runs = saved["runs"]
    # 1 method x (AP off, on) x 1 seed x (cycles 0, 1, 2).
    self.assertLen(runs, 6)
    for row in runs:
      self.assertEmpty(_KEYS - set(row), msg=row)
      self.assertBetween(row["test_accuracy"], 0.0, 1.0)
      self.assertBetween(row["dnr"], 0.0, 1.0)
      self.assertLen(row["train_dnr_by_epoch"], 2)  # 2 epochs per cycle
    self.assertEqual(sorted({(r["ap"], r["cycle"]) for r in runs}),
                     [(a, c) for a in (False, True) for c in range(3)])
    by_key = {(r["ap"], r["cycle"]): r for r in runs}
    for ap_on in (False, True):
      self.assertAlmostEqual(by_key[(ap_on, 2)]["sparsity"], 0.36, places=4)
      self.assertEqual(by_key[(ap_on, 1)]["ap_rate"], 0.02 if ap_on else 0.0)
    # Round 0 is shared: the dense results of both settings are identical.
    self.assertEqual(by_key[(False, 0)]["test_accuracy"], by_key[(True, 0)]["test_accuracy"])
    self.assertEqual(saved["runs"], results["runs"])
    with open(os.path.join(out, "results.md")) as fh:
      table = fh.read()
    self.assertIn("| cycle | sparsity | acc | acc + AP | AP gain | DNR | DNR + AP |", table)
    self.assertIn("| 2 | 36.0 |", table)
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    self.assertEqual(pngs, ["accuracy_vs_sparsity_lenet300100_synthetic.png",
                            "dnr_over_epochs_lenet300100_synthetic.png",
                            "dnr_vs_sparsity_lenet300100_synthetic.png"])
    for name in pngs:
      with open(os.path.join(out, name), "rb") as fh:
        self.assertEqual(fh.read(8), b"\x89PNG\r\n\x1a\n")
    # A second call finds every run finished and reproduces the rows.
    again = prune_ap.main(["--preset", "smoke", "--out", out, "--quiet"])
    self.assertEqual(again["runs"], results["runs"])

  @parameterized.parameters("cpu", "paper")
  def test_presets_are_valid(self, name):
    preset = prune_ap.load_preset(name)
    self.assertGreater(schedules.imp_sparsity(preset["cycles"], preset["rate"]), 0.9)
    for model in preset["models"]:
      for method in model["methods"]:
        rounds.RoundsConfig(model=model["model"], dataset=model["dataset"],
                            train=train.TrainConfig(**model["train"]), method=method,
                            rate=preset["rate"], ap_rate=preset["ap_rate"],
                            cycles=preset["cycles"], seed=model["seeds"][0],
                            train_subset=model["train_subset"],
                            test_subset=model["test_subset"],
                            eval_batch_size=model["eval_batch_size"])
    if name == "cpu":
      self.assertEqual([m["model"] for m in preset["models"]], ["lenet300100", "conv4"])
      self.assertEqual(preset["cycles"], 11)  # 1 - 0.8^11 = 91.4 % sparsity
    else:
      self.assertEqual({(m["model"], m["dataset"]) for m in preset["models"]},
                       {(m, d) for m in ("resnet20", "vgg19") for d in ("cifar10", "cifar100")})

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "preset must be one of"):
      prune_ap.load_preset("huge")
    with self.assertRaisesRegex(ValueError, r"--models \['vgg11'\] are not in the preset"):
      prune_ap.main(["--preset", "smoke", "--out", tempfile.gettempdir(), "--models",
                     "vgg11"])


if __name__ == "__main__":
  absltest.main()

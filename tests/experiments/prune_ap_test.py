"""End-to-end smoke test of the AP experiment (experiments.prune_ap)."""

import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from experiments import prune_ap
from pruning_jax import schedules

_KEYS = {"model", "dataset", "method", "arm", "ap", "ap_rate", "ap_selection", "ap_scope",
         "seed", "cycle", "sparsity", "test_accuracy", "test_loss", "dnr", "dnr_channel",
         "dnr_static", "layer_dnr", "layer_dnr_channel", "layer_dnr_static",
         "layer_sparsity", "train_dnr_by_epoch", "test_accuracy_by_epoch"}


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
    self.assertIn("| cycle | sparsity % | host acc | ap − host |", table)
    self.assertIn("| 2 | 36.0 |", table)
    self.assertIn("## Verdicts", table)
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    self.assertEqual(pngs, ["accuracy_dnr_vs_sparsity_lenet300100_synthetic_magnitude.png",
                            "layer_dnr_lenet300100_synthetic_magnitude.png"])
    for name in pngs:
      with open(os.path.join(out, name), "rb") as fh:
        self.assertEqual(fh.read(8), b"\x89PNG\r\n\x1a\n")
    # A second call finds every run finished and reproduces the rows.
    again = prune_ap.main(["--preset", "smoke", "--out", out, "--quiet"])
    self.assertEqual(again["runs"], results["runs"])

  def test_controls_pair_with_the_host_and_write_epoch_curves(self):
    holder = tempfile.TemporaryDirectory()
    self.addCleanup(holder.cleanup)
    arms = list(prune_ap.ARMS)
    results = prune_ap.main(["--preset", "smoke", "--out", holder.name, "--quiet",
                             "--cycles", "1", "--arms", *arms])
    runs = results["runs"]
    self.assertEqual(sorted({r["arm"] for r in runs}), sorted(arms))
    by_key = {(r["arm"], r["cycle"]): r for r in runs}
    for arm in arms:
      # Every arm starts from the host's round 0 and removes the same total.
      self.assertEqual(by_key[(arm, 0)]["test_accuracy"],
                       by_key[("host", 0)]["test_accuracy"])
      self.assertAlmostEqual(by_key[(arm, 1)]["sparsity"], 0.2, places=4)
    self.assertEqual(by_key[("random_q", 1)]["ap_selection"], "random")
    self.assertEqual(by_key[("ap_relu_fed", 1)]["ap_scope"], "relu_fed")
    # The ReLU-fed variant never prunes the first layer beyond the host's share.
    host_first = by_key[("host", 1)]["layer_sparsity"]["hidden/0/kernel"]
    self.assertLessEqual(by_key[("ap_relu_fed", 1)]["layer_sparsity"]["hidden/0/kernel"],
                         host_first + 1e-6)

  def test_arms_must_start_with_the_host(self):
    with self.assertRaisesRegex(ValueError, "arms must start with 'host'"):
      prune_ap.main(["--preset", "smoke", "--out", tempfile.gettempdir(), "--arms", "ap"])
    with self.assertRaisesRegex(ValueError, r"arms \['apx'\] are unknown"):
      prune_ap.main(["--preset", "smoke", "--out", tempfile.gettempdir(), "--arms", "host",
                     "apx"])

  @parameterized.parameters("cpu", "cpu-long", "paper")
  def test_presets_are_valid(self, name):
    preset = prune_ap.load_preset(name)
    self.assertGreater(schedules.imp_sparsity(preset["cycles"], preset["rate"]), 0.9)
    for model in preset["models"]:
      for method in model["methods"]:
        for arm in preset.get("arms", prune_ap.DEFAULT_ARMS):
          prune_ap.rounds_config(preset, model, model["dataset"], method, arm,
                                  model["seeds"][0], False, None)
    if name == "cpu-long":
      self.assertEqual(preset["arms"][0], "host")
      self.assertEqual(set(preset["arms"]), set(prune_ap.ARMS))
      self.assertEqual([m["model"] for m in preset["models"]],
                       ["lenet300100", "conv2", "conv4", "conv6", "resnet20"])
      for model in preset["models"]:
        self.assertGreaterEqual(len(model["seeds"]), 3)
        self.assertEqual(model["train_subset"], 0)  # the full training set
    if name == "cpu":
      self.assertEqual([m["model"] for m in preset["models"]], ["lenet300100", "conv4"])
      self.assertEqual(preset["cycles"], 11)  # 1 - 0.8^11 = 91.4 % sparsity
    if name == "paper":
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

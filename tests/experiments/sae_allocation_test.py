"""End-to-end smoke runs of experiments/sae_allocation.py on tiny configs."""

import dataclasses
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from absl.testing import absltest

from experiments import sae_allocation
from experiments import sae_report
from sae_jax import model
from sae_jax.data import synthetic
from sae_jax.training import loop
from sae_jax.training import train_state
from tests.sae_jax import lm_test

REQUIRED = ("strategy", "aux_loss", "k", "seed", "source", "l0_mean", "fvu", "nmse",
            "dead_fraction", "underutilised_fraction", "curve")


class SaeAllocationSmokeTest(absltest.TestCase):

  def test_minilm_smoke_preset_writes_results_plots_and_saes(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = pathlib.Path(tmp) / "out"
      runs = ["mutual_choice-aux_zipf-k8", "feature_choice_zipf-none-k8", "topk-none-k4"]
      result = sae_allocation.main(["--preset", "smoke", "--out", str(out), "--cache",
                                    str(pathlib.Path(tmp) / "cache"), "--quiet",
                                    "--mix-shards", "--only", *runs])
      saved = json.loads((out / "results.json").read_text())
      self.assertEqual([r["name"] for r in saved["runs"]], runs)
      self.assertTrue(saved["preset_config"]["mix_shards"])
      self.assertTrue(all(r["mix_shards"] for r in saved["runs"]))
      # Runs read in the shuffled-shard order keep folders of their own.
      self.assertTrue((out / "saes" / runs[0]).is_dir())
      self.assertTrue((out / "runs" / "minilm" / f"{runs[0]}-mixed").is_dir())
      for r in saved["runs"]:
        for key in REQUIRED + ("fidelity_recovered",):
          self.assertIn(key, r)
        self.assertGreater(r["l0_mean"], 0)
      mc = saved["runs"][0]
      # Mutual Choice keeps exactly k * b entries per training batch; on held-out batches
      # of the same size its mean L0 is k (up to tokens whose kept codes are 0).
      self.assertLessEqual(mc["l0_mean"], 8.0 + 1e-9)
      self.assertIn("threshold_nmse", mc)
      self.assertEqual(mc["mc_equals_batch_topk"], 1.0)
      self.assertNotIn("threshold_nmse", saved["runs"][2])  # TopK needs no calibration
      for png in ("fvu_vs_l0_minilm.png", "l0_distributions_minilm.png",
                  "training_curves_minilm.png"):
        self.assertGreater((out / png).stat().st_size, 1000)
      self.assertIn("| mutual_choice | aux_zipf | 8 | 1 |", (out / "results.md").read_text())
      self.assertIn("python -m experiments.sae_allocation --preset smoke", saved["command"])
      for name in runs:
        cfg = json.loads((out / "saes" / name / "cfg.json").read_text())
        # Hidden state 3 is the output of block index 2 (TransformerLens numbering).
        self.assertEqual(cfg["hook_layer"], 2)
      self.assertEqual(result["store_tokens"], 4000)

  def test_synthbench_seeds_resume_and_verdicts(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = pathlib.Path(tmp) / "out"
      argv = ["--preset", "smoke", "--sources", "synthbench", "--seeds", "0", "1", "--out",
              str(out), "--cache", str(pathlib.Path(tmp) / "cache"), "--quiet", "--only",
              "topk-none-k8", "mutual_choice-none-k8"]
      first = sae_allocation.main(argv)
      rows = first["runs"]
      self.assertEqual(sorted((r["name"], r["seed"]) for r in rows),
                       [("mutual_choice-none-k8", 0), ("mutual_choice-none-k8", 1),
                        ("topk-none-k8", 0), ("topk-none-k8", 1)])
      for r in rows:
        for key in REQUIRED + ("recovery_mcc", "recovery_f1"):
          self.assertIn(key, r)
        self.assertNotIn("fidelity_recovered", r)
        self.assertTrue(0.0 <= r["recovery_mcc"] <= 1.0)
      # A second call finds every row on disk and trains nothing again.
      again = sae_allocation.main(argv)
      self.assertEqual([r["train_seconds"] for r in again["runs"]],
                       [r["train_seconds"] for r in rows])
      # A fresh run folder continues from the committed results.json: nothing retrained.
      fresh = pathlib.Path(tmp) / "fresh"
      argv_fresh = argv[:argv.index("--out") + 1] + [str(fresh)] + argv[argv.index("--out") + 2:]
      continued = sae_allocation.main(argv_fresh + ["--rows-from", str(out / "results.json")])
      self.assertEqual([r["train_seconds"] for r in continued["runs"]],
                       [r["train_seconds"] for r in rows])
      claims = {(v["claim"], v["n"]) for v in sae_report.verdicts(rows)}
      self.assertIn(("mutual_choice has fewer dead features than TopK (dead in training)", 2),
                    claims)
      self.assertIn(("Mutual Choice selects what BatchTopK selects", 2), claims)
      # Only the first seed is exported; the export names its source, not an LM layer.
      cfg = json.loads((out / "saes" / "topk-none-k8" / "cfg.json").read_text())
      self.assertIsNone(cfg["hook_layer"])
      self.assertIsNone(cfg["context_size"])
      self.assertGreater((out / "fvu_vs_l0_synthbench.png").stat().st_size, 1000)
      self.assertIn("## synthbench", (out / "results.md").read_text())

  def test_row_of_other_feature_choice_capacities_is_trained_again(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = pathlib.Path(tmp) / "out"
      argv = ["--preset", "smoke", "--sources", "synthbench", "--out", str(out), "--cache",
              str(pathlib.Path(tmp) / "cache"), "--quiet", "--only",
              "feature_choice_zipf-none-k8", "topk-none-k8"]
      first = {r["name"]: r for r in sae_allocation.main(argv)["runs"]}
      fc = first["feature_choice_zipf-none-k8"]
      self.assertEqual(len(fc["capacity_digest"]), 16)
      self.assertNotIn("capacity_digest", first["topk-none-k8"])
      # A row written under another capacity rule (here: no digest, as before digests
      # were kept) is recognised as another experiment and trained again; TopK's is kept.
      path = out / "rows" / "synthbench" / "feature_choice_zipf-none-k8.json"
      stale = dict(fc, fvu=-1.0)
      del stale["capacity_digest"]
      path.write_text(json.dumps(stale))
      again = {r["name"]: r for r in sae_allocation.main(argv)["runs"]}
      self.assertEqual(again["feature_choice_zipf-none-k8"]["capacity_digest"],
                       fc["capacity_digest"])
      self.assertGreaterEqual(again["feature_choice_zipf-none-k8"]["fvu"], 0.0)
      self.assertEqual(again["topk-none-k8"]["train_seconds"],
                       first["topk-none-k8"]["train_seconds"])
      self.assertEqual(json.loads(path.read_text())["capacity_digest"], fc["capacity_digest"])

  def test_final_model_nmse_is_taken_on_the_logged_batches(self):
    # With a learning rate too small to move the parameters, the final model is the model
    # of every step, so its NMSE on the batch behind each logged point must equal the
    # logged training NMSE; reading the batch one step off must not.
    with tempfile.TemporaryDirectory() as tmp:
      cfg = model.SAEConfig(d_model=8, d_sae=32, allocation="feature_choice_zipf", k=3)
      tcfg = train_state.TrainConfig(learning_rate=1e-12, warmup_steps=1, total_steps=12)
      rcfg = loop.RunConfig(steps=12, checkpoint_every=12, log_every=3, progress=False)
      data = lambda: synthetic.SyntheticBatches(
          synthetic.SyntheticConfig(d_model=8, num_features=24), batch_size=32, seed=0)
      run_dir = pathlib.Path(tmp) / "run"
      state, _ = loop.fit(run_dir, cfg, tcfg, rcfg, data(), init_sample=data().sample(64))
      curve = sae_allocation.training_curve(run_dir, 32)
      self.assertEqual([p["tokens"] for p in curve], [96, 192, 288, 384])
      logged = np.array([p["nmse"] for p in curve])
      final = sae_allocation.final_model_nmse([state.params], cfg, data(), [3, 6, 9, 12])
      np.testing.assert_allclose(final, logged, rtol=1e-5)
      off_by_one = sae_allocation.final_model_nmse([state.params], cfg, data(),
                                                 [4, 7, 10, 13])
      self.assertGreater(np.max(np.abs(np.array(off_by_one) / logged - 1)), 1e-3)

  def test_curves_get_the_other_seeds_final_models_nmse(self):
    with tempfile.TemporaryDirectory() as tmp:
      out = pathlib.Path(tmp) / "out"
      argv = ["--preset", "smoke", "--sources", "synthbench", "--seeds", "0", "1", "--out",
              str(out), "--cache", str(pathlib.Path(tmp) / "cache"), "--quiet", "--only",
              "topk-none-k8"]
      rows = {r["seed"]: r for r in sae_allocation.main(argv)["runs"]}
      self.assertEqual(rows[0]["reference_seeds"], [1])
      self.assertEqual(rows[1]["reference_seeds"], [0])
      for row in rows.values():
        self.assertTrue(all(p["nmse_ref"] > 0 for p in row["curve"]))
      self.assertIn("flattening (adj.)", (out / "results.md").read_text())
      # A row kept without the reference gets it again from the other seed's checkpoint,
      # without training.
      path = out / "rows" / "synthbench" / "topk-none-k8-s0.json"
      old = dict(rows[0], curve=[{k: v for k, v in p.items() if k != "nmse_ref"}
                                 for p in rows[0]["curve"]])
      path.write_text(json.dumps(old))
      again = {r["seed"]: r for r in sae_allocation.main(argv)["runs"]}
      self.assertEqual(again[0]["train_seconds"], rows[0]["train_seconds"])
      np.testing.assert_allclose([p["nmse_ref"] for p in again[0]["curve"]],
                                 [p["nmse_ref"] for p in rows[0]["curve"]], rtol=1e-6)
      self.assertIn("nmse_ref", json.loads(path.read_text())["curve"][0])

  def test_rows_from_refuses_rows_of_another_configuration(self):
    with tempfile.TemporaryDirectory() as tmp:
      earlier = pathlib.Path(tmp) / "results.json"
      row = {"source": "synthbench", "name": "topk-none-k8", "seed": 0, "steps": 7,
             "batch_size": 512}
      earlier.write_text(json.dumps({"runs": [row]}))
      preset = sae_allocation.PRESETS["smoke"]
      with self.assertRaisesRegex(ValueError, "steps=7"):
        sae_allocation.import_rows(earlier, pathlib.Path(tmp) / "out", preset)
      row.update(steps=preset.steps, batch_size=preset.batch_size)
      earlier.write_text(json.dumps({"runs": [row]}))
      out = pathlib.Path(tmp) / "out"
      self.assertEqual(sae_allocation.import_rows(earlier, out, preset), 1)
      self.assertEqual(sae_allocation.import_rows(earlier, out, preset), 0)  # kept, not rewritten
      self.assertTrue((out / "rows" / "synthbench" / "topk-none-k8.json").exists())
      # Rows of a results.json without the field were read shard by shard.
      with self.assertRaisesRegex(ValueError, "trained with mix_shards=False, this run with "
                                  "mix_shards=True"):
        sae_allocation.import_rows(earlier, pathlib.Path(tmp) / "mixed",
                                   dataclasses.replace(preset, mix_shards=True))

  def test_lm_source_from_a_model_folder(self):
    # A random 2-layer GPT-2 in the Hugging Face format stands in for GPT-2-small.
    with tempfile.TemporaryDirectory() as tmp:
      model_dir = pathlib.Path(tmp) / "tiny_gpt2"
      lm_test.write_checkpoint(model_dir, "gpt2", config_overrides={"n_positions": 64})
      out = pathlib.Path(tmp) / "out"
      result = sae_allocation.main(
          ["--preset", "smoke", "--sources", "lm", "--model-dir", str(model_dir), "--hook",
           "blocks.1.hook_resid_pre", "--out", str(out), "--cache",
           str(pathlib.Path(tmp) / "cache"), "--quiet", "--only", "topk-none-k8",
           "mutual_choice-none-k8"])
      self.assertEqual(result["store_tokens"], 4000)
      for row in result["runs"]:
        self.assertEqual(row["source"], "lm")
        for key in ("ce_clean", "ce_spliced", "ce_recovered_zero", "ce_recovered_mean",
                    "kl_spliced", "fidelity_recovered"):
          self.assertIn(key, row)
        self.assertEqual(row["fidelity_recovered"], row["ce_recovered_zero"])
        self.assertGreaterEqual(row["kl_spliced"], 0.0)
      cfg = json.loads((out / "saes" / "topk-none-k8" / "cfg.json").read_text())
      self.assertEqual((cfg["model_name"], cfg["hook_name"], cfg["hook_layer"]),
                       ("tiny_gpt2", "blocks.1.hook_resid_pre", 1))
      self.assertEqual(cfg["context_size"], 64)
      self.assertFalse(cfg["prepend_bos"])

  def test_lm_source_streams_without_a_store(self):
    with tempfile.TemporaryDirectory() as tmp:
      model_dir = pathlib.Path(tmp) / "tiny_gpt2"
      lm_test.write_checkpoint(model_dir, "gpt2", config_overrides={"n_positions": 64})
      out = pathlib.Path(tmp) / "out"
      argv = ["--preset", "smoke", "--sources", "lm", "--stream", "--model-dir", str(model_dir),
              "--hook", "blocks.1.hook_resid_post",
              "--out", str(out), "--cache", str(pathlib.Path(tmp) / "cache"), "--quiet",
              "--only", "topk-none-k8"]
      result = sae_allocation.main(argv)
      self.assertIsNone(result["store_tokens"])
      self.assertFalse((pathlib.Path(tmp) / "cache").exists())  # nothing harvested
      row = result["runs"][0]
      self.assertIn("streamed through the model", result["sources"]["lm"]["description"])
      self.assertTrue(0 < row["fvu"] < 1.5)
      self.assertIn("ce_recovered_zero", row)
      with self.assertRaisesRegex(ValueError, "--store and --stream exclude each other"):
        sae_allocation.main(argv + ["--store", str(out)])

  def test_lm_source_needs_a_model_folder(self):
    with tempfile.TemporaryDirectory() as tmp:
      proc = subprocess.run(
          [sys.executable, "-m", "experiments.sae_allocation", "--preset", "smoke",
           "--sources", "lm", "--out", str(pathlib.Path(tmp) / "out"), "--quiet"],
          capture_output=True, text=True, cwd=pathlib.Path(__file__).resolve().parents[2])
    self.assertNotEqual(proc.returncode, 0)
    self.assertNotIn("Traceback", proc.stderr)
    self.assertIn("needs --model-dir", proc.stderr.strip().splitlines()[-1])

  def test_command_line_reports_a_bad_store_in_one_line(self):
    with tempfile.TemporaryDirectory() as tmp:
      proc = subprocess.run(
          [sys.executable, "-m", "experiments.sae_allocation", "--preset", "smoke", "--store",
           str(pathlib.Path(tmp) / "missing"), "--out", str(pathlib.Path(tmp) / "out"),
           "--quiet"], capture_output=True, text=True,
          cwd=pathlib.Path(__file__).resolve().parents[2])
    self.assertNotEqual(proc.returncode, 0)
    self.assertNotIn("Traceback", proc.stderr)
    self.assertIn("is not an activation store", proc.stderr.strip().splitlines()[-1])


if __name__ == "__main__":
  absltest.main()

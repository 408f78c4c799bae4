"""Tests for experiments.harvest: the command line harvests, resumes, and reports bad input in
one line without a traceback."""

import contextlib
import io
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from absl.testing import absltest
from absl.testing import parameterized

from experiments import harvest
from tests.sae_jax import lm_test

pytest.importorskip("tokenizers")

HOOK = "blocks.1.hook_resid_pre"
REPO = pathlib.Path(__file__).resolve().parents[2]


def _files(path):
  return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


class HarvestCommandTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.root = pathlib.Path(tempfile.mkdtemp())
    cls.model = cls.root / "tiny-gpt2"
    lm_test.write_checkpoint(cls.model, "gpt2")
    cls.text = cls.root / "doc.txt"
    cls.text.write_text("the cat sat on the mat\nthe dog ran in the park\n" * 6)
    np.save(cls.root / "ids.npy", np.arange(30).reshape(5, 6) % 64)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.root)
    super().tearDownClass()

  def _run(self, *args):
    """(exit status, stdout, stderr) of main(args); status 0 when it returns."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        harvest.main(list(map(str, args)))
        status = 0
      except SystemExit as e:
        status = e.code
    return status, out.getvalue(), err.getvalue()

  def test_text_harvest_prints_a_summary_and_reruns_unchanged(self):
    store = self.root / "text_store"
    args = ["--model-dir", self.model, "--hook", HOOK, "--out", store, "--text", self.text,
            "--context", 8, "--batch-size", 2]
    status, out, err = self._run(*args)
    self.assertEqual(status, 0, err)
    self.assertRegex(out.strip(), r"text_store: \d+ rows of d=32 \(float32\) from tiny-gpt2 "
                                  r"blocks\.1\.hook_resid_pre$")
    before = _files(store)
    status, out, _ = self._run(*args, "--quiet")
    self.assertEqual((status, out), (0, ""))
    self.assertEqual(_files(store), before)

  def test_token_ids_harvest_over_every_device(self):
    status, _, err = self._run("--model-dir", self.model, "--hook", HOOK, "--out",
                               self.root / "mesh_store", "--token-ids", self.root / "ids.npy",
                               "--devices", 0, "--batch-size", 8, "--quiet")
    self.assertEqual(status, 0, err)
    status, _, err = self._run("--model-dir", self.model, "--hook", HOOK, "--out",
                               self.root / "bad_mesh", "--token-ids", self.root / "ids.npy",
                               "--devices", 3, "--batch-size", 8, "--quiet")
    self.assertEqual(status, 2)
    self.assertIn("batch_size=8 must be divisible by the mesh's 'data' axis (3)", err)

  def test_token_ids_harvest(self):
    status, _, err = self._run("--model-dir", self.model, "--hook", HOOK, "--out",
                               self.root / "ids_store", "--token-ids", self.root / "ids.npy",
                               "--skip-first", 2, "--store-dtype", "bfloat16", "--dtype",
                               "bfloat16", "--max-tokens", 15, "--quiet")
    self.assertEqual(status, 0, err)
    reader = harvest.store_lib.StoreReader(self.root / "ids_store")
    self.assertEqual((reader.count, reader.dtype), (15, "bfloat16"))
    self.assertEqual({k: reader.meta[k] for k in ("context", "skip_first", "model_dtype")},
                     {"context": 6, "skip_first": 2, "model_dtype": "bfloat16"})

  @parameterized.named_parameters(
      ("no_source", [], "one of the arguments --text --token-ids is required"),
      ("two_sources", ["--text", "T", "--token-ids", "I"], "not allowed with argument"),
      ("bad_int", ["--text", "T", "--context", "many"], "--context: invalid int value"),
      ("bad_dtype", ["--text", "T", "--dtype", "float64"], "--dtype: invalid choice"),
      ("bad_hook", ["--text", "T", "--hook", "blocks.9.hook_resid_pre"], "has 2 blocks"),
      ("context_mismatch", ["--token-ids", "I", "--context", "5"],
       r"context=5 must equal the second dimension of .*ids\.npy \(6\), or be omitted"),
      ("too_long", ["--text", "T", "--context", "17"], r"context must be an int in \[1, 16\]"),
      ("missing_text", ["--text", "missing.txt"], "text file 'missing.txt' does not exist"),
      ("missing_model", ["--text", "T", "--model-dir", "nowhere"], "is not a folder"),
  )
  def test_bad_input_prints_one_line(self, extra, pattern):
    extra = [str(self.text) if a == "T" else str(self.root / "ids.npy") if a == "I" else a
             for a in extra]
    base = {"--model-dir": str(self.model), "--hook": HOOK, "--out": str(self.root / "bad")}
    for flag in ("--model-dir", "--hook"):
      if flag in extra:
        base.pop(flag)
    args = [x for kv in base.items() for x in kv] + extra
    status, out, err = self._run(*args)
    self.assertEqual(status, 2)
    self.assertEqual(out, "")
    self.assertLen(err.strip().splitlines(), 1, err)
    self.assertRegex(err, r"^harvest: error: ")
    self.assertRegex(err, pattern)
    self.assertFalse((self.root / "bad").exists())

  def test_refuses_a_store_written_with_other_settings(self):
    store = self.root / "settings_store"
    common = ["--model-dir", self.model, "--hook", HOOK, "--out", store, "--quiet"]
    self.assertEqual(self._run(*common, "--text", self.text, "--context", 8)[0], 0)
    status, _, err = self._run(*common, "--text", self.text, "--context", 8, "--skip-first", 0)
    self.assertEqual(status, 2)
    self.assertLen(err.strip().splitlines(), 1)
    self.assertIn("was harvested with skip_first=1, but this run has skip_first=0", err)
    status, _, err = self._run(*common, "--token-ids", self.root / "ids.npy")
    self.assertEqual(status, 2)
    self.assertIn("was harvested with context=8, but this run has context=6", err)

  def test_module_command_reports_errors_without_a_traceback(self):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.harvest", "--model-dir", str(self.root / "nowhere"),
         "--hook", HOOK, "--out", str(self.root / "bad"), "--text", str(self.text)],
        capture_output=True, text=True, cwd=REPO)
    self.assertEqual(proc.returncode, 2)
    self.assertNotIn("Traceback", proc.stderr)
    self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
    self.assertIn("harvest: error: model_dir=", proc.stderr)


if __name__ == "__main__":
  absltest.main()

"""The README's Python snippets run as written (with the stated substitutions)."""

import json
import os
import pathlib
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest

from tests.sae_jax import lm_test

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def snippets() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


class ReadmeSnippetsTest(absltest.TestCase):

  def test_every_python_snippet_runs(self):
    blocks = snippets()
    self.assertLen(blocks, 4, "a snippet was added or removed: give it a case below")
    allocation, training, store, language_model = blocks
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
      os.chdir(tmp)
      try:
        # Allocation ops, at 512 tokens and 2048 features instead of 4096 and 16384.
        self.assertIn("4096", allocation)
        ns = {}
        small = allocation.replace("4096", "512").replace("16384", "2048")
        exec(small, ns)  # pylint: disable=exec-used
        self.assertEqual(int(ns["mask_tk"].sum()), 32 * 512)
        self.assertEqual(int(ns["mask_mc"].sum()), 32 * 512)
        self.assertEqual(int(ns["mask_fc"].sum()), 32 * 512)
        # Bring your own activations: the snippet writes ./store from `acts`.
        os.mkdir("store")
        acts = np.random.default_rng(0).normal(size=(4096, 384)).astype(np.float32)
        ns = {"np": np, "json": json, "acts": acts}
        exec(store, ns)  # pylint: disable=exec-used
        os.symlink("store", "my_store")
        # Training from that store: 2000 steps become 4 (one warm-up step) to stay short.
        self.assertIn("total_steps=2000", training)
        short = training.replace("total_steps=2000", "total_steps=4, warmup_steps=1")
        ns = {"x": jax.random.normal(jax.random.key(0), (8, 768))}
        exec(short.replace("steps=2000", "steps=4"), ns)  # pylint: disable=exec-used
        self.assertEqual(ns["out"].recon.shape, (8, 768))
        self.assertEqual(int(ns["state"].step), 4)
        self.assertTrue(pathlib.Path("runs/my_sae").is_dir())
        # Language models: a random 2-layer GPT-2 written in the Hugging Face format stands
        # in for path/to/gpt2, so block 8 becomes block 1.
        lm_test.write_checkpoint("tiny_gpt2", "gpt2")
        ns = {"jnp": jnp}
        exec(language_model.replace("path/to/gpt2", "tiny_gpt2").replace(  # pylint: disable=exec-used
            "blocks.8.", "blocks.1."), ns)
        self.assertEqual(ns["acts"].shape[-1], lm_test.D)
        self.assertEqual(ns["spliced"].logits.shape, ns["out"].logits.shape)
        self.assertFalse(np.allclose(ns["spliced"].logits, ns["out"].logits))
      finally:
        os.chdir(cwd)


if __name__ == "__main__":
  absltest.main()

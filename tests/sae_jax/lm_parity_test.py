"""Parity of sae_jax.lm with Hugging Face transformers (PyTorch, CPU, float32).

Each case builds a random model from its config, saves it with ``save_pretrained``
(safetensors) and loads that folder with ``sae_jax.lm.load_model``, so the loader is
tested on the files transformers itself writes. Every hidden state
(``output_hidden_states=True``) and the logits must agree to 1e-5. Skipped when torch
or transformers is not installed.
"""

import functools
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from sae_jax import lm  # noqa: E402

VOCAB, D, LAYERS, POSITIONS = 64, 32, 2, 16
ATOL = 1e-5

GPT2_BASE = dict(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=D, n_layer=LAYERS, n_head=4,
                 bos_token_id=0, eos_token_id=0)
NEOX_BASE = dict(vocab_size=VOCAB, max_position_embeddings=POSITIONS, hidden_size=D,
                 num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=48,
                 rotary_emb_base=100)

CASES = {
    "gpt2": ("gpt2", {}),
    "gpt2_untied_relu": ("gpt2", dict(tie_word_embeddings=False, activation_function="relu",
                                      n_inner=40)),
    "neox_parallel_pct25": ("gpt_neox", dict(use_parallel_residual=True, rotary_pct=0.25)),
    "neox_parallel_pct100": ("gpt_neox", dict(use_parallel_residual=True, rotary_pct=1.0)),
    "neox_sequential_pct25": ("gpt_neox", dict(use_parallel_residual=False, rotary_pct=0.25)),
    "neox_sequential_pct100_nobias": ("gpt_neox", dict(use_parallel_residual=False,
                                                       rotary_pct=1.0, attention_bias=False)),
}


def _build(kind, overrides, seed):
  """A transformers model with O(1) random weights, so that errors cannot hide in tiny
  activations (the default init gives activations of order 0.02)."""
  torch.manual_seed(seed)
  if kind == "gpt2":
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_BASE, **overrides))
  else:
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**NEOX_BASE, **overrides))
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 2:
        p.copy_(torch.randn(p.shape, generator=generator) / min(p.shape) ** 0.5)
      else:
        is_scale = name.endswith("weight")  # LayerNorm scales; every other 1-D is a bias.
        p.copy_(float(is_scale) + 0.1 * torch.randn(p.shape, generator=generator))
  return model.eval()


@functools.lru_cache(maxsize=None)
def _jitted(cfg, hooks):
  return jax.jit(lambda p, i: lm.forward(p, cfg, i, hooks=hooks))


class HuggingFaceParityTest(parameterized.TestCase):

  @parameterized.named_parameters(*[(name, *case) for name, case in CASES.items()])
  def test_hidden_states_and_logits_match(self, kind, overrides):
    model = _build(kind, overrides, seed=len(overrides))
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(2, 12))
    with torch.no_grad():
      out = model(torch.as_tensor(ids), output_hidden_states=True)
    with tempfile.TemporaryDirectory() as tmp:
      model.save_pretrained(tmp, safe_serialization=True)
      cfg, params = lm.load_model(tmp)
    # hidden_states[l] enters block l; the last one is after the final LayerNorm.
    hooks = tuple(f"blocks.{l}.hook_resid_pre" for l in range(LAYERS)) + (
        "ln_final.hook_normalized",)
    ours = _jitted(cfg, hooks)(params, jnp.asarray(ids, jnp.int32))
    self.assertLen(out.hidden_states, len(hooks))
    for name, theirs in zip(hooks, out.hidden_states):
      np.testing.assert_allclose(ours.activations[name], theirs.numpy(), atol=ATOL, rtol=0,
                                 err_msg=name)
    np.testing.assert_allclose(ours.logits, out.logits.numpy(), atol=ATOL, rtol=0)
    # The comparison is meaningful: activations and logits are O(1).
    self.assertGreater(float(np.abs(out.logits.numpy()).max()), 1.0)

  def test_sharded_save_loads_identically(self):
    model = _build("gpt_neox", dict(rotary_pct=0.5), seed=3)
    with tempfile.TemporaryDirectory() as single, tempfile.TemporaryDirectory() as sharded:
      model.save_pretrained(single, safe_serialization=True)
      model.save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
      self.assertTrue((pathlib.Path(sharded) / "model.safetensors.index.json").is_file())
      self.assertGreater(len(list(pathlib.Path(sharded).glob("model-*.safetensors"))), 1)
      cfg_a, params_a = lm.load_model(single)
      cfg_b, params_b = lm.load_model(sharded)
    self.assertEqual(cfg_a, cfg_b)
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)

"""Tests for sae_jax.lm: tiny random GPT-2 and GPT-NeoX checkpoints written in the Hugging
Face folder format, checked against a float64 NumPy reference and for hooks, splicing,
dtypes, errors and sharded loading. Parity with transformers itself: lm_parity_test.py."""

import dataclasses
import functools
import json
import math
import pathlib
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import NamedSharding
from scipy import special

from sae_jax import lm
from sae_jax.data.bert import layer_norm
from sae_jax.lm import core

safetensors_numpy = pytest.importorskip("safetensors.numpy")
tokenizers = pytest.importorskip("tokenizers")

VOCAB, D, LAYERS, POSITIONS, T = 64, 32, 2, 16, 12

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "the sun is warm today",
             "birds sing in the morning", "we read a book on the mat"]

# config.json as transformers 5 writes it (GPT-2) and as the Pythia checkpoints ship it
# (GPT-NeoX "legacy": rotary_pct / rotary_emb_base) or transformers 5 writes it ("v5").
GPT2_CONFIG = {
    "activation_function": "gelu_new", "add_cross_attention": False,
    "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1, "bos_token_id": 0, "dtype": "float32",
    "embd_pdrop": 0.1, "eos_token_id": 0, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
    "model_type": "gpt2", "n_embd": D, "n_head": 4, "n_inner": None, "n_layer": LAYERS,
    "n_positions": POSITIONS, "pad_token_id": None, "reorder_and_upcast_attn": False,
    "resid_pdrop": 0.1, "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
    "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
    "summary_type": "cls_index", "summary_use_proj": True, "tie_word_embeddings": True,
    "transformers_version": "5.25.0", "use_cache": True, "vocab_size": VOCAB}
NEOX_LEGACY_CONFIG = {
    "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
    "hidden_act": "gelu", "hidden_size": D, "initializer_range": 0.02, "intermediate_size": 48,
    "layer_norm_eps": 1e-05, "max_position_embeddings": POSITIONS, "model_type": "gpt_neox",
    "num_attention_heads": 2, "num_hidden_layers": LAYERS, "rotary_emb_base": 100,
    "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.24.0", "use_cache": True, "use_parallel_residual": True,
    "vocab_size": VOCAB}
NEOX_V5_CONFIG = {
    "architectures": ["GPTNeoXForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "bos_token_id": 0, "classifier_dropout": 0.1, "dtype": "float32", "eos_token_id": 2,
    "hidden_act": "gelu", "hidden_dropout": 0.0, "hidden_size": D, "initializer_range": 0.02,
    "intermediate_size": 48, "is_decoder": False, "layer_norm_eps": 1e-05,
    "max_position_embeddings": POSITIONS, "model_type": "gpt_neox", "num_attention_heads": 4,
    "num_hidden_layers": LAYERS, "pad_token_id": None,
    "rope_parameters": {"partial_rotary_factor": 1.0, "rope_theta": 500, "rope_type": "default"},
    "tie_word_embeddings": False, "transformers_version": "5.25.0", "use_cache": True,
    "use_parallel_residual": False, "vocab_size": VOCAB}

# name -> (base config, overrides).
VARIANTS = {
    "gpt2": (GPT2_CONFIG, {}),
    "gpt2_untied_relu": (GPT2_CONFIG, {"tie_word_embeddings": False, "activation_function": "relu",
                                       "n_inner": 40, "scale_attn_weights": False}),
    "neox_parallel": (NEOX_LEGACY_CONFIG, {}),
    "neox_sequential_nobias": (NEOX_V5_CONFIG, {"attention_bias": False}),
}


def _hf_state_dict(config, seed=0):
  """Random tensors with Hugging Face names and layouts (GPT-2 Conv1D: [in, out];
  GPT-NeoX Linear: [out, in]), scaled so activations are O(1)."""
  rng = np.random.default_rng(seed)
  if config["model_type"] == "gpt2":
    d, layers = config["n_embd"], config["n_layer"]
    i = config["n_inner"] or 4 * d
    shapes = {"transformer.wte.weight": (VOCAB, d), "transformer.wpe.weight": (config["n_positions"], d),
              "transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
    block = {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.c_attn.weight": (d, 3 * d),
             "attn.c_attn.bias": (3 * d,), "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
             "ln_2.weight": (d,), "ln_2.bias": (d,), "mlp.c_fc.weight": (d, i),
             "mlp.c_fc.bias": (i,), "mlp.c_proj.weight": (i, d), "mlp.c_proj.bias": (d,)}
    shapes.update({f"transformer.h.{l}.{k}": s for l in range(layers) for k, s in block.items()})
    if not config["tie_word_embeddings"]:
      shapes["lm_head.weight"] = (VOCAB, d)
  else:
    d, layers, i = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    shapes = {"gpt_neox.embed_in.weight": (VOCAB, d), "embed_out.weight": (VOCAB, d),
              "gpt_neox.final_layer_norm.weight": (d,), "gpt_neox.final_layer_norm.bias": (d,)}
    block = {"input_layernorm.weight": (d,), "input_layernorm.bias": (d,),
             "post_attention_layernorm.weight": (d,), "post_attention_layernorm.bias": (d,),
             "attention.query_key_value.weight": (3 * d, d), "attention.dense.weight": (d, d),
             "mlp.dense_h_to_4h.weight": (i, d), "mlp.dense_h_to_4h.bias": (i,),
             "mlp.dense_4h_to_h.weight": (d, i), "mlp.dense_4h_to_h.bias": (d,)}
    if config.get("attention_bias", True):
      block.update({"attention.query_key_value.bias": (3 * d,), "attention.dense.bias": (d,)})
    shapes.update({f"gpt_neox.layers.{l}.{k}": s for l in range(layers) for k, s in block.items()})
  tensors = {}
  for name, shape in shapes.items():
    if len(shape) == 2:
      value = rng.normal(size=shape) / math.sqrt(min(shape))
    elif name.endswith("weight"):  # LayerNorm scale.
      value = 1.0 + 0.1 * rng.normal(size=shape)
    else:
      value = 0.1 * rng.normal(size=shape)
    tensors[name] = value.astype(np.float32)
  return tensors


def _write_tokenizer(path):
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=VOCAB, show_progress=False,
                                           special_tokens=["<|endoftext|>", "<unk>"])
  tokenizer.train_from_iterator(SENTENCES, trainer)
  tokenizer.save(str(path))


def write_checkpoint(folder, variant, *, seed=0, shards=None, config_overrides=None):
  """Writes config.json, the weights and tokenizer.json in the Hugging Face folder format.

  Args:
    shards: None writes model.safetensors; an int writes that many
      model-0000i-of-0000n.safetensors shards and model.safetensors.index.json.
    config_overrides: config.json entries replacing the variant's (e.g. n_positions).
  """
  base, overrides = VARIANTS[variant]
  config = {**base, **overrides, **(config_overrides or {})}
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config, indent=2))
  tensors = _hf_state_dict(config, seed)
  if shards is None:
    safetensors_numpy.save_file(tensors, str(folder / "model.safetensors"),
                                metadata={"format": "pt"})
  else:
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
      file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
      part = {n: tensors[n] for n in names[s::shards]}
      safetensors_numpy.save_file(part, str(folder / file), metadata={"format": "pt"})
      weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
  _write_tokenizer(folder / "tokenizer.json")
  return config, tensors


def _reference(config, tensors, ids):
  """Float64 NumPy forward straight from the Hugging Face names, one head at a time.

  Returns (stream entering each block + stream after the last, ln_f output, logits).
  """
  t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
  gpt2 = config["model_type"] == "gpt2"
  eps = config["layer_norm_epsilon"] if gpt2 else config["layer_norm_eps"]
  act_name = config["activation_function"] if gpt2 else config["hidden_act"]
  act = {"gelu": lambda x: 0.5 * x * (1 + special.erf(x / np.sqrt(2))),
         "gelu_new": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
         "relu": lambda x: np.maximum(x, 0)}[act_name]

  def ln(x, name):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * t[name + ".weight"] + t[name + ".bias"]

  def linear(x, name):  # torch Linear: [out, in].
    y = x @ t[name + ".weight"].T
    return y + t[name + ".bias"] if name + ".bias" in t else y

  def conv1d(x, name):  # GPT-2 Conv1D: [in, out].
    return x @ t[name + ".weight"] + t[name + ".bias"]

  n, length = ids.shape
  d = config["n_embd"] if gpt2 else config["hidden_size"]
  heads = config["n_head"] if gpt2 else config["num_attention_heads"]
  e = d // heads
  causal = np.tril(np.ones((length, length), bool))

  def attend(q, k, v, scale):  # [n, T, e] each.
    out = np.zeros_like(q)
    for row in range(n):
      s = np.where(causal, q[row] @ k[row].T * scale, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      out[row] = p / p.sum(-1, keepdims=True) @ v[row]
    return out

  if gpt2:
    h = t["transformer.wte.weight"][ids] + t["transformer.wpe.weight"][:length]
    scale = 1 / np.sqrt(e) if config["scale_attn_weights"] else 1.0
  else:
    h = t["gpt_neox.embed_in.weight"][ids]
    rope = config.get("rope_parameters", {})
    pct = rope.get("partial_rotary_factor", config.get("rotary_pct"))
    base = rope.get("rope_theta", config.get("rotary_emb_base"))
    r = int(e * pct)
    angles = np.arange(length)[:, None] * base ** (-np.arange(0, r, 2) / r)[None]  # [T, r/2]
  states = [h]
  for layer in range(LAYERS):
    if gpt2:
      b = f"transformer.h.{layer}."
      q, k, v = np.split(conv1d(ln(h, b + "ln_1"), b + "attn.c_attn"), 3, axis=-1)
      ctx = np.concatenate([attend(q[..., j * e:(j + 1) * e], k[..., j * e:(j + 1) * e],
                                   v[..., j * e:(j + 1) * e], scale) for j in range(heads)], -1)
      h = h + conv1d(ctx, b + "attn.c_proj")
      h = h + conv1d(act(conv1d(ln(h, b + "ln_2"), b + "mlp.c_fc")), b + "mlp.c_proj")
    else:
      b = f"gpt_neox.layers.{layer}."
      qkv = linear(ln(h, b + "input_layernorm"), b + "attention.query_key_value")
      ctx = []
      for j in range(heads):
        chunk = qkv[..., 3 * e * j:3 * e * (j + 1)]  # per head [q, k, v].
        q, k, v = chunk[..., :e].copy(), chunk[..., e:2 * e].copy(), chunk[..., 2 * e:]
        for x in (q, k):  # Rotate pairs (i, i + r/2) by position * frequency_i.
          lo, hi = x[..., :r // 2].copy(), x[..., r // 2:r].copy()
          x[..., :r // 2] = lo * np.cos(angles) - hi * np.sin(angles)
          x[..., r // 2:r] = hi * np.cos(angles) + lo * np.sin(angles)
        ctx.append(attend(q, k, v, 1 / np.sqrt(e)))
      attn = linear(np.concatenate(ctx, -1), b + "attention.dense")
      mlp = lambda x: linear(act(linear(x, b + "mlp.dense_h_to_4h")), b + "mlp.dense_4h_to_h")
      if config["use_parallel_residual"]:
        h = h + attn + mlp(ln(h, b + "post_attention_layernorm"))
      else:
        h = h + attn
        h = h + mlp(ln(h, b + "post_attention_layernorm"))
    states.append(h)
  final = ln(h, "transformer.ln_f" if gpt2 else "gpt_neox.final_layer_norm")
  if gpt2:
    unembed = t["transformer.wte.weight"] if config["tie_word_embeddings"] else t["lm_head.weight"]
  else:
    unembed = t["embed_out.weight"]
  return states, final, final @ unembed.T


def _ids(seed=0, n=2, length=T):
  return np.random.default_rng(seed).integers(0, VOCAB, size=(n, length)).astype(np.int32)


# Removed when the interpreter exits.
_CHECKPOINTS = tempfile.TemporaryDirectory(prefix="lm_test_")


@functools.lru_cache(maxsize=None)
def _checkpoint(variant):
  """(folder, hf config, tensors, cfg, float32 params), written once per variant."""
  folder = pathlib.Path(_CHECKPOINTS.name) / variant
  config, tensors = write_checkpoint(folder, variant)
  cfg, params = lm.load_model(folder)
  return folder, config, tensors, cfg, params


@functools.lru_cache(maxsize=None)
def _jitted(cfg, hooks=(), return_logits=True):
  return jax.jit(lambda p, i: lm.forward(p, cfg, i, hooks=hooks, return_logits=return_logits))


def _all_block_hooks(cfg):
  return tuple(name for name in lm.hook_names(cfg) if name.startswith("blocks."))


class ConfigTest(parameterized.TestCase):

  def test_gpt2_from_hf_dict(self):
    cfg = lm.config_from_hf_dict(GPT2_CONFIG)
    self.assertEqual(cfg, lm.GPT2Config(vocab_size=VOCAB, hidden_size=D, num_layers=LAYERS,
                                        num_heads=4, intermediate_size=4 * D,
                                        max_position=POSITIONS))
    self.assertFalse(cfg.parallel_residual)
    hash(cfg)

  @parameterized.named_parameters(
      ("inverse_layer_idx", "scale_attn_by_inverse_layer_idx"),
      ("reorder_and_upcast", "reorder_and_upcast_attn"),
      ("cross_attention", "add_cross_attention"))
  def test_gpt2_refuses_unsupported_flags(self, flag):
    with self.assertRaisesRegex(ValueError, f"{flag}=true.*does not implement"):
      lm.config_from_hf_dict({**GPT2_CONFIG, flag: True})

  def test_neox_rotary_settings_from_every_config_generation(self):
    legacy = lm.config_from_hf_dict(NEOX_LEGACY_CONFIG)
    self.assertEqual((legacy.rotary_pct, legacy.rotary_base, legacy.rotary_ndims), (0.25, 100, 4))
    self.assertTrue(legacy.parallel_residual and legacy.attention_bias)
    v5 = lm.config_from_hf_dict(NEOX_V5_CONFIG)
    self.assertEqual((v5.rotary_pct, v5.rotary_base, v5.rotary_ndims), (1.0, 500, 8))
    self.assertFalse(v5.parallel_residual)
    flat = {k: v for k, v in NEOX_LEGACY_CONFIG.items() if not k.startswith("rotary")}
    flat.update(rope_theta=1234.0, partial_rotary_factor=0.5, rope_scaling=None)
    self.assertEqual(lm.config_from_hf_dict(flat).rotary_base, 1234.0)
    self.assertEqual(lm.config_from_hf_dict(flat).rotary_ndims, 8)
    defaults = {k: v for k, v in flat.items() if k not in ("rope_theta", "partial_rotary_factor")}
    self.assertEqual((lm.config_from_hf_dict(defaults).rotary_pct,
                      lm.config_from_hf_dict(defaults).rotary_base), (0.25, 10000.0))

  @parameterized.named_parameters(
      ("legacy_scaling", {"rope_scaling": {"type": "linear", "factor": 2.0}},
       "rope_scaling.*linear"),
      ("v5_dynamic", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
       "rope_parameters.*dynamic"),
      ("odd_rotary", {"rotary_pct": 0.2}, "odd number of rotary dimensions"),
      ("missing_key", {"hidden_size": None}, None))
  def test_neox_refuses_bad_configs(self, change, pattern):
    config = {**NEOX_LEGACY_CONFIG, **change}
    if pattern is None:
      del config["hidden_size"]
      pattern = r"lacks the GPT-NeoX keys \['hidden_size'\]"
    with self.assertRaisesRegex(ValueError, pattern):
      lm.config_from_hf_dict(config)

  def test_unknown_model_type(self):
    with self.assertRaisesRegex(ValueError, r"model_type='llama'.*\['gpt2', 'gpt_neox'\]"):
      lm.config_from_hf_dict({**GPT2_CONFIG, "model_type": "llama"})

  @parameterized.named_parameters(
      ("heads", lm.GPT2Config, dict(num_heads=5), "num_heads must divide"),
      ("activation", lm.NeoXConfig, dict(hidden_act="swiglu"), "hidden_act must be one of"),
      ("layers", lm.NeoXConfig, dict(num_layers=0), "num_layers must be an integer >= 1"),
      ("rotary_pct", lm.NeoXConfig, dict(rotary_pct=0.0), r"rotary_pct must lie in \(0, 1\]"))
  def test_dataclass_validation(self, cls, kwargs, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      cls(**kwargs)

  def test_hook_names(self):
    gpt2 = lm.hook_names(_checkpoint("gpt2")[3])
    self.assertLen(gpt2, 5 * LAYERS + 1)
    self.assertIn("blocks.1.hook_resid_mid", gpt2)
    self.assertEqual(gpt2[-1], "ln_final.hook_normalized")
    neox = lm.hook_names(_checkpoint("neox_parallel")[3])
    self.assertLen(neox, 4 * LAYERS + 1)
    self.assertNotIn("blocks.0.hook_resid_mid", neox)


class LoadTest(parameterized.TestCase):

  @parameterized.parameters(*VARIANTS)
  def test_layout_and_dtype(self, variant):
    _, config, tensors, cfg, params = _checkpoint(variant)
    h, e = cfg.num_heads, cfg.head_dim
    layers = params["layers"]
    chex.assert_shape(layers["qkv"]["kernel"], (LAYERS, D, 3, h, e))
    chex.assert_shape(layers["attn_out"]["kernel"], (LAYERS, h, e, D))
    chex.assert_shape(layers["mlp_in"]["kernel"], (LAYERS, D, cfg.intermediate_size))
    chex.assert_trees_all_equal_dtypes(params, jax.tree.map(lambda x: jnp.zeros((), jnp.float32),
                                                            params))
    self.assertEqual("unembed" in params, not cfg.tie_word_embeddings)
    self.assertEqual("position" in params["embed"], config["model_type"] == "gpt2")
    if config["model_type"] == "gpt2":
      # Conv1D is [in, out]: c_fc needs no transpose; c_attn splits q, k, v along out.
      np.testing.assert_array_equal(layers["mlp_in"]["kernel"][1],
                                    tensors["transformer.h.1.mlp.c_fc.weight"])
      np.testing.assert_array_equal(layers["qkv"]["kernel"][0, :, 1, 2],
                                    tensors["transformer.h.0.attn.c_attn.weight"][:, D + 2 * e:
                                                                                 D + 3 * e])
    else:
      # Linear is [out, in]; the fused output is per head [q, k, v].
      w = tensors["gpt_neox.layers.1.attention.query_key_value.weight"]
      np.testing.assert_array_equal(layers["qkv"]["kernel"][1, :, 2, 1],
                                    w[3 * e + 2 * e:3 * e + 3 * e].T)
      self.assertEqual("bias" in layers["qkv"], cfg.attention_bias)

  def test_sharded_index_loads_identically(self):
    with tempfile.TemporaryDirectory() as tmp:
      write_checkpoint(tmp, "neox_parallel", shards=3)
      self.assertFalse((pathlib.Path(tmp) / "model.safetensors").exists())
      self.assertLen(list(pathlib.Path(tmp).glob("model-0000?-of-00003.safetensors")), 3)
      cfg, params = lm.load_model(tmp)
    _, _, _, ref_cfg, ref_params = _checkpoint("neox_parallel")
    self.assertEqual(cfg, ref_cfg)
    chex.assert_trees_all_equal(params, ref_params)

  def test_unprefixed_names_load_identically(self):
    _, config, tensors, cfg, params = _checkpoint("gpt2")
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    chex.assert_trees_all_equal(
        jax.tree.map(jnp.asarray, lm.models.convert_hf_weights(bare, cfg, jnp.float32)), params)

  def test_bfloat16_cast_at_load(self):
    folder = _checkpoint("gpt2")[0]
    _, params = lm.load_model(folder, dtype=jnp.bfloat16)
    self.assertEqual({x.dtype for x in jax.tree.leaves(params)}, {jnp.dtype(jnp.bfloat16)})
    with self.assertRaisesRegex(ValueError, "dtype must be a floating dtype.*int32"):
      lm.load_model(folder, dtype=jnp.int32)

  def test_missing_and_misshaped_tensors_are_named(self):
    _, config, tensors, cfg, _ = _checkpoint("neox_parallel")
    broken = {k: v for k, v in tensors.items() if k != "gpt_neox.layers.1.mlp.dense_4h_to_h.bias"}
    with self.assertRaisesRegex(ValueError,
                                r"lacks tensor 'gpt_neox\.layers\.1\.mlp\.dense_4h_to_h\.bias'"):
      lm.models.convert_hf_weights(broken, cfg, jnp.float32)
    broken = {k: v for k, v in tensors.items() if k != "embed_out.weight"}
    with self.assertRaisesRegex(ValueError, r"lacks tensor 'embed_out\.weight'"):
      lm.models.convert_hf_weights(broken, cfg, jnp.float32)
    broken = dict(tensors, **{"gpt_neox.layers.0.attention.dense.weight": np.zeros((D, 5))})
    with self.assertRaisesRegex(ValueError, r"attention\.dense\.weight' has shape \(32, 5\).*"
                                r"\(32, 32\)"):
      lm.models.convert_hf_weights(broken, cfg, jnp.float32)

  def test_missing_tensor_in_folder(self):
    with tempfile.TemporaryDirectory() as tmp:
      config, tensors = write_checkpoint(tmp, "gpt2")
      del tensors["transformer.h.0.ln_2.bias"]
      safetensors_numpy.save_file(tensors, f"{tmp}/model.safetensors")
      with self.assertRaisesRegex(ValueError, r"lacks tensor 'transformer\.h\.0\.ln_2\.bias'"):
        lm.load_model(tmp)

  def test_folder_errors(self):
    with tempfile.TemporaryDirectory() as tmp:
      with self.assertRaisesRegex(FileNotFoundError, "has no config.json"):
        lm.load_model(tmp)
      (pathlib.Path(tmp) / "config.json").write_text(json.dumps(GPT2_CONFIG))
      with self.assertRaisesRegex(FileNotFoundError,
                                  "neither model.safetensors nor model.safetensors.index.json"):
        lm.load_model(tmp)
      shard = "model-00001-of-00002.safetensors"
      (pathlib.Path(tmp) / "model.safetensors.index.json").write_text(
          json.dumps({"weight_map": {"transformer.wte.weight": shard}}))
      with self.assertRaisesRegex(FileNotFoundError, "lists the shard model-00001-of-00002"):
        lm.load_model(tmp)
      (pathlib.Path(tmp) / "config.json").write_text(json.dumps({"model_type": "bert"}))
      with self.assertRaisesRegex(ValueError, "model_type='bert'"):
        lm.load_model(tmp)
    with self.assertRaisesRegex(FileNotFoundError, "is not a folder"):
      lm.load_model("/nonexistent/model")

  def test_tokenizer_round_trip_feeds_the_model(self):
    folder, _, _, cfg, params = _checkpoint("gpt2")
    tokenizer = lm.load_tokenizer(folder)
    self.assertIsNone(tokenizer.padding)
    self.assertIsNone(tokenizer.truncation)
    ids = tokenizer.encode("the cat sat in the park").ids
    self.assertEqual(tokenizer.decode(ids).replace(" ", ""), "thecatsatinthepark")
    self.assertLess(max(ids), cfg.vocab_size)
    logits = _jitted(cfg)(params, np.asarray([ids], np.int32)).logits
    chex.assert_shape(logits, (1, len(ids), VOCAB))
    chex.assert_tree_all_finite(logits)


class ForwardTest(parameterized.TestCase):

  @parameterized.parameters(*VARIANTS)
  def test_matches_float64_reference(self, variant):
    _, config, tensors, cfg, params = _checkpoint(variant)
    ids = _ids()
    hooks = tuple(f"blocks.{l}.hook_resid_pre" for l in range(LAYERS)) + (
        f"blocks.{LAYERS - 1}.hook_resid_post", "ln_final.hook_normalized")
    out = _jitted(cfg, hooks)(params, ids)
    states, final, logits = _reference(config, tensors, ids)
    chex.assert_shape(out.logits, (2, T, VOCAB))
    self.assertEqual(out.logits.dtype, jnp.float32)
    for name, expected in zip(hooks, states + [final]):
      chex.assert_shape(out.activations[name], (2, T, D))
      np.testing.assert_allclose(out.activations[name], expected, atol=2e-5, err_msg=name)
    np.testing.assert_allclose(out.logits, logits, atol=2e-5)

  @parameterized.parameters("gpt2", "neox_parallel", "neox_sequential_nobias")
  def test_hooks_are_consistent(self, variant):
    _, _, _, cfg, params = _checkpoint(variant)
    hooks = lm.hook_names(cfg)
    out = _jitted(cfg, hooks)(params, _ids())
    acts = out.activations
    self.assertEqual(set(acts), set(hooks))
    for l in range(LAYERS):
      pre, post = acts[f"blocks.{l}.hook_resid_pre"], acts[f"blocks.{l}.hook_resid_post"]
      attn, mlp = acts[f"blocks.{l}.hook_attn_out"], acts[f"blocks.{l}.hook_mlp_out"]
      np.testing.assert_allclose(post, pre + attn + mlp, atol=1e-5)
      if not cfg.parallel_residual:
        np.testing.assert_allclose(acts[f"blocks.{l}.hook_resid_mid"], pre + attn, atol=1e-6)
      if l + 1 < LAYERS:
        np.testing.assert_array_equal(post, acts[f"blocks.{l + 1}.hook_resid_pre"])
    last = acts[f"blocks.{LAYERS - 1}.hook_resid_post"]
    final = layer_norm(last, **params["ln_final"], eps=cfg.layer_norm_eps)
    np.testing.assert_allclose(final, acts["ln_final.hook_normalized"], atol=1e-6)
    np.testing.assert_allclose(core.unembed(params, final), out.logits, atol=1e-5)
    # Reading hooks does not change the result.
    np.testing.assert_allclose(_jitted(cfg)(params, _ids()).logits, out.logits, atol=1e-5)

  @parameterized.parameters("gpt2", "neox_parallel")
  def test_identity_replacement_leaves_logits_unchanged(self, variant):
    _, _, _, cfg, params = _checkpoint(variant)
    ids = _ids()
    clean = _jitted(cfg)(params, ids).logits
    replace = {name: (lambda x: x) for name in ("blocks.0.hook_resid_pre", "blocks.0.hook_attn_out",
                                                "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post",
                                                "ln_final.hook_normalized")}
    pairs = tuple(replace.items())  # Hashable form, for a static jit argument.
    run = jax.jit(lambda p, i, replace: lm.forward(p, cfg, i, replace=replace).logits,
                  static_argnames="replace")
    np.testing.assert_allclose(run(params, ids, replace=pairs), clean, atol=1e-5)

  @parameterized.parameters("gpt2", "neox_parallel", "neox_sequential_nobias")
  def test_zeroing_replacement_changes_only_downstream(self, variant):
    _, _, _, cfg, params = _checkpoint(variant)
    ids = _ids()
    hooks = ("blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out",
             "blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    clean = _jitted(cfg, hooks)(params, ids)

    @jax.jit
    def spliced(p, i):
      return lm.forward(p, cfg, i, hooks=hooks, replace={"blocks.0.hook_mlp_out": jnp.zeros_like})

    out = spliced(params, ids)
    for name in hooks[:2]:  # Upstream: untouched.
      np.testing.assert_allclose(out.activations[name], clean.activations[name], atol=1e-6)
    np.testing.assert_array_equal(out.activations["blocks.0.hook_mlp_out"], 0.0)
    np.testing.assert_allclose(out.activations["blocks.0.hook_resid_post"],
                               clean.activations["blocks.0.hook_resid_pre"]
                               + clean.activations["blocks.0.hook_attn_out"], atol=1e-5)
    for name in hooks[3:]:
      self.assertGreater(float(jnp.abs(out.activations[name] - clean.activations[name]).max()),
                         1e-2, msg=name)
    self.assertGreater(float(jnp.abs(out.logits - clean.logits).max()), 1e-2)

  def test_replacement_with_traced_parameters_and_gradient(self):
    _, _, _, cfg, params = _checkpoint("neox_sequential_nobias")
    ids = _ids()

    @jax.jit
    def loss(shift, p, i):
      out = lm.forward(p, cfg, i, replace={"blocks.0.hook_resid_post": lambda h: h + shift})
      return jax.nn.log_softmax(out.logits)[..., 0].mean()

    # A non-constant shift (a constant one is removed by every LayerNorm that reads the
    # stream) must reach the logits through the remaining block.
    grad = jax.grad(loss)(jnp.linspace(-1.0, 1.0, D), params, ids)
    chex.assert_shape(grad, (D,))
    self.assertGreater(float(jnp.abs(grad).max()), 1e-3)

  def test_causality(self):
    _, _, _, cfg, params = _checkpoint("neox_parallel")
    ids = _ids()
    changed = ids.copy()
    changed[:, 7:] = (changed[:, 7:] + 1) % VOCAB
    a, b = _jitted(cfg)(params, ids).logits, _jitted(cfg)(params, changed).logits
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-5)
    self.assertGreater(float(jnp.abs(a[:, 7:] - b[:, 7:]).max()), 1e-3)

  def test_stops_after_the_last_needed_block(self):
    _, _, _, cfg, params = _checkpoint("neox_parallel")
    ids = _ids()
    full = _jitted(cfg, ("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"))(params, ids)
    # NaN weights in block 1 cannot leak into activations read before it.
    poisoned = dict(params, layers=jax.tree.map(lambda x: x.at[1].set(jnp.nan), params["layers"]))
    for hooks in (("blocks.0.hook_resid_post",), ("blocks.1.hook_resid_pre",)):
      out = _jitted(cfg, hooks, return_logits=False)(poisoned, ids)
      self.assertIsNone(out.logits)
      np.testing.assert_allclose(out.activations[hooks[0]], full.activations[hooks[0]], atol=1e-6)
    # A replacement at the stop point is applied even though no block runs after it.
    out = jax.jit(lambda p, i: lm.forward(p, cfg, i, hooks=("blocks.1.hook_resid_pre",),
                                          replace={"blocks.1.hook_resid_pre": lambda h: h * 2},
                                          return_logits=False))(poisoned, ids)
    np.testing.assert_allclose(out.activations["blocks.1.hook_resid_pre"],
                               2 * full.activations["blocks.1.hook_resid_pre"], atol=1e-5)

  def test_one_trace_for_new_values(self):
    _, _, _, cfg, params = _checkpoint("gpt2")

    @functools.partial(jax.jit, static_argnames=("cfg", "hooks"))
    @chex.assert_max_traces(n=1)
    def run(p, i, cfg, hooks):
      return lm.forward(p, cfg, i, hooks=hooks, return_logits=False).activations

    chex.clear_trace_counter()
    for seed in range(3):
      acts = run(jax.tree.map(lambda x: x * (1 + seed), params), _ids(seed), cfg=cfg,
                 hooks=("blocks.1.hook_mlp_out",))
      chex.assert_shape(acts["blocks.1.hook_mlp_out"], (2, T, D))

  def test_traced_program_does_not_grow_with_depth(self):
    _, _, _, cfg, params = _checkpoint("neox_parallel")
    ids = jax.ShapeDtypeStruct((2, T), jnp.int32)

    def num_equations(num_layers, **kwargs):
      deep = dataclasses.replace(cfg, num_layers=num_layers)
      shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
      shapes["layers"] = jax.tree.map(
          lambda x: jax.ShapeDtypeStruct((num_layers, *x.shape[1:]), x.dtype), params["layers"])
      return len(jax.make_jaxpr(lambda p, i: lm.forward(p, deep, i, **kwargs))(shapes, ids).eqns)

    for kwargs in ({}, dict(hooks=("blocks.1.hook_resid_post",)),
                   dict(hooks=("blocks.2.hook_mlp_out",), replace={"blocks.1.hook_attn_out": abs},
                        return_logits=False)):
      with self.subTest(**{k: str(v) for k, v in kwargs.items()}):
        self.assertEqual(num_equations(4, **kwargs), num_equations(24, **kwargs))

  @parameterized.parameters("gpt2_untied_relu", "neox_parallel", "neox_sequential_nobias")
  def test_bfloat16_close_to_float32(self, variant):
    folder, _, _, cfg, params = _checkpoint(variant)
    _, params16 = lm.load_model(folder, dtype=jnp.bfloat16)
    hooks = ("blocks.1.hook_resid_pre", "ln_final.hook_normalized")
    ids = _ids()
    out32 = _jitted(cfg, hooks)(params, ids)
    out16 = _jitted(cfg, hooks)(params16, ids)
    self.assertEqual(out16.logits.dtype, jnp.float32)
    for name in hooks:
      self.assertEqual(out16.activations[name].dtype, jnp.bfloat16)
    # bfloat16 keeps 8 significant bits (rounding 2**-9 relative per operation). Over two
    # blocks the O(1) activations and logits stay within 3% relative (Frobenius) error of
    # float32 (about 1% measured) and within 0.25 at any element (about 0.12 measured).
    for a, b in [(out16.logits, out32.logits)] + [
        (out16.activations[n], out32.activations[n]) for n in hooks]:
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      self.assertLess(np.linalg.norm(a - b) / np.linalg.norm(b), 0.03)
      np.testing.assert_allclose(a, b, atol=0.25)
    self.assertGreater(float(jnp.abs(out16.logits - out32.logits).max()), 0.0)

  def test_forward_errors(self):
    _, _, _, cfg, params = _checkpoint("neox_parallel")
    ids = _ids()
    valid = r"Valid hook names: blocks\.\{l\}\.hook_resid_pre.*ln_final\.hook_normalized"
    cases = [
        (dict(hooks=("blocks.0.resid_pre",)), "Unknown hook name 'blocks.0.resid_pre'.*" + valid),
        (dict(hooks=("blocks.0.hook_resid_middle",)), "Unknown hook name"),
        (dict(hooks=("blocks.01.hook_resid_pre",)), "Unknown hook name"),
        (dict(hooks=("blocks.2.hook_resid_post",)), r"names block 2.*has 2 blocks.*" + valid),
        (dict(hooks=("blocks.0.hook_resid_mid",)), "use_parallel_residual=True.*no mid-block"),
        (dict(hooks="blocks.0.hook_resid_pre"), "hooks must be a sequence of hook names"),
        (dict(replace={"embed": lambda x: x}), "Unknown hook name 'embed'"),
        (dict(replace={"blocks.0.hook_attn_out": 3}), "must be a callable"),
        (dict(replace={"blocks.0.hook_attn_out": lambda x: x[:, :2]}),
         r"must return the activation's shape \(2, 12, 32\).*\(2, 2, 32\)"),
        (dict(return_logits=False), "Nothing to compute"),
        (dict(hooks=("blocks.0.hook_resid_post",), return_logits=False,
              replace={"blocks.1.hook_attn_out": lambda x: x}), "would have no effect"),
        (dict(input_ids=np.zeros((1, POSITIONS + 1), np.int32)),
         r"length t must lie in \[1, 16\].*got t=17"),
        (dict(input_ids=ids[0]), r"2-D integer array \[n, t\]; got shape \(12,\)"),
        (dict(input_ids=ids.astype(np.float32)), "2-D integer array.*float32"),
        (dict(cfg="pythia"), "cfg must be one of"),
    ]
    for overrides, pattern in cases:
      kwargs = dict(params=params, cfg=cfg, input_ids=ids) | overrides
      with self.subTest(pattern=pattern), self.assertRaisesRegex(ValueError, pattern):
        jax.eval_shape(functools.partial(lm.forward, **kwargs))
    gpt2_cfg, gpt2_params = _checkpoint("gpt2")[3:]
    with self.assertRaisesRegex(ValueError, "cfg must be a NeoXConfig; got GPT2Config"):
      lm.neox.neox_forward(gpt2_params, gpt2_cfg, ids)


class ShardingTest(parameterized.TestCase):

  @parameterized.parameters(*VARIANTS)
  def test_specs_match_leaf_ranks(self, variant):
    _, _, _, cfg, params = _checkpoint(variant)
    specs = lm.param_partition_specs(params, cfg)
    is_spec = lambda s: isinstance(s, jax.sharding.PartitionSpec)
    chex.assert_trees_all_equal_structs(jax.tree.map(lambda x: 0, params),
                                        jax.tree.map(lambda x: 0, specs, is_leaf=is_spec))
    flat = jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec)
    leaves = jax.tree.leaves(params)
    sharded = {}
    for (path, spec), leaf in zip(flat, leaves):
      self.assertLen(spec, leaf.ndim, msg=jax.tree_util.keystr(path))
      if "model" in spec:
        sharded[jax.tree_util.keystr(path)] = spec.index("model")
    expected = {"['layers']['qkv']['kernel']": 3, "['layers']['attn_out']['kernel']": 1,
                "['layers']['mlp_in']['kernel']": 2, "['layers']['mlp_in']['bias']": 1,
                "['layers']['mlp_out']['kernel']": 1}
    if "bias" in params["layers"]["qkv"]:
      expected["['layers']['qkv']['bias']"] = 2
    self.assertEqual(sharded, expected)
    with self.assertRaisesRegex(ValueError, "axis_size=3 must divide cfg.num_heads"):
      lm.param_partition_specs(params, cfg, axis_size=3)

  def test_tensor_parallel_forward_matches(self):
    _, _, _, cfg, params = _checkpoint("gpt2")
    if jax.device_count() < 4:
      self.skipTest("needs 4 devices (tests/conftest.py simulates 8 CPU devices)")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("model",),
                             axis_types=(jax.sharding.AxisType.Auto,))
    specs = lm.param_partition_specs(params, cfg, axis_size=4)
    sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
    logits = _jitted(cfg)(sharded, _ids()).logits
    np.testing.assert_allclose(logits, _jitted(cfg)(params, _ids()).logits, atol=1e-5)

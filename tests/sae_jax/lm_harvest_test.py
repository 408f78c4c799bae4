"""Tests for sae_jax.data.lm_harvest: rows equal the model's hook activations in order (text and
token-id sources, skip_first), tokenization in pieces equals whole-file tokenization, resume
to identical bytes, refusal of stores written with other settings, argument errors."""

import functools
import os
import pathlib
import shutil
import tempfile
from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest
from absl.testing import parameterized

import runkit
from sae_jax import lm
from sae_jax.data import harvest
from sae_jax.data import lm_harvest
from sae_jax.data import store
from tests.sae_jax import lm_test

tokenizers = pytest.importorskip("tokenizers")

HOOK = "blocks.0.hook_resid_post"
TEXTS = ("the cat sat on the mat\nthe dog ran in the park\n" * 4,
         "",  # an empty document adds no separator
         "birds sing in the morning\nwe read a book on the mat " * 3)

# Removed when the interpreter exits.
_ROOT = tempfile.TemporaryDirectory(prefix="lm_harvest_test_")


@functools.lru_cache(maxsize=None)
def _model(name="gpt2"):
  """(folder, cfg, params) of a tiny random GPT-2 written once."""
  folder = pathlib.Path(_ROOT.name) / name
  lm_test.write_checkpoint(folder, "gpt2")
  cfg, params = lm.load_model(folder)
  return folder, cfg, params


def _hook_acts(ids, dtype=jnp.float32, hook=HOOK):
  folder, cfg, params = _model()
  if dtype != jnp.float32:
    _, params = lm.load_model(folder, dtype=dtype)
  out = lm.forward(params, cfg, jnp.asarray(ids), hooks=(hook,), return_logits=False)
  return np.asarray(out.activations[hook], np.float32)


def _files(path):
  return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


class Interrupt(Exception):
  pass


class HarvestLMTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.root = pathlib.Path(tempfile.mkdtemp())
    self.addCleanup(shutil.rmtree, self.root)
    self.texts = []
    for i, text in enumerate(TEXTS):
      path = self.root / f"doc{i}.txt"
      path.write_text(text)
      self.texts.append(path)

  def _expected_text_windows(self, context):
    tokenizer = lm.load_tokenizer(_model()[0])
    eos = tokenizer.token_to_id("<|endoftext|>")
    stream = []
    for text in TEXTS:
      ids = tokenizer.encode(text, add_special_tokens=False).ids
      if ids:
        stream += ([eos] if stream else []) + ids
    n = len(stream) // context
    return np.asarray(stream[:n * context], np.int32).reshape(n, context)

  @parameterized.parameters((0, 3), (2, 4))
  def test_text_rows_are_the_hook_activations_in_order(self, skip_first, batch_size):
    windows = self._expected_text_windows(8)
    self.assertGreater(len(windows), batch_size)  # several batches, the last one padded
    self.assertEqual(lm_harvest.eos_id(lm.load_tokenizer(_model()[0])), 0)
    reader = lm_harvest.harvest_lm(_model()[0], HOOK, self.root / "store", text=self.texts,
                                   context=8, skip_first=skip_first, batch_size=batch_size,
                                   shard_rows=16, progress=False)
    expected = _hook_acts(windows)[:, skip_first:].reshape(-1, 32)  # sequence-major
    self.assertEqual(reader.count, len(windows) * (8 - skip_first))
    np.testing.assert_allclose(reader.read(0, reader.count), expected, atol=1e-5)
    self.assertEqual((reader.manifest["model"], reader.manifest["layer"],
                      reader.manifest["hook"]), ("gpt2", 0, HOOK))
    meta = reader.meta
    self.assertEqual({k: meta[k] for k in ("model_dir", "hook", "context", "skip_first",
                                           "model_dtype")},
                     {"model_dir": "gpt2", "hook": HOOK, "context": 8,
                      "skip_first": skip_first, "model_dtype": "float32"})
    self.assertEqual(meta["source"], {"kind": "text", "files": [str(p.resolve())
                                                                for p in self.texts],
                                      "bytes": [len(t) for t in TEXTS], "separator_id": 0})

  def test_token_id_rows_and_skip_first(self):
    ids = np.random.default_rng(0).integers(0, 64, size=(7, 6)).astype(np.int64)
    np.save(self.root / "ids.npy", ids)
    reader = lm_harvest.harvest_lm(_model()[0], HOOK, self.root / "store",
                                   token_ids=self.root / "ids.npy", skip_first=1,
                                   batch_size=3, progress=False)
    np.testing.assert_allclose(reader.read(0, reader.count),
                               _hook_acts(ids)[:, 1:].reshape(-1, 32), atol=1e-5)
    self.assertEqual(reader.meta["context"], 6)
    self.assertEqual(reader.meta["source"]["shape"], [7, 6])
    # max_tokens stops exactly, in the same order.
    reader = lm_harvest.harvest_lm(_model()[0], HOOK, self.root / "short",
                                   token_ids=self.root / "ids.npy", max_tokens=12,
                                   batch_size=3, progress=False)
    np.testing.assert_allclose(reader.read(0, 12), _hook_acts(ids)[:, 1:].reshape(-1, 32)[:12],
                               atol=1e-5)

  @parameterized.parameters(({"data": 4}, 4), ({"data": 2, "model": 2}, 6))
  def test_rows_on_a_mesh_equal_one_device(self, axes, batch_size):
    ids = np.random.default_rng(1).integers(0, 64, size=(12, 6)).astype(np.int64)
    np.save(self.root / "ids.npy", ids)
    mesh = runkit.make_mesh(axes)
    reader = lm_harvest.harvest_lm(_model()[0], HOOK, self.root / "mesh_store",
                                   token_ids=self.root / "ids.npy", batch_size=batch_size,
                                   progress=False, mesh=mesh)
    np.testing.assert_allclose(reader.read(0, reader.count),
                               _hook_acts(ids)[:, 1:].reshape(-1, 32), atol=1e-5)
    with self.assertRaisesRegex(ValueError, "must be divisible by the mesh's 'data' axis"):
      lm_harvest.harvest_lm(_model()[0], HOOK, self.root / "other", token_ids=self.root /
                            "ids.npy", batch_size=3, progress=False,
                            mesh=runkit.make_mesh({"data": 2}))

  def test_bfloat16_model_and_float16_store(self):
    ids = np.random.default_rng(1).integers(0, 64, size=(2, 5))
    np.save(self.root / "ids.npy", ids)
    reader = lm_harvest.harvest_lm(_model()[0], HOOK, self.root / "store",
                                   token_ids=self.root / "ids.npy", model_dtype="bfloat16",
                                   store_dtype="float16", skip_first=0, progress=False)
    self.assertEqual((reader.dtype, reader.meta["model_dtype"]), ("float16", "bfloat16"))
    expected = _hook_acts(ids, jnp.bfloat16).reshape(-1, 32)
    # bfloat16 keeps 8 significant bits; another batch shape may round differently.
    np.testing.assert_allclose(reader.read(0, reader.count), expected, rtol=2e-2, atol=2e-2)

  @parameterized.parameters(0, 1, 3)
  def test_interrupted_harvest_resumes_to_identical_bytes(self, fail_after):
    kwargs = dict(text=self.texts, context=8, skip_first=1, batch_size=2, shard_rows=9,
                  progress=False)
    whole, resumed = self.root / "whole", self.root / "resumed"
    real = lm_harvest.activation_fn
    calls = []

    def counting(*args, **kw):
      fn = real(*args, **kw)
      return lambda ids, mask: calls.append(1) or fn(ids, mask)

    with mock.patch.object(lm_harvest, "activation_fn", counting):
      lm_harvest.harvest_lm(_model()[0], HOOK, whole, **kwargs)
    whole_calls, calls[:] = len(calls), []

    def failing(*args, **kw):
      fn, calls = real(*args, **kw), []

      def run(ids, mask):
        if len(calls) == fail_after:
          raise Interrupt()
        calls.append(1)
        return fn(ids, mask)
      return run

    with mock.patch.object(lm_harvest, "activation_fn", failing):
      with self.assertRaises(Interrupt):
        lm_harvest.harvest_lm(_model()[0], HOOK, resumed, **kwargs)
    done = (store.StoreReader(resumed).meta.get("windows_consumed", 0) // 2
            if (resumed / "manifest.json").exists() else 0)
    with mock.patch.object(lm_harvest, "activation_fn", counting):
      lm_harvest.harvest_lm(_model()[0], HOOK, resumed, **kwargs)
    self.assertEqual(_files(resumed), _files(whole))
    self.assertLen(calls, whole_calls - done)  # stored batches are not recomputed
    if fail_after == 3:
      self.assertGreater(done, 0)
    # A finished store is left as it is.
    lm_harvest.harvest_lm(_model()[0], HOOK, resumed, **kwargs)
    self.assertEqual(_files(resumed), _files(whole))

  def test_refuses_a_store_written_with_other_settings(self):
    np.save(self.root / "ids.npy", np.zeros((2, 8), np.int32))
    kwargs = dict(text=self.texts, context=8, skip_first=1, progress=False)
    path = self.root / "store"
    lm_harvest.harvest_lm(_model()[0], HOOK, path, **kwargs)
    before = _files(path)
    other_model = pathlib.Path(_ROOT.name) / "copy"
    if not other_model.exists():
      shutil.copytree(_model()[0], other_model)
    cases = [
        (dict(context=6), "harvested with context=8, but this run has context=6"),
        (dict(skip_first=0), "skip_first=1, but this run has skip_first=0"),
        (dict(hook="blocks.1.hook_resid_pre"), "hook='blocks.0.hook_resid_post'"),
        (dict(model_dtype="bfloat16"), "model_dtype='float32'"),
        (dict(text=self.texts[:1]), "harvested with source="),
        (dict(text=None, token_ids=self.root / "ids.npy"), "harvested with source="),
        (dict(model_dir=other_model), "model_dir='gpt2', but this run has model_dir='copy'"),
    ]
    for overrides, pattern in cases:
      args = {"model_dir": _model()[0], "hook": HOOK, **kwargs, **overrides}
      with self.subTest(pattern=pattern), self.assertRaisesRegex(ValueError, pattern):
        lm_harvest.harvest_lm(args.pop("model_dir"), args.pop("hook"), path, **args)
    self.assertEqual(_files(path), before)
    # A store another harvest wrote.
    harvest.harvest(lambda i, m: np.ones(i.shape + (32,)), [(np.ones((1, 4)), np.ones((1, 4)))],
                    self.root / "minilm", model_name="gpt2", layer=0, hook=HOOK,
                    progress=False)
    with self.assertRaisesRegex(ValueError, "not written by the language-model harvest"):
      lm_harvest.harvest_lm(_model()[0], HOOK, self.root / "minilm", **kwargs)

  def test_bad_arguments_raise(self):
    folder = _model()[0]
    np.save(self.root / "ids.npy", np.zeros((2, 8), np.int32))
    np.save(self.root / "flat.npy", np.zeros(8, np.int32))
    np.save(self.root / "floats.npy", np.zeros((2, 8), np.float32))
    np.save(self.root / "big.npy", np.full((2, 8), 64, np.int32))
    store_path = self.root / "store"
    ids = dict(token_ids=self.root / "ids.npy")
    cases = [
        (dict(), ValueError, "exactly one source"),
        (dict(text=self.texts, **ids), ValueError, "exactly one source"),
        (dict(context=5, **ids), ValueError, r"context=5 must equal the second dimension.*\(8\)"),
        (dict(text=self.texts, context=17), ValueError, r"context must be an int in \[1, 16\]"),
        (dict(skip_first=8, **ids), ValueError, "skip_first=8 must be < context=8"),
        (dict(skip_first=-1, **ids), ValueError, "skip_first must be an int >= 0"),
        (dict(batch_size=0, **ids), ValueError, "batch_size must be an int >= 1"),
        (dict(max_tokens=0, **ids), ValueError, "max_tokens must be an int >= 1 or None"),
        (dict(model_dtype="float64", **ids), ValueError, "model_dtype must be one of"),
        (dict(store_dtype="int8", **ids), ValueError, "store_dtype must be one of"),
        (dict(hook="blocks.2.hook_resid_post", **ids), ValueError, "has 2 blocks"),
        (dict(token_ids=self.root / "flat.npy"), ValueError, "2-D integer array"),
        (dict(token_ids=self.root / "floats.npy"), ValueError, "2-D integer array"),
        (dict(token_ids=self.root / "big.npy"), ValueError, r"token id 64.*vocab_size=64"),
        (dict(token_ids=self.root / "missing.npy"), FileNotFoundError, "does not exist"),
        (dict(text=[self.root / "missing.txt"]), FileNotFoundError, "does not exist"),
        (dict(model_dir=self.root / "nomodel", **ids), FileNotFoundError, "is not a folder"),
    ]
    for overrides, error, pattern in cases:
      args = {"model_dir": folder, "hook": HOOK, **overrides}
      with self.subTest(pattern=pattern), self.assertRaisesRegex(error, pattern):
        lm_harvest.harvest_lm(args.pop("model_dir"), args.pop("hook"), store_path,
                              progress=False, **args)
    self.assertFalse(store_path.exists())


@functools.lru_cache(maxsize=None)
def _byte_level_tokenizer():
  """A GPT-2-style byte-level BPE (the regex pre-tokenizer GPT-2 and GPT-NeoX use)."""
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=400, show_progress=False, special_tokens=["<|endoftext|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(lm_test.SENTENCES + ["  indented\n\n\tx = 1\r\n"], trainer)
  return tokenizer


class TokensTest(parameterized.TestCase):

  @parameterized.parameters(1, 2, 3, 7, 64)
  def test_pieces_tokenize_as_the_whole_file(self, read_chars):
    text = ("the cat sat.\nThe dog ran!\n\n  indented line\nx=1\n \nend\n"
            "a\nb\n\t tab\nwe  read\r\nbooks\n" * 3 + "last line without newline")
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(tmp) / "doc.txt"
      path.write_bytes(text.encode())
      pieces = list(lm_harvest.read_pieces(path, read_chars))
      self.assertEqual("".join(pieces), text)
      if read_chars < 64:
        self.assertGreater(len(pieces), 5)
      for piece in pieces[:-1]:  # each cut lies at a newline between two non-spaces
        self.assertEqual(piece[-1], "\n")
        self.assertFalse(piece[-2].isspace())
      tokenizer = _byte_level_tokenizer()
      whole = tokenizer.encode(text, add_special_tokens=False).ids
      ids = np.concatenate(list(lm_harvest.text_tokens(tokenizer, [path], separator=None,
                                                       read_chars=read_chars)))
      np.testing.assert_array_equal(ids, whole)

  def test_random_texts_in_pieces_tokenize_as_the_whole(self):
    rng = np.random.default_rng(0)
    alphabet = list("ab.' \n\n\n\t\r") + ["\u00e9", "\u0301", "12"]
    tokenizer = _byte_level_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
      path = pathlib.Path(tmp) / "doc.txt"
      for _ in range(20):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 200))))
        path.write_bytes(text.encode())
        read_chars = int(rng.integers(1, 9))
        pieces = list(lm_harvest.read_pieces(path, read_chars))
        self.assertEqual("".join(pieces), text)
        self.assertNotIn("", pieces)
        ids = np.concatenate(list(lm_harvest.text_tokens(tokenizer, [path], separator=None,
                                                         read_chars=read_chars)))
        np.testing.assert_array_equal(ids, tokenizer.encode(text).ids, err_msg=repr(text))

  def test_separator_between_non_empty_documents_only(self):
    tokenizer = _byte_level_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
      paths = []
      for i, text in enumerate(["the cat", "", "a dog"]):
        paths.append(pathlib.Path(tmp) / f"{i}.txt")
        paths[-1].write_text(text)
      ids = np.concatenate(list(lm_harvest.text_tokens(tokenizer, paths, separator=0)))
      cat, dog = (tokenizer.encode(t).ids for t in ("the cat", "a dog"))
      np.testing.assert_array_equal(ids, cat + [0] + dog)
      ids = np.concatenate(list(lm_harvest.text_tokens(tokenizer, paths, separator=None)))
      np.testing.assert_array_equal(ids, cat + dog)
      tokenizer.enable_padding(length=32)
      with self.assertRaisesRegex(ValueError, "pads or truncates"):
        next(lm_harvest.text_tokens(tokenizer, paths, separator=0))

  def test_pack_tokens_in_order_drops_the_remainder(self):
    chunks = [np.arange(0, 5), np.arange(5, 6), np.arange(6, 23)]
    out = list(lm_harvest.pack_tokens(chunks, 4, windows_per_chunk=2))
    self.assertTrue(all(len(c) <= 2 and c.dtype == np.int32 for c in out))
    np.testing.assert_array_equal(np.concatenate(out), np.arange(20).reshape(5, 4))
    self.assertEqual(list(lm_harvest.pack_tokens([np.arange(3)], 4)), [])
    with self.assertRaisesRegex(ValueError, "context must be an int >= 1"):
      next(lm_harvest.pack_tokens(chunks, 0))

  def test_skip_first_keep_and_hook_layer(self):
    keep = lm_harvest.skip_first_keep(2)(np.zeros((2, 4)), np.ones((2, 4)))
    np.testing.assert_array_equal(keep, [[False, False, True, True]] * 2)
    cfg = _model()[1]
    self.assertEqual(lm_harvest.hook_layer(cfg, "blocks.1.hook_mlp_out"), 1)
    self.assertEqual(lm_harvest.hook_layer(cfg, "ln_final.hook_normalized"), 2)
    with self.assertRaisesRegex(ValueError, "Unknown hook name 'resid'"):
      lm_harvest.hook_layer(cfg, "resid")


if __name__ == "__main__":
  absltest.main()

"""Tests for sae_jax.data.harvest: kept positions, max_tokens, resume to identical bytes."""

import os
import pathlib
import shutil
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from sae_jax.data import harvest
from sae_jax.data import store

VOCAB, T, D = 120, 6, 5
_EMB = np.random.default_rng(0).normal(size=(VOCAB, D)).astype(np.float32)
_POS = np.random.default_rng(1).normal(size=(T, D)).astype(np.float32)


def _fake_model(ids, mask):
  """A fixed embedding lookup plus a position code: [n, t] -> [n, t, d]."""
  del mask
  return _EMB[ids] + _POS[None, :ids.shape[1]]


def _windows(n_chunks=9, seed=2, pulled=None):
  """Chunks of 1-3 windows with ragged real lengths; [CLS]=101 first and [SEP]=102 last."""
  rng = np.random.default_rng(seed)
  for _ in range(n_chunks):
    n = int(rng.integers(1, 4))
    lengths = rng.integers(2, T + 1, size=n)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(0, 100, size=(n, T)) * mask
    ids[:, 0] = 101
    ids[np.arange(n), lengths - 1] = 102
    if pulled is not None:
      pulled.append(n)
    yield ids, mask


def _expected_rows(windows, keep=lambda ids, mask: mask.astype(bool)):
  ids = np.concatenate([i for i, _ in windows])
  mask = np.concatenate([m for _, m in windows])
  return _fake_model(ids, mask)[keep(ids, mask)]


def _files(path):
  return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


class Interrupt(Exception):
  pass


def _failing_after(n_calls):
  calls = []

  def fn(ids, mask):
    if len(calls) == n_calls:
      raise Interrupt()
    calls.append(1)
    return _fake_model(ids, mask)
  return fn


class HarvestTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.root = pathlib.Path(tempfile.mkdtemp())
    self.addCleanup(shutil.rmtree, self.root)
    self.kwargs = dict(model_name="fake", layer=2, hook="resid", batch_size=4, shard_rows=6,
                       progress=False)

  def test_batch_windows_recuts_skips_and_pads(self):
    chunks = [(np.full((3, 2), i), np.ones((3, 2))) for i in range(3)]  # windows 0,0,0,1,...
    out = list(harvest.batch_windows(chunks, batch_size=4, skip=2))
    # 9 windows minus 2 skipped = 7: one full batch of 4 and one of 3 real + 1 padding.
    self.assertEqual([n for _, _, n in out], [4, 3])
    np.testing.assert_array_equal(out[0][0][:, 0], [0, 1, 1, 1])
    np.testing.assert_array_equal(out[1][0][:, 0], [2, 2, 2, 0])
    np.testing.assert_array_equal(out[1][1][:, 0], [1, 1, 1, 0])
    self.assertEqual((out[0][0].dtype, out[0][1].dtype), (np.int32, np.int32))

  def test_rows_are_the_real_positions_in_order_and_compile_once(self):
    fn = jax.jit(chex.assert_max_traces(lambda ids, mask: jnp.asarray(_EMB)[ids] +
                                        jnp.asarray(_POS)[None], n=1))
    chex.clear_trace_counter()
    reader = harvest.harvest(fn, _windows(), self.root, **self.kwargs)
    expected = _expected_rows(list(_windows()))
    self.assertEqual(reader.count, len(expected))
    np.testing.assert_array_equal(reader.read(0, reader.count), expected)
    self.assertEqual(reader.meta["windows_consumed"], sum(len(i) for i, _ in _windows()))
    self.assertEqual(reader.meta["rows_through_windows"], len(expected))
    self.assertEqual((reader.manifest["model"], reader.manifest["layer"]), ("fake", 2))

  def test_keep_fn_drops_special_tokens(self):
    keep = harvest.exclude_tokens([101, 102])
    reader = harvest.harvest(_fake_model, _windows(), self.root, keep_fn=keep, **self.kwargs)
    expected = _expected_rows(list(_windows()), keep)
    masks = np.concatenate([m for _, m in _windows()])
    # Each window loses exactly its [CLS] and its [SEP].
    self.assertEqual(reader.count, masks.sum() - 2 * len(masks))
    np.testing.assert_array_equal(reader.read(0, reader.count), expected)

  def test_max_tokens_stops_exactly_and_reads_no_further(self):
    pulled = []
    reader = harvest.harvest(_fake_model, _windows(pulled=pulled), self.root, max_tokens=17,
                             **self.kwargs)
    self.assertEqual(reader.count, 17)
    np.testing.assert_array_equal(reader.read(0, 17), _expected_rows(list(_windows()))[:17])
    consumed = reader.meta["windows_consumed"]
    self.assertEqual(consumed % 4, 0)
    self.assertLess(sum(pulled) - consumed, 4)  # at most one partial chunk read ahead

  # 17 windows in 5 batches of 4 (61 tokens); max_tokens=40 is reached in the third batch.
  @parameterized.parameters((0, None), (1, None), (2, None), (3, None), (4, None), (0, 40),
                            (1, 40), (2, 40))
  def test_interrupted_harvest_resumes_to_identical_bytes(self, fail_after, max_tokens):
    whole, resumed = self.root / "whole", self.root / "resumed"
    whole_calls, calls = [], []
    harvest.harvest(lambda i, m: whole_calls.append(1) or _fake_model(i, m), _windows(), whole,
                    max_tokens=max_tokens, **self.kwargs)
    with self.assertRaises(Interrupt):
      harvest.harvest(_failing_after(fail_after), _windows(), resumed, max_tokens=max_tokens,
                      **self.kwargs)
    done = (store.StoreReader(resumed).meta.get("windows_consumed", 0) // 4
            if (resumed / "manifest.json").exists() else 0)
    harvest.harvest(lambda i, m: calls.append(1) or _fake_model(i, m), _windows(), resumed,
                    max_tokens=max_tokens, **self.kwargs)
    self.assertEqual(_files(resumed), _files(whole))
    self.assertLen(calls, len(whole_calls) - done)  # stored batches are not recomputed

  def test_resume_skips_stored_windows_without_recomputing(self):
    harvest.harvest(_fake_model, _windows(), self.root, **self.kwargs)
    before = _files(self.root)
    calls = []
    harvest.harvest(lambda i, m: calls.append(1) or _fake_model(i, m), _windows(), self.root,
                    **self.kwargs)
    self.assertEqual(calls, [])
    self.assertEqual(_files(self.root), before)

  def test_resumed_run_recomputes_only_the_straddling_batch(self):
    with self.assertRaises(Interrupt):
      harvest.harvest(_failing_after(3), _windows(), self.root, **self.kwargs)
    meta = store.StoreReader(self.root).meta
    done = meta["windows_consumed"] // 4
    calls = []
    harvest.harvest(lambda i, m: calls.append(1) or _fake_model(i, m), _windows(), self.root,
                    **self.kwargs)
    n_batches = -(-sum(len(i) for i, _ in _windows()) // 4)
    self.assertLen(calls, n_batches - done)
    self.assertLessEqual(done, 3)

  def test_progress_bar_runs(self):
    reader = harvest.harvest(_fake_model, _windows(2), self.root,
                             **{**self.kwargs, "progress": True})
    self.assertGreater(reader.count, 0)

  def test_bad_arguments_raise(self):
    def run(windows=None, fn=_fake_model, path=None, **kwargs):
      harvest.harvest(fn, _windows() if windows is None else windows, path or self.root,
                      **{**self.kwargs, **kwargs})

    with self.assertRaisesRegex(ValueError, "batch_size must be >= 1; got 0"):
      run(batch_size=0)
    with self.assertRaisesRegex(ValueError, "max_tokens must be >= 1 or None; got 0"):
      run(max_tokens=0)
    with self.assertRaisesRegex(ValueError, "one shape \\[n, t\\]; got \\(1, 6\\) and \\(1, 5\\)"):
      run(windows=[(np.ones((1, 6)), np.ones((1, 5)))])
    with self.assertRaisesRegex(ValueError, "windows of length 4 after 6"):
      run(windows=[(np.ones((1, 6)), np.ones((1, 6))), (np.ones((1, 4)), np.ones((1, 4)))])
    with self.assertRaisesRegex(ValueError, "must return \\[n, t, d\\] = \\[4, 6, d\\]; got "
                                "shape \\(4, 6\\)"):
      run(fn=lambda ids, mask: np.zeros(ids.shape))
    with self.assertRaisesRegex(ValueError, "no token position was kept"):
      run(windows=[(np.ones((2, 6)), np.zeros((2, 6)))])
    store.write_store_from_arrays(self.root / "foreign", np.ones((3, D)), model="fake",
                                  layer=2, hook="resid")
    with self.assertRaisesRegex(ValueError, "holds 3 rows not written by harvest"):
      run(path=self.root / "foreign")
    run(path=self.root / "ok")
    with self.assertRaisesRegex(ValueError, "model='other' disagrees with the existing store"):
      run(path=self.root / "ok", model_name="other")


if __name__ == "__main__":
  absltest.main()

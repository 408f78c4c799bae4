"""Tests for sae_jax.data.store: format, atomic writes, resume, validation, batches."""

import json
import os
import pathlib
import re
import shutil
import tempfile
import textwrap

import ml_dtypes
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from sae_jax.data import batches as batches_lib
from sae_jax.data import store


def _rows(n, d=4, seed=0):
  """Rows whose first column is the row index, so batches can be traced back."""
  x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
  x[:, 0] = np.arange(n)
  return x


def _files(path):
  return {name: (path / name).read_bytes() for name in sorted(os.listdir(path))}


class StoreTestCase(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.root = pathlib.Path(tempfile.mkdtemp())
    self.addCleanup(shutil.rmtree, self.root)


class RoundTripTest(StoreTestCase):

  def test_float32_round_trip_shards_and_stats(self):
    x = _rows(31)
    reader = store.write_store_from_arrays(self.root / "s", [x[:10], x[10:]], model="m",
                                           layer=3, hook="resid", shard_rows=7,
                                           meta={"note": "x"})
    self.assertEqual((reader.count, reader.d, reader.dtype), (31, 4, "float32"))
    self.assertEqual(reader.shard_rows, (7, 7, 7, 7, 3))
    np.testing.assert_array_equal(reader.read(0, 31), x)
    np.testing.assert_array_equal(reader.read(5, 16), x[5:16])
    np.testing.assert_array_equal(reader.shard(1), x[7:14])
    self.assertIsInstance(reader.shard(0), np.memmap)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(reader.stats.mean, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(reader.stats.norm_mean, np.linalg.norm(x64, axis=1).mean(),
                               rtol=1e-12)
    m = reader.manifest
    self.assertEqual((m["format"], m["version"], m["model"], m["layer"], m["hook"]),
                     ("sae_jax.activations", 1, "m", 3, "resid"))
    self.assertEqual(m["shards"][0], {"file": "shard_00000.npy", "rows": 7})
    self.assertEqual(reader.meta, {"note": "x"})

  @parameterized.parameters(("float16", np.float16, "<f2"), ("bfloat16", ml_dtypes.bfloat16,
                                                              "<u2"))
  def test_half_precision_stores_rounded_values(self, dtype, np_dtype, on_disk):
    x = _rows(9) * 3.3
    reader = store.write_store_from_arrays(self.root / "s", x, dtype=dtype, shard_rows=4)
    expected = x.astype(np_dtype).astype(np.float32)
    np.testing.assert_array_equal(reader.read(0, 9), expected)
    self.assertEqual(np.load(self.root / "s" / "shard_00000.npy").dtype, np.dtype(on_disk))
    # Statistics describe the stored (rounded) values, not the float32 inputs.
    np.testing.assert_allclose(reader.stats.mean, expected.astype(np.float64).mean(0),
                               rtol=1e-12)

  def test_docstring_example_writes_a_readable_store(self):
    block = store.__doc__.split("created::\n")[1]
    code = textwrap.dedent(block).replace('"store/', f'"{self.root}/')
    acts = _rows(5, d=3)
    exec(code, {"np": np, "json": json, "acts": acts})  # pylint: disable=exec-used
    reader = store.StoreReader(self.root)
    np.testing.assert_array_equal(reader.read(0, 5), acts)
    np.testing.assert_allclose(reader.stats.mean, acts.mean(0), rtol=1e-6)

  def test_meta_reaches_the_manifest_with_the_shard_that_completes_its_rows(self):
    writer = store.StoreWriter(self.root, 4, "float32", "m", 0, "h", shard_rows=7)
    writer.add(_rows(5), meta={"step": 1})
    self.assertEqual((writer.count, writer.meta), (0, {}))
    writer.add(_rows(5), meta={"step": 2})  # commits rows 0..6: step 1 ended at row 5
    self.assertEqual((writer.count, writer.meta), (7, {"step": 1}))
    self.assertEqual(store.StoreReader(self.root).meta, {"step": 1})
    writer.close()
    self.assertEqual(store.StoreReader(self.root).meta, {"step": 2})


class AtomicityTest(StoreTestCase):

  def test_exception_in_block_keeps_only_committed_shards(self):
    with self.assertRaises(KeyError):
      with store.StoreWriter(self.root, 4, "float32", "m", 0, "h", shard_rows=4) as writer:
        writer.add(_rows(10))
        raise KeyError("interrupted")
    reader = store.StoreReader(self.root)
    self.assertEqual((reader.count, reader.shard_rows), (8, (4, 4)))

  def test_resume_after_crash_matches_uninterrupted_bytes(self):
    x = _rows(35)
    store.write_store_from_arrays(self.root / "whole", x, shard_rows=7)
    crashed = self.root / "crashed"
    store.write_store_from_arrays(crashed, x[:21], shard_rows=7)
    manifest_after_three = (crashed / "manifest.json").read_bytes()
    with store.StoreWriter(crashed, 4, "float32", "unknown", -1, "unknown",
                           shard_rows=7) as writer:
      writer.add(x[21:28])
    # A crash after the fourth shard's rename but before its manifest, with a stray .tmp.
    (crashed / "manifest.json").write_bytes(manifest_after_three)
    (crashed / "shard_00004.npy.tmp").write_bytes(b"half a shard")
    reader = store.StoreReader(crashed)
    self.assertEqual((reader.count, len(reader.shard_rows)), (21, 3))
    with store.StoreWriter(crashed, 4, "float32", "unknown", -1, "unknown",
                           shard_rows=7) as writer:
      self.assertEqual(writer.count, 21)
      self.assertNotIn("shard_00004.npy.tmp", os.listdir(crashed))
      self.assertNotIn("shard_00003.npy", os.listdir(crashed))
      writer.add(x[21:])
    self.assertEqual(_files(crashed), _files(self.root / "whole"))

  def test_resume_mismatch_and_writer_errors(self):
    store.write_store_from_arrays(self.root, _rows(3), model="a")
    with self.assertRaisesRegex(ValueError, "model='b' disagrees with the existing store"):
      store.StoreWriter(self.root, 4, "float32", "b", -1, "unknown")
    with self.assertRaisesRegex(ValueError, "already holds a store"):
      store.write_store_from_arrays(self.root, _rows(3))
    other = self.root / "other"
    with self.assertRaisesRegex(ValueError, "dtype must be one of .*got 'int8'"):
      store.StoreWriter(other, 4, "int8", "m", 0, "h")
    with self.assertRaisesRegex(ValueError, "d and shard_rows must be >= 1; got d=0"):
      store.StoreWriter(other, 0, "float32", "m", 0, "h")
    with self.assertRaisesRegex(ValueError, "arrays must be \\[n, d\\] arrays; got a first "
                                "shape \\(0,\\)"):
      store.write_store_from_arrays(other, [])
    writer = store.StoreWriter(other, 4, "float16", "m", 0, "h")
    with self.assertRaisesRegex(ValueError, "rows must have shape \\[n, d=4\\]; got \\(2, 3\\)"):
      writer.add(np.zeros((2, 3)))
    with self.assertRaisesRegex(ValueError, "not finite in float16 \\(max \\|x\\| = 100000.0\\)"):
      writer.add(np.full((1, 4), 1e5))  # above float16's 65504
    writer.close()
    with self.assertRaisesRegex(RuntimeError, "closed"):
      writer.add(np.zeros((1, 4)))
    with self.assertRaisesRegex(ValueError, "need 0 <= start <= stop <= count=0"):
      store.StoreReader(other).read(0, 1)


class CorruptionTest(StoreTestCase):

  def setUp(self):
    super().setUp()
    store.write_store_from_arrays(self.root, _rows(10), shard_rows=4)
    self.manifest = json.loads((self.root / "manifest.json").read_text())

  def _rewrite(self, **changes):
    (self.root / "manifest.json").write_text(json.dumps({**self.manifest, **changes}))

  def _assert_error(self, pattern):
    with self.assertRaisesRegex(store.StoreError, pattern):
      store.StoreReader(self.root)

  def test_missing_and_unparsable_manifest(self):
    (self.root / "manifest.json").write_text('{"format": ')
    self._assert_error(re.escape(str(self.root / "manifest.json")) + ": corrupt JSON")
    os.remove(self.root / "manifest.json")
    self._assert_error("manifest.json: missing; .* is not an activation store")

  @parameterized.parameters(
      ({"format": "other"}, "field 'format' must be 'sae_jax.activations'; got 'other'"),
      ({"d": 0}, "field 'd' must be a positive int; got 0"),
      ({"count": 11}, "field 'count' \\(11\\) or 'stats.mean'"),
      ({"shards": [{"file": "../x.npy", "rows": 4}]}, "field 'shards' must be a list"),
      ({"dtype": "int8"}, "field 'dtype' must be one of"))
  def test_bad_fields_are_named(self, changes, pattern):
    self._rewrite(**changes)
    self._assert_error("manifest.json: " + pattern)

  def test_missing_field_is_named(self):
    del self.manifest["hook"]
    self._rewrite()
    self._assert_error("field 'hook' must be a string; got '<missing>'")

  def test_truncated_wrong_shape_wrong_dtype_and_missing_shards(self):
    shard = self.root / "shard_00001.npy"
    good = shard.read_bytes()
    shard.write_bytes(good[:-5])
    self._assert_error("shard_00001.npy: truncated: 187 bytes on disk, the header needs 192")
    np.save(shard, np.zeros((4, 5), np.float32))
    self._assert_error("shard_00001.npy: holds a C-order float32 array of shape \\(4, 5\\); "
                       "manifest.json says C-order float32 of shape \\(4, 4\\)")
    np.save(shard, np.zeros((4, 4), np.float16))
    self._assert_error("shard_00001.npy: holds a C-order float16 array")
    shard.write_bytes(b"not a numpy file at all")
    self._assert_error("shard_00001.npy: not a readable .npy file")
    os.remove(shard)
    self._assert_error("shard_00001.npy: listed in manifest.json but missing")


class ShuffledBatchesTest(StoreTestCase):

  def _reader(self, n, shard_rows=7, dtype="float32"):
    return store.write_store_from_arrays(self.root / f"s{n}", _rows(n), shard_rows=shard_rows,
                                         dtype=dtype)

  @parameterized.product(buffer_rows=(5, 16, 1000), mix_shards=(False, True))
  def test_each_epoch_covers_every_row_once(self, buffer_rows, mix_shards):
    batches = batches_lib.ShuffledBatches(self._reader(48), 8, seed=0, buffer_rows=buffer_rows,
                                          mix_shards=mix_shards)
    ids = np.concatenate([next(batches)[:, 0] for _ in range(12)]).astype(int)
    first, second = ids[:48], ids[48:]
    self.assertEqual(sorted(first), list(range(48)))
    self.assertEqual(sorted(second), list(range(48)))
    self.assertFalse(np.array_equal(first, second))
    self.assertFalse(np.array_equal(first, np.arange(48)))

  def test_rows_carry_over_epochs_when_batch_does_not_divide_count(self):
    batches = batches_lib.ShuffledBatches(self._reader(45), 8, seed=1, buffer_rows=16)
    ids = np.concatenate([next(batches)[:, 0] for _ in range(12)]).astype(int)
    self.assertEqual(sorted(ids[:45]), list(range(45)))
    self.assertEqual(sorted(ids[45:90]), list(range(45)))

  def test_batches_are_exact_stored_rows_and_deterministic(self):
    reader = self._reader(45, dtype="float16")
    a = [next(batches_lib.ShuffledBatches(reader, 8, seed=3, buffer_rows=16)) for _ in range(2)]
    b = batches_lib.ShuffledBatches(reader, 8, seed=4, buffer_rows=16)
    self.assertEqual(a[0].dtype, np.float32)
    np.testing.assert_array_equal(a[0], a[1])
    self.assertFalse(np.array_equal(a[0], next(b)))
    np.testing.assert_array_equal(a[0], reader.read(0, 45)[a[0][:, 0].astype(int)])

  # 5: straddles epochs 0 and 1; 11: in epoch 1.
  @parameterized.product(at=(3, 5, 6, 11), mix_shards=(False, True))
  def test_restore_is_bitwise_equal(self, at, mix_shards):
    reader = self._reader(45)
    run = batches_lib.ShuffledBatches(reader, 8, seed=2, buffer_rows=16, mix_shards=mix_shards)
    for _ in range(at):
      next(run)
    state = json.loads(json.dumps(run.state()))
    expected = [next(run) for _ in range(8)]
    resumed = batches_lib.ShuffledBatches(reader, 8, seed=2, buffer_rows=16,
                                          mix_shards=mix_shards)
    resumed.restore(state)
    for want, got in zip(expected, [next(resumed) for _ in range(8)]):
      self.assertEqual(want.tobytes(), got.tobytes())
    self.assertEqual((state["epoch"], state["position"]), divmod(at * 8, 45))

  @parameterized.parameters(False, True)
  def test_processes_split_each_global_batch_disjointly(self, mix_shards):
    reader = self._reader(48)
    whole = batches_lib.ShuffledBatches(reader, 12, seed=5, buffer_rows=10, mix_shards=mix_shards)
    parts = [batches_lib.ShuffledBatches(reader, 4, seed=5, buffer_rows=10, process_index=i,
                                         process_count=3, mix_shards=mix_shards)
             for i in range(3)]
    seen = []
    for _ in range(4):  # one epoch
      batch = [next(p) for p in parts]
      np.testing.assert_array_equal(np.concatenate(batch), next(whole))
      seen.append(np.concatenate(batch)[:, 0])
    self.assertEqual(sorted(np.concatenate(seen).astype(int)), list(range(48)))

  def test_num_epochs_stops_and_bad_arguments_raise(self):
    reader = self._reader(45)
    self.assertLen(list(batches_lib.ShuffledBatches(reader, 8, seed=0, num_epochs=2)), 11)
    for kwargs, pattern in (
        ({"batch_size": 0}, "batch_size must be >= 1; got 0"),
        ({"seed": -1}, "seed must be >= 0; got -1"),
        ({"buffer_rows": 0}, "buffer_rows must be >= 1; got 0"),
        ({"num_epochs": 0}, "num_epochs must be >= 1; got 0"),
        ({"process_index": 2, "process_count": 2},
         "process_index must be in \\[0, process_count=2\\); got 2"),
        ({"batch_size": 23, "process_count": 2}, "= 46 exceeds the store's 45 rows"),
        ({"mix_shards": "yes"}, "mix_shards must be True or False; got 'yes'")):
      with self.assertRaisesRegex(ValueError, pattern):
        batches_lib.ShuffledBatches(reader, **{"batch_size": 8, "seed": 0, **kwargs})
    batches = batches_lib.ShuffledBatches(reader, 8, seed=0)
    with self.assertRaisesRegex(ValueError, "state\\['seed'\\] = 1 but this iterator has seed=0"):
      batches.restore({**batches.state(), "seed": 1})
    with self.assertRaisesRegex(ValueError, "state\\['step'\\] must be an int >= 0; got -1"):
      batches.restore({**batches.state(), "step": -1})
    with self.assertRaisesRegex(ValueError, "state\\['mix_shards'\\] = True but this iterator "
                                "has mix_shards=False"):
      batches.restore({**batches.state(), "mix_shards": True})
    old = {k: v for k, v in batches.state().items() if k != "mix_shards"}
    batches.restore({**old, "step": 3})  # a state from before the option: the default layout
    self.assertEqual(batches.step, 3)

  def test_mixed_blocks_draw_on_every_shard_in_proportion(self):
    # 700 rows in 7 shards of 100 whose rows differ by shard (row id // 100); blocks of 100.
    reader = self._reader(700, shard_rows=100)
    def shards_of(mix_shards, seed):
      batches = batches_lib.ShuffledBatches(reader, 50, seed=seed, buffer_rows=100,
                                            mix_shards=mix_shards)
      block = np.concatenate([next(batches)[:, 0] for _ in range(2)]).astype(int)
      return np.bincount(block // 100, minlength=7)
    for seed in range(3):
      plain, mixed = shards_of(False, seed), shards_of(True, seed)
      self.assertEqual(np.count_nonzero(plain), 1)  # one block = one whole shard
      self.assertEqual(mixed.sum(), 100)
      self.assertTrue(set(mixed.tolist()) <= {14, 15}, mixed)  # 100 // 7 or one more


if __name__ == "__main__":
  absltest.main()

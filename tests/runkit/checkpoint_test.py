"""Tests for runkit.checkpoint: the Checkpointer both packages save their runs with."""

import json
import os
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

import runkit


def _tmp(test) -> str:
  holder = tempfile.TemporaryDirectory()
  test.addCleanup(holder.cleanup)
  return holder.name


class CheckpointerTest(absltest.TestCase):

  def test_round_trip_with_typed_keys_and_rotation(self):
    ckpt = runkit.Checkpointer(_tmp(self), keep=2)
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "key": jax.random.key(3),
            "n": jnp.int32(7)}
    for step in (1, 2, 5):
      ckpt.save(step, jax.tree.map(lambda x: x, tree), {"step": step})
    self.assertEqual(ckpt.steps(), [2, 5])
    self.assertEqual(ckpt.latest_step(), 5)
    restored, meta = ckpt.restore(tree)
    self.assertEqual(meta, {"step": 5})
    np.testing.assert_array_equal(restored["w"], tree["w"])
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]),
                                  jax.random.key_data(tree["key"]))
    self.assertEqual(restored["key"].dtype, tree["key"].dtype)
    _, meta = ckpt.restore(tree, 2)
    self.assertEqual(meta, {"step": 2})
    ckpt.close()

  def test_abstract_target_keeps_typed_keys_and_shardings(self):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    sharded = NamedSharding(mesh, P("data"))
    tree = {"w": jax.device_put(jnp.arange(8.0), sharded),
            "key": jax.random.key(5, impl="rbg")}
    with runkit.Checkpointer(_tmp(self)) as ckpt:
      ckpt.save(0, tree, {})
      target = runkit.abstract_like(tree)
      self.assertEqual(target["w"].sharding, sharded)
      restored, _ = ckpt.restore(target)
    self.assertEqual(restored["w"].sharding, sharded)
    np.testing.assert_array_equal(restored["w"], tree["w"])
    self.assertEqual(restored["key"].dtype, tree["key"].dtype)
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]),
                                  jax.random.key_data(tree["key"]))

  def test_asynchronous_saves_keep_the_newest_and_finish_on_wait(self):
    directory = _tmp(self)
    ckpt = runkit.Checkpointer(directory, keep=3, asynchronous=True)
    tree = {"w": jnp.zeros(4)}
    for step in range(1, 6):
      ckpt.save(step, {"w": tree["w"] + step}, {"step": step})
    ckpt.wait()
    self.assertEqual(ckpt.steps(), [3, 4, 5])
    ckpt.close()
    # Another process (here: another checkpointer) sees what was written.
    reader = runkit.Checkpointer(directory)
    restored, meta = reader.restore(tree)
    np.testing.assert_array_equal(restored["w"], np.full(4, 5.0))
    self.assertEqual(meta, {"step": 5})
    reader.close()

  def test_preserved_ids_outlive_rotation(self):
    ckpt = runkit.Checkpointer(_tmp(self), keep=1, preserve=(2,))
    for step in (1, 2, 3, 4):
      ckpt.save(step, {"w": jnp.zeros(2)}, {})
    self.assertEqual(ckpt.steps(), [2, 4])
    ckpt.close()

  def test_expected_configs_are_checked_before_the_arrays(self):
    ckpt = runkit.Checkpointer(_tmp(self))
    configs = {"SAEConfig": {"d_sae": 16, "k": 2}}
    ckpt.save(2, {"w": jnp.zeros(3)}, {"configs": configs, "data": {"index": 2}})
    _, meta = ckpt.restore({"w": jnp.zeros(3)}, expected_configs=configs)
    self.assertEqual(meta["data"], {"index": 2})
    # A target of another shape is never read: the configs already tell why.
    other = {"SAEConfig": {"d_sae": 32, "k": 2}}
    for error in (runkit.ConfigMismatchError, runkit.CheckpointError, ValueError):
      with self.assertRaisesRegex(
          error, r"checkpoint .*/2 was written with configs that differ from this run's: "
          r"SAEConfig\.d_sae: 16 there, 32 now\. Use the original configs"):
        ckpt.restore({"w": jnp.zeros(5)}, expected_configs=other)
    ckpt.close()

  def test_digest_finds_damaged_arrays(self):
    directory = _tmp(self)
    ckpt = runkit.Checkpointer(directory, digest=True)
    tree = {"w": jnp.arange(3.0), "key": jax.random.key(0)}
    ckpt.save(1, tree, {"a": 1})
    ckpt.save(4, tree, {"a": 2})
    self.assertEqual(runkit.tree_digest(ckpt.restore(tree)[0]), runkit.tree_digest(tree))
    meta_file = os.path.join(directory, "4", "meta", "metadata")
    with open(meta_file) as fh:
      meta = json.load(fh)
    self.assertEqual(meta[runkit.DIGEST_KEY], runkit.tree_digest(tree))
    meta[runkit.DIGEST_KEY] = "0" * 64
    with open(meta_file, "w") as fh:
      json.dump(meta, fh)
    with self.assertRaisesRegex(runkit.CheckpointError,
                                r"/4 is damaged.*delete .*/4 to resume from the previous "
                                r"checkpoint \(1\)"):
      ckpt.restore(tree)
    # A checkpointer without digests still checks a digest it finds.
    with self.assertRaisesRegex(runkit.CheckpointError, "is damaged"):
      runkit.Checkpointer(directory).restore(tree)
    ckpt.close()

  def test_digest_is_required_only_where_it_is_written(self):
    directory = _tmp(self)
    plain = runkit.Checkpointer(directory)
    plain.save(1, {"w": jnp.zeros(2)}, {"a": 1})  # as sae_jax runs save (no digest)
    restored, meta = plain.restore({"w": jnp.zeros(2)})
    self.assertEqual(meta, {"a": 1})
    plain.close()
    with self.assertRaisesRegex(runkit.CheckpointError, "/1 has no valid metadata"):
      runkit.Checkpointer(directory, digest=True).restore({"w": jnp.zeros(2)})

  def test_errors(self):
    ckpt = runkit.Checkpointer(_tmp(self))
    tree = {"w": jnp.zeros(3)}
    with self.assertRaisesRegex(runkit.CheckpointError, "no checkpoint in"):
      ckpt.restore(tree)
    ckpt.save(3, tree, {})
    with self.assertRaisesRegex(ValueError, "step must exceed the latest checkpoint id 3"):
      ckpt.save(3, tree, {})
    with self.assertRaisesRegex(ValueError, "reserved key"):
      ckpt.save(4, tree, {"_sha256": "x"})
    with self.assertRaisesRegex(ValueError, "meta must be JSON-serialisable"):
      ckpt.save(4, tree, {"a": object()})
    with self.assertRaisesRegex(ValueError, "step must be an int >= 0"):
      ckpt.save(-1, tree, {})
    with self.assertRaisesRegex(runkit.CheckpointError, r"checkpoint 9 not found.*\[3\]"):
      ckpt.restore(tree, 9)
    with self.assertRaisesRegex(runkit.CheckpointError, r"3 is unreadable .*shape"):
      ckpt.restore({"w": jnp.zeros(4)})
    with self.assertRaisesRegex(runkit.CheckpointError,
                                r"(?s)3 is unreadable .*written for another model or config"):
      ckpt.restore({"w": jnp.zeros(3), "v": jnp.zeros(3)})
    with self.assertRaisesRegex(ValueError, "keep must be an int >= 1 .*, got 0"):
      runkit.Checkpointer(_tmp(self), keep=0)
    with self.assertRaisesRegex(ValueError, r"preserve\[0\] must be an int >= 0"):
      runkit.Checkpointer(_tmp(self), preserve=("4",))
    ckpt.close()

  def test_compression_is_optional_and_either_kind_restores(self):
    tree = {"w": jax.random.normal(jax.random.key(0), (64, 256)),
            "b": jnp.arange(256, dtype=jnp.int32)}
    sizes = {}
    for compress in (False, True):
      directory = _tmp(self)
      with runkit.Checkpointer(directory, compress=compress) as ckpt:
        ckpt.save(1, tree, {"compress": compress})
      sizes[compress] = sum(os.path.getsize(os.path.join(root, name))
                            for root, _, files in os.walk(directory) for name in files)
      # Read back by a checkpointer with the other setting.
      with runkit.Checkpointer(directory, compress=not compress) as other:
        restored, meta = other.restore(tree)
      self.assertEqual(meta, {"compress": compress})
      for name in tree:
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(tree[name]))
    # zstd finds something to save in float32 normals (the exponent bytes repeat), so the
    # uncompressed default is the larger one.
    self.assertGreater(sizes[False], sizes[True])

  def test_corrupted_state_is_reported_with_its_path(self):
    directory = _tmp(self)
    ckpt = runkit.Checkpointer(directory)
    tree = {"w": jnp.zeros(3)}
    ckpt.save(2, tree, {})
    for root, _, files in os.walk(os.path.join(directory, "2", "state")):
      for name in files:
        with open(os.path.join(root, name), "wb") as fh:
          fh.write(b"garbage")
    with self.assertRaisesRegex(runkit.CheckpointError,
                                r"checkpoint .*/2 is unreadable .*start afresh"):
      ckpt.restore(tree)
    ckpt.close()


if __name__ == "__main__":
  absltest.main()

"""Tests for the host input pipeline and on-device augmentation (pruning_jax.pipeline)."""

import functools
import itertools
import json

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from pruning_jax import pipeline


def _data(n=10, h=2, w=2, c=1, seed=0):
  # Labels are the sample indices, so a batch's labels tell which samples it holds.
  images = np.random.default_rng(seed).integers(0, 256, (n, h, w, c), np.uint8)
  return images, np.arange(n)


def _take(iterator, steps):
  return list(itertools.islice(iterator, steps))


class EpochIteratorTest(parameterized.TestCase):

  def test_batches_and_steps(self):
    images, labels = _data()
    it = pipeline.EpochIterator(images, labels, batch_size=3, seed=0)
    self.assertEqual(it.steps_per_epoch, 3)  # floor(10 / 3)
    batch = next(it)
    self.assertEqual(set(batch), {"image", "label"})
    chex.assert_shape([batch["image"], batch["label"]], [(3, 2, 2, 1), (3,)])
    self.assertEqual((batch["image"].dtype, batch["label"].dtype), (np.uint8, np.int32))
    np.testing.assert_array_equal(batch["image"], images[batch["label"]])
    self.assertEqual(pipeline.EpochIterator(images, labels, 3, 0, drop_last=False)
                     .steps_per_epoch, 4)  # ceil(10 / 3)

  def test_same_seed_same_batches_other_seed_differs(self):
    images, labels = _data()
    a = _take(pipeline.EpochIterator(images, labels, 4, seed=5), 6)
    b = _take(pipeline.EpochIterator(images, labels, 4, seed=5), 6)
    c = _take(pipeline.EpochIterator(images, labels, 4, seed=6), 6)
    chex.assert_trees_all_equal(a, b)
    self.assertFalse(all(np.array_equal(x["label"], y["label"]) for x, y in zip(a, c)))

  def test_adjacent_seeds_do_not_replay_shifted_epochs(self):
    # With seed + epoch seeding, seed 1's epoch 0 would equal seed 0's epoch 1.
    images, labels = _data(n=50)
    a = pipeline.EpochIterator(images, labels, 10, seed=0)
    b = pipeline.EpochIterator(images, labels, 10, seed=1)
    self.assertFalse(np.array_equal(a.permutation(1), b.permutation(0)))

  def test_every_sample_once_per_epoch(self):
    images, labels = _data()
    it = pipeline.EpochIterator(images, labels, 3, seed=1, drop_last=False)
    epochs = []
    for _ in range(3):
      batches = _take(it, it.steps_per_epoch)
      self.assertEqual([len(b["label"]) for b in batches], [3, 3, 3, 1])
      order = np.concatenate([b["label"] for b in batches])
      np.testing.assert_array_equal(np.sort(order), np.arange(10))
      epochs.append(order)
    self.assertFalse(np.array_equal(epochs[0], epochs[1]))  # reshuffled per epoch

  def test_drop_last_yields_full_distinct_batches(self):
    images, labels = _data()
    it = pipeline.EpochIterator(images, labels, 4, seed=2)
    order = np.concatenate([b["label"] for b in _take(it, 2)])
    self.assertLen(np.unique(order), 8)
    np.testing.assert_array_equal(order, it.permutation(0)[:8])
    self.assertEqual(it.state(), {"epoch": 1, "index": 0})

  def test_restore_resumes_bitwise_across_epoch_boundary(self):
    images, labels = _data(n=10, seed=3)
    reference = _take(pipeline.EpochIterator(images, labels, 3, seed=9), 12)
    first = pipeline.EpochIterator(images, labels, 3, seed=9)
    head = _take(first, 5)
    saved = json.loads(json.dumps(first.state()))
    self.assertEqual(saved, {"epoch": 1, "index": 2})
    resumed = pipeline.EpochIterator(images, labels, 3, seed=9)
    resumed.restore(saved)
    tail = _take(resumed, 7)  # steps 5..11: the rest of epoch 1, epochs 2 and 3
    for got, want in zip(head + tail, reference):
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["label"], want["label"])
    self.assertEqual(resumed.state(), {"epoch": 4, "index": 0})

  @parameterized.named_parameters(
      ("batch_zero", dict(batch_size=0), "batch_size must be an integer >= 1; got 0"),
      ("batch_float", dict(batch_size=2.0), "batch_size must be an integer >= 1; got 2.0"),
      ("batch_too_big", dict(batch_size=11), r"batch_size must be in \[1, n=10\].*got 11"),
      ("seed", dict(seed=-1), "seed must be an integer >= 0; got -1"),
      ("labels", dict(labels=np.arange(9)), r"share n; got shapes \(10, 2, 2, 1\) and \(9,\)"),
      ("float_labels", dict(labels=np.zeros(10)), "labels must be integers; got dtype float64"),
      ("empty", dict(images=np.zeros((0, 2, 2, 1), np.uint8), labels=np.zeros(0, int)),
       "at least one sample; got n=0"),
  )
  def test_constructor_errors(self, kwargs, message):
    images, labels = _data()
    args = dict(images=images, labels=labels, batch_size=2, seed=0) | kwargs
    with self.assertRaisesRegex(ValueError, message):
      pipeline.EpochIterator(**args)

  @parameterized.named_parameters(
      ("keys", {"epoch": 0}, "exactly the keys 'epoch' and 'index'"),
      ("epoch", {"epoch": -1, "index": 0}, r"state\['epoch'\] must be an integer >= 0"),
      ("index", {"epoch": 0, "index": 5}, r"state\['index'\] must be in \[0, "
       r"steps_per_epoch=5\); got 5"),
  )
  def test_restore_errors(self, state, message):
    it = pipeline.EpochIterator(*_data(), 2, 0)
    with self.assertRaisesRegex(ValueError, message):
      it.restore(state)


class EvalBatchesTest(absltest.TestCase):

  def test_padding_and_weights(self):
    images, labels = _data(n=7)
    batches = list(pipeline.eval_batches(images, labels, 3))
    self.assertLen(batches, 3)
    for b in batches:
      chex.assert_shape([b["image"], b["label"], b["weight"]], [(3, 2, 2, 1), (3,), (3,)])
      self.assertEqual((b["image"].dtype, b["label"].dtype, b["weight"].dtype),
                       (np.uint8, np.int32, np.float32))
    np.testing.assert_array_equal(np.concatenate([b["weight"] for b in batches]),
                                  [1, 1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches])[:7], images)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]),
                                  [0, 1, 2, 3, 4, 5, 6, 0, 0])
    np.testing.assert_array_equal(batches[-1]["image"][1:], 0)

  def test_exact_multiple_has_no_padding(self):
    batches = list(pipeline.eval_batches(*_data(n=6), 3))
    self.assertLen(batches, 2)
    self.assertTrue(all(np.all(b["weight"] == 1) for b in batches))

  def test_errors_are_raised_eagerly(self):
    images, labels = _data()
    with self.assertRaisesRegex(ValueError, "batch_size must be an integer >= 1; got 0"):
      pipeline.eval_batches(images, labels, 0)
    with self.assertRaisesRegex(ValueError, "must share n"):
      pipeline.eval_batches(images, labels[:3], 2)


_MEAN = np.array([0.5, 0.25, 0.0], np.float32)
_STD = np.array([0.25, 0.5, 1.0], np.float32)


def _pixels(out):
  """uint8 pixels back from output normalised with mean 0 and std 1."""
  return np.rint(np.asarray(out) * 255).astype(np.uint8)


def _images(b=32, h=5, w=6, c=2, seed=0):
  # Values start at 1, so zero pixels can only come from padding.
  return jnp.asarray(np.random.default_rng(seed).integers(1, 256, (b, h, w, c), np.uint8))


class NormalizeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_golden(self):
    images = jnp.asarray(np.array([[[[255, 0, 51], [0, 255, 102]]]], np.uint8))
    out = self.variant(pipeline.normalize)(images, _MEAN, _STD)
    # (255/255 - 0.5) / 0.25 = 2, (0 - 0.25) / 0.5 = -0.5, 51/255 = 0.2; next pixel
    # (0 - 0.5) / 0.25 = -2, (1 - 0.25) / 0.5 = 1.5, 102/255 = 0.4.
    chex.assert_trees_all_close(out, jnp.array([[[[2.0, -0.5, 0.2], [-2.0, 1.5, 0.4]]]]),
                                rtol=1e-6)
    self.assertEqual(out.dtype, jnp.float32)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "images must be uint8 .*float32"):
      pipeline.normalize(jnp.zeros((1, 2, 2, 3)), _MEAN, _STD)
    with self.assertRaisesRegex(ValueError, r"images must be uint8 \[b, h, w, c\].*\(2, 2, 3\)"):
      pipeline.normalize(jnp.zeros((2, 2, 3), jnp.uint8), _MEAN, _STD)
    with self.assertRaisesRegex(ValueError, r"std must have shape \(3,\).*got \(2,\)"):
      pipeline.normalize(jnp.zeros((1, 2, 2, 3), jnp.uint8), _MEAN, _STD[:2])


class AugmentTest(chex.TestCase):

  def _augment(self, **kwargs):
    kwargs = dict(mean=np.zeros(2, np.float32), std=np.ones(2, np.float32)) | kwargs
    return self.variant(functools.partial(pipeline.augment, **kwargs))

  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes_and_dtype(self):
    out = self._augment(mean=_MEAN[:2], std=_STD[:2])(jax.random.key(0), _images())
    chex.assert_shape(out, (32, 5, 6, 2))
    self.assertEqual(out.dtype, jnp.float32)

  @chex.variants(with_jit=True, without_jit=True)
  def test_flip_mirrors(self):
    images = _images()
    out = _pixels(self._augment(pad=0)(jax.random.key(1), images))
    same = np.all(out == np.asarray(images), axis=(1, 2, 3))
    mirrored = np.all(out == np.asarray(images)[:, :, ::-1], axis=(1, 2, 3))
    np.testing.assert_array_equal(same | mirrored, True)
    # P(all 32 samples flip alike) = 2^-31.
    self.assertTrue(0 < mirrored.sum() < 32)
    np.testing.assert_array_equal(_pixels(self._augment(pad=0, flip=False)(
        jax.random.key(1), images)), images)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("zero", "reflect")
  def test_crop_is_a_window_of_the_padded_image(self, pad_mode):
    images, pad = np.asarray(_images()), 2
    out = _pixels(self._augment(pad=pad, flip=False, pad_mode=pad_mode)(
        jax.random.key(2), jnp.asarray(images)))
    np_mode = "constant" if pad_mode == "zero" else "reflect"
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=np_mode)
    offsets = set()
    for i in range(len(images)):
      hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
              if np.array_equal(out[i], padded[i, dy:dy + 5, dx:dx + 6])]
      self.assertNotEmpty(hits, f"sample {i} is no window of its padded image")
      offsets.add(hits[0])
    self.assertGreater(len(offsets), 5)  # 25 offsets, drawn per sample

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_padding_normalises_to_minus_mean_over_std(self):
    images = jnp.full((32, 5, 6, 2), 255, jnp.uint8)
    out = np.asarray(self._augment(mean=_MEAN[:2], std=_STD[:2], pad=2)(
        jax.random.key(3), images))
    padding = np.all(np.isclose(out, -_MEAN[:2] / _STD[:2]), axis=-1)
    pixel = np.all(np.isclose(out, (1 - _MEAN[:2]) / _STD[:2]), axis=-1)
    np.testing.assert_array_equal(padding | pixel, True)
    self.assertTrue(padding.any())
    # The centre pixel is inside every window shifted by at most 2.
    np.testing.assert_array_equal(pixel[:, 2, 2:4], True)

  @chex.variants(with_jit=True, without_jit=True)
  def test_keys_decide_output(self):
    images, augment = _images(), self._augment()
    a = augment(jax.random.key(4), images)
    chex.assert_trees_all_equal(a, augment(jax.random.key(4), images))
    self.assertFalse(np.array_equal(a, augment(jax.random.key(5), images)))

  def test_traces_once_across_keys_and_batches(self):
    mean, std = jnp.asarray(_MEAN[:2]), jnp.asarray(_STD[:2])

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(key, images, mean, std):
      return pipeline.augment(key, images, mean=mean, std=std)

    outs = [step(jax.random.key(i), _images(seed=i), mean, std) for i in range(3)]
    outs.append(step(jax.random.key(0), _images(seed=0), mean * 0.5, std))
    self.assertFalse(np.array_equal(outs[0], outs[1]))
    chex.assert_trees_all_close(outs[3] - outs[0],
                                jnp.broadcast_to(0.5 * mean / std, outs[0].shape), atol=1e-6)

  @parameterized.named_parameters(
      ("float_images", dict(images=jnp.zeros((1, 4, 4, 2))), "images must be uint8"),
      ("pad", dict(pad=-1), "pad must be an integer >= 0; got -1"),
      ("pad_mode", dict(pad_mode="edge"), r"pad_mode must be one of \('zero', 'reflect'\)"),
      ("reflect_pad", dict(pad=4, pad_mode="reflect"),
       r"pad must be < min\(h, w\) = 4 with pad_mode='reflect'.*got 4"),
      ("mean", dict(mean=np.zeros(3)), r"mean must have shape \(2,\)"),
  )
  def test_errors(self, kwargs, message):
    args = dict(key=jax.random.key(0), images=jnp.zeros((1, 4, 5, 2), jnp.uint8),
                mean=np.zeros(2), std=np.ones(2)) | kwargs
    with self.assertRaisesRegex(ValueError, message):
      pipeline.augment(**args)


def _mesh(shape, names):
  return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names)


class ShardBatchTest(parameterized.TestCase):

  def test_eight_devices(self):
    images, labels = _data(n=16)
    mesh = _mesh((8,), ("data",))
    out = pipeline.shard_batch({"image": images, "label": labels}, mesh)
    for leaf, host in ((out["image"], images), (out["label"], labels)):
      self.assertEqual(leaf.sharding, NamedSharding(mesh, P("data")))
      self.assertEqual({s.device for s in leaf.addressable_shards}, set(jax.devices()[:8]))
      for shard in leaf.addressable_shards:
        self.assertEqual(shard.data.shape[0], 2)
        np.testing.assert_array_equal(shard.data, host[shard.index])
      np.testing.assert_array_equal(leaf, host)

  def test_replicated_over_other_axes(self):
    mesh = _mesh((2, 4), ("data", "model"))
    out = pipeline.shard_batch({"x": np.arange(6)}, mesh)["x"]
    self.assertLen(out.addressable_shards, 8)
    starts = sorted(s.index[0].start for s in out.addressable_shards)
    self.assertEqual(starts, [0] * 4 + [3] * 4)

  @parameterized.named_parameters(
      ("indivisible", {"image": np.zeros((12, 2))}, "data",
       r"batch\['image'\] has shape \(12, 2\).*divisible by the 8 shards"),
      ("scalar", {"step": np.int32(3)}, "data", r"batch\['step'\] has shape \(\)"),
      ("axis", {"image": np.zeros((8, 2))}, "batch", "axis must name a mesh axis.*'batch'"),
  )
  def test_errors(self, batch, axis, message):
    with self.assertRaisesRegex(ValueError, message):
      pipeline.shard_batch(batch, _mesh((8,), ("data",)), axis)


if __name__ == "__main__":
  absltest.main()

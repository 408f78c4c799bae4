"""Tests for the dataset file readers (pruning_jax.datasets)."""

import gzip
import io
import os
import pickle
import struct
import tarfile
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
import numpy as np

from pruning_jax import datasets

_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")


def _idx_bytes(array, type_byte=0x08, dtype=">u1"):
  """An IDX file as the format defines it: 00 00 type ndim, big-endian uint32 dims, data."""
  array = np.asarray(array)
  header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.astype(dtype).tobytes()


def _write(path, data, compress=False):
  with open(path, "wb") as f:
    f.write(gzip.compress(data) if compress else data)
  return path


def _idx_split(seed, n_train=5, n_test=3):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n_train, 4, 3), np.uint8), rng.integers(0, 10, n_train),
          rng.integers(0, 256, (n_test, 4, 3), np.uint8), rng.integers(0, 10, n_test))


def _write_idx_dir(folder, arrays, compress=False):
  os.makedirs(folder, exist_ok=True)
  for name, array in zip(_IDX_NAMES, arrays):
    _write(os.path.join(folder, name + (".gz" if compress else "")), _idx_bytes(array),
           compress)
  return folder


def _py2_pickle(obj):
  """Serialises `obj` as Python 2's cPickle did at protocol 2, the writer of the official
  CIFAR files: byte strings as (SHORT_)BINSTRING, arrays via numpy.core.multiarray."""
  out = [b"\x80\x02"]

  def put(x):
    if isinstance(x, dict):
      out.append(b"}(")
      for k, v in x.items():
        put(k)
        put(v)
      out.append(b"u")
    elif isinstance(x, list):
      out.append(b"](")
      for v in x:
        put(v)
      out.append(b"e")
    elif isinstance(x, tuple):
      out.append(b"(")
      for v in x:
        put(v)
      out.append(b"t")
    elif isinstance(x, bytes):
      out.append(b"U" + bytes([len(x)]) + x if len(x) < 256 else
                 b"T" + struct.pack("<I", len(x)) + x)
    elif x is None:
      out.append(b"N")
    elif isinstance(x, bool):
      out.append(b"\x88" if x else b"\x89")
    elif isinstance(x, int):
      out.append(b"K" + bytes([x]) if 0 <= x < 256 else b"J" + struct.pack("<i", x))
    elif isinstance(x, np.ndarray):
      assert x.dtype == np.uint8
      out.append(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
      put((0,))
      put(b"b")
      out.append(b"\x87R(K\x01")  # TUPLE3 REDUCE, then the state tuple: version 1
      put(tuple(x.shape))
      out.append(b"cnumpy\ndtype\n")
      put((b"u1", 0, 1))
      out.append(b"R")
      put((3, b"|", None, None, None, -1, -1, 0))
      out.append(b"b")  # BUILD the dtype
      put(False)  # C order
      put(x.tobytes())
      out.append(b"tb")  # BUILD the array
    else:
      raise TypeError(type(x))

  put(obj)
  return b"".join(out) + b"."


def _cifar_files(name, seed=0, n=2, dumps=_py2_pickle):
  """{member: bytes} of a small CIFAR archive in the official layout, plus the arrays."""
  rng = np.random.default_rng(seed)
  num_classes = 10 if name == "cifar10" else 100
  train = ([f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"])
  files, arrays = {}, {}
  for member in [*train, "test_batch" if name == "cifar10" else "test"]:
    data = rng.integers(0, 256, (n, 3072), np.uint8)
    labels = [int(v) for v in rng.integers(0, num_classes, n)]
    d = {b"batch_label": member.encode(), b"data": data,
         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    if name == "cifar10":
      d[b"labels"] = labels
    else:
      d[b"fine_labels"] = labels
      d[b"coarse_labels"] = [v // 5 + 1 for v in labels]  # differs from fine, in [1, 20]
    files[member] = dumps(d)
    arrays[member] = (data, np.asarray(labels))
  if name == "cifar10":
    files["batches.meta"] = dumps({b"num_cases_per_batch": n, b"num_vis": 3072,
                                   b"label_names": [f"c{i}".encode() for i in range(10)]})
  else:
    files["meta"] = dumps({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                           b"coarse_label_names": [f"k{i}".encode() for i in range(20)]})
  return files, arrays


def _cifar_folder(name):
  return "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"


def _write_cifar_tar(path, name, files):
  folder = _cifar_folder(name)
  with tarfile.open(path, "w:gz") as tar:
    info = tarfile.TarInfo(folder)
    info.type = tarfile.DIRTYPE
    tar.addfile(info)
    for member, data in {**files, "readme.html": b"<html></html>"}.items():
      info = tarfile.TarInfo(f"{folder}/{member}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def _write_cifar_folder(root, name, files):
  folder = os.path.join(root, _cifar_folder(name))
  os.makedirs(folder)
  for member, data in files.items():
    _write(os.path.join(folder, member), data)
  return folder


class _TmpTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    self.tmp = tmp.name


class IdxTest(_TmpTest):

  def test_golden_header_and_payload(self):
    # Hand-written IDX bytes: magic 0x00000803 (= 2051, uint8, 3 dims), dims 2 x 1 x 3.
    data = (b"\x00\x00\x08\x03" + b"\x00\x00\x00\x02" + b"\x00\x00\x00\x01"
            + b"\x00\x00\x00\x03" + bytes([0, 1, 2, 250, 251, 255]))
    out = datasets.parse_idx(data, magic=datasets.IDX_IMAGES_MAGIC)
    self.assertEqual(out.dtype, np.uint8)
    np.testing.assert_array_equal(out, [[[0, 1, 2]], [[250, 251, 255]]])

  def test_golden_big_endian_int32(self):
    # Type byte 0x0C is big-endian int32: 00 00 01 00 = 256, ff ff ff fe = -2.
    data = b"\x00\x00\x0c\x01\x00\x00\x00\x02\x00\x00\x01\x00\xff\xff\xff\xfe"
    out = datasets.parse_idx(data)
    self.assertEqual(out.dtype, np.dtype("int32"))
    np.testing.assert_array_equal(out, [256, -2])

  @parameterized.parameters(False, True)
  def test_round_trip(self, compress):
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 4), np.uint8)
    labels = np.array([7, 0, 9], np.uint8)
    # The .gz suffix is omitted on purpose: compression is told by content.
    img_path = _write(os.path.join(self.tmp, "img"), _idx_bytes(images), compress)
    lab_path = _write(os.path.join(self.tmp, "lab"), _idx_bytes(labels), compress)
    np.testing.assert_array_equal(datasets.read_idx(img_path, datasets.IDX_IMAGES_MAGIC),
                                  images)
    np.testing.assert_array_equal(datasets.read_idx(lab_path, datasets.IDX_LABELS_MAGIC),
                                  labels)

  @parameterized.named_parameters(
      ("wrong_magic", lambda b: b, datasets.IDX_LABELS_MAGIC, "magic number 2051, expected 2049"),
      ("truncated_payload", lambda b: b[:-1], None, "truncated or corrupted"),
      ("trailing_bytes", lambda b: b + b"\x00", None, "truncated or corrupted"),
      ("truncated_header", lambda b: b[:9], None, "truncated IDX header"),
      ("tiny", lambda b: b[:3], None, "shorter than an IDX header"),
      ("not_idx", lambda b: b"\x01" + b[1:], None, "is not an IDX header"),
      ("bad_type", lambda b: b[:2] + b"\x07" + b[3:], None, "is not an IDX header"),
  )
  def test_corrupted_file_names_it(self, corrupt, magic, message):
    data = corrupt(_idx_bytes(np.zeros((2, 3, 3), np.uint8)))
    path = _write(os.path.join(self.tmp, "train-images-idx3-ubyte"), data)
    with self.assertRaisesRegex(datasets.DatasetFormatError, message) as ctx:
      datasets.read_idx(path, magic)
    self.assertIn(path, str(ctx.exception))

  @parameterized.named_parameters(("truncated", lambda g: g[:-10]),
                                  ("crc", lambda g: g[:-8] + bytes([g[-8] ^ 1]) + g[-7:]))
  def test_bad_gzip_names_file(self, corrupt):
    gz = gzip.compress(_idx_bytes(np.arange(100, dtype=np.uint8).reshape(1, 10, 10)))
    path = _write(os.path.join(self.tmp, "x.gz"), corrupt(gz))
    with self.assertRaisesRegex(datasets.DatasetFormatError, "bad gzip data") as ctx:
      datasets.read_idx(path)
    self.assertIn(path, str(ctx.exception))


class IdxDatasetTest(_TmpTest):

  @parameterized.parameters(False, True)
  def test_load_from_data_dir(self, compress):
    arrays = _idx_split(1)
    folder = _write_idx_dir(self.tmp, arrays, compress)
    ds = datasets.load_dataset("mnist", data_dir=folder)
    chex.assert_shape([ds.train_images, ds.test_images], [(5, 4, 3, 1), (3, 4, 3, 1)])
    self.assertEqual((ds.train_images.dtype, ds.train_labels.dtype), (np.uint8, np.int32))
    np.testing.assert_array_equal(ds.train_images[..., 0], arrays[0])
    np.testing.assert_array_equal(ds.train_labels, arrays[1])
    np.testing.assert_array_equal(ds.test_images[..., 0], arrays[2])
    np.testing.assert_array_equal(ds.test_labels, arrays[3])
    self.assertEqual((ds.num_classes, ds.class_names[3], ds.source), (10, "3", folder))
    mean, std = datasets.channel_stats(ds.train_images)
    np.testing.assert_array_equal(ds.mean, mean)
    np.testing.assert_array_equal(ds.std, std)

  def test_default_dirs_skip_incomplete_folder(self):
    partial = _write_idx_dir(os.path.join(self.tmp, "a"), _idx_split(2))
    os.remove(os.path.join(partial, _IDX_NAMES[3]))
    full = _write_idx_dir(os.path.join(self.tmp, "b"), _idx_split(3), compress=True)
    with mock.patch.dict(datasets.DEFAULT_DIRS, {"fashion_mnist": (partial, full)}):
      ds = datasets.load_dataset("fashion_mnist")
    self.assertEqual((ds.source, ds.class_names[9]), (full, "Ankle boot"))
    np.testing.assert_array_equal(ds.test_labels, _idx_split(3)[3])

  def test_missing_data_lists_every_path(self):
    dirs = (os.path.join(self.tmp, "x"), os.path.join(self.tmp, "y"))
    with mock.patch.dict(datasets.DEFAULT_DIRS, {"fashion_mnist": dirs}):
      with self.assertRaises(datasets.DatasetNotFoundError) as ctx:
        datasets.load_dataset("fashion_mnist")
    message = str(ctx.exception)
    for d in dirs:
      for name in _IDX_NAMES:
        self.assertIn(os.path.join(d, name) + "\n", message)
        self.assertIn(os.path.join(d, name) + ".gz\n", message)
    for hint in ("apt-get install dataset-fashion-mnist", "data_dir=", "--data-dir"):
      self.assertIn(hint, message)
    self.assertIsInstance(ctx.exception, FileNotFoundError)

  def test_mnist_missing_points_to_download(self):
    with self.assertRaisesRegex(datasets.DatasetNotFoundError, "yann.lecun.com"):
      datasets.load_dataset("mnist", data_dir=self.tmp)

  def test_bad_labels_and_counts_name_file(self):
    train_images, train_labels, test_images, test_labels = _idx_split(4)
    folder = _write_idx_dir(self.tmp, (train_images, train_labels, test_images,
                                       np.array([1, 10, 2])))
    with self.assertRaisesRegex(datasets.DatasetFormatError,
                                r"t10k-labels-idx1-ubyte: labels span \[1, 10\]"):
      datasets.load_dataset("mnist", data_dir=folder)
    _write_idx_dir(self.tmp, (train_images, train_labels[:4], test_images, test_labels))
    with self.assertRaisesRegex(datasets.DatasetFormatError,
                                "train-labels-idx1-ubyte: labels have shape"):
      datasets.load_dataset("mnist", data_dir=folder)

  def test_swapped_files_fail_on_magic(self):
    arrays = _idx_split(5)
    folder = _write_idx_dir(self.tmp, (arrays[1], arrays[0], arrays[2], arrays[3]))
    with self.assertRaisesRegex(datasets.DatasetFormatError,
                                "train-images-idx3-ubyte: IDX magic number 2049"):
      datasets.load_dataset("mnist", data_dir=folder)

  def test_unknown_name(self):
    with self.assertRaisesRegex(ValueError, r"name must be one of .*got 'svhn'"):
      datasets.load_dataset("svhn")


@absltest.skipUnless(os.path.isdir(_FASHION_DIR), "Debian dataset-fashion-mnist missing")
class RealFashionMnistTest(absltest.TestCase):

  def test_debian_files(self):
    ds = datasets.load_dataset("fashion_mnist")
    self.assertEqual(ds.source, _FASHION_DIR)
    chex.assert_shape([ds.train_images, ds.train_labels, ds.test_images, ds.test_labels],
                      [(60000, 28, 28, 1), (60000,), (10000, 28, 28, 1), (10000,)])
    # Fashion-MNIST is balanced: 6000 training and 1000 test images per class.
    np.testing.assert_array_equal(np.bincount(ds.train_labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)
    # Observed on the Debian package 0.0~git20200523.55506a9-1; the first training image
    # is an ankle boot (9), as in the dataset's README figure.
    np.testing.assert_array_equal(ds.train_labels[:5], [9, 0, 0, 3, 0])
    np.testing.assert_array_equal(ds.test_labels[:5], [9, 2, 1, 1, 6])
    self.assertEqual(int(ds.train_images.sum(dtype=np.int64)), 3431114169)
    self.assertEqual(int(ds.test_images.sum(dtype=np.int64)), 573469082)
    # Published Fashion-MNIST normalisation constants: mean 0.2860, std 0.3530.
    np.testing.assert_allclose(ds.mean, [0.2860], atol=5e-5)
    np.testing.assert_allclose(ds.std, [0.3530], atol=5e-5)


class PadImagesTest(absltest.TestCase):

  def test_centred_zero_padding_and_recomputed_stats(self):
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (6, 28, 28, 1), dtype=np.uint8)
    data = datasets.Dataset(images[:4], np.arange(4, dtype=np.int32), images[4:],
                            np.arange(2, dtype=np.int32), 10,
                            *datasets.channel_stats(images[:4]), tuple("abcdefghij"), "t")
    padded = datasets.pad_images(data, 32)
    self.assertEqual(padded.train_images.shape, (4, 32, 32, 1))
    self.assertEqual(padded.test_images.shape, (2, 32, 32, 1))
    np.testing.assert_array_equal(padded.train_images[:, 2:30, 2:30], images[:4])
    self.assertEqual(int(padded.train_images[:, :2].max()), 0)
    self.assertEqual(int(padded.test_images[:, :, 30:].max()), 0)
    mean, std = datasets.channel_stats(padded.train_images)
    np.testing.assert_array_equal(padded.mean, mean)
    np.testing.assert_array_equal(padded.std, std)
    self.assertLess(float(padded.mean[0]), float(data.mean[0]))
    with self.assertRaisesRegex(ValueError, "size must be an int >= the image size 28"):
      datasets.pad_images(data, 27)


class ChannelStatsTest(absltest.TestCase):

  def test_golden(self):
    images = np.zeros((2, 1, 2, 2), np.uint8)
    images[..., 0] = [[[0, 255]], [[255, 0]]]  # half black, half white: mean 1/2, std 1/2
    images[..., 1] = 51  # constant 51 / 255 = 0.2, std 0
    mean, std = datasets.channel_stats(images)
    self.assertEqual((mean.dtype, std.dtype), (np.float32, np.float32))
    np.testing.assert_allclose(mean, [0.5, 0.2], rtol=1e-7)
    np.testing.assert_allclose(std, [0.5, 0.0], rtol=1e-7, atol=1e-9)

  def test_bad_input(self):
    with self.assertRaisesRegex(ValueError, r"images must be non-empty uint8.*float32"):
      datasets.channel_stats(np.zeros((1, 2, 2, 1), np.float32))
    with self.assertRaisesRegex(ValueError, r"\(0, 2, 2, 1\)"):
      datasets.channel_stats(np.zeros((0, 2, 2, 1), np.uint8))


def _nhwc_reference(data):
  """CHW rows -> NHWC by explicit indexing: pixel (y, x) of channel c is at c*1024+y*32+x."""
  out = np.zeros((len(data), 32, 32, 3), np.uint8)
  for c in range(3):
    for y in range(32):
      out[:, y, :, c] = data[:, c * 1024 + y * 32:c * 1024 + y * 32 + 32]
  return out


class CifarTest(_TmpTest):

  def _source(self, kind, name, files):
    if kind == "archive_dir":
      _write_cifar_tar(os.path.join(self.tmp, f"{name.replace('cifar', 'cifar-')}-python"
                                    ".tar.gz"), name, files)
      return self.tmp
    if kind == "archive_file":
      return _write_cifar_tar(os.path.join(self.tmp, "any-name.tar.gz"), name, files)
    folder = _write_cifar_folder(self.tmp, name, files)
    return self.tmp if kind == "parent_dir" else folder

  @parameterized.product(kind=("archive_dir", "archive_file", "parent_dir", "folder"),
                         name=("cifar10", "cifar100"))
  def test_official_layout_loads(self, kind, name):
    files, arrays = _cifar_files(name, seed=7)
    ds = datasets.load_dataset(name, data_dir=self._source(kind, name, files))
    train = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    test = "test_batch" if name == "cifar10" else "test"
    n_train = 2 * len(train)
    chex.assert_shape([ds.train_images, ds.train_labels, ds.test_images, ds.test_labels],
                      [(n_train, 32, 32, 3), (n_train,), (2, 32, 32, 3), (2,)])
    self.assertEqual((ds.train_images.dtype, ds.train_labels.dtype), (np.uint8, np.int32))
    # Batches are concatenated in file order; CIFAR-100 labels are the fine ones.
    train_data = np.concatenate([arrays[m][0] for m in train])
    np.testing.assert_array_equal(ds.train_images, _nhwc_reference(train_data))
    np.testing.assert_array_equal(ds.train_labels,
                                  np.concatenate([arrays[m][1] for m in train]))
    np.testing.assert_array_equal(ds.test_images, _nhwc_reference(arrays[test][0]))
    np.testing.assert_array_equal(ds.test_labels, arrays[test][1])
    self.assertEqual(ds.num_classes, 10 if name == "cifar10" else 100)
    self.assertEqual(ds.class_names[:2], ("c0", "c1") if name == "cifar10" else ("f0", "f1"))
    self.assertTrue(ds.train_images.flags.c_contiguous)

  def test_one_pixel_channel_order(self):
    files, arrays = _cifar_files("cifar10", seed=3)
    data = arrays["data_batch_1"][0]
    # Pixel (y=2, x=5) of image 1: red at 2*32+5 = 69, green at 1024+69, blue at 2048+69.
    data[1, [69, 1093, 2117]] = [10, 20, 30]
    files["data_batch_1"] = _py2_pickle({b"data": data, b"labels": [0, 1]})
    ds = datasets.load_dataset("cifar10", data_dir=_write_cifar_folder(self.tmp, "cifar10",
                                                                       files))
    np.testing.assert_array_equal(ds.train_images[1, 2, 5], [10, 20, 30])

  @parameterized.parameters(2, 4, 5)
  def test_python3_pickles_load(self, protocol):
    files, arrays = _cifar_files("cifar100", seed=1,
                                 dumps=lambda d: pickle.dumps(d, protocol=protocol))
    ds = datasets.load_dataset("cifar100", data_dir=_write_cifar_folder(self.tmp, "cifar100",
                                                                        files))
    np.testing.assert_array_equal(ds.test_images, _nhwc_reference(arrays["test"][0]))

  def test_malicious_pickle_is_refused(self):
    marker = os.path.join(self.tmp, "pwned")

    class Exploit:

      def __reduce__(self):
        return os.system, (f"touch {marker}",)

    files, _ = _cifar_files("cifar10")
    files["data_batch_2"] = pickle.dumps({b"data": Exploit(), b"labels": []}, protocol=2)
    folder = _write_cifar_folder(self.tmp, "cifar10", files)
    with self.assertRaisesRegex(datasets.DatasetFormatError,
                                r"data_batch_2: .*global (posix|nt)\.system is not allowed"):
      datasets.load_dataset("cifar10", data_dir=folder)
    self.assertFalse(os.path.exists(marker))

  @parameterized.named_parameters(
      ("eval", pickle.dumps(eval), "builtins.eval"),
      ("codec", b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00zlib\x86R.",
       r"_codecs.encode\(str, 'zlib'\) refused"),
      ("subclass", b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\ndtype\nK\x00\x85"
       b"U\x01b\x87R.", "array reconstruction of <class 'numpy.dtype'> refused"),
  )
  def test_safe_unpickle_refuses(self, data, message):
    with self.assertRaisesRegex(datasets.DatasetFormatError, "f.pkl: .*" + message):
      datasets.safe_unpickle(data, "f.pkl")

  def _corrupt(self, member, data):
    files, _ = _cifar_files("cifar10")
    files[member] = data
    return _write_cifar_folder(self.tmp, "cifar10", files)

  @parameterized.named_parameters(
      ("garbage", "test_batch", b"not a pickle", "test_batch: unreadable or refused pickle"),
      ("truncated", "data_batch_3", _py2_pickle({b"data": np.zeros((2, 3072), np.uint8),
                                                 b"labels": [0, 1]})[:-100],
       "data_batch_3: unreadable or refused pickle"),
      ("short_rows", "data_batch_1", _py2_pickle({b"data": np.zeros((2, 3000), np.uint8),
                                                  b"labels": [0, 1]}),
       r"data_batch_1: b'data' must be uint8 \[n, 3072\].*\(2, 3000\)"),
      ("label_count", "data_batch_1", _py2_pickle({b"data": np.zeros((2, 3072), np.uint8),
                                                   b"labels": [0]}),
       "data_batch_1: labels have shape"),
      ("label_range", "data_batch_5", _py2_pickle({b"data": np.zeros((2, 3072), np.uint8),
                                                   b"labels": [0, 10]}),
       r"data_batch_5: labels span \[0, 10\], outside \[0, 10\)"),
      ("no_data", "data_batch_1", _py2_pickle({b"labels": [0, 1]}),
       "data_batch_1: expected a dict with keys b'data' and b'labels'"),
      ("meta", "batches.meta", _py2_pickle({b"label_names": [b"a"]}),
       "batches.meta: expected b'label_names' with 10"),
  )
  def test_corrupted_member_names_file(self, member, data, message):
    with self.assertRaisesRegex(datasets.DatasetFormatError, message):
      datasets.load_dataset("cifar10", data_dir=self._corrupt(member, data))

  def test_truncated_archive_names_it(self):
    files, _ = _cifar_files("cifar10")
    path = _write_cifar_tar(os.path.join(self.tmp, "cifar-10-python.tar.gz"), "cifar10", files)
    with open(path, "rb") as f:
      data = f.read()
    _write(path, data[:len(data) // 2])
    with self.assertRaisesRegex(datasets.DatasetFormatError,
                                "cifar-10-python.tar.gz: unreadable tar.gz archive"):
      datasets.load_dataset("cifar10", data_dir=self.tmp)

  def test_archive_missing_member(self):
    files, _ = _cifar_files("cifar10")
    del files["data_batch_4"]
    _write_cifar_tar(os.path.join(self.tmp, "cifar-10-python.tar.gz"), "cifar10", files)
    with self.assertRaisesRegex(datasets.DatasetFormatError,
                                "archive lacks .*cifar-10-batches-py/data_batch_4"):
      datasets.load_dataset("cifar10", data_dir=self.tmp)

  def test_missing_data_lists_paths_and_url(self):
    with self.assertRaises(datasets.DatasetNotFoundError) as ctx:
      datasets.load_dataset("cifar100", data_dir=self.tmp)
    message = str(ctx.exception)
    for path in (os.path.join(self.tmp, "{train,test,meta}"),
                 os.path.join(self.tmp, "cifar-100-python", "{train,test,meta}"),
                 os.path.join(self.tmp, "cifar-100-python.tar.gz")):
      self.assertIn(path, message)
    self.assertIn("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", message)
    self.assertIn("--data-dir", message)


if __name__ == "__main__":
  absltest.main()

"""Image classification datasets read from their official files, never downloaded.

MNIST and Fashion-MNIST come as IDX files (`train-images-idx3-ubyte`, ...), plain or
gzipped; Fashion-MNIST is found in the Debian package `dataset-fashion-mnist` by default.
CIFAR-10 and CIFAR-100 come as their official python-pickle archives
(`cifar-10-python.tar.gz`, `cifar-100-python.tar.gz`) or the folders they extract to.

Pickles are read with a restricted unpickler: a pickle may name any importable callable
and the stock unpickler calls it, so a tampered archive could run code (`os.system`) on
load. The CIFAR batches need nothing beyond NumPy's array and dtype reconstruction (and,
for files re-pickled by Python 3 at protocol 2, latin-1 `_codecs.encode`), so every other
global is refused.

Every file is checked before use (magic numbers, header dimensions against the payload
size, gzip and tar integrity, array shapes and label ranges): a damaged file raises
`DatasetFormatError` naming it instead of yielding garbage batches.
"""

from collections.abc import Sequence
import gzip
import io
import math
import os
import pathlib
import pickle
import struct
import tarfile
from typing import NamedTuple
import zlib

from jaxtyping import Float, Int, UInt8
import numpy as np

NAMES = ("mnist", "fashion_mnist", "cifar10", "cifar100")
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
_USER_DIR = os.path.join("~", ".cache", "pruning_jax")

# Searched in order when `load_dataset` gets no `data_dir`.
DEFAULT_DIRS: dict[str, tuple[str, ...]] = {
    "mnist": (os.path.join(_USER_DIR, "mnist"),),
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",
                      os.path.join(_USER_DIR, "fashion_mnist")),
    "cifar10": (os.path.join(_USER_DIR, "cifar10"),),
    "cifar100": (os.path.join(_USER_DIR, "cifar100"),),
}

_IDX_FILES = (("train_images", "train-images-idx3-ubyte", IDX_IMAGES_MAGIC),
              ("train_labels", "train-labels-idx1-ubyte", IDX_LABELS_MAGIC),
              ("test_images", "t10k-images-idx3-ubyte", IDX_IMAGES_MAGIC),
              ("test_labels", "t10k-labels-idx1-ubyte", IDX_LABELS_MAGIC))
# IDX type byte -> big-endian NumPy dtype.
_IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_FASHION_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot")
_CIFAR_URL = "download https://www.cs.toronto.edu/~kriz/{} (extracting it is optional)"
_HOW_TO_GET = {
    "mnist": "download the four files from https://yann.lecun.com/exdb/mnist/ (no Debian "
             "package ships MNIST)",
    "fashion_mnist": "install the Debian package: `apt-get install dataset-fashion-mnist` "
                     "(or get the files from https://github.com/zalandoresearch/fashion-mnist)",
    "cifar10": _CIFAR_URL.format("cifar-10-python.tar.gz"),
    "cifar100": _CIFAR_URL.format("cifar-100-python.tar.gz"),
}


class _CifarLayout(NamedTuple):
  folder: str
  archive: str
  train: tuple[str, ...]
  test: str
  meta: str
  label_key: bytes
  names_key: bytes
  num_classes: int


_CIFAR = {
    "cifar10": _CifarLayout("cifar-10-batches-py", "cifar-10-python.tar.gz",
                            tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                            "batches.meta", b"labels", b"label_names", 10),
    "cifar100": _CifarLayout("cifar-100-python", "cifar-100-python.tar.gz", ("train",),
                             "test", "meta", b"fine_labels", b"fine_label_names", 100),
}


class DatasetNotFoundError(FileNotFoundError):
  """No location holds a dataset's files; the message lists every path looked for."""


class DatasetFormatError(ValueError):
  """A dataset file is truncated, corrupted or not in the official format."""


class Dataset(NamedTuple):
  """A train/test split held in host memory.

  Attributes:
    train_images: uint8 [n, h, w, c], NHWC.
    train_labels: int32 [n], in [0, num_classes).
    test_images: uint8 [m, h, w, c].
    test_labels: int32 [m].
    num_classes: number of classes.
    mean: float32 [c], per-channel mean of the training pixels scaled to [0, 1].
    std: float32 [c], per-channel (population) standard deviation of the same.
    class_names: one name per class.
    source: the folder or archive the data was read from.
  """

  train_images: UInt8[np.ndarray, "n h w c"]
  train_labels: Int[np.ndarray, "n"]
  test_images: UInt8[np.ndarray, "m h w c"]
  test_labels: Int[np.ndarray, "m"]
  num_classes: int
  mean: Float[np.ndarray, "c"]
  std: Float[np.ndarray, "c"]
  class_names: tuple[str, ...]
  source: str


def parse_idx(data: bytes, where: str = "<bytes>", magic: int | None = None) -> np.ndarray:
  """Parses the bytes of an (uncompressed) IDX file into a native-endian array.

  Args:
    data: the file's bytes: 2 zero bytes, a type byte, a dimension count, the
      dimensions as big-endian uint32, then the big-endian payload.
    where: the file's name, for error messages.
    magic: the magic number (first 4 bytes, big-endian) required, e.g.
      `IDX_IMAGES_MAGIC`; None accepts any valid IDX type.

  Returns:
    The array, shaped by the header's dimensions.

  Raises:
    DatasetFormatError: bad magic number or payload size differing from the header's.
  """
  if len(data) < 4:
    raise DatasetFormatError(f"{where}: {len(data)} bytes, shorter than an IDX header.")
  found = int.from_bytes(data[:4], "big")
  if magic is not None and found != magic:
    raise DatasetFormatError(f"{where}: IDX magic number {found}, expected {magic}; not the "
                             "right IDX file or corrupted.")
  ndim = data[3]
  if data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES or ndim == 0:
    raise DatasetFormatError(f"{where}: magic number {found:#010x} is not an IDX header "
                             f"(00 00, type in {sorted(_IDX_DTYPES)}, >= 1 dimension).")
  offset = 4 + 4 * ndim
  if len(data) < offset:
    raise DatasetFormatError(f"{where}: truncated IDX header ({len(data)} bytes, the "
                             f"{ndim} dimensions need {offset}).")
  dims = struct.unpack(f">{ndim}I", data[4:offset])
  dtype = _IDX_DTYPES[data[2]]
  want = math.prod(dims) * dtype.itemsize
  if len(data) - offset != want:
    raise DatasetFormatError(f"{where}: {len(data) - offset} payload bytes, but the header's "
                             f"dimensions {dims} need {want}; the file is truncated or "
                             "corrupted.")
  flat = np.frombuffer(data, dtype, math.prod(dims), offset)
  return flat.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def read_idx(path: str | os.PathLike, magic: int | None = None) -> np.ndarray:
  """Reads an IDX file, gzipped or not (told by content, not by name); see `parse_idx`."""
  data = pathlib.Path(path).read_bytes()
  if data[:2] == b"\x1f\x8b":  # gzip magic
    try:
      data = gzip.decompress(data)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
      raise DatasetFormatError(f"{path}: bad gzip data ({e}); the file is truncated or "
                               "corrupted, fetch it again.") from e
  return parse_idx(data, str(path), magic)


def channel_stats(images: UInt8[np.ndarray, "n h w c"]
                  ) -> tuple[Float[np.ndarray, "c"], Float[np.ndarray, "c"]]:
  """Exact per-channel mean and population std of uint8 pixels scaled to [0, 1].

  Computed from 256-bin histograms, so the result is exact in float64 whatever the size.
  The constants published for CIFAR-10, (0.4914, 0.4822, 0.4465) and (0.2470, 0.2435,
  0.2616), are these statistics of its training set.

  Args:
    images: uint8 [n, h, w, c] with n >= 1.

  Returns:
    (mean, std), float32 [c] each.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"images must be non-empty uint8 [n, h, w, c]; got {images.dtype} "
                     f"{images.shape}.")
  values = np.arange(256, dtype=np.float64) / 255.0
  mean, std = [], []
  for ch in range(images.shape[-1]):
    counts = np.bincount(images[..., ch].ravel(), minlength=256)
    m = counts @ values / counts.sum()
    mean.append(m)
    std.append(math.sqrt(counts @ (values - m)**2 / counts.sum()))
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def _not_found(name: str, looked: Sequence[str]) -> DatasetNotFoundError:
  paths = "\n".join(f"  {p}" for p in looked)
  return DatasetNotFoundError(
      f"{name}: no data found. Looked for:\n{paths}\nTo get it, {_HOW_TO_GET[name]}, then "
      "pass its folder as data_dir= (--data-dir on the experiment scripts) or put it in "
      f"one of the default folders {DEFAULT_DIRS[name]}.")


def _check_labels(labels: np.ndarray, n: int, num_classes: int, where: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != (n,) or labels.dtype.kind not in "iu":
    raise DatasetFormatError(f"{where}: labels have shape {labels.shape} and dtype "
                             f"{labels.dtype}, expected {n} integers.")
  if n and (labels.min() < 0 or labels.max() >= num_classes):
    raise DatasetFormatError(f"{where}: labels span [{labels.min()}, {labels.max()}], "
                             f"outside [0, {num_classes}).")
  return labels.astype(np.int32)


def _load_idx(name: str, dirs: Sequence[str]) -> Dataset:
  looked = []
  for d in dirs:
    found = {}
    for key, base, _ in _IDX_FILES:
      candidates = [os.path.join(d, base), os.path.join(d, base + ".gz")]
      looked.extend(candidates)
      hit = next((c for c in candidates if os.path.isfile(c)), None)
      if hit is not None:
        found[key] = hit
    if len(found) == len(_IDX_FILES):
      break
  else:
    raise _not_found(name, looked)
  arrays = {key: read_idx(found[key], magic) for key, _, magic in _IDX_FILES}
  splits = []
  for split in ("train", "test"):
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    labels = _check_labels(labels, len(images), 10, found[f"{split}_labels"])
    splits += [images[..., None], labels]
  class_names = tuple(map(str, range(10))) if name == "mnist" else _FASHION_NAMES
  return Dataset(*splits, 10, *channel_stats(splits[0]), class_names, d)


def _np_reconstruct(subtype, shape, dtype):
  if subtype is not np.ndarray:
    raise pickle.UnpicklingError(f"array reconstruction of {subtype!r} refused.")
  return np.ndarray.__new__(np.ndarray, shape, dtype)


def _np_frombuffer(buf, dtype, shape, order):
  return np.frombuffer(buf, dtype).reshape(shape, order=order)


def _latin1_encode(text, encoding):
  # Python 3 writes bytes at protocol 2 as _codecs.encode(text, "latin1").
  if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
    raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) "
                                 "refused.")
  return text.encode("latin1")


# (module, name) -> what a pickle naming it gets. NumPy 1 and 2 name their module differently.
_PICKLE_GLOBALS = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                   ("_codecs", "encode"): _latin1_encode}
for _core in ("numpy.core", "numpy._core"):
  _PICKLE_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _np_reconstruct
  _PICKLE_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _np_frombuffer


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler resolving only the globals NumPy arrays need (see the module docstring)."""

  def find_class(self, module, name):
    fn = _PICKLE_GLOBALS.get((module, name))
    if fn is None:
      raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset "
                                   "pickle (only NumPy array reconstruction is).")
    return fn


def safe_unpickle(data: bytes, where: str = "<bytes>"):
  """Unpickles `data` with encoding="bytes", refusing every global but NumPy's array
  reconstruction; a refused global or a damaged pickle raises `DatasetFormatError`
  naming `where` (the file)."""
  try:
    return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
  except Exception as e:  # a damaged stream can fail in many ways, all of them "bad file"
    raise DatasetFormatError(f"{where}: unreadable or refused pickle ({type(e).__name__}: "
                             f"{e}).") from e


def _find_cifar(name: str, dirs: Sequence[str]) -> str:
  layout = _CIFAR[name]
  members = (*layout.train, layout.test, layout.meta)
  looked = []
  for d in dirs:
    if os.path.isfile(d):
      return d
    for folder in (d, os.path.join(d, layout.folder)):
      looked.append(f"{folder}{os.sep}{{{','.join(members)}}}")
      if all(os.path.isfile(os.path.join(folder, m)) for m in members):
        return folder
    archive = os.path.join(d, layout.archive)
    looked.append(archive)
    if os.path.isfile(archive):
      return archive
  raise _not_found(name, looked)


def _read_cifar_members(source: str, layout: _CifarLayout) -> dict[str, tuple[bytes, str]]:
  members = (*layout.train, layout.test, layout.meta)
  if os.path.isdir(source):
    paths = {m: os.path.join(source, m) for m in members}
    return {m: (pathlib.Path(p).read_bytes(), p) for m, p in paths.items()}
  wanted = {f"{layout.folder}/{m}": m for m in members}
  out = {}
  try:
    # Members are read into memory by exact name, never extracted to disk.
    with tarfile.open(source, "r:*") as tar:
      for info in tar:
        if info.name in wanted and info.isfile():
          out[wanted[info.name]] = (tar.extractfile(info).read(), f"{source}:{info.name}")
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    raise DatasetFormatError(f"{source}: unreadable tar.gz archive ({e}); it is truncated or "
                             "corrupted, fetch it again.") from e
  missing = [f"{layout.folder}/{m}" for m in members if m not in out]
  if missing:
    raise DatasetFormatError(f"{source}: archive lacks {missing}; not the official "
                             f"{layout.archive}.")
  return out


def _cifar_batch(raw: bytes, where: str, layout: _CifarLayout):
  batch = safe_unpickle(raw, where)
  if not isinstance(batch, dict) or b"data" not in batch or layout.label_key not in batch:
    raise DatasetFormatError(f"{where}: expected a dict with keys b'data' and "
                             f"{layout.label_key!r}.")
  data = batch[b"data"]
  if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape[1:] != (3072,):
    raise DatasetFormatError(f"{where}: b'data' must be uint8 [n, 3072] (3 x 32 x 32), got "
                             f"{getattr(data, 'dtype', type(data).__name__)} "
                             f"{getattr(data, 'shape', '')}.")
  labels = _check_labels(np.asarray(batch[layout.label_key]), len(data), layout.num_classes,
                         where)
  # Rows are CHW row-major: 1024 red, then 1024 green, then 1024 blue values.
  images_Nx32x32x3 = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images_Nx32x32x3), labels


def _load_cifar(name: str, dirs: Sequence[str]) -> Dataset:
  layout = _CIFAR[name]
  source = _find_cifar(name, dirs)
  members = _read_cifar_members(source, layout)
  train = [_cifar_batch(*members[m], layout) for m in layout.train]
  test_images, test_labels = _cifar_batch(*members[layout.test], layout)
  train_images = np.concatenate([t[0] for t in train])
  train_labels = np.concatenate([t[1] for t in train])
  meta_raw, meta_where = members[layout.meta]
  meta = safe_unpickle(meta_raw, meta_where)
  names = meta.get(layout.names_key) if isinstance(meta, dict) else None
  if not isinstance(names, list) or len(names) != layout.num_classes or not all(
      isinstance(n, bytes) for n in names):
    raise DatasetFormatError(f"{meta_where}: expected {layout.names_key!r} with "
                             f"{layout.num_classes} byte-string class names.")
  class_names = tuple(n.decode("utf-8", "replace") for n in names)
  return Dataset(train_images, train_labels, test_images, test_labels, layout.num_classes,
                 *channel_stats(train_images), class_names, source)


def pad_images(data: Dataset, size: int) -> Dataset:
  """The dataset with every image zero-padded (centred) to `size` x `size`.

  Fashion-MNIST's 28x28 images padded to 32x32 fit the CIFAR ResNets unchanged. Padding
  pixels are 0 (black, the images' background); the normalisation constants are
  recomputed over the padded training images.
  """
  h, w = data.train_images.shape[1:3]
  if isinstance(size, bool) or not isinstance(size, int) or size < max(h, w):
    raise ValueError(f"size must be an int >= the image size {max(h, w)}, got {size!r}.")
  top, left = (size - h) // 2, (size - w) // 2
  widths = ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0))
  train = np.pad(data.train_images, widths)
  test = np.pad(data.test_images, widths)
  mean, std = channel_stats(train)
  return data._replace(train_images=train, test_images=test, mean=mean, std=std)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
  """Loads a dataset's train and test splits from its official files.

  Normalisation constants are computed from the training split (`channel_stats`), so they
  follow whatever files are given; for the official files they match the published ones.

  Args:
    name: one of `NAMES`.
    data_dir: folder holding the files (for CIFAR also the extracted folder or the
      tar.gz itself); None searches `DEFAULT_DIRS[name]` in order.

  Returns:
    The `Dataset`.

  Raises:
    ValueError: unknown `name`.
    DatasetNotFoundError: no location holds the files (the message lists them all).
    DatasetFormatError: a file is damaged or not in the official format.

  References: LeCun, Bottou, Bengio, Haffner 1998 (MNIST); Xiao, Rasul, Vollgraf 2017,
  arXiv 1708.07747 (Fashion-MNIST); Krizhevsky 2009, tech. report (CIFAR-10/100).
  """
  if name not in NAMES:
    raise ValueError(f"name must be one of {NAMES}; got {name!r}.")
  dirs = ([os.fspath(data_dir)] if data_dir is not None else
          [os.path.expanduser(d) for d in DEFAULT_DIRS[name]])
  if name in _CIFAR:
    return _load_cifar(name, dirs)
  return _load_idx(name, dirs)

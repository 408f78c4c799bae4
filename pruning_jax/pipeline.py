"""Host-side input pipeline: seeded epoch shuffling, padded evaluation batches, on-device
augmentation and placement of host batches onto a device mesh.

Batches are dicts {"image": uint8 [b, h, w, c], "label": int32 [b]} (eval batches add
"weight"). They stay uint8 on the host, a quarter of float32's transfer size; `augment`
and `normalize` turn them into float32 inside the jitted step, with explicit keys.
"""

from collections.abc import Iterator, Mapping
import numbers

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int, PyTree, UInt8
import numpy as np

Batch = dict[str, np.ndarray]
PAD_MODES = ("zero", "reflect")


def _check_int(name: str, value, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise ValueError(f"{name} must be an integer >= {low}; got {value!r}.")
  return int(value)


def _check_pair(images, labels) -> tuple[np.ndarray, np.ndarray]:
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim < 1 or labels.ndim != 1 or len(images) != len(labels):
    raise ValueError(f"images [n, ...] and labels [n] must share n; got shapes "
                     f"{images.shape} and {labels.shape}.")
  if labels.dtype.kind not in "iu":
    raise ValueError(f"labels must be integers; got dtype {labels.dtype}.")
  return images, labels.astype(np.int32)


class EpochIterator:
  """Endless iterator over shuffled batches, one fresh permutation per epoch.

  Epoch e's order is `np.random.default_rng([seed, e]).permutation(n)`: a pure function
  of (seed, epoch), so `state()` / `restore()` resume bit-exactly without saving any
  generator state. Seeding with the pair rather than `seed + e` keeps runs with adjacent
  seeds from replaying each other's epochs shifted by one.

  Each epoch visits every sample exactly once, except the last `n % batch_size` of its
  permutation when `drop_last` is True. With `drop_last=False` the last batch of an epoch
  is smaller, so a jitted step retraces for it; evaluation should use `eval_batches`.

  Attributes:
    batch_size: samples per batch.
    steps_per_epoch: batches per epoch.
  """

  def __init__(self, images: UInt8[np.ndarray, "n h w c"], labels: Int[np.ndarray, "n"],
               batch_size: int, seed: int, drop_last: bool = True):
    """Initialises the iterator at epoch 0, batch 0.

    Args:
      images: [n, ...] host array (uint8 NHWC for images); never copied.
      labels: integer [n].
      batch_size: samples per batch, in [1, n] when `drop_last`.
      seed: integer >= 0.
      drop_last: drop each epoch's incomplete last batch.
    """
    self._images, self._labels = _check_pair(images, labels)
    n = len(self._labels)
    self.batch_size = _check_int("batch_size", batch_size, 1)
    self._seed = _check_int("seed", seed, 0)
    if n == 0:
      raise ValueError("images and labels must hold at least one sample; got n=0.")
    if drop_last and batch_size > n:
      raise ValueError(f"batch_size must be in [1, n={n}] with drop_last=True (else no "
                       f"batch is ever full); got {batch_size}. Lower it or pass "
                       "drop_last=False.")
    self.steps_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
    self._epoch, self._index = 0, 0
    self._cached: tuple[int, np.ndarray] | None = None

  def permutation(self, epoch: int) -> Int[np.ndarray, "n"]:
    """The sample order of `epoch`."""
    if self._cached is None or self._cached[0] != epoch:
      rng = np.random.default_rng([self._seed, _check_int("epoch", epoch, 0)])
      self._cached = (epoch, rng.permutation(len(self._labels)))
    return self._cached[1]

  def __iter__(self) -> "EpochIterator":
    return self

  def __next__(self) -> Batch:
    start = self._index * self.batch_size
    idx_B = self.permutation(self._epoch)[start:start + self.batch_size]
    batch = {"image": self._images[idx_B], "label": self._labels[idx_B]}
    self._index += 1
    if self._index == self.steps_per_epoch:
      self._epoch, self._index = self._epoch + 1, 0
    return batch

  def state(self) -> dict[str, int]:
    """The position of the next batch, as JSON-able {"epoch", "index"}."""
    return {"epoch": self._epoch, "index": self._index}

  def restore(self, state: Mapping[str, int]) -> None:
    """Moves to a position returned by `state()` (of an iterator over the same data,
    batch size, seed and drop_last)."""
    if not isinstance(state, Mapping) or set(state) != {"epoch", "index"}:
      raise ValueError(f"state must be a mapping with exactly the keys 'epoch' and 'index' "
                       f"(from state()); got {state!r}.")
    epoch = _check_int("state['epoch']", state["epoch"], 0)
    index = _check_int("state['index']", state["index"], 0)
    if index >= self.steps_per_epoch:
      raise ValueError(f"state['index'] must be in [0, steps_per_epoch="
                       f"{self.steps_per_epoch}); got {index}. Was it saved with another "
                       "batch size or dataset?")
    self._epoch, self._index = epoch, index


def eval_batches(images: UInt8[np.ndarray, "n h w c"], labels: Int[np.ndarray, "n"],
                 batch_size: int) -> Iterator[Batch]:
  """Batches over the data in order, all of size `batch_size`, so evaluation jits once.

  The last batch is padded with zero images and label 0; "weight" (float32 [b]) is 1 for
  real samples and 0 for padding, for weighted sums (divide by the weights' total).

  Args:
    images: [n, ...] host array.
    labels: integer [n].
    batch_size: integer >= 1.

  Returns:
    An iterator of {"image", "label", "weight"} dicts, ceil(n / batch_size) of them.
  """
  images, labels = _check_pair(images, labels)
  batch_size = _check_int("batch_size", batch_size, 1)

  def batches():
    for start in range(0, len(labels), batch_size):
      real = min(batch_size, len(labels) - start)
      image = np.zeros((batch_size, *images.shape[1:]), images.dtype)
      image[:real] = images[start:start + real]
      label = np.zeros(batch_size, np.int32)
      label[:real] = labels[start:start + real]
      weight = (np.arange(batch_size) < real).astype(np.float32)
      yield {"image": image, "label": label, "weight": weight}

  return batches()


def _check_images(images) -> tuple[int, int, int, int]:
  if jnp.ndim(images) != 4 or jnp.result_type(images) != jnp.uint8:
    raise ValueError(f"images must be uint8 [b, h, w, c]; got {jnp.result_type(images)} "
                     f"{jnp.shape(images)}.")
  return jnp.shape(images)


def _check_stats(c: int, mean, std) -> None:
  for name, value in (("mean", mean), ("std", std)):
    if np.shape(value) != (c,):
      raise ValueError(f"{name} must have shape ({c},), one value per channel; got "
                       f"{np.shape(value)}.")


def normalize(images: UInt8[Array, "b h w c"], mean: Float[Array, "c"],
              std: Float[Array, "c"]) -> Float[Array, "b h w c"]:
  """(images / 255 - mean) / std in float32, the evaluation-time transform.

  Args:
    images: uint8 [b, h, w, c].
    mean: per-channel mean of pixels scaled to [0, 1], [c] (`Dataset.mean`).
    std: per-channel std of the same, [c], positive.

  Returns:
    float32 [b, h, w, c].
  """
  _check_stats(_check_images(images)[-1], mean, std)
  scaled = jnp.asarray(images, jnp.float32) / 255.0
  return (scaled - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment(key: Array, images: UInt8[Array, "b h w c"], *, mean: Float[Array, "c"],
            std: Float[Array, "c"], pad: int = 4, flip: bool = True,
            pad_mode: str = "zero") -> Float[Array, "b h w c"]:
  """Random pad-and-crop and horizontal flip per sample, then `normalize`; jittable.

  Each sample is padded by `pad` pixels on every side and an h x w window is cropped at
  a uniform offset in [0, 2 * pad]^2, then mirrored left-right with probability 1/2
  (RandomCrop(32, padding=4) + RandomHorizontalFlip, the standard CIFAR recipe). The AP
  reference code uses torchvision's default zero padding, applied to the uint8 pixels
  before normalisation, which `pad_mode="zero"` reproduces (padding normalises to
  -mean / std); "reflect" mirrors the border instead. `pad`, `flip` and `pad_mode` fix
  the program (static under jit); the key and pixels are traced, so new batches and
  keys reuse it.

  Args:
    key: PRNG key; the batch's randomness derives from it alone.
    images: uint8 [b, h, w, c].
    mean: [c], see `normalize`.
    std: [c], see `normalize`.
    pad: padding in pixels, >= 0 (0 disables cropping); < min(h, w) for "reflect".
    flip: enable the random horizontal flip.
    pad_mode: "zero" or "reflect".

  Returns:
    float32 [b, h, w, c].

  References: He, Zhang, Ren, Sun 2016, arXiv 1512.03385 (4-pixel pad, 32 x 32 crop and
  flip on CIFAR); Liu, Ghosh, Tan, Motani 2023, arXiv 2212.06145 (AP).
  """
  b, h, w, c = _check_images(images)
  _check_stats(c, mean, std)
  pad = _check_int("pad", pad, 0)
  if pad_mode not in PAD_MODES:
    raise ValueError(f"pad_mode must be one of {PAD_MODES}; got {pad_mode!r}.")
  if pad_mode == "reflect" and pad >= min(h, w):
    raise ValueError(f"pad must be < min(h, w) = {min(h, w)} with pad_mode='reflect' (the "
                     f"mirror needs that many pixels); got {pad}.")
  crop_key, flip_key = jax.random.split(key)
  if pad:
    mode = "constant" if pad_mode == "zero" else "reflect"
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    offsets_Bx2 = jax.random.randint(crop_key, (b, 2), 0, 2 * pad + 1)
    images = jax.vmap(lambda im, o: lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
        padded, offsets_Bx2)
  if flip:
    mirror_B = jax.random.bernoulli(flip_key, 0.5, (b,))
    images = jnp.where(mirror_B[:, None, None, None], images[:, :, ::-1], images)
  return normalize(images, mean, std)


def shard_batch(batch: PyTree[np.ndarray], mesh: Mesh, axis: str = "data"
                ) -> PyTree[Array]:
  """Places a host batch on `mesh`, every leaf split along its first dimension.

  Leaves get `NamedSharding(mesh, P(axis))`: sharded over the mesh axis `axis`,
  replicated over the others. Single-process: the host holds the whole global batch.

  Args:
    batch: pytree of arrays sharing the leading batch dimension.
    mesh: the device mesh.
    axis: name of the data-parallel mesh axis.

  Returns:
    The batch as sharded `jax.Array`s.
  """
  if axis not in mesh.axis_names:
    raise ValueError(f"axis must name a mesh axis, one of {mesh.axis_names}; got {axis!r}.")
  shards = mesh.shape[axis]

  def check(path, leaf):
    shape = jnp.shape(leaf)
    if not shape or shape[0] % shards:
      raise ValueError(f"batch{jax.tree_util.keystr(path)} has shape {shape}: its leading "
                       f"(batch) size must be divisible by the {shards} shards of mesh axis "
                       f"{axis!r}; use a batch size that is a multiple of {shards}.")

  jax.tree.map_with_path(check, batch)
  return jax.device_put(batch, NamedSharding(mesh, PartitionSpec(axis)))

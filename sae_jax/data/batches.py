"""Seeded, resumable shuffled batches from an activation store.

See :class:`ShuffledBatches`; the store format itself is in :mod:`sae_jax.data.store`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
from jaxtyping import Float

from sae_jax.data.store import DEFAULT_BUFFER_ROWS
from sae_jax.data.store import StoreReader
from sae_jax.data.store import to_float32


class ShuffledBatches:
  """Endless, seeded, resumable ``[batch_size, d]`` float32 batches from a store.

  Each epoch lays the store's rows out as one stream, cuts it into shuffle blocks, reads
  each block into memory and permutes it by its own seed (a shuffle buffer whose contents
  depend only on the block index, so any position can be re-created without replaying the
  stream). Epochs follow one another without a gap, so a batch may straddle two epochs and
  every row appears exactly once per epoch. Process ``i`` of ``P`` takes rows
  ``[i * batch_size, (i + 1) * batch_size)`` of each global batch of ``P * batch_size``
  rows and reads only those rows.

  Two layouts of the stream:

  - ``mix_shards=False`` (default): the shards one after another in a seeded random order,
    cut into blocks of ``buffer_rows`` rows. A block spans one or a few shards, so when
    shards differ in content (different corpora or documents harvested in order) the
    stream drifts from shard to shard.
  - ``mix_shards=True``: the epoch has ``num_blocks = ceil(count / buffer_rows)`` blocks
    and block ``j`` holds the ``j``-th equal slice of every shard (``shard_rows[s] //
    num_blocks`` rows, give or take one), visited in a seeded random order. Every block,
    and so every batch, draws on every shard of at least ``num_blocks`` rows in proportion
    to its size. A block holds ``count / num_blocks`` rows give or take the number of
    shards (``buffer_rows`` plus at most one row per shard), and costs one contiguous read
    per shard: cheap from SSD or the page cache, slow from a spinning disk when the store
    is far larger than memory.

  Args:
    reader: the store.
    batch_size: rows per batch and process.
    seed: non-negative integer seed.
    buffer_rows: shuffle-buffer block size (memory: ``buffer_rows * d * 4`` bytes).
    process_index, process_count: this process and the number of processes.
    num_epochs: stop before the first batch that needs rows beyond this many epochs;
      ``None`` runs forever.
    mix_shards: the layout above; a ``state`` restores only into the same layout.
  """

  def __init__(self, reader: StoreReader, batch_size: int, seed: int,
               buffer_rows: int = DEFAULT_BUFFER_ROWS, *, process_index: int = 0,
               process_count: int = 1, num_epochs: int | None = None, mix_shards: bool = False):
    epochs = 1 if num_epochs is None else num_epochs
    checks = (("batch_size", batch_size, 1), ("buffer_rows", buffer_rows, 1), ("seed", seed, 0),
              ("process_count", process_count, 1), ("num_epochs", epochs, 1))
    for name, value, low in checks:
      if value < low:
        raise ValueError(f"{name} must be >= {low}; got {value}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, process_count={process_count}); got "
                       f"{process_index}.")
    if not isinstance(mix_shards, bool):
      raise ValueError(f"mix_shards must be True or False; got {mix_shards!r}.")
    if batch_size * process_count > reader.count:
      raise ValueError(f"batch_size * process_count = {batch_size * process_count} exceeds "
                       f"the store's {reader.count} rows; use smaller batches.")
    self.reader, self.batch_size, self.seed = reader, batch_size, seed
    self.buffer_rows, self.num_epochs = buffer_rows, num_epochs
    self.process_index, self.process_count = process_index, process_count
    self.mix_shards = mix_shards
    self.step, self._layouts, self._blocks = 0, OrderedDict(), OrderedDict()

  @property
  def global_batch(self) -> int:
    return self.batch_size * self.process_count

  def state(self) -> dict:
    """A small JSON-able position; ``restore`` on it continues exactly from here."""
    rows, n = self.step * self.global_batch, self.reader.count
    return {"step": self.step, "epoch": rows // n, "position": rows % n, "seed": self.seed,
            "global_batch": self.global_batch, "buffer_rows": self.buffer_rows, "count": n,
            "mix_shards": self.mix_shards}

  def restore(self, state: Mapping) -> None:
    """Continues from ``state`` (taken on any process of the same run)."""
    mine = self.state()
    defaults = {"mix_shards": False}  # states written before the option existed
    for key in ("seed", "global_batch", "buffer_rows", "count", "mix_shards"):
      theirs = state.get(key, defaults.get(key))
      if theirs != mine[key]:
        raise ValueError(f"state[{key!r}] = {theirs!r} but this iterator has "
                         f"{key}={mine[key]!r}; restore needs the same setting.")
    if not isinstance(state.get("step"), int) or state["step"] < 0:
      raise ValueError(f"state['step'] must be an int >= 0; got {state.get('step')!r}.")
    self.step = state["step"]

  def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, ...]:
    """The epoch's stream as segments of shards, and where its blocks start.

    Returns ``(seg_shard, seg_local, seg_starts, block_starts)``: stream rows
    ``[seg_starts[i], seg_starts[i + 1])`` are rows ``seg_local[i]...`` of shard
    ``seg_shard[i]``, and block ``b`` is stream rows ``[block_starts[b], block_starts[b + 1])``.
    """
    if epoch not in self._layouts:
      sizes = np.asarray(self.reader.shard_rows, np.int64)
      n, size = self.reader.count, self.buffer_rows
      order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(sizes))
      if self.mix_shards:
        k = -(-n // size)
        # Shard i of the order cuts at (j * rows + phase_i) // k: staggered phases round the
        # shards' slices up in different blocks, so the blocks differ in size by little.
        phase = np.arange(len(sizes), dtype=np.int64) * k // len(sizes)
        cuts = (np.arange(k + 1, dtype=np.int64)[:, None] * sizes[order] + phase) // k  # [k+1, S]
        visit = np.random.default_rng([self.seed, epoch, 2]).permutation(k)
        seg_local, seg_len = cuts[visit], (cuts[1:] - cuts[:-1])[visit]
        seg_shard = np.broadcast_to(order, seg_len.shape)
        block_starts = np.concatenate([[0], np.cumsum(seg_len.sum(1))])
        keep = seg_len.ravel() > 0
        seg_shard, seg_local, seg_len = (a.ravel()[keep] for a in (seg_shard, seg_local, seg_len))
      else:
        seg_shard, seg_local, seg_len = order, np.zeros_like(order), sizes[order]
        block_starts = np.append(np.arange(0, n, size, dtype=np.int64), n)
      seg_starts = np.concatenate([[0], np.cumsum(seg_len)])
      self._layouts[epoch] = (seg_shard, seg_local, seg_starts, block_starts)
      if len(self._layouts) > 2:
        self._layouts.popitem(last=False)
    return self._layouts[epoch]

  def _block(self, epoch: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A block's permutation, the stream rows this process owns in it (sorted), their data."""
    key = (epoch, block)
    if key not in self._blocks:
      n = self.reader.count
      seg_shard, seg_local, seg_starts, block_starts = self._epoch_layout(epoch)
      lo, hi = int(block_starts[block]), int(block_starts[block + 1])
      perm = lo + np.random.default_rng([self.seed, epoch, 1, block]).permutation(hi - lo)
      positions = np.arange(lo, hi, dtype=np.int64)
      own = (epoch * n + positions) // self.batch_size % self.process_count == self.process_index
      src = np.sort(perm[own])  # rows of this epoch's stream, read in order
      seg = np.searchsorted(seg_starts, src, "right") - 1
      rows = np.empty((len(src), self.reader.d), np.float32)
      cuts = np.concatenate([[0], np.flatnonzero(np.diff(seg)) + 1, [len(src)]])
      for a, b in zip(cuts[:-1], cuts[1:]):
        local = src[a:b] - seg_starts[seg[a]] + seg_local[seg[a]]
        span = slice(local[0], local[-1] + 1) if local[-1] - local[0] == b - a - 1 else local
        shard = self.reader.shard(int(seg_shard[seg[a]]))
        rows[a:b] = to_float32(shard[span], self.reader.dtype)
      self._blocks[key] = (perm, src, rows)
      if len(self._blocks) > 2:
        self._blocks.popitem(last=False)
    return self._blocks[key]

  def __iter__(self) -> ShuffledBatches:
    return self

  def __next__(self) -> Float[np.ndarray, "b d"]:
    n = self.reader.count
    if self.num_epochs is not None and (self.step + 1) * self.global_batch > self.num_epochs * n:
      raise StopIteration
    first = self.step * self.global_batch + self.process_index * self.batch_size
    pos = np.arange(first, first + self.batch_size, dtype=np.int64)
    epoch, within = pos // n, pos % n
    block = np.empty_like(within)
    for e in np.unique(epoch):  # a batch straddles at most two epochs
      at = epoch == e
      block[at] = np.searchsorted(self._epoch_layout(int(e))[3], within[at], "right") - 1
    key = epoch * (n + 1) + block
    batch = np.empty((self.batch_size, self.reader.d), np.float32)
    for part in np.split(np.arange(self.batch_size), np.flatnonzero(np.diff(key)) + 1):
      e, b = int(epoch[part[0]]), int(block[part[0]])
      perm, src, rows = self._block(e, b)
      wanted = perm[within[part] - self._epoch_layout(e)[3][b]]
      batch[part] = rows[np.searchsorted(src, wanted)]
    self.step += 1
    return batch

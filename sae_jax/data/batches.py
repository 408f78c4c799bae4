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

  Each epoch visits the shards in a seeded random order; the resulting row stream is cut
  into blocks of ``buffer_rows`` rows, each read into memory and permuted by its own seed
  (a shuffle buffer whose contents depend only on the block index, so any position can be
  re-created without replaying the stream). Epochs follow one another without a gap, so a
  batch may straddle two epochs and every row appears exactly once per epoch. Process
  ``i`` of ``P`` takes rows ``[i * batch_size, (i + 1) * batch_size)`` of each global batch
  of ``P * batch_size`` rows and reads only those rows.

  Args:
    reader: the store.
    batch_size: rows per batch and process.
    seed: non-negative integer seed.
    buffer_rows: shuffle-buffer block size (memory: ``buffer_rows * d * 4`` bytes).
    process_index, process_count: this process and the number of processes.
    num_epochs: stop before the first batch that needs rows beyond this many epochs;
      ``None`` runs forever.
  """

  def __init__(self, reader: StoreReader, batch_size: int, seed: int,
               buffer_rows: int = DEFAULT_BUFFER_ROWS, *, process_index: int = 0,
               process_count: int = 1, num_epochs: int | None = None):
    epochs = 1 if num_epochs is None else num_epochs
    checks = (("batch_size", batch_size, 1), ("buffer_rows", buffer_rows, 1), ("seed", seed, 0),
              ("process_count", process_count, 1), ("num_epochs", epochs, 1))
    for name, value, low in checks:
      if value < low:
        raise ValueError(f"{name} must be >= {low}; got {value}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, process_count={process_count}); got "
                       f"{process_index}.")
    if batch_size * process_count > reader.count:
      raise ValueError(f"batch_size * process_count = {batch_size * process_count} exceeds "
                       f"the store's {reader.count} rows; use smaller batches.")
    self.reader, self.batch_size, self.seed = reader, batch_size, seed
    self.buffer_rows, self.num_epochs = buffer_rows, num_epochs
    self.process_index, self.process_count = process_index, process_count
    self.step, self._layout, self._blocks = 0, (None, None, None), OrderedDict()

  @property
  def global_batch(self) -> int:
    return self.batch_size * self.process_count

  def state(self) -> dict:
    """A small JSON-able position; ``restore`` on it continues exactly from here."""
    rows, n = self.step * self.global_batch, self.reader.count
    return {"step": self.step, "epoch": rows // n, "position": rows % n, "seed": self.seed,
            "global_batch": self.global_batch, "buffer_rows": self.buffer_rows, "count": n}

  def restore(self, state: Mapping) -> None:
    """Continues from ``state`` (taken on any process of the same run)."""
    mine = self.state()
    for key in ("seed", "global_batch", "buffer_rows", "count"):
      if state.get(key) != mine[key]:
        raise ValueError(f"state[{key!r}] = {state.get(key)!r} but this iterator has "
                         f"{key}={mine[key]!r}; restore needs the same setting.")
    if not isinstance(state.get("step"), int) or state["step"] < 0:
      raise ValueError(f"state['step'] must be an int >= 0; got {state.get('step')!r}.")
    self.step = state["step"]

  def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    if self._layout[0] != epoch:
      sizes = np.asarray(self.reader.shard_rows, np.int64)
      order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(sizes))
      starts = np.concatenate([[0], np.cumsum(sizes[order])])
      self._layout = (epoch, order, starts)
    return self._layout[1], self._layout[2]

  def _block(self, epoch: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A block's permutation, the stream rows this process owns in it (sorted), their data."""
    key = (epoch, block)
    if key not in self._blocks:
      n, size = self.reader.count, self.buffer_rows
      lo, hi = block * size, min((block + 1) * size, n)
      perm = lo + np.random.default_rng([self.seed, epoch, 1, block]).permutation(hi - lo)
      positions = np.arange(lo, hi, dtype=np.int64)
      own = (epoch * n + positions) // self.batch_size % self.process_count == self.process_index
      src = np.sort(perm[own])  # rows of this epoch's shard-ordered stream, read in order
      order, starts = self._epoch_layout(epoch)
      shard_pos = np.searchsorted(starts, src, "right") - 1
      rows = np.empty((len(src), self.reader.d), np.float32)
      cuts = np.concatenate([[0], np.flatnonzero(np.diff(shard_pos)) + 1, [len(src)]])
      for a, b in zip(cuts[:-1], cuts[1:]):
        local = src[a:b] - starts[shard_pos[a]]
        span = slice(local[0], local[-1] + 1) if local[-1] - local[0] == b - a - 1 else local
        shard = self.reader.shard(int(order[shard_pos[a]]))
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
    block = within // self.buffer_rows
    key = epoch * (n // self.buffer_rows + 1) + block
    batch = np.empty((self.batch_size, self.reader.d), np.float32)
    for part in np.split(np.arange(self.batch_size), np.flatnonzero(np.diff(key)) + 1):
      perm, src, rows = self._block(int(epoch[part[0]]), int(block[part[0]]))
      wanted = perm[within[part] - block[part[0]] * self.buffer_rows]
      batch[part] = rows[np.searchsorted(src, wanted)]
    self.step += 1
    return batch

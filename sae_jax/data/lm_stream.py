"""Training straight from a language model's activations, without an activation store.

:class:`StreamedBatches` follows the data protocol of :func:`sae_jax.training.fit`
(``next`` -> ``[batch_size, d]`` float32, ``state()``, ``restore(state)``) like
:class:`sae_jax.data.batches.ShuffledBatches`, but computes its rows on the fly: the
token sequences are cut into blocks of ``block_sequences`` sequences; each block runs
through the model (``activation_fn``, jitted, one fixed sub-batch shape), its kept
positions (every position from ``skip_first`` on) form a shuffle buffer permuted by its
own seed, and batches are taken from the buffers in order. Batches straddle blocks
without a gap, every kept position appears once per epoch, and epochs reshuffle the
sequence order. Since a block depends only on its index, any position is re-created
exactly by recomputing one or two blocks, so a resumed run ends bitwise equal to an
uninterrupted one (XLA:CPU is deterministic for a fixed program and shape). Use it for
runs too large to cache; the store and :class:`ShuffledBatches` are cheaper when the
activations are used more than once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np
from jaxtyping import Float, Int

ActivationFn = Callable[[Int[np.ndarray, "n t"]], Float[np.ndarray, "n t d"]]


class StreamedBatches:
  """Endless, seeded, resumable ``[batch_size, d]`` batches computed from token sequences.

  Args:
    activation_fn: ``ids [sub_batch, t] int32 -> [sub_batch, t, d]`` activations (e.g. a
      jitted ``sae_jax.lm.forward`` reading one hook); always called with
      ``sub_batch`` sequences (the last ones of a block are padded by repetition and
      their rows dropped).
    token_ids: ``[sequences, t]`` integer token ids (a NumPy array or memory map).
    batch_size: rows per batch.
    seed: non-negative integer seed (sequence order per epoch, row order per block).
    block_sequences: sequences per shuffle buffer (host memory ``block_sequences *
      (t - skip_first) * d * 4`` bytes; larger buffers mix more).
    sub_batch: sequences per ``activation_fn`` call.
    skip_first: positions dropped at the start of every sequence.
  """

  def __init__(self, activation_fn: ActivationFn, token_ids, batch_size: int, seed: int, *,
               block_sequences: int = 256, sub_batch: int = 8, skip_first: int = 0):
    token_ids = np.asarray(token_ids)  # no copy for an array or a memory map
    if token_ids.ndim != 2 or not np.issubdtype(token_ids.dtype, np.integer):
      raise ValueError(f"token_ids must be a 2-D integer array [sequences, t]; got shape "
                       f"{token_ids.shape} and dtype {token_ids.dtype}.")
    n_seq, t = token_ids.shape
    for name, value, low in (("batch_size", batch_size, 1), ("seed", seed, 0),
                             ("block_sequences", block_sequences, 1),
                             ("sub_batch", sub_batch, 1), ("skip_first", skip_first, 0)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
    if skip_first >= t:
      raise ValueError(f"skip_first must be below the sequence length {t}; got {skip_first}.")
    self.activation_fn, self.token_ids = activation_fn, token_ids
    self.batch_size, self.seed, self.skip_first = batch_size, seed, skip_first
    self.block_sequences, self.sub_batch = min(block_sequences, n_seq), sub_batch
    self.rows_per_sequence = t - skip_first
    self.count = n_seq * self.rows_per_sequence  # rows per epoch
    if batch_size > self.count:
      raise ValueError(f"batch_size {batch_size} exceeds the {self.count} rows of one epoch "
                       f"({n_seq} sequences x {self.rows_per_sequence} kept positions).")
    self.step = 0
    self._blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
    self._order: tuple[int, np.ndarray] | None = None

  @property
  def block_rows(self) -> int:
    return self.block_sequences * self.rows_per_sequence

  def state(self) -> dict:
    """A small JSON-able position; ``restore`` on it continues exactly from here."""
    return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size,
            "block_sequences": self.block_sequences, "skip_first": self.skip_first,
            "sequences": int(self.token_ids.shape[0]), "t": int(self.token_ids.shape[1])}

  def restore(self, state: Mapping) -> None:
    """Continues from ``state``; refuses one taken with other settings."""
    mine = self.state()
    for key in mine:
      if key != "step" and state.get(key) != mine[key]:
        raise ValueError(f"state[{key!r}] = {state.get(key)!r} but this stream has "
                         f"{key}={mine[key]!r}; restore needs the same setting.")
    if not isinstance(state.get("step"), int) or state["step"] < 0:
      raise ValueError(f"state['step'] must be an int >= 0; got {state.get('step')!r}.")
    self.step = state["step"]

  def _sequence_order(self, epoch: int) -> np.ndarray:
    if self._order is None or self._order[0] != epoch:
      n_seq = self.token_ids.shape[0]
      self._order = (epoch, np.random.default_rng([self.seed, epoch, 0]).permutation(n_seq))
    return self._order[1]

  def _block(self, epoch: int, block: int) -> Float[np.ndarray, "r d"]:
    """The block's kept rows, already in their shuffled order."""
    key = (epoch, block)
    if key not in self._blocks:
      seqs = self._sequence_order(epoch)[block * self.block_sequences:
                                         (block + 1) * self.block_sequences]
      ids = self.token_ids[np.sort(seqs)]  # read in file order; the permutation follows
      parts = []
      for lo in range(0, len(ids), self.sub_batch):
        chunk = ids[lo:lo + self.sub_batch]
        real = len(chunk)
        if real < self.sub_batch:  # one compiled shape: pad by repeating the last sequence
          chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.sub_batch - real, 0)])
        acts = np.asarray(self.activation_fn(np.asarray(chunk, np.int32)))
        if acts.ndim != 3 or acts.shape[:2] != chunk.shape:
          raise ValueError(f"activation_fn must return [n, t, d] = [{chunk.shape[0]}, "
                           f"{chunk.shape[1]}, d]; got shape {acts.shape}.")
        parts.append(acts[:real, self.skip_first:].astype(np.float32))
      rows = np.concatenate(parts).reshape(-1, parts[0].shape[-1])
      perm = np.random.default_rng([self.seed, epoch, 1, block]).permutation(len(rows))
      self._blocks[key] = rows[perm]
      if len(self._blocks) > 2:
        self._blocks.popitem(last=False)
    return self._blocks[key]

  def __iter__(self) -> StreamedBatches:
    return self

  def __next__(self) -> Float[np.ndarray, "b d"]:
    n, size = self.count, self.block_rows
    pos = np.arange(self.step * self.batch_size, (self.step + 1) * self.batch_size,
                    dtype=np.int64)
    epoch, within = pos // n, pos % n
    block, offset = within // size, within % size
    key = epoch * (n // size + 1) + block
    parts = []
    for part in np.split(np.arange(self.batch_size), np.flatnonzero(np.diff(key)) + 1):
      rows = self._block(int(epoch[part[0]]), int(block[part[0]]))
      parts.append(rows[offset[part]])
    self.step += 1
    return np.concatenate(parts)

"""Harvesting model activations into an activation store, resumably.

:func:`harvest` cuts a stream of token windows into fixed ``[batch_size, t]`` batches (so a
jitted model compiles once), runs any activation callable on them, keeps the real token
positions (optionally dropping special tokens) and appends those rows to a
:class:`~sae_jax.data.store.StoreWriter`. With every batch it records in the manifest's
``meta`` how many windows have been consumed and how many rows they produced; a shard
commits that record along with its rows. Re-running the same harvest after an
interruption therefore skips the windows already stored, recomputes only the batch that
straddles the last committed shard, and ends with a store byte-identical to an
uninterrupted run.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import tqdm
from jaxtyping import Array, Float, Int

from sae_jax.data import store as store_lib

PRODUCER = "sae_jax.data.harvest"
KeepFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
ActivationFn = Callable[[Int[np.ndarray, "n t"], Int[np.ndarray, "n t"]],
                        Float[Array, "n t d"] | Float[np.ndarray, "n t d"]]


def exclude_tokens(token_ids: Sequence[int]) -> KeepFn:
  """A ``keep_fn`` that drops these token ids (``[101, 102]``: BERT's [CLS] and [SEP])."""
  excluded = np.asarray(token_ids, np.int64)

  def keep(ids: Int[np.ndarray, "n t"], mask: Int[np.ndarray, "n t"]) -> np.ndarray:
    return np.asarray(mask, bool) & ~np.isin(ids, excluded)
  return keep


def batch_windows(windows_iter: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int,
                  skip: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
  """Re-cuts ``(ids, mask)`` chunks of windows into fixed-size batches.

  Args:
    windows_iter: yields ``(ids, mask)``, each ``[n, t]`` (or ``[t]`` for one window);
      ``n`` may vary, ``t`` may not.
    batch_size: windows per batch.
    skip: windows to drop from the start of the stream.

  Yields:
    ``(ids [batch_size, t] int32, mask [batch_size, t] int32, n_real)``; the last batch is
    padded with all-masked windows, and ``n_real`` counts the windows that are not padding.
  """
  ids_parts, mask_parts, held, length = [], [], 0, None
  for ids, mask in windows_iter:
    ids, mask = np.atleast_2d(np.asarray(ids)), np.atleast_2d(np.asarray(mask))
    if ids.ndim != 2 or ids.shape != mask.shape:
      raise ValueError(f"windows_iter must yield ids and mask of one shape [n, t]; got "
                       f"{ids.shape} and {mask.shape}.")
    length = ids.shape[1] if length is None else length
    if ids.shape[1] != length:
      raise ValueError(f"windows_iter yielded windows of length {ids.shape[1]} after "
                       f"{length}; all windows must share one length (pad them).")
    dropped = min(skip, len(ids))
    skip -= dropped
    ids_parts.append(ids[dropped:])
    mask_parts.append(mask[dropped:])
    held += len(ids) - dropped
    while held >= batch_size:
      all_ids, all_mask = np.concatenate(ids_parts), np.concatenate(mask_parts)
      yield (all_ids[:batch_size].astype(np.int32), all_mask[:batch_size].astype(np.int32),
             batch_size)
      ids_parts, mask_parts = [all_ids[batch_size:]], [all_mask[batch_size:]]
      held -= batch_size
  if held:
    pad = ((0, batch_size - held), (0, 0))
    yield (np.pad(np.concatenate(ids_parts), pad).astype(np.int32),
           np.pad(np.concatenate(mask_parts), pad).astype(np.int32), held)


def harvest(activation_fn: ActivationFn, windows_iter: Iterable[tuple[np.ndarray, np.ndarray]],
            store_path: str | os.PathLike, *, model_name: str, layer: int, hook: str,
            max_tokens: int | None = None, batch_size: int = 32, keep_fn: KeepFn | None = None,
            dtype: str = "float32", shard_rows: int = store_lib.DEFAULT_SHARD_ROWS,
            meta: Mapping | None = None, progress: bool = True) -> store_lib.StoreReader:
  """Writes the activations of every kept token position to a store; resumable.

  Args:
    activation_fn: ``(ids [n, t] int32, mask [n, t] int32) -> [n, t, d]``, any callable
      (a jitted model sees a single shape: ``n`` is always ``batch_size``).
    windows_iter: yields ``(ids, mask)`` windows (see :func:`batch_windows`); mask 1 marks
      real tokens. Re-running must yield the same windows in the same order.
    store_path: the store folder; an existing harvest store there is resumed.
    model_name, layer, hook: recorded in the manifest; must match an existing store.
    max_tokens: stop once the store holds this many rows (``None``: the whole stream).
    batch_size: windows per ``activation_fn`` call.
    keep_fn: ``(ids, mask) -> bool [n, t]`` restricting the kept positions further (see
      :func:`exclude_tokens`); positions with mask 0 are never kept.
    dtype, shard_rows, meta: passed to :class:`~sae_jax.data.store.StoreWriter`.
    progress: show a tqdm bar with tokens per second.

  Returns:
    A reader on the finished store.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
  if max_tokens is not None and max_tokens < 1:
    raise ValueError(f"max_tokens must be >= 1 or None; got {max_tokens}.")
  path = pathlib.Path(store_path)
  run_meta = {**(meta or {}), "producer": PRODUCER, "batch_size": batch_size,
              "max_tokens": max_tokens}

  def open_writer(d):
    return stack.enter_context(store_lib.StoreWriter(
        path, d, dtype, model_name, layer, hook, shard_rows=shard_rows, meta=run_meta))

  with contextlib.ExitStack() as stack:
    writer, windows, stored = None, 0, 0
    if (path / store_lib.MANIFEST).exists():
      found = store_lib.read_manifest(path)
      if found["count"] and found.get("meta", {}).get("producer") != PRODUCER:
        raise ValueError(f"{path} holds {found['count']} rows not written by harvest; pass "
                         "an empty or harvest-written store_path.")
      writer = open_writer(found["d"])
      windows = writer.meta.get("windows_consumed", 0)
      stored = writer.meta.get("rows_through_windows", 0)
    committed = writer.count if writer else 0
    bar = stack.enter_context(tqdm.tqdm(
        total=max_tokens, initial=committed, unit="tok", unit_scale=True, disable=not progress,
        desc=f"harvest {model_name} layer {layer} {hook}"))
    batches = batch_windows(windows_iter, batch_size, skip=windows)
    while max_tokens is None or stored < max_tokens:
      batch = next(batches, None)
      if batch is None:
        break
      ids, mask, n_real = batch
      keep = np.asarray(mask, bool)
      if keep_fn is not None:
        keep &= np.asarray(keep_fn(ids, mask), bool)
      target = stored + int(keep.sum())
      target = target if max_tokens is None else min(target, max_tokens)
      windows += n_real
      progress_meta = {"windows_consumed": windows, "rows_through_windows": target}
      if target <= committed or target == stored:
        # Rows already in the store (a resumed run) or none kept: only the record moves on.
        if writer is not None and target >= committed:
          writer.add(np.zeros((0, writer.d), np.float32), progress_meta)
        stored = target
        continue
      acts = np.asarray(activation_fn(ids, mask))
      if acts.ndim != 3 or acts.shape[:2] != ids.shape:
        raise ValueError(f"activation_fn must return [n, t, d] = [{ids.shape[0]}, "
                         f"{ids.shape[1]}, d]; got shape {acts.shape}.")
      rows = acts[keep][:target - stored][max(committed - stored, 0):]
      writer = writer or open_writer(acts.shape[2])
      writer.add(rows, progress_meta)
      bar.update(len(rows))
      stored = target
    if writer is None:
      raise ValueError("no token position was kept: windows_iter was empty or every mask "
                       "(and keep_fn) was 0.")
  return store_lib.StoreReader(path)

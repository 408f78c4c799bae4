"""Batches and stores of synthetic tokens: the trainer's data protocol, resumable."""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Mapping

import jax
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from sae_jax.data.synthbench.generator import SynthBench
from sae_jax.data.synthbench.generator import sample_synthbench_rows


@functools.partial(jax.jit, static_argnames=("total", "start", "stop"))
def _batch_rows(key: PRNGKeyArray, bench: SynthBench, *, total: int, start: int, stop: int
                ) -> tuple[Float[Array, "b d"], Float[Array, "b f"]]:
  """Rows ``[start, stop)`` of ``sample_synthbench(key, bench, total)``."""
  return sample_synthbench_rows(jax.random.split(key, total)[start:stop], bench)


class SynthBenchBatches:
  """Endless, resumable batches of activations (the trainer's data protocol).

  Batch ``i`` is drawn from ``fold_in(stream_key, i)`` with ``stream_key =
  fold_in(key(seed), 1)``, so ``state()`` is just the step and a restored iterator yields
  exactly the batches an uninterrupted one would. With several processes the global batch
  has ``batch_size * process_count`` rows, each drawn from its own key, and process ``p``
  draws only rows ``[p * batch_size, (p + 1) * batch_size)`` of it.

  Args:
    bench: the generative model (:func:`make_synthbench`).
    batch_size: rows per batch and process.
    seed: non-negative integer seed of the stream.
    process_index, process_count: this process and the number of processes.
  """

  def __init__(self, bench: SynthBench, batch_size: int, seed: int = 0, *,
               process_index: int = 0, process_count: int = 1):
    for name, value, low in (("batch_size", batch_size, 1), ("seed", seed, 0),
                             ("process_count", process_count, 1)):
      if not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, process_count={process_count}); got "
                       f"{process_index}.")
    self.bench, self.batch_size, self.seed, self.step = bench, batch_size, seed, 0
    self.process_index, self.process_count = process_index, process_count
    self._key = jax.random.fold_in(jax.random.key(seed), 1)

  @property
  def global_batch(self) -> int:
    return self.batch_size * self.process_count

  def _rows(self, key: PRNGKeyArray, total: int, start: int, stop: int):
    return _batch_rows(key, self.bench, total=total, start=start, stop=stop)

  def sample(self, n: int, offset: int = 2**30) -> Float[np.ndarray, "b d"]:
    """``n`` tokens from a stream disjoint from the training batches (init/eval)."""
    return self.sample_with_codes(n, offset)[0]

  def sample_with_codes(self, n: int, offset: int = 2**30
                        ) -> tuple[Float[np.ndarray, "b d"], Float[np.ndarray, "b f"]]:
    """Like :meth:`sample`, with the true codes ``[n, f]`` of the same tokens."""
    x, codes = self._rows(jax.random.fold_in(self._key, offset), n, 0, n)
    return np.asarray(x, np.float32), np.asarray(codes, np.float32)

  def state(self) -> dict:
    """A small JSON-able position; ``restore`` on it continues exactly from here."""
    return {"step": self.step, "seed": self.seed, "global_batch": self.global_batch}

  def restore(self, state: Mapping) -> None:
    """Continues from ``state`` (taken on any process of the same run)."""
    for key in ("seed", "global_batch"):
      if state.get(key) != getattr(self, key):
        raise ValueError(f"state[{key!r}] = {state.get(key)!r} but this iterator has "
                         f"{key}={getattr(self, key)!r}; restore needs the same setting.")
    if not isinstance(state.get("step"), int) or state["step"] < 0:
      raise ValueError(f"state['step'] must be an int >= 0; got {state.get('step')!r}.")
    self.step = state["step"]

  def __iter__(self) -> SynthBenchBatches:
    return self

  def __next__(self) -> Float[np.ndarray, "b d"]:
    start = self.process_index * self.batch_size
    x, _ = self._rows(jax.random.fold_in(self._key, self.step), self.global_batch, start,
                      start + self.batch_size)
    self.step += 1
    return np.asarray(x, np.float32)  # host batches, as a store reader yields them


def write_synthbench_store(path, bench: SynthBench, num_tokens: int, *, seed: int = 0,
                           chunk_rows: int = 16384, source: str = "synthbench",
                           progress: bool = False):
  """Draws ``num_tokens`` tokens into an activation store (resumable, deterministic).

  Chunk ``i`` holds rows ``[i * chunk_rows, (i + 1) * chunk_rows)`` of the stream of
  ``SynthBenchBatches(bench, chunk_rows, seed)``; each chunk is committed as one shard, so
  an interrupted write resumes after its last shard and ends byte-identical to an
  uninterrupted one. A finite store lets every SAE of a comparison see the same tokens,
  as a harvested store does, and costs the sampling once instead of once per run.

  Args:
    path: the store folder (:mod:`sae_jax.data.store` format, float32).
    bench: the generative model (:func:`make_synthbench`).
    num_tokens: rows to write, ``>= 1``.
    seed: seed of the token stream.
    chunk_rows: rows drawn and committed at once.
    source: the ``model`` name recorded in the manifest (the store has no layer: -1).
    progress: show a progress bar.

  Returns:
    A :class:`sae_jax.data.store.StoreReader` on the finished store.
  """
  from sae_jax.data import store as store_lib  # the store depends on nothing here
  from tqdm.auto import tqdm
  for name, value in (("num_tokens", num_tokens), ("chunk_rows", chunk_rows)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
  f, d = bench.features.shape
  meta = {"synthbench": {"seed": seed, "chunk_rows": chunk_rows, "num_features": int(f)}}
  manifest = pathlib.Path(path) / store_lib.MANIFEST
  if manifest.exists():
    written = store_lib.read_manifest(path).get("meta", {}).get("synthbench")
    if written != meta["synthbench"]:
      raise ValueError(f"{path} holds a store written with synthbench settings {written}, "
                       f"not {meta['synthbench']}; use another path or those settings.")
  with store_lib.StoreWriter(path, int(d), "float32", source, -1, "synthetic",
                             shard_rows=chunk_rows, meta=meta) as writer:
    batches = SynthBenchBatches(bench, chunk_rows, seed)
    done = writer.count
    if done % chunk_rows and done < num_tokens:
      raise ValueError(f"{path} ends inside a chunk ({done} rows); it was closed early. "
                       f"Delete it and write it again.")
    batches.restore({"step": done // chunk_rows, "seed": seed, "global_batch": chunk_rows})
    bar = tqdm(total=num_tokens, initial=min(done, num_tokens), disable=not progress,
               desc="synthbench store", unit="tok", unit_scale=True)
    with bar:
      while done < num_tokens:
        rows = next(batches)[:num_tokens - done]
        writer.add(rows)
        done += len(rows)
        bar.update(len(rows))
  return store_lib.StoreReader(path)

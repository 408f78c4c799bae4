"""On-disk activation store: a folder of ``.npy`` shards described by ``manifest.json``.

Format, version 1 (public: other frameworks write it)::

  store/manifest.json
  store/shard_00000.npy, shard_00001.npy, ...   # 2-D [n_i, d], C order, n_i >= 1

A shard holds float32 (``"dtype": "float32"``, ``<f4``), float16 (``"float16"``, ``<f2``)
or bfloat16 as its uint16 bit pattern (``"bfloat16"``, ``<u2``). The manifest is::

  {"format": "sae_jax.activations", "version": 1, "model": str, "layer": int,
   "hook": str, "d": int, "dtype": str, "count": total rows,
   "shards": [{"file": "shard_00000.npy", "rows": n_0}, ...],
   "stats": {"mean": [d floats], "norm_mean": mean L2 norm of the rows},
   "meta": {free-form}}

Readers ignore unknown keys and files the manifest does not list. :class:`StoreWriter`
also keeps float64 running sums ``stats.sum`` / ``stats.norm_sum`` so that a resumed
writer continues the statistics exactly; readers need only ``mean`` and ``norm_mean``.
Writing a store from any framework, ``acts`` being ``[n, d]`` float32 and ``store/`` created::

  np.save("store/shard_00000.npy", acts)
  m = dict(format="sae_jax.activations", version=1, model="gpt2", layer=6, hook="resid",
           d=acts.shape[1], dtype="float32", count=len(acts),
           shards=[{"file": "shard_00000.npy", "rows": len(acts)}],
           stats={"mean": acts.mean(0).tolist(),
                  "norm_mean": float(np.linalg.norm(acts, axis=1).mean())}, meta={})
  json.dump(m, open("store/manifest.json", "w"))
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import ml_dtypes
import numpy as np
from jaxtyping import Float

FORMAT = "sae_jax.activations"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}
DEFAULT_SHARD_ROWS = 1 << 16
DEFAULT_BUFFER_ROWS = 1 << 17
_OWN_FILE = re.compile(r"^(shard_\d+\.npy(\.tmp)?|manifest\.json\.tmp)$")


class StoreError(ValueError):
  """A store on disk is missing, corrupt or disagrees with its manifest."""


class StoreStats(NamedTuple):
  """Per-dimension mean ``[d]`` (float64) and mean L2 norm of the stored rows."""
  mean: np.ndarray
  norm_mean: float


def to_float32(raw: np.ndarray, dtype: str) -> Float[np.ndarray, "b d"]:
  """Decodes stored rows (``dtype`` as in the manifest) to a float32 array."""
  if dtype == "bfloat16":
    return (np.asarray(raw, np.uint32) << 16).view(np.float32)
  return np.asarray(raw, np.float32)


def _encode(rows: np.ndarray, dtype: str) -> np.ndarray:
  rows = np.asarray(rows, np.float32)
  with np.errstate(over="ignore"):  # overflow to inf is reported by StoreWriter.add
    if dtype == "bfloat16":
      return rows.astype(ml_dtypes.bfloat16).view(np.uint16)
    return np.ascontiguousarray(rows, DTYPES[dtype])


def _atomic_write(path: pathlib.Path, write) -> None:
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  if hasattr(os, "O_DIRECTORY"):  # persists the rename itself; POSIX only
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


_FIELDS = {  # field: (test, what it must be)
    "format": (lambda v: v == FORMAT, repr(FORMAT)), "version": (lambda v: v == VERSION, "1"),
    "model": (lambda v: isinstance(v, str), "a string"),
    "layer": (lambda v: isinstance(v, int), "an int"),
    "hook": (lambda v: isinstance(v, str), "a string"),
    "d": (lambda v: isinstance(v, int) and v >= 1, "a positive int"),
    "dtype": (lambda v: v in DTYPES, f"one of {list(DTYPES)}"),
    "count": (lambda v: isinstance(v, int) and v >= 0, "a non-negative int"),
    "shards": (lambda v: isinstance(v, list) and all(
        isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("rows"), int)
        and s["rows"] >= 1 and os.path.basename(s["file"]) == s["file"] for s in v),
               "a list of {'file': a name in the store folder, 'rows': a positive int}"),
    "stats": (lambda v: isinstance(v, dict) and isinstance(v.get("mean"), list) and
              isinstance(v.get("norm_mean"), (int, float)), "{'mean': [d], 'norm_mean': x}"),
}


def read_manifest(path: str | os.PathLike) -> dict:
  """Loads and validates ``path/manifest.json`` (the shards themselves are not checked)."""
  file = pathlib.Path(path) / MANIFEST
  if not file.is_file():
    raise StoreError(f"{file}: missing; {path} is not an activation store.")
  try:
    m = json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise StoreError(f"{file}: corrupt JSON ({e}).") from e
  if not isinstance(m, dict):
    raise StoreError(f"{file}: must hold a JSON object; got {type(m).__name__}.")
  for key, (ok, what) in _FIELDS.items():
    if key not in m or not ok(m[key]):
      got = repr(m.get(key, "<missing>"))[:300]
      raise StoreError(f"{file}: field {key!r} must be {what}; got {got}.")
  if len(m["stats"]["mean"]) != m["d"] or m["count"] != sum(s["rows"] for s in m["shards"]):
    raise StoreError(f"{file}: field 'count' ({m['count']}) or 'stats.mean' (length "
                     f"{len(m['stats']['mean'])}) disagrees with the shards' rows or d={m['d']}.")
  return m


def _check_shard(file: pathlib.Path, rows: int, d: int, dtype: str) -> None:
  """Validates a shard's ``.npy`` header and size without reading its data."""
  if not file.is_file():
    raise StoreError(f"{file}: listed in {MANIFEST} but missing.")
  with open(file, "rb") as f:
    try:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, fortran, found = read_header(f)
    except ValueError as e:
      raise StoreError(f"{file}: not a readable .npy file ({e}).") from e
    data_start = f.tell()
  want = DTYPES[dtype]
  if shape != (rows, d) or fortran or found != want:
    raise StoreError(f"{file}: holds a {'Fortran' if fortran else 'C'}-order {found} array "
                     f"of shape {shape}; {MANIFEST} says C-order {want} of shape ({rows}, {d}).")
  expected = data_start + rows * d * want.itemsize
  if file.stat().st_size < expected:
    raise StoreError(f"{file}: truncated: {file.stat().st_size} bytes on disk, the header "
                     f"needs {expected}.")


class StoreReader:
  """A validated store whose shards are memory-mapped, so it may exceed RAM.

  Raises:
    StoreError: naming the file and field, for a missing or corrupt manifest or a shard
      whose shape, dtype or size disagrees with it.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    self.manifest = read_manifest(self.path)
    for s in self.manifest["shards"]:
      _check_shard(self.path / s["file"], s["rows"], self.d, self.dtype)
    self.shard_rows = tuple(s["rows"] for s in self.manifest["shards"])
    self._starts = np.concatenate([[0], np.cumsum(self.shard_rows, dtype=np.int64)])
    self._maps = {}

  count = property(lambda self: self.manifest["count"])
  d = property(lambda self: self.manifest["d"])
  dtype = property(lambda self: self.manifest["dtype"])
  meta = property(lambda self: dict(self.manifest.get("meta", {})))

  def __len__(self) -> int:
    return self.count

  @property
  def stats(self) -> StoreStats:
    stats = self.manifest["stats"]
    return StoreStats(np.asarray(stats["mean"], np.float64), float(stats["norm_mean"]))

  def shard(self, i: int) -> np.ndarray:
    """Shard ``i`` as stored (memory-mapped, read-only)."""
    if i not in self._maps:
      self._maps[i] = np.load(self.path / self.manifest["shards"][i]["file"], mmap_mode="r")
    return self._maps[i]

  def read(self, start: int, stop: int) -> Float[np.ndarray, "b d"]:
    """Rows ``[start, stop)`` in storage order, as float32."""
    if not 0 <= start <= stop <= self.count:
      raise ValueError(f"need 0 <= start <= stop <= count={self.count}; got start={start}, "
                       f"stop={stop}.")
    parts = []
    for i in range(int(np.searchsorted(self._starts, start, "right")) - 1, len(self.shard_rows)):
      lo, hi = max(start - self._starts[i], 0), min(stop - self._starts[i], self.shard_rows[i])
      if hi <= 0:
        break
      parts.append(to_float32(self.shard(i)[lo:hi], self.dtype))
    return np.concatenate(parts) if parts else np.zeros((0, self.d), np.float32)


class StoreWriter:
  """Appends rows to a store, one atomically committed shard at a time.

  A shard is written as ``shard_XXXXX.npy.tmp``, fsynced and renamed, then the manifest is
  replaced atomically; it lists only complete shards. On an existing store the writer
  resumes after the last listed shard and deletes orphans (``*.tmp``, unlisted shards).
  Statistics are summed per committed shard from the stored values, so a resumed store
  ends byte-identical to an uninterrupted one.

  Args:
    path, d, dtype: the store folder (created if missing), row width, storage dtype.
    model, layer, hook: where the activations come from; must match an existing store.
    shard_rows: rows per shard (the last shard written by ``close`` may be shorter).
    meta: free-form JSON-able entries merged into the manifest's ``meta``.
  """

  def __init__(self, path: str | os.PathLike, d: int, dtype: str, model: str, layer: int,
               hook: str, *, shard_rows: int = DEFAULT_SHARD_ROWS, meta: Mapping | None = None):
    if dtype not in DTYPES:
      raise ValueError(f"dtype must be one of {list(DTYPES)}; got {dtype!r}.")
    if d < 1 or shard_rows < 1:
      raise ValueError(f"d and shard_rows must be >= 1; got d={d}, shard_rows={shard_rows}.")
    self.path, self.d, self.dtype, self.shard_rows = pathlib.Path(path), d, dtype, shard_rows
    want = {"model": model, "layer": layer, "hook": hook, "d": d, "dtype": dtype}
    if (self.path / MANIFEST).exists():
      manifest = StoreReader(self.path).manifest
      for key, value in want.items():
        if manifest[key] != value:
          raise ValueError(f"{key}={value!r} disagrees with the existing store at {self.path} "
                           f"({key}={manifest[key]!r}); use another path or the same {key}.")
      listed = {s["file"] for s in manifest["shards"]}
      for name in os.listdir(self.path):
        if _OWN_FILE.match(name) and name not in listed:
          os.remove(self.path / name)
      stats = manifest["stats"]
      self._sum = np.asarray(stats.get("sum", np.multiply(stats["mean"], manifest["count"])),
                             np.float64)
      self._norm_sum = float(stats.get("norm_sum", stats["norm_mean"] * manifest["count"]))
    else:
      self.path.mkdir(parents=True, exist_ok=True)
      manifest = {"format": FORMAT, "version": VERSION, **want, "count": 0, "shards": [],
                  "stats": {}, "meta": {}}
      self._sum, self._norm_sum = np.zeros(d, np.float64), 0.0
    manifest["meta"] = {**manifest.get("meta", {}), **(meta or {})}
    self._manifest, self._written = manifest, None
    self._buffer, self._buffered, self._pending, self.closed = [], 0, [], False
    self._write_manifest()

  count = property(lambda self: self._manifest["count"])
  meta = property(lambda self: dict(self._manifest["meta"]))

  def add(self, rows: Float[np.ndarray, "b d"], meta: Mapping | None = None) -> None:
    """Buffers ``[n, d]`` rows (n may be 0) and commits every full shard.

    ``meta`` describes the state after these rows (e.g. inputs consumed); it reaches the
    manifest with the shard that completes them.
    """
    if self.closed:
      raise RuntimeError(f"StoreWriter for {self.path} is closed.")
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != self.d:
      raise ValueError(f"rows must have shape [n, d={self.d}]; got {rows.shape}.")
    stored = _encode(rows, self.dtype)
    if not np.all(np.isfinite(to_float32(stored, self.dtype))):
      raise ValueError(f"rows hold values that are not finite in {self.dtype} (max |x| = "
                       f"{np.max(np.abs(rows))}); fix the source or store float32.")
    if len(stored):
      self._buffer.append(stored)
      self._buffered += len(stored)
    if meta:
      self._pending.append((self.count + self._buffered, dict(meta)))
    while self._buffered >= self.shard_rows:
      self._commit(self.shard_rows)

  def _commit(self, n: int) -> None:
    data = np.concatenate(self._buffer)
    shard, rest = data[:n], data[n:]
    self._buffer, self._buffered = ([rest] if len(rest) else []), len(rest)
    listed, i = {s["file"] for s in self._manifest["shards"]}, len(self._manifest["shards"])
    while f"shard_{i:05d}.npy" in listed:
      i += 1
    name = f"shard_{i:05d}.npy"
    _atomic_write(self.path / name, lambda f: np.save(f, shard))
    values = to_float32(shard, self.dtype).astype(np.float64)
    self._sum += values.sum(axis=0)
    self._norm_sum += float(np.linalg.norm(values, axis=1).sum())
    self._manifest["shards"].append({"file": name, "rows": n})
    self._manifest["count"] += n
    self._write_manifest()

  def _write_manifest(self) -> None:
    m, count = self._manifest, self._manifest["count"]
    while self._pending and self._pending[0][0] <= count:
      m["meta"].update(self._pending.pop(0)[1])
    m["stats"] = {"mean": (self._sum / max(count, 1)).tolist(),
                  "norm_mean": self._norm_sum / max(count, 1),
                  "sum": self._sum.tolist(), "norm_sum": self._norm_sum}
    text = json.dumps(m, indent=1)
    if text != self._written:
      _atomic_write(self.path / MANIFEST, lambda f: f.write(text.encode()))
      self._written = text

  def close(self) -> None:
    """Commits the buffered rows as a last, possibly shorter, shard."""
    if not self.closed:
      if self._buffered:
        self._commit(self._buffered)
      self._write_manifest()
      self.closed = True

  def __enter__(self) -> StoreWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:  # as after a crash: buffered rows are dropped and redone on resume
      self._buffer, self._buffered, self._pending, self.closed = [], 0, [], True


def write_store_from_arrays(path: str | os.PathLike,
                            arrays: Float[np.ndarray, "b d"] | Iterable[np.ndarray], *,
                            model: str = "unknown", layer: int = -1, hook: str = "unknown",
                            dtype: str = "float32", shard_rows: int = DEFAULT_SHARD_ROWS,
                            meta: Mapping | None = None) -> StoreReader:
  """Writes one ``[n, d]`` array, or an iterable of them, as a new store."""
  if (pathlib.Path(path) / MANIFEST).exists():
    raise ValueError(f"{path} already holds a store; open a StoreWriter on it to extend it.")
  arrays = iter([arrays] if isinstance(arrays, np.ndarray) else arrays)
  first = np.asarray(next(arrays, np.zeros(0)))
  if first.ndim != 2:
    raise ValueError(f"arrays must be [n, d] arrays; got a first shape {first.shape}.")
  with StoreWriter(path, first.shape[1], dtype, model, layer, hook, shard_rows=shard_rows,
                   meta=meta) as writer:
    for array in itertools.chain([first], arrays):
      writer.add(array)
  return StoreReader(path)

"""Harvesting the activations of a causal language model (GPT-2, GPT-NeoX / Pythia) into a store.

The model runs in pure JAX from a local Hugging Face folder (:mod:`sae_jax.lm`); the
activations at one TransformerLens hook are written, resumably, by
:func:`sae_jax.data.harvest.harvest`. Two sources of token ids:

* text files (:func:`text_windows`): each file is one document, tokenized with the
  folder's ``tokenizer.json`` (no special tokens added); documents are concatenated in
  the given order with the tokenizer's end-of-text id (``<|endoftext|>`` for GPT-2 and
  Pythia) between consecutive documents, and the stream is cut into contexts of
  ``context`` tokens. The tokens after the last full context are dropped. A file is read
  in pieces of about 1 MiB cut only at a newline between two non-whitespace characters;
  the GPT-2 / GPT-NeoX byte-level pre-tokenizer (and any pre-tokenizer that splits at
  whitespace) always separates tokens there, so the ids equal those of the whole file
  while a large file is never held in memory whole.
* an integer array ``[sequences, context]`` saved with ``np.save``
  (:func:`token_id_windows`), read memory-mapped.

Rows are stored sequence-major, then by position; ``skip_first`` drops the first
positions of every context (the attention-sink tokens, whose norms are far larger than
the others'). Every setting that determines the rows (model folder name, hook, context,
skip_first, model dtype, source) is recorded in the manifest's ``meta``; a resumed run
must match them (:func:`check_settings`), so re-running an interrupted command continues
it and ends byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from sae_jax import lm
from sae_jax.data import harvest as harvest_lib
from sae_jax.data import store as store_lib

# Tried in this order as the separator between documents.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
MODEL_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DEFAULT_CONTEXT = 128
READ_CHARS = 1 << 20
WINDOWS_PER_CHUNK = 64
# The manifest meta entries that must agree for a store to be resumed.
SETTINGS = ("model_dir", "hook", "context", "skip_first", "model_dtype", "source")


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def eos_id(tokenizer) -> int | None:
  """The tokenizer's end-of-text id (the first of ``EOS_TOKENS`` it knows), or None."""
  for token in EOS_TOKENS:
    token_id = tokenizer.token_to_id(token)
    if token_id is not None:
      return int(token_id)
  return None


def _safe_cut(text: str, start: int) -> int:
  """The last index ``i >= start`` just after a ``\\n`` between two non-whitespace chars.

  Returns 0 when there is none (a cut always has a character before its newline).
  """
  i = len(text) - 1
  while True:
    i = text.rfind("\n", max(start - 1, 1), i)
    if i < 1:
      return 0
    if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
      return i + 1


def read_pieces(path: str | os.PathLike, read_chars: int = READ_CHARS) -> Iterator[str]:
  """A UTF-8 text file in pieces whose concatenation is the file (newlines kept as stored).

  Pieces end only just after a ``\\n`` that lies between two non-whitespace characters
  (see the module docstring); a file without such a newline comes as one piece. Bytes
  that are not UTF-8 become U+FFFD.
  """
  if read_chars < 1:
    raise ValueError(f"read_chars must be >= 1; got {read_chars}.")
  with open(path, encoding="utf-8", errors="replace", newline="") as f:
    pending, last = [], ""  # text not yielded yet; the file's last two characters read
    while block := f.read(read_chars):
      # The two characters before the block complete the surroundings of a newline at
      # its start; a newline at its end waits for the next block.
      found = _safe_cut(last + block, len(last))
      if found:
        cut = found - len(last)
        pending.append(block[:cut])
        yield "".join(pending)
        pending = [block[cut:]]
      else:
        pending.append(block)
      last = (last + block)[-2:]
    if any(pending):
      yield "".join(pending)


def _check_tokenizer(tokenizer) -> None:
  if tokenizer.padding is not None or tokenizer.truncation is not None:
    raise ValueError("tokenizer pads or truncates, which would drop or invent tokens; call "
                     "tokenizer.no_padding() and tokenizer.no_truncation(), or use "
                     "sae_jax.lm.load_tokenizer.")


def text_tokens(tokenizer, paths: Sequence[str | os.PathLike], *, separator: int | None,
                read_chars: int = READ_CHARS) -> Iterator[Int[np.ndarray, " n"]]:
  """Token ids of the files in order, ``separator`` between consecutive non-empty files.

  Args:
    tokenizer: a ``tokenizers.Tokenizer`` without padding or truncation.
    paths: text files, each one document.
    separator: id put between documents (None: documents are simply concatenated).
    read_chars: characters read at a time (see :func:`read_pieces`).

  Yields:
    int32 id arrays; their concatenation is the token stream.
  """
  _check_tokenizer(tokenizer)
  emitted = False  # any document so far
  for path in paths:
    started = False  # this document
    for piece in read_pieces(path, read_chars):
      ids = np.asarray(tokenizer.encode(piece, add_special_tokens=False).ids, np.int32)
      if not len(ids):
        continue
      if emitted and not started and separator is not None:
        ids = np.concatenate([np.asarray([separator], np.int32), ids])
      started = emitted = True
      yield ids


def pack_tokens(token_chunks: Iterable[np.ndarray], context: int,
                windows_per_chunk: int = WINDOWS_PER_CHUNK) -> Iterator[Int[np.ndarray, "n c"]]:
  """Cuts a token stream into ``[n, context]`` int32 windows, in order.

  Yields chunks of at most ``windows_per_chunk`` windows as soon as they are full; the
  tokens after the last full window are dropped.
  """
  if not _is_int(context) or context < 1:
    raise ValueError(f"context must be an int >= 1; got {context!r}.")

  def full_windows(flat):
    n = len(flat) // context
    for start in range(0, n, windows_per_chunk):
      stop = min(start + windows_per_chunk, n)
      yield flat[start * context:stop * context].reshape(stop - start, context)

  held, count = [], 0
  for ids in token_chunks:
    held.append(np.asarray(ids, np.int32).ravel())
    count += held[-1].size
    if count >= context * windows_per_chunk:
      flat = np.concatenate(held)
      yield from full_windows(flat)
      count = len(flat) % context
      held = [flat[len(flat) - count:]]
  yield from full_windows(np.concatenate(held) if held else np.zeros(0, np.int32))


def _check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
    raise ValueError(f"{what} holds token id {bad}, outside the model's [0, vocab_size="
                     f"{vocab_size}); are the ids from this model's tokenizer?")


def text_windows(tokenizer, paths: Sequence[str | os.PathLike], context: int, *,
                 separator: int | None, vocab_size: int | None = None,
                 read_chars: int = READ_CHARS
                 ) -> Iterator[tuple[Int[np.ndarray, "n c"], Int[np.ndarray, "n c"]]]:
  """``(ids, mask)`` chunks of full windows packed from text files (mask all ones).

  Args:
    tokenizer, paths, separator, read_chars: as :func:`text_tokens`.
    context: tokens per window.
    vocab_size: when given, an id outside ``[0, vocab_size)`` raises ValueError.
  """
  for ids in pack_tokens(text_tokens(tokenizer, paths, separator=separator,
                                     read_chars=read_chars), context):
    if vocab_size is not None:
      _check_ids(ids, vocab_size, "the tokenized text")
    yield ids, np.ones_like(ids)


def load_token_ids(path: str | os.PathLike) -> Int[np.ndarray, "s c"]:
  """An ``np.save``-d integer array ``[sequences, context]``, memory-mapped.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a 2-D integer ``.npy`` array with at least one row.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"token ids file {str(path)!r} does not exist.")
  try:
    ids = np.load(path, mmap_mode="r", allow_pickle=False)
  except ValueError as err:
    raise ValueError(f"{path} is not a .npy array ({err}); save the ids with np.save.") from err
  if not isinstance(ids, np.ndarray) or ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{path} must hold a 2-D integer array [sequences, context]; got "
                     f"{getattr(ids, 'dtype', type(ids).__name__)} of shape "
                     f"{getattr(ids, 'shape', None)}.")
  if ids.shape[0] < 1 or ids.shape[1] < 1:
    raise ValueError(f"{path} holds an empty array of shape {ids.shape}; it needs >= 1 "
                     f"sequence of >= 1 token.")
  return ids


def token_id_windows(token_ids: Int[np.ndarray, "s c"], *,
                     windows_per_chunk: int = WINDOWS_PER_CHUNK
                     ) -> Iterator[tuple[Int[np.ndarray, "n c"], Int[np.ndarray, "n c"]]]:
  """``(ids, mask)`` chunks of the rows of a ``[sequences, context]`` array (mask all ones)."""
  for start in range(0, len(token_ids), windows_per_chunk):
    ids = np.asarray(token_ids[start:start + windows_per_chunk], np.int32)
    yield ids, np.ones_like(ids)


def check_token_ids(token_ids: np.ndarray, vocab_size: int, what: str = "token_ids",
                    rows_per_read: int = 4096) -> None:
  """Every id lies in ``[0, vocab_size)`` (read in blocks of rows, for memory-mapped arrays)."""
  for start in range(0, len(token_ids), rows_per_read):
    _check_ids(np.asarray(token_ids[start:start + rows_per_read]), vocab_size, what)


def hook_layer(cfg: lm.models.LMConfig, hook: str) -> int:
  """The block a hook belongs to (``cfg.num_layers`` for ``ln_final.hook_normalized``).

  Raises:
    ValueError: for a hook name ``cfg`` does not have, listing the valid ones.
  """
  layer, _ = lm.core.parse_hook(hook, cfg.num_layers, cfg.parallel_residual)
  return cfg.num_layers if layer is None else layer


@functools.partial(jax.jit, static_argnames=("cfg", "hook"))
def _hook_activations(params: Mapping[str, Any], ids: Int[Array, "n t"], cfg: Any,
                      hook: str) -> Float[Array, "n t d"]:
  out = lm.forward(params, cfg, ids, hooks=(hook,), return_logits=False)
  return out.activations[hook].astype(jnp.float32)


def place_on_mesh(params: Mapping[str, Any], cfg: lm.models.LMConfig,
                  mesh: jax.sharding.Mesh) -> Mapping[str, Any]:
  """The parameters on ``mesh``: heads and MLP width over its "model" axis when it has one
  of size > 1 (``sae_jax.lm.param_partition_specs``), replicated otherwise."""
  n_model = dict(mesh.shape).get("model", 1)
  if n_model > 1:
    specs = lm.param_partition_specs(params, cfg, axis_size=n_model)
  else:
    specs = jax.tree.map(lambda _: P(), params)
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)


def activation_fn(params: Mapping[str, Any], cfg: lm.models.LMConfig, hook: str, *,
                  mesh: jax.sharding.Mesh | None = None) -> harvest_lib.ActivationFn:
  """``(ids [n, t], mask) -> [n, t, d]`` float32 activations at ``hook``, jitted.

  The forward pass stops after the block that computes the hook (``return_logits=False``);
  the parameters are an argument of the jitted function, not constants folded into it.
  The mask is ignored: a causal model needs no padding mask for full windows. With a
  ``mesh`` ("data" and optionally "model" axes, e.g. ``runkit.make_mesh({"data": None})``)
  the windows are split over "data" (``n`` must be divisible by its size) and the
  parameters placed by :func:`place_on_mesh`.
  """
  hook_layer(cfg, hook)
  batch = None
  if mesh is not None:
    if "data" not in mesh.shape:
      raise ValueError(f"mesh must have a 'data' axis; got axes {tuple(mesh.shape)}.")
    params = place_on_mesh(params, cfg, mesh)
    batch = NamedSharding(mesh, P("data"))

  def fn(ids, mask):
    del mask
    if batch is None:
      ids = jnp.asarray(ids, jnp.int32)
    else:
      if len(ids) % mesh.shape["data"]:
        raise ValueError(f"the batch of {len(ids)} windows must be divisible by the mesh's "
                         f"'data' axis ({mesh.shape['data']}); pick a batch size that is.")
      ids = jax.device_put(np.asarray(ids, np.int32), batch)
    return _hook_activations(params, ids, cfg=cfg, hook=hook)

  return fn


def skip_first_keep(skip_first: int) -> harvest_lib.KeepFn:
  """A ``keep_fn`` dropping the first ``skip_first`` positions of every window."""

  def keep(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(mask, bool) & (np.arange(ids.shape[1]) >= skip_first)[None]

  return keep


def _json(value: Any) -> Any:
  return json.loads(json.dumps(value))


def check_settings(store_path: str | os.PathLike, settings: Mapping[str, Any]) -> None:
  """Refuses to resume a store that was harvested with other settings.

  Does nothing when ``store_path`` holds no store yet.

  Raises:
    ValueError: naming the first setting that differs, its stored and its new value.
  """
  path = pathlib.Path(store_path)
  if not (path / store_lib.MANIFEST).exists():
    return
  stored = store_lib.read_manifest(path).get("meta", {})
  if "source" not in stored:
    raise ValueError(f"{path} holds a store not written by the language-model harvest (its "
                     f"meta has no 'source'); pass another store path.")
  for key, value in _json(dict(settings)).items():
    if stored.get(key) != value:
      raise ValueError(f"{path} was harvested with {key}={stored.get(key)!r}, but this run has "
                       f"{key}={value!r}; resume with the same settings or pass another store "
                       f"path.")


def harvest_lm(model_dir: str | os.PathLike, hook: str, store_path: str | os.PathLike, *,
               text: Sequence[str | os.PathLike] | None = None,
               token_ids: str | os.PathLike | None = None, context: int | None = None,
               skip_first: int = 1, batch_size: int = 8, max_tokens: int | None = None,
               model_dtype: str = "float32", store_dtype: str = "float32",
               shard_rows: int = store_lib.DEFAULT_SHARD_ROWS,
               progress: bool = True,
               mesh: jax.sharding.Mesh | None = None) -> store_lib.StoreReader:
  """Harvests a causal LM's activations at ``hook`` into an activation store; resumable.

  Exactly one source: ``text`` (files, tokenized and packed, see the module docstring) or
  ``token_ids`` (a ``.npy`` file ``[sequences, context]``). Rows are sequence-major, then
  by position, positions ``< skip_first`` of every context left out.

  Args:
    model_dir: local Hugging Face folder (``config.json``, safetensors weights,
      ``tokenizer.json`` for a text source).
    hook: TransformerLens hook name, e.g. ``"blocks.3.hook_resid_post"``.
    store_path: store folder; a store harvested there with the same settings is resumed.
    text: text files, each one document.
    token_ids: path of an ``np.save``-d int array.
    context: tokens per context; ``DEFAULT_CONTEXT`` for text, the array's second
      dimension for ``token_ids`` (which it must equal when given).
    skip_first: leading positions of every context not stored, in ``[0, context)``.
    batch_size: contexts per forward pass.
    max_tokens: stop once the store holds this many rows (None: the whole source).
    model_dtype: ``"float32"`` or ``"bfloat16"`` parameters and activations.
    store_dtype: storage dtype, a key of ``store.DTYPES``.
    shard_rows: rows per store shard.
    progress: show a progress bar.
    mesh: devices to run on (see :func:`activation_fn`); None: the default device. The
      rows are the same up to float32 rounding on any mesh; resume on the mesh the
      harvest started on for a byte-identical store.

  Returns:
    A reader on the finished store.

  Raises:
    ValueError: on a bad argument, an unknown hook, ids outside the vocabulary, or an
      existing store harvested with other settings.
    FileNotFoundError: a missing model folder, file or text file.
  """
  if (text is None) == (token_ids is None):
    raise ValueError("pass exactly one source: text=[files] or token_ids=path.npy.")
  if model_dtype not in MODEL_DTYPES:
    raise ValueError(f"model_dtype must be one of {sorted(MODEL_DTYPES)}; got {model_dtype!r}.")
  if store_dtype not in store_lib.DTYPES:
    raise ValueError(f"store_dtype must be one of {list(store_lib.DTYPES)}; got "
                     f"{store_dtype!r}.")
  for name, value in (("batch_size", batch_size), ("skip_first", skip_first)):
    if not _is_int(value) or value < (1 if name == "batch_size" else 0):
      raise ValueError(f"{name} must be an int >= {1 if name == 'batch_size' else 0}; got "
                       f"{value!r}.")
  if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
    raise ValueError(f"max_tokens must be an int >= 1 or None; got {max_tokens!r}.")
  folder = pathlib.Path(model_dir)
  cfg = lm.load_config(folder)
  layer = hook_layer(cfg, hook)

  if token_ids is not None:
    array = load_token_ids(token_ids)
    if context is not None and context != array.shape[1]:
      raise ValueError(f"context={context} must equal the second dimension of {token_ids} "
                       f"({array.shape[1]}), or be omitted.")
    context = int(array.shape[1])
    source = {"kind": "token_ids", "file": str(pathlib.Path(token_ids).resolve()),
              "shape": list(array.shape), "dtype": str(array.dtype)}
  else:
    if isinstance(text, (str, os.PathLike)) or not len(text):
      raise ValueError(f"text must be a non-empty list of files; got {text!r}.")
    for path in text:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"text file {str(path)!r} does not exist or is not a file.")
    context = DEFAULT_CONTEXT if context is None else context
    tokenizer = lm.load_tokenizer(folder)
    separator = eos_id(tokenizer)
    if separator is not None and separator >= cfg.vocab_size:
      raise ValueError(f"the tokenizer's end-of-text id {separator} is outside the model's "
                       f"vocabulary (vocab_size={cfg.vocab_size}); is tokenizer.json from "
                       f"this model?")
    source = {"kind": "text", "files": [str(pathlib.Path(p).resolve()) for p in text],
              "bytes": [os.path.getsize(p) for p in text], "separator_id": separator}
  if not _is_int(context) or not 1 <= context <= cfg.max_position:
    raise ValueError(f"context must be an int in [1, {cfg.max_position}] (the model's "
                     f"max_position); got {context!r}.")
  if skip_first >= context:
    raise ValueError(f"skip_first={skip_first} must be < context={context}, or nothing of a "
                     f"context is stored.")

  settings = {"model_dir": folder.resolve().name, "hook": hook, "context": int(context),
              "skip_first": int(skip_first), "model_dtype": model_dtype, "source": source}
  check_settings(store_path, settings)
  if token_ids is not None:
    check_token_ids(array, cfg.vocab_size, f"{token_ids}")
    windows = token_id_windows(array)
    # The source's row count is known: it bounds the run and gives the progress bar a total.
    rows = len(array) * (context - skip_first)
    max_tokens = rows if max_tokens is None else min(max_tokens, rows)
  else:
    windows = text_windows(tokenizer, text, context, separator=separator,
                           vocab_size=cfg.vocab_size)
  _, params = lm.load_model(folder, dtype=MODEL_DTYPES[model_dtype])
  if mesh is not None and batch_size % mesh.shape["data"]:
    raise ValueError(f"batch_size={batch_size} must be divisible by the mesh's 'data' axis "
                     f"({mesh.shape['data']}).")
  return harvest_lib.harvest(
      activation_fn(params, cfg, hook, mesh=mesh), windows, store_path, model_name=settings["model_dir"],
      layer=layer, hook=hook, max_tokens=max_tokens, batch_size=batch_size,
      keep_fn=skip_first_keep(skip_first), dtype=store_dtype, shard_rows=shard_rows,
      meta=settings, progress=progress)

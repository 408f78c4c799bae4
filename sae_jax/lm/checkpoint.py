"""Loads a causal language model and its tokenizer from a local Hugging Face folder.

The folder holds ``config.json``, the weights as ``model.safetensors`` or as
shards ``model-0000i-of-0000n.safetensors`` listed in
``model.safetensors.index.json``, and ``tokenizer.json``; ``save_pretrained``
writes exactly this. Nothing is ever downloaded: point ``model_dir`` at a
folder you already have. Reading needs ``safetensors`` and ``tokenizers``
(``pip install safetensors tokenizers``), not torch or transformers.

References:
  Radford et al. 2019, "Language Models are Unsupervised Multitask Learners".
  Black et al. 2022, "GPT-NeoX-20B: An Open-Source Autoregressive Language
  Model", arXiv 2204.06745.
  Biderman et al. 2023, "Pythia: A Suite for Analyzing Large Language Models
  Across Training and Scaling", arXiv 2304.01373.
"""

import importlib
import json
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax.lm import core, models

INSTALL_HINT = "pip install safetensors tokenizers"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _import(module: str):
  try:
    return importlib.import_module(module)
  except ImportError as err:
    raise ImportError(f"{module} is needed to read Hugging Face model folders: "
                      f"{INSTALL_HINT}") from err


def _folder(model_dir: str | pathlib.Path) -> pathlib.Path:
  folder = pathlib.Path(model_dir)
  if not folder.is_dir():
    raise FileNotFoundError(f"model_dir={str(folder)!r} is not a folder. Point model_dir at a "
                            f"local Hugging Face model folder (config.json, model.safetensors, "
                            f"tokenizer.json).")
  return folder


def _file(model_dir: str | pathlib.Path, name: str) -> pathlib.Path:
  folder = _folder(model_dir)
  path = folder / name
  if not path.is_file():
    raise FileNotFoundError(f"model_dir={str(folder)!r} has no {name}; it holds "
                            f"{sorted(p.name for p in folder.iterdir())}.")
  return path


def load_config(model_dir: str | pathlib.Path) -> models.LMConfig:
  """Reads ``config.json`` into a ``GPT2Config`` or ``NeoXConfig`` by its ``model_type``.

  Raises:
    FileNotFoundError: no ``config.json``.
    ValueError: unsupported ``model_type`` or configuration.
  """
  with open(_file(model_dir, "config.json")) as f:
    return models.config_from_hf_dict(json.load(f))


class SafetensorsFolder(Mapping):
  """Lazy ``name -> numpy array`` view of a folder's safetensors weights.

  Reads ``model.safetensors`` when present, otherwise every shard that
  ``model.safetensors.index.json`` lists. A tensor is read only when accessed.

  Raises:
    FileNotFoundError: when neither file exists or a listed shard is missing.
  """

  def __init__(self, model_dir: str | pathlib.Path):
    folder = _folder(model_dir)
    safe_open = _import("safetensors").safe_open
    if (folder / SINGLE_FILE).is_file():
      files = [folder / SINGLE_FILE]
      where = None
    elif (folder / INDEX_FILE).is_file():
      with open(folder / INDEX_FILE) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, Mapping) or not weight_map:
        raise ValueError(f"{folder / INDEX_FILE} has no weight_map; expected "
                         f'{{"weight_map": {{tensor_name: shard_file}}}}.')
      files = [folder / name for name in dict.fromkeys(weight_map.values())]
      for path in files:
        if not path.is_file():
          raise FileNotFoundError(f"{INDEX_FILE} lists the shard {path.name}, which is not in "
                                  f"{str(folder)!r}.")
      where = {name: folder / shard for name, shard in weight_map.items()}
    else:
      raise FileNotFoundError(
          f"model_dir={str(folder)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}; it holds "
          f"{sorted(p.name for p in folder.iterdir())}. Only safetensors weights are read (save "
          f"with save_pretrained(..., safe_serialization=True)).")
    self._handles = {path: safe_open(str(path), framework="numpy") for path in files}
    if where is None:
      where = {name: files[0] for name in self._handles[files[0]].keys()}
    else:
      for path, handle in self._handles.items():
        listed = {name for name, p in where.items() if p == path}
        absent = sorted(listed - set(handle.keys()))
        if absent:
          raise ValueError(f"{INDEX_FILE} places {absent[:3]} in {path.name}, which lacks them.")
    self._where = where

  def __getitem__(self, name: str) -> np.ndarray:
    return self._handles[self._where[name]].get_tensor(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def __contains__(self, name: object) -> bool:
    return name in self._where


def load_model(model_dir: str | pathlib.Path,
               dtype: Any = jnp.float32) -> tuple[models.LMConfig, dict[str, Any]]:
  """Loads a GPT-2 or GPT-NeoX / Pythia checkpoint from a local folder.

  Args:
    model_dir: folder with ``config.json`` and safetensors weights.
    dtype: floating dtype of the returned parameters (``jnp.float32`` or
      ``jnp.bfloat16``); weights are cast whatever dtype they are stored in.

  Returns:
    ``(cfg, params)`` for ``sae_jax.lm.forward``; ``params`` are device arrays.

  Raises:
    FileNotFoundError: missing ``config.json`` or weights.
    ValueError: unsupported ``model_type`` or configuration, a missing tensor
      or one whose shape disagrees with ``config.json`` (the error names it).
  """
  cfg = load_config(model_dir)
  dtype = core.float_dtype(dtype)
  params = models.convert_hf_weights(SafetensorsFolder(model_dir), cfg, dtype)
  return cfg, jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def load_tokenizer(model_dir: str | pathlib.Path):
  """The fast tokenizer from ``tokenizer.json``, with padding and truncation switched off.

  Inputs are packed into full windows by the caller, so the tokenizer must
  neither drop nor invent tokens.
  """
  tokenizer = _import("tokenizers").Tokenizer.from_file(str(_file(model_dir, "tokenizer.json")))
  tokenizer.no_padding()
  tokenizer.no_truncation()
  return tokenizer

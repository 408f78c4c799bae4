"""Export of a trained SAE to the folder layout SAELens loads, and loading it back.

Layout, as read by SAELens's ``SAE.load_from_disk(path)``::

  path/sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in],
                                 b_dec [d_in], float32; plus threshold [d_sae] for "jumprelu"
  path/cfg.json                  flat SAELens config + our own "sae_jax" record

What this follows, from jbloomAus/SAELens (v6 sources):

* ``sae_lens/saes/sae.py``, ``SAE.load_from_disk``: ``sae_lens_disk_loader`` reads the two
  files above, ``handle_config_defaulting`` treats a ``cfg.json`` without
  ``sae_lens_version`` as the flat pre-6.0 layout (``model_name``, ``hook_name``,
  ``hook_layer``, ``context_size``, ``prepend_bos``, ``dataset_path`` at the top level;
  TopK's ``k`` from ``activation_fn_kwargs``), unknown keys are filtered out, and
  ``load_state_dict`` is strict: the file holds exactly the architecture's tensors.
* ``sae_lens/saes/topk_sae.py``: "topk" keeps the k largest pre-activations per token, then
  applies a ReLU; the codes equal ours for either ``select_on``.
* ``sae_lens/saes/jumprelu_sae.py`` and ``batchtopk_sae.py``: "jumprelu" computes
  ``relu(pre) * (pre > threshold)`` with a ``[d_sae]`` threshold, and BatchTopK SAEs are
  saved as JumpReLU with their global threshold repeated over features. Our
  ``encode_thresholded`` is the same function, so Mutual Choice / BatchTopK / Feature Choice
  SAEs export as "jumprelu" with ``TrainState.threshold``.
* ``fold_activation_norm_scaling_factor``: SAELens folds the input normalisation into the
  weights at the end of training and saves ``normalize_activations = "none"``; we do the
  same (exactly, including a mean offset) unless ``fold=False``.

``hook_name`` defaults to TransformerLens's name for the stream we read: ``hidden_states[L]``
(the output of BERT block ``L``, after its LayerNorm) is
``blocks.{L-1}.hook_normalized_resid_post`` in ``HookedEncoder`` (its ``hook_resid_post`` is
the sum before that LayerNorm), and ``hidden_states[0]`` is ``hook_full_embed``.

Activations that do not come from a language-model layer (``data.synthbench``, a store
brought from elsewhere) export with ``layer=None`` and ``context_size=None``: the LM keys
(``model_name``, ``hook_name``, ``hook_layer``, ``context_size``, ``prepend_bos``) are then
written as ``null`` rather than invented. They stay present because the pre-6.0 SAELens
``SAEConfig`` dataclasses require them as fields; SAELens 6 copies them into its
``SAEMetadata``, which holds None for unknown values anyway. ``source`` and ``metadata``
name the data instead; they live in the ``sae_jax`` record (a top-level ``metadata`` key
would be read by SAELens 6 as its own metadata block). With a ``layer`` and neither of them,
``cfg.json`` is byte for byte what earlier versions wrote.

:func:`encode_exported` gives the codes an export represents, from the folder alone.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from sae_jax import model
from sae_jax.evaluation.evaluate import Normalization, as_normalization
from sae_jax.params import SAEParams

SAE_WEIGHTS = "sae_weights.safetensors"
SAE_CFG = "cfg.json"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
FORMAT_VERSION = 1
ARCHITECTURES = ("standard", "topk", "jumprelu")
_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
# Keys of cfg.json that describe a language-model source; null when there is none.
LM_KEYS = ("model_name", "hook_name", "hook_layer", "context_size", "prepend_bos")


class ExportedSAE(NamedTuple):
  """What :func:`load_exported` returns; unpacks as ``params, cfg, threshold``.

  Attributes:
    params: the SAE parameters in ``cfg.param_dtype`` (normalisation folded in if it was).
    cfg: the SAE configuration.
    threshold: float32 ``[d_sae]`` JumpReLU threshold, or None (TopK, ReLU).
  """

  params: SAEParams
  cfg: model.SAEConfig
  threshold: jax.Array | None


def hook_name_for_layer(layer: int) -> str:
  """TransformerLens ``HookedEncoder`` hook of ``hidden_states[layer]`` (see module doc)."""
  return "hook_full_embed" if layer == 0 else f"blocks.{layer - 1}.hook_normalized_resid_post"


def fold_normalization(params: SAEParams, normalization: Normalization) -> SAEParams:
  """An SAE on raw activations ``h`` equal to ``params`` on ``(h - mean) / scale``.

  ``W_enc / scale[:, None]``, ``W_dec * scale``, ``b_dec * scale + mean``; ``b_enc``,
  the codes and thresholds are unchanged. Computed in float64, returned in float32.

  References:
    Anthropic 2024, "Circuits Updates - April 2024" (transformer-circuits.pub), the
    input normalisation SAELens folds the same way (``fold_activation_norm_scaling_factor``).
  """
  w_enc, w_dec, b_enc, b_dec = (np.asarray(getattr(params, n), np.float64)
                                for n in ("W_enc", "W_dec", "b_enc", "b_dec"))
  mean = np.asarray(normalization.mean, np.float64)
  scale = np.broadcast_to(np.asarray(normalization.scale, np.float64), mean.shape)
  return SAEParams(W_enc=(w_enc / scale[:, None]).astype(np.float32),
                   b_enc=b_enc.astype(np.float32),
                   W_dec=(w_dec * scale[None, :]).astype(np.float32),
                   b_dec=(b_dec * scale + mean).astype(np.float32))


def _config_record(cfg: model.SAEConfig) -> dict[str, Any]:
  record = dataclasses.asdict(cfg)
  record["dtype"], record["param_dtype"] = cfg.dtype.name, cfg.param_dtype.name
  return record


def _architecture(cfg: model.SAEConfig, threshold) -> str:
  if cfg.allocation in ("topk", "relu"):
    if threshold is not None:
      raise ValueError(f"threshold must be None for allocation={cfg.allocation!r}, which is "
                       "already batch-independent; pass threshold=None.")
    return "topk" if cfg.allocation == "topk" else "standard"
  if threshold is None:
    raise ValueError(f"allocation={cfg.allocation!r} selects over a whole batch, which SAELens "
                     "cannot run; pass threshold=TrainState.threshold to export it as JumpReLU.")
  return "jumprelu"


def _shapes(d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
  return {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}


def _check_int(name: str, value: Any, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")


def _check_metadata(source: Any, metadata: Any) -> None:
  if source is not None and (not isinstance(source, str) or not source):
    raise ValueError("source must be a non-empty string naming where the activations came "
                     f"from (e.g. 'synthbench:cpu'), or None; got {source!r:.200}.")
  if metadata is None:
    return
  if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
    raise ValueError("metadata must be a mapping with str keys (stored in cfg.json), or "
                     f"None; got {metadata!r:.200}.")
  try:
    json.dumps(dict(metadata), allow_nan=False)
  except (TypeError, ValueError) as err:
    raise ValueError("metadata must hold only JSON values (str, finite int or float, bool, "
                     "None, lists and str-keyed dicts of them); convert NumPy scalars with "
                     f".item() and arrays with .tolist() ({err}).") from err


def _lm_record(layer: int | None, context_size: int | None, model_name: str | None,
               hook_name: str | None, prepend_bos: bool | None) -> dict[str, Any]:
  """The LM keys of cfg.json; null for what the caller did not give (see the module doc)."""
  if layer is not None:
    model_name = MINILM if model_name is None else model_name
    hook_name = hook_name_for_layer(layer) if hook_name is None else hook_name
    prepend_bos = True if prepend_bos is None else prepend_bos
  hook_layer = None if layer is None else max(int(layer) - 1, 0)
  named = None if hook_name is None else re.match(r"blocks\.(\d+)\.", str(hook_name))
  if layer is not None and named:  # a TransformerLens block hook names its own block
    hook_layer = int(named.group(1))
  return {"model_name": None if model_name is None else str(model_name),
          "hook_name": None if hook_name is None else str(hook_name),
          "hook_layer": hook_layer,
          "context_size": None if context_size is None else int(context_size),
          "prepend_bos": prepend_bos}


def export_saelens(path: str | os.PathLike, params: SAEParams, cfg: model.SAEConfig, *,
                   layer: int | None = None, context_size: int | None = None,
                   threshold: Float[ArrayLike, " f"] | float | None = None,
                   normalization: Any = None, fold: bool = True,
                   model_name: str | None = None, hook_name: str | None = None,
                   dataset_path: str = "", prepend_bos: bool | None = None,
                   source: str | None = None,
                   metadata: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Writes ``sae_weights.safetensors`` and ``cfg.json`` for SAELens into ``path``.

  Works for any source of activations. For a language-model layer pass ``layer`` and
  ``context_size``; for anything else (``data.synthbench``, a brought activation store)
  leave them None and name the data with ``source`` / ``metadata``: the LM keys of
  ``cfg.json`` are then null, never invented (see the module docstring). For example
  ``export_saelens(path, state.params, cfg, threshold=state.threshold,
  normalization=norm, source="synthbench:cpu", metadata={"seed": 0})``.

  Args:
    path: output folder (created if missing; the two files are replaced).
    params, cfg: the SAE.
    layer: ``hidden_states`` index the SAE reads (0 = embeddings); sets ``hook_name`` and
      ``hook_layer`` (the TransformerLens block index: ``l`` of a given
      ``blocks.{l}.*`` ``hook_name``, else ``max(layer - 1, 0)``). None (no
      LM layer): ``hook_layer`` null, and ``hook_name`` / ``model_name`` / ``prepend_bos``
      null unless given.
    context_size: tokens per window the activations came from; None writes null.
    threshold: ``TrainState.threshold`` (scalar or ``[d_sae]``); required for Mutual
      Choice / BatchTopK / Feature Choice ("jumprelu"), refused for TopK / ReLU.
    normalization: the SAE's input normalisation (see ``evaluate.Normalization``).
    fold: fold ``normalization`` into the weights (``normalize_activations = "none"``);
      False writes ``"expected_average_only_in"``, which only expresses a pure rescaling.
    model_name, hook_name, dataset_path, prepend_bos: SAELens metadata. With a ``layer``,
      None means ``MINILM``, ``hook_name_for_layer(layer)`` and True; without, null.
    source: a name for where the activations came from (e.g. ``"synthbench:cpu"``),
      recorded in the ``sae_jax`` record of ``cfg.json``; see :func:`exported_source`.
    metadata: a JSON-serialisable mapping recorded beside ``source`` (seed, preset,
      store path, ...); tuples come back as lists.

  References:
    Bloom, Tigges, Duong and Chanin 2024, SAELens (github.com/jbloomAus/SAELens): the
    layout and loader followed (see the module docstring).

  Returns:
    The folder.

  Raises:
    ValueError: for parameters that do not match ``cfg``, a missing, superfluous,
      malformed or uncalibrated threshold, bad metadata, or ``fold=False`` with a mean.
  """
  safetensors_numpy = _safetensors()
  if layer is not None:
    _check_int("layer", layer, 0)
  if context_size is not None:
    _check_int("context_size", context_size, 1)
  if prepend_bos is not None and not isinstance(prepend_bos, (bool, np.bool_)):
    raise ValueError(f"prepend_bos must be a bool or None; got {prepend_bos!r}.")
  _check_metadata(source, metadata)
  for name, shape in _shapes(cfg.d_model, cfg.d_sae).items():
    if tuple(np.shape(getattr(params, name))) != shape:
      raise ValueError(f"params.{name} must have shape {shape} for d_model={cfg.d_model}, "
                       f"d_sae={cfg.d_sae}; got {tuple(np.shape(getattr(params, name)))}.")
  arch = _architecture(cfg, threshold)
  tensors = {n: np.asarray(getattr(params, n), np.float32) for n in _TENSORS}
  if arch == "jumprelu":
    theta = np.asarray(threshold, np.float32)
    if theta.shape not in ((), (cfg.d_sae,)) or np.any(np.isnan(theta)):
      raise ValueError(f"threshold must be a scalar or [d_sae={cfg.d_sae}] without NaN; got "
                       f"shape {theta.shape}.")
    if not np.any(np.isfinite(theta)):
      raise ValueError("threshold is uncalibrated (every entry +inf, the initial value of "
                       "TrainState.threshold); train for at least one step first.")
    tensors["threshold"] = np.broadcast_to(theta, (cfg.d_sae,))
  norm = as_normalization(normalization, cfg.d_model)
  norm_mode, norm_record = "none", None
  if norm is not None:
    norm_record = {"mean": norm.mean.tolist(), "scale": norm.scale.tolist(), "folded": fold}
    if fold:
      tensors.update(fold_normalization(params, norm)._asdict())
    elif np.any(norm.mean != 0) or norm.scale.ndim:
      raise ValueError("fold=False can only express a pure rescaling (normalization.mean 0, "
                       "scalar scale) in SAELens; pass fold=True to fold the mean in.")
    else:
      norm_mode = "expected_average_only_in"
  activation = "topk" if arch == "topk" else "relu"
  topk = {"k": int(cfg.k)} if arch == "topk" else {}
  lm = _lm_record(layer, context_size, model_name, hook_name,
                  None if prepend_bos is None else bool(prepend_bos))
  own = {"format_version": FORMAT_VERSION, "config": _config_record(cfg),
         "layer": None if layer is None else int(layer), "normalization": norm_record}
  # Only when given, so that an LM export without them keeps its earlier bytes.
  if source is not None:
    own["source"] = source
  if metadata is not None:
    own["metadata"] = dict(metadata)
  cfg_json = {
      "architecture": arch, "d_in": cfg.d_model, "d_sae": cfg.d_sae,
      "dtype": "float32", "device": "cpu", "model_name": lm["model_name"],
      "hook_name": lm["hook_name"], "hook_layer": lm["hook_layer"], "hook_head_index": None,
      "activation_fn": activation, "activation_fn_str": activation,
      "activation_fn_kwargs": topk, **topk,
      "apply_b_dec_to_input": True, "normalize_activations": norm_mode,
      "context_size": lm["context_size"], "prepend_bos": lm["prepend_bos"],
      "dataset_path": str(dataset_path), "dataset_trust_remote_code": False,
      "finetuning_scaling_factor": False, "sae_lens_training_version": None,
      "model_from_pretrained_kwargs": {}, "neuronpedia_id": None,
      "reshape_activations": "none",
      "sae_jax": own,
  }
  folder = pathlib.Path(path)
  folder.mkdir(parents=True, exist_ok=True)
  tmp = folder / (SAE_WEIGHTS + ".tmp")
  # "pt" marks the PyTorch tensor layout SAELens expects; the bytes are the same.
  safetensors_numpy.save_file({n: np.ascontiguousarray(t, np.float32) for n, t in tensors.items()},
                              str(tmp), metadata={"format": "pt"})
  os.replace(tmp, folder / SAE_WEIGHTS)
  (folder / SAE_CFG).write_text(json.dumps(cfg_json, indent=2))
  return folder


def _safetensors():
  try:
    return importlib.import_module("safetensors.numpy")
  except ImportError as err:
    raise ImportError("SAELens export needs safetensors: pip install safetensors") from err


def _read_cfg(folder: pathlib.Path) -> dict[str, Any]:
  for name in (SAE_CFG, SAE_WEIGHTS):
    if not (folder / name).is_file():
      raise FileNotFoundError(f"{folder / name}: missing; {folder} is not an exported SAE.")
  try:
    cfg_json = json.loads((folder / SAE_CFG).read_text())
  except json.JSONDecodeError as err:
    raise ValueError(f"{folder / SAE_CFG}: corrupt JSON ({err}).") from err
  if not isinstance(cfg_json, dict):
    raise ValueError(f"{folder / SAE_CFG}: must hold a JSON object.")
  return cfg_json


def _foreign_config(cfg_json: dict[str, Any], arch: str, d_in: int, d_sae: int
                    ) -> model.SAEConfig:
  """An SAEConfig for a folder SAELens wrote (no "sae_jax" record)."""
  if arch != "topk":
    # JumpReLU runs through encode_thresholded with the returned threshold.
    return model.SAEConfig(d_model=d_in, d_sae=d_sae, allocation="relu")
  k = cfg_json.get("k", (cfg_json.get("activation_fn_kwargs") or {}).get("k"))
  return model.SAEConfig(d_model=d_in, d_sae=d_sae, allocation="topk", k=k, select_on="raw")


def load_exported(path: str | os.PathLike) -> ExportedSAE:
  """Reads a folder written by :func:`export_saelens` (or by SAELens itself).

  Our own exports round-trip bitwise, with or without an LM layer: parameters in
  ``cfg.param_dtype``, the config from the ``sae_jax`` record. Folded normalisation stays
  folded (the SAE then takes raw activations); see :func:`exported_normalization` for the
  unfolded case and :func:`exported_source` for what the activations were. A folder
  SAELens wrote loads as TopK ("topk", ranking raw pre-activations) or ReLU ("standard",
  "jumprelu"; the latter with its threshold), with ``apply_b_dec_to_input = False`` folded
  into ``b_enc``. :func:`encode_exported` (or ``model.inference_codes``) runs any of them.

  Returns:
    ``ExportedSAE(params, cfg, threshold)``; ``threshold`` is the float32 ``[d_sae]``
    JumpReLU threshold, or None for the other architectures.

  Raises:
    FileNotFoundError: a file is missing.
    ValueError: corrupt or unsupported config, or tensors that do not match it.
  """
  folder = pathlib.Path(path)
  cfg_json = _read_cfg(folder)
  arch = cfg_json.get("architecture", "standard")
  if arch not in ARCHITECTURES:
    raise ValueError(f"{folder / SAE_CFG}: architecture must be one of {ARCHITECTURES}; got "
                     f"{arch!r}.")
  if cfg_json.get("normalize_activations") not in (None, "none", "expected_average_only_in"):
    raise ValueError(f"{folder / SAE_CFG}: normalize_activations="
                     f"{cfg_json['normalize_activations']!r} is computed at run time and has "
                     "no equivalent here; only 'none' and 'expected_average_only_in' load.")
  d_in, d_sae = cfg_json.get("d_in"), cfg_json.get("d_sae")
  for name, value in (("d_in", d_in), ("d_sae", d_sae)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{folder / SAE_CFG}: {name} must be an int >= 1; got {value!r}.")
  tensors = _safetensors().load_file(str(folder / SAE_WEIGHTS))
  shapes = _shapes(d_in, d_sae)
  if arch == "jumprelu":
    shapes["threshold"] = (d_sae,)
  if set(tensors) != set(shapes):
    raise ValueError(f"{folder / SAE_WEIGHTS}: a {arch!r} SAE holds exactly {sorted(shapes)}; "
                     f"got {sorted(tensors)}.")
  for name, shape in shapes.items():
    if tensors[name].shape != shape:
      raise ValueError(f"{folder / SAE_WEIGHTS}: tensor {name} has shape "
                       f"{tensors[name].shape}; cfg.json (d_in={d_in}, d_sae={d_sae}) needs "
                       f"{shape}.")
  own = cfg_json.get("sae_jax")
  if own is not None:
    try:
      cfg = model.SAEConfig(**own["config"])
    except (TypeError, KeyError, ValueError) as err:
      message = f"{folder / SAE_CFG}: the sae_jax record is not an SAEConfig ({err})."
      raise ValueError(message) from err
    if (cfg.d_model, cfg.d_sae) != (d_in, d_sae):
      raise ValueError(f"{folder / SAE_CFG}: the sae_jax config ({cfg.d_model}, {cfg.d_sae}) "
                       f"disagrees with d_in={d_in}, d_sae={d_sae}.")
  else:
    cfg = _foreign_config(cfg_json, arch, d_in, d_sae)
  if not cfg_json.get("apply_b_dec_to_input", True):
    # SAELens then encodes x @ W_enc + b_enc; ours subtracts b_dec first.
    w_enc = tensors["W_enc"].astype(np.float64)
    b_enc = tensors["b_enc"].astype(np.float64) + tensors["b_dec"].astype(np.float64) @ w_enc
    tensors["b_enc"] = b_enc.astype(np.float32)
  params = SAEParams(*(jnp.asarray(tensors[n], cfg.param_dtype) for n in _TENSORS))
  threshold = jnp.asarray(tensors["threshold"], jnp.float32) if arch == "jumprelu" else None
  return ExportedSAE(params, cfg, threshold)


def exported_normalization(path: str | os.PathLike) -> Normalization | None:
  """The normalisation to apply around an SAE from :func:`load_exported`.

  None when the export had none or folded it into the weights (and for folders SAELens
  wrote, whose cfg.json keeps no scaling factor); the recorded rescaling for an export
  written with ``fold=False``.
  """
  folder = pathlib.Path(path)
  record = (_read_cfg(folder).get("sae_jax") or {}).get("normalization")
  if record is None or record.get("folded", True):
    return None
  return as_normalization(record, len(record["mean"]))


def exported_source(path: str | os.PathLike) -> dict[str, Any]:
  """Where the activations of an exported SAE came from, as ``cfg.json`` records it.

  Returns:
    ``{"source", "metadata", "layer", "model_name", "hook_name", "context_size",
    "dataset_path"}``, None for whatever is not recorded: ``source``, ``metadata`` and
    ``layer`` come from the ``sae_jax`` record of :func:`export_saelens`, the others from
    the SAELens keys (top level, or the ``metadata`` block of a SAELens 6 folder).

  Raises:
    FileNotFoundError, ValueError: as :func:`load_exported` for a missing or corrupt file.
  """
  cfg_json = _read_cfg(pathlib.Path(path))
  own = cfg_json.get("sae_jax")
  own = own if isinstance(own, dict) else {}
  nested = cfg_json.get("metadata")
  nested = nested if isinstance(nested, dict) else {}
  info = {key: own.get(key) for key in ("source", "metadata", "layer")}
  for key in ("model_name", "hook_name", "context_size", "dataset_path"):
    info[key] = cfg_json.get(key, nested.get(key))
  return info


def encode_exported(exported: str | os.PathLike | ExportedSAE | tuple,
                    x: Float[ArrayLike, "b d"], *,
                    normalization: Any = None) -> Float[Array, "b f"]:
  """The codes an exported SAE gives raw activations ``x``; batch-independent.

  Applies the normalisation an export left unfolded, then ``model.inference_codes`` with
  the exported threshold: TopK keeps its per-token top-k, ReLU every positive entry,
  Mutual Choice / BatchTopK / Feature Choice the JumpReLU at their calibrated threshold.
  For an export of ``params`` with ``normalization=norm`` (folded or not), the result
  equals ``model.inference_codes(params, (x - norm.mean) / norm.scale, cfg, threshold)``
  up to float32 rounding of the folded weights (exactly when nothing was folded), and a
  row's codes do not depend on the other rows.

  Args:
    exported: the folder of :func:`export_saelens` (or SAELens), or the
      ``(params, cfg, threshold)`` that :func:`load_exported` returned.
    x: raw activations ``[b, d_in]``, as the source produced them.
    normalization: only with a loaded tuple: the unfolded normalisation to apply first,
      i.e. ``exported_normalization(folder)``; a folder supplies its own.

  Returns:
    Codes ``[b, d_sae]`` in the SAE's compute dtype.

  Raises:
    ValueError: a threshold missing for a batch-level allocation (pass the tuple with the
      calibrated ``TrainState.threshold``), ``normalization`` given with a folder, a
      SAELens folder whose run-time normalisation is not recorded, a malformed
      ``exported``, or ``x`` not ``[b, d_in]``.
    FileNotFoundError: as :func:`load_exported`.
  """
  if isinstance(exported, (str, os.PathLike)):
    folder = pathlib.Path(exported)
    if normalization is not None:
      raise ValueError(f"normalization must be None with a folder ({folder}), which records "
                       "its own; pass normalization=None, or a loaded tuple to override it.")
    params, cfg, threshold = load_exported(folder)
    norm = exported_normalization(folder)
    mode = _read_cfg(folder).get("normalize_activations")
    if norm is None and mode not in (None, "none"):
      raise ValueError(f"{folder / SAE_CFG}: normalize_activations={mode!r} rescales inputs by a "
                       "factor SAELens estimates at run time and this folder does not record; "
                       "pass (params, cfg, threshold) from load_exported with "
                       "normalization={'mean': 0.0, 'scale': ...}.")
  else:
    if not isinstance(exported, tuple) or len(exported) != 3:
      raise ValueError("exported must be a folder path or the (params, cfg, threshold) that "
                       f"load_exported returns; got {type(exported).__name__}.")
    params, cfg, threshold = exported
    if not isinstance(cfg, model.SAEConfig):
      raise ValueError("exported must be (params, cfg, threshold) with cfg a model.SAEConfig; "
                       f"got cfg of type {type(cfg).__name__}.")
    norm = as_normalization(normalization, cfg.d_model)
  x_BxD = jnp.asarray(x)
  if norm is not None:
    # As evaluate.splice_reconstruction normalises.
    x_BxD = (x_BxD.astype(jnp.float32) - norm.mean) / norm.scale
  return model.inference_codes(params, x_BxD, cfg, threshold)

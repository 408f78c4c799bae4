"""Pieces shared by the causal language models: hooks, attention, the layer-scan runner.

Both architectures use one parameter layout (``l`` = layers, ``h`` = heads,
``e`` = head width, ``i`` = MLP width, kernels are ``[in, ..., out]``)::

  {"embed": {"token": [vocab, d], "position": [max_position, d]},  # position: GPT-2 only
   "layers": {"ln_1" | "ln_2": {"scale": [l, d], "bias": [l, d]},
              "qkv": {"kernel": [l, d, 3, h, e], "bias": [l, 3, h, e]},
              "attn_out": {"kernel": [l, h, e, d], "bias": [l, d]},
              "mlp_in": {"kernel": [l, d, i], "bias": [l, i]},
              "mlp_out": {"kernel": [l, i, d], "bias": [l, d]}},
   "ln_final": {"scale": [d], "bias": [d]},
   "unembed": {"kernel": [d, vocab]}}       # only when the output matrix is untied

Attention biases are absent when a GPT-NeoX config sets ``attention_bias=False``.
The ``3`` axis of ``qkv`` is (query, key, value), so heads are one explicit
axis that can be sharded (``sae_jax.lm.sharding``).

Hook names follow TransformerLens (Nanda and Bloom 2022)::

  blocks.{l}.hook_resid_pre    stream entering block l
  blocks.{l}.hook_attn_out     attention output of block l (after its output projection)
  blocks.{l}.hook_resid_mid    stream after the attention add (sequential blocks only)
  blocks.{l}.hook_mlp_out      MLP output of block l
  blocks.{l}.hook_resid_post   stream leaving block l (= blocks.{l+1}.hook_resid_pre)
  ln_final.hook_normalized     final LayerNorm output, the input of the unembedding

References:
  Vaswani et al. 2017, "Attention Is All You Need", arXiv 1706.03762.
  Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2).
  Black et al. 2022, "GPT-NeoX-20B: An Open-Source Autoregressive Language Model",
  arXiv 2204.06745.
"""

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from sae_jax.data.bert import layer_norm

# Hugging Face activation names (transformers.activations.ACT2FN) -> functions.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

BLOCK_HOOKS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
LN_FINAL_HOOK = "ln_final.hook_normalized"
_BLOCK_HOOK_RE = re.compile(r"blocks\.(0|[1-9][0-9]*)\.hook_([a-z_]+)")

# (layer, kind) of a hook inside block ``layer``; (None, LN_FINAL_HOOK) for the final norm.
HookKey = tuple[int | None, str]
Tap = Callable[[str, Array], Array]


class LMOutput(NamedTuple):
  """Result of a forward pass.

  Attributes:
    logits: ``[n, t, vocab]`` next-token logits in float32; None when the
      caller passed ``return_logits=False``.
    activations: requested hook name -> ``[n, t, d]`` activation in the
      parameter dtype. At a replaced hook this is the replacement.
  """

  logits: Float[Array, "n t v"] | None
  activations: dict[str, Float[Array, "n t d"]]


def valid_hook_forms(num_layers: int, parallel_residual: bool) -> str:
  """One line describing every accepted hook name, for error messages."""
  kinds = [k for k in BLOCK_HOOKS if not (parallel_residual and k == "resid_mid")]
  forms = ", ".join(f"blocks.{{l}}.hook_{k}" for k in kinds)
  note = (" (hook_resid_mid does not exist with a parallel residual)"
          if parallel_residual else "")
  return f"{forms} for l in [0, {num_layers - 1}], and {LN_FINAL_HOOK}{note}"


def hook_names(num_layers: int, parallel_residual: bool) -> tuple[str, ...]:
  """Every valid hook name, block by block, then ``ln_final.hook_normalized``."""
  kinds = [k for k in BLOCK_HOOKS if not (parallel_residual and k == "resid_mid")]
  return tuple(f"blocks.{l}.hook_{k}" for l in range(num_layers) for k in kinds) + (
      LN_FINAL_HOOK,)


def parse_hook(name: Any, num_layers: int, parallel_residual: bool) -> HookKey:
  """``"blocks.3.hook_mlp_out"`` -> ``(3, "mlp_out")``; the final norm's hook -> ``(None, name)``.

  Raises:
    ValueError: naming the bad hook and listing the valid forms.
  """
  if name == LN_FINAL_HOOK:
    return None, LN_FINAL_HOOK
  match = _BLOCK_HOOK_RE.fullmatch(name) if isinstance(name, str) else None
  valid = valid_hook_forms(num_layers, parallel_residual)
  if match is None or match.group(2) not in BLOCK_HOOKS:
    raise ValueError(f"Unknown hook name {name!r}. Valid hook names: {valid}.")
  layer, kind = int(match.group(1)), match.group(2)
  if layer >= num_layers:
    raise ValueError(f"Hook {name!r} names block {layer}, but the model has {num_layers} blocks "
                     f"(l in [0, {num_layers - 1}]). Valid hook names: {valid}.")
  if kind == "resid_mid" and parallel_residual:
    raise ValueError(f"Hook {name!r} does not exist: with use_parallel_residual=True attention and "
                     f"MLP read the same stream, so there is no mid-block residual. Valid hook "
                     f"names: {valid}.")
  return layer, kind


def _hook_depth(key: HookKey, num_layers: int) -> int:
  """How many blocks must run before the hook's value exists."""
  layer, kind = key
  if layer is None:
    return num_layers
  return layer if kind == "resid_pre" else layer + 1


def _hook_order(key: HookKey, num_layers: int) -> tuple[int, int]:
  """Position of a hook in the computation, for "is it downstream of" checks."""
  layer, kind = key
  return (num_layers, 0) if layer is None else (layer, BLOCK_HOOKS.index(kind))


def check_input_ids(input_ids: Any, max_position: int) -> None:
  """Input ids must be ``[n, t]`` integers with ``1 <= t <= max_position``."""
  shape = getattr(input_ids, "shape", None)
  dtype = getattr(input_ids, "dtype", None)
  if shape is None or len(shape) != 2 or not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"input_ids must be a 2-D integer array [n, t]; got shape "
                     f"{None if shape is None else tuple(shape)} and dtype {dtype}.")
  if not 1 <= shape[1] <= max_position:
    raise ValueError(f"input_ids length t must lie in [1, {max_position}] (the model's "
                     f"max_position); got t={shape[1]}. Cut the text into windows of at most "
                     f"{max_position} tokens.")


def dense(x: Array, p: Mapping[str, Array]) -> Array:
  """``x @ kernel + bias`` (bias optional)."""
  y = x @ p["kernel"]
  return y + p["bias"] if "bias" in p else y


def causal_attention(
    x_NxTxD: Float[Array, "n t d"],
    layer: Mapping[str, Any],
    *,
    scale: float,
    rotary: Callable[[Array], Array] | None = None,
) -> Float[Array, "n t d"]:
  """Causal multi-head self-attention of one block, including its output projection.

  Scores and softmax are computed in float32 whatever the parameter dtype.

  Args:
    x_NxTxD: normalised block input.
    layer: unstacked block parameters with ``qkv`` and ``attn_out``.
    scale: multiplier of the query-key dot products (``1/sqrt(head_dim)``).
    rotary: optional position encoding applied to queries and keys
      (``[n, t, h, e] -> [n, t, h, e]``).
  """
  qkv = layer["qkv"]
  qkv_NxTx3xHxE = jnp.einsum("ntd,dshe->ntshe", x_NxTxD, qkv["kernel"])
  if "bias" in qkv:
    qkv_NxTx3xHxE = qkv_NxTx3xHxE + qkv["bias"]
  q_NxTxHxE, k_NxTxHxE, v_NxTxHxE = (qkv_NxTx3xHxE[:, :, i] for i in range(3))
  if rotary is not None:
    q_NxTxHxE, k_NxTxHxE = rotary(q_NxTxHxE), rotary(k_NxTxHxE)
  scores_NxHxTxT = jnp.einsum("nqhe,nkhe->nhqk", q_NxTxHxE, k_NxTxHxE,
                              preferred_element_type=jnp.float32) * scale
  t = x_NxTxD.shape[1]
  causal_TxT = jnp.tril(jnp.ones((t, t), dtype=bool))
  scores_NxHxTxT = jnp.where(causal_TxT, scores_NxHxTxT, jnp.finfo(jnp.float32).min)
  probs_NxHxTxT = jax.nn.softmax(scores_NxHxTxT, axis=-1).astype(v_NxTxHxE.dtype)
  ctx_NxTxHxE = jnp.einsum("nhqk,nkhe->nqhe", probs_NxHxTxT, v_NxTxHxE)
  out = layer["attn_out"]
  attn_NxTxD = jnp.einsum("nqhe,hed->nqd", ctx_NxTxHxE, out["kernel"])
  return attn_NxTxD + out["bias"] if "bias" in out else attn_NxTxD


def mlp(x_NxTxD: Float[Array, "n t d"], layer: Mapping[str, Any],
        activation: str) -> Float[Array, "n t d"]:
  """``mlp_out(act(mlp_in(x)))``."""
  return dense(ACTIVATIONS[activation](dense(x_NxTxD, layer["mlp_in"])), layer["mlp_out"])


def block(h_NxTxD: Float[Array, "n t d"], layer: Mapping[str, Any], tap: Tap, *,
          eps: float, activation: str, scale: float, parallel_residual: bool,
          rotary: Callable[[Array], Array] | None = None) -> Float[Array, "n t d"]:
  """One pre-LayerNorm decoder block, sequential or parallel residual.

  Sequential (GPT-2; GPT-NeoX with ``use_parallel_residual=False``)::

    mid = h + attn(ln_1(h));  out = mid + mlp(ln_2(mid))

  Parallel (GPT-J style, GPT-NeoX default)::

    out = h + attn(ln_1(h)) + mlp(ln_2(h))

  ``tap(kind, x)`` sees ``attn_out``, ``resid_mid`` (sequential only) and
  ``mlp_out``, and its return value is what the block uses downstream.
  """
  attn_NxTxD = causal_attention(layer_norm(h_NxTxD, **layer["ln_1"], eps=eps), layer,
                                scale=scale, rotary=rotary)
  attn_NxTxD = tap("attn_out", attn_NxTxD)
  if parallel_residual:
    mlp_NxTxD = tap("mlp_out", mlp(layer_norm(h_NxTxD, **layer["ln_2"], eps=eps), layer,
                                   activation))
    return h_NxTxD + attn_NxTxD + mlp_NxTxD
  mid_NxTxD = tap("resid_mid", h_NxTxD + attn_NxTxD)
  mlp_NxTxD = tap("mlp_out", mlp(layer_norm(mid_NxTxD, **layer["ln_2"], eps=eps), layer,
                                 activation))
  return mid_NxTxD + mlp_NxTxD


def unembed(params: Mapping[str, Any], x_NxTxD: Float[Array, "n t d"]) -> Float[Array, "n t v"]:
  """Float32 logits from the untied ``unembed`` kernel, or the tied token embedding."""
  if "unembed" in params:
    return jnp.einsum("ntd,dv->ntv", x_NxTxD, params["unembed"]["kernel"],
                      preferred_element_type=jnp.float32)
  return jnp.einsum("ntd,vd->ntv", x_NxTxD, params["embed"]["token"],
                    preferred_element_type=jnp.float32)


def _normalize_replace(replace: Any) -> dict[str, Callable[[Array], Array]]:
  if replace is None:
    return {}
  if isinstance(replace, Mapping):
    items = list(replace.items())
  elif isinstance(replace, Sequence) and not isinstance(replace, str):
    items = list(replace)
    if not all(isinstance(item, tuple) and len(item) == 2 for item in items):
      raise ValueError("replace must be a mapping {hook_name: fn} or a sequence of "
                       f"(hook_name, fn) pairs; got {replace!r}.")
  else:
    raise ValueError("replace must be a mapping {hook_name: fn} or a sequence of "
                     f"(hook_name, fn) pairs; got {type(replace).__name__}.")
  out = {}
  for name, fn in items:
    if not callable(fn):
      raise ValueError(f"replace[{name!r}] must be a callable activation -> activation; got "
                       f"{fn!r}.")
    if name in out:
      raise ValueError(f"replace names hook {name!r} twice; give one function per hook.")
    out[name] = fn
  return out


def _apply_replacement(name: str, fn: Callable[[Array], Array], x: Array) -> Array:
  new = fn(x)
  if getattr(new, "shape", None) != x.shape:
    raise ValueError(f"replace[{name!r}] must return the activation's shape {tuple(x.shape)}; "
                     f"got {getattr(new, 'shape', type(new).__name__)}.")
  return jnp.asarray(new).astype(x.dtype)


def run_decoder(
    params: Mapping[str, Any],
    cfg: Any,
    input_ids: Int[Array, "n t"],
    *,
    embed_fn: Callable[[Mapping[str, Any], Int[Array, "n t"]], Float[Array, "n t d"]],
    block_fn: Callable[[Array, Mapping[str, Any], Tap], Array],
    hooks: Sequence[str] = (),
    replace: Any = None,
    return_logits: bool = True,
) -> LMOutput:
  """Embeds, runs the blocks with hooks, then the final norm and unembedding.

  Runs of consecutive blocks that read the same hook kinds and replace nothing
  run as one ``jax.lax.scan`` (hook activations come out as its stacked
  outputs); blocks with a replacement run on their own. Compile time thus
  grows with the number of distinct hooked blocks, never with depth. Without
  ``return_logits`` the pass stops after the last block a hook needs.

  Args:
    params: parameter pytree (see the module docstring).
    cfg: config with ``num_layers``, ``max_position``, ``layer_norm_eps`` and
      ``parallel_residual``.
    input_ids: ``[n, t]`` token ids.
    embed_fn: ``(params, input_ids) -> [n, t, d]`` input stream.
    block_fn: ``(h, unstacked_layer, tap) -> h`` one block (see ``block``).
    hooks: hook names whose activations are returned.
    replace: ``{hook_name: fn}`` (or ``(name, fn)`` pairs); ``fn(activation)``
      must return the same shape and the pass continues from its output.
    return_logits: False skips the unembedding (and the blocks after the last
      hook needed).

  Raises:
    ValueError: on bad hook names, input shapes or a replacement that could
      not affect anything returned.
  """
  check_input_ids(input_ids, cfg.max_position)
  if isinstance(hooks, str) or not isinstance(hooks, Sequence):
    raise ValueError(f"hooks must be a sequence of hook names (wrap one name in a tuple); got "
                     f"{hooks!r}.")
  num_layers = cfg.num_layers
  parallel = cfg.parallel_residual
  reads = {name: parse_hook(name, num_layers, parallel) for name in hooks}
  replace_fns = _normalize_replace(replace)
  replaced = {parse_hook(name, num_layers, parallel): (name, fn)
              for name, fn in replace_fns.items()}
  if not reads and not return_logits:
    raise ValueError("Nothing to compute: return_logits=False and no hooks requested. Pass hook "
                     "names in hooks or set return_logits=True.")
  stop = num_layers if return_logits else max(_hook_depth(k, num_layers) for k in reads.values())
  if not return_logits:
    last_read = max(_hook_order(k, num_layers) for k in reads.values())
    for key, (name, _) in replaced.items():
      if _hook_order(key, num_layers) > last_read:
        raise ValueError(f"replace[{name!r}] would have no effect: return_logits=False and no "
                         f"requested hook lies at or after it. Request a later hook or set "
                         f"return_logits=True.")

  read_kinds = [frozenset(kind for layer, kind in reads.values() if layer == l)
                for l in range(num_layers + 1)]
  replace_at = [{kind: nf for (layer, kind), nf in replaced.items() if layer == l}
                for l in range(num_layers + 1)]
  layers = params["layers"]
  activations: dict[str, Array] = {}

  def run_one(h, layer, kinds, fns):
    seen = {}
    tap = _make_tap(kinds, fns, seen)
    h = tap("resid_pre", h)
    h = tap("resid_post", block_fn(h, layer, tap))
    return h, seen

  h_NxTxD = embed_fn(params, input_ids)
  l = 0
  while l < stop:
    if replace_at[l]:
      layer = jax.tree.map(lambda x, l=l: x[l], layers)
      h_NxTxD, seen = run_one(h_NxTxD, layer, read_kinds[l], replace_at[l])
      activations.update({f"blocks.{l}.hook_{k}": v for k, v in seen.items()})
      l += 1
      continue
    end = l + 1
    while end < stop and not replace_at[end] and read_kinds[end] == read_kinds[l]:
      end += 1
    segment = jax.tree.map(lambda x, a=l, b=end: x[a:b], layers)
    h_NxTxD, stacked = jax.lax.scan(
        lambda h, layer, kinds=read_kinds[l]: run_one(h, layer, kinds, {}), h_NxTxD, segment)
    for kind, values_SxNxTxD in stacked.items():
      for i in range(end - l):
        activations[f"blocks.{l + i}.hook_{kind}"] = values_SxNxTxD[i]
    l = end
  logits = None
  if stop < num_layers:
    # Only the stream entering the first block that is not run may still be read.
    seen = {}
    _make_tap(read_kinds[stop], replace_at[stop], seen)("resid_pre", h_NxTxD)
    activations.update({f"blocks.{stop}.hook_{k}": v for k, v in seen.items()})
  elif return_logits or LN_FINAL_HOOK in reads:
    final_NxTxD = layer_norm(h_NxTxD, **params["ln_final"], eps=cfg.layer_norm_eps)
    key = (None, LN_FINAL_HOOK)
    fns = {LN_FINAL_HOOK: replaced[key]} if key in replaced else {}
    seen = {}
    final_NxTxD = _make_tap({LN_FINAL_HOOK} & set(reads), fns, seen)(LN_FINAL_HOOK, final_NxTxD)
    activations.update(seen)
    if return_logits:
      logits = unembed(params, final_NxTxD)
  return LMOutput(logits=logits, activations={name: activations[name] for name in reads})


def _make_tap(kinds, fns, seen) -> Tap:
  """A tap that applies ``fns[kind] = (name, fn)`` and records kinds in ``kinds`` into ``seen``."""

  def tap(kind, x):
    if kind in fns:
      x = _apply_replacement(fns[kind][0], fns[kind][1], x)
    if kind in kinds:
      seen[kind] = x
    return x

  return tap


def float_dtype(dtype: Any) -> np.dtype:
  """Resolves ``dtype`` to float32, bfloat16 or float16, with a clear error otherwise."""
  try:
    resolved = jnp.dtype(dtype)
  except TypeError as err:
    raise ValueError(f"dtype must be a floating dtype such as jnp.float32 or jnp.bfloat16; got "
                     f"{dtype!r}.") from err
  if not jnp.issubdtype(resolved, jnp.floating):
    raise ValueError(f"dtype must be a floating dtype such as jnp.float32 or jnp.bfloat16; got "
                     f"{resolved}.")
  return resolved


class TensorReader:
  """Checked access to a Hugging Face state dict whose names may carry a model prefix.

  Args:
    tensors: name -> array (numpy or a lazy mapping).
    prefix: the base-model prefix (``"transformer."``, ``"gpt_neox."``); names
      are tried with and without it.
    dtype: floating dtype every returned array is cast to.
  """

  def __init__(self, tensors: Mapping[str, Any], prefix: str, dtype: Any):
    self.tensors = tensors
    self.prefix = prefix
    self.dtype = float_dtype(dtype)

  def has(self, name: str) -> bool:
    return self.prefix + name in self.tensors or name in self.tensors

  def get(self, name: str, shape: tuple[int, ...], *, in_base_model: bool = True) -> np.ndarray:
    """Tensor ``name`` cast to ``dtype``; ``in_base_model=False`` for heads outside the prefix."""
    candidates = (self.prefix + name, name) if in_base_model else (name,)
    for candidate in candidates:
      if candidate in self.tensors:
        value = np.asarray(self.tensors[candidate])
        if tuple(value.shape) != tuple(shape):
          raise ValueError(f"tensor {candidate!r} has shape {tuple(value.shape)}; the config "
                           f"expects {tuple(shape)}.")
        return value.astype(self.dtype)
    raise ValueError(f"the checkpoint lacks tensor {candidates[0]!r} (expected shape "
                     f"{tuple(shape)}); is config.json from the same model as the weights?")


def stack_layers(per_layer: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Stacks per-block pytrees on a new leading layer axis."""
  return jax.tree.map(lambda *xs: np.stack(xs), *per_layer)


def check_config_ints(owner: str, cfg: Any, names: Sequence[str]) -> None:
  """Every field in ``names`` must be a Python int >= 1."""
  for name in names:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{owner}.{name} must be an integer >= 1; got {value!r}.")
  if cfg.hidden_size % cfg.num_heads:
    raise ValueError(f"{owner}.num_heads must divide hidden_size={cfg.hidden_size}; got "
                     f"num_heads={cfg.num_heads}.")
  if not cfg.layer_norm_eps > 0:
    raise ValueError(f"{owner}.layer_norm_eps must be > 0; got {cfg.layer_norm_eps!r}.")
  if cfg.hidden_act not in ACTIVATIONS:
    raise ValueError(f"{owner}.hidden_act must be one of {tuple(ACTIVATIONS)}; got "
                     f"{cfg.hidden_act!r}.")

"""Pure BERT encoder forward pass with hooks for reading and splicing the residual stream.

Post-LayerNorm BERT as in the Hugging Face ``BertModel``: every block is::

  h = LayerNorm(h + SelfAttention(h))
  h = LayerNorm(h + W_out gelu(W_in h))

``hidden_states[L]`` is the stream after block ``L`` (``L = 0``: the embedding
output), which is what ``output_hidden_states=True`` returns in Hugging Face.
The blocks run as a ``jax.lax.scan`` over parameters stacked on a leading layer
axis, so compile time does not grow with depth.

Parameter pytree (``l`` = layers, ``i`` = intermediate width, kernels are
``[in, out]``)::

  {"embeddings": {"word": [vocab, d], "position": [max_position, d],
                  "token_type": [type_vocab, d], "norm": {"scale", "bias"}},
   "layers": {"query" | "key" | "value" | "attn_out": {"kernel": [l, d, d], "bias": [l, d]},
              "attn_norm" | "mlp_norm": {"scale": [l, d], "bias": [l, d]},
              "mlp_in": {"kernel": [l, d, i], "bias": [l, i]},
              "mlp_out": {"kernel": [l, i, d], "bias": [l, d]}},
   "pooler": {"kernel": [d, d], "bias": [d]}}      # optional, unused here

References:
  Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional Transformers for
  Language Understanding", arXiv 1810.04805.
  Reimers and Gurevych 2019, "Sentence-BERT: Sentence Embeddings using Siamese
  BERT-Networks", arXiv 1908.10084.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Num

# Hugging Face activation names -> functions. "gelu" is the exact erf form.
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Static shape of a BERT encoder; hashable, so it can be a static jit argument.

  Attributes:
    vocab_size: number of word-piece ids.
    hidden_size: residual stream width ``d``.
    num_layers: number of transformer blocks.
    num_heads: attention heads; must divide ``hidden_size``.
    intermediate_size: width of the feed-forward layer.
    max_position: number of learned absolute positions (longest sequence).
    type_vocab_size: number of segment (token type) ids.
    layer_norm_eps: epsilon inside every LayerNorm.
    hidden_act: feed-forward activation, a key of ``ACTIVATIONS``.
  """

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                 "intermediate_size", "max_position", "type_vocab_size"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"BertConfig.{name} must be an integer >= 1; got {value!r}.")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"BertConfig.num_heads must divide hidden_size={self.hidden_size}; got "
          f"num_heads={self.num_heads}.")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"BertConfig.layer_norm_eps must be > 0; got {self.layer_norm_eps!r}.")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(
          f"BertConfig.hidden_act must be one of {tuple(ACTIVATIONS)}; got "
          f"{self.hidden_act!r}.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf_dict(cls, config: Mapping[str, Any]) -> "BertConfig":
    """Builds the config from a Hugging Face ``config.json`` dictionary."""
    kind = config.get("position_embedding_type", "absolute")
    if kind != "absolute":
      raise ValueError(
          f"position_embedding_type must be 'absolute' (learned positions); got {kind!r}.")
    missing = [key for key in ("vocab_size", "hidden_size", "num_hidden_layers",
                               "num_attention_heads", "intermediate_size",
                               "max_position_embeddings") if key not in config]
    if missing:
      raise ValueError(f"config.json lacks the BERT keys {missing}.")
    return cls(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        max_position=config["max_position_embeddings"],
        type_vocab_size=config.get("type_vocab_size", 2),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        hidden_act=config.get("hidden_act", "gelu"),
    )


class BertOutput(NamedTuple):
  """Residual stream of a forward pass.

  Attributes:
    hidden_states: ``[n, t, d]`` per depth, index ``L`` after block ``L``
      (0: embeddings); ``output_layer + 1`` entries when stopping early.
    last_hidden: ``hidden_states[-1]``.
  """

  hidden_states: tuple[Float[Array, "n t d"], ...]
  last_hidden: Float[Array, "n t d"]


def layer_norm(x: Float[Array, "... d"], scale: Float[Array, "d"], bias: Float[Array, "d"],
               eps: float) -> Float[Array, "... d"]:
  """LayerNorm over the last axis; statistics in float32 whatever the input dtype.

  References:
    Ba et al. 2016, "Layer Normalization", arXiv 1607.06450.
  """
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _dense(x: Array, p: Mapping[str, Array]) -> Array:
  return x @ p["kernel"] + p["bias"]


def self_attention(h_NxTxD: Float[Array, "n t d"], key_mask_NxT: Num[Array, "n t"],
                   layer: Mapping[str, Any], num_heads: int) -> Float[Array, "n t d"]:
  """Multi-head self-attention of one block (before its residual add).

  Padded keys get probability exactly 0, so real tokens never see padding.

  References:
    Vaswani et al. 2017, "Attention Is All You Need", arXiv 1706.03762.
  """
  n, t, d = h_NxTxD.shape
  head_dim = d // num_heads

  def heads(p):
    return _dense(h_NxTxD, p).reshape(n, t, num_heads, head_dim)

  q_NxTxHxE, k_NxTxHxE, v_NxTxHxE = (heads(layer[name]) for name in ("query", "key", "value"))
  scores_NxHxTxT = jnp.einsum("nqhe,nkhe->nhqk", q_NxTxHxE, k_NxTxHxE).astype(jnp.float32)
  scores_NxHxTxT = scores_NxHxTxT / math.sqrt(head_dim)
  keep_Nx1x1xT = (key_mask_NxT != 0)[:, None, None, :]
  # A finite floor (not -inf) keeps all-padding rows finite: they become uniform.
  scores_NxHxTxT = jnp.where(keep_Nx1x1xT, scores_NxHxTxT, jnp.finfo(jnp.float32).min)
  probs_NxHxTxT = jax.nn.softmax(scores_NxHxTxT, axis=-1).astype(h_NxTxD.dtype)
  ctx_NxTxHxE = jnp.einsum("nhqk,nkhe->nqhe", probs_NxHxTxT, v_NxTxHxE)
  return _dense(ctx_NxTxHxE.reshape(n, t, d), layer["attn_out"])


def bert_block(h_NxTxD: Float[Array, "n t d"], key_mask_NxT: Num[Array, "n t"],
               layer: Mapping[str, Any], cfg: BertConfig) -> Float[Array, "n t d"]:
  """One post-LayerNorm transformer block; ``layer`` holds unstacked parameters."""
  attn_NxTxD = self_attention(h_NxTxD, key_mask_NxT, layer, cfg.num_heads)
  h_NxTxD = layer_norm(h_NxTxD + attn_NxTxD, **layer["attn_norm"], eps=cfg.layer_norm_eps)
  mid_NxTxI = ACTIVATIONS[cfg.hidden_act](_dense(h_NxTxD, layer["mlp_in"]))
  mlp_NxTxD = _dense(mid_NxTxI, layer["mlp_out"])
  return layer_norm(h_NxTxD + mlp_NxTxD, **layer["mlp_norm"], eps=cfg.layer_norm_eps)


def bert_embeddings(params: Mapping[str, Any], cfg: BertConfig, input_ids: Int[Array, "n t"],
                    token_type_ids: Int[Array, "n t"]) -> Float[Array, "n t d"]:
  """Word + absolute position + token type embeddings, then LayerNorm."""
  emb = params["embeddings"]
  t = input_ids.shape[1]
  h_NxTxD = (jnp.take(emb["word"], input_ids, axis=0) + emb["position"][:t][None]
             + jnp.take(emb["token_type"], token_type_ids, axis=0))
  return layer_norm(h_NxTxD, **emb["norm"], eps=cfg.layer_norm_eps)


def _run_blocks(h_NxTxD, key_mask_NxT, layers, cfg, start, stop):
  """Blocks ``start+1 .. stop``; returns the final stream and the stacked per-block outputs."""
  segment = jax.tree.map(lambda x: x[start:stop], layers)

  def step(h, layer):
    h = bert_block(h, key_mask_NxT, layer, cfg)
    return h, h

  return jax.lax.scan(step, h_NxTxD, segment)


def _check_layer(name: str, value: Any, num_layers: int) -> None:
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be a static Python int in [0, {num_layers}] or None; got "
                     f"{value!r}.")
  if not 0 <= value <= num_layers:
    raise ValueError(f"{name} must lie in [0, {num_layers}] (0 = embeddings, {num_layers} = "
                     f"last block); got {value}.")


def _check_inputs(cfg, input_ids, attention_mask, token_type_ids):
  if not isinstance(cfg, BertConfig):
    raise ValueError(f"cfg must be a BertConfig; got {type(cfg).__name__}.")
  if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(f"input_ids must be a 2-D integer array [n, t]; got shape "
                     f"{tuple(input_ids.shape)} and dtype {input_ids.dtype}.")
  if attention_mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; "
                     f"got {tuple(attention_mask.shape)}.")
  if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
    raise ValueError(f"token_type_ids must have the shape of input_ids {tuple(input_ids.shape)}; "
                     f"got {tuple(token_type_ids.shape)}.")
  if not 1 <= input_ids.shape[1] <= cfg.max_position:
    raise ValueError(f"input_ids length t must lie in [1, {cfg.max_position}] (max_position); "
                     f"got {input_ids.shape[1]}. Split long text with pack_windows.")


def bert_forward(
    params: Mapping[str, Any],
    cfg: BertConfig,
    input_ids: Int[Array, "n t"],
    attention_mask: Num[Array, "n t"],
    *,
    token_type_ids: Int[Array, "n t"] | None = None,
    output_layer: int | None = None,
    replace_layer: int | None = None,
    replace_fn: Callable[[Array, Array], Array] | None = None,
) -> BertOutput:
  """Runs the encoder and returns the residual stream at every depth.

  Jittable with ``cfg``, ``output_layer``, ``replace_layer`` and ``replace_fn``
  static. To splice in a model with its own parameters (an SAE), build
  ``replace_fn`` inside the jitted function so those parameters are traced
  rather than baked in as constants::

    @functools.partial(jax.jit, static_argnames="cfg")
    def spliced(params, sae_params, ids, mask, cfg):
      return bert_forward(params, cfg, ids, mask, replace_layer=3,
                          replace_fn=lambda h, m: reconstruct(sae_params, h))

  References:
    Devlin et al. 2018, "BERT: Pre-training of Deep Bidirectional Transformers
    for Language Understanding", arXiv 1810.04805.

  Args:
    params: parameter pytree (see the module docstring).
    cfg: static configuration.
    input_ids: word-piece ids, ``t <= cfg.max_position``.
    attention_mask: 1 for real tokens, 0 for padding.
    token_type_ids: segment ids; zeros (single segment) when None.
    output_layer: stop after this block (0 = embeddings only); None runs all.
    replace_layer: depth whose stream is replaced by ``replace_fn(h, mask)``
      before the pass continues; ``hidden_states[replace_layer]`` holds the
      replacement. Must not exceed ``output_layer``.
    replace_fn: ``(h [n, t, d], attention_mask [n, t]) -> [n, t, d]``; given
      exactly when ``replace_layer`` is.

  Returns:
    ``BertOutput`` with ``stop + 1`` hidden states, ``stop`` being
    ``output_layer`` or ``cfg.num_layers``.

  Raises:
    ValueError: on bad shapes, dtypes, lengths or layer indices (at trace time).
  """
  _check_inputs(cfg, input_ids, attention_mask, token_type_ids)
  _check_layer("output_layer", output_layer, cfg.num_layers)
  _check_layer("replace_layer", replace_layer, cfg.num_layers)
  if (replace_layer is None) != (replace_fn is None):
    raise ValueError(f"replace_layer and replace_fn go together; got replace_layer="
                     f"{replace_layer!r} and replace_fn={replace_fn!r}.")
  stop = cfg.num_layers if output_layer is None else int(output_layer)
  if replace_layer is not None and replace_layer > stop:
    raise ValueError(f"replace_layer must be <= output_layer={stop} (a replacement after the "
                     f"last computed block has no effect); got {replace_layer}.")
  if token_type_ids is None:
    token_type_ids = jnp.zeros_like(input_ids)

  h_NxTxD = bert_embeddings(params, cfg, input_ids, token_type_ids)
  states = [h_NxTxD]
  segments = [(0, stop)] if replace_layer is None else [(0, replace_layer), (replace_layer, stop)]
  for index, (start, end) in enumerate(segments):
    if index == 1:
      h_NxTxD = _replace(replace_fn, h_NxTxD, attention_mask)
      states[-1] = h_NxTxD
    if end > start:
      h_NxTxD, stacked_LxNxTxD = _run_blocks(h_NxTxD, attention_mask, params["layers"], cfg,
                                             start, end)
      states.extend(stacked_LxNxTxD[i] for i in range(end - start))
  return BertOutput(hidden_states=tuple(states), last_hidden=states[-1])


def _replace(replace_fn, h_NxTxD, attention_mask):
  new_NxTxD = replace_fn(h_NxTxD, attention_mask)
  if new_NxTxD.shape != h_NxTxD.shape:
    raise ValueError(f"replace_fn must return the shape of the stream {tuple(h_NxTxD.shape)}; "
                     f"got {tuple(new_NxTxD.shape)}.")
  return new_NxTxD.astype(h_NxTxD.dtype)


def sentence_embedding(last_hidden: Float[Array, "n t d"],
                       attention_mask: Num[Array, "n t"]) -> Float[Array, "n d"]:
  """Mean of the real tokens' states, L2-normalised (all-MiniLM-L6-v2's pooling).

  Clamps as sentence-transformers does (token count >= 1e-9, norm >= 1e-12),
  so a row without real tokens gives a zero vector rather than NaN.

  References:
    Reimers and Gurevych 2019, "Sentence-BERT: Sentence Embeddings using
    Siamese BERT-Networks", arXiv 1908.10084.
  """
  if last_hidden.ndim != 3 or attention_mask.shape != last_hidden.shape[:2]:
    raise ValueError(f"last_hidden must be [n, t, d] and attention_mask [n, t] with matching "
                     f"n, t; got {tuple(last_hidden.shape)} and {tuple(attention_mask.shape)}.")
  mask_NxTx1 = attention_mask.astype(jnp.float32)[..., None]
  summed_NxD = jnp.sum(last_hidden.astype(jnp.float32) * mask_NxTx1, axis=1)
  mean_NxD = summed_NxD / jnp.maximum(mask_NxTx1.sum(axis=1), 1e-9)
  norm_Nx1 = jnp.linalg.norm(mean_NxD, axis=-1, keepdims=True)
  return mean_NxD / jnp.maximum(norm_Nx1, 1e-12)

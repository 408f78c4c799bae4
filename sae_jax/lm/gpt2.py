"""GPT-2 (every size) as a pure JAX forward pass with TransformerLens-style hooks.

Pre-LayerNorm decoder with learned token and position embeddings::

  h = wte[ids] + wpe[positions]
  for each block:  h = h + attn(ln_1(h));  h = h + mlp(ln_2(h))
  logits = ln_f(h) @ wte^T          # or an untied lm_head

as in the Hugging Face ``GPT2LMHeadModel``. Its ``Conv1D`` weights are already
``[in, out]``; ``c_attn`` (``[d, 3d]``) holds the query, key and value
projections one after the other along its output. The parameter layout and
hooks are those of ``sae_jax.lm.core``.

References:
  Radford et al. 2019, "Language Models are Unsupervised Multitask Learners".
"""

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from sae_jax.lm import core

_UNSUPPORTED_FLAGS = {
    "scale_attn_by_inverse_layer_idx": "scales each block's attention scores by 1/(layer+1)",
    "reorder_and_upcast_attn": "reorders and upcasts the attention computation",
    "add_cross_attention": "adds encoder-decoder cross-attention blocks",
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """Static shape of a GPT-2 model; hashable, so it can be a static jit argument.

  Defaults are GPT-2 small's.

  Attributes:
    vocab_size: number of token ids.
    hidden_size: residual stream width ``d`` (``n_embd``).
    num_layers: number of blocks (``n_layer``).
    num_heads: attention heads (``n_head``); must divide ``hidden_size``.
    intermediate_size: MLP width (``n_inner``, ``4 d`` when null).
    max_position: learned positions, the longest input (``n_positions``).
    layer_norm_eps: epsilon inside every LayerNorm (``layer_norm_epsilon``).
    hidden_act: MLP activation (``activation_function``), a key of
      ``core.ACTIVATIONS``; ``gelu_new`` is the tanh approximation.
    scale_attn_weights: divide attention scores by ``sqrt(head_dim)``.
    tie_word_embeddings: the unembedding is the transposed token embedding.
  """

  vocab_size: int = 50257
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position: int = 1024
  layer_norm_eps: float = 1e-5
  hidden_act: str = "gelu_new"
  scale_attn_weights: bool = True
  tie_word_embeddings: bool = True

  def __post_init__(self):
    core.check_config_ints("GPT2Config", self, ("vocab_size", "hidden_size", "num_layers",
                                                "num_heads", "intermediate_size", "max_position"))

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def parallel_residual(self) -> bool:
    return False

  @classmethod
  def from_hf_dict(cls, config: Mapping[str, Any]) -> "GPT2Config":
    """Builds the config from a Hugging Face GPT-2 ``config.json`` dictionary.

    Raises:
      ValueError: when keys are missing or a flag this forward pass does not
        implement is set.
    """
    for flag, what in _UNSUPPORTED_FLAGS.items():
      if config.get(flag):
        raise ValueError(f"config.json sets {flag}=true, which {what}; sae_jax.lm.gpt2 does not "
                         f"implement it. Only standard GPT-2 checkpoints ({flag}=false) load.")
    missing = [key for key in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions")
               if key not in config]
    if missing:
      raise ValueError(f"config.json lacks the GPT-2 keys {missing}.")
    d = config["n_embd"]
    inner = config.get("n_inner")
    return cls(
        vocab_size=config["vocab_size"],
        hidden_size=d,
        num_layers=config["n_layer"],
        num_heads=config["n_head"],
        intermediate_size=4 * d if inner is None else inner,
        max_position=config["n_positions"],
        layer_norm_eps=float(config.get("layer_norm_epsilon", 1e-5)),
        hidden_act=config.get("activation_function", "gelu_new"),
        scale_attn_weights=bool(config.get("scale_attn_weights", True)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
    )


def convert_hf_weights(tensors: Mapping[str, Any], cfg: GPT2Config,
                       dtype: Any = jnp.float32) -> dict[str, Any]:
  """Maps a Hugging Face GPT-2 state dict onto the ``sae_jax.lm.core`` layout.

  Accepts names with or without the ``transformer.`` prefix. ``lm_head.weight``
  is used only when ``cfg.tie_word_embeddings`` is False. Buffers such as
  ``attn.bias`` / ``attn.masked_bias`` are ignored.

  Returns:
    Parameter pytree as host (NumPy) arrays of ``dtype``.

  Raises:
    ValueError: naming a tensor that is missing or has the wrong shape.
  """
  prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
  reader = core.TensorReader(tensors, prefix, dtype)
  d, inner, heads, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim

  def norm(name):
    return {"scale": reader.get(f"{name}.weight", (d,)), "bias": reader.get(f"{name}.bias", (d,))}

  per_layer = []
  for i in range(cfg.num_layers):
    base = f"h.{i}."
    # Conv1D output index of c_attn is (q|k|v) * d + head * head_dim + j.
    qkv_kernel = reader.get(base + "attn.c_attn.weight", (d, 3 * d)).reshape(d, 3, heads, e)
    qkv_bias = reader.get(base + "attn.c_attn.bias", (3 * d,)).reshape(3, heads, e)
    out_kernel = reader.get(base + "attn.c_proj.weight", (d, d)).reshape(heads, e, d)
    per_layer.append({
        "ln_1": norm(base + "ln_1"),
        "qkv": {"kernel": qkv_kernel, "bias": qkv_bias},
        "attn_out": {"kernel": out_kernel, "bias": reader.get(base + "attn.c_proj.bias", (d,))},
        "ln_2": norm(base + "ln_2"),
        "mlp_in": {"kernel": reader.get(base + "mlp.c_fc.weight", (d, inner)),
                   "bias": reader.get(base + "mlp.c_fc.bias", (inner,))},
        "mlp_out": {"kernel": reader.get(base + "mlp.c_proj.weight", (inner, d)),
                    "bias": reader.get(base + "mlp.c_proj.bias", (d,))},
    })
  params = {
      "embed": {"token": reader.get("wte.weight", (cfg.vocab_size, d)),
                "position": reader.get("wpe.weight", (cfg.max_position, d))},
      "layers": core.stack_layers(per_layer),
      "ln_final": norm("ln_f"),
  }
  if not cfg.tie_word_embeddings:
    lm_head = reader.get("lm_head.weight", (cfg.vocab_size, d), in_base_model=False)
    params["unembed"] = {"kernel": lm_head.T}
  return params


def embed(params: Mapping[str, Any], input_ids: Int[Array, "n t"]) -> Float[Array, "n t d"]:
  """Token plus learned absolute position embeddings."""
  emb = params["embed"]
  t = input_ids.shape[1]
  return jnp.take(emb["token"], input_ids, axis=0) + emb["position"][:t][None]


def gpt2_block(cfg: GPT2Config) -> Callable[[Array, Mapping[str, Any], core.Tap], Array]:
  """``(h, unstacked_layer, tap) -> h`` for one GPT-2 block."""
  scale = 1.0 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0

  def run(h_NxTxD, layer, tap):
    return core.block(h_NxTxD, layer, tap, eps=cfg.layer_norm_eps, activation=cfg.hidden_act,
                      scale=scale, parallel_residual=False)

  return run


def gpt2_forward(
    params: Mapping[str, Any],
    cfg: GPT2Config,
    input_ids: Int[Array, "n t"],
    *,
    hooks: Sequence[str] = (),
    replace: Mapping[str, Callable[[Array], Array]] | Sequence[tuple[str, Callable]] | None = None,
    return_logits: bool = True,
) -> core.LMOutput:
  """Runs GPT-2 on packed, full-context token windows (causal mask only).

  Jittable with ``cfg``, ``hooks``, ``replace`` and ``return_logits`` static
  (or closed over). To splice in a model with its own parameters (an SAE),
  build the replacement inside the jitted function so those parameters are
  traced rather than baked in as constants::

    @functools.partial(jax.jit, static_argnames="cfg")
    def spliced(params, sae_params, ids, cfg):
      return gpt2_forward(params, cfg, ids, replace={
          "blocks.6.hook_resid_post": lambda h: reconstruct(sae_params, h)}).logits

  References:
    Radford et al. 2019, "Language Models are Unsupervised Multitask Learners".

  Args:
    params: parameter pytree from ``convert_hf_weights`` / ``load_model``.
    cfg: static configuration.
    input_ids: ``[n, t]`` token ids in ``[0, cfg.vocab_size)``,
      ``t <= cfg.max_position``.
    hooks: hook names to return (see ``sae_jax.lm.core``).
    replace: ``{hook_name: fn}``; ``fn(activation) -> same shape`` replaces the
      activation there and everything downstream uses the replacement.
    return_logits: False skips the unembedding and the blocks after the last
      requested hook.

  Returns:
    ``LMOutput(logits, activations)``.

  Raises:
    ValueError: on bad hook names, input shapes or lengths (at trace time).
  """
  if not isinstance(cfg, GPT2Config):
    raise ValueError(f"cfg must be a GPT2Config; got {type(cfg).__name__}.")
  return core.run_decoder(params, cfg, input_ids, embed_fn=embed, block_fn=gpt2_block(cfg),
                          hooks=hooks, replace=replace, return_logits=return_logits)

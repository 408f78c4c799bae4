"""GPT-NeoX / Pythia as a pure JAX forward pass with TransformerLens-style hooks.

Pre-LayerNorm decoder without learned positions; rotary position embeddings
act on the first ``rotary_ndims = int(head_dim * rotary_pct)`` dimensions of
every query and key head::

  h = embed_in[ids]
  for each block:
    parallel:    h = h + attn(ln_1(h)) + mlp(ln_2(h))
    sequential:  h = h + attn(ln_1(h));  h = h + mlp(ln_2(h))
  logits = final_layer_norm(h) @ embed_out^T

as in the Hugging Face ``GPTNeoXForCausalLM``. Its fused ``query_key_value``
output is laid out head by head, ``[q_0, k_0, v_0, q_1, k_1, v_1, ...]`` with
``head_dim`` entries each; rotation uses the rotate-half convention (the two
halves of the rotated dimensions form the pairs).

References:
  Black et al. 2022, "GPT-NeoX-20B: An Open-Source Autoregressive Language
  Model", arXiv 2204.06745.
  Biderman et al. 2023, "Pythia: A Suite for Analyzing Large Language Models
  Across Training and Scaling", arXiv 2304.01373.
  Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position
  Embedding", arXiv 2104.09864.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from sae_jax.lm import core

DEFAULT_ROTARY_BASE = 10000.0


@dataclasses.dataclass(frozen=True)
class NeoXConfig:
  """Static shape of a GPT-NeoX model; hashable, so it can be a static jit argument.

  Defaults are Pythia-70M's.

  Attributes:
    vocab_size: number of token ids (rows of ``embed_in``).
    hidden_size: residual stream width ``d``.
    num_layers: number of blocks (``num_hidden_layers``).
    num_heads: attention heads; must divide ``hidden_size``.
    intermediate_size: MLP width.
    max_position: longest input (``max_position_embeddings``).
    layer_norm_eps: epsilon inside every LayerNorm.
    hidden_act: MLP activation, a key of ``core.ACTIVATIONS`` (``gelu``: exact).
    rotary_pct: fraction of each head's dimensions that is rotated.
    rotary_base: rotary wavelength base (``rotary_emb_base`` / ``rope_theta``).
    parallel_residual: attention and MLP both read the block input.
    attention_bias: ``query_key_value`` and ``dense`` have biases.
    tie_word_embeddings: the unembedding is the transposed ``embed_in``.
  """

  vocab_size: int = 50304
  hidden_size: int = 512
  num_layers: int = 6
  num_heads: int = 8
  intermediate_size: int = 2048
  max_position: int = 2048
  layer_norm_eps: float = 1e-5
  hidden_act: str = "gelu"
  rotary_pct: float = 0.25
  rotary_base: float = DEFAULT_ROTARY_BASE
  parallel_residual: bool = True
  attention_bias: bool = True
  tie_word_embeddings: bool = False

  def __post_init__(self):
    core.check_config_ints("NeoXConfig", self, ("vocab_size", "hidden_size", "num_layers",
                                                "num_heads", "intermediate_size", "max_position"))
    if not 0.0 < self.rotary_pct <= 1.0:
      raise ValueError(f"NeoXConfig.rotary_pct must lie in (0, 1]; got {self.rotary_pct!r}.")
    if self.rotary_ndims % 2:
      raise ValueError(f"NeoXConfig.rotary_pct={self.rotary_pct} gives an odd number of rotary "
                       f"dimensions int({self.head_dim} * {self.rotary_pct}) = "
                       f"{self.rotary_ndims}; rotate-half needs an even number.")
    if not self.rotary_base > 0:
      raise ValueError(f"NeoXConfig.rotary_base must be > 0; got {self.rotary_base!r}.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def rotary_ndims(self) -> int:
    return int(self.head_dim * self.rotary_pct)

  @classmethod
  def from_hf_dict(cls, config: Mapping[str, Any]) -> "NeoXConfig":
    """Builds the config from a Hugging Face GPT-NeoX ``config.json`` dictionary.

    Reads the rotary settings from ``rope_parameters`` (transformers >= 5),
    ``rope_scaling``, ``rope_theta`` / ``partial_rotary_factor`` or the
    original ``rotary_emb_base`` / ``rotary_pct``, in that order.

    Raises:
      ValueError: when keys are missing or rope scaling is requested.
    """
    missing = [key for key in ("vocab_size", "hidden_size", "num_hidden_layers",
                               "num_attention_heads", "intermediate_size",
                               "max_position_embeddings") if key not in config]
    if missing:
      raise ValueError(f"config.json lacks the GPT-NeoX keys {missing}.")
    rope: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
      value = config.get(key)
      if value is None:
        continue
      if not isinstance(value, Mapping):
        raise ValueError(f"config.json {key} must be an object or null; got {value!r}.")
      kind = value.get("rope_type", value.get("type", "default"))
      if kind != "default":
        raise ValueError(f"config.json {key} asks for rope type {kind!r}; only the default "
                         f"(unscaled) rotary embedding is implemented. Remove the scaling or use a "
                         f"checkpoint without it.")
      rope.update(value)

    def first(*candidates):
      return next(v for v in candidates if v is not None)

    return cls(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        intermediate_size=config["intermediate_size"],
        max_position=config["max_position_embeddings"],
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        hidden_act=config.get("hidden_act", "gelu"),
        rotary_pct=float(first(rope.get("partial_rotary_factor"),
                               config.get("partial_rotary_factor"), config.get("rotary_pct"),
                               0.25)),
        rotary_base=float(first(rope.get("rope_theta"), config.get("rope_theta"),
                                config.get("rotary_emb_base"), DEFAULT_ROTARY_BASE)),
        parallel_residual=bool(config.get("use_parallel_residual", True)),
        attention_bias=bool(config.get("attention_bias", True)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def convert_hf_weights(tensors: Mapping[str, Any], cfg: NeoXConfig,
                       dtype: Any = jnp.float32) -> dict[str, Any]:
  """Maps a Hugging Face GPT-NeoX state dict onto the ``sae_jax.lm.core`` layout.

  Accepts names with or without the ``gpt_neox.`` prefix; the untied output
  matrix is ``embed_out.weight`` (or ``lm_head.weight``). Torch ``Linear``
  weights (``[out, in]``) are transposed and the fused ``query_key_value``
  is regrouped from per-head ``[q, k, v]`` into ``[d, 3, heads, head_dim]``.
  Buffers such as ``attention.bias`` or ``rotary_emb.inv_freq`` are ignored.

  Returns:
    Parameter pytree as host (NumPy) arrays of ``dtype``.

  Raises:
    ValueError: naming a tensor that is missing or has the wrong shape.
  """
  prefix = "gpt_neox." if any(k.startswith("gpt_neox.") for k in tensors) else ""
  reader = core.TensorReader(tensors, prefix, dtype)
  d, inner, heads, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim

  def norm(name):
    return {"scale": reader.get(f"{name}.weight", (d,)), "bias": reader.get(f"{name}.bias", (d,))}

  def kernel(name, n_in, n_out):
    return reader.get(f"{name}.weight", (n_out, n_in)).T

  def bias(name, n_out):
    return reader.get(f"{name}.bias", (n_out,))

  per_layer = []
  for i in range(cfg.num_layers):
    base = f"layers.{i}."
    qkv_name, out_name = base + "attention.query_key_value", base + "attention.dense"
    qkv = {"kernel": kernel(qkv_name, d, 3 * d).reshape(d, heads, 3, e).transpose(0, 2, 1, 3)}
    attn_out = {"kernel": kernel(out_name, d, d).reshape(heads, e, d)}
    if cfg.attention_bias:
      qkv["bias"] = bias(qkv_name, 3 * d).reshape(heads, 3, e).transpose(1, 0, 2)
      attn_out["bias"] = bias(out_name, d)
    mlp_in, mlp_out = base + "mlp.dense_h_to_4h", base + "mlp.dense_4h_to_h"
    per_layer.append({
        "ln_1": norm(base + "input_layernorm"),
        "qkv": qkv,
        "attn_out": attn_out,
        "ln_2": norm(base + "post_attention_layernorm"),
        "mlp_in": {"kernel": kernel(mlp_in, d, inner), "bias": bias(mlp_in, inner)},
        "mlp_out": {"kernel": kernel(mlp_out, inner, d), "bias": bias(mlp_out, d)},
    })
  params = {
      "embed": {"token": reader.get("embed_in.weight", (cfg.vocab_size, d))},
      "layers": core.stack_layers(per_layer),
      "ln_final": norm("final_layer_norm"),
  }
  if not cfg.tie_word_embeddings:
    name = "lm_head.weight" if "embed_out.weight" not in tensors and "lm_head.weight" in tensors \
        else "embed_out.weight"
    params["unembed"] = {"kernel": reader.get(name, (cfg.vocab_size, d), in_base_model=False).T}
  return params


def rotary_tables(t: int, rotary_ndims: int,
                  base: float) -> tuple[Float[Array, "t r"], Float[Array, "t r"]]:
  """Float32 ``(cos, sin)`` of shape ``[t, rotary_ndims]`` for positions ``0 .. t-1``.

  Frequency ``j`` is ``base ** (-2j / rotary_ndims)``, repeated for both halves.

  References:
    Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary Position
    Embedding", arXiv 2104.09864.
  """
  inv_freq_R2 = 1.0 / (base ** (jnp.arange(0, rotary_ndims, 2, dtype=jnp.float32) / rotary_ndims))
  angles_TxR2 = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq_R2[None, :]
  angles_TxR = jnp.concatenate([angles_TxR2, angles_TxR2], axis=-1)
  return jnp.cos(angles_TxR), jnp.sin(angles_TxR)


def apply_rotary(x_NxTxHxE: Float[Array, "n t h e"], cos_TxR: Float[Array, "t r"],
                 sin_TxR: Float[Array, "t r"]) -> Float[Array, "n t h e"]:
  """Rotates the first ``r`` dimensions of every head (rotate-half), in float32.

  ``x[:r] * cos + rotate_half(x[:r]) * sin`` with ``rotate_half([a, b]) = [-b, a]``;
  the other ``e - r`` dimensions pass through.
  """
  r = cos_TxR.shape[-1]
  x32 = x_NxTxHxE.astype(jnp.float32)
  rot, rest = x32[..., :r], x32[..., r:]
  half = r // 2
  rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
  out = rot * cos_TxR[:, None, :] + rotated * sin_TxR[:, None, :]
  return jnp.concatenate([out, rest], axis=-1).astype(x_NxTxHxE.dtype)


def embed(params: Mapping[str, Any], input_ids: Int[Array, "n t"]) -> Float[Array, "n t d"]:
  """Token embeddings (positions enter through the rotary embedding)."""
  return jnp.take(params["embed"]["token"], input_ids, axis=0)


def neox_block(cfg: NeoXConfig, t: int) -> Callable[[Array, Mapping[str, Any], core.Tap], Array]:
  """``(h, unstacked_layer, tap) -> h`` for one GPT-NeoX block on length-``t`` inputs."""
  cos_TxR, sin_TxR = rotary_tables(t, cfg.rotary_ndims, cfg.rotary_base)

  def rotary(x_NxTxHxE):
    return apply_rotary(x_NxTxHxE, cos_TxR, sin_TxR)

  def run(h_NxTxD, layer, tap):
    return core.block(h_NxTxD, layer, tap, eps=cfg.layer_norm_eps, activation=cfg.hidden_act,
                      scale=1.0 / math.sqrt(cfg.head_dim),
                      parallel_residual=cfg.parallel_residual, rotary=rotary)

  return run


def neox_forward(
    params: Mapping[str, Any],
    cfg: NeoXConfig,
    input_ids: Int[Array, "n t"],
    *,
    hooks: Sequence[str] = (),
    replace: Mapping[str, Callable[[Array], Array]] | Sequence[tuple[str, Callable]] | None = None,
    return_logits: bool = True,
) -> core.LMOutput:
  """Runs GPT-NeoX / Pythia on packed, full-context token windows (causal mask only).

  Jittable with ``cfg``, ``hooks``, ``replace`` and ``return_logits`` static
  (or closed over); see ``sae_jax.lm.gpt2.gpt2_forward`` for splicing an SAE.

  References:
    Black et al. 2022, "GPT-NeoX-20B: An Open-Source Autoregressive Language
    Model", arXiv 2204.06745.
    Biderman et al. 2023, "Pythia: A Suite for Analyzing Large Language Models
    Across Training and Scaling", arXiv 2304.01373.

  Arguments, result and errors are those of ``gpt2_forward`` with a ``NeoXConfig``.
  """
  if not isinstance(cfg, NeoXConfig):
    raise ValueError(f"cfg must be a NeoXConfig; got {type(cfg).__name__}.")
  core.check_input_ids(input_ids, cfg.max_position)
  return core.run_decoder(params, cfg, input_ids, embed_fn=embed,
                          block_fn=neox_block(cfg, input_ids.shape[1]), hooks=hooks,
                          replace=replace, return_logits=return_logits)

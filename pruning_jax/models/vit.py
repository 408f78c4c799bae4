"""A small vision transformer whose MLP activation is ReLU by default."""

from collections.abc import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from pruning_jax.models import layers

POOLS = ("cls", "mean")
ACTIVATIONS = ("relu", "gelu")

# Token and position embeddings start small so the patch projection dominates
# early training, as in the reference ViT implementation.
_EMBED_INIT = nnx.initializers.normal(stddev=0.02)
_MLP_INIT = nnx.initializers.xavier_uniform()


class EncoderBlock(nnx.Module):
  """Pre-LayerNorm transformer block: x + MHA(LN(x)), then x + MLP(LN(x))."""

  def __init__(
      self,
      dim: int,
      num_heads: int,
      mlp_dim: int,
      activation: str,
      *,
      rngs: nnx.Rngs,
  ):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    # No dropout, so the layer needs no random stream at call time.
    self.attn = nnx.MultiHeadAttention(
        num_heads,
        dim,
        decode=False,
        deterministic=True,
        keep_rngs=False,
        rngs=rngs,
    )
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, mlp_dim, kernel_init=_MLP_INIT, rngs=rngs)
    self.fc2 = nnx.Linear(mlp_dim, dim, kernel_init=_MLP_INIT, rngs=rngs)
    self.activation = activation

  def __call__(
      self,
      x: Float[Array, "b t d"],
      *,
      acts: layers.Activations | None,
      name: str,
  ) -> Float[Array, "b t d"]:
    """Runs the block, recording the MLP activation output under `name`."""
    x = x + self.attn(self.norm1(x))
    h_BxTxF = self.fc1(self.norm2(x))
    if self.activation == "relu":
      h_BxTxF = layers.relu_observed(h_BxTxF, name, acts)
    else:
      h_BxTxF = layers.observe(
          jax.nn.gelu(h_BxTxF, approximate=False), name, acts
      )
    return x + self.fc2(h_BxTxF)


class ViT(nnx.Module):
  """Small vision transformer with a configurable MLP activation.

  Patch embedding, learned position embedding, pre-LayerNorm encoder blocks,
  a final LayerNorm, CLS-token or mean pooling and a dense classifier.

  The MLP activation is ReLU by default so that the dead neuron rate is
  defined; "gelu" restores the original choice. The activation output of
  each block's MLP is observed as "block<i>.mlp.relu" (or ".gelu"), i from 1,
  shape [b, tokens, mlp_dim]; exact zeros, and so a non-zero DNR, essentially
  never occur with GELU. Attention uses no dropout.

  Attributes:
    input_shape: the (height, width, channels) shape the model was built for.
    num_classes: number of logits.
    relu_names: names of the observed activations in forward order.

  References:
    Dosovitskiy et al., 2020, "An Image is Worth 16x16 Words: Transformers for
    Image Recognition at Scale", arXiv 2010.11929.
  """

  def __init__(
      self,
      *,
      num_classes: int = 10,
      input_shape: Sequence[int] = (32, 32, 3),
      patch_size: int = 4,
      dim: int = 64,
      depth: int = 4,
      num_heads: int = 4,
      mlp_dim: int = 128,
      pool: str = "cls",
      activation: str = "relu",
      rngs: nnx.Rngs,
  ):
    """Builds the network.

    Args:
      num_classes: number of logits, >= 1.
      input_shape: (height, width, channels) of one input image; height and
        width must be multiples of `patch_size`.
      patch_size: side of the square, non-overlapping patches.
      dim: token width, a multiple of `num_heads`.
      depth: number of encoder blocks.
      num_heads: attention heads per block.
      mlp_dim: hidden width of each block's MLP.
      pool: "cls" (prepend a learned token and classify from it) or "mean"
        (average the patch tokens).
      activation: MLP activation, "relu" or "gelu" (exact, erf-based).
      rngs: random streams for parameter initialisation.

    Raises:
      ValueError: for a non-positive size, a patch size that does not divide
        the image, a width not divisible by the head count, or an unknown
        pool or activation.
    """
    self.input_shape = layers.check_input_shape(input_shape)
    self.num_classes = layers.check_positive_int("num_classes", num_classes)
    for arg, value in (
        ("patch_size", patch_size),
        ("dim", dim),
        ("depth", depth),
        ("num_heads", num_heads),
        ("mlp_dim", mlp_dim),
    ):
      layers.check_positive_int(arg, value)
    height, width, channels = self.input_shape
    if height % patch_size or width % patch_size:
      raise ValueError(
          f"patch_size={patch_size} must divide the image height and width"
          f" {height}x{width}"
      )
    if dim % num_heads:
      raise ValueError(
          f"dim={dim} must be a multiple of num_heads={num_heads}"
      )
    if pool not in POOLS:
      raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if activation not in ACTIVATIONS:
      raise ValueError(
          f"activation must be one of {ACTIVATIONS}, got {activation!r}"
      )
    self.pool = pool
    self.relu_names = tuple(
        layers.indexed_name("block", i + 1, depth) + f".mlp.{activation}"
        for i in range(depth)
    )
    self.patch_embed = nnx.Conv(
        channels,
        dim,
        kernel_size=(patch_size, patch_size),
        strides=(patch_size, patch_size),
        padding="VALID",
        rngs=rngs,
    )
    num_tokens = (height // patch_size) * (width // patch_size)
    if pool == "cls":
      self.cls_token = nnx.Param(jnp.zeros((1, 1, dim), jnp.float32))
      num_tokens += 1
    else:
      self.cls_token = None
    self.pos_embed = nnx.Param(
        _EMBED_INIT(rngs.params(), (1, num_tokens, dim), jnp.float32)
    )
    self.blocks = nnx.List([
        EncoderBlock(dim, num_heads, mlp_dim, activation, rngs=rngs)
        for _ in range(depth)
    ])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, self.num_classes, rngs=rngs)

  def relu_fed(self, path: str) -> bool:
    """Whether the weight at `path` reads ReLU outputs.

    Only the second MLP layer of each block does, and only with
    activation="relu"; patch embedding, attention, fc1 and the head read
    LayerNorm outputs or pixels.
    """
    parts = path.split("/")
    return (self.blocks[0].activation == "relu" and len(parts) > 2
            and parts[0] == "blocks" and parts[2] == "fc2")

  def __call__(
      self,
      x: Float[Array, "b h w c"],
      *,
      train: bool = False,
      return_activations: bool = False,
  ) -> Float[Array, "b n"] | tuple[Float[Array, "b n"], layers.Activations]:
    """Computes logits, and the MLP activations when `return_activations` is set.

    Args:
      x: NHWC image batch of the shape given at construction.
      train: unused (no BatchNorm or dropout); accepted for a uniform API.
      return_activations: also return {name: activation [b, tokens, mlp_dim]}.

    Returns:
      Logits [b, num_classes], or (logits, activations).
    """
    del train
    layers.check_input(x, self.input_shape, type(self).__name__)
    acts = {} if return_activations else None
    patches = self.patch_embed(x)
    tokens_BxTxD = patches.reshape(patches.shape[0], -1, patches.shape[-1])
    if self.cls_token is not None:
      cls_Bx1xD = jnp.broadcast_to(
          self.cls_token[...], (x.shape[0], 1, tokens_BxTxD.shape[-1])
      )
      tokens_BxTxD = jnp.concatenate([cls_Bx1xD, tokens_BxTxD], axis=1)
    tokens_BxTxD = tokens_BxTxD + self.pos_embed[...]
    for name, block in zip(self.relu_names, self.blocks):
      tokens_BxTxD = block(tokens_BxTxD, acts=acts, name=name)
    tokens_BxTxD = self.norm(tokens_BxTxD)
    if self.cls_token is not None:
      pooled_BxD = tokens_BxTxD[:, 0]
    else:
      pooled_BxD = jnp.mean(tokens_BxTxD, axis=1)
    logits = self.head(pooled_BxD)
    return (logits, acts) if return_activations else logits

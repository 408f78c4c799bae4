"""CIFAR-form residual networks (ResNet-20/32/56) with basic blocks."""

from collections.abc import Sequence

from flax import nnx
import jax.numpy as jnp
from jaxtyping import Array, Float

from pruning_jax.models import layers

# Stage widths of the CIFAR ResNets (He et al. 2016, section 4.2).
CIFAR_WIDTHS = (16, 32, 64)
SHORTCUTS = ("A", "B")


class BasicBlock(nnx.Module):
  """conv3x3-BN-ReLU-conv3x3-BN, add the shortcut, ReLU.

  Shortcut option "A" subsamples by the stride and zero-pads the new channels
  evenly on both sides (parameter free); option "B" projects with a 1x1 conv +
  BN whenever the shape changes. Both are the identity otherwise.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      stride: int,
      shortcut: str,
      rngs: nnx.Rngs,
  ):
    self.conv_bn1 = layers.ConvBN(
        in_features, out_features, stride=stride, rngs=rngs
    )
    self.conv_bn2 = layers.ConvBN(out_features, out_features, rngs=rngs)
    self.stride = stride
    self.channel_pad = out_features - in_features
    reshapes = stride != 1 or in_features != out_features
    self.projection = (
        layers.ConvBN(
            in_features, out_features, kernel_size=1, stride=stride, rngs=rngs
        )
        if shortcut == "B" and reshapes
        else None
    )

  def __call__(
      self,
      x: Float[Array, "b h w c"],
      *,
      train: bool,
      acts: layers.Activations | None,
      prefix: str,
  ) -> Float[Array, "b h2 w2 f"]:
    """Runs the block, recording "<prefix>.relu1" and "<prefix>.relu2"."""
    h = layers.relu_observed(
        self.conv_bn1(x, train=train), prefix + ".relu1", acts
    )
    h = self.conv_bn2(h, train=train)
    if self.projection is not None:
      skip = self.projection(x, train=train)
    else:
      skip = x[:, :: self.stride, :: self.stride, :]
      if self.channel_pad:
        low = self.channel_pad // 2
        skip = jnp.pad(
            skip, ((0, 0), (0, 0), (0, 0), (low, self.channel_pad - low))
        )
    return layers.relu_observed(h + skip, prefix + ".relu2", acts)


class ResNet(nnx.Module):
  """CIFAR ResNet of depth 6n+2 built from basic blocks.

  A 3x3 conv stem with 16 channels, three stages of n basic blocks with 16,
  32, 64 channels (the first block of stages 2 and 3 has stride 2), global
  average pooling and a dense classifier.

  Observed activations, in forward order: "conv1.relu" (stem), then
  "layer<s>.<i>.relu1" and "layer<s>.<i>.relu2" for stage s in 1..3 and block
  i from 0 (zero-padded when n > 10), i.e. 2 * 3n + 1 ReLUs.

  Attributes:
    input_shape: the (height, width, channels) shape the model was built for.
    num_classes: number of logits.
    relu_names: names of the observed ReLUs in forward order.

  References:
    He, Zhang, Ren & Sun, 2016, "Deep Residual Learning for Image
    Recognition", arXiv 1512.03385.
  """

  def __init__(
      self,
      depth: int,
      *,
      num_classes: int = 10,
      input_shape: Sequence[int] = (32, 32, 3),
      shortcut: str = "B",
      rngs: nnx.Rngs,
  ):
    """Builds the network.

    Args:
      depth: 6n+2 for n >= 1 (8, 14, 20, 32, 44, 56, 110, ...).
      num_classes: number of logits, >= 1.
      input_shape: (height, width, channels) of one input image.
      shortcut: "B" (1x1 conv + BN projection where the shape changes, as the
        AP reference code uses) or "A" (parameter-free zero padding).
      rngs: random streams for parameter initialisation.

    Raises:
      ValueError: for a depth not of the form 6n+2, an unknown shortcut, or
        a non-positive class count or input shape.
    """
    if (
        isinstance(depth, bool)
        or not isinstance(depth, int)
        or depth < 8
        or (depth - 2) % 6
    ):
      raise ValueError(
          f"depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 56, ...), got {depth!r}"
      )
    if shortcut not in SHORTCUTS:
      raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
    self.input_shape = layers.check_input_shape(input_shape)
    self.num_classes = layers.check_positive_int("num_classes", num_classes)
    blocks_per_stage = (depth - 2) // 6

    self.stem = layers.ConvBN(self.input_shape[2], CIFAR_WIDTHS[0], rngs=rngs)
    blocks = []
    prefixes = []
    in_features = CIFAR_WIDTHS[0]
    for s, out_features in enumerate(CIFAR_WIDTHS):
      for i in range(blocks_per_stage):
        stride = 2 if s > 0 and i == 0 else 1
        blocks.append(
            BasicBlock(
                in_features, out_features, stride=stride, shortcut=shortcut,
                rngs=rngs,
            )
        )
        prefixes.append(
            layers.indexed_name(f"layer{s + 1}.", i, blocks_per_stage - 1)
        )
        in_features = out_features
    self.blocks = nnx.List(blocks)
    self.block_prefixes = tuple(prefixes)
    self.relu_names = ("conv1.relu",) + tuple(
        f"{p}.relu{j}" for p in prefixes for j in (1, 2)
    )
    self.head = nnx.Linear(in_features, self.num_classes, rngs=rngs)

  def relu_fed(self, path: str) -> bool:
    """Whether the weight at `path` reads ReLU outputs.

    Every block convolution and projection shortcut reads a block input or a
    first-conv output, both after a ReLU, and the head reads their average;
    only the stem reads the (normalised, partly negative) input.
    """
    return not path.startswith("stem/")

  def __call__(
      self,
      x: Float[Array, "b h w c"],
      *,
      train: bool = False,
      return_activations: bool = False,
  ) -> Float[Array, "b n"] | tuple[Float[Array, "b n"], layers.Activations]:
    """Computes logits, and the ReLU outputs when `return_activations` is set.

    Args:
      x: NHWC image batch of the shape given at construction.
      train: BatchNorm uses batch statistics and updates its running
        statistics; otherwise it uses the running statistics.
      return_activations: also return {name: relu output [b, h, w, c]}.

    Returns:
      Logits [b, num_classes], or (logits, activations).
    """
    layers.check_input(x, self.input_shape, type(self).__name__)
    acts = {} if return_activations else None
    h = layers.relu_observed(self.stem(x, train=train), "conv1.relu", acts)
    for prefix, block in zip(self.block_prefixes, self.blocks):
      h = block(h, train=train, acts=acts, prefix=prefix)
    logits = self.head(layers.global_avg_pool(h))
    return (logits, acts) if return_activations else logits


def resnet20(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    shortcut: str = "B",
    rngs: nnx.Rngs,
) -> ResNet:
  """ResNet-20 (n = 3, 19 observed ReLUs); see `ResNet`.

  References:
    He, Zhang, Ren & Sun, 2016, arXiv 1512.03385.
  """
  return ResNet(
      20, num_classes=num_classes, input_shape=input_shape, shortcut=shortcut,
      rngs=rngs,
  )


def resnet32(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    shortcut: str = "B",
    rngs: nnx.Rngs,
) -> ResNet:
  """ResNet-32 (n = 5, 31 observed ReLUs); see `ResNet`.

  References:
    He, Zhang, Ren & Sun, 2016, arXiv 1512.03385.
  """
  return ResNet(
      32, num_classes=num_classes, input_shape=input_shape, shortcut=shortcut,
      rngs=rngs,
  )


def resnet56(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    shortcut: str = "B",
    rngs: nnx.Rngs,
) -> ResNet:
  """ResNet-56 (n = 9, 55 observed ReLUs); see `ResNet`.

  References:
    He, Zhang, Ren & Sun, 2016, arXiv 1512.03385.
  """
  return ResNet(
      56, num_classes=num_classes, input_shape=input_shape, shortcut=shortcut,
      rngs=rngs,
  )

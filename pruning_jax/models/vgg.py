"""CIFAR-form VGG networks with BatchNorm (VGG-11/13/16/19)."""

from collections.abc import Mapping, Sequence
import types

from flax import nnx
from jaxtyping import Array, Float

from pruning_jax.models import layers

POOL = "M"

# Configurations A, B, D, E of Simonyan & Zisserman (2014, table 1): output
# channels of each 3x3 conv, POOL for a 2x2 max pool.
VGG_CONFIGS: Mapping[str, tuple[int | str, ...]] = types.MappingProxyType({
    "vgg11": (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512,
              POOL),
    "vgg13": (64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL,
              512, 512, POOL),
    "vgg16": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512,
              POOL, 512, 512, 512, POOL),
    "vgg19": (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512,
              512, 512, POOL, 512, 512, 512, 512, POOL),
})


class VGG(nnx.Module):
  """CIFAR VGG: 3x3 conv-BN-ReLU stack, global average pool, one dense layer.

  The ImageNet network's three dense layers are replaced by global average
  pooling and a single dense classifier, the common CIFAR variant: on 32x32
  inputs the five pools leave a 1x1 map, so the pooling only flattens it.
  A max pool is skipped when the feature map is already 1 pixel high or wide,
  so 28x28 inputs (28, 14, 7, 3, 1 after four pools) also work; odd sizes
  round down.

  Observed activations are "conv<i>.relu" for every convolution, i from 1,
  zero-padded to the digits of the convolution count (conv01..conv13 for
  VGG-16).

  Attributes:
    input_shape: the (height, width, channels) shape the model was built for.
    num_classes: number of logits.
    relu_names: names of the observed ReLUs in forward order.

  References:
    Simonyan & Zisserman, 2014, "Very Deep Convolutional Networks for
    Large-Scale Image Recognition", arXiv 1409.1556.
  """

  def __init__(
      self,
      config: str | Sequence[int | str],
      *,
      num_classes: int = 10,
      input_shape: Sequence[int] = (32, 32, 3),
      rngs: nnx.Rngs,
  ):
    """Builds the network.

    Args:
      config: a key of `VGG_CONFIGS` ("vgg11", "vgg13", "vgg16", "vgg19") or a
        sequence of conv widths and POOL markers with at least one conv.
      num_classes: number of logits, >= 1.
      input_shape: (height, width, channels) of one input image.
      rngs: random streams for parameter initialisation.

    Raises:
      ValueError: for an unknown configuration name, a malformed
        configuration, or a non-positive class count or input shape.
    """
    if isinstance(config, str):
      if config not in VGG_CONFIGS:
        raise ValueError(
            f"config must be one of {sorted(VGG_CONFIGS)} or a sequence of conv"
            f" widths and {POOL!r}, got {config!r}"
        )
      config = VGG_CONFIGS[config]
    plan = tuple(
        item if item == POOL else layers.check_positive_int(f"config[{i}]", item)
        for i, item in enumerate(config)
    )
    widths = [w for w in plan if w != POOL]
    if not widths:
      raise ValueError(f"config must contain at least one conv width, got {plan!r}")
    self.input_shape = layers.check_input_shape(input_shape)
    self.num_classes = layers.check_positive_int("num_classes", num_classes)
    self.plan = plan
    self.relu_names = tuple(
        layers.indexed_name("conv", i + 1, len(widths)) + ".relu"
        for i in range(len(widths))
    )
    convs = []
    in_features = self.input_shape[2]
    for out_features in widths:
      convs.append(layers.ConvBN(in_features, out_features, rngs=rngs))
      in_features = out_features
    self.convs = nnx.List(convs)
    self.head = nnx.Linear(in_features, self.num_classes, rngs=rngs)

  def relu_fed(self, path: str) -> bool:
    """Whether the weight at `path` reads ReLU outputs (max-pooled or not).

    Only the first convolution reads the (normalised, partly negative) input.
    """
    return not path.startswith("convs/0/")

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
    names = iter(self.relu_names)
    convs = iter(self.convs)
    h = x
    for item in self.plan:
      if item == POOL:
        # Shapes are static, so this choice is made once at trace time.
        if h.shape[1] > 1 and h.shape[2] > 1:
          h = layers.max_pool_2x2(h)
      else:
        h = layers.relu_observed(next(convs)(h, train=train), next(names), acts)
    logits = self.head(layers.global_avg_pool(h))
    return (logits, acts) if return_activations else logits


def vgg11(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    rngs: nnx.Rngs,
) -> VGG:
  """VGG-11 (configuration A, 8 convolutions); see `VGG`.

  References:
    Simonyan & Zisserman, 2014, arXiv 1409.1556.
  """
  return VGG("vgg11", num_classes=num_classes, input_shape=input_shape, rngs=rngs)


def vgg13(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    rngs: nnx.Rngs,
) -> VGG:
  """VGG-13 (configuration B, 10 convolutions); see `VGG`.

  References:
    Simonyan & Zisserman, 2014, arXiv 1409.1556.
  """
  return VGG("vgg13", num_classes=num_classes, input_shape=input_shape, rngs=rngs)


def vgg16(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    rngs: nnx.Rngs,
) -> VGG:
  """VGG-16 (configuration D, 13 convolutions); see `VGG`.

  References:
    Simonyan & Zisserman, 2014, arXiv 1409.1556.
  """
  return VGG("vgg16", num_classes=num_classes, input_shape=input_shape, rngs=rngs)


def vgg19(
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    rngs: nnx.Rngs,
) -> VGG:
  """VGG-19 (configuration E, 16 convolutions); see `VGG`.

  References:
    Simonyan & Zisserman, 2014, arXiv 1409.1556.
  """
  return VGG("vgg19", num_classes=num_classes, input_shape=input_shape, rngs=rngs)

"""Conv-2, Conv-4 and Conv-6: the small VGG-like lottery ticket networks."""

from collections.abc import Sequence

from flax import nnx
from jaxtyping import Array, Float

from pruning_jax.models import layers


class ConvNet(nnx.Module):
  """Stages of 3x3 conv + ReLU layers with 2x2 max pools, then dense layers.

  Each stage ends in a max pool; after the last one come dense + ReLU layers
  and a dense classifier. There is no BatchNorm. Convolutions keep the
  spatial size (padding 1); each pool halves it, rounding down, so 28x28
  inputs reach 3x3 after three pools and 32x32 inputs 4x4.
  Observed activations are "conv1.relu", ..., then "fc1.relu", ... .

  Attributes:
    input_shape: the (height, width, channels) shape the model was built for.
    num_classes: number of logits.
    relu_names: names of the observed ReLUs in forward order.
  """

  def __init__(
      self,
      stages: Sequence[Sequence[int]],
      dense: Sequence[int],
      *,
      num_classes: int = 10,
      input_shape: Sequence[int] = (32, 32, 3),
      rngs: nnx.Rngs,
  ):
    """Builds the network.

    Args:
      stages: per stage, the output channels of its convolutions; every stage
        has at least one convolution.
      dense: widths of the hidden dense layers.
      num_classes: number of logits, >= 1.
      input_shape: (height, width, channels) of one input image.
      rngs: random streams for parameter initialisation.

    Raises:
      ValueError: for empty stages, non-positive widths, or inputs too small
        to survive one 2x2 pool per stage.
    """
    self.input_shape = layers.check_input_shape(input_shape)
    self.num_classes = layers.check_positive_int("num_classes", num_classes)
    height, width, in_features = self.input_shape
    if height < 2 ** len(stages) or width < 2 ** len(stages):
      raise ValueError(
          f"input_shape {self.input_shape} is too small for {len(stages)} 2x2"
          f" pools; height and width must be >= {2 ** len(stages)}"
      )
    conv_widths = []
    stage_sizes = []
    for s, stage in enumerate(stages):
      if len(stage) == 0:
        raise ValueError(
            f"stages[{s}] must list >= 1 conv width, got {tuple(stage)!r}"
        )
      conv_widths.extend(
          layers.check_positive_int(f"stages[{s}][{i}]", w)
          for i, w in enumerate(stage)
      )
      stage_sizes.append(len(stage))
      height, width = height // 2, width // 2
    self.stage_sizes = tuple(stage_sizes)
    dense_widths = tuple(
        layers.check_positive_int(f"dense[{i}]", w) for i, w in enumerate(dense)
    )
    self.relu_names = tuple(
        layers.indexed_name("conv", i + 1, len(conv_widths)) + ".relu"
        for i in range(len(conv_widths))
    ) + tuple(
        layers.indexed_name("fc", i + 1, len(dense_widths)) + ".relu"
        for i in range(len(dense_widths))
    )

    convs = []
    for out_features in conv_widths:
      convs.append(
          nnx.Conv(
              in_features,
              out_features,
              kernel_size=(3, 3),
              padding=((1, 1), (1, 1)),
              kernel_init=layers.GLOROT_NORMAL,
              rngs=rngs,
          )
      )
      in_features = out_features
    self.convs = nnx.List(convs)
    in_features = height * width * in_features
    fcs = []
    for out_features in dense_widths:
      fcs.append(
          nnx.Linear(
              in_features, out_features, kernel_init=layers.GLOROT_NORMAL,
              rngs=rngs,
          )
      )
      in_features = out_features
    self.fcs = nnx.List(fcs)
    self.head = nnx.Linear(
        in_features, self.num_classes, kernel_init=layers.GLOROT_NORMAL, rngs=rngs
    )

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
      train: unused (no BatchNorm or dropout); accepted for a uniform API.
      return_activations: also return {name: relu output}, [b, h, w, c] for
        convolutions and [b, width] for dense layers.

    Returns:
      Logits [b, num_classes], or (logits, activations).
    """
    del train
    layers.check_input(x, self.input_shape, type(self).__name__)
    acts = {} if return_activations else None
    names = iter(self.relu_names)
    convs = iter(self.convs)
    h = x
    for size in self.stage_sizes:
      for _ in range(size):
        h = layers.relu_observed(next(convs)(h), next(names), acts)
      h = layers.max_pool_2x2(h)
    h_BxF = h.reshape(h.shape[0], -1)
    for fc in self.fcs:
      h_BxF = layers.relu_observed(fc(h_BxF), next(names), acts)
    logits = self.head(h_BxF)
    return (logits, acts) if return_activations else logits


class Conv2(ConvNet):
  """Conv-2: conv 64, 64, pool; dense 256, 256; classifier.

  References:
    Frankle & Carbin, 2019, "The Lottery Ticket Hypothesis: Finding Sparse,
    Trainable Neural Networks", arXiv 1803.03635.
  """

  def __init__(
      self,
      *,
      num_classes: int = 10,
      input_shape: Sequence[int] = (32, 32, 3),
      rngs: nnx.Rngs,
  ):
    """Builds Conv-2 for `input_shape` images and `num_classes` logits."""
    super().__init__(
        ((64, 64),), (256, 256),
        num_classes=num_classes, input_shape=input_shape, rngs=rngs,
    )


class Conv4(ConvNet):
  """Conv-4: conv 64, 64, pool, 128, 128, pool; dense 256, 256; classifier.

  References:
    Frankle & Carbin, 2019, "The Lottery Ticket Hypothesis: Finding Sparse,
    Trainable Neural Networks", arXiv 1803.03635.
  """

  def __init__(
      self,
      *,
      num_classes: int = 10,
      input_shape: Sequence[int] = (32, 32, 3),
      rngs: nnx.Rngs,
  ):
    """Builds Conv-4 for `input_shape` images and `num_classes` logits."""
    super().__init__(
        ((64, 64), (128, 128)), (256, 256),
        num_classes=num_classes, input_shape=input_shape, rngs=rngs,
    )


class Conv6(ConvNet):
  """Conv-6: conv 64, 64, pool, 128, 128, pool, 256, 256, pool; dense 256, 256.

  References:
    Frankle & Carbin, 2019, "The Lottery Ticket Hypothesis: Finding Sparse,
    Trainable Neural Networks", arXiv 1803.03635.
  """

  def __init__(
      self,
      *,
      num_classes: int = 10,
      input_shape: Sequence[int] = (32, 32, 3),
      rngs: nnx.Rngs,
  ):
    """Builds Conv-6 for `input_shape` images and `num_classes` logits."""
    super().__init__(
        ((64, 64), (128, 128), (256, 256)), (256, 256),
        num_classes=num_classes, input_shape=input_shape, rngs=rngs,
    )

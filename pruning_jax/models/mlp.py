"""Fully connected ReLU networks: a generic MLP and LeNet-300-100."""

from collections.abc import Sequence
import math

from flax import nnx
from jaxtyping import Array, Float

from pruning_jax.models import layers


class MLP(nnx.Module):
  """Flatten, then dense + ReLU layers of the given widths, then a dense classifier.

  Observed activations are named "fc1.relu", "fc2.relu", ... in forward order
  (indices zero-padded when there are ten or more hidden layers).

  Attributes:
    input_shape: the (height, width, channels) shape the model was built for.
    num_classes: number of logits.
    relu_names: names of the observed ReLUs in forward order.
  """

  def __init__(
      self,
      hidden: Sequence[int],
      *,
      num_classes: int = 10,
      input_shape: Sequence[int] = (28, 28, 1),
      rngs: nnx.Rngs,
  ):
    """Builds the network.

    Args:
      hidden: widths of the hidden layers, each >= 1; may be empty.
      num_classes: number of logits, >= 1.
      input_shape: (height, width, channels) of one input image.
      rngs: random streams for parameter initialisation.

    Raises:
      ValueError: for a non-positive width, class count or input shape.
    """
    self.input_shape = layers.check_input_shape(input_shape)
    self.num_classes = layers.check_positive_int("num_classes", num_classes)
    widths = tuple(
        layers.check_positive_int(f"hidden[{i}]", w) for i, w in enumerate(hidden)
    )
    self.relu_names = tuple(
        layers.indexed_name("fc", i + 1, len(widths)) + ".relu"
        for i in range(len(widths))
    )
    in_features = math.prod(self.input_shape)
    dense = []
    for width in widths:
      dense.append(
          nnx.Linear(
              in_features, width, kernel_init=layers.GLOROT_NORMAL, rngs=rngs
          )
      )
      in_features = width
    self.hidden = nnx.List(dense)
    self.head = nnx.Linear(
        in_features, self.num_classes, kernel_init=layers.GLOROT_NORMAL, rngs=rngs
    )

  def relu_fed(self, path: str) -> bool:
    """Whether the weight at `path` ("hidden/1/kernel") reads ReLU outputs.

    Only the first layer reads the (normalised, partly negative) input pixels.
    """
    first = "hidden/0/" if len(self.hidden) else "head/"
    return not path.startswith(first)

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
      return_activations: also return {name: relu output [b, width]}.

    Returns:
      Logits [b, num_classes], or (logits, activations).
    """
    del train
    layers.check_input(x, self.input_shape, type(self).__name__)
    acts = {} if return_activations else None
    h_BxF = x.reshape(x.shape[0], -1)
    for name, dense in zip(self.relu_names, self.hidden):
      h_BxF = layers.relu_observed(dense(h_BxF), name, acts)
    logits = self.head(h_BxF)
    return (logits, acts) if return_activations else logits


class LeNet300100(MLP):
  """LeNet-300-100: dense 300 and 100 ReLU layers, then the classifier.

  With 28x28x1 inputs and 10 classes it has 266,610 parameters
  (784*300+300 + 300*100+100 + 100*10+10).

  References:
    Frankle & Carbin, 2019, "The Lottery Ticket Hypothesis: Finding Sparse,
    Trainable Neural Networks", arXiv 1803.03635 (after LeCun et al. 1998).
  """

  def __init__(
      self,
      *,
      num_classes: int = 10,
      input_shape: Sequence[int] = (28, 28, 1),
      rngs: nnx.Rngs,
  ):
    """Builds LeNet-300-100 for `input_shape` images and `num_classes` logits."""
    super().__init__(
        (300, 100), num_classes=num_classes, input_shape=input_shape, rngs=rngs
    )

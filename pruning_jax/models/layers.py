"""Building blocks shared by the pruning models: observed ReLUs, conv + BN, checks.

Every model records the output of each ReLU under a stable name when asked to,
so the dynamic dead neuron rate (DNR) can be measured from the same forward
pass that produces the logits. Names are chosen so that sorting them (as
`jax.tree` does for dicts leaving a `jit`) reproduces the forward order:
indices are zero-padded to the width of the largest index of their group.
"""

from collections.abc import MutableMapping, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

Activations = dict[str, Array]

# Layers that feed a ReLU keep their output variance at initialisation with He
# scaling (He et al. 2015, arXiv 1502.01852); the CIFAR reference code of
# ResNet and VGG initialises this way.
HE_NORMAL = nnx.initializers.he_normal()

# Frankle & Carbin (2019, arXiv 1803.03635) train LeNet and Conv-2/4/6 from a
# Gaussian Glorot initialisation.
GLOROT_NORMAL = nnx.initializers.glorot_normal()

# PyTorch's BatchNorm momentum 0.1 weights the new batch statistic; Flax's
# momentum weights the old running value, so 0.9 reproduces PyTorch's default
# that the AP reference code trains with.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def observe(
    y: Float[Array, "b *u"],
    name: str,
    acts: MutableMapping[str, Array] | None,
) -> Float[Array, "b *u"]:
  """Records an activation output under `name` when `acts` is a dict.

  Args:
    y: activation output of any shape with a leading batch axis.
    name: stable layer name; must be unused in `acts`.
    acts: dict collecting observed outputs, or None to observe nothing.

  Returns:
    `y`, unchanged.

  Raises:
    ValueError: if `name` was already recorded in `acts`.
  """
  if acts is not None:
    if name in acts:
      raise ValueError(
          f"activation name {name!r} recorded twice; layer names must be unique"
      )
    acts[name] = y
  return y


def relu_observed(
    x: Float[Array, "b *u"],
    name: str,
    acts: MutableMapping[str, Array] | None,
) -> Float[Array, "b *u"]:
  """Applies ReLU and records its output under `name` when `acts` is a dict."""
  return observe(jax.nn.relu(x), name, acts)


def indexed_name(prefix: str, index: int, count: int) -> str:
  """Returns `prefix` followed by `index` zero-padded to the digits of `count`.

  Padding keeps lexicographic order equal to numeric order, e.g. conv01 ..
  conv13 for 13 convolutions.
  """
  return f"{prefix}{index:0{len(str(count))}d}"


def check_positive_int(name: str, value: int) -> int:
  """Returns `value` as int, raising ValueError unless it is an int >= 1."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
  return value


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
  """Validates an (height, width, channels) input shape and returns it as a tuple."""
  shape = tuple(input_shape)
  if len(shape) != 3 or not all(
      isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape
  ):
    raise ValueError(
        "input_shape must be (height, width, channels) with positive integers,"
        f" e.g. (28, 28, 1) or (32, 32, 3); got {input_shape!r}"
    )
  return shape


def check_input(x: Array, input_shape: tuple[int, int, int], model: str) -> None:
  """Raises ValueError unless `x` is an NHWC batch of the model's input shape."""
  if x.ndim != 4 or tuple(x.shape[1:]) != input_shape:
    raise ValueError(
        f"{model} was built for inputs [b, {', '.join(map(str, input_shape))}]"
        f" (NHWC), got x.shape={tuple(x.shape)}; pass input_shape= matching the"
        " data when constructing the model"
    )


def max_pool_2x2(x: Float[Array, "b h w c"]) -> Float[Array, "b h2 w2 c"]:
  """2x2 max pooling with stride 2; odd trailing rows/columns are dropped."""
  return nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


def global_avg_pool(x: Float[Array, "b h w c"]) -> Float[Array, "b c"]:
  """Averages over the spatial axes."""
  return jnp.mean(x, axis=(1, 2))


class ConvBN(nnx.Module):
  """Bias-free convolution followed by BatchNorm.

  The convolution pads symmetrically by `kernel_size // 2`, as PyTorch's
  `padding=1` does for 3x3 kernels, so strided layers sample the same input
  positions as the reference implementations.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      kernel_size: int = 3,
      stride: int = 1,
      rngs: nnx.Rngs,
  ):
    pad = kernel_size // 2
    self.conv = nnx.Conv(
        in_features,
        out_features,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=HE_NORMAL,
        rngs=rngs,
    )
    self.bn = nnx.BatchNorm(
        out_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, rngs=rngs
    )

  def __call__(
      self, x: Float[Array, "b h w c"], *, train: bool
  ) -> Float[Array, "b h2 w2 f"]:
    """Convolves and normalises; `train` uses and updates batch statistics."""
    return self.bn(self.conv(x), use_running_average=not train)

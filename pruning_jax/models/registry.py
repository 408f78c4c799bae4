"""Model lookup by name, parameter counting and abstract activation shapes."""

from collections.abc import Callable, Mapping, Sequence
import math
import types

from flax import nnx
import jax
import jax.numpy as jnp

from pruning_jax.models import conv
from pruning_jax.models import mlp
from pruning_jax.models import resnet
from pruning_jax.models import vgg
from pruning_jax.models import vit

# Every builder accepts the keyword arguments num_classes, input_shape and
# rngs, plus its own options.
MODEL_BUILDERS: Mapping[str, Callable[..., nnx.Module]] = types.MappingProxyType({
    "lenet300100": mlp.LeNet300100,
    "conv2": conv.Conv2,
    "conv4": conv.Conv4,
    "conv6": conv.Conv6,
    "resnet20": resnet.resnet20,
    "resnet32": resnet.resnet32,
    "resnet56": resnet.resnet56,
    "vgg11": vgg.vgg11,
    "vgg13": vgg.vgg13,
    "vgg16": vgg.vgg16,
    "vgg19": vgg.vgg19,
    "vit": vit.ViT,
})


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    rngs: nnx.Rngs,
    **options,
) -> nnx.Module:
  """Builds a registered model.

  Args:
    name: a key of `MODEL_BUILDERS`, case-insensitive (e.g. "resnet20").
    num_classes: number of logits.
    input_shape: (height, width, channels) of one input image.
    rngs: random streams for parameter initialisation.
    **options: model-specific keyword arguments (e.g. shortcut="A" for
      ResNets, activation="gelu" for the ViT).

  Returns:
    The initialised model.

  Raises:
    ValueError: for an unknown name, or whatever the model rejects.
  """
  key = name.lower() if isinstance(name, str) else name
  if key not in MODEL_BUILDERS:
    raise ValueError(
        f"name must be one of {sorted(MODEL_BUILDERS)}, got {name!r}"
    )
  return MODEL_BUILDERS[key](
      num_classes=num_classes, input_shape=tuple(input_shape), rngs=rngs,
      **options,
  )


def count_params(model: nnx.Module) -> int:
  """Returns the number of trainable scalars (`nnx.Param` entries) of `model`.

  BatchNorm running statistics are state, not parameters, and are not counted.
  """
  return sum(
      math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))
  )


def activation_shapes(
    model: nnx.Module, batch_size: int = 1
) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of the observed activations for a batch, without running the model.

  The result can seed `pruning_jax.dnr.dnr_init`.

  Args:
    model: a model of this package (it has `input_shape`).
    batch_size: leading dimension of the abstract input batch, >= 1.

  Returns:
    {name: ShapeDtypeStruct [batch_size, ...]} for every observed activation.

  Raises:
    ValueError: for a non-positive batch size.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
  x = jax.ShapeDtypeStruct((batch_size, *model.input_shape), jnp.float32)
  return nnx.eval_shape(
      lambda m, inputs: m(inputs, return_activations=True)[1], model, x
  )

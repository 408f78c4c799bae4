"""Flax NNX models with observable ReLU outputs for pruning experiments."""

from pruning_jax.models.conv import Conv2
from pruning_jax.models.conv import Conv4
from pruning_jax.models.conv import Conv6
from pruning_jax.models.conv import ConvNet
from pruning_jax.models.layers import Activations
from pruning_jax.models.layers import ConvBN
from pruning_jax.models.mlp import LeNet300100
from pruning_jax.models.mlp import MLP
from pruning_jax.models.registry import MODEL_BUILDERS
from pruning_jax.models.registry import activation_shapes
from pruning_jax.models.registry import build_model
from pruning_jax.models.registry import count_params
from pruning_jax.models.resnet import BasicBlock
from pruning_jax.models.resnet import ResNet
from pruning_jax.models.resnet import resnet20
from pruning_jax.models.resnet import resnet32
from pruning_jax.models.resnet import resnet56
from pruning_jax.models.vgg import VGG
from pruning_jax.models.vgg import VGG_CONFIGS
from pruning_jax.models.vgg import vgg11
from pruning_jax.models.vgg import vgg13
from pruning_jax.models.vgg import vgg16
from pruning_jax.models.vgg import vgg19
from pruning_jax.models.vit import EncoderBlock
from pruning_jax.models.vit import ViT

__all__ = [
    "Activations",
    "BasicBlock",
    "Conv2",
    "Conv4",
    "Conv6",
    "ConvBN",
    "ConvNet",
    "EncoderBlock",
    "LeNet300100",
    "MLP",
    "MODEL_BUILDERS",
    "ResNet",
    "VGG",
    "VGG_CONFIGS",
    "ViT",
    "activation_shapes",
    "build_model",
    "count_params",
    "resnet20",
    "resnet32",
    "resnet56",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
]

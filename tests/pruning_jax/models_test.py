"""Tests for the pruning models (pruning_jax.models)."""

import math

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from pruning_jax import masks as masks_lib
from pruning_jax import models
from pruning_jax import train

MNIST = (28, 28, 1)
CIFAR = (32, 32, 3)


def _materialize(builder, seed=0, **kwargs):
  """Builds a model abstractly, then fills its variables from numpy.

  Compiling the PRNG-based initialisers dominates test time on CPU; shapes,
  names and the forward pass do not depend on how the values were drawn.
  """
  abstract = nnx.eval_shape(lambda: builder(rngs=nnx.Rngs(0), **kwargs))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-2].key
    if name in ("scale", "var"):
      value = np.ones(leaf.shape)
    elif name in ("bias", "mean", "cls_token"):
      value = np.zeros(leaf.shape)
    elif name == "kernel":
      value = rng.normal(size=leaf.shape) * math.sqrt(2 / math.prod(leaf.shape[:-1]))
    elif name == "pos_embed":
      value = rng.normal(size=leaf.shape) * 0.02
    else:
      raise AssertionError(f"unexpected variable {path}")
    return jnp.asarray(value, leaf.dtype)

  state = jax.tree_util.tree_map_with_path(fill, state)
  return nnx.merge(graphdef, state)


def _abstract_forward(builder, input_shape, batch=2, **kwargs):
  """Logits and activations as ShapeDtypeStructs, without computing anything."""
  model = nnx.eval_shape(
      lambda: builder(input_shape=input_shape, rngs=nnx.Rngs(0), **kwargs)
  )
  x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
  out = nnx.eval_shape(lambda m, x: m(x, return_activations=True), model, x)
  return model, out


@nnx.jit(static_argnames=("train",))
def _forward(model, x, train=False):
  return model(x, train=train, return_activations=True)


def _resnet_names(blocks_per_stage):
  names = ["conv1.relu"]
  for stage in (1, 2, 3):
    for i in range(blocks_per_stage):
      names += [f"layer{stage}.{i}.relu1", f"layer{stage}.{i}.relu2"]
  return tuple(names)


class ForwardTest(parameterized.TestCase):

  @parameterized.named_parameters(
      (f"{name}_{shape[0]}", name, shape)
      for name in ("lenet300100", "conv2", "conv4", "conv6", "resnet20",
                   "vgg11", "vit")
      for shape in (MNIST, CIFAR)
  )
  def test_logits_and_activations(self, name, input_shape):
    model = _materialize(
        models.MODEL_BUILDERS[name], num_classes=7, input_shape=input_shape
    )
    x = jnp.asarray(
        np.random.default_rng(1).normal(size=(2, *input_shape)), jnp.float32
    )
    logits, acts = _forward(model, x)
    chex.assert_shape(logits, (2, 7))
    chex.assert_tree_all_finite(logits)
    # Leaving jit sorts dict keys; the names were chosen so this is forward order.
    self.assertEqual(tuple(acts), model.relu_names)
    self.assertEqual(tuple(sorted(model.relu_names)), model.relu_names)
    for act in acts.values():
      self.assertEqual(act.shape[0], 2)
      self.assertGreaterEqual(float(jnp.min(act)), 0.0)

  @parameterized.named_parameters(
      (f"{name}_{shape[0]}", name, shape)
      for name in ("resnet32", "resnet56", "vgg13", "vgg16", "vgg19")
      for shape in (MNIST, CIFAR)
  )
  def test_large_models_abstract_shapes(self, name, input_shape):
    model, (logits, acts) = _abstract_forward(
        models.MODEL_BUILDERS[name], input_shape, num_classes=100
    )
    self.assertEqual(logits.shape, (2, 100))
    self.assertEqual(tuple(acts), model.relu_names)
    expected = {"resnet32": 31, "resnet56": 55, "vgg13": 10, "vgg16": 13,
                "vgg19": 16}[name]
    self.assertLen(acts, expected)

  def test_plain_forward_traces_once_and_matches(self):
    model = _materialize(models.Conv2, input_shape=(8, 8, 1))

    @nnx.jit
    @chex.assert_max_traces(n=1)
    def apply(m, x):
      return m(x)

    for seed in (0, 1, 2):
      x = jnp.asarray(
          np.random.default_rng(seed).normal(size=(2, 8, 8, 1)), jnp.float32
      )
      logits = apply(model, x)
      self.assertIsInstance(logits, jax.Array)
      chex.assert_shape(logits, (2, 10))
    chex.assert_trees_all_close(logits, _forward(model, x)[0], rtol=1e-5,
                                atol=1e-6)

  def test_real_initialisation(self):
    model = models.MLP((8,), input_shape=(4, 4, 1), num_classes=3,
                       rngs=nnx.Rngs(0))
    logits = model(jnp.ones((2, 4, 4, 1)))
    chex.assert_shape(logits, (2, 3))
    chex.assert_tree_all_finite(logits)
    kernel = np.asarray(model.hidden[0].kernel[...])
    # Glorot normal: std sqrt(2 / (fan_in + fan_out)) = sqrt(2 / 24); 128
    # draws with a fixed seed land well within 25 % of it.
    np.testing.assert_allclose(np.std(kernel), math.sqrt(2 / 24), rtol=0.25)
    np.testing.assert_array_equal(model.hidden[0].bias[...], 0.0)

  def test_vit_gelu_mean_pool(self):
    model = _materialize(
        models.ViT, input_shape=(8, 8, 1), patch_size=4, dim=8, depth=2,
        num_heads=2, mlp_dim=6, pool="mean", activation="gelu",
    )
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 8, 8, 1)), jnp.float32)
    logits, acts = _forward(model, x)
    chex.assert_shape(logits, (2, 10))
    self.assertEqual(tuple(acts), ("block1.mlp.gelu", "block2.mlp.gelu"))
    chex.assert_shape(acts["block1.mlp.gelu"], (2, 4, 6))
    # GELU passes small negative values, unlike ReLU.
    self.assertLess(float(jnp.min(acts["block1.mlp.gelu"])), 0.0)


class ParamCountTest(absltest.TestCase):

  def _count(self, builder, **kwargs):
    return models.count_params(
        nnx.eval_shape(lambda: builder(rngs=nnx.Rngs(0), **kwargs))
    )

  def test_lenet(self):
    # 784*300+300 + 300*100+100 + 100*10+10 (Frankle & Carbin 2019, figure 2).
    self.assertEqual(self._count(models.LeNet300100, input_shape=MNIST), 266_610)

  def test_resnet20_option_b(self):
    # Conv kernels have no bias; each BN adds 2 * channels (scale, bias).
    # stem 3*3*3*16 + 32 = 464
    # stage 1: 3 blocks * (2 * 3*3*16*16 + 2*32) = 14,016
    # stage 2: first block 3*3*16*32 + 3*3*32*32 + 2*64 + projection
    #   (1*1*16*32 + 64) = 14,528; two blocks 2 * (2*9216 + 128) = 37,120
    # stage 3: first block 3*3*32*64 + 3*3*64*64 + 2*128 + projection
    #   (32*64 + 128) = 57,728; two blocks 2 * (2*36864 + 256) = 147,968
    # head 64*10 + 10 = 650; total 272,474.
    self.assertEqual(self._count(models.resnet20), 272_474)

  def test_resnet20_option_a(self):
    # Option B minus the two projections: 272,474 - 576 - 2,176 = 269,722,
    # the 0.27M quoted by He et al. (2016, table 6).
    self.assertEqual(self._count(models.resnet20, shortcut="A"), 269_722)

  def test_conv2_and_vgg16(self):
    # Conv-2 on CIFAR: convs 3*3*3*64+64 + 3*3*64*64+64, dense
    # 16*16*64*256+256 + 256*256+256, head 256*10+10 = 4,301,642 ("4.3M",
    # Frankle & Carbin 2019).
    self.assertEqual(self._count(models.Conv2), 4_301_642)
    # Bias-free 3x3 convs of configuration D: sum of 9 * c_in * c_out =
    # 14,710,464; BN 2 * 4,224 channels = 8,448; head 512*10+10 = 5,130.
    self.assertEqual(self._count(models.vgg16), 14_724_042)

  def test_batch_stats_are_not_parameters(self):
    model = nnx.eval_shape(lambda: models.ResNet(8, rngs=nnx.Rngs(0)))
    stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    self.assertNotEmpty(stats)
    total = sum(math.prod(a.shape) for a in jax.tree.leaves(nnx.state(model)))
    self.assertEqual(
        models.count_params(model),
        total - sum(math.prod(a.shape) for a in stats),
    )


class NamesTest(absltest.TestCase):

  def test_resnet20_observes_19_relus(self):
    model, (_, acts) = _abstract_forward(models.resnet20, CIFAR)
    # 1 stem ReLU + 2 per block * 3 stages * 3 blocks.
    self.assertLen(acts, 19)
    self.assertEqual(tuple(acts), _resnet_names(3))
    self.assertEqual(acts["conv1.relu"].shape, (2, 32, 32, 16))
    self.assertEqual(acts["layer2.0.relu1"].shape, (2, 16, 16, 32))
    self.assertEqual(acts["layer3.2.relu2"].shape, (2, 8, 8, 64))

  def test_block_indices_are_padded_past_ten(self):
    model = nnx.eval_shape(lambda: models.ResNet(68, rngs=nnx.Rngs(0)))
    self.assertEqual(model.relu_names[1], "layer1.00.relu1")
    self.assertEqual(model.relu_names[-1], "layer3.10.relu2")
    self.assertEqual(tuple(sorted(model.relu_names)), model.relu_names)

  def test_other_model_names(self):
    expected = {
        models.LeNet300100: ("fc1.relu", "fc2.relu"),
        models.Conv6: tuple(f"conv{i}.relu" for i in range(1, 7))
        + ("fc1.relu", "fc2.relu"),
        models.vgg16: tuple(f"conv{i:02d}.relu" for i in range(1, 14)),
        models.ViT: tuple(f"block{i}.mlp.relu" for i in range(1, 5)),
    }
    for builder, names in expected.items():
      model = nnx.eval_shape(lambda b=builder: b(rngs=nnx.Rngs(0)))
      self.assertEqual(model.relu_names, names)
    gelu = nnx.eval_shape(lambda: models.ViT(activation="gelu", rngs=nnx.Rngs(0)))
    self.assertEqual(gelu.relu_names[0], "block1.mlp.gelu")

  def test_vgg_pool_rule(self):
    # Pools are skipped once the map is 1x1: 28 -> 14 -> 7 -> 3 -> 1.
    for input_shape, sizes in (
        (MNIST, (28, 14, 7, 7, 3, 3, 1, 1)),
        (CIFAR, (32, 16, 8, 8, 4, 4, 2, 2)),
    ):
      _, (_, acts) = _abstract_forward(models.vgg11, input_shape)
      self.assertEqual(tuple(a.shape[1] for a in acts.values()), sizes)

  def test_vit_token_counts(self):
    _, (_, cls_acts) = _abstract_forward(models.ViT, CIFAR)
    # (32 / 4)^2 patches + CLS token.
    self.assertEqual(cls_acts["block1.mlp.relu"].shape, (2, 65, 128))
    _, (_, mean_acts) = _abstract_forward(models.ViT, MNIST, pool="mean")
    self.assertEqual(mean_acts["block4.mlp.relu"].shape, (2, 49, 128))

  def test_activation_shapes(self):
    model = nnx.eval_shape(lambda: models.LeNet300100(rngs=nnx.Rngs(0)))
    shapes = models.activation_shapes(model, batch_size=3)
    self.assertEqual(
        {k: v.shape for k, v in shapes.items()},
        {"fc1.relu": (3, 300), "fc2.relu": (3, 100)},
    )


class BatchNormTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.model = _materialize(models.ResNet, depth=8, input_shape=(8, 8, 3))
    self.x = jnp.asarray(
        np.random.default_rng(3).normal(size=(3, 8, 8, 3)) + 1.0, jnp.float32
    )

  def _stats(self):
    return jax.tree.map(np.asarray, nnx.state(self.model, nnx.BatchStat))

  def test_eval_leaves_running_stats(self):
    before = self._stats()
    _forward(self.model, self.x, train=False)
    chex.assert_trees_all_equal(self._stats(), before)

  def test_train_updates_running_stats_with_momentum(self):
    before = self._stats()
    conv_out = self.model.stem.conv(self.x)
    _forward(self.model, self.x, train=True)
    after = self._stats()
    # Flax momentum 0.9 on the old value: 0.9 * 0 + 0.1 * batch mean.
    np.testing.assert_allclose(
        after["stem"]["bn"]["mean"][...],
        0.1 * np.mean(np.asarray(conv_out), axis=(0, 1, 2)),
        rtol=1e-4, atol=1e-6,
    )
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), after, before)
    self.assertTrue(all(jax.tree.leaves(changed)))

  def test_eval_is_per_sample_and_train_is_per_batch(self):
    # Replacing the last sample changes the batch statistics but not the
    # running ones, so only train-mode logits of the first two samples move.
    other = self.x.at[2].set(-3.0 * self.x[2])
    eval_x, _ = _forward(self.model, self.x, train=False)
    eval_other, _ = _forward(self.model, other, train=False)
    np.testing.assert_allclose(eval_x[:2], eval_other[:2], rtol=1e-5, atol=1e-6)
    train_x, _ = _forward(self.model, self.x, train=True)
    train_other, _ = _forward(self.model, other, train=True)
    self.assertGreater(
        float(jnp.max(jnp.abs(train_x[:2] - train_other[:2]))), 1e-4
    )


class ShortcutTest(absltest.TestCase):

  def _zero_kernels(self, block):
    for path, var in nnx.iter_graph(block):
      if isinstance(var, nnx.Param) and path[-1] == "kernel":
        var[...] = jnp.zeros_like(var[...])

  def test_option_a_zero_pads_channels(self):
    block = _materialize(
        models.BasicBlock, in_features=2, out_features=4, stride=2,
        shortcut="A",
    )
    self._zero_kernels(block)
    x = jnp.arange(2 * 4 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 4, 2) - 30
    acts = {}
    out = block(x, train=False, acts=acts, prefix="b")
    # Zero kernels and eval-mode BN with fresh stats turn the residual branch
    # into 0, leaving relu(shortcut): x subsampled by 2, one zero channel on
    # each side of the two input channels.
    sub = np.asarray(x)[:, ::2, ::2, :]
    expected = np.maximum(np.pad(sub, ((0, 0), (0, 0), (0, 0), (1, 1))), 0)
    np.testing.assert_array_equal(out, expected)
    self.assertEqual(tuple(acts), ("b.relu1", "b.relu2"))
    np.testing.assert_array_equal(acts["b.relu1"], 0.0)
    self.assertIsNone(block.projection)

  def test_option_b_projects_only_when_shape_changes(self):
    model = nnx.eval_shape(lambda: models.resnet20(rngs=nnx.Rngs(0)))
    projected = [b.projection is not None for b in model.blocks]
    self.assertEqual(projected, [False] * 3 + [True, False, False] * 2)
    self.assertEqual(model.blocks[3].projection.conv.kernel.shape, (1, 1, 16, 32))


class ReluFedTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("lenet", "lenet300100", (28, 28, 1), {"hidden/0/kernel"}),
      ("conv2", "conv2", (32, 32, 3), {"convs/0/kernel"}),
      ("vgg11", "vgg11", (32, 32, 3), {"convs/0/conv/kernel"}),
      ("resnet20", "resnet20", (32, 32, 1), {"stem/conv/kernel"}),
  )
  def test_only_the_input_layer_reads_non_relu_inputs(self, name, shape, not_fed):
    model = models.build_model(name, num_classes=10, input_shape=shape, rngs=nnx.Rngs(0))
    _, params, _ = train.split_model(model)
    paths = [masks_lib.path_str(p) for p, m in jax.tree_util.tree_flatten_with_path(
        masks_lib.init_masks(params), is_leaf=lambda x: x is None)[0] if m is not None]
    self.assertEqual({p for p in paths if not model.relu_fed(p)}, not_fed)

  def test_vit_relu_feeds_only_fc2(self):
    for activation, expected in (("relu", 2), ("gelu", 0)):
      model = models.build_model("vit", num_classes=10, input_shape=(32, 32, 3),
                                 rngs=nnx.Rngs(0), activation=activation, depth=2)
      _, params, _ = train.split_model(model)
      paths = [masks_lib.path_str(p) for p, m in jax.tree_util.tree_flatten_with_path(
          masks_lib.init_masks(params), is_leaf=lambda x: x is None)[0] if m is not None]
      fed = [p for p in paths if model.relu_fed(p)]
      self.assertLen(fed, expected)
      self.assertTrue(all(p.endswith("fc2/kernel") for p in fed))


class ErrorsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("classes", models.LeNet300100, {"num_classes": 0}, "num_classes must be"),
      ("hidden", models.MLP, {"hidden": (3, 0)}, r"hidden\[1\] must be"),
      ("shape_len", models.LeNet300100, {"input_shape": (28, 28)},
       "input_shape must be"),
      ("shape_zero", models.Conv2, {"input_shape": (0, 28, 1)},
       "input_shape must be"),
      ("too_small", models.Conv6, {"input_shape": (4, 4, 1)}, "too small"),
      ("empty_stage", models.ConvNet, {"stages": ((),), "dense": ()},
       r"stages\[0\] must list"),
      ("dense", models.ConvNet, {"stages": ((4,),), "dense": (-1,)},
       r"dense\[0\] must be"),
      ("depth", models.ResNet, {"depth": 21}, "depth must be 6n"),
      ("depth_small", models.ResNet, {"depth": 2}, "depth must be 6n"),
      ("shortcut", models.resnet20, {"shortcut": "C"}, "shortcut must be one of"),
      ("vgg_name", models.VGG, {"config": "vgg12"}, "config must be one of"),
      ("vgg_item", models.VGG, {"config": (64, "X")}, r"config\[1\] must be"),
      ("vgg_no_conv", models.VGG, {"config": ("M",)}, "at least one conv"),
      ("patch", models.ViT, {"patch_size": 5}, "patch_size=5 must divide"),
      ("heads", models.ViT, {"dim": 66}, "dim=66 must be a multiple"),
      ("pool", models.ViT, {"pool": "max"}, "pool must be one of"),
      ("activation", models.ViT, {"activation": "tanh"},
       "activation must be one of"),
      ("vit_depth", models.ViT, {"depth": 0}, "depth must be"),
  )
  def test_constructor_errors(self, builder, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      nnx.eval_shape(lambda: builder(rngs=nnx.Rngs(0), **kwargs))

  def test_wrong_input_shape(self):
    model = nnx.eval_shape(lambda: models.resnet20(rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
    with self.assertRaisesRegex(ValueError, r"built for inputs \[b, 32, 32, 3\]"):
      nnx.eval_shape(lambda m, x: m(x), model, x)

  def test_registry_errors_and_options(self):
    with self.assertRaisesRegex(ValueError, "name must be one of"):
      models.build_model("resnet18", rngs=nnx.Rngs(0))
    model = nnx.eval_shape(
        lambda: models.build_model("ResNet20", shortcut="A", rngs=nnx.Rngs(0))
    )
    self.assertEqual(models.count_params(model), 269_722)
    with self.assertRaisesRegex(ValueError, "batch_size must be"):
      models.activation_shapes(model, batch_size=0)


if __name__ == "__main__":
  absltest.main()

"""Tests for the jitted training and evaluation steps (pruning_jax.train)."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from pruning_jax import dnr as dnr_lib
from pruning_jax import masks as masks_lib
from pruning_jax import models
from pruning_jax import optim
from pruning_jax import pipeline
from pruning_jax import train

_MEAN, _STD = (0.5,), (0.25,)


class _TinyBN(nnx.Module):
  """conv 3x3 -> BatchNorm -> ReLU -> dense, with the models' call signature."""

  def __init__(self, rngs):
    self.input_shape = (4, 4, 1)
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.head = nnx.Linear(64, 3, rngs=rngs)

  def __call__(self, x, *, train=False, return_activations=False):
    h = jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))
    logits = self.head(h.reshape(h.shape[0], -1))
    return (logits, {"conv.relu": h}) if return_activations else logits


def _mlp(seed=0):
  return models.MLP((8,), num_classes=3, input_shape=(4, 4, 1), rngs=nnx.Rngs(seed))


def _batch(seed, b=16):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (b, 4, 4, 1), dtype=np.uint8),
          "label": rng.integers(0, 3, b).astype(np.int32)}


def _setup(model, config=None, prune_fraction=0.5, seed=0, track_dnr=True, augment=False):
  """(step_fn, state, graphdef) with a random fraction of every kernel pruned."""
  config = config or train.TrainConfig(optimizer="sgd", learning_rate=0.05, warmup_steps=0,
                                       decay_epochs=(), batch_size=16, augment=augment)
  graphdef, params, batch_stats = train.split_model(model)
  rng = np.random.default_rng(seed)
  masks = jax.tree.map(lambda m: jnp.asarray(rng.random(m.shape) >= prune_fraction),
                       masks_lib.init_masks(params))
  optimizer = train.make_optimizer(config, masks)
  schedule = train.learning_rate_schedule(config, steps_per_epoch=10)
  step = train.make_train_step(graphdef, optimizer, schedule, mean=_MEAN, std=_STD,
                               augment=config.augment, pad=1, track_dnr=track_dnr)
  state = train.init_train_state(params, batch_stats, masks, optimizer,
                                 models.activation_shapes(model), jax.random.key(seed))
  return step, state, graphdef


def _leaves_at(tree, masks, pruned):
  out = []
  for p, m in zip(jax.tree.leaves(tree), jax.tree.leaves(masks)):
    out.append(np.asarray(p)[~np.asarray(m) if pruned else np.asarray(m)])
  return out


def _kernels(params, masks):
  is_none = lambda x: x is None
  return [p for p, m in zip(jax.tree.leaves(params, is_leaf=is_none),
                            jax.tree.leaves(masks, is_leaf=is_none)) if m is not None]


class RecalibrationTest(absltest.TestCase):

  def test_batch_statistics_are_the_batch_mean_and_variance(self):
    model = _TinyBN(nnx.Rngs(0))
    graphdef, params, batch_stats = train.split_model(model)
    images = _batch(1, b=32)["image"]
    fn = jax.jit(functools.partial(train.batch_statistics, graphdef=graphdef, mean=_MEAN,
                                   std=_STD))
    stats = fn(params, batch_stats, jnp.asarray(images))
    conv_out = model.conv(pipeline.normalize(jnp.asarray(images), _MEAN, _STD))
    np.testing.assert_allclose(stats["bn"]["mean"][...], conv_out.mean((0, 1, 2)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["bn"]["var"][...], conv_out.var((0, 1, 2)),
                               rtol=1e-4, atol=1e-6)

  def test_recalibration_averages_batches_and_skips_models_without_bn(self):
    model = _TinyBN(nnx.Rngs(0))
    graphdef, params, batch_stats = train.split_model(model)
    images = np.concatenate([_batch(1, b=16)["image"], _batch(2, b=16)["image"]])
    fn = jax.jit(functools.partial(train.batch_statistics, graphdef=graphdef, mean=_MEAN,
                                   std=_STD))
    recal = train.recalibrate_batch_stats(fn, params, batch_stats, images, batch_size=16,
                                          num_batches=5)
    halves = [fn(params, batch_stats, jnp.asarray(images[i:i + 16])) for i in (0, 16)]
    expected = jax.tree.map(lambda a, b: (a + b) / 2, *halves)
    chex.assert_trees_all_close(recal, expected, rtol=1e-6)
    _, mlp_params, mlp_stats = train.split_model(_mlp())
    self.assertIs(train.recalibrate_batch_stats(fn, mlp_params, mlp_stats, images,
                                                batch_size=16, num_batches=1), mlp_stats)
    with self.assertRaisesRegex(ValueError, "at least one batch of batch_size=64"):
      train.recalibrate_batch_stats(fn, params, batch_stats, images, batch_size=64,
                                    num_batches=1)


class ScheduleTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_warmup_then_absolute_decays(self):
    config = train.TrainConfig(learning_rate=0.1, warmup_steps=4, decay_epochs=(2, 3))
    schedule = self.variant(train.learning_rate_schedule(config, steps_per_epoch=5))
    # Hand-computed: 0.1 * (s + 1) / 4 while warming up, 0.1 after; from step 10
    # (epoch 2) 0.1 * 0.1, from step 15 (epoch 3) 0.1 * 0.01, whatever the warm-up.
    golden = {0: 0.025, 1: 0.05, 3: 0.1, 9: 0.1, 10: 0.01, 14: 0.01, 15: 0.001, 99: 0.001}
    for step, lr in golden.items():
      np.testing.assert_allclose(schedule(jnp.int32(step)), lr, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_constant_without_warmup_or_decay(self):
    schedule = self.variant(train.learning_rate_schedule(train.lottery_config("conv4"), 7))
    for step in (0, 5, 1000):
      np.testing.assert_allclose(schedule(jnp.int32(step)), 3e-4, rtol=1e-6)


class ConfigTest(parameterized.TestCase):

  @parameterized.parameters(
      ("optimizer", "rmsprop"), ("learning_rate", 0.0), ("momentum", 1.0),
      ("weight_decay", -1.0), ("decay_factor", 0.0), ("warmup_steps", -1), ("pad", 1.5),
      ("epochs", 0), ("batch_size", 0), ("decay_epochs", (3, 2)), ("decay_epochs", (0,)))
  def test_bad_field_is_named(self, field, value):
    with self.assertRaisesRegex(ValueError, field):
      train.TrainConfig(**{field: value})

  def test_lottery_settings(self):
    config = train.lottery_config("lenet300100", epochs=3)
    self.assertEqual((config.optimizer, config.learning_rate, config.batch_size,
                      config.epochs, config.weight_decay), ("adam", 1.2e-3, 60, 3, 0.0))
    with self.assertRaisesRegex(ValueError, "model_name must be one of"):
      train.lottery_config("resnet20")

  def test_bad_steps_per_epoch(self):
    with self.assertRaisesRegex(ValueError, "steps_per_epoch must be an int >= 1, got 0"):
      train.learning_rate_schedule(train.TrainConfig(), 0)

  def test_bad_mesh_requests(self):
    with self.assertRaisesRegex(ValueError, r"num_devices must be an int in \[1, 8\]"):
      train.make_mesh(9)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("batch",))
    with self.assertRaisesRegex(ValueError, "'data' axis"):
      train.batch_sharding(mesh)


class OptimizerTest(absltest.TestCase):

  def test_sgd_matches_pytorch_convention(self):
    config = train.TrainConfig(optimizer="sgd", momentum=0.9, weight_decay=0.1)
    params = {"w": {"kernel": jnp.array([[1.0, 2.0]])}}
    masks = {"w": {"kernel": jnp.array([[True, False]])}}
    tx = train.make_optimizer(config, masks)
    state = tx.init(params)
    grads = {"w": {"kernel": jnp.array([[0.5, 0.5]])}}
    # PyTorch SGD: d = g + wd * w, buf = 0.9 * buf + d, w -= lr * buf (lr 0.1).
    # Step 1: d = 0.5 + 0.1 = 0.6, buf = 0.6, w = 1 - 0.06 = 0.94.
    # Step 2: d = 0.5 + 0.094 = 0.594, buf = 0.54 + 0.594 = 1.134.
    d1, state = tx.update(grads, state, params)
    np.testing.assert_allclose(d1["w"]["kernel"], [[0.6, 0.0]], rtol=1e-6)
    params = jax.tree.map(lambda p, d: p - 0.1 * d, params, d1)
    d2, _ = tx.update(grads, state, params)
    np.testing.assert_allclose(d2["w"]["kernel"], [[1.134, 0.0]], rtol=1e-6)


class TrainStepTest(parameterized.TestCase):

  def test_pruned_weights_stay_exactly_zero(self):
    step, state, _ = _setup(_mlp())
    masks = optim.get_masks(state.opt_state)
    before = _leaves_at(_kernels(state.params, masks), masks, pruned=False)
    fn = jax.jit(step)
    for i in range(4):
      state, _ = fn(state, _batch(i))
    kernels = _kernels(state.params, masks)
    for pruned in _leaves_at(kernels, masks, pruned=True):
      self.assertGreater(pruned.size, 0)
      np.testing.assert_array_equal(pruned, 0.0)
    for old, new in zip(before, _leaves_at(kernels, masks, pruned=False)):
      self.assertGreater(np.abs(new - old).max(), 0.0)
    self.assertEqual(int(state.step), 4)

  def test_dnr_and_batch_stats_come_from_the_same_forward_pass(self):
    model = _TinyBN(nnx.Rngs(0))
    step, state, graphdef = _setup(model)
    batch = _batch(1)
    x = (jnp.asarray(batch["image"], jnp.float32) / 255.0 - 0.5) / 0.25
    reference = nnx.merge(graphdef, state.params, state.batch_stats, copy=True)
    _, acts = reference(x, train=True, return_activations=True)
    expected_dnr = dnr_lib.dnr_update(state.dnr, acts)
    expected_stats = nnx.state(reference, nnx.BatchStat)
    new, metrics = jax.jit(step)(state, batch)
    chex.assert_trees_all_close(new.dnr, expected_dnr, rtol=1e-6)
    # The running means sit near 0 (e.g. 7e-5) while their summands are ~1e-2, so jitted
    # and eager reductions may differ by float32 rounding of the summands (~1e-10); a
    # second forward pass on other data would differ by ~1e-4.
    chex.assert_trees_all_close(new.batch_stats, expected_stats, rtol=1e-6, atol=1e-9)
    self.assertFalse(np.allclose(jax.tree.leaves(new.batch_stats)[0],
                                 jax.tree.leaves(state.batch_stats)[0]))
    np.testing.assert_allclose(new.totals["count"], 16.0)
    np.testing.assert_allclose(new.totals["loss"], 16.0 * metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(new.totals["correct"], 16.0 * metrics["accuracy"], rtol=1e-6)

  def test_without_dnr_tracking_training_is_unchanged(self):
    step_on, state, _ = _setup(_mlp())
    step_off, state_off, _ = _setup(_mlp(), track_dnr=False)
    on, _ = jax.jit(step_on)(state, _batch(2))
    off, _ = jax.jit(step_off)(state_off, _batch(2))
    chex.assert_trees_all_close(on.params, off.params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_equal(off.dnr, state_off.dnr)
    self.assertGreater(float(on.dnr.count["fc1.relu"]), 0.0)

  def test_augmentation_key_follows_the_step(self):
    for augment in (False, True):
      step, state, _ = _setup(_mlp(), augment=augment)
      fn = jax.jit(step)
      a, _ = fn(state, _batch(3))
      b, _ = fn(state._replace(step=jnp.int32(7)), _batch(3))
      again, _ = fn(state, _batch(3))
      chex.assert_trees_all_equal(a.params, again.params)
      same = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.params),
                                                       jax.tree.leaves(b.params)))
      # The schedule is constant, so only the augmentation can tell the steps apart.
      self.assertEqual(same, not augment)

  def test_new_masks_and_schedule_steps_reuse_one_compilation(self):
    config = train.TrainConfig(learning_rate=0.1, warmup_steps=3, decay_epochs=(1,),
                               batch_size=16, augment=False)
    step, state, _ = _setup(_mlp(), config=config)
    fn = jax.jit(chex.assert_max_traces(lambda state, batch: step(state, batch), n=1))
    rates = []
    for i in range(3):
      state, metrics = fn(state, _batch(i))
      rates.append(float(metrics["learning_rate"]))
    masks = jax.tree.map(lambda m: m.at[0].set(False), optim.get_masks(state.opt_state))
    state = state._replace(step=jnp.int32(10), opt_state=optim.set_masks(state.opt_state,
                                                                         masks))
    state, metrics = fn(state, _batch(3))
    np.testing.assert_allclose(rates + [float(metrics["learning_rate"])],
                               [0.1 / 3, 0.2 / 3, 0.1, 0.01], rtol=1e-6)

  def test_reset_epoch_and_summary(self):
    step, state, _ = _setup(_mlp())
    state, _ = jax.jit(step)(state, _batch(0))
    summary = train.summarize(state.totals, state.dnr)
    self.assertBetween(float(summary["dnr"]), 0.0, 1.0)
    fresh = train.reset_epoch(state)
    chex.assert_trees_all_equal(fresh.totals, {k: jnp.float32(0) for k in fresh.totals})
    chex.assert_trees_all_equal(fresh.dnr, jax.tree.map(jnp.zeros_like, state.dnr))
    self.assertTrue(np.isnan(train.summarize(fresh.totals, fresh.dnr)["accuracy"]))
    chex.assert_trees_all_equal(fresh.params, state.params)

  def test_vmapped_members_match_single_runs(self):
    runs = [_setup(_mlp(seed), seed=seed) for seed in (0, 1)]
    mesh = train.make_mesh(1)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[s for _, s, _ in runs])
    both, _ = train.jit_train_step(runs[0][0], mesh, members=True)(stacked, _batch(4))
    single = jax.jit(runs[0][0])  # the programs of both runs are the same
    for i, (_, state, _) in enumerate(runs):
      alone, _ = single(state, _batch(4))
      chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], both.params), alone.params,
                                  rtol=1e-6, atol=1e-7)


class EvalStepTest(absltest.TestCase):

  def _eval(self, graphdef, state, images, labels, batch_size):
    fn = jax.jit(train.make_eval_step(graphdef, mean=_MEAN, std=_STD))
    acc = train.init_eval_state(models.activation_shapes(_TinyBN(nnx.Rngs(0))))
    for batch in pipeline.eval_batches(images, labels, batch_size):
      acc = fn(state.params, state.batch_stats, batch, acc)
    return train.summarize(acc.totals, acc.dnr)

  def test_padding_is_ignored_and_batch_norm_uses_running_stats(self):
    step, state, graphdef = _setup(_TinyBN(nnx.Rngs(0)))
    state, _ = jax.jit(step)(state, _batch(0))
    data = _batch(5, b=10)
    padded = self._eval(graphdef, state, data["image"], data["label"], 4)  # 2 pad rows
    whole = self._eval(graphdef, state, data["image"], data["label"], 10)
    chex.assert_trees_all_close(padded, whole, rtol=1e-5)
    self.assertEqual(float(padded["count"]), 10.0)
    # Running statistics make each sample's prediction independent of its batch.
    single = self._eval(graphdef, state, data["image"][:1], data["label"][:1], 1)
    first = self._eval(graphdef, state, data["image"][:1], data["label"][:1], 4)
    np.testing.assert_allclose(single["loss"], first["loss"], rtol=1e-6)


class ShardingTest(parameterized.TestCase):

  @parameterized.parameters("mlp", "bn")
  def test_eight_devices_match_one(self, kind):
    def run(n):
      model = _mlp() if kind == "mlp" else _TinyBN(nnx.Rngs(0))
      step, state, _ = _setup(model)
      mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("data",))
      fn = train.jit_train_step(step, mesh)
      for i in range(3):
        state, _ = fn(jax.device_put(state, train.replicated(mesh)) if i == 0 else state,
                      _batch(i))
      return state

    one, eight = run(1), run(8)
    self.assertEqual(len(eight.params["head"]["kernel"].sharding.device_set), 8)
    self.assertTrue(eight.params["head"]["kernel"].sharding.is_fully_replicated)
    chex.assert_trees_all_equal(optim.get_masks(one.opt_state),
                                optim.get_masks(eight.opt_state))
    # Batch reductions are summed in another order over 8 shards: float32 rounding only.
    chex.assert_trees_all_close(one.params, eight.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(one.batch_stats, eight.batch_stats, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(one.dnr, eight.dnr, rtol=1e-6)
    masks = optim.get_masks(eight.opt_state)
    for pruned in _leaves_at(_kernels(eight.params, masks), masks, pruned=True):
      np.testing.assert_array_equal(pruned, 0.0)


if __name__ == "__main__":
  absltest.main()

"""Tests for the dynamic dead neuron rate (pruning_jax.dnr)."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from pruning_jax import dnr
from pruning_jax import models


def _numpy_model(builder, **kwargs):
  """Builds a dense/conv model without compiling PRNG initialisers.

  Kernels are He-scaled normal draws from numpy, biases zero: the models used
  here hold nothing else.
  """
  abstract = nnx.eval_shape(lambda: builder(rngs=nnx.Rngs(0), **kwargs))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    if path[-2].key == "kernel":
      fan_in = np.prod(leaf.shape[:-1])
      return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2 / fan_in), leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _golden_acts():
  """Two samples, a conv layer [2, 2, 2, 2] and a dense layer [2, 4].

  conv, sample 0: channel 0 all zero, channel 1 = [[1, 0], [2, 3]].
  conv, sample 1: channel 0 = [[0, 5], [0, 6]], channel 1 all ones.
  fc: sample 0 = [0, 1, 0, 2], sample 1 all zero.
  """
  conv = np.zeros((2, 2, 2, 2), np.float32)
  conv[0, :, :, 1] = [[1, 0], [2, 3]]
  conv[1, :, :, 0] = [[0, 5], [0, 6]]
  conv[1, :, :, 1] = 1
  fc = np.array([[0, 1, 0, 2], [0, 0, 0, 0]], np.float32)
  return {"conv": jnp.asarray(conv), "fc": jnp.asarray(fc)}


# Hand-computed from _golden_acts:
# conv element: sample 0 has 4 + 1 = 5 zeros of 8, sample 1 has 2 of 8;
#   mean (5/8 + 2/8) / 2 = 0.4375.
# conv channel: sample 0 has 1 dead channel of 2, sample 1 none; mean 0.25.
# fc element = channel: 2/4 and 4/4, mean 0.75.
# network element per sample: (5 + 2) / 12 and (2 + 4) / 12, mean 13/24,
#   not the unweighted layer mean (0.4375 + 0.75) / 2 = 0.59375.
# network channel per sample (2 conv channels + 4 fc units): (1 + 2) / 6 and
#   (0 + 4) / 6, mean 7/12.
# static: conv units (h, w, c=0) at w=0 never fire -> 2 of 8 = 0.25, every
#   conv channel fires -> 0; fc units 0 and 2 never fire -> 0.5;
#   network (2 + 2) / 12 = 1/3, channel (0 + 2) / 6 = 1/3.
GOLDEN = {
    "dnr": 13 / 24,
    "dnr_channel": 7 / 12,
    "dnr_static": 1 / 3,
    "dnr_static_channel": 1 / 3,
    "dnr/conv": 0.4375,
    "dnr_channel/conv": 0.25,
    "dnr_static/conv": 0.25,
    "dnr_static_channel/conv": 0.0,
    "dnr/fc": 0.75,
    "dnr_channel/fc": 0.75,
    "dnr_static/fc": 0.5,
    "dnr_static_channel/fc": 0.5,
}


def _assert_summary(summary, expected):
  chex.assert_trees_all_close(
      {k: summary[k] for k in expected},
      {k: np.float32(v) for k, v in expected.items()},
      rtol=1e-6,
  )


class DnrBatchTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_golden_values(self):
    out = self.variant(dnr.dynamic_dead_neuron_rate)(_golden_acts())
    chex.assert_trees_all_close(
        (out.dnr, out.dnr_channel, out.per_sample),
        (np.float32(13 / 24), np.float32(7 / 12),
         np.array([7 / 12, 6 / 12], np.float32)),
        rtol=1e-6,
    )
    chex.assert_trees_all_close(
        out.layer_dnr, {"conv": np.float32(0.4375), "fc": np.float32(0.75)}
    )
    chex.assert_trees_all_close(
        out.layer_dnr_channel, {"conv": np.float32(0.25), "fc": np.float32(0.75)}
    )
    np.testing.assert_array_equal(
        out.fired["conv"][:, :, 0], [[False, True], [False, True]]
    )
    np.testing.assert_array_equal(out.fired["conv"][:, :, 1], np.ones((2, 2)))
    np.testing.assert_array_equal(out.fired_channel["conv"], [True, True])
    np.testing.assert_array_equal(out.fired["fc"], [False, True, False, True])
    np.testing.assert_array_equal(out.fired_channel["fc"], out.fired["fc"])
    self.assertEqual(out.dnr.dtype, jnp.float32)

  def test_network_rate_is_weighted_by_unit_count(self):
    out = dnr.dynamic_dead_neuron_rate(_golden_acts())
    unweighted = (out.layer_dnr["conv"] + out.layer_dnr["fc"]) / 2
    # 8 conv units and 4 fc units per sample.
    by_units = (8 * out.layer_dnr["conv"] + 4 * out.layer_dnr["fc"]) / 12
    np.testing.assert_allclose(out.dnr, by_units, rtol=1e-6)
    self.assertGreater(abs(float(out.dnr - unweighted)), 0.05)

  @chex.variants(with_jit=True, without_jit=True)
  def test_exact_zero_only(self):
    # -0.0 compares equal to 0; the smallest positive normal float32 is a live
    # unit. (Subnormals are not used: XLA on CPU flushes them to zero.)
    tiny = np.finfo(np.float32).tiny
    acts = {"fc": jnp.array([[-0.0, tiny, 0.0, 2.0]], jnp.float32)}
    out = self.variant(dnr.dynamic_dead_neuron_rate)(acts)
    np.testing.assert_allclose(out.dnr, 0.5)
    np.testing.assert_array_equal(out.fired["fc"], [False, True, False, True])

  @chex.variants(with_jit=True, without_jit=True)
  def test_token_layer_channel_rate_equals_element_rate(self):
    # [b=1, t=2, f=2] with 3 zeros of 4.
    acts = {"tok": jnp.array([[[0.0, 0.0], [0.0, 1.0]]])}
    out = self.variant(dnr.dynamic_dead_neuron_rate)(acts)
    np.testing.assert_allclose(out.layer_dnr["tok"], 0.75)
    np.testing.assert_allclose(out.layer_dnr_channel["tok"], 0.75)
    chex.assert_shape(out.fired_channel["tok"], (2, 2))

  @chex.variants(with_jit=True, without_jit=True)
  def test_zero_weight_masks_padding(self):
    acts = _golden_acts()
    # A padding sample that fires everywhere and one that is all zero.
    padded = {
        k: jnp.concatenate([v, jnp.ones_like(v[:1]), jnp.zeros_like(v[:1])])
        for k, v in acts.items()
    }
    weights = jnp.array([1.0, 1.0, 0.0, 0.0])
    out = self.variant(dnr.dynamic_dead_neuron_rate)(padded, weights)
    ref = dnr.dynamic_dead_neuron_rate(acts)
    chex.assert_trees_all_close(
        (out.dnr, out.dnr_channel, out.layer_dnr, out.layer_dnr_channel),
        (ref.dnr, ref.dnr_channel, ref.layer_dnr, ref.layer_dnr_channel),
        rtol=1e-6,
    )
    chex.assert_trees_all_equal(
        (out.fired, out.fired_channel), (ref.fired, ref.fired_channel)
    )

  def test_fractional_weights_equal_repetition(self):
    acts = _golden_acts()
    batch = jax.jit(dnr.dynamic_dead_neuron_rate)
    weighted = batch(acts, jnp.array([2.0, 1.0]))
    repeated = batch({k: v[jnp.array([0, 0, 1])] for k, v in acts.items()})
    chex.assert_trees_all_close(
        (weighted.dnr, weighted.dnr_channel, weighted.layer_dnr),
        (repeated.dnr, repeated.dnr_channel, repeated.layer_dnr),
        rtol=1e-6,
    )

  def test_no_positive_weight_gives_nan(self):
    out = dnr.dynamic_dead_neuron_rate(_golden_acts(), jnp.zeros((2,)))
    self.assertTrue(bool(jnp.isnan(out.dnr)))
    self.assertTrue(bool(jnp.isnan(out.layer_dnr_channel["conv"])))
    self.assertFalse(bool(jnp.any(out.fired["conv"])))

  @parameterized.named_parameters(
      ("not_a_mapping", [jnp.zeros((2, 3))], "non-empty mapping"),
      ("empty", {}, "non-empty mapping"),
      ("rank1", {"a": jnp.zeros((3,))}, r"acts\['a'\] must have rank"),
      ("rank5", {"a": jnp.zeros((1, 1, 1, 1, 1))}, r"acts\['a'\] must have rank"),
      (
          "batch_mismatch",
          {"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))},
          "batch size 3",
      ),
  )
  def test_bad_acts_raise(self, acts, message):
    with self.assertRaisesRegex(ValueError, message):
      dnr.dynamic_dead_neuron_rate(acts)

  @parameterized.named_parameters(
      ("wrong_length", jnp.ones((3,))),
      ("two_dims", jnp.ones((2, 1))),
  )
  def test_bad_weights_raise(self, weights):
    with self.assertRaisesRegex(ValueError, r"weights must have shape \(b,\) = \(2,\)"):
      jax.jit(dnr.dynamic_dead_neuron_rate)(_golden_acts(), weights)


class DnrStateTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_summary_golden_values(self):
    acts = _golden_acts()
    state = self.variant(dnr.dnr_update)(dnr.dnr_init(acts), acts)
    _assert_summary(self.variant(dnr.dnr_summary)(state), GOLDEN)
    self.assertLen(dnr.dnr_summary(state), len(GOLDEN))

  def test_init_from_shapes_matches_init_from_arrays(self):
    acts = _golden_acts()
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), acts)
    chex.assert_trees_all_equal(dnr.dnr_init(shapes), dnr.dnr_init(acts))
    state = dnr.dnr_init(shapes)
    chex.assert_shape(state.fired["conv"], (2, 2, 2))
    chex.assert_shape(state.fired_channel["conv"], (2,))
    chex.assert_shape(state.fired_channel["fc"], (4,))

  @chex.variants(with_jit=True, without_jit=True)
  def test_two_updates_equal_one_on_concatenation(self):
    rng = np.random.default_rng(0)
    def relu(shape, shift=0.0):
      # Roughly half (or, shifted, most) of the entries are exact zeros.
      return jnp.asarray(np.maximum(rng.normal(size=shape) - shift, 0), jnp.float32)

    def batch(b):
      return {"conv": relu((b, 3, 3, 4)), "tok": relu((b, 2, 5)),
              "fc": relu((b, 6), shift=1.0)}
    first, second = batch(3), batch(2)
    update = self.variant(dnr.dnr_update)
    state = dnr.dnr_init(first)
    two = update(update(state, first), second)
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, second)
    one = update(state, both)
    summary = jax.jit(dnr.dnr_summary)
    chex.assert_trees_all_close(summary(two), summary(one), rtol=1e-6)
    chex.assert_trees_all_equal((two.fired, two.fired_channel),
                                (one.fired, one.fired_channel))
    np.testing.assert_allclose(two.count["fc"], 5.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_update_weights_mask_padding(self):
    acts = _golden_acts()
    padded = {k: jnp.concatenate([v, jnp.ones_like(v[:1])]) for k, v in acts.items()}
    update = self.variant(dnr.dnr_update)
    masked = update(dnr.dnr_init(acts), padded, jnp.array([1.0, 1.0, 0.0]))
    _assert_summary(dnr.dnr_summary(masked), GOLDEN)
    np.testing.assert_allclose(masked.count["conv"], 2.0)

  def test_empty_state_summary_is_nan(self):
    summary = dnr.dnr_summary(dnr.dnr_init(_golden_acts()))
    self.assertTrue(all(bool(jnp.isnan(v)) for v in summary.values()))

  def test_update_traces_once_across_batches_and_weights(self):
    acts = _golden_acts()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, batch, weights):
      return dnr.dnr_update(state, batch, weights)

    state = dnr.dnr_init(acts)
    for w in ([1.0, 1.0], [1.0, 0.0], [0.5, 2.0]):
      state = step(state, acts, jnp.asarray(w))
    np.testing.assert_allclose(state.count["fc"], 5.5)

  @parameterized.named_parameters(
      ("missing_layer", {"fc": jnp.zeros((2, 4))}, "acts has layers"),
      (
          "extra_layer",
          {"conv": jnp.zeros((2, 2, 2, 2)), "fc": jnp.zeros((2, 4)),
           "x": jnp.zeros((2, 1))},
          "acts has layers",
      ),
      (
          "shape",
          {"conv": jnp.zeros((2, 2, 2, 3)), "fc": jnp.zeros((2, 4))},
          r"acts\['conv'\] has per-sample shape \(2, 2, 3\)",
      ),
  )
  def test_update_mismatch_raises(self, acts, message):
    state = dnr.dnr_init(_golden_acts())
    with self.assertRaisesRegex(ValueError, message):
      dnr.dnr_update(state, acts)

  def test_bad_init_and_summary_raise(self):
    with self.assertRaisesRegex(ValueError, "acts_shapes_or_example must be"):
      dnr.dnr_init({})
    with self.assertRaisesRegex(ValueError, r"acts_shapes_or_example\['a'\]"):
      dnr.dnr_init({"a": jax.ShapeDtypeStruct((4,), jnp.float32)})
    with self.assertRaisesRegex(ValueError, "at least one layer"):
      dnr.dnr_summary(dnr.DNRState({}, {}, {}, {}, {}))


class DnrModelTest(chex.TestCase):

  def test_dead_last_hidden_layer(self):
    model = _numpy_model(models.MLP, hidden=(6, 5), input_shape=(2, 2, 1),
                         num_classes=3)
    # Pre-activations are bounded by |x| * |W|, far below 1e4.
    model.hidden[1].bias[...] = jnp.full((5,), -1e4)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 2, 2, 1)), jnp.float32)

    @nnx.jit
    def loss_and_dnr(m, inputs):
      def loss(m):
        logits, acts = m(inputs, return_activations=True)
        return jnp.sum(logits), acts
      (_, acts), grads = nnx.value_and_grad(loss, has_aux=True)(m)
      state = dnr.dnr_update(dnr.dnr_init(acts), acts)
      return dnr.dnr_summary(state), grads

    summary, grads = loss_and_dnr(model, x)
    np.testing.assert_array_equal(summary["dnr/fc2.relu"], 1.0)
    np.testing.assert_array_equal(summary["dnr_static/fc2.relu"], 1.0)
    self.assertLess(float(summary["dnr/fc1.relu"]), 1.0)
    # A fully dead layer passes no gradient to anything below it.
    np.testing.assert_array_equal(grads.hidden[0].kernel[...], 0.0)
    np.testing.assert_array_equal(grads.hidden[1].kernel[...], 0.0)
    np.testing.assert_array_equal(grads.head.bias[...], 4.0)  # d sum / d bias = b

  def test_model_dnr_matches_numpy(self):
    model = _numpy_model(models.ConvNet, stages=((3, 2), (4,)), dense=(5,),
                         input_shape=(4, 4, 1))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 4, 1)), jnp.float32)
    state = dnr.dnr_init(models.activation_shapes(model, batch_size=2))

    @nnx.jit
    def step(m, state, inputs):
      _, acts = m(inputs, return_activations=True)
      return dnr.dnr_update(state, acts, jnp.ones((2,))), acts

    state, acts = step(model, state, x)
    summary = dnr.dnr_summary(state)
    self.assertEqual(tuple(acts), model.relu_names)  # 3 conv + 1 dense
    zeros = sum(int(np.sum(np.asarray(a) == 0)) for a in acts.values())
    units = sum(int(np.prod(a.shape)) for a in acts.values())
    np.testing.assert_allclose(summary["dnr"], zeros / units, rtol=1e-6)
    for name, act in acts.items():
      np.testing.assert_allclose(
          summary[f"dnr/{name}"], np.mean(np.asarray(act) == 0), rtol=1e-6
      )


class DnrThresholdTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_threshold_zero_on_relu_outputs_counts_exact_zeros(self):
    acts = {"a": jnp.array([[0.0, -0.0, 1.0, 2.0], [0.0, 3.0, 0.0, 0.0]])}
    out = self.variant(dnr.dynamic_dead_neuron_rate)(acts)
    # Sample 0: 2 of 4 dead (-0.0 counts); sample 1: 3 of 4.
    self.assertAlmostEqual(float(out.dnr), (0.5 + 0.75) / 2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gelu_outputs_dead_where_the_preactivation_is_not_positive(self):
    pre = jnp.array([[-3.0, -0.5, 0.0, 0.25, 2.0]])
    gelu = jax.nn.gelu(pre, approximate=False)
    fn = self.variant(lambda a: dnr.dynamic_dead_neuron_rate(a, threshold=0.0))
    # GELU is negative below 0 and exactly 0 at 0: three of five are dead.
    self.assertAlmostEqual(float(fn({"g": gelu}).dnr), 3 / 5)
    # Exact zeros alone (the ReLU reading) would find only one.
    self.assertEqual(int(jnp.sum(gelu == 0)), 1)

  @chex.variants(with_jit=True, without_jit=True)
  def test_positive_threshold_counts_near_silent_units(self):
    acts = {"a": jnp.array([[0.0, 0.005, 0.02, 1.0]])}
    fn = self.variant(lambda a: dnr.dynamic_dead_neuron_rate(a, threshold=0.01))
    self.assertAlmostEqual(float(fn(acts).dnr), 0.5)

  def test_update_threshold_matches_batch_threshold(self):
    acts = {"a": jax.nn.gelu(jax.random.normal(jax.random.key(0), (16, 8)))}
    state = dnr.dnr_update(dnr.dnr_init(acts), acts, threshold=0.0)
    summary = dnr.dnr_summary(state)
    batch = dnr.dynamic_dead_neuron_rate(acts, threshold=0.0)
    np.testing.assert_allclose(summary["dnr"], batch.dnr, rtol=1e-6)
    self.assertGreater(float(batch.dnr), 0.2)


if __name__ == "__main__":
  absltest.main()

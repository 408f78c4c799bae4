"""Sharded SAE training on 8 simulated devices matches a single device."""

import functools

import jax
import numpy as np
from absl.testing import parameterized
from jax.sharding import PartitionSpec as P

from sae_jax import model
from sae_jax.data import synthetic
from sae_jax.training import sharding
from sae_jax.training import train_state


# One compiled forward per configuration and mesh, reused across steps.
_forward = jax.jit(lambda p, x, cfg, mesh: model.forward(p, x, cfg, mesh=mesh),
                   static_argnums=(2, 3))


def _run(mesh, allocation, steps=3):
  scfg = synthetic.SyntheticConfig(d_model=16, num_features=48, mean_active=3.0)
  dirs, probs = synthetic.ground_truth(jax.random.key(0), scfg)
  cfg = model.SAEConfig(d_model=16, d_sae=64, allocation=allocation, k=4)
  tcfg = train_state.TrainConfig(learning_rate=3e-3, warmup_steps=1, total_steps=20,
                                 aux_loss="aux_zipf" if allocation == "mutual_choice" else "none")
  sample = synthetic.sample_batch(jax.random.key(5), dirs, probs, 256, scfg.noise_std)
  state = sharding.init_sharded_state(jax.random.key(2), cfg, tcfg, mesh, sample)
  step = sharding.jit_sharded_step(cfg, tcfg, mesh, jax.eval_shape(lambda: state))
  masks = []
  for i in range(steps):
    x = synthetic.sample_batch(jax.random.fold_in(jax.random.key(1), i), dirs, probs, 64,
                               scfg.noise_std)
    x = jax.device_put(x, sharding.batch_sharding(mesh))
    masks.append(np.asarray(_forward(state.params, x, cfg, mesh).mask))
    state, _ = step(state, x)
  return state, masks


@functools.lru_cache(maxsize=None)
def _single_device(allocation):
  return _run(sharding.make_mesh(1, 1), allocation)


class ShardedTrainingTest(parameterized.TestCase):

  # Every allocation on every mesh shape is checked against the dense step in
  # sharded_step_test; these two go through init_sharded_state and fit-sized batches.
  @parameterized.parameters(("mutual_choice", (8, 1)), ("feature_choice_zipf", (2, 4)))
  def test_eight_devices_match_one(self, allocation, mesh_shape):
    one, masks_one = _single_device(allocation)
    many, masks_many = _run(sharding.make_mesh(*mesh_shape), allocation)
    for m1, m8 in zip(masks_one, masks_many):
      np.testing.assert_array_equal(m1, m8)
    # Summation order differs across devices (psum of partial matmuls), so parameters
    # agree to float32 rounding, not bitwise.
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(many.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

  def test_state_is_sharded_as_designed(self):
    mesh = sharding.make_mesh(4, 2)
    state, _ = _run(mesh, "topk", steps=1)
    self.assertEqual(state.params.W_enc.sharding.spec, P(None, "model"))
    self.assertEqual(state.params.W_dec.sharding.spec, P("model", None))
    self.assertEqual(state.usage.density_ema.sharding.spec, P("model"))
    self.assertEqual(state.params.W_enc.addressable_shards[0].data.shape, (16, 32))

  def test_bad_mesh(self):
    with self.assertRaisesRegex(ValueError, "n_model"):
      sharding.make_mesh(1, 3)


class StepChoiceTest(parameterized.TestCase):

  def _step_and_state(self, mesh, allocation, sparse=None):
    cfg, tcfg = self._configs(allocation)
    state = sharding.init_sharded_state(jax.random.key(2), cfg, tcfg, mesh)
    return sharding.jit_sharded_step(cfg, tcfg, mesh, jax.eval_shape(lambda: state),
                                     sparse=sparse), state

  def test_same_settings_reuse_the_jitted_programs(self):
    mesh = sharding.make_mesh(1, 1)
    step_a, state = self._step_and_state(mesh, "topk")
    step_b, _ = self._step_and_state(mesh, "topk")
    self.assertIs(step_a, step_b)
    dense, _ = self._step_and_state(mesh, "topk", sparse=False)
    self.assertIsNot(dense, step_a)
    other, _ = self._step_and_state(sharding.make_mesh(2, 1), "topk")
    self.assertIsNot(other, step_a)
    # The reused function still trains a fresh state of the same settings.
    x = jax.device_put(jax.random.normal(jax.random.key(3), (64, 16)),
                       sharding.batch_sharding(mesh))
    first, _ = step_a(state, x)
    fresh = sharding.init_sharded_state(jax.random.key(2), *self._configs("topk"), mesh)
    second, _ = step_b(fresh, x)
    np.testing.assert_array_equal(np.asarray(first.params.W_enc),
                                  np.asarray(second.params.W_enc))

  def _configs(self, allocation):
    return (model.SAEConfig(d_model=16, d_sae=64, allocation=allocation, k=4),
            train_state.TrainConfig(learning_rate=3e-3, warmup_steps=1, total_steps=20))

  @parameterized.parameters("topk", "mutual_choice", "feature_choice", "feature_choice_zipf")
  def test_one_device_defaults_to_the_sparse_step(self, allocation):
    mesh = sharding.make_mesh(1, 1)
    step, state = self._step_and_state(mesh, allocation)
    x = jax.device_put(jax.random.normal(jax.random.key(3), (64, 16)),
                       sharding.batch_sharding(mesh))
    hlo = step.lower(state, x).as_text()
    dense_step, _ = self._step_and_state(mesh, allocation, sparse=False)
    # The sparse step never forms a [b, f] code matrix for the decoder: no dot with the
    # decoder's [f, d] operand appears, unlike in the dense step.
    self.assertNotIn("tensor<64x64xf32>, tensor<64x16xf32>", hlo)
    self.assertIn("tensor<64x64xf32>, tensor<64x16xf32>",
                  dense_step.lower(state, x).as_text())

  def test_meshes_of_several_devices_default_to_the_sparse_step(self):
    mesh = sharding.make_mesh(4, 2)
    # (Membership is asserted as a bool: a failure message must not print the module.)
    step, state = self._step_and_state(mesh, "mutual_choice")
    x = jax.device_put(jax.random.normal(jax.random.key(3), (64, 16)),
                       sharding.batch_sharding(mesh))
    self.assertTrue(sharding.uses_sparse_step(self._configs("mutual_choice")[0], mesh))
    # The dense step decodes a [b, f] code matrix (each device its block); the sparse
    # step never forms one.
    dense_step, _ = self._step_and_state(mesh, "mutual_choice", sparse=False)
    decode = "tensor<64x64xf32>, tensor<64x16xf32>"  # codes [b, f] @ W_dec [f, d]
    self.assertTrue(decode in dense_step.lower(state, x).as_text())
    self.assertFalse(decode in step.lower(state, x).as_text())

  def test_sparse_for_the_relu_baseline_is_refused(self):
    with self.assertRaisesRegex(ValueError, "sparse=True needs an allocation in"):
      self._step_and_state(sharding.make_mesh(4, 2), "relu", sparse=True)

"""Tests for the pure SAE training step on synthetic data."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from sae_jax import model
from sae_jax.data import synthetic
from sae_jax.training import dense_step
from sae_jax.training import train_state


def _setup(allocation, aux="none", k=4):
  scfg = synthetic.SyntheticConfig(d_model=16, num_features=48, mean_active=3.0)
  dirs, probs = synthetic.ground_truth(jax.random.key(0), scfg)
  cfg = model.SAEConfig(d_model=16, d_sae=64, allocation=allocation, k=k,
                        l1_coefficient=1e-2 if allocation == "relu" else 0.0)
  tcfg = train_state.TrainConfig(learning_rate=3e-3, warmup_steps=5, total_steps=60, aux_loss=aux,
                                 dead_after_tokens=256)

  def batch(i):
    return synthetic.sample_batch(jax.random.fold_in(jax.random.key(1), i), dirs, probs, 128,
                                  scfg.noise_std)

  state = train_state.init_train_state(jax.random.key(2), cfg, tcfg, batch(10_000))
  return cfg, tcfg, state, batch


class TrainStepTest(parameterized.TestCase):

  @parameterized.parameters(
      ("topk", "none"), ("topk", "aux_k"), ("mutual_choice", "aux_zipf"),
      ("feature_choice", "none"), ("feature_choice_zipf", "none"), ("relu", "none"))
  def test_loss_decreases_and_invariants_hold(self, allocation, aux):
    cfg, tcfg, state, batch = _setup(allocation, aux)
    step = jax.jit(chex.assert_max_traces(dense_step.train_step, n=1),
                   static_argnames=("cfg", "tcfg"))
    chex.clear_trace_counter()
    first = None
    for i in range(60):
      state, m = step(state, batch(i), cfg=cfg, tcfg=tcfg)
      if first is None:
        first = float(m["nmse"])
    last = float(m["nmse"])
    self.assertTrue(np.isfinite(last))
    self.assertLess(last, 0.7 * first)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(state.params.W_dec), axis=1), 1.0,
                               atol=1e-5)
    self.assertEqual(int(state.step), 60)
    if allocation in ("topk", "mutual_choice", "feature_choice", "feature_choice_zipf"):
      # Every budgeted strategy keeps exactly k * b entries; L0 counts the positive ones.
      self.assertLessEqual(float(m["l0"]), cfg.k + 1e-6)

  def test_aux_k_loss_active_only_with_dead_features(self):
    cfg, tcfg, state, batch = _setup("topk", "aux_k")
    state, m = dense_step.jit_train_step(state, batch(0), cfg=cfg, tcfg=tcfg)
    self.assertEqual(float(m["aux_loss"]), 0.0)  # nothing can be dead after one batch
    dead_usage = state.usage._replace(
        tokens_since_fired=jnp.full_like(state.usage.tokens_since_fired, 10**6))
    state = state._replace(usage=dead_usage)
    _, m = dense_step.jit_train_step(state, batch(1), cfg=cfg, tcfg=tcfg)
    self.assertGreater(float(m["aux_loss"]), 0.0)

  def test_bad_config(self):
    with self.assertRaisesRegex(ValueError, "aux_loss"):
      train_state.TrainConfig(aux_loss="aux")
    with self.assertRaisesRegex(ValueError, "warmup_steps"):
      train_state.TrainConfig(warmup_steps=20, total_steps=10)


class ThresholdCalibrationTest(parameterized.TestCase):

  def test_global_threshold_is_min_kept_code_then_ema(self):
    cfg = model.SAEConfig(d_model=4, d_sae=3, allocation="mutual_choice", k=1)
    codes1 = jnp.array([[0.0, 2.0, 0.5], [3.0, 0.0, 0.0]])
    t1 = dense_step.update_threshold(jnp.full((3,), jnp.inf), codes1, cfg, 0.9)
    np.testing.assert_allclose(t1, [0.5, 0.5, 0.5])  # first observation: the batch min
    codes2 = jnp.array([[1.5, 0.0, 0.0], [0.0, 0.0, 2.5]])
    t2 = dense_step.update_threshold(t1, codes2, cfg, 0.9)
    np.testing.assert_allclose(t2, [0.9 * 0.5 + 0.1 * 1.5] * 3, rtol=1e-6)

  def test_per_feature_threshold_for_feature_choice(self):
    cfg = model.SAEConfig(d_model=4, d_sae=3, allocation="feature_choice", k=1)
    codes = jnp.array([[0.0, 2.0, 0.0], [3.0, 1.0, 0.0]], jnp.bfloat16)
    t = dense_step.update_threshold(jnp.array([jnp.inf, jnp.inf, 0.7]), codes, cfg, 0.5)
    # Feature 2 kept nothing positive: its previous value stays.
    np.testing.assert_allclose(t, [3.0, 1.0, 0.7])
    self.assertEqual(t.dtype, jnp.float32)

  def test_thresholded_encode_does_not_depend_on_the_batch(self):
    cfg, tcfg, state, batch = _setup("mutual_choice")
    for i in range(30):
      state, _ = dense_step.jit_train_step(state, batch(i), cfg=cfg, tcfg=tcfg)
    theta = state.threshold
    self.assertTrue(bool(jnp.all(theta > 0)))
    x = batch(99)
    codes_all, _ = model.encode_thresholded(state.params, x, cfg, theta[0])
    codes_one, _ = model.encode_thresholded(state.params, x[5:6], cfg, theta[0])
    np.testing.assert_array_equal(np.asarray(codes_all[5:6]), np.asarray(codes_one))
    # Calibrated on the training distribution, mean L0 lands near the budget k.
    l0 = float((np.asarray(codes_all) > 0).sum(1).mean())
    self.assertGreater(l0, 0.5 * cfg.k)
    self.assertLess(l0, 2.0 * cfg.k)

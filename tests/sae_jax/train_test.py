"""Tests for the pure SAE training step on synthetic data."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from sae_jax import model
from sae_jax import train
from sae_jax.data import synthetic


def _setup(allocation, aux="none", k=4):
  scfg = synthetic.SyntheticConfig(d_model=16, num_features=48, mean_active=3.0)
  dirs, probs = synthetic.ground_truth(jax.random.key(0), scfg)
  cfg = model.SAEConfig(d_model=16, d_sae=64, allocation=allocation, k=k,
                        l1_coefficient=1e-2 if allocation == "relu" else 0.0)
  tcfg = train.TrainConfig(learning_rate=3e-3, warmup_steps=5, total_steps=60, aux_loss=aux,
                           dead_after_tokens=256)

  def batch(i):
    return synthetic.sample_batch(jax.random.fold_in(jax.random.key(1), i), dirs, probs, 128,
                                  scfg.noise_std)

  state = train.init_train_state(jax.random.key(2), cfg, tcfg, batch(10_000))
  return cfg, tcfg, state, batch


class TrainStepTest(parameterized.TestCase):

  @parameterized.parameters(
      ("topk", "none"), ("topk", "aux_k"), ("mutual_choice", "aux_zipf"),
      ("feature_choice", "none"), ("feature_choice_zipf", "none"), ("relu", "none"))
  def test_loss_decreases_and_invariants_hold(self, allocation, aux):
    cfg, tcfg, state, batch = _setup(allocation, aux)
    step = jax.jit(chex.assert_max_traces(train.train_step, n=1),
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
    state, m = train.jit_train_step(state, batch(0), cfg=cfg, tcfg=tcfg)
    self.assertEqual(float(m["aux_loss"]), 0.0)  # nothing can be dead after one batch
    dead_usage = state.usage._replace(
        tokens_since_fired=jnp.full_like(state.usage.tokens_since_fired, 10**6))
    state = state._replace(usage=dead_usage)
    _, m = train.jit_train_step(state, batch(1), cfg=cfg, tcfg=tcfg)
    self.assertGreater(float(m["aux_loss"]), 0.0)

  def test_bad_config(self):
    with self.assertRaisesRegex(ValueError, "aux_loss"):
      train.TrainConfig(aux_loss="aux")
    with self.assertRaisesRegex(ValueError, "warmup_steps"):
      train.TrainConfig(warmup_steps=20, total_steps=10)

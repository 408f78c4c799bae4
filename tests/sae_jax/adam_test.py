"""adam.update against the optax path it replaces (train_state.make_optimizer)."""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import model
from sae_jax import params as sae_params
from sae_jax.training import adam
from sae_jax.training import train_state


def _state(d, f, tcfg):
  cfg = model.SAEConfig(d_model=d, d_sae=f, allocation="topk", k=2)
  return train_state.init_train_state(jax.random.key(0), cfg, tcfg)


def _grads(key, params, scale):
  keys = jax.random.split(key, 4)
  return sae_params.SAEParams(*(scale * jax.random.normal(k, a.shape, a.dtype)
                                for k, a in zip(keys, params)))


class FusedAdamTest(parameterized.TestCase):

  @parameterized.product(
      f=(2 * adam.BLOCK, 3 * adam.BLOCK, 100),  # blocked loops and whole arrays
      grad_clip=(1.0, 0.0, 1e3),  # clipping active, disabled, inactive
      d=(24, 2 * adam.TILE),  # one transpose tile per block, or several
  )
  def test_matches_optax_over_steps(self, f, grad_clip, d):
    tcfg = train_state.TrainConfig(learning_rate=1e-2, warmup_steps=2, total_steps=20,
                                   grad_clip=grad_clip)
    st = _state(d, f, tcfg)
    fused = jax.jit(adam.update, static_argnums=3)
    ref = jax.jit(adam.reference_update, static_argnums=3)
    p1, o1 = p2, o2 = st.params, st.opt_state
    for step in range(4):
      g = _grads(jax.random.key(step), p1, 0.5)
      p1, o1, n1 = fused(p1, g._replace(W_enc=g.W_enc.T), o1, tcfg)
      p2, o2, n2 = ref(p2, g, o2, tcfg)
      np.testing.assert_allclose(n1, n2, rtol=1e-6)
    self.assertEqual(jax.tree.structure(o1), jax.tree.structure(o2))
    chex.assert_trees_all_equal_dtypes((p1, o1), (p2, o2))
    chex.assert_trees_all_close((p1, o1), (p2, o2), rtol=1e-5, atol=1e-7)
    # The decoder rows come out at unit norm and the step moved every weight.
    np.testing.assert_allclose(jnp.linalg.norm(p1.W_dec, axis=1), 1.0, rtol=1e-5)
    self.assertGreater(float(jnp.abs(p1.W_enc - st.params.W_enc).min()), 0)

  def test_clip_scales_the_moments(self):
    # With the clip active the moments hold the gradient scaled to unit global norm;
    # the norm reported is the unclipped one, taken after the decoder projection.
    tcfg = train_state.TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10)
    st = _state(8, 2 * adam.BLOCK, tcfg)
    g = _grads(jax.random.key(3), st.params, 100.0)
    _, opt, norm = adam.update(st.params, g._replace(W_enc=g.W_enc.T), st.opt_state,
                               tcfg)
    projected = sae_params.project_decoder_grads(g, st.params.W_dec)
    expected_norm = np.sqrt(sum(np.sum(np.square(a)) for a in projected))
    np.testing.assert_allclose(norm, expected_norm, rtol=1e-5)
    moments = opt[1][0]
    np.testing.assert_allclose(moments.mu.W_enc, 0.1 * g.W_enc / expected_norm, rtol=1e-4)
    np.testing.assert_allclose(moments.nu.W_dec, 0.001 * np.square(projected.W_dec / expected_norm),
                               rtol=1e-3, atol=1e-12)

  def test_bad_arguments(self):
    tcfg = train_state.TrainConfig()
    st = _state(8, 32, tcfg)
    g = _grads(jax.random.key(0), st.params, 1.0)
    with self.assertRaisesRegex(ValueError, r"grads.W_enc must have shape \[32, 8\]"):
      adam.update(st.params, g, st.opt_state, tcfg)
    gt = g._replace(W_enc=g.W_enc.T)
    with self.assertRaisesRegex(ValueError, "opt_state must be the state of"):
      adam.update(st.params, gt, st.opt_state[1], tcfg)
    no_clip = train_state.TrainConfig(grad_clip=0.0)
    with self.assertRaisesRegex(ValueError, "same tcfg.grad_clip"):
      adam.update(st.params, gt, st.opt_state, no_clip)


if __name__ == "__main__":
  absltest.main()

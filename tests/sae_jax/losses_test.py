"""Tests for sae_jax.losses."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

from sae_jax import losses


def _numpy_aux_reference(pre, x, recon, w_dec, mask, k_aux, weights=None):
  """Independent float64 loop implementation of the auxiliary loss."""
  pre, x, recon, w_dec = (np.asarray(a, np.float64) for a in (pre, x, recon, w_dec))
  mask = np.asarray(mask)
  scores = pre if weights is None else pre * np.asarray(weights, np.float64)
  codes = np.zeros_like(pre)
  candidates = np.flatnonzero(mask)
  for token in range(pre.shape[0]):
    ranked = sorted(candidates, key=lambda j: -scores[token, j])[:k_aux]
    for j in ranked:
      codes[token, j] = max(scores[token, j], 0.0)
  residual = x - recon
  residual_hat = codes @ w_dec
  return (np.sum((residual_hat - residual) ** 2)
          / np.sum((residual - residual.mean(0)) ** 2))


def _random_problem(seed, b=6, f=8, d=4):
  rng = np.random.default_rng(seed)
  w_dec = rng.normal(size=(f, d))
  w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
  arrays = (rng.normal(size=(b, f)), rng.normal(size=(b, d)),
            rng.normal(size=(b, d)), w_dec)
  return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


class AuxKLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_hand_computed_golden(self):
    # By hand: dead = {1, 2}, k_aux = 1. Token 0 keeps f2 = 3, token 1 keeps
    # f1 = 2, so e_hat = [[1.8, 2.4], [0, 2]]. e = x - recon = [[2, 2], [0, 3]]
    # with batch mean [1, 2.5]: variance sum 2.5, squared error 1.2 -> 0.48.
    pre = jnp.array([[1.0, -2.0, 3.0], [0.5, 2.0, -1.0]])
    w_dec = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    x = jnp.array([[2.0, 2.0], [0.0, 4.0]])
    recon = jnp.array([[0.0, 0.0], [0.0, 1.0]])
    dead = jnp.array([False, True, True])
    loss = self.variant(functools.partial(losses.aux_k_loss, k_aux=1))(
        pre, x, recon, w_dec, dead)
    chex.assert_shape(loss, ())
    np.testing.assert_allclose(loss, 0.48, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("k1", 1), ("k3", 3), ("k_more_than_dead", 6))
  def test_matches_numpy_reference(self, k_aux):
    pre, x, recon, w_dec = _random_problem(0)
    dead = jnp.array([True, False, True, True, False, False, True, False])
    loss = self.variant(functools.partial(losses.aux_k_loss, k_aux=k_aux))(
        pre, x, recon, w_dec, dead)
    expected = _numpy_aux_reference(pre, x, recon, w_dec, dead, k_aux)
    self.assertTrue(np.isfinite(expected))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_no_dead_features_gives_exact_zero_and_zero_grads(self):
    pre, x, recon, w_dec = _random_problem(1)
    no_dead = jnp.zeros(8, bool)
    loss_fn = functools.partial(losses.aux_k_loss, k_aux=2)
    loss = self.variant(loss_fn)(pre, x, recon, w_dec, no_dead)
    self.assertEqual(float(loss), 0.0)
    grads = self.variant(jax.grad(loss_fn, argnums=(0, 1, 2, 3)))(
        pre, x, recon, w_dec, no_dead)
    for grad in grads:
      chex.assert_tree_all_finite(grad)
      np.testing.assert_array_equal(grad, jnp.zeros_like(grad))

  def test_constant_residual_gives_zero_not_nan(self):
    # One token: the residual has no variance over the batch.
    pre, x, recon, w_dec = _random_problem(2, b=1)
    loss_fn = functools.partial(losses.aux_k_loss, k_aux=2)
    dead = jnp.ones(8, bool)
    self.assertEqual(float(loss_fn(pre, x, recon, w_dec, dead)), 0.0)
    chex.assert_tree_all_finite(
        jax.grad(loss_fn, argnums=(0, 3))(pre, x, recon, w_dec, dead))

  def test_gradient_flows_to_pre_and_decoder_not_recon(self):
    pre, x, recon, w_dec = _random_problem(3)
    dead = jnp.array([True, True, False, False, False, False, False, True])
    k_aux = 2
    grad_pre, grad_recon, grad_w = jax.jit(
        jax.grad(losses.aux_k_loss, argnums=(0, 2, 3)),
        static_argnames="k_aux")(pre, x, recon, w_dec, dead, k_aux=k_aux)
    np.testing.assert_array_equal(grad_recon, jnp.zeros_like(recon))
    # Only positive, selected dead pre-activations receive gradient.
    scores = np.where(np.asarray(dead), np.asarray(pre), -np.inf)
    kth = np.sort(scores, axis=1)[:, -k_aux][:, None]
    selected = (scores >= kth) & (scores > 0)
    self.assertTrue(selected.any())
    grad_pre = np.asarray(grad_pre)
    np.testing.assert_array_equal(grad_pre[~selected], 0.0)
    self.assertTrue(np.all(grad_pre[selected] != 0.0))
    # Decoder rows of live features are untouched; selected dead rows move.
    grad_w = np.asarray(grad_w)
    np.testing.assert_array_equal(grad_w[~np.asarray(dead)], 0.0)
    self.assertGreater(np.abs(grad_w[np.asarray(dead)]).sum(), 0.0)

  def test_changing_mask_does_not_retrace(self):
    pre, x, recon, w_dec = _random_problem(4)

    @functools.partial(jax.jit, static_argnames="k_aux")
    @chex.assert_max_traces(n=1)
    def loss_fn(pre, x, recon, w_dec, dead, k_aux):
      return losses.aux_k_loss(pre, x, recon, w_dec, dead, k_aux)

    chex.clear_trace_counter()
    rng = np.random.default_rng(5)
    masks = [np.zeros(8, bool), np.ones(8, bool), rng.random(8) < 0.5]
    for mask in masks:
      loss = loss_fn(pre, x, recon, w_dec, jnp.asarray(mask), k_aux=3)
      expected = (_numpy_aux_reference(pre, x, recon, w_dec, mask, 3)
                  if mask.any() else 0.0)
      np.testing.assert_allclose(loss, expected, rtol=1e-5)

  def test_bfloat16_inputs_give_float32_loss(self):
    arrays = _random_problem(6)
    pre, x, recon, w_dec = (a.astype(jnp.bfloat16) for a in arrays)
    dead = jnp.ones(8, bool)
    loss = losses.aux_k_loss(pre, x, recon, w_dec, dead, 2)
    self.assertEqual(loss.dtype, jnp.float32)
    np.testing.assert_allclose(
        loss, _numpy_aux_reference(pre, x, recon, w_dec, dead, 2), rtol=2e-2)


class AuxZipfLossTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_aux_k_bitwise_with_dead_mask(self):
    pre, x, recon, w_dec = _random_problem(7)
    dead = jnp.array([False, True, True, False, True, False, False, True])
    aux_k = self.variant(functools.partial(losses.aux_k_loss, k_aux=2))
    aux_zipf = self.variant(functools.partial(losses.aux_zipf_loss, k_aux=2))
    np.testing.assert_array_equal(
        aux_zipf(pre, x, recon, w_dec, dead), aux_k(pre, x, recon, w_dec, dead))
    grad_k = jax.grad(losses.aux_k_loss, argnums=(0, 3))(
        pre, x, recon, w_dec, dead, 2)
    grad_zipf = jax.grad(losses.aux_zipf_loss, argnums=(0, 3))(
        pre, x, recon, w_dec, dead, 2)
    for a, b in zip(grad_k, grad_zipf):
      np.testing.assert_array_equal(a, b)

  @chex.variants(with_jit=True, without_jit=True)
  def test_weights_change_selection(self):
    # Unweighted, token 0 picks f1 (3 > 2). With weight 2 on f2 its score is
    # 4 > 3, so f2 is picked with code 4: e_hat = 4 * W_dec[2] = [0, 4].
    pre = jnp.array([[5.0, 3.0, 2.0], [0.0, 1.0, 0.5]])
    w_dec = jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    x = jnp.array([[0.0, 4.0], [1.0, 0.0]])
    recon = jnp.zeros((2, 2))
    mask = jnp.array([False, True, True])
    weights = jnp.array([1.0, 1.0, 2.0])
    loss_fn = self.variant(functools.partial(losses.aux_zipf_loss, k_aux=1))
    unweighted = loss_fn(pre, x, recon, w_dec, mask)
    weighted = loss_fn(pre, x, recon, w_dec, mask, weights=weights)
    # By hand: e = x, batch mean [0.5, 2], variance sum 0.5 + 8 = 8.5.
    # Weighted: e_hat = [[0, 4], [1, 0]], a perfect fit -> 0.
    # Unweighted: e_hat = [[3, 0], [1, 0]], squared error 9 + 16 = 25.
    np.testing.assert_allclose(weighted, 0.0, atol=1e-7)
    np.testing.assert_allclose(unweighted, 25.0 / 8.5, rtol=1e-6)
    np.testing.assert_allclose(
        weighted, _numpy_aux_reference(pre, x, recon, w_dec, mask, 1, weights),
        atol=1e-7)

  def test_weights_get_no_gradient_and_unit_weights_match(self):
    pre, x, recon, w_dec = _random_problem(8)
    mask = jnp.array([True, False, True, True, False, True, False, True])
    ones = jnp.ones(8)
    np.testing.assert_allclose(
        losses.aux_zipf_loss(pre, x, recon, w_dec, mask, 3, ones),
        losses.aux_zipf_loss(pre, x, recon, w_dec, mask, 3), rtol=1e-6)
    grad_weights = jax.grad(
        lambda w: losses.aux_zipf_loss(pre, x, recon, w_dec, mask, 3, w))(ones)
    np.testing.assert_array_equal(grad_weights, jnp.zeros(8))


class L1PenaltyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_golden(self):
    # By hand: row norms [1, 2, 0.5]; token 0: 1*1 + 2*2 = 5, token 1:
    # 3 * 0.5 = 1.5; mean 3.25.
    codes = jnp.array([[1.0, -2.0, 0.0], [0.0, 0.0, 3.0]])
    w_dec = jnp.array([[1.0, 0.0], [0.0, 2.0], [0.3, 0.4]])
    np.testing.assert_allclose(
        self.variant(losses.l1_penalty)(codes, w_dec), 3.25, rtol=1e-6)

  def test_zero_decoder_row_has_finite_gradient(self):
    codes = jnp.array([[1.0, 2.0]])
    w_dec = jnp.array([[0.0, 0.0], [3.0, 4.0]])
    grad_codes, grad_w = jax.grad(losses.l1_penalty, argnums=(0, 1))(codes, w_dec)
    chex.assert_tree_all_finite((grad_codes, grad_w))
    # d/dW of 2 * ||W[1]|| is 2 * W[1] / 5; the zero row gets no gradient.
    np.testing.assert_allclose(grad_w, [[0.0, 0.0], [1.2, 1.6]], rtol=1e-6)
    np.testing.assert_allclose(grad_codes, [[0.0, 5.0]], rtol=1e-6)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "codes"):
      losses.l1_penalty(jnp.zeros(3), jnp.zeros((3, 2)))
    with self.assertRaisesRegex(ValueError, "W_dec"):
      losses.l1_penalty(jnp.zeros((2, 3)), jnp.zeros((4, 2)))


class DefaultsAndValidationTest(chex.TestCase):

  def test_defaults(self):
    self.assertEqual(losses.DEFAULT_AUX_COEFFICIENT, 1.0 / 32.0)
    self.assertEqual(losses.default_k_aux(768), 384)
    self.assertEqual(losses.default_k_aux(3), 1)

  @parameterized.named_parameters(("one", 1), ("float", 2.5), ("bool", True))
  def test_default_k_aux_errors(self, d_model):
    with self.assertRaisesRegex(ValueError, "d_model"):
      losses.default_k_aux(d_model)

  @parameterized.named_parameters(
      ("pre_1d", dict(pre=jnp.zeros(8)), "pre"),
      ("x_1d", dict(x=jnp.zeros(4)), "x"),
      ("x_rows", dict(x=jnp.zeros((5, 4))), "x must have 6 rows"),
      ("recon_shape", dict(recon=jnp.zeros((6, 3))), "recon"),
      ("w_dec_shape", dict(w_dec=jnp.zeros((7, 4))), "W_dec"),
      ("mask_shape", dict(mask=jnp.zeros(7, bool)), "mask"),
      ("mask_dtype", dict(mask=jnp.zeros(8)), "bool"),
      ("weights_shape", dict(weights=jnp.ones(7)), "weights"),
      ("k_zero", dict(k_aux=0), r"k_aux must lie in \[1, 8\]"),
      ("k_above_f", dict(k_aux=9), r"k_aux must lie in \[1, 8\]"),
      ("k_array", dict(k_aux=jnp.array(2)), "static"),
  )
  def test_aux_errors(self, override, message):
    pre, x, recon, w_dec = _random_problem(9)
    args = dict(pre=pre, x=x, recon=recon, w_dec=w_dec,
                mask=jnp.ones(8, bool), k_aux=2, weights=jnp.ones(8))
    args.update(override)
    with self.assertRaisesRegex(ValueError, message):
      losses.aux_zipf_loss(args["pre"], args["x"], args["recon"], args["w_dec"],
                           args["mask"], args["k_aux"], args["weights"])
    if "weights" not in override:
      with self.assertRaisesRegex(ValueError, message):
        losses.aux_k_loss(args["pre"], args["x"], args["recon"], args["w_dec"],
                          args["mask"], args["k_aux"])

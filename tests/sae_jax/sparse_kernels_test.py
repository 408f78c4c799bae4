"""The sparse decoder and encoder-gradient kernels against their dense formulations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized
from jax.test_util import check_grads

from sae_jax.training import sparse_kernels as kernels

B, D, F = 6, 5, 9


def _triples(seed=0, per_row=3):
  """Distinct (row, col) pairs, ``per_row`` per token, plus values and dense params."""
  rng = np.random.default_rng(seed)
  rows = np.repeat(np.arange(B), per_row)
  cols = np.concatenate([rng.choice(F, per_row, replace=False) for _ in range(B)])
  values = rng.normal(size=rows.shape)
  arrays = [rng.normal(size=s) for s in ((B, D), (D, F), (F,), (F, D), (D,))]
  return (jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32),
          jnp.asarray(values, jnp.float32), *(jnp.asarray(a, jnp.float32) for a in arrays))


def _dense_codes(values, rows, cols):
  return jnp.zeros((B, F)).at[rows, cols].set(values)


class SparseDecodeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_equals_dense_decode(self):
    rows, cols, values, _, _, _, W_dec, _ = _triples()
    got = self.variant(lambda v, w: kernels.sparse_decode(v, rows, cols, w, B))(values, W_dec)
    chex.assert_shape(got, (B, D))
    chex.assert_trees_all_close(got, _dense_codes(values, rows, cols) @ W_dec,
                                rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_golden(self):
    # Hand-computed: token 0 = 2 * row 1 + (-1) * row 0 = [2, 4] - [1, 0] = [1, 4];
    # token 1 = 0.5 * row 1 = [0.5, 1]; token 2 has no entry.
    W_dec = jnp.array([[1.0, 0.0], [1.0, 2.0]])
    out = self.variant(lambda v: kernels.sparse_decode(
        v, jnp.array([0, 0, 1]), jnp.array([1, 0, 1]), W_dec, 3))(jnp.array([2.0, -1.0, 0.5]))
    np.testing.assert_array_equal(out, [[1.0, 4.0], [0.5, 1.0], [0.0, 0.0]])

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradients_match_dense(self):
    rows, cols, values, _, _, _, W_dec, _ = _triples(1)
    target = jnp.asarray(np.random.default_rng(2).normal(size=(B, D)), jnp.float32)

    def loss(decode):
      return lambda v, w: jnp.sum(jnp.sin(decode(v, w) - target))

    sparse_grads = self.variant(jax.grad(loss(
        lambda v, w: kernels.sparse_decode(v, rows, cols, w, B)), argnums=(0, 1)))(values, W_dec)
    dense_grads = jax.grad(loss(lambda v, w: _dense_codes(v, rows, cols) @ w),
                           argnums=(0, 1))(values, W_dec)
    chex.assert_trees_all_close(sparse_grads, dense_grads, rtol=1e-5, atol=1e-6)

  def test_blocks_and_shared_rows(self):
    # More triples than one block, and every entry hits decoder row 0 or 1, so the
    # backward scatter must accumulate across blocks.
    n = kernels.BLOCK + 37
    rng = np.random.default_rng(3)
    rows = jnp.asarray(np.arange(n) // 2, jnp.int32)
    cols = jnp.asarray(np.arange(n) % 2, jnp.int32)
    values = jnp.asarray(rng.normal(size=n), jnp.float32)
    W_dec = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
    b = int(rows[-1]) + 1
    f = jax.jit(lambda v, w: jnp.sum(kernels.sparse_decode(v, rows, cols, w, b) ** 2))
    dense = lambda v, w: jnp.sum((jnp.zeros((b, 2)).at[rows, cols].set(v) @ w) ** 2)
    chex.assert_trees_all_close(jax.grad(f, (0, 1))(values, W_dec),
                                jax.grad(dense, (0, 1))(values, W_dec), rtol=1e-4, atol=1e-5)

  def test_check_grads(self):
    rows, cols, values, _, _, _, W_dec, _ = _triples(4)
    check_grads(lambda v, w: kernels.sparse_decode(v, rows, cols, w, B), (values, W_dec),
                order=1, modes=("rev",), atol=1e-2, rtol=1e-2)

  def test_bad_arguments(self):
    rows, cols, values, _, _, _, W_dec, _ = _triples()
    with self.assertRaisesRegex(ValueError, "rows must be a 1-D integer array"):
      kernels.sparse_decode(values, rows[:, None], cols, W_dec, B)
    with self.assertRaisesRegex(ValueError, "cols must be a 1-D integer array"):
      kernels.sparse_decode(values, rows, cols.astype(jnp.float32), W_dec, B)
    with self.assertRaisesRegex(ValueError, "rows and cols must have the same shape"):
      kernels.sparse_decode(values, rows, cols[:-1], W_dec, B)
    with self.assertRaisesRegex(ValueError, r"values must have shape \[18\]"):
      kernels.sparse_decode(values[:-1], rows, cols, W_dec, B)
    with self.assertRaisesRegex(ValueError, r"num_rows must be a static Python int >= 1 \("):
      kernels.sparse_decode(values, rows, cols, W_dec, 0)
    with self.assertRaisesRegex(ValueError, "W_dec must be"):
      kernels.sparse_decode(values, rows, cols, W_dec[0], B)


class SparseDecodePairTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_outputs_and_gradients_equal_two_decodes(self):
    # Two selections over the same decoder (a main one and an auxiliary one with more
    # entries per token, overlapping it), with different losses on each output.
    rows, cols, values, _, _, _, W_dec, _ = _triples(5)
    rows2, cols2, values2, *_ = _triples(6, per_row=5)
    target = jnp.asarray(np.random.default_rng(7).normal(size=(B, D)), jnp.float32)

    def loss(a, b):
      return jnp.sum(jnp.sin(a - target)) + 0.3 * jnp.sum(jnp.square(b + target))

    def pair(v, v2, w):
      return loss(*kernels.sparse_decode_pair(v, rows, cols, v2, rows2, cols2, w, B))

    def two(v, v2, w):
      return loss(kernels.sparse_decode(v, rows, cols, w, B),
                  kernels.sparse_decode(v2, rows2, cols2, w, B))

    got = self.variant(jax.value_and_grad(pair, argnums=(0, 1, 2)))(values, values2, W_dec)
    expected = jax.value_and_grad(two, argnums=(0, 1, 2))(values, values2, W_dec)
    chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)

  def test_bad_arguments(self):
    rows, cols, values, _, _, _, W_dec, _ = _triples()
    with self.assertRaisesRegex(ValueError, "rows and cols must have the same shape"):
      kernels.sparse_decode_pair(values, rows, cols, values, rows, cols[:-1], W_dec, B)
    with self.assertRaisesRegex(ValueError, "W_dec must be"):
      kernels.sparse_decode_pair(values, rows, cols, values, rows, cols, W_dec[0], B)


class RowBlockDecodeTest(parameterized.TestCase):
  """The dense per-block form against the flat-triple kernels and the dense formula."""

  def _entries(self, seed, per_row=3):
    rows, cols, values, x, W_enc, _, W_dec, b_dec = _triples(seed, per_row)
    return (rows, cols, values, cols.reshape(B, per_row), values.reshape(B, per_row), x,
            W_enc, W_dec, b_dec)

  @parameterized.parameters(B, 3, 2, 1)  # one block of all rows, then several blocks
  def test_decode_and_gradients_match_triples_and_dense(self, block_rows):
    rows, cols, values, cols_BxK, values_BxK, _, _, W_dec, _ = self._entries(11)
    target = jnp.asarray(np.random.default_rng(2).normal(size=(B, D)), jnp.float32)
    loss = lambda decode: (lambda v, w: jnp.sum(jnp.sin(decode(v, w) - target)))
    rowwise = jax.jit(lambda v, w: kernels.row_block_decode(v, cols_BxK, w, block_rows))
    got = rowwise(values_BxK, W_dec)
    chex.assert_trees_all_close(got, _dense_codes(values, rows, cols) @ W_dec,
                                rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(got, kernels.sparse_decode(values, rows, cols, W_dec, B),
                                rtol=1e-5, atol=1e-6)
    g_rows = jax.jit(jax.grad(loss(rowwise), argnums=(0, 1)))(values_BxK, W_dec)
    g_trip = jax.grad(loss(lambda v, w: kernels.sparse_decode(v.reshape(-1), rows, cols, w, B)),
                      argnums=(0, 1))(values_BxK, W_dec)
    g_dense = jax.grad(loss(lambda v, w: _dense_codes(v.reshape(-1), rows, cols) @ w),
                       argnums=(0, 1))(values_BxK, W_dec)
    chex.assert_trees_all_close(g_rows, g_trip, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(g_rows, g_dense, rtol=1e-5, atol=1e-6)

  @parameterized.parameters(B, 2)
  def test_encoder_grads_dense_rows_with_triples_folded_in(self, block_rows):
    # The main triples (rows in any order) overlap the per-token entries in a few
    # pairs; all contributions add up, as for concatenated triples.
    rows, cols, _, cols_BxK, _, x, W_enc, _, b_dec = self._entries(12)
    perm = np.random.default_rng(4).permutation(rows.shape[0])[:7]
    main_rows, main_cols = rows[perm], cols[perm]
    main_dpre = jax.random.normal(jax.random.key(2), main_rows.shape)
    row_dpre = jax.random.normal(jax.random.key(3), cols_BxK.shape)
    got = jax.jit(lambda *a: kernels.encoder_grads(
        *a, row_cols=cols_BxK, row_dpre=row_dpre, block_rows=block_rows))(
            x, W_enc, b_dec, main_rows, main_cols, main_dpre)
    want = kernels.encoder_grads(x, W_enc, b_dec, jnp.concatenate([main_rows, rows]),
                                 jnp.concatenate([main_cols, cols]),
                                 jnp.concatenate([main_dpre, row_dpre.reshape(-1)]))
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    dense_cot = (jnp.zeros((B, F)).at[main_rows, main_cols].add(main_dpre)
                 .at[rows, cols].add(row_dpre.reshape(-1)))
    _, vjp = jax.vjp(lambda w, be, bd: (x - bd) @ w + be, W_enc, jnp.zeros((F,)), b_dec)
    want_w, want_be, want_bd = vjp(dense_cot)
    chex.assert_trees_all_close((got[0].T, got[1], got[2]), (want_w, want_be, want_bd),
                                rtol=1e-5, atol=1e-6)

  def test_bad_arguments(self):
    rows, cols, values, cols_BxK, values_BxK, x, W_enc, W_dec, b_dec = self._entries(13)
    with self.assertRaisesRegex(ValueError, "cols must be a 2-D integer array"):
      kernels.row_block_decode(values, cols, W_dec, B)
    with self.assertRaisesRegex(ValueError, "values must have the shape"):
      kernels.row_block_decode(values_BxK[:, :2], cols_BxK, W_dec, B)
    with self.assertRaisesRegex(ValueError, "block_rows must be a static int"):
      kernels.row_block_decode(values_BxK, cols_BxK, W_dec, 4)  # does not divide 6
    with self.assertRaisesRegex(ValueError, "W_dec must be"):
      kernels.row_block_decode(values_BxK, cols_BxK, W_dec[0], B)
    with self.assertRaisesRegex(ValueError, "go together"):
      kernels.encoder_grads(x, W_enc, b_dec, rows, cols, values, row_cols=cols_BxK)
    with self.assertRaisesRegex(ValueError, "rows of x"):
      kernels.encoder_grads(x, W_enc, b_dec, rows, cols, values, row_cols=cols_BxK[:3],
                            row_dpre=values_BxK[:3], block_rows=3)


class SelectedPreTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_values_equal_dense_gather(self):
    rows, cols, _, x, W_enc, b_enc, _, b_dec = _triples()
    got = self.variant(lambda *a: kernels.selected_pre(*a, rows, cols))(x, W_enc, b_enc, b_dec)
    pre = (x - b_dec) @ W_enc + b_enc
    chex.assert_trees_all_close(got, pre[rows, cols], rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_gradients_match_dense(self):
    rows, cols, _, x, W_enc, b_enc, _, b_dec = _triples(5)
    pre_given = ((x - b_dec) @ W_enc + b_enc)[rows, cols]

    def sparse_loss(x, w, be, bd):
      return jnp.sum(jnp.tanh(kernels.selected_pre(x, w, be, bd, rows, cols, pre_given)) ** 2)

    def dense_loss(x, w, be, bd):
      return jnp.sum(jnp.tanh(((x - bd) @ w + be)[rows, cols]) ** 2)

    args = (x, W_enc, b_enc, b_dec)
    got = self.variant(jax.grad(sparse_loss, argnums=(0, 1, 2, 3)))(*args)
    want = jax.grad(dense_loss, argnums=(0, 1, 2, 3))(*args)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)

  def test_encoder_gradient_only_in_selected_columns(self):
    rows, cols, _, x, W_enc, b_enc, _, b_dec = _triples(6, per_row=1)
    dW = jax.grad(lambda w: jnp.sum(kernels.selected_pre(x, w, b_enc, b_dec, rows, cols)))(W_enc)
    unselected = np.setdiff1d(np.arange(F), np.asarray(cols))
    self.assertGreater(len(unselected), 0)
    np.testing.assert_array_equal(np.asarray(dW)[:, unselected], 0.0)
    # Column c collects sum over its entries of (x[r] - b_dec): the gradient of a sum.
    c = int(cols[0])
    want = np.sum(np.asarray(x - b_dec)[np.asarray(rows)[np.asarray(cols) == c]], axis=0)
    np.testing.assert_allclose(np.asarray(dW)[:, c], want, rtol=1e-5)

  def test_encoder_grads_equal_dense_vjp_with_repeated_entries(self):
    # encoder_grads takes any cotangent at the triples, repeated pairs included (a main
    # and an auxiliary selection may share entries): they add up.
    rows, cols, _, x, W_enc, b_enc, _, b_dec = _triples(8)
    rows2, cols2 = jnp.concatenate([rows, rows[:4]]), jnp.concatenate([cols, cols[:4]])
    dpre = jax.random.normal(jax.random.key(1), rows2.shape)
    dW_FxD, db_enc, db_dec = kernels.encoder_grads(x, W_enc, b_dec, rows2, cols2, dpre)
    dense_cot = jnp.zeros((B, F)).at[rows2, cols2].add(dpre)
    _, vjp = jax.vjp(lambda w, be, bd: (x - bd) @ w + be, W_enc, b_enc, b_dec)
    want_w, want_be, want_bd = vjp(dense_cot)
    self.assertEqual(dW_FxD.shape, (F, D))
    chex.assert_trees_all_close((dW_FxD.T, db_enc, db_dec), (want_w, want_be, want_bd),
                                rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_encoder_grads_more_equals_concatenation(self):
    # A second list of triples (the auxiliary loss's), overlapping the first, scattered
    # into the same buffer: the result of one concatenated list.
    rows, cols, _, x, W_enc, _, _, b_dec = _triples(9)
    dpre = jax.random.normal(jax.random.key(2), rows.shape)
    rows2, cols2 = rows[::-1][:7], cols[:7]
    dpre2 = jax.random.normal(jax.random.key(3), rows2.shape)
    got = self.variant(lambda *a: kernels.encoder_grads(*a, more=(rows2, cols2, dpre2)))(
        x, W_enc, b_dec, rows, cols, dpre)
    want = kernels.encoder_grads(x, W_enc, b_dec, jnp.concatenate([rows, rows2]),
                                 jnp.concatenate([cols, cols2]), jnp.concatenate([dpre, dpre2]))
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
    with self.assertRaisesRegex(ValueError, "rows and cols must have the same shape"):
      kernels.encoder_grads(x, W_enc, b_dec, rows, cols, dpre, more=(rows2, cols2[:3], dpre2))

  def test_encoder_grads_with_bfloat16_inputs_centre_before_rounding(self):
    # x and b_dec in bfloat16, weights in float32: x - b_dec is formed as the step forms it.
    rows, cols, _, x, W_enc, _, _, b_dec = _triples(10)
    dpre = jax.random.normal(jax.random.key(4), rows.shape)
    xb, bb = x.astype(jnp.bfloat16), b_dec.astype(jnp.bfloat16)
    dW_FxD, _, _ = kernels.encoder_grads(xb, W_enc, bb, rows, cols, dpre)
    centred = np.asarray((xb - bb).astype(jnp.float32))
    want = np.zeros((F, D), np.float32)
    np.add.at(want, np.asarray(cols), np.asarray(dpre)[:, None] * centred[np.asarray(rows)])
    np.testing.assert_allclose(np.asarray(dW_FxD), want, rtol=1e-5, atol=1e-6)

  def test_check_grads(self):
    rows, cols, _, x, W_enc, b_enc, _, b_dec = _triples(7)
    check_grads(lambda *a: kernels.selected_pre(*a, rows, cols), (x, W_enc, b_enc, b_dec),
                order=1, modes=("rev",), atol=1e-2, rtol=1e-2)

  def test_selection_mask(self):
    mask = kernels.selection_mask(jnp.array([0, 1, 1]), jnp.array([2, 0, 1]),
                                  jnp.array([True, True, False]), (2, 3))
    np.testing.assert_array_equal(mask, [[False, False, True], [True, False, False]])

  def test_bad_arguments(self):
    rows, cols, _, x, W_enc, b_enc, _, b_dec = _triples()
    with self.assertRaisesRegex(ValueError, "x must be"):
      kernels.selected_pre(x[:, :2], W_enc, b_enc, b_dec, rows, cols)
    with self.assertRaisesRegex(ValueError, "b_enc must be"):
      kernels.selected_pre(x, W_enc, b_enc[:2], b_dec, rows, cols)
    with self.assertRaisesRegex(ValueError, "b_enc must be"):
      kernels.selected_pre(x, W_enc, b_enc, b_dec[:2], rows, cols)
    with self.assertRaisesRegex(ValueError, r"values must have shape \[18\]"):
      kernels.selected_pre(x, W_enc, b_enc, b_dec, rows, cols, jnp.zeros((3,)))


if __name__ == "__main__":
  absltest.main()

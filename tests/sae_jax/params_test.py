"""Tests for sae_jax.params: decoder normalisation, gradient projection, init, median."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from sae_jax.params import (
    SAEParams,
    geometric_median,
    normalize_decoder,
    project_decoder_grads,
    remove_parallel_component,
    tied_init,
)


def _random_params(seed, d=3, f=5):
  rng = np.random.default_rng(seed)
  return SAEParams(
      W_enc=jnp.asarray(rng.normal(size=(d, f)), jnp.float32),
      b_enc=jnp.asarray(rng.normal(size=(f,)), jnp.float32),
      W_dec=jnp.asarray(rng.normal(size=(f, d)) * 3.0, jnp.float32),
      b_dec=jnp.asarray(rng.normal(size=(d,)), jnp.float32),
  )


class NormalizeDecoderTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_golden_rows(self):
    # A 3-4-5 triangle: [3, 4] / 5 = [0.6, 0.8]; [0, -2] / 2 = [0, -1].
    params = SAEParams(
        W_enc=jnp.zeros((2, 2)), b_enc=jnp.zeros(2),
        W_dec=jnp.array([[3.0, 4.0], [0.0, -2.0]]), b_dec=jnp.zeros(2))
    out = self.variant(normalize_decoder)(params)
    chex.assert_trees_all_close(out.W_dec, jnp.array([[0.6, 0.8], [0.0, -1.0]]), atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_unit_norm_and_other_fields_untouched(self):
    params = _random_params(0)
    out = self.variant(normalize_decoder)(params)
    chex.assert_trees_all_close(jnp.linalg.norm(out.W_dec, axis=1), jnp.ones(5), atol=1e-6)
    chex.assert_trees_all_equal(
        (out.W_enc, out.b_enc, out.b_dec), (params.W_enc, params.b_enc, params.b_dec))
    # Directions are kept: every row is a positive multiple of the original.
    cos = jnp.sum(out.W_dec * params.W_dec, axis=1) / jnp.linalg.norm(params.W_dec, axis=1)
    chex.assert_trees_all_close(cos, jnp.ones(5), atol=1e-6)

  def test_zero_row_stays_zero_and_finite(self):
    params = _random_params(1)
    params = params._replace(W_dec=params.W_dec.at[2].set(0.0))
    out = jax.jit(normalize_decoder)(params)
    chex.assert_tree_all_finite(out.W_dec)
    np.testing.assert_array_equal(np.asarray(out.W_dec[2]), np.zeros(3))
    norms = np.linalg.norm(np.asarray(out.W_dec), axis=1)
    np.testing.assert_allclose(np.delete(norms, 2), np.ones(4), atol=1e-6)

  def test_bfloat16_rows(self):
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), _random_params(2))
    out = jax.jit(normalize_decoder)(params)
    self.assertEqual(out.W_dec.dtype, jnp.bfloat16)
    norms = jnp.linalg.norm(out.W_dec.astype(jnp.float32), axis=1)
    # bfloat16 has an 8-bit mantissa: relative rounding up to 2**-8 per entry.
    chex.assert_trees_all_close(norms, jnp.ones(5), atol=1e-2)


class ProjectDecoderGradsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_golden_projection(self):
    # Row 0 points along e0 (norm 2, so the row is normalised first): the e0 part
    # of [2, 3] goes. Row 1 is [1, 1] / sqrt(2): [1, -1] is already orthogonal
    # and [2, 2] is fully parallel, so they map to [1, -1] and [0, 0].
    W_dec = jnp.array([[2.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    grad = jnp.array([[2.0, 3.0], [1.0, -1.0], [2.0, 2.0]])
    out = self.variant(remove_parallel_component)(grad, W_dec)
    chex.assert_trees_all_close(
        out, jnp.array([[0.0, 3.0], [1.0, -1.0], [0.0, 0.0]]), atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_orthogonal_and_other_fields_untouched(self):
    params = normalize_decoder(_random_params(3))
    grads = _random_params(4)
    out = self.variant(project_decoder_grads)(grads, params.W_dec)
    dots = jnp.sum(out.W_dec * params.W_dec, axis=1)
    chex.assert_trees_all_close(dots, jnp.zeros(5), atol=1e-5)
    chex.assert_trees_all_equal(
        (out.W_enc, out.b_enc, out.b_dec), (grads.W_enc, grads.b_enc, grads.b_dec))
    # Removing the parallel part twice changes nothing more.
    again = project_decoder_grads(out, params.W_dec)
    chex.assert_trees_all_close(again.W_dec, out.W_dec, atol=1e-6)

  def test_sgd_step_then_normalize_keeps_unit_norm(self):
    params = normalize_decoder(_random_params(5))

    def loss(p):
      return jnp.sum(jnp.sin(p.W_dec) * p.W_dec ** 2) + jnp.sum(p.W_enc ** 2)

    @jax.jit
    def step(p):
      g = project_decoder_grads(jax.grad(loss)(p), p.W_dec)
      stepped = jax.tree.map(lambda w, gw: w - 0.1 * gw, p, g)
      return stepped, normalize_decoder(stepped)

    stepped, renormed = step(params)
    chex.assert_trees_all_close(
        jnp.linalg.norm(renormed.W_dec, axis=1), jnp.ones(5), atol=1e-6)
    # A tangent step only grows each norm at second order: |w - lr g|^2 = 1 + lr^2 |g|^2.
    g = project_decoder_grads(jax.grad(loss)(params), params.W_dec).W_dec
    expected = jnp.sqrt(1.0 + 0.01 * jnp.sum(g ** 2, axis=1))
    chex.assert_trees_all_close(jnp.linalg.norm(stepped.W_dec, axis=1), expected, atol=1e-5)

  def test_shape_mismatch_raises(self):
    with self.assertRaisesRegex(ValueError, r"grad_FxD.*W_dec.*\(4, 3\).*\(5, 3\)"):
      remove_parallel_component(jnp.zeros((4, 3)), jnp.zeros((5, 3)))
    with self.assertRaisesRegex(ValueError, "grad_FxD"):
      project_decoder_grads(_random_params(0), jnp.zeros((5,)))


class TiedInitTest(parameterized.TestCase):

  def test_shapes_biases_and_tying(self):
    d, f = 4, 6
    p = jax.jit(tied_init, static_argnums=(1, 2))(jax.random.key(0), d, f)
    chex.assert_shape((p.W_enc, p.b_enc, p.W_dec, p.b_dec), ((d, f), (f,), (f, d), (d,)))
    chex.assert_trees_all_equal((p.b_enc, p.b_dec), (jnp.zeros(f), jnp.zeros(d)))
    chex.assert_trees_all_close(jnp.linalg.norm(p.W_dec, axis=1), jnp.ones(f), atol=1e-6)
    expected = p.W_enc.T / jnp.linalg.norm(p.W_enc.T, axis=1, keepdims=True)
    chex.assert_trees_all_close(p.W_dec, expected, atol=1e-6)
    # The documented init: U(-1/sqrt(d), 1/sqrt(d)) with d = d_model = 4.
    self.assertLessEqual(float(jnp.max(jnp.abs(p.W_enc))), 0.5)
    self.assertGreater(float(jnp.std(p.W_enc)), 0.05)

  def test_deterministic_in_key(self):
    a = tied_init(jax.random.key(1), 3, 5)
    b = tied_init(jax.random.key(1), 3, 5)
    c = tied_init(jax.random.key(2), 3, 5)
    chex.assert_trees_all_equal(a, b)
    self.assertFalse(np.allclose(np.asarray(a.W_enc), np.asarray(c.W_enc)))

  def test_uniform_moments(self):
    # U(-a, a) has variance a^2 / 3; with a = 1/sqrt(16) that is 1/48. 16 * 512
    # draws put the sample variance within a few percent of it.
    p = tied_init(jax.random.key(3), 16, 512)
    np.testing.assert_allclose(float(jnp.var(p.W_enc)), 1.0 / 48.0, rtol=0.05)
    self.assertLessEqual(float(jnp.max(jnp.abs(p.W_enc))), 0.25)

  def test_dtype(self):
    p = tied_init(jax.random.key(0), 3, 4, jnp.bfloat16)
    for leaf in p:
      self.assertEqual(leaf.dtype, jnp.bfloat16)

  @parameterized.named_parameters(
      ("d_model_zero", dict(d_model=0, d_sae=4), "d_model"),
      ("d_model_float", dict(d_model=3.0, d_sae=4), "d_model"),
      ("d_sae_negative", dict(d_model=3, d_sae=-1), "d_sae"),
      ("d_sae_bool", dict(d_model=3, d_sae=True), "d_sae"),
      ("int_dtype", dict(d_model=3, d_sae=4, dtype=jnp.int32), "dtype"),
  )
  def test_bad_arguments_raise(self, kwargs, name):
    with self.assertRaisesRegex(ValueError, name):
      tied_init(jax.random.key(0), **kwargs)


def _objective(points, y):
  return float(jnp.sum(jnp.linalg.norm(points - y, axis=1)))


class GeometricMedianTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_collinear_gives_middle_point(self):
    # On a line the geometric median is the 1-D median of the positions along it:
    # the middle of 0, 1, 10 is 1, i.e. the point [1, 1].
    pts = jnp.array([[0.0, 0.0], [1.0, 1.0], [10.0, 10.0]])
    chex.assert_trees_all_close(self.variant(geometric_median)(pts), jnp.array([1.0, 1.0]),
                                atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_symmetric_square_gives_centre(self):
    # Corners of a square centred at (2, -1): by symmetry and strict convexity of
    # the objective the median is the centre, which is not a data point.
    pts = jnp.array([[3.0, 0.0], [1.0, 0.0], [1.0, -2.0], [3.0, -2.0]])
    chex.assert_trees_all_close(self.variant(geometric_median)(pts), jnp.array([2.0, -1.0]),
                                atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_obtuse_triangle_gives_vertex(self):
    # Fermat-Torricelli: if a triangle has an angle >= 120 degrees, the median is
    # that vertex. The angle at the origin between (1, 0) and (-1, 0.2) is ~169.
    pts = jnp.array([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.2]])
    chex.assert_trees_all_close(self.variant(geometric_median)(pts), jnp.zeros(2), atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_iterate_starting_on_a_data_point_stays_finite(self):
    # The mean of 0, 0, 0, 1, 4 (along e0) is 1: a data point, where a plain
    # Weiszfeld step divides by zero. The median is 0 (triple point).
    pts = jnp.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [4.0, 0.0]])
    out = self.variant(geometric_median)(pts)
    chex.assert_tree_all_finite(out)
    chex.assert_trees_all_close(out, jnp.zeros(2), atol=1e-5)

  def test_robust_to_outlier(self):
    rng = np.random.default_rng(0)
    cluster = rng.normal(size=(31, 3)).astype(np.float32) * 0.1 + np.array([1.0, 2.0, 3.0])
    pts = jnp.asarray(np.concatenate([cluster, np.full((1, 3), 1000.0, np.float32)]))
    med = jax.jit(geometric_median)(pts)
    mean = jnp.mean(pts, axis=0)
    # One outlier among 32 points drags the mean by ~1000/32 ~ 31 per coordinate
    # while the median stays inside the cluster.
    self.assertLess(float(jnp.linalg.norm(med - jnp.array([1.0, 2.0, 3.0]))), 0.2)
    self.assertGreater(float(jnp.linalg.norm(mean - jnp.array([1.0, 2.0, 3.0]))), 40.0)

  def test_minimises_sum_of_distances(self):
    rng = np.random.default_rng(1)
    pts = jnp.asarray(rng.standard_cauchy(size=(40, 4)).astype(np.float32))
    med = geometric_median(pts, num_iters=500)
    best = _objective(pts, med)
    self.assertLess(best, _objective(pts, jnp.mean(pts, axis=0)))
    for direction in np.eye(4, dtype=np.float32):
      for sign in (1.0, -1.0):
        self.assertLessEqual(best, _objective(pts, med + sign * 1e-2 * direction) + 1e-4)

  def test_degenerate_sets(self):
    chex.assert_trees_all_close(geometric_median(jnp.array([[3.0, -2.0]])),
                                jnp.array([3.0, -2.0]))
    chex.assert_trees_all_close(geometric_median(jnp.full((4, 3), 7.0)), jnp.full(3, 7.0))

  def test_bfloat16_input_keeps_dtype(self):
    pts = jnp.array([[0.0, 0.0], [1.0, 1.0], [10.0, 10.0]], jnp.bfloat16)
    out = geometric_median(pts)
    self.assertEqual(out.dtype, jnp.bfloat16)
    chex.assert_trees_all_close(out.astype(jnp.float32), jnp.ones(2), atol=1e-2)

  def test_num_iters_is_a_cap(self):
    # With one iteration from the mean (11/3, 11/3) the result is a single
    # Weiszfeld step, not yet the median [1, 1].
    pts = jnp.array([[0.0, 0.0], [1.0, 1.0], [10.0, 10.0]])
    one = geometric_median(pts, num_iters=1)
    self.assertGreater(float(jnp.linalg.norm(one - jnp.ones(2))), 0.1)
    jitted = jax.jit(functools.partial(geometric_median, num_iters=1))
    chex.assert_trees_all_close(jitted(pts), one, atol=1e-6)

  def test_bad_arguments_raise(self):
    with self.assertRaisesRegex(ValueError, r"points.*\(3,\)"):
      geometric_median(jnp.zeros(3))
    with self.assertRaisesRegex(ValueError, r"points.*\(0, 2\)"):
      geometric_median(jnp.zeros((0, 2)))
    with self.assertRaisesRegex(ValueError, "num_iters.*0"):
      geometric_median(jnp.zeros((2, 2)), num_iters=0)
    with self.assertRaisesRegex(ValueError, "num_iters.*2.5"):
      geometric_median(jnp.zeros((2, 2)), num_iters=2.5)
    with self.assertRaisesRegex(ValueError, "eps.*0"):
      geometric_median(jnp.zeros((2, 2)), eps=0.0)


if __name__ == "__main__":
  absltest.main()

"""Tests for sae_jax.evaluation.evaluate (batch statistics, evaluate_sae, fidelity) and plots."""

import functools
import pathlib
import tempfile
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from sae_jax import metrics
from sae_jax import model
from sae_jax.data import bert
from sae_jax.data import minilm
from sae_jax.data.store import StoreStats
from sae_jax.evaluation import evaluate
from sae_jax.evaluation import plots
from sae_jax.params import SAEParams, tied_init

# Three tokens worked through by hand below; the identity SAE's features 0..3 are the
# positive parts of the four dimensions and features 4..7 the negative parts.
X = np.array([[1.0, -1.0, 0.0, 0.0], [2.0, -1.0, 3.0, 0.0], [1.0, -2.0, -1.0, 4.0]],
             np.float32)


def _identity(d, decoder_scale=1.0):
  """W_enc = [I, -I], W_dec = [I; -I]: relu codes [x+, x-] decode to x exactly."""
  eye = np.eye(d, dtype=np.float32)
  return SAEParams(jnp.asarray(np.concatenate([eye, -eye], 1)), jnp.zeros(2 * d),
                   jnp.asarray(np.concatenate([eye, -eye], 0) * decoder_scale), jnp.zeros(d))


def _relu_cfg(d):
  return model.SAEConfig(d_model=d, d_sae=2 * d, allocation="relu")


class BatchStatisticsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_identity_golden(self):
    stats = self.variant(functools.partial(evaluate.batch_statistics, cfg=_relu_cfg(4)))(
        _identity(4), jnp.asarray(X))
    self.assertEqual(float(stats.squared_error), 0.0)
    # Column sums of squares around the means 4/3, -4/3, 2/3, 4/3:
    # 6/9 + 6/9 + 78/9 + 96/9 = 62/3.
    np.testing.assert_allclose(stats.centred_sum_sq, 62 / 3, rtol=1e-6)
    np.testing.assert_array_equal(stats.x_sum, [4.0, -4.0, 2.0, 4.0])
    # Non-zero entries per row: 2, 3 and 4.
    np.testing.assert_array_equal(stats.l0_histogram, [0, 0, 1, 1, 1, 0, 0, 0, 0])
    # Positive parts fire on 3, 0, 1, 1 tokens; negative parts on 0, 3, 1, 0.
    np.testing.assert_array_equal(stats.fire_counts, [3, 0, 1, 1, 0, 3, 1, 0])
    self.assertEqual(stats.l0_histogram.dtype, jnp.int32)
    # 1 + 1 + 4 + 1 + 9 + 1 + 4 + 1 + 16 = 38; an exact reconstruction leaves no residual,
    # and every token lies off the batch mean.
    self.assertEqual(float(stats.x_sum_sq), 38.0)
    np.testing.assert_array_equal(stats.residual_sum, np.zeros(4))
    self.assertEqual(float(stats.residual_centred_sum_sq), 0.0)
    self.assertEqual(float(stats.per_token_fvu_sum), 0.0)
    self.assertEqual(int(stats.per_token_count), 3)
    one = self.variant(functools.partial(evaluate.batch_statistics, cfg=_relu_cfg(4)))(
        _identity(4, decoder_scale=0.5), jnp.asarray(X[:1]))
    self.assertEqual(int(one.per_token_count), 0)  # A one-token batch has no ratio.
    self.assertEqual(float(one.per_token_fvu_sum), 0.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_fire_threshold_and_thresholded_path_golden(self):
    fn = self.variant(functools.partial(evaluate.batch_statistics, cfg=_relu_cfg(4)))
    # Codes above 1.5: none in row 0; x0+ = 2 and x2+ = 3 in row 1; x1- = 2, x3+ = 4 in row 2.
    stats = fn(_identity(4), jnp.asarray(X), fire_threshold=1.5)
    np.testing.assert_array_equal(stats.l0_histogram[:3], [1, 0, 2])
    np.testing.assert_array_equal(stats.fire_counts, [1, 0, 1, 1, 0, 1, 0, 0])
    self.assertEqual(float(stats.squared_error), 0.0)  # The allocation is still ReLU.
    # Thresholding at 1.5 drops the other codes: recon rows [0, 0, 0, 0], [2, 0, 3, 0] and
    # [0, -2, 0, 4] miss X by 1 + 1, 1 and 1 + 1: squared error 5.
    thr = fn(_identity(4), jnp.asarray(X), threshold=jnp.full(8, 1.5))
    self.assertEqual(float(thr.squared_error), 5.0)
    np.testing.assert_array_equal(thr.fire_counts, stats.fire_counts)

  def test_threshold_zero_equals_relu_allocation(self):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(7, 4)), jnp.float32)
    fn = jax.jit(evaluate.batch_statistics, static_argnames="cfg")
    chex.assert_trees_all_equal(fn(_identity(4), x, cfg=_relu_cfg(4)),
                                fn(_identity(4), x, cfg=_relu_cfg(4), threshold=0.0))

  def test_traced_thresholds_do_not_recompile(self):
    cfg = model.SAEConfig(d_model=4, d_sae=8, allocation="mutual_choice", k=2)
    params = tied_init(jax.random.key(0), 4, 8)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fn(params, x, threshold, fire_threshold):
      return evaluate.batch_statistics(params, x, cfg, threshold, fire_threshold)

    chex.clear_trace_counter()
    for value in (0.0, 0.1, 0.25):
      stats = fn(params, jnp.asarray(X), jnp.full(8, value), jnp.float32(value))
      self.assertEqual(int(stats.l0_histogram.sum()), 3)


class NormalizationTest(parameterized.TestCase):

  def test_accepted_forms(self):
    norm = evaluate.as_normalization({"mean": 1.0, "scale": 2.0}, 3)
    np.testing.assert_array_equal(norm.mean, [1.0, 1.0, 1.0])
    self.assertEqual(norm.scale.shape, ())
    stats = StoreStats(mean=np.array([1.0, 2.0, 3.0, 4.0]), norm_mean=4.0)
    # x / norm_mean * sqrt(d) with d = 4: scale = 4 / 2 = 2.
    scaled = evaluate.normalization_from_stats(stats)
    np.testing.assert_array_equal(scaled.mean, 0.0)
    self.assertEqual(float(scaled.scale), 2.0)
    centred = evaluate.normalization_from_stats(stats, center=True, rescale=False)
    np.testing.assert_array_equal(centred.mean, [1.0, 2.0, 3.0, 4.0])
    self.assertEqual(float(centred.scale), 1.0)
    again = evaluate.as_normalization(centred, 4)  # An object with .mean and .scale.
    np.testing.assert_array_equal(again.mean, centred.mean)
    self.assertIsNone(evaluate.as_normalization(None, 4))

  @parameterized.parameters(
      ({"mean": 0.0}, "'mean' and a 'scale'"),
      (3.0, "'mean' and a 'scale'"),
      ({"mean": np.zeros(2), "scale": 1.0}, r"mean must be a scalar or \[d=3\].*\(2,\)"),
      ({"mean": 0.0, "scale": np.ones(2)}, r"got shapes \(3,\) and \(2,\)"),
      ({"mean": 0.0, "scale": 0.0}, "scale finite and > 0"),
      ({"mean": np.nan, "scale": 1.0}, "mean must be finite"))
  def test_rejects(self, normalization, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      evaluate.as_normalization(normalization, 3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_splice_reconstruction_undoes_normalization(self):
    h = jnp.asarray(np.random.default_rng(1).normal(size=(5, 4)) * 3 + 1, jnp.float32)
    norm = evaluate.as_normalization({"mean": np.array([1.0, -1.0, 0.5, 2.0]),
                                      "scale": np.array([2.0, 0.5, 1.0, 4.0])}, 4)
    h_hat, codes = self.variant(functools.partial(evaluate.splice_reconstruction,
                                                  cfg=_relu_cfg(4)))(_identity(4), h,
                                                                     norm=norm)
    np.testing.assert_allclose(h_hat, h, rtol=1e-6, atol=1e-6)
    sae_in = (np.asarray(h) - norm.mean) / norm.scale
    np.testing.assert_allclose(codes, np.maximum(np.concatenate([sae_in, -sae_in], 1), 0),
                               rtol=1e-6)


class EvaluateSAETest(parameterized.TestCase):

  def test_identity_golden_over_two_batches(self):
    extra = np.array([[1.0, -1.0, 1.0, 1.0]], np.float32)  # L0 4: x0+, x1-, x2+, x3+.
    out = evaluate.evaluate_sae(_identity(4), _relu_cfg(4), iter([X, extra]), num_batches=2,
                                threshold=0.0)
    self.assertEqual((out["num_batches"], out["num_tokens"]), (2, 4))
    for key in ("nmse", "fvu", "fvu_per_token", "fvu_about_zero", "fvu_centred_residual"):
      self.assertEqual(out[key], 0.0, key)
    self.assertEqual(out["explained_variance"], 1.0)
    # L0 values 2, 3, 4, 4.
    self.assertEqual(out["l0_mean"], 3.25)
    np.testing.assert_array_equal(out["l0_histogram"], [0, 0, 1, 1, 2])
    self.assertEqual(out["l0_max"], 4)
    np.testing.assert_allclose([out[f"l0_p{p}"] for p in (5, 25, 50, 75, 95)],
                               np.quantile([2, 3, 4, 4], [0.05, 0.25, 0.5, 0.75, 0.95]))
    # Fire counts [3, 0, 1, 1, 0, 3, 1, 0] + [1, 0, 1, 1, 0, 1, 0, 0] over 4 tokens.
    np.testing.assert_array_equal(out["feature_density"],
                                  [1.0, 0.0, 0.5, 0.5, 0.0, 1.0, 0.25, 0.0])
    self.assertEqual(out["dead_fraction"], 3 / 8)
    # Thresholding ReLU codes at 0 keeps exactly the ReLU allocation.
    for key in ("nmse", "fvu", "explained_variance", "fvu_per_token", "fvu_about_zero",
                "fvu_centred_residual", "l0_mean", "l0_p50", "dead_fraction",
                "underutilised_fraction", "zipf_C", "zipf_s"):
      self.assertEqual(out["threshold_" + key], out[key], key)
    np.testing.assert_array_equal(out["threshold_feature_density"], out["feature_density"])

  def test_nmse_and_fvu_pool_batches(self):
    rng = np.random.default_rng(2)
    batches = [rng.normal(size=(n, 4)).astype(np.float32) + 1.0 for n in (5, 3, 8)]
    # Halving the decoder gives recon = x / 2, so the squared error is sum(x^2) / 4.
    half = _identity(4, decoder_scale=0.5)
    out = evaluate.evaluate_sae(half, _relu_cfg(4), batches, num_batches=3,
                                dataset_mean=np.zeros(4))
    np.testing.assert_allclose(out["fvu"], 0.25, rtol=1e-6)  # Around 0 the ratio is 1/4.
    x = np.concatenate(batches).astype(np.float64)
    se = np.sum((x / 2) ** 2)
    within = sum(np.sum((b - b.mean(0)) ** 2) for b in np.split(x, [5, 8]))
    np.testing.assert_allclose(out["nmse"], se / within, rtol=1e-5)
    pooled = evaluate.evaluate_sae(half, _relu_cfg(4), iter(batches), num_batches=3)
    np.testing.assert_allclose(pooled["fvu"], se / np.sum((x - x.mean(0)) ** 2), rtol=1e-5)
    # The pooled sum of squares adds the spread of the batch means to the denominator.
    self.assertLess(pooled["fvu"], pooled["nmse"])

  @staticmethod
  def _reference_fvus(batches, recons):
    """The explained-variance variants computed directly in float64 numpy."""
    x = np.concatenate(batches).astype(np.float64)
    r = x - np.concatenate(recons).astype(np.float64)
    se = np.sum(r ** 2)
    ratios = []
    for b, rec in zip(batches, recons):
      b, rec = b.astype(np.float64), rec.astype(np.float64)
      den = np.sum((b - b.mean(0)) ** 2, 1)
      num = np.sum((b - rec) ** 2, 1)
      ratios.extend(num[den > 0] / den[den > 0])  # A one-token batch has none.
    fvu = se / np.sum((x - x.mean(0)) ** 2)
    return {"fvu": fvu, "explained_variance": 1 - fvu,
            "nmse": se / sum(np.sum((b - b.mean(0)) ** 2) for b in batches),
            "fvu_per_token": np.mean(ratios),
            "fvu_about_zero": se / np.sum(x ** 2),
            "fvu_centred_residual": np.sum(np.var(r, 0)) / np.sum(np.var(x, 0))}

  def test_fvu_variants_match_numpy_over_unequal_batches(self):
    cfg = model.SAEConfig(d_model=6, d_sae=12, allocation="relu")
    params = tied_init(jax.random.key(5), 6, 12)
    rng = np.random.default_rng(5)
    shift = rng.normal(size=6)
    batches = [(rng.normal(size=(n, 6)) * rng.uniform(0.5, 2.0, 6) + shift).astype(np.float32)
               for n in (7, 3, 1, 12)]
    theta = np.linspace(0.0, 0.4, 12).astype(np.float32)
    out = evaluate.evaluate_sae(params, cfg, batches, num_batches=4, threshold=theta)
    recons = [np.asarray(model.forward(params, jnp.asarray(b), cfg).recon) for b in batches]
    thr_recons = [np.asarray(model.decode(params, model.encode_thresholded(
        params, jnp.asarray(b), cfg, jnp.asarray(theta))[0], cfg)) for b in batches]
    for prefix, rec in (("", recons), ("threshold_", thr_recons)):
      for key, value in self._reference_fvus(batches, rec).items():
        np.testing.assert_allclose(out[prefix + key], value, rtol=2e-5, err_msg=prefix + key)
    self.assertNotAlmostEqual(out["fvu"], out["threshold_fvu"], places=3)
    # Removing the residual's mean can only lower the error: centred <= textbook.
    self.assertLessEqual(out["fvu_centred_residual"], out["fvu"])

  def test_fvu_variants_differ_for_activations_with_a_large_mean(self):
    rng = np.random.default_rng(6)
    batches = [(10.0 + rng.normal(size=(n, 4))).astype(np.float32) for n in (64, 40, 96)]
    # recon = 0.9 x: the residual 0.1 x carries the large mean.
    out = evaluate.evaluate_sae(_identity(4, decoder_scale=0.9), _relu_cfg(4), batches,
                                num_batches=3)
    reference = self._reference_fvus(batches, [0.9 * b for b in batches])
    for key, value in reference.items():
      np.testing.assert_allclose(out[key], value, rtol=2e-5, err_msg=key)
    # About zero: 0.01 |x|^2 / |x|^2, an explained variance of 0.99.
    np.testing.assert_allclose(out["fvu_about_zero"], 0.01, rtol=1e-5)
    # Var(0.1 x) / Var(x): the centred residual ignores the mean as well.
    np.testing.assert_allclose(out["fvu_centred_residual"], 0.01, rtol=1e-5)
    # Textbook: 0.01 * (100 + 1) / 1 per dimension; nothing explained.
    self.assertGreater(out["fvu"], 0.9)
    self.assertLess(out["explained_variance"], 0.1)
    self.assertGreater(out["fvu_per_token"], out["fvu"])  # Tokens near the mean dominate.

  def test_zipf_golden_and_density_curve(self):
    # Dimension j is positive on the first 12, 6, 4, 3 of 12 tokens: densities 1, 1/2,
    # 1/3, 1/4, exactly C * rank^-s with C = 1, s = 1; the negative parts never fire.
    x = (np.arange(12)[:, None] < np.array([12, 6, 4, 3])[None]).astype(np.float32)
    out = evaluate.evaluate_sae(_identity(4), _relu_cfg(4), [x], num_batches=1)
    np.testing.assert_allclose(out["feature_density"][:4], [1, 1 / 2, 1 / 3, 1 / 4], rtol=1e-12)
    self.assertEqual(out["dead_fraction"], 0.5)
    np.testing.assert_allclose([out["zipf_C"], out["zipf_s"]], [1.0, 1.0], rtol=1e-5)
    under = metrics.underutilised_features(jnp.asarray(out["feature_density"], jnp.float32),
                                           out["zipf_C"], out["zipf_s"], 1.0)
    self.assertEqual(out["underutilised_fraction"], float(np.mean(np.asarray(under))))
    self.assertGreaterEqual(out["underutilised_fraction"], out["dead_fraction"])
    ranks, curve = out["density_by_rank_rank"], out["density_by_rank"]
    self.assertEqual((ranks[0], ranks[-1]), (1, 8))
    self.assertTrue(np.all(np.diff(ranks) > 0))
    np.testing.assert_array_equal(curve, np.sort(out["feature_density"])[::-1][ranks - 1])

  def test_thresholded_path_is_per_token(self):
    cfg = model.SAEConfig(d_model=4, d_sae=8, allocation="mutual_choice", k=2)
    params = tied_init(jax.random.key(3), 4, 8)
    x = np.random.default_rng(3).normal(size=(16, 4)).astype(np.float32)
    theta = np.linspace(0.0, 0.35, 8).astype(np.float32)
    out = evaluate.evaluate_sae(params, cfg, [x[:9], x[9:]], num_batches=2, threshold=theta)
    acts = np.maximum(np.asarray(model.encode_pre(params, jnp.asarray(x), cfg)), 0)
    np.testing.assert_allclose(out["threshold_l0_mean"], np.mean(np.sum(acts > theta, 1)))
    np.testing.assert_allclose(out["threshold_feature_density"], np.mean(acts > theta, 0))
    # Mutual Choice keeps the round(2 * b) largest entries of each batch (18 and 14), so
    # min(positives, budget) of them fire.
    fired = sum(min(int(np.sum(a > 0)), 2 * len(a)) for a in (acts[:9], acts[9:]))
    self.assertEqual(out["l0_mean"] * 16, fired)

  def test_new_threshold_values_reuse_the_compilation(self):
    cfg = model.SAEConfig(d_model=4, d_sae=8, allocation="batch_topk", k=2)
    params = tied_init(jax.random.key(4), 4, 8)
    x = np.random.default_rng(4).normal(size=(11, 4)).astype(np.float32)  # A fresh shape.
    with mock.patch.object(evaluate.model, "forward", wraps=model.forward) as fwd, \
        mock.patch.object(evaluate.model, "encode_thresholded",
                          wraps=model.encode_thresholded) as thr:
      for value in (0.0, 0.2, 0.4):
        evaluate.evaluate_sae(params, cfg, [x], num_batches=1, fire_threshold=value,
                              threshold=np.full(8, value, np.float32))
    self.assertLessEqual(fwd.call_count, 1)  # Calls happen only while tracing.
    self.assertLessEqual(thr.call_count, 1)

  @parameterized.named_parameters(
      ("num_batches_zero", dict(num_batches=0), "num_batches must be an int in"),
      ("num_batches_float", dict(num_batches=2.0), r"num_batches .* got 2\.0"),
      ("num_batches_inf", dict(num_batches=np.inf), r"num_batches .* got inf"),
      ("num_batches_bool", dict(num_batches=True), "num_batches .* got True"),
      ("too_few_batches", dict(num_batches=3), "ran out after 2 batches; num_batches=3"),
      ("fire_threshold", dict(fire_threshold=-0.1), r"fire_threshold .* >= 0; got -0\.1"),
      ("fire_threshold_nan", dict(fire_threshold=np.nan), "fire_threshold .* got nan"),
      ("dataset_mean", dict(dataset_mean=np.zeros(3)), r"dataset_mean .* \[d_model=4\]"),
      ("threshold_shape", dict(threshold=np.zeros(3)), r"threshold .* \[d_sae=8\].*\(3,\)"),
      ("threshold_nan", dict(threshold=np.full(8, np.nan)), "threshold .* without NaN"),
      ("curve_points", dict(curve_points=1), r"curve_points must be an int in \[2"))
  def test_rejects_bad_arguments(self, overrides, pattern):
    kwargs = dict(num_batches=2) | overrides
    with self.assertRaisesRegex(ValueError, pattern):
      evaluate.evaluate_sae(_identity(4), _relu_cfg(4), [X, X], **kwargs)

  def test_rejects_bad_batch(self):
    with self.assertRaisesRegex(ValueError, r"batch 1 must have shape \[b >= 1, d_model=4\]"):
      evaluate.evaluate_sae(_identity(4), _relu_cfg(4), [X, X[:, :3]], num_batches=2)


TINY = bert.BertConfig(vocab_size=13, hidden_size=8, num_layers=2, num_heads=2,
                       intermediate_size=16, max_position=12)


def _tiny_bert(seed=0):
  rng = np.random.default_rng(seed)
  d, i, n = TINY.hidden_size, TINY.intermediate_size, TINY.num_layers
  dense = lambda a, b: {"kernel": rng.normal(size=(n, a, b)) * 0.5, "bias": rng.normal(size=(n, b))}
  norm = lambda *lead: {"scale": 1 + 0.1 * rng.normal(size=(*lead, d)),
                        "bias": 0.1 * rng.normal(size=(*lead, d))}
  params = {"embeddings": {"word": rng.normal(size=(13, d)), "position": rng.normal(size=(12, d)),
                           "token_type": rng.normal(size=(2, d)), "norm": norm()},
            "layers": {"query": dense(d, d), "key": dense(d, d), "value": dense(d, d),
                       "attn_out": dense(d, d), "mlp_in": dense(d, i), "mlp_out": dense(i, d),
                       "attn_norm": norm(n), "mlp_norm": norm(n)}}
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)


TINY_IDS = np.array([[1, 5, 7, 2, 0, 0], [1, 3, 4, 9, 11, 2], [0, 0, 0, 0, 0, 0]], np.int32)
TINY_MASK = (np.arange(6)[None] < np.array([[4], [6], [0]])).astype(np.int32)


class TinyFidelityTest(parameterized.TestCase):

  def test_last_layer_goldens(self):
    params, mean = _tiny_bert(), np.linspace(-1.0, 1.0, 8).astype(np.float32)
    out = evaluate.fidelity(_identity(8), _relu_cfg(8), params, TINY, TINY_IDS, TINY_MASK, 2,
                            batch_size=2, threshold=0.0, mean_activation=mean)
    self.assertEqual(out["num_windows"], 2)  # The empty third window does not count.
    self.assertEqual(out["num_tokens"], 10)
    # Replacing the last layer's real tokens by zeros makes every pooled embedding 0.
    self.assertEqual(out["cos_zero"], 0.0)
    self.assertEqual(out["fidelity_recovered_zero"], 1.0)
    self.assertGreater(out["cos_sae"], 1 - 1e-6)
    self.assertGreater(out["threshold_fidelity_recovered"], 0.999)
    self.assertLess(out["nmse"], 1e-10)
    # With the mean in every real position, each pooled embedding is mean / |mean|.
    clean = bert.sentence_embedding(
        bert.bert_forward(params, TINY, TINY_IDS[:2], TINY_MASK[:2]).last_hidden, TINY_MASK[:2])
    expected = np.asarray(clean, np.float64) @ (mean / np.linalg.norm(mean))
    np.testing.assert_allclose(out["cos_mean"], expected.mean(), rtol=1e-5)

  @parameterized.named_parameters(
      ("shapes", dict(mask=TINY_MASK[:2]), r"ids and mask must be \[n, t\] of one shape"),
      ("width", dict(cfg=_relu_cfg(4)), "cfg.d_model=4 must equal bert_cfg.hidden_size=8"),
      ("layer", dict(layer=3), r"layer must be an int in \[0, 2\]; got 3"),
      ("batch_size", dict(batch_size=0), "batch_size must be an int in"),
      ("empty", dict(mask=np.zeros_like(TINY_MASK)), "mask holds no real token"),
      ("threshold", dict(threshold=np.zeros(3)), r"threshold .* \[d_sae=16\]"),
      ("mean", dict(mean_activation=np.zeros(3)), r"mean_activation must have shape \[8\]"),
      ("normalization", dict(normalization={"mean": 0.0}), "normalization must have"))
  def test_rejects_bad_arguments(self, overrides, pattern):
    kwargs = dict(sae_params=_identity(8), cfg=_relu_cfg(8), bert_params={}, bert_cfg=TINY,
                  ids=TINY_IDS, mask=TINY_MASK, layer=1) | overrides
    with self.assertRaisesRegex(ValueError, pattern):
      evaluate.fidelity(**kwargs)


@functools.lru_cache(maxsize=None)
def _real_minilm():
  for module in ("safetensors", "tokenizers", minilm.PACKAGE):
    pytest.importorskip(module)
  params, cfg = minilm.load_minilm()
  ids, mask = minilm.text_windows(minilm.load_tokenizer(), [
      "The weather is lovely today and we went for a long walk in the park.",
      "A man is playing a guitar on the street corner.", "Stock markets fell sharply."],
                                  window=24)
  return params, cfg, ids, mask


class MiniLMFidelityTest(parameterized.TestCase):

  def test_identity_sae_recovers_everything_and_ablations_hurt(self):
    params, cfg, ids, mask = _real_minilm()
    d = cfg.hidden_size
    self.assertEqual(ids.shape, (3, 24))  # 18, 13 and 7 real tokens.
    norm = {"mean": np.linspace(-0.5, 0.5, d), "scale": 2.0}
    out = evaluate.fidelity(_identity(d), _relu_cfg(d), params, cfg, ids, mask, 3,
                            normalization=norm, threshold=0.0, batch_size=2)
    self.assertEqual((out["num_windows"], out["num_tokens"]), (3, 38))
    self.assertLess(out["cos_zero"], 0.5)  # Observed 0.08.
    self.assertLess(out["cos_mean"], 0.5)  # Observed 0.21.
    self.assertGreater(out["fidelity_recovered"], 0.999)
    self.assertGreater(out["fidelity_recovered_zero"], 0.999)
    self.assertGreater(out["threshold_fidelity_recovered"], 0.999)
    self.assertLess(out["nmse"], 1e-8)
    self.assertEqual(out["l0_mean"], d)  # Every feature pair has exactly one live side.

  def test_untrained_sae_recovers_much_less(self):
    params, cfg, ids, mask = _real_minilm()
    d = cfg.hidden_size
    sae_cfg = model.SAEConfig(d_model=d, d_sae=4 * d, allocation="mutual_choice", k=16)
    out = evaluate.fidelity(tied_init(jax.random.key(0), d, 4 * d), sae_cfg, params, cfg, ids,
                            mask, 3, batch_size=2, threshold=0.3)
    self.assertLess(out["fidelity_recovered"], 0.6)  # Observed 0.24.
    self.assertLess(out["fidelity_recovered_zero"], 0.6)  # Observed 0.35.
    self.assertGreater(out["nmse"], 0.5)
    # Mutual Choice keeps round(16 * b) codes of every batch of b real tokens; batches
    # of 31 and 7 tokens give 496 + 112 codes, at most that many positive.
    self.assertLessEqual(out["l0_mean"] * 38, 608 + 1e-9)
    self.assertLess(out["threshold_fidelity_recovered"], 0.9)  # Observed 0.66.


class PlotsTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(tempfile.mkdtemp())

  def _check_png(self, path):
    self.assertTrue(path.is_file())
    self.assertEqual(path.read_bytes()[:8], b"\x89PNG\r\n\x1a\n")
    self.assertGreater(path.stat().st_size, 1000)

  def test_figures_are_written(self):
    densities = {"topk": np.array([0.5, 0.2, 0.1, 0.0]), "mc": np.array([0.3, 0.3, 0.2, 0.1])}
    self._check_png(plots.plot_density_vs_rank(densities, {"topk": (0.5, 1.0)},
                                               self.dir / "a" / "density.png"))
    self._check_png(plots.plot_l0_histograms({"topk": np.array([0, 1, 3])}, self.dir / "l0.png"))
    points = [dict(strategy="topk", aux_loss="none", l0_mean=3.0, nmse=0.2),
              dict(strategy="mutual_choice", aux_loss="aux_zipf", l0_mean=3.1, nmse=0.1)]
    self._check_png(plots.plot_nmse_vs_l0(points, self.dir / "nmse.png"))
    rows = [dict(p, dead_fraction=0.3, underutilised_fraction=0.5) for p in points]
    self._check_png(plots.plot_dead_fraction(rows, self.dir / "dead.png"))
    self._check_png(plots.plot_dead_fraction([dict(points[0], dead_fraction=0.0)],
                                             self.dir / "dead_only.png"))

  def test_rejects_bad_input(self):
    p, good = self.dir / "x.png", dict(strategy="a", aux_loss="none", l0_mean=1.0, nmse=0.1)
    cases = [
        (lambda: plots.plot_density_vs_rank({"a": np.ones(3)}, None, self.dir / "x.jpg"),
         "must end in .png"),
        (lambda: plots.plot_density_vs_rank({}, None, p), "densities_by_run must not be empty"),
        (lambda: plots.plot_density_vs_rank({"a": np.zeros(3)}, None, p), "every feature is dead"),
        (lambda: plots.plot_density_vs_rank({"a": -np.ones(3)}, None, p), r"finite values >= 0"),
        (lambda: plots.plot_density_vs_rank({"a": np.ones(3)}, {"b": (1, 1)}, p),
         r"labels \['b'\]"),
        (lambda: plots.plot_density_vs_rank({"a": np.ones(3)}, {"a": (0.0, 1)}, p),
         "C must be > 0"),
        (lambda: plots.plot_density_vs_rank({"a": np.ones(3)}, {"a": (1.0, np.nan)}, p),
         r"fits\['a'\] s must be a finite number"),
        (lambda: plots.plot_l0_histograms({"a": np.zeros(3)}, p), "positive total"),
        (lambda: plots.plot_l0_histograms({}, p), "l0_by_run must not be empty"),
        (lambda: plots.plot_dead_fraction([{"strategy": "a", "aux_loss": "none"}], p),
         r"rows\[0\] lacks the keys \['dead_fraction'\]"),
        (lambda: plots.plot_nmse_vs_l0([], p), "points must not be empty"),
        (lambda: plots.plot_nmse_vs_l0([{"strategy": "a"}], p), r"points\[0\] lacks the keys"),
        (lambda: plots.plot_nmse_vs_l0([dict(good, nmse=np.inf)], p), r"points\[0\]\['nmse'\]"),
        (lambda: plots.plot_dead_fraction([dict(good, dead_fraction=1.5)], p), r"\[0, 1\]"),
        (lambda: plots.plot_dead_fraction(
            [dict(good, dead_fraction=0.1, underutilised_fraction=0.2),
             dict(good, dead_fraction=0.1)], p), r"in every row or in none; rows \[1\]"),
    ]
    for fn, pattern in cases:
      with self.subTest(pattern=pattern), self.assertRaisesRegex(ValueError, pattern):
        fn()
    self.assertFalse(p.exists())

  def test_field_figures_are_written(self):
    rows = [dict(strategy=s, k=k, seed=seed, l0_mean=k * (1 + 0.05 * seed),
                 fvu=0.5 / k + 0.01 * seed)
            for s in ("topk", "mutual_choice") for k in (4, 16, 64) for seed in range(3)]
    rows.append(dict(strategy="feature_choice", k=8, seed=0, l0_mean=8.0, fvu=0.1))
    self._check_png(plots.plot_fvu_vs_l0_pareto(rows, self.dir / "pareto.png"))
    self._check_png(plots.plot_fvu_vs_l0_pareto(
        [dict(r, explained_variance=1 - r["fvu"]) for r in rows], self.dir / "ev.png",
        y="explained_variance", title="synthetic: explained variance vs L0"))
    spike = np.zeros(40)
    spike[16] = 1000  # TopK: every token at L0 = k.
    spread = np.bincount(np.random.default_rng(0).poisson(16, 1000), minlength=40)[:40]
    self._check_png(plots.plot_l0_distributions({"topk": spike, "mc": spread},
                                                self.dir / "l0_panels.png"))
    self._check_png(plots.plot_l0_distributions({"mc": spread}, self.dir / "l0_log.png",
                                                log_y=True))
    curves = {"topk": [dict(tokens=t, fvu=1 / (1 + t), dead_fraction=0.1) for t in range(5)],
              # Logged at other intervals: entries may lack a key or hold None.
              "mc": [dict(tokens=4, fvu=0.2), dict(tokens=0, fvu=0.9, dead_fraction=None),
                     dict(tokens=2, dead_fraction=0.0)]}
    self._check_png(plots.plot_training_curves(curves, self.dir / "curves.png"))
    self._check_png(plots.plot_training_curves(curves, self.dir / "fvu.png", keys=("fvu",)))

  def test_field_figures_reject_bad_input(self):
    p, row = self.dir / "y.png", dict(strategy="topk", k=4, l0_mean=4.0, fvu=0.2)
    curve = [dict(tokens=0, fvu=0.5, dead_fraction=0.0)]
    cases = [
        (lambda: plots.plot_fvu_vs_l0_pareto([], p), "rows must not be empty"),
        (lambda: plots.plot_fvu_vs_l0_pareto([{"strategy": "a", "l0_mean": 1.0, "fvu": 0.1}], p),
         r"rows\[0\] lacks the keys \['k'\]"),
        (lambda: plots.plot_fvu_vs_l0_pareto([dict(row, l0_mean=0.0)], p),
         r"rows\[0\]\['l0_mean'\] must be > 0 to draw on a log axis"),
        (lambda: plots.plot_fvu_vs_l0_pareto([dict(row, fvu=np.nan)], p),
         r"rows\[0\]\['fvu'\] must be a finite number"),
        (lambda: plots.plot_fvu_vs_l0_pareto([row], p, y="l0_mean"), "four distinct"),
        (lambda: plots.plot_fvu_vs_l0_pareto([row], self.dir / "y.svg"), "must end in .png"),
        (lambda: plots.plot_fvu_vs_l0_pareto([row], p, title=" "), "title must be a non-empty"),
        (lambda: plots.plot_l0_distributions({}, p), "l0_histograms_by_run must not be empty"),
        (lambda: plots.plot_l0_distributions({"a": np.zeros(3)}, p), "positive total"),
        (lambda: plots.plot_l0_distributions({"a": np.ones((2, 2))}, p),
         r"l0_histograms_by_run\['a'\] must be 1-D"),
        (lambda: plots.plot_training_curves({}, p), "curves_by_run must not be empty"),
        (lambda: plots.plot_training_curves({"a": []}, p), r"curves_by_run\['a'\] must not be"),
        (lambda: plots.plot_training_curves({"a": {"tokens": 0}}, p), "must be a list of dicts"),
        (lambda: plots.plot_training_curves({"a": [{"fvu": 0.1}]}, p),
         r"curves_by_run\['a'\]\[0\] lacks the keys \['tokens'\]"),
        (lambda: plots.plot_training_curves({"a": [dict(tokens=-1, fvu=0.1)]}, p),
         r"\['tokens'\] must be a finite number >= 0"),
        (lambda: plots.plot_training_curves({"a": [dict(tokens=0, fvu=np.inf)]}, p),
         r"curves_by_run\['a'\]\[0\]\['fvu'\] must be a finite number"),
        (lambda: plots.plot_training_curves({"a": curve}, p, keys="fvu"), "keys must be"),
        (lambda: plots.plot_training_curves({"a": curve}, p, keys=("fvu", "fvu")), "distinct"),
        (lambda: plots.plot_training_curves({"a": curve}, p, keys=("fvu", "l0_mean")),
         r"no run has a value for keys \['l0_mean'\]"),
    ]
    for fn, pattern in cases:
      with self.subTest(pattern=pattern), self.assertRaisesRegex(ValueError, pattern):
        fn()
    self.assertFalse(p.exists())

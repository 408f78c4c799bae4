"""Tests for sae_jax.model: config validation, allocation dispatch, forward pass, module."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from flax import nnx

from sae_jax import allocation
from sae_jax.model import (
    ALLOCATIONS,
    SAE,
    SAEConfig,
    SAEOutput,
    allocate,
    decode,
    encode,
    encode_pre,
    encode_thresholded,
    feature_capacities,
    forward,
    inference_codes,
)
from sae_jax.params import SAEParams, tied_init

D, F, B = 4, 8, 6


def _cfg(allocation_name, k=2, **kwargs):
  return SAEConfig(d_model=D, d_sae=F, allocation=allocation_name, k=k, **kwargs)


def _inputs(seed=0, b=B):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(b, D)), jnp.float32)
  params = tied_init(jax.random.key(seed), D, F)
  # A non-zero encoder bias spreads the number of positive pre-activations.
  params = params._replace(b_enc=jnp.asarray(rng.normal(size=(F,)) * 0.3, jnp.float32),
                           b_dec=jnp.asarray(rng.normal(size=(D,)) * 0.1, jnp.float32))
  return params, x


def _identity_params(d, f):
  """W_enc = [I | 0]: with zero biases, pre equals x padded with zero columns."""
  return SAEParams(
      W_enc=jnp.eye(d, f), b_enc=jnp.zeros(f), W_dec=jnp.eye(f, d), b_dec=jnp.zeros(d))


class SAEConfigTest(parameterized.TestCase):

  def test_hashable_and_dtype_spelling_canonical(self):
    a = SAEConfig(d_model=3, d_sae=5, k=2, dtype="bfloat16")
    b = SAEConfig(d_model=3, d_sae=5, k=2, dtype=jnp.bfloat16)
    self.assertEqual(a, b)
    self.assertEqual(hash(a), hash(b))
    self.assertEqual(a.dtype, jnp.dtype(jnp.bfloat16))
    self.assertEqual(a.param_dtype, jnp.dtype(jnp.float32))
    self.assertNotEqual(a, SAEConfig(d_model=3, d_sae=5, k=3, dtype="bfloat16"))

  def test_defaults(self):
    cfg = SAEConfig(d_model=16, d_sae=64)
    self.assertEqual((cfg.allocation, cfg.k, cfg.zipf_exponent, cfg.select_on,
                      cfg.l1_coefficient), ("topk", 32, 1.0, "relu", 0.0))

  def test_relu_ignores_k(self):
    # k is not used by the ReLU baseline, so the default k=32 need not fit d_sae.
    cfg = SAEConfig(d_model=3, d_sae=5, allocation="relu", l1_coefficient=1e-3)
    self.assertEqual(cfg.d_sae, 5)

  def test_fractional_k_allowed_for_batch_rules(self):
    for name in ("batch_topk", "mutual_choice", "feature_choice", "feature_choice_zipf"):
      self.assertEqual(SAEConfig(d_model=3, d_sae=5, allocation=name, k=1.5).k, 1.5)

  @parameterized.named_parameters(
      ("d_model_zero", dict(d_model=0, d_sae=4, k=1), "d_model.*0"),
      ("d_model_float", dict(d_model=4.0, d_sae=4, k=1), "d_model.*4.0"),
      ("d_sae_bool", dict(d_model=4, d_sae=True, k=1), "d_sae.*True"),
      ("d_sae_negative", dict(d_model=4, d_sae=-2, k=1), "d_sae.*-2"),
      ("allocation", dict(d_model=4, d_sae=4, k=1, allocation="moe"), "allocation.*'moe'"),
      ("k_zero", dict(d_model=4, d_sae=4, k=0), r"k.*0 < k <= d_sae=4.*got 0"),
      ("k_above_d_sae", dict(d_model=4, d_sae=4, k=5), r"k.*d_sae=4.*got 5"),
      ("k_nan", dict(d_model=4, d_sae=4, k=float("nan")), "k.*nan"),
      ("k_string", dict(d_model=4, d_sae=4, k="2"), "k.*'2'"),
      ("k_fractional_topk", dict(d_model=4, d_sae=4, k=2.5), "k.*integer.*topk.*2.5"),
      ("zipf_negative", dict(d_model=4, d_sae=4, k=1, zipf_exponent=-1.0),
       "zipf_exponent.*-1.0"),
      ("l1_negative", dict(d_model=4, d_sae=4, k=1, l1_coefficient=-0.1),
       "l1_coefficient.*-0.1"),
      ("l1_inf", dict(d_model=4, d_sae=4, k=1, l1_coefficient=float("inf")),
       "l1_coefficient.*inf"),
      ("select_on", dict(d_model=4, d_sae=4, k=1, select_on="abs"), "select_on.*'abs'"),
      ("dtype_int", dict(d_model=4, d_sae=4, k=1, dtype=jnp.int32), "dtype.*floating"),
      ("param_dtype_bad", dict(d_model=4, d_sae=4, k=1, param_dtype="not-a-dtype"),
       "param_dtype.*not-a-dtype"),
  )
  def test_invalid_raises(self, kwargs, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      SAEConfig(**kwargs)


class AllocateGoldenTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_topk_select_on(self):
    # Row [-3, -1, 1, -2], k = 2. Over relu scores [0, 0, 1, 0] the tie among the
    # zeros goes to the lowest column (0); over raw scores the runner-up is -1 (col 1).
    pre = jnp.array([[-3.0, -1.0, 1.0, -2.0], [4.0, 3.0, -1.0, 5.0]])
    on_relu = self.variant(functools.partial(
        allocate, cfg=SAEConfig(d_model=2, d_sae=4, k=2, select_on="relu")))(pre)
    on_raw = self.variant(functools.partial(
        allocate, cfg=SAEConfig(d_model=2, d_sae=4, k=2, select_on="raw")))(pre)
    np.testing.assert_array_equal(on_relu, [[1, 0, 1, 0], [1, 0, 0, 1]])
    np.testing.assert_array_equal(on_raw, [[0, 1, 1, 0], [1, 0, 0, 1]])

  @chex.variants(with_jit=True, without_jit=True)
  def test_mutual_choice_versus_topk(self):
    # k = 1 over 2 tokens: Mutual Choice keeps the 2 largest entries of the matrix
    # (5 and 4, both in row 0); TopK keeps the largest of each row.
    pre = jnp.array([[5.0, 4.0], [1.0, 0.5]])
    mc = self.variant(functools.partial(
        allocate, cfg=SAEConfig(d_model=2, d_sae=2, allocation="mutual_choice", k=1)))(pre)
    tk = self.variant(functools.partial(
        allocate, cfg=SAEConfig(d_model=2, d_sae=2, allocation="topk", k=1)))(pre)
    np.testing.assert_array_equal(mc, [[1, 1], [0, 0]])
    np.testing.assert_array_equal(tk, [[1, 0], [1, 0]])

  @chex.variants(with_jit=True, without_jit=True)
  def test_feature_choice(self):
    # b = 3, f = 2, k = 1: total 3 split uniformly as [2, 1] (remainder to the first
    # feature). Column 0 keeps its 2 best rows (5 and 3), column 1 its best (6).
    pre = jnp.array([[5.0, 4.0], [1.0, 0.5], [3.0, 6.0]])
    fc = self.variant(functools.partial(
        allocate, cfg=SAEConfig(d_model=2, d_sae=2, allocation="feature_choice", k=1)))(pre)
    np.testing.assert_array_equal(fc, [[1, 0], [0, 0], [1, 1]])

  @chex.variants(with_jit=True, without_jit=True)
  def test_relu_keeps_positive(self):
    pre = jnp.array([[1.0, -1.0, 0.0], [0.5, 2.0, -3.0]])
    mask = self.variant(functools.partial(
        allocate, cfg=SAEConfig(d_model=2, d_sae=3, allocation="relu")))(pre)
    np.testing.assert_array_equal(mask, [[1, 0, 0], [1, 1, 0]])

  def test_golden_forward(self):
    # Identity encoder/decoder on d = f = 3 with k = 1 (TopK): pre = x, the
    # largest entry of each row survives and is copied to the reconstruction.
    cfg = SAEConfig(d_model=3, d_sae=3, k=1)
    x = jnp.array([[0.5, -2.0, 1.5], [3.0, 1.0, -1.0]])
    out = jax.jit(functools.partial(forward, cfg=cfg))(_identity_params(3, 3), x)
    expected = jnp.array([[0.0, 0.0, 1.5], [3.0, 0.0, 0.0]])
    chex.assert_trees_all_close(out.codes, expected)
    chex.assert_trees_all_close(out.recon, expected)
    chex.assert_trees_all_close(out.pre, x)


class ForwardTest(parameterized.TestCase):

  @parameterized.parameters(
      *[(name, sel) for name in ALLOCATIONS for sel in ("relu", "raw")])
  def test_shapes_counts_and_codes(self, name, select_on):
    k = 1.5 if name not in ("topk", "relu") else 2
    cfg = _cfg(name, k=k, select_on=select_on)
    params, x = _inputs(1)
    out = jax.jit(functools.partial(forward, cfg=cfg))(params, x)
    self.assertIsInstance(out, SAEOutput)
    chex.assert_shape((out.recon, out.codes, out.pre, out.mask), ((B, D), (B, F), (B, F), (B, F)))
    self.assertEqual(out.mask.dtype, jnp.bool_)
    mask = np.asarray(out.mask)
    pre = np.asarray(out.pre)
    if name == "topk":
      np.testing.assert_array_equal(mask.sum(axis=1), np.full(B, 2))
    elif name in ("batch_topk", "mutual_choice"):
      self.assertEqual(int(mask.sum()), 9)  # round(1.5 * 6)
    elif name == "feature_choice":
      np.testing.assert_array_equal(mask.sum(axis=0), allocation.zipf_capacities(F, 9, 0.0))
    elif name == "feature_choice_zipf":
      # 9 slots over 8 features: every feature gets at least 1 (the plain 1/r split
      # would round ranks 7-8 to 0).
      np.testing.assert_array_equal(
          mask.sum(axis=0),
          allocation.zipf_capacities(F, 9, 1.0, max_capacity=B, min_capacity=1))
      self.assertEqual(int(mask.sum(axis=0).min()), 1)
    else:
      np.testing.assert_array_equal(mask, pre > 0)
      self.assertGreater(int(mask.sum()), 0)
    codes = np.asarray(out.codes)
    np.testing.assert_array_equal(codes[~mask], 0.0)
    np.testing.assert_array_equal(codes[mask], np.maximum(pre[mask], 0.0))
    recon = codes @ np.asarray(params.W_dec) + np.asarray(params.b_dec)
    np.testing.assert_allclose(np.asarray(out.recon), recon, atol=1e-5)
    pre_ref = (np.asarray(x) - np.asarray(params.b_dec)) @ np.asarray(params.W_enc)
    np.testing.assert_allclose(pre, pre_ref + np.asarray(params.b_enc), atol=1e-5)

  def test_feature_capacities(self):
    uniform = feature_capacities(_cfg("feature_choice", k=1.5), 6)
    np.testing.assert_array_equal(uniform, [2, 1, 1, 1, 1, 1, 1, 1])
    zipf = feature_capacities(_cfg("feature_choice_zipf", k=2, zipf_exponent=1.0), 2)
    # Total 4 over weights 1/r, r = 1..8 capped at b = 2: the head is pinned.
    self.assertEqual(int(zipf.sum()), 4)
    self.assertLessEqual(int(zipf.max()), 2)
    self.assertTrue(np.all(np.diff(zipf) <= 0))
    with self.assertRaisesRegex(ValueError, "allocation.*'topk'"):
      feature_capacities(_cfg("topk"), 6)

  def test_zipf_capacities_leave_no_feature_without_capacity(self):
    # k * b = 4096 slots over 1536 features: the plain 1/r split rounds 451 of them to 0,
    # which would make them dead by construction.
    cfg = SAEConfig(d_model=4, d_sae=1536, allocation="feature_choice_zipf", k=8)
    caps = feature_capacities(cfg, 512)
    self.assertEqual(int(caps.sum()), 8 * 512)
    self.assertEqual(int(caps.min()), 1)
    self.assertLessEqual(int(caps.max()), 512)
    self.assertEqual(int((allocation.zipf_capacities(1536, 4096, 1.0, max_capacity=512) == 0)
                         .sum()), 451)
    # Fewer slots than features: some feature must get nothing, and the split stays exact.
    small = feature_capacities(dataclasses.replace(cfg, k=0.5), 512)
    self.assertEqual(int(small.sum()), 256)
    self.assertEqual(int(small.min()), 0)

  def test_explicit_capacity_no_recompilation(self):
    cfg = _cfg("feature_choice_zipf", k=1.5)
    params, x = _inputs(2)
    caps = feature_capacities(cfg, B)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(p, x, capacity):
      return forward(p, x, cfg, capacity)

    for seed in range(3):
      perm = np.random.default_rng(seed).permutation(F)
      out = run(params, x, jnp.asarray(caps[perm]))
      np.testing.assert_array_equal(np.asarray(out.mask).sum(axis=0), caps[perm])
    # A concrete numpy override is honoured too.
    out = forward(params, x, cfg, caps[::-1].copy())
    np.testing.assert_array_equal(np.asarray(out.mask).sum(axis=0), caps[::-1])

  def test_forward_traced_once_for_new_values(self):
    cfg = _cfg("mutual_choice", k=1.5)
    params, x = _inputs(3)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(p, x):
      return forward(p, x, cfg)

    for scale in (1.0, 2.0, -0.5):
      self.assertEqual(int(run(params, x * scale).mask.sum()), 9)

  def test_gradients_only_through_selected_features(self):
    cfg = _cfg("topk", k=1)
    params, x = _inputs(4, b=2)

    def loss(p):
      return jnp.mean((forward(p, x, cfg).recon - x) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    used = np.asarray(forward(params, x, cfg).mask).any(axis=0)
    self.assertLessEqual(int(used.sum()), 2)
    self.assertGreaterEqual(int((~used).sum()), F - 2)
    np.testing.assert_array_equal(np.asarray(grads.W_enc)[:, ~used], 0.0)
    np.testing.assert_array_equal(np.asarray(grads.b_enc)[~used], 0.0)
    np.testing.assert_array_equal(np.asarray(grads.W_dec)[~used], 0.0)
    # Selected features with a positive code do receive gradient.
    active = np.asarray(forward(params, x, cfg).codes).max(axis=0) > 0
    self.assertTrue(np.any(active))
    self.assertTrue(np.all(np.abs(np.asarray(grads.b_enc)[active]) > 0))

  def test_mask_carries_no_gradient(self):
    # d(sum codes)/d(pre) is 1 on kept positive entries and 0 elsewhere: the
    # selection itself is not differentiated.
    cfg = SAEConfig(d_model=3, d_sae=3, allocation="mutual_choice", k=1)
    x = jnp.array([[0.5, -2.0, 1.5], [3.0, 1.0, -1.0]])
    grad = jax.grad(lambda x: jnp.sum(encode(_identity_params(3, 3), x, cfg)[0]))(x)
    # Budget 2: the entries 3.0 and 1.5 are kept.
    np.testing.assert_array_equal(grad, [[0, 0, 1], [1, 0, 0]])

  @parameterized.parameters("topk", "mutual_choice", "feature_choice", "feature_choice_zipf")
  def test_bfloat16_compute_exact_counts(self, name):
    cfg = _cfg(name, k=2, dtype=jnp.bfloat16)
    params, x = _inputs(5)
    out = jax.jit(functools.partial(forward, cfg=cfg))(params, x)
    for arr in (out.recon, out.codes, out.pre):
      self.assertEqual(arr.dtype, jnp.bfloat16)
    mask = np.asarray(out.mask)
    if name == "topk":
      np.testing.assert_array_equal(mask.sum(axis=1), np.full(B, 2))
    elif name == "mutual_choice":
      self.assertEqual(int(mask.sum()), 12)
    else:
      np.testing.assert_array_equal(mask.sum(axis=0), feature_capacities(cfg, B))
    codes = np.asarray(out.codes.astype(jnp.float32))
    np.testing.assert_array_equal(codes[~mask], 0.0)

  def test_invalid_inputs_raise(self):
    cfg = _cfg("topk")
    params, x = _inputs(6)
    with self.assertRaisesRegex(ValueError, r"x must have shape \[b, d_model=4\].*\(6, 3\)"):
      encode_pre(params, x[:, :3], cfg)
    with self.assertRaisesRegex(ValueError, r"x must have shape.*\(4,\)"):
      encode_pre(params, x[0], cfg)
    with self.assertRaisesRegex(ValueError, r"params.W_enc.*\(4, 8\).*\(4, 7\)"):
      encode_pre(params._replace(W_enc=params.W_enc[:, :7]), x, cfg)
    with self.assertRaisesRegex(ValueError, r"codes must have shape \[b, d_sae=8\].*\(6, 3\)"):
      decode(params, jnp.zeros((6, 3)), cfg)
    with self.assertRaisesRegex(ValueError, r"params.b_dec.*\(4,\).*\(5,\)"):
      decode(params._replace(b_dec=jnp.zeros(5)), jnp.zeros((6, F)), cfg)
    with self.assertRaisesRegex(ValueError, r"pre must have shape \[b, d_sae=8\].*\(6, 5\)"):
      allocate(jnp.zeros((6, 5)), cfg)
    with self.assertRaisesRegex(ValueError, "capacity.*allocation='topk'"):
      allocate(jnp.zeros((6, F)), cfg, capacity=np.ones(F, np.int32))
    with self.assertRaisesRegex(ValueError, r"capacity must have shape \[d_sae=8\].*\(3,\)"):
      allocate(jnp.zeros((6, F)), _cfg("feature_choice"), capacity=np.ones(3, np.int32))


class InferenceCodesTest(parameterized.TestCase):

  @parameterized.parameters("topk", "relu")
  def test_per_token_rules_use_their_own_encode(self, name):
    cfg = _cfg(name)
    params, x = _inputs(7)
    np.testing.assert_array_equal(inference_codes(params, x, cfg), encode(params, x, cfg)[0])

  @parameterized.parameters(("batch_topk", 0.1), ("mutual_choice", 0.1),
                            ("feature_choice", None), ("feature_choice_zipf", None),
                            ("relu", None))
  def test_threshold_rules_use_encode_thresholded(self, name, theta):
    cfg = _cfg(name)
    params, x = _inputs(8)
    theta = np.linspace(0.0, 0.5, F).astype(np.float32) if theta is None else theta
    expected = encode_thresholded(params, x, cfg, theta)[0]
    np.testing.assert_array_equal(inference_codes(params, x, cfg, theta), expected)
    jitted = jax.jit(inference_codes, static_argnames="cfg")
    np.testing.assert_array_equal(jitted(params, x, cfg=cfg, threshold=jnp.asarray(theta)),
                                  expected)
    # A row's codes do not depend on the batch.
    np.testing.assert_array_equal(inference_codes(params, x[3:5], cfg, theta), expected[3:5])

  def test_invalid_raise(self):
    params, x = _inputs(9)
    with self.assertRaisesRegex(ValueError, "allocation='mutual_choice'.*pass threshold="):
      inference_codes(params, x, _cfg("mutual_choice"))
    with self.assertRaisesRegex(ValueError, "threshold must be None for allocation='topk'"):
      inference_codes(params, x, _cfg("topk"), 0.1)
    with self.assertRaisesRegex(ValueError, r"threshold must be a scalar or \[d_sae=8\].*\(3,\)"):
      inference_codes(params, x, _cfg("feature_choice"), np.zeros(3))


class SAEModuleTest(parameterized.TestCase):

  def test_init_is_tied(self):
    cfg = _cfg("topk")
    sae = SAE(cfg, rngs=nnx.Rngs(params=0))
    p = sae.params()
    self.assertIsInstance(p, SAEParams)
    chex.assert_trees_all_close(jnp.linalg.norm(p.W_dec, axis=1), jnp.ones(F), atol=1e-6)
    chex.assert_trees_all_close(
        p.W_dec, p.W_enc.T / jnp.linalg.norm(p.W_enc.T, axis=1, keepdims=True), atol=1e-6)
    chex.assert_trees_all_equal((p.b_enc, p.b_dec), (jnp.zeros(F), jnp.zeros(D)))
    self.assertEqual(p.W_enc.dtype, jnp.float32)

  @parameterized.parameters("topk", "feature_choice", "relu")
  def test_methods_match_pure_functions(self, name):
    cfg = _cfg(name, dtype=jnp.bfloat16)
    sae = SAE(cfg, rngs=nnx.Rngs(params=1))
    _, x = _inputs(7)
    out = sae(x)
    ref = forward(sae.params(), x, cfg)
    chex.assert_trees_all_equal(tuple(out), tuple(ref))
    codes, pre, mask = sae.encode(x)
    chex.assert_trees_all_equal((codes, pre, mask), (ref.codes, ref.pre, ref.mask))
    chex.assert_trees_all_equal(sae.decode(codes), ref.recon)
    # Parameters stay in param_dtype while the computation runs in bfloat16.
    self.assertEqual(sae.W_enc[...].dtype, jnp.float32)
    self.assertEqual(out.recon.dtype, jnp.bfloat16)

  def test_set_params(self):
    sae = SAE(_cfg("topk"), rngs=nnx.Rngs(params=2))
    new = jax.tree.map(lambda a: a + 1.0, sae.params())
    sae.set_params(new)
    chex.assert_trees_all_equal(sae.params(), new)
    with self.assertRaisesRegex(ValueError, r"params.W_dec.*\(8, 4\)"):
      sae.set_params(new._replace(W_dec=jnp.zeros((4, 8))))

  def test_split_merge_inside_jit(self):
    cfg = _cfg("mutual_choice", k=1.5)
    sae = SAE(cfg, rngs=nnx.Rngs(params=3))
    _, x = _inputs(8)
    graphdef, state = nnx.split(sae)

    @jax.jit
    def step(state, x):
      model = nnx.merge(graphdef, state)
      out = model(x)
      grads = jax.grad(lambda p: jnp.mean((forward(p, x, cfg).recon - x) ** 2))(model.params())
      model.set_params(jax.tree.map(lambda w, g: w - 0.1 * g, model.params(), grads))
      return out, nnx.split(model)[1]

    out, new_state = step(state, x)
    chex.assert_trees_all_close(tuple(out), tuple(sae(x)), atol=1e-6)
    updated = nnx.merge(graphdef, new_state)
    self.assertEqual(updated.cfg, cfg)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                         updated.params(), sae.params())
    self.assertGreater(moved.W_dec, 0.0)
    self.assertGreater(moved.b_dec, 0.0)


if __name__ == "__main__":
  absltest.main()

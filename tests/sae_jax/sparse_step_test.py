"""The sparse training step against the dense reference step, on tiny shapes."""

import dataclasses
from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from sae_jax import metrics
from sae_jax import model
from sae_jax.training import dense_step
from sae_jax.training import objective
from sae_jax.training import selection
from sae_jax.training import sparse_kernels
from sae_jax.training import sparse_step
from sae_jax.training import train_state

B, D, F, K = 64, 16, 128, 4
CHUNK = 16  # four encoder chunks per batch


def _batches(n, seed=0, b=B):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(size=(b, D)), jnp.float32) for _ in range(n)]


def _configs(allocation, aux="none", weighted=False, k=K, **extra):
  cfg = model.SAEConfig(d_model=D, d_sae=F, allocation=allocation, k=k, **extra)
  tcfg = train_state.TrainConfig(learning_rate=3e-3, warmup_steps=1, total_steps=50, aux_loss=aux,
                                 zipf_weighted=weighted, dead_after_tokens=B)
  return cfg, tcfg


_REF = jax.jit(dense_step.train_step, static_argnames=("cfg", "tcfg"))
_FAST = jax.jit(sparse_step.fast_train_step, static_argnames=("cfg", "tcfg", "chunk_tokens"))
_FAST_FORM = jax.jit(sparse_step.fast_train_step,
                     static_argnames=("cfg", "tcfg", "chunk_tokens", "aux_form"))


@partial(jax.jit, static_argnames="cfg")
def _dense_mask(params, x, cfg):
  return model.allocate(model.encode_pre(params, x, cfg), cfg)


@partial(jax.jit, static_argnames="cfg")
def _fast_mask(params, x, cfg):
  sel, _ = selection.select(params, x, cfg, chunk_tokens=CHUNK)
  return sparse_kernels.selection_mask(sel.rows, sel.cols, sel.valid, (x.shape[0], cfg.d_sae)), sel


def _assert_same_selection(testcase, params, x, cfg):
  dense_mask = _dense_mask(params, x, cfg)
  fast_mask, sel = _fast_mask(params, x, cfg)
  np.testing.assert_array_equal(np.asarray(fast_mask), np.asarray(dense_mask))
  # Exact budgets: every valid triple is a distinct kept entry.
  testcase.assertEqual(int(jnp.sum(sel.valid)), int(jnp.sum(dense_mask)))


def _run_both(testcase, cfg, tcfg, xs, state=None):
  state = state if state is not None else train_state.init_train_state(
      jax.random.key(0), cfg, tcfg, xs[0])
  ref = fast = state
  history = []
  for x in xs:
    _assert_same_selection(testcase, fast.params, x, cfg)
    ref, ref_metrics = _REF(ref, x, cfg=cfg, tcfg=tcfg)
    fast, fast_metrics = _FAST(fast, x, cfg=cfg, tcfg=tcfg, chunk_tokens=CHUNK)
    chex.assert_trees_all_close(fast_metrics, ref_metrics, rtol=1e-5, atol=1e-6)
    history.append(fast_metrics)
  chex.assert_trees_all_close(fast, ref, rtol=1e-5, atol=1e-6)
  return ref, fast, history


class FastStepMatchesReferenceTest(parameterized.TestCase):

  # Without an auxiliary loss every rule is also covered by the tie and fallback tests.
  @parameterized.parameters(
      ("topk", "aux_k", False), ("mutual_choice", "aux_zipf", True),
      ("feature_choice", "aux_k", False), ("feature_choice_zipf", "aux_zipf", False),
      ("feature_choice_zipf", "none", False))
  def test_same_params_and_selection_after_steps(self, allocation, aux, weighted):
    cfg, tcfg = _configs(allocation, aux, weighted)
    xs = _batches(2)
    state = train_state.init_train_state(jax.random.key(0), cfg, tcfg, xs[0])
    if aux == "aux_k":
      # Dead from the start, so the auxiliary loss and its gradient are live.
      state = state._replace(usage=state.usage._replace(
          tokens_since_fired=jnp.where(jnp.arange(F) % 3 == 0, 10 * B, 0).astype(jnp.int32)))
    _, fast, history = _run_both(self, cfg, tcfg, xs, state)
    self.assertEqual(int(fast.step), 2)
    # The auxiliary term (and its sparse gradient) was live, not a trivial zero.
    if aux != "none":
      self.assertGreater(float(history[0]["aux_loss"]), 0.0)

  def test_raw_selection_and_l1_match(self):
    cfg, tcfg = _configs("topk", select_on="raw", l1_coefficient=1e-2)
    _run_both(self, cfg, tcfg, _batches(2, seed=3))

  def test_ties_from_duplicated_features_and_tokens(self):
    # Features come in identical pairs and tokens in identical pairs, so every score
    # is tied with its twin column and twin row; the tie rules decide the selection.
    for allocation in ("topk", "mutual_choice", "feature_choice", "feature_choice_zipf"):
      cfg, tcfg = _configs(allocation)
      x_half = _batches(1, seed=5, b=B // 2)[0]
      x = jnp.repeat(x_half, 2, axis=0)
      state = train_state.init_train_state(jax.random.key(1), cfg, tcfg, x)
      p = state.params
      p = p._replace(W_enc=jnp.repeat(p.W_enc[:, ::2], 2, axis=1),
                     W_dec=jnp.repeat(p.W_dec[::2], 2, axis=0))
      state = state._replace(params=p)
      pre = np.asarray(model.encode_pre(p, x, cfg))
      self.assertTrue((pre[:, ::2] == pre[:, 1::2]).all())
      self.assertTrue((pre[::2] == pre[1::2]).all())
      _run_both(self, cfg, tcfg, [x], state)

  @parameterized.parameters("topk", "mutual_choice", "feature_choice", "feature_choice_zipf")
  def test_all_scores_equal(self, allocation):
    # x == b_dec and b_enc == 0: every pre-activation is exactly 0, one big tie.
    cfg, _ = _configs(allocation)
    params = train_state.init_train_state(jax.random.key(2), cfg, train_state.TrainConfig()).params
    x = jnp.broadcast_to(params.b_dec, (B, D))
    _assert_same_selection(self, params, x, cfg)

  def test_mutual_choice_rows_beyond_candidates_fall_back_exactly(self):
    cfg, tcfg = _configs("mutual_choice")
    xs = _batches(1, seed=7)
    # Token 5 is 100x larger: it alone claims far more than its 4k proposals.
    xs = [x.at[5].multiply(100.0) for x in xs]
    state = train_state.init_train_state(jax.random.key(0), cfg, tcfg, xs[0])
    _, sel = _fast_mask(state.params, xs[0], cfg)
    self.assertGreater(int(jnp.sum(sel.rows == 5)), 4 * K)
    _run_both(self, cfg, tcfg, xs, state)

  def _patched_exact_returns_nothing(self):
    """Replaces the exact search by a wrong (empty) selection, to see which path ran."""
    def wrong(centred_NxCxD, W_enc, b_enc, n, cfg):
      zeros = jnp.zeros((n,), jnp.int32)
      return selection.Selection(zeros, zeros, jnp.zeros((n,), W_enc.dtype),
                                 jnp.ones((n,), bool))
    return absltest.mock.patch.object(selection, "_mutual_choice_exact", wrong)

  def _fresh_select_mask(self, params, x, cfg, chunk=CHUNK):
    sel, _ = jax.jit(lambda p, v: selection.select(p, v, cfg, chunk_tokens=chunk))(params, x)
    return np.asarray(sparse_kernels.selection_mask(sel.rows, sel.cols, sel.valid, x.shape[:1]
                                                    + (cfg.d_sae,)))

  def test_mutual_choice_saturated_rows_widened_without_exact_search(self):
    # Tokens 5-7 claim 33-46 entries each, more than their 4k = 16 proposals and fewer
    # than the 64 of the widened rows: the widened union is exact on its own.
    cfg, tcfg = _configs("mutual_choice")
    x = _batches(1, seed=7)[0].at[5:8].multiply(5.0)
    state = train_state.init_train_state(jax.random.key(0), cfg, tcfg, x)
    want = np.asarray(_dense_mask(state.params, x, cfg))
    self.assertTrue(np.all(want.sum(1)[5:8] > 4 * K) and np.all(want.sum(1) <= 16 * K))
    with self._patched_exact_returns_nothing():
      np.testing.assert_array_equal(self._fresh_select_mask(state.params, x, cfg), want)
    _run_both(self, cfg, tcfg, [x], state)

  def test_mutual_choice_widened_rows_saturated_again_use_exact_search(self):
    # A shared input direction lets token 5 claim all 128 features (> 64 widened
    # proposals): only the exact search gets it right, as the patched run shows.
    cfg, tcfg = _configs("mutual_choice")
    x = _batches(1, seed=7)[0].at[5, 0].set(100.0)
    state = train_state.init_train_state(jax.random.key(0), cfg, tcfg, x)
    params = state.params._replace(W_enc=state.params.W_enc.at[0].add(0.5))
    state = state._replace(params=params)
    want = np.asarray(_dense_mask(params, x, cfg))
    self.assertEqual(int(want.sum(1)[5]), F)
    with self._patched_exact_returns_nothing():
      self.assertFalse(np.array_equal(self._fresh_select_mask(params, x, cfg), want))
    np.testing.assert_array_equal(self._fresh_select_mask(params, x, cfg), want)
    _run_both(self, cfg, tcfg, [x], state)

  def test_mutual_choice_more_saturated_rows_than_a_chunk(self):
    # All scores equal: the first 16 tokens take the whole budget, more rows than a
    # chunk of 8 holds, so the exact search runs (and cuts the ties in row-major order).
    cfg, _ = _configs("mutual_choice")
    x = jnp.ones((B, D), jnp.float32)
    params = train_state.init_train_state(jax.random.key(0), cfg, _configs("mutual_choice")[1],
                                          x).params
    want = np.asarray(_dense_mask(params, x, cfg))
    np.testing.assert_array_equal(self._fresh_select_mask(params, x, cfg, chunk=8), want)
    with self._patched_exact_returns_nothing():
      self.assertFalse(np.array_equal(self._fresh_select_mask(params, x, cfg, chunk=8), want))

  def test_mutual_choice_fallback_collects_in_row_blocks(self):
    # The exact fallback collects each chunk's winners in blocks of rows; with blocks of
    # 3 rows (a chunk of 16 has no such divisor: 2 rows) the ties and offsets still match.
    cfg, tcfg = _configs("mutual_choice")
    x = _batches(1, seed=7)[0].at[5].multiply(100.0)
    state = train_state.init_train_state(jax.random.key(0), cfg, tcfg, x)
    with absltest.mock.patch.object(selection, "EXACT_BLOCK_ENTRIES", 3 * F):
      for inputs in (x, jnp.ones_like(x)):  # one row's excess; all entries tied
        # A fresh trace, so the patched block size is the one compiled.
        sel, _ = jax.jit(lambda p, v: selection.select(p, v, cfg, chunk_tokens=CHUNK))(
            state.params, inputs)
        got = sparse_kernels.selection_mask(sel.rows, sel.cols, sel.valid, (B, F))
        np.testing.assert_array_equal(got, _dense_mask(state.params, inputs, cfg))
        self.assertEqual(int(jnp.sum(got)), K * B)

  def test_mutual_choice_without_room_for_candidates(self):
    # 4 * k >= f: only the exact chunked search applies.
    cfg, tcfg = _configs("mutual_choice", k=40)
    _run_both(self, cfg, tcfg, _batches(1, seed=8))


def _with_dead_features(state):
  """Every third feature dead from the start, so aux_k's loss and gradient are live."""
  return state._replace(usage=state.usage._replace(
      tokens_since_fired=jnp.where(jnp.arange(F) % 3 == 0, 10 * B, 0).astype(jnp.int32)))


class AuxFormTest(parameterized.TestCase):
  """The dense and the triple form of the auxiliary loss, each against the reference."""

  # Every allocation once and each auxiliary loss twice: the aux forms do not depend on
  # the allocation beyond its selection, which the reference comparison covers elsewhere.
  @parameterized.parameters(("topk", "aux_k"), ("mutual_choice", "aux_zipf"),
                            ("feature_choice", "aux_k"), ("feature_choice_zipf", "aux_zipf"))
  def test_each_form_matches_reference(self, allocation, aux):
    weighted = aux == "aux_zipf" and allocation in ("mutual_choice", "feature_choice_zipf")
    cfg, tcfg = _configs(allocation, aux, weighted)
    xs = _batches(2, seed=21)
    state = train_state.init_train_state(jax.random.key(0), cfg, tcfg, xs[0])
    if aux == "aux_k":
      state = _with_dead_features(state)
    # k_aux = 8 of 128 features: the rule's boundary; both forms are forced here. The
    # dense form runs in blocks of one chunk (4 blocks) and, for TopK, of the batch.
    forms = [("triples", CHUNK), ("dense", CHUNK)]
    if allocation == "topk":
      forms.append(("dense", B))
    ref, fast = state, {form: state for form in forms}
    for i, x in enumerate(xs):
      ref, ref_metrics = _REF(ref, x, cfg=cfg, tcfg=tcfg)
      if i == 0:  # the auxiliary term (and its gradient) is live, not a trivial zero
        self.assertGreater(float(ref_metrics["aux_loss"]), 0.0)
      for (form, chunk), s in fast.items():
        fast[form, chunk], m = _FAST_FORM(s, x, cfg=cfg, tcfg=tcfg, chunk_tokens=chunk,
                                          aux_form=form)
        chex.assert_trees_all_close(m, ref_metrics, rtol=1e-5, atol=1e-6)
    # Parameters, Adam state, usage and threshold after two steps. A feature that only
    # the auxiliary loss reaches (here Feature Choice Zipf's zero-capacity features once
    # they count as dead) can have a gradient of ~1e-9, a sum of cancelling terms whose
    # float32 rounding differs by ~1 % between summation orders (both forms against the
    # reference); Adam's first steps (about g / (|g| + eps), eps = 6.25e-10) turn that
    # into ~3e-6 of such a weight, against updates of lr = 3e-3 everywhere else.
    for s in fast.values():
      chex.assert_trees_all_close(s, ref, rtol=1e-5, atol=1e-5)

  def test_rule(self):
    self.assertEqual(sparse_step.aux_form(32768, 384), "triples")  # Gao et al.: 1.2 %
    self.assertEqual(sparse_step.aux_form(16384, 384), "triples")
    self.assertEqual(sparse_step.aux_form(1536, 192), "dense")  # d=384, F=4d: 12.5 %
    self.assertEqual(sparse_step.aux_form(1024, 128), "dense")
    self.assertEqual(sparse_step.aux_form(2048, 128), "dense")  # exactly the 1/16 boundary
    self.assertEqual(sparse_step.aux_form(2049, 128), "triples")
    cfg, tcfg = _configs("topk", "aux_k")
    state = train_state.init_train_state(jax.random.key(0), cfg, tcfg)
    with self.assertRaisesRegex(ValueError, "aux_form must be one of"):
      sparse_step.fast_train_step(state, _batches(1)[0], cfg, tcfg, aux_form="sparse")

  def _trace(self, b, d, f, form="auto"):
    """The step's jaxpr (traced on shapes only: nothing is allocated or compiled) and
    the ``[b, k_aux]`` shapes handed to the dense auxiliary decoder while tracing."""
    cfg = model.SAEConfig(d_model=d, d_sae=f, allocation="topk", k=32)
    tcfg = train_state.TrainConfig(aux_loss="aux_k")
    state = jax.eval_shape(lambda: train_state.init_train_state(jax.random.key(0), cfg, tcfg))
    x = jax.ShapeDtypeStruct((b, d), jnp.float32)
    calls, real = [], sparse_kernels.row_block_decode

    def spy(values, cols, W_dec, block_rows):
      calls.append((values.shape, block_rows))
      return real(values, cols, W_dec, block_rows)

    with absltest.mock.patch.object(sparse_kernels, "row_block_decode", spy):
      jaxpr = jax.make_jaxpr(partial(sparse_step.fast_train_step, cfg=cfg, tcfg=tcfg,
                                     aux_form=form))(state, x)
    return calls, str(jaxpr)

  def test_big_shape_uses_triples_and_no_dense_batch_buffer(self):
    # B=4096, d=768, F=32768: k_aux = 384 is 1.2 % of the features.
    calls, jaxpr = self._trace(4096, 768, 32768)
    self.assertEqual(calls, [])  # triple form: the dense decoder is never traced
    for shape in ("[4096,32768]", "[32768,4096]"):
      self.assertNotIn(shape, jaxpr)
    # Even the dense form, forced, holds one [chunk, f] block at a time, never [b, f]
    # (one dense decode per auxiliary tier: k_aux // 8 = 48 and 384).
    calls, jaxpr = self._trace(4096, 768, 32768, form="dense")
    self.assertEqual(calls, [((4096, 48), 512), ((4096, 384), 512)])
    self.assertIn("[512,32768]", jaxpr)
    for shape in ("[4096,32768]", "[32768,4096]"):
      self.assertNotIn(shape, jaxpr)

  def test_small_shape_uses_dense_form(self):
    calls, _ = self._trace(512, 384, 1536)  # k_aux = 192 is 12.5 % of the features
    self.assertEqual(calls, [((512, 192), 512)])


class CapacityTiersTest(parameterized.TestCase):

  def test_uniform_capacities_form_one_tier(self):
    tiers = selection.capacity_tiers(np.array([5, 5, 4, 4, 4]), chunk=16)
    self.assertEqual(tiers, [selection.Tier(0, 5, 5, 5)])

  def test_zipf_tiers_cover_every_positive_capacity_within_the_ratio(self):
    cfg = model.SAEConfig(d_model=D, d_sae=4096, allocation="feature_choice_zipf", k=32)
    cap = model.feature_capacities(cfg, 4096)
    tiers = selection.capacity_tiers(cap, chunk=512)
    self.assertEqual(tiers[0].start, 0)
    for a, b in zip(tiers, tiers[1:]):
      self.assertEqual(a.stop, b.start)
    self.assertTrue(np.all(cap[tiers[-1].stop:] == 0))
    for t in tiers:
      self.assertEqual(t.capacity, cap[t.start])
      self.assertEqual(t.width, min(t.capacity, 512))
      self.assertTrue(np.all(cap[t.start:t.stop] * selection.TIER_RATIO >= t.capacity))
    padded = sum((t.stop - t.start) * t.capacity for t in tiers)
    # Padding is bounded by the ratio; the proposals then cost at most 25 % extra.
    self.assertLessEqual(padded, selection.TIER_RATIO * cap.sum())
    self.assertGreater(len(tiers), 5)

  def test_increasing_capacities_are_refused(self):
    with self.assertRaisesRegex(ValueError, "non-increasing"):
      selection.capacity_tiers(np.array([1, 3, 2]), chunk=8)


class ColumnOrderTest(parameterized.TestCase):

  @parameterized.parameters((1000, 16, None), (1000, 1 << 28, 16), (4096, 1 << 29, 8),
                            (5, 3, None))
  def test_a_permutation_sorted_by_column_within_blocks(self, n, f, block):
    # f = 2**28 leaves 4 bits of position: blocks of 16 entries, the last one padded.
    cols = np.array(jax.random.randint(jax.random.key(n), (n,), 0, f, dtype=jnp.int32))
    cols[:3] = f - 1  # the largest column sorts before the padding
    order = np.asarray(selection.column_order(jnp.asarray(cols), f))
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    size = block or n
    for start in range(0, n, size):
      got = order[start:start + size]
      # Within a block: ascending column, ties in their original order (stable).
      expected = start + np.argsort(cols[start:start + size], kind="stable")
      np.testing.assert_array_equal(got, expected)

  def test_by_column_permutes_every_field_together(self):
    sel = selection.Selection(rows=jnp.array([0, 0, 1, 1], jnp.int32),
                              cols=jnp.array([7, 2, 2, 0], jnp.int32),
                              pre=jnp.array([1.0, 2.0, 3.0, 4.0]),
                              valid=jnp.array([True, False, True, True]))
    out = selection.by_column(sel, 8)
    np.testing.assert_array_equal(out.cols, [0, 2, 2, 7])
    np.testing.assert_array_equal(out.rows, [1, 0, 1, 0])
    np.testing.assert_array_equal(out.pre, [4.0, 2.0, 3.0, 1.0])
    np.testing.assert_array_equal(out.valid, [True, False, True, True])

  def test_too_many_features_is_refused(self):
    with self.assertRaisesRegex(ValueError, "num_features"):
      selection.column_order(jnp.zeros((4,), jnp.int32), 1 << 32)


class FastStepPropertiesTest(parameterized.TestCase):

  def test_no_recompilation_across_steps(self):
    cfg, tcfg = _configs("topk")
    xs = _batches(3, seed=9)
    state = train_state.init_train_state(jax.random.key(0), cfg, tcfg, xs[0])
    step = jax.jit(chex.assert_max_traces(sparse_step.fast_train_step, n=1),
                   static_argnames=("cfg", "tcfg", "chunk_tokens"))
    chex.clear_trace_counter()
    for x in xs:  # the step counter and schedule value change; the trace does not
      state, m = step(state, x, cfg=cfg, tcfg=tcfg, chunk_tokens=CHUNK)
    self.assertEqual(int(state.step), 3)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(state.params.W_dec), axis=1), 1.0,
                               atol=1e-5)
    self.assertEqual(float(m["l0"]) <= K, True)

  @parameterized.parameters("aux_k", "aux_zipf")
  def test_auxiliary_work_is_skipped_without_candidates(self, aux):
    cfg, tcfg = _configs("topk", aux)
    _, plain = _configs("topk")
    x = _batches(1, seed=12)[0]
    state = train_state.init_train_state(jax.random.key(0), cfg, tcfg, x)
    if aux == "aux_zipf":
      # A density profile that is exactly a Zipf law: nothing falls below the fit.
      ranks = jnp.arange(1, F + 1, dtype=jnp.float32)
      state = state._replace(usage=state.usage._replace(
          density_ema=0.2 / ranks, num_tokens=jnp.int32(10 * B)))
    self.assertFalse(bool(jnp.any(objective.aux_candidates(state.usage, tcfg)[0])))
    jaxpr = str(jax.make_jaxpr(partial(sparse_step.fast_train_step, cfg=cfg, tcfg=tcfg,
                                       chunk_tokens=CHUNK))(state, x))
    self.assertIn("cond", jaxpr)
    got, got_metrics = _FAST(state, x, cfg=cfg, tcfg=tcfg, chunk_tokens=CHUNK)
    want, want_metrics = _FAST(state, x, cfg=cfg, tcfg=plain, chunk_tokens=CHUNK)
    self.assertEqual(float(got_metrics["aux_loss"]), 0.0)
    chex.assert_trees_all_close(got.params, want.params, rtol=1e-6, atol=1e-7)
    ref, _ = _REF(state, x, cfg=cfg, tcfg=tcfg)
    chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-6)

  @parameterized.parameters((0, 0), (1, 1), (2, 1), (3, 2), (40, 2))
  def test_aux_branch_by_candidate_count(self, n, branch):
    candidates = jnp.arange(F) < n
    self.assertEqual(int(objective.aux_branch(candidates, (2, 16))), branch)

  @parameterized.parameters(1, 2, 5)
  def test_few_candidates_take_the_small_tier_with_the_same_update(self, n_dead):
    cfg, tcfg = _configs("topk", "aux_k")
    tcfg = dataclasses.replace(tcfg, k_aux=16)
    tiers = objective.aux_k_tiers(cfg, tcfg)
    self.assertEqual(tiers, (2, 16))
    x = _batches(1, seed=5)[0]
    state = train_state.init_train_state(jax.random.key(0), cfg, tcfg, x)
    state = state._replace(usage=state.usage._replace(tokens_since_fired=jnp.where(
        jnp.arange(F) < n_dead, 10 * B, 0).astype(jnp.int32)))
    candidates = objective.aux_candidates(state.usage, tcfg)[0]
    self.assertEqual(int(objective.aux_branch(candidates, tiers)), 1 if n_dead <= 2 else 2)
    _, _, history = _run_both(self, cfg, tcfg, [x], state)
    self.assertGreater(float(history[0]["aux_loss"]), 0.0)

  def test_chunk_size_does_not_change_the_step(self):
    cfg, tcfg = _configs("topk")
    x = _batches(1, seed=10)[0]
    state = train_state.init_train_state(jax.random.key(0), cfg, tcfg, x)
    a, _ = _FAST(state, x, cfg=cfg, tcfg=tcfg, chunk_tokens=B)
    b, _ = _FAST(state, x, cfg=cfg, tcfg=tcfg, chunk_tokens=24)  # uses 16, a divisor
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)
    self.assertEqual(selection.check_fast_config(cfg, B, 24), 16)

  def test_usage_and_threshold_from_triples(self):
    # Tokens 0..2, features 0..3; the selection keeps (0,1)=2.0, (1,1)=0.5, (2,3)=0.0.
    cfg = model.SAEConfig(d_model=2, d_sae=4, allocation="feature_choice", k=1)
    sel = selection.Selection(jnp.array([0, 1, 2]), jnp.array([1, 1, 3]),
                              jnp.array([2.0, 0.5, -1.0]), jnp.array([True, True, True]))
    codes = jnp.array([2.0, 0.5, 0.0])
    dense = jnp.zeros((3, 4)).at[sel.rows, sel.cols].set(codes)
    usage0 = metrics.feature_usage_init(4)
    got = sparse_step.usage_update(usage0, sel, codes, 3, 0.9)
    chex.assert_trees_all_close(got, metrics.feature_usage_update(usage0, dense, decay=0.9))
    np.testing.assert_allclose(got.density_ema, [0.0, 2 / 3, 0.0, 0.0])  # 2 of 3 tokens
    theta0 = jnp.array([jnp.inf, 1.0, jnp.inf, 0.3])
    got_t = sparse_step.threshold_update(theta0, sel, codes, cfg, 0.5)
    np.testing.assert_allclose(got_t, dense_step.update_threshold(theta0, dense, cfg, 0.5))
    np.testing.assert_allclose(got_t, [jnp.inf, 0.75, jnp.inf, 0.3])  # 0.5*1 + 0.5*0.5

  def test_bad_arguments(self):
    x = _batches(1)[0]
    for kwargs, pattern in (({"allocation": "relu"}, "allocation"),
                            ({"dtype": jnp.float16}, "dtype"),
                            ({"param_dtype": jnp.float16}, "param_dtype")):
      cfg = model.SAEConfig(d_model=D, d_sae=F, k=K, **kwargs)
      params = train_state.init_train_state(jax.random.key(0), cfg,
                                            train_state.TrainConfig()).params
      with self.assertRaisesRegex(ValueError, pattern):
        selection.select(params, x, cfg)
    cfg, tcfg = _configs("topk")
    state = train_state.init_train_state(jax.random.key(0), cfg, tcfg)
    with self.assertRaisesRegex(ValueError, "chunk_tokens must be a static int >= 1; got 0"):
      sparse_step.fast_train_step(state, x, cfg, tcfg, chunk_tokens=0)
    with self.assertRaisesRegex(ValueError, r"k_aux must be a static int in \[1, 128\]"):
      selection.select(state.params, x, cfg, aux_candidates=jnp.ones((F,), bool), k_aux=0)
    with self.assertRaisesRegex(ValueError, "x must have shape"):
      selection.select(state.params, x[:, :3], cfg)


if __name__ == "__main__":
  absltest.main()

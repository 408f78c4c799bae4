"""Tests for sae_jax.data.lm_stream: streamed, shuffled, resumable batches from a model."""

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from sae_jax import lm
from sae_jax import model
from sae_jax.data import lm_stream
from sae_jax.training import loop
from sae_jax.training import train_state
from tests.sae_jax import lm_test

N_SEQ, T, D = 10, 6, 3


def _ids():
  return np.arange(N_SEQ * T, dtype=np.int64).reshape(N_SEQ, T)


def _identity_fn(calls=None):
  """Rows that name their origin: (token id, position, token id squared)."""
  def fn(ids):
    if calls is not None:
      calls.append(ids.shape)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    return np.stack([ids, pos, ids.astype(np.float64) ** 2], axis=-1).astype(np.float32)
  return fn


class StreamedBatchesTest(parameterized.TestCase):

  @parameterized.parameters((4, 3, 0), (7, 4, 2), (5, 10, 1))
  def test_every_kept_position_once_per_epoch(self, batch_size, block_sequences, skip_first):
    calls = []
    stream = lm_stream.StreamedBatches(_identity_fn(calls), _ids(), batch_size, seed=3,
                                       block_sequences=block_sequences, sub_batch=3,
                                       skip_first=skip_first)
    per_epoch = N_SEQ * (T - skip_first)
    self.assertEqual(stream.count, per_epoch)
    rows = np.concatenate([next(stream) for _ in range(2 * per_epoch // batch_size)])
    first = rows[:per_epoch]
    want = sorted((float(i), float(p)) for i, p in zip(_ids()[:, skip_first:].ravel(),
                                                         np.tile(np.arange(skip_first, T), N_SEQ)))
    self.assertEqual(sorted(map(tuple, first[:, :2].tolist())), want)
    self.assertTrue(all(shape == (3, T) for shape in calls))  # one compiled shape
    # The second epoch is another order of the same rows.
    second = rows[per_epoch:2 * per_epoch]
    if len(second) == per_epoch:
      self.assertEqual(sorted(map(tuple, second[:, :2].tolist())), want)
      self.assertFalse(np.array_equal(first, second))

  def test_resume_continues_bitwise(self):
    make = lambda: lm_stream.StreamedBatches(_identity_fn(), _ids(), 7, seed=1,
                                             block_sequences=3, sub_batch=2, skip_first=1)
    straight = make()
    want = [next(straight) for _ in range(12)]
    first = make()
    for _ in range(5):
      next(first)
    state = first.state()
    resumed = make()
    resumed.restore(state)
    got = [next(resumed) for _ in range(7)]
    for a, b in zip(got, want[5:]):
      np.testing.assert_array_equal(a, b)

  def test_seed_changes_order(self):
    a = lm_stream.StreamedBatches(_identity_fn(), _ids(), 5, seed=0, block_sequences=4)
    b = lm_stream.StreamedBatches(_identity_fn(), _ids(), 5, seed=1, block_sequences=4)
    self.assertFalse(np.array_equal(next(a), next(b)))

  def test_bad_arguments(self):
    fn = _identity_fn()
    with self.assertRaisesRegex(ValueError, "token_ids must be a 2-D integer array"):
      lm_stream.StreamedBatches(fn, np.zeros((3,), np.int32), 2, 0)
    with self.assertRaisesRegex(ValueError, "batch_size must be an int >= 1"):
      lm_stream.StreamedBatches(fn, _ids(), 0, 0)
    with self.assertRaisesRegex(ValueError, "skip_first must be below the sequence length"):
      lm_stream.StreamedBatches(fn, _ids(), 2, 0, skip_first=T)
    with self.assertRaisesRegex(ValueError, "exceeds the"):
      lm_stream.StreamedBatches(fn, _ids(), N_SEQ * T + 1, 0)
    stream = lm_stream.StreamedBatches(fn, _ids(), 2, 0)
    with self.assertRaisesRegex(ValueError, "restore needs the same setting"):
      stream.restore({**stream.state(), "seed": 5})
    bad = lm_stream.StreamedBatches(lambda ids: np.zeros((1, 1, 1)), _ids(), 2, 0)
    with self.assertRaisesRegex(ValueError, "activation_fn must return"):
      next(bad)

  def test_rows_are_the_models_activations_and_fit_trains_on_them(self):
    hook = "blocks.1.hook_resid_pre"
    with tempfile.TemporaryDirectory() as tmp:
      lm_test.write_checkpoint(tmp, "gpt2")
      cfg, params = lm.load_model(tmp)
      forward = jax.jit(lambda i: lm.forward(params, cfg, i, hooks=(hook,),
                                             return_logits=False).activations[hook])
      ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (6, 8))
      stream = lm_stream.StreamedBatches(forward, ids, 16, seed=0, block_sequences=4,
                                         sub_batch=2, skip_first=1)
      batch = next(stream)
      every = np.asarray(forward(jnp.asarray(ids, jnp.int32)))[:, 1:].reshape(-1, cfg.hidden_size)
      for row in batch:  # each streamed row is one of the model's kept activations
        self.assertLess(np.abs(every - row).max(axis=1).min(), 1e-5)
      sae_cfg = model.SAEConfig(d_model=cfg.hidden_size, d_sae=64, allocation="topk", k=4)
      tcfg = train_state.TrainConfig(learning_rate=1e-3, warmup_steps=1, total_steps=3)
      rcfg = loop.RunConfig(steps=3, checkpoint_every=3, log_every=1, progress=False, n_data=1)
      state, summary = loop.fit(f"{tmp}/run", sae_cfg, tcfg, rcfg, stream)
      self.assertEqual(int(state.step), 3)
      self.assertTrue(np.isfinite(summary["loss"]))


if __name__ == "__main__":
  absltest.main()

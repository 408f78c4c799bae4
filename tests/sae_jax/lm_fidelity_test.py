"""Tests for sae_jax.evaluation.lm_fidelity: an identity SAE recovers everything, zero and mean
reconstructions equal the ablations, CE, KL and FVU checked by hand against NumPy, one
compilation per shape with the SAE parameters traced, argument errors."""

import functools
import pathlib
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest
from absl.testing import parameterized

from sae_jax import lm
from sae_jax import model
from sae_jax.evaluation import lm_fidelity as lm_fidelity_lib
from sae_jax.evaluation.lm_fidelity import lm_fidelity
from sae_jax.params import SAEParams
from tests.sae_jax import lm_test

pytest.importorskip("safetensors")

HOOK = "blocks.0.hook_resid_post"
D, N, T = 32, 4, 8

# Removed when the interpreter exits.
_ROOT = tempfile.TemporaryDirectory(prefix="lm_fidelity_test_")


@functools.lru_cache(maxsize=None)
def _model():
  """(cfg, params) of a tiny random GPT-2 checkpoint written once."""
  folder = pathlib.Path(_ROOT.name) / "gpt2"
  lm_test.write_checkpoint(folder, "gpt2")
  return lm.load_model(folder)


def _ids(seed=0, n=N, t=T):
  return np.random.default_rng(seed).integers(0, lm_test.VOCAB, size=(n, t)).astype(np.int32)


def _sae(decoder_scale=1.0, decoder_bias=None):
  """W_enc = [I, -I], W_dec = s [I; -I]: relu codes [x+, x-] decode to s x + b_dec."""
  eye = np.eye(D, dtype=np.float32)
  b_dec = np.zeros(D, np.float32) if decoder_bias is None else decoder_bias
  return SAEParams(jnp.asarray(np.concatenate([eye, -eye], 1)), jnp.zeros(2 * D),
                   jnp.asarray(np.concatenate([eye, -eye], 0) * decoder_scale),
                   jnp.asarray(b_dec, jnp.float32))


RELU = model.SAEConfig(d_model=D, d_sae=2 * D, allocation="relu")


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _references(ids, skip_first, news):
  """NumPy CE and log-probabilities of the predictions at positions skip_first .. t - 2, one
  pair per entry of ``news``: None (clean) or the value ([d] or [n, t - skip_first, d]) that
  positions >= skip_first at HOOK are set to. One forward pass of the stacked variants."""
  cfg, params = _model()
  n = len(ids)

  def replace(h):
    parts = [h[i * n:(i + 1) * n] for i in range(len(news))]
    return jnp.concatenate([
        part if new is None else part.at[:, skip_first:].set(
            jnp.broadcast_to(jnp.asarray(new, h.dtype), part[:, skip_first:].shape))
        for part, new in zip(parts, news)])

  logits = lm.forward(params, cfg, jnp.asarray(np.concatenate([ids] * len(news))),
                      replace={HOOK: replace}).logits
  out = []
  for i in range(len(news)):
    logp = _log_softmax(logits[i * n:(i + 1) * n])[:, skip_first:-1]
    targets = ids[:, skip_first + 1:]
    out.append((-np.take_along_axis(logp, targets[..., None], -1).mean(), logp))
  return out


def _kl(logp_p, logp_q):
  return float(np.mean(np.sum(np.exp(logp_p) * (logp_p - logp_q), -1)))


def _hook_acts(ids):
  cfg, params = _model()
  out = lm.forward(params, cfg, jnp.asarray(ids), hooks=(HOOK,), return_logits=False)
  return np.asarray(out.activations[HOOK], np.float64)


class LMFidelityTest(parameterized.TestCase):

  def test_identity_sae_recovers_everything(self):
    cfg, params = _model()
    normalization = {"mean": np.linspace(-1, 1, D), "scale": 2.0}
    out = lm_fidelity(_sae(), RELU, params, cfg, _ids(), HOOK, normalization=normalization,
                      threshold=0.0, batch_size=N)
    self.assertEqual((out["num_sequences"], out["num_tokens"], out["num_predictions"]),
                     (N, N * (T - 1), N * (T - 2)))
    for prefix in ("", "threshold_"):
      self.assertAlmostEqual(out[prefix + "ce_spliced"], out["ce_clean"], places=5)
      self.assertAlmostEqual(out[prefix + "ce_recovered_zero"], 1.0, places=3)
      self.assertAlmostEqual(out[prefix + "ce_recovered_mean"], 1.0, places=3)
      self.assertAlmostEqual(out[prefix + "kl_spliced"], 0.0, places=5)
      self.assertGreaterEqual(out[prefix + "kl_spliced"], -1e-6)
      self.assertLess(out[prefix + "fvu"], 1e-10)
      self.assertEqual(out[prefix + "l0_mean"], D)  # every nonzero entry, as x+ or x-
    # The ablations do change the model.
    self.assertGreater(out["kl_zero_ablation"], 1e-2)
    self.assertGreater(out["kl_mean_ablation"], 1e-3)
    self.assertGreater(abs(out["ce_zero_ablation"] - out["ce_clean"]), 1e-3)

  def test_zero_and_mean_reconstructions_score_as_the_ablations(self):
    cfg, params = _model()
    ids = _ids(1)
    zero = lm_fidelity(_sae(decoder_scale=0.0), RELU, params, cfg, ids, HOOK, batch_size=N)
    self.assertEqual(zero["ce_recovered_zero"], 0.0)
    self.assertAlmostEqual(zero["ce_spliced"], zero["ce_zero_ablation"], places=6)
    self.assertAlmostEqual(zero["kl_spliced"], zero["kl_zero_ablation"], places=6)
    h = _hook_acts(ids)[:, 1:]
    self.assertAlmostEqual(zero["fvu"], np.sum(h ** 2) / np.sum((h - h.mean((0, 1))) ** 2),
                           places=5)
    self.assertEqual(zero["l0_mean"], D)  # the encoder is unchanged
    # A decoder of zeros plus the normalisation's mean reconstructs that mean: undone
    # exactly as in evaluate.splice_reconstruction.
    mean = h.mean((0, 1))
    for sae, normalization in ((_sae(0.0, mean.astype(np.float32)), None),
                               (_sae(0.0), {"mean": mean, "scale": 3.0})):
      out = lm_fidelity(sae, RELU, params, cfg, ids, HOOK, batch_size=N,
                        normalization=normalization)
      self.assertAlmostEqual(out["ce_recovered_mean"], 0.0, places=4)
      self.assertAlmostEqual(out["kl_spliced"], out["kl_mean_ablation"], places=5)

  def test_ce_kl_and_fvu_match_numpy(self):
    cfg, params = _model()
    ids, skip_first = _ids(2), 1
    # Decoder scale 1/2: h_hat = h / 2, so fvu = sum |h / 2|^2 / sum |h - mean(h)|^2.
    mean_activation = np.linspace(0.5, -0.5, D).astype(np.float32)
    out = lm_fidelity(_sae(decoder_scale=0.5), RELU, params, cfg, ids, HOOK, batch_size=N,
                      skip_first=skip_first, mean_activation=mean_activation)
    h = _hook_acts(ids)[:, skip_first:]
    ((ce_clean, logp_clean), (ce_spliced, logp_spliced), (ce_zero, logp_zero),
     (ce_mean, logp_mean)) = _references(ids, skip_first, [
         None, (h / 2).astype(np.float32), np.zeros(D, np.float32), mean_activation])
    expected = {
        "num_sequences": N, "num_tokens": N * (T - 1), "num_predictions": N * (T - 2),
        "ce_clean": ce_clean, "ce_spliced": ce_spliced, "ce_zero_ablation": ce_zero,
        "ce_mean_ablation": ce_mean,
        "ce_recovered_zero": (ce_zero - ce_spliced) / (ce_zero - ce_clean),
        "ce_recovered_mean": (ce_mean - ce_spliced) / (ce_mean - ce_clean),
        "kl_spliced": _kl(logp_clean, logp_spliced), "kl_zero_ablation": _kl(logp_clean, logp_zero),
        "kl_mean_ablation": _kl(logp_clean, logp_mean),
        "fvu": np.sum((h / 2) ** 2) / np.sum((h - h.mean((0, 1))) ** 2), "l0_mean": D}
    self.assertEqual(set(out), set(expected))
    for key, value in expected.items():
      np.testing.assert_allclose(out[key], value, rtol=2e-4, atol=1e-6, err_msg=key)
    for key in ("kl_spliced", "kl_zero_ablation", "kl_mean_ablation"):
      self.assertGreater(out[key], 0.0)

  def test_batch_independent_for_a_per_token_sae_and_traced_parameters(self):
    cfg, params = _model()
    sae_cfg = model.SAEConfig(d_model=D, d_sae=2 * D, allocation="topk", k=5)
    rng = np.random.default_rng(3)
    sae = SAEParams(*(jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), jnp.float32)
                      for s in ((D, 2 * D), (2 * D,), (2 * D, D), (D,))))
    ids, mean = _ids(4), np.zeros(D, np.float32)
    passes = (lm_fidelity_lib._clean_pass, lm_fidelity_lib._replaced_pass,
              lm_fidelity_lib._reconstruct)
    one = lm_fidelity(sae, sae_cfg, params, cfg, ids, HOOK, batch_size=N, mean_activation=mean)
    self.assertEqual(one["l0_mean"], 5.0)
    self.assertGreater(one["kl_spliced"], 0.0)
    self.assertGreater(one["fvu"], 0.0)
    # Another SAE configuration compiles its reconstruction only: the LM passes are shared.
    compiled = [fn._cache_size() for fn in passes[:2]]
    lm_fidelity(_sae(), RELU, params, cfg, ids, HOOK, batch_size=N, mean_activation=mean)
    self.assertEqual([fn._cache_size() for fn in passes[:2]], compiled)
    # Batches of 3 and 1 sequences: the pooled sums do not depend on the split.
    two = lm_fidelity(sae, sae_cfg, params, cfg, ids, HOOK, batch_size=3, mean_activation=mean)
    for key, value in one.items():
      np.testing.assert_allclose(two[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
    # New SAE values and a new mean reuse the compiled programs of these shapes.
    compiled = [fn._cache_size() for fn in passes]
    other = SAEParams(*(2 * x for x in sae))
    three = lm_fidelity(other, sae_cfg, params, cfg, ids, HOOK, batch_size=3,
                        mean_activation=np.ones(D, np.float32))
    self.assertEqual([fn._cache_size() for fn in passes], compiled)
    self.assertNotAlmostEqual(three["ce_spliced"], two["ce_spliced"], places=4)

  def test_bad_arguments_raise(self):
    cfg, params = _model()
    ids = _ids()
    cases = [
        (dict(token_ids=ids[0]), r"token_ids must be a 2-D integer array \[n, t\]"),
        (dict(token_ids=ids.astype(np.float32)), "2-D integer array.*float32"),
        (dict(token_ids=ids[:, :2]), r"length t in \[skip_first \+ 2 = 3, max_position = 16\]"),
        (dict(token_ids=np.zeros((1, 17), np.int32)), "max_position = 16"),
        (dict(token_ids=ids + 64), r"must lie in \[0, vocab_size=64\)"),
        (dict(hook="blocks.5.hook_resid_post"), "has 2 blocks"),
        (dict(sae_cfg=model.SAEConfig(d_model=8, d_sae=16, allocation="relu")),
         "sae_cfg.d_model=8 must equal the LM's hidden_size=32"),
        (dict(batch_size=0), "batch_size must be an int >= 1"),
        (dict(skip_first=-1), "skip_first must be an int >= 0"),
        (dict(threshold=np.zeros(3)), r"threshold must be a scalar or \[d_sae=64\]"),
        (dict(normalization={"mean": np.zeros(3), "scale": 1.0}), "normalization.mean"),
        (dict(mean_activation=np.zeros(3)), r"mean_activation must be a finite \[d=32\]"),
    ]
    for overrides, pattern in cases:
      kwargs = dict(sae_params=_sae(), sae_cfg=RELU, lm_params=params, lm_cfg=cfg,
                    token_ids=ids, hook=HOOK) | overrides
      with self.subTest(pattern=pattern), self.assertRaisesRegex(ValueError, pattern):
        lm_fidelity(**kwargs)


if __name__ == "__main__":
  absltest.main()

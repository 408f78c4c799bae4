"""Downstream fidelity of an SAE spliced into a causal language model (GPT-2, GPT-NeoX).

The activation at one TransformerLens hook is replaced, at every position ``p >=
skip_first`` of every sequence, by (a) the SAE reconstruction, (b) zeros or (c) the mean
activation; positions before ``skip_first`` (the attention-sink tokens an SAE harvested
with ``skip_first`` never saw) keep their clean activations in every pass. The next-token
cross-entropy of each pass is compared with the clean model's over the predictions made
at positions ``skip_first <= p < t - 1`` (the token at ``p + 1`` is the target; the last
position has none). With ``CE`` the mean over those predictions::

  ce_recovered_{zero,mean} = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean)

1 means the splice costs nothing, 0 that it is no better than the ablation (below 0:
worse). Zero ablation is the normalisation of Bricken et al. 2023; mean ablation is the
stricter baseline, since the mean alone already explains much of the loss. Reporting the
spliced CE itself (the downstream loss) and its increase over clean follows Gao et al.
2024. The KL divergence of the next-token distributions, ``KL(clean || spliced) =
sum_v p_clean(v) (log p_clean(v) - log p_spliced(v))``, is averaged over the same
predictions.

The reconstruction is :func:`sae_jax.evaluation.evaluate.splice_reconstruction`, exactly
what the MiniLM fidelity (:func:`~sae_jax.evaluation.evaluate.fidelity`) splices: the
normalisation ``(h - mean) / scale`` is applied before the SAE and undone after it, and
``threshold`` selects the batch-independent ``encode_thresholded`` path.

References:
  Bricken et al. 2023, "Towards Monosemanticity: Decomposing Language Models With
  Dictionary Learning", Transformer Circuits Thread (loss recovered against zero
  ablation).
  Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093
  (downstream loss of the spliced reconstruction).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from sae_jax import lm
from sae_jax import metrics
from sae_jax import model
from sae_jax.evaluation import evaluate
from sae_jax.params import SAEParams


def _next_token_log_probs(logits_NxTxV: Float[Array, "n t v"],
                          skip_first: int) -> Float[Array, "n p v"]:
  """Log-probabilities of the predictions made at positions ``skip_first .. t - 2``."""
  return jax.nn.log_softmax(logits_NxTxV[:, skip_first:-1].astype(jnp.float32), axis=-1)


def _ce_sum(logp_NxPxV: Float[Array, "n p v"], ids_NxT: Int[Array, "n t"],
            skip_first: int) -> Float[Array, ""]:
  targets_NxP = ids_NxT[:, skip_first + 1:]
  return -jnp.sum(jnp.take_along_axis(logp_NxPxV, targets_NxP[..., None], axis=-1))


def _kl_sum(logp_clean_NxPxV: Float[Array, "n p v"],
            logp_NxPxV: Float[Array, "n p v"]) -> Float[Array, ""]:
  return jnp.sum(jnp.exp(logp_clean_NxPxV) * (logp_clean_NxPxV - logp_NxPxV))


@functools.partial(jax.jit, static_argnames=("lm_cfg", "hook", "skip_first"))
def _clean_pass(lm_params, ids, lm_cfg, hook, skip_first):
  out = lm.forward(lm_params, lm_cfg, ids, hooks=(hook,))
  logp = _next_token_log_probs(out.logits, skip_first)
  return logp, out.activations[hook], _ce_sum(logp, ids, skip_first)


@functools.partial(jax.jit, static_argnames=("lm_cfg", "hook", "skip_first"))
def _hook_sum(lm_params, ids, lm_cfg, hook, skip_first):
  out = lm.forward(lm_params, lm_cfg, ids, hooks=(hook,), return_logits=False)
  return jnp.sum(out.activations[hook][:, skip_first:].astype(jnp.float32), axis=(0, 1))


@functools.partial(jax.jit, static_argnames=("lm_cfg", "hook", "skip_first"))
def _replaced_pass(lm_params, ids, logp_clean, new_NxSxD, lm_cfg, hook, skip_first):
  """(CE sum, KL sum) with positions ``>= skip_first`` at ``hook`` set to ``new_NxSxD``.

  One compiled program per shape serves the splice and both ablations (the replacement
  is an argument, never a constant), whatever the SAE.
  """

  def replace(h_NxTxD):
    return h_NxTxD.at[:, skip_first:].set(new_NxSxD.astype(h_NxTxD.dtype))

  out = lm.forward(lm_params, lm_cfg, ids, replace={hook: replace})
  logp = _next_token_log_probs(out.logits, skip_first)
  return _ce_sum(logp, ids, skip_first), _kl_sum(logp_clean, logp)


@functools.partial(jax.jit, static_argnames=("sae_cfg", "skip_first"))
def _reconstruct(sae_params, h_NxTxD, norm, threshold, sae_cfg, skip_first):
  """SAE reconstruction ``[n, t - skip_first, d]`` of the clean activations, and error sums.

  The positions ``>= skip_first`` of the whole batch are encoded as one batch.
  """
  x_NxSxD = h_NxTxD[:, skip_first:].astype(jnp.float32)
  n, s, d = x_NxSxD.shape
  x_BxD = x_NxSxD.reshape(n * s, d)
  h_hat_BxD, codes_BxF = evaluate.splice_reconstruction(sae_params, x_BxD, sae_cfg, norm,
                                                        threshold)
  squared_error, centred = metrics.reconstruction_error_terms(h_hat_BxD, x_BxD)
  l0 = jnp.sum(codes_BxF.astype(jnp.float32) > 0, dtype=jnp.int32)
  return h_hat_BxD.reshape(n, s, d), (squared_error, centred, jnp.sum(x_BxD, axis=0), l0)


def _check_int(name: str, value: Any, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")


def _recovered(ablated: float, spliced: float, clean: float) -> float:
  gap = ablated - clean
  return (ablated - spliced) / gap if gap != 0 else math.nan


def lm_fidelity(sae_params: SAEParams, sae_cfg: model.SAEConfig, lm_params: Mapping[str, Any],
                lm_cfg: lm.models.LMConfig, token_ids: Int[ArrayLike, "n t"], hook: str, *,
                threshold: Float[ArrayLike, " f"] | float | None = None,
                normalization: Any = None, batch_size: int = 8, skip_first: int = 1,
                mean_activation: Float[ArrayLike, " d"] | None = None) -> dict[str, Any]:
  """CE loss, CE loss recovered and KL with the SAE spliced into a causal LM at ``hook``.

  See the module docstring for the formulas. The SAE encodes the spliced positions of a
  batch of ``batch_size`` sequences as one batch (the selection pool of the batch-level
  allocations); the last batch may be smaller, and costs one more compilation. Every
  pass is jitted once per batch shape with the SAE and LM parameters as traced
  arguments: the clean pass (logits and the hook's activations), the reconstruction
  (SAE only, once per SAE configuration) and the pass with a replacement at the hook,
  one program for the splice and both ablations. Sums are float32 per batch on device,
  pooled in float64 on the host.

  Args:
    sae_params: SAE parameters.
    sae_cfg: SAE configuration; ``d_model`` must equal the LM's ``hidden_size``.
    lm_params, lm_cfg: the language model (``sae_jax.lm.load_model``).
    token_ids: ``[n, t]`` token ids, ``skip_first + 2 <= t <= max_position``.
    hook: TransformerLens hook name, e.g. ``"blocks.3.hook_resid_post"``.
    threshold: scalar or ``[d_sae]`` (``TrainState.threshold``); when given, the
      ``threshold_``-prefixed keys describe the ``encode_thresholded`` splice too.
    normalization: SAE input normalisation (see ``evaluate.Normalization``), or None.
    batch_size: sequences per forward pass.
    skip_first: leading positions of every sequence left clean and not scored.
    mean_activation: ``[d]`` activation of the mean ablation (e.g. the training
      store's ``stats.mean``); None uses the mean over the spliced positions of
      ``token_ids`` (one more forward pass, up to the hook only).

  Returns:
    ``num_sequences``; ``num_tokens`` (spliced positions); ``num_predictions`` (scored
    next-token predictions); ``ce_clean``, ``ce_spliced``, ``ce_zero_ablation``,
    ``ce_mean_ablation`` (mean CE in nats); ``ce_recovered_zero``,
    ``ce_recovered_mean`` (NaN when the ablation leaves CE unchanged); ``kl_spliced``,
    ``kl_zero_ablation``, ``kl_mean_ablation`` (mean KL(clean || intervened) in nats);
    ``fvu`` (``sum |h - h_hat|^2 / sum |h - mean(h)|^2`` over the spliced positions,
    as ``evaluate_sae``'s ``fvu``) and ``l0_mean`` (active features per spliced
    token). With ``threshold``, ``threshold_ce_spliced``,
    ``threshold_ce_recovered_zero``, ``threshold_ce_recovered_mean``,
    ``threshold_kl_spliced``, ``threshold_fvu`` and ``threshold_l0_mean`` as well.

  References:
    Bricken et al. 2023 ("Towards Monosemanticity"); Gao et al. 2024, arXiv 2406.04093.

  Raises:
    ValueError: on a bad argument (the message names it).
  """
  ids = np.asarray(token_ids)
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"token_ids must be a 2-D integer array [n, t]; got shape {ids.shape} "
                     f"and dtype {ids.dtype}.")
  _check_int("skip_first", skip_first, 0)
  _check_int("batch_size", batch_size, 1)
  n, t = ids.shape
  if n < 1 or not skip_first + 2 <= t <= lm_cfg.max_position:
    raise ValueError(f"token_ids must have n >= 1 sequences of length t in [skip_first + 2 = "
                     f"{skip_first + 2}, max_position = {lm_cfg.max_position}] (at least one "
                     f"scored prediction after the skipped positions); got shape {ids.shape}.")
  if ids.min() < 0 or ids.max() >= lm_cfg.vocab_size:
    raise ValueError(f"token_ids must lie in [0, vocab_size={lm_cfg.vocab_size}); got values "
                     f"in [{ids.min()}, {ids.max()}].")
  ids = ids.astype(np.int32)
  lm.core.parse_hook(hook, lm_cfg.num_layers, lm_cfg.parallel_residual)
  d = lm_cfg.hidden_size
  if sae_cfg.d_model != d:
    raise ValueError(f"sae_cfg.d_model={sae_cfg.d_model} must equal the LM's hidden_size={d} "
                     f"(the width at {hook}).")
  norm = evaluate.as_normalization(normalization, d) or evaluate.Normalization(
      np.zeros(d, np.float32), np.ones((), np.float32))
  theta = evaluate.check_threshold(threshold, sae_cfg.d_sae)
  batches = [ids[i:i + batch_size] for i in range(0, n, batch_size)]
  static = dict(lm_cfg=lm_cfg, hook=hook, skip_first=skip_first)

  if mean_activation is None:
    total = np.zeros(d, np.float64)
    for b_ids in batches:
      total += np.asarray(_hook_sum(lm_params, b_ids, **static), np.float64)
    mean_activation = total / (n * (t - skip_first))
  mean_activation = np.asarray(mean_activation, np.float32)
  if mean_activation.shape != (d,) or not np.all(np.isfinite(mean_activation)):
    raise ValueError(f"mean_activation must be a finite [d={d}] vector; got shape "
                     f"{mean_activation.shape}.")
  ablations = {"zero_ablation": jnp.zeros(d, jnp.float32),
               "mean_ablation": jnp.asarray(mean_activation)}
  splices = {"": None} | ({} if theta is None else {"threshold_": theta})

  ce = {name: 0.0 for name in ("clean", *ablations)} | {p + "spliced": 0.0 for p in splices}
  kl = {name: 0.0 for name in ce if name != "clean"}
  recon = {p: {"se": [], "centred": [], "x_sum": [], "l0": 0} for p in splices}
  sizes = []
  for b_ids in batches:
    # Every pass of the batch is dispatched before its results are read back.
    logp_clean, h, ce_clean = _clean_pass(lm_params, b_ids, **static)
    shape = (len(b_ids), t - skip_first, d)
    replacements = {name: jnp.broadcast_to(value, shape) for name, value in ablations.items()}
    errors = {}
    for prefix, th in splices.items():
      replacements[prefix + "spliced"], errors[prefix] = _reconstruct(
          sae_params, h, norm, th, sae_cfg=sae_cfg, skip_first=skip_first)
    scores = {name: _replaced_pass(lm_params, b_ids, logp_clean, new, **static)
              for name, new in replacements.items()}
    ce["clean"] += float(ce_clean)
    for name, (b_ce, b_kl) in scores.items():
      ce[name] += float(b_ce)
      kl[name] += float(b_kl)
    for prefix, (se, centred, x_sum, l0) in errors.items():
      parts = recon[prefix]
      parts["se"].append(float(se))
      parts["centred"].append(float(centred))
      parts["x_sum"].append(np.asarray(x_sum, np.float64))
      parts["l0"] += int(l0)
    sizes.append(len(b_ids) * (t - skip_first))

  num_tokens, num_predictions = n * (t - skip_first), n * (t - 1 - skip_first)
  ce = {name: value / num_predictions for name, value in ce.items()}
  kl = {name: value / num_predictions for name, value in kl.items()}
  out: dict[str, Any] = {
      "num_sequences": n, "num_tokens": num_tokens, "num_predictions": num_predictions,
      "ce_clean": ce["clean"], "ce_zero_ablation": ce["zero_ablation"],
      "ce_mean_ablation": ce["mean_ablation"], "kl_zero_ablation": kl["zero_ablation"],
      "kl_mean_ablation": kl["mean_ablation"]}
  sizes_B = np.asarray(sizes, np.float64)
  for prefix, parts in recon.items():
    x_sums = np.stack(parts["x_sum"])
    total = evaluate.pooled_sum_sq(
        parts["centred"], x_sums, sizes_B, x_sums.sum(0) / num_tokens)
    spliced = ce[prefix + "spliced"]
    out.update({
        prefix + "ce_spliced": spliced,
        prefix + "ce_recovered_zero": _recovered(ce["zero_ablation"], spliced, ce["clean"]),
        prefix + "ce_recovered_mean": _recovered(ce["mean_ablation"], spliced, ce["clean"]),
        prefix + "kl_spliced": kl[prefix + "spliced"],
        prefix + "fvu": sum(parts["se"]) / total if total > 0 else math.nan,
        prefix + "l0_mean": parts["l0"] / num_tokens})
  return out

"""SAE evaluation: reconstruction, sparsity and feature usage over many batches, and
downstream fidelity of the SAE spliced into all-MiniLM-L6-v2.

Per-batch work is pure and jitted (:func:`batch_statistics`, :func:`splice_reconstruction`);
the drivers :func:`evaluate_sae` and :func:`fidelity` stream batches and pool their sums on
the host in float64, so no figure over-weights a small last batch.

References:
  Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093.
  Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature Choice
  Sparse Autoencoders", arXiv 2411.02124.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Num

from sae_jax import metrics
from sae_jax import model
from sae_jax.data import bert
from sae_jax.params import SAEParams

L0_QUANTILES = (5, 25, 50, 75, 95)  # Percentiles, computed as np.quantile's linear rule.
# Selections coupling a batch's tokens: their batches must hold the real tokens only.
_BATCH_COUPLED = ("batch_topk", "mutual_choice", "feature_choice", "feature_choice_zipf")


class Normalization(NamedTuple):
  """SAE inputs ``(h - mean) / scale`` of activations ``h``; back: ``recon * scale + mean``.

  Attributes:
    mean: ``[d]`` float32 offset.
    scale: positive float32 scalar or ``[d]`` vector.
  """

  mean: Float[np.ndarray, " d"]
  scale: Float[np.ndarray, ""] | Float[np.ndarray, " d"]


def as_normalization(normalization: Any, d: int) -> Normalization | None:
  """Checks and converts an SAE input normalisation; ``None`` passes through.

  Accepts a ``Normalization``, a ``{"mean", "scale"}`` mapping or an object with ``.mean``
  and ``.scale``; a scalar mean is broadcast to ``[d]``. Raises ValueError otherwise.
  """
  if normalization is None:
    return None
  mapping = isinstance(normalization, Mapping)
  mean, scale = ((normalization.get(key) if mapping else getattr(normalization, key, None))
                 for key in ("mean", "scale"))
  if mean is None or scale is None:
    raise ValueError("normalization must have a 'mean' and a 'scale' (a Normalization, a "
                     f"mapping or an object), or be None; got {normalization!r:.200}.")
  mean, scale = np.asarray(mean, np.float32), np.asarray(scale, np.float32)
  mean = np.full((d,), mean, np.float32) if mean.ndim == 0 else mean
  if mean.shape != (d,) or scale.shape not in ((), (d,)):
    raise ValueError(f"normalization.mean must be a scalar or [d={d}] and normalization.scale "
                     f"a scalar or [d={d}]; got shapes {mean.shape} and {scale.shape}.")
  if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(scale)) and np.all(scale > 0)):
    raise ValueError("normalization.mean must be finite and normalization.scale finite and "
                     f"> 0; got scale in [{scale.min()}, {scale.max()}].")
  return Normalization(mean, scale)


def normalization_from_stats(stats: Any, *, center: bool = False,
                             rescale: bool = True) -> Normalization:
  """The normalisation described by an activation store's ``StoreStats``.

  Args:
    stats: ``StoreReader.stats`` (``mean [d]``, ``norm_mean``).
    center: subtract the stored mean.
    rescale: divide by ``norm_mean / sqrt(d)``, so raw rows get mean norm ``sqrt(d)``
      (``x / norm_mean * sqrt(d)``).
  """
  mean = np.asarray(stats.mean, np.float64)
  d = mean.shape[0]
  scale = float(stats.norm_mean) / math.sqrt(d) if rescale else 1.0
  return as_normalization({"mean": mean if center else 0.0, "scale": scale}, d)


def _encode_decode(params, x, cfg, threshold):
  if threshold is None:
    out = model.forward(params, x, cfg)
    return out.codes, out.recon
  codes_BxF, _ = model.encode_thresholded(params, x, cfg, threshold)
  return codes_BxF, model.decode(params, codes_BxF, cfg)


class BatchStatistics(NamedTuple):
  """Sums over one batch from which every figure of :func:`evaluate_sae` is pooled.

  With ``r = x - recon`` the residual and ``x.mean(0)``, ``r.mean(0)`` this batch's means:

  Attributes:
    squared_error: ``sum(r^2)``, float32.
    centred_sum_sq: ``sum((x - x.mean(0))^2)``, float32.
    x_sum: ``[d]`` float32 column sums of ``x``.
    l0_histogram: ``[f + 1]`` int32 token counts per number of firing features.
    fire_counts: ``[f]`` int32 tokens on which each feature fires.
    x_sum_sq: ``sum(x^2)``, float32 (the denominator of FVU about zero).
    residual_sum: ``[d]`` float32 column sums of ``r``.
    residual_centred_sum_sq: ``sum((r - r.mean(0))^2)``, float32.
    per_token_fvu_sum: ``sum_i |r_i|^2 / |x_i - x.mean(0)|^2`` over the tokens ``i`` whose
      denominator is > 0, float32 (SAEBench's legacy per-token ratio).
    per_token_count: int32 number of tokens in ``per_token_fvu_sum``.
  """

  squared_error: Float[Array, ""]
  centred_sum_sq: Float[Array, ""]
  x_sum: Float[Array, " d"]
  l0_histogram: Int[Array, " f1"]
  fire_counts: Int[Array, " f"]
  x_sum_sq: Float[Array, ""]
  residual_sum: Float[Array, " d"]
  residual_centred_sum_sq: Float[Array, ""]
  per_token_fvu_sum: Float[Array, ""]
  per_token_count: Int[Array, ""]


def batch_statistics(params: SAEParams, x: Num[Array, "b d"], cfg: model.SAEConfig,
                     threshold: Float[Array, " f"] | float | None = None,
                     fire_threshold: float | Float[Array, ""] = 0.0) -> BatchStatistics:
  """Reconstruction and firing sums of one batch, in float32; jit with ``cfg`` static.

  Args:
    params: SAE parameters.
    x: ``[b, d]`` SAE inputs.
    cfg: SAE configuration.
    threshold: ``None`` runs the batch allocation (``model.forward``); a scalar or
      ``[f]`` threshold runs the batch-independent ``model.encode_thresholded``. Traced.
    fire_threshold: a feature fires on a token when its code exceeds this. Traced.

  Returns:
    The batch's :class:`BatchStatistics`.
  """
  codes_BxF, recon_BxD = _encode_decode(params, x, cfg, threshold)
  x_BxD, recon_BxD = x.astype(jnp.float32), recon_BxD.astype(jnp.float32)
  squared_error, centred = metrics.reconstruction_error_terms(recon_BxD, x_BxD)
  fired_BxF = codes_BxF.astype(jnp.float32) > fire_threshold
  l0_B = jnp.sum(fired_BxF, axis=1, dtype=jnp.int32)
  resid_BxD = x_BxD - recon_BxD
  # Legacy per-token ratio; a token at the batch mean (every token of a one-token batch)
  # has no defined ratio and is left out of both the sum and the count.
  token_error_B = jnp.sum(jnp.square(resid_BxD), axis=1)
  token_spread_B = jnp.sum(jnp.square(x_BxD - jnp.mean(x_BxD, axis=0)), axis=1)
  defined_B = token_spread_B > 0
  ratio_B = jnp.where(defined_B, token_error_B / jnp.where(defined_B, token_spread_B, 1.0), 0.0)
  return BatchStatistics(
      squared_error, centred, jnp.sum(x_BxD, axis=0),
      jnp.bincount(l0_B, length=cfg.d_sae + 1).astype(jnp.int32),
      jnp.sum(fired_BxF, axis=0, dtype=jnp.int32),
      x_sum_sq=jnp.sum(jnp.square(x_BxD)),
      residual_sum=jnp.sum(resid_BxD, axis=0),
      residual_centred_sum_sq=jnp.sum(jnp.square(resid_BxD - jnp.mean(resid_BxD, axis=0))),
      per_token_fvu_sum=jnp.sum(ratio_B),
      per_token_count=jnp.sum(defined_B, dtype=jnp.int32))


_jit_batch_statistics = jax.jit(batch_statistics, static_argnames="cfg")


def _histogram_quantiles(hist: np.ndarray, percents) -> list[float]:
  cum, out = np.cumsum(hist), []
  last = int(cum[-1]) - 1
  for p in percents:
    pos = p / 100 * last
    lo = math.floor(pos)
    v_lo = np.searchsorted(cum, lo, side="right")
    v_hi = np.searchsorted(cum, min(lo + 1, last), side="right")
    out.append(float(v_lo + (pos - lo) * (v_hi - v_lo)))
  return out


def pooled_sum_sq(centred_sums: list[float], column_sums: np.ndarray, sizes: np.ndarray,
                   reference: np.ndarray) -> float:
  """``sum_i |v_i - reference|^2`` over all rows from per-batch sums, in float64.

  Chan et al.'s pooled sum of squares: each batch's sum of squares about its own mean
  plus ``b * |batch mean - reference|^2``; exact, without cancellation.
  """
  spread = np.sum(np.square(column_sums / sizes[:, None] - reference).sum(1) * sizes)
  return float(sum(centred_sums) + spread)


def _ratio(numerator: float, denominator: float) -> float:
  return numerator / denominator if denominator > 0 else math.nan


def _summary(parts: list[BatchStatistics], sizes: list[int], dataset_mean, curve_points: int
             ) -> dict[str, Any]:
  n, sizes_B = sum(sizes), np.asarray(sizes, np.float64)
  x_sums = np.stack([np.asarray(p.x_sum, np.float64) for p in parts])
  r_sums = np.stack([np.asarray(p.residual_sum, np.float64) for p in parts])
  eval_mean = x_sums.sum(0) / n
  reference = eval_mean if dataset_mean is None else dataset_mean
  within = [float(p.centred_sum_sq) for p in parts]
  total = pooled_sum_sq(within, x_sums, sizes_B, reference)
  eval_total = pooled_sum_sq(within, x_sums, sizes_B, eval_mean)
  residual_total = pooled_sum_sq([float(p.residual_centred_sum_sq) for p in parts], r_sums,
                                  sizes_B, r_sums.sum(0) / n)
  squared_error = sum(float(p.squared_error) for p in parts)
  fvu = _ratio(squared_error, total)
  hist = np.sum([np.asarray(p.l0_histogram, np.int64) for p in parts], axis=0)
  density_F = np.sum([np.asarray(p.fire_counts, np.int64) for p in parts], axis=0) / n
  density32_F = jnp.asarray(density_F, jnp.float32)
  c, s = metrics.fit_zipf(density32_F)
  under_F = metrics.underutilised_features(density32_F, c, s, 1.0)
  f, l0_max = density_F.shape[0], int(np.flatnonzero(hist).max())
  ranks = np.unique(np.round(np.geomspace(1, f, min(curve_points, f))).astype(np.int64))
  out = {
      "fvu": fvu,
      "explained_variance": 1.0 - fvu,
      "nmse": _ratio(squared_error, sum(within)),
      "fvu_per_token": _ratio(sum(float(p.per_token_fvu_sum) for p in parts),
                              sum(int(p.per_token_count) for p in parts)),
      "fvu_about_zero": _ratio(squared_error, sum(float(p.x_sum_sq) for p in parts)),
      "fvu_centred_residual": _ratio(residual_total, eval_total),
      "l0_mean": float(np.dot(np.arange(f + 1), hist) / n),
      "l0_histogram": hist[:l0_max + 1], "l0_max": l0_max,
      "feature_density": density_F,
      "dead_fraction": float(np.mean(density_F == 0)),
      "underutilised_fraction": float(np.mean(np.asarray(under_F))),
      "zipf_C": float(c), "zipf_s": float(s),
      "density_by_rank_rank": ranks,
      "density_by_rank": np.sort(density_F)[::-1][ranks - 1],
  }
  for p, q in zip(L0_QUANTILES, _histogram_quantiles(hist, L0_QUANTILES)):
    out[f"l0_p{p}"] = q
  return out


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _check_int(name: str, value, low: int, high: float = math.inf) -> None:
  if not (isinstance(value, (int, np.integer)) and _is_number(value) and low <= value <= high):
    raise ValueError(f"{name} must be an int in [{low}, {high}]; got {value!r}.")


def check_threshold(threshold, f: int) -> jax.Array | None:
  """A calibrated threshold (scalar or ``[f]``) as a float32 array, None passed through.

  Raises:
    ValueError: on another shape or a NaN.
  """
  if threshold is None:
    return None
  theta = np.asarray(threshold, np.float32)
  if theta.shape not in ((), (f,)) or np.any(np.isnan(theta)):
    raise ValueError(f"threshold must be a scalar or [d_sae={f}] without NaN (e.g. "
                     f"TrainState.threshold); got shape {theta.shape}.")
  return jnp.asarray(theta)


def evaluate_sae(params: SAEParams, cfg: model.SAEConfig, batches: Iterable[ArrayLike], *,
                 num_batches: int, threshold: Float[ArrayLike, " f"] | float | None = None,
                 fire_threshold: float = 0.0, dataset_mean: Float[ArrayLike, " d"] | None = None,
                 curve_points: int = 64) -> dict[str, Any]:
  """Evaluates an SAE on ``num_batches`` batches of ``[b, d]`` SAE inputs.

  Explained variance is reported in several incomparable ways across tools; each variant
  has its own key. With ``r_i = x_i - recon_i`` over the ``n`` evaluated tokens ``i``,
  ``mu`` their mean (``dataset_mean`` when given), ``mu_B`` the mean of the batch holding
  token ``i`` and sums over tokens and dimensions:

  - ``fvu``: textbook fraction of variance unexplained over the whole evaluation set,
    ``sum |r_i|^2 / sum |x_i - mu|^2`` (SAELens >= 6.45.1); report this one first.
  - ``explained_variance``: ``1 - fvu``.
  - ``nmse``: ``sum |r_i|^2 / sum |x_i - mu_B|^2``, each token centred on its own batch's
    mean and the sums pooled over batches (sparsify's per-batch loss, pooled).
  - ``fvu_per_token``: SAEBench's "legacy" form (explained variance ``1 -`` it), the mean
    over tokens of ``|r_i|^2 / |x_i - mu_B|^2``; the per-token denominator is centred on
    the batch mean, so it depends on how tokens are batched, and tokens with a zero
    denominator (every token of a one-token batch) are left out. A token close to its
    batch mean can give a very large ratio.
  - ``fvu_about_zero``: ``sum |r_i|^2 / sum |x_i|^2`` (an old SAELens/SAEBench formula);
    activations with a large mean make it small, i.e. an explained variance near 1.
  - ``fvu_centred_residual``: dictionary_learning's ``sum_j Var(r_j) / sum_j Var(x_j)``,
    variances of each dimension ``j`` over the evaluation set (the residual's own mean
    is removed, so a constant bias in ``recon`` costs nothing; ignores ``dataset_mean``).

  The other keys: ``num_batches``, ``num_tokens``, ``l0_mean``, ``l0_histogram`` (token
  counts per L0 value, up to ``l0_max``), ``l0_p5`` ... ``l0_p95`` (as ``np.quantile``),
  ``feature_density`` ([f] firing fractions), ``dead_fraction`` (never fired on these
  tokens), ``underutilised_fraction`` (``metrics.underutilised_features`` at tau 1
  against the Zipf fit ``zipf_C``, ``zipf_s`` of the densities) and the density-by-rank
  curve at about ``curve_points`` log-spaced ranks (``density_by_rank_rank``, 1-based,
  and ``density_by_rank``). With ``threshold`` (``TrainState.threshold``) every key but
  ``num_batches`` and ``num_tokens`` appears again prefixed ``threshold_``, describing
  the batch-independent ``encode_thresholded`` path. A ratio whose denominator is 0 is
  NaN. Every sum is float32 per batch on device and pooled in float64 on the host.

  Args:
    params: SAE parameters.
    cfg: SAE configuration.
    batches: iterable of ``[b, d_model]`` SAE inputs; batch sizes may differ.
    num_batches: how many batches to draw from ``batches``.
    threshold: scalar or ``[d_sae]`` threshold of the ``threshold_`` keys; None skips them.
    fire_threshold: a feature fires on a token when its code exceeds this (>= 0).
    dataset_mean: ``[d_model]`` reference mean of ``fvu``; None uses the evaluated tokens'.
    curve_points: about how many ranks the density-by-rank curve samples (>= 2).

  Returns:
    The dict of figures described above.

  References:
    Gao et al. 2024, arXiv 2406.04093; Ayonrinde 2024, arXiv 2411.02124; SAEBench
    (core metrics, legacy explained variance); dictionary_learning (centred residual).

  Raises:
    ValueError: on a bad argument, a batch of the wrong shape, or fewer batches than
      ``num_batches``.
  """
  _check_int("num_batches", num_batches, 1)
  _check_int("curve_points", curve_points, 2)
  if not (_is_number(fire_threshold) and math.isfinite(fire_threshold) and fire_threshold >= 0):
    raise ValueError(f"fire_threshold must be a finite number >= 0; got {fire_threshold!r}.")
  dataset_mean = None if dataset_mean is None else np.asarray(dataset_mean, np.float64)
  if dataset_mean is not None and dataset_mean.shape != (cfg.d_model,):
    raise ValueError(f"dataset_mean must have shape [d_model={cfg.d_model}]; got "
                     f"{dataset_mean.shape}.")
  variants = {"": None} | ({} if threshold is None else
                           {"threshold_": check_threshold(threshold, cfg.d_sae)})
  parts, sizes, it = {prefix: [] for prefix in variants}, [], iter(batches)
  for i in range(num_batches):
    x = next(it, None)
    if x is None:
      raise ValueError(f"batches ran out after {i} batches; num_batches={num_batches} asks "
                       f"for more. Lower num_batches or pass a longer iterator.")
    if (x := jnp.asarray(x)).ndim != 2 or x.shape[0] < 1 or x.shape[1] != cfg.d_model:
      raise ValueError(f"batch {i} must have shape [b >= 1, d_model={cfg.d_model}]; got "
                       f"{tuple(x.shape)}.")
    sizes.append(x.shape[0])
    for prefix, theta in variants.items():
      parts[prefix].append(_jit_batch_statistics(params, x, cfg=cfg, threshold=theta,
                                                 fire_threshold=jnp.float32(fire_threshold)))
  result: dict[str, Any] = {"num_batches": num_batches, "num_tokens": sum(sizes)}
  for prefix in variants:
    summary = _summary(parts[prefix], sizes, dataset_mean, curve_points)
    result.update({prefix + key: value for key, value in summary.items()})
  return result


def splice_reconstruction(params: SAEParams, h: Num[Array, "b d"], cfg: model.SAEConfig,
                          norm: Normalization,
                          threshold: Float[Array, " f"] | float | None = None,
                          ) -> tuple[Float[Array, "b d"], Float[Array, "b f"]]:
  """SAE reconstruction of model activations, in the model's space, float32.

  ``recon((h - mean) / scale) * scale + mean``; the batch allocation when ``threshold``
  is None, else ``encode_thresholded``. Returns ``(h_hat [b, d], codes [b, f])``.
  """
  sae_in_BxD = (h.astype(jnp.float32) - norm.mean) / norm.scale
  codes_BxF, recon_BxD = _encode_decode(params, sae_in_BxD, cfg, threshold)
  return recon_BxD.astype(jnp.float32) * norm.scale + norm.mean, codes_BxF


_jit_splice = jax.jit(splice_reconstruction, static_argnames="cfg")


@functools.partial(jax.jit, static_argnames=("bert_cfg", "layer"))
def _clean_pass(bert_params, ids, mask, bert_cfg, layer):
  out = bert.bert_forward(bert_params, bert_cfg, ids, mask)
  return out.hidden_states[layer], bert.sentence_embedding(out.last_hidden, mask)


@functools.partial(jax.jit, static_argnames=("bert_cfg", "layer"))
def _spliced_pass(bert_params, ids, mask, replacement, bert_cfg, layer):
  def replace(h, m):
    return jnp.where((m != 0)[..., None], replacement.astype(h.dtype), h)
  out = bert.bert_forward(bert_params, bert_cfg, ids, mask, replace_layer=layer,
                          replace_fn=replace)
  return bert.sentence_embedding(out.last_hidden, mask)


def _window_batches(ids: np.ndarray, mask: np.ndarray, batch_size: int):
  """Fixed ``[batch_size, t]`` batches, the last padded with empty windows."""
  for start in range(0, len(ids), batch_size):
    stop = min(start + batch_size, len(ids))
    pad = ((0, batch_size - (stop - start)), (0, 0))
    yield np.pad(ids[start:stop], pad), np.pad(mask[start:stop], pad)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1),
                                       1e-12)


def fidelity(sae_params: SAEParams, cfg: model.SAEConfig, bert_params: Mapping[str, Any],
             bert_cfg: bert.BertConfig, ids: Int[ArrayLike, "n t"], mask: Num[ArrayLike, "n t"],
             layer: int, *, normalization: Any = None,
             threshold: Float[ArrayLike, " f"] | float | None = None, batch_size: int = 32,
             mean_activation: Float[ArrayLike, " d"] | None = None) -> dict[str, Any]:
  """Downstream fidelity: sentence embeddings with the SAE spliced into the encoder.

  The residual stream after block ``layer`` (``hidden_states[layer]``) is replaced, at
  real tokens only, by the SAE reconstruction, by zeros, or by the mean activation
  (``mean_activation``, e.g. the store's ``stats.mean``, else the mean over the real
  tokens of these windows); each final sentence embedding is compared by cosine with
  the clean one. With ``d = 1 - cos`` averaged over windows, ``fidelity_recovered =
  (d_mean - d_sae) / d_mean`` (1: perfect, 0: no better than mean ablation; the encoder
  analogue of CE loss recovered) and ``fidelity_recovered_zero`` uses zero ablation.
  The SAE encodes all real tokens of a window batch as one batch (the Mutual/Feature
  Choice selection pool). ``normalization`` (see :class:`Normalization`) is undone
  around the SAE. Also reports ``nmse`` and ``l0_mean`` of the spliced tokens and, with
  ``threshold``, ``threshold_``-prefixed figures of the ``encode_thresholded`` path.

  References:
    Gao et al. 2024, arXiv 2406.04093 (downstream loss of spliced SAEs); Reimers and
    Gurevych 2019, arXiv 1908.10084 (sentence embeddings).

  Raises:
    ValueError: on a bad argument or when no window holds a real token.
  """
  ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
  d = bert_cfg.hidden_size
  if ids.ndim != 2 or mask.shape != ids.shape:
    raise ValueError(f"ids and mask must be [n, t] of one shape; got {ids.shape} and "
                     f"{mask.shape}.")
  if cfg.d_model != d:
    raise ValueError(f"cfg.d_model={cfg.d_model} must equal bert_cfg.hidden_size={d}.")
  _check_int("layer", layer, 0, bert_cfg.num_layers)
  _check_int("batch_size", batch_size, 1)
  norm = as_normalization(normalization, d) or Normalization(np.zeros(d, np.float32),
                                                             np.ones((), np.float32))
  theta = check_threshold(threshold, cfg.d_sae)
  if not np.any(mask):
    raise ValueError("mask holds no real token; nothing to evaluate.")
  batch_size = min(batch_size, len(ids))
  run = functools.partial(_clean_pass, bert_params, bert_cfg=bert_cfg, layer=layer)
  if mean_activation is None:
    total = np.zeros(d, np.float64)
    for b_ids, b_mask in _window_batches(ids, mask, batch_size):
      total += np.asarray(run(b_ids, b_mask)[0], np.float64)[b_mask.astype(bool)].sum(0)
    mean_activation = total / mask.sum()
  mean_activation = np.asarray(mean_activation, np.float32)
  if mean_activation.shape != (d,):
    raise ValueError(f"mean_activation must have shape [{d}]; got {mean_activation.shape}.")

  variants = ["sae", "zero", "mean"] + (["threshold_sae"] if theta is not None else [])
  cos = {name: [] for name in variants}
  sums = {name: np.zeros(3) for name in ("sae", "threshold_sae")}  # se, centred, l0
  for b_ids, b_mask in _window_batches(ids, mask, batch_size):
    h, clean = run(b_ids, b_mask)
    real, h = b_mask.astype(bool), np.asarray(h, np.float32)
    x_real = h[real]
    replacements = {"zero": np.zeros_like(h), "mean": np.broadcast_to(mean_activation, h.shape)}
    for name, th in (("sae", None), ("threshold_sae", theta)):
      if name not in cos:
        continue
      # Per-token encodings pad to a fixed row count (one compilation); a batch-coupled
      # selection must see exactly the real tokens.
      coupled = th is None and cfg.allocation in _BATCH_COUPLED
      padded = np.pad(x_real, ((0, 0 if coupled else real.size - len(x_real)), (0, 0)))
      h_hat, codes = _jit_splice(sae_params, padded, cfg=cfg, norm=norm, threshold=th)
      h_hat = np.asarray(h_hat)[:len(x_real)]
      se, centred = metrics.reconstruction_error_terms(h_hat, x_real)
      sums[name] += (float(se), float(centred),
                     float(np.sum(np.asarray(codes)[:len(x_real)] > 0)))
      replacement = h.copy()
      replacement[real] = h_hat
      replacements[name] = replacement
    for name in variants:
      emb = _spliced_pass(bert_params, b_ids, b_mask, replacements[name], bert_cfg=bert_cfg,
                          layer=layer)
      cos[name].append(_cosines(emb, clean)[real.any(axis=1)])
  cos = {name: np.concatenate(values) for name, values in cos.items()}
  dist = {name: float(np.mean(1.0 - values)) for name, values in cos.items()}
  num_tokens = int(mask.sum())

  def recovered(name, baseline):
    return (dist[baseline] - dist[name]) / dist[baseline] if dist[baseline] > 0 else math.nan

  out = {"num_windows": len(cos["sae"]), "num_tokens": num_tokens,
         "cos_zero": float(np.mean(cos["zero"])), "cos_mean": float(np.mean(cos["mean"]))}
  for name, prefix in (("sae", ""), ("threshold_sae", "threshold_")):
    if name in cos:
      se, centred, l0 = sums[name]
      out.update({prefix + "cos_sae": float(np.mean(cos[name])),
                  prefix + "fidelity_recovered": recovered(name, "mean"),
                  prefix + "fidelity_recovered_zero": recovered(name, "zero"),
                  prefix + "nmse": float(se / centred) if centred > 0 else math.nan,
                  prefix + "l0_mean": float(l0 / num_tokens)})
  return out

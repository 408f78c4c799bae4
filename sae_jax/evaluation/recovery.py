"""How well an SAE recovers known true features (SynthSAEBench-style scores).

Scores compare SAE decoder rows ``[w, d]`` with true unit features ``[n, d]`` through
their absolute cosine similarities (signs do not matter: a latent that learnt ``-v`` has
found ``v``'s direction):

- :func:`mcc`: mean ``|cos|`` over a one-to-one Hungarian matching of ``min(w, n)`` pairs;
- :func:`feature_recovery`: precision, recall and F1 of recovered features at a cosine
  threshold, by best match;
- :func:`recovery_scores`: both, plus textbook FVU over the evaluation set, the SAE's and
  the true codes' mean L0 and the dead fraction, from one cosine matrix.

The cosine matrix is built in float32 blocks of decoder rows. At ``w = 4096``, ``n = 16384``
it takes 256 MB, and SciPy's assignment solver copies it once more in float64 (512 MB);
:func:`feature_recovery` alone never holds more than one block.

References:
  Chanin & Garriga-Alonso 2026, "SynthSAEBench", arXiv 2602.14687.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import scipy.optimize
from jaxtyping import ArrayLike, Bool, Float

from sae_jax import metrics

# Decoder rows per block of the cosine matrix: 1024 x 16384 float32 values are 64 MB.
COSINE_BLOCK = 1024
DEFAULT_THRESHOLD = 0.8
# Rows shorter than this count as zero (cosine 0 with everything) instead of being
# blown up into an arbitrary direction.
_NORM_EPS = 1e-8


def _unit_rows(name: str, vectors: ArrayLike) -> Float[np.ndarray, "n d"]:
  vectors = np.asarray(vectors, np.float32)
  if vectors.ndim != 2 or vectors.shape[0] < 1:
    raise ValueError(f"{name} must be a non-empty 2-D [rows, d] array; got shape "
                     f"{vectors.shape}.")
  norms = np.linalg.norm(vectors, axis=1, keepdims=True)
  return vectors / np.maximum(norms, _NORM_EPS)


def _abs_cosine_blocks(decoder: ArrayLike, features: ArrayLike, block: int
                       ) -> Iterator[tuple[slice, Float[np.ndarray, "k n"]]]:
  decoder_WxD = _unit_rows("decoder", decoder)
  features_NxD = _unit_rows("features", features)
  if decoder_WxD.shape[1] != features_NxD.shape[1]:
    raise ValueError(f"decoder and features must have the same width d; got "
                     f"{decoder_WxD.shape[1]} and {features_NxD.shape[1]}.")
  if block < 1:
    raise ValueError(f"block must be >= 1; got {block}.")
  for start in range(0, len(decoder_WxD), block):
    rows = slice(start, min(start + block, len(decoder_WxD)))
    yield rows, np.abs(decoder_WxD[rows] @ features_NxD.T)


def abs_cosine_matrix(decoder: Float[ArrayLike, "w d"], features: Float[ArrayLike, "n d"],
                      block: int = COSINE_BLOCK) -> Float[np.ndarray, "w n"]:
  """``|cos|`` between every decoder row and every true feature, float32 ``[w, n]``.

  Rows of both are normalised first; a zero row has cosine 0 with everything.
  """
  decoder = np.asarray(decoder)
  features = np.asarray(features)
  out_WxN = None
  for rows, cos_KxN in _abs_cosine_blocks(decoder, features, block):
    if out_WxN is None:
      out_WxN = np.empty((decoder.shape[0], cos_KxN.shape[1]), np.float32)
    out_WxN[rows] = cos_KxN
  return out_WxN


def _check_cosines(abs_cos: ArrayLike) -> Float[np.ndarray, "w n"]:
  abs_cos = np.asarray(abs_cos, np.float32)
  if abs_cos.ndim != 2 or 0 in abs_cos.shape:
    raise ValueError(f"abs_cos must be a non-empty 2-D [w, n] array; got shape "
                     f"{abs_cos.shape}.")
  return abs_cos


def mcc_from_cosines(abs_cos: Float[ArrayLike, "w n"]) -> float:
  """:func:`mcc` from a precomputed :func:`abs_cosine_matrix`."""
  abs_cos = _check_cosines(abs_cos)
  rows, cols = scipy.optimize.linear_sum_assignment(abs_cos, maximize=True)
  return float(abs_cos[rows, cols].astype(np.float64).mean())


def mcc(decoder: Float[ArrayLike, "w d"], features: Float[ArrayLike, "n d"]) -> float:
  """Mean ``|cos|`` of the best one-to-one matching of decoder rows to true features.

  The Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) pairs ``min(w, n)``
  decoder rows with distinct true features so that the summed ``|cos|`` is maximal; the
  score is the mean over those matched pairs. With ``w < n`` (SynthSAEBench trains at
  ``w = n / 4``) every decoder row is matched, so 1 means every latent is exactly a
  distinct true feature, not that every feature was found (that is recall). Every
  decoder row takes part, dead latents included.

  References:
    Chanin & Garriga-Alonso 2026, "SynthSAEBench", arXiv 2602.14687.

  Args:
    decoder: SAE decoder rows, ``[w, d]`` (any norm).
    features: true feature vectors, ``[n, d]`` (any norm).

  Returns:
    The mean matched ``|cos|``, in ``[0, 1]``.
  """
  return mcc_from_cosines(abs_cosine_matrix(decoder, features))


class FeatureRecovery(NamedTuple):
  """Precision, recall and F1 at a cosine threshold; see :func:`feature_recovery`."""

  precision: float
  recall: float
  f1: float
  threshold: float


def _check_threshold(threshold: float) -> None:
  if not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold must be in (0, 1]; got {threshold}.")


def _check_live(live: ArrayLike | None, width: int) -> Bool[np.ndarray, " w"]:
  if live is None:
    return np.ones(width, bool)
  live = np.asarray(live)
  if live.dtype != bool or live.shape != (width,):
    raise ValueError(f"live must be a bool array of shape ({width},) (one entry per decoder "
                     f"row); got dtype {live.dtype}, shape {live.shape}.")
  return live


def _scores(best_per_latent: Float[np.ndarray, " w"], best_per_feature: Float[np.ndarray, " n"],
            threshold: float) -> FeatureRecovery:
  precision = float(np.mean(best_per_latent >= threshold)) if best_per_latent.size else 0.0
  recall = float(np.mean(best_per_feature >= threshold))
  f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
  return FeatureRecovery(precision, recall, f1, threshold)


def feature_recovery_from_cosines(abs_cos: Float[ArrayLike, "w n"], *,
                                  threshold: float = DEFAULT_THRESHOLD,
                                  live: Bool[ArrayLike, " w"] | None = None) -> FeatureRecovery:
  """:func:`feature_recovery` from a precomputed :func:`abs_cosine_matrix`."""
  abs_cos = _check_cosines(abs_cos)
  _check_threshold(threshold)
  live = _check_live(live, abs_cos.shape[0])
  live_cos = abs_cos[live]
  best_per_feature = live_cos.max(axis=0) if len(live_cos) else np.zeros(abs_cos.shape[1])
  return _scores(live_cos.max(axis=1), best_per_feature, threshold)


def feature_recovery(decoder: Float[ArrayLike, "w d"], features: Float[ArrayLike, "n d"], *,
                     threshold: float = DEFAULT_THRESHOLD,
                     live: Bool[ArrayLike, " w"] | None = None) -> FeatureRecovery:
  """Precision, recall and F1 of feature recovery at a cosine threshold.

  Precision is the fraction of live latents whose best-matching true feature has
  ``|cos| >= threshold``; recall is the fraction of true features whose best-matching
  live latent has ``|cos| >= threshold``; F1 is their harmonic mean (0 when both are 0).
  Dead latents never fire, so they recover nothing and are left out of both.

  Matching is by best match, not one-to-one: precision asks whether each latent is some
  true feature and recall whether each feature is present in the dictionary, which is
  what the two words mean; uniqueness of the pairing is what :func:`mcc` scores. Two
  latents on one feature therefore both count for precision and once for recall. While
  every pair of true features overlaps by less than ``2 * threshold**2 - 1`` in ``|cos|``
  (0.28 at 0.8, above SynthSAEBench's max overlaps) no latent can pass the threshold for
  two features, so recall is at most the number of live latents over ``n``.

  References:
    Chanin & Garriga-Alonso 2026, "SynthSAEBench", arXiv 2602.14687.

  Args:
    decoder: SAE decoder rows, ``[w, d]``.
    features: true feature vectors, ``[n, d]``.
    threshold: the ``|cos|`` from which a match counts, in ``(0, 1]``.
    live: bool ``[w]``, the latents that fire on the evaluation set; ``None``: all.

  Returns:
    A :class:`FeatureRecovery`.
  """
  _check_threshold(threshold)
  decoder = _unit_rows("decoder", decoder)
  live = _check_live(live, decoder.shape[0])
  best_per_latent, best_per_feature = [], None
  for rows, cos_KxN in _abs_cosine_blocks(decoder, features, COSINE_BLOCK):
    cos_KxN = cos_KxN[live[rows]]
    best_per_latent.append(cos_KxN.max(axis=1))
    block_best = cos_KxN.max(axis=0, initial=0.0)
    best_per_feature = (block_best if best_per_feature is None
                        else np.maximum(best_per_feature, block_best))
  return _scores(np.concatenate(best_per_latent), best_per_feature, threshold)


class RecoveryScores(NamedTuple):
  """Everything :func:`recovery_scores` measures.

  Attributes:
    mcc: Hungarian-matched mean ``|cos|`` (:func:`mcc`).
    precision, recall, f1: feature recovery at ``threshold`` over live latents
      (:func:`feature_recovery`).
    threshold: the cosine threshold used.
    fvu: textbook fraction of variance unexplained over the evaluation set,
      ``sum |x - recon|^2 / sum |x - mean(x)|^2`` with the mean over the whole set.
    sae_l0: mean number of positive SAE codes per token.
    true_l0: mean number of firing true features per token.
    dead_fraction: fraction of latents that never fire on the evaluation set.
  """

  mcc: float
  precision: float
  recall: float
  f1: float
  threshold: float
  fvu: float
  sae_l0: float
  true_l0: float
  dead_fraction: float


def recovery_scores(decoder: Float[ArrayLike, "w d"], features: Float[ArrayLike, "n d"],
                    x: Float[ArrayLike, "b d"], recon: Float[ArrayLike, "b d"],
                    sae_codes: Float[ArrayLike, "b w"], true_codes: Float[ArrayLike, "b n"], *,
                    threshold: float = DEFAULT_THRESHOLD) -> RecoveryScores:
  """All recovery scores of an SAE on one evaluation set, from one cosine matrix.

  A latent is live when its code is positive on at least one evaluation token (the rule
  :func:`sae_jax.metrics.mean_l0` counts by); precision and recall count live latents
  only, MCC every decoder row.

  Args:
    decoder: SAE decoder rows, ``[w, d]``.
    features: true feature vectors, ``[n, d]``.
    x: the evaluation activations, ``[b, d]``.
    recon: the SAE's reconstructions of ``x``, ``[b, d]``.
    sae_codes: the SAE's codes for ``x``, ``[b, w]``.
    true_codes: the true codes of ``x``, ``[b, n]``.
    threshold: the ``|cos|`` from which a match counts, in ``(0, 1]``.

  Returns:
    A :class:`RecoveryScores`.
  """
  sae_codes = np.asarray(sae_codes)
  true_codes = np.asarray(true_codes)
  abs_cos = abs_cosine_matrix(decoder, features)
  if sae_codes.ndim != 2 or sae_codes.shape[1] != abs_cos.shape[0]:
    raise ValueError(f"sae_codes must be [b, w={abs_cos.shape[0]}] (one column per decoder "
                     f"row); got shape {sae_codes.shape}.")
  if true_codes.ndim != 2 or true_codes.shape[1] != abs_cos.shape[1]:
    raise ValueError(f"true_codes must be [b, n={abs_cos.shape[1]}] (one column per true "
                     f"feature); got shape {true_codes.shape}.")
  live = np.any(sae_codes > 0, axis=0)
  recovery = feature_recovery_from_cosines(abs_cos, threshold=threshold, live=live)
  return RecoveryScores(
      mcc=mcc_from_cosines(abs_cos), precision=recovery.precision, recall=recovery.recall,
      f1=recovery.f1, threshold=threshold, fvu=float(metrics.fvu(recon, x)),
      sae_l0=float(metrics.mean_l0(sae_codes)), true_l0=float(metrics.mean_l0(true_codes)),
      dead_fraction=float(1.0 - live.mean()))

"""Training losses for sparse autoencoders.

The auxiliary losses reconstruct the main model's residual from features that
the allocation rule neglects, which gives those features gradient signal again.
`aux_k_loss` draws on dead features (Gao et al. 2024); `aux_zipf_loss` draws on
features that fire less often than a fitted Zipf law predicts (Ayonrinde 2024).
Both go through one shared function, so with the same candidate set and no
weights they agree bitwise.

Defaults from Gao et al. 2024: `k_aux = d_model // 2` (`default_k_aux`) and an
auxiliary coefficient of 1/32 (`DEFAULT_AUX_COEFFICIENT`), i.e.
`total = mse + DEFAULT_AUX_COEFFICIENT * aux_k_loss(...)`.

References:
  Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093.
  Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature
  Choice Sparse Autoencoders", arXiv 2411.02124.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Num

from sae_jax.metrics import reconstruction_error_terms

DEFAULT_AUX_COEFFICIENT = 1.0 / 32.0


def default_k_aux(d_model: int) -> int:
  """Gao et al. 2024's auxiliary k: half the model width.

  References:
    Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093.
  """
  if not isinstance(d_model, (int, np.integer)) or isinstance(d_model, bool) or d_model < 2:
    raise ValueError(f"d_model must be an int >= 2 so that d_model // 2 >= 1; got {d_model!r}.")
  return int(d_model) // 2


def _validate_aux_inputs(
    pre: jax.Array,
    x: jax.Array,
    recon: jax.Array,
    W_dec: jax.Array,
    mask: jax.Array,
    mask_name: str,
    k_aux: int,
    weights: jax.Array | None,
) -> None:
  for name, arr in (("pre", pre), ("x", x), ("recon", recon), ("W_dec", W_dec)):
    if arr.ndim != 2:
      raise ValueError(f"{name} must be 2-D; got shape {tuple(arr.shape)}.")
  num_tokens, num_features = pre.shape
  d_model = x.shape[1]
  if x.shape[0] != num_tokens:
    raise ValueError(
        f"x must have {num_tokens} rows to match pre {tuple(pre.shape)}; got "
        f"{tuple(x.shape)}.")
  if recon.shape != x.shape:
    raise ValueError(
        f"recon must have the shape of x {tuple(x.shape)}; got {tuple(recon.shape)}.")
  if W_dec.shape != (num_features, d_model):
    raise ValueError(
        f"W_dec must have shape ({num_features}, {d_model}) = (features of pre, "
        f"width of x); got {tuple(W_dec.shape)}.")
  if mask.shape != (num_features,):
    raise ValueError(
        f"{mask_name} must have shape ({num_features},); got {tuple(mask.shape)}.")
  if mask.dtype != jnp.bool_:
    raise ValueError(f"{mask_name} must be a bool array; got dtype {mask.dtype}.")
  if weights is not None and weights.shape != (num_features,):
    raise ValueError(
        f"weights must have shape ({num_features},); got {tuple(weights.shape)}.")
  if not isinstance(k_aux, (int, np.integer)) or isinstance(k_aux, bool):
    raise ValueError(
        f"k_aux must be a static Python int (mark it static under jax.jit); got "
        f"{type(k_aux).__name__}.")
  if not 0 < k_aux <= num_features:
    raise ValueError(f"k_aux must lie in [1, {num_features}] (features of pre); got {k_aux}.")


def _masked_topk_residual_loss(
    pre_BxF: Float[Array, "b f"],
    x_BxD: Num[Array, "b d"],
    recon_BxD: Num[Array, "b d"],
    W_dec_FxD: Float[Array, "f d"],
    candidates_F: Bool[Array, "f"],
    k_aux: int,
    weights_F: Num[Array, "f"] | None,
) -> Float[Array, ""]:
  """Normalised MSE of the residual decoded from the top-k_aux candidates."""
  residual_BxD = x_BxD.astype(jnp.float32) - jax.lax.stop_gradient(
      recon_BxD).astype(jnp.float32)
  scores_BxF = aux_scores(pre_BxF, candidates_F, weights_F)
  values_BxK, indices_BxK = jax.lax.top_k(scores_BxF, k_aux)
  # Non-candidates come back as -inf when there are fewer than k_aux
  # candidates; ReLU maps them to 0 with zero gradient.
  rows_Bx1 = jnp.arange(pre_BxF.shape[0])[:, None]
  codes_BxF = jnp.zeros_like(scores_BxF).at[rows_Bx1, indices_BxK].set(
      jax.nn.relu(values_BxK))
  # The residual already excludes the decoder bias, so none is added back.
  residual_hat_BxD = codes_BxF @ W_dec_FxD
  squared_error, variance_sum = reconstruction_error_terms(residual_hat_BxD, residual_BxD)
  return residual_loss(squared_error, variance_sum, jnp.any(candidates_F))


def aux_scores(pre: Float[Array, "... f"], candidates: Bool[Array, "f"],
               weights: Num[Array, "f"] | None = None) -> Float[Array, "... f"]:
  """Auxiliary selection scores: ``pre * weights`` on candidates, ``-inf`` elsewhere.

  The weights are usage statistics, not parameters: no gradient flows into them.
  """
  scores = pre
  if weights is not None:
    scores = scores * jax.lax.stop_gradient(weights)
  return jnp.where(candidates, scores, -jnp.inf)


def residual_loss(squared_error: Float[Array, ""], variance_sum: Float[Array, ""],
                  any_candidates: Bool[Array, ""]) -> Float[Array, ""]:
  """An auxiliary loss from its two sums: ``squared_error / variance_sum``, or exactly 0.

  The sums are those of :func:`sae_jax.metrics.reconstruction_error_terms` for the
  decoded residual against the true residual, over the whole batch (a sharded step
  passes them reduced over devices). The loss is 0, with a zero and finite gradient,
  when there is no candidate feature or the residual has no variance.
  """
  active = any_candidates & (variance_sum > 0)
  # Double where: the unused branch must stay finite or its NaN leaks into grads.
  safe_variance = jnp.where(active, variance_sum, 1.0)
  return jnp.where(active, squared_error / safe_variance, 0.0)


def decoder_row_norms(W_dec: Float[Array, "f d"]) -> Float[Array, "f"]:
  """Row norms of the decoder in float32, with a zero (not infinite) derivative at 0."""
  squared_norms_F = jnp.sum(jnp.square(jnp.asarray(W_dec).astype(jnp.float32)), axis=1)
  # sqrt has an infinite derivative at 0; keep all-zero rows out of its domain.
  nonzero_F = squared_norms_F > 0
  return jnp.where(nonzero_F, jnp.sqrt(jnp.where(nonzero_F, squared_norms_F, 1.0)), 0.0)


def aux_k_loss(
    pre: Float[Array, "b f"],
    x: Num[Array, "b d"],
    recon: Num[Array, "b d"],
    W_dec: Float[Array, "f d"],
    dead_mask: Bool[Array, "f"],
    k_aux: int,
) -> Float[Array, ""]:
  """AuxK loss: reconstructs the residual from the top-k_aux dead features.

  With `e = x - stop_gradient(recon)`, keeps only dead features of `pre`, takes
  each token's top `k_aux` of them, applies ReLU, decodes without the decoder
  bias (`e_hat = z_aux @ W_dec`) and returns `normalized_mse(e_hat, e)`.
  Gradients reach `pre` and `W_dec` but not `recon`. Returns exactly 0 when no
  feature is dead (or the residual has no variance over the batch).

  References:
    Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093.

  Args:
    pre: Encoder pre-activations, [b, f].
    x: Input activations, [b, d].
    recon: Main reconstruction, [b, d].
    W_dec: Decoder, [f, d].
    dead_mask: bool [f], True for dead features; may be traced.
    k_aux: Static number of auxiliary features per token, in [1, f]; Gao et al.
      use `default_k_aux(d)`.

  Returns:
    float32 scalar loss; scale by `DEFAULT_AUX_COEFFICIENT` in the total loss.
  """
  pre, x, recon, W_dec, dead_mask = (
      jnp.asarray(a) for a in (pre, x, recon, W_dec, dead_mask))
  _validate_aux_inputs(pre, x, recon, W_dec, dead_mask, "dead_mask", k_aux, None)
  return _masked_topk_residual_loss(pre, x, recon, W_dec, dead_mask, k_aux, None)


def aux_zipf_loss(
    pre: Float[Array, "b f"],
    x: Num[Array, "b d"],
    recon: Num[Array, "b d"],
    W_dec: Float[Array, "f d"],
    underutilised_mask: Bool[Array, "f"],
    k_aux: int,
    weights: Num[Array, "f"] | None = None,
) -> Float[Array, ""]:
  """Auxiliary loss over features used less than a Zipf law predicts.

  Same construction as `aux_k_loss` but over `underutilised_mask`. With
  `weights` (e.g. `zipf_deficit`), each candidate pre-activation is multiplied
  by its weight before the top-k and the ReLU. The scaled values are both the
  selection score and the auxiliary code, so a strongly underused feature is
  more likely to be picked and also gets a larger share of the gradient. The
  weights themselves get no gradient.

  References:
    Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature
    Choice Sparse Autoencoders", arXiv 2411.02124.

  Args:
    pre: Encoder pre-activations, [b, f].
    x: Input activations, [b, d].
    recon: Main reconstruction, [b, d].
    W_dec: Decoder, [f, d].
    underutilised_mask: bool [f] candidate set; may be traced.
    k_aux: Static number of auxiliary features per token, in [1, f].
    weights: Optional non-negative [f] per-feature weights; may be traced.

  Returns:
    float32 scalar loss.
  """
  pre, x, recon, W_dec, underutilised_mask = (
      jnp.asarray(a) for a in (pre, x, recon, W_dec, underutilised_mask))
  if weights is not None:
    weights = jnp.asarray(weights)
  _validate_aux_inputs(pre, x, recon, W_dec, underutilised_mask,
                       "underutilised_mask", k_aux, weights)
  return _masked_topk_residual_loss(
      pre, x, recon, W_dec, underutilised_mask, k_aux, weights)


def l1_penalty(codes: Num[Array, "b f"], W_dec: Float[Array, "f d"]) -> Float[Array, ""]:
  """Decoder-norm-weighted L1 sparsity penalty for ReLU SAEs.

  `mean_b sum_f |codes[b, f]| * ||W_dec[f]||_2`, in float32. Weighting by the
  decoder norm stops the model from shrinking codes while growing decoder rows.

  References:
    Conerly et al. 2024, "Circuits Updates - April 2024: Towards Monosemanticity
    training update", transformer-circuits.pub (no arXiv id).

  Args:
    codes: [b, f] codes.
    W_dec: [f, d] decoder.

  Returns:
    float32 scalar penalty.
  """
  codes, W_dec = jnp.asarray(codes), jnp.asarray(W_dec)
  for name, arr in (("codes", codes), ("W_dec", W_dec)):
    if arr.ndim != 2:
      raise ValueError(f"{name} must be 2-D; got shape {tuple(arr.shape)}.")
  if W_dec.shape[0] != codes.shape[1]:
    raise ValueError(
        f"W_dec must have {codes.shape[1]} rows to match codes {tuple(codes.shape)}; "
        f"got {tuple(W_dec.shape)}.")
  per_token_B = jnp.abs(codes.astype(jnp.float32)) @ decoder_row_norms(W_dec)
  return jnp.mean(per_token_B)

"""Evaluation metrics and feature-usage statistics for sparse autoencoders.

Everything here is a pure, jittable function over arrays. Reductions run in
float32 so that bfloat16 activations give stable numbers.

References:
  Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093.
  Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature
  Choice Sparse Autoencoders", arXiv 2411.02124.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, Num

INT32_MAX = int(np.iinfo(np.int32).max)


def _require_rank2(name: str, arr: jax.Array) -> None:
  if arr.ndim != 2:
    raise ValueError(
        f"{name} must be 2-D [tokens, width]; got shape {tuple(arr.shape)}.")


def _require_rank1(name: str, arr: jax.Array) -> None:
  if arr.ndim != 1:
    raise ValueError(f"{name} must be 1-D [features]; got shape {tuple(arr.shape)}.")


def _is_python_number(value) -> bool:
  # Traced values cannot be range-checked at trace time; only concrete scalars are.
  return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def reconstruction_error_terms(
    recon: Num[Array, "b d"],
    x: Num[Array, "b d"],
    mean: Num[Array, "d"] | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
  """Returns the two sums behind normalised MSE and FVU, in float32.

  Summing both terms over many batches and dividing once gives a dataset-level
  FVU that does not over-weight small batches.

  Args:
    recon: Reconstruction, [b, d].
    x: Target, [b, d].
    mean: Optional [d] reference mean; the batch mean of `x` when None.

  Returns:
    `(sum((recon - x)^2), sum((x - mean)^2))` as float32 scalars.
  """
  recon, x = jnp.asarray(recon), jnp.asarray(x)
  _require_rank2("recon", recon)
  _require_rank2("x", x)
  if recon.shape != x.shape:
    raise ValueError(
        f"recon and x must have the same shape; got recon {tuple(recon.shape)} "
        f"and x {tuple(x.shape)}.")
  recon_BxD = recon.astype(jnp.float32)
  x_BxD = x.astype(jnp.float32)
  if mean is None:
    mean_D = jnp.mean(x_BxD, axis=0)
  else:
    mean = jnp.asarray(mean)
    if mean.shape != (x.shape[1],):
      raise ValueError(
          f"mean must have shape ({x.shape[1]},) to match x; got "
          f"{tuple(mean.shape)}.")
    mean_D = mean.astype(jnp.float32)
  squared_error = jnp.sum(jnp.square(recon_BxD - x_BxD))
  variance_sum = jnp.sum(jnp.square(x_BxD - mean_D[None, :]))
  return squared_error, variance_sum


def normalized_mse(recon: Num[Array, "b d"], x: Num[Array, "b d"]) -> Float[Array, ""]:
  """Mean squared error relative to predicting the batch mean of `x`.

  Equals 0 for a perfect reconstruction and 1 for `recon = x.mean(0)`. Like a
  plain division it is inf or NaN when `x` is constant over the batch.

  References:
    Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093.

  Args:
    recon: Reconstruction, [b, d].
    x: Target, [b, d].

  Returns:
    float32 scalar `sum((recon - x)^2) / sum((x - x.mean(0))^2)`.
  """
  squared_error, variance_sum = reconstruction_error_terms(recon, x)
  return squared_error / variance_sum


def fvu(
    recon: Num[Array, "b d"],
    x: Num[Array, "b d"],
    mean: Num[Array, "d"] | None = None,
) -> Float[Array, ""]:
  """Fraction of variance unexplained.

  Args:
    recon: Reconstruction, [b, d].
    x: Target, [b, d].
    mean: Optional fixed [d] reference mean (e.g. a running dataset mean) so
      that every evaluation batch is normalised the same way. With None this is
      exactly `normalized_mse`.

  Returns:
    float32 scalar `sum((recon - x)^2) / sum((x - mean)^2)`.
  """
  squared_error, variance_sum = reconstruction_error_terms(recon, x, mean)
  return squared_error / variance_sum


def l0_per_token(codes: Num[Array, "b f"], eps: float = 0.0) -> Int[Array, "b"]:
  """Number of features per token whose code exceeds `eps`, as int32 [b]."""
  codes = jnp.asarray(codes)
  _require_rank2("codes", codes)
  if _is_python_number(eps) and eps < 0:
    raise ValueError(f"eps must be >= 0; got {eps}.")
  return jnp.sum(codes > eps, axis=1, dtype=jnp.int32)


def mean_l0(codes: Num[Array, "b f"], eps: float = 0.0) -> Float[Array, ""]:
  """Average number of active features per token, as a float32 scalar."""
  return jnp.mean(l0_per_token(codes, eps).astype(jnp.float32))


class FeatureUsageState(NamedTuple):
  """Running feature-usage statistics.

  Attributes:
    density_ema: [f] float32 exponential moving average of the fraction of
      tokens on which each feature fires.
    tokens_since_fired: [f] int32 tokens seen since each feature last fired,
      saturating at the int32 maximum.
    num_tokens: int32 scalar count of tokens seen, saturating at the int32
      maximum; 0 means no update has happened yet.
  """
  density_ema: Float[Array, "f"]
  tokens_since_fired: Int[Array, "f"]
  num_tokens: Int[Array, ""]


def feature_usage_init(num_features: int) -> FeatureUsageState:
  """Empty usage statistics for `num_features` features."""
  if not isinstance(num_features, (int, np.integer)) or num_features <= 0:
    raise ValueError(f"num_features must be a positive int; got {num_features!r}.")
  return FeatureUsageState(
      density_ema=jnp.zeros((num_features,), jnp.float32),
      tokens_since_fired=jnp.zeros((num_features,), jnp.int32),
      num_tokens=jnp.zeros((), jnp.int32),
  )


def saturating_add(counter: Int[Array, "..."], amount: int) -> Int[Array, "..."]:
  """``counter + amount``, held at the int32 maximum instead of wrapping around."""
  # Compare before adding so the int32 sum itself can never wrap around.
  return jnp.where(counter > INT32_MAX - amount, INT32_MAX, counter + amount)


def feature_usage_update(
    state: FeatureUsageState,
    codes: Num[Array, "b f"],
    *,
    decay: float = 0.99,
    fire_threshold: float = 0.0,
) -> FeatureUsageState:
  """Folds one batch of codes into the usage statistics.

  The first update (`num_tokens == 0`) sets the EMA to the batch density
  instead of blending it with the zero initialisation, so the estimate is
  unbiased from the start without a separate step counter.

  References:
    Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093.

  Args:
    state: Current statistics.
    codes: [b, f] codes of this batch; a feature fires on a token when its
      code is above `fire_threshold`.
    decay: EMA decay in (0, 1); may be traced.
    fire_threshold: Firing threshold; may be traced.

  Returns:
    Updated statistics.
  """
  codes = jnp.asarray(codes)
  _require_rank2("codes", codes)
  num_tokens, num_features = codes.shape
  if num_tokens == 0:
    raise ValueError("codes must hold at least one token; got shape "
                     f"{tuple(codes.shape)}.")
  if state.density_ema.shape != (num_features,):
    raise ValueError(
        f"codes has {num_features} features but state tracks "
        f"{state.density_ema.shape[0]}; re-initialise with "
        f"feature_usage_init({num_features}).")
  if _is_python_number(decay) and not 0.0 < decay < 1.0:
    raise ValueError(f"decay must lie in the open interval (0, 1); got {decay}.")
  count_F = jnp.sum(codes > fire_threshold, axis=0, dtype=jnp.int32)
  return feature_usage_from_counts(state, count_F, num_tokens, decay=decay)


def feature_usage_from_counts(
    state: FeatureUsageState,
    count_F: Num[Array, "f"],
    num_tokens: int,
    *,
    decay: float = 0.99,
) -> FeatureUsageState:
  """Folds one batch's per-feature firing counts into the usage statistics.

  What :func:`feature_usage_update` does after counting, for steps that count firings
  without a ``[b, f]`` code matrix (from flat triples, or summed over devices).

  Args:
    state: Current statistics.
    count_F: [f] number of this batch's tokens on which each feature fired.
    num_tokens: Static number of tokens in the batch (all devices together).
    decay: EMA decay in (0, 1); may be traced.

  Returns:
    Updated statistics.
  """
  density_F = count_F.astype(jnp.float32) / num_tokens
  blended_F = decay * state.density_ema + (1.0 - decay) * density_F
  density_ema = jnp.where(state.num_tokens == 0, density_F, blended_F)
  tokens_since_fired = jnp.where(
      count_F > 0, 0, saturating_add(state.tokens_since_fired, num_tokens))
  return FeatureUsageState(
      density_ema=density_ema.astype(jnp.float32),
      tokens_since_fired=tokens_since_fired.astype(jnp.int32),
      num_tokens=saturating_add(state.num_tokens, num_tokens).astype(jnp.int32),
  )


def dead_features(
    state: FeatureUsageState, dead_after_tokens: int = 10_000_000
) -> Bool[Array, "f"]:
  """Features that have not fired within the last `dead_after_tokens` tokens.

  References:
    Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093
    (10M tokens).
  """
  if _is_python_number(dead_after_tokens) and not 0 < dead_after_tokens <= INT32_MAX:
    raise ValueError(
        f"dead_after_tokens must lie in [1, {INT32_MAX}] (the saturating int32 "
        f"counter); got {dead_after_tokens}.")
  return state.tokens_since_fired >= dead_after_tokens


def dead_fraction(
    state: FeatureUsageState, dead_after_tokens: int = 10_000_000
) -> Float[Array, ""]:
  """Fraction of features that `dead_features` reports as dead, float32."""
  return jnp.mean(dead_features(state, dead_after_tokens).astype(jnp.float32))


def _feature_ranks(densities_F: Float[Array, "f"]) -> Int[Array, "f"]:
  """1-based rank of each feature by descending density, ties to lower index."""
  num_features = densities_F.shape[0]
  order_F = jnp.argsort(-densities_F, stable=True)
  return jnp.zeros((num_features,), jnp.int32).at[order_F].set(
      jnp.arange(1, num_features + 1, dtype=jnp.int32))


def fit_zipf(
    densities: Float[Array, "f"], min_density: float = 0.0
) -> tuple[Float[Array, ""], Float[Array, ""]]:
  """Least-squares fit of `density ~ C * rank^(-s)` in log-log space.

  Densities are sorted descending (rank 1 is the most frequent feature); only
  features with density above `min_density` enter the fit, through 0/1 weights
  so that shapes stay static. With one usable feature the fit returns s = 0 and
  C = its density; with none it returns C = 0 and s = 0.

  References:
    Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature
    Choice Sparse Autoencoders", arXiv 2411.02124.

  Args:
    densities: [f] firing densities.
    min_density: Densities at or below this value are ignored; may be traced.

  Returns:
    float32 scalars `(C, s)`.
  """
  densities = jnp.asarray(densities)
  _require_rank1("densities", densities)
  if _is_python_number(min_density) and min_density < 0:
    raise ValueError(f"min_density must be >= 0; got {min_density}.")
  sorted_F = -jnp.sort(-densities.astype(jnp.float32))
  ranks_F = jnp.arange(1, sorted_F.shape[0] + 1, dtype=jnp.float32)
  weights_F = (sorted_F > min_density).astype(jnp.float32)
  log_rank_F = jnp.log(ranks_F)
  log_density_F = jnp.log(jnp.where(weights_F > 0, sorted_F, 1.0))
  count = jnp.sum(weights_F)
  safe_count = jnp.maximum(count, 1.0)
  mean_x = jnp.sum(weights_F * log_rank_F) / safe_count
  mean_y = jnp.sum(weights_F * log_density_F) / safe_count
  # Centred sums keep float32 accurate when log ranks are large.
  dx_F = log_rank_F - mean_x
  sxx = jnp.sum(weights_F * dx_F * dx_F)
  sxy = jnp.sum(weights_F * dx_F * (log_density_F - mean_y))
  slope = jnp.where(sxx > 0, sxy / jnp.where(sxx > 0, sxx, 1.0), 0.0)
  intercept = mean_y - slope * mean_x
  scale = jnp.where(count > 0, jnp.exp(intercept), 0.0)
  return scale, -slope


def zipf_expected(
    num_features: int, C: ArrayLike, s: ArrayLike
) -> Float[Array, "f"]:
  """The fitted law `C * rank^(-s)` at ranks 1..num_features, float32."""
  if not isinstance(num_features, (int, np.integer)) or num_features <= 0:
    raise ValueError(f"num_features must be a positive int; got {num_features!r}.")
  ranks_F = jnp.arange(1, num_features + 1, dtype=jnp.float32)
  return jnp.asarray(C, jnp.float32) * ranks_F ** (-jnp.asarray(s, jnp.float32))


def _expected_at_own_rank(
    densities_F: Float[Array, "f"], C: ArrayLike, s: ArrayLike
) -> Float[Array, "f"]:
  ranks_F = _feature_ranks(densities_F).astype(jnp.float32)
  return jnp.asarray(C, jnp.float32) * ranks_F ** (-jnp.asarray(s, jnp.float32))


def underutilised_features(
    densities: Float[Array, "f"], C: ArrayLike, s: ArrayLike, tau: float = 1.0
) -> Bool[Array, "f"]:
  """Features firing less often than `tau` times the Zipf law at their rank.

  Each feature is compared with the fitted law at its own rank by descending
  density (ties go to the lower index). Dead features (density 0) are always
  underutilised.

  References:
    Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature
    Choice Sparse Autoencoders", arXiv 2411.02124.

  Args:
    densities: [f] firing densities.
    C: Fitted scale.
    s: Fitted exponent.
    tau: Positive tolerance; may be traced.

  Returns:
    bool [f] mask.
  """
  densities = jnp.asarray(densities)
  _require_rank1("densities", densities)
  if _is_python_number(tau) and tau <= 0:
    raise ValueError(f"tau must be > 0; got {tau}.")
  densities_F = densities.astype(jnp.float32)
  expected_F = _expected_at_own_rank(densities_F, C, s)
  return (densities_F < tau * expected_F) | (densities_F <= 0)


def zipf_deficit(
    densities: Float[Array, "f"],
    C: ArrayLike,
    s: ArrayLike,
    max_ratio: float = 100.0,
) -> Float[Array, "f"]:
  """Ratio of the Zipf law at each feature's rank to its observed density.

  The ratio is clipped to `[1 / max_ratio, max_ratio]`; features with zero
  density get `max_ratio`. Values above 1 mark features that fire less often
  than the law predicts, so the ratio can weight auxiliary-loss candidates.

  References:
    Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature
    Choice Sparse Autoencoders", arXiv 2411.02124.

  Args:
    densities: [f] firing densities.
    C: Fitted scale.
    s: Fitted exponent.
    max_ratio: Clip bound, at least 1.

  Returns:
    float32 [f] ratios.
  """
  densities = jnp.asarray(densities)
  _require_rank1("densities", densities)
  if _is_python_number(max_ratio) and max_ratio < 1:
    raise ValueError(f"max_ratio must be >= 1; got {max_ratio}.")
  densities_F = densities.astype(jnp.float32)
  expected_F = _expected_at_own_rank(densities_F, C, s)
  observed_F = jnp.where(densities_F > 0, densities_F, 1.0)
  ratio_F = jnp.where(densities_F > 0, expected_F / observed_F, max_ratio)
  return jnp.clip(ratio_F, 1.0 / max_ratio, max_ratio)

"""Sparse-autoencoder parameters and the pure operations on them.

The parameter layout follows Gao et al. 2024: ``W_enc`` is ``[d, f]``,
``W_dec`` is ``[f, d]`` whose rows are the dictionary directions (kept at unit
L2 norm), and both biases start at zero. Everything here is a pure, jittable
function over arrays or over the ``SAEParams`` pytree.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, PRNGKeyArray

# Rows whose norm falls below this are treated as zero instead of being blown
# up into an arbitrary direction by the division.
_NORM_EPS = 1e-8


class SAEParams(NamedTuple):
  """Parameters of a sparse autoencoder.

  Attributes:
    W_enc: Encoder weights, ``[d, f]``.
    b_enc: Encoder bias, ``[f]``.
    W_dec: Decoder weights, ``[f, d]``; row ``j`` is the direction of feature
      ``j``.
    b_dec: Decoder bias, ``[d]``; also subtracted from the input before
      encoding.
  """

  W_enc: Float[Array, "d f"]
  b_enc: Float[Array, " f"]
  W_dec: Float[Array, "f d"]
  b_dec: Float[Array, " d"]


def unit_rows(w_FxD: Float[Array, "f d"]) -> Float[Array, "f d"]:
  """Each row divided by its norm (rows of zero norm stay zero)."""
  # The norm is taken in at least float32 so bfloat16 rows still come out at
  # unit norm to within the storage precision.
  w32_FxD = w_FxD.astype(jnp.promote_types(w_FxD.dtype, jnp.float32))
  norm_Fx1 = jnp.linalg.norm(w32_FxD, axis=-1, keepdims=True)
  return (w32_FxD / jnp.maximum(norm_Fx1, _NORM_EPS)).astype(w_FxD.dtype)


def normalize_decoder(params: SAEParams) -> SAEParams:
  """Rescales every decoder row to unit L2 norm.

  Rows that are (numerically) zero are left at zero rather than divided by
  zero.

  References:
    Bricken et al. 2023, "Towards Monosemanticity" (transformer-circuits.pub);
    Gao et al. 2024, "Scaling and evaluating sparse autoencoders",
    arXiv:2406.04093.

  Args:
    params: SAE parameters.

  Returns:
    ``params`` with ``W_dec`` replaced by its row-normalised version; the other
    fields are returned unchanged.
  """
  return params._replace(W_dec=unit_rows(params.W_dec))


def remove_parallel_component(
    grad_FxD: Float[Array, "f d"], W_dec: Float[Array, "f d"]
) -> Float[Array, "f d"]:
  """Removes from each gradient row its component along the decoder row.

  Each row of ``W_dec`` is first normalised, so the result is orthogonal to the
  decoder rows even when they have drifted from unit norm.

  References:
    Bricken et al. 2023, "Towards Monosemanticity" (transformer-circuits.pub);
    Gao et al. 2024, "Scaling and evaluating sparse autoencoders",
    arXiv:2406.04093.

  Args:
    grad_FxD: Gradient with respect to ``W_dec``, ``[f, d]``.
    W_dec: Decoder weights, ``[f, d]``.

  Returns:
    ``grad_FxD - <grad_FxD[j], u_j> u_j`` row by row, with ``u_j`` the unit
    direction of ``W_dec[j]``.

  Raises:
    ValueError: if the two shapes differ or are not two-dimensional.
  """
  if grad_FxD.ndim != 2 or grad_FxD.shape != W_dec.shape:
    raise ValueError(
        "grad_FxD and W_dec must both be [f, d] with equal shapes; got "
        f"grad_FxD.shape={grad_FxD.shape} and W_dec.shape={W_dec.shape}.")
  unit_FxD = unit_rows(W_dec).astype(grad_FxD.dtype)
  parallel_Fx1 = jnp.sum(grad_FxD * unit_FxD, axis=-1, keepdims=True)
  return grad_FxD - parallel_Fx1 * unit_FxD


def project_decoder_grads(grads: SAEParams, W_dec: Float[Array, "f d"]) -> SAEParams:
  """Makes the decoder gradient tangent to the unit-norm constraint.

  With the rows of ``W_dec`` renormalised after every step, the component of
  the gradient parallel to a row only changes its norm, which the
  renormalisation undoes; removing it keeps the optimiser statistics (e.g.
  Adam moments) from accumulating that wasted direction.

  References:
    Bricken et al. 2023, "Towards Monosemanticity" (transformer-circuits.pub);
    Gao et al. 2024, "Scaling and evaluating sparse autoencoders",
    arXiv:2406.04093.

  Args:
    grads: Gradients with the ``SAEParams`` structure.
    W_dec: Current decoder weights, ``[f, d]``.

  Returns:
    ``grads`` with ``W_dec`` replaced by its projection orthogonal to each
    decoder row; the other fields are returned unchanged.

  Raises:
    ValueError: if ``grads.W_dec`` and ``W_dec`` have different shapes.
  """
  return grads._replace(W_dec=remove_parallel_component(grads.W_dec, W_dec))


def tied_init(
    key: PRNGKeyArray,
    d_model: int,
    d_sae: int,
    dtype: jnp.dtype = jnp.float32,
) -> SAEParams:
  """Tied initialisation: the decoder starts as the normalised encoder transpose.

  ``W_enc`` is drawn from ``U(-1/sqrt(d_model), 1/sqrt(d_model))`` (the fan-in
  scaled uniform init of a dense layer with ``d_model`` inputs). ``W_dec`` is
  ``W_enc.T`` with every row rescaled to unit L2 norm; ``W_enc`` itself is not
  rescaled. Both biases are zero.

  References:
    Gao et al. 2024, "Scaling and evaluating sparse autoencoders",
    arXiv:2406.04093.

  Args:
    key: PRNG key.
    d_model: Input width ``d``; at least 1.
    d_sae: Number of features ``f``; at least 1.
    dtype: Floating dtype of the returned parameters.

  Returns:
    Freshly initialised ``SAEParams``.

  Raises:
    ValueError: if a width is not a positive integer or ``dtype`` is not a
      floating dtype.
  """
  for name, value in (("d_model", d_model), ("d_sae", d_sae)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an integer >= 1; got {value!r}.")
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise ValueError(
        f"dtype must be a floating dtype (e.g. float32, bfloat16); got {dtype!r}.")
  bound = 1.0 / (d_model ** 0.5)
  W_enc = jax.random.uniform(
      key, (d_model, d_sae), jnp.float32, minval=-bound, maxval=bound)
  W_dec = unit_rows(W_enc.T)
  return SAEParams(
      W_enc=W_enc.astype(dtype),
      b_enc=jnp.zeros((d_sae,), dtype),
      W_dec=W_dec.astype(dtype),
      b_dec=jnp.zeros((d_model,), dtype),
  )


def geometric_median(
    points: Float[Array, "n d"],
    num_iters: int = 100,
    eps: float = 1e-6,
) -> Float[Array, " d"]:
  """Geometric median of a point set by the Vardi-Zhang modified Weiszfeld method.

  Starts from the coordinate-wise mean. A plain Weiszfeld step divides by the
  distance to every point and breaks down when the iterate lands on a data
  point; the Vardi-Zhang step excludes the coinciding points from the weighted
  mean and blends it with the current iterate, which keeps every iterate finite
  and still converges to the median (including when the median is a data
  point). Iteration stops after ``num_iters`` steps or once a step moves less
  than ``eps * max(1, |y|)``.

  Used to initialise ``b_dec`` from a sample of activations (Gao et al. use
  32768 samples).

  References:
    Weiszfeld 1937, Tohoku Math. J. 43; Vardi & Zhang 2000, "The multivariate
    L1-median and associated data depth", PNAS 97(4); Gao et al. 2024,
    arXiv:2406.04093.

  Args:
    points: Points as rows, ``[n, d]``, ``n >= 1``.
    num_iters: Maximum number of iterations; a Python int >= 1.
    eps: Positive tolerance: points closer than ``eps`` to the iterate count
      as coinciding with it, and it scales the stopping criterion.

  Returns:
    The geometric median, ``[d]``, in the dtype of ``points`` (computed in at
    least float32).

  Raises:
    ValueError: if ``points`` is not a non-empty ``[n, d]`` array, or
      ``num_iters`` / ``eps`` are out of range.
  """
  if points.ndim != 2 or points.shape[0] < 1:
    raise ValueError(
        f"points must be a non-empty [n, d] array; got shape {points.shape}.")
  if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
    raise ValueError(f"num_iters must be a Python int >= 1; got {num_iters!r}.")
  if not eps > 0:
    raise ValueError(f"eps must be > 0; got {eps!r}.")

  out_dtype = points.dtype
  pts_NxD = points.astype(jnp.promote_types(points.dtype, jnp.float32))

  def step(y_D):
    dist_N = jnp.linalg.norm(pts_NxD - y_D, axis=-1)
    coincide_N = dist_N < eps
    # Coinciding points get weight zero; the safe denominator keeps the masked
    # lanes finite so no NaN leaks through the where.
    inv_N = jnp.where(coincide_N, 0.0, 1.0 / jnp.where(coincide_N, 1.0, dist_N))
    inv_total = jnp.sum(inv_N)
    t_D = (inv_N @ pts_NxD) / jnp.maximum(inv_total, jnp.finfo(pts_NxD.dtype).tiny)
    # Resultant of the unit vectors pointing from y to the other points; its
    # norm against the multiplicity of y decides how far to move.
    pull_D = inv_N @ (pts_NxD - y_D)
    r = jnp.linalg.norm(pull_D)
    eta = jnp.sum(coincide_N).astype(pts_NxD.dtype)
    ratio = jnp.where(eta > 0, eta / jnp.maximum(r, jnp.finfo(pts_NxD.dtype).tiny), 0.0)
    # eta >= r means y already is the median: stay put.
    return jnp.maximum(0.0, 1.0 - ratio) * t_D + jnp.minimum(1.0, ratio) * y_D

  def cond(carry):
    i, _, moved = carry
    return jnp.logical_and(i < num_iters, moved)

  def body(carry):
    i, y_D, _ = carry
    y_new_D = step(y_D)
    tol = eps * jnp.maximum(1.0, jnp.linalg.norm(y_D))
    return i + 1, y_new_D, jnp.linalg.norm(y_new_D - y_D) > tol

  y0_D = jnp.mean(pts_NxD, axis=0)
  _, y_D, _ = lax.while_loop(cond, body, (jnp.int32(0), y0_D, jnp.bool_(True)))
  return y_D.astype(out_dtype)

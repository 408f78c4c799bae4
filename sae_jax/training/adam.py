"""Clip, Adam, decoder projection and renormalisation, in place.

:func:`update` computes what the reference step does with optax,

    grads = project_decoder_grads(grads, W_dec)
    updates, opt_state = make_optimizer(tcfg).update(grads, opt_state, params)
    params = normalize_decoder(optax.apply_updates(params, updates))

with the same formulas in the same order (clip by global norm, moments, bias
correction, ``-lr * mu_hat / (sqrt(nu_hat) + eps)``), but every weight matrix is
updated in place in two passes: its moments (a loop over blocks of features whose
carry is ``(mu, nu)``), then the weight from the new moments. No ``[d, f]`` update,
projected gradient or transposed gradient is ever held: the only large temporaries
are the two weight gradients themselves. The encoder gradient is taken in the
``[f, d]`` layout in which the sparse kernels scatter it (its blocks are transposed
one at a time, in cache).

The optimiser state keeps optax's structure and dtypes, so a state can move freely
between this update and the reference step (and checkpoints do not change).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jaxtyping import Array

from sae_jax import params as sae_params
from sae_jax.training import train_state

# Features per block of the in-place loops: at d=768, f=32768 the encoder's moments
# took 43 ms a step with blocks of 512 or 1024, 60 ms with 4096 and 74 ms with 256.
BLOCK = 512


class _AdamScalars(NamedTuple):
  trigger: Array  # global norm below the clip (or no clip): gradients pass unscaled
  g_norm: Array
  max_norm: float
  b1: float
  b2: float
  eps: float
  bc1: Array  # bias corrections 1 - b ** count
  bc2: Array
  step_size: Array  # -learning_rate(count)


def _split_state(opt_state, tcfg: train_state.TrainConfig):
  """``(adam_state, schedule_state, rebuild)`` of a ``train_state.make_optimizer`` state."""
  try:
    if tcfg.grad_clip > 0:
      clip_state, (adam, sched) = opt_state
    else:
      ((adam, sched),) = opt_state
    ok = isinstance(adam, optax.ScaleByAdamState) and hasattr(sched, "count")
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError("opt_state must be the state of train_state.make_optimizer(tcfg) (clip, then "
                     "optax.adam with a schedule) for the same tcfg.grad_clip; got "
                     f"{jax.tree.structure(opt_state)}.")

  def rebuild(new_adam, new_sched):
    inner = (new_adam, new_sched)
    return (clip_state, inner) if tcfg.grad_clip > 0 else (inner,)

  return adam, sched, rebuild


def _clip(g, s: _AdamScalars):
  if s.max_norm <= 0:
    return g
  return lax.select(s.trigger, g, (g / s.g_norm.astype(g.dtype)) * s.max_norm)


def _moments(g, mu, nu, s: _AdamScalars):
  g = _clip(g, s)
  return (1 - s.b1) * g + s.b1 * mu, (1 - s.b2) * (g ** 2) + s.b2 * nu


def _apply(p, mu, nu, s: _AdamScalars):
  mu_hat = mu / s.bc1.astype(mu.dtype)
  nu_hat = nu / s.bc2.astype(nu.dtype)
  u = s.step_size.astype(mu.dtype) * (mu_hat / (jnp.sqrt(nu_hat) + s.eps))
  return (p + u).astype(p.dtype)


def _adam(g, p, mu, nu, s: _AdamScalars):
  """One leaf of clip + ``optax.adam`` + ``optax.apply_updates``, optax's formulas."""
  new_mu, new_nu = _moments(g, mu, nu, s)
  return _apply(p, new_mu, new_nu, s), new_mu.astype(mu.dtype), new_nu.astype(nu.dtype)


def _project(g_FxD, w_FxD):  # params.remove_parallel_component, without its checks
  unit = sae_params.unit_rows(w_FxD)
  return g_FxD - jnp.sum(g_FxD * unit, axis=-1, keepdims=True) * unit


def _in_blocks(fn, carry, consts, axis: int):
  """``carry = fn(*carry, *consts)`` computed block by block, the carry updated in place.

  ``carry`` arrays are cut along ``axis`` into blocks of ``BLOCK``; ``consts`` are
  ``(array, axis)`` pairs cut the same way along their own axis (read only). ``fn``
  returns the new value of every carry block. When the length is not a multiple of
  ``BLOCK`` the whole arrays are one block (plain XLA ops, which may hold temporaries).
  """
  n = carry[0].shape[axis]
  if n % BLOCK:
    return fn(*carry, *(a for a, _ in consts))

  def body(i, c):
    start = i * BLOCK
    sl = lambda a, ax: lax.dynamic_slice_in_dim(a, start, BLOCK, ax)
    new = fn(*(sl(a, axis) for a in c), *(sl(a, ax) for a, ax in consts))
    return tuple(lax.dynamic_update_slice_in_dim(a, b, start, axis) for a, b in zip(c, new))

  return lax.fori_loop(0, n // BLOCK, body, tuple(carry))


# Rows per tile when a gradient block is transposed (a [BLOCK, d] block becomes d / TILE
# tiles, each transposed in cache by its own loop step).
TILE = 64


def _tiled_transpose(a_BxD):
  """``a.T`` of one block, computed tile by tile and materialised.

  Fused into its consumers, a transpose reads with a stride of the row length; the
  tiles here are transposed inside a loop whose results XLA cannot fuse away, and the
  moments' updates then read the block contiguously (measured 1.7x faster than the
  fused transpose for [512, 768] blocks). ``sparse_kernels._materialised_transpose`` tiles
  the other axis, which is faster for whole matrices and slower here.
  """
  b, d = a_BxD.shape
  tile = TILE if d % TILE == 0 else d
  tiles = jax.lax.map(lambda t_BxT: t_BxT.T, a_BxD.reshape(b, d // tile, tile).transpose(1, 0, 2))
  return tiles.reshape(d, b)


def _sum_in_blocks(fn, consts):
  """``sum(fn(*consts))`` over row blocks (no full-size intermediate)."""
  n = consts[0].shape[0]
  if n % BLOCK:
    return jnp.sum(fn(*consts))
  body = lambda i, acc: acc + jnp.sum(fn(*(lax.dynamic_slice_in_dim(a, i * BLOCK, BLOCK, 0)
                                          for a in consts)))
  return lax.fori_loop(0, n // BLOCK, body, jnp.zeros((), consts[0].dtype))


def update(params: sae_params.SAEParams, grads: sae_params.SAEParams, opt_state,
           tcfg: train_state.TrainConfig, *, sum_over_shards=None
           ) -> tuple[sae_params.SAEParams, optax.OptState, Array]:
  """Projected, clipped Adam step and decoder renormalisation, in place.

  Args:
    params: current parameters (donate them: the weights are updated in place).
    grads: raw loss gradients with the ``SAEParams`` fields, except that ``W_enc`` is
      given transposed, ``[f, d]`` (the layout of the sparse encoder gradient), and
      ``W_dec`` before the decoder projection.
    opt_state: state of ``train_state.make_optimizer(tcfg)``.
    tcfg: optimisation settings.
    sum_over_shards: inside ``shard_map`` with the dictionary split over devices, the
      function that sums a per-device partial sum over them (e.g.
      ``lambda v: lax.psum(v, "model")``), so the clipping norm is the global one;
      ``b_dec``, replicated, enters once. None on one device.

  Returns:
    ``(new_params, new_opt_state, grad_norm)``: the same values as the optax path above
    (up to float32 summation order in the global norm), and the global norm of the
    projected gradients before clipping (the reference step's ``grad_norm`` metric).

  Raises:
    ValueError: if ``opt_state`` does not have the structure of ``make_optimizer(tcfg)``
      or a gradient's shape does not match its parameter.
  """
  d, f = params.W_enc.shape
  expected = {"W_enc": (f, d), "b_enc": (f,), "W_dec": (f, d), "b_dec": (d,)}
  for name, shape in expected.items():
    if getattr(grads, name).shape != shape:
      raise ValueError(f"grads.{name} must have shape {list(shape)}"
                       + (" (the encoder gradient transposed)" if name == "W_enc" else "")
                       + f"; got {list(getattr(grads, name).shape)}.")
  adam, sched, rebuild = _split_state(opt_state, tcfg)
  # Each weight is updated in two in-place passes: its moments (one loop over blocks
  # of features, the gradient's blocks transposed or projected there), then the weight
  # from the new moments. One loop for all three makes XLA copy the moments on every
  # iteration (the weight's block reads their old values).
  sq = lambda a: jnp.sum(jnp.square(a))
  with jax.named_scope("grad_norm"):
    dec_sq = _sum_in_blocks(lambda g, w: jnp.square(_project(g, w)),
                            (grads.W_dec, params.W_dec))
    sharded_sq = sq(grads.W_enc) + sq(grads.b_enc) + dec_sq
    if sum_over_shards is not None:
      sharded_sq = sum_over_shards(sharded_sq)
    g_norm = jnp.sqrt(sharded_sq + sq(grads.b_dec))
  count_inc = optax.safe_increment(adam.count)
  s = _AdamScalars(
      trigger=jnp.squeeze(g_norm < tcfg.grad_clip), g_norm=g_norm,
      max_norm=float(tcfg.grad_clip), b1=tcfg.adam_b1, b2=tcfg.adam_b2, eps=tcfg.adam_eps,
      bc1=1 - tcfg.adam_b1 ** count_inc, bc2=1 - tcfg.adam_b2 ** count_inc,
      step_size=-train_state.learning_rate_schedule(tcfg)(sched.count))
  with jax.named_scope("encoder_moments"):
    mu_enc, nu_enc = _in_blocks(lambda m, v, g: _moments(_tiled_transpose(g), m, v, s),
                                (adam.mu.W_enc, adam.nu.W_enc), [(grads.W_enc, 0)], axis=1)
  with jax.named_scope("encoder_apply"):  # same layouts: one in-place elementwise pass
    W_enc = _apply(params.W_enc, mu_enc, nu_enc, s)
  with jax.named_scope("decoder_moments"):
    mu_dec, nu_dec = _in_blocks(lambda m, v, g, w: _moments(_project(g, w), m, v, s),
                                (adam.mu.W_dec, adam.nu.W_dec),
                                [(grads.W_dec, 0), (params.W_dec, 0)], axis=0)
  with jax.named_scope("decoder_apply"):
    (W_dec,) = _in_blocks(lambda w, m, v: (sae_params.unit_rows(_apply(w, m, v, s)),),
                          (params.W_dec,), [(mu_dec, 0), (nu_dec, 0)], axis=0)
  b_enc, mu_benc, nu_benc = _adam(grads.b_enc, params.b_enc, adam.mu.b_enc, adam.nu.b_enc, s)
  b_dec, mu_bdec, nu_bdec = _adam(grads.b_dec, params.b_dec, adam.mu.b_dec, adam.nu.b_dec, s)
  new_params = sae_params.SAEParams(W_enc, b_enc, W_dec, b_dec)
  new_adam = optax.ScaleByAdamState(
      count=count_inc, mu=sae_params.SAEParams(mu_enc, mu_benc, mu_dec, mu_bdec),
      nu=sae_params.SAEParams(nu_enc, nu_benc, nu_dec, nu_bdec))
  new_sched = sched._replace(count=optax.safe_increment(sched.count))
  return new_params, rebuild(new_adam, new_sched), g_norm


def reference_update(params: sae_params.SAEParams, grads: sae_params.SAEParams, opt_state,
                     tcfg: train_state.TrainConfig):
  """The optax path :func:`update` reproduces (``grads.W_enc`` in the ``[d, f]`` layout)."""
  grads = sae_params.project_decoder_grads(grads, params.W_dec)
  updates, opt_state = train_state.make_optimizer(tcfg).update(grads, opt_state, params)
  new_params = sae_params.normalize_decoder(optax.apply_updates(params, updates))
  return new_params, opt_state, optax.tree.norm(grads)



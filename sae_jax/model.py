"""Sparse autoencoder: configuration, pure forward pass and the NNX module.

One encoder/decoder pair serves every allocation rule: the ReLU+L1 baseline,
TopK (Gao et al. 2024), BatchTopK / Mutual Choice and Feature Choice
(Ayonrinde 2024). The rule only decides which ``(token, feature)`` entries of
the pre-activations stay active::

  pre   = (x - b_dec) @ W_enc + b_enc            # [b, f]
  mask  = allocate(pre)                          # [b, f] bool, no gradient
  codes = where(mask, relu(pre), 0)
  recon = codes @ W_dec + b_dec                  # [b, d]
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

from sae_jax import allocation
from sae_jax.params import SAEParams, tied_init

ALLOCATIONS = ("topk", "batch_topk", "mutual_choice", "feature_choice",
               "feature_choice_zipf", "relu")
SELECT_ON = ("relu", "raw")
FEATURE_CHOICE = ("feature_choice", "feature_choice_zipf")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
  """Static configuration of a sparse autoencoder.

  Hashable, so it can be passed as a static argument to ``jax.jit``.

  Attributes:
    d_model: Input width ``d``.
    d_sae: Number of dictionary features ``f``.
    allocation: Which entries stay active: ``"topk"`` (k per token),
      ``"batch_topk"`` / ``"mutual_choice"`` (``round(k * b)`` over the whole
      batch), ``"feature_choice"`` (uniform per-feature capacities summing to
      ``round(k * b)``), ``"feature_choice_zipf"`` (Zipf-distributed
      capacities with the same total) or ``"relu"`` (every positive entry).
    k: Average number of active features per token, ``0 < k <= d_sae``; must
      be integral for ``"topk"``; ignored by ``"relu"``.
    zipf_exponent: Exponent of the Zipf capacities, ``>= 0``; only used by
      ``"feature_choice_zipf"``.
    select_on: ``"relu"`` ranks ``relu(pre)`` (as BatchTopK does); ``"raw"``
      ranks ``pre`` and applies the ReLU to the kept values (as OpenAI's TopK
      does). Ignored by ``"relu"``.
    l1_coefficient: Weight of the L1 penalty on the codes, ``>= 0``; meant for
      the ``"relu"`` baseline.
    dtype: Compute dtype (floating, e.g. float32 or bfloat16).
    param_dtype: Storage dtype of the parameters (floating).
  """

  d_model: int
  d_sae: int
  allocation: str = "topk"
  k: float = 32
  zipf_exponent: float = 1.0
  select_on: str = "relu"
  l1_coefficient: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("d_model", "d_sae"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SAEConfig.{name} must be an integer >= 1; got {value!r}.")
    if self.allocation not in ALLOCATIONS:
      raise ValueError(
          f"SAEConfig.allocation must be one of {ALLOCATIONS}; got {self.allocation!r}.")
    if self.select_on not in SELECT_ON:
      raise ValueError(
          f"SAEConfig.select_on must be one of {SELECT_ON}; got {self.select_on!r}.")
    if self.allocation != "relu":
      if not _is_finite_number(self.k) or not 0 < self.k <= self.d_sae:
        raise ValueError(
            f"SAEConfig.k must be a number with 0 < k <= d_sae={self.d_sae}; got {self.k!r}.")
      if self.allocation == "topk" and int(self.k) != self.k:
        raise ValueError(
            f"SAEConfig.k must be an integer for allocation='topk'; got {self.k!r}. "
            "Use 'batch_topk' or 'mutual_choice' for a fractional average budget.")
    for name in ("zipf_exponent", "l1_coefficient"):
      value = getattr(self, name)
      if not _is_finite_number(value) or value < 0:
        raise ValueError(f"SAEConfig.{name} must be a finite number >= 0; got {value!r}.")
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      try:
        dt = jnp.dtype(value)
      except TypeError:
        dt = None
      if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(
            f"SAEConfig.{name} must be a floating dtype (e.g. float32, bfloat16); "
            f"got {value!r}.")
      # Canonical dtype objects make equal configs hash equal whatever spelling
      # ("bfloat16", jnp.bfloat16, ...) the caller used.
      object.__setattr__(self, name, dt)


def _is_finite_number(value: Any) -> bool:
  return (not isinstance(value, bool)
          and isinstance(value, (int, float, np.integer, np.floating))
          and bool(np.isfinite(value)))


class SAEOutput(NamedTuple):
  """Result of a forward pass.

  Attributes:
    recon: Reconstruction, ``[b, d]``.
    codes: Sparse codes, ``[b, f]``: ``relu(pre)`` where ``mask``, else 0.
    pre: Encoder pre-activations, ``[b, f]``.
    mask: Active entries chosen by the allocation rule, ``[b, f]`` bool.
  """

  recon: Float[Array, "b d"]
  codes: Float[Array, "b f"]
  pre: Float[Array, "b f"]
  mask: Bool[Array, "b f"]


def feature_capacities(cfg: SAEConfig, batch_size: int) -> np.ndarray:
  """Default per-feature capacities for the Feature Choice allocations.

  References:
    Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature
    Choice Sparse Autoencoders", arXiv:2411.02124.

  Args:
    cfg: SAE configuration with a Feature Choice allocation.
    batch_size: Number of tokens ``b``.

  Returns:
    Non-increasing int array ``[f]`` summing to ``round(k * b)``, each entry at
    most ``b``: uniform for ``"feature_choice"``, Zipf with exponent
    ``cfg.zipf_exponent`` for ``"feature_choice_zipf"``. Whenever the budget has
    at least one slot per feature, every entry is at least 1: the Zipf tail is
    floored at 1 rather than rounded to 0, since a feature of capacity 0 could
    never fire (1 <= m_f <= b, as the paper's constraints require).

  Raises:
    ValueError: if ``cfg.allocation`` is not a Feature Choice rule.
  """
  if cfg.allocation not in FEATURE_CHOICE:
    raise ValueError(
        f"cfg.allocation must be one of {FEATURE_CHOICE} to have capacities; "
        f"got {cfg.allocation!r}.")
  total = allocation.mutual_choice_budget(batch_size, cfg.k)
  if cfg.allocation == "feature_choice":
    return allocation.zipf_capacities(cfg.d_sae, total, exponent=0.0)
  return allocation.zipf_capacities(
      cfg.d_sae, total, exponent=cfg.zipf_exponent, max_capacity=batch_size,
      min_capacity=1 if total >= cfg.d_sae else 0)


def _check_params(params: SAEParams, cfg: SAEConfig) -> None:
  d, f = cfg.d_model, cfg.d_sae
  expected = {"W_enc": (d, f), "b_enc": (f,), "W_dec": (f, d), "b_dec": (d,)}
  for name, shape in expected.items():
    got = tuple(getattr(params, name).shape)
    if got != shape:
      raise ValueError(
          f"params.{name} must have shape {shape} for d_model={d}, d_sae={f}; "
          f"got {got}.")


def encode_pre(
    params: SAEParams, x: Float[Array, "b d"], cfg: SAEConfig
) -> Float[Array, "b f"]:
  """Encoder pre-activations ``(x - b_dec) @ W_enc + b_enc`` in ``cfg.dtype``.

  Args:
    params: SAE parameters.
    x: Input activations, ``[b, d]``.
    cfg: SAE configuration.

  Returns:
    Pre-activations, ``[b, f]``.

  Raises:
    ValueError: if ``x`` is not ``[b, d_model]`` or a parameter shape does not
      match ``cfg``.
  """
  if x.ndim != 2 or x.shape[1] != cfg.d_model:
    raise ValueError(
        f"x must have shape [b, d_model={cfg.d_model}]; got {tuple(x.shape)}.")
  _check_params(params, cfg)
  dt = cfg.dtype
  centred_BxD = x.astype(dt) - params.b_dec.astype(dt)
  return centred_BxD @ params.W_enc.astype(dt) + params.b_enc.astype(dt)


def allocate(
    pre: Float[Array, "b f"],
    cfg: SAEConfig,
    capacity: Int[Array, " f"] | np.ndarray | None = None,
    mesh: Mesh | None = None,
) -> Bool[Array, "b f"]:
  """Chooses the active ``(token, feature)`` entries; carries no gradient.

  References:
    Gao et al. 2024, "Scaling and evaluating sparse autoencoders",
    arXiv:2406.04093; Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual
    Choice & Feature Choice Sparse Autoencoders", arXiv:2411.02124.

  Args:
    pre: Pre-activations, ``[b, f]``.
    cfg: SAE configuration; ``cfg.allocation`` selects the rule.
    capacity: Optional per-feature capacities ``[f]`` (ints, each in
      ``[0, b]``) overriding the defaults of the Feature Choice rules, e.g. the
      Zipf capacities permuted by the current feature-frequency ranks. A traced
      array does not cause recompilation. Only valid for Feature Choice.
    mesh: optional ("data", "model") mesh over which ``pre`` is sharded (tokens
      over "data", features over "model"); the selection then runs exactly over
      the global batch with :mod:`sae_jax.allocation.sharded`.

  Returns:
    Boolean mask shaped like ``pre``. Exact counts: ``k`` per row for
    ``"topk"``; ``round(k * b)`` in total for ``"batch_topk"`` /
    ``"mutual_choice"``; ``capacity[j]`` in column ``j`` for Feature Choice;
    the positive entries of ``pre`` for ``"relu"``. When fewer positive
    entries than the budget exist, the mask also holds entries whose code is
    0, so count firing features with ``codes > 0``, not with the mask.

  Raises:
    ValueError: if ``pre`` is not ``[b, d_sae]``, or ``capacity`` is given for
      a rule that does not take it or has the wrong shape.
  """
  if pre.ndim != 2 or pre.shape[1] != cfg.d_sae:
    raise ValueError(
        f"pre must have shape [b, d_sae={cfg.d_sae}]; got {tuple(pre.shape)}.")
  if capacity is not None and cfg.allocation not in FEATURE_CHOICE:
    raise ValueError(
        f"capacity is only accepted for allocation in {FEATURE_CHOICE}; got "
        f"allocation={cfg.allocation!r}. Pass capacity=None.")
  pre = jax.lax.stop_gradient(pre)
  if cfg.allocation == "relu":
    return pre > 0
  scores_BxF = jax.nn.relu(pre) if cfg.select_on == "relu" else pre
  sharded = mesh is not None and mesh.size > 1
  if cfg.allocation == "topk":
    if sharded:
      return allocation.topk_sharded(scores_BxF, int(cfg.k), mesh)
    return allocation.topk(scores_BxF, int(cfg.k))
  if cfg.allocation in ("batch_topk", "mutual_choice"):
    if sharded:
      return allocation.mutual_choice_sharded(scores_BxF, cfg.k, mesh)
    return allocation.mutual_choice(scores_BxF, cfg.k)

  batch_size = pre.shape[0]
  max_capacity = None
  if capacity is None:
    capacity = feature_capacities(cfg, batch_size)
  elif tuple(np.shape(capacity)) != (cfg.d_sae,):
    raise ValueError(
        f"capacity must have shape [d_sae={cfg.d_sae}]; got {tuple(np.shape(capacity))}.")
  elif not isinstance(capacity, np.ndarray):
    # No column can keep more rows than the batch has, so b bounds the static
    # selection width whatever values traced capacities take.
    max_capacity = batch_size
  if sharded:
    return allocation.feature_choice_sharded(scores_BxF, capacity, mesh,
                                             max_capacity=max_capacity)
  return allocation.feature_choice(scores_BxF, capacity, max_capacity=max_capacity)


def encode(
    params: SAEParams,
    x: Float[Array, "b d"],
    cfg: SAEConfig,
    capacity: Int[Array, " f"] | np.ndarray | None = None,
    mesh: Mesh | None = None,
) -> tuple[Float[Array, "b f"], Float[Array, "b f"], Bool[Array, "b f"]]:
  """Sparse codes of ``x``; gradients flow only through the selected entries.

  Args:
    params: SAE parameters.
    x: Input activations, ``[b, d]``.
    cfg: SAE configuration.
    capacity: Optional Feature Choice capacities, see ``allocate``.
    mesh: Optional mesh for exact sharded selection, see ``allocate``.

  Returns:
    ``(codes, pre, mask)``, each ``[b, f]``, ``codes = where(mask, relu(pre), 0)``.

  Raises:
    ValueError: as ``encode_pre`` and ``allocate``.
  """
  pre_BxF = encode_pre(params, x, cfg)
  mask_BxF = allocate(pre_BxF, cfg, capacity, mesh)
  codes_BxF = jnp.where(mask_BxF, jax.nn.relu(pre_BxF), jnp.zeros_like(pre_BxF))
  return codes_BxF, pre_BxF, mask_BxF


def encode_thresholded(
    params: SAEParams, x: Float[Array, "b d"], cfg: SAEConfig,
    theta: Float[Array, "f"] | float,
) -> tuple[Float[Array, "b f"], Bool[Array, "b f"]]:
  """Batch-independent codes: keep ``relu(pre) > theta`` (a JumpReLU at ``theta``).

  ``theta`` is the calibrated threshold of training (``TrainState.threshold``): a global
  value for Mutual Choice/BatchTopK, one per feature for Feature Choice. A token's code
  then depends on that token alone.

  References:
    Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders", arXiv 2412.06410.
  """
  acts_BxF = jax.nn.relu(encode_pre(params, x, cfg))
  mask_BxF = allocation.threshold(acts_BxF, theta)
  return jnp.where(mask_BxF, acts_BxF, jnp.zeros_like(acts_BxF)), mask_BxF


def inference_codes(
    params: SAEParams, x: Float[Array, "b d"], cfg: SAEConfig,
    threshold: Float[Array, " f"] | float | None = None,
) -> Float[Array, "b f"]:
  """Batch-independent codes of ``x``: the codes the SAE represents at inference.

  A token's codes depend on that token alone, whatever else is in the batch:

  * ``"topk"``: its own per-token top-k (``encode``); ``threshold`` must be None.
  * ``"relu"``: ``relu(pre)``; with a ``threshold``, the JumpReLU ``relu(pre) > threshold``
    of ``encode_thresholded`` (a SAELens "jumprelu" folder loads as ``"relu"`` plus its
    threshold, see ``export.load_exported``).
  * ``"batch_topk"``, ``"mutual_choice"``, ``"feature_choice"``, ``"feature_choice_zipf"``:
    their allocation ranks the whole batch, so inference keeps ``relu(pre) > threshold``
    (``encode_thresholded``) with the calibrated ``TrainState.threshold``, a scalar or
    one per feature: exactly the JumpReLU that ``export.export_saelens`` writes.

  Args:
    params: SAE parameters.
    x: Input activations, ``[b, d]`` (already normalised as in training).
    cfg: SAE configuration.
    threshold: ``TrainState.threshold`` (scalar or ``[d_sae]``), or the threshold
      ``export.load_exported`` returns; required for the batch-level allocations.

  Returns:
    Codes ``[b, f]`` in ``cfg.dtype``; zero outside the active entries.

  Raises:
    ValueError: a batch-level allocation without ``threshold``, ``"topk"`` with one, a
      ``threshold`` that is neither a scalar nor ``[d_sae]``, or as ``encode_pre``.
  """
  if cfg.allocation == "topk":
    if threshold is not None:
      raise ValueError("threshold must be None for allocation='topk', whose per-token top-k "
                       "is already batch-independent; pass threshold=None.")
    return encode(params, x, cfg)[0]
  if threshold is None:
    if cfg.allocation == "relu":
      return encode(params, x, cfg)[0]
    raise ValueError(
        f"allocation={cfg.allocation!r} selects over a whole batch, so its batch-independent "
        "codes need the calibrated threshold: pass threshold=TrainState.threshold (or the "
        "threshold export.load_exported returns).")
  if np.ndim(threshold) not in (0, 1) or (np.ndim(threshold) == 1
                                           and np.shape(threshold)[0] != cfg.d_sae):
    raise ValueError(f"threshold must be a scalar or [d_sae={cfg.d_sae}]; got shape "
                     f"{tuple(np.shape(threshold))}.")
  return encode_thresholded(params, x, cfg, threshold)[0]


def decode(
    params: SAEParams, codes: Float[Array, "b f"], cfg: SAEConfig
) -> Float[Array, "b d"]:
  """Reconstruction ``codes @ W_dec + b_dec`` in ``cfg.dtype``.

  Args:
    params: SAE parameters.
    codes: Sparse codes, ``[b, f]``.
    cfg: SAE configuration.

  Returns:
    Reconstruction, ``[b, d]``.

  Raises:
    ValueError: if ``codes`` is not ``[b, d_sae]`` or a parameter shape does
      not match ``cfg``.
  """
  if codes.ndim != 2 or codes.shape[1] != cfg.d_sae:
    raise ValueError(
        f"codes must have shape [b, d_sae={cfg.d_sae}]; got {tuple(codes.shape)}.")
  _check_params(params, cfg)
  dt = cfg.dtype
  return codes.astype(dt) @ params.W_dec.astype(dt) + params.b_dec.astype(dt)


def forward(
    params: SAEParams,
    x: Float[Array, "b d"],
    cfg: SAEConfig,
    capacity: Int[Array, " f"] | np.ndarray | None = None,
    mesh: Mesh | None = None,
) -> SAEOutput:
  """Encodes and decodes ``x``.

  References:
    Gao et al. 2024, "Scaling and evaluating sparse autoencoders",
    arXiv:2406.04093; Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual
    Choice & Feature Choice Sparse Autoencoders", arXiv:2411.02124.

  Args:
    params: SAE parameters.
    x: Input activations, ``[b, d]``.
    cfg: SAE configuration.
    capacity: Optional Feature Choice capacities, see ``allocate``.
    mesh: Optional mesh for exact sharded selection, see ``allocate``.

  Returns:
    ``SAEOutput(recon, codes, pre, mask)``.

  Raises:
    ValueError: as ``encode`` and ``decode``.
  """
  codes_BxF, pre_BxF, mask_BxF = encode(params, x, cfg, capacity, mesh)
  return SAEOutput(decode(params, codes_BxF, cfg), codes_BxF, pre_BxF, mask_BxF)


class SAE(nnx.Module):
  """Sparse autoencoder holding its parameters as ``nnx.Param``.

  Every computation is delegated to the pure functions of this file:
  ``sae(x)`` equals ``forward(sae.params(), x, sae.cfg)``.

  References:
    Gao et al. 2024, "Scaling and evaluating sparse autoencoders",
    arXiv:2406.04093; Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual
    Choice & Feature Choice Sparse Autoencoders", arXiv:2411.02124.
  """

  def __init__(self, cfg: SAEConfig, *, rngs: nnx.Rngs):
    """Initialises the parameters with ``tied_init``.

    Args:
      cfg: SAE configuration.
      rngs: Random streams; ``rngs.params`` supplies the init key.
    """
    self.cfg = cfg
    init = tied_init(rngs.params(), cfg.d_model, cfg.d_sae, cfg.param_dtype)
    self.W_enc = nnx.Param(init.W_enc)
    self.b_enc = nnx.Param(init.b_enc)
    self.W_dec = nnx.Param(init.W_dec)
    self.b_dec = nnx.Param(init.b_dec)

  def params(self) -> SAEParams:
    """Current parameters as an ``SAEParams`` pytree of arrays."""
    return SAEParams(self.W_enc[...], self.b_enc[...], self.W_dec[...], self.b_dec[...])

  def set_params(self, params: SAEParams) -> None:
    """Overwrites the parameters in place (e.g. after an optimiser step).

    Args:
      params: New parameters, cast to ``cfg.param_dtype``.

    Raises:
      ValueError: if a shape does not match ``cfg``.
    """
    _check_params(params, self.cfg)
    dt = self.cfg.param_dtype
    self.W_enc[...] = params.W_enc.astype(dt)
    self.b_enc[...] = params.b_enc.astype(dt)
    self.W_dec[...] = params.W_dec.astype(dt)
    self.b_dec[...] = params.b_dec.astype(dt)

  def encode(
      self,
      x: Float[Array, "b d"],
      capacity: Int[Array, " f"] | np.ndarray | None = None,
  ) -> tuple[Float[Array, "b f"], Float[Array, "b f"], Bool[Array, "b f"]]:
    """``(codes, pre, mask)`` of ``x``; see the module-level ``encode``."""
    return encode(self.params(), x, self.cfg, capacity)

  def decode(self, codes: Float[Array, "b f"]) -> Float[Array, "b d"]:
    """Reconstruction from ``codes``; see the module-level ``decode``."""
    return decode(self.params(), codes, self.cfg)

  def __call__(
      self,
      x: Float[Array, "b d"],
      capacity: Int[Array, " f"] | np.ndarray | None = None,
  ) -> SAEOutput:
    """Forward pass; see the module-level ``forward``."""
    return forward(self.params(), x, self.cfg, capacity)

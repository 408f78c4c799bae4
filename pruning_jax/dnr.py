"""Dynamic dead neuron rate (DNR): how many ReLU outputs are exactly zero.

The public name is `dynamic_dead_neuron_rate`: "DNR" also names "dying neuron
reactivation" in other work. Pruning changes the share of ReLU outputs that
are exactly zero for a given input; AP de-sparsifies pruned networks to lower it.
The functions here read the `acts` dict a model returns with
`return_activations=True` ({layer name: ReLU output [b, ...]}) and are pure
and jittable: everything is computed on device in float32.

Three granularities are reported:

* element DNR: per sample, the fraction of a layer's outputs that are exactly
  0, averaged over the batch. Network-wide, per sample, total zeros over
  total units, so layers are weighted by their unit count. This is the
  primary metric.
* channel DNR: for conv layers ([b, h, w, c]) the fraction of channels whose
  whole h x w map is zero for the sample; dense ([b, f]) and token
  ([b, t, f]) layers have no spatial map, so their channel DNR is their
  element DNR. Network-wide, weighted by channel count (units for dense and
  token layers).
* static DNR (accumulated only): the fraction of units (or channels) that
  were zero for every sample seen, e.g. over an epoch.

"Exactly zero" is `x == 0`, so -0.0 counts as zero; where the backend flushes
subnormal floats to zero (XLA on CPU does), subnormal outputs count as zero too.

Samples can be weighted by an optional `weights` [b] argument; weight 0
masks padded samples out of every statistic, including the fired-ever
records. Averages over no sample of positive weight are NaN.

For GELU/SiLU networks (the ViT with activation="gelu") pass `threshold`: an
output counts as dead when it is <= threshold, which with threshold 0 is a
non-positive pre-activation.
"""

from collections.abc import Mapping
from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

_RANKS = (2, 3, 4)


class DNRBatch(NamedTuple):
  """DNR of one batch.

  Attributes:
    dnr: network-wide element DNR, averaged over the (weighted) batch.
    dnr_channel: network-wide channel DNR, averaged over the batch.
    per_sample: network-wide element DNR of each sample, [b].
    layer_dnr: {layer: element DNR averaged over the batch}.
    layer_dnr_channel: {layer: channel DNR averaged over the batch}.
    fired: {layer: bool [unit shape]}, True where the unit was non-zero for
      at least one sample of positive weight.
    fired_channel: {layer: bool [c]} for conv layers (a channel fired if any
      of its positions did), the same as `fired` for dense and token layers.
  """

  dnr: Float[Array, ""]
  dnr_channel: Float[Array, ""]
  per_sample: Float[Array, "b"]
  layer_dnr: dict[str, Float[Array, ""]]
  layer_dnr_channel: dict[str, Float[Array, ""]]
  fired: dict[str, Bool[Array, "..."]]
  fired_channel: dict[str, Bool[Array, "..."]]


class DNRState(NamedTuple):
  """Running DNR statistics over batches (see `dnr_init`, `dnr_update`).

  Attributes:
    dnr_sum: {layer: sum over samples of weight * element DNR}.
    dnr_channel_sum: {layer: sum over samples of weight * channel DNR}.
    count: {layer: sum of sample weights}.
    fired: {layer: bool [unit shape]}, OR of the batches' `fired`.
    fired_channel: {layer: bool}, OR of the batches' `fired_channel`.
  """

  dnr_sum: dict[str, Float[Array, ""]]
  dnr_channel_sum: dict[str, Float[Array, ""]]
  count: dict[str, Float[Array, ""]]
  fired: dict[str, Bool[Array, "..."]]
  fired_channel: dict[str, Bool[Array, "..."]]


def _check_acts(acts: Mapping[str, object], arg: str) -> int:
  """Validates an activation mapping at trace time and returns the batch size."""
  if not isinstance(acts, Mapping) or not acts:
    raise ValueError(
        f"{arg} must be a non-empty mapping {{layer name: array [b, ...]}}"
        f" as returned by a model with return_activations=True, got {acts!r}"
    )
  batch = None
  for name, act in acts.items():
    shape = tuple(getattr(act, "shape", ()))
    if len(shape) not in _RANKS:
      raise ValueError(
          f"{arg}[{name!r}] must have rank 2 [b, f], 3 [b, t, f] or 4"
          f" [b, h, w, c], got shape {shape}"
      )
    if batch is None:
      batch = shape[0]
    elif shape[0] != batch:
      raise ValueError(
          f"{arg}[{name!r}] has batch size {shape[0]}, other layers have"
          f" {batch}; all layers must come from the same forward pass"
      )
  return batch


def _channel_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """Per-sample shape of the channel-level records of an activation shape."""
  return shape[-1:] if len(shape) == 4 else shape[1:]


def _check_weights(weights: Array | None, batch: int) -> Float[Array, "b"]:
  if weights is None:
    return jnp.ones((batch,), jnp.float32)
  shape = tuple(getattr(weights, "shape", ()))
  if shape != (batch,):
    raise ValueError(
        f"weights must have shape (b,) = ({batch},) to match the batch, got"
        f" shape {shape}"
    )
  return jnp.asarray(weights).astype(jnp.float32)


def _ratio(num: Array, den: Array) -> Array:
  """num / den, NaN where den is 0 (no sample seen)."""
  safe = jnp.where(den > 0, den, 1.0)
  return jnp.where(den > 0, num / safe, jnp.nan)


def _layer_stats(act: Array, valid_B: Bool[Array, "b"], threshold: float):
  """Per-sample dead fractions and fired-ever records of one layer."""
  # For ReLU outputs (never negative) and threshold 0 this is exactly `act == 0`.
  zero = act <= threshold
  unit_axes = tuple(range(1, act.ndim))
  valid = valid_B.reshape((-1,) + (1,) * (act.ndim - 1))
  zeros_B = jnp.sum(zero, axis=unit_axes, dtype=jnp.float32)
  fired = jnp.any(jnp.logical_and(~zero, valid), axis=0)
  if act.ndim == 4:
    dead_BxC = jnp.all(zero, axis=(1, 2))
    dead_B = jnp.sum(dead_BxC, axis=1, dtype=jnp.float32)
    fired_channel = jnp.any(jnp.logical_and(~dead_BxC, valid_B[:, None]), axis=0)
  else:
    dead_B = zeros_B
    fired_channel = fired
  return zeros_B, dead_B, fired, fired_channel


def _batch_sums(acts, weights, threshold):
  """Weighted per-layer sums shared by `dynamic_dead_neuron_rate` and `dnr_update`."""
  batch = _check_acts(acts, "acts")
  w_B = _check_weights(weights, batch)
  valid_B = w_B > 0
  out = {key: {} for key in ("dnr_sum", "chan_sum", "fired", "fired_channel")}
  zeros_B = jnp.zeros((batch,), jnp.float32)
  dead_B = jnp.zeros((batch,), jnp.float32)
  units = channels = 0
  for name, act in acts.items():
    layer_zeros_B, layer_dead_B, fired, fired_channel = _layer_stats(act, valid_B, threshold)
    layer_units = fired.size
    layer_channels = fired_channel.size
    out["dnr_sum"][name] = jnp.sum(w_B * layer_zeros_B / layer_units)
    out["chan_sum"][name] = jnp.sum(w_B * layer_dead_B / layer_channels)
    out["fired"][name] = fired
    out["fired_channel"][name] = fired_channel
    zeros_B = zeros_B + layer_zeros_B
    dead_B = dead_B + layer_dead_B
    units += layer_units
    channels += layer_channels
  return out, w_B, zeros_B / units, dead_B / channels


def dynamic_dead_neuron_rate(
    acts: Mapping[str, Float[Array, "b ..."]],
    weights: Float[Array, "b"] | None = None,
    *,
    threshold: float = 0.0,
) -> DNRBatch:
  """Element and channel dynamic dead neuron rate of one batch, per layer and overall.

  Args:
    acts: {layer name: ReLU output [b, f], [b, t, f] or [b, h, w, c]}.
    weights: optional per-sample weights [b]; 0 masks a (padded) sample.
      Weights must be non-negative.
    threshold: an output counts as dead when it is <= threshold. 0 gives the
      paper's rate for ReLU (output exactly 0) and, for GELU or SiLU, counts
      units whose pre-activation is <= 0 (both map exactly those to outputs
      <= 0); a small positive value also counts near-silent units.

  Returns:
    A `DNRBatch`; averages are NaN when no weight is positive.

  Raises:
    ValueError: at trace time for an empty mapping, an unsupported rank,
      inconsistent batch sizes or a weights shape other than (b,).

  References:
    Liu, Ghosh, Tan & Motani, 2023, "AP: Selective Activation for
    De-sparsifying Pruned Neural Networks", TMLR, arXiv 2212.06145.
  """
  sums, w_B, per_sample_B, per_sample_channel_B = _batch_sums(acts, weights,
                                                              threshold)
  total = jnp.sum(w_B)
  return DNRBatch(
      dnr=_ratio(jnp.sum(w_B * per_sample_B), total),
      dnr_channel=_ratio(jnp.sum(w_B * per_sample_channel_B), total),
      per_sample=per_sample_B,
      layer_dnr={k: _ratio(v, total) for k, v in sums["dnr_sum"].items()},
      layer_dnr_channel={
          k: _ratio(v, total) for k, v in sums["chan_sum"].items()
      },
      fired=sums["fired"],
      fired_channel=sums["fired_channel"],
  )


def dnr_init(
    acts_shapes_or_example: Mapping[str, Array],
) -> DNRState:
  """Empty running statistics for activations shaped like the example.

  Args:
    acts_shapes_or_example: {layer name: array or jax.ShapeDtypeStruct with a
      leading batch axis}, e.g. a model's `acts` or
      `pruning_jax.models.activation_shapes(model)`. Only shapes are read.

  Returns:
    A `DNRState` with zero sums and counts and nothing fired.

  Raises:
    ValueError: for an empty mapping or an unsupported rank.

  References:
    Liu, Ghosh, Tan & Motani, 2023, arXiv 2212.06145.
  """
  _check_acts(acts_shapes_or_example, "acts_shapes_or_example")
  zero = lambda: jnp.zeros((), jnp.float32)
  names = list(acts_shapes_or_example)
  shapes = {k: tuple(v.shape) for k, v in acts_shapes_or_example.items()}
  return DNRState(
      dnr_sum={k: zero() for k in names},
      dnr_channel_sum={k: zero() for k in names},
      count={k: zero() for k in names},
      fired={k: jnp.zeros(shapes[k][1:], bool) for k in names},
      fired_channel={k: jnp.zeros(_channel_shape(shapes[k]), bool) for k in names},
  )


def dnr_update(
    state: DNRState,
    acts: Mapping[str, Float[Array, "b ..."]],
    weights: Float[Array, "b"] | None = None,
    *,
    threshold: float = 0.0,
) -> DNRState:
  """Adds one batch to the running statistics.

  Two updates give the same state as one update on the concatenated batch.
  The batch size may change between calls (a new trace per size).

  Args:
    state: statistics from `dnr_init` or a previous `dnr_update`.
    acts: {layer name: ReLU output [b, ...]} with the layers and per-sample
      shapes `state` was initialised with.
    weights: optional non-negative per-sample weights [b]; 0 masks a sample.
    threshold: outputs <= threshold count as dead (see
      `dynamic_dead_neuron_rate`).

  Returns:
    The updated `DNRState`.

  Raises:
    ValueError: at trace time for layers or per-sample shapes that differ
      from the state's, or any problem `dynamic_dead_neuron_rate` rejects.

  References:
    Liu, Ghosh, Tan & Motani, 2023, arXiv 2212.06145.
  """
  _check_acts(acts, "acts")
  if set(acts) != set(state.fired):
    raise ValueError(
        f"acts has layers {sorted(acts)}, the state was initialised with"
        f" {sorted(state.fired)}; call dnr_init with the same layers"
    )
  for name, act in acts.items():
    if tuple(act.shape[1:]) != tuple(state.fired[name].shape):
      raise ValueError(
          f"acts[{name!r}] has per-sample shape {tuple(act.shape[1:])}, the"
          f" state expects {tuple(state.fired[name].shape)}"
      )
  sums, w_B, _, _ = _batch_sums(acts, weights, threshold)
  total = jnp.sum(w_B)
  return DNRState(
      dnr_sum={k: state.dnr_sum[k] + sums["dnr_sum"][k] for k in state.dnr_sum},
      dnr_channel_sum={
          k: state.dnr_channel_sum[k] + sums["chan_sum"][k]
          for k in state.dnr_channel_sum
      },
      count={k: state.count[k] + total for k in state.count},
      fired={k: state.fired[k] | sums["fired"][k] for k in state.fired},
      fired_channel={
          k: state.fired_channel[k] | sums["fired_channel"][k]
          for k in state.fired_channel
      },
  )


def dnr_summary(state: DNRState) -> dict[str, Float[Array, ""]]:
  """Averages and static rates of the accumulated statistics.

  Args:
    state: accumulated `DNRState`.

  Returns:
    {"dnr", "dnr_channel", "dnr_static", "dnr_static_channel"} network-wide
    (weighted by unit or channel count), and the same four per layer under
    "dnr/<layer>", "dnr_channel/<layer>", "dnr_static/<layer>",
    "dnr_static_channel/<layer>". "dnr_static" is the fraction of units that
    were zero for every sample seen. Every value is NaN before any sample of
    positive weight was seen.

  Raises:
    ValueError: for a state that tracks no layer.

  References:
    Liu, Ghosh, Tan & Motani, 2023, arXiv 2212.06145.
  """
  if not state.fired:
    raise ValueError(
        "state must track at least one layer; build it with dnr_init, got a"
        " state with no layers"
    )
  out = {}
  totals = {"dnr": 0.0, "dnr_channel": 0.0, "dnr_static": 0.0,
            "dnr_static_channel": 0.0}
  units = channels = 0
  for name in state.fired:
    count = state.count[name]
    layer_seen = count > 0
    layer_units = state.fired[name].size
    layer_channels = state.fired_channel[name].size
    never = jnp.sum(~state.fired[name], dtype=jnp.float32)
    never_channel = jnp.sum(~state.fired_channel[name], dtype=jnp.float32)
    layer = {
        "dnr": _ratio(state.dnr_sum[name], count),
        "dnr_channel": _ratio(state.dnr_channel_sum[name], count),
        "dnr_static": jnp.where(layer_seen, never / layer_units, jnp.nan),
        "dnr_static_channel": jnp.where(
            layer_seen, never_channel / layer_channels, jnp.nan
        ),
    }
    for key, value in layer.items():
      out[f"{key}/{name}"] = value
      size = layer_channels if key.endswith("channel") else layer_units
      totals[key] = totals[key] + size * value
    units += layer_units
    channels += layer_channels
  for key, value in totals.items():
    out[key] = value / (channels if key.endswith("channel") else units)
  return out

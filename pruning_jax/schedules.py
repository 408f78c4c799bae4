"""Sparsity schedules: iterative magnitude pruning cycles and gradual (cubic) pruning.

Schedule parameters (rates, targets, step boundaries) are static Python numbers checked
when a function is called or traced; the position in the schedule (`cycle`, `step`) may
be a traced integer, so a jitted training step evaluates the schedule at every step
without recompiling.
"""

from collections.abc import Sequence
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int
import numpy as np


def _check_unit(value: float, name: str, low_open: bool = False) -> float:
  value = float(value)
  ok = (0.0 < value < 1.0) if low_open else (0.0 <= value < 1.0)
  if not ok:
    raise ValueError(f"{name} must be in {'(0, 1)' if low_open else '[0, 1)'}, got {value}.")
  return value


def _check_step_int(value, name: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
  return int(value)


def imp_sparsity(cycle: int | Int[Array, ""], rate: float = 0.2) -> float | Float[Array, ""]:
  """Sparsity after `cycle` rounds of iterative magnitude pruning: 1 - (1 - rate)^cycle.

  Each round prunes the fraction `rate` of the weights still remaining.

  References:
    Frankle, Carbin (2019), "The Lottery Ticket Hypothesis: Finding Sparse, Trainable
    Neural Networks", arXiv:1803.03635.

  Args:
    cycle: number of completed rounds: int >= 0, or an integer array (traced or not).
    rate: per-round pruning rate in (0, 1).

  Returns:
    A Python float for a Python int cycle, else a float32 array.
  """
  rate = _check_unit(rate, "rate", low_open=True)
  if isinstance(cycle, jax.Array | np.ndarray):
    if not isinstance(cycle, jax.core.Tracer) and np.any(np.asarray(cycle) < 0):
      raise ValueError(f"cycle must be >= 0, got {np.asarray(cycle).min()}.")
  else:
    cycle = _check_step_int(cycle, "cycle", 0)
  return 1.0 - (1.0 - rate) ** cycle


def cycles_to_reach(target: float, rate: float = 0.2) -> int:
  """Fewest IMP rounds at `rate` whose sparsity reaches `target` (within 1e-9).

  Args:
    target: sparsity in [0, 1).
    rate: per-round pruning rate in (0, 1).

  Returns:
    The smallest c >= 0 with imp_sparsity(c, rate) >= target.
  """
  target = _check_unit(target, "target")
  rate = _check_unit(rate, "rate", low_open=True)
  cycles = math.ceil(math.log1p(-target) / math.log1p(-rate))
  # The logarithms are inexact: settle on the exact boundary with the closed form.
  while cycles > 0 and imp_sparsity(cycles - 1, rate) >= target - 1e-9:
    cycles -= 1
  while imp_sparsity(cycles, rate) < target - 1e-9:
    cycles += 1
  return cycles


def _check_steps(begin_step, end_step, frequency) -> tuple[int, int, int]:
  begin = _check_step_int(begin_step, "begin_step", 0)
  end = _check_step_int(end_step, "end_step", 0)
  if end <= begin:
    raise ValueError(f"end_step must be > begin_step ({begin}), got {end}.")
  return begin, end, _check_step_int(frequency, "frequency", 1)


def zhu_gupta(step: int | Int[Array, ""], initial_sparsity: float, final_sparsity: float,
              begin_step: int, end_step: int, frequency: int) -> Float[Array, ""]:
  """Cubic gradual pruning schedule: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3.

  With t0 = begin_step, n dt = end_step - begin_step and dt = frequency, the sparsity
  changes only at update steps t0, t0 + dt, ... and at end_step (always an update step,
  so the final sparsity is reached even when the span is not a multiple of dt). It is
  s_i before begin_step and s_f from end_step on; between update steps it holds the
  value of the last one.

  References:
    Zhu, Gupta (2017), "To prune, or not to prune: exploring the efficacy of pruning for
    model compression", arXiv:1710.01878.

  Args:
    step: training step (traced or concrete integer).
    initial_sparsity: s_i in [0, 1).
    final_sparsity: s_f in [0, 1), >= s_i.
    begin_step: t0 (int >= 0).
    end_step: last update step (int > begin_step).
    frequency: dt (int >= 1).

  Returns:
    The float32 sparsity in force at `step`.
  """
  initial = _check_unit(initial_sparsity, "initial_sparsity")
  final = _check_unit(final_sparsity, "final_sparsity")
  if initial > final:
    raise ValueError(f"initial_sparsity ({initial}) must not exceed final_sparsity ({final}).")
  begin, end, frequency = _check_steps(begin_step, end_step, frequency)
  step = jnp.asarray(step, jnp.int32)
  since = jnp.clip(step, begin, end) - begin
  since = jnp.where(step >= end, end - begin, since - since % frequency)
  progress = since.astype(jnp.float32) / (end - begin)
  return jnp.float32(final) + jnp.float32(initial - final) * (1.0 - progress) ** 3


def is_update_step(step: int | Int[Array, ""], begin_step: int, end_step: int,
                   frequency: int) -> Bool[Array, ""]:
  """Whether `zhu_gupta` changes (masks should be recomputed) at `step`.

  True at begin_step + k * frequency up to end_step, and at end_step itself.
  """
  begin, end, frequency = _check_steps(begin_step, end_step, frequency)
  step = jnp.asarray(step, jnp.int32)
  return (step >= begin) & (step <= end) & (((step - begin) % frequency == 0) | (step == end))


def per_cycle_remove_counts(num_prunable: int, sparsities: Sequence[float]) -> list[int]:
  """Entries to prune in each round so that round c ends at `sparsities[c]`.

  Cumulative targets round to whole entries (halves up) as in `masks.remove_count`, so
  the counts sum exactly to round(sparsities[-1] * num_prunable) with no drift.

  Args:
    num_prunable: number of prunable entries (`masks.num_prunable`).
    sparsities: non-decreasing cumulative targets in [0, 1), e.g.
      `[imp_sparsity(c, 0.2) for c in range(1, 11)]`.

  Returns:
    One count per round.
  """
  num_prunable = _check_step_int(num_prunable, "num_prunable", 1)
  targets = [_check_unit(s, f"sparsities[{i}]") for i, s in enumerate(sparsities)]
  if any(b < a for a, b in zip(targets, targets[1:])):
    raise ValueError(f"sparsities must be non-decreasing, got {targets}.")
  totals = [0] + [math.floor(s * num_prunable + 0.5) for s in targets]
  return [b - a for a, b in zip(totals, totals[1:])]

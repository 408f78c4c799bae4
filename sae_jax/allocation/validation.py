"""Argument checks shared by the allocation strategies: clear errors that name the fix."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array


def check_scores(scores: Array, name: str = "scores",
                 layout: str = "[tokens, features]") -> None:
  """A 2-D floating score matrix, or a ValueError naming ``name`` and the fix."""
  if not hasattr(scores, "ndim") or scores.ndim != 2:
    shape = getattr(scores, "shape", None)
    raise ValueError(
        f"{name} must be a 2-D {layout} array; got shape {shape}. "
        "Reshape leading dimensions into the token axis first.")
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    raise ValueError(
        f"{name} must have a floating dtype (float32, bfloat16, ...); got {scores.dtype}. "
        "Cast integer scores with .astype(jnp.float32).")


def static_number(value, name: str) -> float:
  """A static real number (a Python number or a concrete 0-d array), else a ValueError."""
  if isinstance(value, (jax.Array, np.ndarray)) and not isinstance(value, np.generic):
    if getattr(value, "ndim", 1) != 0 or isinstance(value, jax.core.Tracer):
      raise ValueError(
          f"{name} must be a static Python number (it fixes output shapes); got an array "
          f"of type {type(value).__name__}. Pass a Python int/float, and mark it static "
          "under jax.jit (static_argnames).")
    value = value.item()
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name} must be a real number; got {value!r}.")
  return value

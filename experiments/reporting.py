"""What the experiment reports share: intervals over seeds, the verdict rule, the machine."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence

import jax
import numpy as np
from scipy import stats as scipy_stats


def confidence_interval(values: Sequence[float], level: float = 0.95
                        ) -> tuple[float, float, float, int]:
  """(mean, low, high, n) of `values`, a Student-t interval for the mean.

  With fewer than two values the interval is (nan, nan): one seed has no spread.
  """
  x = np.asarray(values, np.float64)
  n = len(x)
  if n == 0:
    return math.nan, math.nan, math.nan, 0
  mean = float(x.mean())
  if n < 2:
    return mean, math.nan, math.nan, n
  half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
  return mean, mean - half, mean + half, n


def holds(low: float, high: float, sign: int) -> str:
  """Verdict of a claim that a difference has sign ``sign`` (+1 or -1), from its interval."""
  if math.isnan(low):
    return "undecided (one seed)"
  if low == 0.0 and high == 0.0:
    # Every paired difference is exactly 0 (e.g. no feature dead in either arm).
    return "tie (equal on every seed)"
  if sign * low > 0 and sign * high > 0:
    return "holds"
  if sign * low < 0 and sign * high < 0:
    return "opposite holds"
  return "not shown (CI spans 0)"


def machine() -> dict:
  """Where a result was measured: platform, CPU count, processor, JAX and its backend."""
  processor = platform.processor()
  try:
    with open("/proc/cpuinfo") as fh:
      names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
    processor = names[0] if names else processor
  except OSError:
    pass
  return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
          "processor": processor, "jax": jax.__version__, "backend": jax.default_backend()}

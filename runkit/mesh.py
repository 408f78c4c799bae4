"""Device meshes with named axes, sized from the devices JAX sees."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math

import jax
from jax.sharding import AxisType, Mesh
import numpy as np


def make_mesh(axes: Mapping[str, int | None], devices: Sequence[jax.Device] | None = None,
              *, labels: Mapping[str, str] | None = None) -> Mesh:
  """A mesh with ``Auto`` axes over the first devices, shaped ``axes`` in their order.

  Args:
    axes: axis name -> size; at most one size may be None, which uses every device left
      over by the others (``len(devices) // product of the other sizes``).
    devices: the devices to lay out (default ``jax.devices()``).
    labels: axis name -> the name the caller's users know the size by (an argument name
      such as ``"num_devices"``), used in error messages; default ``"<axis> axis size"``.

  Raises:
    ValueError: a size is not an int >= 1, more than one size is None, or the sizes need
      more devices than there are; the message names the size and its allowed range.
  """
  devices = list(jax.devices() if devices is None else devices)
  labels = dict(labels or {})
  label = lambda name: labels.get(name, f"{name!r} axis size")
  if not axes:
    raise ValueError("axes must name at least one mesh axis, e.g. {'data': None}.")
  free = [name for name, size in axes.items() if size is None]
  if len(free) > 1:
    raise ValueError(f"at most one mesh axis size may be None (all remaining devices); "
                     f"{', '.join(label(n) for n in free)} are all None. Give all but one.")
  for name, size in axes.items():
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
      raise ValueError(f"{label(name)} must be an int >= 1 or None, got {size!r}.")
  fixed = {name: size for name, size in axes.items() if size is not None}
  if math.prod(fixed.values()) > len(devices):
    if len(fixed) == 1:
      (name, size), = fixed.items()
      raise ValueError(f"{label(name)} must be an int in [1, {len(devices)}] (the available "
                       f"devices), got {size!r}.")
    raise ValueError(f"{' * '.join(label(n) for n in fixed)} = "
                     f"{' * '.join(str(s) for s in fixed.values())} exceeds the "
                     f"{len(devices)} available devices; make the product at most "
                     f"{len(devices)}.")
  shape = dict(axes)
  if free:
    shape[free[0]] = len(devices) // math.prod(fixed.values())
  count = math.prod(shape.values())
  grid = np.array(devices[:count]).reshape(tuple(shape.values()))
  return Mesh(grid, tuple(shape), axis_types=(AxisType.Auto,) * len(shape))

"""Writing a benchmark's result: one JSON file, its folder created if needed."""

import json
import os


def write_result(result: dict, path: str) -> None:
  """Writes `result` as indented JSON to `path` and says where."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as fh:
    json.dump(result, fh, indent=2)
  print(f"wrote {path}")


def machine() -> dict:
  """Where a benchmark ran: platform, processor, CPU count, JAX, backend and devices."""
  import platform

  import jax
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "devices": [str(dv) for dv in jax.devices()]}

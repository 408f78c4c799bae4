"""Writing a benchmark's result: one JSON file, its folder created if needed."""

import json
import os


def write_result(result: dict, path: str) -> None:
  """Writes `result` as indented JSON to `path` and says where."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as fh:
    json.dump(result, fh, indent=2)
  print(f"wrote {path}")

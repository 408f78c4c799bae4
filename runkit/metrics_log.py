"""The JSON-lines metrics log a checkpointed run keeps beside its checkpoints.

A resumed run must not keep the lines logged after the checkpoint it resumes from (they
are logged again). Two ways to cut them: by length (store ``size()`` in each checkpoint,
``truncate`` to it on resume) or by step (``drop_after(step)`` for logs whose every line
carries its step).
"""

from __future__ import annotations

import json
import os
from typing import Any

from runkit.errors import CheckpointError


class MetricsLog:
  """An append-only JSON-lines file of metric dicts.

  Attributes:
    path: the file (created by the first ``append``).
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)

  def size(self) -> int:
    """Bytes written so far (0 before the file exists)."""
    return os.path.getsize(self.path) if os.path.exists(self.path) else 0

  def append(self, line: dict[str, Any]) -> None:
    """Adds one JSON object as a line (keys sorted, so equal runs write equal files)."""
    with open(self.path, "a") as fh:
      fh.write(json.dumps(line, sort_keys=True) + "\n")

  def truncate(self, size: int) -> None:
    """Cuts the file back to ``size`` bytes, dropping lines logged after a checkpoint.

    Raises:
      CheckpointError: the file is shorter than ``size`` (lost or edited).
    """
    if self.size() < size:
      raise CheckpointError(f"{self.path} has {self.size()} bytes, fewer than the {size} "
                            "recorded in the checkpoint; it was edited or replaced. Restore "
                            "it, or start the run in a new folder.")
    with open(self.path, "a") as fh:
      fh.truncate(size)

  def drop_after(self, step: int, key: str = "step") -> None:
    """Drops the lines whose ``key`` exceeds ``step`` (lines without it are kept).

    The file is replaced atomically; nothing happens when it does not exist.
    """
    if not os.path.exists(self.path):
      return
    with open(self.path) as fh:
      kept = [line for line in fh.read().splitlines()
              if line.strip() and json.loads(line).get(key, 0) <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as fh:
      fh.write("".join(line + "\n" for line in kept))
    os.replace(tmp, self.path)

  def text(self, size: int | None = None) -> str:
    """The file, or its first ``size`` bytes."""
    with open(self.path, "rb") as fh:
      return fh.read(size).decode()

  def replace(self, text: str) -> None:
    """Overwrites the file with ``text``."""
    with open(self.path, "w") as fh:
      fh.write(text)

  def read(self, kind: str | None = None) -> list[dict[str, Any]]:
    """The logged objects, those with ``"kind" == kind`` only when given."""
    if not os.path.exists(self.path):
      return []
    with open(self.path) as fh:
      lines = [json.loads(line) for line in fh if line.strip()]
    return [line for line in lines if kind is None or line.get("kind") == kind]

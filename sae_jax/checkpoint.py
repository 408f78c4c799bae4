"""Orbax checkpoints of the SAE train state plus JSON metadata (data position, configs).

A checkpoint holds the whole ``TrainState`` pytree (restored straight into its sharded
layout) and a JSON record with the data-iterator position and the configs it was made
with, so a resumed run sees the same batches and a run with a different config is
refused with a message naming the differing fields instead of a shape error from deep
inside Orbax. Saves are asynchronous: ``save`` returns once the arrays are copied off the
devices and the files are written in the background; ``wait`` and ``close`` block until
every pending save is on disk.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used: corrupted, incomplete or from another config."""


class ConfigMismatchError(CheckpointError, ValueError):
  """A checkpoint or run folder written with configs other than the ones given."""


def config_record(*configs) -> dict[str, dict[str, Any]]:
  """JSON-able record of frozen dataclass configs, keyed by class name."""
  out = {}
  for cfg in configs:
    fields = {}
    for f in dataclasses.fields(cfg):
      v = getattr(cfg, f.name)
      fields[f.name] = v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
    out[type(cfg).__name__] = fields
  return out


_ABSENT = "<absent>"


def config_differences(found: dict, expected: dict) -> list[str]:
  """The fields in which two :func:`config_record` records differ, one line each.

  Args:
    found: the record stored with a checkpoint or run folder.
    expected: the record of the configs in use now.

  Returns:
    Lines like ``"SAEConfig.d_sae: 16 there, 32 now"``; empty when the records agree.
  """
  found, expected = _jsonable(found or {}), _jsonable(expected)
  lines = []
  for name in sorted(set(found) | set(expected)):
    if name not in found or name not in expected:
      lines.append(f"{name}: {'absent there' if name not in found else 'absent now'}")
      continue
    old, new = found[name], expected[name]
    for field in sorted(set(old) | set(new)):
      if old.get(field, _ABSENT) != new.get(field, _ABSENT):
        lines.append(f"{name}.{field}: {old.get(field, _ABSENT)!r} there, "
                     f"{new.get(field, _ABSENT)!r} now")
  return lines


class Checkpointer:
  """Keep-N Orbax checkpoints of a train state and its JSON metadata.

  Args:
    directory: folder for the checkpoints (created if missing).
    keep: number of most recent checkpoints kept.
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 3):
    if keep < 1:
      raise ValueError(f"keep must be >= 1; got {keep}.")
    self.directory = pathlib.Path(directory).absolute()
    # Asynchronous saves let training go on while the files are written; Orbax itself
    # waits for the previous save before starting the next one.
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    """Starts saving ``state`` and ``meta`` as checkpoint ``step``.

    Returns once the arrays are copied off the devices (so ``state`` may be donated
    afterwards) and any earlier save has finished; the files are written in the
    background and the checkpoint counts as saved only after ``wait`` or ``close``.
    """
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def wait(self) -> None:
    """Blocks until every pending save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases Orbax's background threads."""
    self._manager.wait_until_finished()
    self._manager.close()

  def restore(self, step: int, abstract_state, expected_configs: dict | None = None):
    """Restores ``(state, meta)``; ``abstract_state`` fixes shapes, dtypes and shardings.

    Raises:
      CheckpointError: the checkpoint is missing or corrupted.
      ConfigMismatchError: it was written with configs different from
        ``expected_configs`` (a ``CheckpointError`` and a ``ValueError``).
    """
    path = self.directory / str(step)
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # Orbax raises many types; the user needs the path and a fix.
      raise CheckpointError(
          f"cannot read the metadata of checkpoint {path}: {type(e).__name__}: {e}. The "
          "checkpoint is incomplete or corrupted; delete that folder to resume from an "
          "earlier one, or start a new run folder.") from e
    differences = ([] if expected_configs is None
                   else config_differences(meta.get("configs"), expected_configs))
    if differences:
      raise ConfigMismatchError(
          f"checkpoint {path} was written with configs that differ from this run's: "
          f"{'; '.join(differences)}. Use the original configs to resume, or a new run "
          "folder to start over.")
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))["state"]
    except Exception as e:
      raise CheckpointError(
          f"cannot restore the train state from checkpoint {path}: {type(e).__name__}: {e}. "
          "The checkpoint is corrupted or its arrays do not match this model; delete it "
          "or start a new run folder.") from e
    return state, meta


def _jsonable(record: dict) -> dict:
  return json.loads(json.dumps(record))


def abstract_like(state) -> Any:
  """ShapeDtypeStructs carrying each leaf's sharding: the restore target of ``state``."""
  def one(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
  return jax.tree.map(one, state)

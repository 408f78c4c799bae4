"""Run configs on disk: records of dataclass configs, their differences, ``config.json``.

A run folder holds the settings it was started with in ``config.json``. A run resumed in
that folder with other settings is refused before any work, with an error naming every
field that differs (``ConfigMismatchError``), instead of silently mixing two runs or
failing later with a shape error from deep inside the checkpoint library. The same
difference function checks the configs stored inside a checkpoint
(``Checkpointer.restore(..., expected_configs=...)``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
from typing import Any, NamedTuple

from runkit.errors import ConfigMismatchError

CONFIG_FILE = "config.json"


class _Absent:
  """The value on the side of a difference where the key does not exist."""

  def __repr__(self) -> str:
    return "<absent>"


ABSENT = _Absent()


class ConfigDifference(NamedTuple):
  """One field in which a stored config and the config in use differ.

  Attributes:
    path: the field's dotted key path, e.g. ``"SAEConfig.d_sae"`` or ``"train.epochs"``.
    there: its value in the stored config (``ABSENT`` when the key is missing there).
    now: its value in the config in use (``ABSENT`` when the key is missing now).
  """

  path: str
  there: Any
  now: Any

  def __str__(self) -> str:
    if self.there is ABSENT and isinstance(self.now, dict):
      return f"{self.path}: absent there"
    if self.now is ABSENT and isinstance(self.there, dict):
      return f"{self.path}: absent now"
    return f"{self.path}: {self.there!r} there, {self.now!r} now"


def config_record(*configs) -> dict[str, dict[str, Any]]:
  """JSON-able record of dataclass configs, keyed by class name.

  Fields that are not ``bool``, ``int``, ``float``, ``str`` or ``None`` are stored as
  ``str(value)``.

  Raises:
    TypeError: an argument is not a dataclass instance.
  """
  out = {}
  for i, cfg in enumerate(configs):
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
      raise TypeError(f"configs[{i}] must be a dataclass instance, got {type(cfg).__name__}; "
                      "pass config objects such as SAEConfig(...), not classes or dicts.")
    fields = {}
    for f in dataclasses.fields(cfg):
      v = getattr(cfg, f.name)
      fields[f.name] = v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
    out[type(cfg).__name__] = fields
  return out


def config_differences(found: Mapping[str, Any] | None, expected: Mapping[str, Any],
                       ignore: Sequence[str] = ()) -> list[ConfigDifference]:
  """The fields in which two config dicts differ, nested dicts compared field by field.

  Both dicts are compared in their JSON form (tuples as lists), so a config read back from
  ``config.json`` equals the dict it was written from.

  Args:
    found: the config stored with a checkpoint or run folder (None: nothing stored).
    expected: the config in use now.
    ignore: dotted key paths (and everything below them) allowed to differ.

  Returns:
    One ``ConfigDifference`` per differing field, sorted by path; empty when the configs
    agree. ``str()`` of each reads like ``"SAEConfig.d_sae: 16 there, 32 now"``.
  """
  out: list[ConfigDifference] = []
  _walk(_jsonable(found or {}), _jsonable(expected), "", tuple(ignore), out)
  return out


def _jsonable(record: Mapping[str, Any]) -> dict[str, Any]:
  return json.loads(json.dumps(record))


def _ignored(path: str, ignore: tuple[str, ...]) -> bool:
  return any(path == name or path.startswith(name + ".") for name in ignore)


def _walk(found: dict, expected: dict, prefix: str, ignore: tuple[str, ...],
          out: list[ConfigDifference]) -> None:
  for key in sorted(set(found) | set(expected)):
    path = prefix + key
    if _ignored(path, ignore):
      continue
    old, new = found.get(key, ABSENT), expected.get(key, ABSENT)
    if isinstance(old, dict) and isinstance(new, dict):
      _walk(old, new, path + ".", ignore, out)
    elif old is ABSENT or new is ABSENT or old != new:
      out.append(ConfigDifference(path, old, new))


def config_path(run_dir: str | os.PathLike) -> str:
  """Where the config of the run in ``run_dir`` lives."""
  return os.path.join(os.fspath(run_dir), CONFIG_FILE)


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
  """The config ``write_config`` saved in ``run_dir``.

  Raises:
    ValueError: ``run_dir`` holds no ``config.json``, or one that is not valid JSON.
  """
  path = config_path(run_dir)
  if not os.path.exists(path):
    raise ValueError(f"{os.fspath(run_dir)} holds no run (no {CONFIG_FILE}); pass the folder "
                     "of a run that has started.")
  with open(path) as fh:
    try:
      return json.load(fh)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}); restore it, or start the run in "
                       "a new folder.") from e


def check_config(run_dir: str | os.PathLike, config: Mapping[str, Any],
                 ignore: Sequence[str] = ()) -> bool:
  """Refuses a run folder whose ``config.json`` differs from ``config``.

  Args:
    run_dir: the run folder.
    config: the config in use now (JSON-able).
    ignore: dotted key paths allowed to differ (settings a resume may change).

  Returns:
    Whether ``run_dir`` holds a ``config.json`` (it then agrees with ``config``).

  Raises:
    ConfigMismatchError: the stored config differs outside ``ignore``; the message names
      every differing field with both values.
  """
  if not os.path.exists(config_path(run_dir)):
    return False
  differences = config_differences(read_config(run_dir), config, ignore)
  if differences:
    raise ConfigMismatchError(
        f"run folder {os.fspath(run_dir)} was written with configs that differ from this "
        f"run's: {'; '.join(map(str, differences))}. Use another run folder, or the same "
        "configs to continue this one.")
  return True


def write_config(run_dir: str | os.PathLike, config: Mapping[str, Any],
                 ignore: Sequence[str] = ()) -> None:
  """Writes ``run_dir``/config.json, refusing a config other than the one already there.

  The file (indented JSON, keys sorted) is replaced atomically, so a crash never leaves
  half a file; it is left untouched when it already holds ``config``, and rewritten when
  only fields in ``ignore`` changed.

  Raises:
    ConfigMismatchError: the stored config differs outside ``ignore`` (see
      ``check_config``).
  """
  if check_config(run_dir, config, ignore) and not config_differences(
      read_config(run_dir), config):
    return
  path = config_path(run_dir)
  tmp = path + ".tmp"
  with open(tmp, "w") as fh:
    fh.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)

"""A small Orbax wrapper: numbered checkpoints of a pytree plus JSON metadata.

Also the two plain files a checkpointed run keeps beside its checkpoints: its settings
(`write_config`, refusing to mix runs) and a JSON-lines metrics log (`MetricsLog`) whose
length is stored in each checkpoint, so that a resumed run drops what was logged after.

Each checkpoint holds a state pytree (`ocp.args.StandardSave`) and a JSON dict
(`ocp.args.JsonSave`) under one integer id, managed by `ocp.CheckpointManager` (keep the
newest N, atomic finalisation, so a process killed while saving leaves the previous
checkpoints intact and its unfinished temporary directory is ignored).

Typed PRNG keys are stored as their raw key data and re-wrapped on restore. A SHA-256
digest of every array (shape, dtype and bytes) is stored in the metadata and checked on
restore, so a damaged checkpoint fails with `CheckpointError` naming it instead of
silently resuming from wrong values.
"""

from collections.abc import Sequence
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import PyTree
import numpy as np
import orbax.checkpoint as ocp

_DIGEST = "_sha256"


class CheckpointError(RuntimeError):
  """A checkpoint is missing, unreadable, damaged or does not fit the expected state."""


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_storable(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _from_storable(stored: PyTree, template: PyTree) -> PyTree:
  return jax.tree.map(
      lambda s, t: jax.random.wrap_key_data(s, impl=jax.random.key_impl(t))
      if _is_key(t) else s, stored, template)


def tree_digest(tree: PyTree) -> str:
  """SHA-256 over the shape, dtype and bytes of every leaf, in leaf order."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(_to_storable(tree))[0]:
    arr = np.asarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{arr.shape}|{arr.dtype}|".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


class Checkpointer:
  """Numbered checkpoints of (state pytree, JSON metadata) in one directory.

  Attributes:
    directory: absolute path of the checkpoint directory.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2,
               preserve: Sequence[int] = ()):
    """Opens (creating if needed) `directory`.

    Args:
      directory: where the numbered checkpoints live.
      max_to_keep: newest checkpoints kept, >= 1; older ones are deleted on save.
      preserve: ids never deleted, whatever their age.
    """
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(f"max_to_keep must be an int >= 1, got {max_to_keep!r}.")
    self.directory = os.path.abspath(os.fspath(directory))
    policies = ocp.checkpoint_managers
    policy = policies.AnyPreservationPolicy([policies.LatestN(max_to_keep),
                                             policies.CustomSteps(list(preserve))])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    """Ids of the finalised checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Id of the newest finalised checkpoint, None if there is none."""
    steps = self.steps()
    return steps[-1] if steps else None

  def path(self, step: int) -> str:
    """Directory of checkpoint `step`."""
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
    """Writes checkpoint `step` (synchronously) and prunes old ones.

    Args:
      step: id, greater than every existing id.
      state: pytree of arrays (typed PRNG keys allowed).
      meta: JSON-serialisable dict; the key "_sha256" is reserved.
    """
    latest = self.latest_step()
    if latest is not None and step <= latest:
      raise ValueError(f"step must exceed the latest checkpoint id {latest}, got {step}.")
    if _DIGEST in meta:
      raise ValueError(f"meta must not use the reserved key {_DIGEST!r}.")
    meta = dict(meta, **{_DIGEST: tree_digest(state)})
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_storable(state)), meta=ocp.args.JsonSave(meta)))
    self._manager.wait_until_finished()

  def restore(self, template: PyTree, step: int | None = None
              ) -> tuple[PyTree, dict[str, Any]]:
    """Restores checkpoint `step` (the newest by default) into `template`'s layout.

    Args:
      template: pytree with the saved structure; its leaves give shapes, dtypes and
        shardings (typed keys come back typed).
      step: checkpoint id, or None for the newest.

    Returns:
      (state, meta), meta without the digest.

    Raises:
      CheckpointError: no checkpoint, an unknown id, an unreadable or damaged
        checkpoint (digest mismatch), or a structure other than `template`'s.
    """
    available = self.steps()
    if step is None:
      if not available:
        raise CheckpointError(f"no checkpoint in {self.directory}.")
      step = available[-1]
    if step not in available:
      raise CheckpointError(f"checkpoint {step} not found in {self.directory}; available: "
                            f"{available}.")
    where = self.path(step)
    hint = (f"delete {where} to resume from the previous checkpoint "
            f"({[s for s in available if s < step][-1:] or 'none left'}), or start afresh.")
    storable = _to_storable(template)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        storable)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      stored, meta = restored.state, restored.meta
    except Exception as e:  # Orbax/tensorstore raise many types; all mean "unreadable".
      raise CheckpointError(f"checkpoint {where} is unreadable ({type(e).__name__}: "
                            f"{str(e)[:300]}); {hint}") from e
    if not isinstance(meta, dict) or _DIGEST not in meta:
      raise CheckpointError(f"checkpoint {where} has no valid metadata; {hint}")
    if jax.tree.structure(stored) != jax.tree.structure(storable):
      raise CheckpointError(f"checkpoint {where} does not have the expected state structure;"
                            f" was it written by another configuration? {hint}")
    for s, t in zip(jax.tree.leaves(stored), jax.tree.leaves(storable)):
      if s.shape != t.shape or s.dtype != t.dtype:
        raise CheckpointError(f"checkpoint {where} holds an array {s.dtype}{list(s.shape)} "
                              f"where {t.dtype}{list(t.shape)} is expected; {hint}")
    state = _from_storable(stored, template)
    meta = dict(meta)
    digest = meta.pop(_DIGEST)
    if tree_digest(state) != digest:
      raise CheckpointError(f"checkpoint {where} is damaged: its arrays do not match the "
                            f"digest recorded when it was saved; {hint}")
    return state, meta

  def close(self) -> None:
    """Waits for pending work and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def config_diff(saved: dict[str, Any], new: dict[str, Any],
                ignore: Sequence[str] = ()) -> list[str]:
  """Sorted top-level keys whose values differ between two settings dicts."""
  return sorted(k for k in set(saved) | set(new)
                if k not in ignore and saved.get(k) != new.get(k))


def read_config(run_dir: str) -> dict[str, Any]:
  """The settings `write_config` saved in `run_dir`/config.json.

  Raises:
    ValueError: `run_dir` holds no config.json.
  """
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"{run_dir} holds no run (no config.json).")
  with open(path) as fh:
    return json.load(fh)


def write_config(run_dir: str, config: dict[str, Any], ignore: Sequence[str] = ()) -> None:
  """Writes `run_dir`/config.json, refusing settings other than those already there.

  Raises:
    ValueError: the saved settings differ outside `ignore`; the message names the keys.
  """
  path = os.path.join(run_dir, "config.json")
  if os.path.exists(path):
    diff = config_diff(read_config(run_dir), config, ignore)
    if diff:
      raise ValueError(f"{run_dir} holds a run with other settings (differs in {diff}); "
                       "use a new folder or the same settings to resume.")
  with open(path, "w") as fh:
    json.dump(config, fh, indent=2)


class MetricsLog:
  """An append-only JSON-lines file; `size()` goes into checkpoints, `truncate` resumes.

  Attributes:
    path: the file.
  """

  def __init__(self, path: str):
    self.path = path

  def size(self) -> int:
    """Bytes written so far (0 before the file exists)."""
    return os.path.getsize(self.path) if os.path.exists(self.path) else 0

  def append(self, line: dict[str, Any]) -> None:
    """Adds one JSON object as a line (keys sorted, so equal runs write equal files)."""
    with open(self.path, "a") as fh:
      fh.write(json.dumps(line, sort_keys=True) + "\n")

  def truncate(self, size: int) -> None:
    """Cuts the file back to `size` bytes, dropping lines logged after a checkpoint.

    Raises:
      CheckpointError: the file is shorter than `size` (lost or edited).
    """
    if self.size() < size:
      raise CheckpointError(f"{self.path} has {self.size()} bytes, fewer than the {size} "
                            "recorded in the checkpoint; it was edited or replaced.")
    with open(self.path, "a") as fh:
      fh.truncate(size)

  def text(self, size: int | None = None) -> str:
    """The file, or its first `size` bytes."""
    with open(self.path, "rb") as fh:
      return fh.read(size).decode()

  def replace(self, text: str) -> None:
    """Overwrites the file with `text`."""
    with open(self.path, "w") as fh:
      fh.write(text)

  def read(self, kind: str | None = None) -> list[dict[str, Any]]:
    """The logged objects, those with `"kind" == kind` only when given."""
    if not os.path.exists(self.path):
      return []
    with open(self.path) as fh:
      lines = [json.loads(line) for line in fh]
    return [line for line in lines if kind is None or line.get("kind") == kind]

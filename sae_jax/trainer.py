"""The SAE training loop: sharded steps, checkpoints, resume, progress and metrics.

``fit`` drives :func:`sae_jax.sharding.jit_sharded_step` over any batch source that
follows the data protocol (``next(batches)`` -> ``[b, d]`` float32 host array,
``batches.state()`` -> JSON-able position, ``batches.restore(position)``), e.g.
:class:`sae_jax.data.batches.ShuffledBatches` or
:class:`sae_jax.data.synthetic.SyntheticBatches`.

Nothing is lost on a crash: checkpoints (train state + data position + configs) are
written every ``checkpoint_every`` steps and at the end, and a restarted ``fit`` on the
same run folder resumes from the latest one and ends bitwise equal to an uninterrupted
run. A non-finite batch or loss stops training with an error naming the step and the last
good checkpoint; nothing already saved is touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from sae_jax import checkpoint
from sae_jax import model
from sae_jax import sharding
from sae_jax import train


class NonFiniteError(FloatingPointError):
  """Training met a NaN or infinity in a batch or in the loss."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How a run is driven (not what is optimised).

  Attributes:
    steps: total optimisation steps.
    seed: parameter initialisation seed.
    checkpoint_every: steps between checkpoints (one is always written at the end).
    keep: checkpoints kept.
    log_every: steps between metric lines in ``metrics.jsonl``.
    n_data, n_model: mesh shape; ``n_data=None`` uses all remaining devices.
    progress: show a progress bar.
  """

  steps: int = 1000
  seed: int = 0
  checkpoint_every: int = 500
  keep: int = 3
  log_every: int = 10
  n_data: int | None = None
  n_model: int = 1
  progress: bool = True

  def __post_init__(self):
    for name in ("steps", "checkpoint_every", "keep", "log_every", "n_model"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}.")


def _trim_metrics(path: pathlib.Path, last_step: int) -> None:
  """Drops metric lines written after the checkpoint a run resumes from."""
  if not path.exists():
    return
  kept = [line for line in path.read_text().splitlines()
          if line.strip() and json.loads(line).get("step", 0) <= last_step]
  tmp = path.with_suffix(".tmp")
  tmp.write_text("".join(line + "\n" for line in kept))
  os.replace(tmp, path)


def fit(run_dir: str | os.PathLike, cfg: model.SAEConfig, tcfg: train.TrainConfig,
        rcfg: RunConfig, batches, *, init_sample=None,
        on_step: Callable[[int], Any] | None = None) -> tuple[train.TrainState, dict]:
  """Trains (or resumes training) an SAE in ``run_dir``.

  Args:
    run_dir: run folder; holds ``checkpoints/`` and ``metrics.jsonl``.
    cfg, tcfg, rcfg: model, optimisation and run configs.
    batches: the data source (see the module docstring).
    init_sample: ``[n, d]`` activations for the geometric-median ``b_dec`` init.
    on_step: called with the step number after every step (hooks, tests).

  Returns:
    The final train state and a summary dict of the last metrics.
  """
  run_dir = pathlib.Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(rcfg.n_data, rcfg.n_model)
  configs = checkpoint.config_record(cfg, tcfg)
  ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", keep=rcfg.keep)
  key = jax.random.key(rcfg.seed)
  latest = ckpt.latest_step()
  if latest is None:
    sample = None if init_sample is None else np.asarray(init_sample, np.float32)
    state = sharding.init_sharded_state(key, cfg, tcfg, mesh, sample)
  else:
    abstract = jax.eval_shape(
        lambda: train.init_train_state(key, cfg, tcfg, None if init_sample is None
                                       else np.zeros(np.shape(init_sample), np.float32)))
    shardings = sharding.state_shardings(abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    state, meta = ckpt.restore(latest, target, expected_configs=configs)
    batches.restore(meta["data"])
  start = int(state.step)
  metrics_path = run_dir / "metrics.jsonl"
  if jax.process_index() == 0:
    _trim_metrics(metrics_path, start)
  step_fn = sharding.jit_sharded_step(cfg, tcfg, mesh, jax.eval_shape(lambda: state))
  batch_sharding = sharding.batch_sharding(mesh)
  last_saved = latest
  summary: dict[str, float] = {}
  bar = tqdm(total=rcfg.steps, initial=start, desc="sae",
             disable=not rcfg.progress or jax.process_index() != 0,
             unit="step", dynamic_ncols=True)
  t_last, tokens_since = time.perf_counter(), 0
  try:
    with open(metrics_path, "a") as log:
      for step in range(start, rcfg.steps):
        x = next(batches)
        if jax.process_count() == 1 and not np.isfinite(x).all():
          raise NonFiniteError(
              f"batch for step {step} holds non-finite values; training stopped. Last good "
              f"checkpoint: {_ckpt_name(ckpt, last_saved)}.")
        # Each process contributes its own rows of the global batch.
        x_global = jax.make_array_from_process_local_data(batch_sharding, x)
        state, m = step_fn(state, x_global)
        m = {k: _scalar(v) for k, v in m.items()}
        if m["batch_finite"] != 1.0:
          raise NonFiniteError(
              f"batch for step {step} holds non-finite values on some process; training "
              f"stopped. Last good checkpoint: {_ckpt_name(ckpt, last_saved)}.")
        loss = m["loss"]
        if not math.isfinite(loss):
          raise NonFiniteError(
              f"loss became {loss} at step {step}; training stopped. Last good checkpoint: "
              f"{_ckpt_name(ckpt, last_saved)} (not overwritten).")
        tokens_since += x.shape[0] * jax.process_count()
        done = step + 1
        if done % rcfg.log_every == 0 or done == rcfg.steps:
          now = time.perf_counter()
          summary = dict(m)
          summary.update(step=done, tokens_per_s=tokens_since / max(now - t_last, 1e-9))
          t_last, tokens_since = now, 0
          if jax.process_index() == 0:
            log.write(json.dumps(summary) + "\n")
            log.flush()
          bar.set_postfix(tok_s=f"{summary['tokens_per_s']:.0f}", loss=f"{loss:.4f}",
                          l0=f"{summary['l0']:.1f}", dead=f"{summary['dead_fraction']:.3f}")
        if done % rcfg.checkpoint_every == 0 or done == rcfg.steps:
          ckpt.save(done, state, {"data": batches.state(), "configs": configs, "step": done})
          last_saved = done
        bar.update(1)
        if on_step is not None:
          on_step(done)
  finally:
    # Pending asynchronous saves finish even when training stops with an error.
    bar.close()
    ckpt.close()
  return state, summary


def _scalar(x) -> float:
  """A replicated scalar as a Python float; works when the array spans processes."""
  return float(np.asarray(x.addressable_shards[0].data))


def _ckpt_name(ckpt: checkpoint.Checkpointer, step: int | None) -> str:
  return "none (no checkpoint written yet)" if step is None else str(ckpt.directory / str(step))

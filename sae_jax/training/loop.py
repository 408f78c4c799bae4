"""The SAE training loop: sharded steps, checkpoints, resume, progress and metrics.

``fit`` drives :func:`sae_jax.training.sharding.jit_sharded_step` over any batch source that
follows the data protocol (``next(batches)`` -> ``[b, d]`` float32 host array,
``batches.state()`` -> JSON-able position, ``batches.restore(position)``), e.g.
:class:`sae_jax.data.batches.ShuffledBatches` or
:class:`sae_jax.data.synthetic.SyntheticBatches`.

The loop never waits for the devices between steps. A :class:`Prefetcher` thread reads
the batches a few steps ahead and places each process's rows on the devices; the step
metrics stay on the devices and are fetched only on log steps (every ``log_every``),
checkpoint steps and the last step; checkpoints are written asynchronously by Orbax.
Each line of ``metrics.jsonl`` holds the metrics of its own step and, as ``<name>_mean``,
the mean of ``loss``, ``nmse``, ``l0`` and ``aux_loss`` over every step since the previous
line (summed on the devices; a resumed run carries the partial sums in its checkpoint, so
its lines match an uninterrupted run's).
The source is read exactly once per step run, so it ends where an unprefetched loop would.

Nothing is lost on a crash: checkpoints (train state + data position of the batches
consumed so far + configs) are written every ``checkpoint_every`` steps and at the end,
and a restarted ``fit`` on the same run folder says so, resumes from the latest one and
ends bitwise equal to an uninterrupted run. ``run_dir/config.json`` records the model and
optimisation configs when a run starts; a run folder written with other configs is refused
before any work.

A non-finite batch or loss is caught on the devices: a running flag over every step is
checked whenever metrics are fetched, so training stops at most ``min(log_every,
checkpoint_every)`` steps later with an error naming the first bad step and the last good
checkpoint. The flag is always checked before a save, so no checkpoint is ever written
after a non-finite step and the ones already saved stay untouched.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import pathlib
import queue
import threading
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from sae_jax import model
from sae_jax.training import sharding
from sae_jax.training import train_state
import runkit

CONFIG_FILE = runkit.CONFIG_FILE
METRICS_FILE = "metrics.jsonl"
# Step metrics whose mean since the previous line each metrics line also holds.
MEAN_KEYS = ("loss", "nmse", "l0", "aux_loss")


class NonFiniteError(runkit.NonFiniteError):
  """Training met a NaN or infinity in a batch or in the loss."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """How a run is driven (not what is optimised).

  Attributes:
    steps: total optimisation steps.
    seed: parameter initialisation seed.
    checkpoint_every: steps between checkpoints (one is always written at the end).
    keep: checkpoints kept.
    log_every: steps between metric lines in ``metrics.jsonl``; also the longest a
      non-finite step can go unnoticed.
    n_data, n_model: mesh shape; ``n_data=None`` uses all remaining devices.
    progress: show a progress bar.
    prefetch: batches read and placed on the devices ahead of the step using them.
  """

  steps: int = 1000
  seed: int = 0
  checkpoint_every: int = 500
  keep: int = 3
  log_every: int = 10
  n_data: int | None = None
  n_model: int = 1
  progress: bool = True
  prefetch: int = 2

  def __post_init__(self):
    for name in ("steps", "checkpoint_every", "keep", "log_every", "n_model", "prefetch"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}.")


class PrefetchedBatch(NamedTuple):
  """One batch as the loop consumes it.

  Attributes:
    array: the batch placed on the devices (whatever ``place`` returned).
    rows: rows this process read.
    position: ``batches.state()`` right after reading it: where a run that has
      consumed this batch resumes.
  """

  array: Any
  rows: int
  position: Any


class Prefetcher:
  """Reads ``count`` batches on a background thread, at most ``depth`` ahead of use.

  ``next()`` returns :class:`PrefetchedBatch` items in the source's order. An exception
  raised by the source (StopIteration included) or by ``place`` is raised again by the
  ``next()`` call that reaches its batch, so the batches before it are used first as in
  an unprefetched loop. Use as a context manager, or call :meth:`close`, so the thread
  stops however the consumer exits.

  Args:
    batches: the data source (see the module docstring); only this thread touches it
      until :meth:`close` returns.
    place: maps a host batch to what the consumer needs (e.g. a sharded device array).
    count: batches to read; the source is never read further.
    depth: finished batches waiting in the queue.
  """

  def __init__(self, batches, place: Callable[[np.ndarray], Any], count: int,
               depth: int = 2):
    if depth < 1:
      raise ValueError(f"depth must be >= 1; got {depth}.")
    self._batches, self._place, self._count = batches, place, count
    self._taken = 0
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._read, name="sae-prefetch", daemon=True)
    self._thread.start()

  def _read(self) -> None:
    try:
      for _ in range(self._count):
        x = next(self._batches)
        # A copy, because the source may keep mutating the object it returned.
        position = copy.deepcopy(self._batches.state())
        if not self._put(PrefetchedBatch(self._place(x), int(np.shape(x)[0]), position)):
          return
    except BaseException as e:  # StopIteration too: an exception left in a thread is lost
      self._put(_Failure(e))

  def _put(self, item) -> bool:
    """Queues ``item`` unless the consumer closes first; a timeout keeps ``close`` prompt."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def __iter__(self):
    return self

  def __next__(self) -> PrefetchedBatch:
    if self._taken == self._count:
      raise StopIteration
    item = self._queue.get()
    if isinstance(item, _Failure):
      # Later calls must fail the same way instead of blocking on an empty queue.
      self._queue.put(item)
      raise item.error
    self._taken += 1
    return item

  def close(self) -> None:
    """Stops the thread and drops the batches it read ahead."""
    self._stop.set()
    while self._thread.is_alive():
      self._drain()
      self._thread.join(timeout=0.05)
    self._drain()

  def _drain(self) -> None:
    try:
      while True:
        self._queue.get_nowait()
    except queue.Empty:
      pass

  def __enter__(self) -> Prefetcher:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class _Failure(NamedTuple):
  error: BaseException


class _FiniteWatch(NamedTuple):
  """Device-side record of non-finite steps, updated every step without a host sync.

  Attributes:
    ok: every step so far had a finite batch and loss.
    first_bad: the first step that did not (``-1`` while ``ok``).
    bad_batch: that step's batch held a NaN or infinity (otherwise only its loss did).
    bad_loss: that step's loss.
  """

  ok: jax.Array
  first_bad: jax.Array
  bad_batch: jax.Array
  bad_loss: jax.Array


def _watch_init() -> _FiniteWatch:
  return _FiniteWatch(jnp.array(True), jnp.array(-1, jnp.int32), jnp.array(False),
                      jnp.array(0.0, jnp.float32))


def _watch_update(watch: _FiniteWatch, step_metrics: dict, step) -> _FiniteWatch:
  batch_ok = step_metrics["batch_finite"] == 1.0
  finite = batch_ok & jnp.isfinite(step_metrics["loss"])
  first = watch.ok & ~finite
  return _FiniteWatch(
      ok=watch.ok & finite,
      first_bad=jnp.where(first, jnp.asarray(step, jnp.int32), watch.first_bad),
      bad_batch=jnp.where(first, ~batch_ok, watch.bad_batch),
      bad_loss=jnp.where(first, step_metrics["loss"].astype(jnp.float32), watch.bad_loss))


class _Interval(NamedTuple):
  """Device-side sums of the ``MEAN_KEYS`` metrics over the steps since the last line."""

  sums: dict
  count: jax.Array


def _interval_init(values: dict | None = None) -> _Interval:
  """Zero sums, or the host values a checkpoint recorded (exact: float32 round trips)."""
  values = values or {}
  sums = values.get("sums", {})
  return _Interval({k: jnp.asarray(sums.get(k, 0.0), jnp.float32) for k in MEAN_KEYS},
                   jnp.asarray(values.get("count", 0), jnp.int32))


def _step_with_watch(step_fn):
  """``step_fn``, the non-finite watch's update and the interval sums as one jitted program
  (one dispatch per step); the state, the watch and the sums are donated."""
  def run(state, x, watch, interval, step):
    state, step_metrics = step_fn(state, x)
    sums = {k: s + step_metrics[k].astype(jnp.float32) if k in step_metrics else s
            for k, s in interval.sums.items()}
    return (state, step_metrics, _watch_update(watch, step_metrics, step),
            _Interval(sums, interval.count + 1))
  return jax.jit(run, donate_argnums=(0, 2, 3))


def _check_run_folder(run_dir: pathlib.Path, configs: dict, metrics: runkit.MetricsLog,
                      has_checkpoint: bool) -> None:
  """Refuses a run folder that another configuration wrote (or may have written).

  Raises:
    runkit.ConfigMismatchError: ``config.json`` differs from ``configs``.
    ValueError: the folder holds metrics but neither a checkpoint nor ``config.json``.
  """
  if runkit.check_config(run_dir, configs):
    return
  if not has_checkpoint and metrics.size() > 0:
    raise ValueError(
        f"run folder {run_dir} holds {METRICS_FILE} but neither a checkpoint nor "
        f"{CONFIG_FILE}, so the configs that wrote it are unknown. Use another run folder, "
        f"or delete its {METRICS_FILE} to start over in it.")


def fit(run_dir: str | os.PathLike, cfg: model.SAEConfig, tcfg: train_state.TrainConfig,
        rcfg: RunConfig, batches, *, init_sample=None,
        on_step: Callable[[int], Any] | None = None) -> tuple[train_state.TrainState, dict]:
  """Trains (or resumes training) an SAE in ``run_dir``.

  Args:
    run_dir: run folder; holds ``config.json``, ``checkpoints/`` and ``metrics.jsonl``.
    cfg, tcfg, rcfg: model, optimisation and run configs.
    batches: the data source (see the module docstring); read on a background thread
      while ``fit`` runs, exactly once per step.
    init_sample: ``[n, d]`` activations for the geometric-median ``b_dec`` init.
    on_step: called with the step number after every step (hooks, tests); it runs
      while the devices may still be computing that step.

  Returns:
    The final train state and a summary dict of the last metrics.

  Raises:
    runkit.ConfigMismatchError: ``run_dir`` was written with other configs.
    runkit.CheckpointError: its latest checkpoint cannot be read.
    NonFiniteError: a batch or the loss held a NaN or infinity.
  """
  run_dir = pathlib.Path(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  configs = runkit.config_record(cfg, tcfg)
  metrics_log = runkit.MetricsLog(run_dir / METRICS_FILE)
  with contextlib.ExitStack() as cleanup:
    # Asynchronous saves let training go on while the files are written.
    ckpt = runkit.Checkpointer(run_dir / "checkpoints", keep=rcfg.keep, asynchronous=True)
    # Pending asynchronous saves finish even when training stops with an error.
    cleanup.callback(ckpt.close)
    latest = ckpt.latest_step()
    _check_run_folder(run_dir, configs, metrics_log, latest is not None)
    mesh = sharding.make_mesh(rcfg.n_data, rcfg.n_model)
    key = jax.random.key(rcfg.seed)
    resumed_interval = None
    if latest is None:
      sample = None if init_sample is None else np.asarray(init_sample, np.float32)
      state = sharding.init_sharded_state(key, cfg, tcfg, mesh, sample)
    else:
      if jax.process_index() == 0:
        print(f"resuming {run_dir} from step {latest} (checkpoint {ckpt.path(latest)})",
              flush=True)
      abstract = jax.eval_shape(
          lambda: train_state.init_train_state(key, cfg, tcfg, None if init_sample is None
                                               else np.zeros(np.shape(init_sample), np.float32)))
      shardings = sharding.state_shardings(abstract, mesh)
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
      state, meta = ckpt.restore(target, latest, expected_configs=configs)
      batches.restore(meta["data"])
      # Checkpoints written before the interval means existed carry no sums: the first
      # line after resuming then averages the steps since the resume.
      resumed_interval = meta.get("interval")
    start = int(state.step)
    if jax.process_index() == 0:
      runkit.write_config(run_dir, configs)
      # Lines logged after the checkpoint resumed from are logged again.
      metrics_log.drop_after(start)
    step_fn = _step_with_watch(
        sharding.jit_sharded_step(cfg, tcfg, mesh, jax.eval_shape(lambda: state)))
    batch_sharding = sharding.batch_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    watch = jax.jit(_watch_init, out_shardings=replicated)()
    new_interval = jax.jit(_interval_init, out_shardings=replicated)
    interval = jax.jit(lambda: _interval_init(resumed_interval), out_shardings=replicated)()
    last_saved = latest
    summary: dict[str, float] = {}
    bar = tqdm(total=rcfg.steps, initial=start, desc="sae",
               disable=not rcfg.progress or jax.process_index() != 0,
               unit="step", dynamic_ncols=True)
    cleanup.callback(bar.close)
    # Each process contributes its own rows of the global batch.
    place = lambda x: jax.make_array_from_process_local_data(batch_sharding, x)
    prefetcher = cleanup.enter_context(
        Prefetcher(batches, place, max(rcfg.steps - start, 0), rcfg.prefetch))
    t_last, tokens_since = time.perf_counter(), 0
    for step in range(start, rcfg.steps):
      batch = next(prefetcher)
      state, m, watch, interval = step_fn(state, batch.array, watch, interval, step)
      tokens_since += batch.rows * jax.process_count()
      done = step + 1
      log_now = done % rcfg.log_every == 0 or done == rcfg.steps
      save_now = done % rcfg.checkpoint_every == 0 or done == rcfg.steps
      if log_now or save_now:
        # The loop's only host round trip: one transfer of the metrics and the flags.
        m_host, watch_host, interval_host = _host_values((m if log_now else {}, watch,
                                                          interval))
        if not watch_host.ok:
          raise NonFiniteError(_non_finite_message(watch_host, done, ckpt, last_saved))
      if log_now:
        now = time.perf_counter()
        summary = dict(m_host)
        summary.update({f"{k}_mean": interval_host.sums[k] / interval_host.count
                        for k in MEAN_KEYS if k in m_host})
        summary.update(step=done, tokens_per_s=tokens_since / max(now - t_last, 1e-9))
        interval, interval_host = new_interval(), _Interval({}, 0)
        t_last, tokens_since = now, 0
        if jax.process_index() == 0:
          metrics_log.append(summary)
        bar.set_postfix(tok_s=f"{summary['tokens_per_s']:.0f}",
                        loss=f"{summary['loss']:.4f}", l0=f"{summary['l0']:.1f}",
                        dead=f"{summary['dead_fraction']:.3f}")
      if save_now:
        ckpt.save(done, state, {"data": batch.position, "configs": configs, "step": done,
                                "interval": interval_host._asdict()})
        last_saved = done
      bar.update(1)
      if on_step is not None:
        on_step(done)
  return state, summary


def _host_values(tree):
  """Host values of replicated arrays as Python scalars, fetched in one transfer.

  Reads each array's first local shard, so it works when the arrays span processes.
  """
  local = jax.tree.map(lambda x: x.addressable_shards[0].data, tree)
  return jax.tree.map(lambda x: np.asarray(x).item(), jax.device_get(local))


def _non_finite_message(watch: _FiniteWatch, done: int, ckpt: runkit.Checkpointer,
                        last_saved: int | None) -> str:
  what = (f"batch for step {watch.first_bad} holds non-finite values" if watch.bad_batch
          else f"loss became {watch.bad_loss} at step {watch.first_bad}")
  return (f"{what} (seen at step {done}); training stopped before any later checkpoint. "
          f"Last good checkpoint: {_ckpt_name(ckpt, last_saved)} (not overwritten).")


def _ckpt_name(ckpt: runkit.Checkpointer, step: int | None) -> str:
  return "none (no checkpoint written yet)" if step is None else str(ckpt.path(step))

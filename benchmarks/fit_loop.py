"""``loop.fit`` vs a bare loop over the same jitted step, timed in one run.

Measures what the training loop costs on top of its step: tokens/s of
:func:`sae_jax.training.loop.fit` (background prefetch and placement of host batches, the
device-side non-finite watch, metrics fetched on log steps, the final asynchronous
checkpoint) against tokens/s of a bare Python loop that calls the same step, built the
way ``fit`` builds it (:func:`sae_jax.training.sharding.jit_sharded_step` on a one-device mesh),
over a few batches already on the device and synchronises only at the end. Two shapes:
the default SAE (B=4096, d=768, F=32768, k=32), where a step takes about a second, and
a small one (B=512, d=384, F=1536, k=32), where steps take milliseconds and per-step host
work in the loop shows.

``fit`` builds a new jitted step on every call, so every call compiles it again. The
timed window therefore opens in ``fit``'s ``on_step`` callback after step 1, once step
1 has finished on the device, and closes when ``fit`` returns (the final checkpoint
written to disk included); the bare loop's window likewise holds steps 2..N, so both
sides count the same N - 1 steps. Rounds interleave the two, and the headline ratio is
the median over rounds of (fit tokens/s / bare tokens/s).

Round lengths follow ``loop.RunConfig``'s defaults, so a round holds the host work a
default run does: metrics fetched every ``log_every`` (10) steps, and one checkpoint per
round as a default run writes one per ``checkpoint_every`` (500) steps. At the small
shape a round is one such interval (500 steps, about 8 s). At the big shape an interval
would take about 15 minutes per round, so a round holds 20 steps (about 30 s) and the
one save weighs 25 times more than in a run; ``fit_vs_bare_step_to_last_step`` gives the
ratio without the wait for that save.

Run:
  python -m benchmarks.fit_loop            # both shapes, 5 rounds
  python -m benchmarks.fit_loop --quick    # tiny shapes, a smoke run

Writes ``benchmarks/results/fit_loop.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from typing import NamedTuple

import jax
import numpy as np

from benchmarks import output
from sae_jax import model
from sae_jax.training import loop
from sae_jax.training import sharding
from sae_jax.training import train_state

# jax.monitoring event recorded once per XLA compilation.
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Distinct batches fed in turn; more would only cost memory.
N_BATCHES = 4
# fit's defaults: a metrics fetch every LOG_EVERY steps, a checkpoint every
# CHECKPOINT_EVERY steps.
_DEFAULT_RUN = loop.RunConfig(steps=1)
LOG_EVERY, CHECKPOINT_EVERY = _DEFAULT_RUN.log_every, _DEFAULT_RUN.checkpoint_every


class Shape(NamedTuple):
  """One benchmarked SAE size and the steps per timed round."""

  tokens: int
  d_model: int
  features: int
  k: int
  steps: int


SHAPES = {"big": Shape(tokens=4096, d_model=768, features=32768, k=32, steps=20),
          "small": Shape(tokens=512, d_model=384, features=1536, k=32,
                         steps=CHECKPOINT_EVERY)}
QUICK_SHAPES = {"big": Shape(tokens=256, d_model=64, features=1024, k=8, steps=6),
                "small": Shape(tokens=64, d_model=32, features=256, k=4, steps=40)}
# Shape name -> headline key in the JSON (and in bench.json).
KEYS = {"big": "fit_vs_bare_step", "small": "fit_vs_bare_step_small"}


class ArrayBatches:
  """Pre-generated host batches served in turn, following the data protocol of ``training.fit``.

  Serving arrays made beforehand keeps data generation out of the timing, so ``fit``
  pays only for reading, placing and consuming the batches.

  Args:
    arrays: ``[b, d]`` float32 numpy arrays.
  """

  def __init__(self, arrays: list[np.ndarray]):
    self._arrays = arrays
    self._position = 0

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    x = self._arrays[self._position % len(self._arrays)]
    self._position += 1
    return x

  def state(self) -> dict:
    return {"position": self._position}

  def restore(self, position: dict) -> None:
    self._position = int(position["position"])


class CompileCounter:
  """Counts XLA compilations in this process (to tell whether ``fit`` recompiles)."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event == BACKEND_COMPILE_EVENT:
      self.count += 1


def time_bare(step, state, device_batches: list, steps: int):
  """Runs ``steps`` steps back to back; returns the new state and the seconds of 2..N."""
  state, _ = step(state, device_batches[0])
  state = jax.block_until_ready(state)
  t0 = time.perf_counter()
  for i in range(1, steps):
    state, step_metrics = step(state, device_batches[i % len(device_batches)])
  jax.block_until_ready((state, step_metrics))
  return state, time.perf_counter() - t0


def time_fit(cfg: model.SAEConfig, tcfg: train_state.TrainConfig, rcfg: loop.RunConfig,
             host_batches: list[np.ndarray], counter: CompileCounter) -> dict:
  """One ``fit`` call in a fresh run folder, timed over steps 2..N.

  Returns:
    ``seconds`` from step 1 finished to ``fit`` returning (final checkpoint on disk),
    ``seconds_to_last_step`` from step 1 finished to the ``on_step`` call of step N
    (its metrics fetched and the final save started, but not yet on disk),
    ``call_seconds`` of the whole call and ``compiles`` during it.
  """
  marks = {}

  def on_step(done: int) -> None:
    if done == 1:
      # Step 1 may still be running on the device (its call compiled the step): wait
      # for everything in flight, so the window holds steps 2..N as the bare loop's does.
      jax.block_until_ready(jax.live_arrays())
      marks["first"] = time.perf_counter()
    if done == rcfg.steps:
      marks["last"] = time.perf_counter()

  compiles_before = counter.count
  with tempfile.TemporaryDirectory(prefix="fit_loop_") as run_dir:
    t0 = time.perf_counter()
    loop.fit(run_dir, cfg, tcfg, rcfg, ArrayBatches(host_batches), on_step=on_step)
    t_end = time.perf_counter()
  return {"seconds": t_end - marks["first"],
          "seconds_to_last_step": marks["last"] - marks["first"],
          "call_seconds": t_end - t0, "compiles": counter.count - compiles_before}


def run_shape(name: str, shape: Shape, allocation: str, repeats: int, log_every: int,
              counter: CompileCounter) -> dict:
  """Times ``fit`` and the bare loop at one shape in interleaved rounds."""
  b, d, f, k, steps = shape
  print(f"{name}: B={b} d={d} F={f} k={k} allocation={allocation} steps/round={steps}",
        flush=True)
  cfg = model.SAEConfig(d_model=d, d_sae=f, allocation=allocation, k=k)
  tcfg = train_state.TrainConfig(learning_rate=1e-4, warmup_steps=10, total_steps=1000)
  # Only the final checkpoint is written, as at the end of every run.
  rcfg = loop.RunConfig(steps=steps, checkpoint_every=steps + 1, log_every=log_every,
                        n_data=1, n_model=1, progress=False)
  rng = np.random.default_rng(0)
  host_batches = [rng.standard_normal((b, d), dtype=np.float32) for _ in range(N_BATCHES)]
  mesh = sharding.make_mesh(1, 1)
  state = sharding.init_sharded_state(jax.random.key(1), cfg, tcfg, mesh)
  step = sharding.jit_sharded_step(cfg, tcfg, mesh, jax.eval_shape(lambda: state))
  path = "sparse" if sharding.uses_sparse_step(cfg, mesh) else "dense"
  device_batches = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in host_batches]
  timed_tokens = (steps - 1) * b
  bare, fit = [], []
  for r in range(repeats + 1):  # round 0 compiles the bare step and warms both up
    state, bare_seconds = time_bare(step, state, device_batches, steps)
    fit_times = time_fit(cfg, tcfg, rcfg, host_batches, counter)
    if r:
      bare.append(bare_seconds)
      fit.append(fit_times)
      print(f"  round {r}: bare {timed_tokens / bare_seconds:10.0f} tok/s  "
            f"fit {timed_tokens / fit_times['seconds']:10.0f} tok/s  "
            f"ratio {bare_seconds / fit_times['seconds']:.3f}  "
            f"(fit call {fit_times['call_seconds']:.2f} s, "
            f"{fit_times['compiles']} compilations)", flush=True)
  fit_seconds = [t["seconds"] for t in fit]
  to_last = [t["seconds_to_last_step"] for t in fit]
  ratio = statistics.median(bs / fs for bs, fs in zip(bare, fit_seconds))
  ratio_to_last = statistics.median(bs / fs for bs, fs in zip(bare, to_last))
  result = {
      "shape": {"B": b, "d": d, "F": f, "k": k, "allocation": allocation,
                "dtype": "float32"},
      "path": path,
      "steps_per_round": steps,
      "timed_steps_per_round": steps - 1,
      "log_every": log_every,
      "fit_vs_bare_step": ratio,
      "fit_vs_bare_step_to_last_step": ratio_to_last,
      "fit_tokens_per_s": statistics.median(timed_tokens / s for s in fit_seconds),
      "bare_tokens_per_s": statistics.median(timed_tokens / s for s in bare),
      "median_seconds": {"bare": statistics.median(bare), "fit": statistics.median(fit_seconds),
                         "fit_to_last_step": statistics.median(to_last),
                         "fit_call": statistics.median(t["call_seconds"] for t in fit)},
      "all_seconds": {"bare": bare, "fit": fit_seconds, "fit_to_last_step": to_last,
                      "fit_call": [t["call_seconds"] for t in fit]},
      "fit_compiles_per_call": [t["compiles"] for t in fit],
  }
  print(f"  {KEYS[name]} = {ratio:.3f} (fit {result['fit_tokens_per_s']:.0f} tok/s, "
        f"bare {result['bare_tokens_per_s']:.0f} tok/s; without the wait for the final "
        f"checkpoint {ratio_to_last:.3f})", flush=True)
  return result


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  parser.add_argument("--allocation", default="topk", choices=model.ALLOCATIONS)
  parser.add_argument("--steps", type=int, default=None,
                      help="steps per round at the big shape (default 20)")
  parser.add_argument("--small-steps", type=int, default=None,
                      help="steps per round at the small shape (default: RunConfig's "
                           "checkpoint_every, 500)")
  parser.add_argument("--log-every", type=int, default=LOG_EVERY,
                      help="fit's metrics interval (default: RunConfig's, 10)")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
  parser.add_argument("--quick", action="store_true", help="tiny shapes for a smoke run")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "fit_loop.json"))
  args = parser.parse_args(argv)
  shapes = dict(QUICK_SHAPES if args.quick else SHAPES)
  if args.quick:
    args.repeats = 2
  for name, steps in (("big", args.steps), ("small", args.small_steps)):
    if steps is not None:
      shapes[name] = shapes[name]._replace(steps=steps)
  for name in args.shapes:
    if shapes[name].steps < 2:
      raise ValueError(f"{name}: steps per round must be >= 2 (step 1 is not timed); got "
                       f"{shapes[name].steps}.")
  print(f"devices={jax.devices()} repeats={args.repeats} log_every={args.log_every}",
        flush=True)
  counter = CompileCounter()
  results, notes = {}, {}
  for name in args.shapes:
    results[name] = run_shape(name, shapes[name], args.allocation, args.repeats,
                              args.log_every, counter)
  for name in SHAPES:
    if name not in results:
      notes[KEYS[name]] = f"shape {name!r} not run (--shapes {' '.join(args.shapes)})"
  compiles = [c for res in results.values() for c in res["fit_compiles_per_call"]]
  recompiles = bool(compiles) and all(c > 0 for c in compiles)
  result = {
      "benchmark": "fit_loop",
      **{KEYS[name]: results[name]["fit_vs_bare_step"] if name in results else None
         for name in SHAPES},
      "fit_tokens_per_s": {name: res["fit_tokens_per_s"] for name, res in results.items()},
      "bare_tokens_per_s": {name: res["bare_tokens_per_s"] for name, res in results.items()},
      "ratio_definition": "fit_vs_bare_step (big shape) and fit_vs_bare_step_small: median "
                          "over interleaved rounds of (loop.fit tokens/s / bare-loop "
                          "tokens/s of the same round), both over steps 2..N of the round",
      "fit_recompiles_each_call": recompiles,
      "method": {
          "timing": "fit: from its on_step(1) callback, after blocking on every live array "
                    "so step 1 has finished, to fit returning; bare loop: from step 1 "
                    "finished (block_until_ready) to block_until_ready after step N. "
                    "Both count tokens of steps 2..N only. Used because fit builds a new "
                    "jitted step each call and compiles it again (fit_compiles_per_call "
                    "counts XLA compilations during each timed call; the call's set-up "
                    "and compilation fall before the window, fit_call seconds include "
                    "them).",
          "final_checkpoint_included": True,
          "final_checkpoint": "the fit window ends when fit returns, after the final "
                              "checkpoint is on disk (checkpoint_every > steps, so it is the "
                              "only one); fit_vs_bare_step_to_last_step per shape stops at "
                              "on_step(N) instead: metrics fetched and the save started "
                              "(state copied off the device) but not waited for",
          "bare_loop": "sharding.jit_sharded_step(cfg, tcfg, make_mesh(1, 1), ...), the "
                       f"step fit builds, over {N_BATCHES} distinct batches placed on the "
                       "device beforehand with batch_sharding(mesh), fed in turn, "
                       "synchronised only at the end",
          "fit_run": f"loop.fit on a fresh temporary run folder per round (under "
                     f"{tempfile.gettempdir()}) with RunConfig(steps=N, "
                     "checkpoint_every=N + 1, log_every, n_data=1, n_model=1, "
                     f"progress=False) over the same {N_BATCHES} batches pre-generated as "
                     "numpy arrays; round 0 (untimed) warms up both",
          "prefetch_head_start": "fit's prefetch thread fills its queue while fit compiles, "
                                 "so the window opens with RunConfig.prefetch batches "
                                 "already placed, as in a loop whose reader keeps up",
      },
      "shapes": results,
      "repeats": args.repeats,
      "quick": args.quick,
      "notes": notes,
      "environment": {"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
                      "XLA_FLAGS": os.environ.get("XLA_FLAGS")},
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": os.cpu_count(), "jax": jax.__version__,
                  "backend": jax.default_backend(),
                  "devices": [str(dv) for dv in jax.devices()],
                  "load_average": list(os.getloadavg())},
  }
  output.write_result(result, args.out)
  return result


if __name__ == "__main__":
  main()

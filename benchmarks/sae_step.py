"""SAE training step vs the encoder matmul, timed in one run.

Prints the median time of the encoder forward matmul ``[B, d] x [d, F]``, of the dense
reference step (:func:`sae_jax.train.train_step`) and of the sparse step
(:func:`sae_jax.fast_step.fast_train_step`) for TopK, Mutual Choice and Feature Choice,
each as a ratio to the matmul of the same run, plus the peak memory of each sparse step
against the bytes of parameters + Adam state + one batch.

Peak memory is XLA's static buffer assignment of the compiled step
(``compiled.memory_analysis()``): argument + output - aliased (donated state) + temp
bytes, i.e. everything live at once during the step.

Run:
  python -m benchmarks.sae_step            # B=4096, d=768, F=32768, k=32, float32
  python -m benchmarks.sae_step --quick    # small shapes, a smoke run

Writes ``benchmarks/results/sae_step.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sae_jax import fast_step
from sae_jax import model
from sae_jax import train

ALLOCATIONS = {"topk": "topk", "mc": "mutual_choice", "fc": "feature_choice"}


def _nbytes(tree) -> int:
  return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def peak_memory(compiled) -> dict:
  stats = compiled.memory_analysis()
  if stats is None:
    return {"peak_bytes": None}
  peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
          - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  return {"peak_bytes": int(peak), "argument_bytes": int(stats.argument_size_in_bytes),
          "output_bytes": int(stats.output_size_in_bytes),
          "alias_bytes": int(stats.alias_size_in_bytes),
          "temp_bytes": int(stats.temp_size_in_bytes)}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--d-model", type=int, default=768)
  parser.add_argument("--features", type=int, default=32768)
  parser.add_argument("--k", type=int, default=32)
  parser.add_argument("--chunk-tokens", type=int, default=fast_step.DEFAULT_CHUNK_TOKENS)
  parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
  parser.add_argument("--skip-dense", action="store_true",
                      help="do not time the dense reference step")
  parser.add_argument("--quick", action="store_true", help="small shapes for a smoke run")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "sae_step.json"))
  args = parser.parse_args(argv)
  if args.quick:
    args.tokens, args.d_model, args.features, args.k, args.repeats = 256, 64, 1024, 8, 3
    args.chunk_tokens = 64
  b, d, f, k = args.tokens, args.d_model, args.features, args.k
  print(f"B={b} d={d} F={f} k={k} chunk={args.chunk_tokens} devices={jax.devices()}",
        flush=True)

  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (b, d), jnp.float32)
  w = jax.random.normal(kw, (d, f), jnp.float32) / np.sqrt(d)
  tcfg = train.TrainConfig(learning_rate=1e-4, warmup_steps=10, total_steps=1000)
  memory, notes = {}, {}
  # Every program is compiled and warmed up first, then timed in interleaved rounds, so
  # drift in the machine's speed hits them all alike.
  programs = {"matmul": (jax.jit(jnp.matmul), (x, w), False)}
  for short, alloc in ALLOCATIONS.items():
    cfg = model.SAEConfig(d_model=d, d_sae=f, allocation=alloc, k=k)
    fast = jax.jit(lambda s, v, cfg=cfg: fast_step.fast_train_step(
        s, v, cfg, tcfg, chunk_tokens=args.chunk_tokens), donate_argnums=(0,))
    state = train.init_train_state(jax.random.key(1), cfg, tcfg)
    # One compilation serves the memory analysis and the timing.
    fast = fast.lower(state, x).compile()
    memory[short] = peak_memory(fast)
    memory[short]["state_bytes"] = _nbytes((state.params, state.opt_state)) + _nbytes(x)
    programs[f"{short}_fast"] = (fast, [state, x], True)
    if not args.skip_dense:
      dense = jax.jit(lambda s, v, cfg=cfg: train.train_step(s, v, cfg, tcfg),
                      donate_argnums=(0,))
      programs[f"{short}_dense"] = (
          dense, [train.init_train_state(jax.random.key(1), cfg, tcfg), x], True)
  times = {name: [] for name in programs}
  for r in range(args.repeats + 1):  # round 0 compiles and warms up
    for name, (fn, fargs, threads_state) in programs.items():
      # Within a round each program runs twice back to back and the second call is
      # timed: a training loop calls its step back to back, and the first call after
      # another program pays for that program's cache and page state.
      for call in range(2):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*fargs))
        if threads_state:
          fargs[0] = out[0]
      if r:
        times[name].append(time.perf_counter() - t0)
    if r:
      print(f"round {r}: " + " ".join(f"{n}={t[-1]:.3f}s" for n, t in times.items()),
            flush=True)
  seconds = {name: statistics.median(t) for name, t in times.items()}
  round_ratios = {name: statistics.median(a / m for a, m in zip(t, times["matmul"]))
                  for name, t in times.items()}
  for name, t in seconds.items():
    print(f"{name:<22} {t:9.4f} s  {t / seconds['matmul']:6.3f} x matmul (median of "
          f"round ratios {round_ratios[name]:.3f})", flush=True)
  ratios = {name: t / seconds["matmul"] for name, t in seconds.items()}
  mem_ratios = {}
  for short, mem in memory.items():
    if mem.get("peak_bytes") is None:
      mem_ratios[short] = None
      notes[f"{short}_step_peak_mem_vs_state"] = ("compiled.memory_analysis() returned no "
                                                  "statistics")
      continue
    mem_ratios[short] = mem["peak_bytes"] / mem["state_bytes"]
    print(f"{short} step peak memory {mem['peak_bytes'] / 2**20:.1f} MiB = "
          f"{mem_ratios[short]:.3f} x (params + Adam state + batch = "
          f"{mem['state_bytes'] / 2**20:.1f} MiB); temp {mem['temp_bytes'] / 2**20:.1f} MiB",
          flush=True)
  mem_ratio = mem_ratios["topk"]
  if mem_ratio is None:
    notes["step_peak_mem_vs_state"] = notes["topk_step_peak_mem_vs_state"]
  result = {
      "benchmark": "sae_step",
      "shape": {"B": b, "d": d, "F": f, "k": k, "chunk_tokens": args.chunk_tokens,
                "dtype": "float32"},
      "topk_step_vs_matmul": round_ratios["topk_fast"],
      "mc_step_vs_matmul": round_ratios["mc_fast"],
      "fc_step_vs_matmul": round_ratios["fc_fast"],
      "step_peak_mem_vs_state": mem_ratio,
      "mc_step_peak_mem_vs_state": mem_ratios["mc"],
      "fc_step_peak_mem_vs_state": mem_ratios["fc"],
      "median_seconds": seconds,
      "all_seconds": times,
      "ratio_to_matmul": ratios,
      "median_of_round_ratios": round_ratios,
      "ratio_definition": "headline *_step_vs_matmul: median over interleaved rounds of "
                          "(step time / encoder matmul time of the same round)",
      "memory": memory,
      "memory_method": "compiled.memory_analysis(): argument + output - alias + temp bytes "
                       "of each jitted fast step with the state donated; the headline "
                       "step_peak_mem_vs_state is the TopK step's",
      "repeats": args.repeats,
      "notes": notes,
      "environment": {"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
                      "XLA_FLAGS": os.environ.get("XLA_FLAGS")},
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": os.cpu_count(), "jax": jax.__version__,
                  "backend": jax.default_backend(),
                  "devices": [str(dv) for dv in jax.devices()]},
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as fh:
    json.dump(result, fh, indent=2)
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()

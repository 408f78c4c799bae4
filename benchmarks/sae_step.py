"""SAE training step vs the encoder matmul, timed in one run.

Prints the median time of the encoder forward matmul ``[B, d] x [d, F]`` and of the
training step of every configuration users run, each as a ratio to the matmul of the
same run: TopK, Mutual Choice, Feature Choice (uniform and Zipf), TopK + aux_k and Mutual
Choice + aux_zipf. Steps are built by :func:`sae_jax.training.sharding.jit_sharded_step` on a
one-device mesh, the path ``training.fit`` calls, so a configuration that falls back to
the dense step shows up as such (``paths`` in the JSON). With ``--dense`` the dense
reference step (:func:`sae_jax.training.dense_step.train_step`) is timed too. Peak memory
of each step is compared with the bytes of parameters + Adam state + one batch.

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
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import output
from sae_jax import model
from sae_jax.training import selection
from sae_jax.training import sharding
from sae_jax.training import train_state

# Short name -> (allocation, auxiliary loss).
CONFIGS = {"topk": ("topk", "none"), "mc": ("mutual_choice", "none"),
           "fc": ("feature_choice", "none"), "fc_zipf": ("feature_choice_zipf", "none"),
           "topk_aux_k": ("topk", "aux_k"), "mc_aux_zipf": ("mutual_choice", "aux_zipf")}


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
  parser.add_argument("--chunk-tokens", type=int, default=selection.DEFAULT_CHUNK_TOKENS)
  parser.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
  parser.add_argument("--dense", action="store_true",
                      help="also time the dense reference step of every configuration")
  parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                      help="parameters, activations and the matmul in this dtype")
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

  dtype = DTYPES[args.dtype]
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (b, d), jnp.float32).astype(dtype)
  w = (jax.random.normal(kw, (d, f), jnp.float32) / np.sqrt(d)).astype(dtype)
  memory, notes, paths = {}, {}, {}
  mesh = sharding.make_mesh(1, 1)
  # Every program is compiled and warmed up first, then timed in interleaved rounds, so
  # drift in the machine's speed hits them all alike.
  programs = {"matmul": (jax.jit(jnp.matmul), (x, w), False)}
  for short in args.configs:
    alloc, aux = CONFIGS[short]
    cfg = model.SAEConfig(d_model=d, d_sae=f, allocation=alloc, k=k, dtype=dtype,
                          param_dtype=dtype)
    tcfg = train_state.TrainConfig(learning_rate=1e-4, warmup_steps=10, total_steps=1000,
                                   aux_loss=aux)
    state = sharding.init_sharded_state(jax.random.key(1), cfg, tcfg, mesh)
    step = sharding.jit_sharded_step(cfg, tcfg, mesh, jax.eval_shape(lambda: state))
    paths[short] = "sparse" if sharding.uses_sparse_step(cfg, mesh) else "dense"
    # One compilation serves the memory analysis and the timing.
    step = step.lower(state, x).compile()
    memory[short] = peak_memory(step)
    memory[short]["state_bytes"] = _nbytes((state.params, state.opt_state)) + _nbytes(x)
    programs[short] = (step, [state, x], True)
    if args.dense:
      dense = sharding.jit_sharded_step(cfg, tcfg, mesh, jax.eval_shape(lambda: state),
                                        sparse=False)
      programs[f"{short}_dense"] = (
          dense, [sharding.init_sharded_state(jax.random.key(1), cfg, tcfg, mesh), x], True)
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
  mem_ratio = mem_ratios.get("topk")
  if mem_ratio is None and "topk_step_peak_mem_vs_state" in notes:
    notes["step_peak_mem_vs_state"] = notes["topk_step_peak_mem_vs_state"]
  result = {
      "benchmark": "sae_step",
      "shape": {"B": b, "d": d, "F": f, "k": k, "chunk_tokens": args.chunk_tokens,
                "dtype": args.dtype},
      **{f"{short}_step_vs_matmul": round_ratios[short] for short in args.configs},
      "step_peak_mem_vs_state": mem_ratio,
      **{f"{short}_step_peak_mem_vs_state": mem_ratios[short] for short in args.configs
         if short != "topk"},
      "paths": paths,
      "median_seconds": seconds,
      "all_seconds": times,
      "ratio_to_matmul": ratios,
      "median_of_round_ratios": round_ratios,
      "ratio_definition": "headline *_step_vs_matmul: median over interleaved rounds of "
                          "(step time / encoder matmul time of the same round)",
      "memory": memory,
      "memory_method": "compiled.memory_analysis(): argument + output - alias + temp bytes "
                       "of each jitted step (jit_sharded_step, one device) with the state "
                       "donated; the headline step_peak_mem_vs_state is the TopK step's",
      "repeats": args.repeats,
      "notes": notes,
      "environment": {"GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
                      "XLA_FLAGS": os.environ.get("XLA_FLAGS")},
      "machine": output.machine(),
  }
  output.write_result(result, args.out)
  return result


if __name__ == "__main__":
  main()

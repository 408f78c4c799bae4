"""TopK + aux_k step time by number of dead features: the auxiliary loss's top-k tiers.

The sparse step takes each token's top ``k_aux // 8`` auxiliary entries when at most that
many features are candidates (``sae_jax.training.objective.aux_k_tiers``) and the full
top-``k_aux`` otherwise. This times the step ``jit_sharded_step`` builds on one device (the
path ``fit`` takes) at B=4096, d=768, F=32768, k=32, k_aux=384 with 0, 40 (top-48) and 400
(top-384) dead features, as ratios to the encoder matmul of the same round, median over
interleaved rounds. The dead counters are reset after every call so each program stays on
its branch.

Run:
  python -m benchmarks.aux_tiers            # 5 timed rounds
  python -m benchmarks.aux_tiers --quick    # small shapes, a smoke run

Writes ``benchmarks/results/aux_tiers.json`` (or ``--out``).
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
from sae_jax.training import objective
from sae_jax.training import sharding
from sae_jax.training import train_state

NEVER = 10**9  # dead_after_tokens: only the counters set here make a feature dead


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds")
  parser.add_argument("--quick", action="store_true", help="small shapes, a smoke run")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "aux_tiers.json"))
  args = parser.parse_args(argv)
  b, d, f, k, dead = 4096, 768, 32768, 32, (0, 40, 400)
  if args.quick:
    b, d, f, k, dead, args.repeats = 256, 64, 1024, 8, (0, 3, 30), 2
  cfg = model.SAEConfig(d_model=d, d_sae=f, allocation="topk", k=k)
  tcfg = train_state.TrainConfig(learning_rate=1e-4, warmup_steps=10, total_steps=1000,
                                 aux_loss="aux_k", dead_after_tokens=NEVER)
  tiers = objective.aux_k_tiers(cfg, tcfg)
  mesh = sharding.make_mesh(1, 1)
  x = jax.random.normal(jax.random.key(0), (b, d), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (d, f), jnp.float32) / np.sqrt(d)

  def with_dead(state, n):
    counters = jnp.where(jnp.arange(f) < n, 2 * NEVER, 0).astype(jnp.int32)
    return state._replace(usage=state.usage._replace(tokens_since_fired=counters))

  init = sharding.init_sharded_state(jax.random.key(1), cfg, tcfg, mesh)
  step = sharding.jit_sharded_step(cfg, tcfg, mesh, jax.eval_shape(lambda: init))
  matmul = jax.jit(jnp.matmul)
  states = {n: with_dead(sharding.init_sharded_state(jax.random.key(1), cfg, tcfg, mesh), n)
            for n in dead}
  names = ["matmul"] + [f"dead{n}" for n in dead]
  times = {name: [] for name in names}
  for r in range(args.repeats + 1):  # round 0 compiles and warms up
    for name in names:
      for _ in range(2):  # the second, back-to-back call is timed
        t0 = time.perf_counter()
        if name == "matmul":
          jax.block_until_ready(matmul(x, w))
        else:
          n = int(name[4:])
          new, _ = step(states[n], x)
          jax.block_until_ready(new)
          states[n] = with_dead(new, n)
        elapsed = time.perf_counter() - t0
      if r:
        times[name].append(elapsed)
  ratios = {name: statistics.median(a / m for a, m in zip(times[name], times["matmul"]))
            for name in names}
  for n in dead:
    n_tier = next((t for t in tiers if n <= t), tiers[-1]) if n else None
    print(f"{n:>5} dead (top-{n_tier or '-'} per token): "
          f"{statistics.median(times[f'dead{n}']):.3f} s = {ratios[f'dead{n}']:.2f} x matmul",
          flush=True)
  result = {
      "benchmark": "aux_tiers",
      "shape": {"B": b, "d": d, "F": f, "k": k, "k_aux": objective.k_aux(cfg, tcfg)},
      "tiers": list(tiers),
      "step_vs_matmul_by_dead": {str(n): ratios[f"dead{n}"] for n in dead},
      "median_seconds": {name: statistics.median(t) for name, t in times.items()},
      "all_seconds": times,
      "ratio_definition": "median over interleaved rounds of step time / encoder matmul time "
                          "of the same round",
      "repeats": args.repeats,
      "quick": args.quick,
      "machine": output.machine(),
  }
  output.write_result(result, args.out)
  return result


if __name__ == "__main__":
  main()

"""Allocation strategies vs the encoder matmul, timed in one run.

Prints, for B tokens, d model width, k active features and each F, the median time of
every allocation strategy and its ratio to the encoder matmul ``[B, d] x [d, F]`` and to
a plain per-row ``lax.top_k(scores, k)`` measured in the same run, and checks in the same
run that every fast path selects exactly what a plain ``lax.top_k`` selection does.

Feature Choice is timed twice: on the feature-major ``[F, B]`` scores that an encoder
emits by computing ``W_enc^T x^T`` (``*_fb``; that matmul is timed too, ``matmul_fb``)
and on token-major ``[B, F]`` scores, which includes a transpose.

Run:
  python -m benchmarks.allocation                   # B=4096, d=768, k=32, F in 4096,16384,32768
  python -m benchmarks.allocation --quick           # small shapes, a smoke run

Writes ``benchmarks/results/strategies.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import output
from sae_jax import allocation
from sae_jax import model


def median_time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def flat_mutual_choice(scores, n):
  b, f = scores.shape
  _, idx = lax.top_k(scores.reshape(-1), n)
  return jnp.zeros((b * f,), bool).at[idx].set(True).reshape(b, f)


def plain_topk_mask(scores, k):
  b, f = scores.shape
  _, idx = lax.top_k(scores, k)
  return jnp.zeros((b, f), bool).at[jnp.arange(b)[:, None], idx].set(True)


def plain_uniform_fc_fb(scores_FxB, m):
  f, b = scores_FxB.shape
  _, idx = lax.top_k(scores_FxB, m)
  return jnp.zeros((f, b), bool).at[jnp.arange(f)[:, None], idx].set(True)


def fc_consistent(scores_FxB, mask_FxB, capacity) -> bool:
  """Row counts equal the capacities and no dropped score beats a kept one."""
  counts_ok = (np.asarray(mask_FxB.sum(1)) == capacity).all()
  kept_min = jnp.where(mask_FxB, scores_FxB, jnp.inf).min(1)
  dropped_max = jnp.where(mask_FxB, -jnp.inf, scores_FxB).max(1)
  return bool(counts_ok and (kept_min >= dropped_max).all())


def bench_one(b: int, d: int, f: int, k: int, repeats: int, seed: int) -> dict:
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (b, d), jnp.float32)
  w = jax.random.normal(kw, (d, f), jnp.float32) / np.sqrt(d)
  scores = jax.block_until_ready(jax.jit(jnp.matmul)(x, w))
  matmul_fb = jax.jit(lambda x, w: w.T @ x.T)
  scores_fb = jax.block_until_ready(matmul_fb(x, w))
  n = allocation.mutual_choice_budget(b, k)
  # The capacities an SAE of this shape trains with (FC-Zipf's floored at one slot).
  caps = lambda rule: model.feature_capacities(
      model.SAEConfig(d_model=d, d_sae=f, allocation=rule, k=k), b)
  zipf, uniform = caps("feature_choice_zipf"), caps("feature_choice")
  cases = {
      "matmul": (jax.jit(jnp.matmul), (x, w)),
      "matmul_fb": (matmul_fb, (x, w)),
      "topk": (jax.jit(lambda s: allocation.topk(s, k)), (scores,)),
      # The plain per-row selection the fast paths are measured against.
      "lax_top_k_rows": (jax.jit(lambda s: lax.top_k(s, k)[1]), (scores,)),
      "mutual_choice": (jax.jit(lambda s: allocation.mutual_choice(s, k)), (scores,)),
      "mutual_choice_flat_top_k": (jax.jit(lambda s: flat_mutual_choice(s, n)), (scores,)),
      "feature_choice_uniform_fb": (
          jax.jit(lambda s: allocation.feature_choice_fb(s, uniform)), (scores_fb,)),
      "feature_choice_zipf_fb": (jax.jit(lambda s: allocation.feature_choice_fb(s, zipf)),
                                 (scores_fb,)),
      "feature_choice_uniform": (jax.jit(lambda s: allocation.feature_choice(s, uniform)),
                                 (scores,)),
      "feature_choice_zipf": (jax.jit(lambda s: allocation.feature_choice(s, zipf)), (scores,)),
      "feature_choice_uniform_fb_plain_top_k": (
          jax.jit(lambda s: plain_uniform_fc_fb(s, int(uniform.max()))), (scores_fb,)),
      "threshold": (jax.jit(lambda s: allocation.threshold(s, 1.5)), (scores,)),
  }
  times = {name: median_time(fn, *args, repeats=repeats) for name, (fn, args) in cases.items()}
  mc = np.asarray(cases["mutual_choice"][0](scores))
  flat = np.asarray(cases["mutual_choice_flat_top_k"][0](scores))
  fc = np.asarray(cases["feature_choice_uniform"][0](scores))
  fc_fb = cases["feature_choice_uniform_fb"][0](scores_fb)
  zipf_fb = cases["feature_choice_zipf_fb"][0](scores_fb)
  exact = {
      "topk": bool((cases["topk"][0](scores) == plain_topk_mask(scores, k)).all()),
      "mutual_choice": bool((mc == flat).all()),
      "feature_choice_uniform_fb": bool(
          (fc_fb == cases["feature_choice_uniform_fb_plain_top_k"][0](scores_fb)).all()),
      "feature_choice_uniform": bool((fc == np.asarray(fc_fb).T).all()),
      "feature_choice_zipf_fb_consistent": fc_consistent(scores_fb, zipf_fb, zipf),
  }
  return {
      "B": b, "d": d, "F": f, "k": k,
      "seconds": times,
      "ratio_to_matmul": {name: t / times["matmul"] for name, t in times.items()},
      "ratio_to_topk": {name: t / times["topk"] for name, t in times.items()},
      "ratio_to_lax_top_k_rows": {name: t / times["lax_top_k_rows"]
                                  for name, t in times.items()},
      "exact": exact,
      "mutual_choice_exact": exact["mutual_choice"],
      "mutual_choice_count": int(mc.sum()),
      "feature_choice_column_counts_exact": bool((fc.sum(0) == uniform).all()),
      "zipf_max_capacity": int(zipf.max()),
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--d-model", type=int, default=768)
  parser.add_argument("--k", type=int, default=32)
  parser.add_argument("--features", type=int, nargs="+", default=[4096, 16384, 32768])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="small shapes for a smoke run")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "strategies.json"))
  args = parser.parse_args(argv)
  if args.quick:
    args.tokens, args.d_model, args.k, args.features, args.repeats = 256, 64, 8, [1024], 2

  rows = []
  header = (f"{'F':>6} {'strategy':<26} {'median s':>9} {'x matmul':>9} {'x topk':>7} "
            f"{'x lax.top_k':>11}")
  print(f"B={args.tokens} d={args.d_model} k={args.k} devices={jax.devices()}")
  print(header)
  for f in args.features:
    row = bench_one(args.tokens, args.d_model, f, args.k, args.repeats, seed=0)
    rows.append(row)
    for name, t in row["seconds"].items():
      print(f"{f:>6} {name:<26} {t:>9.4f} {row['ratio_to_matmul'][name]:>9.3f} "
            f"{row['ratio_to_topk'][name]:>7.3f} {row['ratio_to_lax_top_k_rows'][name]:>11.3f}")
    print(f"{f:>6} exact vs plain lax.top_k selections: {row['exact']}")
  result = {
      "benchmark": "allocation",
      "machine": output.machine(),
      "repeats": args.repeats,
      "rows": rows,
  }
  output.write_result(result, args.out)
  return result


if __name__ == "__main__":
  main()

"""The allocation and SAE-step benchmarks on whatever device JAX sees, float32 and bfloat16.

Runs :mod:`benchmarks.allocation` (float32 scores) and :mod:`benchmarks.sae_step` in
float32 and in bfloat16, through the path ``training.fit`` takes (``jit_sharded_step`` on a
one-device mesh), and prints one table: configuration, dtype, which step ran (sparse or
the dense fallback), median step time, the ratio to the encoder matmul of the same run and
tokens/s. Each dtype's ratio is to the encoder matmul in that dtype. Every figure comes
from one process on one device; the device kind is in the
JSON and in the table's title.

On an accelerator it measures the paper's shape (B=4096, d=768, F=32768, k=32); on a CPU
it uses a small shape unless ``--full`` (the full shape takes many minutes on 2 cores).
Meant to finish in at most 5 minutes on a current GPU.

Run:
  make bench-device
  python -m benchmarks.device [--full] [--out benchmarks/results/device_<kind>.json]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time

import jax

from benchmarks import allocation
from benchmarks import output
from benchmarks import sae_step


def _slug(kind: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_") or "device"


def step_rows(result: dict, dtype: str) -> list[dict]:
  """One row per configuration of a :mod:`benchmarks.sae_step` result."""
  shape = result["shape"]
  matmul = result["median_seconds"]["matmul"]
  rows = []
  for name, path in result["paths"].items():
    seconds = result["median_seconds"][name]
    rows.append({"config": name, "dtype": dtype, "step": path, "seconds": seconds,
                 "x_matmul": result[f"{name}_step_vs_matmul"],
                 "matmul_seconds": matmul, "tokens_per_s": shape["B"] / seconds})
  return rows


def table(rows: list[dict], title: str) -> str:
  lines = [f"### {title}", "",
           "| configuration | dtype | step | median step | x encoder matmul | tokens/s |",
           "|---|---|---|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['config']} | {r['dtype']} | {r['step']} | {1e3 * r['seconds']:.2f} ms "
                 f"| {r['x_matmul']:.2f} | {r['tokens_per_s']:,.0f} |")
  return "\n".join(lines)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--full", action="store_true",
                      help="the paper's shape even on a CPU (slow there)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", help="JSON path (default: results/device_<device kind>.json)")
  args = parser.parse_args(argv)
  device = jax.devices()[0]
  accelerator = device.platform != "cpu"
  full = accelerator or args.full
  kind = device.device_kind
  out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                 f"device_{_slug(kind)}.json")
  scratch = tempfile.mkdtemp(prefix="bench_device_")
  shape = [] if full else ["--quick"]
  t0 = time.perf_counter()
  alloc = allocation.main(shape + ["--repeats", str(args.repeats), "--out",
                                   os.path.join(scratch, "allocation.json")])
  steps, rows = {}, []
  for dtype in ("float32", "bfloat16"):
    steps[dtype] = sae_step.main(shape + ["--dtype", dtype, "--repeats", str(args.repeats),
                                          "--out", os.path.join(scratch, f"sae_step_{dtype}.json")])
    rows += step_rows(steps[dtype], dtype)
  s = steps["float32"]["shape"]
  title = (f"{kind} ({jax.default_backend()}): B={s['B']}, d={s['d']}, F={s['F']}, "
           f"k={s['k']}")
  text = table(rows, title)
  print(text)
  bf16_topk = steps["bfloat16"].get("topk_step_vs_matmul")
  result = {"benchmark": "device", "device_kind": kind, "full_shape": full,
            "wall_seconds": time.perf_counter() - t0, "machine": output.machine(),
            "bf16_topk_step_vs_matmul": bf16_topk, "rows": rows, "table": text,
            "allocation": alloc, "sae_step": steps}
  output.write_result(result, out)
  shutil.rmtree(scratch, ignore_errors=True)
  return result


if __name__ == "__main__":
  main()

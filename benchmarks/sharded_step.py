"""Per-device FLOPs and peak memory of the sharded sparse step against the dense step.

Compiles (does not run) the step ``sharding.jit_sharded_step`` builds on a 2x4
("data" x "model") mesh of 8 simulated CPU devices at B=4096, d=768, F=32768, k=32, for
each allocation, and reads XLA's own figures for the per-device program:
``compiled.cost_analysis()["flops"]`` and ``compiled.memory_analysis()`` (arguments,
outputs and temporaries, aliased donated buffers counted once). The per-device state is
the bytes of this device's shards of the parameters, Adam state, usage statistics and
thresholds, plus its rows of the batch.

XLA's cost analysis counts the body of a loop once, whatever its trip count. The sparse
step's encoder runs in a loop over chunks of tokens, so its FLOPs are read from a
compile with one chunk per device (``chunk_tokens = B / n_data``), where the encoder
matmul sits outside any loop; what remains in loops (the sparse decode and gradient
kernels over blocks of triples, the in-place Adam over blocks of features, the
selection's bisections) is counted once per loop and is a few percent of the step's
work at this shape. Peak memory is read from the step as users run it (the default
chunk).

Run:
  python -m benchmarks.sharded_step [--out benchmarks/results/sharded_step.json]

The device count is set before JAX starts, so run it as its own process.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import output  # noqa: E402
from sae_jax import model  # noqa: E402
from sae_jax.training import sharding  # noqa: E402
from sae_jax.training import train_state  # noqa: E402

B, D, F, K = 4096, 768, 32768, 32
CONFIGS = {  # name: (allocation, aux loss)
    "topk": ("topk", "none"),
    "mc": ("mutual_choice", "none"),
    "fc": ("feature_choice", "none"),
    "fc_zipf": ("feature_choice_zipf", "none"),
    "topk_aux_k": ("topk", "aux_k"),
    "mc_aux_zipf": ("mutual_choice", "aux_zipf"),
}


def _device_bytes(tree) -> int:
  """Bytes one device holds of a sharded pytree of ShapeDtypeStructs with shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape)) * leaf.dtype.itemsize
  return total


def measure(name: str, mesh) -> dict:
  allocation, aux = CONFIGS[name]
  cfg = model.SAEConfig(d_model=D, d_sae=F, allocation=allocation, k=K)
  tcfg = train_state.TrainConfig(aux_loss=aux)
  shapes = jax.eval_shape(lambda: train_state.init_train_state(jax.random.key(0), cfg, tcfg))
  shardings = sharding.state_shardings(shapes, mesh)
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       shapes, shardings)
  x = jax.ShapeDtypeStruct((B, D), np.float32, sharding=sharding.batch_sharding(mesh))
  row = {"allocation": allocation, "aux_loss": aux}
  one_chunk = B // mesh.shape["data"]
  for label, sparse in (("sparse", None), ("dense", False)):
    compiled = sharding.jit_sharded_step(cfg, tcfg, mesh, shapes, sparse=sparse).lower(
        state, x).compile()
    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    row[f"{label}_peak_bytes"] = int(peak)
    if sparse is None:  # FLOPs from one chunk per device (see the module doc)
      compiled = sharding.jit_sharded_step(cfg, tcfg, mesh, shapes, sparse=sparse,
                                           chunk_tokens=one_chunk).lower(state, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    row[f"{label}_flops"] = float(cost["flops"])
  row["state_bytes"] = _device_bytes(state) + _device_bytes(x)
  row["sparse_vs_dense_flops"] = row["sparse_flops"] / row["dense_flops"]
  row["sparse_peak_mem_vs_state"] = row["sparse_peak_bytes"] / row["state_bytes"]
  row["dense_peak_mem_vs_state"] = row["dense_peak_bytes"] / row["state_bytes"]
  return row


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "sharded_step.json"))
  args = parser.parse_args(argv)
  mesh = sharding.make_mesh(2, 4)
  rows = {}
  for name in args.configs:
    rows[name] = measure(name, mesh)
    print(f"{name}: sparse/dense FLOPs {rows[name]['sparse_vs_dense_flops']:.3f}, "
          f"peak/state {rows[name]['sparse_peak_mem_vs_state']:.2f} "
          f"(dense {rows[name]['dense_peak_mem_vs_state']:.2f})", flush=True)
  result = {
      "mesh": "2x4 (data x model), 8 simulated CPU devices",
      "definitions": {
          "sharded_sparse_vs_dense_flops": "largest over the configurations of per-device "
                                           "FLOPs (XLA cost analysis, one chunk per device) "
                                           "of the sparse step / the dense step",
          "sharded_step_peak_mem_vs_state": "largest over the configurations of per-device "
                                            "peak bytes of the sparse step (XLA buffer "
                                            "assignment) / per-device bytes of params, Adam "
                                            "state, usage, thresholds and batch rows"},
      "shape": {"B": B, "d": D, "F": F, "k": K},
      "rows": rows,
      "sharded_sparse_vs_dense_flops": max(r["sparse_vs_dense_flops"] for r in rows.values()),
      "sharded_step_peak_mem_vs_state": max(r["sparse_peak_mem_vs_state"]
                                            for r in rows.values()),
      "machine": output.machine(),
  }
  output.write_result(result, args.out)
  return result


if __name__ == "__main__":
  main()

"""Runs every benchmark and collects the headline ratios into one ``bench.json``.

Run:
  python -m benchmarks.bench                  # run all benchmarks, then collect (make bench)
  python -m benchmarks.bench --collect-only   # only re-collect the existing result files

Each figure is a ratio measured inside one run of its own script (medians), read from
``benchmarks/results/<script>.json``. A figure that could not be measured is null, with
the reason under ``notes``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
RUNS = (  # (module, arguments)
    ("allocation", ["--features", "32768"]),
    ("pruning", []),
    ("sae_step", []),
    ("sae_step", ["--dtype", "bfloat16", "--configs", "topk", "--out",
                  str(pathlib.Path(__file__).resolve().parent / "results" / "sae_step_bf16.json")]),
    ("fit_loop", []),
    ("resnet_torch", []),
    ("lm_forward", []),
)
# Benchmarks that must start JAX themselves (8 simulated devices), each in its own process.
PROCESS_RUNS = (("sharded_step", []),)
# The SAE step once more in fresh processes with other glibc malloc settings. XLA:CPU
# allocates its temporaries on every call; with the default settings glibc maps these
# large buffers fresh each time and first-touch page faults cost the step up to 0.5 s
# at this size (steps then alternate between ~1.4 and ~1.9 s). "heap" keeps freed
# memory in the process for reuse; "thp" backs the heap with transparent huge pages.
_RESULT_DIR = pathlib.Path(__file__).resolve().parent / "results"
ENV_RUNS = {  # suffix: (environment, module, arguments)
    "heap": ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4294967296:"
                                "glibc.malloc.trim_threshold=4294967296"},
             "sae_step", ["--configs", "topk", "mc", "fc", "--out",
                          str(_RESULT_DIR / "sae_step_heap.json")]),
    "thp": ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
            "sae_step", ["--configs", "topk", "mc", "fc", "--out",
                         str(_RESULT_DIR / "sae_step_thp.json")]),
}


def _load(name: str, notes: dict) -> dict:
  path = RESULTS / f"{name}.json"
  if not path.exists():
    notes[name] = f"{path.name} missing: run python -m benchmarks.{name}"
    return {}
  return json.loads(path.read_text())


def collect() -> dict:
  notes: dict[str, str] = {}
  alloc, prune = _load("allocation", notes), _load("pruning", notes)
  step, torch = _load("sae_step", notes), _load("resnet_torch", notes)
  fit_loop = _load("fit_loop", notes)
  lm_fwd = _load("lm_forward", notes)
  sharded = _load("sharded_step", notes)
  step_bf16 = _load("sae_step_bf16", notes)
  env_steps = {suffix: _load(f"sae_step_{suffix}", notes) for suffix in ENV_RUNS}
  row = next((r for r in alloc.get("rows", []) if r.get("F") == 32768), None)
  ratios = (row or {}).get("ratio_to_lax_top_k_rows", {})
  if row is None and alloc:
    notes["allocation"] = "no F=32768 row in allocation.json"
  if torch and torch.get("resnet20_jax_vs_torch") is None:
    notes["resnet_torch"] = torch.get("torch_unavailable_reason") or "not measured"
  if step.get("notes"):
    notes["sae_step"] = step["notes"]
  if fit_loop.get("notes"):
    notes["fit_loop"] = fit_loop["notes"]
  dnr = prune.get("dnr_overhead")
  return {
      "mc_vs_topk": ratios.get("mutual_choice"),
      "fc_vs_topk": ratios.get("feature_choice_uniform_fb"),
      "fc_token_major_vs_topk": ratios.get("feature_choice_uniform"),
      "topk_step_vs_matmul": step.get("topk_step_vs_matmul"),
      "mc_step_vs_matmul": step.get("mc_step_vs_matmul"),
      "fc_step_vs_matmul": step.get("fc_step_vs_matmul"),
      "fc_zipf_step_vs_matmul": step.get("fc_zipf_step_vs_matmul"),
      "topk_aux_k_step_vs_matmul": step.get("topk_aux_k_step_vs_matmul"),
      "mc_aux_zipf_step_vs_matmul": step.get("mc_aux_zipf_step_vs_matmul"),
      "sae_step_paths": step.get("paths"),
      "step_peak_mem_vs_state": step.get("step_peak_mem_vs_state"),
      "mc_step_peak_mem_vs_state": step.get("mc_step_peak_mem_vs_state"),
      "fc_step_peak_mem_vs_state": step.get("fc_step_peak_mem_vs_state"),
      **{f"{a}_step_vs_matmul_{suffix}": res.get(f"{a}_step_vs_matmul")
         for suffix, res in env_steps.items() for a in ("topk", "mc", "fc")},
      "bf16_topk_step_vs_matmul": step_bf16.get("topk_step_vs_matmul"),
      "bf16_step_peak_mem_vs_state": step_bf16.get("step_peak_mem_vs_state"),
      "sharded_sparse_vs_dense_flops": sharded.get("sharded_sparse_vs_dense_flops"),
      "sharded_step_peak_mem_vs_state": sharded.get("sharded_step_peak_mem_vs_state"),
      "fit_vs_bare_step": fit_loop.get("fit_vs_bare_step"),
      "fit_vs_bare_step_small": fit_loop.get("fit_vs_bare_step_small"),
      "resnet20_jax_vs_torch": torch.get("resnet20_jax_vs_torch"),
      "gpt2_forward_jax_vs_torch": lm_fwd.get("gpt2_forward_jax_vs_torch"),
      "gpt2_harvest_jax_vs_torch": lm_fwd.get("gpt2_harvest_jax_vs_torch"),
      # The larger model's figure is the one a training step pays (LeNet steps are ~1 ms).
      "dnr_overhead": dnr.get("resnet20") if isinstance(dnr, dict) else dnr,
      "ap_overhead": prune.get("ap_overhead"),
      "definitions": {
          "mc_vs_topk": "exact mutual_choice time / per-row lax.top_k(k=32) time, B=4096, "
                        "F=32768 (allocation.json)",
          "fc_vs_topk": "exact uniform feature_choice_fb on the encoder's feature-major [F, B] "
                        "scores / per-row lax.top_k time (the [F, B] matmul costs no more "
                        "than the [B, F] one: allocation.json ratio_to_matmul.matmul_fb)",
          "fc_token_major_vs_topk": "the same from token-major [B, F] scores, transpose "
                                    "included",
          "*_step_vs_matmul": "time of the step jit_sharded_step builds on one device (the "
                              "path fit takes; sae_step_paths says sparse or dense) / "
                              "encoder forward matmul [B, d] x [d, F], median of "
                              "interleaved rounds (sae_step.json)",
          **{f"*_step_vs_matmul_{suffix}": f"the same in a process run with "
             f"{' '.join(f'{k}={v}' for k, v in env.items())} (sae_step_{suffix}.json)"
             for suffix, (env, _, _) in ENV_RUNS.items()},
          "step_peak_mem_vs_state": "peak bytes of the TopK sparse step (XLA buffer "
                                    "assignment) / bytes of params + Adam state + batch",
          "mc_/fc_step_peak_mem_vs_state": "the same for the Mutual / Feature Choice steps",
          "fit_vs_bare_step": "training.fit tokens/s / tokens/s of a bare loop over the same "
                              "jitted step with the batches already on the device, TopK, "
                              "B=4096, d=768, F=32768, k=32, steps 2..6 of each call, the "
                              "final checkpoint write included; median over interleaved "
                              "rounds (fit_loop.json)",
          "fit_vs_bare_step_small": "the same at B=512, d=384, F=1536, k=32 over steps "
                                    "2..200, where per-step host work in the loop shows",
          **sharded.get("definitions", {}),
          "bf16_topk_step_vs_matmul": "TopK step with bfloat16 parameters and encoder "
                                      "(float32 Adam and gradients) / the bfloat16 encoder "
                                      "matmul, same shape and path as *_step_vs_matmul "
                                      "(sae_step_bf16.json)",
          "bf16_step_peak_mem_vs_state": "its peak bytes / bytes of bfloat16 params + float32 "
                                         "Adam state + batch",
          "gpt2_forward_jax_vs_torch": "GPT-2-small forward to the logits, sae_jax.lm tokens/s / "
                                       "Hugging Face transformers (PyTorch CPU) tokens/s, "
                                       "same random weights, batch 8 x 128 (lm_forward.json)",
          "gpt2_harvest_jax_vs_torch": "the same, stopping at blocks.8.hook_resid_pre",
          "dnr_overhead": "ResNet-20 train step with DNR / without, minus 1 (pruning.json)",
          "ap_overhead": "AP selection / one reference training cycle (pruning.json)",
      },
      "notes": notes,
      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--collect-only", action="store_true")
  args = parser.parse_args(argv)
  t0 = time.time()
  if not args.collect_only:
    for module, module_args in RUNS:
      print(f"== benchmarks.{module} {' '.join(module_args)}", flush=True)
      importlib.import_module(f"benchmarks.{module}").main(module_args)
    for module, module_args in PROCESS_RUNS:
      print(f"== benchmarks.{module} {' '.join(module_args)} (own process)", flush=True)
      subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *module_args], check=True)
    for env, module, module_args in ENV_RUNS.values():
      print(f"== {' '.join(f'{k}={v}' for k, v in env.items())} benchmarks.{module} "
            f"{' '.join(module_args)}", flush=True)
      subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *module_args],
                     env={**os.environ, **env}, check=True)
  result = collect()
  if not args.collect_only:
    result["total_seconds"] = round(time.time() - t0, 1)
  RESULTS.mkdir(parents=True, exist_ok=True)
  (RESULTS / "bench.json").write_text(json.dumps(result, indent=2))
  print(json.dumps({k: v for k, v in result.items() if k != "definitions"}, indent=2))
  return result


if __name__ == "__main__":
  main()

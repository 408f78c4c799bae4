"""GPT-2-small forward tokens/s, ``sae_jax.lm`` (XLA) vs Hugging Face transformers (PyTorch).

Builds a randomly initialised GPT-2-small (d=768, 12 layers, 12 heads, vocab 50257, 1024
positions) with transformers, saves it with ``save_pretrained`` and loads that folder with
``sae_jax.lm.load_model``, so both sides run the same weights. Times one forward pass over
``[batch, context]`` token ids, interleaved round by round so load from other processes
hits both alike; PyTorch runs under ``torch.inference_mode`` with as many intra-op threads
as XLA:CPU uses. Measured in two forms:

* "logits": the full pass to the float32 logits (what CE-loss evaluation runs);
* "harvest": the pass up to ``blocks.8.hook_resid_pre`` only (what ``experiments.harvest``
  runs for the paper's layer-8 residual stream; PyTorch stops there via a forward hook
  that raises, the cheapest way to skip the later blocks).

The headline ``gpt2_forward_jax_vs_torch`` is the JAX tokens/s over PyTorch's for the
logits pass (above 1: JAX faster). Without torch/transformers the JAX side is timed alone
and the reason is recorded.

Run:
  python -m benchmarks.lm_forward                  # batch 8 x 128 tokens, 10 rounds
  python -m benchmarks.lm_forward --quick          # a 2-layer model, 3 rounds (smoke run)

Writes ``benchmarks/results/lm_forward.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import output
from sae_jax import lm

HOOK_LAYER = 8


def _torch_side(model_dir: str, threads: int, hook_layer: int):
  """(logits_fn, harvest_fn) over a numpy id array, or the reason torch is unavailable."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    return None, f"{type(err).__name__}: {err}"
  torch.set_num_threads(threads)
  model = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()

  class _Stop(Exception):
    pass

  def stop(_module, args):
    raise _Stop(args[0])

  def logits(ids):
    with torch.inference_mode():
      return model(torch.as_tensor(ids)).logits.numpy()

  def harvest(ids):
    handle = model.transformer.h[hook_layer].register_forward_pre_hook(stop)
    try:
      with torch.inference_mode():
        model(torch.as_tensor(ids))
    except _Stop as caught:
      return caught.args[0].numpy()
    finally:
      handle.remove()
    raise RuntimeError("the forward pre-hook did not fire")

  return (logits, harvest), f"torch {torch.__version__}, transformers {transformers.__version__}"


def _write_model(folder: str, layers: int) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(n_layer=layers)  # GPT-2-small defaults otherwise
  transformers.GPT2LMHeadModel(cfg).save_pretrained(folder, safe_serialization=True)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--context", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=10, help="interleaved timing rounds")
  parser.add_argument("--quick", action="store_true", help="2 layers, 3 rounds: a smoke run")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "lm_forward.json"))
  args = parser.parse_args(argv)
  layers = 2 if args.quick else 12
  hook_layer = min(HOOK_LAYER, layers - 1)
  repeats = 3 if args.quick else args.repeats
  threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  notes = {}
  with tempfile.TemporaryDirectory() as folder:
    try:
      _write_model(folder, layers)
    except ImportError as err:
      raise SystemExit(f"lm_forward: building the random GPT-2 needs torch and transformers "
                       f"(make setup-parity): {err}") from None
    cfg, params = lm.load_model(folder)
    torch_fns, torch_version = _torch_side(folder, threads, hook_layer)
  hook = f"blocks.{hook_layer}.hook_resid_pre"
  jax_logits = jax.jit(lambda p, i: lm.forward(p, cfg, i).logits)
  jax_harvest = jax.jit(lambda p, i: lm.forward(p, cfg, i, hooks=(hook,),
                                                return_logits=False).activations[hook])
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.context))
  ids_dev = jnp.asarray(ids, jnp.int32)
  programs = {"jax_logits": lambda: jax.block_until_ready(jax_logits(params, ids_dev)),
              "jax_harvest": lambda: jax.block_until_ready(jax_harvest(params, ids_dev))}
  if torch_fns is None:
    notes["torch_unavailable_reason"] = torch_version
  else:
    programs["torch_logits"] = lambda: torch_fns[0](ids)
    programs["torch_harvest"] = lambda: torch_fns[1](ids)
    # Same numbers on both sides before anything is timed.
    np.testing.assert_allclose(np.asarray(jax_logits(params, ids_dev)), torch_fns[0](ids),
                               atol=2e-3, rtol=0)
  times = {name: [] for name in programs}
  for r in range(repeats + 1):  # round 0 compiles and warms up
    for name, fn in programs.items():
      t0 = time.perf_counter()
      fn()
      if r:
        times[name].append(time.perf_counter() - t0)
  tokens = args.batch * args.context
  seconds = {name: statistics.median(t) for name, t in times.items()}
  tok_s = {name: tokens / s for name, s in seconds.items()}
  for name in programs:
    print(f"{name:<14} {seconds[name] * 1e3:9.1f} ms  {tok_s[name]:10.0f} tok/s", flush=True)
  ratios = {}
  if torch_fns is not None:
    for form in ("logits", "harvest"):
      ratios[form] = tok_s[f"jax_{form}"] / tok_s[f"torch_{form}"]
      print(f"{form}: JAX / PyTorch tokens/s = {ratios[form]:.2f}", flush=True)
  result = {
      "benchmark": "lm_forward",
      "model": f"GPT-2-small shape, {layers} layers, random weights",
      "shape": {"batch": args.batch, "context": args.context, "hook": hook},
      "gpt2_forward_jax_vs_torch": ratios.get("logits"),
      "gpt2_harvest_jax_vs_torch": ratios.get("harvest"),
      "tokens_per_s": tok_s,
      "median_seconds": seconds,
      "all_seconds": times,
      "threads": threads,
      "torch": torch_version,
      "repeats": repeats,
      "quick": args.quick,
      "notes": notes,
      "machine": output.machine(),
  }
  output.write_result(result, args.out)
  return result


if __name__ == "__main__":
  main()

"""ResNet-20 training-step time, JAX (XLA:CPU) vs PyTorch CPU, in one run.

Times one SGD step (forward, backward, momentum 0.9 + weight decay 5e-4 update, BatchNorm
in train mode) of the CIFAR ResNet-20 (widths 16/32/64, option-B 1x1 projection
shortcuts) on a [batch, 32, 32, 3] input, in JAX and in an equivalent PyTorch model
written here (parameter counts asserted equal). JAX and PyTorch steps are interleaved
round by round, so load from other processes hits both alike; PyTorch runs with as many
intra-op threads as JAX's CPU client uses (the cores this process may run on).

JAX variants: "jax_plain" (this file's step: the `pruning_jax.models.resnet20` model,
optax SGD, float input, jitted with a donated state) and, when `pruning_jax.train` is
importable, "jax_library" (its `train_step` with all-ones masks, no augmentation, no DNR
tracking, uint8 input normalised inside the step). PyTorch variants: "torch_nchw"
(default contiguous layout) and "torch_channels_last".

The headline ratio `resnet20_jax_vs_torch` is the JAX median (library step when present,
else the plain one) over the faster PyTorch median; every pairwise ratio is also written.

Run:
  python -m benchmarks.resnet_torch                 # batch 128, 20 timed rounds
  python -m benchmarks.resnet_torch --quick         # 10 timed rounds, 2 warm-up
  python -m benchmarks.resnet_torch --part forward  # or grad: forward (+ backward) only
  python -m benchmarks.resnet_torch --dtype bfloat16 --no-torch
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution \
      python -m benchmarks.resnet_torch

Writes ``benchmarks/results/resnet_torch.json`` (or ``--out``); see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pruning_jax.models import count_params, resnet20

PARTS = ("step", "forward", "grad")
DTYPES = ("float32", "bfloat16")
NUM_CLASSES = 10
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


def core_count() -> int:
  """Cores this process may run on: the size of XLA:CPU's intra-op thread pool."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def jax_plain(batch: int, part: str, dtype: str, seed: int):
  """(run, param_count): `run()` executes one jitted, synchronised `part` of a step."""
  model = resnet20(num_classes=NUM_CLASSES, rngs=nnx.Rngs(seed))
  n_params = count_params(model)
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  # Pure dicts: an nnx.State of Variables fed back into a jitted step cannot have its
  # BatchStats written from inside jax.grad (TraceContextError).
  params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
  tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))
  kx, _ = jax.random.split(jax.random.key(seed + 1))
  x_BxHxWxC = jax.random.normal(kx, (batch, 32, 32, 3), jnp.float32)
  labels_B = jnp.arange(batch) % NUM_CLASSES
  compute = jnp.dtype(dtype)

  def loss_fn(p, stats, x, y):
    if compute != jnp.float32:
      p, x = jax.tree.map(lambda a: a.astype(compute), (p, x))
    m = nnx.merge(graphdef, p, stats)
    logits = m(x, train=True).astype(jnp.float32)
    new_stats = jax.tree.map(lambda a: a.astype(jnp.float32),
                             nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats

  def step(state, x, y):
    p, stats, opt = state
    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, stats, x, y)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), stats, opt

  if part == "step":
    fn = jax.jit(step, donate_argnums=0)
    box = [(params, batch_stats, tx.init(params))]

    def run():
      box[0] = jax.block_until_ready(fn(box[0], x_BxHxWxC, labels_B))
  else:
    fn = jax.jit(loss_fn if part == "forward" else jax.value_and_grad(loss_fn, has_aux=True))

    def run():
      jax.block_until_ready(fn(params, batch_stats, x_BxHxWxC, labels_B))
  return run, n_params


def jax_library(batch: int, seed: int):
  """(run, param_count) for `pruning_jax.train.train_step`; None if not importable."""
  try:
    from pruning_jax import masks as masks_lib
    from pruning_jax import train
    from pruning_jax.models import activation_shapes
  except ImportError:
    return None
  model = resnet20(num_classes=NUM_CLASSES, rngs=nnx.Rngs(seed))
  config = train.TrainConfig(warmup_steps=0, decay_epochs=(), batch_size=batch,
                             augment=False)
  graphdef, params, batch_stats = train.split_model(model)
  masks = masks_lib.init_masks(params)
  optimizer = train.make_optimizer(config, masks)
  box = [train.init_train_state(params, batch_stats, masks, optimizer,
                                activation_shapes(model), jax.random.key(seed))]
  step_fn = train.make_train_step(graphdef, optimizer, train.learning_rate_schedule(config, 1),
                                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                                  track_dnr=False)
  fn = train.jit_train_step(step_fn, train.make_mesh(1))
  rng = np.random.default_rng(seed)
  data = {"image": jnp.asarray(rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)),
          "label": jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES}

  def run():
    box[0] = jax.block_until_ready(fn(box[0], data)[0])
  return run, count_params(model)


def torch_variants(batch: int, part: str, dtype: str, seed: int, threads: int):
  """({name: run}, param_count, version), or a reason string if torch is missing."""
  try:
    import torch
    from torch import nn
    import torch.nn.functional as F
  except ImportError as e:
    return f"torch not importable: {e}"
  torch.set_num_threads(threads)
  torch.manual_seed(seed)

  def conv_bn(cin, cout, k, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1))

  class Block(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.a, self.b = conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3, 1)
      reshapes = stride != 1 or cin != cout
      self.skip = conv_bn(cin, cout, 1, stride) if reshapes else nn.Identity()

    def forward(self, x):
      return F.relu(self.b(F.relu(self.a(x))) + self.skip(x))

  class ResNet20(nn.Module):

    def __init__(self):
      super().__init__()
      self.stem = conv_bn(3, 16, 3, 1)
      blocks, cin = [], 16
      for s, cout in enumerate((16, 32, 64)):
        for i in range(3):
          blocks.append(Block(cin, cout, 2 if s and not i else 1))
          cin = cout
      self.blocks = nn.Sequential(*blocks)
      self.head = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
      return self.head(self.blocks(F.relu(self.stem(x))).mean((2, 3)))

  rng = np.random.default_rng(seed)
  x_np = rng.normal(size=(batch, 3, 32, 32)).astype(np.float32)
  y = torch.arange(batch) % NUM_CLASSES
  autocast_on = dtype == "bfloat16"
  runs = {}
  for name, fmt in (("torch_nchw", torch.contiguous_format),
                    ("torch_channels_last", torch.channels_last)):
    net = ResNet20().train().to(memory_format=fmt)
    x = torch.from_numpy(x_np).contiguous(memory_format=fmt)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM,
                          weight_decay=WEIGHT_DECAY)

    def run(net=net, x=x, opt=opt):
      with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_on):
        if part == "forward":
          with torch.no_grad():
            F.cross_entropy(net(x).float(), y)
          return
        loss = F.cross_entropy(net(x).float(), y)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      if part == "step":
        opt.step()
    runs[name] = run
  return runs, sum(p.numel() for p in net.parameters()), torch.__version__


def interleaved_medians(runs: dict, warmup: int, rounds: int) -> dict[str, list[float]]:
  """Seconds of every round for each run, the runs alternating within each round."""
  for run in runs.values():
    for _ in range(warmup):
      run()
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      t0 = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t0)
  return times


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="10 rounds, 2 warm-up")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--part", choices=PARTS, default="step")
  parser.add_argument("--dtype", choices=DTYPES, default="float32")
  parser.add_argument("--rounds", type=int, default=None, help="timed rounds (>= 10)")
  parser.add_argument("--no-torch", action="store_true", help="time JAX only")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="benchmarks/results/resnet_torch.json")
  args = parser.parse_args(argv)
  rounds = args.rounds if args.rounds is not None else (10 if args.quick else 20)
  warmup = 2 if args.quick else 3
  if rounds < 10:
    raise ValueError(f"--rounds must be >= 10 for a stable median, got {rounds}")
  if args.batch < 1:
    raise ValueError(f"--batch must be >= 1, got {args.batch}")

  threads = core_count()
  runs, jax_params = {}, None
  library = None
  if args.part == "step" and args.dtype == "float32":
    library = jax_library(args.batch, args.seed)
  if library is not None:
    runs["jax_library"], jax_params = library
  runs["jax_plain"], jax_params = jax_plain(args.batch, args.part, args.dtype, args.seed)
  torch_reason, torch_version = None, None
  if args.no_torch:
    torch_reason = "--no-torch"
  else:
    found = torch_variants(args.batch, args.part, args.dtype, args.seed, threads)
    if isinstance(found, str):
      torch_reason = found
    else:
      torch_runs, torch_params, torch_version = found
      if torch_params != jax_params:
        raise AssertionError(f"parameter counts differ: jax {jax_params}, torch {torch_params}")
      runs.update(torch_runs)

  times = interleaved_medians(runs, warmup, rounds)
  medians = {name: statistics.median(t) for name, t in times.items()}
  jax_name = "jax_library" if "jax_library" in medians else "jax_plain"
  torch_names = [n for n in medians if n.startswith("torch")]
  ratio, ratios = None, {}
  if torch_names:
    best = min(torch_names, key=medians.get)
    ratio = medians[jax_name] / medians[best]
    for j in (n for n in medians if n.startswith("jax")):
      for t in torch_names:
        # Per-round ratios share the same background load, so their median is steadier.
        per_round = [a / b for a, b in zip(times[j], times[t])]
        ratios[f"{j}_vs_{t}"] = {"ratio_of_medians": medians[j] / medians[t],
                                 "median_of_round_ratios": statistics.median(per_round)}
  result = {
      "benchmark": "resnet_torch",
      "config": {"batch": args.batch, "part": args.part, "dtype": args.dtype,
                 "rounds": rounds, "warmup": warmup, "threads": threads,
                 "xla_flags": os.environ.get("XLA_FLAGS", "")},
      "resnet20_jax_vs_torch": ratio,
      "ratio_definition": (f"{jax_name} median / {min(torch_names, key=medians.get)} median"
                           if torch_names else None),
      "torch_unavailable_reason": torch_reason,
      "param_count": jax_params,
      "median_seconds": medians,
      "all_seconds": times,
      "ratios": ratios,
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": os.cpu_count(), "cores_used": threads,
                  "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                  "jax": jax.__version__, "torch": torch_version,
                  "backend": jax.default_backend()},
  }
  print(f"batch={args.batch} part={args.part} dtype={args.dtype} rounds={rounds} "
        f"threads={threads} XLA_FLAGS={result['config']['xla_flags']!r}")
  for name, t in medians.items():
    print(f"  {name:22s} median {t * 1e3:9.1f} ms")
  print(f"resnet20_jax_vs_torch = {ratio if ratio is None else round(ratio, 3)}"
        + (f"  ({result['ratio_definition']})" if ratio is not None else f"  ({torch_reason})"))
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()

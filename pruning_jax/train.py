"""Jitted training and evaluation steps for pruning experiments.

`TrainState` is a graphdef-free pytree: NNX parameters and BatchNorm statistics
(`nnx.State`), the masked optimizer state (masks inside, `pruning_jax.optim`), running
DNR statistics, epoch totals, the step and a PRNG key. `train_step` merges the model at
the jit boundary, trains with `return_activations=True` and accumulates the dynamic dead
neuron rate from that same forward pass. The learning rate is a function of the traced
`state.step`, so schedules never recompile and rewinding to step t resumes the schedule
at t. `jit_train_step` jits once per batch shape with explicit shardings: the batch over
the "data" mesh axis, everything else replicated.
"""

import dataclasses
import functools
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, UInt8
import numpy as np
import optax

from pruning_jax import dnr as dnr_lib
from pruning_jax import masks as masks_lib
from pruning_jax import optim
from pruning_jax import pipeline
import runkit

OPTIMIZERS = ("sgd", "adam")
DATA = "data"

# Frankle & Carbin (2019, arXiv 1803.03635, figure 2) train these with Adam.
LOTTERY_ADAM_LR = {"lenet300100": 1.2e-3, "conv2": 2e-4, "conv4": 3e-4, "conv6": 3e-4}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation settings of one training run (one IMP cycle).

  The defaults are the AP reference setting for ResNet-20 on CIFAR-10: SGD with
  momentum 0.9 and weight decay 5e-4, batch 64, 50 epochs, the learning rate rising
  linearly to 0.1 over 20000 steps, then 0.01 from epoch 25 and 0.001 from epoch 32.

  Attributes:
    optimizer: "sgd" (heavy-ball momentum, PyTorch convention) or "adam".
    learning_rate: peak learning rate.
    momentum: SGD momentum (Adam keeps its default betas).
    weight_decay: L2 coefficient added to the gradient (PyTorch `weight_decay`).
    warmup_steps: linear warm-up length; 0 disables it.
    decay_epochs: epochs at which the rate is multiplied by `decay_factor` once more;
      once the first is passed, the warm-up no longer applies.
    decay_factor: multiplier per passed decay epoch, in (0, 1].
    epochs: epochs per training run.
    batch_size: samples per step.
    augment: random pad-and-crop and horizontal flip (`pipeline.augment`).
    pad: crop padding in pixels when augmenting.
    flip: random horizontal flip when augmenting.

  References:
    Liu, Ghosh, Tan & Motani, 2023, TMLR, arXiv 2212.06145 (AP reference setting).
  """

  optimizer: str = "sgd"
  learning_rate: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 5e-4
  warmup_steps: int = 20000
  decay_epochs: tuple[int, ...] = (25, 32)
  decay_factor: float = 0.1
  epochs: int = 50
  batch_size: int = 64
  augment: bool = True
  pad: int = 4
  flip: bool = True

  def __post_init__(self):
    object.__setattr__(self, "decay_epochs", tuple(self.decay_epochs))
    if self.optimizer not in OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}.")
    for name, ok, allowed in (("learning_rate", self.learning_rate > 0, "> 0"),
                              ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                              ("weight_decay", self.weight_decay >= 0, ">= 0"),
                              ("decay_factor", 0 < self.decay_factor <= 1, "in (0, 1]")):
      if not ok:
        raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}.")
    for name, low in (("warmup_steps", 0), ("pad", 0), ("epochs", 1), ("batch_size", 1)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    epochs = self.decay_epochs
    if any(not isinstance(e, int) or e < 1 for e in epochs) or list(epochs) != sorted(
        set(epochs)):
      raise ValueError(f"decay_epochs must be increasing ints >= 1, got {epochs!r}.")


def lottery_config(model_name: str, **overrides: Any) -> TrainConfig:
  """Frankle & Carbin's Adam setting for LeNet-300-100 and Conv-2/4/6 (batch 60).

  References:
    Frankle & Carbin, 2019, "The Lottery Ticket Hypothesis", arXiv 1803.03635.
  """
  if model_name not in LOTTERY_ADAM_LR:
    raise ValueError(f"model_name must be one of {sorted(LOTTERY_ADAM_LR)}, got {model_name!r}.")
  settings = dict(optimizer="adam", learning_rate=LOTTERY_ADAM_LR[model_name],
                  weight_decay=0.0, warmup_steps=0, decay_epochs=(), batch_size=60,
                  epochs=20, augment=False)
  settings.update(overrides)
  return TrainConfig(**settings)


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
  """`lr(step)`: linear warm-up, then step decays at `config.decay_epochs`.

  Before the first decay epoch, `lr = peak * min(1, (step + 1) / warmup_steps)` (the
  first step already moves); from the k-th decay epoch on, `peak * decay_factor**k`,
  as the AP reference code sets absolute rates. Jittable in a traced step.
  """
  if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or (
      steps_per_epoch < 1):
    raise ValueError(f"steps_per_epoch must be an int >= 1, got {steps_per_epoch!r}.")
  boundaries = np.asarray([e * steps_per_epoch for e in config.decay_epochs], np.int32)
  peak = np.float32(config.learning_rate)

  def schedule(step: Int[Array, ""]) -> Float[Array, ""]:
    step = jnp.asarray(step, jnp.int32)
    warm = jnp.minimum(1.0, (step + 1).astype(jnp.float32) / max(config.warmup_steps, 1))
    passed = jnp.sum(step >= boundaries) if boundaries.size else 0
    return jnp.where(passed > 0, peak * jnp.float32(config.decay_factor) ** passed,
                     peak * warm)

  return schedule


def make_optimizer(config: TrainConfig, masks: PyTree) -> optax.GradientTransformation:
  """The masked update direction, without the learning rate (applied in the step).

  SGD: weight decay added to the gradient, then a momentum trace (PyTorch's SGD).
  Adam: weight decay added to the gradient, then Adam's scaling.
  """
  parts = [optax.add_decayed_weights(config.weight_decay)] if config.weight_decay else []
  if config.optimizer == "sgd":
    parts.append(optax.trace(decay=config.momentum) if config.momentum else
                 optax.identity())
  else:
    parts.append(optax.scale_by_adam())
  return optim.masked_optimizer(optax.chain(*parts), masks)


class TrainState(NamedTuple):
  """Everything the train step reads and writes.

  Attributes:
    params: `nnx.State` of the model's `nnx.Param`s; pruned entries are 0.
    batch_stats: `nnx.State` of BatchNorm running statistics (empty without BN).
    opt_state: state of `make_optimizer`'s transformation, masks inside.
    dnr: running DNR statistics of the current epoch.
    totals: {"loss", "correct", "count"} float32 sums of the current epoch.
    step: int32 step of the learning-rate schedule.
    rng: PRNG key; step s augments with `fold_in(rng, s)`.
  """

  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState
  dnr: dnr_lib.DNRState
  totals: dict[str, Float[Array, ""]]
  step: Int[Array, ""]
  rng: PRNGKeyArray


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, params, batch_stats) of a model of `pruning_jax.models`."""
  return nnx.split(model, nnx.Param, nnx.BatchStat)


def _zero_totals() -> dict[str, Array]:
  return {k: jnp.zeros((), jnp.float32) for k in ("loss", "correct", "count")}


def init_train_state(params: PyTree, batch_stats: PyTree, masks: PyTree,
                     optimizer: optax.GradientTransformation,
                     act_shapes: dict[str, Any], rng: PRNGKeyArray,
                     step: int = 0) -> TrainState:
  """A fresh state: masked params, optimizer state holding `masks`, empty epoch stats.

  Args:
    params: model parameters (`split_model`).
    batch_stats: BatchNorm statistics (`split_model`).
    masks: masks for `params` (`masks.init_masks`).
    optimizer: from `make_optimizer`; its stored masks are replaced by `masks`.
    act_shapes: `pruning_jax.models.activation_shapes(model)`.
    rng: PRNG key of the run.
    step: schedule step to start at (the rewind step of a rewound cycle).
  """
  # The state owns fresh buffers: jitted steps donate it, and unpruned leaves would
  # otherwise alias the caller's arrays.
  params, batch_stats, masks = jax.tree.map(
      jnp.copy, (masks_lib.apply_masks(params, masks), batch_stats, masks))
  opt_state = optim.set_masks(optimizer.init(params), masks)
  return TrainState(params, batch_stats, opt_state, dnr_lib.dnr_init(act_shapes),
                    _zero_totals(), jnp.asarray(step, jnp.int32), rng)


def reset_epoch(state: TrainState) -> TrainState:
  """Starts a new epoch: zero DNR statistics and loss/accuracy totals."""
  return state._replace(dnr=jax.tree.map(jnp.zeros_like, state.dnr), totals=_zero_totals())


def train_step(state: TrainState, batch: dict[str, Array], *, graphdef: nnx.GraphDef,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule,
               mean: Float[Array, "c"], std: Float[Array, "c"], augment: bool = False,
               pad: int = 4, flip: bool = True, track_dnr: bool = True
               ) -> tuple[TrainState, dict[str, Float[Array, ""]]]:
  """One masked optimisation step on `batch` = {"image": uint8 [b, h, w, c], "label"}.

  Augments inside the step with `fold_in(state.rng, state.step)`, runs the model in
  train mode (BatchNorm on batch statistics, running statistics updated), takes the
  mean cross-entropy's gradient, applies the masked update scaled by
  `-schedule(state.step)`, and with `track_dnr` adds the batch's ReLU outputs to
  `state.dnr`. Pruned weights stay exactly 0: their updates are exactly 0.

  Returns:
    The new state and {"loss", "accuracy", "learning_rate"} of this batch.
  """
  if augment:
    x = pipeline.augment(jax.random.fold_in(state.rng, state.step), batch["image"],
                         mean=mean, std=std, pad=pad, flip=flip)
  else:
    x = pipeline.normalize(batch["image"], mean, std)
  labels = batch["label"]

  def loss_fn(params):
    # copy=True: the merged BatchNorm updates its statistics inside this trace, which
    # Variables shared with the enclosing trace would refuse.
    model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
    out = model(x, train=True, return_activations=track_dnr)
    logits, acts = out if track_dnr else (out, None)
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, acts, nnx.state(model, nnx.BatchStat))

  (loss, (logits, acts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  direction, opt_state = optimizer.update(grads, state.opt_state, state.params)
  lr = schedule(state.step)
  params = jax.tree.map(lambda p, u: p - lr * u, state.params, direction)
  correct = jnp.sum(jnp.argmax(logits, -1) == labels, dtype=jnp.float32)
  count = jnp.float32(labels.shape[0])
  totals = {"loss": state.totals["loss"] + loss * count,
            "correct": state.totals["correct"] + correct,
            "count": state.totals["count"] + count}
  dnr = dnr_lib.dnr_update(state.dnr, acts) if track_dnr else state.dnr
  new = TrainState(params, batch_stats, opt_state, dnr, totals, state.step + 1, state.rng)
  return new, {"loss": loss, "accuracy": correct / count, "learning_rate": lr}


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, *, mean, std, augment: bool = False,
                    pad: int = 4, flip: bool = True, track_dnr: bool = True):
  """`train_step` with everything but (state, batch) bound; pure, ready to jit/vmap."""
  return functools.partial(train_step, graphdef=graphdef, optimizer=optimizer,
                           schedule=schedule, mean=np.asarray(mean, np.float32),
                           std=np.asarray(std, np.float32), augment=augment, pad=pad,
                           flip=flip, track_dnr=track_dnr)


class EvalState(NamedTuple):
  """Running evaluation sums: DNR statistics and weighted loss/accuracy totals."""

  dnr: dnr_lib.DNRState
  totals: dict[str, Float[Array, ""]]


def init_eval_state(act_shapes: dict[str, Any]) -> EvalState:
  """Empty evaluation sums for a model with activations shaped like `act_shapes`."""
  return EvalState(dnr_lib.dnr_init(act_shapes), _zero_totals())


def eval_step(params: PyTree, batch_stats: PyTree, batch: dict[str, Array],
              acc: EvalState, *, graphdef: nnx.GraphDef, mean: Float[Array, "c"],
              std: Float[Array, "c"]) -> EvalState:
  """Adds one padded batch (`pipeline.eval_batches`) to the evaluation sums.

  Eval mode: BatchNorm uses its running statistics, no augmentation. Samples count
  with their "weight" (0 for padding) in the loss, accuracy and DNR.
  """
  model = nnx.merge(graphdef, params, batch_stats)
  logits, acts = model(pipeline.normalize(batch["image"], mean, std), train=False,
                       return_activations=True)
  w_B = batch["weight"].astype(jnp.float32)
  ce_B = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         batch["label"])
  hit_B = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  totals = {"loss": acc.totals["loss"] + jnp.sum(w_B * ce_B),
            "correct": acc.totals["correct"] + jnp.sum(w_B * hit_B),
            "count": acc.totals["count"] + jnp.sum(w_B)}
  return EvalState(dnr_lib.dnr_update(acc.dnr, acts, w_B), totals)


def make_eval_step(graphdef: nnx.GraphDef, *, mean, std):
  """`eval_step` with the graphdef and normalisation bound; pure, ready to jit/vmap."""
  return functools.partial(eval_step, graphdef=graphdef, mean=np.asarray(mean, np.float32),
                           std=np.asarray(std, np.float32))


def summarize(totals: dict[str, Array], dnr: dnr_lib.DNRState) -> dict[str, Array]:
  """{"loss", "accuracy", "count"} from totals plus every `dnr_summary` entry."""
  count = totals["count"]
  mean = lambda k: jnp.where(count > 0, totals[k] / jnp.where(count > 0, count, 1.0), jnp.nan)
  return {"loss": mean("loss"), "accuracy": mean("correct"), "count": count,
          **dnr_lib.dnr_summary(dnr)}


def evaluate(eval_fn, params: PyTree, batch_stats: PyTree,
             images: UInt8[np.ndarray, "n h w c"], labels: Int[np.ndarray, "n"], *,
             batch_size: int, act_shapes: dict[str, Any], mesh: Mesh) -> dict[str, float]:
  """`summarize` of a whole dataset through `jit_eval_step(eval_fn, mesh)`, as floats."""
  acc = jax.device_put(init_eval_state(act_shapes), replicated(mesh))
  for batch in pipeline.eval_batches(images, labels, batch_size):
    acc = eval_fn(params, batch_stats, batch, acc)
  return {k: float(v) for k, v in jax.device_get(summarize(acc.totals, acc.dnr)).items()}


def batch_statistics(params: PyTree, batch_stats: PyTree, images: UInt8[Array, "b h w c"],
                     *, graphdef: nnx.GraphDef, mean: Float[Array, "c"],
                     std: Float[Array, "c"]) -> PyTree:
  """BatchNorm statistics of one batch (its per-channel mean and variance).

  The model runs in train mode on running statistics of zero, so each BatchNorm
  stores (1 - momentum) times the batch statistic; dividing gives the statistic
  itself whatever the layer's momentum.
  """
  zeros = jax.tree.map(jnp.zeros_like, batch_stats)
  model = nnx.merge(graphdef, params, zeros, copy=True)
  model(pipeline.normalize(images, jnp.asarray(mean), jnp.asarray(std)), train=True)
  momenta = {}
  for path, module in nnx.iter_graph(model):
    if isinstance(module, nnx.BatchNorm):
      momenta[tuple(str(p) for p in path)] = module.momentum
  updated = nnx.state(model, nnx.BatchStat)

  def unscale(path, value):
    # Path: the module's keys, then "mean" or "var", then the Variable's ".value".
    names = tuple(str(p.key if isinstance(p, jax.tree_util.DictKey) else p.idx)
                  for p in path if not isinstance(p, jax.tree_util.GetAttrKey))
    return value / (1.0 - momenta[names[:-1]])

  return jax.tree_util.tree_map_with_path(unscale, updated)


def recalibrate_batch_stats(stats_fn, params: PyTree, batch_stats: PyTree,
                            images: UInt8[np.ndarray, "n h w c"], *, batch_size: int,
                            num_batches: int) -> PyTree:
  """BatchNorm running statistics replaced by their average over training batches.

  After pruning or training, the running averages lag the weights they normalise;
  re-estimating them from the current weights alone repairs part of the damage, a
  control for any method that claims to improve pruned BatchNorm networks. Uses the
  first `num_batches` batches of `batch_size` images, averaging per-batch means and
  variances with equal weight (PyTorch's cumulative recalibration).

  Args:
    stats_fn: `jax.jit(functools.partial(batch_statistics, graphdef=, mean=, std=))`.
    params, batch_stats: the trained model's parameters and running statistics.
    images: training images, uint8 [n, h, w, c].
    batch_size, num_batches: how many images enter the estimate.

  Returns:
    Statistics shaped like `batch_stats` (unchanged for models without BatchNorm).
  """
  if not jax.tree.leaves(batch_stats):
    return batch_stats
  count = min(num_batches, len(images) // batch_size)
  if count < 1:
    raise ValueError(f"recalibration needs at least one batch of batch_size={batch_size} "
                     f"images, got {len(images)}.")
  total = None
  for i in range(count):
    stats = stats_fn(params, batch_stats, jnp.asarray(images[i * batch_size:(i + 1) * batch_size]))
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
  return jax.tree.map(lambda t: t / count, total)


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D ("data",) mesh over the first `num_devices` devices (all by default).

  Built by `runkit.make_mesh`.

  Raises:
    ValueError: `num_devices` is not an int in [1, number of devices].
  """
  return runkit.make_mesh({DATA: num_devices}, labels={DATA: "num_devices"})


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of every state leaf: a full copy on each device."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of batch leaves: split along the batch axis over "data"."""
  if DATA not in mesh.axis_names:
    raise ValueError(f"mesh must have a {DATA!r} axis, got axes {mesh.axis_names}.")
  return NamedSharding(mesh, PartitionSpec(DATA))


def jit_train_step(step_fn, mesh: Mesh, *, members: bool = False):
  """Jits `step_fn(state, batch)` with explicit shardings and a donated state.

  With `members=True` the step is first vmapped over a leading member axis of the
  state (several runs side by side, one batch shared by all). Place the first state
  with `jax.device_put(state, replicated(mesh))`: uncommitted arrays would make the
  second call, fed the committed outputs, compile the program again.
  """
  fn = jax.vmap(step_fn, in_axes=(0, None)) if members else step_fn
  rep = replicated(mesh)
  return jax.jit(fn, in_shardings=(rep, batch_sharding(mesh)), out_shardings=(rep, rep),
                 donate_argnums=(0,))


def jit_eval_step(eval_fn, mesh: Mesh):
  """Jits `eval_fn(params, batch_stats, batch, acc)`; the accumulator is donated."""
  rep = replicated(mesh)
  return jax.jit(eval_fn, in_shardings=(rep, rep, batch_sharding(mesh), rep),
                 out_shardings=rep, donate_argnums=(3,))


class Steps(NamedTuple):
  """The optimizer and jitted programs of one model, settings and mesh."""

  optimizer: optax.GradientTransformation
  train: Any
  eval: Any
  reset: Any


_STEPS: dict[tuple, Steps] = {}


def compile_steps(graphdef: nnx.GraphDef, config: TrainConfig, steps_per_epoch: int,
                  mesh: Mesh, *, masks: PyTree, mean, std) -> Steps:
  """`make_optimizer`, `jit_train_step`, `jit_eval_step` and a jitted `reset_epoch`.

  Built once per (graphdef, config, steps_per_epoch, mean, std, mesh): the optimizer's
  `masks` only fix the structure (each state holds its own, see `init_train_state`), so
  every run and round of a model reuses the same compiled programs.
  """
  mean, std = tuple(map(float, mean)), tuple(map(float, std))
  key = (graphdef, config, steps_per_epoch, mean, std, mesh)
  if key not in _STEPS:
    optimizer = make_optimizer(config, masks)
    step = make_train_step(graphdef, optimizer, learning_rate_schedule(config, steps_per_epoch),
                           mean=mean, std=std, augment=config.augment, pad=config.pad,
                           flip=config.flip)
    rep = replicated(mesh)
    _STEPS[key] = Steps(
        optimizer, jit_train_step(step, mesh),
        jit_eval_step(make_eval_step(graphdef, mean=mean, std=std), mesh),
        jax.jit(reset_epoch, in_shardings=rep, out_shardings=rep, donate_argnums=0))
  return _STEPS[key]

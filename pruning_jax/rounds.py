"""The IMP driver: train, evaluate, prune (host method with or without AP), rewind, repeat.

`run_rounds` trains `cycles + 1` rounds: round r trains at sparsity 1 - (1 - rate)^r, is
evaluated and, except the last, pruned by `ap.prune_cycle`; the survivors are rewound
(to initialisation or to step t of round 0) and the next round starts afresh.

Orbax checkpoints in `out_dir/checkpoints` hold everything needed to continue: the train
state (masks inside), the initial, rewind and round-start parameters, the data position,
the round, the pruning history and the metrics log's length. They are taken at the
start, every `save_every_steps` steps and at each round's end (before pruning, which is
replayed on resume). A run killed anywhere and restarted continues from the newest one
and ends bitwise equal to an uninterrupted run: every random choice is a pure function
of seed, round and step, and lines logged after that checkpoint are dropped. Metrics go
to `out_dir/metrics.jsonl`, one JSON object of "kind" "epoch", "time" (a round's training
wall time), "eval" or "prune" a line.
"""

from collections.abc import Callable, Sequence
import dataclasses
import functools
import os
import time
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
from jaxtyping import PyTree
import numpy as np
import optax
from tqdm import tqdm

from pruning_jax import ap
from pruning_jax import datasets
from pruning_jax import imp
from pruning_jax import masks as masks_lib
from pruning_jax import models
from pruning_jax import optim
from pruning_jax import pipeline
from pruning_jax import scoring
from pruning_jax import train as train_lib
import runkit

# Settings round 0 does not depend on (runs may share it), and those a resume may change.
_ROUND0_FREE = ("method", "ap_rate", "ap_selection", "ap_scope", "synflow_iterations",
                "data_dir", "save_every_steps", "keep_checkpoints")
_RESUME_FREE = ("data_dir",)
_INTS = (("cycles", 0), ("seed", 0), ("train_subset", 0), ("test_subset", 0),
         ("eval_batch_size", 1), ("num_devices", 1), ("save_every_steps", 0),
         ("keep_checkpoints", 1), ("synflow_iterations", 1), ("score_batch_size", 1),
         ("bn_recalibration_batches", 0))
AP_SCOPES = ("all", "relu_fed")


class NonFiniteLossError(runkit.NonFiniteError):
  """A loss was NaN or infinite; the message names round, step and last good checkpoint."""


@dataclasses.dataclass(frozen=True)
class RoundsConfig:
  """Settings of one IMP run (one model, host method, AP setting and seed).

  Attributes:
    model, dataset: names in `pruning_jax.models.MODEL_BUILDERS`, `datasets.NAMES`.
    data_dir: folder of the dataset files (None: the default locations).
    train: optimisation settings of every round (a dict is converted).
    method: host pruning method, one of `pruning_jax.scoring.METHODS`.
    rate: fraction p of the remaining weights pruned per cycle.
    ap_rate: AP's share q of it; None or 0 prunes with the host alone.
    ap_selection: how the q share is chosen, one of `ap.SELECTIONS`: AP's
      "least_moved", or the controls "most_negative" and "random".
    ap_scope: "all" prunable layers, or "relu_fed": only layers whose inputs are
      ReLU outputs (the model's `relu_fed`), the AP variant that respects its
      premise of non-negative inputs.
    cycles: pruning cycles; `cycles + 1` rounds are trained.
    rewind_step: rewind to the weights after this many steps of round 0 (0: to
      initialisation); later rounds resume the schedule at this step.
    seed: seed of the initialisation, data order and augmentation.
    train_subset: train on this many samples (one fixed random subset), 0 for all.
    test_subset: evaluate on the first this many test samples, 0 for all.
    eval_batch_size: evaluation batch size.
    num_devices: devices of the ("data",) mesh; batch sizes must divide by it.
    save_every_steps: checkpoint period in steps within a round (0: round ends only).
    keep_checkpoints: newest checkpoints kept.
    synflow_iterations: SynFlow score-and-prune iterations per cycle.
    score_batch_size: samples of the batch SNIP and GraSP score on.
    eval_every_epoch: also evaluate on the test set after every epoch (the
      per-cycle curves that show whether a cycle trained to a plateau).
    bn_recalibration_batches: with BatchNorm, also evaluate every round after
      re-estimating the running statistics from this many training batches
      (0: off), a control for methods that claim to repair pruned networks.
  """

  model: str = "lenet300100"
  dataset: str = "fashion_mnist"
  data_dir: str | None = None
  train: train_lib.TrainConfig = dataclasses.field(
      default_factory=lambda: train_lib.lottery_config("lenet300100"))
  method: str = "magnitude"
  rate: float = ap.DEFAULT_RATE
  ap_rate: float | None = ap.DEFAULT_AP_RATE
  cycles: int = 11
  rewind_step: int = 0
  seed: int = 0
  train_subset: int = 0
  test_subset: int = 0
  eval_batch_size: int = 500
  num_devices: int = 1
  save_every_steps: int = 0
  keep_checkpoints: int = 2
  synflow_iterations: int = 1
  score_batch_size: int = 256
  ap_selection: str = "least_moved"
  ap_scope: str = "all"
  eval_every_epoch: bool = False
  bn_recalibration_batches: int = 0

  def __post_init__(self):
    if isinstance(self.train, dict):
      object.__setattr__(self, "train", train_lib.TrainConfig(**self.train))
    if self.model not in models.MODEL_BUILDERS:
      raise ValueError(f"model must be one of {sorted(models.MODEL_BUILDERS)}, got "
                       f"{self.model!r}.")
    if self.method not in scoring.METHODS:
      raise ValueError(f"method must be one of {scoring.METHODS}, got {self.method!r}.")
    imp.IMPConfig(rate=self.rate, ap_rate=self.ap_rate, rewind_step=self.rewind_step)
    if self.ap_selection not in ap.SELECTIONS:
      raise ValueError(f"ap_selection must be one of {ap.SELECTIONS}, got "
                       f"{self.ap_selection!r}.")
    if self.ap_scope not in AP_SCOPES:
      raise ValueError(f"ap_scope must be one of {AP_SCOPES}, got {self.ap_scope!r}.")
    for name, low in _INTS:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    for name, value in (("train.batch_size", self.train.batch_size),
                        ("eval_batch_size", self.eval_batch_size)):
      if value % self.num_devices:
        raise ValueError(f"{name}={value} must be a multiple of num_devices={self.num_devices}.")

  def to_dict(self) -> dict[str, Any]:
    """A JSON-able dict; `RoundsConfig(**d)` rebuilds the config."""
    train = dict(dataclasses.asdict(self.train), decay_epochs=list(self.train.decay_epochs))
    return dict(dataclasses.asdict(self), train=train)


class RoundsResult(NamedTuple):
  """Outcome of `run_rounds`.

  Attributes:
    evals: one dict per round (the "eval" metrics lines), round 0 first.
    params, batch_stats, masks: the last round's trained parameters, BatchNorm
      statistics and masks.
    history: one `ap.CycleInfo` per pruning cycle.
    resumed_from: checkpoint id the run continued from, None for a fresh run.
  """

  evals: list[dict[str, Any]]
  params: PyTree
  batch_stats: PyTree
  masks: PyTree
  history: list[ap.CycleInfo]
  resumed_from: int | None


def _copy(tree: PyTree) -> PyTree:
  # Kept trees must not alias the state's buffers, which the train step donates.
  return jax.tree.map(jnp.copy, tree)


def _prepare_data(config: RoundsConfig, data: datasets.Dataset | None) -> datasets.Dataset:
  ds = data if data is not None else datasets.load_dataset(config.dataset, config.data_dir)
  n, m = len(ds.train_labels), len(ds.test_labels)
  if config.train_subset > n or config.test_subset > m:
    raise ValueError(f"train_subset={config.train_subset} and test_subset="
                     f"{config.test_subset} must not exceed the {n} train and {m} test samples.")
  if config.train_subset:
    # One fixed subset for every seed, so seeds differ only in what they should.
    idx = np.sort(np.random.default_rng(0).permutation(n)[:config.train_subset])
    ds = ds._replace(train_images=ds.train_images[idx], train_labels=ds.train_labels[idx])
  if config.test_subset:
    ds = ds._replace(test_images=ds.test_images[:config.test_subset],
                     test_labels=ds.test_labels[:config.test_subset])
  return ds


class _Run:
  """Mutable bookkeeping of one `run_rounds` call."""

  def __init__(self, config: RoundsConfig, out_dir: str, data, hooks, progress: bool):
    self.config, self.out_dir, self.hooks, self.progress = config, out_dir, hooks, progress
    self.metrics = runkit.MetricsLog(os.path.join(out_dir, "metrics.jsonl"))
    self.ds = ds = _prepare_data(config, data)
    self.iterator = pipeline.EpochIterator(ds.train_images, ds.train_labels,
                                           config.train.batch_size, seed=config.seed)
    self.spe = self.iterator.steps_per_epoch
    self.total = config.train.epochs * self.spe
    if config.rewind_step >= self.total:
      raise ValueError(f"rewind_step={config.rewind_step} must be below the steps of a "
                       f"round ({self.total}).")
    self.mesh = train_lib.make_mesh(config.num_devices)
    self.input_shape = tuple(ds.train_images.shape[1:])
    model = models.build_model(config.model, num_classes=ds.num_classes,
                               input_shape=self.input_shape, rngs=nnx.Rngs(config.seed))
    graphdef, init_params, init_bs = train_lib.split_model(model)
    self.relu_fed = model.relu_fed
    self.stats_fn = jax.jit(functools.partial(train_lib.batch_statistics, graphdef=graphdef,
                                              mean=ds.mean, std=ds.std))
    self.act_shapes = models.activation_shapes(model)
    masks = masks_lib.init_masks(init_params)
    self.steps = train_lib.compile_steps(graphdef, config.train, self.spe, self.mesh,
                                         masks=masks, mean=ds.mean, std=ds.std)

    def score_loss(params, batch):
      logits = nnx.merge(graphdef, params, batch["batch_stats"])(batch["x"], train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    def synflow_apply(params, x):
      # Initial running statistics keep BatchNorm a data-free affine map.
      return nnx.merge(graphdef, params, init_bs)(x, train=False)

    self.score_loss, self.synflow_apply = score_loss, synflow_apply  # compiled once a run
    self.round, self.phase, self.global_step = 0, "train", 0
    self.state = self.fresh_state(init_params, init_bs, masks, step=0)
    self.kept = {"init_params": _copy(init_params), "init_batch_stats": _copy(init_bs),
                 "rewind_params": _copy(init_params), "rewind_batch_stats": _copy(init_bs),
                 "start_params": _copy(self.state.params)}
    self.history: list[ap.CycleInfo] = []
    # The end of round 0 (step `total`) stays for runs sharing it (`round0_from`).
    self.ckpt = runkit.Checkpointer(os.path.join(out_dir, "checkpoints"),
                                    config.keep_checkpoints, preserve=(self.total,),
                                    digest=True)

  def fresh_state(self, params, batch_stats, masks, step: int) -> train_lib.TrainState:
    key = jax.random.fold_in(jax.random.key(self.config.seed), self.round)
    state = train_lib.init_train_state(params, batch_stats, masks, self.steps.optimizer,
                                       self.act_shapes, key, step=step)
    return jax.device_put(state, train_lib.replicated(self.mesh))  # committed: 1 compile

  def record(self) -> dict[str, PyTree]:
    return {"state": self.state, **self.kept}

  def meta(self) -> dict[str, Any]:
    return {"round": self.round, "phase": self.phase, "global_step": self.global_step,
            "iterator": self.iterator.state(), "metrics_bytes": self.metrics.size(),
            "history": [list(h) for h in self.history]}

  def save(self) -> None:
    self.ckpt.save(self.global_step, self.record(), self.meta())

  def load(self, checkpointer: runkit.Checkpointer, step: int | None = None
           ) -> dict[str, Any]:
    restored, meta = checkpointer.restore(self.record(), step)
    self.state = jax.device_put(restored.pop("state"), train_lib.replicated(self.mesh))
    self.kept = restored
    self.round, self.phase, self.global_step = meta["round"], meta["phase"], meta["global_step"]
    self.iterator.restore(meta["iterator"])
    self.history = [ap.CycleInfo(*h) for h in meta["history"]]
    return meta

  def masks(self) -> PyTree:
    return optim.get_masks(self.state.opt_state)

  def sparsity(self) -> float:
    return float(masks_lib.sparsity(self.masks()))

  def check_pending(self, pending: list, bar) -> None:
    """Fails on the first non-finite loss dispatched since the last check."""
    losses = jax.device_get([m["loss"] for _, m in pending])
    for (step, _), loss in zip(pending, losses):
      if not np.isfinite(loss):
        bar.close()
        latest = self.ckpt.latest_step()
        raise NonFiniteLossError(
            f"non-finite loss {float(loss)} at round {self.round}, step {step}; the last "
            f"good checkpoint is {'none' if latest is None else self.ckpt.path(latest)}"
            " (restarting resumes from it).")
    bar.update(len(pending))
    pending.clear()

  def train_round(self) -> None:
    cfg, spe = self.config, self.spe
    step, sparsity = int(self.state.step), self.sparsity()
    bar = tqdm(total=self.total, initial=step, desc=f"round {self.round} s={sparsity:.3f}",
               leave=False, disable=not self.progress)
    pending = []
    while step < self.total:
      if step % spe == 0:
        self.state = self.steps.reset(self.state)
      self.state, metrics = self.steps.train(self.state, next(self.iterator))
      step, self.global_step = step + 1, self.global_step + 1
      if self.round == 0 and step == cfg.rewind_step:
        self.kept.update(rewind_params=_copy(self.state.params),
                         rewind_batch_stats=_copy(self.state.batch_stats))
      pending.append((step, metrics))
      for hook in self.hooks:
        hook(self.round, step, self.global_step)
      epoch_end = step % spe == 0 or step == self.total
      save_now = (cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0
                  and step < self.total)
      if epoch_end or save_now or len(pending) >= 50:
        self.check_pending(pending, bar)
      if epoch_end:
        s = jax.device_get(train_lib.summarize(self.state.totals, self.state.dnr))
        line = {"kind": "epoch", "round": self.round, "epoch": (step - 1) // spe,
                "step": step, "global_step": self.global_step, "sparsity": sparsity,
                "train_loss": float(s["loss"]), "train_accuracy": float(s["accuracy"]),
                "learning_rate": float(metrics["learning_rate"]),
                **{k: float(s[k]) for k in ("dnr", "dnr_channel", "dnr_static")}}
        if cfg.eval_every_epoch:
          test = self.test_metrics(self.state.batch_stats)
          line.update(test_loss=test["loss"], test_accuracy=test["accuracy"])
        bar.set_postfix(epoch=line["epoch"], loss=f"{line['train_loss']:.3f}",
                        acc=f"{line['train_accuracy']:.3f}", dnr=f"{line['dnr']:.3f}")
        self.metrics.append(line)
      if save_now:
        self.save()
    bar.close()

  def test_metrics(self, batch_stats: PyTree) -> dict[str, float]:
    return train_lib.evaluate(self.steps.eval, self.state.params, batch_stats,
                              self.ds.test_images, self.ds.test_labels,
                              batch_size=self.config.eval_batch_size,
                              act_shapes=self.act_shapes, mesh=self.mesh)

  def evaluate(self) -> dict[str, Any]:
    s = self.test_metrics(self.state.batch_stats)
    out = {"kind": "eval", "round": self.round, "sparsity": self.sparsity(),
           "test_loss": s["loss"], "test_accuracy": s["accuracy"],
           "layer_sparsity": masks_lib.layer_sparsities(self.masks())}
    for key in ("dnr", "dnr_channel", "dnr_static", "dnr_static_channel"):
      out[key] = s[key]
      out["layer_" + key] = {k.split("/", 1)[1]: v for k, v in s.items()
                             if k.startswith(key + "/")}
    n_batches = self.config.bn_recalibration_batches
    if n_batches and jax.tree.leaves(self.state.batch_stats):
      stats = train_lib.recalibrate_batch_stats(
          self.stats_fn, self.state.params, self.state.batch_stats,
          self.ds.train_images, batch_size=self.config.train.batch_size,
          num_batches=n_batches)
      r = self.test_metrics(stats)
      out.update(test_loss_bn_recal=r["loss"], test_accuracy_bn_recal=r["accuracy"],
                 dnr_bn_recal=r["dnr"])
    return out

  def host_kwargs(self) -> dict[str, Any]:
    """Inputs of the host method: a key, a scoring batch, or SynFlow's model function."""
    cfg, method, ds = self.config, self.config.method, self.ds
    if method == "random":
      return {"key": jax.random.fold_in(jax.random.key(cfg.seed + 1), self.round)}
    if method in ("snip", "grasp"):
      idx = np.random.default_rng([cfg.seed, self.round]).choice(
          len(ds.train_labels), min(cfg.score_batch_size, len(ds.train_labels)), False)
      x = pipeline.normalize(jnp.asarray(ds.train_images[idx]), ds.mean, ds.std)
      return {"loss_fn": self.score_loss,
              "batch": {"x": x, "label": jnp.asarray(ds.train_labels[idx]),
                        "batch_stats": self.state.batch_stats}}
    if method == "synflow":
      return {"apply_fn": self.synflow_apply, "input_shape": self.input_shape,
              "iterations": cfg.synflow_iterations}
    return {}

  def prune_and_rewind(self) -> None:
    cfg = self.config
    masks, info = ap.prune_cycle(
        cfg.method, self.state.params, self.kept["start_params"], self.masks(),
        rate=cfg.rate, ap_rate=cfg.ap_rate, ap_selection=cfg.ap_selection,
        ap_scope=self.relu_fed if cfg.ap_scope == "relu_fed" else None,
        ap_key=jax.random.fold_in(jax.random.key(cfg.seed + 2), self.round),
        **self.host_kwargs())
    self.history.append(info)
    params = imp.rewind(self.state.params, self.kept["rewind_params"], masks)
    self.round, self.phase = self.round + 1, "train"
    self.state = self.fresh_state(params, self.kept["rewind_batch_stats"], masks,
                                  step=cfg.rewind_step)
    self.kept["start_params"] = _copy(self.state.params)
    self.metrics.append({"kind": "prune", "round": self.round - 1,
                         "sparsity": self.sparsity(), **info._asdict()})

  def adopt_round0(self, source_dir: str) -> None:
    """Starts from the trained round 0 of a run differing only in pruning."""
    diff = runkit.config_differences(runkit.read_config(source_dir), self.config.to_dict(),
                                     _ROUND0_FREE)
    if diff:
      raise ValueError(f"round0_from={source_dir!r} was trained with other settings "
                       f"(differs in {[d.path for d in diff]}: "
                       f"{'; '.join(map(str, diff))}); only {list(_ROUND0_FREE)} may differ.")
    source = runkit.Checkpointer(os.path.join(source_dir, "checkpoints"), digest=True)
    if self.total not in source.steps():
      raise ValueError(f"round0_from={source_dir!r} has not finished round 0 (no "
                       f"checkpoint {self.total}).")
    meta = self.load(source, self.total)
    source.close()
    self.metrics.replace(runkit.MetricsLog(os.path.join(source_dir, "metrics.jsonl"))
                         .text(meta["metrics_bytes"]))


def run_rounds(config: RoundsConfig, out_dir: str | os.PathLike, *,
               data: datasets.Dataset | None = None,
               hooks: Sequence[Callable[[int, int, int], None]] = (), progress: bool = True,
               round0_from: str | os.PathLike | None = None) -> RoundsResult:
  """Runs (or resumes) the IMP rounds of `config`, checkpointing into `out_dir`.

  Args:
    config: the run's settings.
    out_dir: run folder: config.json, metrics.jsonl, checkpoints/.
    data: the dataset (default: `datasets.load_dataset(config.dataset,
      config.data_dir)`), reduced to `config.train_subset` / `test_subset`.
    hooks: `hook(round, step, global_step)` called after every dispatched step.
    progress: show a tqdm bar per round (round, sparsity, epoch, loss, accuracy, DNR).
    round0_from: folder of a run whose settings differ only in the pruning (method,
      AP); a fresh run starts from its trained round 0 instead of training it again.

  Returns:
    A `RoundsResult`.

  Raises:
    NonFiniteLossError: a loss was NaN or infinite (checkpoints stay as they were).
    runkit.CheckpointError: the newest checkpoint is unreadable.
    runkit.ConfigMismatchError: out_dir holds a run with other settings (a ValueError).
    ValueError: bad settings.

  References:
    Frankle & Carbin, 2019, arXiv 1803.03635 (IMP, rewinding to initialisation);
    Frankle, Dziugaite, Roy & Carbin, 2020, arXiv 1912.05671 (rewinding to step t);
    Liu, Ghosh, Tan & Motani, 2023, TMLR, arXiv 2212.06145 (AP).
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  os.makedirs(out_dir, exist_ok=True)
  runkit.write_config(out_dir, config.to_dict(), _RESUME_FREE)
  run = _Run(config, out_dir, data, tuple(hooks), progress)
  resumed_from = run.ckpt.latest_step()
  if resumed_from is not None:
    run.metrics.truncate(run.load(run.ckpt)["metrics_bytes"])
  else:
    run.metrics.replace("")
    if round0_from is not None:
      run.adopt_round0(os.fspath(round0_from))
    run.save()
  while not (run.phase == "trained" and run.round == config.cycles):
    if run.phase == "trained":
      run.prune_and_rewind()
    start = time.perf_counter()
    run.train_round()
    # Wall time of this process's share of the round (all of it unless resumed mid-round),
    # on a line of its own so the eval lines stay bitwise reproducible.
    run.metrics.append({"kind": "time", "round": run.round,
                        "train_seconds": time.perf_counter() - start})
    run.metrics.append(run.evaluate())
    run.phase = "trained"
    run.save()
  run.ckpt.close()
  return RoundsResult(run.metrics.read("eval"), run.state.params, run.state.batch_stats,
                      run.masks(), run.history, resumed_from)

"""Meshes, shardings and the sharded SAE training step.

One ``jax.sharding.Mesh`` with axes ("data", "model"): tokens are split over "data", the
dictionary (d_sae) over "model". Encoder columns, decoder rows, encoder bias, Adam
moments and the per-feature usage state are sharded over "model"; ``b_dec`` and scalars
are replicated. The state is created directly in its sharded layout (the initialiser is
jitted with ``out_shardings`` after ``jax.eval_shape``), so full parameters never sit on
one device.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sae_jax import metrics
from sae_jax import model
from sae_jax import params as sae_params
from sae_jax.training import dense_step
from sae_jax.training import selection
from sae_jax.training import sharded_step
from sae_jax.training import sparse_step
from sae_jax.training import train_state
import runkit

DATA = "data"
MODEL = "model"


def make_mesh(n_data: int | None = None, n_model: int = 1, devices=None) -> Mesh:
  """A ("data", "model") mesh with Auto axes over ``n_data * n_model`` devices.

  ``n_data=None`` uses every remaining device for data parallelism. Built by
  ``runkit.make_mesh``.

  Raises:
    ValueError: ``n_model`` does not divide the device count, or the sizes need more
      devices than there are.
  """
  devices = list(jax.devices() if devices is None else devices)
  if isinstance(n_model, int) and n_model >= 1 and len(devices) % n_model:
    raise ValueError(f"n_model must divide the {len(devices)} devices; got {n_model}.")
  return runkit.make_mesh({DATA: n_data, MODEL: n_model}, devices,
                          labels={DATA: "n_data", MODEL: "n_model"})


def param_specs() -> sae_params.SAEParams:
  return sae_params.SAEParams(W_enc=P(None, MODEL), b_enc=P(MODEL), W_dec=P(MODEL, None),
                              b_dec=P())


def state_shardings(state_shape: train_state.TrainState, mesh: Mesh) -> train_state.TrainState:
  """NamedShardings for every leaf of a TrainState (or its ``eval_shape``)."""
  pspecs = param_specs()

  def for_node(node):
    if isinstance(node, sae_params.SAEParams):
      return sae_params.SAEParams(*(NamedSharding(mesh, s) for s in pspecs))
    if isinstance(node, metrics.FeatureUsageState):
      return metrics.FeatureUsageState(NamedSharding(mesh, P(MODEL)),
                                       NamedSharding(mesh, P(MODEL)), NamedSharding(mesh, P()))
    return NamedSharding(mesh, P())

  is_node = lambda x: isinstance(x, (sae_params.SAEParams, metrics.FeatureUsageState))
  out = jax.tree.map(for_node, state_shape, is_leaf=is_node)
  if isinstance(out, train_state.TrainState):
    out = out._replace(threshold=NamedSharding(mesh, P(MODEL)))
  return out


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA, None))


def _shape_key(tree) -> tuple:
  leaves, treedef = jax.tree.flatten(tree)
  return treedef, tuple((tuple(a.shape), str(a.dtype)) for a in leaves)


# Jitted programs per (configs, mesh, shapes): a second `fit` on the same settings (a
# resumed run, the next run of a sweep) reuses the compiled initialiser and step.
_PROGRAMS: dict[tuple, object] = {}


def _init_from(key, sample, *, cfg: model.SAEConfig, tcfg: train_state.TrainConfig):
  return train_state.init_train_state(key, cfg, tcfg, sample=sample)


def init_sharded_state(key, cfg: model.SAEConfig, tcfg: train_state.TrainConfig, mesh: Mesh,
                       sample=None) -> train_state.TrainState:
  """Initialises the train state directly in its sharded layout."""
  n_model = mesh.shape[MODEL]
  if cfg.d_sae % n_model:
    raise ValueError(f"d_sae={cfg.d_sae} must be divisible by the model axis size {n_model}.")
  init = functools.partial(_init_from, cfg=cfg, tcfg=tcfg)
  cache_key = ("init", cfg, tcfg, mesh, _shape_key((key, sample)))
  if cache_key not in _PROGRAMS:
    shardings = state_shardings(jax.eval_shape(init, key, sample), mesh)
    _PROGRAMS[cache_key] = jax.jit(init, out_shardings=shardings)
  return _PROGRAMS[cache_key](key, sample)


def uses_sparse_step(cfg: model.SAEConfig, mesh: Mesh, sparse: bool | None = None) -> bool:
  """Whether :func:`jit_sharded_step` runs a sparse step for this configuration."""
  return sparse is not False and selection.supports(cfg)


def jit_sharded_step(cfg: model.SAEConfig, tcfg: train_state.TrainConfig, mesh: Mesh,
                     state_shape: train_state.TrainState, sparse: bool | None = None,
                     chunk_tokens: int = selection.DEFAULT_CHUNK_TOKENS):
  """The training step jitted once with explicit in/out shardings and a donated state.

  By default a sparse step runs wherever it supports the configuration (every
  allocation but the ReLU+L1 baseline, float32): on a one-device mesh
  :func:`sae_jax.training.sparse_step.fast_train_step`, on any larger mesh
  :func:`sae_jax.training.sharded_step.sharded_sparse_step`; both make the update of the dense
  :func:`sae_jax.training.dense_step.train_step` to float32 rounding at a fraction of its cost. The
  dense step runs otherwise, or whenever ``sparse=False``.

  ``chunk_tokens`` is the sparse steps' largest chunk of tokens per encoder pass on
  each device (peak memory holds a few ``[chunk, f / n_model]`` blocks).

  Returns ``step(state, x) -> (state, metrics)``; ``x`` is ``[b, d]`` with b divisible
  by the data axis size. The same settings and state shapes return the same jitted
  function, so its compiled program is reused across calls.

  Raises:
    ValueError: if ``sparse=True`` for a configuration no sparse step supports.
  """
  if sparse and not selection.supports(cfg):
    raise ValueError(
        f"sparse=True needs an allocation in {selection.FAST_ALLOCATIONS} with float32 "
        f"dtypes; got allocation={cfg.allocation!r}, dtype={jax.numpy.dtype(cfg.dtype).name},"
        f" param_dtype={jax.numpy.dtype(cfg.param_dtype).name}. Pass sparse=None to choose "
        "automatically.")
  use_sparse = uses_sparse_step(cfg, mesh, sparse)
  cache_key = ("step", cfg, tcfg, mesh, use_sparse, chunk_tokens, _shape_key(state_shape))
  if cache_key in _PROGRAMS:
    return _PROGRAMS[cache_key]
  shardings = state_shardings(state_shape, mesh)
  replicated = NamedSharding(mesh, P())
  if use_sparse and mesh.size == 1:
    step = functools.partial(sparse_step.fast_train_step, cfg=cfg, tcfg=tcfg,
                             chunk_tokens=chunk_tokens)
  elif use_sparse:
    specs = jax.tree.map(lambda s: s.spec, shardings)
    step = functools.partial(sharded_step.sharded_sparse_step, cfg=cfg, tcfg=tcfg, mesh=mesh,
                             state_specs=specs, chunk_tokens=chunk_tokens)
  else:
    step = functools.partial(dense_step.train_step, cfg=cfg, tcfg=tcfg, mesh=mesh)
  _PROGRAMS[cache_key] = jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                                 out_shardings=(shardings, replicated), donate_argnums=(0,))
  return _PROGRAMS[cache_key]

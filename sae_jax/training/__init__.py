"""Training: one objective, three steps computing the same update, and the loop.

* :mod:`~sae_jax.training.train_state`: :class:`TrainConfig`, :class:`TrainState`,
  :func:`init_train_state`;
* :mod:`~sae_jax.training.objective`: reconstruction and auxiliary losses, usage and
  threshold statistics, metrics, written once for every step;
* the steps: :func:`train_step` (dense reference), :func:`fast_train_step` (sparse, one
  device: the encoder matmul is the only dense work), :func:`sharded_sparse_step` (the
  sparse step on a ("data", "model") mesh); :mod:`~sae_jax.training.selection` and
  :mod:`~sae_jax.training.sparse_kernels` are their selection and kernels,
  :mod:`~sae_jax.training.adam` their in-place optimiser update;
* :func:`jit_sharded_step` picks and jits the step for a mesh, :func:`fit` runs it
  (checkpoints, resumption, prefetching, non-finite detection).
"""

from sae_jax.training.dense_step import jit_train_step
from sae_jax.training.dense_step import train_step
from sae_jax.training.loop import NonFiniteError
from sae_jax.training.loop import RunConfig
from sae_jax.training.loop import fit
from sae_jax.training.sharded_step import sharded_sparse_step
from sae_jax.training.sharding import init_sharded_state
from sae_jax.training.sharding import jit_sharded_step
from sae_jax.training.sharding import make_mesh
from sae_jax.training.sparse_step import fast_train_step
from sae_jax.training.sparse_step import jit_fast_train_step
from sae_jax.training.train_state import AUX_LOSSES
from sae_jax.training.train_state import TrainConfig
from sae_jax.training.train_state import TrainState
from sae_jax.training.train_state import init_train_state
from sae_jax.training.train_state import learning_rate_schedule

__all__ = [
    "AUX_LOSSES", "NonFiniteError", "RunConfig", "TrainConfig", "TrainState", "fast_train_step",
    "fit", "init_sharded_state", "init_train_state", "jit_fast_train_step", "jit_sharded_step",
    "jit_train_step", "learning_rate_schedule", "make_mesh", "sharded_sparse_step",
    "train_step",
]

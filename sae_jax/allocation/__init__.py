"""Allocation strategies: which entries of a ``[tokens, features]`` score matrix to keep.

Every strategy is an exact, jittable function from scores to a boolean mask of the same
shape (ties to the lower index, as ``lax.top_k``):

* :func:`topk`: every token keeps its ``k`` best features;
* :func:`mutual_choice` (= :func:`batch_topk`): the ``round(k * b)`` best entries of the
  whole matrix;
* :func:`feature_choice`, :func:`feature_choice_fb` (feature-major scores),
  :func:`feature_choice_ranked` (Zipf capacities by frequency rank): every feature keeps
  its best ``capacity`` tokens; :func:`zipf_capacities` builds the capacities;
* :func:`threshold`: entries above a global or per-feature threshold (inference).

On a ("data", "model") mesh the same selections run sharded (:func:`topk_sharded`,
:func:`mutual_choice_sharded`, :func:`feature_choice_sharded`), exact across shards.
The building blocks the sparse training steps use are public too: :func:`rows_topk` and
:func:`cols_topk` (exactly ``lax.top_k`` over rows or columns, through grouped maxima),
:func:`select_top_n_flat` and :func:`select_global_top_n` (the n best of a matrix, on one
device or across a mesh), and the key helpers :func:`sortable_key`, :func:`key_to_float`,
:func:`bisect_uint32`, :func:`count_at_least`.

Modules: :mod:`~sae_jax.allocation.strategies` (the strategies),
:mod:`~sae_jax.allocation.grouped` (the grouped top-k kernels and key helpers),
:mod:`~sae_jax.allocation.feature_choice_ops` (Feature Choice and its capacities),
:mod:`~sae_jax.allocation.sharded` (the sharded variants) and
:mod:`~sae_jax.allocation.validation` (argument checks shared by them).

References:
  Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature Choice Sparse
  Autoencoders", arXiv 2411.02124; Bussmann, Leask & Nanda 2024, "BatchTopK Sparse
  Autoencoders", arXiv 2412.06410.
"""

from sae_jax.allocation.feature_choice_ops import feature_choice
from sae_jax.allocation.feature_choice_ops import feature_choice_fb
from sae_jax.allocation.feature_choice_ops import feature_choice_ranked
from sae_jax.allocation.feature_choice_ops import zipf_capacities
from sae_jax.allocation.grouped import bisect_uint32
from sae_jax.allocation.grouped import cols_topk
from sae_jax.allocation.grouped import count_at_least
from sae_jax.allocation.grouped import key_to_float
from sae_jax.allocation.grouped import rows_topk
from sae_jax.allocation.grouped import select_top_n_flat
from sae_jax.allocation.grouped import sortable_key
from sae_jax.allocation.sharded import feature_choice_sharded
from sae_jax.allocation.sharded import mutual_choice_sharded
from sae_jax.allocation.sharded import select_global_top_n
from sae_jax.allocation.sharded import topk_sharded
from sae_jax.allocation.strategies import DEFAULT_CANDIDATE_FACTOR
from sae_jax.allocation.strategies import batch_topk
from sae_jax.allocation.strategies import mutual_choice
from sae_jax.allocation.strategies import mutual_choice_budget
from sae_jax.allocation.strategies import threshold
from sae_jax.allocation.strategies import topk

__all__ = [
    "DEFAULT_CANDIDATE_FACTOR", "batch_topk", "bisect_uint32", "cols_topk", "count_at_least",
    "feature_choice", "feature_choice_fb", "feature_choice_ranked", "feature_choice_sharded",
    "key_to_float", "mutual_choice", "mutual_choice_budget", "mutual_choice_sharded",
    "rows_topk", "select_global_top_n", "select_top_n_flat", "sortable_key", "threshold",
    "topk", "topk_sharded", "zipf_capacities",
]

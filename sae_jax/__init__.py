"""sae_jax: sparse autoencoders with adaptive allocation (TopK, Mutual Choice, Feature Choice).

References:
  Ayonrinde 2024, "Adaptive Sparse Allocation with Mutual Choice & Feature Choice Sparse
  Autoencoders", arXiv 2411.02124; Gao et al. 2024, "Scaling and evaluating sparse
  autoencoders", arXiv 2406.04093; Bussmann, Leask & Nanda 2024, "BatchTopK Sparse
  Autoencoders", arXiv 2412.06410.

Layout: the SAE itself (:mod:`~sae_jax.model`, :mod:`~sae_jax.params`) and its losses
and metrics (:mod:`~sae_jax.losses`, :mod:`~sae_jax.metrics`); the allocation ops
(:mod:`sae_jax.allocation`); training (:mod:`sae_jax.training`: objective, steps,
optimiser update, sharding, loop); evaluation and export (:mod:`sae_jax.evaluation`);
data (:mod:`sae_jax.data`: activation stores, harvesting, the synthetic benchmark).
Run plumbing shared with pruning_jax lives in :mod:`runkit`.
"""

from sae_jax import allocation
from sae_jax import evaluation
from sae_jax import losses
from sae_jax import metrics
from sae_jax import model
from sae_jax import params
from sae_jax import training
from sae_jax.allocation import batch_topk
from sae_jax.allocation import feature_choice
from sae_jax.allocation import feature_choice_fb
from sae_jax.allocation import feature_choice_ranked
from sae_jax.allocation import mutual_choice
from sae_jax.allocation import mutual_choice_budget
from sae_jax.allocation import threshold
from sae_jax.allocation import topk
from sae_jax.allocation import zipf_capacities
from sae_jax.losses import DEFAULT_AUX_COEFFICIENT
from sae_jax.losses import aux_k_loss
from sae_jax.losses import aux_zipf_loss
from sae_jax.losses import default_k_aux
from sae_jax.losses import l1_penalty
from sae_jax.metrics import FeatureUsageState
from sae_jax.metrics import dead_features
from sae_jax.metrics import dead_fraction
from sae_jax.metrics import feature_usage_init
from sae_jax.metrics import feature_usage_update
from sae_jax.metrics import fit_zipf
from sae_jax.metrics import fvu
from sae_jax.metrics import l0_per_token
from sae_jax.metrics import mean_l0
from sae_jax.metrics import normalized_mse
from sae_jax.metrics import underutilised_features
from sae_jax.metrics import zipf_deficit
from sae_jax.metrics import zipf_expected
from sae_jax.model import SAE
from sae_jax.model import SAEConfig
from sae_jax.model import SAEOutput
from sae_jax.model import decode
from sae_jax.model import encode
from sae_jax.model import encode_thresholded
from sae_jax.model import encode_pre
from sae_jax.model import forward
from sae_jax.model import inference_codes
from sae_jax.params import SAEParams
from sae_jax.params import geometric_median
from sae_jax.params import normalize_decoder
from sae_jax.params import project_decoder_grads
from sae_jax.params import tied_init
from sae_jax.evaluation.probing import k_sparse_probe
from sae_jax.evaluation.probing import mean_difference_ranking

__version__ = "0.1.0"

"""pruning_jax: network pruning with Activate-while-Pruning (AP) and the dynamic dead neuron rate.

References:
  Liu, Ghosh, Tan & Motani 2023, "AP: Selective Activation for De-sparsifying Pruned
  Neural Networks", TMLR, arXiv 2212.06145; Frankle & Carbin 2019, "The Lottery Ticket
  Hypothesis", arXiv 1803.03635.
"""

from pruning_jax import ap
from pruning_jax import datasets
from pruning_jax import distributions
from pruning_jax import dnr
from pruning_jax import imp
from pruning_jax import masks
from pruning_jax import models
from pruning_jax import optim
from pruning_jax import pipeline
from pruning_jax import rounds
from pruning_jax import schedules
from pruning_jax import scoring
from pruning_jax import train
from pruning_jax.ap import CycleInfo
from pruning_jax.ap import ap_prune
from pruning_jax.ap import ap_scores
from pruning_jax.ap import most_negative_scores
from pruning_jax.ap import prune_cycle
from pruning_jax.ap import random_survivor_scores
from pruning_jax.datasets import Dataset
from pruning_jax.datasets import load_dataset
from pruning_jax.datasets import pad_images
from pruning_jax.distributions import erk
from pruning_jax.distributions import prune_to_sparsity
from pruning_jax.distributions import uniform
from pruning_jax.dnr import DNRState
from pruning_jax.dnr import dynamic_dead_neuron_rate
from pruning_jax.dnr import dnr_init
from pruning_jax.dnr import dnr_summary
from pruning_jax.dnr import dnr_update
from pruning_jax.imp import IMPConfig
from pruning_jax.imp import reinit
from pruning_jax.imp import rewind
from pruning_jax.imp import run_imp
from pruning_jax.masks import apply_masks
from pruning_jax.masks import default_prunable
from pruning_jax.masks import init_masks
from pruning_jax.masks import prunable_predicate
from pruning_jax.masks import prune_lowest
from pruning_jax.masks import prune_lowest_per_leaf
from pruning_jax.masks import remove_count
from pruning_jax.masks import sharded_prune_lowest
from pruning_jax.masks import sparsity
from pruning_jax.optim import MaskedState
from pruning_jax.optim import masked_optimizer
from pruning_jax.optim import prune_params_and_state
from pruning_jax.rounds import RoundsConfig
from pruning_jax.rounds import run_rounds
from pruning_jax.schedules import imp_sparsity
from pruning_jax.schedules import zhu_gupta
from pruning_jax.scoring import compute_scores
from pruning_jax.scoring import host_prune
from pruning_jax.scoring import synflow_prune

__version__ = "0.1.0"

"""Activation sources for SAE training."""

from sae_jax.data.synthetic import SyntheticConfig
from sae_jax.data.synthetic import ground_truth
from sae_jax.data.synthetic import sample_batch

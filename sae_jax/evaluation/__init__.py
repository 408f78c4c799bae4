"""Evaluation and export: how good an SAE is, in the field's terms, and how to ship it.

* :mod:`~sae_jax.evaluation.evaluate`: FVU (textbook, per-token, about zero), L0 and its
  distribution, dead and underused features on held-out batches (:func:`evaluate_sae`),
  and fidelity with the reconstruction spliced into MiniLM (:func:`fidelity`);
* :mod:`~sae_jax.evaluation.lm_fidelity`: CE loss recovered and KL with the reconstruction
  spliced into GPT-2 / GPT-NeoX (``lm_fidelity.lm_fidelity``);
* :mod:`~sae_jax.evaluation.probing`: k-sparse probing of codes (:func:`k_sparse_probe`);
* :mod:`~sae_jax.evaluation.recovery`: recovery of known features (MCC, precision,
  recall, F1) on the synthetic benchmark;
* :mod:`~sae_jax.evaluation.export`: SAELens-layout export and loading;
* :mod:`~sae_jax.evaluation.plots` (needs matplotlib): the plots of the experiments.
"""

from sae_jax.evaluation import lm_fidelity
from sae_jax.evaluation.evaluate import Normalization
from sae_jax.evaluation.evaluate import evaluate_sae
from sae_jax.evaluation.evaluate import fidelity
from sae_jax.evaluation.evaluate import splice_reconstruction
from sae_jax.evaluation.export import encode_exported
from sae_jax.evaluation.export import export_saelens
from sae_jax.evaluation.export import load_exported
from sae_jax.evaluation.probing import k_sparse_probe
from sae_jax.evaluation.probing import mean_difference_ranking
from sae_jax.evaluation.recovery import feature_recovery
from sae_jax.evaluation.recovery import mcc
from sae_jax.evaluation.recovery import recovery_scores

__all__ = [
    "Normalization", "encode_exported", "evaluate_sae", "export_saelens", "feature_recovery",
    "fidelity", "k_sparse_probe", "load_exported", "mcc", "mean_difference_ranking",
    "recovery_scores", "splice_reconstruction",
]

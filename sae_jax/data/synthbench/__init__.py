"""Ground-truth activations in the style of SynthSAEBench, for measuring feature recovery.

Every token is a sparse non-negative sum of ``f`` known unit feature vectors in ``d``
dimensions (``f > d``: superposition), so a trained SAE can be scored against the truth
(:mod:`sae_jax.evaluation.recovery`). The ingredients follow the published description of
SynthSAEBench; wherever it is silent the choice made here is documented where it is made:

- feature vectors: random Gaussian directions whose pairwise overlaps are pushed down until
  the mean over features of the max ``|cos|`` to any other feature reaches a target
  (:func:`make_synthbench`);
- firing probabilities: a Zipf law over frequency rank, from ``p_max`` down to ``p_min``
  (:func:`firing_probabilities`); feature ``i`` is the ``i``-th most frequent;
- a hierarchy: trees of mutually exclusive children that fire only when their parent
  fires (:func:`hierarchy_layout`);
- low-rank correlated firing through a Gaussian copula, which keeps every marginal exact;
- magnitudes that fall from about 5.0 for the most frequent features to 4.0 for the rarest.

Every feature, child or not, fires with exactly its Zipf probability, so the expected L0
is ``sum(p)`` (:func:`true_l0`) and the frequency profile an SAE sees is the Zipf law
itself. With the default curve the ``paper`` preset carries a true L0 of 25.3 (16.0 in
its 4096 most frequent features) where the published generator reports about 34; the
published figures do not pin the curve down (see ``zipf_exponent`` in
:class:`SynthBenchConfig` for the alternative, 59.1). Sampling is pure JAX from a key;
:class:`SynthBenchBatches` serves the trainer's data protocol.

Modules: :mod:`~sae_jax.data.synthbench.config` (the config, presets, probabilities and
hierarchy), :mod:`~sae_jax.data.synthbench.geometry` (feature vectors with controlled
overlap), :mod:`~sae_jax.data.synthbench.generator` (the drawn model and sampling),
:mod:`~sae_jax.data.synthbench.batches` (the trainer's batches and stores).

References:
  Chanin & Garriga-Alonso 2026, "SynthSAEBench", arXiv 2602.14687.
"""

from sae_jax.data.synthbench.batches import SynthBenchBatches
from sae_jax.data.synthbench.batches import write_synthbench_store
from sae_jax.data.synthbench.config import PRESETS
from sae_jax.data.synthbench.config import HierarchyLevel
from sae_jax.data.synthbench.config import SynthBenchConfig
from sae_jax.data.synthbench.config import firing_probabilities
from sae_jax.data.synthbench.config import hierarchy_layout
from sae_jax.data.synthbench.config import synthbench_preset
from sae_jax.data.synthbench.generator import SynthBench
from sae_jax.data.synthbench.generator import hierarchy_parents
from sae_jax.data.synthbench.generator import make_synthbench
from sae_jax.data.synthbench.generator import sample_synthbench
from sae_jax.data.synthbench.generator import sample_synthbench_rows
from sae_jax.data.synthbench.generator import true_l0
from sae_jax.data.synthbench.geometry import COSINE_BLOCK
from sae_jax.data.synthbench.geometry import MAX_COS_RTOL
from sae_jax.data.synthbench.geometry import PUSH_STEP
from sae_jax.data.synthbench.geometry import mean_max_cosine

__all__ = [
    "COSINE_BLOCK", "MAX_COS_RTOL", "PRESETS", "PUSH_STEP", "HierarchyLevel", "SynthBench",
    "SynthBenchBatches", "SynthBenchConfig", "firing_probabilities", "hierarchy_layout",
    "hierarchy_parents", "make_synthbench", "mean_max_cosine", "sample_synthbench",
    "sample_synthbench_rows", "synthbench_preset", "true_l0", "write_synthbench_store",
]

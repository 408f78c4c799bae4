"""Activation sources for SAE training: real text through MiniLM or a causal LM (GPT-2,
GPT-NeoX / Pythia, :mod:`~sae_jax.data.lm_harvest`), stores, synthetic data."""

from sae_jax.data import batches
from sae_jax.data import bert
from sae_jax.data import corpus
from sae_jax.data import harvest
from sae_jax.data import lm_harvest
from sae_jax.data import minilm
from sae_jax.data import store
from sae_jax.data import synthbench
from sae_jax.data import synthetic
from sae_jax.data.batches import ShuffledBatches
from sae_jax.data.corpus import CorpusSpec
from sae_jax.data.corpus import iter_documents
from sae_jax.data.minilm import load_minilm
from sae_jax.data.minilm import load_tokenizer
from sae_jax.data.store import StoreReader
from sae_jax.data.store import StoreWriter
from sae_jax.data.store import write_store_from_arrays
from sae_jax.data.synthbench import HierarchyLevel
from sae_jax.data.synthbench import SynthBench
from sae_jax.data.synthbench import SynthBenchBatches
from sae_jax.data.synthbench import SynthBenchConfig
from sae_jax.data.synthbench import firing_probabilities
from sae_jax.data.synthbench import hierarchy_layout
from sae_jax.data.synthbench import hierarchy_parents
from sae_jax.data.synthbench import make_synthbench
from sae_jax.data.synthbench import mean_max_cosine
from sae_jax.data.synthbench import sample_synthbench
from sae_jax.data.synthbench import sample_synthbench_rows
from sae_jax.data.synthbench import synthbench_preset
from sae_jax.data.synthbench import true_l0
from sae_jax.data.synthetic import SyntheticBatches
from sae_jax.data.synthetic import SyntheticConfig
from sae_jax.data.synthetic import ground_truth
from sae_jax.data.synthetic import sample_batch

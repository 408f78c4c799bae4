"""Activation sources for SAE training: real text through MiniLM, stores, synthetic data."""

from sae_jax.data import batches
from sae_jax.data import bert
from sae_jax.data import corpus
from sae_jax.data import harvest
from sae_jax.data import minilm
from sae_jax.data import store
from sae_jax.data import synthetic
from sae_jax.data.corpus import CorpusSpec
from sae_jax.data.corpus import iter_documents
from sae_jax.data.minilm import load_minilm
from sae_jax.data.minilm import load_tokenizer
from sae_jax.data.batches import ShuffledBatches
from sae_jax.data.store import StoreReader
from sae_jax.data.store import StoreWriter
from sae_jax.data.store import write_store_from_arrays
from sae_jax.data.synthetic import SyntheticBatches
from sae_jax.data.synthetic import SyntheticConfig
from sae_jax.data.synthetic import ground_truth
from sae_jax.data.synthetic import sample_batch

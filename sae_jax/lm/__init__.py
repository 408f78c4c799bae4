"""Pure-JAX causal language models (GPT-2, GPT-NeoX / Pythia) loaded from local folders.

``load_model(model_dir)`` reads a Hugging Face folder (``config.json``,
safetensors weights) into ``(cfg, params)``; ``forward(params, cfg, ids,
hooks=..., replace=...)`` returns logits and TransformerLens-named hook
activations, and can splice a replacement (an SAE reconstruction) in at any
hook inside the jitted pass.

References:
  Radford et al. 2019, "Language Models are Unsupervised Multitask Learners".
  Black et al. 2022, "GPT-NeoX-20B: An Open-Source Autoregressive Language
  Model", arXiv 2204.06745.
  Biderman et al. 2023, "Pythia: A Suite for Analyzing Large Language Models
  Across Training and Scaling", arXiv 2304.01373.
"""

from sae_jax.lm import checkpoint
from sae_jax.lm import core
from sae_jax.lm import gpt2
from sae_jax.lm import models
from sae_jax.lm import neox
from sae_jax.lm import sharding
from sae_jax.lm.checkpoint import SafetensorsFolder
from sae_jax.lm.checkpoint import load_config
from sae_jax.lm.checkpoint import load_model
from sae_jax.lm.checkpoint import load_tokenizer
from sae_jax.lm.core import LMOutput
from sae_jax.lm.gpt2 import GPT2Config
from sae_jax.lm.models import config_from_hf_dict
from sae_jax.lm.models import forward
from sae_jax.lm.models import hook_names
from sae_jax.lm.neox import NeoXConfig
from sae_jax.lm.sharding import param_partition_specs

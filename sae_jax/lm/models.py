"""One entry point for every supported causal language model.

``forward`` dispatches on the config type; ``config_from_hf_dict`` on the
``model_type`` of a Hugging Face ``config.json``.

References:
  Radford et al. 2019, "Language Models are Unsupervised Multitask Learners".
  Black et al. 2022, "GPT-NeoX-20B: An Open-Source Autoregressive Language
  Model", arXiv 2204.06745.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from jaxtyping import Array, Int

from sae_jax.lm import core, gpt2, neox

LMConfig = gpt2.GPT2Config | neox.NeoXConfig

# Hugging Face model_type -> (config class, weight converter, forward).
ARCHITECTURES: dict[str, tuple[type, Callable[..., Any], Callable[..., core.LMOutput]]] = {
    "gpt2": (gpt2.GPT2Config, gpt2.convert_hf_weights, gpt2.gpt2_forward),
    "gpt_neox": (neox.NeoXConfig, neox.convert_hf_weights, neox.neox_forward),
}


def _architecture(cfg: Any) -> tuple[type, Callable[..., Any], Callable[..., core.LMOutput]]:
  for entry in ARCHITECTURES.values():
    if type(cfg) is entry[0]:
      return entry
  raise ValueError(f"cfg must be one of {[e[0].__name__ for e in ARCHITECTURES.values()]}; got "
                   f"{type(cfg).__name__}.")


def config_from_hf_dict(config: Mapping[str, Any]) -> LMConfig:
  """The config of the architecture that ``config["model_type"]`` names.

  Raises:
    ValueError: for a missing or unsupported ``model_type``.
  """
  model_type = config.get("model_type")
  if model_type not in ARCHITECTURES:
    raise ValueError(f"config.json has model_type={model_type!r}; supported model types are "
                     f"{sorted(ARCHITECTURES)} (GPT-2 and GPT-NeoX / Pythia).")
  return ARCHITECTURES[model_type][0].from_hf_dict(config)


def convert_hf_weights(tensors: Mapping[str, Any], cfg: LMConfig, dtype: Any) -> dict[str, Any]:
  """Maps a Hugging Face state dict onto the shared parameter layout for ``cfg``."""
  return _architecture(cfg)[1](tensors, cfg, dtype)


def forward(
    params: Mapping[str, Any],
    cfg: LMConfig,
    input_ids: Int[Array, "n t"],
    *,
    hooks: Sequence[str] = (),
    replace: Mapping[str, Callable[[Array], Array]] | Sequence[tuple[str, Callable]] | None = None,
    return_logits: bool = True,
) -> core.LMOutput:
  """Runs the model ``cfg`` describes; see ``gpt2.gpt2_forward`` / ``neox.neox_forward``.

  Jittable with ``cfg``, ``hooks``, ``replace`` and ``return_logits`` static
  (or closed over)::

    @functools.partial(jax.jit, static_argnames=("cfg", "hooks"))
    def activations(params, ids, cfg, hooks):
      return forward(params, cfg, ids, hooks=hooks, return_logits=False).activations

  Args:
    params: parameter pytree from ``load_model``.
    cfg: ``GPT2Config`` or ``NeoXConfig``.
    input_ids: ``[n, t]`` token ids in ``[0, cfg.vocab_size)``,
      ``t <= cfg.max_position``.
    hooks: hook names to return, e.g. ``("blocks.3.hook_resid_post",)``; see
      ``hook_names(cfg)``.
    replace: ``{hook_name: fn}``; ``fn(activation) -> same shape`` replaces the
      activation there and everything downstream uses the replacement. A hook
      that is both read and replaced returns the replacement.
    return_logits: False skips the unembedding and the blocks after the last
      requested hook.

  Returns:
    ``LMOutput(logits [n, t, vocab] float32 or None, activations {name: [n, t, d]})``.
  """
  return _architecture(cfg)[2](params, cfg, input_ids, hooks=hooks, replace=replace,
                               return_logits=return_logits)


def hook_names(cfg: LMConfig) -> tuple[str, ...]:
  """Every hook name valid for ``cfg``."""
  _architecture(cfg)
  return core.hook_names(cfg.num_layers, cfg.parallel_residual)

"""A multimodal wrapper's language model, calibrated alone: the calibration runs the causal LM its text config
describes (Llava's Llama, Gemma 3's Gemma3ForCausalLM), whose parameters are the wrapper's under another path
(`model.layers.N...` is the wrapper's `model.language_model.layers.N...`). The vision tower is not run: only the
language model's KV heads change, and what reaches its first layer on text alone is the same in both models.
A plain causal LM is its own wrapper: every name maps to itself.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from gqa_uptrain.errors import UnsupportedModelError


def names_in_wrapper(language_model: PreTrainedModel, wrapper: PreTrainedModel) -> dict[str, str]:
    """The causal LM's parameter names -> the names of the same parameters in `wrapper`: its base model's under the
    path of the wrapper's module of the same class, its head's (lm_head) where the wrapper has one of that name."""
    prefix = language_model.base_model_prefix
    path = _path_of(type(getattr(language_model, prefix)), wrapper)
    wrapper_names = set(wrapper.state_dict())
    names = {}
    for name in language_model.state_dict():
        inside = name.removeprefix(f"{prefix}.")
        mapped = f"{path}.{inside}" if inside != name else name
        if mapped in wrapper_names:
            names[name] = mapped
    return names


def _path_of(kind: type[nn.Module], wrapper: PreTrainedModel) -> str:
    """Where in `wrapper` its language model (a module of class `kind`) sits."""
    path = next((name for name, module in wrapper.named_modules() if type(module) is kind), None)
    if path is None:
        raise UnsupportedModelError(f"{type(wrapper).__name__} holds no {kind.__name__}, the language model its "
                                    "text config describes, for the calibration to run")
    return path

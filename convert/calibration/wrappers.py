"""A multimodal wrapper's language model, calibrated alone: the calibration runs the model its text config
describes, a causal LM (Llava's Llama, Gemma 3's Gemma3ForCausalLM) or, where transformers has none for it, its
base model (Qwen2-VL's Qwen2VLTextModel, the class the wrapper holds; the fits need only its decoder layers). Its
parameters are the wrapper's under another path (`model.layers.N...` or `layers.N...` is the wrapper's
`model.language_model.layers.N...`). The vision tower is not run: only the language model's KV heads change, and what
reaches its first layer on text alone is the same in both models. A plain causal LM is its own wrapper: every name
maps to itself.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from gqa_uptrain.errors import UnsupportedModelError


def names_in_wrapper(language_model: PreTrainedModel, wrapper: PreTrainedModel) -> dict[str, str]:
    """The language model's parameter names -> the names of the same parameters in `wrapper`: its base model's under
    the path of the wrapper's module of the same class, its head's (lm_head) where the wrapper has one of that name."""
    base = language_model.base_model  # the language model itself where it is a base model
    path = _path_of(type(base), wrapper)
    prefix = "" if base is language_model else f"{language_model.base_model_prefix}."
    wrapper_names = set(wrapper.state_dict())
    names = {}
    for name in language_model.state_dict():
        mapped = f"{path}.{name.removeprefix(prefix)}" if name.startswith(prefix) else name
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

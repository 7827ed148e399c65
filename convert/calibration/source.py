"""The checkpoint as the calibration reads it: by the parameter names of the causal LM it runs (a multimodal
wrapper's language model alone, `wrappers.py`), each parameter read as `from_pretrained` would load it (renamed,
or built from several stored tensors by transformers' own rules, as MoE experts are: `loading.py`). The fitted
tensors go back under the checkpoint's own names, which the output keeps.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig, PreTrainedModel

from gqa_uptrain.convert.calibration.layers import skeleton
from gqa_uptrain.convert.calibration.loading import Fused, loaded_names
from gqa_uptrain.convert.calibration.wrappers import names_in_wrapper
from gqa_uptrain.convert.checkpoint_reader import CheckpointReader, TensorInfo
from gqa_uptrain.errors import UnsupportedModelError
from gqa_uptrain.kv_heads import meta_model, text_config


@dataclass(frozen=True)
class SourceNames:
    """Each parameter of the calibrated causal LM: the checkpoint tensor it is, or how it is built from several."""

    config: PretrainedConfig  # the language model's: a wrapper's text config
    model: PreTrainedModel  # the source's model class, on the meta device (transformers' converters may ask it)
    stored: dict[str, str]  # causal LM parameter -> checkpoint name
    fused: dict[str, tuple[str, Fused]]  # causal LM parameter -> its name in `model`, and how it is built

    def has(self, name: str) -> bool:
        return name in self.stored or name in self.fused


def source_names(config: PretrainedConfig, tensors: Collection[str]) -> SourceNames:
    """How the calibration reads the checkpoint of `config` (whose tensor names are `tensors`); UnsupportedModelError
    when transformers builds no model (causal LM or base model) from its text config."""
    text = text_config(config)
    try:
        language_model = skeleton(text)
    except ValueError:  # transformers has no model class for this text config
        raise UnsupportedModelError(f"its language model ({text.model_type}) has no model class in transformers "
                                    "for the calibration to run alone") from None
    model = language_model if text is config else meta_model(config)
    loaded = loaded_names(model, tensors)
    stored, fused = {}, {}
    for name, inside in names_in_wrapper(language_model, model).items():
        if inside in loaded.stored:
            stored[name] = loaded.stored[inside]
        elif inside in loaded.fused:
            fused[name] = (inside, loaded.fused[inside])
    return SourceNames(text, model, stored, fused)


class SourceReader:
    """A `CheckpointReader` seen by the causal LM's names (`layers.py` reads through its `tensors` and `read`)."""

    def __init__(self, names: SourceNames, reader: CheckpointReader):
        self.names, self.reader = names, reader
        self.tensors: dict[str, TensorInfo] = {name: reader.tensors[stored] for name, stored in names.stored.items()}

    def read(self, name: str) -> torch.Tensor:
        """One parameter of the causal LM, in its stored dtype."""
        if name in self.names.fused:
            inside, fused = self.names.fused[name]
            return fused.build(inside, self.reader.read, self.names.model)
        return self.reader.read(self.names.stored[name])

    def stored_name(self, name: str) -> str | None:
        """The checkpoint's name for a parameter stored as one tensor (None for those built from several)."""
        return self.names.stored.get(name)


def source_reader(config: PretrainedConfig, reader: CheckpointReader) -> SourceReader:
    return SourceReader(source_names(config, reader.tensors), reader)

"""One decoder layer at a time: the model is built on the meta device and only the layer at hand (plus the
embeddings) is given real weights, read from the checkpoint, so memory holds one layer and the hidden states.

Layer inputs are caught the way GPTQ-style quantizers catch them: the model's own forward runs up to the first
decoder layer, whose pre-hook records its arguments (hidden states, rotary cos/sin, mask) and stops the run. So
whatever an architecture does before its layers (embedding scale, rotary variant, mask) is done by its own code.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from gqa_uptrain.convert.checkpoint_reader import CheckpointReader, stored_name
from gqa_uptrain.errors import CheckpointError, UnsupportedModelError


class _Stop(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of a forward pass."""


def skeleton(config: PretrainedConfig, device: torch.device | str = "meta") -> nn.Module:
    """The model, on the meta device by default (no memory): the causal LM, or its base model where transformers
    has no causal LM for the config (Qwen2-VL's text config: the wrapper's own text model), which is enough, as
    only the decoder layers are run."""
    auto = AutoModelForCausalLM if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else AutoModel
    with torch.device(device):
        return auto.from_config(config, dtype=torch.float32)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The qualified name and the ModuleList of the decoder layers (those with attention; a hybrid's others have
    none: LFM2's short convolutions, GraniteMoeHybrid's Mamba layers)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(has_attention(layer) for layer in module):
            return name, module
    raise UnsupportedModelError(f"{type(model).__name__}: no list of decoder layers with attention "
                                f"({' or '.join(ATTENTION_NAMES)})")


ATTENTION_NAMES = ("self_attn", "self_attention")  # self_attention: Falcon's


def attention_name(layer: nn.Module) -> str | None:
    """The name under which a decoder layer holds its attention block, or None where it has none (LFM2's conv
    layers have no `self_attn`, GraniteMoeHybrid's Mamba layers a `self_attn` of None)."""
    return next((name for name in ATTENTION_NAMES if getattr(layer, name, None) is not None), None)


def attention_of(layer: nn.Module) -> nn.Module:
    """A decoder layer's attention block (the layer must have one)."""
    return getattr(layer, attention_name(layer))


def has_attention(layer: nn.Module) -> bool:
    return attention_name(layer) is not None


def first_attention(layers: nn.ModuleList) -> tuple[int, nn.Module]:
    """The first decoder layer with attention, and its index: the one whose attention stands for all of them."""
    return next((i, layer) for i, layer in enumerate(layers) if has_attention(layer))


def checkpoint_name(name: str, reader: CheckpointReader) -> str:
    """The checkpoint's name for a parameter (the plan has checked that every parameter is stored)."""
    return stored_name(name, reader.tensors) or name


def read_finite(reader: CheckpointReader, name: str) -> torch.Tensor:
    """A source tensor the calibration computes with, in fp32. A NaN or infinity in it would flow through every
    fit (torch's solvers pass them on without a word) into q/k/v/o projections that are all NaN: refused here,
    naming the tensor."""
    tensor = reader.read(name).float()
    if not bool(torch.isfinite(tensor).all()):
        stored = reader.tensors[name].name if name in reader.tensors else name  # the checkpoint's name for it
        raise CheckpointError(f"source tensor {stored} holds NaN or infinite values: a calibrated "
                              "conversion cannot fit to it (the converted attention would be NaN)")
    return tensor


def materialize(module: nn.Module, prefix: str, reader: CheckpointReader, device: torch.device) -> nn.Module:
    """Give a meta module real fp32 weights from the checkpoint."""
    module.to_empty(device=device)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.copy_(read_finite(reader, checkpoint_name(f"{prefix}.{name}", reader)))
    return module


@dataclass
class Embedder:
    """Runs the model's own forward up to its decoder layers and returns the first one's input, and catches each
    layer's keyword arguments (rotary cos/sin, mask), which differ by layer kind: Gemma 3's sliding and full attention
    layers turn by different tables, a hybrid's convolution or Mamba layers take masks of their own."""

    model: nn.Module
    layers: nn.ModuleList  # one decoder layer of each kind, in the order the kinds first appear
    kinds: list[str | None]  # each decoder layer's kind (`config.layer_types`; None where the config names none)
    caught: dict[str | None, dict] = field(default_factory=dict)  # kind -> the keyword arguments its layers get

    @property
    def kwargs(self) -> list[dict]:
        """Each decoder layer's keyword arguments, as the model's own forward passes them."""
        return [self.caught[kind] for kind in self.kinds]

    @property
    def inv_freq(self) -> torch.Tensor | None:
        """RoPE's angle per position of each frequency pair, as the model's own rotary module computed it."""
        return next((m.inv_freq for m in self.model.modules() if isinstance(getattr(m, "inv_freq", None),
                                                                         torch.Tensor)), None)

    @classmethod
    def build(cls, config: PretrainedConfig, reader: CheckpointReader, device: torch.device) -> "Embedder":
        """The model cut to one decoder layer of each kind, built for real (so buffers such as rotary tables and
        embedding scales are computed by its own code), with every weight outside the layers read from the
        checkpoint (the layers' own weights are never used: only their inputs are caught)."""
        kinds = list(getattr(config, "layer_types", None) or [None] * config.num_hidden_layers)
        model = skeleton(_one_layer_per_kind(config, list(dict.fromkeys(kinds))), device)
        layers_name, layers = decoder_layers(model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                stored = checkpoint_name(name, reader)
                if not name.startswith(layers_name + ".") and stored in reader.tensors:
                    param.copy_(read_finite(reader, stored))
        return cls(model, layers, kinds)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = []
        kinds = list(dict.fromkeys(self.kinds))

        def catch(i: int):
            def hook(module, args, kwargs):
                if i == 0:
                    hidden.append(args[0] if args else kwargs["hidden_states"])
                self.caught[kinds[i]] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                if i == len(self.layers) - 1:
                    raise _Stop
            return hook

        handles = [layer.register_forward_pre_hook(catch(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return hidden[0]


def _one_layer_per_kind(config: PretrainedConfig, kinds: list[str | None]) -> PretrainedConfig:
    values = config.to_dict()
    values.pop("model_type", None)
    values["num_hidden_layers"] = len(kinds)
    if values.get("layer_types"):
        values["layer_types"] = kinds
    return type(config)(**values)


OUTPUT_PROJECTIONS = ("o_proj", "dense", "out_proj")  # dense: Phi's name for it, out_proj LFM2's


def output_name(attention: nn.Module) -> str:
    """The name of the attention's output projection (o_proj, Phi's dense, LFM2's out_proj)."""
    return next(name for name in OUTPUT_PROJECTIONS if isinstance(getattr(attention, name, None), nn.Linear))


def output_projection(attention: nn.Module) -> nn.Linear:
    """The attention's output projection, whose input is the heads' outputs side by side."""
    return getattr(attention, output_name(attention))


def layer_output(output) -> torch.Tensor:
    """Decoder layers return the hidden states, or a tuple that starts with them."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capture_attention(attention: nn.Module, stop_at_output_projection: bool = False):
    """Record the attention block's input, its output and the input of its output projection.

    With `stop_at_output_projection` the forward stops there (raising _Stop, which `run_layer` swallows).
    """
    seen: dict[str, torch.Tensor] = {}

    def before(module, args, kwargs):
        seen["input"] = args[0] if args else kwargs["hidden_states"]

    def after(module, args, kwargs, output):
        seen["output"] = output[0] if isinstance(output, tuple) else output

    def projection(module, args):
        seen["heads"] = args[0]
        if stop_at_output_projection:
            raise _Stop

    handles = [attention.register_forward_pre_hook(before, with_kwargs=True),
               attention.register_forward_hook(after, with_kwargs=True),
               output_projection(attention).register_forward_pre_hook(projection)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """The layer's output, or None when a capture stopped it early."""
    try:
        return layer_output(layer(hidden, **kwargs))
    except _Stop:
        return None

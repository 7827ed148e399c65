"""Engine-style decoding: greedy tokens the way a serving engine computes them, with the stock model classes.

Two pieces:
- attention that reads each KV head once (`packed_gqa_sdpa`; `packed_gqa_split_kv` hands one-token steps on a GPU
  to the split-KV Triton kernel of `decode_kernels`). `register_attention` makes both known to transformers'
  `AttentionInterface` by name; `packed_gqa_attention` calls it and switches a model over for a block.
- `fused_projections`: the projections a block takes of one input (q/k/v, gate/up) as one matrix product each, so a
  decode step launches three fewer skinny matrix products per layer.
- `StaticDecoder`: a preallocated `StaticCache`, and a decode step (forward, greedy pick, cache write) that runs on
  the device with no host round trip, so on a GPU it is captured once in a CUDA graph and replayed.

Importing this module registers nothing: transformers' attention registry changes only when a model is switched.
How fast this runs is measured in `speed.py`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel, StaticCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from gqa_uptrain.errors import ConfigError, UnsupportedModelError, one_line

try:  # Triton comes with CUDA builds of torch; without it there is no split-KV kernel
    from gqa_uptrain.eval import decode_kernels
except ImportError:
    decode_kernels = None

PACKED_GQA_ATTENTION = "packed_gqa_sdpa"
SPLIT_KV_ATTENTION = "packed_gqa_split_kv"
WARMUP_STEPS = 2  # eager steps before a CUDA graph is captured (cuBLAS workspaces, compilation)


def packed_gqa_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Scaled dot-product attention that reads each KV head once: K/V are never repeated up to the query heads.

    Decoding one token, the G query heads that share a KV head become G query rows of that head,
    (B, H, 1, D) -> (B, H_kv, G, D): a plain attention over the KV heads that every SDPA kernel runs, with a mask
    too (`enable_gqa` with a mask falls back to the math kernel on CUDA). Longer queries (prefill) use `enable_gqa`.
    Query head h uses KV head h // G, as in transformers' `repeat_kv`.
    """
    if kwargs.get("softcap") is not None:
        raise UnsupportedModelError("packed GQA attention does not support attention-logit soft-capping")
    batch, heads, q_len, _ = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    if q_len == 1:
        if attention_mask is not None and attention_mask.shape[1] > 1:  # a per-head mask follows its query head
            attention_mask = attention_mask.reshape(batch, kv_heads, groups, -1)
        packed = query.reshape(batch, kv_heads, groups, query.shape[-1])
        out = F.scaled_dot_product_attention(
            packed, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
        )
        return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2), None
    causal = attention_mask is None
    if causal and key.shape[2] > q_len:  # prefill into an empty static cache: the slots past the prompt are unwritten
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=groups > 1,
    )
    return out.transpose(1, 2).contiguous(), None


def packed_gqa_split_kv(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`packed_gqa_sdpa`, with one-token steps on a GPU in the split-KV Triton kernel (`decode_kernels`).

    SDPA kernels give one program per (sequence, KV head); with few KV heads that leaves most of a GPU idle.
    """
    batch, heads, q_len, dim = query.shape
    if q_len == 1 and decode_kernels is not None and dropout == 0.0:
        packed = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)
        if decode_kernels.supports(packed, key, value, attention_mask):
            scale = scaling if scaling is not None else dim**-0.5
            out = decode_kernels.split_kv_decode(packed, key, value, attention_mask, scale)
            return out.reshape(batch, heads, 1, dim).transpose(1, 2), None
    return packed_gqa_sdpa(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


ATTENTION_FUNCTIONS = {PACKED_GQA_ATTENTION: packed_gqa_sdpa, SPLIT_KV_ATTENTION: packed_gqa_split_kv}


def split_kv_available() -> bool:
    """Whether the split-KV Triton kernel can run here (Triton is installed); it runs on CUDA tensors only."""
    return decode_kernels is not None


def register_attention() -> None:
    """Make the packed-GQA attention functions known to transformers by name, with stock SDPA's boolean masks.

    Done when a model is switched over (`packed_gqa_attention`), never at import; registering again is harmless.
    """
    for name, function in ATTENTION_FUNCTIONS.items():
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)


def attention_implementation(model: PreTrainedModel) -> str | None:
    """The name of the attention implementation `model` runs now.

    transformers 5 has a public setter (`set_attn_implementation`) but no public getter: the private config
    attribute is read here and nowhere else, so a rename in transformers has one place to follow.
    """
    return model.config._attn_implementation


@contextmanager
def switched_attention(model: PreTrainedModel, wanted: str, purpose: str) -> Iterator[None]:
    """Run `model` with the registered attention `wanted` inside the block, its own after it (also after an error);
    a model that cannot switch is refused in one line that starts with `purpose`."""
    previous = attention_implementation(model)
    try:
        model.set_attn_implementation(wanted)
    except (ValueError, KeyError) as error:  # e.g. Gemma-2: soft-capped attention logits, which SDPA cannot compute
        raise UnsupportedModelError(f"{purpose}: {one_line(error)}") from error
    if attention_implementation(model) != wanted:
        raise UnsupportedModelError(f"{type(model).__name__} cannot switch its attention implementation")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextmanager
def packed_gqa_attention(model: PreTrainedModel, split_kv: bool = False) -> Iterator[None]:
    """Run `model` with `packed_gqa_sdpa` (or `packed_gqa_split_kv`) inside the block, its own attention after it."""
    register_attention()
    wanted = SPLIT_KV_ATTENTION if split_kv else PACKED_GQA_ATTENTION
    with switched_attention(model, wanted, "engine-style decode needs SDPA attention"):
        yield


# Sibling projections that a block applies to one input, in the order its forward calls them.
FUSABLE_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
FUSED_TOLERANCE = 0.05  # relative logit difference above which the fused model is not the same model


class _Outputs:
    """The split result of the last fused product, handed from the first projection called to its siblings."""

    parts: tuple[torch.Tensor, ...] = ()


class _FusedPart(nn.Module):
    """Stands in for one projection of a fused group: the first computes the group's product, the others read it.

    A decode step is a chain of skinny matrix products (a few rows against a whole weight), each paying a launch
    and a ramp-up and tail on the GPU; one product over the concatenated weights pays them once. The split relies on
    the block calling its projections in `FUSABLE_PROJECTIONS` order, which `fused_projections` checks.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int], index: int,
                 outputs: _Outputs) -> None:
        super().__init__()
        self.fused_weight, self.fused_bias, self.sizes, self.index, self.outputs = weight, bias, sizes, index, outputs

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.index == 0:
            self.outputs.parts = F.linear(hidden, self.fused_weight, self.fused_bias).split(self.sizes, dim=-1)
        return self.outputs.parts[self.index]


def _fusable_groups(model: nn.Module) -> Iterator[tuple[nn.Module, tuple[str, ...]]]:
    """(block, names) for every block whose sibling projections are plain linears of one input size and dtype."""
    for block in model.modules():
        for names in FUSABLE_PROJECTIONS:
            linears = [getattr(block, name, None) for name in names]
            if not all(type(linear) is nn.Linear for linear in linears):
                continue
            if len({(lin.in_features, lin.weight.dtype, lin.bias is None) for lin in linears}) == 1:
                yield block, names


def _fuse(block: nn.Module, names: tuple[str, ...]) -> list[nn.Linear]:
    """Swap `names` of `block` for the parts of one fused product; returns the linears taken out."""
    linears = [getattr(block, name) for name in names]
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = None if linears[0].bias is None else torch.cat([lin.bias.detach() for lin in linears])
    sizes, outputs = [lin.out_features for lin in linears], _Outputs()
    for index, name in enumerate(names):
        setattr(block, name, _FusedPart(weight, bias, sizes, index, outputs))
    return linears


@contextmanager
def fused_projections(model: PreTrainedModel, probe: torch.Tensor | None = None) -> Iterator[int]:
    """Run `model` with each block's q/k/v and gate/up projections as one matrix product each, inside the block.

    Yields the number of groups fused. The fused weights are copies, freed on exit, so the model's own parameters
    stay untouched for anything else that holds them; they cost the size of those projections again while the
    block runs (7.4 GB for a 7B Llama in bf16). With
    `probe` (token ids), the logits are compared with the unfused model's first: a block that calls its projections
    in another order would give other logits, and is refused in one line rather than decoded wrongly.
    """
    expected = None if probe is None else _probe_logits(model, probe)
    taken = [(block, names, _fuse(block, names)) for block, names in list(_fusable_groups(model))]
    try:
        difference = None if expected is None else _relative_difference(model, probe, expected)
        if difference is not None and difference > FUSED_TOLERANCE:
            raise UnsupportedModelError(
                f"{type(model).__name__} does not call its projections in the order {FUSABLE_PROJECTIONS} "
                f"(fused logits differ by {difference:.2g} relative): cannot fuse them"
            )
        yield len(taken)
    finally:
        for block, names, linears in taken:
            for name, linear in zip(names, linears):
                _release_part(getattr(block, name))
                setattr(block, name, linear)


def _release_part(part: _FusedPart) -> None:
    """Drop what a part holds (the fused weights, the last product, which may live in a CUDA graph's memory pool),
    so that nothing a compiled step's caches still reference keeps them alive after the block."""
    part.outputs.parts, part.fused_weight, part.fused_bias = (), None, None


@torch.no_grad()
def _probe_logits(model: PreTrainedModel, probe: torch.Tensor) -> torch.Tensor:
    return model(probe, use_cache=False).logits.float()


def _relative_difference(model: PreTrainedModel, probe: torch.Tensor, expected: torch.Tensor) -> float:
    """How far the fused model's logits on `probe` are from `expected`, relative to their size (a norm ratio: bf16
    rounds one product over the concatenated weights differently from several, elementwise, by more than any fixed
    tolerance over a 32-layer model). A sibling called before the first of its group finds no product: infinite."""
    try:
        return float((_probe_logits(model, probe) - expected).norm() / expected.norm().clamp_min(1e-12))
    except IndexError:
        return float("inf")


def cache_argument(model: PreTrainedModel) -> str:
    """The name of the KV-cache argument of `model.forward`: `cache` in the transformers 5 releases that renamed it
    (where the old `past_key_values` raises a FutureWarning at every call), `past_key_values` in the earlier ones."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class StaticDecoder:
    """Greedy decoding the way a serving engine runs it, one token per `step()`.

    The prompt is prefilled into a preallocated `StaticCache` at construction. A step feeds the last token at its
    position, picks the next greedily and writes it into `tokens`, all on the device with no host round trip, so on a
    GPU it is captured once in a CUDA graph (after `warm_up`) and replayed. Use inside `packed_gqa_attention(model)`.
    """

    def __init__(
        self, model: PreTrainedModel, input_ids: torch.Tensor, max_new_tokens: int, *,
        cuda_graph: bool | None = None, compile: bool = False,
    ) -> None:
        batch, context = input_ids.shape
        self.model, self.context, self.max_new_tokens = model, context, max_new_tokens
        self.device = input_ids.device
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.cache = StaticCache(config=model.config, max_cache_len=context + max_new_tokens)
        self._cache_kwarg = {cache_argument(model): self.cache}
        self.tokens = torch.zeros(batch, context + max_new_tokens, dtype=torch.long, device=self.device)
        self.tokens[:, :context] = input_ids
        with torch.no_grad():
            logits = model(
                input_ids, position_ids=torch.arange(context, device=self.device)[None], **self._cache_kwarg,
                use_cache=True, logits_to_keep=1,
            ).logits
        self.tokens[:, context] = logits[:, -1].argmax(-1)
        self.produced = 1
        self._token = self.tokens[:, context : context + 1].clone()  # static input buffers of the step
        self._position = torch.full((1, 1), context, dtype=torch.long, device=self.device)
        self._step = torch.compile(self._decode_step, dynamic=False) if compile else self._decode_step
        self._graph: torch.cuda.CUDAGraph | None = None

    def _decode_step(self) -> None:
        logits = self.model(
            input_ids=self._token, position_ids=self._position, **self._cache_kwarg, use_cache=True
        ).logits
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        self._token.copy_(next_token)
        self._position.add_(1)
        self.tokens.index_copy_(1, self._position.view(1), next_token)

    def _advance(self) -> None:
        if self.produced >= self.max_new_tokens:
            raise ConfigError(f"the static cache holds {self.max_new_tokens} new tokens; no room for another")
        self.produced += 1

    @torch.no_grad()
    def warm_up(self, steps: int = WARMUP_STEPS) -> None:
        """Take `steps` real decode steps uncaptured (compiling if asked), then capture the CUDA graph if enabled."""
        stream = torch.cuda.Stream() if self.cuda_graph else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for _ in range(steps):
                self._advance()
                self._step()
        if stream is None:
            return
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):  # recorded, not run: the state does not advance here
            self._step()

    @torch.no_grad()
    def step(self, replay: bool = True) -> None:
        """One decode step: a graph replay once captured (unless `replay` is off: then its kernels are launched one
        by one, as a profiler needs to see them), otherwise the step itself."""
        self._advance()
        if self._graph is not None and replay:
            self._graph.replay()
        else:
            self._step()


@contextmanager
def engine(model: PreTrainedModel, input_ids: torch.Tensor, split_kv: bool, fuse: bool) -> Iterator[None]:
    """The engine's model inside the block: packed-GQA attention and, if `fuse`, fused projections (checked on a
    few tokens of `input_ids`)."""
    with packed_gqa_attention(model, split_kv), (
        fused_projections(model, probe=input_ids[:1, :8]) if fuse else nullcontext()
    ):
        yield


def engine_name(device: torch.device, cuda_graph: bool, compile: bool, split_kv: bool, fuse: bool = False) -> str:
    """How the engine-style decode ran, for the report."""
    kernel = "split-KV Triton decode attention" if split_kv and split_kv_available() and device.type == "cuda" else None
    return ", ".join(["static KV cache", kernel or "packed-GQA SDPA"] + ["fused projections"] * fuse
                     + ["CUDA graph"] * cuda_graph + ["torch.compile"] * compile)

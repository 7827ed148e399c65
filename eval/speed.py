"""Decode speed, base vs candidate, in the memory-bound regime grouped-query attention targets.

For each (batch, context) three figures, measured in the same process:
- engine-style decode (`tokens_per_s`): a static, preallocated KV cache; attention that reads each KV head once
  (`packed_gqa_sdpa`, or the split-KV Triton kernel of `decode_kernels` with `split_kv=True`, registered with
  transformers' `AttentionInterface`, so the stock model classes run unchanged); on a GPU the whole decode step
  (forward, greedy pick, cache write) captured in a CUDA graph, compiled by default. This is how a serving engine
  runs a model, and where the smaller KV cache of GQA shows.
- stock `generate()` (`generate_tokens_per_s`): dynamic cache, re-concatenated every step, a host round trip per
  token, and K/V repeated up to the query heads where transformers does so. It hides much of the gain.
- the memory-bound floor (`floor_tokens_per_s`): each decode step reads every weight and the K/V of the whole context
  once, at the device bandwidth measured with a large device-to-device copy. No implementation beats it by much.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from itertools import product

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AttentionInterface, PreTrainedModel, StaticCache, StoppingCriteria, StoppingCriteriaList
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from gqa_uptrain.errors import ConfigError, UnsupportedModelError
from gqa_uptrain.eval.kv_cache import kv_cache_bytes, kv_cache_bytes_per_token

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


for _name, _function in ((PACKED_GQA_ATTENTION, packed_gqa_sdpa), (SPLIT_KV_ATTENTION, packed_gqa_split_kv)):
    AttentionInterface.register(_name, _function)
    AttentionMaskInterface.register(_name, sdpa_mask)  # the same boolean masks as stock SDPA


@contextmanager
def packed_gqa_attention(model: PreTrainedModel, split_kv: bool = False) -> Iterator[None]:
    """Run `model` with `packed_gqa_sdpa` (or `packed_gqa_split_kv`) inside the block, its own attention after it."""
    previous = model.config._attn_implementation
    wanted = SPLIT_KV_ATTENTION if split_kv else PACKED_GQA_ATTENTION
    try:
        model.set_attn_implementation(wanted)
    except ValueError as error:  # e.g. Gemma-2: soft-capped attention logits, which SDPA cannot compute
        reason = str(error).split(". ")[0]
        raise UnsupportedModelError(f"engine-style decode needs SDPA attention: {reason}") from error
    if model.config._attn_implementation != wanted:
        raise UnsupportedModelError(f"{type(model).__name__} cannot switch its attention implementation")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


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
        self.tokens = torch.zeros(batch, context + max_new_tokens, dtype=torch.long, device=self.device)
        self.tokens[:, :context] = input_ids
        with torch.no_grad():
            logits = model(
                input_ids, position_ids=torch.arange(context, device=self.device)[None], past_key_values=self.cache,
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
            input_ids=self._token, position_ids=self._position, past_key_values=self.cache, use_cache=True
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
    def step(self) -> None:
        """One decode step: a graph replay once captured, otherwise the step itself."""
        self._advance()
        if self._graph is not None:
            self._graph.replay()
        else:
            self._step()


def engine_generate(
    model: PreTrainedModel, input_ids: torch.Tensor, new_tokens: int, *,
    cuda_graph: bool | None = None, compile: bool = False, split_kv: bool = False,
) -> torch.Tensor:
    """Greedy continuation of `input_ids` by `StaticDecoder`: prompt plus `new_tokens` tokens, like `generate()`."""
    with packed_gqa_attention(model, split_kv):
        decoder = StaticDecoder(model, input_ids, new_tokens, cuda_graph=cuda_graph, compile=compile)
        if new_tokens > 1:
            decoder.warm_up(min(WARMUP_STEPS, new_tokens - 1))
        while decoder.produced < new_tokens:
            decoder.step()
    return decoder.tokens


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of `fn` on the device: CUDA events around it on a GPU, the host clock elsewhere."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure_bandwidth(device: torch.device | str, nbytes: int | None = None, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s: a large device-to-device copy, bytes read plus bytes written, median time.

    The buffer (1 GiB on a GPU, far past any cache; 256 MiB elsewhere) holds random data, never zeros.
    """
    device = torch.device(device)
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    source = torch.rand(nbytes // 4, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    _synchronize(device)
    seconds = statistics.median(_seconds(lambda: target.copy_(source), device) for _ in range(repeats))
    return 2 * source.numel() * source.element_size() / seconds


def weight_bytes_per_step(model: PreTrainedModel) -> int:
    """Bytes of weights one decode step reads: every parameter, less an untied input embedding (a gather of B rows)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    if output is None or output.weight is not embedding:
        total -= embedding.numel() * embedding.element_size()
    return total


def decode_floor_seconds(model: PreTrainedModel, batch: int, context: float, bandwidth: float) -> float:
    """Memory-bound floor of one decode step: (weight bytes + KV-cache bytes of the context) / bandwidth."""
    kv_bytes = kv_cache_bytes(model.config, round(context), batch=batch, dtype=model.dtype)
    return (weight_bytes_per_step(model) + kv_bytes) / bandwidth


class _StepClock(StoppingCriteria):
    """Stamps the time after every token `generate()` adds (it checks stopping criteria once per step)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        _synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_seconds_per_step(model: PreTrainedModel, input_ids: torch.Tensor, steps: int) -> float:
    """Seconds per decode step of stock greedy `generate()`, prefill and the first token left out."""
    clock = _StepClock(input_ids.device)
    model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=steps + 1, do_sample=False,
        eos_token_id=None, pad_token_id=model.generation_config.pad_token_id or 0,  # no early stop, as in the engine
        stopping_criteria=StoppingCriteriaList([clock]),
    )
    return (clock.stamps[-1] - clock.stamps[0]) / (len(clock.stamps) - 1)


def engine_seconds_per_step(
    model: PreTrainedModel, input_ids: torch.Tensor, steps: int, *, cuda_graph: bool | None = None,
    compile: bool = False, split_kv: bool = False,
) -> float:
    """Seconds per engine-style decode step, timed over `steps` back-to-back steps after the warm-up."""
    with packed_gqa_attention(model, split_kv):
        decoder = StaticDecoder(
            model, input_ids, WARMUP_STEPS + steps + 1, cuda_graph=cuda_graph, compile=compile
        )
        decoder.warm_up()
        _synchronize(input_ids.device)

        def run() -> None:
            for _ in range(steps):
                decoder.step()

        return _seconds(run, input_ids.device) / steps


def engine_name(device: torch.device, cuda_graph: bool, compile: bool, split_kv: bool) -> str:
    """How the engine-style decode ran, for the report."""
    kernel = "split-KV Triton decode attention" if split_kv and decode_kernels and device.type == "cuda" else None
    return ", ".join(["static KV cache", kernel or "packed-GQA SDPA"] + ["CUDA graph"] * cuda_graph
                     + ["torch.compile"] * compile)


def _release(device: torch.device, compiled: bool) -> None:
    """Free the last case's cache and graphs before the next one is allocated."""
    if compiled:
        torch._dynamo.reset()  # a fresh compile per case: no silent fallback to eager past dynamo's recompile limit
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _check_sizes(batch_sizes: Sequence[int], context_lengths: Sequence[int], new_tokens: int) -> None:
    for name, values in (("batch size", batch_sizes), ("context length", context_lengths)):
        if not values or any(int(v) != v or v < 1 for v in values):
            raise ConfigError(f"every {name} must be a positive integer, got {list(values)}")
    if new_tokens < 2:
        raise ConfigError(f"new_tokens must be at least 2 to time a decode step, got {new_tokens}")


def measure_decode(
    model: PreTrainedModel,
    batch_sizes: Sequence[int],
    context_lengths: Sequence[int],
    new_tokens: int = 64,
    *,
    bandwidth: float | None = None,
    cuda_graph: bool | None = None,
    compile: bool | None = None,
    split_kv: bool | None = None,
    stock_generate: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """Decode speed of `model` for every (batch, context): engine-style, stock `generate()` and the floor.

    Prompts are random token ids (speed does not depend on them). `new_tokens` decode steps are timed per case,
    and the floor is taken at the mean context of those steps. `cuda_graph` and `compile` default to on for a CUDA
    device and off elsewhere; compiling costs about a minute per case for a 7B model on an H100 and brought the
    engine from 71-79% to 85-91% of the floor there (docs/benchmarks.md). `split_kv` decodes with the split-KV
    Triton kernel (`decode_kernels`); it defaults to on for a CUDA device where Triton is installed, since it took
    GQA-8 from 52-64% to 72-76% of the floor on an H100 (docs/benchmarks.md). Each case returns a dict:
    `batch`, `context`, `tokens_per_s` (engine-style), `generate_tokens_per_s`, `floor_tokens_per_s`,
    `fraction_of_floor` (engine over floor), `generate_fraction_of_floor`, and the bytes and bandwidth behind the
    floor.
    """
    _check_sizes(batch_sizes, context_lengths, new_tokens)
    device = model.device
    cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    compile = device.type == "cuda" if compile is None else compile
    split_kv = device.type == "cuda" and decode_kernels is not None if split_kv is None else split_kv
    bandwidth = bandwidth or measure_bandwidth(device)
    generator = torch.Generator().manual_seed(seed)
    results = []
    cases = list(product(batch_sizes, context_lengths))
    for batch, context in tqdm(cases, desc="decode speed", disable=not progress):
        input_ids = torch.randint(model.config.get_text_config().vocab_size, (batch, context), generator=generator)
        input_ids = input_ids.to(device)
        engine_s = engine_seconds_per_step(
            model, input_ids, new_tokens, cuda_graph=cuda_graph, compile=compile, split_kv=split_kv
        )
        _release(device, compile)
        generate_s = generate_seconds_per_step(model, input_ids, new_tokens) if stock_generate else None
        _release(device, False)
        floor_s = decode_floor_seconds(model, batch, context + new_tokens / 2, bandwidth)
        results.append({
            "batch": batch,
            "context": context,
            "new_tokens": new_tokens,
            "tokens_per_s": batch / engine_s,
            "generate_tokens_per_s": batch / generate_s if generate_s else None,
            "floor_tokens_per_s": batch / floor_s,
            "fraction_of_floor": floor_s / engine_s,
            "generate_fraction_of_floor": floor_s / generate_s if generate_s else None,
            "engine": engine_name(device, cuda_graph, compile, split_kv),
            "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model.config, dtype=model.dtype),
            "weight_bytes": weight_bytes_per_step(model),
            "kv_cache_bytes": kv_cache_bytes(model.config, round(context + new_tokens / 2), batch, model.dtype),
            "bandwidth_bytes_per_s": bandwidth,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        })
    return results

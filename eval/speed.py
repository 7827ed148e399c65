"""Decode speed, base vs candidate, in the memory-bound regime grouped-query attention targets.

For each (batch, context) three figures, measured in the same process:
- engine-style decode (`tokens_per_s`): `decode_engine`'s static, preallocated KV cache and attention that reads each
  KV head once (`packed_attention`'s `packed_gqa_sdpa`, or the split-KV Triton kernel of `decode_kernels` with
  `split_kv=True`); on a GPU the whole decode step captured in a CUDA graph, compiled by default. This is how a
  serving engine runs a model, and where the smaller KV cache of GQA shows.
- stock `generate()` (`generate_tokens_per_s`): dynamic cache, re-concatenated every step, a host round trip per
  token, and K/V repeated up to the query heads where transformers does so. It hides much of the gain.
- the memory-bound floor (`floor_tokens_per_s`): each decode step reads every weight and the K/V of the whole context
  once, at the device bandwidth measured with a large device-to-device copy. No implementation beats it by much.

This module only times; what runs is in `decode_engine.py`.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from itertools import product

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, StoppingCriteria, StoppingCriteriaList

from gqa_uptrain.errors import ConfigError
from gqa_uptrain.kv_heads import kv_cache_bytes, kv_cache_bytes_per_token

from .decode_engine import WARMUP_STEPS, StaticDecoder, engine, engine_name
from .packed_attention import split_kv_available


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


# Kernel-name fragments that say what a kernel does, first match wins; the rest is elementwise work, norms, RoPE.
KERNEL_CLASSES = (
    ("attention", ("_split_kernel", "_merge_kernel", "flash", "fmha", "attention", "decode", "sdpa")),
    ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "splitk")),
)
SHORT_KERNEL_SECONDS = 5e-6  # a kernel this short is bound by its launch and ramp-up, not by the bytes it reads


def kernel_class(name: str) -> str:
    """'attention', 'matmul' or 'other', from a CUDA kernel's name."""
    lowered = name.lower()
    return next((kind for kind, parts in KERNEL_CLASSES if any(part in lowered for part in parts)), "other")


def profile_steps(decoder: StaticDecoder, steps: int) -> dict | None:
    """What the GPU does in one decode step: kernels launched, and seconds of kernel time by class; None where the
    profiler sees no kernels (no CUPTI access), rather than a step that seems to be all gaps.

    The steps are launched kernel by kernel (a CUDA graph hides its kernels from the profiler); a kernel takes as
    long either way, so the sum over kernels set against the step time of the graph says how much of a step the
    GPU spends between kernels.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            decoder.step(replay=False)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        return None
    seconds = {kind: 0.0 for kind in ("attention", "matmul", "other")}
    short = 0.0
    for event in kernels:
        duration = event.time_range.elapsed_us() / 1e6
        seconds[kernel_class(event.name)] += duration / steps
        short += duration / steps if duration < SHORT_KERNEL_SECONDS else 0.0
    return {"kernels_per_step": len(kernels) / steps, "kernel_seconds": seconds,
            "busy_seconds": sum(seconds.values()), "short_kernel_seconds": short}


def launch_bound_share(kernels: dict | None, step_seconds: float) -> float | None:
    """The part of a step bound by launching kernels, not by reading bytes: the time no kernel runs plus the time
    in kernels too short to reach full bandwidth. Where it is large, fewer KV heads buy little (a small model, MQA
    at a small batch): the bytes they save were not what the step waited for."""
    if not kernels:
        return None
    idle = max(0.0, step_seconds - kernels["busy_seconds"])
    return min(1.0, (idle + kernels["short_kernel_seconds"]) / step_seconds)


def engine_seconds_per_step(
    model: PreTrainedModel, input_ids: torch.Tensor, steps: int, *, cuda_graph: bool | None = None,
    compile: bool = False, split_kv: bool = False, fuse: bool = False, profile: int = 0,
) -> tuple[float, dict | None]:
    """Seconds per engine-style decode step, timed over `steps` back-to-back steps after the warm-up, and with
    `profile` > 0 (CUDA only) the kernels of that many more steps (`profile_steps`)."""
    with engine(model, input_ids, split_kv, fuse):
        decoder = StaticDecoder(
            model, input_ids, WARMUP_STEPS + steps + profile + 1, cuda_graph=cuda_graph, compile=compile
        )
        decoder.warm_up()
        _synchronize(input_ids.device)

        def run() -> None:
            for _ in range(steps):
                decoder.step()

        seconds = _seconds(run, input_ids.device) / steps
        return seconds, profile_steps(decoder, profile) if profile and input_ids.device.type == "cuda" else None


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
    fuse: bool = False,
    profile: int = 3,
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
    GQA-8 from 52-64% to 72-76% of the floor on an H100 (docs/benchmarks.md). `fuse` runs the step with
    `fused_projections` (q/k/v and gate/up as one product each). On a GPU, `profile` more steps are profiled kernel
    by kernel (`profile_steps`) into `kernels`, with `idle_share` (the part of a step, timed in its CUDA graph, when
    no kernel runs) and `launch_bound_share` (that plus the time in kernels too short to reach full bandwidth). Each
    case returns a dict:
    `batch`, `context`, `tokens_per_s` (engine-style), `generate_tokens_per_s`, `floor_tokens_per_s`,
    `fraction_of_floor` (engine over floor), `generate_fraction_of_floor`, and the bytes and bandwidth behind the
    floor.
    """
    _check_sizes(batch_sizes, context_lengths, new_tokens)
    device = model.device
    cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    compile = device.type == "cuda" if compile is None else compile
    split_kv = device.type == "cuda" and split_kv_available() if split_kv is None else split_kv
    bandwidth = bandwidth or measure_bandwidth(device)
    generator = torch.Generator().manual_seed(seed)
    results = []
    cases = list(product(batch_sizes, context_lengths))
    for batch, context in tqdm(cases, desc="decode speed", disable=not progress):
        input_ids = torch.randint(model.config.get_text_config().vocab_size, (batch, context), generator=generator)
        input_ids = input_ids.to(device)
        engine_s, kernels = engine_seconds_per_step(
            model, input_ids, new_tokens, cuda_graph=cuda_graph, compile=compile, split_kv=split_kv, fuse=fuse,
            profile=profile,
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
            "engine": engine_name(device, cuda_graph, compile, split_kv, fuse),
            "kv_cache_bytes_per_token": kv_cache_bytes_per_token(model.config, dtype=model.dtype),
            "weight_bytes": weight_bytes_per_step(model),
            "kv_cache_bytes": kv_cache_bytes(model.config, round(context + new_tokens / 2), batch, model.dtype),
            "bandwidth_bytes_per_s": bandwidth,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "kernels": kernels,
            "idle_share": 1 - kernels["busy_seconds"] / engine_s if kernels else None,
            "launch_bound_share": launch_bound_share(kernels, engine_s),
        })
    return results

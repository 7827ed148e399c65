"""Engine-style decoding: greedy tokens the way a serving engine computes them, with the stock model classes.

Its pieces:
- attention that reads each KV head once: `packed_attention.py`;
- the projections a block takes of one input as one matrix product each: `projection_fusion.py`;
- here, `StaticDecoder`: a preallocated `StaticCache`, and a decode step (forward, greedy pick, cache write) that
  runs on the device with no host round trip, so on a GPU it is captured once in a CUDA graph and replayed;
  `engine` puts a model in the engine's form for a block.

How fast this runs is measured in `speed.py`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from transformers import PreTrainedModel, StaticCache

from gqa_uptrain.errors import ConfigError

from .projection_fusion import fused_projections
from .packed_attention import packed_gqa_attention, split_kv_available

WARMUP_STEPS = 2  # eager steps before a CUDA graph is captured (cuBLAS workspaces, compilation)


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

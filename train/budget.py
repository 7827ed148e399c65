"""The budget in the GQA paper's terms: a fraction of pretraining, turned into optimizer steps and FLOPs.

FLOPs per trained token follow the usual estimate (Kaplan et al. 2020; PaLM appendix B): 6 x the parameters that
take part in a matrix product (every nn.Linear, the LM head included, the embedding lookup excluded) plus
12 x layers x attention width x sequence length for the attention scores and values, forward and backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from gqa_uptrain.errors import ConfigError
from gqa_uptrain.kv_heads import head_dim, meta_model, with_kv_heads
from gqa_uptrain.provenance import Provenance, kv_heads_before

from .recipe import BatchSpec, BudgetSpec


def matmul_params(config: PretrainedConfig) -> int:
    """Parameters of every nn.Linear of the model `config` describes, counted on the meta device (no memory)."""
    model = meta_model(config)
    return sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))


def flops_per_token(config: PretrainedConfig, seq_len: int, linear_params: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token at `seq_len`."""
    linear_params = matmul_params(config) if linear_params is None else linear_params
    attention_width = config.num_attention_heads * head_dim(config)
    return 6.0 * linear_params + 12.0 * config.num_hidden_layers * attention_width * seq_len


def original_config(config: PretrainedConfig, provenance: Provenance | None = None) -> PretrainedConfig:
    """The model a GQA checkpoint was converted from: the KV heads gqa-convert recorded, else multi-head."""
    return with_kv_heads(config, kv_heads_before(provenance) or config.num_attention_heads)


def percent(fraction: float) -> str:
    """A fraction as a percentage: 4 decimals, or 2 significant digits where those would show less (a budget of a
    few steps on a model pretrained on 2e12 tokens is 0.0000041%, not 0.0000%)."""
    value = 100 * fraction
    if value == 0 or abs(value) >= 0.01:
        return f"{value:.4f}%"
    return f"{value:.{1 - math.floor(math.log10(abs(value)))}f}%"


@dataclass(frozen=True)
class TrainingBudget:
    """How long the run is and what it costs, fixed before the first step."""

    steps: int
    grad_accum: int
    tokens_per_step: int
    flops_per_token: float
    pretrain_tokens: float | None
    pretrain_flops_per_token: float  # of the original (pretrained) model

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token

    def fraction_of_pretraining_tokens(self, tokens: int | None = None) -> float | None:
        if self.pretrain_tokens is None:
            return None
        return (self.tokens if tokens is None else tokens) / self.pretrain_tokens

    def fraction_of_pretraining_compute(self, tokens: int | None = None) -> float | None:
        if self.pretrain_tokens is None:
            return None
        spent = (self.tokens if tokens is None else tokens) * self.flops_per_token
        return spent / (self.pretrain_tokens * self.pretrain_flops_per_token)

    def describe(self) -> str:
        lines = [
            f"optimizer steps      {self.steps:,} (gradient accumulation {self.grad_accum})",
            f"tokens per step      {self.tokens_per_step:,}",
            f"tokens               {self.tokens:,}",
            f"FLOPs                {self.flops:.3e} ({self.flops_per_token:.3e} per token)",
        ]
        if self.pretrain_tokens is not None:
            lines.append(
                f"of pretraining       {percent(self.fraction_of_pretraining_tokens())} of its tokens, "
                f"{percent(self.fraction_of_pretraining_compute())} of its compute ({self.pretrain_tokens:.3e} tokens)"
            )
        return "\n".join(lines)


def plan_budget(
    budget: BudgetSpec,
    batch: BatchSpec,
    seq_len: int,
    world_size: int,
    config: PretrainedConfig,
    original_config: PretrainedConfig,
) -> TrainingBudget:
    """Steps from the budget; ConfigError if the batch does not divide over the processes or it is under a step."""
    per_pass = batch.micro_batch * world_size
    if batch.global_batch % per_pass:
        raise ConfigError(
            f"batch.global_batch={batch.global_batch} is not a multiple of batch.micro_batch={batch.micro_batch} "
            f"x {world_size} process(es)"
        )
    tokens_per_step = batch.global_batch * seq_len
    if budget.steps is not None:
        steps = budget.steps
    else:
        tokens = budget.tokens if budget.tokens is not None else budget.fraction * budget.pretrain_tokens
        steps = math.floor(tokens / tokens_per_step)
        if steps < 1:
            raise ConfigError(
                f"budget of {tokens:,.0f} tokens is smaller than one optimizer step "
                f"({tokens_per_step:,} tokens = batch.global_batch x data.seq_len)"
            )
    return TrainingBudget(
        steps=steps,
        grad_accum=batch.global_batch // per_pass,
        tokens_per_step=tokens_per_step,
        flops_per_token=flops_per_token(config, seq_len),
        pretrain_tokens=budget.pretrain_tokens,
        pretrain_flops_per_token=flops_per_token(original_config, seq_len),
    )

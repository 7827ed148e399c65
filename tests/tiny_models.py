"""Tiny random models of every covered architecture (`small_llama` for tests where the architecture does not
matter), and an independent way to give a model more KV heads.

`repeat_kv_heads` is the test oracle: it builds an H-KV-head model whose heads are copies, group by group, of a
G-head model. Such a model computes exactly what the G-head model computes (checked against transformers in
the tests), so converting it back to G heads with `mean` or `first` must lose nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

from gqa_uptrain.kv_heads import auto_model_class, with_kv_heads

# model_type -> what its tiny config needs beyond the shared shape; the README lists these architectures.
ARCHITECTURES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": {},  # q/k/v biases
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 32},
    "qwen3": {},  # per-head-dim q/k norms, shared across heads
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
    "gemma": {},
    "gemma2": {},
    "gemma3_text": {"sliding_window": 8},
    "phi": {},  # partial rotary, biases
    "phi3": {},  # fused qkv_proj
    "olmo": {},
    "olmo2": {},  # k-norm over the whole projection
    "stablelm": {"qk_layernorm": True},  # per-head LayerNorm modules
    "cohere": {"use_qk_norm": True},  # per-head norm weights [heads, head_dim]
    "starcoder2": {},
    "granite": {},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "helium": {},
    "ministral": {},
    "falcon": {"new_decoder_architecture": True, "bias": True},  # fused query_key_value, KV head by KV head
}

# Configs that name a shared size otherwise: model_type -> {shared key: its own key, or None where it derives it}.
OWN_KEYS: dict[str, dict[str, str | None]] = {
    "falcon": {"num_key_value_heads": "num_kv_heads", "intermediate_size": "ffn_hidden_size", "head_dim": None},
}

# Hybrid models: some layers have no attention (short convolutions, Mamba), the others plain GQA-capable attention.
HYBRID: dict[str, dict] = {
    "lfm2": {"num_hidden_layers": 3, "layer_types": ["conv", "full_attention", "full_attention"]},
    "granitemoehybrid": {"num_hidden_layers": 3, "layer_types": ["mamba", "attention", "attention"],
                         "num_local_experts": 2, "num_experts_per_tok": 1, "mamba_n_heads": 8, "mamba_d_head": 16,
                         "mamba_d_state": 8, "mamba_n_groups": 1},
}

# Multimodal wrappers whose language model sits under `text_config`: model_type -> (the decoder's model_type, the
# vision tower's config, what the wrapper needs). The vision towers have 4 attention heads of their own, which must
# stay.
VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
          "image_size": 28, "patch_size": 14}
MULTIMODAL: dict[str, tuple[str, dict, dict]] = {
    "gemma3": ("gemma3_text", {"model_type": "siglip_vision_model", **VISION}, {"mm_tokens_per_image": 4}),
    "mistral3": ("mistral", {"model_type": "pixtral", **VISION}, {}),
    "llava": ("llama", {"model_type": "clip_vision_model", **VISION}, {}),
    # its merger hands the language model vectors of the text's hidden size
    "qwen2_vl": ("qwen2_vl_text", {"model_type": "qwen2_vl", "depth": 1, "embed_dim": 32, "num_heads": 4,
                                   "mlp_ratio": 2, "hidden_size": 64}, {}),
}
# Decoders found only inside a wrapper: model_type -> what their tiny config needs beyond the shared shape.
WRAPPED: dict[str, dict] = {
    # M-RoPE: the rotary frequency pairs (head_dim / 2 of them) split between time, height and width positions
    "qwen2_vl_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
}

QUERY_HEADS = 4
VOCAB = 96
# Falcon's fused projection: one block of rows per KV head, [its query heads, its key, its value], 16 rows a head.
GROUPED_QKV = "query_key_value"


def tiny_config(model_type: str, kv_heads: int) -> PretrainedConfig:
    if model_type in MULTIMODAL:
        text, vision, extra = MULTIMODAL[model_type]
        return AutoConfig.for_model(model_type, text_config={"model_type": text, **_text_sizes(text, kv_heads)},
                                    vision_config=vision, **extra)
    return AutoConfig.for_model(model_type, **_text_sizes(model_type, kv_heads))


def own_keys(model_type: str, sizes: dict) -> dict:
    """Shared sizes under the keys the architecture's config names them by (`OWN_KEYS`)."""
    sizes = dict(sizes)
    for key, own in OWN_KEYS.get(model_type, {}).items():
        value = sizes.pop(key)
        if own is not None:
            sizes[own] = value
    return sizes


def _text_sizes(model_type: str, kv_heads: int) -> dict:
    shared = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=QUERY_HEADS, num_key_value_heads=kv_heads, head_dim=16,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return {**own_keys(model_type, shared), **{**ARCHITECTURES, **HYBRID, **WRAPPED}[model_type]}


def random_model(model_type: str, kv_heads: int, seed: int = 0) -> PreTrainedModel:
    """A randomly initialised fp32 model, with every norm and bias perturbed so that none is trivial."""
    torch.manual_seed(seed)
    config = tiny_config(model_type, kv_heads)
    model = auto_model_class(config).from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def small_llama(kv_heads: int = 2, layers: int = 1, vocab: int = VOCAB, seed: int = 0, **config) -> LlamaForCausalLM:
    """A Llama of hidden size 32 and 4 query heads, `config` overriding any setting (e.g. tie_word_embeddings=True):
    for tests of what is done with a model (saved, checkpointed, exported, decoded), where the architecture and
    its random norms do not matter, built from one torch seed."""
    torch.manual_seed(seed)
    sizes = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                 num_attention_heads=QUERY_HEADS, num_key_value_heads=kv_heads)
    return LlamaForCausalLM(LlamaConfig(**{**sizes, **config}))


def twelve_head_llama(layers: int = 1) -> LlamaForCausalLM:
    """12 query heads, 6 KV heads: --groups 3 shards over neither 2 nor 4 GPUs (the tensor-parallel warning)."""
    return small_llama(kv_heads=6, layers=layers, vocab=64, hidden_size=96, num_attention_heads=12)


def repeat_kv_heads(small: PreTrainedModel, kv_heads: int) -> PreTrainedModel:
    """`small` with each of its G KV heads copied kv_heads // G times, consecutively."""
    groups = small.config.get_text_config(decoder=True).num_key_value_heads
    ratio = kv_heads // groups
    config = with_kv_heads(small.config, kv_heads)
    big = auto_model_class(config).from_config(config, dtype=torch.float32).eval()
    small_state = small.state_dict()
    per_head = {_module_list_pattern(name) for name in big.state_dict() if name not in small_state}
    state = {}
    for name, target in big.state_dict().items():
        if _module_list_pattern(name) in per_head:  # one module per KV head: head i copies head i // ratio
            index = int(re.search(r"\.(\d+)\.[^.]+$", name)[1])
            state[name] = small_state[re.sub(r"\.\d+(\.[^.]+)$", rf".{index // ratio}\1", name)]
        elif small_state[name].shape == target.shape:
            state[name] = small_state[name]
        elif name.endswith("qkv_proj.weight"):
            q, k, v = small_state[name].split([QUERY_HEADS * 16, groups * 16, groups * 16])
            state[name] = torch.cat([q, _repeat_rows(k, groups, ratio), _repeat_rows(v, groups, ratio)])
        elif GROUPED_QKV in name:  # each KV head's block splits its queries over `ratio` blocks that share its k, v
            blocks = _kv_head_blocks(small_state[name], groups)
            queries = blocks[:, :-2].reshape(kv_heads, -1, *blocks.shape[2:])
            state[name] = torch.cat([queries, blocks[:, -2:].repeat_interleave(ratio, dim=0)], dim=1).reshape(
                target.shape)
        else:
            state[name] = _repeat_rows(small_state[name], groups, ratio)
    big.load_state_dict(state)
    return big


def split_fused_qkv(name: str, tensor: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A fused q/k/v projection's query rows (in head order) and its key and value rows; None for other tensors."""
    if name.endswith("qkv_proj.weight"):  # Phi-3: [q | k | v]
        return tensor[: QUERY_HEADS * 16], tensor[QUERY_HEADS * 16:]
    if GROUPED_QKV in name:
        blocks = _kv_head_blocks(tensor, kv_heads)
        return blocks[:, :-2].reshape(-1, *tensor.shape[1:]), blocks[:, -2:].reshape(-1, *tensor.shape[1:])
    return None


def _kv_head_blocks(tensor: torch.Tensor, kv_heads: int) -> torch.Tensor:
    return tensor.reshape(kv_heads, -1, 16, *tensor.shape[1:])


def _module_list_pattern(name: str) -> str:
    return re.sub(r"\.\d+(\.[^.]+)$", r".N\1", name)


def _repeat_rows(tensor: torch.Tensor, groups: int, ratio: int) -> torch.Tensor:
    heads = tensor.reshape(groups, tensor.shape[0] // groups, *tensor.shape[1:])
    return heads.repeat_interleave(ratio, dim=0).reshape(-1, *tensor.shape[1:])


def load(path: Path) -> PreTrainedModel:
    """A saved model in fp32, loaded by stock transformers with the auto class of its kind."""
    return auto_model_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=torch.float32).eval()


def logits(model_or_path: PreTrainedModel | Path, tokens: torch.Tensor) -> torch.Tensor:
    model = model_or_path
    if isinstance(model_or_path, Path):
        model = load(model_or_path)
    with torch.no_grad():
        return model(tokens).logits


def write_token_rows(path, length: int, rows: int = 16) -> None:
    """Calibration data as token-id rows (the tiny models have no tokenizer): `rows` sequences of `length` random
    tokens from the tiny vocabulary, the same for a given length."""
    import json

    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(3, VOCAB, (length,), generator=g).tolist() for _ in range(rows)]
    path.write_text("".join(json.dumps({"input_ids": row}) + "\n" for row in ids))

"""The source's config.json, read as written (to copy it faithfully) and as transformers reads it, and refused in one
line where it cannot be converted: missing, not JSON, sizes that are not whole numbers, quantized, custom code."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from gqa_uptrain.errors import CheckpointError, UnsupportedModelError
from gqa_uptrain.model_folder import require_inside


def load_config(folder: Path) -> tuple[dict, PretrainedConfig]:
    """The source's config.json as written (to copy faithfully) and as transformers reads it."""
    path = folder / "config.json"
    if os.path.lexists(path):
        require_inside(folder, path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; not a Hugging Face model folder") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    _check_sizes(path, raw)
    if "quantization_config" in raw or "quantization_config" in (raw.get("text_config") or {}):
        method = (raw.get("quantization_config") or raw["text_config"]["quantization_config"] or {})
        method = method.get("quant_method", "unknown") if isinstance(method, dict) else "unknown"
        raise UnsupportedModelError(f"{path}: a quantized checkpoint ({method}); its K/V weights cannot be pooled "
                                    "exactly beside their scales: convert the unquantized model, then quantize")
    if "auto_map" in raw:
        raise UnsupportedModelError(f"{path}: the model needs custom code (auto_map); only architectures built "
                                    "into transformers are supported")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"{path}: transformers does not know this model ({e})") from None
    return raw, config


# Sizes the attention layout is computed from: whole numbers above zero wherever a config names them.
_SIZES = ("num_attention_heads", "num_key_value_heads", "hidden_size", "num_hidden_layers", "head_dim")


def _check_sizes(path: Path, raw: dict) -> None:
    """Refuse a config whose head counts or sizes are not positive whole numbers (`"4"`, 0, 2.5), at the edge."""
    for where, values in (("", raw), ("text_config.", raw.get("text_config"))):
        if not isinstance(values, dict):
            continue
        for key in _SIZES:
            value = values.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"{path}: {where}{key} must be a whole number above 0, got {value!r}")

"""The config.json a conversion writes: the source's, key for key, with the new KV head count where the decoder's
config keeps it; and that config as transformers will read it back, which planning checks against the weights."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import AutoConfig, PretrainedConfig

from gqa_uptrain.kv_heads import kv_heads_keys, text_config, text_config_key

if TYPE_CHECKING:
    from gqa_uptrain.convert.plan import ConversionPlan


def output_config(plan: ConversionPlan) -> dict:
    """The config.json the conversion writes (`build_plan` checked that it describes the converted weights)."""
    return config_with_groups(plan.raw_config, plan.config, plan.layout.groups)


def read_back(raw: dict) -> PretrainedConfig:
    """A config.json as transformers will read it once written (AutoConfig decodes what JSON cannot hold, Infinity)."""
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(raw))
        return AutoConfig.from_pretrained(folder)


def config_with_groups(raw: dict, config: PretrainedConfig, groups: int) -> dict:
    """The source's config.json as written, with the new KV head count where the decoder's config keeps it (under
    `text_config` for a multimodal wrapper, whose vision config keeps its own heads)."""
    heads = dict.fromkeys(kv_heads_keys(text_config(config)), groups)
    key = text_config_key(config)
    if key is None:
        return {**raw, **heads}
    return {**raw, key: {**raw.get(key, {}), **heads}}

"""A Hugging Face model card for a finished model folder, made from its provenance record and config; gqa-publish
extends it with evaluation results.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, metadata_load
from transformers import AutoConfig

from gqa_uptrain.convert.methods import METHODS
from gqa_uptrain.kv_heads import kv_cache_bytes_per_token, with_kv_heads
from gqa_uptrain.provenance import PROVENANCE, base_record, read_provenance


def model_card(folder: Path, title: str, extra: list[str] = ()) -> ModelCard:
    """A card for a finished model folder, from its provenance and config: `base_model` and license metadata.

    `extra` holds more Markdown lines (gqa-publish adds the quality table of a gqa-eval report).
    """
    record = read_provenance(folder)
    conversion, uptraining = record["conversion"], record.get("uptraining")
    base = base_record(record)
    base_id = base["source"]["id"]
    config = AutoConfig.from_pretrained(folder)
    kv_after = kv_cache_bytes_per_token(config)
    kv_before = kv_cache_bytes_per_token(with_kv_heads(config, base["conversion"]["kv_heads_before"]))
    groups = conversion["groups"]
    kind = "multi-query attention (MQA)" if groups == 1 else f"grouped-query attention with {groups} KV heads"
    data = ModelCardData(base_model=base_id if _is_hub_id(base_id) else Path(base_id).name,
                         license=base["source"].get("license"), library_name="transformers",
                         tags=["gqa", "grouped-query-attention", "gqa-uptrain"])
    lines = [
        f"# {title}: {kind}", "",
        f"{_reference(base_id)} converted by gqa-uptrain from {conversion['kv_heads_before']} to {groups} "
        f"key/value heads (`num_key_value_heads = {groups}`) with the `{conversion['method']}` method: "
        f"{METHODS[conversion['method']].summary}",
        "", "| | |", "| --- | --- |",
        f"| KV heads | {base['conversion']['kv_heads_before']} -> {groups} |",
        f"| KV cache per token | {kv_before:,} -> {kv_after:,} bytes ({kv_after / kv_before:.1%}) |",
    ]
    if uptraining:
        lines += [f"| uptraining tokens | {uptraining['tokens']:,} |",
                  f"| fraction of pretraining tokens | {_percent(uptraining.get('fraction_of_pretraining_tokens'))} |",
                  f"| fraction of pretraining compute | {_percent(uptraining.get('fraction_of_pretraining_compute'))} |"]
    else:
        lines += ["", "Not uptrained yet: a converted model usually needs uptraining to recover its quality. "
                  "Ainslie et al. (2023, \"GQA: Training Generalized Multi-Query Transformer Models from Multi-Head "
                  "Checkpoints\") uptrain for about 5% of the original pretraining compute."]
    lines += [*extra, "", f"`{PROVENANCE}` records the hashes of the source files, the conversion and any "
              "uptraining."]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")


def _is_hub_id(source_id: str) -> bool:
    """Local sources are recorded by absolute path; anything else names a Hub repository."""
    return not source_id.startswith("/")


def _reference(base_id: str) -> str:
    return f"[{base_id}](https://huggingface.co/{base_id})" if _is_hub_id(base_id) else f"`{base_id}`"


def _percent(value: float | None) -> str:
    return "unknown (no pretraining size given)" if value is None else f"{value:.2%}"


def card_license(folder: Path) -> str | None:
    """The `license` in a folder's model card metadata, if it has a card."""
    card = folder / "README.md"
    return ((metadata_load(card) or {}) if card.is_file() else {}).get("license")

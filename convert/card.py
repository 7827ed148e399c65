"""What a converted folder says about itself: its provenance record (with the source files' hashes) and a
Hugging Face model card made from that record, which gqa-publish extends with evaluation results.
"""

from __future__ import annotations

import hashlib
import re
import threading
from datetime import datetime, timezone
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, metadata_load
from transformers import AutoConfig

from gqa_uptrain import __version__
from gqa_uptrain.convert.layout import with_kv_heads
from gqa_uptrain.eval.kv_cache import kv_cache_bytes_per_token
from gqa_uptrain.provenance import PROVENANCE, read_provenance

_HASH_CHUNK = 16 << 20


def sha256_file(file: Path, cancel: threading.Event) -> str | None:
    """SHA-256 of a file, run beside the conversion (hashlib releases the GIL); None once `cancel` is set."""
    cached = _hub_cache_sha256(file)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            if cancel.is_set():
                return None
            digest.update(chunk)
    return digest.hexdigest()


def _hub_cache_sha256(file: Path) -> str | None:
    """The Hub cache stores each large (LFS) file as blobs/<its sha256>, checked when it was downloaded."""
    if not file.is_symlink():
        return None
    target = file.resolve()
    if target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", target.name):
        return target.name
    return None


def provenance(source_label: str, revision: str | None, license: str | None, hashes: dict[str, str], method: str,
               groups: int, kv_heads: int, query_heads: int, seed: int, parent: dict | None) -> dict:
    record = {
        "tool": {"name": "gqa-uptrain", "version": __version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"id": source_label, "revision": revision, "license": license, "sha256": hashes},
        "conversion": {
            "method": method, "groups": groups, "kv_heads_before": kv_heads, "kv_heads_after": groups,
            "query_heads": query_heads, **({"seed": seed} if method == "random" else {}),
        },
    }
    if parent is not None:
        record["parent"] = parent
    return record


def base_record(record: dict) -> dict:
    """The first conversion in a chain of them: its source is the original model."""
    while "conversion" in record.get("parent", {}):
        record = record["parent"]
    return record


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
    data = ModelCardData(base_model=base_id if _is_hub_id(base_id) else Path(base_id).name, license=base["source"].get("license"), library_name="transformers",
                         tags=["gqa", "grouped-query-attention", "gqa-uptrain"])
    lines = [
        f"# {title}: {kind}", "",
        f"{_reference(base_id)} converted by gqa-uptrain from {conversion['kv_heads_before']} to {groups} "
        f"key/value heads (`num_key_value_heads = {groups}`) with the `{conversion['method']}` method: "
        f"{_METHOD_TEXT[conversion['method']]}",
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


_METHOD_TEXT = {
    "mean": "each new key/value head is the mean of the heads in its group.",
    "first": "each new key/value head is the first head of its group.",
    "random": "the key/value projections were freshly initialised.",
}


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

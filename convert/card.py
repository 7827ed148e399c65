"""What a converted folder says about itself: a provenance record and a Hugging Face model card.

The provenance file (`gqa_provenance.json`) is machine-readable and travels with the model: uptraining and
evaluation extend or read it, and a converted model's own provenance is kept as `parent` when it is
converted again.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from datetime import datetime, timezone
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData, metadata_load

from gqa_uptrain import __version__

PROVENANCE = "gqa_provenance.json"
_HASH_CHUNK = 16 << 20


def sha256_files(files: list[Path], cancel: threading.Event) -> dict[str, str]:
    """SHA-256 of each file (run beside the conversion; stops early when `cancel` is set)."""
    digests = {}
    for file in files:
        cached = _hub_cache_sha256(file)
        if cached is not None:
            digests[file.name] = cached
            continue
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                if cancel.is_set():
                    return digests
                digest.update(chunk)
        digests[file.name] = digest.hexdigest()
    return digests


def _hub_cache_sha256(file: Path) -> str | None:
    """The Hub cache stores each large (LFS) file as blobs/<its sha256>, checked when it was downloaded."""
    if not file.is_symlink():
        return None
    target = file.resolve()
    if target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", target.name):
        return target.name
    return None


def provenance(source_label: str, revision: str | None, hashes: dict[str, str], method: str, groups: int,
               kv_heads: int, query_heads: int, seed: int, parent: dict | None) -> dict:
    record = {
        "tool": {"name": "gqa-uptrain", "version": __version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"id": source_label, "revision": revision, "sha256": hashes},
        "conversion": {
            "method": method, "groups": groups, "kv_heads_before": kv_heads, "kv_heads_after": groups,
            "query_heads": query_heads, **({"seed": seed} if method == "random" else {}),
        },
    }
    if parent is not None:
        record["parent"] = parent
    return record


def read_provenance(folder: Path) -> dict | None:
    path = folder / PROVENANCE
    return json.loads(path.read_text()) if path.is_file() else None


def model_card(source_folder: Path, source_label: str, repo_id: str | None, record: dict) -> ModelCard:
    """A card with `base_model` metadata (the Hub id when known) and the base model's license."""
    conversion = record["conversion"]
    groups, heads = conversion["groups"], conversion["kv_heads_before"]
    kind = "multi-query attention (MQA)" if groups == 1 else f"grouped-query attention with {groups} KV heads"
    data = ModelCardData(
        base_model=repo_id or Path(source_label).name,
        license=_source_metadata(source_folder).get("license"),
        library_name="transformers",
        tags=["gqa", "grouped-query-attention", "gqa-uptrain"],
    )
    body = f"""
# {Path(source_label).name}: {kind}

This checkpoint is {_reference(source_label, repo_id)} converted by gqa-uptrain {record['tool']['version']}
from {heads} to {groups} key/value heads (`num_key_value_heads = {groups}`) with the `{conversion['method']}`
method: {_METHOD_TEXT[conversion['method']]} Every other weight is unchanged, and the KV cache is
{groups}/{heads} of the original's size.

A converted model usually needs uptraining to recover its quality: Ainslie et al. (2023, "GQA: Training
Generalized Multi-Query Transformer Models from Multi-Head Checkpoints") uptrain for about 5% of the original
pretraining compute. `gqa_provenance.json` records the hashes of the source files and the conversion.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


_METHOD_TEXT = {
    "mean": "each new key/value head is the mean of the heads in its group.",
    "first": "each new key/value head is the first head of its group.",
    "random": "the key/value projections were freshly initialised.",
}


def _reference(source_label: str, repo_id: str | None) -> str:
    return f"[{repo_id}](https://huggingface.co/{repo_id})" if repo_id else f"`{source_label}`"


def _source_metadata(folder: Path) -> dict:
    card = folder / "README.md"
    return (metadata_load(card) or {}) if card.is_file() else {}

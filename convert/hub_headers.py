"""Plan a Hub model without downloading its weights: config.json (a small download into the Hugging Face cache) and
each safetensors file's header, read by HTTP range requests (huggingface_hub's `get_safetensors_metadata`).

This feeds the same plan as a local folder (`plan.build_plan`), so `gqa-convert HUB_ID --dry-run` prints what a
dry run on the downloaded folder prints. Offline, the dry run reads the local cache as before (`source.py`).
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import get_safetensors_metadata, hf_hub_download, is_offline_mode
from huggingface_hub.errors import NotASafetensorsRepoError, SafetensorsParsingError

from gqa_uptrain.convert.checkpoint_reader import (SAFETENSORS_INDEX, CheckpointReader, TensorInfo, check_index,
                                                    header_tensors)
from gqa_uptrain.errors import CheckpointError, one_line
from gqa_uptrain.source import Source, could_be_hub_id, hub_errors


def plans_from_hub(source: str) -> bool:
    """Whether a dry run of SOURCE reads the Hub's headers: a Hub id that names no local folder, while online."""
    return could_be_hub_id(source) and not Path(source).expanduser().exists() and not is_offline_mode()


def hub_checkpoint(repo_id: str, revision: str | None) -> tuple[Source, CheckpointReader]:
    """The repository's config.json, in the cache, and its tensors from their headers, both at one commit."""
    with hub_errors(repo_id, revision):
        folder = Path(hf_hub_download(repo_id, "config.json", revision=revision)).parent  # snapshots/<commit>
        try:
            metadata = get_safetensors_metadata(repo_id, revision=folder.name)
        except NotASafetensorsRepoError:
            raise CheckpointError(f"{repo_id}: has no safetensors weights on the Hub, so --dry-run cannot read their "
                                  "headers without downloading them; download it and give the folder") from None
        except SafetensorsParsingError as e:
            raise CheckpointError(f"{repo_id}: corrupt safetensors header ({one_line(e)})") from None
    tensors: dict[str, TensorInfo] = {}
    held: dict[str, list[str]] = {}
    for file, header in sorted(metadata.files_metadata.items()):
        entries = {name: {"dtype": t.dtype, "shape": t.shape, "data_offsets": list(t.data_offsets)}
                   for name, t in header.tensors.items()}
        scanned = header_tensors(folder / file, entries, 0, None)
        held[file] = list(scanned)
        tensors.update(scanned)
    if metadata.sharded:  # the index (which get_safetensors_metadata put in the cache) against the headers
        check_index(folder / SAFETENSORS_INDEX, metadata.weight_map, held)
    return Source(folder, repo_id, folder.name), CheckpointReader(folder, tensors)

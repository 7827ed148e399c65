"""Turn SOURCE (a local folder or a Hub id) into a local folder, through huggingface_hub.

huggingface_hub honours HF_TOKEN, the local cache and offline mode (HF_HUB_OFFLINE) on its own.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from gqa_uptrain.errors import CheckpointError, one_line

# Weights in other frameworks' formats, and Meta's original consolidated files, are never needed.
_NEVER = ["*.pth", "*.pt", "*.h5", "*.msgpack", "*.ckpt", "*.gguf", "*.onnx", "*.ot", "original/*"]
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$|^[\w.-]+$")
_CACHE_SNAPSHOT = re.compile(r"models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<revision>[0-9a-f]{40})$")


@dataclass(frozen=True)
class Source:
    folder: Path
    repo_id: str | None  # the Hub id, when the model came from (or sits in the cache of) the Hub
    revision: str | None  # the commit it was resolved to

    @property
    def name(self) -> str:
        return self.repo_id.split("/")[-1] if self.repo_id else self.folder.resolve().name

    @property
    def label(self) -> str:
        return self.repo_id or str(self.folder.resolve())


def looks_local(source: str) -> bool:
    """A path written as one (./x, /x, ~/x) is never taken for a Hub id, even when it does not exist."""
    return source.startswith((".", "/", "~"))


def could_be_hub_id(source: str) -> bool:
    """Whether SOURCE is written as a Hub id (`name` or `owner/name`) and not as a path."""
    return not looks_local(source) and _REPO_ID.match(source) is not None


def resolve_source(source: str, revision: str | None = None) -> Source:
    """A local folder as is; otherwise download (or find in the cache) the Hub repository's files."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{source}: not a folder")
        return _local(path)
    if not could_be_hub_id(source):
        raise CheckpointError(f"{source}: no such folder, and not a Hugging Face Hub id")
    folder = _download(source, revision, ignore=[*_NEVER, "*.bin"])
    if not any(folder.glob("*.safetensors")):  # an older repository with PyTorch .bin weights only
        folder = _download(source, revision, ignore=_NEVER)
    return Source(folder, source, folder.name)


def _local(path: Path) -> Source:
    """A folder inside the Hub cache still knows its repository and commit."""
    match = _CACHE_SNAPSHOT.search(path.resolve().as_posix())
    if match is None:
        return Source(path, None, None)
    return Source(path, f"{match['owner']}/{match['name']}", match["revision"])


def _download(repo_id: str, revision: str | None, ignore: list[str]) -> Path:
    with hub_errors(repo_id, revision):
        return Path(snapshot_download(repo_id, revision=revision, ignore_patterns=ignore))


@contextmanager
def hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn what the Hub answers (no such repository, gated, no network) into one CheckpointError line."""
    try:
        yield
    except GatedRepoError:
        raise CheckpointError(f"{repo_id}: a gated repository; accept its terms on huggingface.co, then log in "
                              "(HF_TOKEN or `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such repository on the Hugging Face Hub (or a private one: log in "
                              "with HF_TOKEN or `hf auth login`)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id}: has no revision {revision!r} on the Hugging Face Hub") from None
    except HfHubHTTPError as e:
        raise CheckpointError(f"{repo_id}: cannot be fetched from the Hugging Face Hub ({one_line(e)})") from None
    except Exception as e:
        if not isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled)) and not _unreachable(e):
            raise
        raise CheckpointError(f"{repo_id}: not in the local Hugging Face cache and the Hub cannot be reached "
                              "(offline mode or no network)") from None


def _unreachable(error: Exception) -> bool:
    """A connection that failed (no network, DNS, a timeout): a TransportError of whichever HTTP library
    huggingface_hub uses (httpx in 1.x, httpx2 since 2.x), which it passes on from header requests."""
    return any(cls.__name__ == "TransportError" for cls in type(error).__mro__)

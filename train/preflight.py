"""Checks that run before any work: models, tokenizers, sequence length, teacher, and the output folder.

Each failure is one GqaError line, raised before a weight is loaded or a file is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import json

import yaml
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from gqa_uptrain.dicts import flatten
from gqa_uptrain.documents import local_files
from gqa_uptrain.atomic_write import write_atomically
from gqa_uptrain.errors import CheckpointError, ConfigError, one_line
from gqa_uptrain.hashing import hub_cache_sha256, sha256_file
from gqa_uptrain.paths import check_output_folder
from gqa_uptrain.provenance import PROVENANCE
from gqa_uptrain.source import resolve_source
from gqa_uptrain.tokenizer_identity import tokenizer_difference

from .checkpoint import complete_checkpoints
from .recipe import Recipe
from .run_lock import LOCK_FILE

RECIPE_SNAPSHOT = "recipe.yaml"
MODEL_FINGERPRINT = "model_fingerprint.json"
DATA_FINGERPRINT = "data_fingerprint.json"
_SMALL_FILE = 1 << 20  # hashed whole; larger ones are known by size and modification time (or their Hub cache hash)


@dataclass(frozen=True)
class Models:
    folder: Path  # the model's local folder (a Hub id is downloaded, or found in the cache, like gqa-convert does)
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    teacher_folder: Path | None
    teacher_config: PretrainedConfig | None


def _load_config_and_tokenizer(path: str, role: str) -> tuple[Path, PretrainedConfig, PreTrainedTokenizerBase]:
    folder = resolve_source(path).folder
    try:
        return folder, AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{role} {path}: {one_line(error)}") from None


def _check_seq_len(config: PretrainedConfig, seq_len: int, role: str, path: str) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"data.seq_len={seq_len} is above the {role}'s limit of {limit} positions ({path})")


def check_attention(recipe: Recipe) -> None:
    """The attention implementation the recipe asks for can be loaded here (transformers would fail at the weights,
    in a traceback, after the run's folder is written). Not for a dry run, which may plan for other machines."""
    from transformers.utils import is_flash_attn_2_available, is_torch_flex_attn_available

    need = recipe.model.attn_implementation
    available = {"flash_attention_2": is_flash_attn_2_available, "flex_attention": is_torch_flex_attn_available}
    if need in available and not available[need]():
        what = "the flash-attn package and a CUDA GPU" if need == "flash_attention_2" else "a newer torch"
        raise ConfigError(f"model.attn_implementation={need} cannot be used here (it needs {what}): install it, or "
                          "set model.attn_implementation=sdpa")


def check_models(recipe: Recipe) -> Models:
    """Configs and tokenizers of the model and teacher; the weights are not read yet."""
    folder, config, tokenizer = _load_config_and_tokenizer(recipe.model.path, "model")
    _check_seq_len(config, recipe.data.seq_len, "model", recipe.model.path)
    if recipe.teacher is None:
        return Models(folder, config, tokenizer, None, None)
    teacher_folder, teacher_config, teacher_tokenizer = _load_config_and_tokenizer(recipe.teacher.path, "teacher")
    _check_seq_len(teacher_config, recipe.data.seq_len, "teacher", recipe.teacher.path)
    differs = tokenizer_difference(tokenizer, teacher_tokenizer)
    if differs is None and teacher_config.vocab_size != config.vocab_size:
        differs = "vocab_size in config.json"
    if differs is not None:
        raise ConfigError(
            f"teacher {recipe.teacher.path} has a different tokenizer or vocabulary from model {recipe.model.path} "
            f"({differs} differs): distillation compares distributions token by token, so both must share one "
            "tokenizer"
        )
    return Models(folder, config, tokenizer, teacher_folder, teacher_config)


def check_output_dir(recipe: Recipe) -> str:
    """'fresh', 'resume' or 'complete'; ConfigError if the folder holds something else or another recipe's run."""
    output = Path(recipe.output_dir)
    check_output_folder(output, "output_dir")
    snapshot = output / RECIPE_SNAPSHOT
    if not snapshot.is_file():
        if output.exists() and any(p.name != LOCK_FILE for p in output.iterdir()):  # a run that died at its start
            raise ConfigError(f"output_dir {output} exists and holds no gqa-uptrain run: choose an empty or new folder")
        return "fresh"
    try:
        previous = Recipe.model_validate(yaml.safe_load(snapshot.read_text()))
    except Exception:
        raise ConfigError(f"output_dir {output}: {RECIPE_SNAPSHOT} is unreadable; choose another output_dir") from None
    old, new = flatten(previous.identity()), flatten(recipe.identity())
    changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    if changed:
        raise ConfigError(
            f"output_dir {output} holds a run of a different recipe (differs in {', '.join(changed)}): "
            "use a new output_dir, or the recipe that run was started with"
        )
    return "complete" if (output / "model" / PROVENANCE).is_file() else "resume"


def write_snapshot(recipe: Recipe) -> None:
    """The resolved recipe beside the run, so a later command can tell whether it continues the same run."""
    output = Path(recipe.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    snapshot = output / RECIPE_SNAPSHOT
    if not snapshot.exists():
        write_atomically(snapshot, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))


def fingerprint(files: dict[str, Path]) -> dict[str, str]:
    """What files are made of, under the given names: each by SHA-256 where that is cheap (small files, files in the
    Hugging Face cache), else by size and modification time, so that a file written anew (a model converted again
    in place, a data file regenerated) is told apart without reading gigabytes."""
    prints = {}
    for name, file in files.items():
        stat = file.stat()
        digest = hub_cache_sha256(file) or (sha256_file(file) if stat.st_size <= _SMALL_FILE else None)
        prints[name] = f"sha256:{digest}" if digest else f"size:{stat.st_size},mtime_ns:{stat.st_mtime_ns}"
    return prints


def model_fingerprint(folder: Path) -> dict[str, str]:
    """The files of a model's folder (its card aside), by name, each with its own print (`fingerprint`), so that a
    refusal can name the files that changed. Not gqa-eval's `ResultCache.model_digest`, one hash that keys results."""
    return fingerprint({file.name: file for file in sorted(Path(folder).iterdir())
                        if not file.name.startswith(".") and file.name != "README.md" and file.is_file()})


def data_fingerprint(recipe: Recipe) -> dict[str, str]:
    """The local files the run's training and validation data are read from, by path. A Hub dataset is left out:
    its id names no fixed content and listing its files would need the network at every start; a run that reads
    one is not protected against the dataset changing under it."""
    sources = [source for source in (recipe.data.train, recipe.data.validation) if source and source.path]
    return fingerprint({file: Path(file) for source in sources for file in local_files(source.path)})


def _recorded_fingerprint(output: Path, record: str = MODEL_FINGERPRINT) -> dict[str, str] | None:
    try:
        recorded = json.loads((output / record).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # a run started before fingerprints were recorded, or a torn file: nothing to compare with
    return recorded if isinstance(recorded, dict) else None


def started_from(recipe: Recipe, finished: bool = False, record: str = MODEL_FINGERPRINT) -> dict[str, str] | None:
    """The fingerprint `record` (of the model, or of the data) the run in output_dir was started from, where
    something of that run depends on it (a checkpoint, or the finished model); None where nothing does, or nothing
    was recorded."""
    output = Path(recipe.output_dir)
    recorded = _recorded_fingerprint(output, record)
    if recorded is None or not (finished or complete_checkpoints(output / "checkpoints")):
        return None
    return recorded


def _changed(recorded: dict[str, str], now: dict[str, str]) -> str | None:
    """The names whose fingerprints differ (at most four shown), None when none does."""
    changed = sorted(name for name in recorded.keys() | now.keys() if recorded.get(name) != now.get(name))
    if not changed:
        return None
    return ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")


def check_model_unchanged(recipe: Recipe, folder: Path, finished: bool = False) -> None:
    """Refuse to resume a run whose checkpoints were trained from another model than the one model.path holds
    now (a folder converted again in place keeps its path, so the recipe alone cannot tell), and to take a
    `finished` run for the uptraining of that other model."""
    recorded = started_from(recipe, finished)
    shown = recorded and _changed(recorded, model_fingerprint(folder))
    if shown:
        raise ConfigError(
            f"output_dir {recipe.output_dir} holds a run started from another model than {recipe.model.path} holds "
            f"now ({shown} changed since, e.g. converted again in place): use a new output_dir, or restore the model "
            "that run was started from"
        )


def check_data_unchanged(recipe: Recipe) -> None:
    """Refuse to resume a run whose data files changed since it started (the recipe names the same paths): its
    checkpoint's data position counts batches of the old data, so the resumed run would read neither the old
    order nor the new one, silently."""
    recorded = started_from(recipe, record=DATA_FINGERPRINT)
    shown = recorded and _changed(recorded, data_fingerprint(recipe))
    if shown:
        raise ConfigError(
            f"output_dir {recipe.output_dir} holds a run started on other data than its data paths hold now "
            f"({shown} changed since): use a new output_dir, or restore the data that run was started on"
        )


def write_fingerprints(recipe: Recipe, folder: Path) -> None:
    """Record the model and the local data the run trains on, at its start (each kept while a checkpoint of the run
    exists)."""
    output = Path(recipe.output_dir)
    for record, prints in ((MODEL_FINGERPRINT, lambda: model_fingerprint(folder)),
                           (DATA_FINGERPRINT, lambda: data_fingerprint(recipe))):
        if _recorded_fingerprint(output, record) is None or not complete_checkpoints(output / "checkpoints"):
            write_atomically(output / record, json.dumps(prints(), indent=1) + "\n")

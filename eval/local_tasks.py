"""Turn `--tasks` into lm-eval task names: shipped offline tasks, task folders or YAML files, standard names.

The shipped tasks (eval/tasks/*.yaml) keep their data file beside the YAML. lm-eval resolves a relative
`data_files` path from the working directory, so they are staged at run time into a folder of YAMLs that
name their data by absolute path. Standard lm-eval names are passed through unchanged; indexing lm-eval's
own ~15,000 task configs takes seconds, so it is only done when a name is not found locally.
"""

import difflib
import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import yaml

from gqa_uptrain.errors import ConfigError

from .cache import digest

FileHash = Callable[[Path], str]

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

SHIPPED_DIR = Path(__file__).parent / "tasks"


def shipped_task_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def stage_shipped_tasks(staging_dir: Path) -> Path:
    """Write the shipped YAMLs into `staging_dir` with their data files named by absolute path."""
    staging_dir.mkdir(parents=True, exist_ok=True)
    for source in SHIPPED_DIR.glob("*.yaml"):
        config = yaml.safe_load(source.read_text())
        files = config["dataset_kwargs"]["data_files"]
        config["dataset_kwargs"]["data_files"] = {split: str(SHIPPED_DIR / name) for split, name in files.items()}
        (staging_dir / source.name).write_text(yaml.safe_dump(config, sort_keys=False))
    return staging_dir


@dataclass
class TaskSelection:
    """The lm-eval names to run, the TaskManager that knows them, and a fingerprint of each definition."""

    names: list[str]
    manager: "TaskManager"
    fingerprints: dict[str, str] = field(default_factory=dict)


def _local_data_files(config: dict) -> list[Path]:
    """Data files a task config names on this machine (their content is part of the task's identity)."""
    files = (config.get("dataset_kwargs") or {}).get("data_files") or {}
    names = files.values() if isinstance(files, dict) else [files] if isinstance(files, str) else files
    flat = [n for item in names for n in (item if isinstance(item, list) else [item])]
    return [file for name in flat if isinstance(name, str) for file in _matching(name)]


def _matching(name: str) -> list[Path]:
    """The local files one `data_files` entry stands for: the file itself, or those its glob matches now (sorted,
    as datasets reads them). The glob's text alone would keep cached results after the files behind it changed."""
    if Path(name).is_file():
        return [Path(name)]
    if not any(char in name for char in "*?["):
        return []
    return sorted(path for path in map(Path, glob.glob(name, recursive=True)) if path.is_file())


def _fingerprint(manager: "TaskManager", name: str, file_hash: FileHash) -> str:
    """The task's config as lm-eval indexed it, with local data files stood for by their content, not their path
    (so moving the package or the data keeps cached results)."""
    config = dict(manager.task_index[name].cfg or {})
    data_hashes = [file_hash(p) for p in _local_data_files(config)]
    if data_hashes:
        config["dataset_kwargs"] = {k: v for k, v in config["dataset_kwargs"].items() if k != "data_files"}
    return digest([name, config, data_hashes])


def _names_defined_in(manager: "TaskManager", path: Path) -> list[str]:
    """Tasks (not groups or tags) defined by the YAML file `path`, or by the YAML files inside folder `path`."""
    path = path.resolve()

    def inside(yaml_path: Path) -> bool:
        yaml_path = Path(yaml_path).resolve()
        return yaml_path == path or path in yaml_path.parents

    return sorted(
        name for name in manager.all_subtasks
        if manager.task_index[name].yaml_path is not None and inside(manager.task_index[name].yaml_path)
    )


def _written_as_path(item: str) -> bool:
    """A YAML file name, or anything written with a folder in it (lm-eval's names have neither)."""
    return item.endswith((".yaml", ".yml")) or "/" in item or item.startswith(("~", "."))


def resolve_tasks(spec: str, include_paths: list[Path], staging_dir: Path, file_hash: FileHash) -> TaskSelection:
    """Resolve a comma-separated `--tasks` value; an unknown item is an error that names it."""
    from lm_eval.tasks import TaskManager  # seconds to import: kept out of `gqa-eval --help`

    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise ConfigError("--tasks is empty")
    folders = [Path(item) if Path(item).is_dir() else Path(item).parent for item in items if Path(item).exists()]
    for path in include_paths:
        if not path.is_dir():
            raise ConfigError(f"--include-path {path} is not a folder")
    local_paths = [stage_shipped_tasks(staging_dir), *include_paths, *folders]
    manager = TaskManager(include_path=[str(p) for p in local_paths], include_defaults=False)

    def known(name: str) -> bool:
        return name in manager.task_index

    for item in items:
        if not known(item) and not Path(item).exists() and _written_as_path(item):
            raise ConfigError(f"task file {item}: no such file")
    if not all(known(item) or Path(item).exists() for item in items):
        manager = TaskManager(include_path=[str(p) for p in local_paths], include_defaults=True)

    names: list[str] = []
    for item in items:
        path = Path(item)
        if path.exists():
            found = _names_defined_in(manager, path)
            if not found:
                raise ConfigError(f"task path {path} defines no lm-eval task (a *.yaml file with a `task:` key)")
            names += found
        elif known(item):
            names.append(item)
        else:
            close = difflib.get_close_matches(item, list(manager.task_index), n=1, cutoff=0.75)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown task '{item}'{hint}: not a shipped task ({', '.join(shipped_task_names())}), "
                "a task folder or YAML file, nor an lm-eval task, group or tag name"
            )
    names = list(dict.fromkeys(names))
    return TaskSelection(names, manager, {name: _fingerprint(manager, name, file_hash) for name in names})

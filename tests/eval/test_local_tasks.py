"""The shipped offline tasks: well-formed data, staged with absolute paths, resolved without lm-eval's index."""

import json
from pathlib import Path

import pytest
import yaml

from gqa_uptrain.errors import ConfigError
from gqa_uptrain.eval.cache import ResultCache
from gqa_uptrain.eval.local_tasks import SHIPPED_DIR, resolve_tasks, shipped_task_names, stage_shipped_tasks


def rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SHIPPED_DIR / f"{name}.jsonl").read_text().splitlines()]


def test_shipped_tasks_are_known():
    assert shipped_task_names() == ["gqa_lastword", "gqa_nextsentence"]


def test_lastword_items_end_in_a_word_seen_earlier():
    items = rows("gqa_lastword")
    assert len(items) >= 250
    for item in items:
        word = item["continuation"]
        assert word.isalpha() and word.lower() in item["context"].lower() and not item["context"].endswith(" ")


def test_nextsentence_items_have_four_distinct_choices():
    items = rows("gqa_nextsentence")
    assert len(items) >= 250
    for item in items:
        assert len(set(item["choices"])) == 4 and 0 <= item["gold"] < 4 and item["query"]
    golds = [item["gold"] for item in items]
    assert max(golds.count(g) for g in range(4)) < 0.4 * len(items)  # the answer position is not a giveaway


def test_staged_yaml_names_data_by_absolute_path(tmp_path):
    stage_shipped_tasks(tmp_path)
    for path in tmp_path.glob("*.yaml"):
        files = yaml.safe_load(path.read_text())["dataset_kwargs"]["data_files"]
        assert all(Path(f).is_absolute() and Path(f).is_file() for f in files.values())


def test_shipped_and_folder_tasks_resolve_offline(tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "my_task.yaml").write_text((SHIPPED_DIR / "gqa_nextsentence.yaml").read_text()
                                         .replace("task: gqa_nextsentence", "task: my_task"))
    monkeypatch.chdir(tmp_path)
    selection = resolve_tasks(f"gqa_lastword, {folder}", [], tmp_path / "stage", ResultCache(tmp_path).file_hash)
    assert selection.names == ["gqa_lastword", "my_task"]
    assert "arc_easy" not in selection.manager.task_index  # lm-eval's own index was not needed
    assert selection.fingerprints["gqa_lastword"] != selection.fingerprints["my_task"]


def test_empty_task_list_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="--tasks is empty"):
        resolve_tasks(" , ", [], tmp_path / "stage", ResultCache(tmp_path).file_hash)


def test_task_fingerprint_follows_data_content_not_path(tmp_path):
    def selection_for(folder: Path, data: str):
        folder.mkdir()
        (folder / "data.jsonl").write_text(data)
        config = (SHIPPED_DIR / "gqa_nextsentence.yaml").read_text().replace("task: gqa_nextsentence", "task: t")
        (folder / "t.yaml").write_text(config.replace("test: gqa_nextsentence.jsonl", f"test: {folder / 'data.jsonl'}"))
        stage = tmp_path / f"stage-{folder.name}"
        return resolve_tasks(str(folder), [], stage, ResultCache(tmp_path / "cache").file_hash)

    row = '{"query": "q", "choices": ["a", "b", "c", "d"], "gold": 0}\n'
    first_selection = selection_for(tmp_path / "a", row)
    assert first_selection.names == ["t"]
    first = first_selection.fingerprints["t"]
    assert selection_for(tmp_path / "b", row).fingerprints["t"] == first
    assert selection_for(tmp_path / "c", row.replace('"gold": 0', '"gold": 1')).fingerprints["t"] != first


def test_task_fingerprint_follows_the_files_a_data_glob_matches(tmp_path):
    """`data_files: .../parts/*.jsonl`: a file behind the glob changed, added or removed is another task."""
    parts = tmp_path / "parts"
    parts.mkdir()
    row = '{"query": "q", "choices": ["a", "b", "c", "d"], "gold": 0}\n'
    (parts / "a.jsonl").write_text(row)
    (parts / "b.jsonl").write_text(row)
    config = (SHIPPED_DIR / "gqa_nextsentence.yaml").read_text().replace("task: gqa_nextsentence", "task: t")
    (tmp_path / "t.yaml").write_text(config.replace("test: gqa_nextsentence.jsonl", f"test: '{parts}/*.jsonl'"))

    def fingerprint() -> str:
        return resolve_tasks(str(tmp_path / "t.yaml"), [], tmp_path / "stage",
                             ResultCache(tmp_path / "cache").file_hash).fingerprints["t"]

    first = fingerprint()
    assert fingerprint() == first
    (parts / "b.jsonl").write_text(row.replace('"gold": 0', '"gold": 1'))
    changed = fingerprint()
    (parts / "c.jsonl").write_text(row)
    added = fingerprint()
    (parts / "c.jsonl").unlink()
    assert len({first, changed, added}) == 3 and fingerprint() == changed


def test_a_missing_task_file_is_reported_as_no_such_file(tmp_path):
    missing = tmp_path / "tasks" / "my_task.yaml"
    with pytest.raises(ConfigError, match=f"^task file {missing}: no such file$"):
        resolve_tasks(f"gqa_lastword,{missing}", [], tmp_path / "stage", ResultCache(tmp_path).file_hash)


@pytest.mark.parametrize("typo,meant", [("gqa_lastwrd", "gqa_lastword"), ("hellaswg", "hellaswag")])
@pytest.mark.slow
def test_a_misspelt_task_name_gets_a_suggestion(tmp_path, typo, meant):
    with pytest.raises(ConfigError, match=rf"^unknown task '{typo}' \(did you mean '{meant}'\?\): not a shipped"):
        resolve_tasks(typo, [], tmp_path / "stage", ResultCache(tmp_path).file_hash)

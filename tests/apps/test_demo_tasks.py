"""gqa-demo's tasks fit its model: in its domain (held-out docstrings) and within its positions, so lm-eval
truncates nothing and warns about nothing."""

import json

from gqa_uptrain.apps.demo import SEQ_LEN
from gqa_uptrain.apps.demo_tasks import build, write_tasks
from gqa_uptrain.convert.calibration.data import stdlib_docstrings
from gqa_uptrain.eval.cache import ResultCache
from gqa_uptrain.eval.local_tasks import resolve_tasks

TEXT = "\n\n".join(text for texts in list(stdlib_docstrings().values())[::8] for text in texts)  # as the demo holds out


def short(text: str) -> bool:
    return len(text) <= 4 * SEQ_LEN  # a stand-in for the demo's tokenizer: about 3 characters a token


def test_every_item_fits_and_asks_what_its_kind_asks():
    tasks = build(TEXT, short, items=100)
    assert [len(rows) for rows in tasks.values()] == [100, 100]
    for item in tasks["demo_lastword"]:
        assert short(f"{item['context']} {item['continuation']}") and len(item["continuation"]) >= 4
        assert item["continuation"].lower() in item["context"].lower()  # the passage predicts it
    for item in tasks["demo_nextsentence"]:
        assert all(short(f"{item['query']} {choice}") for choice in item["choices"])
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4 and 0 <= item["gold"] < 4
    assert build(TEXT, short, items=100) == tasks  # seeded: a rerun of the demo asks the same


def test_the_written_folder_is_what_gqa_eval_takes(tmp_path):
    folder = write_tasks(TEXT, short, tmp_path / "tasks", items=5)
    selection = resolve_tasks(str(folder), [], tmp_path / "stage", ResultCache(tmp_path / "cache").file_hash)
    assert sorted(selection.names) == ["demo_lastword", "demo_nextsentence"]
    rows = [json.loads(line) for line in (folder / "demo_lastword.jsonl").read_text().splitlines()]
    assert len(rows) == 5

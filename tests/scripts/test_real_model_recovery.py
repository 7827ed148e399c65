"""The real-model recovery study at CPU scale: the same code path as on the GPU, every arm, a few steps each."""

import json
import lzma
from pathlib import Path

import pytest

from gqa_uptrain.apps.scratch import init_llama, train_bpe_tokenizer

from .conftest import load_script

study = load_script("real_model_recovery")

WORDS = ("the quick brown fox jumps over a lazy dog while seven old ships sail north past green hills and "
         "quiet towns where people read books about rivers stars and distant kings").split()


def _text(seed: int, words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * i) % len(WORDS)] for i in range(words)) + "."


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A small pretrained-like model with 3 KV heads, Gutenberg-shaped shards and benchmark files."""
    root = tmp_path_factory.mktemp("recovery-inputs")
    gutenberg = root / "gutenberg"
    gutenberg.mkdir()
    for name, seeds in (("train-00", range(40)), ("validation-00", range(100, 104))):
        with lzma.open(gutenberg / f"{name}.jsonl.xz", "wt") as out:
            for seed in seeds:
                out.write(json.dumps({"text": _text(seed, 600), "author": f"a{seed}", "title": f"t{seed}"}) + "\n")
    evals = root / "eval"
    evals.mkdir()
    (evals / "wikitext-2-raw-test.txt").write_text("\n".join(_text(s, 200) for s in range(200, 210)))
    rows = {
        "lambada_openai": [{"context": _text(s, 20), "continuation": "dog"} for s in range(10)],
        "arc_easy": [{"query": _text(s, 8), "choices": ["rivers", "stars", "kings"], "gold": s % 3} for s in range(10)],
        "piqa": [{"query": _text(s, 8), "choices": ["books", "ships"], "gold": s % 2} for s in range(10)],
        "winogrande": [{"context_options": [_text(s, 6), _text(s + 1, 6)], "continuation": "north", "gold": s % 2}
                       for s in range(10)],
    }
    for task, items in rows.items():
        (evals / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    tokenizer = root / "tokenizer"
    train_bpe_tokenizer((_text(s, 300) for s in range(50)), 300, 512, tokenizer)
    model = root / "model"
    init_llama(tokenizer, model, hidden=48, layers=2, heads=6, kv_heads=3, max_length=512)
    return {"model": model, "data": gutenberg, "eval_data": evals}


@pytest.mark.slow
def test_every_arm_runs_and_the_results_hold_every_point(inputs, tmp_path):
    out = tmp_path / "study"
    argv = ["--model", str(inputs["model"]), "--data", str(inputs["data"]), "--eval-data", str(inputs["eval_data"]),
            "--output", str(out), "--scale", "smoke"]
    study.main(argv)
    summary = json.loads((out / "results.json").read_text())
    records = summary["records"]
    arms = {r["arm"] for r in records}
    assert arms == {a.name for a in study.arms()} | {"calibrated-attention-distill-books",
                                                     f"{study.CLOSED_FORM} (not trained)"}
    smoke = study.SCALES["smoke"]
    for arm in study.arms():
        tokens = sorted(r["tokens"] for r in records if r["arm"] == arm.name)
        longest = smoke.budgets if arm in (study.RECOMMENDED, study.BASELINE) else smoke.budgets[:1]
        assert tokens == [0.0, *longest], arm.name
    assert all(r["wikitext_loss"] > 0 and r["books_loss"] > 0 for r in records)
    # tasks at the starting points and at each arm's longest run (losses everywhere)
    tasked = {(r["arm"], r["tokens"]) for r in records if set(r.get("tasks") or ()) == set(study.TASKS)}
    longest = {}
    for r in records:
        longest[r["arm"]] = max(longest.get(r["arm"], 0.0), r["tokens"])
    assert {(arm, tokens) for arm, tokens in longest.items()} <= tasked
    assert all(tokens in (0.0, longest[arm]) for arm, tokens in tasked)
    goals = summary["goals"]
    assert goals["gap_wikitext_at_longest"] is not None and goals["attention_only_cost"]
    assert (out / "recovery.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "results.md").read_text().count("\n") == len(records) + 2
    # resumable: finished runs are kept, so a second call trains nothing and measures from the cache
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/model/model.safetensors")}
    study.main(argv)
    assert before == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/model/model.safetensors")}

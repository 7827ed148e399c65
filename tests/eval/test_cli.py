"""gqa-eval end to end on tiny models, offline: report files, caching, and one clear error per bad input."""

import csv
import json
import shutil

import pytest
import torch

from gqa_uptrain.eval import runner
from gqa_uptrain.eval.cli import main
from tiny_models import small_llama


def test_full_run_writes_every_report_file(full_run):
    assert full_run["code"] == 0
    output = full_run["output"]
    for name in ("report.json", "report.csv", "report.md", "deltas.png", "quality_vs_kv_cache.png"):
        assert (output / name).stat().st_size > 0, name
    for name in ("deltas.png", "quality_vs_kv_cache.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_compares_every_task_metric_and_perplexity(full_run):
    report = full_run["report"]
    rows = next(iter(report["comparisons"].values()))
    metrics = {(r["task"], r["metric"]) for r in rows}
    assert {("gqa_lastword", "acc"), ("gqa_lastword", "perplexity"), ("gqa_nextsentence", "acc"),
            ("gqa_nextsentence", "acc_norm"), ("perplexity", "token_perplexity")} <= metrics
    average = next(r for r in rows if r["task"] == "average")
    headline_metrics = {("gqa_lastword", "acc"), ("gqa_nextsentence", "acc_norm")}
    headline = [r for r in rows if (r["task"], r["metric"]) in headline_metrics]
    assert average["base"] == pytest.approx(sum(r["base"] for r in headline) / 2)
    for row in rows:
        assert row["delta"] == pytest.approx(row["candidate_value"] - row["base"])
    assert report["settings"]["limit"] == 6 and report["settings"]["num_fewshot"] == 0


def test_report_states_kv_cache_size_from_config(full_run):
    report = full_run["report"]
    # 2 layers x (K and V) x KV heads x head_dim 16 x 4 bytes (float32, the checkpoints' dtype)
    assert report["base"]["kv_cache_bytes_per_token"] == 2 * 2 * 4 * 16 * 4
    assert report["candidates"][0]["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert report["candidates"][0]["num_key_value_heads"] == 2
    markdown = (full_run["output"] / "report.md").read_text()
    assert "| 1.0 KiB | 1.000 |" in markdown and "| 512 B | 0.500 |" in markdown


def test_csv_has_a_row_per_candidate_task_and_metric(full_run):
    with open(full_run["output"] / "report.csv") as f:
        rows = list(csv.DictReader(f))
    report_rows = next(iter(full_run["report"]["comparisons"].values()))
    assert len(rows) == len(report_rows)
    assert {r["task"] for r in rows} == {"gqa_lastword", "gqa_nextsentence", "perplexity", "average"}


def test_rerun_is_served_from_the_cache(gqa_eval, full_run, monkeypatch, capsys):
    def no_evaluation(*args, **kwargs):
        raise AssertionError("a cached result was evaluated again")

    monkeypatch.setattr(runner, "evaluate_task", no_evaluation)
    monkeypatch.setattr(runner, "perplexity", no_evaluation)
    monkeypatch.setattr(runner, "load_weights", no_evaluation)
    assert gqa_eval(full_run["args"]) == 0
    again = json.loads((full_run["output"] / "report.json").read_text())
    assert again["comparisons"] == full_run["report"]["comparisons"]


def test_base_is_evaluated_once_for_new_candidates(gqa_eval, full_run, eval_args, tiny_llama, tiny_llama_gqa2,
        tmp_path, monkeypatch):
    """A second candidate (same weights, another folder) reuses the base's and the first candidate's results."""
    evaluated = []
    real = runner.evaluate_task

    def counting(model, tokenizer, name, *args):
        evaluated.append(name)
        return real(model, tokenizer, name, *args)

    monkeypatch.setattr(runner, "evaluate_task", counting)
    copy = shutil.copytree(tiny_llama_gqa2, tmp_path / "another-gqa2")
    args = eval_args(tiny_llama, [tiny_llama_gqa2, copy], tmp_path / "report", full_run["root"] / "cache",
                     "--tasks", "gqa_lastword,gqa_nextsentence")
    assert gqa_eval(args) == 0
    assert evaluated == []  # the copy has the same content, hence the same fingerprint
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert len(report["comparisons"]) == 2


def test_failed_candidate_keeps_the_others(gqa_eval, full_run, eval_args, tiny_llama, tiny_llama_gqa2,
        tmp_path, capsys):
    broken = shutil.copytree(tiny_llama_gqa2, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    args = eval_args(tiny_llama, [broken, tiny_llama_gqa2], tmp_path / "report", full_run["root"] / "cache",
                     "--tasks", "gqa_lastword")
    assert gqa_eval(args) == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and str(broken) in error_lines[0]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["candidates"][0]["error"] and str(broken) in report["candidates"][0]["error"]
    assert [label for label in report["comparisons"]] == [report["candidates"][1]["label"]]


@pytest.mark.slow
def test_candidate_failing_midway_keeps_its_finished_tasks(gqa_eval, eval_args, tiny_llama, tiny_llama_gqa2,
        tmp_path, monkeypatch, capsys):
    calls = []
    real = runner.evaluate_task

    def fails_on_the_fourth(*args):
        calls.append(args[2])
        if len(calls) == 4:  # base: both tasks; candidate: the first task, then this
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(*args)

    monkeypatch.setattr(runner, "evaluate_task", fails_on_the_fourth)
    args = eval_args(tiny_llama, [tiny_llama_gqa2], tmp_path / "out", tmp_path / "cache",
                     "--tasks", "gqa_lastword,gqa_nextsentence")
    assert gqa_eval(args) == 2
    line = _one_error_line(capsys)
    assert f"candidate {tiny_llama_gqa2}: model {tiny_llama_gqa2}: out of memory at --batch-size 4" in line
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "out of memory" in report["candidates"][0]["error"]
    rows = next(iter(report["comparisons"].values()))
    assert {r["task"] for r in rows} == {"gqa_lastword", "average"}


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gqa-eval: error:")]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.slow
def test_unknown_task_is_named(gqa_eval, eval_args, tiny_llama, tmp_path, capsys):
    args = eval_args(tiny_llama, [], tmp_path / "out", tmp_path / "cache", "--tasks", "gqa_lastword,no_such_task_xyz")
    assert gqa_eval(args) == 2
    assert "unknown task 'no_such_task_xyz'" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_standard_task_name_goes_to_lm_eval(gqa_eval, eval_args, tiny_llama, tmp_path, capsys, monkeypatch):
    """`arc_easy` is found in lm-eval's own index and its Hub data requested; offline, that fails in one line."""
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = eval_args(tiny_llama, [], tmp_path / "out", tmp_path / "cache", "--tasks", "gqa_lastword,arc_easy")
    assert gqa_eval(args) == 2
    line = _one_error_line(capsys)
    assert "task 'arc_easy': its data does not load" in line and "allenai/ai2_arc" in line
    assert not (tmp_path / "out").exists()  # found before any model ran


def test_model_that_does_not_load_is_named(gqa_eval, eval_args, tiny_llama, tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    missing.mkdir()
    args = eval_args(tiny_llama, [missing], tmp_path / "out", tmp_path / "cache", "--tasks", "gqa_lastword")
    assert gqa_eval(args) == 2
    assert str(missing) in _one_error_line(capsys)


def test_different_tokenizer_is_named(gqa_eval, eval_args, tiny_llama, tmp_path, capsys):
    other = shutil.copytree(tiny_llama, tmp_path / "other-tokenizer")
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["zzzunseen"] = len(tokenizer["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    args = eval_args(tiny_llama, [other], tmp_path / "out", tmp_path / "cache", "--tasks", "gqa_lastword")
    assert gqa_eval(args) == 2
    line = _one_error_line(capsys)
    assert str(other) in line and "tokenizer" in line


def test_empty_perplexity_file_is_named(gqa_eval, eval_args, tiny_llama, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert gqa_eval(eval_args(tiny_llama, [], tmp_path / "out", tmp_path / "cache", "--perplexity", str(empty))) == 2
    line = _one_error_line(capsys)
    assert str(empty) in line and "empty" in line


def test_task_folder_with_real_benchmark_data(gqa_eval, eval_args, shared_data, tiny_llama, tiny_llama_gqa2,
        tmp_path):
    """A user's own task folder (here COPA from tests/data, named by absolute path), run by folder path."""
    data = shared_data / "eval" / "copa.jsonl"
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    (folder / "copa_local.yaml").write_text(
        "task: copa_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{query}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{gold}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    args = eval_args(tiny_llama, [tiny_llama_gqa2], tmp_path / "out", tmp_path / "cache", "--tasks", str(folder))
    assert gqa_eval(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["tasks"] == ["copa_local"]
    rows = next(iter(report["comparisons"].values()))
    assert {r["metric"] for r in rows if r["task"] == "copa_local"} == {"acc", "acc_norm"}
    n_samples = report["base"]["tasks"]["copa_local"]["n-samples"]["copa_local"]
    assert n_samples == {"original": len(data.read_text().splitlines()), "effective": 6}


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--base", "--model", "--tasks", "--include-path", "--num-fewshot", "--batch-size", "--limit",
                 "--seed", "--dtype", "--perplexity", "--perplexity-stride", "--speed", "--output", "--cache-dir"):
        assert flag in text
    assert "gqa_lastword" in text and "gqa_nextsentence" in text


@pytest.mark.slow
def test_speed_measures_kv_cache_and_decode_for_every_model(gqa_eval, eval_args, tiny_llama, tiny_llama_gqa2,
        tmp_path):
    args = eval_args(tiny_llama, [tiny_llama_gqa2], tmp_path / "out", tmp_path / "cache", "--speed",
                     "--speed-batch-sizes", "1,2", "--speed-contexts", "8", "--speed-new-tokens", "2")
    assert gqa_eval(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for record in (report["base"], *report["candidates"]):
        assert record["measured_kv_cache_bytes_per_token"] == record["kv_cache_bytes_per_token"]
        assert [(case["batch"], case["context"]) for case in record["speed"]] == [(1, 8), (2, 8)]
        assert all(case["tokens_per_s"] > 0 and case["floor_tokens_per_s"] > 0 for case in record["speed"])
    bandwidths = {case["bandwidth_bytes_per_s"] for r in (report["base"], *report["candidates"]) for case in r["speed"]}
    assert len(bandwidths) == 1  # every floor from the same measured bandwidth
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Decode speed" in markdown and " vs base\n" not in markdown  # no empty quality comparison


def test_items_longer_than_the_context_are_one_error_line(gqa_eval, eval_args, tmp_path, gpt2_tokenizer, capsys):
    short = tmp_path / "short-context"
    small_llama(vocab=len(gpt2_tokenizer), num_attention_heads=2, max_position_embeddings=8).save_pretrained(short)
    gpt2_tokenizer.save_pretrained(short)
    code = gqa_eval(eval_args(short, [], tmp_path / "report", tmp_path / "cache", "--tasks", "gqa_nextsentence"))
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # after lm-eval's bar
    assert len(errors) == 1 and errors[0].endswith(
        "gqa-eval: error: task 'gqa_nextsentence': an item does not fit the model's context of 8 tokens "
        "(lm-eval cannot score it)")

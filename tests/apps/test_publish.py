"""gqa-publish: the card it writes and the upload it makes, up to the Hub client's calls (the Hub is unreachable)."""

import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from gqa_uptrain.convert import convert_checkpoint
from gqa_uptrain.eval.report import build_report
from gqa_uptrain.apps.publish import main
from tiny_models import random_model


@pytest.fixture
def converted(tmp_path) -> Path:
    source = tmp_path / "tiny"
    random_model("llama", kv_heads=4).save_pretrained(source)
    (source / "README.md").write_text("---\nlicense: llama2\n---\n")
    return convert_checkpoint(source, 1, tmp_path / "tiny-mqa", progress=False)


@pytest.fixture
def report(tmp_path, converted) -> Path:
    def model(label: str, ref: str, acc: float) -> dict:
        results = {"lambada": {"acc,none": acc, "acc_stderr,none": 0.01}}
        return {"label": label, "ref": ref, "tasks": {"lambada": {"results": results,
                                                                  "higher_is_better": {"lambada": {"acc": True}}}}}
    built = build_report({}, model("base", "tiny", 0.60), [model("mqa", str(converted), 0.50)])
    path = tmp_path / "report.json"
    path.write_text(json.dumps(built))
    return path


@pytest.fixture
def no_upload(monkeypatch):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: calls.append(("create_repo", a, k)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, *a, **k: calls.append(("upload_folder", a, k)))
    return calls


def test_dry_run_writes_the_card_and_uploads_nothing(converted, report, no_upload, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    main([str(converted), "--repo-id", "me/tiny-mqa", "--report", str(report), "--dry-run"])
    card = (converted / "README.md").read_text()
    assert "base_model: tiny" in card and "license: llama2" in card
    assert "| KV heads | 4 -> 1 |" in card and "| KV cache per token | 1,024 -> 256 bytes (25.0%) |" in card
    assert "| lambada | acc | 0.6000 | 0.5000 | -0.1000 * | 0.0141 |" in card
    out = capsys.readouterr().out
    assert out.startswith("would upload 5 files") and "https://huggingface.co/me/tiny-mqa" in out
    assert no_upload == []


def test_upload_goes_through_the_hub_client(converted, no_upload, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    main([str(converted), "--repo-id", "me/tiny-mqa", "--private"])
    assert [c[0] for c in no_upload] == ["create_repo", "upload_folder"]
    assert no_upload[0][1] == ("me/tiny-mqa",) and no_upload[0][2]["private"] is True
    assert no_upload[1][2]["folder_path"] == converted and no_upload[1][2]["repo_id"] == "me/tiny-mqa"


def test_missing_token_is_one_line(converted, no_upload, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(SystemExit) as exit_info:
        main([str(converted), "--repo-id", "me/tiny-mqa"])
    assert exit_info.value.code == 2 and no_upload == []
    assert capsys.readouterr().err.startswith("gqa-publish: error: no Hugging Face token")


def test_report_without_this_model(converted, report, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(converted), "--repo-id", "me/x", "--report", str(report), "--candidate", "gqa8", "--dry-run"])
    assert "has no candidate gqa8 (it has: mqa)" in capsys.readouterr().err


def test_missing_report_is_one_line(converted, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(converted), "--repo-id", "me/x", "--report", str(tmp_path / "nope.json"), "--dry-run"])
    assert capsys.readouterr().err.strip() == f"gqa-publish: error: {tmp_path / 'nope.json'}: no such gqa-eval report"

"""gqa-publish: the card it writes and the upload it makes, up to the Hub client's calls (the Hub is unreachable)."""

import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from gqa_uptrain.convert import convert_checkpoint
from gqa_uptrain.convert.card import CARD_MARKER
from gqa_uptrain.eval.report import build_report
from gqa_uptrain.apps.publish import main
from tiny_models import random_model


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time, to prove that nothing was written."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


@pytest.fixture
def converted(tmp_path) -> Path:
    source = tmp_path / "tiny"
    random_model("llama", kv_heads=4).save_pretrained(source)
    (source / "README.md").write_text("---\nlicense: llama2\n---\n")
    return convert_checkpoint(source, 1, tmp_path / "tiny-mqa", progress=False).output


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
    """The Hub client's calls, recorded; create_commit's operations as (path in repo, bytes uploaded)."""
    calls = []

    def commit(self, repo_id, operations, **kwargs):
        sent = [(op.path_in_repo, op.path_or_fileobj if isinstance(op.path_or_fileobj, bytes)
                 else Path(op.path_or_fileobj).read_bytes()) for op in operations]
        calls.append(("create_commit", (repo_id, sent), kwargs))

    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: calls.append(("create_repo", a, k)))
    monkeypatch.setattr(HfApi, "create_commit", commit)
    return calls


def test_dry_run_prints_the_card_and_changes_nothing(converted, report, no_upload, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    before = snapshot(converted)
    main([str(converted), "--repo-id", "me/tiny-mqa", "--report", str(report), "--dry-run"])
    assert snapshot(converted) == before
    out = capsys.readouterr().out
    card = out.split("--- README.md as it would be uploaded (not written: --dry-run) ---\n")[1]
    assert "base_model" not in card and "license: llama2" in card and CARD_MARKER in card  # converted from a folder
    assert "| KV heads | 4 -> 1 |" in card and "| KV cache per token | 1,024 -> 256 bytes (25.0%) |" in card
    assert "| lambada | acc | 0.6000 | 0.5000 | -0.1000 * | 0.0141 |" in card
    assert out.startswith("would upload 5 files") and "https://huggingface.co/me/tiny-mqa" in out
    assert "card: README.md generated, replacing the one gqa-uptrain wrote before" in out
    assert no_upload == []


def test_upload_goes_through_the_hub_client(converted, report, no_upload, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    main([str(converted), "--repo-id", "me/tiny-mqa", "--report", str(report), "--private"])
    assert [c[0] for c in no_upload] == ["create_repo", "create_commit"]
    assert no_upload[0][1] == ("me/tiny-mqa",) and no_upload[0][2]["private"] is True
    repo_id, sent = no_upload[1][1]
    assert repo_id == "me/tiny-mqa" and [name for name, _ in sent] == sorted(
        p.name for p in converted.iterdir())
    card = dict(sent)["README.md"]
    assert b"## Quality against the base model" in card
    assert (converted / "README.md").read_bytes() == card  # written once the upload succeeded


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


# Hostile and damaged folders, as a table: (setup of the folder, real upload?, the upload fails?, exit code, the one
# line it must print and where, what must hold afterwards). `outside` is a folder beside the model.
HAND_CARD = b"# my model\n\nWritten by hand.\n"


def hand_card(folder: Path, outside: Path) -> None:
    (folder / "README.md").write_bytes(HAND_CARD)


def no_card(folder: Path, outside: Path) -> None:
    (folder / "README.md").unlink()


def notes_link_out(folder: Path, outside: Path) -> None:
    (outside / "secret.txt").write_text("not for upload")
    (folder / "notes.txt").symlink_to(outside / "secret.txt")


def folder_link_out(folder: Path, outside: Path) -> None:
    (folder / "extras").symlink_to(outside, target_is_directory=True)


def weights_link_out(folder: Path, outside: Path) -> None:
    (folder / "model.safetensors").rename(outside / "model.safetensors")
    (folder / "model.safetensors").symlink_to(outside / "model.safetensors")


def provenance_link_out(folder: Path, outside: Path) -> None:
    (folder / "gqa_provenance.json").rename(outside / "record.json")
    (folder / "gqa_provenance.json").symlink_to(outside / "record.json")


def card_link_out(folder: Path, outside: Path) -> None:
    (outside / "card.md").write_bytes(HAND_CARD)
    (folder / "README.md").unlink()
    (folder / "README.md").symlink_to(outside / "card.md")


def card_a_folder(folder: Path, outside: Path) -> None:
    (folder / "README.md").unlink()
    (folder / "README.md").mkdir()


def card_kept(folder: Path, sent: dict) -> bool:
    return (folder / "README.md").read_bytes() == HAND_CARD and sent.get("README.md", HAND_CARD) == HAND_CARD


HOSTILE = {
    "hand-written card, dry run": (hand_card, False, False, 0, ("out", "kept as it is"), card_kept),
    "hand-written card, upload": (hand_card, True, False, 0, ("out", "kept as it is"), card_kept),
    "hand-written card, failed upload": (hand_card, True, True, 2, ("err", "failed, "), card_kept),
    "generated card, failed upload": (lambda f, o: None, True, True, 2, ("err", "is unchanged"),
                                      lambda f, sent: CARD_MARKER in (f / "README.md").read_text()),
    "no card, dry run": (no_card, False, False, 0, ("out", "generated (the folder has none)"),
                         lambda f, sent: not (f / "README.md").exists()),
    "a file linking out": (notes_link_out, True, False, 0, ("err", "notes.txt not uploaded: it links to "),
                           lambda f, sent: "notes.txt" not in sent
                           and all(b"not for upload" not in data for data in sent.values())),
    "a folder linking out": (folder_link_out, True, False, 0, ("err", "extras not uploaded: it links to "),
                             lambda f, sent: not any(name.startswith("extras") for name in sent)),
    "weights linking out": (weights_link_out, True, False, 2, ("err", "model.safetensors: it links to "),
                            lambda f, sent: sent == {}),
    "provenance linking out": (provenance_link_out, True, False, 2, ("err", "gqa_provenance.json: it links to "),
                               lambda f, sent: sent == {}),
    # A card that could not be uploaded is refused: neither "kept" while left out, nor replaced by the generated one.
    "card linking out": (card_link_out, True, False, 2, ("err", "README.md: it links to "),
                         lambda f, sent: sent == {} and (f / "README.md").read_bytes() == HAND_CARD),
    "card linking out, dry run": (card_link_out, False, False, 2, ("err", "outside the model folder, so it would not be "
                                  "uploaded and the model would have no card; copy the card into the folder, or "
                                  "remove README.md to upload the generated one"), lambda f, sent: sent == {}),
    "card a folder": (card_a_folder, True, False, 2, ("err", "README.md: it is not a regular file, so it would not be "
                                                      "uploaded"), lambda f, sent: sent == {}),
}


@pytest.mark.parametrize("case", HOSTILE, ids=str)
def test_hostile_folders(case, converted, tmp_path, no_upload, monkeypatch, capsys):
    setup, upload, upload_fails, code, (stream, line), holds = HOSTILE[case]
    outside = tmp_path / "outside"
    outside.mkdir()
    setup(converted, outside)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    if upload_fails:
        def refuse(self, *args, **kwargs):
            raise ConnectionError("Network is unreachable")
        monkeypatch.setattr(HfApi, "create_commit", refuse)
    before = snapshot(converted) if not upload or upload_fails else None
    argv = [str(converted), "--repo-id", "me/tiny-mqa"] + ([] if upload else ["--dry-run"])
    if code == 0:
        main(argv)
    else:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == code
    captured = capsys.readouterr()
    said = [text for text in getattr(captured, stream).splitlines() if line in text]
    assert len(said) == 1, getattr(captured, stream)
    if code != 0:
        assert captured.err.strip() == said[0] and said[0].startswith("gqa-publish: error: ")
    if before is not None:
        assert snapshot(converted) == before  # a dry run or a failed upload changes nothing
    commits = [c for c in no_upload if c[0] == "create_commit"]
    assert holds(converted, dict(commits[0][1][1]) if commits else {})


# Bad arguments, as a table: (the repo id, what --report holds (None: no --report), the one line it must print).
BAD_ARGUMENTS = {
    "repo id of three parts": ("a/b/c", None, "--repo-id 'a/b/c' is not a Hub repository id (use NAME or OWNER/NAME)"),
    "repo id with a space": ("me/my model", None, "--repo-id 'me/my model' is not a Hub repository id"),
    "truncated report": ("me/x", '{"candidates": [{"label": "mq', "report.json: not a readable gqa-eval report ("),
    "report not JSON": ("me/x", "\x00\xff garbage", "report.json: not a readable gqa-eval report ("),
    "report of another shape": ("me/x", "[1, 2, 3]", "report.json: not a gqa-eval report (no candidates"),
    "empty report": ("me/x", "", "report.json: not a readable gqa-eval report ("),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS, ids=str)
def test_bad_arguments_are_one_line_and_change_nothing(case, converted, tmp_path, no_upload, monkeypatch, capsys):
    repo_id, report, line = BAD_ARGUMENTS[case]
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    argv = [str(converted), "--repo-id", repo_id]
    if report is not None:
        (tmp_path / "report.json").write_text(report)
        argv += ["--report", str(tmp_path / "report.json")]
    before = snapshot(converted)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and no_upload == []
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gqa-publish: error: ") and line in err, err
    assert snapshot(converted) == before


@pytest.mark.parametrize("base_id,reference", [
    ("meta-llama/Llama-2-7b-hf", "[meta-llama/Llama-2-7b-hf](https://huggingface.co/meta-llama/Llama-2-7b-hf)"),
    ("gpt2", "[gpt2](https://huggingface.co/gpt2)"),
    ("/home/me/models/tiny", "`tiny`"),  # a path tells where and under which user the model was made
    ("./tiny", "`tiny`"),
    ("~/tiny", "`tiny`"),
])
def test_the_card_links_a_hub_base_and_names_a_local_one_by_its_folder(base_id, reference):
    from gqa_uptrain.convert.card import _reference  # the Hub-id rule is gqa_uptrain.source's, the one there is

    assert _reference(base_id) == reference

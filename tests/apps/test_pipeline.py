"""gqa-pipeline: one recipe drives convert -> uptrain -> eval -> publish (the upload itself is dry-run)."""

import json
from pathlib import Path

import pytest
import yaml

from gqa_uptrain.apps import pipeline

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def recipe(tmp_path, tiny_llama, shared_data) -> Path:
    held_out = tmp_path / "held_out.txt"
    held_out.write_text((shared_data / "tinyshakespeare.txt").read_text()[-3000:])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(tmp_path / "tiny-gqa2")},
        "data": {"train": {"path": str(shared_data / "tinyshakespeare.txt")}, "holdout_docs": 8, "seq_len": 32},
        "batch": {"micro_batch": 2, "global_batch": 2},
        "train": {"lr": 1e-3, "precision": "fp32"},
        "budget": {"steps": 2},
        "log": {"trackers": []},
        "convert": {"source": str(tiny_llama), "groups": 2},
        "evaluate": {"tasks": "gqa_lastword", "limit": 4, "batch_size": 4, "perplexity": str(held_out)},
        "publish": {"repo_id": "me/tiny-gqa2"},
    }))
    return path


def test_one_recipe_runs_every_step_and_resumes(recipe, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("NUM_GPUS", "0")
    pipeline.main([str(recipe), "--publish-dry-run"])
    model = tmp_path / "run" / "model"
    record = json.loads((model / "gqa_provenance.json").read_text())
    assert record["conversion"]["groups"] == 2 and record["uptraining"]["steps"] == 2
    assert json.loads((tmp_path / "run" / "eval" / "report.json").read_text())["candidates"][0]["ref"] == str(model)
    out = capfd.readouterr().out  # a dry run prints the card it would upload and writes nothing
    assert "would upload" in out and "| KV heads | 4 -> 2 |" in out and "## Quality against the base model" in out
    pipeline.main([str(recipe), "--dry-run"])
    out = capfd.readouterr().out
    assert "[1/4] convert (done, skipped)" in out and "[2/4] uptrain (done, skipped)" in out


@pytest.mark.parametrize("name", ["llama-2-7b-gqa8", "llama-2-7b-mqa"])
def test_paper_recipes_plan_all_four_steps(name, capsys):
    pipeline.main([str(REPO / "recipes" / f"{name}.yaml"), "--dry-run", "--repo-id", "me/x"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["[1/4] convert", "[2/4] uptrain", "[3/4] evaluate",
                                                        "[4/4] publish"]
    assert all("(would run)" in line for line in lines)


def test_missing_source_fails_before_any_step(recipe, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main([str(recipe), "convert.source=/nonexistent/model"])
    assert exit_info.value.code == 2
    assert "convert.source /nonexistent/model is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "tiny-gqa2").exists()


@pytest.mark.parametrize("override, recorded", [
    ("convert.groups=1", "groups 2"),
    ("convert.method=first", "method mean"),
    ("convert.source=SIBLING", "groups 2"),
])
def test_existing_folder_of_another_conversion_is_not_skipped(recipe, tmp_path, tiny_llama, capsys, override,
                                                              recorded):
    from gqa_uptrain.convert import convert_checkpoint

    convert_checkpoint(tiny_llama, 2, tmp_path / "tiny-gqa2", progress=False, say=None)
    if "SIBLING" in override:  # the same model, copied elsewhere: another source all the same
        import shutil
        shutil.copytree(tiny_llama, tmp_path / "sibling")
        override = override.replace("SIBLING", str(tmp_path / "sibling"))
    before = sorted(p.name for p in (tmp_path / "tiny-gqa2").iterdir())
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main([str(recipe), override, "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds another conversion" in err and recorded in err
    assert f"remove {tmp_path / 'tiny-gqa2'} or change model.path" in err
    assert sorted(p.name for p in (tmp_path / "tiny-gqa2").iterdir()) == before


def test_existing_folder_of_the_same_conversion_is_skipped(recipe, tmp_path, tiny_llama, capsys):
    from gqa_uptrain.convert import convert_checkpoint

    convert_checkpoint(tiny_llama, 2, tmp_path / "tiny-gqa2", progress=False, say=None)
    pipeline.main([str(recipe), "--dry-run"])
    assert "[1/4] convert (done, skipped)" in capsys.readouterr().out


def test_existing_folder_without_a_conversion_record_is_not_skipped(recipe, tmp_path, tiny_llama, capsys):
    import shutil
    shutil.copytree(tiny_llama, tmp_path / "tiny-gqa2")
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main([str(recipe), "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no gqa_provenance.json record of a conversion" in err

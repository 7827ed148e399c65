"""gqa-pipeline: one recipe drives convert -> uptrain -> eval -> publish (the upload itself is dry-run)."""

import json
import os
from pathlib import Path

import pytest
import yaml

from gqa_uptrain.apps import pipeline
from gqa_uptrain.apps.pipeline_recipe import load_pipeline_recipe
from gqa_uptrain.eval import EvaluationResult

pytestmark = pytest.mark.slow  # whole pipelines: convert, uptrain, evaluate

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
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    # one report: the converted model before uptraining and after it, each against the source
    assert [c["ref"] for c in report["candidates"]] == [str(tmp_path / "tiny-gqa2"), str(model)]
    assert set(report["comparisons"]) == {"tiny-gqa2", "run"}
    out = capfd.readouterr().out  # a dry run prints the card it would upload and writes nothing
    assert "gqa-pipeline: uptraining took the converted model tiny-gqa2 to run: perplexity " in out
    assert "would upload" in out and "| KV heads | 4 -> 2 |" in out and "## Quality against the base model" in out
    assert "(gqa-eval, `run`)" in out  # the card's quality is the uptrained model's
    pipeline.main([str(recipe), "--dry-run"])
    out = capfd.readouterr().out
    assert "[1/4] convert (done, skipped)" in out and "[2/4] uptrain (done, skipped)" in out


def uptraining_report(tmp_path: Path, perplexities: tuple[float, float, float],
                      scores: tuple[float, ...]) -> EvaluationResult:
    """A gqa-eval report of the base, the converted model and the uptrained one (perplexity, and one task's acc
    with stderr 0.01), as the evaluate step writes and returns it."""
    from gqa_uptrain.eval.report import build_report, write_report

    def model(ref: str, ppl: float, acc: float) -> dict:
        results = {"lambada": {"acc,none": acc, "acc_stderr,none": 0.01}}
        return {"label": Path(ref).name, "ref": ref, "perplexity": {"token_perplexity": ppl},
                "tasks": {"lambada": {"results": results, "higher_is_better": {"lambada": {"acc": True}}}}}

    refs = [str(tmp_path / name) for name in ("source", "converted", "uptrained")]
    base, *candidates = (model(ref, ppl, acc) for ref, ppl, acc in zip(refs, perplexities, scores))
    report = build_report({}, base, candidates)
    return EvaluationResult(report, tuple(write_report(report, tmp_path / "eval")))


@pytest.mark.parametrize("perplexities, scores, said, warning", [
    ((20.0, 193.4, 41.5), (0.6, 0.40, 0.50), "perplexity 193.4 -> 41.5, average acc 0.4 -> 0.5", None),
    ((20.0, 193.4, 209.3), (0.6, 0.40, 0.41), "perplexity 193.4 -> 209.3, average acc 0.4 -> 0.41",
     "perplexity 193.4 -> 209.3"),
    ((20.0, 193.4, 150.0), (0.6, 0.40, 0.30), "perplexity 193.4 -> 150", "average acc 0.4 -> 0.3"),
    ((20.0, 193.4, 193.0), (0.6, 0.40, 0.39), "average acc 0.4 -> 0.39", None),  # within two standard errors
])
def test_the_report_says_what_uptraining_changed_and_warns_when_it_made_it_worse(tmp_path, capsys, perplexities,
                                                                               scores, said, warning):
    report = uptraining_report(tmp_path, perplexities, scores)
    pipeline.compare_uptraining(report, tmp_path / "converted", tmp_path / "uptrained")
    captured = capsys.readouterr()
    assert captured.out.startswith("gqa-pipeline: uptraining took the converted model converted to uptrained: ")
    assert said in captured.out and f"({tmp_path / 'eval' / 'report.md'})" in captured.out
    warnings = captured.err.splitlines()
    if warning is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warnings[0].startswith("gqa-pipeline: warning: uptraining made the model worse "
                                                             f"than the conversion alone ({warning}): try a lower "
                                                             "train.lr"), warnings


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


# Checks that must come before the first step, dry run or not, as a table: (what is prepared in the recipe's folder,
# returning the overrides; the one line's text, {tmp} filled in; what must hold afterwards). Nothing is written.
def ro_output_dir(tmp: Path) -> list[str]:
    """output_dir in a read-only file system (root writes to any folder chmod'ed read-only)."""
    import shutil
    import subprocess

    (tmp / "ro").mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a read-only tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(tmp / "ro")], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    return [f"output_dir={tmp / 'ro' / 'run'}"]


def written(tmp: Path) -> bool:
    return not (tmp / "tiny-gqa2").exists() and not (tmp / "run").exists()


EARLY = {
    "model.path is output_dir": (lambda tmp: [f"model.path={tmp / 'run'}"], "model.path {tmp}/run and output_dir "
                                 "{tmp}/run overlap (one is the other or inside it): output_dir holds gqa-uptrain's "
                                 "run alone", written),
    "model.path inside output_dir": (lambda tmp: [f"model.path={tmp / 'run' / 'model'}"], "model.path {tmp}/run/model "
                                     "and output_dir {tmp}/run overlap", written),
    "model.path is convert.source": (lambda tmp: [f"model.path={tmp / 'source'}", f"convert.source={tmp / 'source'}"],
                                     "model.path {tmp}/source and convert.source {tmp}/source overlap (one is the "
                                     "other or inside it): the conversion would be written over the original model; "
                                     "choose another model.path",
                                     lambda tmp: written(tmp) and (tmp / "source" / "config.json").is_file()),
    "a missing data file": (lambda tmp: [f"data.train.path={tmp / 'no.txt'}"], "data path {tmp}/no.txt matches no "
                            "file", written),
    "a missing calibration file": (lambda tmp: ["convert.method=calibrated", f"convert.calibration={tmp / 'no.jsonl'}"],
                                   "data path {tmp}/no.jsonl matches no file", written),
    "a missing perplexity file": (lambda tmp: [f"evaluate.perplexity={tmp / 'no.txt'}"], "perplexity data "
                                  "{tmp}/no.txt: no such file", written),
    "an unknown task": (lambda tmp: ["evaluate.tasks=gqa_lastwrd"], "unknown task 'gqa_lastwrd' (did you mean "
                        "'gqa_lastword'?)", written),
    "an unknown method": (lambda tmp: ["convert.method=nonsense"], "convert: --method: Input should be 'mean', "
                          "'first', 'random' or 'calibrated' (got 'nonsense')", written),
    "refinement for mean pooling": (lambda tmp: ["convert.refine_steps=10"], "convert: --calibration, "
                                    "--calibration-tokens and --refine-steps apply to --method calibrated only",
                                    written),
    "a batch size of 0": (lambda tmp: ["evaluate.batch_size=0"], "evaluate: --batch-size must be at least 1, got 0",
                          written),
    "a malformed repo id": (lambda tmp: ["publish.repo_id=me/my model"], "publish.repo_id 'me/my model' is not a Hub "
                            "repository id (use NAME or OWNER/NAME)", written),
    "output_dir a file": (lambda tmp: ((tmp / "run").write_text("x"), [])[1], "output_dir {tmp}/run: is a file, not "
                          "a folder", lambda tmp: (tmp / "run").read_text() == "x"),
    "output_dir a dangling link": (lambda tmp: ((tmp / "run").symlink_to(tmp / "gone"), [])[1], "output_dir {tmp}/run "
                                   "is a link to {tmp}/gone, which does not exist", lambda tmp: not (tmp / "gone")
                                   .exists() and (tmp / "run").is_symlink()),
    "output_dir read-only": (ro_output_dir, "output_dir {tmp}/ro/run cannot be written ({tmp}/ro, where it would be "
                             "made): no permission, or a read-only file system", written),
}


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize("case", EARLY, ids=str)
def test_what_would_fail_at_a_step_fails_before_the_first(case, dry_run, recipe, tiny_llama, capsys):
    import shutil
    import subprocess

    tmp = recipe.parent
    shutil.copytree(tiny_llama, tmp / "source")
    prepare, line, holds = EARLY[case]
    try:
        said = refused(recipe, capsys, *prepare(tmp), *(["--dry-run"] if dry_run else []))
        assert line.format(tmp=tmp) in said, said
        assert holds(tmp)
    finally:
        if (tmp / "ro").is_dir():
            subprocess.run(["umount", "-l", str(tmp / "ro")], check=False)


def test_a_home_path_in_the_recipe_is_the_home(recipe, tmp_path, tiny_llama, capsys, monkeypatch):
    """`~/...` in any path of a recipe is the home folder (a folder named `~` in the working folder is one
    `rm -rf ~` away from deleting the home)."""
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_llama, tmp_path / "home" / "source")
    shutil.copy(recipe.parent / "held_out.txt", tmp_path / "home" / "held_out.txt")
    pipeline.main(["~/../recipe.yaml", "output_dir=~/run", "model.path=~/tiny-gqa2", "convert.source=~/source",
                   "evaluate.perplexity=~/held_out.txt", "--dry-run"])
    convert, uptrain, evaluate, publish = capsys.readouterr().out.splitlines()
    home = tmp_path / "home"
    # convert and evaluate are called in process, with the recipe's typed values (printed as the calls they are)
    assert f"convert_checkpoint({str(home / 'source')!r}, 2, {str(home / 'tiny-gqa2')!r}, method='mean')" in convert
    models = f"[{str(home / 'tiny-gqa2')!r}, {str(home / 'run' / 'model')!r}]"
    assert f"evaluate({str(home / 'source')!r}, {models}" in evaluate
    assert f"perplexity={str(home / 'held_out.txt')!r}" in evaluate and f"{home / 'run' / 'model'} " in publish
    assert "~" not in convert + evaluate + publish and not (tmp_path / "~").exists()
    # gqa-uptrain gets the recipe and overrides as written, and reads them by the same schema
    assert load_pipeline_recipe("~/../recipe.yaml", ["output_dir=~/run"]).output_dir == str(home / "run")


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


def test_a_source_replaced_under_the_same_path_is_not_skipped(recipe, tmp_path, tiny_llama, gpt2_tokenizer, capsys):
    """convert.source written anew with another model after the conversion: same path, same record of source,
    groups and method, other weights (what gqa_provenance.json's SHA-256 per weight file tells)."""
    import shutil

    from gqa_uptrain.convert import convert_checkpoint
    from tests.conftest import save_tiny_llama

    source = shutil.copytree(tiny_llama, tmp_path / "source")
    convert_checkpoint(source, 2, tmp_path / "tiny-gqa2", progress=False, say=None)
    pipeline.main([str(recipe), f"convert.source={source}", "--dry-run"])
    assert "[1/4] convert (done, skipped)" in capsys.readouterr().out
    save_tiny_llama(source, gpt2_tokenizer, kv_heads=4, seed=7)  # another model, same shapes, same path
    capsys.readouterr()
    before = sorted(p.name for p in (tmp_path / "tiny-gqa2").iterdir())
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main([str(recipe), f"convert.source={source}", "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gqa-pipeline: error: "), err
    assert f"convert.source {source} changed since model.path {tmp_path / 'tiny-gqa2'} was converted from it " \
           "(weights model.safetensors: not the bytes its gqa_provenance.json records)" in err
    assert sorted(p.name for p in (tmp_path / "tiny-gqa2").iterdir()) == before and not (tmp_path / "run").exists()


def test_existing_folder_without_a_conversion_record_is_not_skipped(recipe, tmp_path, tiny_llama, capsys):
    import shutil
    shutil.copytree(tiny_llama, tmp_path / "tiny-gqa2")
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main([str(recipe), "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds no gqa_provenance.json record of a conversion" in err


# ---- a finished uptraining is recognised by what it was made from, not by its folder ----

@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama, shared_data):
    """A pipeline run of convert and uptrain to the end (evaluation and publishing left out); its model.path kept
    aside, modification times included, so that a test can put the very model back."""
    import shutil

    tmp = tmp_path_factory.mktemp("finished")
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp / "run"),
        "model": {"path": str(tmp / "tiny-gqa2")},
        "data": {"train": {"path": str(shared_data / "tinyshakespeare.txt")}, "holdout_docs": 8, "seq_len": 32},
        "batch": {"micro_batch": 2, "global_batch": 2},
        "train": {"lr": 1e-3, "precision": "fp32"},
        "budget": {"steps": 2},
        "checkpoint": {"every": 1},
        "log": {"trackers": []},
        "convert": {"source": str(tiny_llama), "groups": 2},
    }))
    pipeline.main([str(path)])
    assert (tmp / "run" / "model" / "gqa_provenance.json").is_file()
    shutil.copytree(tmp / "tiny-gqa2", tmp / "pristine")  # copy2: same bytes, same modification times
    return path


def restore_model(recipe: Path) -> Path:
    import shutil

    model = recipe.parent / "tiny-gqa2"
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(recipe.parent / "pristine", model)
    return model


def run_files(recipe: Path) -> dict[str, int]:
    """Every file of the run and the converted model, by modification time: proof that nothing was touched."""
    return {str(p): p.stat().st_mtime_ns for folder in ("run", "tiny-gqa2") if (recipe.parent / folder).is_dir()
            for p in sorted((recipe.parent / folder).rglob("*"))}


def refused(recipe: Path, capsys, *argv: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main([str(recipe), *argv])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gqa-pipeline: error: {recipe}: "), lines
    return lines[0]


@pytest.mark.parametrize("changes", [[], ["checkpoint.every=2", "log.every=2", "eval.every=2"]])
def test_a_finished_uptraining_of_the_same_recipe_and_model_is_skipped(finished, changes, capsys):
    """Folder, cadence and logging decide no weight: the finished run is still this recipe's."""
    restore_model(finished)
    capsys.readouterr()
    pipeline.main([str(finished), *changes, "--dry-run"])
    out = capsys.readouterr().out
    assert "[1/2] convert (done, skipped)" in out and "[2/2] uptrain (done, skipped)" in out


@pytest.mark.parametrize("override, differs", [
    ("train.lr=2e-3", "train.lr"),
    ("budget.steps=3", "budget.steps"),
    ("data.seq_len=16", "data.seq_len"),
    ("seed=1", "seed"),
])
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_finished_uptraining_of_another_training_recipe_is_refused(finished, capsys, override, differs, dry_run):
    """The recipe's training section changed since the run: the pipeline neither skips the step (the model would not
    be the recipe's) nor redoes it over the old run (its checkpoints and model would be lost). One line, before any
    step runs, naming what differs and what to do."""
    restore_model(finished)
    before = run_files(finished)
    line = refused(finished, capsys, override, *(["--dry-run"] if dry_run else []))
    assert f"holds a run of a different recipe (differs in {differs})" in line
    assert "use a new output_dir, or the recipe that run was started with" in line
    assert run_files(finished) == before


def test_a_finished_uptraining_of_a_model_converted_again_in_place_is_refused(finished, capsys):
    """model.path holds the recipe's conversion (the convert step is rightly skipped), but not the one the run was
    trained from: the uptrained model is not this conversion's uptraining."""
    from gqa_uptrain.convert import convert_checkpoint

    restore_model(finished)
    recipe = yaml.safe_load(finished.read_text())
    convert_checkpoint(Path(recipe["convert"]["source"]), 2, finished.parent / "tiny-gqa2", force=True,
                       progress=False, say=None)
    before = run_files(finished)
    line = refused(finished, capsys, "--dry-run")
    assert "holds a run started from another model than" in line and "model.safetensors" in line
    assert "use a new output_dir, or restore the model that run was started from" in line
    assert run_files(finished) == before


def test_a_finished_uptraining_whose_model_is_gone_is_refused_before_converting_again(finished, capsys):
    import shutil

    shutil.rmtree(finished.parent / "tiny-gqa2", ignore_errors=True)
    before = run_files(finished)
    line = refused(finished, capsys)  # not a dry run: nothing may be converted either
    assert f"holds a run started from the model at {finished.parent / 'tiny-gqa2'}, which is not there now" in line
    assert "restore the model it was started from, or use a new output_dir" in line
    assert run_files(finished) == before and not (finished.parent / "tiny-gqa2").exists()


def test_gqa_uptrain_itself_refuses_a_finished_run_once_its_model_changed(finished, capsys):
    """Run alone (as scripts/launch.sh does), gqa-uptrain does not call a finished run of another model done."""
    import subprocess
    import sys

    from gqa_uptrain.convert import convert_checkpoint

    recipe = yaml.safe_load(finished.read_text())
    convert_checkpoint(Path(recipe["convert"]["source"]), 2, finished.parent / "tiny-gqa2", force=True,
                       progress=False, say=None)
    before = run_files(finished)
    done = subprocess.run([sys.executable, "-m", "gqa_uptrain.train", str(finished)], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    said = [line for line in done.stderr.splitlines() if line.startswith("gqa-uptrain: ")]
    assert len(said) == 1 and "holds a run started from another model than" in said[0], done.stderr[-2000:]
    assert "nothing to do" not in done.stdout + done.stderr
    assert run_files(finished) == before

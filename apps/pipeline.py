"""One recipe, the whole pipeline: gqa-convert -> gqa-uptrain -> gqa-eval -> gqa-publish.

    gqa-pipeline recipes/llama-2-7b-gqa8.yaml                 # every step the recipe names
    gqa-pipeline recipes/llama-2-7b-gqa8.yaml --dry-run       # print the steps, run nothing
    gqa-pipeline RECIPE --repo-id me/model --publish-dry-run  # build the card, upload nothing

The recipe's `convert`, `evaluate` and `publish` sections say what the steps do (recipes/template.yaml;
validated in pipeline_recipe.py). The conversion and the evaluation run in this process, through the tools' Python
APIs with the recipe's typed values; training runs as scripts/launch.sh would run it: one process per local GPU
through `accelerate launch` with the recipe's `accelerate_config`, or one plain process where there is no GPU; and
publishing runs as gqa-publish. The recipe and everything the steps need are
checked before the first step starts. The evaluation measures the converted model before uptraining
(model.path, which uptraining leaves as it is) and after it, each against convert.source, in one report, and warns
when uptraining made it worse. A step is skipped when its result exists and was made from what the recipe
says now: the conversion when the folder's gqa_provenance.json records the recipe's source, groups and method, the
uptraining when output_dir's run has the recipe's training sections and started from the model model.path holds;
anything else there is refused in one line, never replaced. Training and evaluation resume by themselves, so
running the same command again continues where it stopped.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gqa_uptrain.apps.pipeline_recipe import ConvertSpec, EvaluateSpec, PipelineRecipe, load_pipeline_recipe
from gqa_uptrain.cli import run_cli, warn
from gqa_uptrain.convert import check_options, convert_checkpoint
from gqa_uptrain.errors import ConfigError, GqaError
from gqa_uptrain.eval import EvaluationResult, evaluate
from gqa_uptrain.hashing import BackgroundHashes
from gqa_uptrain.paths import check_output_folder
from gqa_uptrain.provenance import PROVENANCE, read_provenance
from gqa_uptrain.source import looks_local


PROG = "gqa-pipeline"


@dataclass(frozen=True)
class Step:
    name: str
    shown: str  # what the step runs, as the pipeline prints it: a Python call, or a command line
    run: Callable[[], object]  # returns what the tool's Python API returns (None for a launched step)
    done: bool  # its result is already there
    then: Callable[[object], None] | None = None  # what the pipeline does with `run`'s result once the step has run


def plan(recipe_path: Path, overrides: list[str], recipe: PipelineRecipe, repo_id: str | None,
         publish_dry_run: bool) -> list[Step]:
    """The steps the recipe asks for, in order; `repo_id`: where to publish (None: nowhere)."""
    model, output = Path(recipe.model.path), Path(recipe.output_dir)
    uptrained, report = output / "model", output / "eval"
    steps = []
    converting = False
    if recipe.convert:
        c = recipe.convert
        done = (model / "config.json").is_file()
        if done:
            check_converted(recipe_path, model, c.source, c.groups, c.method)
        converting = not done
        steps.append(_in_process("convert", convert_checkpoint, c.source, c.groups, model, done=done, **c.options()))
    # Training is launched, not called: `accelerate launch` starts its one process per GPU.
    steps.append(_launched("uptrain", uptrain_argv(recipe_path, overrides, recipe.accelerate_config),
                           check_uptrained(recipe_path, recipe, converting)))
    if recipe.evaluate:
        e = recipe.evaluate
        if not recipe.convert:
            raise ConfigError(f"{recipe_path}: `evaluate` compares with convert.source; the recipe has no `convert`")
        # The converted model as it was before uptraining (model.path, which gqa-uptrain does not change) and after,
        # in one report: each against the base, and uptraining's own effect said by `compare_uptraining`. gqa-eval's
        # cache makes a rerun cheap: each model is measured again only when its content changed.
        steps.append(_in_process("evaluate", evaluate, recipe.convert.source, [model, uptrained], done=False,
                                 then=lambda result: compare_uptraining(result, model, uptrained), output=report,
                                 **e.options()))
    if repo_id:
        argv = [sys.executable, "-m", "gqa_uptrain.apps.publish", str(uptrained), "--repo-id", repo_id]
        argv += ["--report", str(report / "report.json")] if recipe.evaluate else []
        argv += ["--private"] if recipe.publish and recipe.publish.private else []
        argv += ["--dry-run"] if publish_dry_run else []
        steps.append(_launched("publish", argv, False))
    return steps


def _in_process(name: str, function: Callable, *args: object, done: bool,
                then: Callable[[object], None] | None = None, **options: object) -> Step:
    """A step that calls a tool's Python API; options left None take the tool's own defaults."""
    options = {key: value for key, value in options.items() if value is not None}
    shown = ", ".join([*map(_shown, args), *(f"{key}={_shown(value)}" for key, value in options.items())])
    return Step(name, f"{function.__name__}({shown})", lambda: function(*args, **options), done, then)


def _shown(value: object) -> str:
    """A value as a Python literal, paths as the strings they are."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_shown, value)) + "]"
    return repr(str(value) if isinstance(value, Path) else value)


def _launched(name: str, argv: list[str], done: bool) -> Step:
    """A step run as its own process; its failure ends the pipeline in one line."""
    def launch() -> None:
        code = subprocess.run(argv).returncode
        if code != 0:
            raise SystemExit(f"pipeline: step {name} failed (exit {code}); fix it and run the same command again to "
                             "continue")
    return Step(name, shlex.join(argv), launch, done)


def _source_ids(source: str) -> set[str]:
    """The ids gqa-convert may have recorded for SOURCE: the Hub id as written, or the folder's absolute path."""
    ids = {source}
    path = Path(source).expanduser()
    if looks_local(source) or path.is_dir():
        ids.add(str(path.resolve()))
    return ids


def check_converted(recipe_path: Path, model: Path, source: str, groups: int, method: str) -> None:
    """Refuse to skip the conversion when MODEL exists but is not the conversion the recipe asks for, as its
    gqa_provenance.json records it: the uptraining would otherwise train another model under the recipe's name."""
    try:
        record = read_provenance(model)
    except (OSError, UnicodeDecodeError, ValueError):
        record = "unreadable"
    fix = f"remove {model} or change model.path, then run the same command again"
    if not isinstance(record, dict) or not isinstance(record.get("conversion"), dict):
        state = "an unreadable" if record == "unreadable" else "no"
        raise ConfigError(f"{recipe_path}: model.path {model} exists but holds {state} {PROVENANCE} record of a "
                          f"conversion, so it may not be the conversion of {source} the recipe asks for; {fix}")
    conversion, recorded_source = record["conversion"], (record.get("source") or {}).get("id")
    if (recorded_source not in _source_ids(source) or conversion.get("groups") != groups
            or conversion.get("method") != method):
        raise ConfigError(f"{recipe_path}: model.path {model} holds another conversion ({recorded_source}, "
                          f"groups {conversion.get('groups')}, method {conversion.get('method')}), not the recipe's "
                          f"({source}, groups {groups}, method {method}); {fix}")
    changed = _source_changes(source, (record.get("source") or {}).get("sha256"))
    if changed:
        raise ConfigError(f"{recipe_path}: convert.source {source} changed since model.path {model} was converted from "
                          f"it (weights {changed}: not the bytes its {PROVENANCE} records); {fix}")


def _source_changes(source: str, recorded: object) -> str | None:
    """The weight files of a local SOURCE whose bytes differ from the SHA-256 gqa-convert recorded for them (or
    that are gone), None when all match. The same path may hold another model since (a newer download, a retrained
    checkpoint): the path alone would pass it. A Hub id is left out: its content is the Hub's, pinned by the
    revision gqa-convert resolved, and checking it would need the network."""
    folder = Path(source).expanduser()
    if not folder.is_dir() or not isinstance(recorded, dict) or not recorded:
        return None
    present = {name: folder / name for name in recorded if (folder / name).is_file()}
    with BackgroundHashes(list(present.values())) as hashing:  # gigabytes: hashed by every CPU at once
        digests = hashing.results()
    changed = sorted(name for name in recorded if name not in present or digests[present[name]] != recorded[name])
    return ", ".join(changed) if changed else None


def check_uptrained(recipe_path: Path, recipe: PipelineRecipe, converting: bool) -> bool:
    """Whether output_dir holds the finished uptraining of this recipe, from the model model.path holds now (as
    gqa-uptrain tells: the recipe it saved, the model fingerprint it recorded at its start). A run of another
    training recipe, or from another model (model.path converted again, or about to be), is refused in one line
    rather than skipped, resumed or overwritten: it is another model, and replacing it would delete its
    checkpoints. A Hub model.path is left to gqa-uptrain, which checks the same at its start."""
    from gqa_uptrain.train import check_model_unchanged, check_output_dir, started_from

    model = Path(recipe.model.path).expanduser()
    try:
        status = check_output_dir(recipe)
        if status == "fresh":
            return False
        if converting and started_from(recipe, finished=status == "complete") is not None:
            raise ConfigError(f"output_dir {recipe.output_dir} holds a run started from the model at {model}, which is "
                              "not there now; the convert step would make it anew, another model as far as that run "
                              "can tell: restore the model it was started from, or use a new output_dir")
        if converting or not looks_local(recipe.model.path):
            return False
        check_model_unchanged(recipe, model, finished=status == "complete")
    except ConfigError as error:
        raise ConfigError(f"{recipe_path}: {error}") from None
    return status == "complete"


def uptrain_argv(recipe_path: Path, overrides: list[str], accelerate_config: str | None) -> list[str]:
    """gqa-uptrain on every local GPU (the process count follows the machine, never the config), or one process."""
    import torch

    gpus = torch.cuda.device_count()
    train = ["-m", "gqa_uptrain.train", str(recipe_path), *overrides]
    if gpus == 0:
        return [sys.executable, *train]
    config = ["--config_file", accelerate_config] if accelerate_config else []
    return [sys.executable, "-m", "accelerate.commands.launch", *config, "--num_processes", str(gpus), *train]


def check_inputs(recipe_path: Path, recipe: PipelineRecipe, repo_id: str | None) -> None:
    """What must hold before the first step, so that no step fails on it after hours of the others: the models and
    the folders apart and of the right kind, every local input there, the tasks known, the repository id well
    formed. Each problem is one ConfigError line naming the recipe."""
    from gqa_uptrain.documents import local_files  # datasets: not for `gqa-pipeline --help`

    try:
        _check_folders(recipe)
        _check_models(recipe)
        for data in _local_data(recipe):
            local_files(data)
        if recipe.convert:
            _check_conversion(recipe.convert)
        if recipe.evaluate:
            _check_evaluation(recipe.evaluate)
        if repo_id:
            from gqa_uptrain.apps.publish import check_repo_id

            from_recipe = recipe.publish is not None and repo_id == recipe.publish.repo_id
            check_repo_id(repo_id, "publish.repo_id" if from_recipe else "--repo-id")
    except GqaError as error:
        raise ConfigError(f"{recipe_path}: {error}") from None


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_folders(recipe: PipelineRecipe) -> None:
    """model.path apart from output_dir, where gqa-uptrain keeps its own run alone (a conversion there would make
    every later step refuse the folder), and from convert.source, which a conversion would write over; output_dir
    a folder that can be written."""
    output = Path(recipe.output_dir).resolve()
    check_output_folder(Path(recipe.output_dir), "output_dir")
    if not recipe.convert and not Path(recipe.model.path).exists():
        return  # a Hub id, or a folder gqa-uptrain will say is missing
    model = Path(recipe.model.path).resolve()
    if _inside(model, output) or _inside(output, model):
        raise ConfigError(f"model.path {recipe.model.path} and output_dir {recipe.output_dir} overlap (one is the "
                          "other or inside it): output_dir holds gqa-uptrain's run alone (the uptrained model goes to "
                          "output_dir/model), so put model.path beside it, not in it")
    if recipe.convert and (looks_local(recipe.convert.source) or Path(recipe.convert.source).is_dir()):
        source = Path(recipe.convert.source).resolve()
        if _inside(model, source) or _inside(source, model):
            raise ConfigError(f"model.path {recipe.model.path} and convert.source {recipe.convert.source} overlap "
                              "(one is the other or inside it): the conversion would be written over the original "
                              "model; choose another model.path")


def _check_models(recipe: PipelineRecipe) -> None:
    """The source of a conversion, or the model to uptrain, and the launch config: there."""
    if recipe.convert:
        source = recipe.convert.source
        if looks_local(source) and not Path(source).is_dir():
            raise ConfigError(f"convert.source {source} is not a folder")
    elif looks_local(recipe.model.path) and not Path(recipe.model.path).is_dir():
        raise ConfigError(f"model.path {recipe.model.path} is not a folder, and the recipe has no `convert` section "
                          "to make it")
    if recipe.accelerate_config:  # found by the one rule gqa-uptrain --dry-run follows too
        from gqa_uptrain.train import accelerate_config_file

        accelerate_config_file(recipe.accelerate_config)


def _local_data(recipe: PipelineRecipe) -> list[str]:
    """The local data paths the steps read: training and validation, and calibration text written as a path (a
    name alone may be a Hub dataset)."""
    paths = [source.path for source in (recipe.data.train, recipe.data.validation) if source and source.path]
    calibration = recipe.convert.calibration if recipe.convert else None
    return paths + ([calibration] if calibration and looks_local(calibration) else [])


def _check_conversion(spec: ConvertSpec) -> None:
    """The section's values, as gqa-convert's own checks say it (no model is read)."""
    try:
        check_options(spec.source, spec.groups, **spec.options())
    except ConfigError as error:
        raise ConfigError(f"convert: {error}") from None


def _check_evaluation(spec: EvaluateSpec) -> None:
    """The section's values, the perplexity file there (a Hub dataset is gqa-eval's to fetch) and every task known,
    as gqa-eval's own checks say it: lm-eval's index is read (seconds), no data is."""
    from gqa_uptrain.eval import check_inputs

    try:
        check_inputs(**spec.options())
    except ConfigError as error:
        raise ConfigError(f"evaluate: {error}") from None


def compare_uptraining(report: EvaluationResult, converted: Path, uptrained: Path) -> None:
    """Say what uptraining changed, from the report that holds the converted model before and after it, and warn
    when it made the model worse: a learning rate too high, or data unlike the evaluation's, can undo what the
    conversion kept, and two rows against the base do not say so by themselves."""
    from gqa_uptrain.eval import AVERAGE, compare

    before, after = (report.model(folder) for folder in (converted, uptrained))  # each with its own KV cache
    if before is None or after is None:
        return
    rows = [r for r in compare(before.entry, after.entry) if r["task"] in (AVERAGE, "perplexity")]
    if not rows:
        return
    table = report.folder / "report.md"
    print(f"{PROG}: uptraining took the converted model {before.label} to {after.label}: "
          + ", ".join(_change(r) for r in rows) + f" ({table})", flush=True)
    worse = [_change(r) for r in rows if _worse(r)]
    if worse:
        warn(PROG, f"uptraining made the model worse than the conversion alone ({', '.join(worse)}): try a lower "
                   f"train.lr, or training data closer to what is evaluated; {table} has every row")


def _change(row: dict) -> str:
    name = "perplexity" if row["task"] == "perplexity" else f"average {row['metric']}"
    return f"{name} {row['base']:.4g} -> {row['candidate_value']:.4g}"


def _worse(row: dict) -> bool:
    """Moved the wrong way: perplexity at all (it is measured on the same text), a score beyond two standard
    errors (or at all where none is known)."""
    wrong_way = row["delta"] < 0 if row["higher_is_better"] else row["delta"] > 0
    return wrong_way and (row["significant"] or row["delta_stderr"] is None)


def run(args: argparse.Namespace) -> None:
    recipe = load_pipeline_recipe(args.recipe, args.overrides)
    repo_id = args.repo_id or (recipe.publish.repo_id if recipe.publish else None)
    check_inputs(args.recipe, recipe, repo_id)
    steps = plan(args.recipe, args.overrides, recipe, repo_id, args.publish_dry_run)
    for i, step in enumerate(steps, 1):
        state = "done, skipped" if step.done else ("would run" if args.dry_run else "running")
        print(f"[{i}/{len(steps)}] {step.name} ({state}): {step.shown}", flush=True)
        if step.done or args.dry_run:
            continue
        result = step.run()
        if step.then is not None:
            step.then(result)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gqa-pipeline", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", type=Path, help="the recipe YAML (recipes/template.yaml documents every key)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the recipe, e.g. train.lr=1e-5")
    p.add_argument("--repo-id", help="publish to this Hub repository (default: the recipe's publish.repo_id; "
                                     "no publishing when neither is given)")
    p.add_argument("--publish-dry-run", action="store_true",
                   help="write the model card and list what would be uploaded, without uploading")
    p.add_argument("--dry-run", action="store_true", help="check the recipe, print every step, run none")
    args = p.parse_args(argv)
    run_cli("gqa-pipeline", lambda: run(args))


if __name__ == "__main__":
    main()

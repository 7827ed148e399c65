"""`gqa-publish`: write a converted (and uptrained) model's card and upload the folder to the Hugging Face Hub.

The card is built from what the folder already knows about itself: `gqa_provenance.json` (base model, method,
groups, uptraining tokens and fraction of pretraining, the base model's license), its config (KV-cache size before
and after), and optionally a gqa-eval report (the quality delta).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from huggingface_hub import HfApi, get_token

from gqa_uptrain.cli import run_cli
from gqa_uptrain.convert.card import model_card
from gqa_uptrain.errors import CheckpointError, PublishError
from gqa_uptrain.eval.report import comparison_table
from gqa_uptrain.provenance import PROVENANCE


def quality_lines(report: dict, folder: Path, label: str | None) -> list[str]:
    """The report's comparison for this model, found by label or by the path it was evaluated from."""
    for candidate in report["candidates"]:
        if candidate["label"] == label or (label is None and Path(candidate["ref"]).resolve() == folder.resolve()):
            rows = report["comparisons"].get(candidate["label"])
            if rows is None:
                raise PublishError(f"the report has no results for {candidate['label']} (its evaluation failed)")
            return ["", f"## Quality against the base model (gqa-eval, `{candidate['label']}`)", "",
                    "`*` marks a delta beyond two standard errors.", "", comparison_table(rows)]
    known = ", ".join(c["label"] for c in report["candidates"])
    raise PublishError(f"the report has no candidate {label or folder} (it has: {known}); use --candidate")


def upload_plan(folder: Path) -> list[tuple[str, int]]:
    """The files an upload sends (hidden ones stay behind), with their sizes."""
    return [(p.relative_to(folder).as_posix(), p.stat().st_size) for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def publish(folder: Path, repo_id: str, report_path: Path | None, label: str | None, private: bool,
            dry_run: bool) -> None:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a model folder (no config.json)")
    if report_path and not report_path.is_file():
        raise PublishError(f"{report_path}: no such gqa-eval report")
    report = json.loads(report_path.read_text()) if report_path else None
    token = get_token()
    if token is None and not dry_run:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run)")
    if not (folder / PROVENANCE).is_file():
        raise PublishError(f"{folder}: no {PROVENANCE}; publish a folder written by gqa-convert or gqa-uptrain")
    extra = quality_lines(report, folder, label) if report is not None else []
    model_card(folder, repo_id.split("/")[-1], extra).save(folder / "README.md")
    files = upload_plan(folder)
    total = sum(size for _, size in files)
    print(f"{'would upload' if dry_run else 'uploading'} {len(files)} files ({total / 1e9:.2f} GB) "
          f"to https://huggingface.co/{repo_id}")
    for name, size in files:
        print(f"  {name}  ({size:,} bytes)")
    if dry_run:
        return
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, ignore_patterns=[".*", "**/.*"],
                      commit_message="Upload GQA model converted with gqa-uptrain")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gqa-publish", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("folder", type=Path, metavar="FOLDER", help="a model folder written by gqa-convert or gqa-uptrain")
    p.add_argument("--repo-id", required=True, help="the Hub repository to create or update, e.g. user/Llama-2-7b-gqa8")
    p.add_argument("--report", type=Path, help="a gqa-eval report.json whose delta table goes into the card")
    p.add_argument("--candidate", help="this model's label in --report (default: the candidate evaluated from FOLDER)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--dry-run", action="store_true",
                   help="write the model card and list what would be uploaded, without uploading")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run_cli("gqa-publish", lambda: publish(args.folder, args.repo_id, args.report, args.candidate, args.private,
                                           args.dry_run))


if __name__ == "__main__":
    main()

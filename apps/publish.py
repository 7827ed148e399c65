"""`gqa-publish`: write a converted (and uptrained) model's card and upload the folder to the Hugging Face Hub.

The card is built from what the folder already knows about itself: `gqa_provenance.json` (base model, method,
groups, uptraining tokens and fraction of pretraining, the base model's license), its config (KV-cache size before
and after), and optionally a gqa-eval report (the quality delta). A README.md that gqa-uptrain did not write (it lacks
the generated card's marker line) is kept and uploaded as it is; one that cannot be uploaded (a link out of the
folder) is refused rather than silently left out. Only files inside the folder are uploaded, by the
rule of `gqa_uptrain.model_folder`. `--dry-run` changes nothing on disk: it prints the list and the card; a real
publish writes the card into the folder only once the upload has succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from gqa_uptrain.atomic_write import write_atomically
from gqa_uptrain.cli import run_cli
from gqa_uptrain.errors import CheckpointError, PublishError, one_line
from gqa_uptrain.model_folder import outside_reason, readable_files
from gqa_uptrain.paths import expand_home
from gqa_uptrain.provenance import PROVENANCE

# huggingface_hub, torch (is_model_file's module) and transformers (the card) are imported where they are used, so that
# `gqa-publish --help` answers at once (tests/test_help.py).

PROG = "gqa-publish"
CARD = "README.md"


def quality_lines(report: dict, folder: Path, label: str | None) -> list[str]:
    """The report's comparison for this model, found by label or by the path it was evaluated from."""
    from gqa_uptrain.eval import comparison_table

    for candidate in report["candidates"]:
        if candidate["label"] == label or (label is None and Path(candidate["ref"]).resolve() == folder.resolve()):
            rows = report["comparisons"].get(candidate["label"])
            if rows is None:
                raise PublishError(f"the report has no results for {candidate['label']} (its evaluation failed)")
            return ["", f"## Quality against the base model (gqa-eval, `{candidate['label']}`)", "",
                    "`*` marks a delta beyond two standard errors.", "", comparison_table(rows)]
    known = ", ".join(c["label"] for c in report["candidates"])
    raise PublishError(f"the report has no candidate {label or folder} (it has: {known}); use --candidate")


def check_card_readable(folder: Path) -> None:
    """A README.md that the link rule would leave out (a link out of the folder, not a regular file) can be neither
    kept, since it would not be uploaded, nor replaced, since it may be a hand-written card: refused in one line,
    before anything is read or sent."""
    existing = folder / CARD
    reason = outside_reason(folder, existing) if os.path.lexists(existing) else None
    if reason is not None:
        raise PublishError(f"{existing}: {reason}, so it would not be uploaded and the model would have no card; "
                           f"copy the card into the folder, or remove {CARD} to upload the generated one")


def choose_card(folder: Path, generated: str) -> tuple[str | None, str]:
    """The card to upload (None: the folder's own README.md, kept as it is) and one line that says which."""
    from gqa_uptrain.convert import is_generated_card

    existing = folder / CARD
    if not os.path.lexists(existing):
        return generated, f"card: {CARD} generated (the folder has none)"
    if is_generated_card(existing):
        return generated, f"card: {CARD} generated, replacing the one gqa-uptrain wrote before"
    return None, (f"card: {existing} kept as it is, since gqa-uptrain did not write it (no marker line); "
                  "the generated card is not used")


def upload_plan(folder: Path, files: list[str], card: str | None) -> list[tuple[str, int]]:
    """What an upload sends, with sizes: the folder's `files`, with the generated card, when there is one, in place
    of the folder's own."""
    sizes = [(name, (folder / name).stat().st_size) for name in files if card is None or name != CARD]
    return sorted(sizes + ([(CARD, len(card.encode()))] if card is not None else []))


def check_repo_id(repo_id: str, what: str = "--repo-id") -> None:
    """A Hub repository id, NAME or OWNER/NAME, before anything is read or sent; `what` names where it was given."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishError(f"{what} {repo_id!r} is not a Hub repository id (use NAME or OWNER/NAME): "
                           f"{one_line(error, 160)}") from None


def read_report(path: Path) -> dict:
    """A gqa-eval report.json, or one PublishError line when it is not one (truncated, not JSON, another file)."""
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise PublishError(f"{path}: not a readable gqa-eval report ({one_line(error, 160)}); run gqa-eval again "
                           "or leave out --report") from None
    if not (isinstance(report, dict) and isinstance(report.get("candidates"), list)
            and isinstance(report.get("comparisons"), dict)
            and all(isinstance(c, dict) and "label" in c for c in report["candidates"])):
        raise PublishError(f"{path}: not a gqa-eval report (no candidates and comparisons); run gqa-eval again or "
                           "leave out --report")
    return report


def publish(folder: Path, repo_id: str, report_path: Path | None, label: str | None, private: bool,
            dry_run: bool) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from gqa_uptrain.convert import is_model_file, model_card

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: not a model folder (no config.json)")
    if report_path and not report_path.is_file():
        raise PublishError(f"{report_path}: no such gqa-eval report")
    check_repo_id(repo_id)
    report = read_report(report_path) if report_path else None
    token = get_token()
    if token is None and not dry_run:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run)")
    if not (folder / PROVENANCE).is_file():
        raise PublishError(f"{folder}: no {PROVENANCE}; publish a folder written by gqa-convert or gqa-uptrain")
    # The link rule first: a folder whose weights, config or card lead out of it is refused before they are read.
    check_card_readable(folder)
    readable = readable_files(folder, is_model_file, PROG, "uploaded")
    extra = quality_lines(report, folder, label) if report is not None else []
    card, card_line = choose_card(folder, model_card(folder, repo_id.split("/")[-1], extra).content)
    files = upload_plan(folder, readable, card)
    total = sum(size for _, size in files)
    print(f"{'would upload' if dry_run else 'uploading'} {len(files)} files ({total / 1e9:.2f} GB) "
          f"to https://huggingface.co/{repo_id}")
    for name, size in files:
        print(f"  {name}  ({size:,} bytes)")
    print(card_line)
    if dry_run:
        if card is not None:
            print(f"--- {CARD} as it would be uploaded (not written: --dry-run) ---\n{card}", end="")
        return
    operations = [CommitOperationAdd(name, card.encode() if card is not None and name == CARD else str(folder / name))
                  for name, _ in files]
    api = HfApi(token=token)
    # What a failed upload raises: the Hub's answers, the network's errors (the HTTP client's own base class, which
    # HfHubHTTPError extends), a malformed repo id (ValueError).
    upload_errors = (OSError, ValueError, *HfHubHTTPError.__bases__)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(repo_id, operations, commit_message="Upload GQA model converted with gqa-uptrain")
    except upload_errors as e:
        raise PublishError(f"upload to {repo_id} failed, {folder} is unchanged: {one_line(e)}") from None
    if card is not None:  # only now: a failed upload leaves the folder as it was
        write_atomically(folder / CARD, card)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gqa-publish", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("folder", type=Path, metavar="FOLDER", help="a model folder written by gqa-convert or gqa-uptrain")
    p.add_argument("--repo-id", required=True, help="the Hub repository to create or update, e.g. user/Llama-2-7b-gqa8")
    p.add_argument("--report", type=Path, help="a gqa-eval report.json whose delta table goes into the card")
    p.add_argument("--candidate", help="this model's label in --report (default: the candidate evaluated from FOLDER)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--dry-run", action="store_true",  # README.md says the same (tests/test_help.py)
                   help="list the files that would be uploaded, with their sizes, and print the model card as it "
                        "would be uploaded; nothing is uploaded or written, and no Hugging Face token is needed")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    report = expand_home(args.report) if args.report else None
    run_cli("gqa-publish", lambda: publish(expand_home(args.folder), args.repo_id, report, args.candidate,
                                           args.private, args.dry_run))


if __name__ == "__main__":
    main()

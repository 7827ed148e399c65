"""Helpers for the gqa-eval tests: one small offline run of the whole CLI, shared by the tests that read it."""

import json
from pathlib import Path

import pytest

from gqa_uptrain.eval.cli import main

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair.\n"
) * 6


def make_args(base: Path, models: list[Path], output: Path, cache: Path, *extra: str) -> list[str]:
    """A fast, fully offline gqa-eval command line on tiny models."""
    args = ["--base", str(base), "--output", str(output), "--cache-dir", str(cache), "--device", "cpu",
            "--limit", "6", "--batch-size", "4", "--bootstrap-iters", "100"]
    for model in models:
        args += ["--model", str(model)]
    return args + list(extra)


def run_gqa_eval(args: list[str]) -> int:
    """gqa-eval's exit code (0 when it returns normally)."""
    try:
        main(args)
    except SystemExit as exit_:
        return exit_.code
    return 0


@pytest.fixture(scope="session")
def gqa_eval():
    """run_gqa_eval, for tests."""
    return run_gqa_eval


@pytest.fixture(scope="session")
def eval_args():
    """make_args, for tests (helpers in a conftest are reached through fixtures)."""
    return make_args


@pytest.fixture(scope="session")
def held_out_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, tiny_llama, tiny_llama_gqa2, held_out_text) -> dict:
    """Base + one candidate on both shipped tasks and perplexity; returns paths, exit code and the JSON report."""
    root = tmp_path_factory.mktemp("full-run")
    args = make_args(tiny_llama, [tiny_llama_gqa2], root / "report", root / "cache",
                     "--tasks", "gqa_lastword,gqa_nextsentence", "--perplexity", str(held_out_text),
                     "--perplexity-window", "32", "--perplexity-stride", "16")
    code = run_gqa_eval(args)
    return {"args": args, "code": code, "root": root, "output": root / "report",
            "report": json.loads((root / "report" / "report.json").read_text())}

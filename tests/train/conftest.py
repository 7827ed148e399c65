"""Helpers for the training tests: the tiny CPU recipe, a short real text, and the CLI in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gqa_uptrain.train.loop import reset_accelerate_state

REPO = Path(__file__).resolve().parents[2]
TINY_RECIPE = REPO / "recipes" / "tiny-cpu.yaml"
# Small enough that a run takes seconds on 2 cores, large enough to learn something.
FAST = ["data.seq_len=32", "batch.micro_batch=2", "batch.global_batch=4", "data.holdout_docs=40"]


@pytest.fixture(scope="session")
def shakespeare(shared_data, tmp_path_factory) -> Path:
    """The first 120 kB of tinyshakespeare: real English, quick to tokenise."""
    path = tmp_path_factory.mktemp("text") / "shakespeare.txt"
    path.write_text((shared_data / "tinyshakespeare.txt").read_text()[:120_000])
    return path


def overrides(model: Path, text: Path, output: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"data.train.path={text}", f"output_dir={output}", *FAST, *extra]


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`python -m gqa_uptrain.train ...` as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "gqa_uptrain.train", *args], capture_output=True, text=True, env=env, **kwargs
    )


@pytest.fixture
def fresh_accelerate():
    """In-process runs share accelerate's singletons; give each test a clean state."""
    yield
    reset_accelerate_state()

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


@pytest.fixture(scope="session")
def converted_tiny_llama(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama (4 KV heads) converted to 2 by mean pooling: its body is the original's, so tiny_llama can be a
    teacher that shares it."""
    from gqa_uptrain.convert import convert_checkpoint

    return convert_checkpoint(tiny_llama, groups=2, output=tmp_path_factory.mktemp("converted") / "gqa2").output


# What `train.trainable: attention` changes in a checkpoint: the attention projections.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "dense")


def changed_tensors(before: Path, after: Path) -> set[str]:
    """Names of the tensors that differ between two model folders' model.safetensors (same names in both)."""
    from safetensors.torch import load_file
    import torch

    old, new = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    assert old.keys() == new.keys()
    return {name for name in old if not torch.equal(old[name], new[name])}


@pytest.fixture
def fresh_accelerate():
    """In-process runs share accelerate's singletons; give each test a clean state."""
    yield
    reset_accelerate_state()

"""gqa-uptrain against faults that used to give silent wrong results or tracebacks: each ends in one line.

The table holds every case as (the fault, the overrides after the tiny recipe, the one line it must print, what
must hold in the output folder afterwards). Runs are in-process through the CLI's `main`, as a user calls it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from fault_cases import Case, refused_in_one_line

from gqa_uptrain.train import loop
from gqa_uptrain.train.cli import main

from .conftest import TINY_RECIPE, overrides

RUN = ["budget.steps=12", "checkpoint.every=5", "eval.every=5", "log.every=1", "log.trackers=[]"]


@dataclass
class World:
    tmp: Path
    model: Path
    text: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def output(self) -> Path:
        return self.tmp / "run"


def checkpoints(w: World) -> list[str]:
    folder = w.output / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def nothing_exported(w: World) -> bool:
    return not (w.output / "model").exists()


# ---- faults: each changes the world and returns the overrides after the recipe ----

def loss_becomes_nan_at_step_8(w: World) -> list[str]:
    """The objective of every micro-batch from step 8 on is NaN (2 micro-batches a step): a diverged run."""
    real_forward, calls = loop._forward, [0]

    def diverging(*args):
        objective, lm_loss, kd_loss = real_forward(*args)
        calls[0] += 1
        if calls[0] > 14:
            objective = objective * float("nan")
            lm_loss = lm_loss * float("nan")
        return objective, lm_loss, kd_loss

    w.monkeypatch.setattr(loop, "_forward", diverging)
    return []


def loss_becomes_inf_at_step_1(w: World) -> list[str]:
    real_forward = loop._forward

    def infinite(*args):
        objective, lm_loss, kd_loss = real_forward(*args)
        return objective * float("inf"), lm_loss * float("inf"), kd_loss

    w.monkeypatch.setattr(loop, "_forward", infinite)
    return []


def data_file(name: str, text: str) -> Callable[[World], list[str]]:
    """The training data is NAME holding TEXT."""
    def fault(w: World) -> list[str]:
        (w.tmp / name).write_text(text)
        return [f"data.train.path={w.tmp / name}"]
    fault.__name__ = f"data_file_{name}"
    return fault


def attention_not_installed(w: World) -> list[str]:
    """flash-attn is not installed (on a CPU it never is; patched so that a GPU machine with it sees the same)."""
    w.monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: False)
    return ["model.attn_implementation=flash_attention_2"]


def run_folder_untouched(w: World) -> bool:
    return not w.output.exists() or not any(p.name not in {".run.lock", "recipe.yaml"} for p in w.output.iterdir())


CASES = {
    "loss NaN at step 8": Case(
        loss_becomes_nan_at_step_8, 2,
        "training diverged: the loss was not finite (NaN or inf) at step 8; nothing was exported and the last "
        "good checkpoint, ",
        lambda w: nothing_exported(w) and checkpoints(w) == ["step-00000005"]
        and max(json.loads(line)["step"] for line in (w.output / "metrics.jsonl").read_text().splitlines()) == 7,
    ),
    "loss inf at step 1": Case(
        loss_becomes_inf_at_step_1, 2, "at step 1; nothing was exported and no checkpoint was saved",
        lambda w: nothing_exported(w) and checkpoints(w) == [],
    ),
    "JSONL rows with text null": Case(
        data_file("null.jsonl", '{"text": "To be, or not to be"}\n{"text": null}\n' * 50), 2,
        "null.jsonl: a row's 'text' is null: give every row a string of text, or drop the row",
        run_folder_untouched,
    ),
    "empty JSONL file": Case(
        data_file("empty.jsonl", ""), 2, "empty.jsonl holds no rows (its files are empty)", run_folder_untouched,
    ),
    "empty text file": Case(
        data_file("empty.txt", ""), 2, "empty.txt holds no rows (its files are empty)", run_folder_untouched,
    ),
    "input_ids beyond the vocabulary": Case(
        data_file("ids.jsonl", '{"input_ids": [1, 2, 3, 50257, 4]}\n' * 400), 2,
        "ids.jsonl: token id 50257 is outside the model's vocabulary of 50257 ids (0-50256): "
        "were these ids made with another tokenizer?",
        run_folder_untouched,
    ),
    "an attention implementation not installed": Case(
        attention_not_installed, 2, "model.attn_implementation=flash_attention_2 cannot be used here (it needs the "
        "flash-attn package and a CUDA GPU): install it, or set model.attn_implementation=sdpa",
        lambda w: not w.output.exists(),  # nothing written, so the fixed recipe starts the same output_dir afresh
    ),
}


@pytest.mark.parametrize("name", CASES, ids=str)
def test_fault_ends_in_one_line(name, tmp_path, tiny_llama_gqa2, shakespeare, monkeypatch, capsys, fresh_accelerate):
    world = World(tmp_path, tiny_llama_gqa2, shakespeare, monkeypatch)
    case = CASES[name]
    extra = case.prepare(world)
    with pytest.raises(SystemExit) as exit_info:
        main([str(TINY_RECIPE), *overrides(world.model, world.text, world.output, *RUN, *extra)])
    assert exit_info.value.code == case.code
    refused_in_one_line("gqa-uptrain", capsys.readouterr().err, case.line)
    assert case.holds(world)


def test_resume_on_a_model_converted_again_in_place_is_refused(tmp_path, tiny_llama_gqa2, shakespeare, gpt2_tokenizer,
                                                               monkeypatch, capsys, fresh_accelerate):
    """A run stopped after its step-5 checkpoint; then model.path is written anew (another conversion, same shapes
    and path, so the recipe is the same): resuming would train the old checkpoint's weights under the new model's
    name, so the run refuses, and keeps its checkpoint."""
    import shutil

    from tests.conftest import save_tiny_llama

    model = shutil.copytree(tiny_llama_gqa2, tmp_path / "model")
    world = World(tmp_path, model, shakespeare, monkeypatch)
    argv = [str(TINY_RECIPE), *overrides(model, shakespeare, world.output, *RUN)]
    with monkeypatch.context() as patch:
        patch.setattr(world, "monkeypatch", patch)
        loss_becomes_nan_at_step_8(world)
        with pytest.raises(SystemExit):
            main(argv)
    loop.reset_accelerate_state()
    assert checkpoints(world) == ["step-00000005"] and (world.output / "model_fingerprint.json").is_file()
    capsys.readouterr()
    save_tiny_llama(model, gpt2_tokenizer, kv_heads=2, seed=7)  # converted again, in place
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("gqa-uptrain: error")]
    assert len(said) == 1 and "holds a run started from another model than" in said[0], err[-2000:]
    assert "model.safetensors" in said[0] and "use a new output_dir, or restore the model" in said[0]
    assert "Traceback" not in err and checkpoints(world) == ["step-00000005"] and nothing_exported(world)


class _RunsCode:
    """Unpickled, it creates `marker`: what whoever can write an output folder could plant in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("planted, line", [
    ("custom_checkpoint_0.pkl", "it holds custom_checkpoint_0.pkl, a pickle gqa-uptrain does not read"),
    ("optimizer.bin", "optimizer.bin is torn (not a whole torch archive)"),
])
@pytest.mark.slow
def test_resume_runs_no_code_planted_in_a_checkpoint(planted, line, tmp_path, tiny_llama_gqa2, shakespeare, capsys,
                                                     fresh_accelerate):
    """A pickle that runs code, planted in the checkpoint a rerun resumes from, is never run: the scheduler's state is
    in the checkpoint's JSON, so no custom_checkpoint_*.pkl (which accelerate unpickles with weights_only=False) is
    written or read, and such a file is refused in one line; an optimizer.bin that is not a torch archive is a torn
    checkpoint, passed over with one warning (here the only one: the run starts over).
    (tests/train/test_resume.py proves the resume exact, learning-rate schedule included.)"""
    import pickle
    import shutil

    output, marker = tmp_path / "run", tmp_path / "code-ran"
    argv = [str(TINY_RECIPE), *overrides(tiny_llama_gqa2, shakespeare, output, "budget.steps=10",
                                         "checkpoint.every=5", "checkpoint.keep=2", "eval.every=5", "log.every=5",
                                         "log.trackers=[]")]
    main(argv)
    assert not list(output.rglob("custom_checkpoint_*"))
    shutil.rmtree(output / "model")  # as if killed after its step-5 checkpoint
    shutil.rmtree(output / "checkpoints" / "step-00000010")
    (output / "checkpoints" / "step-00000005" / planted).write_bytes(pickle.dumps(_RunsCode(marker)))
    loop.reset_accelerate_state()
    capsys.readouterr()
    if planted.startswith("custom_checkpoint_"):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    else:
        main(argv)
    err = capsys.readouterr().err
    said = [text for text in err.splitlines() if text.startswith("gqa-uptrain: ")]
    assert len(said) == 1 and line in said[0] and "Traceback" not in err, err[-2000:]
    assert not marker.exists()
    assert (output / "model").exists() == (planted == "optimizer.bin")

"""gqa-eval against faults that used to give silent wrong results or tracebacks.

The table holds every case as (the fault, the command after `--base TINY`, the exit code, the one line it must
print, what must hold afterwards). Perplexity only (fast, offline), on tiny models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import make_args, run_gqa_eval

PPL = ["--perplexity-window", "32", "--perplexity-stride", "16"]


@dataclass
class World:
    tmp: Path
    base: Path
    candidate: Path
    text: Path

    @property
    def output(self) -> Path:
        return self.tmp / "report"

    @property
    def cache(self) -> Path:
        return self.tmp / "cache"

    def args(self, *models: Path | str, extra: tuple = ()) -> list[str]:
        return make_args(self.base, list(models), self.output, self.cache, "--perplexity", str(self.text), *PPL,
                         *extra)


def entries(w: World) -> list[Path]:
    return sorted((w.cache / "results").rglob("*.json")) if (w.cache / "results").is_dir() else []


def report(w: World) -> dict:
    return json.loads((w.output / "report.json").read_text())


# ---- faults: each prepares the world and returns the arguments ----

def diverged_candidate(w: World) -> list[str]:
    """A candidate whose weights hold NaN, as a diverged run would have exported before the fix."""
    broken = w.tmp / "diverged"
    broken.mkdir()
    for path in w.candidate.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    return w.args(broken)


def damaged_cache(damage: Callable[[Path], None]) -> Callable[[World], list[str]]:
    """A first run fills the cache; then each entry (and the file-hash memo) is damaged as a crash leaves it."""
    def prepare(w: World) -> list[str]:
        assert run_gqa_eval(w.args(w.candidate)) == 0
        assert entries(w)
        for path in entries(w) + [w.cache / "file_hashes.json"]:
            damage(path)
        return w.args(w.candidate)
    return prepare


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def cache_recomputed(w: World) -> bool:
    return all(json.loads(p.read_text()) for p in entries(w)) and report(w)["candidates"][0]["error"] is None


@dataclass(frozen=True)
class Case:
    prepare: Callable[[World], list[str]]
    code: int
    line: str  # the one line with "gqa-eval: error: " (code 2), or a text the report must show (code 0)
    holds: Callable[[World], bool]


CASES = {
    "a candidate scores NaN": Case(
        diverged_candidate, 2, "perplexity.token_perplexity is nan, not a finite number",
        lambda w: report(w)["candidates"][0]["error"].startswith("model ") and "not a finite number"
        in report(w)["candidates"][0]["error"]),
    "a truncated cache entry": Case(damaged_cache(truncate), 0, "", cache_recomputed),
    "an empty cache entry": Case(damaged_cache(empty), 0, "", cache_recomputed),
    "a missing local folder": Case(lambda w: w.args("runs/never-made/model"), 2,
                                   "model runs/never-made/model: no such folder, and not a Hugging Face Hub id",
                                   lambda w: not w.output.exists()),
    "a missing absolute folder": Case(lambda w: w.args(w.tmp / "gone"), 2, "no such folder, and not a Hugging Face",
                                      lambda w: not w.output.exists()),
}


@pytest.mark.parametrize("name", CASES, ids=str)
def test_fault(name, tmp_path, tiny_llama, tiny_llama_gqa2, held_out_text, capsys):
    world = World(tmp_path, tiny_llama, tiny_llama_gqa2, held_out_text)
    case = CASES[name]
    argv = case.prepare(world)
    capsys.readouterr()
    assert run_gqa_eval(argv) == case.code
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Repo id must be in the form" not in err, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith("gqa-eval: error")]
    if case.code:
        assert len(said) == 1 and case.line in said[0], err[-3000:]
        assert err.strip().splitlines()[-1] == said[0]
    else:
        assert said == []
    assert case.holds(world)

"""lm-eval on an already-loaded model, without noise a user reads as failure."""

import shutil

from transformers import AutoModelForCausalLM

from gqa_uptrain.eval.cache import ResultCache
from gqa_uptrain.eval.harness import HarnessSettings, evaluate_task
from gqa_uptrain.eval.local_tasks import resolve_tasks


def test_a_task_outside_a_git_repository_prints_no_git_error(tiny_llama, gpt2_tokenizer, tmp_path, monkeypatch,
                                                              capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # never a repository above it either
    if shutil.which("git"):  # what lm-eval does on its own: git's complaint reaches the terminal
        from lm_eval.loggers.utils import get_git_commit_hash

        get_git_commit_hash()
        assert "not a git repository" in capfd.readouterr().err
    selection = resolve_tasks("gqa_lastword", [], tmp_path / "stage", ResultCache(tmp_path / "cache").file_hash)
    settings = HarnessSettings(num_fewshot=0, batch_size=2, limit=2, seed=0, dtype="float32", add_bos_token=False,
                               bootstrap_iters=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    output = evaluate_task(model, gpt2_tokenizer, "gqa_lastword", selection, settings)
    assert "gqa_lastword" in output["results"]
    assert "not a git repository" not in capfd.readouterr().err

"""The one-GPU 7B recipe measured: peak memory against the dry run, tokens/s with distillation, kill -9 and resume.

    python scripts/bench_one_gpu.py --workdir /dev/shm/bench --json runs/one-gpu.json

Builds a Llama-2-7B-shaped MHA checkpoint with random weights (bf16; the recipe's shapes decide memory and speed,
the weights do not), converts it to GQA-8 with gqa-convert, prints `gqa-uptrain --dry-run` for
recipes/llama-2-7b-gqa8-1gpu.yaml, then trains that recipe (attention-only, the teacher sharing the student's
body, activation checkpointing, micro-batch 2 x 4096) with a smaller global batch so that a step takes seconds.
The run is killed with SIGKILL after step `--kill-at` (a checkpoint was written at `--checkpoint-every`), run again,
and the losses the resumed run logs for the steps after its checkpoint are compared with the killed run's: equal
means the resume is exact. Peak memory and tokens/s are what gqa-uptrain logs (`metrics.jsonl`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "llama-2-7b-gqa8-1gpu.yaml"
LLAMA2 = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
              num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)


def build_teacher(folder: Path, text: Path) -> None:
    """A Llama-2-7B-shaped MHA checkpoint in bf16, initialised on the GPU (N(0, 0.02) weights, unit norms)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gqa_uptrain.apps.scratch import train_bpe_tokenizer

    train_bpe_tokenizer((json.loads(line)["text"] for line in text.open()), 8000, 4096, folder)
    config = LlamaConfig(**LLAMA2, dtype="bfloat16")
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)


def write_text(path: Path) -> None:
    """Training text: this Python's standard-library docstrings (what gqa-convert calibrates on by default), one
    document per module."""
    from gqa_uptrain.convert.calibration.data import stdlib_docstrings

    path.write_text("".join(json.dumps({"text": "\n\n".join(texts)}) + "\n"
                            for texts in stdlib_docstrings().values()))


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def uptrain(overrides: list[str], log: Path, kill_at: int | None = None) -> int:
    """gqa-uptrain in its own session; with `kill_at`, SIGKILL once that step is logged. Its exit status."""
    argv = [sys.executable, "-m", "gqa_uptrain.train", str(RECIPE), *overrides]
    run = Path(next(o for o in overrides if o.startswith("output_dir=")).split("=", 1)[1])
    with open(log, "a") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while process.poll() is None:
            time.sleep(1)
            if kill_at is not None and any(r.get("step", 0) >= kill_at and "loss" in r for r in records(run)):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return -9
    return process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="checkpoints go here (about 26 GB)")
    parser.add_argument("--runs", type=Path, default=None, help="the training run's folder (default: in workdir)")
    parser.add_argument("--json", type=Path, required=True, help="where the figures are written")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--checkpoint-every", type=int, default=6)
    parser.add_argument("--kill-at", type=int, default=9)
    parser.add_argument("--global-batch", type=int, default=4, help="sequences a step (the recipe's micro-batch is "
                        "kept, so memory is the recipe's; the recipe's global batch only accumulates more)")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    teacher, student, text = work / "llama-2-7b-shape", work / "llama-2-7b-shape-gqa8", work / "text.jsonl"
    figures: dict = {}
    started = time.perf_counter()
    if not text.is_file():
        write_text(text)
    if not (teacher / "config.json").is_file():
        build_teacher(teacher, text)
    figures["build_s"] = time.perf_counter() - started
    started = time.perf_counter()
    if not (student / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "gqa_uptrain.convert", str(teacher), "--groups", "8", "--output",
                        str(student)], check=True)
    figures["convert_s"] = time.perf_counter() - started
    run = args.runs or work / "run"
    overrides = [f"model.path={student}", f"teacher.path={teacher}", f"output_dir={run}",
                 f"data.train.path={text}", "data.train.dataset=null", "data.train.name=null", "data.streaming=false",
                 "data.holdout_docs=100", f"batch.global_batch={args.global_batch}", f"budget.tokens=null",
                 f"budget.steps={args.steps}", "budget.pretrain_tokens=null", "log.every=1", "log.trackers=[]",
                 f"checkpoint.every={args.checkpoint_every}", "eval.every=1000", "eval.batches=1"]
    dry = subprocess.run([sys.executable, "-m", "gqa_uptrain.train", str(RECIPE), *overrides, "--dry-run",
                          "--gpu", "h100", "--num-processes", "1"], capture_output=True, text=True)
    print(dry.stdout, dry.stderr, flush=True)
    total = re.search(r"total\s+([\d.]+) GiB", dry.stdout)
    figures["dry_run_total_gib"] = float(total.group(1)) if total else None
    log = work / "uptrain.log"
    figures["killed_status"] = uptrain(overrides, log, kill_at=args.kill_at)
    killed = {r["step"]: r for r in records(run) if "loss" in r}
    figures["resumed_status"] = uptrain(overrides, log, kill_at=args.steps)  # no final checkpoint: disk
    resumed = {r["step"]: r for r in records(run) if "loss" in r}
    after = [s for s in killed if s > args.checkpoint_every]
    figures["resume_compared_steps"] = after
    figures["resume_exact"] = bool(after) and all(killed[s]["loss"] == resumed[s]["loss"] for s in after)
    figures["losses_killed"] = {s: killed[s]["loss"] for s in after}
    figures["losses_resumed"] = {s: resumed[s]["loss"] for s in after if s in resumed}
    steady = [r for s, r in sorted(resumed.items()) if s > args.checkpoint_every + 1]
    figures["tokens_per_s"] = [r.get("tokens_per_s") for r in steady]
    figures["peak_memory"] = {k: max(r.get(k) or 0 for r in resumed.values()) for k in
                              ("max_memory_allocated_gib", "max_memory_reserved_gib")}
    figures["records_last"] = resumed[max(resumed)] if resumed else None
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(log.read_text()[-6000:])


if __name__ == "__main__":
    main()

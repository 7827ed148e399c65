"""Training throughput of the full gqa-uptrain loop on one GPU: tokens/s and MFU.

A TinyLlama-1.1B-shaped GQA model (hidden 2048, 22 layers, 32 heads, 4 KV heads, vocab 32000) with random
weights is written as a save_pretrained folder, with a 32,000-token word-level tokenizer and a pre-tokenised
parquet corpus of random documents. Each variant then runs `gqa_uptrain.train.loop.run` exactly as the CLI
does (packing, seeded sampler, bf16 autocast, fused AdamW, clipping, TensorBoard and JSONL logging, validation,
a checkpoint and the export at the end). Tokens/s is the median of the loop's own logging windows after the
first `--warmup-windows` (compilation); windows that hold a save or an evaluation are not timed by the loop.
MFU = tokens/s x FLOPs per token (6 x matmul parameters + attention) / the datasheet dense bf16 peak, as the loop
logs it (gqa_uptrain.train.throughput.mfu); the same figure against the bf16 matmul peak measured here is printed
beside it (`of measured`), for comparison with figures reported on that basis.

    python scripts/bench_train.py                       # eager, compiled, compiled + distillation
    python scripts/bench_train.py --variants compile --steps 40
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = ("eager", "compile", "distill")


def matmul_peak_tflops(size: int = 8192, repeats: int = 20) -> float:
    """bf16 matrix-product rate on random data: the `of measured` column's denominator."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def synthetic_tokenizer(vocab: int, max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", model_max_length=max_length
    )


def write_model(path: Path, kv_heads: int, tokenizer, seq_len: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=kv_heads, vocab_size=len(tokenizer), max_position_embeddings=seq_len,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, dtype="bfloat16",
    )
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


def write_corpus(path: Path, tokens: int, vocab: int, seed: int = 0) -> Path:
    """Pre-tokenised random documents of 500 to 8,000 tokens, at least `tokens` in all."""
    import datasets

    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < tokens:
        length = int(rng.integers(500, 8000))
        docs.append(rng.integers(3, vocab, length).tolist())
        total += length
    datasets.Dataset.from_dict({"input_ids": docs}).to_parquet(path)
    return path


def run_variant(name: str, args, student: Path, teacher: Path, corpus: Path, work: Path, peak: float) -> dict:
    from transformers import AutoConfig

    from gqa_uptrain.train.budget import flops_per_token
    from gqa_uptrain.train.loop import reset_accelerate_state, run
    from gqa_uptrain.train.throughput import mfu
    from gqa_uptrain.train.recipe import Recipe

    output = work / f"run-{name}"
    recipe = Recipe.model_validate({
        "output_dir": str(output),
        "model": {"path": str(student), "compile": name != "eager", "attn_implementation": "sdpa"},
        "teacher": {"path": str(teacher), "weight": 0.5, "temperature": 1.0} if name == "distill" else None,
        "data": {"train": {"path": str(corpus)}, "holdout_docs": 16, "seq_len": args.seq_len},
        "batch": {"micro_batch": args.micro_batch, "global_batch": args.micro_batch},
        "train": {"lr": 1e-4, "warmup_steps": 5, "precision": "bf16"},
        "budget": {"steps": args.steps, "pretrain_tokens": 3.0e12},
        "checkpoint": {"every": args.steps, "keep": 1},
        "eval": {"every": args.steps, "batches": 2},
        "log": {"every": args.log_every, "trackers": ["tensorboard"]},  # MFU against the datasheet peak
    })
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    run(recipe)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "tokens_per_s" in r][args.warmup_windows :]
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in windows)
    per_token = flops_per_token(AutoConfig.from_pretrained(student), args.seq_len)
    result = {
        "variant": name,
        "tokens_per_s": tokens_per_s,
        "mfu": statistics.median(r["mfu"] for r in windows) if "mfu" in windows[-1] else None,  # datasheet peak
        "mfu_peak_tflops": windows[-1].get("mfu_peak_tflops"),
        "mfu_of_measured_peak": mfu(tokens_per_s, per_token, peak, 1),
        "final_loss": windows[-1]["loss"],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "wall_s": wall,
        "windows": len(windows),
    }
    shutil.rmtree(output)  # the checkpoint holds 13 GB of optimizer state
    reset_accelerate_state()
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per variant (default 30)")
    parser.add_argument("--log-every", type=int, default=5, help="steps per timing window (default 5)")
    parser.add_argument("--warmup-windows", type=int, default=2, help="windows left out as warm-up (default 2)")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants: {', '.join(sorted(unknown))}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-train-"))
    peak = matmul_peak_tflops()
    tokenizer = synthetic_tokenizer(32000, args.seq_len)
    student = write_model(work / "student-gqa4", 4, tokenizer, args.seq_len)
    teacher = write_model(work / "teacher-mha", 32, tokenizer, args.seq_len) if "distill" in variants else student
    tokens = (args.steps + 4) * args.micro_batch * args.seq_len
    corpus = write_corpus(work / "corpus.parquet", tokens, 32000)

    results = [run_variant(name, args, student, teacher, corpus, work, peak) for name in variants]
    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}, bf16 matmul peak measured {peak:.0f} TFLOP/s")
    shape = f"seq {args.seq_len}, micro-batch {args.micro_batch}, {args.steps} steps"
    print(f"TinyLlama-1.1B shape, GQA 4 KV heads, {shape}")
    datasheet = next((r["mfu_peak_tflops"] for r in results if r["mfu_peak_tflops"]), None)
    print(f"MFU against the datasheet dense bf16 peak ({datasheet or 'unknown for this GPU'} TFLOP/s), "
          f"and of the measured peak ({peak:.0f} TFLOP/s)")
    print(f"{'variant':<10}{'tokens/s':>12}{'MFU':>8}{'of measured':>13}{'vs eager':>10}{'peak GiB':>10}{'loss':>8}")
    base = results[0]["tokens_per_s"]
    for r in results:
        datasheet_mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        print(f"{r['variant']:<10}{r['tokens_per_s']:>12,.0f}{datasheet_mfu:>8}{r['mfu_of_measured_peak']:>13.1%}"
              f"{r['tokens_per_s'] / base:>10.2f}{r['peak_memory_gib']:>10.1f}{r['final_loss']:>8.3f}")
    by_name = {r["variant"]: r for r in results}
    if "distill" in by_name and "compile" in by_name:
        ratio = by_name["distill"]["tokens_per_s"] / by_name["compile"]["tokens_per_s"]
        print(f"distillation on / off (both compiled): {ratio:.2f}x the tokens/s")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "measured_peak_tflops": peak, "results": results},
                                        indent=2))
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()

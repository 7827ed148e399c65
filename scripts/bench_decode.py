"""Decode speed of a Llama-2-7B-shaped model, multi-head (32 KV heads) vs grouped-query (8 KV heads), or of the
reproduction's small model (`--shape gqa-repro`: 8 query heads against 8, 4, 2 and 1 KV heads).

Random bf16 weights are built directly on the GPU (nothing is downloaded: speed does not depend on the values). For
each case (batch x prompt length) and each model it measures, in one process: stock `generate()`, engine-style decode
(static cache, packed-GQA attention, CUDA graph; eager kernels and torch.compile), the memory-bound floor from the
measured copy bandwidth, and the decode attention alone against its own floor. It prints a table with the GQA/MHA
speedups as ratios of figures from this run, and writes everything as JSON.

    python scripts/bench_decode.py --output bench_decode.json
    python scripts/bench_decode.py --no-split-kv --engines graph --skip-generate   # packed SDPA attention
    python scripts/bench_decode.py --layers 4 --cases 2x512 --engines graph     # a quick look
    python scripts/bench_decode.py --shape gqa-repro --cases 32x2016 256x2016 --engines graph
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from gqa_uptrain.eval import flashinfer_attention
from gqa_uptrain.eval.packed_attention import packed_gqa_sdpa, packed_gqa_split_kv
from gqa_uptrain.eval.speed import measure_bandwidth, measure_decode

# engine name -> (torch.compile the step, fused projections); every engine runs its step in a CUDA graph
ENGINES = {"graph": (False, False), "compile": (True, False), "fused": (True, True), "graph-fused": (False, True)}


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    layers: int
    max_positions: int
    tied: bool
    kv_heads: tuple[int, ...]  # measured by default; the first is the base

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES = {
    "llama-2-7b": Shape(hidden=4096, heads=32, intermediate=11008, vocab=32000, layers=32, max_positions=4096,
                        tied=False, kv_heads=(32, 8)),
    # scripts/reproduce_gqa.py --scale gpu: its models' shape, so their decode speed can be timed at other batches
    "gqa-repro": Shape(hidden=512, heads=8, intermediate=1536, vocab=16384, layers=8, max_positions=2048, tied=True,
                       kv_heads=(8, 4, 2, 1)),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-2-7b",
                        help="model shape: llama-2-7b (hidden 4096, 32 heads of 128, MLP 11008, vocab 32000) or "
                             "gqa-repro (hidden 512, 8 heads of 64, MLP 1536, vocab 16384, tied; default: llama-2-7b)")
    parser.add_argument("--cases", nargs="+", default=["8x4096", "32x2048"],
                        help="BATCHxPROMPT pairs to measure (default: 8x4096 32x2048)")
    parser.add_argument("--kv-heads", nargs="+", type=int,
                        help="KV-head counts; the first is the base the others are compared with (default: 32 8 for "
                             "llama-2-7b, 8 4 2 1 for gqa-repro)")
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=["graph", "compile"],
                        help="engine-style variants, each in a CUDA graph: 'graph' (eager kernels), 'compile' "
                             "(torch.compile), 'fused' (torch.compile, q/k/v and gate/up as one product each), "
                             "'graph-fused' (eager kernels, fused projections); default: graph compile")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="also profile this many steps per case kernel by kernel: time by kernel class "
                             "(attention, matmul, other) against each class's floor, and the step's idle share "
                             "(default: 0, no profile)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode steps timed per case (default: 64)")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the shape's, 32 or 8)")
    parser.add_argument("--dtype", default="bfloat16", help="weight and cache dtype (default: bfloat16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to measure on (default: cuda when there is one)")
    parser.add_argument("--time-limit", type=float, default=480.0,
                        help="seconds after which no new measurement starts; what is done is kept (default: 480)")
    parser.add_argument("--skip-generate", action="store_true", help="do not time stock generate()")
    parser.add_argument("--no-split-kv", dest="split_kv", action="store_false",
                        help="decode attention with packed SDPA instead of the split-KV Triton kernel (the default)")
    parser.add_argument("--parts", nargs="+", choices=["attention", "decode"], default=["attention", "decode"],
                        help="what to measure: the decode attention alone, whole decode steps (default: both)")
    parser.add_argument("--output", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    args.kv_heads = args.kv_heads or list(shape.kv_heads)
    args.layers = args.layers or shape.layers
    return args


def shaped_model(shape: Shape, kv_heads: int, layers: int, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    """A Llama of `shape` with `kv_heads` KV heads and random weights, built directly on `device`."""
    config = LlamaConfig(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=layers,
        num_attention_heads=shape.heads, num_key_value_heads=kv_heads, vocab_size=shape.vocab,
        max_position_embeddings=shape.max_positions, tie_word_embeddings=shape.tied,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def attention_kernel_us(
    shape: Shape, batch: int, context: int, kv_heads: int, dtype: torch.dtype, device: str
) -> dict[str, float]:
    """Median microseconds of one decode-step attention call: the split-KV kernel and packed SDPA, both with a
    boolean mask as the engine has, SDPA `enable_gqa` without a mask, and FlashInfer's batch decode over the same
    cache (16-token pages, its default kernel choice) where it is installed."""
    query = torch.randn(batch, shape.heads, 1, shape.head_dim, dtype=dtype, device=device)
    key, value = (torch.randn(batch, kv_heads, context, shape.head_dim, dtype=dtype, device=device) for _ in range(2))
    mask = torch.ones(batch, 1, 1, context, dtype=torch.bool, device=device)
    calls = {
        "split_kv_masked": lambda: packed_gqa_split_kv(None, query, key, value, mask),
        "sdpa_packed_masked": lambda: packed_gqa_sdpa(None, query, key, value, mask),
        "sdpa_enable_gqa_unmasked": lambda: F.scaled_dot_product_attention(query, key, value, enable_gqa=True),
    }
    if flashinfer_attention.available():
        groups = shape.heads // kv_heads
        packed = query.reshape(batch, kv_heads, groups, shape.head_dim)
        try:
            decode = flashinfer_attention.FlashInferDecode(batch, kv_heads, groups, shape.head_dim, context,
                                                           shape.head_dim**-0.5, dtype=dtype, device=device)
            decode.plan(context)
            calls["flashinfer"] = lambda: decode.run(packed, key, value)
        except Exception as error:  # its JIT build can fail on a machine: the other kernels' figures still count
            print(f"FlashInfer could not run: {error!r}", flush=True)
    times = {}
    for name, call in calls.items():
        for _ in range(3):
            call()
        graph = torch.cuda.CUDAGraph()  # replayed ten times per timing: launch gaps out of the figure
        with torch.cuda.graph(graph):
            for _ in range(10):
                call()
        samples = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / 10)
        times[name] = statistics.median(samples)
    return times


def kernel_breakdown(row: dict) -> str:
    """One line: a step's kernel time by class against each class's own floor (weights for the matrix products,
    the KV cache for attention), the time between kernels, and how much runs in launch-bound short kernels."""
    kernels, bandwidth = row["kernels"], row["bandwidth_bytes_per_s"]
    step = row["batch"] / row["tokens_per_s"]
    seconds = kernels["kernel_seconds"]
    floors = {"matmul": row["weight_bytes"] / bandwidth, "attention": row["kv_cache_bytes"] / bandwidth}
    parts = [f"{kind} {seconds[kind] * 1e3:.2f} ms" + (f" ({floors[kind] / seconds[kind]:.0%} of its floor)"
                                                        if kind in floors and seconds[kind] else "")
             for kind in ("matmul", "attention", "other")]
    return (f"step {step * 1e3:.2f} ms: {kernels['kernels_per_step']:.0f} kernels; " + ", ".join(parts)
            + f"; idle {row['idle_share']:.0%}; kernels under 5 us {kernels['short_kernel_seconds'] * 1e3:.2f} ms"
            + f"; launch-bound {row['launch_bound_share']:.0%}")


def print_table(rows: list[dict], base_kv: int) -> None:
    """One line per case, engine and model; speedups are over the base model measured in this run."""
    engine = {(r["case"], r["engine_name"], r["kv_heads"]): r["tokens_per_s"] for r in rows}
    generate = {(r["case"], r["kv_heads"]): r["generate_tokens_per_s"] for r in rows if r["generate_tokens_per_s"]}
    floor = {(r["case"], r["kv_heads"]): r["floor_tokens_per_s"] for r in rows}
    nan = float("nan")
    print(f"\n{'case':>9} {'engine':>11} {'kv':>3} {'tok/s':>7} {'floor':>7} {'of floor':>8} {'generate':>8} "
          f"{'of floor':>8} {'speedup':>8} {'generate':>8} {'floor':>7}")
    for row in rows:
        case, kv = row["case"], row["kv_heads"]
        gen = generate.get((case, kv), nan)
        speedup = row["tokens_per_s"] / engine.get((case, row["engine_name"], base_kv), nan)
        print(f"{case:>9} {row['engine_name']:>11} {kv:>3} {row['tokens_per_s']:>7.0f} {floor[case, kv]:>7.0f} "
              f"{row['fraction_of_floor']:>8.1%} {gen:>8.0f} {gen / floor[case, kv]:>8.1%} {speedup:>7.2f}x "
              f"{gen / generate.get((case, base_kv), nan):>7.2f}x "
              f"{floor[case, kv] / floor.get((case, base_kv), nan):>6.2f}x")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    shape = SHAPES[args.shape]
    started = time.monotonic()
    dtype = getattr(torch, args.dtype)
    cases = [tuple(int(n) for n in case.lower().split("x")) for case in args.cases]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "bandwidth_bytes_per_s": measure_bandwidth(args.device),
        "attention_kernel": [],
        "decode": [],
    }
    bandwidth = report["bandwidth_bytes_per_s"]
    print(f"{device_name}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)

    def save() -> None:
        if args.output:
            args.output.write_text(json.dumps(report, indent=2) + "\n")

    if args.device.startswith("cuda") and "attention" in args.parts:
        itemsize = dtype.itemsize
        for (batch, context), kv_heads in ((c, k) for c in cases for k in args.kv_heads):
            times = attention_kernel_us(shape, batch, context, kv_heads, dtype, args.device)
            floor_us = 2 * batch * kv_heads * context * shape.head_dim * itemsize / bandwidth * 1e6
            report["attention_kernel"].append({"batch": batch, "context": context, "kv_heads": kv_heads,
                                               "microseconds": times, "floor_microseconds": floor_us})
            print(f"attention alone, batch {batch}, cache {context}, {kv_heads} KV heads (floor {floor_us:.1f} us): "
                  + ", ".join(f"{name} {us:.1f} us ({floor_us / us:.0%})" for name, us in times.items()), flush=True)
        save()

    for kv_heads in args.kv_heads if "decode" in args.parts else ():
        if time.monotonic() - started > args.time_limit:
            print(f"time limit reached: skipping {kv_heads} KV heads", flush=True)
            continue
        model = shaped_model(shape, kv_heads, args.layers, dtype, args.device)
        for engine, (batch, context) in ((e, c) for e in args.engines for c in cases):
            if time.monotonic() - started > args.time_limit:
                print(f"time limit reached: skipping {engine} {kv_heads} KV heads {batch}x{context}", flush=True)
                continue
            compile, fuse = ENGINES[engine]
            tic = time.monotonic()
            try:
                (row,) = measure_decode(
                    model, [batch], [context], args.new_tokens, bandwidth=bandwidth, compile=compile,
                    split_kv=args.split_kv, fuse=fuse, profile=args.profile,
                    stock_generate=engine == args.engines[0] and not args.skip_generate, progress=False,
                )
            except Exception as error:  # keep the other cases' figures; say what failed
                print(f"FAILED {engine} {kv_heads} KV heads {batch}x{context}: {error!r}", flush=True)
                continue
            row.update(case=f"{batch}x{context}", engine_name=engine, kv_heads=kv_heads,
                       wall_seconds=time.monotonic() - tic)
            report["decode"].append(row)
            save()
            generate = row["generate_tokens_per_s"]
            print(f"{engine:>11} {kv_heads:>2} KV heads {batch}x{context}: {row['tokens_per_s']:.0f} tok/s "
                  f"({row['fraction_of_floor']:.0%} of floor {row['floor_tokens_per_s']:.0f})"
                  + (f"; generate {generate:.0f} tok/s" if generate else "")
                  + f"  [{row['wall_seconds']:.0f} s]", flush=True)
            if row["kernels"]:
                print("   " + kernel_breakdown(row), flush=True)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    print_table(report["decode"], args.kv_heads[0])
    save()


if __name__ == "__main__":
    main()

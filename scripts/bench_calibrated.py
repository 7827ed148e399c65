"""Benchmark gqa-convert --method calibrated at a real size: time, peak GPU memory and peak host RSS.

A random LlamaForCausalLM checkpoint of the given shape (default: Llama-2-7B's, hidden 4096, 32 layers, 32 heads,
32 KV heads, MLP 11008, bf16, with GPT-2's vocabulary of 50257 so its tokenizer fits) is written by a child
process, one safetensors shard per decoder layer, random values drawn on the GPU when there is one (linear
weights N(0, 0.02), norms 1), with the tokenizer files of --tokenizer copied beside it. Then this process
converts it as `gqa-convert --method calibrated` does (`gqa_uptrain.convert.convert_checkpoint`, in process) and
prints:
  seconds  total, and its parts: planning (reading headers, building the plan), tokenising the calibration
           text, fitting the layers (GPU work), writing weights (streaming the checkpoint out, fitted tensors
           in), and the rest (config, card, provenance hashes, fsync, rename);
  GPU      torch.cuda.max_memory_allocated and max_memory_reserved over the conversion (this process only),
           with gqa-convert's allocator setting (PYTORCH_CUDA_ALLOC_CONF, unless already set);
  RSS      this process's peak RSS (VmHWM; the checkpoint is built in another process, so it is not counted),
           and its RSS before the conversion (Python, torch and transformers).
The parts are timed by wrapping the converter's own functions, so the conversion runs unchanged.

    python scripts/bench_calibrated.py                                   # Llama-2-7B shape, 262,144 tokens
    python scripts/bench_calibrated.py --hidden 256 --layers 2 --heads 8 --intermediate 512 --groups 2 --tokens 4096
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig

import gqa_uptrain.convert as convert_api
from gqa_uptrain.convert import converter
from gqa_uptrain.convert.calibration import calibrate, refine
from gqa_uptrain.convert.cli import CUDA_ALLOCATOR
from gqa_uptrain.kv_heads import meta_model

DEFAULT_TOKENIZER = Path("/work/shared/data/tokenizers/gpt2")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def llama_config(args: argparse.Namespace) -> LlamaConfig:
    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
                       vocab_size=args.vocab, max_position_embeddings=4096, tie_word_embeddings=False,
                       bos_token_id=50256, eos_token_id=50256, dtype="bfloat16")


def write_checkpoint(folder: Path, config: LlamaConfig, tokenizer: Path, seed: int = 0) -> None:
    """A random bf16 checkpoint: one shard for what is outside the layers, one per decoder layer, drawn on the GPU
    when there is one; never more than one shard in memory."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device).manual_seed(seed)
    shapes = {name: tuple(t.shape) for name, t in meta_model(config).state_dict().items()}
    shards: dict[str, list[str]] = {}
    for name in shapes:
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        shards.setdefault(f"layer-{int(layer[1]):03d}" if layer else "other", []).append(name)
    folder.mkdir(parents=True)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, names in zip(files, shards.values()):
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                data = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                data = torch.randn(shapes[name], generator=generator, device=device, dtype=torch.bfloat16)
                data = data.mul_(0.02).cpu()
            tensors[name] = data
            total += data.numel() * data.element_size()
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy2(tokenizer / name, folder / name)


def rss_bytes(field: str = "VmHWM") -> int:
    """This process's peak (VmHWM) or current (VmRSS) resident memory."""
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text())[1]) * 1024


def timed(module, name: str, seconds: dict[str, float], key: str) -> None:
    """Replace module.name by a wrapper that adds its run time to seconds[key]."""
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - start

    setattr(module, name, wrapper)


def bench(args: argparse.Namespace, workdir: Path) -> dict:
    config = llama_config(args)
    source = args.model or workdir / "source"
    build_seconds = None
    if args.model is None:
        start = time.perf_counter()
        child = multiprocessing.get_context("spawn").Process(target=write_checkpoint,
                                                             args=(source, config, args.tokenizer))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"building the checkpoint failed (exit code {child.exitcode})")
        build_seconds = time.perf_counter() - start
    checkpoint_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))

    parts: dict[str, float] = {}
    timed(converter, "convert", parts, "after_plan")  # everything after resolve_source + build_plan
    timed(calibrate, "fit_checkpoint", parts, "calibration")
    timed(calibrate, "calibration_tokens", parts, "tokenising")
    timed(calibrate, "calibrate", parts, "layers")
    timed(refine, "refine_layer", parts, "refinement")
    timed(converter, "_write_weights", parts, "writing_weights")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    rss_before = rss_bytes("VmRSS")
    start = time.perf_counter()
    converted = convert_api.convert_checkpoint(source, args.groups, workdir / "output", method="calibrated",
                                               calibration=args.calibration, calibration_tokens=args.tokens,
                                               refine_steps=args.refine_steps, progress=True)
    total = time.perf_counter() - start
    output = converted.output
    result = {
        "shape": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                  "kv_heads": config.num_key_value_heads, "intermediate": args.intermediate, "vocab": args.vocab,
                  "dtype": "bfloat16"},
        "groups": args.groups, "tokens_asked": args.tokens, "calibration": args.calibration,
        "checkpoint_bytes": checkpoint_bytes,
        "output_bytes": sum(p.stat().st_size for p in output.glob("*.safetensors")),
        "build_seconds": build_seconds,
        "seconds": {"total": total, "planning": total - parts["after_plan"],
                    "tokenising": parts.get("tokenising", 0.0),
                    "layers": parts.get("layers", 0.0), "refinement": parts.get("refinement", 0.0),
                    "calibration": parts.get("calibration", 0.0),
                    "writing_weights": parts.get("writing_weights", 0.0),
                    "rest": parts["after_plan"] - parts.get("calibration", 0.0) - parts.get("writing_weights", 0.0)},
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "gpu_max_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "cuda_allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "rss_before_bytes": rss_before, "rss_peak_bytes": rss_bytes("VmHWM"),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": f"{platform.node()}, {platform.machine()}",
    }
    result["provenance"] = converted.provenance["conversion"].get("calibration")
    return result


def report(r: dict) -> None:
    s, shape, gb = r["seconds"], r["shape"], 1e9
    calibration = r.get("provenance") or {}
    print(f"machine: {r['machine']}, GPU: {r['gpu'] or 'none (CPU)'}, torch {r['torch']}, "
          f"transformers {r['transformers']}")
    print(f"shape: hidden {shape['hidden']}, {shape['layers']} layers, {shape['heads']} heads, "
          f"{shape['kv_heads']} KV heads -> {r['groups']}, MLP {shape['intermediate']}, vocab {shape['vocab']}, "
          f"bf16; checkpoint {r['checkpoint_bytes'] / gb:.2f} GB -> {r['output_bytes'] / gb:.2f} GB")
    print(f"tokens: {calibration.get('tokens', r['tokens_asked']):,} ({calibration.get('sequences', '?')} x "
          f"{calibration.get('sequence_length', '?')}) of {calibration.get('data', r['calibration'])}")
    if r["build_seconds"] is not None:
        print(f"building the random checkpoint (not counted): {r['build_seconds']:.1f} s")
    print(f"seconds: total {s['total']:.1f} = planning {s['planning']:.1f} + calibration {s['calibration']:.1f} "
          f"(tokenising {s['tokenising']:.1f}, layers {s['layers']:.1f} of which refinement "
          f"{s['refinement']:.1f}) + writing weights "
          f"{s['writing_weights']:.1f} + rest {s['rest']:.1f}")
    if shape["layers"]:
        print(f"per layer: {s['layers'] / shape['layers']:.2f} s")
    if r["gpu_max_allocated_bytes"] is not None:
        print(f"GPU peak: {r['gpu_max_allocated_bytes'] / gb:.2f} GB allocated, "
              f"{r['gpu_max_reserved_bytes'] / gb:.2f} GB reserved "
              f"({r['gpu_max_allocated_bytes'] / 2**30:.2f} / {r['gpu_max_reserved_bytes'] / 2**30:.2f} GiB; "
              f"PYTORCH_CUDA_ALLOC_CONF={r.get('cuda_allocator')})")
    print(f"RSS peak: {r['rss_peak_bytes'] / gb:.2f} GB (before the conversion: {r['rss_before_bytes'] / gb:.2f} GB)")
    errors = [layer.get("held_out_error") for layer in calibration.get("layers", [])]
    if errors:
        print(f"held-out relative error per layer: {errors}")


def main() -> None:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOCATOR)  # as gqa-convert's main does
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (default: 4096)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (default: 32)")
    p.add_argument("--heads", type=int, default=32, help="query heads (default: 32)")
    p.add_argument("--kv-heads", type=int, help="KV heads of the source (default: as many as query heads)")
    p.add_argument("--intermediate", type=int, default=11008, help="MLP size (default: 11008)")
    p.add_argument("--vocab", type=int, default=50257, help="vocabulary, that of --tokenizer (default: 50257)")
    p.add_argument("--groups", type=int, default=8, help="KV heads after the conversion (default: 8)")
    p.add_argument("--tokens", type=int, default=262_144, help="calibration tokens (default: 262144)")
    p.add_argument("--calibration", help="calibration data, as gqa-convert --calibration takes it (default: the "
                                         "built-in default, the shipped public-domain books)")
    p.add_argument("--refine-steps", type=int, default=convert_api.DEFAULT_REFINE_STEPS,
                   help="gqa-convert --refine-steps: refinement steps per layer (default: gqa-convert's, "
                        f"{convert_api.DEFAULT_REFINE_STEPS})")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                   help=f"folder of the tokenizer files copied beside the model (default: {DEFAULT_TOKENIZER})")
    p.add_argument("--model", type=Path, help="convert this checkpoint instead of building one (shape flags "
                                               "then only label the output)")
    p.add_argument("--workdir", type=Path, help="where checkpoints are written (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints (default: remove them)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.model is None and not (args.tokenizer / "vocab.json").is_file() \
            and not (args.tokenizer / "tokenizer.json").is_file():
        p.error(f"--tokenizer {args.tokenizer}: no tokenizer files there")
    if args.groups >= (args.kv_heads or args.heads):
        p.error(f"--groups {args.groups}: must be fewer than the source's KV heads ({args.kv_heads or args.heads})")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-calibrated-", dir=args.workdir))
    try:
        result = bench(args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Benchmark gqa-convert against a plain copy and the naive way, on a Llama-2-7B-shaped checkpoint.

The checkpoint has the real 7B shapes (hidden 4096, 32 heads, MLP 11008, vocab 32000, fp16), with all 32 layers
(13.5 GB) or fewer, in 500 MB shards. Each contender runs in its own process, so its peak RSS is its own:
  copy     shutil.copytree of the checkpoint folder (the floor for time);
  convert  gqa-convert --groups 8 (streaming);
  naive    from_pretrained, pool k/v in place, save_pretrained (it holds the whole model in memory, so it runs only
           up to --naive-up-to layers).
Every contender ends with its output on disk (fsync), as gqa-convert does before it renames its output.
Files are read once before timing, so every contender starts from a warm page cache, and dirty pages are
flushed before each run; the contenders take turns, so that a change of load hits them alike. Times include each
process's start (Python, torch and transformers imports). A tiny checkpoint of the same architecture (a few MB)
gives gqa-convert's fixed cost: what a conversion costs beyond moving the bytes.

    python scripts/bench_convert.py --layers 4 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig

from gqa_uptrain.convert.checkpoint_writer import OutputTensor, ShardedWriter, assign_shards, write_tensor
from gqa_uptrain.kv_heads import meta_model

CONTENDERS = {
    "copy": "import os, shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2]); "
            "[os.fsync(f.fileno()) for p in os.scandir(sys.argv[2]) for f in [open(p.path, 'rb')]]",
    "convert": "import sys; from gqa_uptrain.convert.cli import main; "
               "main([sys.argv[1], '--groups', '8', '-o', sys.argv[2]])",
    "naive": "import sys, torch; from transformers import AutoModelForCausalLM; "
             "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float16); "
             "[setattr(getattr(l.self_attn, p), 'weight', torch.nn.Parameter("
             "getattr(l.self_attn, p).weight.float().reshape(8, 4, 128, -1).mean(1).reshape(1024, -1).half())) "
             "for l in m.model.layers for p in ('k_proj', 'v_proj')]; "
             "m.config.num_key_value_heads = 8; m.save_pretrained(sys.argv[2], max_shard_size='500MB'); "
             "import os; [os.fsync(f.fileno()) for p in os.scandir(sys.argv[2]) for f in [open(p.path, 'rb')]]",
}
# VmHWM is this process's own peak RSS (ru_maxrss would carry over the parent's peak across fork and exec).
MEASURE = "import re, sys, time; t = time.perf_counter(); {code}; seconds = time.perf_counter() - t; " \
          "print(seconds, int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024)"
TINY = 0  # `layers` of the tiny checkpoint that measures the fixed cost


def write_checkpoint(folder: Path, layers: int) -> None:
    """A random fp16 Llama-2-7B-shaped checkpoint, written tensor by tensor (never a whole model in memory); TINY:
    2 layers of the same architecture (32 heads) at hidden size 256 and a 1000-token vocabulary."""
    sizes = (dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=1000) if layers == TINY
             else dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, vocab_size=32000))
    config = LlamaConfig(**sizes, num_attention_heads=32, num_key_value_heads=32, dtype="float16",
                         tie_word_embeddings=False)
    shapes = meta_model(config).state_dict()
    tensors = [OutputTensor(name, torch.float16, tuple(t.shape)) for name, t in shapes.items()]
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    with ShardedWriter(folder, assign_shards(tensors, 500_000_000), lambda n: None) as writer:
        for tensor in tensors:
            data = (torch.randn(tensor.shape, generator=generator) * 0.02).half()
            writer.write(lambda out, progress, data=data: write_tensor(out, data, progress))
        writer.finish()
    config.save_pretrained(folder)


def measure(name: str, source: Path, target: Path) -> dict:
    """Seconds, peak RSS bytes and the load average before, of one contender in a fresh process."""
    load = os.getloadavg()[0]
    done = subprocess.run([sys.executable, "-c", MEASURE.format(code=CONTENDERS[name]), str(source), str(target)],
                          capture_output=True, text=True, check=True)
    seconds, rss = done.stdout.split()[-2:]
    return {"seconds": float(seconds), "peak_rss_bytes": int(rss), "load_before": load}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def bench(layers: int, workdir: Path, repeats: int, contenders: list[str]) -> dict:
    source = workdir / f"llama2-7b-shaped-{layers}l"
    write_checkpoint(source, layers)
    for file in source.iterdir():  # warm the page cache
        with open(file, "rb") as f:
            while f.read(64 << 20):
                pass
    result = {"layers": layers, "checkpoint_bytes": folder_bytes(source)}
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for i in range(repeats):
        for name in contenders:
            target = workdir / f"{name}-{layers}-{i}"
            os.sync()  # no contender pays for the previous one's write-back
            runs[name].append(measure(name, source, target))
            shutil.rmtree(target)
    shutil.rmtree(source)
    result["runs"] = runs
    for name, times in runs.items():
        result[name] = {"seconds": min(r["seconds"] for r in times),
                        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in times)}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 32],
                   help="layer counts to benchmark (default: 4 32)")
    p.add_argument("--repeats", type=int, default=2, help="runs per contender; the fastest counts (default: 2)")
    p.add_argument("--naive-up-to", type=int, default=8, metavar="LAYERS",
                   help="run the naive contender only up to this many layers: it holds the model in memory, "
                        "13.5 GB at 32 (default: 8)")
    p.add_argument("--no-tiny", action="store_true", help="skip the tiny checkpoint that measures the fixed cost")
    p.add_argument("--workdir", type=Path, help="where checkpoints are written (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    load = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.workdir))
    try:
        results = [] if args.no_tiny else [bench(TINY, workdir, args.repeats, ["copy", "convert"])]
        results += [bench(layers, workdir, args.repeats,
                          [name for name in CONTENDERS if name != "naive" or layers <= args.naive_up_to])
                    for layers in args.layers]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; at the end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'layers':>6} {'size GB':>8} {'contender':>9} {'seconds':>8} {'x copy':>7} {'peak RSS GB':>12}  "
          "runs (load before)")
    for r in results:
        for name in (name for name in CONTENDERS if name in r):
            c = r[name]
            runs = ", ".join(f"{run['seconds']:.2f} ({run['load_before']:.1f})" for run in r["runs"][name])
            print(f"{'tiny' if r['layers'] == TINY else r['layers']:>6} {r['checkpoint_bytes'] / 1e9:>8.3f} "
                  f"{name:>9} {c['seconds']:>8.2f} {c['seconds'] / r['copy']['seconds']:>7.2f} "
                  f"{c['peak_rss_bytes'] / 1e9:>12.2f}  {runs}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

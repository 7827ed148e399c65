"""`gqa-convert`: turn a Hugging Face MHA (or GQA) checkpoint into one with fewer KV heads."""

from __future__ import annotations

import argparse
import os

from gqa_uptrain.cli import run_cli
from gqa_uptrain.convert import convert_checkpoint
from gqa_uptrain.convert.options import ConvertOptions
from gqa_uptrain.options import add_flags

# The calibrated method's layers allocate and free hidden-state buffers of many sizes; with expandable segments the
# allocator grows one mapping instead of caching a block per size, so the GPU memory held stays near what is in use.
# A user's own PYTORCH_CUDA_ALLOC_CONF wins.
CUDA_ALLOCATOR = "expandable_segments:True"


def parser() -> argparse.ArgumentParser:
    """The flags are ConvertOptions' fields, with their defaults and help (options.py)."""
    p = argparse.ArgumentParser(
        prog="gqa-convert",
        description="Convert a multi-head-attention (or GQA) Hugging Face checkpoint to grouped-query attention "
                    "with fewer key/value heads, streaming one tensor at a time. The output is a folder that "
                    "stock transformers loads as is.",
        epilog="examples:\n  gqa-convert meta-llama/Llama-2-7b --groups 8\n"
               "  gqa-convert ./my-model --groups 1 --output ./my-model-mqa\n"
               "  gqa-convert ./Meta-Llama-3-8B --groups 2 --method first --dry-run\n"
               "  gqa-convert ./my-model --groups 1 --method calibrated --calibration ./books.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_flags(p, ConvertOptions)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOCATOR)  # read when CUDA is first used, not on import
    run_cli("gqa-convert", lambda: convert_checkpoint(**vars(args)))


if __name__ == "__main__":
    main()

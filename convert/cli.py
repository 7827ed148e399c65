"""`gqa-convert`: turn a Hugging Face MHA (or GQA) checkpoint into one with fewer KV heads."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from gqa_uptrain.cli import run_cli
from gqa_uptrain.convert import DEFAULT_CALIBRATION_TOKENS, DEFAULT_REFINE_STEPS, convert_checkpoint
from gqa_uptrain.convert.methods import METHODS


def _whole_number(text: str) -> int:
    """An integer as a person writes a count: 32768, 32_768 or 3.2768e4. Its range is convert_checkpoint's to
    check, so that the API refuses the same values in the same words."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(value)


def parser() -> argparse.ArgumentParser:
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
    p.add_argument("source", metavar="SOURCE",
                   help="a local model folder or a Hugging Face Hub id (HF_TOKEN, the local cache and "
                        "HF_HUB_OFFLINE are honoured)")
    p.add_argument("-g", "--groups", type=int, required=True,
                   help="KV heads of the converted model: 1 gives multi-query attention; must divide the "
                        "source's KV heads")
    p.add_argument("-o", "--output", type=Path,
                   help="output folder (default: ./<name>-gqa<G>, or ./<name>-mqa for --groups 1)")
    p.add_argument("--method", choices=sorted(METHODS), default="mean",
                   help="how the KV heads of a group become one: mean (average them, the GQA paper's choice; "
                        "default), first (keep the group's first head), random (fresh projections drawn from the "
                        "config's initializer_range), calibrated (training-free: group the heads and fit each "
                        "group's shared key and value to reproduce the original attention on calibration text; "
                        "rewrites q/k/v/o_proj; runs on the GPU when there is one)")
    p.add_argument("--calibration", metavar="DATA",
                   help="text for --method calibrated: a local .txt/.jsonl/.parquet file (optionally compressed), "
                        "folder or glob, or a Hub dataset id; rows with input_ids are used as they are (default: "
                        "public-domain books shipped with gqa-uptrain, offline; text like the model's pretraining "
                        "data fits it better)")
    p.add_argument("--calibration-tokens", type=_whole_number, default=DEFAULT_CALIBRATION_TOKENS, metavar="N",
                   help="calibration tokens for --method calibrated, as whole sequences of up to 512 tokens "
                        "(default: 32768; more fits more closely and takes longer)")
    p.add_argument("--refine-steps", type=_whole_number, default=DEFAULT_REFINE_STEPS, metavar="N",
                   help="for --method calibrated: after the closed form, up to N steps of gradient descent per layer "
                        "so the converted layer reproduces the original layer's output; held-out calibration "
                        f"sequences pick the step kept, or none (default: {DEFAULT_REFINE_STEPS}; 0: the closed form "
                        "alone, faster)")
    p.add_argument("--seed", type=_whole_number, default=0,
                   help="seed for --method random and for the order of calibration documents (default: 0)")
    p.add_argument("--revision", help="branch, tag or commit of a Hub SOURCE (default: main)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors shard, e.g. 5GB or 500MB (default: 5GB); a smaller model is "
                        "written as one model.safetensors")
    p.add_argument("--context", type=int, default=4096,
                   help="context length at which --dry-run reports the KV-cache size of one sequence "
                        "(default: 4096)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (KV heads, KV-cache bytes, parameters, files) and write nothing; a Hub id is "
                        "planned from its config and safetensors headers, without downloading the weights")
    p.add_argument("--force", action="store_true",
                   help="replace OUTPUT if it is a model folder that gqa-convert or gqa-uptrain wrote (its "
                        "gqa_provenance.json says so), swapping the new one in once it is complete; any other "
                        "folder or file is refused")
    return p


def run(args: argparse.Namespace) -> None:
    """The flags, handed to the Python API one to one."""
    convert_checkpoint(args.source, args.groups, args.output, method=args.method, seed=args.seed,
                       revision=args.revision, max_shard_bytes=args.max_shard_size, force=args.force,
                       calibration=args.calibration, calibration_tokens=args.calibration_tokens,
                       refine_steps=args.refine_steps, dry_run=args.dry_run, context=args.context)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run_cli("gqa-convert", lambda: run(args))


if __name__ == "__main__":
    main()

"""gqa-eval: what a conversion cost (lm-eval quality, perplexity) and what it bought (KV cache, decode speed)."""

from __future__ import annotations

import argparse
import logging

from gqa_uptrain.cli import run_cli
from gqa_uptrain.options import add_flags

from .local_tasks import shipped_task_names
from .options import EvalOptions

EPILOG = """\
examples:
  gqa-eval --base meta-llama/Llama-2-7b-hf --model ./Llama-2-7b-gqa8 --model ./Llama-2-7b-mqa \\
           --tasks hellaswag,arc_easy,arc_challenge,piqa,winogrande,lambada_openai --output reports/llama2
  gqa-eval --base ./tiny --model ./tiny-gqa2 --tasks gqa_lastword,gqa_nextsentence \\
           --perplexity held_out.txt --speed --output reports/tiny
  gqa-eval --base ./tiny --model ./tiny-gqa2 --perplexity held_out.txt --kv-cache none int4 --output reports/kv

tasks: shipped offline tasks ({shipped}), a folder or YAML file of lm-eval task configs, or any lm-eval
task/group/tag name (those download their data from the Hugging Face Hub).

The report (report.json, report.csv, report.md, deltas.png, quality_vs_kv_cache.png) is rewritten after every
model. Results are cached per model content and settings: the base is evaluated once for any number of
candidates and an identical rerun only rewrites the report.
"""


# --help's sections, each with its EvalOptions fields in order (every field is in one: tests/eval/test_options.py).
SECTIONS = {
    "models": ("base", "models", "dtype", "device"),
    "quality (lm-evaluation-harness)": ("tasks", "include_paths", "num_fewshot", "batch_size", "limit", "seed",
                                        "add_bos_token", "bootstrap_iters"),
    "perplexity (sliding window)": ("perplexity", "perplexity_column", "perplexity_split", "perplexity_concat",
                                    "perplexity_window", "perplexity_stride", "perplexity_max_tokens"),
    "quantized KV cache (quality with K/V stored as a quantized cache stores them)": (
        "kv_cache", "kv_group_size", "kv_residual"),
    "KV cache and decode speed": ("speed", "speed_batch_sizes", "speed_contexts", "speed_new_tokens"),
    "output and cache": ("output", "cache_dir", "use_cache"),
}


def build_parser() -> argparse.ArgumentParser:
    """The flags are EvalOptions' fields, with their defaults and help (options.py), and --verbose, the CLI's own."""
    parser = argparse.ArgumentParser(
        prog="gqa-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG.format(shipped=", ".join(shipped_task_names())),
    )
    sections = {title: parser.add_argument_group(title) for title in SECTIONS}
    for title, fields in SECTIONS.items():
        add_flags(sections[title], EvalOptions, fields)
    sections["output and cache"].add_argument("--verbose", action="store_true",
                                              help="show lm-eval's and transformers' info logs")
    return parser


def evaluate_flags(args: argparse.Namespace) -> None:
    """The flags, handed to the Python API (bad values fail in EvalOptions, before the slow imports)."""
    from . import evaluate as evaluate_api

    evaluate_api(**{name: value for name, value in vars(args).items() if name != "verbose"})


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.getLogger("lm_eval").setLevel(logging.INFO if args.verbose else logging.ERROR)
    if not args.verbose:
        import transformers

        transformers.logging.set_verbosity_error()
    run_cli("gqa-eval", lambda: evaluate_flags(args))


if __name__ == "__main__":
    main()

"""gqa-eval: what a conversion cost (lm-eval quality, perplexity) and what it bought (KV cache, decode speed)."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from gqa_uptrain.cli import run_cli

from .cache import default_cache_dir
from .local_tasks import shipped_task_names
from .options import DTYPE_NAMES, KV_CACHE_NAMES

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


# Flag types only parse text; which values are allowed is EvalOptions' business (options.py), for every caller.


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _limit(text: str) -> int | float:
    value = float(text)
    return value if "." in text or not math.isfinite(value) else int(value)  # inf and nan: EvalOptions says no


def _bos(text: str) -> bool | None:
    choices = {"auto": None, "true": True, "false": False}
    if text not in choices:
        raise argparse.ArgumentTypeError("expected auto, true or false")
    return choices[text]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gqa-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG.format(shipped=", ".join(shipped_task_names())),
    )
    models = parser.add_argument_group("models")
    models.add_argument("--base", required=True, help="the original model: a local folder or a Hugging Face Hub id")
    models.add_argument("--model", dest="models", action="append", default=[], metavar="MODEL",
                        help="a converted (candidate) model to compare with the base; repeat for several")
    models.add_argument("--dtype", choices=DTYPE_NAMES, default="auto",
                        help="weights dtype for every model (auto: the base checkpoint's own dtype)")
    models.add_argument("--device", default=None,
                        help="torch device, or auto to spread a model too large for one GPU over all of them "
                        "(default: cuda when available, else cpu)")

    quality = parser.add_argument_group("quality (lm-evaluation-harness)")
    quality.add_argument("--tasks", help="comma-separated task names, task folders or task YAML files")
    quality.add_argument("--include-path", dest="include_paths", action="append", default=[], type=Path,
                         metavar="DIR", help="an extra folder of lm-eval task YAMLs, whose tasks --tasks can name "
                         "(repeatable); lm-eval reads relative data_files from the working directory")
    quality.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per prompt (default 0)")
    quality.add_argument("--batch-size", type=int, default=8,
                         help="batch size for lm-eval and perplexity, the same for every model (default 8)")
    quality.add_argument("--limit", type=_limit, default=None,
                         help="evaluate only the first N documents of each task (a fraction if it has a dot)")
    quality.add_argument("--seed", type=int, default=1234, help="seed for lm-eval's few-shot sampling and RNGs")
    quality.add_argument("--add-bos-token", type=_bos, default=None, metavar="{auto,true,false}",
                         help="whether lm-eval puts BOS before each input; auto: what the base tokenizer does. "
                         "Use false for lm-eval rolling-perplexity tasks (wikitext) with a BOS-adding tokenizer, "
                         "or the BOS is doubled and scored")
    quality.add_argument("--bootstrap-iters", type=int, default=100_000,
                         help="lm-eval bootstrap iterations for the stderr of non-mean metrics (perplexity)")

    ppl = parser.add_argument_group("perplexity (sliding window)")
    ppl.add_argument("--perplexity", metavar="SOURCE",
                     help="held-out text: a .txt file (one document), a .json/.jsonl/.csv/.parquet file (optionally "
                     ".xz/.gz) with a text column, or a Hub dataset NAME[:CONFIG]")
    ppl.add_argument("--perplexity-column", default="text", help="text column of a dataset source (default text)")
    ppl.add_argument("--perplexity-split", default="test", help="split of a Hub dataset source (default test)")
    ppl.add_argument("--perplexity-concat", action="store_true",
                     help="join a dataset's rows into one text (for a line per row, as in wikitext); "
                     "otherwise each row is a document with its own start token")
    ppl.add_argument("--perplexity-window", type=int, default=None,
                     help="tokens per window (default: the base's max_position_embeddings, at most 4096)")
    ppl.add_argument("--perplexity-stride", type=int, default=None,
                     help="tokens the window advances; each token is scored once, with at least window-stride "
                     "tokens of context (default: window/2)")
    ppl.add_argument("--perplexity-max-tokens", type=int, default=None,
                     help="score only the first N tokens of the source")

    kv = parser.add_argument_group("quantized KV cache (quality with K/V stored as a quantized cache stores them)")
    kv.add_argument("--kv-cache", nargs="+", default=None, metavar="{%s}" % ",".join(KV_CACHE_NAMES),
                    help="KV caches to evaluate every model with (default none: the model's own). intN quantizes K "
                    "and V as transformers' QuantizedCache does (N-bit integers, a scale and a zero-point per group "
                    "of each token's head vector; the newest tokens in full precision) and counts KV-cache bytes "
                    "the same way; each model gets a row per cache, e.g. --kv-cache none int4. Applies to --tasks "
                    "and --perplexity; --speed runs on the unquantized cache only")
    kv.add_argument("--kv-group-size", type=int, default=None,
                    help="elements per quantization group along head_dim (default 64, transformers' q_group_size)")
    kv.add_argument("--kv-residual", type=int, default=None,
                    help="newest positions of each sequence kept in full precision (default 128, transformers' "
                    "residual_length; 0 quantizes every position)")

    speed = parser.add_argument_group("KV cache and decode speed")
    speed.add_argument("--speed", action="store_true",
                       help="also measure the KV cache from a real generate() and decode throughput per model")
    speed.add_argument("--speed-batch-sizes", type=_int_list, default=[1, 8], metavar="B1,B2",
                       help="decode batch sizes (default 1,8)")
    speed.add_argument("--speed-contexts", type=_int_list, default=[512, 2048], metavar="C1,C2",
                       help="context lengths (tokens in the cache) for decode (default 512,2048)")
    speed.add_argument("--speed-new-tokens", type=int, default=64,
                       help="decode steps timed per case (default 64)")

    out = parser.add_argument_group("output and cache")
    out.add_argument("--output", type=Path, default=Path("gqa-eval-report"),
                     help="report folder (default ./gqa-eval-report); its report files are replaced")
    out.add_argument("--cache-dir", type=Path, default=None,
                     help=f"results cache (default $XDG_CACHE_HOME/gqa_uptrain/eval, here {default_cache_dir()})")
    out.add_argument("--no-cache", dest="use_cache", action="store_false",
                     help="neither read nor write cached results: evaluate everything again")
    out.add_argument("--verbose", action="store_true", help="show lm-eval's and transformers' info logs")
    return parser


def evaluate(args: argparse.Namespace) -> None:
    """The flags, handed to the Python API (bad values fail in EvalOptions, before the slow imports)."""
    from . import evaluate as evaluate_api

    fields = {k: v for k, v in vars(args).items() if k not in ("verbose", "base", "models") and v is not None}
    evaluate_api(args.base, args.models, **fields)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.getLogger("lm_eval").setLevel(logging.INFO if args.verbose else logging.ERROR)
    if not args.verbose:
        import transformers

        transformers.logging.set_verbosity_error()
    run_cli("gqa-eval", lambda: evaluate(args))


if __name__ == "__main__":
    main()

"""`gqa-uptrain RECIPE [key=value ...]`: uptrain a converted checkpoint as a recipe says."""

from __future__ import annotations

import argparse

from gqa_uptrain.cli import run_cli

EPILOG = """\
examples:
  gqa-uptrain recipes/llama-2-7b-gqa8.yaml
  gqa-uptrain recipes/llama-2-7b-gqa8.yaml train.lr=1e-5 budget.fraction=0.02
  scripts/launch.sh recipes/llama-2-7b-gqa8.yaml      # one process per local GPU, the recipe's accelerate config
  accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes $(nvidia-smi -L | grep -c ^GPU) \\
      -m gqa_uptrain.train recipes/llama-2-7b-gqa8.yaml

Running the same command again resumes from the newest checkpoint in output_dir; a finished run does nothing.
One run at a time per output_dir (output_dir/gqa-uptrain.lock). recipes/template.yaml documents every key.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gqa-uptrain",
        description="Uptrain a grouped-query-attention checkpoint (GQA paper recipe: a few percent of the original "
        "pretraining), optionally distilling from the original model. Works under `accelerate launch` unchanged.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="recipe YAML file (see recipes/template.yaml)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value",
        help="override recipe keys by dotted name, values in YAML syntax (e.g. train.lr=1e-5 teacher=null)",
    )
    parser.add_argument(
        "--dry-run", action="store_true",
        help="validate the recipe, the models' configs and the budget, print the plan (steps, tokens, FLOPs, "
        "fraction of pretraining, memory, time, the largest micro-batch that fits) and stop before loading data, "
        "tokenizer or weights; before the conversion it plans from the recipe's convert.source and convert.groups",
    )
    estimate = parser.add_argument_group("estimates (with --dry-run)")
    estimate.add_argument("--num-processes", type=int, default=None, metavar="N",
                          help="processes (GPUs) to estimate for (default: the local GPU count, at least 1)")
    estimate.add_argument("--gpu", default="h100", help="GPU the time and fit are estimated for: "
                          "h100, h200, a100, l40s or 4090 (default h100)")
    estimate.add_argument("--mfu", type=float, default=0.40,
                          help="model FLOPs utilisation assumed for the time (default 0.40, the eager loop's)")
    estimate.add_argument("--parallel", choices=["single", "ddp", "fsdp"], default=None,
                          help="how the model states are held (default: from the recipe's accelerate_config; "
                          "fsdp for FSDP and DeepSpeed ZeRO-3, else ddp, or single on one process)")
    return parser


def _local_gpus() -> int:
    import torch

    return max(torch.cuda.device_count(), 1)


def _dry_run(args: argparse.Namespace) -> str:
    """The plan, read from the whole recipe file: its pipeline sections say how it is launched (accelerate_config)
    and, before the conversion, what model.path will hold (convert.source with convert.groups KV heads)."""
    from .estimate import dry_run
    from .recipe import PlanningRecipe, load_recipe

    recipe = load_recipe(args.recipe, args.overrides, PlanningRecipe)
    return dry_run(recipe, args.num_processes or _local_gpus(), args.gpu, args.mfu, args.parallel)


def main(argv: list[str] | None = None) -> int:
    """Run; a user mistake, a full disk or Ctrl-C ends in one line on stderr (exit 2, or 130 for Ctrl-C)."""
    args = build_parser().parse_intermixed_args(argv)

    def command() -> None:
        if args.dry_run:
            print(_dry_run(args))
            return
        from . import uptrain  # heavy imports after --help

        uptrain(args.recipe, args.overrides)

    run_cli("gqa-uptrain", command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

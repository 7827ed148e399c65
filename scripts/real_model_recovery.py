"""Recovery curves of a real pretrained model converted to one KV head: which start, which parameters, which loss.

    python scripts/real_model_recovery.py --model ~/.cache/gqa-realmodel/smollm2-135m --data ../shared/data/gutenberg \
        --eval-data ../shared/data/eval --output runs/recovery --scale gpu          # one H100
    python scripts/real_model_recovery.py --model TINY --data GUTENBERG --eval-data EVAL --output /tmp/r --scale smoke

The model (SmolLM2-135M from ../shared/realmodel/build.sh: 9 query heads, 3 nearly orthogonal KV heads) is
converted to one KV head by mean pooling and by `--method calibrated` (fitted on train books), then uptrained on a mix
of public-domain books and the standard library's docstrings (never on evaluation text). The arms are {mean,
calibrated} x {all, attention} (`train.trainable`) x {LM loss, distillation from the original}, and the original
itself continued on the same tokens (the fair baseline). Every point of a curve is a whole run of that many tokens,
its learning rate schedule finished, not a mid-run checkpoint. Runs go longest first (`--parallel` runs several
at once, which measured slower in all on one H100: docs/experiments/real-model-recovery.md), and each is a plain
`gqa-uptrain` command, so the script resumes: finished runs are kept, a killed one resumes from its checkpoint.

Measured for every model with gqa-eval against the original: loss on WikiText-2 test and on held-out books (the
validation authors, who appear nowhere in train), and zero-shot arc_easy, piqa, lambada_openai and winogrande from
local JSONL files (lm-eval, the same --limit for every model). Writes results.json, results.md and recovery.png.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from gqa_uptrain.cli import run_cli
from gqa_uptrain.convert import DEFAULT_REFINE_STEPS, convert_checkpoint
from gqa_uptrain.errors import DataError
from gqa_uptrain.plotting import pyplot

DOCSTRING_SHARE = 0.15  # of the training characters: code documentation beside the books, for breadth


@dataclass(frozen=True)
class Scale:
    seq_len: int
    micro_batch: int
    global_batch: int
    budgets: tuple[float, ...]  # tokens: every arm runs the first `full_grid_budgets`, KEY_ARMS the others but the
    full_grid_budgets: int  # last, and the recommended arm and the baseline all of them
    lr: float
    parallel: int  # runs at a time on the one device (on an H100, 6 at a time were slower in all than 1)
    train_chars: int  # characters of training text written (books and docstrings)
    heldout_chars: int  # of validation books and of wikitext, each
    calibration_tokens: int
    refine_steps: int  # gqa-convert --refine-steps for the calibrated start
    eval_limit: int
    eval_batch: int


SCALES = {
    "gpu": Scale(seq_len=2048, micro_batch=8, global_batch=32, budgets=(2.5e6, 10e6, 40e6), full_grid_budgets=1,
                 lr=3e-4, parallel=1, train_chars=190_000_000, heldout_chars=600_000, calibration_tokens=131_072,
                 refine_steps=DEFAULT_REFINE_STEPS, eval_limit=200, eval_batch=32),
    "smoke": Scale(seq_len=64, micro_batch=2, global_batch=4, budgets=(512, 1024), full_grid_budgets=1, lr=1e-3,
                   parallel=2, train_chars=120_000, heldout_chars=8_000, calibration_tokens=1024, refine_steps=20,
                   eval_limit=8, eval_batch=4),
}
TASKS = {  # name -> (file in --eval-data, lm-eval task body)
    "lambada_openai": ("lambada_openai.jsonl", {"output_type": "loglikelihood", "doc_to_text": "{{context}}",
                                                "doc_to_target": "{{' ' + continuation}}",
                                                "metric_list": [{"metric": "acc", "aggregation": "mean",
                                                                 "higher_is_better": True}]}),
    "arc_easy": ("arc_easy.jsonl", {"output_type": "multiple_choice", "doc_to_text": "{{query}}\nAnswer:",
                                    "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}"}),
    "piqa": ("piqa.jsonl", {"output_type": "multiple_choice", "doc_to_text": "{{query}}\nAnswer:",
                            "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}"}),
    "winogrande": ("winogrande.jsonl", {"output_type": "multiple_choice", "doc_to_text": "{{gold}}",
                                        "doc_to_choice": "{{context_options}}", "doc_to_target": "{{continuation}}"}),
}
for _, body in TASKS.values():
    body.setdefault("metric_list", [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])


@dataclass(frozen=True)
class Arm:
    start: str  # original | mean | calibrated
    trainable: str  # all | attention
    objective: str  # lm | distill
    data: str = "mix"  # mix | books

    @property
    def name(self) -> str:
        return f"{self.start}-{self.trainable}-{self.objective}" + ("-books" if self.data == "books" else "")


RECOMMENDED = Arm("calibrated", "attention", "distill")
BASELINE = Arm("original", "all", "lm")
PAPER = Arm("mean", "all", "lm")  # the GQA paper's recipe
# Beyond the first budget, the arms that answer the questions: the paper's recipe (how many tokens the
# recommended path saves), each single change from the recommended path (start, trainable set, objective).
KEY_ARMS = (RECOMMENDED, BASELINE, PAPER, Arm("mean", "attention", "distill"), Arm("calibrated", "all", "distill"),
            Arm("calibrated", "attention", "lm"))


def arms() -> list[Arm]:
    grid = [Arm(s, t, o) for s in ("mean", "calibrated") for t in ("all", "attention") for o in ("lm", "distill")]
    return [BASELINE, *grid]


def runs(scale: Scale) -> list[tuple[Arm, float]]:
    """(arm, tokens) of every training run, longest first (they set the wall time, so they start first)."""
    grid, middle, last = (scale.budgets[: scale.full_grid_budgets], scale.budgets[scale.full_grid_budgets:-1],
                          scale.budgets[-1:] if len(scale.budgets) > scale.full_grid_budgets else ())
    plan = [(arm, tokens) for tokens in grid for arm in arms()]
    plan += [(arm, tokens) for tokens in middle for arm in KEY_ARMS]
    plan += [(arm, tokens) for tokens in last for arm in (RECOMMENDED, BASELINE)]
    plan.append((replace(RECOMMENDED, data="books"), scale.budgets[0]))  # what the docstrings in the mix buy
    return sorted(plan, key=lambda run: -run[1])


def run_name(arm: Arm, tokens: float) -> str:
    return f"{arm.name}-{tokens / 1e6:g}M"


# -- data ------------------------------------------------------------------------------------------------------


def _books(files: list[Path]):
    for file in files:
        with lzma.open(file, "rt") as lines:
            for line in lines:
                yield json.loads(line)["text"]


def write_data(gutenberg: Path, eval_data: Path, original: Path, folder: Path, scale: Scale) -> None:
    """The training sets as token ids (train-books.parquet, and train-mix.parquet with docstrings for
    DOCSTRING_SHARE of the characters), tokenised once here rather than by every run; train-books.jsonl (text, for
    calibration); heldout-books.txt from the validation authors and wikitext.txt from WikiText-2 test."""
    from transformers import AutoTokenizer

    from gqa_uptrain.convert.calibration.data import stdlib_docstrings

    train_files = sorted(gutenberg.glob("train-*.jsonl.xz"))
    validation = sorted(gutenberg.glob("validation-*.jsonl.xz"))
    wikitext = eval_data / "wikitext-2-raw-test.txt"
    if not train_files or not validation or not wikitext.is_file():
        raise DataError(f"{gutenberg} needs train-*.jsonl.xz and validation-*.jsonl.xz, {eval_data} "
                        "wikitext-2-raw-test.txt")
    folder.mkdir(parents=True, exist_ok=True)
    books = _take(_books(train_files), int(scale.train_chars * (1 - DOCSTRING_SHARE)))
    docs = _take(("\n\n".join(texts) for texts in stdlib_docstrings().values()),
                 int(scale.train_chars * DOCSTRING_SHARE))
    tokenizer = AutoTokenizer.from_pretrained(original)
    for name, texts in (("train-books", books), ("train-mix", _interleave(books, docs))):
        _write_ids(tokenizer, texts, folder / f"{name}.parquet")
    with open(folder / ".train-books.jsonl", "w") as out:
        out.writelines(json.dumps({"text": t}) + "\n" for t in books)
    os.replace(folder / ".train-books.jsonl", folder / "train-books.jsonl")
    heldout = "\n\n".join(_books(validation))[: scale.heldout_chars]
    (folder / "heldout-books.txt").write_text(heldout)
    (folder / "wikitext.txt").write_text(wikitext.read_text()[: scale.heldout_chars])


def _take(texts, chars: int) -> list[str]:
    """The first texts up to `chars` characters in all (the last one cut)."""
    out, written = [], 0
    for text in texts:
        out.append(text[: chars - written])
        written += len(out[-1])
        if written >= chars:
            break
    return out


def _write_ids(tokenizer, texts: list[str], path: Path, batch: int = 64) -> None:
    """Documents as rows of `input_ids` (what gqa-uptrain packs as they are), written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("input_ids", pa.list_(pa.int32()))])
    temp = path.with_name(f".{path.name}")
    with pq.ParquetWriter(temp, schema) as writer:
        for start in range(0, len(texts), batch):
            ids = tokenizer(texts[start:start + batch], verbose=False)["input_ids"]
            writer.write_table(pa.table({"input_ids": ids}, schema=schema))
    os.replace(temp, path)


def _interleave(books: list[str], docs: list[str]) -> list[str]:
    """Docstrings spread evenly among the books, so every budget sees the same mix."""
    out, step = [], max(1, len(docs) // max(1, len(books)))
    for i, book in enumerate(books):
        out.append(book)
        out.extend(docs[i * step:(i + 1) * step])
    out.extend(docs[len(books) * step:])
    return out


def write_tasks(eval_data: Path, folder: Path) -> Path:
    """lm-eval YAMLs for the local JSONL benchmarks, naming their data by absolute path."""
    folder.mkdir(parents=True, exist_ok=True)
    for task, (file, body) in TASKS.items():
        config = {"task": f"local_{task}", "dataset_path": "json",
                  "dataset_kwargs": {"data_files": {"test": str((eval_data / file).resolve())}},
                  "test_split": "test", **body, "metadata": {"version": 1.0}}
        (folder / f"local_{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder


# -- conversion and training -----------------------------------------------------------------------------------


CLOSED_FORM = "calibrated-closed-form"  # a start measured, not trained: what the refinement adds


def convert(original: Path, out: Path, scale: Scale) -> dict[str, Path]:
    """The starting points: the original, mean pooling, calibrated (the default, refined) and its closed form."""
    starts = {"original": original}
    calibrated = {"method": "calibrated", "calibration": str(out / "data" / "train-books.jsonl"),
                  "calibration_tokens": scale.calibration_tokens, "refine_steps": scale.refine_steps}
    for name, options in (("mean", {"method": "mean"}), ("calibrated", calibrated),
                          (CLOSED_FORM, {**calibrated, "refine_steps": 0})):
        folder = out / "converted" / name
        if not (folder / "config.json").is_file():
            convert_checkpoint(original, 1, folder, progress=False, force=folder.exists(), **options)
        starts[name] = folder
    return starts


def recipe(arm: Arm, tokens: float, starts: dict[str, Path], out: Path, scale: Scale) -> dict:
    steps = max(1, math.floor(tokens / (scale.global_batch * scale.seq_len)))
    return {
        "output_dir": str(out / "runs" / run_name(arm, tokens)),
        "seed": 0,
        "model": {"path": str(starts[arm.start])},
        "teacher": {"path": str(starts["original"]), "weight": 1.0} if arm.objective == "distill" else None,
        "data": {"train": {"path": str(out / "data" / f"train-{arm.data}.parquet")}, "holdout_docs": 8,
                 "seq_len": scale.seq_len},
        "batch": {"micro_batch": scale.micro_batch, "global_batch": scale.global_batch},
        "train": {"lr": scale.lr, "warmup_steps": max(1, steps // 20), "weight_decay": 0.0,
                  "trainable": arm.trainable},
        "budget": {"steps": steps},
        "checkpoint": {"every": max(1, steps // 2), "keep": 1},
        "eval": {"every": steps, "batches": 4},
        "log": {"every": max(1, steps // 10), "trackers": []},
    }


def train(arm: Arm, tokens: float, starts: dict[str, Path], out: Path, scale: Scale) -> Path:
    """One gqa-uptrain run in its own process (its log beside it); the exported model's folder."""
    name = run_name(arm, tokens)
    path = out / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe(arm, tokens, starts, out, scale), sort_keys=False))
    run_dir = out / "runs" / name
    (out / "logs").mkdir(exist_ok=True)
    with open(out / "logs" / f"{name}.log", "a") as log:
        done = subprocess.run([sys.executable, "-m", "gqa_uptrain.train", str(path)], stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {done.returncode}): see {out / 'logs' / f'{name}.log'}")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the exported model is what is measured
    print(f"   done: {name}", flush=True)
    return run_dir / "model"


# -- measurement -----------------------------------------------------------------------------------------------


def _task_models(models: dict[str, Path], plan: list[tuple[Arm, float]]) -> set[str]:
    """Labels whose lm-eval tasks are measured: the starting points and each arm's longest run (tasks take most of
    the measuring time; the losses are measured at every point)."""
    longest = {}
    for arm, tokens in plan:
        longest[arm] = max(longest.get(arm, 0.0), tokens)
    return {label for label in models if label.startswith("start:")} | {
        run_name(arm, tokens) for arm, tokens in longest.items() if run_name(arm, tokens) in models}


def measure(models: dict[str, Path], original: Path, out: Path, scale: Scale, tasks: bool,
            task_models: set[str]) -> dict[str, dict]:
    """label -> {wikitext_loss, books_loss, tasks} (gqa-eval's cache makes a repeat free)."""
    from gqa_uptrain.eval import evaluate

    refs = sorted({str(p) for p in models.values()} - {str(original)})
    measured: dict[str, dict] = {str(p): {} for p in models.values()}
    common = {"cache_dir": out / "eval-cache", "batch_size": scale.eval_batch, "add_bos_token": False}
    for held_out in ("wikitext", "books"):
        text = out / "data" / ("wikitext.txt" if held_out == "wikitext" else "heldout-books.txt")
        report = evaluate(original, refs, output=out / "eval" / held_out, perplexity=str(text),
                          perplexity_concat=True, perplexity_window=scale.seq_len, perplexity_stride=scale.seq_len,
                          **common)
        for model in [report.base, *report.candidates]:
            ppl = model.perplexity
            measured[model.ref][f"{held_out}_loss"] = math.log(ppl) if ppl else None
    if tasks:
        names = ",".join(f"local_{t}" for t in TASKS)
        chosen = sorted({str(models[label]) for label in task_models} - {str(original)})
        report = evaluate(original, chosen, output=out / "eval" / "tasks", tasks=names, limit=scale.eval_limit,
                          include_paths=[out / "eval-tasks"], **common)
        for model in [report.base, *report.candidates]:
            measured[model.ref]["tasks"] = {task.removeprefix("local_"): value for task, value in model.scores.items()}
    return {label: measured[str(path)] for label, path in models.items()}


# -- results ---------------------------------------------------------------------------------------------------


def results(plan: list[tuple[Arm, float]], starts: dict[str, Path], measured: dict[str, dict]) -> list[dict]:
    """One record per (arm, tokens), budget 0 included (the converted model itself, or the original), and one for
    each start that no arm trains."""
    records = [{"start": name, "trainable": "-", "objective": "-", "data": "-", "arm": f"{name} (not trained)",
                "tokens": 0.0, **measured[f"start:{name}"]}
               for name in starts if name not in {a.start for a in arms()} and f"start:{name}" in measured]
    for arm in arms() + [a for a, _ in plan if a.data != "mix"]:
        points = [(0.0, f"start:{arm.start}")] + [(t, run_name(a, t)) for a, t in plan if a == arm]
        for tokens, label in sorted(set(points)):
            if label in measured:
                records.append({**asdict(arm), "arm": arm.name, "tokens": tokens, **measured[label]})
    return records


def goals(records: list[dict], scale: Scale) -> dict:
    """The issue's goals, each with the numbers that decide it (None where a run is missing)."""
    def at(arm: Arm, tokens: float) -> dict | None:
        return next((r for r in records if r["arm"] == arm.name and r["tokens"] == tokens), None)

    longest = scale.budgets[-1]
    paper_tokens = max((r["tokens"] for r in records if r["arm"] == PAPER.name), default=0.0)
    paper = at(PAPER, paper_tokens)
    quarter = max((r["tokens"] for r in records if r["arm"] == RECOMMENDED.name and 0 < r["tokens"] <= paper_tokens / 4),
                  default=None)
    recommended = at(RECOMMENDED, quarter) if quarter else None
    out = {"paper_recipe": paper and {k: paper[k] for k in ("tokens", "wikitext_loss", "books_loss")},
           "recommended_at_a_quarter": recommended and {k: recommended[k] for k in
                                                        ("tokens", "wikitext_loss", "books_loss")}}
    rec, base = at(RECOMMENDED, longest), at(BASELINE, longest)
    if rec and base:
        out["gap_wikitext_at_longest"] = rec["wikitext_loss"] - base["wikitext_loss"]
        out["gap_books_at_longest"] = rec["books_loss"] - base["books_loss"]
        out["lambada_at_longest"] = (rec.get("tasks") or {}).get("lambada_openai")
    costs = []
    for start in ("mean", "calibrated"):
        for objective in ("lm", "distill"):
            for tokens in scale.budgets:
                a, f = at(Arm(start, "attention", objective), tokens), at(Arm(start, "all", objective), tokens)
                if a and f:
                    costs.append({"start": start, "objective": objective, "tokens": tokens,
                                  "wikitext": a["wikitext_loss"] - f["wikitext_loss"],
                                  "books": a["books_loss"] - f["books_loss"]})
    out["attention_only_cost"] = costs
    books_only = max((r for r in records if r["data"] == "books"), key=lambda r: r["tokens"], default=None)
    if books_only:
        mixed = at(RECOMMENDED, books_only["tokens"])
        out["mix_vs_books_only"] = mixed and {k: mixed[k] - books_only[k] for k in ("wikitext_loss", "books_loss")}
    return out


def table(records: list[dict]) -> str:
    rows = ["| arm | tokens | wikitext loss | books loss | " + " | ".join(TASKS) + " |",
            "|---|---:|---:|---:|" + "---:|" * len(TASKS)]
    for r in records:
        tasks = r.get("tasks") or {}
        cells = [f"{tasks[t]:.3f}" if t in tasks else "-" for t in TASKS]
        rows.append(f"| {r['arm']} | {r['tokens'] / 1e6:g}M | {r['wikitext_loss']:.3f} | {r['books_loss']:.3f} | "
                    + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot(records: list[dict], path: Path) -> None:
    """Loss against uptraining tokens (log axis; budget 0 drawn at the first tick's half), one line per arm."""
    plt = pyplot()
    budgets = sorted({r["tokens"] for r in records if r["tokens"]})
    zero = budgets[0] / 2 if budgets else 1.0
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, title in ((axes[0], "wikitext_loss", "WikiText-2 test"), (axes[1], "books_loss", "held-out books")):
        for arm in dict.fromkeys(r["arm"] for r in records):
            points = sorted((r["tokens"] or zero, r[key]) for r in records if r["arm"] == arm and r[key] is not None)
            if len(points) < 2:  # an arm whose runs are not measured yet: its start is another arm's too
                continue
            style = "-" if "attention" in arm else "--"
            ax.plot(*zip(*points), style, marker="o", label=arm, linewidth=2.5 if arm == RECOMMENDED.name else 1.2)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # 2x10^6, 3x10^6, ... overlap; the decades suffice
        ax.set_xlabel("uptraining tokens (leftmost point: no training)")
        ax.set_ylabel("loss (nats per token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> None:
    scale, out = SCALES[args.scale], args.output
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data" / "wikitext.txt").is_file():
        print("== data", flush=True)
        write_data(args.data, args.eval_data, args.model, out / "data", scale)
    write_tasks(args.eval_data, out / "eval-tasks")
    print("== convert", flush=True)
    starts = convert(args.model, out, scale)
    if args.prepare_only:
        return
    plan = [(arm, tokens) for arm, tokens in runs(scale) if not args.only or run_name(arm, tokens) in args.only]
    print(f"== train: {len(plan)} runs, {args.parallel or scale.parallel} at a time", flush=True)
    models = {f"start:{name}": path for name, path in starts.items()}
    longest = scale.budgets[-1]
    with ThreadPoolExecutor(args.parallel or scale.parallel) as pool:
        futures = {(a, t): pool.submit(train, a, t, starts, out, scale) for a, t in plan}
        for final in (False, True):  # the shorter runs are measured (and reported) while the longest still train
            models |= {run_name(a, t): f.result() for (a, t), f in futures.items() if final or t < longest}
            print(f"== measure {len(models)} models", flush=True)
            measured = measure(models, starts["original"], out, scale, tasks=not args.no_tasks,
                               task_models=_task_models(models, plan))
            report(results(plan, starts, measured), scale, out)


def report(records: list[dict], scale: Scale, out: Path) -> None:
    summary = {"scale": asdict(scale), "records": records, "goals": goals(records, scale)}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(table(records))
    plot(records, out / "recovery.png")
    print(f"== results in {out / 'results.json'}, {out / 'results.md'} and {out / 'recovery.png'}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="the original pretrained model's folder")
    p.add_argument("--data", type=Path, required=True, help="the Gutenberg folder (train-*.jsonl.xz, validation-*)")
    p.add_argument("--eval-data", type=Path, required=True,
                   help="folder with wikitext-2-raw-test.txt and the benchmark JSONL files")
    p.add_argument("--output", type=Path, required=True, help="results folder; the command resumes from it")
    p.add_argument("--scale", choices=sorted(SCALES), default="gpu", help="gpu (one H100) or smoke (CPU, CI)")
    p.add_argument("--parallel", type=int, default=None, help="training runs at a time (default: the scale's)")
    p.add_argument("--no-tasks", action="store_true", help="losses only, no lm-eval tasks")
    p.add_argument("--only", type=lambda text: set(text.split(",")), default=None, metavar="RUN,...",
                   help="train only these runs of the plan, named as their folders are (e.g. "
                        "calibrated-attention-distill-40M); every start is still measured")
    p.add_argument("--prepare-only", action="store_true", help="write the data and the conversions, then stop")
    args = p.parse_args(argv)
    run_cli("real_model_recovery", lambda: run(args))


if __name__ == "__main__":
    main()

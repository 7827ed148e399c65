"""Reproduce the GQA paper's uptraining results at small scale: one command, every arm, every result as JSON.

    python scripts/reproduce_gqa.py --data ../shared/data/gutenberg --output runs/gqa-repro --scale gpu
    python scripts/reproduce_gqa.py --data ../shared/data/gutenberg --output /tmp/gqa-smoke --scale smoke  # CPU

Ainslie et al. (2023) claim: (1) mean-pooling K/V heads starts better than keeping each group's first head, which
starts better than random projections, before and after uptraining; (2) uptraining for about 5% of the
pretraining recovers most of the gap to MHA, and 10% adds little; (3) fewer KV heads cost more quality while the
KV cache shrinks in proportion. The stages, each skipped when its result exists (the command resumes, also
across machines):
  1. data       books of the train shards, and held-out text from validation-00, whose authors never appear in
                train (the shipped lm-eval tasks gqa_lastword and gqa_nextsentence come from those authors too);
  2. tokenizer  a byte-level BPE trained on the train books;
  3. base       an MHA Llama pretrained from scratch for T tokens with gqa-uptrain's loop; T is the 100% that
                uptraining fractions refer to, written into the base's provenance;
  4. arms       groups x method (the paper's mean, first, random, and this project's training-free `calibrated`,
                fitted on train books) x uptraining fraction of T (0, 5%, 10%); the MHA base continued for the
                same fractions (the fair baseline: it sees the extra tokens too); a GQA model trained from scratch
                for T; and mean + 5% and calibrated + 5% with distillation from the MHA base;
  5. evaluate   gqa-eval of every arm against the base: held-out perplexity, the shipped lm-eval tasks and the
                KV cache per token;
  6. speed      decode speed on a GPU, once per KV-head count (it depends on the shapes, not the weights);
  7. results    results.json (each arm's design and measures), results.md, and two plots.
"""

from __future__ import annotations

import argparse
import json
import lzma
import sys
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gqa_uptrain.cli import run_cli
from gqa_uptrain.apps.scratch import init_llama, pretraining_tokens, record_pretraining, train_bpe_tokenizer, train_run
from gqa_uptrain.convert import DEFAULT_REFINE_STEPS, convert_checkpoint
from gqa_uptrain.errors import DataError, EvaluationError
from gqa_uptrain.plotting import pyplot

if TYPE_CHECKING:
    from gqa_uptrain.eval import EvaluationResult

# The GQA paper's three arms and this project's calibrated conversion, each a gqa-convert --method
# (gqa_uptrain.convert.methods.METHODS holds every method).
PAPER_METHODS = ("mean", "first", "random")
ARM_METHODS = (*PAPER_METHODS, "calibrated")
CALIBRATION_SEQUENCES = 64  # calibration tokens: 64 sequences of the training length, from the train books
# Models accept CONTEXT x the training length, so lm-eval's longer items fit; perplexity is scored in windows of
# the training length, the context the models learned.
CONTEXT = 4
# Decode speed is timed at these batch sizes, with prompts filling the models' context but for the new tokens.
SPEED_BATCHES, SPEED_NEW_TOKENS = (8, 32), 32


@dataclass(frozen=True)
class Scale:
    """Everything that sets the size of the experiment."""

    train_shards: int  # train-00.. shards read
    train_books: int | None  # books taken from them (None: all)
    heldout_chars: int  # characters of validation books scored for perplexity
    vocab: int
    hidden: int
    layers: int
    heads: int
    seq_len: int
    micro_batch: int
    global_batch: int
    pretrain_tokens: int  # T
    groups: tuple[int, ...]  # KV-head counts of the converted arms
    fractions: tuple[float, ...]  # uptraining budgets, as fractions of T
    eval_limit: int | None  # items per lm-eval task
    pretrain_lr: float
    uptrain_lr: float
    refine_steps: int = DEFAULT_REFINE_STEPS  # gqa-convert --refine-steps of the calibrated arms


SCALES = {
    # CI: the whole pipeline on a few books in a few minutes (asserts the pipeline, not the science).
    "smoke": Scale(train_shards=1, train_books=12, heldout_chars=40_000, vocab=1024, hidden=64, layers=2, heads=4,
                   seq_len=64, micro_batch=8, global_batch=8, pretrain_tokens=40 * 512, groups=(1, 2),
                   fractions=(0.0, 0.05, 0.10), eval_limit=20, pretrain_lr=3e-3, uptrain_lr=1e-3, refine_steps=20),
    # One H100: an 8-layer, 512-wide Llama on three train shards (about 36M tokens a pass; T is about 3 passes).
    "gpu": Scale(train_shards=3, train_books=None, heldout_chars=2_000_000, vocab=16_384, hidden=512, layers=8,
                 heads=8, seq_len=512, micro_batch=64, global_batch=64, pretrain_tokens=100_000_000,
                 groups=(1, 2, 4), fractions=(0.0, 0.05, 0.10), eval_limit=None, pretrain_lr=1e-3,
                 uptrain_lr=3e-4),
}


@dataclass(frozen=True)
class Arm:
    """One model of the experiment and how it was made."""

    name: str
    kv_heads: int
    method: str  # mean | first | random | calibrated | mha (the base's own heads) | scratch
    fraction: float  # uptraining tokens over T
    distill: bool = False


def write_data(data: Path, folder: Path, scale: Scale) -> None:
    """train.jsonl (whole books) and heldout.txt (the start of the validation books)."""
    shards = sorted(data.glob("train-*.jsonl.xz"))[: scale.train_shards]
    validation = data / "validation-00.jsonl.xz"
    if not shards or not validation.is_file():
        raise DataError(f"{data}: expected train-*.jsonl.xz and validation-00.jsonl.xz (../shared/data/gutenberg)")
    folder.mkdir(parents=True, exist_ok=True)
    books = 0
    with open(folder / "train.jsonl", "w") as out:
        for shard in shards:
            with lzma.open(shard, "rt") as rows:
                for row in rows:
                    if scale.train_books is not None and books == scale.train_books:
                        break
                    out.write(json.dumps({"text": json.loads(row)["text"]}) + "\n")
                    books += 1
    heldout, size = [], 0
    with lzma.open(validation, "rt") as rows:
        for row in rows:
            heldout.append(json.loads(row)["text"])
            size += len(heldout[-1])
            if size >= scale.heldout_chars:
                break
    (folder / "heldout.txt").write_text("\n\n".join(heldout)[: scale.heldout_chars])


def arms(scale: Scale) -> list[Arm]:
    """Every arm the paper's claims need, in the order they are trained."""
    result = [Arm(f"g{g}-{method}-{round(f * 100)}", g, method, f)
              for g in scale.groups for method in ARM_METHODS for f in scale.fractions]
    result += [Arm(f"mha-{round(f * 100)}", scale.heads, "mha", f) for f in scale.fractions if f > 0]
    reference = max(scale.groups)
    result.append(Arm(f"g{reference}-scratch", reference, "scratch", 1.0))
    result.append(Arm(f"g{reference}-mean-5-distill", reference, "mean", 0.05, distill=True))
    result.append(Arm(f"g{reference}-calibrated-5-distill", reference, "calibrated", 0.05, distill=True))
    return result


def run_settings(out: Path, scale: Scale, long: bool) -> dict:
    """What every training run of the experiment shares; only runs as long as pretraining repay compilation."""
    return {"train_path": out / "data" / "train.jsonl", "validation_path": out / "data" / "heldout.txt",
            "seq_len": scale.seq_len, "micro_batch": scale.micro_batch, "global_batch": scale.global_batch,
            "compile": long and torch.cuda.is_available()}


def build_arm(arm: Arm, out: Path, scale: Scale, base: Path, tokenizer: Path, pretrained: int) -> Path:
    """The arm's model folder, made (converted, trained) only if it is not there yet.

    Uptraining fractions refer to `pretrained`, the tokens the base was actually trained on (whole steps).
    """
    train = partial(train_run, **run_settings(out, scale, long=arm.method == "scratch"))
    uptraining = {"fraction": arm.fraction, "pretrain_tokens": pretrained}
    if arm.method == "scratch":
        init = out / "arms" / f"{arm.name}-init"
        if not (init / "config.json").is_file():
            init_llama(tokenizer, init, hidden=scale.hidden, layers=scale.layers, heads=scale.heads,
                       kv_heads=arm.kv_heads, max_length=CONTEXT * scale.seq_len)
        return train(init, out / "arms" / arm.name, {"tokens": scale.pretrain_tokens}, lr=scale.pretrain_lr,
                     warmup=100).model
    if arm.method == "mha":
        return train(base, out / "arms" / arm.name, uptraining, lr=scale.uptrain_lr, warmup=10).model
    converted = out / "arms" / f"g{arm.kv_heads}-{arm.method}-0"
    if not (converted / "config.json").is_file():
        calibration = {"calibration": str(out / "data" / "train.jsonl"), "refine_steps": scale.refine_steps,
                       "calibration_tokens": CALIBRATION_SEQUENCES * scale.seq_len}
        calibration = calibration if arm.method == "calibrated" else {}
        convert_checkpoint(base, arm.kv_heads, converted, method=arm.method, progress=False, **calibration)
    if arm.fraction == 0:
        return converted
    return train(converted, out / "arms" / arm.name, uptraining, lr=scale.uptrain_lr, warmup=10,
                 teacher=base if arm.distill else None).model


def decode_speed(out: Path, scale: Scale, shapes: dict[int, Path], device: str = "cuda") -> dict[int, list[dict]]:
    """Decode speed per KV-head count on `device`, kept in speed.json (a rerun times only what is missing).

    Speed depends on the shapes alone, not the weights, so one model per KV-head count is timed (bf16, the
    CUDA-graph engine with the split-KV kernel; compiling every case would cost more than all the uptraining).
    """
    from transformers import AutoModelForCausalLM

    from gqa_uptrain.eval.speed import measure_bandwidth, measure_decode

    cache = out / "speed.json"
    speeds = {int(k): v for k, v in json.loads(cache.read_text()).items()} if cache.is_file() else {}
    context = CONTEXT * scale.seq_len - SPEED_NEW_TOKENS
    bandwidth = None
    for kv_heads, path in sorted(shapes.items()):
        if kv_heads in speeds:
            continue
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device)
        bandwidth = bandwidth or measure_bandwidth(model.device)
        speeds[kv_heads] = measure_decode(model, SPEED_BATCHES, [context], SPEED_NEW_TOKENS, bandwidth=bandwidth,
                                          compile=False, progress=False)
        cache.write_text(json.dumps(speeds, indent=2) + "\n")
        del model
    return speeds


def results(arm_list: list[Arm], models: dict[str, Path], report: EvaluationResult,
            speeds: dict[int, list[dict]]) -> list[dict]:
    """One record per arm: its design, what gqa-eval measured, and the decode speed of its shape."""
    records = []
    for arm in arm_list:
        measured = report.model(models[arm.name])
        perplexity = measured.perplexity
        records.append({
            **asdict(arm),
            "decode": speeds.get(arm.kv_heads),
            "kv_cache_bytes_per_token": measured.kv_cache_bytes_per_token,
            "heldout_perplexity": perplexity,
            "heldout_loss": float(torch.tensor(perplexity).log()) if perplexity else None,
            "average_score": measured.average_score,
            "tasks": measured.scores,
            "error": measured.error,
        })
    return records


def plot(records: list[dict], base: dict, out: Path) -> None:
    """The gap to MHA against uptraining per method and G, and quality against KV cache."""
    plt = pyplot()
    measured = [r for r in records if r["heldout_loss"] is not None]
    mha = {0.0: base["heldout_loss"], **{r["fraction"]: r["heldout_loss"] for r in measured if r["method"] == "mha"}}
    groups = sorted({r["kv_heads"] for r in measured if r["method"] in ARM_METHODS})
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.8), sharey=True, squeeze=False)
    for ax, g in zip(axes[0], groups):
        for method in ARM_METHODS:
            points = sorted((r["fraction"], r["heldout_loss"] - mha[r["fraction"]]) for r in measured
                            if r["kv_heads"] == g and r["method"] == method and not r["distill"]
                            and r["fraction"] in mha)
            if points:
                ax.plot([100 * f for f, _ in points], [gap for _, gap in points], marker="o", label=method)
        for r in measured:
            if r["kv_heads"] == g and r["distill"] and r["fraction"] in mha:
                ax.plot(100 * r["fraction"], r["heldout_loss"] - mha[r["fraction"]], marker="*", markersize=11,
                        linestyle="", label=f"{r['method']} + distillation")
            if r["kv_heads"] == g and r["method"] == "scratch":
                ax.axhline(r["heldout_loss"] - base["heldout_loss"], color="grey", linestyle=":",
                           label="from scratch (100%) vs base")
        ax.set_yscale("log")
        ax.set_title(f"{g} KV head{'s' if g > 1 else ''} (MHA: {base['kv_heads']})")
        ax.set_xlabel("uptraining, % of pretraining tokens")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out loss minus MHA's with as many tokens")
    fig.tight_layout()
    fig.savefig(out / "loss_vs_uptraining.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, fraction in sorted({(r["method"], r["fraction"]) for r in measured
                                    if r["method"] in ("mean", "calibrated") and r["fraction"] in (0.0, 0.05)}):
        points = sorted((r["kv_cache_bytes_per_token"], r["heldout_loss"]) for r in measured
                        if (r["method"] == method or (r["method"] == "mha" and fraction > 0))
                        and r["fraction"] == fraction and not r["distill"])
        ax.plot(*zip(*points), marker="o", linestyle="-" if method == "calibrated" else "--",
                label=f"{method}, uptrained {100 * fraction:.0f}%" + (" (MHA continued)" if fraction else ""))
    ax.plot(base["kv_cache_bytes_per_token"], base["heldout_loss"], marker="s", linestyle="", color="black",
            label="MHA base")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV cache, bytes per token")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_kv_cache.png", dpi=120)
    plt.close(fig)


def table(records: list[dict]) -> str:
    batch = max(SPEED_BATCHES)
    rows = [("| arm | KV heads | method | uptraining | KV cache / token | held-out loss | perplexity | avg score "
             f"| decode tok/s (batch {batch}) |"),
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in records:
        loss = f"{r['heldout_loss']:.4f}" if r["heldout_loss"] is not None else "-"
        ppl = f"{r['heldout_perplexity']:.2f}" if r["heldout_perplexity"] is not None else "-"
        score = f"{r['average_score']:.4f}" if r["average_score"] is not None else "-"
        method = r["method"] + (" + distillation" if r["distill"] else "")
        decode = next((f"{case['tokens_per_s']:,.0f}" for case in r["decode"] or [] if case["batch"] == batch), "-")
        rows.append(f"| {r['name']} | {r['kv_heads']} | {method} | {100 * r['fraction']:.0f}% | "
                    f"{r['kv_cache_bytes_per_token']:,} B | {loss} | {ppl} | {score} | {decode} |")
    return "\n".join(rows) + "\n"


def check_scale(out: Path, name: str, scale: Scale) -> None:
    """An experiment folder holds one scale: resuming it at another would mix arms of different models."""
    wanted = {"scale": name, **asdict(scale)}
    recorded = out / "scale.json"
    if recorded.is_file() and json.loads(recorded.read_text()) != json.loads(json.dumps(wanted)):
        raise DataError(f"{out} holds an experiment at another scale ({recorded}); use another --output")
    out.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(wanted, indent=2) + "\n")


def run(args: argparse.Namespace) -> None:
    scale, out = SCALES[args.scale], args.output
    check_scale(out, args.scale, scale)
    data, tokenizer = out / "data", out / "tokenizer"
    if not (data / "heldout.txt").is_file():
        print("== data", flush=True)
        write_data(args.data, data, scale)
    if not (tokenizer / "tokenizer.json").is_file():
        print("== tokenizer", flush=True)
        texts = (json.loads(line)["text"] for line in open(data / "train.jsonl"))
        train_bpe_tokenizer(texts, scale.vocab, CONTEXT * scale.seq_len, tokenizer)
    base = out / "base" / "model"
    if not (base / "config.json").is_file():
        print(f"== base: MHA pretrained for {scale.pretrain_tokens:,} tokens", flush=True)
        init = out / "base-init"
        if not (init / "config.json").is_file():
            init_llama(tokenizer, init, hidden=scale.hidden, layers=scale.layers, heads=scale.heads,
                       kv_heads=scale.heads, max_length=CONTEXT * scale.seq_len)
        pretrained = train_run(init, out / "base", {"tokens": scale.pretrain_tokens}, lr=scale.pretrain_lr, warmup=100,
                               **run_settings(out, scale, long=True))
        record_pretraining(pretrained, "gqa-reproduction", f"Gutenberg train books ({args.scale} scale)")
    arm_list = [arm for arm in arms(scale) if not args.arms or any(fnmatch(arm.name, p) for p in args.arms)]
    if not arm_list:
        raise DataError(f"--arms {' '.join(args.arms)} matches no arm (names: {', '.join(a.name for a in arms(scale))})")
    models = {}
    for i, arm in enumerate(arm_list, 1):
        print(f"== arm {i}/{len(arm_list)}: {arm.name}", flush=True)
        models[arm.name] = build_arm(arm, out, scale, base, tokenizer, pretraining_tokens(base))
    if args.only_train:
        return
    print("== evaluate", flush=True)
    from gqa_uptrain.eval import evaluate  # lm-eval is needed from here on only

    try:
        report = evaluate(base, [models[a.name] for a in arm_list], output=out / "eval",
                          tasks=None if args.no_tasks else "gqa_lastword,gqa_nextsentence", limit=scale.eval_limit,
                          batch_size=32, perplexity=str(data / "heldout.txt"), perplexity_concat=True,
                          perplexity_window=scale.seq_len, perplexity_stride=scale.seq_len // 2,
                          cache_dir=out / "eval-cache")
    except EvaluationError as error:  # the other arms' results are in the report: tabulate them, say what failed
        if error.report is None:  # the base failed: there is nothing to tabulate
            raise
        print(f"reproduce_gqa.py: {error}", file=sys.stderr, flush=True)
        report = error.report
    shapes = {scale.heads: base, **{a.kv_heads: models[a.name] for a in arm_list if a.fraction == 0}}
    gpu = torch.cuda.is_available() and not args.no_speed
    speeds = decode_speed(out, scale, shapes) if gpu else {}
    base_record = results([Arm("base", scale.heads, "mha", 0.0)], {"base": base}, report, speeds)[0]
    records = results(arm_list, models, report, speeds)
    (out / "results.json").write_text(json.dumps({"scale": asdict(scale), "base": base_record, "arms": records},
                                                 indent=2) + "\n")
    (out / "results.md").write_text(table([base_record, *records]))
    plot(records, base_record, out)
    print(f"== results in {out / 'results.json'}, {out / 'results.md'} and the plots beside them")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="reproduce_gqa.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder of the Gutenberg shards (../shared/data/gutenberg)")
    p.add_argument("--output", type=Path, required=True, help="experiment folder; the same command resumes there")
    p.add_argument("--scale", choices=sorted(SCALES), default="smoke",
                   help="smoke: minutes on a CPU (CI); gpu: one H100 (default: smoke)")
    p.add_argument("--arms", nargs="+", metavar="PATTERN",
                   help="build and measure only the arms whose names match one of these shell patterns, e.g. "
                        "'g?-calibrated-*' 'mha-5' (default: every arm)")
    p.add_argument("--only-train", action="store_true", help="stop after building every arm (no evaluation)")
    p.add_argument("--no-tasks", action="store_true", help="skip the lm-eval tasks (perplexity and KV cache only)")
    p.add_argument("--no-speed", action="store_true", help="skip the decode-speed stage (it runs only on a GPU)")
    args = p.parse_args(argv)
    run_cli("reproduce_gqa.py", lambda: run(args))


if __name__ == "__main__":
    main()

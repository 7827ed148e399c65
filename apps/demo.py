"""`gqa-demo`: the whole pipeline, offline, on a laptop CPU in minutes.

1. corpus:    docstrings of this Python installation's standard library (every Python carries them), split by
              module into train and held-out text;
2. tokenizer: a byte-level BPE trained on the train split;
3. base:      a small multi-head-attention Llama pretrained from scratch with gqa-uptrain's own loop;
4. convert:   mean-pooled to GQA and MQA with gqa-convert, and with the training-free `--method calibrated`
              (fitted on the train docstrings);
5. uptrain:   each for a slice of the base's pretraining tokens (the GQA paper uses about 5%), and the base
              itself for as many tokens (the fair baseline: it sees the extra data too);
6. evaluate:  gqa-eval compares every model with the base: held-out perplexity, two lm-eval tasks made from the
              held-out docstrings (items that fit the model's 128 positions; demo_tasks.py) and the KV-cache size.
Each stage leaves its result in OUTPUT and is skipped when run again, so an interrupted demo resumes.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from functools import partial
from pathlib import Path

from gqa_uptrain.cli import run_cli
from gqa_uptrain.apps.scratch import init_llama, pretraining_tokens, record_pretraining, train_bpe_tokenizer, train_run

VOCAB = 2048
SEQ_LEN = 128
HOLDOUT_EVERY = 8  # every 8th standard-library module is held out
CALIBRATION_TOKENS = 16_384  # for the calibrated conversions: 128 sequences of the training length


def write_corpus(folder: Path) -> None:
    """train.jsonl (one docstring a row) and heldout.txt (modules the model never trains on)."""
    from gqa_uptrain.convert import stdlib_docstrings  # torch, datasets: not for --help

    docs = stdlib_docstrings()
    train, heldout = [], []
    for i, texts in enumerate(docs.values()):
        (heldout if i % HOLDOUT_EVERY == 0 else train).extend(texts)
    random.Random(0).shuffle(train)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in train)
    (folder / "heldout.txt").write_text("\n\n".join(heldout) + "\n")


def write_demo_tasks(heldout: Path, tokenizer_folder: Path, folder: Path) -> None:
    """The demo's lm-eval tasks (demo_tasks.py), every item within SEQ_LEN tokens of the demo's own tokenizer."""
    from transformers import AutoTokenizer

    from gqa_uptrain.apps.demo_tasks import write_tasks

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    write_tasks(heldout.read_text(), lambda text: len(tokenizer(text, verbose=False)["input_ids"]) < SEQ_LEN, folder)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gqa-demo", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--output", type=Path, default=Path("gqa-demo"),
                   help="folder for every stage's result (default: ./gqa-demo); a rerun resumes there")
    p.add_argument("--groups", type=int, nargs="+", default=[2, 1],
                   help="KV head counts to convert the 8-head base to (default: 2 1)")
    p.add_argument("--pretrain-steps", type=int, default=300,
                   help="optimizer steps of pretraining, 2,048 tokens each (default: 300)")
    p.add_argument("--uptrain-fraction", type=float, default=0.05,
                   help="uptraining budget as a fraction of the pretraining tokens (default: 0.05, as in the "
                        "GQA paper)")
    args = p.parse_args(argv)
    run_cli("gqa-demo", lambda: run(args))


def run(args: argparse.Namespace) -> None:
    from gqa_uptrain.convert import convert_checkpoint
    from gqa_uptrain.eval import evaluate

    out = args.output
    train = partial(train_run, train_path=out / "corpus" / "train.jsonl", seq_len=SEQ_LEN, micro_batch=16,
                    global_batch=16)
    corpus, tokenizer, init, base = out / "corpus", out / "tokenizer", out / "base-init", out / "base" / "model"
    start = time.perf_counter()

    def stage(title: str) -> None:
        print(f"\n== gqa-demo [{time.perf_counter() - start:5.0f} s] {title}", flush=True)

    stage("corpus: standard-library docstrings; every 8th module held out")
    if not (corpus / "heldout.txt").is_file():
        write_corpus(corpus)
    stage(f"tokenizer: byte-level BPE, {VOCAB:,} tokens")
    if not (tokenizer / "tokenizer.json").is_file():
        texts = (json.loads(line)["text"] for line in open(corpus / "train.jsonl"))
        train_bpe_tokenizer(texts, VOCAB, SEQ_LEN, tokenizer)
    stage("tasks: last-word and next-sentence items from the held-out docstrings, each within the model's positions")
    if not (out / "tasks" / "demo_nextsentence.yaml").is_file():
        write_demo_tasks(corpus / "heldout.txt", tokenizer, out / "tasks")
    stage(f"base: a multi-head-attention Llama pretrained from scratch for {args.pretrain_steps} steps")
    if not (init / "config.json").is_file():
        init_llama(tokenizer, init, hidden=128, layers=4, heads=8, kv_heads=8, max_length=SEQ_LEN)
    if not (base / "config.json").is_file():
        pretrained = train(init, out / "base", {"steps": args.pretrain_steps}, lr=3e-3, warmup=30)
        record_pretraining(pretrained, "gqa-demo", "Python standard-library docstrings")
    uptraining = {"fraction": args.uptrain_fraction, "pretrain_tokens": pretraining_tokens(base)}

    candidates = []
    for groups in args.groups:
        name = "mqa" if groups == 1 else f"gqa{groups}"
        stage(f"{name}: convert (mean pooling), then uptrain for {args.uptrain_fraction:.0%} of the pretraining tokens")
        if not (out / name / "config.json").is_file():
            convert_checkpoint(base, groups, out / name)
        candidates += [out / name, train(out / name, out / f"{name}-uptrained", uptraining, lr=1e-3, warmup=2).model]
        stage(f"{name}-calibrated: convert with --method calibrated on the training docstrings, no training")
        if not (out / f"{name}-calibrated" / "config.json").is_file():
            convert_checkpoint(base, groups, out / f"{name}-calibrated", method="calibrated",
                               calibration=str(corpus / "train.jsonl"), calibration_tokens=CALIBRATION_TOKENS)
        candidates.append(out / f"{name}-calibrated")
    stage("mha-continued: the base trained on the same extra tokens, the fair baseline for the uptrained models")
    candidates.append(train(base, out / "mha-continued", uptraining, lr=1e-3, warmup=2).model)

    stage("evaluate every model against the base with gqa-eval")
    # A candidate that fails raises EvaluationError once the others are measured: one line from run_cli.
    evaluate(base, candidates, output=out / "report", tasks=str(out / "tasks"), batch_size=16,
             perplexity=str(corpus / "heldout.txt"), perplexity_concat=True, cache_dir=out / "eval-cache")
    stage(f"done: report in {out / 'report'}, loss curves in {out}/*/loss_curve.png")


if __name__ == "__main__":
    main()

"""Rebuild the shipped offline task data from public-domain books.

The two local tasks are made from Project Gutenberg books (public domain) by authors that the project's
training shards never contain (the `validation-00` shard of ../shared/data/gutenberg):

- `gqa_lastword.jsonl`: LAMBADA-style. A passage of a few sentences whose final word already occurs
  earlier in the passage, so that following the passage (not just the last sentence) is what predicts it.
- `gqa_nextsentence.jsonl`: a few sentences of a story, then the true next sentence against three
  sentences drawn from far away in the same book (same style, so only coherence tells them apart).

Run from the repository root; the output is deterministic for a given input file and seed:

    python eval/tasks/build.py ../shared/data/gutenberg/validation-00.jsonl.xz
"""

import argparse
import json
import lzma
import random
import re
from pathlib import Path

AUTHORS = ("Grimm", "Andersen", "Tolstoy", "Christie", "Bunin")
SENTENCE_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019]?\s+(?=[\"'\u201c\u2018]?[A-Z])")
WORD = re.compile(r"[A-Za-z]+")
STOPWORDS = set(
    "the a an and or but of to in on at by for with from as is was were be been are it he she they we you i "
    "his her their our your my me him them us this that these those there here then than so not no yes all "
    "one said says say what which who whom when where why how did do does had has have will would could "
    "should may might must shall can upon into out up down over again very too also only just".split()
)


def sentences(text: str) -> list[str]:
    """Plain sentences of prose: whitespace collapsed, headings and odd lines dropped."""
    flat = re.sub(r"\s+", " ", text)
    keep = []
    for sentence in SENTENCE_END.split(flat):
        sentence = sentence.strip()
        if 25 <= len(sentence) <= 240 and sentence.isascii() and "_" not in sentence and not sentence.isupper():
            keep.append(sentence)
    return keep


def lastword_item(window: list[str]) -> dict | None:
    """A passage ending in a word that already occurred in it, or None when the passage does not qualify."""
    passage = " ".join(window)
    match = re.search(r"([A-Za-z]+)[.!?]$", passage)
    if not match:
        return None
    word = match.group(1)
    context = passage[: match.start(1)].rstrip()
    earlier = {w.lower() for w in WORD.findall(context)}
    if len(word) < 4 or word.lower() in STOPWORDS or word.lower() not in earlier or not context:
        return None
    return {"context": context, "continuation": word}


def nextsentence_item(sents: list[str], start: int, rng: random.Random) -> dict | None:
    """Three sentences of context, the true fourth, and three distant sentences of similar length."""
    context, truth = sents[start : start + 3], sents[start + 3]
    far = [s for i, s in enumerate(sents) if abs(i - start) > 60 and 0.5 < len(s) / len(truth) < 2]
    if len(far) < 3:
        return None
    choices = rng.sample(far, 3) + [truth]
    rng.shuffle(choices)
    return {"query": " ".join(context), "choices": choices, "gold": choices.index(truth)}


def build(books: list[dict], n_items: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Draw items evenly across books so that no one book dominates either task."""
    rng = random.Random(seed)
    lastword, nextsentence = [], []
    per_book = -(-n_items // len(books))
    for book in books:
        sents = sentences(book["text"])
        starts = rng.sample(range(len(sents) - 8), min(len(sents) - 8, 20 * per_book))
        found_lw, found_ns = [], []
        for start in starts:
            if len(found_lw) < per_book and (item := lastword_item(sents[start : start + rng.randint(3, 5)])):
                found_lw.append(item)
            if len(found_ns) < per_book and (item := nextsentence_item(sents, start, rng)):
                found_ns.append(item)
        lastword += found_lw
        nextsentence += found_ns
    rng.shuffle(lastword)
    rng.shuffle(nextsentence)
    return lastword[:n_items], nextsentence[:n_items]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("books", type=Path, help="Gutenberg JSONL(.xz) with text/author/title per line")
    parser.add_argument("--items", type=int, default=300, help="items per task")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    opener = lzma.open if args.books.suffix == ".xz" else open
    with opener(args.books, "rt", encoding="utf-8") as f:
        books = [b for b in map(json.loads, f) if b["author"].split(",")[0].split()[-1] in AUTHORS]
    lastword, nextsentence = build(books, args.items, args.seed)
    here = Path(__file__).parent
    for name, items in (("gqa_lastword", lastword), ("gqa_nextsentence", nextsentence)):
        with open(here / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
        print(f"{name}: {len(items)} items")


if __name__ == "__main__":
    main()

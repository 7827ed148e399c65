"""The demo's own lm-eval tasks, made from its held-out docstrings so that they can measure its small model.

The shipped tasks (gqa_lastword, gqa_nextsentence) are passages of novels of a few hundred tokens: a model of 128
positions trained on docstrings sees them cut from the left (lm-eval warns once per item) and in a domain it never
saw, and scores below chance. These are the same two kinds of item (eval/tasks/build.py says why each is built so),
drawn from the modules the demo holds out, and kept only when the whole item fits the model's positions:

- demo_lastword: a passage whose last word already occurs earlier in it; the model must predict that word.
- demo_nextsentence: a sentence of a docstring, then its true next sentence against three sentences of other
  held-out docstrings of similar length.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from pathlib import Path

import yaml

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
LAST_WORD = re.compile(r"([A-Za-z]{4,})[.!?]?$")
WORD = re.compile(r"[A-Za-z]+")
TASKS = {"demo_lastword": "loglikelihood", "demo_nextsentence": "multiple_choice"}


def paragraphs(text: str) -> list[list[str]]:
    """The sentences of each paragraph (whitespace collapsed); paragraphs of one sentence are kept too."""
    found = []
    for paragraph in text.split("\n\n"):
        sentences = [s for s in SENTENCE_END.split(" ".join(paragraph.split())) if len(s) >= 20 and s.isascii()]
        if sentences:
            found.append(sentences)
    return found


def lastword_item(sentences: list[str]) -> dict | None:
    """The paragraph's opening passage, when its last word (4 letters or more) occurs earlier in it."""
    passage = " ".join(sentences[:3])
    match = LAST_WORD.search(passage)
    if not match:
        return None
    context = passage[: match.start(1)].rstrip()
    if not context or match.group(1).lower() not in {w.lower() for w in WORD.findall(context)}:
        return None
    return {"context": context, "continuation": match.group(1)}


def nextsentence_item(sentences: list[str], others: list[str], rng: random.Random) -> dict | None:
    """The first sentence, then the true second one among three sentences of other docstrings of similar length."""
    if len(sentences) < 2:
        return None
    truth = sentences[1]
    alike = sorted({s for s in others if 0.5 < len(s) / len(truth) < 2} - {truth})  # docstrings repeat themselves
    if len(alike) < 3:
        return None
    choices = rng.sample(alike, 3) + [truth]
    rng.shuffle(choices)
    return {"query": sentences[0], "choices": choices, "gold": choices.index(truth)}


def build(text: str, fits: Callable[[str], bool], items: int, seed: int = 0) -> dict[str, list[dict]]:
    """Up to `items` items of each task from `text`, every one of which `fits` the model whole."""
    rng = random.Random(seed)
    found = paragraphs(text)
    rng.shuffle(found)
    everything = [s for sentences in found for s in sentences]
    lastword = [item for item in map(lastword_item, found)
                if item and fits(f"{item['context']} {item['continuation']}")]
    nextsentence = []
    for sentences in found:
        item = nextsentence_item(sentences, everything, rng)
        if item and all(fits(f"{item['query']} {choice}") for choice in item["choices"]):
            nextsentence.append(item)
    return {"demo_lastword": lastword[:items], "demo_nextsentence": nextsentence[:items]}


def write_tasks(text: str, fits: Callable[[str], bool], folder: Path, items: int = 100) -> Path:
    """The two tasks as lm-eval YAML files with their data beside them (absolute paths: lm-eval resolves relative
    ones from the working directory); returns the folder, which gqa-eval --tasks takes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in build(text, fits, items).items():
        data = (folder / f"{name}.jsonl").resolve()
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(_config(name, data), sort_keys=False))
    return folder


def _config(name: str, data: Path) -> dict:
    """The task's lm-eval config, as the shipped gqa_lastword and gqa_nextsentence have it."""
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "output_type": TASKS[name], "test_split": "test"}
    if TASKS[name] == "loglikelihood":
        config |= {"doc_to_text": "{{context}}", "doc_to_target": "{{' ' + continuation}}",
                   "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                   {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    else:
        config |= {"doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
                   "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                   {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    return config | {"metadata": {"version": 1.0}}

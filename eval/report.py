"""The comparison report: per task and metric, base vs candidate, the delta and whether it is beyond noise.

The standard error of a delta is sqrt(se_base^2 + se_candidate^2), from lm-eval's own standard errors (the
two evaluations are independent samples of model behaviour on the same items, so this is conservative). A
delta is marked when it exceeds two standard errors. The average row averages one headline metric per task
(acc_norm, else acc, else the first score in [0, 1]), as papers' average columns do.

Written as report.json (everything), report.csv (one row per candidate, task and metric), report.md, and two
plots: deltas.png (headline deltas and every delta beyond two standard errors, with 2-SE whiskers) and
quality_vs_kv_cache.png (log scale where a measure spans more than a decade). This module chooses what the
plots show; `plots.py` draws them.
"""

import csv
import io
import json
import math
from pathlib import Path

from gqa_uptrain.atomic_write import atomic_file, write_atomically
from gqa_uptrain.sizes import human_size

from . import plots

HEADLINE_ORDER = ("acc_norm", "acc", "exact_match", "f1", "mcc")
AVERAGE = "average"
CSV_FIELDS = ("candidate", "task", "metric", "base", "base_stderr", "candidate_value", "candidate_stderr", "delta",
              "delta_stderr", "significant", "higher_is_better")


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def metric_values(model: dict) -> dict[tuple[str, str], dict]:
    """(task, metric) -> value, stderr, higher_is_better, from lm-eval results and the perplexity run."""
    values = {}
    for output in model.get("tasks", {}).values():
        for task, metrics in output["results"].items():
            directions = output["higher_is_better"].get(task, {})
            for key, value in metrics.items():
                metric, _, filter_name = key.partition(",")
                if not filter_name or metric.endswith("_stderr") or _number(value) is None:
                    continue
                name = metric if filter_name == "none" else f"{metric},{filter_name}"
                values[(task, name)] = {
                    "value": float(value),
                    "stderr": _number(metrics.get(f"{metric}_stderr,{filter_name}")),
                    "higher_is_better": directions.get(metric),
                }
    if model.get("perplexity"):
        values[("perplexity", "token_perplexity")] = {
            "value": model["perplexity"]["token_perplexity"], "stderr": None, "higher_is_better": False,
        }
    return values


def _row(task: str, metric: str, base: dict, candidate: dict) -> dict:
    delta = candidate["value"] - base["value"]
    both = base["stderr"] is not None and candidate["stderr"] is not None
    stderr = math.sqrt(base["stderr"] ** 2 + candidate["stderr"] ** 2) if both else None
    return {
        "task": task, "metric": metric, "base": base["value"], "base_stderr": base["stderr"],
        "candidate_value": candidate["value"], "candidate_stderr": candidate["stderr"], "delta": delta,
        "delta_stderr": stderr, "significant": bool(stderr) and abs(delta) > 2 * stderr,
        "higher_is_better": base["higher_is_better"],
    }


def headline_metric(metrics: list[str], values: dict[str, dict]) -> str | None:
    """The metric that stands for a task in averages and plots."""
    for name in HEADLINE_ORDER:
        if name in metrics:
            return name
    bounded = [m for m in metrics if values[m]["higher_is_better"] and 0 <= values[m]["value"] <= 1]
    return bounded[0] if bounded else None


def headline_values(model: dict) -> dict[str, dict]:
    """task -> its headline metric's value entry (tasks without a bounded score are left out)."""
    by_task: dict[str, dict[str, dict]] = {}
    for (task, metric), entry in metric_values(model).items():
        by_task.setdefault(task, {})[metric] = entry
    chosen = {}
    for task, entries in by_task.items():
        metric = headline_metric(list(entries), entries)
        if metric is not None:
            chosen[task] = {**entries[metric], "metric": metric}
    return chosen


def average_score(model: dict) -> float | None:
    scores = [entry["value"] for entry in headline_values(model).values()]
    return sum(scores) / len(scores) if scores else None


def compare(base: dict, candidate: dict) -> list[dict]:
    """Rows for every (task, metric) both models have, then the average row over headline metrics."""
    base_values, candidate_values = metric_values(base), metric_values(candidate)
    rows = [_row(task, metric, base_values[(task, metric)], entry)
            for (task, metric), entry in candidate_values.items() if (task, metric) in base_values]
    base_head, candidate_head = headline_values(base), headline_values(candidate)
    tasks = [task for task in base_head if task in candidate_head]
    if tasks:
        def mean(head: dict) -> dict:
            errors = [head[t]["stderr"] for t in tasks]
            stderr = math.sqrt(sum(e**2 for e in errors)) / len(tasks) if None not in errors else None
            return {"value": sum(head[t]["value"] for t in tasks) / len(tasks), "stderr": stderr,
                    "higher_is_better": True}

        label = "+".join(sorted({base_head[t]["metric"] for t in tasks}))
        rows.append(_row(AVERAGE, label, mean(base_head), mean(candidate_head)))
    return rows


def build_report(settings: dict, base: dict, candidates: list[dict]) -> dict:
    """Everything in one JSON-able dict: settings, each model (with KV-cache size), and the comparisons."""
    return {
        "settings": settings,
        "base": base,
        "candidates": candidates,
        # a failed candidate keeps what it finished before failing; one that finished nothing has no entry
        "comparisons": {c["label"]: rows for c in candidates if (rows := compare(base, c))},
    }


# ----------------------------------------------------------------------------------------------- text tables


def _fmt(value, sign: str = "") -> str:
    """Scores with 4 decimals, hundreds and more with 1, millions and more in exponent form."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if abs(value) >= 1e6:
            return f"{value:{sign}.4g}"
        return f"{value:{sign}.1f}" if abs(value) >= 100 else f"{value:{sign}.4f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def comparison_table(rows: list[dict]) -> str:
    """One candidate against the base; `*` marks a delta beyond two standard errors."""
    body = [[r["task"], r["metric"], r["base"], r["candidate_value"],
             _fmt(r["delta"], sign="+") + (" *" if r["significant"] else ""), r["delta_stderr"]] for r in rows]
    return markdown_table(["task", "metric", "base", "candidate", "delta", "stderr(delta)"], body)


def _bytes(n: float | None) -> str:
    """A table cell: empty where nothing was measured."""
    return "" if n is None else human_size(n)


def _kv_quant(model: dict) -> str:
    """The KV cache a row measured, with the share of positions it quantized where that was counted."""
    name, share = model.get("kv_cache", "none"), model.get("kv_quantized_share")
    return name if share is None else f"{name} ({share:.0%} quantized)"


def models_table(report: dict) -> str:
    """KV-cache size per token next to the average score and perplexity, one row per model."""
    base = report["base"]
    base_kv = base.get("kv_cache_bytes_per_token")
    rows = []
    for model in [base, *report["candidates"]]:
        kv = model.get("kv_cache_bytes_per_token")
        ppl = (model.get("perplexity") or {}).get("token_perplexity")
        rows.append([
            model["label"], model.get("num_key_value_heads"), _kv_quant(model), _bytes(kv),
            f"{kv / base_kv:.3f}" if kv and base_kv else "", _bytes(model.get("measured_kv_cache_bytes_per_token")),
            average_score(model), ppl, model.get("error") or "ok",
        ])
    header = ["model", "KV heads", "KV quant", "KV cache / token", "vs base", "measured / token", "avg score",
              "perplexity", "status"]
    return markdown_table(header, rows)


def speed_table(report: dict) -> str | None:
    """Decode throughput per (batch, context): engine-style and stock generate(), the memory-bound floor, and
    each model's speedup over the base in the same case."""
    base_speed = {(s["batch"], s["context"]): s for s in report["base"].get("speed") or []}

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    rows = []
    for model in [report["base"], *report["candidates"]]:
        for case in model.get("speed") or []:
            base = base_speed.get((case["batch"], case["context"]), {})
            rows.append([
                model["label"], case["batch"], case["context"], case["tokens_per_s"],
                case.get("generate_tokens_per_s"), case.get("floor_tokens_per_s"),
                ratio(case["tokens_per_s"], case.get("floor_tokens_per_s")),
                ratio(case["tokens_per_s"], base.get("tokens_per_s")),
                ratio(case.get("generate_tokens_per_s"), base.get("generate_tokens_per_s")),
                case.get("launch_bound_share"),
            ])
    if not rows:
        return None
    header = ["model", "batch", "context", "tokens/s", "generate() tokens/s", "floor tokens/s", "of floor",
              "speedup", "generate() speedup", "launch-bound"]
    return markdown_table(header, rows)


def _settings_lines(report: dict) -> list[str]:
    settings = report["settings"]
    flat = ", ".join(f"{k}={v}" for k, v in settings.items() if not isinstance(v, (dict, list)))
    lines = [f"Base: `{report['base']['ref']}`. Settings: {flat}.",
             f"Tasks: {', '.join(settings.get('tasks') or []) or 'none'}."]
    if settings.get("perplexity"):
        ppl = settings["perplexity"]
        lines.append(f"Perplexity: `{ppl['source']}`, {ppl['tokens']} tokens in {ppl['documents']} document(s), "
                     f"window {ppl['window']}, stride {ppl['stride']}.")
    if settings.get("kv_cache"):
        kv = settings["kv_cache"]
        lines.append(f"KV caches: {', '.join(kv['caches'])}; intN: K and V quantized as transformers' QuantizedCache "
                     f"stores them (N-bit, a scale and a zero-point per group of {kv['group_size']} along head_dim), "
                     f"the last {kv['residual_length']} positions of each sequence in full precision; KV cache / "
                     "token counts the quantized storage. Decode speed is measured on the unquantized cache.")
    return lines


def markdown(report: dict, images: list[str]) -> str:
    """The report as Markdown: settings, the models table, one comparison per candidate, speed, plots."""
    parts = ["# gqa-eval report", "", *_settings_lines(report), "", "## Models", "", models_table(report), ""]
    compared = {label: rows for label, rows in report["comparisons"].items() if rows}
    for label, rows in compared.items():
        parts += [f"## {label} vs base", "", comparison_table(rows), ""]
    if compared:
        parts.append("`*`: |delta| > 2 standard errors of the delta (sqrt of the sum of both squared stderrs).")
    table = speed_table(report)
    if table:
        cases = [case for m in [report["base"], *report["candidates"]] for case in m.get("speed") or []]
        engine = next((case["engine"] for case in cases if case.get("engine")), "engine-style decode")
        parts += ["", "## Decode speed", "", table, "",
                  f"tokens/s: {engine}; generate(): stock transformers generate(); floor: (weight bytes + KV-cache "
                  "bytes) / measured memory bandwidth, per decode step; speedups against the base, same case; "
                  "launch-bound (GPU only): the share of a step with no kernel running or in kernels under 5 us, "
                  "which fewer KV heads cannot shorten."]
    parts += [""] + [f"![{name}]({name})" for name in images]
    return "\n".join(parts) + "\n"


def csv_text(report: dict) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for label, rows in report["comparisons"].items():
        for row in rows:
            writer.writerow({"candidate": label, **row})
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------ what the plots show


def headline_rows(report: dict) -> dict[str, list[dict]]:
    """Per candidate, the rows a plot shows: each task's headline metric, then the average."""
    headline = {task: entry["metric"] for task, entry in headline_values(report["base"]).items()}
    return {label: [r for r in rows if r["task"] == AVERAGE or headline.get(r["task"]) == r["metric"]]
            for label, rows in report["comparisons"].items()}


def delta_series(report: dict) -> dict[str, list[dict]]:
    """deltas.png: per candidate, the headline rows and the average, and every other metric that moved beyond two
    standard errors for some candidate (shown for all of them, side by side), in the report's row order."""
    headline = headline_rows(report)
    comparisons = report["comparisons"]
    significant = {(r["task"], r["metric"]) for rows in comparisons.values() for r in rows if r["significant"]}
    series = {}
    for label, rows in comparisons.items():
        shown = {(r["task"], r["metric"]) for r in headline.get(label, [])} | significant
        chosen = [r for r in rows if (r["task"], r["metric"]) in shown]
        if chosen:
            series[label] = chosen
    return series


def quality_vs_kv_panels(report: dict, colors: dict[str, str]) -> list[tuple[str, list[plots.Point]]]:
    """quality_vs_kv_cache.png: average headline score and perplexity, a panel each where measured, per model. A
    model's quantized-cache rows take its colour (and the base's square) and are labelled by their cache only."""
    models = [m for m in [report["base"], *report["candidates"]] if m.get("kv_cache_bytes_per_token")]
    base_ref = report["base"]["ref"]
    model_colors: dict[str, str] = {}
    for m in models:
        model_colors.setdefault(m["ref"], "black" if m["ref"] == base_ref else colors[m["label"]])
    measures = (
        ("average score", average_score),
        ("token perplexity (lower is better)", lambda m: (m.get("perplexity") or {}).get("token_perplexity")),
    )
    panels = []
    for name, measure in measures:
        points = [plots.Point(m["label"] if m.get("kv_cache", "none") == "none" else m["kv_cache"],
                              m["kv_cache_bytes_per_token"], _bytes(m["kv_cache_bytes_per_token"]), y,
                              m["ref"] == base_ref, model_colors[m["ref"]])
                  for m in models if (y := measure(m)) is not None]
        if points:
            panels.append((name, points))
    return panels


# ----------------------------------------------------------------------------------------------------- files


def write_report(report: dict, output_dir: Path) -> list[Path]:
    """All report files, each replaced atomically, so a report on disk is always whole."""
    output_dir.mkdir(parents=True, exist_ok=True)
    colors = plots.cycle_colors([c["label"] for c in report["candidates"]])
    drawings = (
        ("deltas.png", delta_series(report), lambda series, path: plots.plot_deltas(series, colors, path)),
        ("quality_vs_kv_cache.png", quality_vs_kv_panels(report, colors), plots.plot_quality_vs_kv),
    )
    images = []
    for name, data, draw in drawings:
        if not data:  # nothing to plot: no file written (one from an earlier run is left as it was)
            continue
        with atomic_file(output_dir / name) as temp:  # a full disk, Ctrl-C: no half-drawn image is left
            draw(data, temp)
        images.append(name)
    write_atomically(output_dir / "report.json", json.dumps(report, indent=1, default=str))
    write_atomically(output_dir / "report.csv", csv_text(report))
    write_atomically(output_dir / "report.md", markdown(report, images))
    return [output_dir / n for n in ("report.json", "report.csv", "report.md", *images)]

"""What gqa-convert tells the user about a plan: the dry run's report, the notes both the dry run and the run print,
and what the run says after writing (a calibrated conversion's error summary, what to expect)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from gqa_uptrain.kv_heads import kv_cache_bytes_per_token, with_kv_heads
from gqa_uptrain.provenance import Provenance
from gqa_uptrain.sizes import human_size

if TYPE_CHECKING:
    from gqa_uptrain.convert.plan import ConversionPlan


def describe(plan: ConversionPlan, context: int) -> list[str]:
    """The --dry-run report: heads, KV-cache size, parameters and files, before -> after."""
    layout = plan.layout
    new_config = with_kv_heads(plan.config, layout.groups)
    kv_before = kv_cache_bytes_per_token(plan.config)
    kv_after = kv_cache_bytes_per_token(new_config)
    params_before = sum(info.nbytes // info.dtype.itemsize for info in plan.reader.tensors.values())
    params_after = sum(s.output.nbytes // s.output.dtype.itemsize for s in plan.steps)
    changed = sum(step.change is not None or step.fitted for step in plan.steps)
    how = plan.method.changed
    if plan.fitted:
        refined = plan.options.refine_steps
        how = (f"fitted on {plan.options.calibration or 'the shipped public-domain books'} "
               f"({plan.options.calibration_tokens:,} tokens), "
               + (f"refined up to {refined} steps a layer" if refined else "closed form only"))
    return [
        f"source        {plan.folder} ({layout.model_type}, {layout.query_heads} query heads)",
        f"KV heads      {layout.kv_heads} -> {layout.groups} (method: {plan.method.name})",
        f"KV cache      {kv_before:,} -> {kv_after:,} bytes/token ({kv_after / kv_before:.3f}x); "
        f"at {context:,} tokens: {human_size(kv_before * context)} -> {human_size(kv_after * context)} per sequence",
        f"parameters    {params_before:,} -> {params_after:,} ({params_after - params_before:+,})",
        f"weights       {human_size(plan.source_bytes)} -> {human_size(plan.output_bytes)} in {len(plan.shards)} "
        f"safetensors file(s)",
        f"tensors       {changed} {how}, {len(plan.steps) - changed} copied unchanged",
        *notes(plan),
    ]


TENSOR_PARALLEL = (2, 4, 8)  # common tensor-parallel degrees of serving engines (vLLM, TGI, SGLang)


def splits_over(kv_heads: int, degree: int) -> bool:
    """Whether `kv_heads` KV heads shard over `degree` tensor-parallel ranks as serving engines do it: whole heads
    per rank (degree divides kv_heads), or each head replicated on degree / kv_heads ranks (kv_heads divides it)."""
    return kv_heads % degree == 0 or degree % kv_heads == 0


def tensor_parallel_note(plan: ConversionPlan) -> str | None:
    """One line when the new KV-head count cannot shard over a common TP degree the query heads allow, naming the
    group counts that would (the divisors of the source's KV heads that shard over all of them)."""
    layout = plan.layout
    degrees = [t for t in TENSOR_PARALLEL if layout.query_heads % t == 0]
    bad = [t for t in degrees if not splits_over(layout.groups, t)]
    if not bad:
        return None
    good = [g for g in range(1, layout.kv_heads + 1)
            if layout.kv_heads % g == 0 and all(splits_over(g, t) for t in degrees)]
    return (f"tensor parallel: {layout.groups} KV heads do not shard over {' or '.join(map(str, bad))} GPUs; "
            f"--groups {' or '.join(map(str, good))} would")


def notes(plan: ConversionPlan) -> list[str]:
    """Warnings the dry run and the run both print: a conversion that changes nothing, a calibrated method that
    pools some tensors (q/k LayerNorms, clip_qkv), an unfriendly TP count."""
    from gqa_uptrain.convert.calibration.support import fallback_note  # torch and transformers' model classes

    layout = plan.layout
    lines = []
    if layout.groups == layout.kv_heads:
        lines.append(f"note: --groups {layout.groups} is the source's KV-head count: nothing changes, the output is "
                     "a copy of the source")
    fallback = fallback_note(plan.config, plan.reader.tensors) if plan.fitted else None
    if fallback:
        lines.append(fallback)
    tp = tensor_parallel_note(plan)
    if tp:
        lines.append(f"warning: {tp}")
    return lines


def after_writing(plan: ConversionPlan, source: str, output: Path, record: Provenance) -> list[str]:
    """What the run prints after writing `record` with the model: the notes, the calibration's fit, how to measure
    the damage, and what to expect by method."""
    layout = plan.layout
    calibration = record.get("conversion", {}).get("calibration")
    lines = [*notes(plan), *(calibration_summary(calibration["layers"]) if calibration else []),
             f"measure it: gqa-eval --base {source} --model {output} --perplexity TEXT"]
    if layout.groups < layout.kv_heads:
        lines.append(plan.method.expect)
    return lines


def calibration_summary(layers: list[dict], worst: int = 3) -> list[str]:
    """What a calibrated conversion reports of its layers: the error it fitted, its worst layers, the refinement."""
    errors = {i: layer["held_out_error"] for i, layer in enumerate(layers) if layer.get("held_out_error") is not None}
    if not errors:
        return ["calibration: too few sequences to hold any out, so no error was measured (pass more "
                "--calibration-tokens)"]
    ranked = sorted(errors, key=errors.get, reverse=True)[:worst]
    lines = ["calibration: relative error of each layer's attention output on held-out calibration sequences "
             f"(0: exact; 1: as large as the output itself): median {statistics.median(errors.values()):.3f}; "
             "worst layers " + ", ".join(f"{i} ({errors[i]:.3f})" for i in ranked)]
    refined = [layer["refinement"] for layer in layers if (layer.get("refinement") or {}).get("steps")]
    if refined:
        before = statistics.median(r["held_out_error_before"] for r in refined)
        after = statistics.median(r["held_out_error_after"] for r in refined)
        fitted = sum(layer.get("attention", True) for layer in layers)  # a hybrid's others are not fitted
        lines.append(f"refinement: kept in {len(refined)} of {fitted} layers; the layer output's held-out error "
                     f"(median) {before:.3f} -> {after:.3f}")
    return lines

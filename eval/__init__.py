"""Measure what a conversion cost and what it bought (`gqa-eval`): quality, perplexity, KV cache, decode speed.

Where things happen: `cli.py` turns the flags into `options.py`'s `EvalOptions`, which checks every value for every
caller; `runner.py` runs the evaluation (all input checked first, then one model at a time, the report rewritten
after each); `loading.py` opens the models and compares their tokenizers; `harness.py` runs lm-eval on the tasks
`local_tasks.py` resolves (the shipped offline tasks are in `tasks/`); `perplexity.py` scores held-out text;
`kv_quant.py` quantizes K/V as a quantized cache stores them while either runs (`--kv-cache`);
`cache.py` fingerprints models and keeps results; `kv_cache.py` measures the KV cache a real generate() leaves
(the config's figure is computed in `gqa_uptrain.kv_heads`); `decode_engine.py` decodes as a serving engine does,
with attention that reads each KV head once (`packed_attention.py`; the split-KV Triton kernel of `decode_kernels.py`)
and fused projections (`projection_fusion.py`) (FlashInfer's kernel runs over the same cache through
`flashinfer_attention.py`, for comparison), and `speed.py` times it against stock generate() and the memory-bound
floor, and profiles its kernels; `report.py` computes deltas, standard errors and tables and writes the report files;
`plots.py` draws the report's PNGs.

`evaluate` is the Python API (it returns an `EvaluationResult`, result.py); `gqa-eval` (cli.py) only parses flags and
calls it. The door is `__all__`: apps use nothing else (tests/test_layout.py). Importing this package imports nothing
heavy: `gqa-eval --help` stays fast, and the names below that live in modules which import more are imported when
first used.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report import AVERAGE, compare, comparison_table
    from .result import EvaluationResult, ModelResult

__all__ = ["evaluate", "EvaluationResult", "ModelResult", "check_inputs", "compare", "comparison_table", "AVERAGE"]
# The door's names defined in other modules -> that module, imported on first use (PEP 562).
_ELSEWHERE = {"EvaluationResult": "result", "ModelResult": "result", "compare": "report",
              "comparison_table": "report", "AVERAGE": "report"}


def __getattr__(name: str) -> Any:
    if name not in _ELSEWHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_ELSEWHERE[name]}"), name)


def evaluate(base: str | Path, models: str | Path | Sequence[str | Path] = (), **options: Any) -> EvaluationResult:
    """Evaluate `base` and each of `models` (folders or Hub ids) and return the report, also written to `output`
    (default ./gqa-eval-report): an `EvaluationResult`, whose `report` is what report.json holds (settings, base,
    candidates, comparisons against the base), with each model's figures (`base`, `candidates`, `model(ref)`), the
    rows against the base (`deltas(label)`) and the `files` written. `options` are gqa-eval's flags as keyword
    arguments, named as `EvalOptions`' fields: tasks="gqa_lastword", perplexity="held_out.txt",
    perplexity_max_tokens=2048, speed=True, batch_size=8, device="cpu", output="reports/x", use_cache=False, ... Bad
    options raise ConfigError before anything loads;
    if a candidate fails, EvaluationError is raised once the others are done (its `report`, an EvaluationResult too,
    holds their results).
    """
    from gqa_uptrain.errors import EvaluationError

    from .options import EvalOptions

    refs = [models] if isinstance(models, (str, Path)) else list(models)
    settings = EvalOptions(base=str(base), models=[str(ref) for ref in refs], **options)
    from .runner import run_report  # torch, transformers and lm-eval take seconds to import

    result, errors = run_report(settings)
    if errors:
        error = EvaluationError(f"{len(errors)} of {len(refs)} candidates failed (the report has the others): "
                                + "; ".join(errors))
        error.report = result
        raise error
    return result


def check_inputs(**options: Any) -> None:
    """The checks gqa-eval runs before any model loads, for a caller that plans an evaluation ahead of the steps that
    make its models (gqa-pipeline). `options` are `evaluate`'s: each is checked as `evaluate` checks it, then the
    perplexity file must be there (a Hub dataset is not fetched) and every task known (lm-eval's index is read, in
    seconds; no data is). Each problem raises one ConfigError or DataError."""
    import tempfile

    from .local_tasks import resolve_tasks
    from .options import EvalOptions
    from .perplexity import check_local_file

    settings = EvalOptions(base="(made by an earlier step)", **options)
    if settings.perplexity:
        check_local_file(settings.perplexity)
    if settings.tasks:
        with tempfile.TemporaryDirectory() as staging:
            resolve_tasks(settings.tasks, [], Path(staging), file_hash=lambda path: "")

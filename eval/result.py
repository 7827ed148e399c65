"""What `evaluate` returns: the report (report.json's content, kept whole for JSON users) with typed access to what
callers read from it, and the files written, so that a caller reads them from the call instead of opening
report.json. The report's schema stays report.py's: these classes are views over it, not a second one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .report import average_score, headline_values


@dataclass(frozen=True)
class ModelResult:
    """One model's entry in the report (`entry`, as report.json holds it), with the figures callers read."""

    entry: dict

    @property
    def label(self) -> str:
        return self.entry["label"]

    @property
    def ref(self) -> str:
        """The folder or Hub id the model was evaluated from."""
        return self.entry["ref"]

    @property
    def kv_cache(self) -> str:
        """The KV-cache quantization it ran with ('none': the model's own cache)."""
        return self.entry.get("kv_cache", "none")

    @property
    def error(self) -> str | None:
        """Why its evaluation failed (what it finished before is kept); None when it did not."""
        return self.entry.get("error")

    @property
    def perplexity(self) -> float | None:
        """Token perplexity on the held-out text, when it was measured."""
        return (self.entry.get("perplexity") or {}).get("token_perplexity")

    @property
    def kv_cache_bytes_per_token(self) -> int | None:
        return self.entry.get("kv_cache_bytes_per_token")

    @property
    def scores(self) -> dict[str, float]:
        """Task -> its headline metric's value (acc_norm, else acc, ...; as the report's average uses)."""
        return {task: value["value"] for task, value in headline_values(self.entry).items()}

    @property
    def average_score(self) -> float | None:
        return average_score(self.entry)


@dataclass(frozen=True)
class EvaluationResult:
    """`report`: report.json's content (settings, base, candidates, comparisons). `files`: the report files written,
    report.json first (then report.csv, report.md and the plots there was something to draw)."""

    report: dict
    files: tuple[Path, ...]

    @property
    def folder(self) -> Path:
        """Where the report was written (`output`)."""
        return self.files[0].parent

    @property
    def base(self) -> ModelResult:
        return ModelResult(self.report["base"])

    @property
    def candidates(self) -> list[ModelResult]:
        """Each candidate with each KV cache asked for (the base's other caches too), in the report's order."""
        return [ModelResult(entry) for entry in self.report["candidates"]]

    def model(self, ref: str | Path, kv_cache: str = "none") -> ModelResult | None:
        """The entry of the model evaluated from `ref` (the same folder, however written, or Hub id) with `kv_cache`;
        the base first. None when the report has none."""
        wanted = Path(ref).resolve()
        return next((model for model in (self.base, *self.candidates)
                     if model.kv_cache == kv_cache and Path(model.ref).resolve() == wanted), None)

    def deltas(self, label: str) -> list[dict]:
        """The rows comparing candidate `label` with the base (report.py's `compare`: task, metric, base,
        candidate_value, delta, delta_stderr, significant, higher_is_better), the average row last; none for a
        candidate that finished nothing."""
        return self.report["comparisons"].get(label, [])

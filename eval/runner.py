"""The evaluation run: check all input first, then each model in turn, the report rewritten after each one.

Everything cheap that can be wrong (a model that does not load its config or tokenizer, tokenizers that differ,
an unknown task, empty perplexity text) fails before the first model is evaluated. After that, a failing
candidate is recorded in the report with its error and the others go on; results already computed stay in the
cache and in the report.
"""

import gc
import hashlib
import math
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gqa_uptrain.cli import ctrl_c_pressed, warn
from gqa_uptrain.errors import ConfigError, DiskFullError, EvaluationError, GqaError
from gqa_uptrain.kv_heads import KVQuantization, kv_cache_bytes_per_token, kv_heads_and_head_dim

from . import report as report_io
from .cache import ResultCache, full_disk_said, result_key
from .harness import HarnessSettings, check_task_loads, evaluate_task
from .kv_quant import kv_quantization, quantized_kv_attention

QUANTIZED_SHARE = "kv_quantized_share"  # of the positions attention read, those the quantized cache held
from .loading import OpenedModel, adds_bos, check_same_tokenizer, load_weights, open_model
from .local_tasks import TaskSelection, resolve_tasks
from .options import EvalOptions
from .perplexity import load_documents, perplexity, tokenize_documents
from .result import EvaluationResult

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def log(message: str) -> None:
    print(f"gqa-eval: {message}", file=sys.stderr, flush=True)


def unique_labels(refs: list[str]) -> list[str]:
    """Short names for tables: the folder or Hub name, with parent folders added only where two would clash.

    A folder named `model` (what gqa-uptrain exports into its run folder) is named by the folder it is in.
    """
    parts = [Path(ref.rstrip("/")).parts or (ref,) for ref in refs]
    parts = [p[:-1] if len(p) > 1 and p[-1] == "model" and p[-2] not in ("/", ".", "..") else p for p in parts]
    depth = [1] * len(refs)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashing = [i for i, label in enumerate(labels) if labels.count(label) > 1 and depth[i] < len(parts[i])]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
    return [f"{label}#{labels[:i].count(label) + 1}" if labels.count(label) > 1 else label
            for i, label in enumerate(labels)]


def resolve_dtype(name: str, base: OpenedModel) -> torch.dtype:
    """`auto` is the base checkpoint's own dtype; whatever it is, every model is evaluated in it."""
    if name == "auto":
        stored = getattr(base.config, "dtype", None)
        stored = str(stored).removeprefix("torch.") if stored is not None else "float32"
        return DTYPES.get(stored, torch.float32)
    return DTYPES[name]


@dataclass
class EvaluationPlan:
    """What every model is measured on, fixed before the first model runs."""

    options: EvalOptions
    cache: ResultCache
    dtype: torch.dtype
    harness: HarnessSettings | None
    tasks: TaskSelection | None
    perplexity_ids: list[list[int]] | None
    perplexity_settings: dict | None
    kv_caches: list[KVQuantization | None]  # every model is measured with each; None: the model's own cache
    bandwidth: float | None = None  # bytes/s, measured once so every model's floor uses the same figure

    def settings(self) -> dict:
        """The settings shown in the report."""
        out = {"tasks": self.tasks.names if self.tasks else [], "device": self.options.device}
        if self.harness:
            out |= self.harness.as_dict()
        else:
            out["dtype"] = str(self.dtype).removeprefix("torch.")
        if self.perplexity_settings:
            out["perplexity"] = self.perplexity_settings
        if any(self.kv_caches):
            out["kv_cache"] = {"caches": self.options.kv_cache, "group_size": self.options.kv_group_size,
                               "residual_length": self.options.kv_residual}
        if self.options.speed:
            out["speed"] = {"batch_sizes": self.options.speed_batch_sizes, "contexts": self.options.speed_contexts,
                            "new_tokens": self.options.speed_new_tokens}
        return out


def perplexity_plan(options: EvalOptions, base: OpenedModel, dtype: torch.dtype) -> tuple[list[list[int]], dict]:
    """Tokenize the held-out text once (base tokenizer; the candidates' are checked identical)."""
    documents = load_documents(options.perplexity, options.perplexity_column, options.perplexity_split,
                               options.perplexity_concat)
    ids = tokenize_documents(documents, base.tokenizer, options.perplexity_max_tokens)
    window = options.perplexity_window or min(getattr(base.config, "max_position_embeddings", 2048) or 2048, 4096)
    stride = options.perplexity_stride or window // 2
    if not 0 < stride <= window:
        raise ConfigError(f"--perplexity-stride {stride} must be between 1 and the window ({window})")
    text_hash = hashlib.sha256(repr(ids).encode()).hexdigest()
    settings = {"source": options.perplexity, "concat": options.perplexity_concat, "window": window,
                "stride": stride, "tokens": sum(map(len, ids)), "documents": len(ids),
                "dtype": str(dtype).removeprefix("torch."), "batch_size": options.batch_size, "ids_sha256": text_hash}
    return ids, settings


def make_plan(options: EvalOptions, base: OpenedModel, staging_dir: Path) -> EvaluationPlan:
    cache = ResultCache(options.cache_dir, enabled=options.use_cache)
    dtype = resolve_dtype(options.dtype, base)
    harness = tasks = None
    if options.tasks:
        tasks = resolve_tasks(options.tasks, options.include_paths, staging_dir, cache.file_hash)
        add_bos = adds_bos(base.tokenizer) if options.add_bos_token is None else options.add_bos_token
        harness = HarnessSettings(num_fewshot=options.num_fewshot, batch_size=options.batch_size,
                                  limit=options.limit, seed=options.seed, dtype=str(dtype).removeprefix("torch."),
                                  add_bos_token=add_bos, bootstrap_iters=options.bootstrap_iters)
    ids, ppl_settings = perplexity_plan(options, base, dtype) if options.perplexity else (None, None)
    kv_caches = [kv_quantization(name, options.kv_group_size, options.kv_residual) for name in options.kv_cache]
    for quant in filter(None, kv_caches):  # a group size that does not fit the head size fails before any model
        quant.group(kv_heads_and_head_dim(base.config)[1])
    return EvaluationPlan(options, cache, dtype, harness, tasks, ids, ppl_settings, kv_caches)


def new_record(spec: OpenedModel, role: str, quant: KVQuantization | None = None) -> dict:
    """The model's entry in the report, filled in as measurements arrive (kept, with its error, on failure); with
    a quantized KV cache, its label says which."""
    label = spec.label if quant is None else f"{spec.label} ({quant.name} KV)"
    return {"label": label, "ref": spec.ref, "role": role, "kv_cache": quant.name if quant else "none",
            "provenance": spec.provenance, "tasks": {}, "perplexity": None, "speed": None, "error": None}


def config_figures(spec: OpenedModel, dtype: torch.dtype, quant: KVQuantization | None = None) -> dict:
    """What the config says: heads and KV-cache bytes per token in the evaluation dtype (quantized as `quant`)."""
    config = spec.config.get_text_config(decoder=True)
    return {
        "num_attention_heads": getattr(config, "num_attention_heads", None),
        "num_key_value_heads": getattr(config, "num_key_value_heads", None),
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(spec.config, dtype, quant),
    }


def with_kv_cache(settings: dict, quant: KVQuantization | None) -> dict:
    """A measurement's cache-key settings, with the KV-cache quantization when there is one (so results measured
    on the model's own cache keep their keys)."""
    return settings if quant is None else {**settings, "kv_cache": asdict(quant)}


class LazyModel:
    """Loads the weights on first use only, so a model whose every result is cached is never loaded."""

    def __init__(self, spec: OpenedModel, plan: EvaluationPlan) -> None:
        self.spec, self.plan, self._model = spec, plan, None

    def get(self) -> torch.nn.Module:
        if self._model is None:
            log(f"[{self.spec.label}] loading {self.spec.ref} ({str(self.plan.dtype).removeprefix('torch.')}, "
                f"{self.plan.options.device})")
            self._model = load_weights(self.spec, self.plan.dtype, self.plan.options.device)
        return self._model

    def release(self) -> None:
        self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def task_key(plan: EvaluationPlan, fingerprint: str, name: str, quant: KVQuantization | None) -> str:
    settings = {**plan.harness.as_dict(), "task": plan.tasks.fingerprints[name]}
    return result_key(fingerprint, f"lm-eval:{name}", with_kv_cache(settings, quant))


def check_task_data(plan: EvaluationPlan, specs: list[OpenedModel]) -> None:
    """Load the data of every task some model still has to run, so a missing dataset fails before the first model."""
    fingerprints = [plan.cache.model_digest(spec.ref) for spec in specs]
    for name in plan.tasks.names:
        if any(plan.cache.get(task_key(plan, fingerprint, name, quant)) is None
               for fingerprint in fingerprints for quant in plan.kv_caches):
            check_task_loads(plan.tasks, name)


def measure_tasks(record: dict, model: LazyModel, quant: KVQuantization | None, plan: EvaluationPlan) -> None:
    for name in plan.tasks.names:
        key = task_key(plan, record["fingerprint"], name, quant)
        cached = plan.cache.get(key)
        if cached is None:
            log(f"[{record['label']}] lm-eval task {name}")
            with quantized_kv_attention(loaded := model.get(), quant) as share:
                cached = evaluate_task(loaded, model.spec.tokenizer, name, plan.tasks, plan.harness)
            if share is not None:
                cached[QUANTIZED_SHARE] = share.value
            plan.cache.put(key, cached)
        else:
            log(f"[{record['label']}] lm-eval task {name}: cached")
        record["tasks"][name] = cached


def measure_perplexity(record: dict, model: LazyModel, quant: KVQuantization | None, plan: EvaluationPlan) -> None:
    settings = {k: v for k, v in plan.perplexity_settings.items() if k != "source"}  # the ids hash stands for it
    key = result_key(record["fingerprint"], "perplexity", with_kv_cache(settings, quant))
    result = plan.cache.get(key)
    if result is None:
        log(f"[{record['label']}] perplexity on {plan.options.perplexity}")
        with quantized_kv_attention(loaded := model.get(), quant) as share:
            result = perplexity(loaded, plan.perplexity_ids, settings["window"], settings["stride"],
                                plan.options.batch_size)
        if share is not None:
            result[QUANTIZED_SHARE] = share.value
        plan.cache.put(key, result)
    else:
        log(f"[{record['label']}] perplexity: cached")
    record["perplexity"] = result


def measure_speed(record: dict, model: LazyModel, plan: EvaluationPlan) -> None:
    """KV cache measured from a real generate() and decode throughput; timings are never cached."""
    from .kv_cache import measured_kv_cache_bytes_per_token
    from .speed import measure_bandwidth, measure_decode

    log(f"[{model.spec.label}] KV cache and decode speed")
    loaded = model.get()
    record["measured_kv_cache_bytes_per_token"] = measured_kv_cache_bytes_per_token(loaded, model.spec.tokenizer)
    if plan.bandwidth is None:
        plan.bandwidth = measure_bandwidth(loaded.device)
    options = plan.options
    record["speed"] = measure_decode(loaded, options.speed_batch_sizes, options.speed_contexts,
                                     options.speed_new_tokens, bandwidth=plan.bandwidth)


def evaluate_model(record: dict, model: LazyModel, quant: KVQuantization | None, plan: EvaluationPlan) -> None:
    """Every requested measurement of one model with one KV cache into `record`, from the cache where possible.
    Decode speed is measured on the model's own cache only (the decode engine does not quantize)."""
    spec = model.spec
    record.update(config_figures(spec, plan.dtype, quant))
    record["fingerprint"] = plan.cache.model_digest(spec.ref)
    try:
        if plan.tasks:
            measure_tasks(record, model, quant, plan)
        if plan.perplexity_ids:
            measure_perplexity(record, model, quant, plan)
        if plan.options.speed and quant is None:
            measure_speed(record, model, plan)
    except torch.OutOfMemoryError as error:
        raise EvaluationError(f"model {spec.ref}: out of memory at --batch-size {plan.options.batch_size} "
                              "(try a smaller one, or --device auto to spread it over several GPUs)") from error
    check_finite(record, spec)
    if quant is not None:
        note_quantized_share(record, quant)


def note_quantized_share(record: dict, quant: KVQuantization) -> None:
    """The smallest share of positions the quantized cache held in any measurement, in `record`; one warning line
    for each measurement that quantized nothing (its sequences all fit the full-precision window), whose row would
    otherwise equal the unquantized one and pass for the quantized cache."""
    measured = {**record.get("tasks", {}), **({"perplexity": record["perplexity"]} if record.get("perplexity") else {})}
    shares = {name: result.get(QUANTIZED_SHARE) for name, result in measured.items()}
    known = [share for share in shares.values() if share is not None]
    if known:
        record[QUANTIZED_SHARE] = min(known)
    for name, share in shares.items():
        if share == 0:
            warn("gqa-eval", f"[{record['label']}] {name}: the {quant.name} KV cache quantized nothing: every sequence "
                 f"fits the last {quant.residual_length} positions it keeps in full precision, so this row measures "
                 "the unquantized cache (--kv-residual 0 quantizes every position)")


def evaluate_candidate(record: dict, model: LazyModel, quant: KVQuantization | None, plan: EvaluationPlan,
                       errors: list[str]) -> None:
    """`evaluate_model`, a failure kept in `record` and `errors` instead of raised: it must not cost the others."""
    try:
        evaluate_model(record, model, quant, plan)
    except DiskFullError:  # not the candidate's fault: every model after it would fail the same way
        raise
    except Exception as error:  # noqa: BLE001 - one failing candidate must not cost the others
        if ctrl_c_pressed():  # Ctrl-C, turned into another error by a library: the user stops the run
            raise
        if not isinstance(error, GqaError):
            traceback.print_exc()
        record["error"] = str(error) if isinstance(error, GqaError) else f"{type(error).__name__}: {error}"
        kv = "" if quant is None else f" ({quant.name} KV)"
        errors.append(f"candidate {record['ref']}{kv}: {record['error']}")


def _numbers(value, path: str = ""):
    """(where, number) for every number in a result, metric standard errors left out (lm-eval writes NaN there
    when it cannot estimate one)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if "stderr" not in str(key):
                yield from _numbers(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def check_finite(record: dict, spec: OpenedModel) -> None:
    """A NaN or infinite perplexity or score means a broken model (a diverged run, overflow in its dtype), not a
    result: the model is marked failed instead of ok."""
    measured = {"perplexity": record.get("perplexity") or {},
                "tasks": {name: result.get("results", {}) for name, result in record["tasks"].items()}}
    for where, number in _numbers(measured):
        if not math.isfinite(number):
            raise EvaluationError(f"model {spec.ref}: {where} is {number}, not a finite number (a diverged or "
                                  "broken model, or overflow in --dtype)")


def rewrite_report(plan: EvaluationPlan, base: dict, candidates: list[dict]) -> EvaluationResult:
    """Rewrite the whole report from the results so far (each file replaced atomically by `report.write_report`)."""
    report = report_io.build_report(plan.settings(), base, candidates)
    cached = " (the results measured so far are cached)" if plan.cache.enabled else ""
    with full_disk_said("the report", plan.options.output, "free space there or choose another --output, then run "
                        f"the same command again{cached}"):
        files = report_io.write_report(report, plan.options.output)
    log(f"report written to {plan.options.output}")
    return EvaluationResult(report, tuple(files))


def run_report(options: EvalOptions) -> tuple[EvaluationResult, list[str]]:
    """Evaluate base and candidates and write the report; returns it (report.json's content and the files written)
    and the candidates' errors (empty: all went well). `gqa_uptrain.eval.evaluate` turns the errors into one
    EvaluationError."""
    labels = unique_labels([options.base, *options.models])
    base = open_model(options.base, labels[0])
    candidates = [open_model(ref, label) for ref, label in zip(options.models, labels[1:])]
    check_same_tokenizer(base, candidates)
    with tempfile.TemporaryDirectory(prefix="gqa-eval-tasks-") as staging:
        plan = make_plan(options, base, Path(staging))
        if plan.tasks:
            check_task_data(plan, [base, *candidates])
        first, *other_caches = plan.kv_caches
        base_model = LazyModel(base, plan)
        base_record = new_record(base, "base", first)
        try:
            evaluate_model(base_record, base_model, first, plan)
        except BaseException:
            base_model.release()
            raise
        records: list[dict] = []
        errors: list[str] = []
        report = rewrite_report(plan, base_record, records)
        # the base with its other KV caches, then each candidate with every one: weights loaded once per model
        runs = [(base_model, other_caches)] + [(LazyModel(spec, plan), plan.kv_caches) for spec in candidates]
        for model, quants in runs:
            for quant in quants:
                records.append(record := new_record(model.spec, "candidate", quant))
                evaluate_candidate(record, model, quant, plan, errors)
                report = rewrite_report(plan, base_record, records)
            model.release()
    print(report_io.markdown(report.report, images=[]))
    return report, errors

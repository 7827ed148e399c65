"""A calibrated conversion: layer by layer, fit the grouped K/V projections to what the heads compute.

For each decoder layer, on calibration text (see `fit.py` for the algebra):
1. run the original layer on the original model's hidden states, collecting the second moment of the attention
   input and the attention block's output;
2. choose which KV heads share a group (least key loss), fit one shared key per group and pair (absorbing each
   head's complex scale into its queries; dims that partial rotary leaves unrotated take a map instead, and
   interleaved pairs are fitted as halves after a permutation: `rotary.py`) and one shared value (absorbing each
   head's map into o_proj);
3. fit a softmax temperature per query head (KL to the original attention on a few sequences), absorbed into
   q_proj;
4. refit o_proj by ridge regression so the converted block, fed the converted model's own hidden states, matches
   the original block's output (a layer-wise correction, as GPTQ-style quantizers proceed), kept only when it
   lowers the error on held-out calibration sequences;
5. refine q/k/v/o by gradient descent so the converted layer reproduces the original layer's output
   (`refine.py`), kept only when held-out sequences say it helps;
6. keep the layer (`store.py`), as the output will store it, and run it as kept to get the next layer's converted
   hidden states: the next layer is fitted to what the converted model will compute, rounding to the output dtype
   included, and a run that resumes after this layer replays exactly what this one would have gone on with.
A hybrid's layers without attention (short convolutions, Mamba layers) are not fitted: both hidden-state streams
run through them unchanged, and their record says so.
Only q_proj, k_proj, v_proj (or a fused qkv_proj, Falcon's query_key_value: `fused.py`), o_proj (Phi and Falcon:
dense, LFM2: out_proj) and OLMo-2's q/k norm weights change; the output is still a plain checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PretrainedConfig

from gqa_uptrain.convert.calibration import fit, refine
from gqa_uptrain.convert.calibration.keys import (KeyFitter, PooledKeys, QKNorms, fallback, find_norms,
                                                  pooled_key_norms)
from gqa_uptrain.convert.calibration.fused import QKV, fuse_qkv, fused_name, split_qkv
from gqa_uptrain.convert.calibration.layers import (Embedder, attention_name, attention_of, capture_attention,
                                                    decoder_layers, has_attention, materialize, output_name,
                                                    output_projection, run_layer, skeleton)
from gqa_uptrain.convert.calibration.rotary import RotaryLayout, rotary_layout
from gqa_uptrain.cli import warn
from gqa_uptrain.convert.calibration.data import Calibration, calibration_tokens
from gqa_uptrain.convert.calibration.store import LayerStore
from gqa_uptrain.convert.calibration.source import SourceReader, source_reader
from gqa_uptrain.convert.checkpoint_reader import CheckpointReader
from gqa_uptrain.errors import CalibrationError, CheckpointError
from gqa_uptrain.kv_heads import with_kv_heads

if TYPE_CHECKING:
    from gqa_uptrain.convert.plan import ConversionPlan

MAX_SEQUENCE_LENGTH = 512

TEMPERATURE_SEQUENCES = 4
HELD_OUT_SHARE = 8  # every 8th calibration sequence validates the o_proj refit


@dataclass(frozen=True)
class LayerReport:
    """What one layer's calibration chose and how close it came (relative error of the attention output)."""

    groups: list[tuple[int, ...]]
    error_absorbed: float  # held-out, converted input, before the refit
    error_final: float
    refit: bool
    refinement: refine.Refinement
    attention: bool = True  # False: a hybrid's layer without attention (a short convolution, Mamba), kept as it is


NO_ATTENTION = LayerReport([], math.nan, math.nan, False, refine.Refinement(0, math.nan, math.nan), attention=False)


@dataclass(frozen=True)
class _Weights:
    q: torch.Tensor  # augmented [rows, D'] float64
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor  # [D, H d]
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # q/k norm parameters that change, by attention name


def fit_checkpoint(plan: ConversionPlan, folder: Path, progress: bool = True) -> tuple[CheckpointReader, dict]:
    """Calibrate every layer of the plan's source; the fitted tensors are kept in `folder` (a `LayerStore`, in the
    source dtypes) for the writer to stream. Layers an earlier run of the same fit finished there are not fitted
    again. Returns the fitted checkpoint's reader and the provenance record."""
    options = plan.options
    source = source_reader(plan.config, plan.reader)  # a multimodal wrapper's language model alone
    config = source.names.config
    tokenizer = _tokenizer(plan.folder)
    length = min(MAX_SEQUENCE_LENGTH, getattr(config, "max_position_embeddings", None) or MAX_SEQUENCE_LENGTH)
    data = calibration_tokens(tokenizer, options.calibration, options.calibration_tokens, length, options.seed,
                              getattr(config, "vocab_size", None))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {step.output.name: step.output.dtype for step in plan.steps if step.fitted}
    layers = config.num_hidden_layers
    store = _open_store(folder, _identity(plan, data, dtypes), layers)
    with tqdm(total=layers, initial=len(store.reports), desc="calibrating layers", unit="layer",
              disable=not progress) as bar:
        def advance(i: int, report: LayerReport) -> None:
            refined = report.refinement.error_after if report.refinement.steps else math.nan
            if report.attention:
                bar.set_postfix(attention_error=f"{report.error_final:.3f}", refined_layer_error=f"{refined:.3f}")
            bar.update()

        try:
            reports = calibrate(config, source, plan.layout.groups, data.tokens, device,
                                _FittedLayers(store, source, dtypes), advance, options.refine_steps)
        except (CalibrationError, CheckpointError):  # a NaN: the same inputs would stop at the same layer again
            store.remove()
            raise
    record = {**data.record(options.seed), "layers": [
        {"groups": [list(g) for g in r.groups], "o_proj_refit": r.refit,
         "held_out_error": refine.recorded(r.error_final),
         "refinement": r.refinement.record()} if r.attention else {"attention": False} for r in reports]}
    return store.reader(), record


def _identity(plan: ConversionPlan, data: Calibration, dtypes: dict[str, torch.dtype]) -> dict:
    """Everything that decides the fitted layers: an earlier run's layers are reused only where all of it is the
    same. The calibration text counts by its token ids (not by its file's name); the source by its config and its
    weight files' names, sizes and modification times (hashing them would read the whole model first)."""
    files = {file.name: [file.stat().st_size, file.stat().st_mtime_ns] for file in plan.reader.files}
    tokens = {key: value for key, value in data.record(plan.options.seed).items() if key not in ("data", "seed")}
    return {"calibration": tokens, "seed": plan.options.seed, "refine_steps": plan.options.refine_steps,
            "groups": plan.layout.groups, "source_config": plan.config.to_dict(), "source_files": files,
            "dtypes": {name: str(dtype) for name, dtype in sorted(dtypes.items())}, "version": _version()}


def _version() -> str:
    try:
        return version("gqa-uptrain")
    except PackageNotFoundError:
        return "unknown"


def _open_store(folder: Path, identity: dict, layers: int) -> LayerStore:
    """The layer store, with one line when an earlier run's layers are reused or thrown away."""
    store, why = LayerStore.open(folder, identity, layers)
    if why is not None:
        warn("gqa-convert", f"removed {folder}: the layers an earlier run calibrated there were fitted with {why}; "
                            "calibrating from the first layer")
    done = len(store.reports)
    if done:
        first = "the first layer was" if done == 1 else f"the first {done} were"
        print(f"resuming calibration at layer {done + 1} of {layers} ({first} fitted by an earlier run, kept in "
              f"{folder})", flush=True)
    return store


def _tokenizer(folder: Path):
    """The source's tokenizer, or None when it has none (token-id calibration data still works)."""
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return None


class _FittedLayers:
    """The layer store seen from `calibrate`: parameters by the layer's own names (fp32) in, tensors by the
    checkpoint's names in the output dtypes kept, and back. What was kept is what the converted model computes with
    from then on, in this run and in one that resumes it alike."""

    def __init__(self, store: LayerStore, source: SourceReader, dtypes: dict[str, torch.dtype]):
        self.store, self.source, self.dtypes = store, source, dtypes

    @property
    def finished(self) -> list[LayerReport]:
        return [_report_from(state) for state in self.store.reports]

    def save(self, i: int, prefix: str, fitted: dict[str, torch.Tensor], report: LayerReport) -> None:
        named = {self.source.stored_name(f"{prefix}.{name}"): t for name, t in fitted.items()}
        named = {name: t.to("cpu", self.dtypes[name]).contiguous() for name, t in named.items() if name in self.dtypes}
        self.store.save(i, named, asdict(report))

    def load(self, i: int, prefix: str, layer: nn.Module) -> dict[str, torch.Tensor]:
        """Layer i's kept tensors, by `layer`'s parameter names."""
        saved = self.store.load(i)
        names = {name: self.source.stored_name(f"{prefix}.{name}") for name, _ in layer.named_parameters()}
        return {name: saved[stored] for name, stored in names.items() if stored in saved}


def _report_from(state: dict) -> LayerReport:
    """A LayerReport from its JSON form (`asdict`)."""
    return LayerReport(**{**state, "groups": [tuple(g) for g in state["groups"]],
                          "refinement": refine.Refinement(**state["refinement"])})


@torch.no_grad()
def calibrate(config: PretrainedConfig, reader: SourceReader, groups: int, tokens: torch.Tensor,
              device: torch.device, layers: _FittedLayers,
              progress: Callable[[int, LayerReport], None] = lambda i, r: None, refine_steps: int = 0
              ) -> list[LayerReport]:
    """Convert every decoder layer, keeping each in `layers` as it is finished; those an earlier run finished are
    only replayed (forward passes that advance both models' hidden states). `refine_steps` bounds each layer's
    gradient-descent refinement (0: the closed form alone)."""
    embedder = Embedder.build(config, reader, device)
    still = fit.still_share(embedder.inv_freq, tokens.shape[1]) if embedder.inv_freq is not None else None
    batch = _batch_size(tokens.shape[0])
    original = torch.cat([embedder(chunk.to(device)) for chunk in tokens.split(batch)])
    kwargs = embedder.kwargs  # per layer
    converted = original.clone()
    del embedder
    old_model, new_model = skeleton(config), skeleton(with_kv_heads(config, groups))
    prefix, old_layers = decoder_layers(old_model)
    _, new_layers = decoder_layers(new_model)
    reports = layers.finished
    resumed = len(reports)
    for i in range(len(old_layers)):
        old = materialize(old_layers[i], f"{prefix}.{i}", reader, device)
        name = f"{prefix}.{i}"
        if i < len(reports):
            _advance(old, original, kwargs[i], batch)
        elif not has_attention(old):  # nothing to fit: the same layer in both models, its (empty) record kept
            _advance(old, original, kwargs[i], batch)
            layers.save(i, name, {}, NO_ATTENTION)
            reports.append(NO_ATTENTION)
        else:
            report, new = _calibrate_layer(name, old, new_layers[i], original, converted, kwargs[i], batch, config,
                                           groups, still, refine_steps)
            where = attention_name(new)
            fitted = {f"{where}.{n}": p.detach() for n, p in attention_of(new).named_parameters()}
            _require_finite(name, "the fitted attention weights", *fitted.values())
            layers.save(i, name, fitted, report)
            reports.append(report)
        new = _with_weights(old, new_layers[i], layers.load(i, name, new_layers[i]))
        _advance(new, converted, kwargs[i], batch)
        old_layers[i], new_layers[i] = old.to("meta"), new.to("meta")
        if i >= resumed:
            progress(i, reports[i])
    return reports


def _advance(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, batch: int) -> None:
    """Run `layer` on `hidden`, in place: the next layer's input."""
    for start in range(0, hidden.shape[0], batch):
        hidden[start:start + batch] = run_layer(layer, hidden[start:start + batch], kwargs)


def _with_weights(old: nn.Module, new: nn.Module, kept: dict[str, torch.Tensor]) -> nn.Module:
    """The converted layer as kept: the fitted tensors where they were kept, the original's weights elsewhere."""
    new.to_empty(device=next(old.parameters()).device)
    for name, param in new.named_parameters():
        param.copy_(kept[name] if name in kept else old.get_parameter(name))
    return new


def _batch_size(sequences: int) -> int:
    return math.gcd(sequences, 8)


def _require_finite(layer: str, what: str, *tensors: torch.Tensor) -> None:
    """Stop at the first NaN or infinity: torch's solvers and eigendecompositions pass them on without a word, and
    the conversion would end in a model whose attention is all NaN. The source tensors are checked as they are
    read (`read_finite`), so what is caught here is fp32 overflow in the layer's own computation."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise CalibrationError(f"calibrating {layer}: {what} are not finite (NaN or infinite); nothing was written")


def _calibrate_layer(name: str, old: nn.Module, new: nn.Module, original: torch.Tensor, converted: torch.Tensor,
                     kwargs: dict, batch: int, config: PretrainedConfig, groups: int, still: torch.Tensor | None,
                     refine_steps: int) -> tuple[LayerReport, nn.Module]:
    attention = attention_of(old)
    projections = split_qkv(attention, config.num_attention_heads)
    with_bias = any(bias is not None for _, bias in projections.values())
    sigma, mean, target, sample = _original_pass(old, original, kwargs, batch, with_bias)
    _require_finite(name, "the statistics of the original attention on the calibration text", sigma, mean, target)
    head_dim = attention.head_dim
    weights = _Weights(*(fit.augment(*projections[n], with_bias) for n in QKV),
                       output_projection(attention).weight.double())
    pooled = fallback(config, attention)  # nothing may move into the queries (keys.py): mean-pooled keys
    if pooled:
        keys, norms = PooledKeys(weights.k, head_dim), None
    else:
        norms = find_norms(attention, config.num_attention_heads, weights.k.shape[0] // head_dim)
        rotary = rotary_layout(attention, config)
        assert not isinstance(rotary, str), rotary  # support.py refuses the others before any work
        keys = KeyFitter(weights.q, weights.k, sigma, rotary, mean, still, norms)
    chosen, fitted, order = _fit_groups(weights, keys, sigma, groups, head_dim, config.num_attention_heads, norms,
                                        pooled_values=bool(pooled and pooled.values))
    if pooled:
        fitted = replace(fitted, norms=pooled_key_norms(attention, groups))
    elif norms is None:  # a query norm would divide a temperature out of q_proj again (keys.py)
        tau = _temperatures(weights, fitted, order, sample, kwargs, attention, rotary, config)
        fitted = replace(fitted, q=fitted.q * tau.repeat_interleave(head_dim)[:, None])
    new = _install(old, new, fitted, with_bias)
    o_proj, before, after, refit = _refit_output(new, converted, target, kwargs, batch)
    with torch.no_grad():
        output_projection(attention_of(new)).weight.copy_(o_proj)
    goal = original if refine.OBJECTIVE == "layer" else target  # `original` now holds the original layer's output
    refinement = refine.refine_layer(new, converted, goal, kwargs, batch, refine_steps, HELD_OUT_SHARE)
    return LayerReport(chosen, before, after, refit, refinement), new


def _original_pass(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, batch: int, with_bias: bool
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Second moment and mean of the attention input, the attention output per token, and a few sequences'
    inputs.

    `hidden` is advanced in place to the layer's output (the next layer's original input).
    """
    sigma, total, outputs, count = None, None, [], 0
    for start in range(0, hidden.shape[0], batch):
        with capture_attention(attention_of(layer)) as seen:
            hidden[start:start + batch] = run_layer(layer, hidden[start:start + batch], kwargs)
        x = _with_ones(seen["input"], with_bias).double().flatten(0, 1)
        sigma = x.T @ x if sigma is None else sigma + x.T @ x
        total = x.sum(0) if total is None else total + x.sum(0)
        count += x.shape[0]
        bias = output_projection(attention_of(layer)).bias
        outputs.append(seen["output"] - bias if bias is not None else seen["output"])  # what o_proj's weight makes
        if start == 0:
            sample = seen["input"][:TEMPERATURE_SEQUENCES]
    return sigma / count, total / count, torch.cat(outputs), sample


def _with_ones(x: torch.Tensor, with_bias: bool) -> torch.Tensor:
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1) if with_bias else x


def _fit_groups(w: _Weights, keys: KeyFitter | PooledKeys, sigma: torch.Tensor, groups: int, head_dim: int,
                query_heads: int, norms: QKNorms | None, pooled_values: bool = False
                ) -> tuple[list[tuple[int, ...]], _Weights, torch.Tensor]:
    """Grouping, shared keys and values, the absorbed query and output weights (and q/k norm weights where a
    whole-projection norm changes) in the new head order, and which original query head each new one is.
    `pooled_values`: each group's values are its mean value rows, as --method mean makes them (clip_qkv clips the
    values, so no map may be absorbed into o_proj)."""
    kv_heads = w.k.shape[0] // head_dim
    per_family = query_heads // kv_heads
    chosen = keys.choose(kv_heads, groups)
    q_rows, q_norms, k_rows, k_norms, v_rows, o_cols, order = [], [], [], [], [], [], []
    o_heads = w.o.reshape(w.o.shape[0], query_heads, head_dim)
    for group in chosen:
        shared = keys.fit(group)
        if pooled_values:
            identity = torch.eye(head_dim, dtype=w.o.dtype, device=w.o.device)
            shared_v, maps = fit.mean_rows(w.v, group, head_dim), identity.expand(len(group), -1, -1)
        else:
            shared_v, maps = fit.fit_values(w.v, w.o, sigma, group, head_dim, per_family)
        k_rows.append(shared.rows)
        k_norms.append(shared.norm)
        v_rows.append(shared_v)
        for i, (family, value_map) in enumerate(zip(group, maps)):
            for j in range(family * per_family, (family + 1) * per_family):
                rows = slice(j * head_dim, (j + 1) * head_dim)
                q, q_norm = keys.queries(shared, i, w.q[rows], None if norms is None else norms.q[rows])
                q_rows.append(q)
                q_norms.append(q_norm)
                o_cols.append(fit.absorb_into_output(o_heads[:, j], value_map))
                order.append(j)
    changed = {}
    if norms is not None and norms.kind == "whole":
        changed = {"q_norm.weight": norms.stored(torch.cat(q_norms)),
                   "k_norm.weight": norms.stored(torch.cat(k_norms))}
    fitted = _Weights(torch.cat(q_rows), torch.cat(k_rows), torch.cat(v_rows), torch.cat(o_cols, 1), changed)
    return chosen, fitted, torch.tensor(order)


def _temperatures(old: _Weights, new: _Weights, order: torch.Tensor, sample: torch.Tensor, kwargs: dict,
                  attention: nn.Module, rotary: RotaryLayout, config: PretrainedConfig) -> torch.Tensor:
    """One softmax temperature per new query head, fitted to the original attention pattern."""
    x = _with_ones(sample, old.q.shape[1] > sample.shape[-1]).float()
    table = kwargs.get("position_embeddings")  # None: no RoPE (GraniteMoeHybrid's NoPE layers)
    turns = [t[: x.shape[0]].float() if t.shape[0] > 1 else t.float() for t in table] if table is not None else None

    def logits(w: _Weights, order: torch.Tensor) -> torch.Tensor:
        q = _heads(x @ w.q.float().T, rotary.head_dim)[:, order]
        k = _heads(x @ w.k.float().T, rotary.head_dim)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)[:, order]  # query head j reads KV head j // (H / K)
        scores = fit.causal_logits(*(rotary.turn(q, k, *turns) if turns else (q, k))) * attention.scaling
        cap = getattr(config, "attn_logit_softcapping", None)
        return torch.tanh(scores / cap) * cap if cap else scores

    return fit.fit_temperature(logits(old, order), logits(new, torch.arange(len(order)))).double()


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, T, h d] -> [B, h, T, d]."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _install(old: nn.Module, new: nn.Module, w: _Weights, with_bias: bool) -> nn.Module:
    """The converted layer: the original's weights, with the fitted attention projections."""
    device = next(old.parameters()).device
    new.to_empty(device=device)
    attention, where = attention_of(old), attention_name(old)
    fitted = dict(zip(QKV, (w.q, w.k, w.v)))
    fused = fused_name(attention)
    if fused is not None:
        fitted[fused] = fuse_qkv(fused, w.q, w.k, w.v, attention.head_dim)
    output = f"{where}.{output_name(attention)}.weight"
    with torch.no_grad():
        for name, param in new.named_parameters():
            module, _, kind = name.rpartition(".")
            projection = module.rsplit(".", 1)[-1]
            if module.startswith(f"{where}.") and projection in fitted:
                weight, bias = fit.split_bias(fitted[projection], with_bias)
                param.copy_(weight if kind == "weight" else bias)
            elif name == output:
                param.copy_(w.o)
            elif name.removeprefix(f"{where}.") in w.norms:
                param.copy_(w.norms[name.removeprefix(f"{where}.")])
            else:
                param.copy_(old.get_parameter(name))
    return new


def _refit_output(layer: nn.Module, converted: torch.Tensor, target: torch.Tensor, kwargs: dict, batch: int
                  ) -> tuple[torch.Tensor, float, float, bool]:
    """Ridge-refitted o_proj (or the absorbed one), and the held-out relative error before and after."""
    prior = output_projection(attention_of(layer)).weight.double()
    size = prior.shape[1]
    stats = {part: [torch.zeros(size, size, dtype=torch.float64, device=prior.device),
                    torch.zeros(size, prior.shape[0], dtype=torch.float64, device=prior.device), 0.0]
             for part in ("fit", "held")}
    for start in range(0, converted.shape[0], batch):
        with capture_attention(attention_of(layer), stop_at_output_projection=True) as seen:
            run_layer(layer, converted[start:start + batch], kwargs)
        for s in range(seen["heads"].shape[0]):
            part = "held" if (start + s) % HELD_OUT_SHARE == HELD_OUT_SHARE - 1 else "fit"
            a, y = seen["heads"][s].double(), target[start + s].double()
            stats[part][0] += a.T @ a
            stats[part][1] += a.T @ y
            stats[part][2] += float((y * y).sum())
    (gram, cross, _), (held_gram, held_cross, held_target) = stats["fit"], stats["held"]
    if held_target == 0:  # too few sequences to hold any out: keep the absorbed projection
        return prior.float(), math.nan, math.nan, False
    weight = fit.refit_output(gram, cross, prior, held_gram, held_cross, held_target)

    def error(w):
        return math.sqrt(max(0.0, float(torch.einsum("ij,ki,kj->", held_gram, w, w)
                                        - 2 * torch.einsum("ik,ki->", held_cross, w) + held_target)) / held_target)

    return weight.float(), error(prior), error(weight), weight is not prior

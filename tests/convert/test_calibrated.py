"""--method calibrated: exact where the heads allow it, better than mean pooling on a trained model, and either
converting or refusing every covered architecture (tiny fp32 models, CPU)."""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from gqa_uptrain.convert import convert_checkpoint
from gqa_uptrain.convert.calibration import fit
from gqa_uptrain.convert.calibration.fused import QKV, fuse_qkv, fused_name, split_rows
from gqa_uptrain.convert.calibration.keys import norm_kind
from gqa_uptrain.convert.calibration.layers import (Embedder, attention_name, attention_of, decoder_layers,
                                                    first_attention, layer_output, output_name, run_layer)
from gqa_uptrain.convert.calibration.source import source_reader
from gqa_uptrain.convert.calibration.rotary import rotary_layout
from gqa_uptrain.convert.checkpoint_reader import CheckpointReader
from gqa_uptrain.errors import UnsupportedModelError
from gqa_uptrain.kv_heads import kv_heads_of
from gqa_uptrain.provenance import read_provenance
from tiny_models import (ARCHITECTURES, HYBRID, MULTIMODAL, QUERY_HEADS, VOCAB, logits, own_keys, random_model,
                         repeat_kv_heads, write_token_rows)

HEAD_DIM = 16
HIDDEN = 64


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    """Token-id rows (the tiny models have no tokenizer): 4,096 random tokens."""
    path = tmp_path_factory.mktemp("calibration") / "ids.jsonl"
    write_token_rows(path, 256)
    return path


def convert(source: Path, groups: int, out: Path, data: Path, tokens: int = 1024) -> Path:
    return convert_checkpoint(source, groups, out, method="calibrated", calibration=str(data),
                              calibration_tokens=tokens, progress=False).output


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-3 * b.abs().max())


def _pairs(rows: torch.Tensor) -> torch.Tensor:
    """[r, D] turned head rows (canonical order) -> [r/2, D] complex pairs (i, i + r/2)."""
    half = rows.shape[0] // 2
    return torch.complex(rows[:half], rows[half:])


def _unpairs(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z.real, z.imag])


def disguised_copies(small, kv_heads: int, permutation: list[int] | None = None, seed: int = 0):
    """An MHA model computing exactly what the GQA `small` computes, whose copies of a KV head differ.

    Copy h of a head scales each key pair RoPE turns by a complex c (queries by 1/conj(c), so q.k is unchanged under
    RoPE), maps the dims it leaves unrotated (partial rotary) by an invertible B (queries by B^-T), and maps its
    values by an invertible A (o_proj columns by A^-1). Mean pooling cannot undo that; the calibrated fit can. Pairs
    are taken as the model's own rotary module pairs them (`rotary.py`), biases with their rows, fused projections
    split and fused back in their own layout (`fused.py`). `permutation` also reorders the heads, so the copies are
    no longer neighbours.
    """
    big = repeat_kv_heads(small, kv_heads)
    assert big.config.num_attention_heads == kv_heads  # one query head per KV head
    g = torch.Generator().manual_seed(seed)
    state = big.state_dict()
    order = permutation or list(range(kv_heads))
    prefix, layers = decoder_layers(big)
    attention, where = attention_of(layers[0]), attention_name(layers[0])
    rotary, output, fused = rotary_layout(attention, big.config), output_name(attention), fused_name(attention)
    r, passed = rotary.rotary, rotary.passed
    for layer in range(big.config.num_hidden_layers):
        p = f"{prefix}.{layer}.{where}."
        q, k, v = (split_rows(_with_bias(state, p + fused), fused, kv_heads * HEAD_DIM, HEAD_DIM) if fused else
                   (_with_bias(state, p + n) for n in QKV))
        q, k, o = rotary.canonical(q), rotary.canonical(k), state[p + output + ".weight"].clone()
        new = {n: torch.empty_like(t) for n, t in (("q", q), ("k", k), ("v", v), ("o", o))}
        for slot, h in enumerate(order):
            rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            to = slice(slot * HEAD_DIM, (slot + 1) * HEAD_DIM)
            c = torch.polar(torch.rand(r // 2, generator=g) + 0.5, torch.rand(r // 2, generator=g) * 2 * math.pi)
            a = torch.eye(HEAD_DIM) + 0.3 * torch.randn(HEAD_DIM, HEAD_DIM, generator=g)
            b = torch.eye(passed) + 0.3 * torch.randn(passed, passed, generator=g)
            new["k"][to] = torch.cat([_unpairs(c[:, None] * _pairs(k[rows][:r])), b @ k[rows][r:]])
            new["q"][to] = torch.cat([_unpairs(_pairs(q[rows][:r]) / c.conj()[:, None]),
                                      torch.linalg.inv(b).T @ q[rows][r:]])
            new["v"][to] = a @ v[rows]
            new["o"][:, to] = o[:, rows] @ torch.linalg.inv(a)
        new["q"], new["k"] = rotary.restore(new["q"]), rotary.restore(new["k"])
        rows = {fused: fuse_qkv(fused, new["q"], new["k"], new["v"], HEAD_DIM)} if fused else \
            {f"{n}_proj": new[n] for n in ("q", "k", "v")}
        for name, tensor in rows.items():
            state[p + f"{name}.weight"] = tensor[:, :HIDDEN]
            if p + f"{name}.bias" in state:
                state[p + f"{name}.bias"] = tensor[:, HIDDEN]
        state[p + output + ".weight"] = new["o"]
    big.load_state_dict(state)
    return big


def _with_bias(state: dict, projection: str) -> torch.Tensor:
    """A projection's weight with its bias (if any) as one more column."""
    weight = state[projection + ".weight"]
    bias = state.get(projection + ".bias")
    return weight.clone() if bias is None else torch.cat([weight, bias[:, None]], 1)


def tiny_llama(kv_heads: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=HEAD_DIM,
                         max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(("kv_heads", "groups"), [(4, 2), (4, 1), (2, 1)])
def test_identical_heads_convert_without_loss(kv_heads, groups, tmp_path, tokens, calibration):
    big = repeat_kv_heads(tiny_llama(groups, seed=1), kv_heads)
    big.save_pretrained(tmp_path / "src")
    out = convert(tmp_path / "src", groups, tmp_path / "out", calibration)
    assert close(logits(out, tokens), logits(tmp_path / "src", tokens))


@pytest.mark.parametrize("permutation", [None, [0, 2, 1, 3], [3, 0, 2, 1]])
def test_rotated_and_permuted_copies_convert_without_loss(permutation, tmp_path, tokens, calibration):
    """Heads that are per-pair complex rescalings of one another, in any order: lossless, where mean is not."""
    source = tmp_path / "src"
    disguised_copies(tiny_llama(2, seed=2), 4, permutation).save_pretrained(source)
    expected = logits(source, tokens)
    out = convert(source, 2, tmp_path / "out", calibration)
    assert close(logits(out, tokens), expected)
    mean = convert_checkpoint(source, 2, tmp_path / "mean", method="mean", progress=False).output
    assert not close(logits(mean, tokens), expected)
    groups = read_provenance(out)["conversion"]["calibration"]["layers"][0]["groups"]
    pairs = [[(permutation or [0, 1, 2, 3])[h] // 2 for h in group] for group in groups]
    assert all(len(set(p)) == 1 for p in pairs)  # each group holds the copies of one original head


def test_regrouping_and_absorbed_scales_keep_logits(tokens):
    """The freedoms the method uses are no-ops on the function: reordering heads (query rows, o_proj columns and
    KV heads together) and moving a per-pair complex scale from keys into queries (and a map from values into
    o_proj). A model disguised that way computes what the original computes."""
    model = tiny_llama(4, seed=3)
    assert close(logits(disguised_copies(tiny_llama(4, seed=3), 4, [2, 0, 3, 1]), tokens), logits(model, tokens))
    assert close(logits(disguised_copies(tiny_llama(4, seed=3), 4), tokens), logits(model, tokens))


def test_same_head_count_changes_nothing(tmp_path, tokens, calibration):
    tiny_llama(4, seed=4).save_pretrained(tmp_path / "src")
    out = convert(tmp_path / "src", 4, tmp_path / "out", calibration)
    assert torch.equal(logits(out, tokens), logits(tmp_path / "src", tokens))


def test_temperature_recovers_a_scaled_pattern():
    logits_ = torch.randn(2, 3, 8, 8, dtype=torch.float64).tril() * 3
    mask = torch.ones(8, 8, dtype=torch.bool).triu(1)
    original = logits_.masked_fill(mask, float("-inf"))
    tau = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    flattened = original / tau[None, :, None, None]
    assert torch.allclose(fit.fit_temperature(original, flattened), tau, rtol=1e-2)


def test_output_refit_is_kept_only_when_held_out_text_improves():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64)
    truth = torch.randn(4, 6, generator=g, dtype=torch.float64)
    y = a @ truth.T
    prior = truth + 0.5
    fitted = fit.refit_output(a[:150].T @ a[:150], a[:150].T @ y[:150], prior, a[150:].T @ a[150:],
                              a[150:].T @ y[150:], float((y[150:] ** 2).sum()))
    assert (fitted - truth).abs().max() < 0.05
    exact = fit.refit_output(a[:150].T @ a[:150], a[:150].T @ y[:150], truth, a[150:].T @ a[150:],
                             a[150:].T @ y[150:], float((y[150:] ** 2).sum()))
    assert exact is truth


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES) + sorted(MULTIMODAL) + sorted(HYBRID))
def test_every_architecture_converts_or_is_refused_in_one_line(arch, tmp_path, tokens, calibration):
    small = random_model(arch, kv_heads=2, seed=1)
    repeat_kv_heads(small, 4).save_pretrained(tmp_path / "src")
    try:
        out = convert(tmp_path / "src", 2, tmp_path / "out", calibration)
    except UnsupportedModelError as error:
        assert "\n" not in str(error) and "--method mean" in str(error)
        assert not (tmp_path / "out").exists()
        return
    assert close(logits(out, tokens), logits(small, tokens))
    assert kv_heads_of(AutoConfig.from_pretrained(out)) == 2  # a wrapper's under text_config


def train_briefly(model_type: str, folder: Path, shared_data: Path, **config: object
                  ) -> tuple[Path, Path, torch.Tensor]:
    """An 8-head model trained briefly on Shakespeare's characters: its heads differ, as a real model's do.
    Returns the model folder, calibration rows (token ids from the first 80% of the text) and held-out rows.
    `config`: settings beyond the tiny shape (e.g. qk_layernorm=True)."""
    data = torch.tensor(list((shared_data / "tinyshakespeare.txt").read_bytes()[:400_000])).clamp(max=127)
    rows = data[: len(data) // 64 * 64].view(-1, 64)
    train, held = rows[: int(len(rows) * 0.8)], rows[int(len(rows) * 0.8):][:64]
    (folder / "calibration.jsonl").write_text("".join(json.dumps({"input_ids": r.tolist()}) + "\n" for r in train))
    torch.manual_seed(0)
    sizes = own_keys(model_type, dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=8, head_dim=8,
                                      max_position_embeddings=64, tie_word_embeddings=True))
    config = AutoConfig.for_model(model_type, **sizes, **config)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # Phi-3's defaults lie beyond 128 tokens
        if (getattr(config, key, None) or 0) >= config.vocab_size:
            setattr(config, key, None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = train[torch.randint(0, len(train), (16,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder / "model")
    return folder / "model", folder / "calibration.jsonl", held


def losses_at_two_kv_heads(model_type: str, folder: Path, shared_data: Path, **config: object
                           ) -> tuple[float, float, float]:
    """Held-out loss of a briefly trained 8-head model (`train_briefly`), of its mean-pooled conversion to 2 KV heads
    and of its calibrated one (4,096 calibration tokens)."""
    model, text, rows = train_briefly(model_type, folder, shared_data, **config)
    mean = convert_checkpoint(model, 2, folder / "mean", method="mean", progress=False).output
    calibrated = convert(model, 2, folder / "calibrated", text, tokens=4096)
    return tuple(held_out_loss(f, rows) for f in (model, mean, calibrated))


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory, shared_data) -> tuple[Path, Path, torch.Tensor]:
    return train_briefly("llama", tmp_path_factory.mktemp("trained"), shared_data)


def held_out_loss(folder: Path, rows: torch.Tensor) -> float:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=rows, labels=rows).loss.item()


@pytest.mark.parametrize("groups", [4, 2, 1])
def test_calibrated_beats_mean_pooling_on_a_trained_model(groups, trained_llama, tmp_path):
    model, text, rows = trained_llama
    mean = convert_checkpoint(model, groups, tmp_path / "mean", method="mean", progress=False).output
    calibrated = convert(model, groups, tmp_path / "calibrated", text, tokens=4096)
    original, pooled, fitted = (held_out_loss(f, rows) for f in (model, mean, calibrated))
    assert original < fitted < pooled
    assert (pooled - fitted) > 0.5 * (pooled - original)  # most of mean pooling's gap is closed


def test_refinement_lowers_each_refined_layers_held_out_error_and_the_model_loss(trained_llama, tmp_path, capsys):
    model, text, rows = trained_llama
    closed = convert_checkpoint(model, 1, tmp_path / "closed", method="calibrated", calibration=str(text),
                                calibration_tokens=4096, refine_steps=0, progress=False).output
    refined = convert(model, 1, tmp_path / "refined", text, tokens=4096)
    layers = {name: read_provenance(f)["conversion"]["calibration"]["layers"]
              for name, f in (("closed", closed), ("refined", refined))}
    assert all(layer["refinement"]["steps"] == 0 for layer in layers["closed"])
    kept = [layer["refinement"] for layer in layers["refined"] if layer["refinement"]["steps"]]
    assert kept and all(r["held_out_error_after"] < r["held_out_error_before"] for r in kept)
    assert held_out_loss(refined, rows) < held_out_loss(closed, rows)
    printed = capsys.readouterr().out
    assert "relative error of each layer's attention output on held-out calibration sequences" in printed
    assert f"refinement: kept in {len(kept)} of 2 layers" in printed


def test_refinement_keeps_an_exact_closed_form(tmp_path, tokens, calibration):
    small = tiny_llama(2, seed=3)
    repeat_kv_heads(small, 4).save_pretrained(tmp_path / "src")
    out = convert(tmp_path / "src", 2, tmp_path / "out", calibration)
    assert all(layer["refinement"]["steps"] == 0
               for layer in read_provenance(out)["conversion"]["calibration"]["layers"])
    assert close(logits(out, tokens), logits(tmp_path / "src", tokens))


def test_a_relative_calibration_path_is_a_file_not_a_hub_id(tmp_path, calibration, monkeypatch):
    from gqa_uptrain.convert.calibration.data import calibration_tokens

    monkeypatch.chdir(calibration.parent.parent)
    relative = Path(calibration.parent.name) / calibration.name
    assert calibration_tokens(None, str(relative), 512, 64).tokens.shape == (8, 64)


def test_a_seed_gives_one_result(tmp_path, calibration):
    disguised_copies(tiny_llama(2, seed=5), 4).save_pretrained(tmp_path / "src")
    a = convert(tmp_path / "src", 1, tmp_path / "a", calibration)
    b = convert(tmp_path / "src", 1, tmp_path / "b", calibration)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert read_provenance(a)["conversion"] == read_provenance(b)["conversion"]


@pytest.mark.parametrize(("args", "message"), [
    (["--calibration", "x.txt"], "apply to --method calibrated only"),
    (["--method", "calibrated", "--calibration", "/nonexistent/*.txt"], "matches no file"),
    (["--method", "calibrated", "--calibration-tokens", "0"], "must be positive"),
    (["--method", "calibrated", "--calibration", "TOO_SHORT", "--calibration-tokens", "100000"], "are needed"),
    (["--refine-steps", "10"], "apply to --method calibrated only"),
    (["--method", "calibrated", "--refine-steps", "-1"], "must be 0 (no refinement) or more"),
])
def test_bad_calibration_input_is_one_line_and_writes_nothing(args, message, tmp_path, calibration, capsys):
    from gqa_uptrain.convert.cli import main

    tiny_llama(4, seed=6).save_pretrained(tmp_path / "src")
    args = [str(calibration) if a == "TOO_SHORT" else a for a in args]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "src"), "--groups", "2", "--output", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and message in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_rotation_shares_stay_on_the_tables_device():
    """The fit runs on the GPU there is one: a table on another device than the CPU must not meet CPU tensors
    (the meta device stands in for a GPU here)."""
    assert fit.still_share(torch.ones(4, device="meta"), 8).device.type == "meta"
    still = fit.still_share(torch.tensor([0.0, 1e-4, 3.0]), 16)
    assert still[0] == 1 and still[1] > 0.99 and still[2] < 0.1


# Architectures whose attention the calibrated fits model beyond plain q/k/v/o (q/k norms: keys.py; a fused qkv_proj,
# or Falcon's query_key_value, KV head by KV head, under self_attention, beside its MLP: fused.py; partial rotary
# (StableLM, Phi) and interleaved pairs (Helium): rotary.py): they must convert, never be refused, and exactly where
# the heads are copies.
BEYOND_PLAIN = ["qwen3", "gemma3_text", "olmo2", "phi3", "stablelm", "helium", "phi", "falcon"]

# Hybrids: their layers without attention (LFM2's short convolutions, GraniteMoeHybrid's Mamba layers, whose attention
# has no RoPE) run unchanged in both models; the attention layers are fitted as any other's.
HYBRIDS = sorted(HYBRID)

# The tiny table's StableLM has q/k LayerNorms, under which the keys are pooled, not fitted (keys.py): here it has
# none, so that the key fits through its partial rotary are tested.
WITHOUT_QK_LAYERNORM = {"stablelm": {}}


def plain_model(arch: str, kv_heads: int, seed: int, monkeypatch) -> torch.nn.Module:
    """`random_model`, with the architecture's tiny config as the calibrated fits model it."""
    if arch in WITHOUT_QK_LAYERNORM:
        monkeypatch.setitem(ARCHITECTURES, arch, WITHOUT_QK_LAYERNORM[arch])
    return random_model(arch, kv_heads=kv_heads, seed=seed)


@pytest.mark.parametrize("groups", [2, 1])
@pytest.mark.parametrize("arch", BEYOND_PLAIN + HYBRIDS)
def test_identical_heads_convert_without_loss_beyond_plain_attention(arch, groups, tmp_path, tokens, calibration,
                                                                     monkeypatch):
    small = plain_model(arch, groups, 1, monkeypatch)
    repeat_kv_heads(small, 4).save_pretrained(tmp_path / "src")
    out = convert(tmp_path / "src", groups, tmp_path / "out", calibration)
    assert close(logits(out, tokens), logits(small, tokens))


@pytest.mark.parametrize("arch", BEYOND_PLAIN + HYBRIDS)
def test_same_head_count_changes_nothing_beyond_plain_attention(arch, tmp_path, tokens, calibration, monkeypatch):
    plain_model(arch, 4, 4, monkeypatch).save_pretrained(tmp_path / "src")
    out = convert(tmp_path / "src", 4, tmp_path / "out", calibration)
    assert torch.equal(logits(out, tokens), logits(tmp_path / "src", tokens))


@pytest.mark.parametrize("arch", HYBRIDS)
def test_a_hybrids_layers_without_attention_are_recorded_as_such(arch, tmp_path, calibration):
    repeat_kv_heads(random_model(arch, kv_heads=2, seed=1), 4).save_pretrained(tmp_path / "src")
    layers = read_provenance(convert(tmp_path / "src", 2, tmp_path / "out", calibration))["conversion"][
        "calibration"]["layers"]
    assert layers[0] == {"attention": False} and all(len(layer["groups"]) == 2 for layer in layers[1:])


@pytest.mark.parametrize("arch", ["gemma3_text", *HYBRIDS])
def test_each_layer_runs_with_the_keyword_arguments_of_its_kind(arch, tmp_path, monkeypatch):
    """Run one at a time on what the Embedder caught, the layers compute what the model's own forward does: Gemma 3's
    full attention layers turn by another rotary table and see another mask than its sliding ones, and a hybrid's
    convolution or Mamba layers take arguments of their own."""
    if arch == "gemma3_text":
        monkeypatch.setitem(ARCHITECTURES, arch, {"sliding_window": 4,
                                                  "layer_types": ["sliding_attention", "full_attention"]})
    model = random_model(arch, kv_heads=2, seed=1)
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    _, layers = decoder_layers(model)
    outputs = []
    handles = [layer.register_forward_hook(lambda module, args, output: outputs.append(layer_output(output)))
               for layer in layers]
    model(ids)
    for handle in handles:
        handle.remove()
    reader = source_reader(model.config, CheckpointReader(tmp_path))
    embedder = Embedder.build(model.config, reader, torch.device("cpu"))
    hidden = embedder(ids)
    for layer, kwargs, expected in zip(layers, embedder.kwargs, outputs, strict=True):
        hidden = run_layer(layer, hidden, kwargs)
        assert close(hidden, expected)


@pytest.mark.parametrize("arch", ["stablelm", "helium", "phi", "falcon"])
def test_disguised_copies_convert_without_loss_under_partial_and_interleaved_rotary(arch, tmp_path, tokens,
                                                                                    calibration, monkeypatch):
    """Copies whose turned pairs are complex rescalings and whose unrotated dims are invertible maps of one
    another, paired as the model's own RoPE pairs them: lossless in closed form, where mean pooling is not. Falcon:
    the copies are not neighbours, so the fit regroups the query heads, which its fused projection (one block per
    KV head) must hold in their new order."""
    small = plain_model(arch, 2, 2, monkeypatch)
    source = tmp_path / "src"
    disguised_copies(small, 4, [0, 2, 1, 3]).save_pretrained(source)
    expected = logits(small, tokens)
    assert close(logits(source, tokens), expected)  # the disguise itself keeps the function
    out = convert_checkpoint(source, 2, tmp_path / "out", method="calibrated", calibration=str(calibration),
                             calibration_tokens=1024, refine_steps=0, progress=False).output
    assert close(logits(out, tokens), expected)
    mean = convert_checkpoint(source, 2, tmp_path / "mean", method="mean", progress=False).output
    assert not close(logits(mean, tokens), expected)


@pytest.mark.parametrize("groups", [2, 1])
def test_identical_heads_convert_without_loss_under_alibi(groups, tmp_path, tokens, calibration, monkeypatch, capsys):
    """Falcon's ALiBi biases go by query head, so the query heads keep their order and the keys are pooled."""
    monkeypatch.setitem(ARCHITECTURES, "falcon", {**ARCHITECTURES["falcon"], "alibi": True})
    small = random_model("falcon", kv_heads=groups, seed=1)
    repeat_kv_heads(small, 4).save_pretrained(tmp_path / "src")
    out = convert(tmp_path / "src", groups, tmp_path / "out", calibration)
    assert close(logits(out, tokens), logits(small, tokens))
    assert ("note: --method calibrated: falcon adds ALiBi biases by query head, so the query heads keep their order "
            "and each group's keys are mean-pooled") in capsys.readouterr().out


@pytest.mark.slow
def test_calibrated_beats_mean_pooling_under_alibi(tmp_path, shared_data):
    original, pooled, fitted = losses_at_two_kv_heads("falcon", tmp_path, shared_data, new_decoder_architecture=True,
                                                      alibi=True)
    assert original < fitted < pooled


def test_partial_rotary_inside_the_rotary_function_converts_without_loss(tmp_path, tokens, calibration, monkeypatch):
    """Phi-3's apply_rotary_pos_emb turns only as many dims as its table has (Phi-4-mini: partial_rotary_factor
    0.75), where StableLM and Phi cut q/k themselves: the pairing probe sees both."""
    monkeypatch.setitem(ARCHITECTURES, "phi3", {"partial_rotary_factor": 0.5})
    small = random_model("phi3", kv_heads=2, seed=1)
    repeat_kv_heads(small, 4).save_pretrained(tmp_path / "src")
    assert rotary_layout(decoder_layers(small)[1][0].self_attn, small.config).rotary == HEAD_DIM // 2
    out = convert(tmp_path / "src", 2, tmp_path / "out", calibration)
    assert close(logits(out, tokens), logits(small, tokens))


def test_the_rotary_pairing_is_read_from_the_module():
    """Halves (Llama), halves within the first quarter (StableLM's partial rotary), interleaved (Helium); Cohere
    interleaves its table as well, a layout the probe does not take for either."""
    def layout(arch):
        model = random_model(arch, kv_heads=4)
        return rotary_layout(decoder_layers(model)[1][0].self_attn, model.config)

    assert layout("llama").order.tolist() == list(range(16)) and layout("llama").rotary == 16
    assert layout("stablelm").order.tolist() == list(range(16)) and layout("stablelm").rotary == 4
    assert layout("helium").order.tolist() == [*range(0, 16, 2), *range(1, 16, 2)]
    assert isinstance(layout("cohere"), str)


def normed_disguise(big, kv_heads: int, seed: int = 0):
    """Copies that still compute the same under q/k norms, yet differ: under per-head norms (Qwen3) the second copy
    of each head negates its key rows and its queries' rows; under a whole-projection norm (OLMo-2) it scales each
    key pair's k_norm entries by a real s_p and its queries' q_norm entries by 1 / s_p. Mean pooling cannot undo
    either (a negated copy averages to nothing); the calibrated fit must (keys.py)."""
    g = torch.Generator().manual_seed(seed)
    state = big.state_dict()
    per_family = QUERY_HEADS // kv_heads
    for layer in range(big.config.num_hidden_layers):
        p = f"model.layers.{layer}.self_attn."
        for h in range(1, kv_heads, 2):
            keys, queries = slice(h * 16, (h + 1) * 16), slice(h * per_family * 16, (h + 1) * per_family * 16)
            if state[p + "k_norm.weight"].shape[0] == 16:
                state[p + "k_proj.weight"][keys] *= -1
                state[p + "q_proj.weight"][queries] *= -1
            else:
                s = (torch.rand(8, generator=g) + 0.5) * torch.where(torch.rand(8, generator=g) < 0.5, -1.0, 1.0)
                state[p + "k_norm.weight"][keys] *= s.repeat(2)
                state[p + "q_norm.weight"][queries] /= s.repeat(2 * per_family)
    big.load_state_dict(state)
    return big


@pytest.mark.parametrize("arch", ["qwen3", "olmo2"])
def test_disguised_copies_convert_without_loss_under_qk_norms(arch, tmp_path, tokens, calibration):
    small = random_model(arch, kv_heads=2, seed=2)
    source = tmp_path / "src"
    normed_disguise(repeat_kv_heads(small, 4), 4).save_pretrained(source)
    expected = logits(small, tokens)
    assert close(logits(source, tokens), expected)  # the disguise itself keeps the function
    assert close(logits(convert(source, 2, tmp_path / "out", calibration), tokens), expected)
    mean = convert_checkpoint(source, 2, tmp_path / "mean", method="mean", progress=False).output
    assert not close(logits(mean, tokens), expected)


# What a trained architecture needs beyond its config's defaults (Falcon's defaults are Falcon-7B's old architecture,
# which cannot hold a KV-head count: the new one is Falcon-40B's).
TRAINED_AS = {"falcon": {"new_decoder_architecture": True}}


@pytest.mark.parametrize("arch", ["qwen3", "olmo2", "phi3", *(pytest.param(a, marks=pytest.mark.slow) for a in
                                                                ("stablelm", "helium", "phi", "gemma3_text",
                                                                 "mixtral", "falcon", "qwen2"))])
def test_calibrated_beats_mean_pooling_beyond_plain_attention(arch, tmp_path, shared_data):
    original, pooled, fitted = losses_at_two_kv_heads(arch, tmp_path, shared_data, **TRAINED_AS.get(arch, {}))
    assert original < fitted < pooled


@pytest.mark.parametrize("arch", ["lfm2", pytest.param("granitemoehybrid", marks=pytest.mark.slow)])
def test_calibrated_beats_mean_pooling_on_a_hybrid(arch, tmp_path, shared_data):
    """The tiny table's hybrid cut to two layers: a short convolution or Mamba layer, then an attention layer
    (GraniteMoeHybrid's experts and Mamba scan run transformers' reference code on the CPU: about 2 minutes)."""
    config = {**{key: value for key, value in HYBRID[arch].items() if key != "num_hidden_layers"},
              "layer_types": HYBRID[arch]["layer_types"][:2]}
    original, pooled, fitted = losses_at_two_kv_heads(arch, tmp_path, shared_data, **config)
    assert original < fitted < pooled


def test_the_default_text_is_shipped_books_that_no_evaluation_task_quotes(gpt2_tokenizer):
    from gqa_uptrain.convert.calibration.data import DEFAULT_DATA, calibration_tokens, shipped_books

    books = "\n".join(shipped_books())
    assert len(books) > 1_500_000  # room for the 262,144 tokens a 7B benchmark calibrates on
    tasks = Path(__file__).parents[2] / "eval" / "tasks"
    rows = [json.loads(line) for file in tasks.glob("*.jsonl") for line in file.open()]
    contexts = [row.get("context") or row["query"] for row in rows]
    assert contexts and not any(context[:80] in books for context in contexts)
    calibration = calibration_tokens(gpt2_tokenizer, None, 4096, 64, seed=0)
    assert calibration.data == DEFAULT_DATA and calibration.tokens.shape == (64, 64)
    assert gpt2_tokenizer.decode(calibration.tokens[0]) in books  # passages of the books, not other text


def llava_loss(folder: Path, rows: torch.Tensor) -> float:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=rows, labels=rows).loss.item()


@pytest.mark.slow
def test_calibrated_beats_mean_pooling_inside_a_multimodal_wrapper(trained_llama, tmp_path):
    """The briefly trained Llama as a tiny LLaVA's language model (a random vision tower beside it): calibrated
    converts the language model alone and closes most of mean pooling's gap on held-out text."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from tiny_models import VISION

    model, text, rows = trained_llama
    llama = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    torch.manual_seed(0)
    config = LlavaConfig(text_config=llama.config.to_dict(), image_token_index=127, tie_word_embeddings=True,
                         vision_config={"model_type": "clip_vision_model", **VISION})
    llava = LlavaForConditionalGeneration(config).eval()
    llava.model.language_model.load_state_dict(llama.model.state_dict())
    llava.lm_head.load_state_dict(llama.lm_head.state_dict())
    llava.save_pretrained(tmp_path / "llava")
    source = tmp_path / "llava"
    mean = convert_checkpoint(source, 2, tmp_path / "mean", method="mean", progress=False).output
    calibrated = convert(source, 2, tmp_path / "calibrated", text, tokens=4096)
    original, pooled, fitted = (llava_loss(f, rows) for f in (source, mean, calibrated))
    assert abs(original - held_out_loss(model, rows)) < 1e-4  # the wrapper computes what the Llama does on text
    assert original < fitted < pooled
    assert (pooled - fitted) > 0.5 * (pooled - original)


# q/k LayerNorms: nothing passes into the queries, so the keys are pooled as mean pooling pools them and the values,
# o_proj and the refinement are fitted (keys.py); the plan says so in one line.
LAYER_NORMED = {"cohere": {"use_qk_norm": True}, "stablelm": {"qk_layernorm": True}, "phi": {"qk_layernorm": True}}


@pytest.mark.parametrize("groups", [2, 1])
@pytest.mark.parametrize("arch", sorted(LAYER_NORMED))
def test_identical_heads_convert_without_loss_under_qk_layernorms(arch, groups, tmp_path, tokens, calibration,
                                                                  monkeypatch, capsys):
    monkeypatch.setitem(ARCHITECTURES, arch, LAYER_NORMED[arch])
    small = random_model(arch, kv_heads=groups, seed=1)
    repeat_kv_heads(small, 4).save_pretrained(tmp_path / "src")
    out = convert(tmp_path / "src", groups, tmp_path / "out", calibration)
    assert close(logits(out, tokens), logits(small, tokens))
    notes = [line for line in capsys.readouterr().out.splitlines() if "q/k LayerNorms" in line]
    assert notes == [f"note: --method calibrated: {arch}'s q/k LayerNorms let no scale pass into the queries, so each "
                     "group's keys are mean-pooled (consecutive heads, exact where they are copies); the values and "
                     "o_proj are fitted and each layer refined"]


@pytest.mark.parametrize("arch", sorted(LAYER_NORMED))
def test_same_head_count_changes_nothing_under_qk_layernorms(arch, tmp_path, tokens, calibration, monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, arch, LAYER_NORMED[arch])
    random_model(arch, kv_heads=4, seed=4).save_pretrained(tmp_path / "src")
    out = convert(tmp_path / "src", 4, tmp_path / "out", calibration)
    assert torch.equal(logits(out, tokens), logits(tmp_path / "src", tokens))


@pytest.mark.parametrize(("arch", "kind"), [("cohere", "layer"), ("stablelm", "layer"), ("phi", "layer"),
                                           ("lfm2", "per_head"), ("qwen3", "per_head"), ("olmo2", "whole")])
def test_qk_norms_are_classed_by_what_they_compute_not_by_their_names(arch, kind, monkeypatch):
    """LFM2's q_layernorm/k_layernorm are RMS norms (keys fitted), StableLM's and Phi's LayerNorms (keys pooled)."""
    if arch in LAYER_NORMED:
        monkeypatch.setitem(ARCHITECTURES, arch, LAYER_NORMED[arch])
    model = random_model(arch, kv_heads=2)
    _, layers = decoder_layers(model)
    attention = attention_of(first_attention(layers)[1])
    assert norm_kind(attention, model.config.num_attention_heads, model.config.num_key_value_heads) == kind


def test_the_dry_run_says_the_keys_are_pooled_under_qk_layernorms(tmp_path, calibration, monkeypatch, capsys):
    monkeypatch.setitem(ARCHITECTURES, "cohere", LAYER_NORMED["cohere"])
    random_model("cohere", kv_heads=4, seed=4).save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", 2, tmp_path / "out", method="calibrated", dry_run=True)
    assert "cohere's q/k LayerNorms let no scale pass into the queries" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["cohere", *(pytest.param(a, marks=pytest.mark.slow) for a in ("stablelm", "phi"))])
def test_calibrated_beats_mean_pooling_under_qk_layernorms(arch, tmp_path, shared_data):
    original, pooled, fitted = losses_at_two_kv_heads(arch, tmp_path, shared_data, **LAYER_NORMED[arch])
    assert original < fitted < pooled


# clip_qkv (OLMo): no map passes a clip, so keys and values are pooled; o_proj's refit and the refinement remain.
CLIPPED = {"clip_qkv": 0.05}  # small enough that the tiny random model's q/k/v are clipped


@pytest.mark.parametrize("groups", [2, 1])
def test_identical_heads_convert_without_loss_under_clip_qkv(groups, tmp_path, tokens, calibration, monkeypatch,
                                                            capsys):
    monkeypatch.setitem(ARCHITECTURES, "olmo", CLIPPED)
    small = random_model("olmo", kv_heads=groups, seed=1)
    small.config.clip_qkv = None
    unclipped = logits(small, tokens)
    small.config.clip_qkv = CLIPPED["clip_qkv"]
    assert not close(logits(small, tokens), unclipped)  # the clip is at work
    repeat_kv_heads(small, 4).save_pretrained(tmp_path / "src")
    out = convert(tmp_path / "src", groups, tmp_path / "out", calibration)
    assert close(logits(out, tokens), logits(small, tokens))
    assert ("note: --method calibrated: olmo clips q/k/v to +-0.05 after the projection, which no map moved into "
            "q_proj or o_proj passes, so each group's keys and values are mean-pooled") in capsys.readouterr().out


@pytest.mark.slow
def test_calibrated_beats_mean_pooling_under_clip_qkv(tmp_path, shared_data):
    original, pooled, fitted = losses_at_two_kv_heads("olmo", tmp_path, shared_data, clip_qkv=1.0)
    assert original < fitted < pooled

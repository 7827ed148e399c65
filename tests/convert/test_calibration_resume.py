"""An interrupted calibrated conversion resumes at the next layer, with the result an uninterrupted run gives; a
different seed, calibration text or source starts over; the finished layers are kept beside the output only until
the converted model is in place (tiny 3-layer fp32 and bf16 Llamas, CPU)."""

import json
from pathlib import Path

import pytest
import torch

from gqa_uptrain.convert import convert_checkpoint
from gqa_uptrain.convert.calibration import calibrate
from gqa_uptrain.provenance import read_provenance
from tiny_models import HYBRID, random_model, small_llama

VOCAB = 96


def tiny_llama(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A random 3-layer MHA Llama: its heads differ, so every layer is really fitted (and refined)."""
    model = small_llama(kv_heads=4, layers=3, vocab=VOCAB, seed=seed, hidden_size=64, intermediate_size=96,
                        head_dim=16, max_position_embeddings=64, tie_word_embeddings=False)
    model.to(dtype).save_pretrained(folder)
    return folder


def token_rows(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(3, VOCAB, (64,), generator=g).tolist()} for _ in range(8)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def fitted_layers(monkeypatch) -> list[str]:
    """The names of the layers fitted (not replayed) from now on, in order."""
    fitted, real = [], calibrate._calibrate_layer

    def counting(name, *args, **kwargs):
        fitted.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(calibrate, "_calibrate_layer", counting)
    return fitted


def convert(source: Path, out: Path, data: Path, seed: int = 0) -> Path:
    return convert_checkpoint(source, 1, out, method="calibrated", calibration=str(data), calibration_tokens=512,
                              refine_steps=30, seed=seed, progress=False).output


def interrupted(source: Path, out: Path, data: Path, fitted: list[str], monkeypatch, seed: int = 0,
                before: tuple[int, ...] = (0, 1)) -> None:
    """Convert, with Ctrl-C pressed as layer 2 (the third) starts, after fitting the layers `before`."""
    real = calibrate._calibrate_layer

    def ctrl_c_at_layer_2(name, *args, **kwargs):
        if name.endswith(".2"):
            raise KeyboardInterrupt
        return real(name, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(calibrate, "_calibrate_layer", ctrl_c_at_layer_2)
        with pytest.raises(KeyboardInterrupt):
            convert(source, out, data, seed)
    assert fitted == [f"model.layers.{i}" for i in before]
    fitted.clear()


def store(out: Path) -> Path:
    return out.with_name(f".{out.name}.calibration")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_interrupted_calibration_resumes_at_the_next_layer_with_the_same_result(
        dtype, tmp_path, fitted_layers, monkeypatch, capsys):
    source, data = tiny_llama(tmp_path / "src", dtype=dtype), token_rows(tmp_path / "ids.jsonl", 1)
    interrupted(source, tmp_path / "out", data, fitted_layers, monkeypatch)
    # Ctrl-C left the finished layers and nothing half-written: no output, no temporary folder.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        ".out.calibration", "ids.jsonl", "src"]
    assert {p.name for p in store(tmp_path / "out").glob("layer-*")} == {
        "layer-0.safetensors", "layer-0.json", "layer-1.safetensors", "layer-1.json"}
    capsys.readouterr()
    resumed = convert(source, tmp_path / "out", data)
    assert fitted_layers == ["model.layers.2"]
    assert ("resuming calibration at layer 3 of 3 (the first 2 were fitted by an earlier run, kept in "
            f"{store(tmp_path / 'out')})") in capsys.readouterr().out
    assert not store(tmp_path / "out").exists()  # removed once the model is in place
    fitted_layers.clear()
    whole = convert(source, tmp_path / "whole", data)
    assert fitted_layers == [f"model.layers.{i}" for i in range(3)]
    assert (resumed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert read_provenance(resumed)["conversion"] == read_provenance(whole)["conversion"]
    assert any(layer["refinement"]["steps"] for layer in read_provenance(whole)["conversion"]["calibration"]["layers"])
    assert not store(tmp_path / "whole").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(HYBRID))
def test_a_hybrid_resumes_past_its_layers_without_attention(arch, tmp_path, fitted_layers, monkeypatch):
    """LFM2's first layer is a short convolution, GraniteMoeHybrid's a Mamba layer: never fitted, kept as having no
    attention and replayed on resuming like any finished layer, to the result an uninterrupted run gives."""
    random_model(arch, kv_heads=4, seed=0).save_pretrained(tmp_path / "src")
    source, data = tmp_path / "src", token_rows(tmp_path / "ids.jsonl", 1)
    interrupted(source, tmp_path / "out", data, fitted_layers, monkeypatch, before=(1,))
    resumed = convert(source, tmp_path / "out", data)
    assert fitted_layers == ["model.layers.2"]
    fitted_layers.clear()
    whole = convert(source, tmp_path / "whole", data)
    assert fitted_layers == ["model.layers.1", "model.layers.2"]
    assert (resumed / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    assert read_provenance(resumed)["conversion"] == read_provenance(whole)["conversion"]
    assert read_provenance(whole)["conversion"]["calibration"]["layers"][0] == {"attention": False}


@pytest.mark.slow
@pytest.mark.parametrize("change", ["seed", "calibration text", "source weights"])
def test_a_different_seed_text_or_source_starts_over(change, tmp_path, fitted_layers, monkeypatch, capsys):
    source, data = tiny_llama(tmp_path / "src"), token_rows(tmp_path / "ids.jsonl", 1)
    interrupted(source, tmp_path / "out", data, fitted_layers, monkeypatch)
    seed = 0
    if change == "seed":
        seed = 1
    elif change == "calibration text":
        data = token_rows(tmp_path / "other.jsonl", 2)
    else:
        tiny_llama(source, seed=1)
    capsys.readouterr()
    convert(source, tmp_path / "out", data, seed)
    assert fitted_layers == [f"model.layers.{i}" for i in range(3)]
    printed = capsys.readouterr()
    assert "resuming" not in printed.out
    line = (f"gqa-convert: warning: removed {store(tmp_path / 'out')}: the layers an earlier run calibrated there "
            "were fitted with a different ")
    assert line in printed.err and change in printed.err.split(line)[1].split(";")[0]
    assert printed.err.split(line)[1].split("; ")[1].startswith("calibrating from the first layer\n")
    assert not store(tmp_path / "out").exists()


@pytest.mark.slow
def test_a_layer_cut_short_is_fitted_again(tmp_path, fitted_layers, monkeypatch):
    """A crash while layer 1's file was written (or before its report was): layer 1 is fitted again, not read."""
    source, data = tiny_llama(tmp_path / "src"), token_rows(tmp_path / "ids.jsonl", 1)
    interrupted(source, tmp_path / "out", data, fitted_layers, monkeypatch)
    layer = store(tmp_path / "out") / "layer-1.safetensors"
    layer.write_bytes(layer.read_bytes()[:-10])
    convert(source, tmp_path / "out", data)
    assert fitted_layers == ["model.layers.1", "model.layers.2"]

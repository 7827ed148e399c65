"""gqa-convert as a user meets it: formats, files, provenance, and one clear line for every bad input."""

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gqa_uptrain.convert import checkpoint_reader, convert_checkpoint
from gqa_uptrain.convert.cli import main
from tiny_models import logits, random_model

LEFTOVERS = ".*partial*"


@pytest.fixture
def source(tmp_path) -> Path:
    """A tiny Llama (4 KV heads) with the files a Hub repository carries beside its weights."""
    path = tmp_path / "tiny"
    random_model("llama", kv_heads=4).save_pretrained(path)
    (path / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (path / "chat_template.jinja").write_text("{{ messages }}")
    (path / "LICENSE").write_text("license text")
    (path / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (path / "original").mkdir()
    (path / "original" / "consolidated.00.pth").write_bytes(b"stale MHA weights")
    return path


def run(*argv: str) -> None:
    main([str(a) for a in argv])


def fails(capsys, *argv: str) -> str:
    """Run the CLI, expect exit 2, and return its one-line message."""
    with pytest.raises(SystemExit) as exit_info:
        run(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gqa-convert: error: "), err
    return err[0]


def test_output_folder_is_complete_and_faithful(source, tmp_path):
    out = tmp_path / "out"
    run(source, "--groups", 2, "-o", out)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json",
                     "chat_template.jinja", "LICENSE", "README.md", "gqa_provenance.json"}
    config, original = (json.loads((p / "config.json").read_text()) for p in (out, source))
    assert config == {**original, "num_key_value_heads": 2}
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    record = json.loads((out / "gqa_provenance.json").read_text())
    digest = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    assert record["source"]["sha256"] == {"model.safetensors": digest}
    assert record["source"]["id"] == str(source.resolve()) and record["source"]["license"] == "apache-2.0"
    assert record["conversion"] == {"method": "mean", "groups": 2, "kv_heads_before": 4, "kv_heads_after": 2,
                                    "query_heads": 4}
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "license: apache-2.0" in card
    assert "base_model" not in card  # a local folder is no Hub repository to name (a Hub id is: see below)


def test_the_card_names_a_local_source_by_its_folder_name_alone(source, tmp_path):
    """A card is published: it names a local source `tiny`, never by the absolute path it was converted from."""
    run(source, "-g", 2, "-o", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`tiny` converted by gqa-uptrain" in card
    assert str(source.resolve()) not in card and str(tmp_path) not in card


def test_default_output_name(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run(source, "-g", 2)
    run(source, "-g", 1)
    assert (tmp_path / "tiny-gqa2" / "config.json").is_file()
    assert (tmp_path / "tiny-mqa" / "config.json").is_file()


def test_sharded_output_has_index_and_loads(source, tmp_path, tokens):
    out = tmp_path / "sharded"
    run(source, "-g", 2, "-o", out, "--max-shard-size", "100KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(
        os.path.getsize(out / s) - 8 - int.from_bytes((out / s).read_bytes()[:8], "little") for s in shards)
    whole = convert_checkpoint(source, 2, tmp_path / "whole", progress=False).output
    assert torch.equal(logits(out, tokens), logits(whole, tokens))


def test_bf16_stays_bf16_and_pools_in_fp32(tmp_path):
    path = tmp_path / "bf16"
    random_model("llama", kv_heads=4).to(torch.bfloat16).save_pretrained(path)
    out = convert_checkpoint(path, 1, tmp_path / "out", progress=False).output
    source, converted = (AutoModelForCausalLM.from_pretrained(p, dtype="auto") for p in (path, out))
    assert converted.dtype == torch.bfloat16
    k = source.model.layers[0].self_attn.k_proj.weight
    expected = k.float().reshape(4, 16, -1).mean(0).to(torch.bfloat16)
    assert torch.equal(converted.model.layers[0].self_attn.k_proj.weight, expected)


def test_pytorch_bin_source(tmp_path, tokens):
    model = random_model("qwen2", kv_heads=4)
    path = tmp_path / "bin"
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    out = convert_checkpoint(path, 4, tmp_path / "out", progress=False).output
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    assert torch.equal(logits(out, tokens), logits(model, tokens))


def test_dry_run_prints_plan_and_writes_nothing(source, tmp_path, capsys):
    run(source, "-g", 1, "-o", tmp_path / "out", "--dry-run", "--context", 1000)
    report = capsys.readouterr().out
    assert "KV heads      4 -> 1" in report
    assert "1,024 -> 256 bytes/token" in report  # 2 layers x 2 (K, V) x heads x 16 dims x 4 bytes
    assert "1000.0 KiB -> 250.0 KiB per sequence" in report
    assert not (tmp_path / "out").exists()


def test_reconverting_keeps_parent_provenance(source, tmp_path):
    gqa = convert_checkpoint(source, 2, tmp_path / "gqa2", progress=False)
    mqa = convert_checkpoint(gqa.output, 1, tmp_path / "mqa", method="first", progress=False)
    record = json.loads((mqa.output / "gqa_provenance.json").read_text())
    assert record["conversion"]["kv_heads_before"] == 2 and record["parent"]["conversion"]["groups"] == 2
    # the result holds what was written: the record itself, and the conversion it describes
    assert mqa.provenance == record and record["parent"] == gqa.provenance
    assert (mqa.output, mqa.method, mqa.kv_heads_before, mqa.kv_heads_after) == (tmp_path / "mqa", "first", 2, 1)
    assert not mqa.dry_run and gqa.kv_heads_before == 4


@pytest.mark.parametrize(("groups", "message"), [
    (3, "--groups 3 does not divide the model's 4 KV heads; choose one of [1, 2, 4]"),
    (0, "--groups must be at least 1, got 0"),
    (8, "--groups 8 is above the model's 4 KV heads"),
])
def test_bad_group_counts(source, tmp_path, capsys, groups, message):
    assert message in fails(capsys, source, "-g", groups, "-o", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "opt", "bloom", "t5", "deepseek_v2"])
def test_architectures_without_gqa_are_refused(model_type, tmp_path, capsys):
    path = tmp_path / model_type
    path.mkdir()
    AutoConfig.for_model(model_type).save_pretrained(path)
    message = fails(capsys, path, "-g", 1, "-o", tmp_path / "out")
    assert f"'{model_type}'" in message and ("grouped-query" in message or "decoder-only" in message)


@pytest.mark.parametrize(("multi_query", "heads"), [(True, "one KV head (multi_query)"),
                                                    (False, "one KV head per query head")], ids=["7b", "rw"])
def test_falcon_is_refused_without_its_new_decoder_architecture(multi_query, heads, tmp_path, capsys):
    """Falcon holds a KV-head count only in its new decoder architecture (Falcon-40B; a covered architecture in
    tests/tiny_models.py); the old one (Falcon-7B, Falcon-RW) is refused by name, before its weights are read."""
    path = tmp_path / "falcon"
    path.mkdir()
    AutoConfig.for_model("falcon", multi_query=multi_query).save_pretrained(path)
    assert fails(capsys, path, "-g", 1, "-o", tmp_path / "out") == (
        "gqa-convert: error: model type 'falcon' cannot express grouped-query attention in transformers without its "
        f"new decoder architecture (new_decoder_architecture: true, as Falcon-40B has); this config has the old one, "
        f"with {heads}")


def test_existing_output_needs_force(source, tmp_path, capsys):
    out = tmp_path / "out"
    run(source, "-g", 2, "-o", out)
    (out / "extra.txt").write_text("added later")
    capsys.readouterr()
    assert "already exists (use --force" in fails(capsys, source, "-g", 1, "-o", out)
    assert (out / "extra.txt").read_text() == "added later"
    run(source, "-g", 1, "-o", out, "--force")
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 1
    assert not (out / "extra.txt").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_output_inside_source_is_refused(source, capsys):
    assert "must not be the source" in fails(capsys, source, "-g", 2, "-o", source / "sub", "--force")


@pytest.fixture
def sharded(tmp_path) -> Path:
    path = tmp_path / "sharded"
    random_model("llama", kv_heads=4).save_pretrained(path, max_shard_size="100KB")
    return path


def test_missing_shard(sharded, tmp_path, capsys):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    assert f"{victim}: shard named in model.safetensors.index.json is missing" in fails(
        capsys, sharded, "-g", 2, "-o", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_shard(sharded, tmp_path, capsys):
    victim = sorted(sharded.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    assert "outside the file (truncated or corrupt)" in fails(capsys, sharded, "-g", 2, "-o", tmp_path / "out")


def test_garbage_shard(sharded, tmp_path, capsys):
    victim = sorted(sharded.glob("model-*.safetensors"))[0]
    victim.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert "corrupt safetensors header" in fails(capsys, sharded, "-g", 2, "-o", tmp_path / "out")


def test_index_naming_a_missing_tensor(sharded, tmp_path, capsys):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first_shard = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.9.self_attn.k_proj.weight"] = first_shard
    index_path.write_text(json.dumps(index))
    assert "names tensor model.layers.9.self_attn.k_proj.weight" in fails(
        capsys, sharded, "-g", 2, "-o", tmp_path / "out")


def test_missing_source(tmp_path, capsys):
    assert "no such folder" in fails(capsys, tmp_path / "nope", "-g", 2)
    assert "config.json: missing" in fails(capsys, tmp_path, "-g", 2, "-o", tmp_path / "x")


@pytest.mark.parametrize(("error", "exit_code", "message"), [
    (KeyboardInterrupt(), 130, "gqa-convert: interrupted"),
    (OSError(errno.ENOSPC, "No space left on device"), 2, "gqa-convert: error: disk full"),
])
def test_failure_mid_write_leaves_nothing(source, tmp_path, capsys, monkeypatch, error, exit_code, message):
    calls = []

    def failing_write(out, tensor, progress):
        calls.append(tensor)
        raise error

    monkeypatch.setattr("gqa_uptrain.convert.converter.write_tensor", failing_write)
    with pytest.raises(SystemExit) as exit_info:
        run(source, "-g", 2, "-o", tmp_path / "out")
    assert calls and exit_info.value.code == exit_code
    assert capsys.readouterr().err.splitlines()[-1].startswith(message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_not_enough_disk_space(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(free=1000))
    assert "not enough free disk space" in fails(capsys, source, "-g", 2, "-o", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def _hub_cache(tmp_path: Path, source: Path) -> tuple[Path, str]:
    """A Hugging Face cache holding `source` as the repository org/tiny, as huggingface_hub lays it out."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot, blobs = repo / "snapshots" / revision, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in source.iterdir():
        if file.is_file():
            data = file.read_bytes()
            blob = blobs / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return tmp_path / "hub", revision


def _cli(*argv: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gqa_uptrain.convert.cli", *argv], capture_output=True,
                          text=True, env={**os.environ, **env})


@pytest.mark.slow
def test_hub_id_resolves_through_the_offline_cache(source, tmp_path):
    cache, revision = _hub_cache(tmp_path, source)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = _cli("org/tiny", "-g", "2", "-o", str(tmp_path / "out"), env=env)
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "out" / "gqa_provenance.json").read_text())
    assert record["source"]["id"] == "org/tiny" and record["source"]["revision"] == revision
    digest = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    assert record["source"]["sha256"] == {"model.safetensors": digest}
    assert "base_model: org/tiny" in (tmp_path / "out" / "README.md").read_text()
    missing = _cli("org/absent", "-g", "2", env=env)
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("gqa-convert: error: org/absent: not in the local Hugging Face cache and "
                                      "the Hub cannot be reached (offline mode or no network)")


def test_reader_streams_one_tensor_at_a_time(sharded):
    reader = checkpoint_reader.CheckpointReader(sharded)
    name = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(reader.read(name), AutoModelForCausalLM.from_pretrained(sharded).state_dict()[name])


@pytest.mark.parametrize("preset", [None, "max_split_size_mb:64"])
def test_the_cuda_allocator_setting_is_a_default_the_user_overrides(source, tmp_path, monkeypatch, preset):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", preset or "")  # restored after the test, set or not before
    if preset is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    run(source, "--groups", "2", "--output", tmp_path / "out")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == (preset or "expandable_segments:True")

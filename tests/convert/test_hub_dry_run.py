"""`gqa-convert HUB_ID --dry-run` plans from the Hub's config and safetensors headers, never its weights.

huggingface_hub is never asked to reach the Hub: `hf_hub_download` (config.json) and `get_safetensors_metadata`
(headers by range requests) are replaced by stand-ins that serve a tiny model's real config and real headers,
read from the model saved locally; errors are the ones huggingface_hub raises for the Hub's real answers.
"""

import importlib
import json
import shutil
import struct
from pathlib import Path

import huggingface_hub.hf_api
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError, NotASafetensorsRepoError
from huggingface_hub.utils import get_session, hf_raise_for_status
from huggingface_hub.utils._safetensors import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

from gqa_uptrain.convert.cli import main
from tiny_models import random_model, twelve_head_llama

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB = "gqa_uptrain.convert.hub_headers"


def _headers(file: Path) -> SafetensorsFileMetadata:
    """A local safetensors file's header, as huggingface_hub's range reads return it."""
    with open(file, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    metadata = header.pop("__metadata__", {})
    return SafetensorsFileMetadata(metadata, {name: TensorInfo(entry["dtype"], entry["shape"],
                                                               tuple(entry["data_offsets"]))
                                              for name, entry in header.items()})


def serve(monkeypatch, model: Path, tmp_path: Path) -> None:
    """Serve `model` as the Hub repository org/<name>: config.json lands in a cache snapshot without weights."""
    snapshot = tmp_path / "cache" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    shutil.copy(model / "config.json", snapshot)
    files = sorted(model.glob("*.safetensors"))
    weight_map = {name: file.name for file in files for name in _headers(file).tensors}
    if (model / "model.safetensors.index.json").exists():  # the Hub serves the index as it is, right or wrong
        weight_map = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]

    def download(repo_id, filename, revision=None):
        assert filename == "config.json"
        return str(snapshot / filename)

    def metadata(repo_id, revision=None):
        assert revision == COMMIT  # the headers of the commit the config came from
        return SafetensorsRepoMetadata(None, len(files) > 1, weight_map,
                                       {f.name: _headers(f) for f in files if f.name in weight_map.values()})

    monkeypatch.setattr(f"{HUB}.hf_hub_download", download)
    monkeypatch.setattr(f"{HUB}.get_safetensors_metadata", metadata)
    monkeypatch.setattr(f"{HUB}.is_offline_mode", lambda: False)
    monkeypatch.setattr("gqa_uptrain.source.snapshot_download", _never)


def _never(*args, **kwargs):
    raise AssertionError("a dry run downloaded the repository")


def dry_run(capsys, source, *argv) -> list[str]:
    main([str(source), *map(str, argv), "--dry-run"])
    return capsys.readouterr().out.splitlines()


def twelve_heads(path: Path) -> Path:
    """In several shards: --groups 3 draws the tensor-parallel warning."""
    twelve_head_llama(layers=2).save_pretrained(path, max_shard_size="40KB")
    return path


@pytest.mark.parametrize(("model", "argv"), [
    ("twelve", ["-g", "3"]),
    ("twelve", ["-g", "2", "--method", "first"]),
    ("gemma3", ["-g", "1", "--method", "random"]),  # a multimodal wrapper
    ("llama", ["-g", "4"]),  # nothing changes
], ids=["tp-warning", "first", "multimodal", "no-op"])
def test_hub_dry_run_prints_the_local_plan_without_weights(model, argv, tmp_path, capsys, monkeypatch):
    local = tmp_path / "tiny"
    if model == "twelve":
        twelve_heads(local)
    else:
        random_model(model, kv_heads=4).save_pretrained(local)
    expected = dry_run(capsys, local, *argv)
    serve(monkeypatch, local, tmp_path)
    got = dry_run(capsys, "org/tiny", *argv)
    assert got[0] == f"source        {tmp_path / 'cache' / 'snapshots' / COMMIT} ({expected[0].split(' (', 1)[1]}"
    assert got[1:] == expected[1:]  # heads, KV cache, parameters, sizes, method words, notes, output name
    assert model != "twelve" or len(list(local.glob("*.safetensors"))) > 1  # every shard's header was read
    assert ("warning: tensor parallel" in "\n".join(got)) == (argv == ["-g", "3"])
    assert sorted(p.name for p in (tmp_path / "cache" / "snapshots" / COMMIT).iterdir()) == ["config.json"]


def fails(capsys, *argv) -> str:
    capsys.readouterr()  # what building the model printed
    with pytest.raises(SystemExit):
        main([*map(str, argv), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def _hub_answer(status: int, error_code: str | None) -> Exception:
    """The exception huggingface_hub raises for the Hub's HTTP answer (status, X-Error-Code)."""
    http = importlib.import_module(type(get_session()).__module__.split(".")[0])  # httpx, or httpx2 since 2.x
    url = "https://huggingface.co/org/tiny/resolve/main/config.json"
    response = http.Response(status, headers={"X-Error-Code": error_code} if error_code else {},
                             request=http.Request("HEAD", url))
    try:
        hf_raise_for_status(response)
    except Exception as error:
        return error
    raise AssertionError("not an error")


@pytest.mark.parametrize(("error", "message"), [
    (lambda: _hub_answer(404, "RepoNotFound"), "org/tiny: no such repository on the Hugging Face Hub"),
    (lambda: _hub_answer(403, "GatedRepo"), "org/tiny: a gated repository; accept its terms"),
    (lambda: LocalEntryNotFoundError("no network"), "org/tiny: not in the local Hugging Face cache and the Hub "
                                                    "cannot be reached (offline mode or no network)"),
])
def test_hub_errors_are_one_line(error, message, tmp_path, capsys, monkeypatch):
    def download(*args, **kwargs):
        raise error()

    monkeypatch.setattr(f"{HUB}.hf_hub_download", download)
    monkeypatch.setattr(f"{HUB}.is_offline_mode", lambda: False)
    assert fails(capsys, "org/tiny", "-g", "2").startswith(f"gqa-convert: error: {message}")


def test_headers_without_network_are_one_line(tmp_path, capsys, monkeypatch):
    """config.json is in the cache, but the headers need the Hub: the real range request fails to connect."""
    local = tmp_path / "tiny"
    random_model("llama", kv_heads=4).save_pretrained(local)
    serve(monkeypatch, local, tmp_path)
    monkeypatch.setattr(f"{HUB}.get_safetensors_metadata", huggingface_hub.hf_api.get_safetensors_metadata)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", "http://127.0.0.1:9")  # nothing listens there
    assert fails(capsys, "org/tiny", "-g", "2") == ("gqa-convert: error: org/tiny: not in the local Hugging Face "
                                                    "cache and the Hub cannot be reached (offline mode or no network)")


def test_repository_without_safetensors_is_refused(tmp_path, capsys, monkeypatch):
    local = tmp_path / "tiny"
    random_model("llama", kv_heads=4).save_pretrained(local)
    serve(monkeypatch, local, tmp_path)

    def no_safetensors(repo_id, revision=None):
        raise NotASafetensorsRepoError("'org/tiny' is not a safetensors repo.")

    monkeypatch.setattr(f"{HUB}.get_safetensors_metadata", no_safetensors)
    assert "has no safetensors weights on the Hub" in fails(capsys, "org/tiny", "-g", "2")


def _name_a_missing_tensor(weight_map: dict) -> None:
    weight_map["model.layers.9.self_attn.k_proj.weight"] = weight_map["model.layers.0.self_attn.k_proj.weight"]


def _leave_a_tensor_unnamed(weight_map: dict) -> None:
    del weight_map["model.layers.1.self_attn.v_proj.weight"]


def _name_a_tensor_in_another_shard(weight_map: dict) -> None:
    name = "model.layers.1.self_attn.v_proj.weight"
    weight_map[name] = next(file for file in weight_map.values() if file != weight_map[name])


@pytest.mark.parametrize("tamper", [_name_a_missing_tensor, _leave_a_tensor_unnamed, _name_a_tensor_in_another_shard],
                         ids=["named-not-held", "held-not-named", "other-shard"])
def test_index_that_disagrees_with_the_shards_is_refused_as_locally(tamper, tmp_path, capsys, monkeypatch):
    """The safetensors index and the shards' headers must agree, tensor for tensor: the Hub's dry run refuses an
    index that does not in the one line that a local folder with the same files gets."""
    local = twelve_heads(tmp_path / "tiny")
    index = local / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    tamper(content["weight_map"])
    index.write_text(json.dumps(content))
    local_error = fails(capsys, local, "-g", "2")
    serve(monkeypatch, local, tmp_path)
    hub_error = fails(capsys, "org/tiny", "-g", "2")
    snapshot = tmp_path / "cache" / "snapshots" / COMMIT
    assert local_error.startswith(f"gqa-convert: error: {index}: ")
    assert hub_error == local_error.replace(str(local), str(snapshot))

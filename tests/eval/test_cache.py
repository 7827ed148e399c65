"""Fingerprints follow model content, keys follow settings, and a large file is hashed once."""

import json
import shutil

from gqa_uptrain.eval.cache import ResultCache, result_key


def test_fingerprint_follows_content_not_location(tiny_llama, tiny_llama_gqa2, tmp_path):
    cache = ResultCache(tmp_path / "cache")
    copy = shutil.copytree(tiny_llama, tmp_path / "copy")
    assert cache.model_digest(str(copy)) == cache.model_digest(str(tiny_llama))
    assert cache.model_digest(str(tiny_llama_gqa2)) != cache.model_digest(str(tiny_llama))
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert cache.model_digest(str(copy)) != cache.model_digest(str(tiny_llama))


def test_notes_beside_the_model_do_not_change_it(tiny_llama, tmp_path):
    cache = ResultCache(tmp_path / "cache")
    copy = shutil.copytree(tiny_llama, tmp_path / "copy")
    (copy / "README.md").write_text("model card")
    (copy / "gqa_provenance.json").write_text('{"converted_at": "now"}')
    assert cache.model_digest(str(copy)) == cache.model_digest(str(tiny_llama))


def test_file_hash_is_remembered_across_runs(tiny_llama, tmp_path, monkeypatch):
    """A new run (a new ResultCache) reads the hashes from the memo on disk: same fingerprint, no file read again."""
    first = ResultCache(tmp_path / "cache").model_digest(str(tiny_llama))
    memo = json.loads((tmp_path / "cache" / "file_hashes.json").read_text())
    assert any("model.safetensors" in key for key in memo) and any("config.json" in key for key in memo)

    hashed = []
    monkeypatch.setattr("gqa_uptrain.eval.cache.sha256_file", lambda path, *args, **kwargs: hashed.append(path))
    assert ResultCache(tmp_path / "cache").model_digest(str(tiny_llama)) == first
    assert hashed == []


def test_keys_differ_by_model_measure_and_settings():
    keys = {
        result_key("a", "lm-eval:piqa", {"limit": None, "seed": 1}),
        result_key("b", "lm-eval:piqa", {"limit": None, "seed": 1}),
        result_key("a", "lm-eval:arc_easy", {"limit": None, "seed": 1}),
        result_key("a", "lm-eval:piqa", {"limit": 10, "seed": 1}),
    }
    assert len(keys) == 4
    assert result_key("a", "m", {"x": 1, "y": 2}) == result_key("a", "m", {"y": 2, "x": 1})


def test_store_and_disable(tmp_path):
    cache = ResultCache(tmp_path)
    cache.put("ab12", {"acc": 0.5})
    assert cache.get("ab12") == {"acc": 0.5}
    off = ResultCache(tmp_path, enabled=False)
    assert off.get("ab12") is None
    off.put("cd34", {"acc": 1})
    assert ResultCache(tmp_path).get("cd34") is None

"""scripts/reproduce_gqa.py at its smoke scale: the whole experiment pipeline on a few books, on the CPU.

It asserts the pipeline (every arm built, measured and reported; a rerun resumes without retraining), not the
science, which needs the GPU scale.
"""

import json

import pytest


@pytest.mark.slow
def test_smoke_scale_runs_every_arm_and_resumes(reproduce, tmp_path, shared_data):
    out = tmp_path / "experiment"
    argv = ["--data", str(shared_data / "gutenberg"), "--output", str(out), "--scale", "smoke"]
    reproduce.main(argv)
    results = json.loads((out / "results.json").read_text())
    names = [arm["name"] for arm in results["arms"]]
    assert names == [arm.name for arm in reproduce.arms(reproduce.SCALES["smoke"])]
    assert len(names) == 2 * 4 * 3 + 2 + 3  # G x method x fraction, MHA continued x 2, scratch, distillation x 2
    for arm in [results["base"], *results["arms"]]:
        assert arm["error"] is None and arm["heldout_loss"] > 0 and set(arm["tasks"]) == {
            "gqa_lastword", "gqa_nextsentence"}, arm
    kv = {arm["kv_heads"]: arm["kv_cache_bytes_per_token"] for arm in results["arms"]}
    assert kv[1] * 2 == kv[2] and kv[1] * 4 == kv[4] == results["base"]["kv_cache_bytes_per_token"]
    uptrained = json.loads((out / "arms" / "g2-mean-5" / "model" / "gqa_provenance.json").read_text())
    assert uptrained["uptraining"]["fraction_of_pretraining_tokens"] == 0.05
    assert uptrained["parent"]["pretraining"]["tokens"] == reproduce.SCALES["smoke"].pretrain_tokens
    assert (out / "loss_vs_uptraining.png").is_file() and (out / "quality_vs_kv_cache.png").is_file()
    assert (out / "results.md").read_text().count("\n") == 2 + 1 + len(names)

    weights = out / "arms" / "g1-random-10" / "model" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    reproduce.main(argv)  # everything exists: nothing is trained again, the results are rebuilt
    assert weights.stat().st_mtime_ns == before
    assert json.loads((out / "results.json").read_text()) == results


@pytest.mark.slow
def test_speed_stage_times_each_kv_head_count_once(reproduce, tiny_llama, tiny_llama_gqa2, tmp_path, monkeypatch):
    """On the CPU the figures mean nothing; what is checked is one timing per shape, kept for a rerun."""
    import gqa_uptrain.eval.speed

    scale = reproduce.SCALES["smoke"]
    speeds = reproduce.decode_speed(tmp_path, scale, {4: tiny_llama, 2: tiny_llama_gqa2}, device="cpu")
    assert sorted(speeds) == [2, 4]
    for kv_heads, cases in speeds.items():
        assert [case["batch"] for case in cases] == list(reproduce.SPEED_BATCHES)
        assert all(case["tokens_per_s"] > 0 for case in cases)
        assert cases[0]["context"] + reproduce.SPEED_NEW_TOKENS == reproduce.CONTEXT * scale.seq_len
    assert speeds[2][0]["kv_cache_bytes_per_token"] * 2 == speeds[4][0]["kv_cache_bytes_per_token"]

    monkeypatch.setattr(gqa_uptrain.eval.speed, "measure_decode", lambda *a, **k: pytest.fail("timed again"))
    assert reproduce.decode_speed(tmp_path, scale, {4: tiny_llama, 2: tiny_llama_gqa2}, device="cpu") == speeds


def test_an_experiment_folder_keeps_its_scale(reproduce, tmp_path, shared_data, capsys):
    out = tmp_path / "experiment"
    out.mkdir()
    (out / "scale.json").write_text('{"scale": "gpu"}')
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(["--data", str(shared_data / "gutenberg"), "--output", str(out), "--scale", "smoke"])
    assert exit_info.value.code == 2
    assert "holds an experiment at another scale" in capsys.readouterr().err
    assert not (out / "data").exists()

"""Pieces of the run that need no model."""

from gqa_uptrain.eval.runner import unique_labels


def test_labels_are_short_and_unique():
    assert unique_labels(["meta-llama/Llama-2-7b-hf", "./Llama-2-7b-gqa8", "out/mqa/"]) == [
        "Llama-2-7b-hf", "Llama-2-7b-gqa8", "mqa"]
    assert unique_labels(["runs/gqa2/model", "runs/mqa/model", "runs/mqa-uptrained/model"]) == [
        "gqa2/model", "mqa/model", "mqa-uptrained/model"]
    assert unique_labels(["./tiny", "tiny"]) == ["tiny#1", "tiny#2"]

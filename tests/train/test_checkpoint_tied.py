"""A model that ties its LM head to its embeddings is checkpointed without accelerate's remark and resumes tied."""

import logging
from collections import OrderedDict

import torch
from accelerate import Accelerator
from accelerate.utils.other import clean_state_dict_for_safetensors

from gqa_uptrain.train.checkpoint import load_checkpoint, save_checkpoint
from tiny_models import small_llama


def test_a_tied_model_checkpoints_quietly_and_resumes_tied(tmp_path, fresh_accelerate, caplog):
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(small_llama(vocab=64, tie_word_embeddings=True))
    saved = model.model.embed_tokens.weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        clean_state_dict_for_safetensors(OrderedDict(model.state_dict()))  # what accelerate says on its own
    assert "Removed shared tensor {'lm_head.weight'}" in caplog.text
    caplog.clear()

    with caplog.at_level(logging.WARNING):
        path = save_checkpoint(accelerator, tmp_path, {"step": 1}, keep=1)
    assert "Removed shared tensor" not in caplog.text

    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
    assert load_checkpoint(accelerator, path) == {"step": 1}
    assert torch.equal(model.model.embed_tokens.weight, saved)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

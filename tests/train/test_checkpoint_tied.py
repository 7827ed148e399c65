"""A model that ties its LM head to its embeddings is checkpointed without accelerate's remark and resumes tied."""

import logging
from collections import OrderedDict

import torch
from accelerate import Accelerator
from accelerate.utils.other import clean_state_dict_for_safetensors
from transformers import LlamaConfig, LlamaForCausalLM

from gqa_uptrain.train.checkpoint import load_checkpoint, save_checkpoint


def test_a_tied_model_checkpoints_quietly_and_resumes_tied(tmp_path, fresh_accelerate, caplog):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(LlamaForCausalLM(config))
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

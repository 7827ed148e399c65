"""The export of a model trained with `model.compile: true`, whose modules torch.compile has wrapped."""

import torch
from accelerate import Accelerator
from accelerate.utils import compile_regions
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from gqa_uptrain.train.export import export_model


def test_regionally_compiled_model_with_tied_embeddings_exports(tmp_path, gpt2_tokenizer, fresh_accelerate):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(gpt2_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    compiled = compile_regions(model, backend="eager")  # the wrappers the loop's regional compilation adds
    assert any("_orig_mod" in name for name in compiled.state_dict())
    target = tmp_path / "model"
    export_model(Accelerator(cpu=True), compiled, gpt2_tokenizer, target, {}, {"tokens": 0}, torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(target)
    tokens = torch.tensor([[1, 2, 3, 4]])
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    assert torch.equal(exported(tokens).logits, model(tokens).logits)

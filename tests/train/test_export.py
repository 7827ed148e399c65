"""The export of a model trained with `model.compile: true`, whose modules torch.compile has wrapped."""

import torch
from accelerate import Accelerator
from accelerate.utils import compile_regions
from transformers import AutoConfig, AutoModelForCausalLM

from gqa_uptrain.train.export import export_model
from tiny_models import small_llama


def test_regionally_compiled_model_with_tied_embeddings_exports(tmp_path, gpt2_tokenizer, fresh_accelerate):
    model = small_llama(layers=2, vocab=len(gpt2_tokenizer), tie_word_embeddings=True)
    compiled = compile_regions(model, backend="eager")  # the wrappers the loop's regional compilation adds
    assert any("_orig_mod" in name for name in compiled.state_dict())
    target = tmp_path / "model"
    export_model(Accelerator(cpu=True), compiled, gpt2_tokenizer, target, {}, {"tokens": 0}, torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(target)
    tokens = torch.tensor([[1, 2, 3, 4]])
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    assert torch.equal(exported(tokens).logits, model(tokens).logits)


def test_the_export_gives_back_the_sources_use_cache(tmp_path, gpt2_tokenizer, fresh_accelerate):
    """Training turns the KV cache off; the exported config must not keep that, or generate() runs without one."""
    model = small_llama(vocab=len(gpt2_tokenizer))
    model.config.use_cache = False  # as loop._load_model sets it for training
    for source_setting in (True, False):
        target = tmp_path / f"model-{source_setting}"
        export_model(Accelerator(cpu=True), model, gpt2_tokenizer, target, {}, {"tokens": 0}, torch.float32,
                     use_cache=source_setting)
        assert AutoConfig.from_pretrained(target).use_cache is source_setting

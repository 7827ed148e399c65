"""Sliding-window perplexity: every token scored once, the BOS never scored, and the same numbers as a plain loss."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from gqa_uptrain.errors import DataError
from gqa_uptrain.eval.perplexity import (_batch_tensors, chunk_tokens, load_documents, perplexity, tokenize_documents,
                                         windows)


@pytest.mark.parametrize("length,window,stride", [(100, 32, 16), (100, 32, 32), (33, 32, 8), (5, 32, 16)])
def test_windows_score_each_token_at_most_once(length, window, stride):
    ids = list(range(length))
    spans = windows(ids, window, stride)
    scored = [token for span, n in spans for token in span[len(span) - n:]]
    assert len(scored) == len(set(scored))  # never twice
    assert all(len(span) <= window and 0 < n < len(span) for span, n in spans)
    if stride < window:
        assert scored == ids[1:]  # every token but the first, in order
    else:  # disjoint windows: a window's first token has nothing to predict it
        assert len(scored) == length - math.ceil(length / window)


@pytest.fixture(scope="module")
def model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def reference_nll(model, ids: list[int]) -> float:
    """Mean loss of the whole sequence in one forward pass (transformers' own shifted loss)."""
    tensor = torch.tensor([ids])
    with torch.no_grad():
        return model(input_ids=tensor, labels=tensor).loss.item()


def test_one_window_equals_the_plain_loss(model, gpt2_tokenizer):
    docs = tokenize_documents(["The quick brown fox jumps over the lazy dog. " * 4], gpt2_tokenizer)
    result = perplexity(model, docs, window=256, stride=128, batch_size=4)
    assert result["tokens"] == len(docs[0]) - 1
    assert result["nll_per_token"] == pytest.approx(reference_nll(model, docs[0]), rel=1e-5)
    assert result["token_perplexity"] == pytest.approx(math.exp(result["nll_per_token"]))


def test_sliding_windows_with_padding_match_separate_passes(model, gpt2_tokenizer):
    """Batched, padded windows give what each window scored alone gives."""
    docs = tokenize_documents(["Once upon a time there was a king. " * 6, "A short one."], gpt2_tokenizer)
    window, stride = 24, 8
    expected_nll, expected_count = 0.0, 0
    for ids in docs:
        for span, n in windows(ids, window, stride):
            tensor = torch.tensor([span])
            with torch.no_grad():
                logits = model(input_ids=tensor).logits[0, :-1]
            losses = torch.nn.functional.cross_entropy(logits, tensor[0, 1:], reduction="none")
            expected_nll += losses[-n:].sum().item()
            expected_count += n
    result = perplexity(model, docs, window=window, stride=stride, batch_size=3)
    assert result["tokens"] == expected_count
    assert result["nll_per_token"] == pytest.approx(expected_nll / expected_count, rel=1e-5)


def test_each_document_gets_one_unscored_start_token(gpt2_tokenizer):
    docs = tokenize_documents(["Hello there.", "General Kenobi."], gpt2_tokenizer)
    start = gpt2_tokenizer.bos_token_id  # GPT-2: <|endoftext|>
    for doc, text in zip(docs, ["Hello there.", "General Kenobi."]):
        assert doc[0] == start and doc[1:] == gpt2_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_bos_adding_tokenizer_is_not_doubled(gpt2_tokenizer):
    """A tokenizer that adds BOS by itself (Llama-style) still gets exactly one BOS."""
    tokenizer = gpt2_tokenizer.__class__.from_pretrained(gpt2_tokenizer.name_or_path, add_bos_token=True)
    assert tokenizer("Hi")["input_ids"][0] == tokenizer.bos_token_id  # it does add BOS on its own
    (doc,) = tokenize_documents(["Hi there"], tokenizer)
    assert doc[0] == tokenizer.bos_token_id and doc[1] != tokenizer.bos_token_id


def test_max_tokens_caps_the_text(gpt2_tokenizer):
    docs = tokenize_documents(["word " * 100, "more " * 100], gpt2_tokenizer, max_tokens=150)
    assert sum(map(len, docs)) == 150


def test_jsonl_source_reads_the_text_column(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(["one doc", "", "two"])))
    assert load_documents(str(path)) == ["one doc", "two"]
    assert load_documents(str(path), concat=True) == ["one doc\ntwo"]
    with pytest.raises(DataError, match="no column 'body'"):
        load_documents(str(path), column="body")


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_empty_text_is_an_error_naming_the_file(tmp_path, content):
    path = tmp_path / "held_out.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=f"{path} is empty"):
        load_documents(str(path))


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_documents(str(tmp_path / "missing.txt"))


# ------------------------------------------------------------------------------------ logits scored in chunks


def whole_batch_perplexity(model, documents, window, stride, batch_size) -> float:
    """The scoring before chunking (whole-batch fp32 logits): the reference the chunked scoring must equal."""
    spans = [span for ids in documents for span in windows(ids, window, stride)]
    nll, count = 0.0, 0
    for i in range(0, len(spans), batch_size):
        input_ids, mask, labels = _batch_tensors(spans[i : i + batch_size])  # the batching is not under test
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=mask).logits
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum").item()
        count += int((labels[:, 1:] != -100).sum())
    return math.exp(nll / count)


def record_logit_shapes(model) -> list[torch.Size]:
    shapes = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, output: shapes.append(output.shape))
    return shapes


def test_chunked_logits_equal_whole_batch_logits_and_stay_within_the_chunk(tiny_llama, gpt2_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    docs = tokenize_documents(["Once upon a time there was a king. " * 9, "A short one.", "Two words."],
                              gpt2_tokenizer)
    expected = whole_batch_perplexity(model, docs, window=32, stride=16, batch_size=3)
    vocab = model.config.vocab_size
    shapes = record_logit_shapes(model)
    result = perplexity(model, docs, window=32, stride=16, batch_size=3, logits_chunk_bytes=4 * vocab * 5)
    assert result["token_perplexity"] == pytest.approx(expected, rel=1e-5)
    assert shapes and max(shape.numel() for shape in shapes) <= 5 * vocab  # never a window's (32) logits at once
    assert chunk_tokens(128_256) == 523 and chunk_tokens(49_152) == 1365  # 256 MiB of fp32 logits per chunk


@pytest.mark.parametrize("model_type,setting", [
    ("gemma2", {"final_logit_softcapping": 0.5}),  # cap x tanh(logits / cap)
    ("cohere", {"logit_scale": 4.0}),
    ("granite", {"logits_scaling": 0.25}),
    ("llama", {}),
])
def test_chunked_scoring_applies_the_models_logit_scaling_and_softcapping(model_type, setting, capsys):
    from tiny_models import VOCAB, random_model

    model = random_model(model_type, kv_heads=2)
    for key, value in setting.items():
        setattr(model.config, key, value)
        if hasattr(model, key):  # Cohere keeps its own copy of logit_scale
            setattr(model, key, value)
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, VOCAB, (length,), generator=generator).tolist() for length in (40, 17)]
    expected = whole_batch_perplexity(model, docs, window=16, stride=8, batch_size=2)
    shapes = record_logit_shapes(model)
    result = perplexity(model, docs, window=16, stride=8, batch_size=2, logits_chunk_bytes=4 * VOCAB * 3)
    assert result["token_perplexity"] == pytest.approx(expected, rel=1e-5)
    assert max(shape.numel() for shape in shapes) <= 3 * VOCAB  # the chunked path, not the fallback
    assert "whole-batch logits" not in capsys.readouterr().err


def test_a_head_it_does_not_know_falls_back_to_the_plain_forward(tiny_llama, gpt2_tokenizer, capsys):
    from transformers import LlamaForCausalLM

    class Tempered(LlamaForCausalLM):
        """Changes its logits after the head in a way the chunked path cannot know."""

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    model = Tempered.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    docs = tokenize_documents(["The quick brown fox jumps over the lazy dog. " * 5], gpt2_tokenizer)
    expected = whole_batch_perplexity(model, docs, window=32, stride=16, batch_size=2)
    result = perplexity(model, docs, window=32, stride=16, batch_size=2, logits_chunk_bytes=4 * 10)
    assert result["token_perplexity"] == pytest.approx(expected, rel=1e-5)
    assert "whole-batch logits" in capsys.readouterr().err

"""Our GGUF exports run by llama.cpp itself (llama-cpp-python, built from source on the CPU):
its tokenizer reading our metadata gives the Hugging Face tokenizer's ids on the whole wiki test
split (SmolLM2: byte-level BPE, pre-tokenizer "smollm"; Gemma-3: sentencepiece-style), and its
perplexity of each type is within 1% of llmquant's evaluation of the same quantized weights (the
file dequantized by transformers' GGUF loader). llama.cpp rounds activations to 8 bits in its
quantized dot products, which is why the two are close rather than equal."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from .interop_common import (GGUF_TYPES, SEQLEN, WINDOWS, gguf_export, gguf_in_transformers, max_abs_difference,
                            record, relative, versions)

pytestmark = [pytest.mark.interop, pytest.mark.llama_cpp]

MAX_PERPLEXITY_RATIO = 0.01


def llama(path, **options):
    from llmquant.gguf_export.llama_cpp_runner import open_in_llama_cpp

    return open_in_llama_cpp(path, n_threads=2, **options)


def llama_cpp_logits(llm, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] fp32 logits of one sequence evaluated from an empty cache."""
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_llama_cpp_tokenizes_the_wiki_test_split_as_the_hf_tokenizer(checkpoints, model):
    from llmquant.data import corpus_text
    from llmquant.models import load_fp_model

    _, tokenizer = load_fp_model(model)
    path = gguf_export(checkpoints, model, "q8_0")
    llm = llama(path, vocab_only=True)
    try:
        text = corpus_text("wiki", "test")
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()
    ours = tokenizer(text, add_special_tokens=False).input_ids
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    record(format=f"GGUF tokenizer ({model})", loader="llama-cpp-python", loads=True,
           tokens=len(ours), tokens_equal_on_wiki_test=ours == theirs, first_difference=first,
           versions=versions("llama_cpp_python"))
    assert len(ours) > 100_000
    assert ours == theirs, f"first difference at token {first}"


@pytest.mark.parametrize("tensor_type", GGUF_TYPES)
def test_llama_cpp_perplexity_is_within_one_percent_of_ours(reference, checkpoints, tensor_type):
    from llmquant.data import evaluation_windows, tokenize_corpus

    path = gguf_export(checkpoints, "smollm2-135m", tensor_type)
    ours = gguf_in_transformers(path, reference)
    windows = evaluation_windows(tokenize_corpus(reference.tokenizer, "wiki", "test"), SEQLEN, None, WINDOWS)
    llm = llama(path, n_ctx=SEQLEN, n_batch=SEQLEN, logits_all=True)
    try:
        their_logits = torch.stack([llama_cpp_logits(llm, row.tolist()) for row in reference.batch])
        nll = sum(F.cross_entropy(llama_cpp_logits(llm, w.tolist())[:-1], w[1:], reduction="sum").item()
                  for w in windows.input_ids)
    finally:
        llm.close()
    theirs_ppl = math.exp(nll / (windows.input_ids.shape[0] * (SEQLEN - 1)))
    difference = max_abs_difference(their_logits, ours["logits"])
    record(format=f"GGUF {tensor_type}", loader="llama-cpp-python", loads=True, max_logit_difference=difference,
           max_logit=float(ours["logits"].abs().max()), perplexity_ours=ours["perplexity"],
           perplexity_theirs=theirs_ppl, perplexity_fp=reference.perplexity, versions=versions("llama_cpp_python"))
    assert abs(relative(theirs_ppl, ours["perplexity"])) < MAX_PERPLEXITY_RATIO, (ours["perplexity"], theirs_ppl)

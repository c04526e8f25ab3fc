"""Our GGUF exports loaded by transformers' own GGUF loader (which dequantizes to float): it loads
each type, its tokenizer read from the file gives the Hugging Face tokenizer's ids on the whole wiki
test split, and q8_0 stays within 1% of full-precision perplexity."""
import pytest

from .interop_common import GGUF_TYPES, gguf_export, gguf_in_transformers, max_abs_difference, record, relative, versions

pytestmark = pytest.mark.interop

MAX_Q8_0_PERPLEXITY_RATIO = 0.01


@pytest.mark.parametrize("tensor_type", GGUF_TYPES)
def test_gguf_export_loads_in_transformers(reference, checkpoints, tensor_type):
    path = gguf_export(checkpoints, "smollm2-135m", tensor_type)
    measured = gguf_in_transformers(path, reference)
    record(format=f"GGUF {tensor_type}", loader="transformers GGUF loader (dequantized to fp32)", loads=True,
           tokens_equal_on_wiki_test=measured["tokens_equal"],
           max_logit_difference_vs_fp=max_abs_difference(measured["logits"], reference.logits),
           perplexity_theirs=measured["perplexity"], perplexity_fp=reference.perplexity,
           versions=versions("transformers", "gguf", "torch"))
    assert measured["tokens_equal"]
    if tensor_type == "q8_0":
        assert abs(relative(measured["perplexity"], reference.perplexity)) < MAX_Q8_0_PERPLEXITY_RATIO
    else:  # 4-bit: a working model (SmolLM2's weights came from a 4-bit file, so near full precision)
        assert 0.98 * reference.perplexity < measured["perplexity"] < 2 * reference.perplexity

"""Our NF4 / FP4 checkpoints (double quantization) loaded by transformers + bitsandbytes on the CPU,
compared with llmquant.load.

bitsandbytes dequantizes into the checkpoint's compute dtype (fp16 here) where llmquant computes in
fp32, so its weights equal ours up to fp16 rounding and logits differ by that rounding only.
"""
import pytest
import torch

from .interop_common import (logits_of, logits_of_ours, max_abs_difference, perplexity_of, perplexity_of_ours,
                             record, relative, versions)
from llmquant import QuantConfig

pytestmark = pytest.mark.interop

CASES = {
    "NF4 double-quant": QuantConfig(method="nf4", double_quant=True),
    "FP4 double-quant": QuantConfig(method="fp4", double_quant=True),
}
# fp16 rounding of every dequantized weight moves SmolLM2's logits (|logit| up to ~45) by about one
# unit at the worst token (NF4: 1.24 measured); a wrong code, table or block scale moves them by many.
MAX_LOGIT_DIFFERENCE = 2.0
MAX_PERPLEXITY_RATIO = 0.01


@pytest.mark.parametrize("case", CASES)
def test_4bit_checkpoint_loads_in_transformers_bitsandbytes(reference, checkpoints, case):
    import bitsandbytes as bnb
    import llmquant
    from transformers import AutoModelForCausalLM

    folder = checkpoints / case.split()[0].lower()
    if not folder.exists():
        llmquant.quantize("smollm2-135m", CASES[case], progress=False).save(folder)
    ours = llmquant.load(folder)
    theirs = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu").eval()

    quantized = [(name, m) for name, m in ours.named_modules() if hasattr(m, "dequantized_weight")]
    assert len(quantized) == 30 * 7
    for name, our_module in quantized:  # before any forward: bitsandbytes repacks CPU weights on first use
        their_module = theirs.get_submodule(name)
        assert isinstance(their_module, bnb.nn.Linear4bit), name
        state = their_module.weight.quant_state
        assert state.nested and state.blocksize == 64 and state.quant_type == case[:3].lower(), name
        their_weight = bnb.functional.dequantize_4bit(their_module.weight.data, state).float()
        assert torch.allclose(their_weight, our_module.dequantized_weight(), rtol=2**-10, atol=1e-6), name

    our_logits, their_logits = logits_of_ours(ours, reference.batch), logits_of(theirs, reference.batch)
    difference = max_abs_difference(our_logits, their_logits)
    ours_ppl, theirs_ppl = perplexity_of_ours(ours, reference.tokenizer), perplexity_of(theirs, reference.tokenizer)
    record(format=f"bitsandbytes {case}", loader="transformers + bitsandbytes (CPU)", loads=True,
           max_logit_difference=difference, max_logit=float(our_logits.abs().max()), perplexity_ours=ours_ppl,
           perplexity_theirs=theirs_ppl, perplexity_fp=reference.perplexity,
           versions=versions("transformers", "bitsandbytes", "torch"))
    assert difference < MAX_LOGIT_DIFFERENCE, difference
    assert abs(relative(theirs_ppl, ours_ppl)) < MAX_PERPLEXITY_RATIO, (ours_ppl, theirs_ppl)

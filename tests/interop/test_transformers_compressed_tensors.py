"""Our W8A8 checkpoints (compressed-tensors "int-quantized") loaded by transformers through the
compressed-tensors library, the stand-in for vLLM here, compared with llmquant.load.

compressed-tensors decompresses the int8 weights to float and fake-quantizes each linear's input
(quantize-dequantize) in the forward pass. Its dynamic per-token scale is max|x| / 127.5 where
llmquant's (as vLLM's int8 kernels) is max|x| / 127: the same checkpoint, a different rounding of
the activations at run time. So the weights and, for static checkpoints, the stored input scales
must be equal, logits with activation quantization switched off must be equal, and full W8A8
perplexity must agree within 1%.
"""
import pytest
import torch

from .interop_common import (logits_of, max_abs_difference, perplexity_of, record, relative, versions,
                             weights_only_difference)
from llmquant import Calibration, QuantConfig

pytestmark = pytest.mark.interop

CASES = {
    "dynamic per-token": QuantConfig(method="w8a8"),
    "static per-tensor": QuantConfig(method="w8a8", act_quant="static"),
}
SMALL_CALIBRATION = Calibration(nsamples=4, seqlen=256)
MAX_PERPLEXITY_RATIO = 0.01
# fp32 logits of the same fp32 weights computed by two matmul paths
MAX_WEIGHT_ONLY_LOGIT_DIFFERENCE = 1e-3
# static checkpoints round activations with the same stored scale on both sides: only the int32
# accumulation (ours) vs fp32 accumulation (theirs) differs
MAX_STATIC_LOGIT_DIFFERENCE = 0.05


@pytest.mark.parametrize("case", CASES)
def test_w8a8_checkpoint_loads_in_transformers_compressed_tensors(reference, checkpoints, case):
    import llmquant
    from transformers import AutoModelForCausalLM

    config = CASES[case]
    folder = checkpoints / f"w8a8-{case.split()[0]}"
    if not folder.exists():
        calib = SMALL_CALIBRATION if config.act_quant == "static" else None
        llmquant.quantize("smollm2-135m", config, calib=calib, progress=False).save(folder)
    ours = llmquant.load(folder)
    theirs = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu").eval()
    their_logits = logits_of(theirs, reference.batch)  # the first forward decompresses the weights
    our_logits = logits_of(ours, reference.batch)

    quantized = [(name, m) for name, m in ours.named_modules() if hasattr(m, "dequantized_weight")]
    assert len(quantized) == 30 * 7
    strategy = "tensor" if config.act_quant == "static" else "token"
    for name, our_module in quantized:
        their_module = theirs.get_submodule(name)
        assert their_module.quantization_scheme.input_activations.strategy == strategy, name
        assert torch.equal(their_module.weight.data, our_module.dequantized_weight()), name
        if config.act_quant == "static":
            assert torch.equal(their_module.input_scale.data.reshape(1), our_module.input_scale), name

    weights_only = weights_only_difference(theirs, ours, reference)

    difference = max_abs_difference(our_logits, their_logits)
    ours_ppl, theirs_ppl = perplexity_of(ours, reference.tokenizer), perplexity_of(theirs, reference.tokenizer)
    record(format=f"W8A8 {case} (compressed-tensors int-quantized)", loader="transformers + compressed-tensors",
           loads=True, max_logit_difference=difference, max_logit_difference_weights_only=weights_only,
           max_logit=float(our_logits.abs().max()), perplexity_ours=ours_ppl, perplexity_theirs=theirs_ppl,
           perplexity_fp=reference.perplexity, versions=versions("transformers", "compressed-tensors", "torch"))
    assert weights_only < MAX_WEIGHT_ONLY_LOGIT_DIFFERENCE, weights_only
    if config.act_quant == "static":
        assert difference < MAX_STATIC_LOGIT_DIFFERENCE, difference
    assert abs(relative(theirs_ppl, ours_ppl)) < MAX_PERPLEXITY_RATIO, (ours_ppl, theirs_ppl)

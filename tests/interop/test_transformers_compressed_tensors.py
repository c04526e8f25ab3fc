"""Our compressed-tensors checkpoints loaded by transformers through the compressed-tensors library,
the stand-in for vLLM here, compared with llmquant.load: W8A8 ("int-quantized") on SmolLM2, and
FP8 ("float-quantized", per channel and per block) on tiny random models, dense and MoE.

For W8A8, compressed-tensors decompresses the int8 weights to float and fake-quantizes each linear's
input (quantize-dequantize) in the forward pass. Its dynamic per-token scale is max|x| / 127.5 where
llmquant's (as vLLM's int8 kernels) is max|x| / 127: the same checkpoint, a different rounding of
the activations at run time. So the weights and, for static checkpoints, the stored input scales
must be equal, logits with activation quantization switched off must be equal, and full W8A8
perplexity must agree within 1%. Static checkpoints also run each of their linears on the input ours
got: equal up to accumulation order. Their whole-model figures are not a loader comparison on their
own: SmolLM2's static per-tensor input steps are wide (down_proj: 25, for inputs up to 2e4), and
fp32 noise that flips one code cascades (our own model under a 1e-6 nudge of its embeddings: logits
by ~10, perplexity by a few %), so their perplexity bound widens to twice that measured shift.
"""
import pytest
import torch

from .interop_common import (logits_of, logits_of_ours, max_abs_difference, perplexity_of, perplexity_of_ours,
                             perplexity_shift_under_nudge, record, relative, versions,
                             weights_only_difference, worst_layer_difference)
from llmquant import Calibration, QuantConfig
from llmquant.arch.moe import ExpertList

from conftest import tiny_model

pytestmark = pytest.mark.interop

CASES = {
    "dynamic per-token": QuantConfig(method="w8a8"),
    "static per-tensor": QuantConfig(method="w8a8", act_quant="static"),
}
SMALL_CALIBRATION = Calibration(nsamples=4, seqlen=256)
MAX_PERPLEXITY_RATIO = 0.01
# fp32 logits of the same fp32 weights computed by two matmul paths
MAX_WEIGHT_ONLY_LOGIT_DIFFERENCE = 1e-3
# static checkpoints round activations with the same stored scale on both sides: each linear on the
# same input differs by the int32 accumulation (ours) vs fp32 accumulation (theirs) only
MAX_STATIC_LAYER_DIFFERENCE = 1e-5  # relative to the layer's max |output|
TINY_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


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
    our_logits = logits_of_ours(ours, reference.batch)

    static = config.act_quant == "static"
    quantized = [(name, m) for name, m in ours.named_modules() if hasattr(m, "dequantized_weight")]
    assert len(quantized) == 30 * 7
    strategy = "tensor" if static else "token"
    for name, our_module in quantized:
        their_module = theirs.get_submodule(name)
        assert their_module.quantization_scheme.input_activations.strategy == strategy, name
        assert torch.equal(their_module.weight.data, our_module.dequantized_weight()), name
        if static:
            assert torch.equal(their_module.input_scale.data.reshape(1), our_module.input_scale), name

    weights_only = weights_only_difference(theirs, ours, reference)
    difference = max_abs_difference(our_logits, their_logits)
    ours_ppl, theirs_ppl = perplexity_of_ours(ours, reference.tokenizer), perplexity_of(theirs, reference.tokenizer)
    noise = abs(perplexity_shift_under_nudge(ours, reference.tokenizer, ours_ppl)) if static else 0.0
    layer_difference, worst_layer = worst_layer_difference(theirs, ours, reference.batch) if static else (0.0, "")
    record(format=f"W8A8 {case} (compressed-tensors int-quantized)", loader="transformers + compressed-tensors",
           loads=True, max_logit_difference=difference, max_logit_difference_weights_only=weights_only,
           max_logit=float(our_logits.abs().max()), perplexity_ours=ours_ppl, perplexity_theirs=theirs_ppl,
           perplexity_fp=reference.perplexity, versions=versions("transformers", "compressed-tensors", "torch"),
           **({"max_layer_difference": layer_difference, "perplexity_shift_under_nudge": noise} if static else {}))
    assert weights_only < MAX_WEIGHT_ONLY_LOGIT_DIFFERENCE, weights_only
    if static:
        assert layer_difference < MAX_STATIC_LAYER_DIFFERENCE, (layer_difference, worst_layer)
    assert abs(relative(theirs_ppl, ours_ppl)) < max(MAX_PERPLEXITY_RATIO, 2 * noise), (ours_ppl, theirs_ppl, noise)


@pytest.mark.parametrize("kind,method", [("llama", "fp8"), ("llama", "fp8-block"), ("qwen3_moe", "fp8")])
def test_transformers_loads_the_fp8_checkpoints(kind, method, tmp_path):
    """transformers reads compressed-tensors float-quantized through the compressed-tensors package:
    dense linears as FP8 (activations rounded per token for W8A8-FP8), and MoE experts by
    dequantizing each expert's FP8 weight into its fused 3-D tensors as it loads."""
    import llmquant
    from transformers import AutoModelForCausalLM

    config = QuantConfig(method=method, group_size=32 if method == "fp8-block" else None, dtype="float32")
    folder = llmquant.quantize(tiny_model(kind), config, progress=False).save(tmp_path / "ckpt")
    ours = llmquant.load(folder, device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ours(TINY_IDS).logits, theirs(TINY_IDS).logits
    if kind == "llama":
        assert torch.allclose(a, b, atol=1e-4)
    else:
        experts = next(m for m in ours.modules() if isinstance(m, ExpertList))
        fused = theirs.model.layers[1].mlp.experts
        for e, expert in enumerate(experts):
            assert torch.equal(fused.gate_up_proj[e, :32], expert.gate_proj.dequantized_weight())
            assert torch.equal(fused.down_proj[e], expert.down_proj.dequantized_weight())
        # transformers runs the dequantized experts on unrounded activations; llmquant rounds them
        assert (a - b).abs().max() < 0.02 * a.abs().max()

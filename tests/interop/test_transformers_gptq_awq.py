"""Our GPTQ and AWQ GEMM checkpoints loaded by transformers' own path (`from_pretrained` on the
folder, which hands GPTQ and AWQ to gptqmodel in transformers 5), compared with llmquant.load.

gptqmodel picks a kernel per checkpoint; on a CPU its pure-torch ones (`gptq_torch`, `torch_awq`)
take every bit width and group size, so the comparisons ask for them; `auto` (what a user gets
without asking) is run too where it can load the checkpoint, and records which kernel it chose.
"""
import pytest
import torch

from .interop_common import (logits_of, logits_of_ours, max_abs_difference, perplexity_of, perplexity_of_ours,
                             record, relative, versions, with_our_weights,
                             assert_gptq_torch_weights_are_ours_in_fp16)
from llmquant import Calibration, QuantConfig

pytestmark = pytest.mark.interop

GPTQ_CASES = {
    "w4 g128 sym": QuantConfig(method="rtn", bits=4, group_size=128),
    "w4 g128 asym": QuantConfig(method="rtn", bits=4, group_size=128, sym=False),
    "w4 g128 act-order (GPTQ)": QuantConfig(method="gptq", bits=4, group_size=128, act_order=True),
    "w4 per-channel": QuantConfig(method="rtn", bits=4, group_size=-1),
    "w2 g64 asym": QuantConfig(method="rtn", bits=2, group_size=64, sym=False),
    "w3 g64 sym": QuantConfig(method="rtn", bits=3, group_size=64),
    "w8 g128 sym": QuantConfig(method="rtn", bits=8, group_size=128),
}
AWQ_CASES = {
    "w4 g64 asym": QuantConfig(method="rtn", bits=4, group_size=64, sym=False, format="awq"),
    "w4 g64 sym": QuantConfig(method="rtn", bits=4, group_size=64, format="awq"),
}
SMALL_CALIBRATION = Calibration(nsamples=4, seqlen=256)
# Their torch kernels compute in the checkpoint's fp16 (the dequantized weights; for AWQ the
# activations too) where llmquant's reference ops dequantize into fp32: logits then differ by
# rounding only. A layout error (a zero point off by one, a wrong group or nibble order) moves logits
# by whole units and perplexity by far more than these bounds.
MAX_LOGIT_DIFFERENCE = 2.0
MAX_PERPLEXITY_RATIO = 0.01
# two fp32 matmul paths over the same fp32 weights: summation order only
MAX_SAME_WEIGHTS_LOGIT_DIFFERENCE = 1e-3
LOADERS = "transformers", "gptqmodel", "optimum", "torch"


def write(checkpoints, name: str, config: QuantConfig):
    import llmquant

    folder = checkpoints / name.replace(" ", "-").replace("(", "").replace(")", "")
    if not folder.exists():
        calib = SMALL_CALIBRATION if config.method == "gptq" else None
        llmquant.quantize("smollm2-135m", config, calib=calib, progress=False).save(folder)
    return folder


def load_theirs(folder, kind: str, backend: str):
    from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig

    loading = {"gptq": GPTQConfig, "awq": AwqConfig}[kind](bits=4, backend=backend)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu",
                                                quantization_config=loading).eval()


def kernels_in_blocks(model) -> set[str]:
    """Class names of the linears inside the decoder blocks (plain nn.Linear would mean unquantized)."""
    return {type(m).__name__ for name, m in model.named_modules()
            if ".layers." in name and name.rsplit(".", 1)[-1].endswith("_proj")}


def compare(reference, folder, kind: str, case: str, backend: str, expect_kernel: str | None):
    import llmquant

    ours = llmquant.load(folder)
    theirs = load_theirs(folder, kind, backend)
    kernels = kernels_in_blocks(theirs)
    assert len(kernels) == 1 and "Linear" != next(iter(kernels)), kernels
    if expect_kernel is not None:
        assert kernels == {expect_kernel}, kernels
    our_logits, their_logits = logits_of_ours(ours, reference.batch), logits_of(theirs, reference.batch)
    difference = max_abs_difference(our_logits, their_logits)
    ours_ppl = perplexity_of_ours(ours, reference.tokenizer)
    theirs_ppl = perplexity_of(theirs, reference.tokenizer)
    record(format=f"{kind.upper()} {case}", loader=f"transformers + gptqmodel ({backend}: {next(iter(kernels))})",
           loads=True, max_logit_difference=difference, max_logit=float(our_logits.abs().max()),
           perplexity_ours=ours_ppl, perplexity_theirs=theirs_ppl, perplexity_fp=reference.perplexity,
           versions=versions(*LOADERS))
    assert difference < MAX_LOGIT_DIFFERENCE, difference
    assert abs(relative(theirs_ppl, ours_ppl)) < MAX_PERPLEXITY_RATIO, (ours_ppl, theirs_ppl)
    return ours, theirs, their_logits


@pytest.mark.parametrize("case", GPTQ_CASES)
def test_gptq_checkpoint_loads_in_transformers_with_our_logits_and_perplexity(reference, checkpoints, case):
    folder = write(checkpoints, f"gptq {case}", GPTQ_CASES[case])
    ours, theirs, their_logits = compare(reference, folder, "gptq", case, "gptq_torch", "TorchLinear")
    # TorchLinear multiplies its fp16-dequantized weights in fp32: its logits are those of the FP
    # model carrying our weights rounded to fp16, whatever the bits, group size or act-order
    assert_gptq_torch_weights_are_ours_in_fp16(theirs, ours)
    same_weights = with_our_weights(reference.model, ours, weight_dtype=torch.float16)
    difference = max_abs_difference(their_logits, logits_of(same_weights, reference.batch))
    assert difference < MAX_SAME_WEIGHTS_LOGIT_DIFFERENCE, difference


@pytest.mark.parametrize("case", AWQ_CASES)
def test_awq_checkpoint_loads_in_transformers_with_our_logits_and_perplexity(reference, checkpoints, case):
    folder = write(checkpoints, f"awq {case}", AWQ_CASES[case])
    compare(reference, folder, "awq", case, "torch_awq", "AwqTorchLinear")


def test_default_kernel_choice_loads_a_dividing_group_size(reference, checkpoints):
    """What a user gets without naming a backend: gptqmodel's own choice of CPU kernel, on
    checkpoints whose group size divides every in_features (its AVX512 kernels take no partial
    groups, see eval/INTEROP.md)."""
    compare(reference, write(checkpoints, "awq w4 g64 asym", AWQ_CASES["w4 g64 asym"]), "awq", "w4 g64 asym",
            "auto", None)
    gptq_g64 = QuantConfig(method="rtn", bits=4, group_size=64, sym=False)
    compare(reference, write(checkpoints, "gptq w4 g64 asym", gptq_g64), "gptq", "w4 g64 asym", "auto", None)

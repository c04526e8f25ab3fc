"""NF4 / FP4 and double quantization: tables, bit-for-bit agreement with bitsandbytes, error bounds,
the bitsandbytes checkpoint layout read back by llmquant and by transformers."""
import json

import bitsandbytes.functional as bnb
import pytest
import torch
from torch import nn

import llmquant
from llmquant import QuantConfig
from llmquant.inference import ops
from llmquant.errors import ConfigError
from llmquant.formats import FORMATS
from llmquant.grid.codebook import (NF4_TABLE, CodebookGrid, NestedAbsmax, blockwise_quantize, dynamic_table,
                                    four_bit_table)
from test_cpu_fast import relative_error

# The NF4 table as printed in the QLoRA paper (appendix E), to 4 decimals.
PAPER_NF4 = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
             0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]


def test_tables_are_bitsandbytes_own():
    assert torch.equal(four_bit_table("nf4"), bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(four_bit_table("fp4"), bnb.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_table(), bnb.create_dynamic_map())
    assert torch.allclose(torch.tensor(NF4_TABLE), torch.tensor(PAPER_NF4), atol=5e-5)
    # FP4: sign bit 3, two exponent bits (bitsandbytes counts them downward: field e is 2^(4 - e)), one
    # mantissa bit, a subnormal 0.0625 at e = 0; normalized by its largest value, 12.
    fp4 = four_bit_table("fp4") * 12
    for code in range(16):
        sign = -1 if code & 8 else 1
        exponent, mantissa = (code >> 1) & 3, code & 1
        value = mantissa * 0.0625 if exponent == 0 else 2 ** (4 - exponent) * (1 + mantissa / 2)
        assert fp4[code] == sign * value, code


def _weights(smollm2):
    model, _ = smollm2
    layer = model.model.layers[0]
    torch.manual_seed(0)
    return {
        "q_proj": layer.self_attn.q_proj.weight.detach(),
        "down_proj": layer.mlp.down_proj.weight.detach(),
        "odd": torch.randn(33, 71) * 0.05,  # a partial last block and an odd number of codes
    }


def _bnb_state(weight, quant_type, blocksize, double_quant):
    packed, state = bnb.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                                      quant_type=quant_type)
    state.dtype = torch.float16  # the storage dtype our checkpoint records
    return packed, state.as_dict(packed=True)


@pytest.mark.parametrize("quant_type,blocksize", [("nf4", 64), ("fp4", 64), ("nf4", 128), ("fp4", 32)])
def test_packed_tensors_equal_bitsandbytes(smollm2, quant_type, blocksize):
    fmt = FORMATS["bitsandbytes"]
    for double_quant in (False, True):
        config = QuantConfig(method=quant_type, group_size=blocksize, double_quant=double_quant)
        for name, weight in _weights(smollm2).items():
            ours = fmt.pack(CodebookGrid(quant_type, blocksize, double_quant).quantize(weight), config)
            packed, theirs = _bnb_state(weight, quant_type, blocksize, double_quant)
            theirs = {f"weight.{k}": v for k, v in theirs.items()}
            theirs["weight"] = packed
            assert sorted(ours) == sorted(theirs), name
            for key, tensor in theirs.items():
                assert ours[key].dtype == tensor.dtype, (name, key)
                assert ours[key].shape == tensor.shape, (name, key)
                if key == "weight.absmax" and double_quant:
                    _assert_nested_codes_match(ours[key], tensor, weight, blocksize, quant_type)
                elif key.startswith("weight.quant_state"):
                    assert json.loads(bytes(ours[key].tolist())) == json.loads(bytes(tensor.tolist())), name
                    assert torch.equal(ours[key], tensor), (name, key)
                else:
                    assert torch.equal(ours[key], tensor), (name, key)


def _assert_nested_codes_match(ours, theirs, weight, blocksize, quant_type):
    """bitsandbytes' CPU library finds the 8-bit code of an absmax by an approximate search that now
    and then returns a neighbour of the nearest code; ours is the nearest (the pure-torch backend's
    rule). Every disagreement must be such a case, and rare."""
    _, absmax = blockwise_quantize(weight, four_bit_table(quant_type), blocksize)
    nested = NestedAbsmax.quantize(absmax)
    table = dynamic_table()
    scaled = (absmax - nested.offset) / nested.nested_absmax.repeat_interleave(256)[: absmax.numel()]
    differ = ours != theirs
    assert differ.float().mean() < 0.01
    assert ((ours.long() - theirs.long()).abs()[differ] == 1).all()
    ours_distance = (table[ours.long()] - scaled).abs()
    theirs_distance = (table[theirs.long()] - scaled).abs()
    assert (ours_distance[differ] < theirs_distance[differ]).all()
    assert torch.equal(ours[~differ], theirs[~differ])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip_error_per_block_is_half_the_largest_table_gap(quant_type):
    torch.manual_seed(1)
    weight = torch.randn(48, 200) * torch.rand(48, 1)
    grid = CodebookGrid(quant_type, 64)
    quantized = grid.quantize(weight)
    flat, restored = weight.reshape(-1), quantized.dequantize().reshape(-1)
    table = four_bit_table(quant_type).sort().values
    half_gap = (table[1:] - table[:-1]).max() / 2
    for block in range(quantized.absmax.numel()):
        values = flat[block * 64:(block + 1) * 64]
        assert quantized.absmax[block] == values.abs().max()
        error = (restored[block * 64:(block + 1) * 64] - values).abs().max()
        assert error <= half_gap * quantized.absmax[block] * (1 + 1e-6)
        # the block's largest magnitude is exact: the table holds +-1
        assert restored[block * 64 + values.abs().argmax()] == values[values.abs().argmax()]


def test_double_quantization_error_is_bounded_by_the_dynamic_table_gaps():
    torch.manual_seed(2)
    absmax = torch.rand(1000) * 0.3 + 0.01
    nested = NestedAbsmax.quantize(absmax)
    assert nested.codes.dtype == torch.uint8 and nested.nested_absmax.numel() == 4
    restored = nested.dequantize()
    table = dynamic_table()
    centered = absmax - nested.offset
    for block in range(4):
        part = slice(block * 256, (block + 1) * 256)
        scale = nested.nested_absmax[block]
        assert scale == centered[part].abs().max()
        scaled = centered[part] / scale
        # the gap around each value on the dynamic table bounds its error
        upper = torch.bucketize(scaled, table).clamp(1, 255)
        half_gap = (table[upper] - table[upper - 1]) / 2
        assert ((restored[part] - absmax[part]).abs() <= half_gap * scale + 1e-7).all()
    # 8-bit constants: about 0.127 bits per weight of overhead at blocksize 64, against 0.5 in fp32
    assert abs(nested.offset - absmax.mean().item()) < 1e-7


def test_module_matches_linear_with_dequantized_weight():
    torch.manual_seed(3)
    linear = nn.Linear(160, 96, bias=True)
    fmt = FORMATS["bitsandbytes"]
    for quant_type, double_quant in (("nf4", True), ("fp4", False)):
        config = QuantConfig(method=quant_type, double_quant=double_quant, dtype="float32")
        quantized = CodebookGrid(quant_type, 64, double_quant).quantize(linear.weight.detach())
        tensors = fmt.pack(quantized, config)
        qc = fmt.quantization_config(config)
        module = fmt.build_linear("layer", qc, {k: tuple(v.shape) for k, v in tensors.items()}, True, 160, 96,
                                  torch.float32)
        module.load_state_dict({**tensors, "bias": linear.bias.detach()}, assign=True)
        assert module.blocksize == 64 and module.nested == double_quant
        assert torch.equal(module.dequantized_weight(), quantized.dequantize())
        x = torch.randn(2, 7, 160)
        expected = torch.nn.functional.linear(x, quantized.dequantize(), linear.bias.detach())
        assert torch.allclose(module(x), expected, atol=1e-5)
        assert sorted(module.state_dict()) == sorted([*tensors, "bias"])


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "nf4", "bits": 3}, "4-bit"),
    ({"method": "nf4", "group_size": 100}, "blocksize"),
    ({"method": "fp4", "sym": False}, "asymmetric"),
    ({"method": "nf4", "format": "gptq"}, "bitsandbytes format"),
    ({"method": "rtn", "format": "bitsandbytes"}, "NF4 / FP4"),
    ({"method": "rtn", "double_quant": True}, "double_quant"),
])
def test_codebook_settings_are_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**kwargs)


def test_nf4_checkpoint_loads_in_llmquant_and_transformers_and_generates(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    import copy

    qmodel = llmquant.quantize(copy.deepcopy(model), QuantConfig(method="nf4", double_quant=True, dtype="float32"),
                               tokenizer=tokenizer, progress=False)
    report = qmodel.report()
    # 4 + 8/64 + 32/(64 * 256) bits, plus 1.3 KB of tables and JSON per layer (0.1 bit on the smallest)
    assert 4.125 < report["bits_per_weight"] < 4.15
    out = qmodel.save(tmp_path / "nf4")
    ours = llmquant.load(out)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = qmodel.model(ids).logits
        with ops.use_backend("reference"):
            assert torch.allclose(ours(ids).logits, expected, atol=1e-4)
        # as loaded, the CPU runs a float16 copy of the dequantized weights (llmquant.inference.cpu.dequantized)
        fast = ours(ids).logits
        assert relative_error(fast, expected) < 5e-3
    q_proj = ours.model.layers[3].self_attn.q_proj
    assert type(q_proj).__name__ == "BnB4bitLinear" and q_proj.weight.dtype == torch.uint8
    text = tokenizer.decode(ours.generate(ids, max_new_tokens=8, do_sample=False)[0])
    assert "Paris" in text

    theirs = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu", dtype=torch.float32)
    their_q = theirs.model.layers[3].self_attn.q_proj
    assert type(their_q).__name__ == "Linear4bit"
    dequantized = bnb.dequantize_4bit(their_q.weight.data, their_q.weight.quant_state)
    assert torch.equal(dequantized.float(), q_proj.dequantized_weight())
    # bitsandbytes' CPU matmul does not compute in exact fp32 (logits differ by ~0.2), so compare the text
    assert tokenizer.decode(theirs.generate(ids, max_new_tokens=8, do_sample=False)[0]) == text

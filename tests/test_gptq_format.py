"""The GPTQ tensors, read back by a dequantizer written here from the published layout alone."""
import numpy as np
import pytest
import torch

from llmquant.algorithms.rtn import RTN
from llmquant import QuantConfig
from llmquant.formats import FORMATS
from llmquant.grid import AffineGrid


def published_gptq_dequantize(qweight, qzeros, scales, g_idx, bits):
    """w[o, i] = (q[i, o] - (z[g_idx[i], o] + 1)) * s[g_idx[i], o], where the codes of column o
    form one little-endian bit stream over qweight[:, o] (value i at bit bits*i), and the zeros
    of group g one stream over qzeros[g, :] (value o at bit bits*o)."""
    qw = qweight.numpy().astype(np.int64) & 0xFFFFFFFF
    qz = qzeros.numpy().astype(np.int64) & 0xFFFFFFFF
    in_features, out_features = g_idx.numel(), scales.shape[1]
    mask = (1 << bits) - 1

    def stream(words):
        return sum(int(word) << (32 * k) for k, word in enumerate(words))

    zeros = np.zeros((scales.shape[0], out_features), dtype=np.int64)
    for g in range(scales.shape[0]):
        s = stream(qz[g, :])
        zeros[g] = [((s >> (bits * o)) & mask) + 1 for o in range(out_features)]
    w = np.zeros((out_features, in_features), dtype=np.float64)
    sc = scales.float().numpy().astype(np.float64)
    gi = g_idx.numpy()
    for o in range(out_features):
        s = stream(qw[:, o])
        codes = np.array([(s >> (bits * i)) & mask for i in range(in_features)])
        w[o] = (codes - zeros[gi, o]) * sc[gi, o]
    return torch.from_numpy(w).float()


CASES = [(bits, gs, sym) for bits in (2, 3, 4, 8) for gs in (-1, 32, 128) for sym in (True, False)]


@pytest.mark.parametrize("bits,group_size,sym", CASES)
def test_independent_dequantization_equals_rtn_fake_quantization(bits, group_size, sym):
    torch.manual_seed(bits * 100 + group_size)
    weight = torch.randn(64, 160) * 0.02  # 160 = 128 + 32: a partial last group at group size 128
    fmt = FORMATS["gptq"]
    grid = AffineGrid(bits, sym, group_size, min_zero=0 if sym else 1)
    quantized = RTN().quantize(weight, grid)
    tensors = fmt.pack(quantized, QuantConfig(bits=bits, group_size=group_size, sym=sym))
    groups = 1 if group_size == -1 else -(-160 // group_size)
    assert tensors["qweight"].shape == (160 * bits // 32, 64) and tensors["qweight"].dtype == torch.int32
    assert tensors["qzeros"].shape == (groups, 64 * bits // 32) and tensors["qzeros"].dtype == torch.int32
    assert tensors["scales"].shape == (groups, 64) and tensors["scales"].dtype == torch.float16
    assert tensors["g_idx"].dtype == torch.int32
    expected_g_idx = torch.zeros(160) if group_size == -1 else torch.arange(160) // group_size
    assert torch.equal(tensors["g_idx"].long(), expected_g_idx.long())
    independent = published_gptq_dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits)
    assert torch.equal(independent, quantized.dequantize())


def test_symmetric_four_bit_stores_zero_seven():
    q = AffineGrid(4, True, 32).quantize(torch.randn(32, 64))
    qzeros = FORMATS["gptq"].pack(q, QuantConfig(bits=4, group_size=32))["qzeros"]
    assert (qzeros == 0x77777777).all()


def test_real_layer_round_trip(smollm2):
    model, _ = smollm2
    weight = model.model.layers[0].self_attn.k_proj.weight.detach()  # [192, 576]
    quantized = AffineGrid(4, False, 64, min_zero=1).quantize(weight)
    tensors = FORMATS["gptq"].pack(quantized, QuantConfig(bits=4, group_size=64, sym=False))
    independent = published_gptq_dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], 4)
    assert torch.equal(independent, quantized.dequantize())
    assert (independent - weight).abs().max() > 0  # it really was quantized


def test_zero_point_zero_is_refused_rather_than_wrapped():
    q = AffineGrid(4, False, -1, min_zero=0).quantize(torch.tensor([[-0.001, 0.2, 0.5, 1.0] * 8]))
    assert q.zero.min() == 0
    with pytest.raises(ValueError, match="zero point of 0"):
        FORMATS["gptq"].pack(q, QuantConfig(bits=4, group_size=-1, sym=False))

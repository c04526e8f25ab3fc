import pytest
import torch

from llmquant.storage import bitpack


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_unpack_round_trip(bits, dim):
    torch.manual_seed(bits)
    shape = [64, 96]
    values = torch.randint(0, 2**bits, shape, dtype=torch.int32)
    words = bitpack.pack(values, bits, dim)
    assert words.dtype == torch.int32
    assert words.shape[dim] == shape[dim] * bits // 32
    assert torch.equal(bitpack.unpack(words, bits, dim), values)


def test_four_bit_value_k_sits_at_shift_4k():
    values = torch.arange(8, dtype=torch.int32).reshape(8, 1) + 1  # 1..8
    word = bitpack.pack(values, 4, 0).item() & 0xFFFFFFFF
    assert [(word >> (4 * k)) & 0xF for k in range(8)] == list(range(1, 9))


def test_three_bit_matches_autogptq_word_layout():
    # AutoGPTQ's 3-bit packer, restated: 10 values in word 0 (bits 0..29), value 10 split
    # across words 0 (bits 30-31) and 1 (bit 0), values 11..20 at bits 1..30 of word 1,
    # value 21 split across words 1 (bit 31) and 2 (bits 0-1), values 22..31 at bits 2..31 of word 2.
    torch.manual_seed(0)
    v = [int(x) for x in torch.randint(0, 8, (32,))]
    w = [0, 0, 0]
    for j in range(10):
        w[0] |= v[j] << (3 * j)
    w[0] |= (v[10] << 30) & 0xFFFFFFFF
    w[1] |= (v[10] >> 2) & 1
    for j in range(10):
        w[1] |= v[11 + j] << (3 * j + 1)
    w[1] |= (v[21] << 31) & 0xFFFFFFFF
    w[2] |= (v[21] >> 1) & 3
    for j in range(10):
        w[2] |= v[22 + j] << (3 * j + 2)
    packed = bitpack.pack(torch.tensor(v, dtype=torch.int32).reshape(32, 1), 3, 0).flatten()
    assert [int(x) & 0xFFFFFFFF for x in packed] == w


def test_pack_refuses_bad_input():
    with pytest.raises(ValueError, match="multiple of 8"):
        bitpack.pack(torch.zeros(12, 1, dtype=torch.int32), 4, 0)
    with pytest.raises(ValueError, match="out of range"):
        bitpack.pack(torch.full((8, 1), 16, dtype=torch.int32), 4, 0)

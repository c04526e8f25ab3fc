"""The kernels' pointer offsets are 64-bit where M·K, K·N or M·N reach 2**31: the offset helpers every
kernel uses are evaluated at such sizes by a one-program probe under the interpreter (no tensor of
that size is allocated, no kernel reads past its memory)."""
import torch
import triton
import triton.language as tl

from llmquant_kernels._tiles import tile_offsets, transposed_tile_offsets
from llmquant_kernels.w4a16 import stream_word_offset

BLOCK = 16


@triton.jit
def _offsets_probe(tile_ptr, transposed_ptr, int32_ptr, word_ptr, shift_ptr, row0, row_stride, column0,
                   index0, lane_stride, BITS: tl.constexpr, BLOCK: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK)
    columns = column0 + tl.arange(0, BLOCK)
    here = tl.arange(0, BLOCK)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    tl.store(tile_ptr + here, tile_offsets(rows, row_stride, columns))
    tl.store(transposed_ptr + here, transposed_tile_offsets(rows, row_stride, columns))
    tl.store(int32_ptr + here, rows[:, None] * row_stride + columns[None, :])  # what 32-bit arithmetic gives
    word, shift = stream_word_offset(index0 + tl.arange(0, BLOCK)[:, None], tl.arange(0, BLOCK)[None, :],
                                     row_stride, lane_stride, BITS)
    tl.store(word_ptr + here, word)
    tl.store(shift_ptr + here, shift.to(tl.int32))


def test_tile_and_stream_offsets_are_exact_past_2_to_the_31():
    # the output tile of a 128k-vocabulary head at 20k tokens: M·N = 2.6e9
    row0, row_stride, column0 = 20_000, 131_072, 131_000
    index0, lane_stride, bits = 600_000_000, 7, 4  # value 6e8 of a 4-bit stream: its bit offset is 2.4e9
    outputs = [torch.zeros(BLOCK, BLOCK, dtype=torch.int64) for _ in range(4)]
    shifts = torch.zeros(BLOCK, BLOCK, dtype=torch.int32)
    _offsets_probe[(1,)](*outputs, shifts, row0, row_stride, column0, index0, lane_stride, BITS=bits, BLOCK=BLOCK)
    tile, transposed, int32_product, words = outputs
    rows = torch.arange(row0, row0 + BLOCK, dtype=torch.int64)
    columns = torch.arange(column0, column0 + BLOCK, dtype=torch.int64)
    expected = rows[:, None] * row_stride + columns[None, :]
    assert int(expected.max()) > 2**31
    assert not torch.equal(int32_product, expected)  # these sizes do wrap 32-bit arithmetic
    assert torch.equal(tile, expected)
    assert torch.equal(transposed, expected.t())
    bit = torch.arange(index0, index0 + BLOCK, dtype=torch.int64)[:, None] * bits
    lanes = torch.arange(BLOCK, dtype=torch.int64)[None, :]
    assert torch.equal(words, (bit // 32) * row_stride + lanes * lane_stride)
    assert torch.equal(shifts.long(), (bit % 32).expand(BLOCK, BLOCK))

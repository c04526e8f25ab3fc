import pytest
import torch

from llmquant.grid import AffineGrid


def weight(out=48, inp=200, seed=0):
    torch.manual_seed(seed)
    return torch.randn(out, inp) * 0.05


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
def test_codes_in_range_and_error_bounded(bits, sym, group_size):
    w = weight()
    grid = AffineGrid(bits, sym, group_size, min_zero=0 if sym else 1)
    q = grid.quantize(w)
    assert q.codes.min() >= 0 and q.codes.max() <= 2**bits - 1
    assert q.scale.shape == (48, grid.num_groups(200))
    assert torch.equal(q.scale, q.scale.half().float()), "scales must be exactly representable in fp16"
    g = q.group_index.long()
    # Inside the grid's range the rounding error is at most half a step (plus fp32 noise).
    lo = (0 - q.zero[:, g]) * q.scale[:, g]
    hi = (2**bits - 1 - q.zero[:, g]) * q.scale[:, g]
    inside = (w >= lo) & (w <= hi)
    err = (q.dequantize() - w).abs()
    assert (err[inside] <= q.scale[:, g][inside] / 2 * (1 + 1e-5)).all()
    if not sym:
        # The rounded zero point (and the fp16 scale) may leave the extremes up to about half
        # a step outside the grid: their error stays near one step.
        assert (err <= 1.2 * q.scale[:, g]).all()
        assert q.zero.min() >= 1


def test_symmetric_zero_is_mid_range():
    q = AffineGrid(4, True, 64).quantize(weight())
    assert (q.zero == 8).all()
    assert (AffineGrid(3, True, 64).quantize(weight()).zero == 4).all()


def test_partial_last_group_is_quantized_on_its_own():
    w = weight(inp=200)  # 200 = 3 * 64 + 8
    q = AffineGrid(4, False, 64).quantize(w)
    assert q.scale.shape[1] == 4
    tail = AffineGrid(4, False, -1).quantize(w[:, 192:])
    assert torch.equal(q.scale[:, 3:], tail.scale)
    assert torch.equal(q.codes[:, 192:], tail.codes)
    assert torch.equal(q.group_index, torch.arange(200, dtype=torch.int32) // 64)


def test_min_zero_shifts_grid_instead_of_clipping():
    # Mostly positive group: plain rounding would give zero point 0.
    w = torch.tensor([[-0.001, 0.2, 0.5, 1.0]])
    free = AffineGrid(4, False, -1, min_zero=0).quantize(w)
    assert free.zero.item() == 0
    shifted = AffineGrid(4, False, -1, min_zero=1).quantize(w)
    assert shifted.zero.item() == 1
    assert (shifted.dequantize() - w).abs().max() <= shifted.scale.item() / 2 + 1e-6


def test_all_zero_rows_do_not_divide_by_zero():
    q = AffineGrid(4, False, 32).quantize(torch.zeros(4, 64))
    assert torch.equal(q.dequantize(), torch.zeros(4, 64))


@pytest.mark.parametrize("group_size", [-1, 64])
def test_clip_search_never_raises_the_error_it_minimizes_and_clips_outliers(group_size):
    w = weight(inp=200)
    w[0, 7] = 1.0  # one outlier: the plain grid wastes its range on it
    plain = AffineGrid(4, False, group_size, min_zero=1).quantize(w)
    searched = AffineGrid(4, False, group_size, min_zero=1, clip_search=True).quantize(w)

    def err(q):
        return ((q.dequantize() - w).abs() ** 2.4).sum(dim=1)

    assert (err(searched) <= err(plain) * (1 + 1e-6)).all()
    assert err(searched).sum() < err(plain).sum()
    assert searched.scale[0, 0] < plain.scale[0, 0]


@pytest.mark.parametrize("group_size,in_features,permute", [(-1, 160, False), (32, 160, False), (64, 160, False),
                                                            (32, 160, True), (-1, 96, True)])
def test_dequantize_is_the_per_column_gather_whatever_the_group_layout(group_size, in_features, permute):
    torch.manual_seed(group_size + in_features)
    q = AffineGrid(4, False, group_size, min_zero=1).quantize(torch.randn(24, in_features))
    if permute:  # act-order: columns visit the groups out of order
        q.group_index = q.group_index[torch.randperm(in_features)]
    g = q.group_index.long()
    assert torch.equal(q.dequantize(), (q.codes.float() - q.zero[:, g].float()) * q.scale[:, g])

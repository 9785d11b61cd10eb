import math

import pytest
import torch

from kvstore.quant import outliers
from kvstore.quant.quantize import dequantize, quantize
from kvstore.quant.side import SidePlan, read, seal


def _heavy(shape, seed):
    """Gaussian with a few huge spikes (the outliers a side table should catch)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    spikes = torch.rand(*shape, generator=g) < 0.005
    return torch.where(spikes, x * 40, x)


@pytest.mark.parametrize("group,dim", [(32, -2), (16, -1)])
def test_split_restore_keeps_outliers_exact_and_bounds_the_rest(group, dim):
    x = _heavy((1, 2, 64, 32), 0)
    filled, idx, val = outliers.split(x, 0.01, group, dim, block=32)
    k = math.ceil(0.01 * 2 * 32 * 32)
    assert idx.shape == (2, k) and idx.dtype == torch.int16 and val.dtype == torch.float16
    codes, scale, zero = quantize(filled, 4, group, dim)
    y = outliers.restore(dequantize(codes, scale, zero, group, dim), idx, val, 32)
    mask = outliers.restore(torch.zeros_like(x), idx, torch.ones_like(val), 32).bool()
    assert int(mask.sum()) == 2 * k
    # outliers: exact up to fp16 rounding
    assert torch.allclose(y[mask], x[mask], rtol=2**-10, atol=0)
    # the rest: the quantizer's bound with the inliers' own scale
    s = scale.repeat_interleave(group, dim=dim).float()
    assert bool(((y - x).abs()[~mask] <= (s / 2 + x.abs() * 2**-10 + 1e-6)[~mask]).all())


def test_side_table_lowers_error_on_heavy_tails():
    x = _heavy((1, 2, 128, 64), 1)
    base = SidePlan(bits=3, group=32, dim=-2, block=32)
    with_out = SidePlan(bits=3, group=32, dim=-2, block=32, outliers=0.01)
    e0 = (read(seal(x, base), base, 64) - x).pow(2).mean()
    e1 = (read(seal(x, with_out), with_out, 64) - x).pow(2).mean()
    assert e1 < 0.5 * e0


def test_index_dtype_widens_for_big_blocks():
    assert outliers.index_dtype(32767) == torch.int16
    assert outliers.index_dtype(32768) == torch.int32
    x = _heavy((1, 8, 32, 128), 2)  # 32768 elements per block
    _, idx, _ = outliers.split(x, 0.001, 32, -2, 32)
    assert idx.dtype == torch.int32 and int(idx.max()) < 32768

"""Stated error bound (kvstore/quant/quantize.py): |x - x_hat| <= scale/2 + |x| * 2**-10 + 1e-7."""

import pytest
import torch

from kvstore.quant.quantize import CLIP_RATIOS, dequantize, quantize


def _bound(x, scale, group, dim):
    s = scale.float().repeat_interleave(group, dim=dim)
    return s / 2 + x.abs() * 2**-10 + 1e-7


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim,group", [(-2, 32), (-1, 32), (-1, 64), (-2, 128)])
def test_roundtrip_error_bound(bits, dim, group):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 3, 128, 64, generator=g) * 3 + 0.5
    x[0, 0, 5, 7] = 40.0  # an outlier inflates only its own group's scale
    codes, scale, zero = quantize(x, bits, group, dim)
    assert codes.dtype == torch.uint8 and int(codes.max()) < (1 << bits)
    assert scale.dtype == torch.float16 and zero.dtype == torch.float16
    shape = list(x.shape)
    shape[dim] //= group
    assert list(scale.shape) == shape and list(zero.shape) == shape
    xh = dequantize(codes, scale, zero, group, dim)
    err = (x - xh).abs()
    assert bool((err <= _bound(x, scale, group, dim)).all()), float((err - _bound(x, scale, group, dim)).max())


@pytest.mark.parametrize("bits,rel", [(8, 0.01), (4, 0.15), (2, 0.6)])
def test_error_shrinks_with_bits(bits, rel):
    x = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(0))
    c, s, z = quantize(x, bits, 32, -1)
    err = (dequantize(c, s, z, 32, -1) - x).abs().mean() / x.abs().mean()
    assert err < rel


def test_constant_group_and_dtypes():
    x = torch.full((1, 1, 32, 8), 1.2345, dtype=torch.bfloat16)
    c, s, z = quantize(x, 4, 32, -2)
    assert bool((c == 0).all()) and bool((s == 0).all())
    xh = dequantize(c, s, z, 32, -2, dtype=torch.bfloat16)
    assert xh.dtype == torch.bfloat16
    assert float((xh.float() - x.float()).abs().max()) <= 1.2345 * 2**-10 + 1e-7


def test_group_must_divide():
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize(torch.zeros(1, 1, 30, 8), 4, 32, -2)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dim,group", [(-1, 64), (-2, 128)])
def test_clip_never_worse_than_min_max_per_group_and_bounded(bits, dim, group):
    """clip: each group's squared error <= min-max's, and |x - x_hat| within the stated clipped bound."""
    g = torch.Generator().manual_seed(100 + bits)
    x = torch.randn(2, 3, 256, 64, generator=g) * 2 - 0.3
    x[1, 2, 9, 3] = 25.0  # an outlier: clipping it is what pays
    per_group = []
    for clip in (False, True):
        c, s, z = quantize(x, bits, group, dim, clip=clip)
        assert c.dtype == torch.uint8 and int(c.max()) < (1 << bits)
        xh = dequantize(c, s, z, group, dim)
        e = (xh - x).double().square().movedim(dim, -1)
        per_group.append(e.reshape(*e.shape[:-1], -1, group).sum(-1))
    assert bool((per_group[1] <= per_group[0]).all())
    if bits <= 3:  # where clipping pays: clearly lower error overall
        assert float(per_group[1].sum()) < 0.85 * float(per_group[0].sum())
    xt = x.movedim(dim, -1).reshape(*x.movedim(dim, -1).shape[:-1], -1, group)
    spread = (xt.amax(-1) - xt.amin(-1)).repeat_interleave(group, -1).reshape(x.movedim(dim, -1).shape)
    bound = _bound(x, s, group, dim) + (1 - CLIP_RATIOS[-1]) * spread.movedim(-1, dim) / 2
    assert bool(((x - xh).abs() <= bound).all())


def test_clip_is_a_function_of_the_group_alone():
    """A group's codes do not depend on the other groups in the call (sealing one block or eight at once)."""
    x = torch.randn(1, 3, 1024, 64, generator=torch.Generator().manual_seed(7))
    whole = quantize(x, 2, 128, -2, clip=True)
    for i in range(0, 1024, 128):
        part = quantize(x[..., i:i + 128, :], 2, 128, -2, clip=True)
        for a, b in zip(part, whole):
            sl = b[..., i:i + 128, :] if a.shape[-2] == 128 else b[..., i // 128:i // 128 + 1, :]
            assert torch.equal(a, sl)

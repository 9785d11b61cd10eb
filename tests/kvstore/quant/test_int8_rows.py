"""The INT8 window's one-call entries and readings (kvstore/quant/int8_rows.py) against the torch way, bit for bit:
`Int8Window.quantize`, `read`, and `hadamard_rows` of the rotated sides, on random and extreme inputs."""

import pytest
import torch

from kvstore.quant import int8_rows
from kvstore.quant.rotation import hadamard_rows
from kvstore.quant.window import Int8Window


def _torch_way(x, dtype, rotated):
    w = Int8Window.quantize(x)
    reads = w.read(dtype)
    return w.codes, w.scale, torch.stack([hadamard_rows(r) if t else r for r, t in zip(reads, rotated, strict=True)])


def _bits(t):
    return t.contiguous().view(-1).view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    rows, d = int(torch.randint(1, 20, (1,), generator=g)), (16, 64, 128)[seed % 3]
    magnitude = 10.0 ** int(torch.randint(-40, 7, (1,), generator=g))  # fp32 subnormals to past the fp16 range
    x = torch.randn(2, rows, 3, 1, d, generator=g) * magnitude
    m = torch.rand(x.shape, generator=g)
    x[m < 0.05], x[(m > 0.05) & (m < 0.06)] = 0.0, -0.0
    x[m > 0.99] = 7e4 if seed % 2 else -3e5  # clamped to the fp16 range before the scale
    if seed % 4 == 0:
        x[:, 0] = 0.0  # all-zero rows: scale 0, codes 0
    return x


@pytest.mark.parametrize("seed", range(60))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_call_gives_the_torch_ways_bits(seed, dtype):
    x = _inputs(seed).to(dtype)
    for rotated in ((True, True), (False, True), (True, False), (False, False)):
        got = int8_rows.entries_and_readings(x, dtype, rotated)
        assert got is not None
        for a, b in zip(got, _torch_way(x, dtype, rotated), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_value_that_is_not_finite_goes_the_torch_way(bad):
    x = torch.randn(2, 4, 3, 1, 16)
    x[1, 2, 0, 0, 5] = bad
    assert int8_rows.entries_and_readings(x, torch.float32, (True, True)) is None
    w, reads = Int8Window.entries_and_readings(x, torch.float32, (True, True))  # the torch way's own bits
    for a, b in zip((w.codes, w.scale, reads), _torch_way(x, torch.float32, (True, True)), strict=True):
        assert torch.equal(_bits(a), _bits(b))


def test_it_serves_cpu_tensors_of_the_model_dtypes_it_knows():
    x = torch.randn(2, 1, 1, 1, 8)
    rot = (True, True)
    assert int8_rows.entries_and_readings(x, torch.float32, rot) is not None
    assert int8_rows.entries_and_readings(x.bfloat16(), torch.bfloat16, rot) is not None
    assert int8_rows.entries_and_readings(x.half(), torch.float16, rot) is None
    assert int8_rows.entries_and_readings(x, torch.float16, rot) is None

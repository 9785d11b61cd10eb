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


def test_every_scale_rounds_to_the_fp16_torch_rounds_to():
    """The scale's fp16 rounding is the kernel's own (`_half_bits`): over float32 values spread across every
    fp16 binade, the subnormals and the ties (a row of one value v has scale half(v / 127), raised where short)."""
    g = torch.Generator().manual_seed(0)
    exps = torch.randint(-40, 17, (200_000,), generator=g).float()
    v = torch.rand(200_000, generator=g) * 2.0 ** exps
    halves = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    ties = (halves[:-1] + halves[1:]) / 2  # halfway between neighbouring fp16s (exact in float32)
    v = torch.cat([v, halves * 127, ties * 127, ties * 127 * (1 + 2.0 ** -23)]).clamp(max=65504.0)
    x = v.view(1, -1, 1, 1)
    got = int8_rows.entries_and_readings(x, torch.float32, (False,))
    assert got is not None
    for a, b in zip(got, _torch_way(x, torch.float32, (False,)), strict=True):
        assert torch.equal(_bits(a), _bits(b))


def test_the_kernels_fp16_rounding_is_numpys():
    """`_half_bits` and `_half_value` against numpy's float16, on every fp16 value, every tie between two
    (exact in float32: ties go to the even one) and random float32 values down to the fp32 subnormals."""
    import numpy as np

    halves = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    ties = (halves[:-1] + halves[1:]) / np.float32(2)
    rng = np.random.default_rng(0)
    rand = (rng.random(50_000) * 2.0 ** rng.integers(-150, 16, 50_000)).astype(np.float32)
    one = np.empty(1, np.float32)
    for f in np.concatenate([halves, ties, rand, np.nextafter(ties, np.float32(0)), np.nextafter(ties, np.float32(1e9))]):
        h = int8_rows._half_bits(f, one)
        assert h == f.astype(np.float16).view(np.uint16), f
        assert int8_rows._half_value(h) == np.uint16(h).view(np.float16).astype(np.float32)

"""INT8 window entries of new tokens and their attention readings in one call (CPU; bits of the torch way).

`Int8Window.quantize`, then `read`, then `hadamard_rows` for a rotated side, take about twenty small torch
ops. A batched decode pass computes them once per layer for all its rows (`NewRows.of`), on a few thousand
elements, where each op's dispatch costs more than its arithmetic. `entries_and_readings` gives the same
bits in one numba call on the input's bits (bf16 widened to float32 exactly, as `.float()`), row by row:

- scale: the row's absmax (float32), clamped to the fp16 range, divided by 127 in float32 and rounded to
  fp16 (to nearest even, as torch's `.half()`; `_half_bits`), then raised to the next fp16 where it fell short;
- code: rint(x / scale) in float32 (half to even, as `torch.round`), clamped to [-127, 127]; 0 where the
  scale is 0;
- reading: code * scale in float32, rounded to the model dtype (bf16: to nearest even, as torch); for a
  rotated side, `hadamard_rows`' butterflies on that reading's float32 value, then rounded again.

It serves only where that is what the torch way computes: CPU tensors, bf16 or float32 model dtype, every
value finite. A NaN or inf goes the torch way, whose NaN payloads are torch's own.
tests/kvstore/quant/test_int8_rows.py compares the two on random and extreme inputs.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
import torch

from kvstore.quant.quantize import FP16_MAX
from kvstore.quant.rotation import _fwht_rows

LEVELS = 127  # as window.INT8_LEVELS (symmetric codes in [-127, 127])
SERVED = (torch.bfloat16, torch.float32)  # input and model dtypes served


def entries_and_readings(x: torch.Tensor, dtype: torch.dtype, rotated: tuple[bool, ...]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """For `x` [S, ...rows, D] (S sides stacked, `rotated[s]` for each): the INT8 codes [S, ..., D], the fp16
    scales [S, ..., 1] and the readings in `dtype` [S, ..., D], bit-identical to `Int8Window.quantize(x)`, its
    `read(dtype)` and `hadamard_rows` of the sides in `rotated`. None where it does not serve (not a CPU tensor,
    a dtype other than bf16 or float32, a value that is not finite): the torch way then."""
    if not (x.device.type == "cpu" and x.dtype in SERVED and dtype in SERVED):
        return None
    shape, d = x.shape, x.shape[-1]
    bits = x.contiguous().view(torch.int16 if x.dtype == torch.bfloat16 else torch.int32).numpy().reshape(-1, d)
    ok, codes, scale, reads, bf16 = _entries(bits, x.dtype == torch.bfloat16, dtype == torch.bfloat16,
                                             bits.shape[0] // shape[0], np.asarray(rotated, dtype=np.bool_),
                                             np.float32(d ** -0.5))
    if not ok:
        return None
    out = torch.from_numpy(bf16).view(torch.bfloat16) if dtype == torch.bfloat16 else torch.from_numpy(reads)
    return (torch.from_numpy(codes).view(shape), torch.from_numpy(scale).view(torch.float16).view(*shape[:-1], 1),
            out.view(shape))


@nb.njit(cache=True, nogil=True)
def _entries(a, in_bf16, out_bf16, per_side, rotated, rot_scale):
    """`entries_and_readings` on the bits `a` [n, d] of the input (bf16 as int16, float32 as int32), row by row:
    (all finite, codes int8 [n, d], fp16 scale bits [n], float32 readings [n, d], bf16 reading bits [n or 0, d])."""
    n, d = a.shape
    codes = np.empty((n, d), np.int8)
    scale = np.empty(n, np.uint16)
    reads = np.empty((n, d), np.float32)
    bf16 = np.empty((n if out_bf16 else 0, d), np.uint16)
    x = np.empty(d, np.float32)  # the row's values, from its bits
    one = np.empty(1, np.float32)
    xbits, rbits = x.view(np.uint32), reads.view(np.uint32)
    cap = np.float32(FP16_MAX)
    for r in range(n):
        m = np.float32(0.0)
        for j in range(d):
            xbits[j] = (np.uint32(np.uint16(a[r, j])) << np.uint32(16)) if in_bf16 else np.uint32(a[r, j])
            v = abs(x[j])
            if not np.isfinite(v):
                return False, codes, scale, reads, bf16
            m = max(m, v)
        amax = min(m, cap)
        h = _half_bits(amax / np.float32(LEVELS), one)
        if _half_value(h) * np.float32(LEVELS) < amax:
            h += 1  # the next fp16 up where the rounded scale fell short
        scale[r] = h
        sc, turn = _half_value(h), rotated[r // per_side]
        for j in range(d):
            c = np.float32(0.0)
            if sc > 0:
                c = np.rint(x[j] / sc)
                c = min(max(c, np.float32(-LEVELS)), np.float32(LEVELS))
            codes[r, j] = np.int8(c)
            reads[r, j] = np.float32(codes[r, j]) * sc  # from the int8 code: a -0.0 code reads +0.0, as torch's
            if out_bf16:
                rbits[r, j] = _bf16_rounded(rbits[r, j]) & np.uint32(0xFFFF0000)
        if turn:
            _fwht_rows(reads[r:r + 1], rot_scale)
        if out_bf16:
            for j in range(d):
                b = _bf16_rounded(rbits[r, j]) if turn else rbits[r, j]
                bf16[r, j] = np.uint16(b >> np.uint32(16))
    return True, codes, scale, reads, bf16


@nb.njit(cache=True, nogil=True)
def _half_bits(f, one):
    """The fp16 nearest a finite float32 `f` in [0, 65504] (ties to even, as numpy's and torch's `.half()`), as
    bits. `one`: a float32 array of one element, scratch."""
    one[0] = f
    b = one.view(np.uint32)[0]
    e = (b >> np.uint32(23)) & np.uint32(0xFF)
    if e < 113:  # below 2**-14: an fp16 subnormal, f / 2**-24 rounded to an integer (the scaling is exact)
        return np.uint16(np.rint(f * np.float32(16777216.0)))
    mant = b & np.uint32(0x7FFFFF)
    h = ((e - np.uint32(112)) << np.uint32(10)) | (mant >> np.uint32(13))
    rest = mant & np.uint32(0x1FFF)
    if rest > 0x1000 or (rest == 0x1000 and h & np.uint32(1)):
        h += np.uint32(1)  # a carry out of the mantissa raises the exponent, as it should
    return np.uint16(h)


@nb.njit(cache=True, nogil=True)
def _half_value(h):
    """The value of fp16 bits `h` (finite, non-negative) as a float32 (exact)."""
    e, m = (h >> 10) & 0x1F, h & 0x3FF
    if e == 0:
        return np.float32(m) * np.float32(2.0 ** -24)
    return np.float32(m + 1024) * np.float32(math.ldexp(1.0, e - 25))


@nb.njit(cache=True, nogil=True)
def _bf16_rounded(b):
    """float32 bits `b` (finite) with their upper 16 bits rounded to nearest even: those are the bf16 (as torch)."""
    return b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))

"""INT8 window entries of new tokens and their attention readings in one call (CPU; bits of the torch way).

`Int8Window.quantize`, then `read`, then `hadamard_rows` for a rotated side, take about twenty small torch
ops. A batched decode pass computes them once per layer for all its rows (`NewRows.of`), on a few thousand
elements, where each op's dispatch costs more than its arithmetic. `entries_and_readings` gives the same
bits with numpy on the per-row scales and one numba kernel:

- scale: the row's absmax (float32), clamped to the fp16 range, divided by 127 in float32 and rounded to
  fp16 by numpy (to nearest even, as torch's `.half()`), then raised to the next fp16 where it fell short;
- code: rint(x / scale) in float32 (half to even, as `torch.round`), clamped to [-127, 127]; 0 where the
  scale is 0;
- reading: code * scale in float32, rounded to the model dtype (bf16: to nearest even, as torch); for a
  rotated side, `hadamard_rows`' butterflies on that reading's float32 value, then rounded by torch.

It serves only where that is what the torch way computes: CPU tensors, bf16 or float32 model dtype, every
value finite. A NaN or inf goes the torch way, whose NaN payloads are torch's own.
tests/kvstore/quant/test_int8_rows.py compares the two on random and extreme inputs.
"""

from __future__ import annotations

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
    d = x.shape[-1]
    a = x.float().contiguous().numpy().reshape(-1, d)
    amax = np.empty(a.shape[0], np.float32)
    if not _absmax_rows(a, amax, np.float32(FP16_MAX)):
        return None
    scale = (amax / np.float32(LEVELS)).astype(np.float16)
    short = scale.astype(np.float32) * np.float32(LEVELS) < amax
    scale = (scale.view(np.int16) + short).view(np.float16)  # the next fp16 up where it fell short
    codes = np.empty(a.shape, np.int8)
    reads = np.empty(a.shape, np.float32)
    bf16 = np.empty(a.shape if dtype == torch.bfloat16 else (0, d), np.uint16)
    _codes_and_readings(a, scale.astype(np.float32), codes, reads, bf16, a.shape[0] // x.shape[0],
                        np.asarray(rotated, dtype=np.bool_), np.float32(d ** -0.5))
    out = torch.from_numpy(bf16).view(torch.bfloat16) if dtype == torch.bfloat16 else torch.from_numpy(reads)
    shape = x.shape
    return torch.from_numpy(codes).view(shape), torch.from_numpy(scale).view(*shape[:-1], 1), out.view(shape)


@nb.njit(cache=True, nogil=True)
def _absmax_rows(a, amax, cap) -> bool:
    """amax[r] := min(max |a[r]|, cap); False (and amax unfinished) at the first value that is not finite."""
    n, d = a.shape
    for r in range(n):
        m = np.float32(0.0)
        for j in range(d):
            v = abs(a[r, j])
            if not np.isfinite(v):
                return False
            m = max(m, v)
        amax[r] = min(m, cap)
    return True


@nb.njit(cache=True, nogil=True)
def _bf16_rounded(b):
    """float32 bits `b` (finite) with their upper 16 bits rounded to nearest even: those are the bf16 (as torch)."""
    return b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))


@nb.njit(cache=True, nogil=True)
def _codes_and_readings(a, s, codes, reads, bf16, per_side, rotated, rot_scale) -> None:
    """Row by row: codes of `a` at scales `s` and their float32 readings; with `bf16` rows, the readings
    rounded to bf16 (as the bits of `bf16`), then for rows of a side in `rotated` the butterflies on their
    float32 values, rounded again (what `hadamard_rows` does to a bf16 reading)."""
    n, d = a.shape
    bits = reads.view(np.uint32)
    to_bf16 = bf16.shape[0] > 0
    for r in range(n):
        sc, turn = s[r], rotated[r // per_side]
        for j in range(d):
            c = np.float32(0.0)
            if sc > 0:
                c = np.rint(a[r, j] / sc)
                c = min(max(c, np.float32(-LEVELS)), np.float32(LEVELS))
            codes[r, j] = np.int8(c)
            reads[r, j] = np.float32(codes[r, j]) * sc  # from the int8 code: a -0.0 code reads +0.0, as torch's
            if to_bf16:
                bits[r, j] = _bf16_rounded(bits[r, j]) & np.uint32(0xFFFF0000)
        if turn:
            _fwht_rows(reads[r:r + 1], rot_scale)
        if to_bf16:
            for j in range(d):
                b = _bf16_rounded(bits[r, j]) if turn else bits[r, j]
                bf16[r, j] = np.uint16(b >> np.uint32(16))

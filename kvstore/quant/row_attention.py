"""`RowAttention`: the attention of a batched decode pass's rows, all of a layer's rows in one call (CPU).

A batched pass (kvstore/quant/rows.py) attends each row to its own session's keys and values. torch's SDPA
per row costs ~20 µs of dispatch and threading for ~1 µs of arithmetic, plus the torch calls that hand it its
keys (a narrow and an unbind of the decode view) and write the row's new readings into the view (a narrow
and a copy): measured at ~45 µs per row and layer, about half of a 16-row pass. Here every row of a layer
goes through one numba call that writes each row's new readings into its decode view and attends to the
view in place, through the view buffer's address.

What a row computes (each query head h, in its kv head g = h // group), reading its view in place:
- keys and values widened to float32 exactly as they are read (bf16: the bits shifted up);
- score_j = dot(q_h, k_j) * scale over keys j in [start, n): the dot's float32 sum is vectorized in a fixed
  order (the same compiled loop for every row, the order of a fixed head_dim);
- p_j = exp(score_j - max) in vectorized float32 (`_exp_shifted`, within ~1 ulp of exp), their sum in key
  order; out_h = (sum_j p_j * v_j) / sum, accumulated in key order in float32, then rounded to the model
  dtype by torch (to nearest even).

Invariants:
- A row's output is a function of its query, its keys and values [start, n) and the scale alone: not of the
  other rows, its slot, the view's capacity or anything past n. So a session's KV stays a function of its
  tokens and schedule, and a replayed batched step gives the same bits.
- A row whose values come rotated (`rotate`) has its output rotated back in float32 (the butterflies of
  `hadamard_rows`), then rounded once.
- The arithmetic is float32 throughout (no bf16 rounding of the probabilities, unlike SDPA's CPU kernel):
  within float32 error of exact attention (tests/kvstore/quant/test_row_attention.py). Its bits differ
  from SDPA's; `attention.NUMERICS` counts that.
- Bits depend on the compiled code, as torch's own CPU kernels do on the instruction set.
- A row's new readings are written before its attention reads them, rows in order: a later row of the same
  view (replay packs one session's steps as consecutive rows) sees the earlier rows' writes. `flush`
  runs every pending row; the caller flushes before anything else touches a view with a pending row.
- Only CPU buffers of bf16 or float32 (`serves`); anything else goes the per-row SDPA way.
- Rows run in parallel (`PARALLEL`: numba's OpenMP layer, as many threads as torch uses): each row is one
  thread's from start to end, so the bits do not depend on the thread count. The writes come first, in row
  order; a row reads only rows [start, n) of its buffer, before any later row's write to it.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
import torch
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

from kvstore.quant.rotation import _fwht_rows

SERVED = (torch.bfloat16, torch.float32)


def _openmp() -> bool:
    """Whether the rows of a flush run in parallel: numba's OpenMP threading layer loads here (it is thread-safe;
    its fallback, workqueue, aborts the process on concurrent launches) and nothing chose another layer."""
    if nb.config.THREADING_LAYER not in ("default", "omp"):
        return False
    try:
        from numba.np.ufunc import omppool  # noqa: F401
    except ImportError:
        return False
    nb.config.THREADING_LAYER = "omp"
    return True


PARALLEL = _openmp()  # without it the same code runs the rows one after another (the same bits)


def serves(x: torch.Tensor) -> bool:
    """Whether rows of model-dtype tensors like `x` can attend here."""
    return x.device.type == "cpu" and x.dtype in SERVED


class RowAttention:
    """One layer's rows of a batched pass: `add` each row (its decode-view buffer and length, and the readings
    to write first), `flush` to attend the pending rows; `output` is every row's attention, [R, 1, Hq, D] in
    the model dtype (rows never added: zeros)."""

    def __init__(self, query: torch.Tensor, scale: float, dtype: torch.dtype):
        # [R, Hq, D], always C-contiguous: numba compiles one kernel per array layout, and the sums' vectorized
        # order is the compiled loop's, so one layout means one order
        self.q = query.float().contiguous().view(query.shape[0], query.shape[1], query.shape[-1]).numpy()
        self.out = np.zeros(self.q.shape, np.float32)
        self.scale, self.dtype = np.float32(scale), dtype
        self.bits = np.uint16 if dtype == torch.bfloat16 else np.uint32  # the buffers' elements, as bits
        self._rows: list[int] = []
        self._bufs: list[torch.Tensor] = []  # held until flushed: the addresses below point into them
        # (address, capacity, n, start, source row or -1, rotate the output)
        self._meta: list[tuple[int, int, int, int, int, int]] = []
        self._src = np.zeros((2, 0, 0, 0), self.bits)
        self._src_given: torch.Tensor | None = None
        self._hkv = 0  # kv heads of every buffer (the first one added sets it)

    def add(self, r: int, buf: torch.Tensor, n: int, start: int = 0, src: torch.Tensor | None = None,
            src_row: int = -1, rotate: bool = False) -> None:
        """Row `r` attends to rows [start, n) of `buf` [2, 1, Hkv, capacity, D] (keys, values; contiguous, the
        model dtype); with `src` ([2, R', Hkv, 1, D], the pass's new readings) row `src_row` of it is first
        written at row n - 1 of `buf`. Rows that write share one `src` per flush. With `rotate` the row's output
        (values read in the rotated basis) goes back by `hadamard_rows`' butterflies on its float32 value, before
        the one rounding to the model dtype."""
        # the kernel trusts these checks: it reads and writes the buffer through its address, unchecked
        shape, (hq, d) = buf.shape, self.q.shape[1:]
        if (len(shape) != 5 or shape[0] != 2 or shape[1] != 1 or shape[4] != d or shape[2] != (self._hkv or shape[2])
                or hq % shape[2] or buf.dtype != self.dtype or not buf.is_cpu or not buf.is_contiguous()):
            raise ValueError(f"row attention needs contiguous [2, 1, Hkv, capacity, {d}] {self.dtype} CPU buffers "
                             f"(Hkv dividing {hq}, one Hkv per pass), got {buf.dtype}{list(shape)}")
        if not 0 <= r < len(self.q) or not 0 <= start < n <= shape[3]:
            raise ValueError(f"row {r} of {len(self.q)}: rows [{start}, {n}) do not fit a buffer of {shape[3]}")
        if src is not None and src is not self._src_given and (
                src.dtype != self.dtype or src.dim() != 5 or src.shape[0] != 2 or src.shape[2:] != (shape[2], 1, d)):
            raise ValueError(f"new readings [2, R, {shape[2]}, 1, {d}] {self.dtype}, got {src.dtype}{list(src.shape)}")
        if src is not None and not 0 <= src_row < src.shape[1]:
            raise ValueError(f"no row {src_row} in new readings of {src.shape[1]} rows")
        self._hkv = shape[2]
        if src is not None and src is not self._src_given:
            self.flush()  # pending rows write from the source they were added with
            self._src_given = src
            s = src.contiguous()
            self._src_tensor = s  # kept alive while its numpy view is used
            self._src = s.view(torch.int16 if self.bits is np.uint16 else torch.int32).numpy().view(
                self.bits).reshape(2, s.shape[1], s.shape[2], s.shape[-1])
        self._rows.append(r)
        self._bufs.append(buf)
        self._meta.append((buf.data_ptr(), buf.shape[-2], n, start, src_row if src is not None else -1, int(rotate)))

    def flush(self) -> None:
        """Write and attend every pending row, in the order added."""
        if not self._rows:
            return
        rows = np.asarray(self._rows, np.int64)
        meta = np.asarray(self._meta, np.int64)
        hkv = self._hkv
        kernel = _attend_bf16 if self.bits is np.uint16 else _attend_f32
        if PARALLEL:
            nb.set_num_threads(min(torch.get_num_threads(), nb.config.NUMBA_NUM_THREADS))  # torch's share of cores
        kernel(self.q, self.out, rows, meta, self._src, hkv, self.scale)
        self._rows, self._bufs, self._meta = [], [], []

    def output(self) -> torch.Tensor:
        """Every row's attention [R, 1, Hq, D] in the model dtype (after `flush`)."""
        r, h, d = self.out.shape
        return torch.from_numpy(self.out).to(self.dtype).view(r, 1, h, d)


def attend_one(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, start: int = 0
               ) -> torch.Tensor:
    """One row's attention the way `RowAttention` computes it, over any key/value tensors [1, Hkv, n, D]
    (copied into a buffer): query [1, Hq, 1, D] -> [1, 1, Hq, D]."""
    att = RowAttention(query, scale, key.dtype)
    att.add(0, torch.stack((key, value)).contiguous(), key.shape[-2], start)
    att.flush()
    return att.output()


# ---- the kernel ---------------------------------------------------------------------------------------
@intrinsic
def _pointer(typingctx, address):
    """The int64 `address` as a void pointer (for `nb.carray`)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(types.int64), codegen


@intrinsic
def _float_of_bits(typingctx, bits):
    """The float32 whose bits are the uint32 `bits`."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


def _widened(x):
    """A buffer element as float32 (exact): a bf16's bits (uint16) shifted up, or a float32 as is."""


@overload(_widened)
def _widened_for(x):
    if x == types.uint16:
        return lambda x: _float_of_bits(np.uint32(x) << np.uint32(16))
    if x == types.float32:
        return lambda x: x
    return None


@nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})
def _scores(qh, kg, s, length, d, scale):
    """s[j] := (qh . kg[j * d:(j + 1) * d]) * scale for j < length (keys widened to float32); returns their max.
    Each dot's float32 sum is vectorized (`reassoc`): its order is the compiled loop's, fixed by d, the same for
    every key and row."""
    m = np.float32(-np.inf)
    for j in range(length):
        t = np.float32(0.0)
        base = j * d
        for i in range(d):
            t += qh[i] * _widened(kg[base + i])
        t = t * scale
        s[j] = t
        m = max(m, t)
    return m


# exp(x) = 2**k * exp(r), k = rint(x / ln 2), r = x - k ln 2 in [-0.35, 0.35] (ln 2 in two parts, Cody and
# Waite: k * _LN2_HI is exact), exp(r) by its Taylor terms to r**7 (truncation below 1e-8)
_EXP = tuple(np.float32(1.0 / math.factorial(i)) for i in range(8))
_LOG2E = np.float32(1.0 / math.log(2.0))
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(math.log(2.0) - 0.693359375)
_EXP_FLOOR = np.float32(-86.0)  # exp below this (< 5e-38) is taken as exp(-86): nothing a sum of terms up to 1 sees


@nb.njit(cache=True, nogil=True, fastmath={"contract"})
def _exp_shifted(s, length, m, k):
    """s[j] := exp(s[j] - m) for j < length (s[j] <= m), in vectorized float32 (within ~1 ulp of exp; `_EXP`:
    the power of two is added to the exponent bits, so x is floored at `_EXP_FLOOR` to keep the result normal).
    Returns their sum, in key order."""
    c0, c1, c2, c3, c4, c5, c6, c7 = _EXP
    for j in range(length):
        x = max(s[j] - m, _EXP_FLOOR)
        kj = np.rint(x * _LOG2E)
        r = (x - kj * _LN2_HI) - kj * _LN2_LO
        s[j] = (((((((c7 * r + c6) * r + c5) * r + c4) * r + c3) * r + c2) * r + c1) * r + c0)
        k[j] = np.int32(kj)
    bits = s.view(np.uint32)
    for j in range(length):
        bits[j] += np.uint32(k[j]) << np.uint32(23)  # times 2**k (k >= -125: the result stays normal)
    total = np.float32(0.0)
    for j in range(length):
        total += s[j]
    return total


@nb.njit(cache=True, nogil=True, fastmath={"contract"})
def _weighted_sum(p, vg, o, length, d):
    """o := sum over j < length of p[j] * vg[j * d:(j + 1) * d] (values widened to float32), in key order."""
    for i in range(d):
        o[i] = 0.0
    for j in range(length):
        pj = p[j]
        base = j * d
        for i in range(d):
            o[i] += pj * _widened(vg[base + i])


@nb.njit(cache=True, nogil=True)
def _attend_row(q, out, r, buf, start, length, scale, rotate):
    """Row r's heads over rows [start, start + length) of its buffer `buf` [2, Hkv, capacity, d] (bf16 bits or
    float32): out[r] (float32), rotated back when `rotate`."""
    hq, d = q.shape[1], q.shape[2]
    hkv = buf.shape[1]
    group = hq // hkv
    s = np.empty(length, np.float32)
    k = np.empty(length, np.int32)
    o = np.empty(d, np.float32)
    for h in range(hq):
        g = h // group
        m = _scores(q[r, h], buf[0, g].ravel()[start * d:], s, length, d, scale)
        total = _exp_shifted(s, length, m, k)
        _weighted_sum(s, buf[1, g].ravel()[start * d:], o, length, d)
        for i in range(d):
            out[r, h, i] = o[i] / total
    if rotate:
        _fwht_rows(out[r], np.float32(d ** -0.5))


@nb.njit(cache=True, nogil=True)
def _write_rows(bits, meta, src, hkv, d):
    """Each pending row's new readings (row meta[i, 4] of src) into row n - 1 of its buffer, in row order."""
    for i in range(meta.shape[0]):
        sr = meta[i, 4]
        if sr >= 0:
            buf = nb.carray(_pointer(meta[i, 0]), (2, hkv, meta[i, 1], d), bits)
            for side in range(2):
                for g in range(hkv):
                    for j in range(d):
                        buf[side, g, meta[i, 2] - 1, j] = src[side, sr, g, j]


def _attend_bf16_rows(q, out, rows, meta, src, hkv, scale):
    """`RowAttention.flush` for bf16 buffers (their bits as uint16): the writes, then the rows in parallel
    (a row reads rows [start, n) of its buffer only: a later row's write to the same buffer is past them)."""
    d = q.shape[2]
    _write_rows(np.uint16, meta, src, hkv, d)
    for i in nb.prange(rows.shape[0]):
        buf = nb.carray(_pointer(meta[i, 0]), (2, hkv, meta[i, 1], d), np.uint16)
        _attend_row(q, out, rows[i], buf, meta[i, 3], meta[i, 2] - meta[i, 3], scale, meta[i, 5])


def _attend_f32_rows(q, out, rows, meta, src, hkv, scale):
    """`RowAttention.flush` for float32 buffers (written as their bits, uint32), as `_attend_bf16_rows`."""
    d = q.shape[2]
    _write_rows(np.uint32, meta, src, hkv, d)
    for i in nb.prange(rows.shape[0]):
        buf = nb.carray(_pointer(meta[i, 0]), (2, hkv, meta[i, 1], d), np.float32)
        _attend_row(q, out, rows[i], buf, meta[i, 3], meta[i, 2] - meta[i, 3], scale, meta[i, 5])


_attend_bf16 = nb.njit(cache=True, nogil=True, parallel=PARALLEL)(_attend_bf16_rows)
_attend_f32 = nb.njit(cache=True, nogil=True, parallel=PARALLEL)(_attend_f32_rows)

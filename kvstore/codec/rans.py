"""rANS over context-modelled code streams (`kvstore.codec.entropy`): nl lanes share one word stream.

Within a decode step the lanes read the stream in lane order. nl is one of simd.WIDTHS (16 or 64, decoded by
the vector kernels of `kvstore.codec.simd`: the lanes needing a word take the next ones with one expanding
load) or NL (the scalar decoder, for small streams and context mode 2).

Decode order: rows in groups of nl (lane l = row g * nl + l), token by token, the lanes
side by side; then the rows left over (rows % nl) one by one on lane 0. A code's table row is
class offset (`ans.row_classes` per row, `ans.tok_classes` per token in mode 2) + (previous code >> cs),
P - 1 for a row's first code, P = (A >> cs) + 1.

Invariants:
- 32-bit states in [RL, RL << 16), 16-bit renormalisation, PB-bit frequencies summing to M in every row.
- Decoders never read out of bounds nor loop longer than their sizes, whatever the words: the scalar ones
  read `words` = the stored words and then >= padding(T) zeros, the vector one pads a copy itself
  (overruns are checked once per group); every lane must end exactly at its end with its initial state RL.
  They return 0, or -1 for the caller to raise.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir as llvmir
from numba.extending import intrinsic

from kvstore.codec import simd
from kvstore.codec.ans import NCLS, NL, PB, RL, M, build_lut, inline, jit, row_classes, tok_classes
from kvstore.codec.lanes import to_rows


@inline
def _put(x, s, c, freq, start, buf, k):  # one encode step of symbol s in table row c -> (state, buf position)
    f = np.int64(freq[c, s])
    if x >= (f << (32 - PB)):
        buf[k] = x & 0xFFFF
        k, x = k + 1, x >> 16
    return ((x // f) << PB) + (x % f) + start[c, s], k  # (measured: 2x faster than a corrected reciprocal)


# ---- shared, NL lanes (the scalar decoder) ---------------------------------------------------------------
@jit
def rans_encode_shared(sym, ctx, t_n, freq, start, nl):
    """Codes sym [rows*T] with table rows ctx on nl lanes -> uint16 words, in the exact reverse of the shared
    layout's decode order (groups of nl rows interleaved token by token, the lanes reading in lane order; then
    the tail rows on lane 0): rans_decode_shared (nl = NL) and rans_decode_simd (nl in simd.WIDTHS)."""
    rows, out, k = sym.size // t_n, np.empty(sym.size + 2 * nl, np.uint16), 0
    x, order = np.full(nl, RL, np.int64), np.empty(nl, np.int64)
    for g in range((rows + nl - 1) // nl - 1, -1, -1):
        tail = g * nl + nl > rows
        for r in range(rows - 1, g * nl - 1, -1) if tail else range(1):
            n_l = 1 if tail else nl
            for ln in range(n_l):
                order[ln] = (r if tail else g * nl + ln) * t_n
            for j in range(t_n - 1, -1, -1):
                for ln in range(n_l - 1, -1, -1):
                    i = order[ln] + j
                    x[ln], k = _put(x[ln], np.int64(sym[i]), np.int64(ctx[i]), freq, start, out, k)
    for ln in range(nl - 1, -1, -1):
        out[k], out[k + 1] = x[ln] & 0xFFFF, x[ln] >> 16
        k += 2
    return out[:k][::-1].copy()


@inline
def _step_shared(x, ctx, words, p, lut):  # one rANS decode step -> (symbol, state, word position)
    e = np.int64(lut[np.uint64(ctx), np.uint64(x & (M - 1))])  # unsigned indices: no wraparound checks
    x = ((e >> 20) + 1) * (x >> PB) + ((e >> 8) & (M - 1))
    nd = np.int64(x < RL)
    return e & 255, (x << (nd << 4)) | (np.int64(words[np.uint64(p)]) & -nd), p + nd


@jit
def _shared_group(st, words, lut, out, b0, t_n, cs, first, o, offt):
    """NL rows of t_n codes into out[b0:] on states st[:NL] at word st[NL] (a function of its own, so that
    this loop compiles tight). Table row = (previous >> cs) + o[lane] + offt[token]."""
    x0, x1, x2, x3, p = st[0], st[1], st[2], st[3], st[4]
    o0, o1, o2, o3 = o[0], o[1], o[2], o[3]
    c0 = c1 = c2 = c3 = first
    for j in range(t_n):
        f = offt[np.uint64(j)]
        s0, x0, p = _step_shared(x0, c0 + f + o0, words, p, lut)
        s1, x1, p = _step_shared(x1, c1 + f + o1, words, p, lut)
        s2, x2, p = _step_shared(x2, c2 + f + o2, words, p, lut)
        s3, x3, p = _step_shared(x3, c3 + f + o3, words, p, lut)
        i = np.uint64(b0 + j)
        u = np.uint64(t_n)
        out[i], out[i + u], out[i + 2 * u], out[i + 3 * u] = s0, s1, s2, s3
        c0, c1, c2, c3 = s0 >> cs, s1 >> cs, s2 >> cs, s3 >> cs
    st[0], st[1], st[2], st[3], st[4] = x0, x1, x2, x3, p


@jit
def rans_decode_shared(words, nw, out, t_n, n, mode, gv, cs, bits, lut):
    """Inverse of rans_encode_shared into out [rows*T] uint8, lut = build_lut of the table; words = nw words then
    >= NL * T + 1 zeros (so reads past nw stay inside; caught once per group). -> 0, or -1 if inconsistent."""
    a = 1 << bits
    p_n = (a >> cs) + 1
    if nw < 2 * NL or out.size % t_n or words.size < nw + NL * t_n + 1 or lut.shape[0] != NCLS[mode] * p_n:
        return -1
    rows, st = out.size // t_n, np.empty(NL + 1, np.int64)
    for ln in range(NL):
        st[ln] = (np.int64(words[2 * ln]) << 16) | np.int64(words[2 * ln + 1])
    st[NL] = 2 * NL
    rc, offt, o = row_classes(n, mode, p_n), np.zeros(t_n, np.int64), np.zeros(NL, np.int64)
    for g in range(rows // NL):
        k0 = (g * NL) % n
        if mode == 2:
            tok_classes(out, g, t_n, gv, a, k0, p_n, offt)
        for ln in range(NL):
            o[ln] = rc[(k0 + ln) % n]
        _shared_group(st, words, lut, out, g * NL * t_n, t_n, cs, p_n - 1, o, offt)
        if st[NL] > nw:
            return -1
    x0, p = _rows_on_lane0(st[0], st[NL], rows // NL * NL, out, words, nw, t_n, rc, cs, p_n, lut)
    return 0 if p == nw and x0 == RL and st[1] == RL and st[2] == RL and st[3] == RL else -1  # (p -1: overrun)


@inline
def _rows_on_lane0(x, p, r0, out, words, nw, t_n, rc, cs, p_n, lut):
    """The rows left over after the whole lane groups (r0 on; never in mode 2), one by one on lane 0's state x
    at word p of a shared stream -> (x, p), p -1 if a row read past nw. rc: row_classes times 1."""
    n = rc.size
    for r in range(r0, out.size // t_n):
        c = 0
        for j in range(t_n):
            c, x, p = _step_shared(x, rc[r % n] + (c >> cs if j else p_n - 1), words, p, lut)
            out[r * t_n + j] = c
        if p > nw:
            return x, -1
    return x, p


# ---- shared, simd.WIDTHS lanes (the vector decoders) -------------------------------------------------------
@jit
def _simd_setup(words, n, mode, mult, groups, w):  # -> (states [w] uint32, table row offsets [groups * w])
    st, ro, rc = np.empty(w, np.uint32), np.empty(groups * w, np.uint32), row_classes(n, mode, mult)
    for ln in range(w):
        st[ln] = (np.uint32(words[2 * ln]) << 16) | np.uint32(words[2 * ln + 1])
    for r in range(groups * w):
        ro[r] = rc[r % n]
    return st, ro


@jit
def _simd_finish(lanes, out, words, nw, t_n, n, mode, cs, p_n, lut, st, p, lane_major):
    """Lane-major groups (simd.decode_groups) -> out's channel-major rows (unless lane_major: then lanes is
    out); then the rows left over on lane 0, and the end checks (every state back at RL, every word read).
    -> 0 or -1."""
    w = st.size
    if not lane_major:
        to_rows(lanes, w, t_n, out)
    x, p = _rows_on_lane0(np.int64(st[0]), p, out.size // t_n // w * w, out, words, nw, t_n,
                          row_classes(n, mode, p_n), cs, p_n, lut)
    ok = p == nw and x == RL
    for ln in range(1, w):
        ok = ok and st[ln] == RL
    return 0 if ok else -1


@intrinsic
def _kcall(typingctx, addr, words, lut, out, ro, st, pp, t_n, groups, cs, first, nw):
    """Call the vector kernel at `addr` (simd.address) on these arrays' data (alive for the call's duration)."""
    sig = nb.types.int64(addr, words, lut, out, ro, st, pp, t_n, groups, cs, first, nw)

    def codegen(context, builder, signature, args):
        i8p, i64 = llvmir.IntType(8).as_pointer(), llvmir.IntType(64)
        fn = builder.inttoptr(context.cast(builder, args[0], signature.args[0], nb.types.int64),
                              llvmir.FunctionType(i64, [i8p] * 6 + [i64] * 5).as_pointer())
        ptrs = [builder.bitcast(context.make_array(t)(context, builder, a).data, i8p)
                for t, a in zip(signature.args[1:7], args[1:7])]
        ints = [context.cast(builder, a, t, nb.types.int64) for a, t in zip(args[7:], signature.args[7:])]
        return builder.call(fn, ptrs + ints)
    return sig, codegen


@jit
def _decode_simd(words, nw, out, t_n, n, mode, cs, bits, lut, w, kaddr, lane_major):
    """rans_decode_simd in one call (no GIL between its steps): words = the stored nw words (unpadded)."""
    a = 1 << bits
    p_n = (a >> cs) + 1
    if not (0 <= mode <= 1 and 1 <= bits <= 8 and 0 <= cs <= bits and t_n >= 1 and 2 * w <= nw <= words.size) \
            or out.size % t_n or lut.shape[0] != NCLS[mode] * p_n or lut.shape[1] != M \
            or (lane_major and out.size // t_n % w):
        return -1  # (the kernel trusts these: a shift past 31 or a table too small would read out of bounds)
    padded = np.zeros(nw + w * t_n + 1, np.uint16)
    padded[:nw] = words[:nw]
    groups = out.size // t_n // w
    st, ro = _simd_setup(padded, n, mode, p_n * M, groups, w)
    pos, lanes = np.full(1, 2 * w, np.int64), out if lane_major else np.empty(groups * t_n * w, np.uint8)
    if groups and _kcall(kaddr, padded, lut, lanes, ro, st, pos, t_n, groups, cs, (p_n - 1) * M, nw) != 0:
        return -1
    return _simd_finish(lanes, out, padded, nw, t_n, n, mode, cs, p_n, lut, st, pos[0], lane_major)


def rans_decode_simd(words, nw, out, t_n, n, mode, cs, bits, lut, w, lane_major=False) -> int:
    """Inverse of rans_encode_shared(..., w) into out [rows*T] uint8 (modes 0 and 1, w in simd.WIDTHS), the
    full row groups by the vector kernel; words = the nw stored words (any padding after them is ignored).
    lane_major (rows % w == 0): out is left lane-major (`kvstore.codec.lanes`). -> 0, or -1 if inconsistent."""
    if w not in simd.WIDTHS or lut.dtype != np.uint32 or not lut.flags.c_contiguous or words.dtype != np.uint16:
        return -1
    return _decode_simd(words, nw, out, t_n, n, mode, cs, bits, lut, w, simd.address(w), lane_major)


# ---- the shared layout's lane counts -------------------------------------------------------------------
SHARED_LANES = (NL,) + simd.WIDTHS  # NL: the scalar decoder, every context mode; simd.WIDTHS: vector, modes 0-1


def padding(t_n: int) -> int:
    """Zero words the scalar decoders (NL lanes) need after a stream's words (rows of t_n codes); the vector
    decoder pads a copy of its own."""
    return NL * t_n + 1


def decode_shared(words, nw, out, t_n, n, mode, gv, cs, bits, lut, nl, lane_major=False) -> int:
    """Inverse of rans_encode_shared(..., nl) by the decoder of that lane count; words padded by padding(t_n)
    zeros for nl = NL; lane_major only for nl in simd.WIDTHS. -> 0, or -1 if inconsistent (a lane count not in
    SHARED_LANES included)."""
    if nl == NL and not lane_major:
        return rans_decode_shared(words, nw, out, t_n, n, mode, gv, cs, bits, lut)
    if nl in simd.WIDTHS:
        return rans_decode_simd(words, nw, out, t_n, n, mode, cs, bits, lut, nl, lane_major)
    return -1


def warm_up() -> None:
    """Compile (or load from numba's cache) every decoder now, the vector kernel included, with a tiny stream."""
    rows, t_n = max(simd.WIDTHS) + 1, 2
    sym = (np.arange(rows * t_n) % 2).astype(np.uint8)
    freq = np.full((2, 2), M // 2, np.int64)  # 1-bit codes, cs 1: rows "previous >> 1" (0) and "first" (1)
    lut = build_lut(freq)
    for nl in SHARED_LANES:
        w = rans_encode_shared(sym, np.zeros(sym.size, np.int32), t_n, freq, np.cumsum(freq, 1) - freq, nl)
        out = np.empty_like(sym)
        if decode_shared(np.concatenate([w, np.zeros(padding(t_n), np.uint16)]), w.size, out, t_n, 1, 0, 1, 1, 1,
                         lut, nl) != 0 or not np.array_equal(out, sym):
            raise RuntimeError(f"rANS self-test failed ({nl} lanes)")

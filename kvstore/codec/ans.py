"""Numba kernels of the KV block coder (`kvstore.codec.entropy`): code (un)packing, contexts, frequency
tables, residual symbols, and the scale/zero predictors (the rANS coder itself: `kvstore.codec.rans`).

Invariants:
- Deterministic on every machine: integer arithmetic and IEEE float64 `+ - * /` only (no libm, no
  fastmath), so encoder and decoder derive bit-identical contexts and predictions.
- Decoders never index out of bounds nor loop longer than their given sizes, whatever the bytes; they
  return -1 (or a bit position of -1) for the caller to raise ContainerError.
- Frequency tables: PB-bit frequencies summing to M in every table row; a row without symbols is uniform,
  so every row decodes safely.
Layouts: packed codes [R, T, m] uint8 (m = bits * n / 8, or n for 8 bits); "rows" = one channel over the
block's T tokens, channel-major ([R, n, T] flat). A code's table row is class * P + (previous code of its
row >> cs), P = (A >> cs) + 1, P - 1 for a row's first code; classes: mode 0 none, mode 1 the channel's
RoPE frequency band (`row_classes`), mode 2 the previous NL channels' codes at the token (`tok_classes`).
"""

from __future__ import annotations

import numba as nb
import numpy as np
import torch
from llvmlite import ir as llvmir
from numba.extending import intrinsic

from kvstore.quant.pack import unpack

PB = 11
M = 1 << PB
RL = 1 << 16
NL = 4  # interleaved rANS lanes: NL consecutive rows decoded side by side
NCLS = (1, 2, 3)  # classes per context mode
QMAX = 120  # largest log-scale frequency code
QBASE = np.array([16, 19, 23, 27], np.int64)  # weight(q) = QBASE[(q-1) % 4] << ((q-1) // 4) ~ 16 * 2^((q-1)/4)
LG_SCMIN = -2048  # 1024 * log2(0.25): floor of a group's code spread in the predictors
ABSENT = -(1 << 40)  # "no statistic" in the predictors
_P2 = np.ldexp(1.0, np.arange(32) - 25)  # exact powers of two of the fp16 exponents

jit = nb.njit(cache=True, nogil=True)
inline = nb.njit(cache=True, nogil=True, inline="always")  # small helpers of the hot loops


# ---- packed codes <-> channel-major rows (numpy; other bit widths through kvstore.quant.pack) --------
def unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """packed [R, T, m] uint8 -> channel-major codes [R*n*T] uint8 (n = 8m / bits, padding codes included)."""
    r, t, m = packed.shape
    if bits == 4:
        codes = np.stack([packed & 15, packed >> 4], -1).reshape(r, t, 2 * m)
    elif bits == 8:
        codes = packed
    else:
        codes = unpack(torch.from_numpy(packed), bits, m * 8 // bits).numpy()
    return np.ascontiguousarray(codes.transpose(0, 2, 1)).reshape(-1)


def pack_rows(sym: np.ndarray, bits: int, shape: tuple) -> np.ndarray:
    """Inverse of unpack_rows: channel-major codes -> packed [R, T, m] uint8."""
    out = np.empty(shape, np.uint8)
    if bits in (4, 8):
        _pack48(sym, bits, out)
    else:  # the layout of kvstore.quant.pack: 8 codes -> `bits` bytes, little-endian, code j at bit j * bits
        _pack_any(sym, bits, out)
    return out


@jit
def _pack_any(sym, bits, out):  # codes [R, n, T], n = 8m / bits -> out [R, T, m]
    nr, nt, m = out.shape
    n = m * 8 // bits
    for r in range(nr):
        for t in range(nt):
            base = r * n * nt + t
            for blk in range(m // bits):
                word = np.uint64(0)
                for j in range(8):
                    word |= np.uint64(sym[base + (blk * 8 + j) * nt]) << np.uint64(j * bits)
                for b in range(bits):
                    out[r, t, blk * bits + b] = np.uint8((word >> np.uint64(8 * b)) & np.uint64(255))


@jit
def _pack48(sym, bits, out):  # 4- and 8-bit codes [R, n, T] -> out [R, T, m]
    nr, nt, m = out.shape
    for r in range(nr):
        for i in range(m):
            b0 = (r * m + i) * nt * (8 // bits)
            if bits == 8:
                out[r, :, i] = sym[b0:b0 + nt]
            else:
                ub, un, ur, ui = np.uint64(b0), np.uint64(nt), np.uint64(r), np.uint64(i)
                for t in range(nt):
                    ut = np.uint64(t)
                    out[ur, ut, ui] = sym[ub + ut] | (sym[ub + un + ut] << 4)


@jit
def row_classes(n, mode, mult):  # mult * class of each channel: mode 1 marks k % (n/2) < n/8 (fast RoPE)
    rc = np.zeros(n, np.int64)
    for k in range(n):
        if mode == 1 and k % max(1, n // 2) < max(1, n // 8):
            rc[k] = mult
    return rc


@jit
def tok_classes(codes, g, t_n, gv, a, k0, mult, offt):
    """Mode 2: offt[t] = mult * class of row group g (first channel k0) at token t: the sum of the previous
    NL rows' codes at t below / around / above the middle; the middle at a value group's first channels."""
    if k0 % gv == 0:
        offt[:] = mult
        return
    lo, hi, b = 2 * (a - 1) - a // 4, 2 * (a - 1) + a // 4, (g * NL - NL) * t_n
    r0, r1, r2, r3 = codes[b:b + t_n], codes[b + t_n:b + 2 * t_n], codes[b + 2 * t_n:b + 3 * t_n], codes[b + 3 * t_n:]
    for t in range(t_n):
        u = np.uint64(t)
        sm = np.int32(r0[u]) + np.int32(r1[u]) + np.int32(r2[u]) + np.int32(r3[u])
        offt[u] = ((sm >= lo) + (sm >= hi)) * mult


@jit
def contexts(sym, t_n, n, mode, gv, bits):
    """-> (full context of every code as the decoders derive it: class * (A+1) + previous code of the row,
    A for its first; counts [classes * (A+1), A] of (full context, code))."""
    a, rows = 1 << bits, sym.size // t_n
    ctx, cnt = np.empty(sym.size, np.int32), np.zeros((NCLS[mode] * (a + 1), a), np.int64)
    rc, offt = row_classes(n, mode, a + 1), np.zeros(t_n, np.int64)
    for g in range((rows + NL - 1) // NL):
        if mode == 2:
            tok_classes(sym, g, t_n, gv, a, (g * NL) % n, a + 1, offt)
        for r in range(g * NL, min(rows, g * NL + NL)):
            o, b = rc[r % n], r * t_n
            for j in range(t_n):
                ctx[b + j] = c = o + offt[j] + (sym[b + j - 1] if j else a)
                cnt[c, sym[b + j]] += 1
    return ctx, cnt


@jit
def normalize(q):
    """Log-scale codes q [C, A] (0 = absent) -> frequencies [C, A] (int64), every row summing to M; a row
    without symbols is uniform. Integer arithmetic: encoder and decoder agree bit for bit."""
    nc, a = q.shape
    freq = np.zeros((nc, a), np.int64)
    for c in range(nc):
        w = np.zeros(a, np.int64)
        for s in range(a):
            if q[c, s] > 0:
                w[s] = QBASE[(q[c, s] - 1) & 3] << ((q[c, s] - 1) >> 2)
        tot = w.sum()
        for s in range(a):
            freq[c, s] = (max(1, (w[s] * M) // tot) if w[s] else 0) if tot else M // a
        diff = M - freq[c].sum()
        while diff != 0:  # terminates: at most A < M entries were lifted to 1
            i = np.argmax(freq[c])
            take = diff if diff > 0 else -min(-diff, freq[c, i] - 1)
            freq[c, i] += take
            diff -= take
    return freq


@jit
def build_lut(freq):  # -> decode table [C, M] uint32: symbol | (slot - start) << 8 | (freq - 1) << 20
    lut = np.empty((freq.shape[0], M), np.uint32)
    for c in range(freq.shape[0]):
        p = 0
        for s in range(freq.shape[1]):
            for k in range(freq[c, s]):
                lut[c, p + k] = s | (k << 8) | ((freq[c, s] - 1) << 20)
            p += freq[c, s]
    return lut


# ---- bit I/O (LSB first; buffers have 4 zero bytes of slack past their `lim` bits) -------------------
@inline
def put_bits(buf, pos, v, n):  # n <= 25 bits into a zeroed buffer -> new bit position
    w = (np.int64(v) & ((1 << n) - 1)) << (pos & 7)
    for i in range(4):
        buf[(pos >> 3) + i] |= np.uint8((w >> (8 * i)) & 255)
    return pos + n


@inline
def get_bits(buf, lim, pos, n):  # n <= 25 -> (value, new pos); pos -1 when that would pass lim
    if pos < 0 or pos + n > lim:
        return 0, -1
    i = pos >> 3
    w = np.int64(buf[i]) | (np.int64(buf[i + 1]) << 8) | (np.int64(buf[i + 2]) << 16) | (np.int64(buf[i + 3]) << 24)
    return (w >> (pos & 7)) & ((1 << n) - 1), pos + n


@inline
def _qpred(q, c, s):  # planar prediction of q[c, s] from its left, upper and upper-left neighbours
    if c == 0:
        return q[0, s - 1] if s > 0 else 0
    return q[c - 1, 0] if s == 0 else q[c, s - 1] + q[c - 1, s] - q[c - 1, s - 1]


@jit
def put_table(buf, pos, q):  # Exp-Golomb (k=1) of the zigzagged residuals of q against _qpred
    for c in range(q.shape[0]):
        for s in range(q.shape[1]):
            d = q[c, s] - _qpred(q, c, s)
            z = (d << 1) if d >= 0 else ((-d << 1) - 1)
            v, nb_ = (z >> 1) + 1, 0
            while (v >> (nb_ + 1)) > 0:
                nb_ += 1
            pos = put_bits(buf, pos, 1 << nb_, nb_ + 1)  # nb_ zeros, then a one
            pos = put_bits(buf, put_bits(buf, pos, v, nb_), z, 1)
    return pos


@jit
def get_table(buf, lim, pos, nc, a):  # inverse of put_table -> (q, pos); pos -1 on overrun or q out of range
    q = np.zeros((nc, a), np.int64)
    for c in range(nc):
        for s in range(a):
            nb_, bit = -1, 0
            while bit == 0 and pos >= 0 and nb_ < 10:
                bit, pos = get_bits(buf, lim, pos, 1)
                nb_ += 1
            rest, pos = get_bits(buf, lim, pos, nb_)
            lo, pos = get_bits(buf, lim, pos, 1)
            z = ((((1 << nb_) | rest) - 1) << 1) | lo
            q[c, s] = _qpred(q, c, s) + ((z >> 1) if (z & 1) == 0 else -((z + 1) >> 1))
            if pos < 0 or bit == 0 or not 0 <= q[c, s] <= QMAX:
                return q, -1
    return q, pos


@jit
def table_lut(buf, lim, pos, nc, a, dup):
    """get_table of nc rows, each row repeated dup times, then normalized into a build_lut decode table ->
    (lut, pos); pos -1 (lut empty) if the table is corrupt. One call: no GIL between the steps."""
    q, pos = get_table(buf, lim, pos, nc, a)
    if pos < 0:
        return np.empty((0, M), np.uint32), -1
    qq = np.empty((nc * dup, a), np.int64)
    for c in range(nc * dup):
        qq[c] = q[c // dup]
    return build_lut(normalize(qq)), pos


# ---- scale / zero residuals -------------------------------------------------------------------------
@jit
def symbolize(res, syms, buf, pos):
    """Residuals in [-2^15, 2^15) -> symbols < 63 (0, +1, -1, else: bit length, next bit, sign) plus the
    remaining low bits appended to buf; -> the new bit position."""
    for i in range(res.size):
        r = np.int64(res[i])
        a, nb_ = abs(r), 2
        if a <= 1:
            syms[i] = 0 if a == 0 else (1 if r > 0 else 2)
            continue
        while (a >> nb_) > 0:
            nb_ += 1
        syms[i] = 3 + (((nb_ - 2) * 2 + ((a >> (nb_ - 2)) & 1)) << 1) + (r < 0)
        pos = put_bits(buf, pos, a, nb_ - 2)
    return pos


@jit
def desymbolize(syms, buf, lim, pos, res):  # inverse of symbolize -> the bit position, -1 if invalid
    if pos < 0 or pos > lim or buf.size < 4:
        return -1
    b, last = np.uint64(pos), np.uint64(buf.size - 4)  # reads past lim see the zero slack; lim checked at the end
    for i in range(syms.size):
        ui = np.uint64(i)
        u = np.int64(syms[ui]) - 3
        if u < 0:
            res[ui] = 0 if u == -3 else (1 if u == -2 else -1)
            continue
        nb_, k = u >> 2, min(b >> np.uint64(3), last)  # raw bits (<= 14: one 32-bit read at byte k)
        w = np.uint64(buf[k]) | (np.uint64(buf[k + np.uint64(1)]) << np.uint64(8)) \
            | (np.uint64(buf[k + np.uint64(2)]) << np.uint64(16)) | (np.uint64(buf[k + np.uint64(3)]) << np.uint64(24))
        a = (1 << (nb_ + 1)) | (((u >> 1) & 1) << nb_) | np.int64((w >> (b & np.uint64(7))) & np.uint64((1 << nb_) - 1))
        b += np.uint64(nb_)
        if nb_ > 14 or ((u & 1) == 0 and a > 32767):
            return -1
        res[ui] = -a if (u & 1) else a
    return np.int64(b) if np.int64(b) <= lim else -1


@intrinsic
def _bits(typingctx, x):  # the int64 bit pattern of a float64 (an LLVM bitcast: no trip through memory)
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvmir.IntType(64))
    return nb.types.int64(nb.types.float64), codegen


@inline
def lg(x):  # 1024 * log2(x) (x >= 2^-1022), piecewise linear: exponent and top 10 mantissa bits
    b = _bits(np.float64(x))
    return 1024 * ((b >> 52) - 1023) + ((b >> 42) & 1023)


@inline
def _lg16(b):  # = lg(f16(b)) for a normal positive fp16 pattern b, from its bits: (exponent - 15) * 1024 + mantissa
    return ((b >> 10) - 15) * 1024 + (b & 1023)


@inline
def f16(b):  # the float64 value of an fp16 bit pattern (exact)
    e, f = (b >> 10) & 31, b & 1023
    v = (np.inf if f == 0 else np.nan) if e == 31 else (f * 5.9604644775390625e-08 if e == 0 else (1024 + f) * _P2[e])
    return -v if b & 0x8000 else v


@inline
def mono(b):  # fp16 pattern -> order-preserving int in [0, 2^16) (-NaN lowest, +NaN highest)
    return b + 0x8000 if b < 0x8000 else 0xFFFF - b


@inline
def near(x):  # mono of an fp16 pattern close to any float64 x (NaN -> +0)
    a = abs(x)
    mb = 0x7BFF if a >= 65504.0 else (np.int64(a * 16777216.0) if a < 6.103515625e-05 else lg(a) + 15360)
    return 0x8000 if x != x else (mono(mb | 0x8000) if x < 0 else mono(mb))


@inline
def _code(pred, bits, res, i, decode):  # one residual (mod 2^16 of mono images) -> the actual pattern
    if decode:
        m = (pred + res[i]) & 0xFFFF
        return m - 0x8000 if m >= 0x8000 else 0xFFFF - m
    res[i] = ((mono(bits) - pred + 0x8000) & 0xFFFF) - 0x8000
    return bits


@jit
def group_stats(sym, nt, n, keys, ng, dn):
    """(sum of codes, lg of their spread, codes per group) for each scale/zero element in array order:
    keys [R, G, D] (channel d over the tokens of group gi), values [R, T, G] (token t over n / G channels)."""
    nr, cnt = sym.size // (n * nt), nt // ng if keys else n // ng
    size = nr * ng * (dn if keys else nt)
    s1, s2, a1, a2 = np.zeros(size, np.int64), np.zeros(size, np.int64), np.zeros(nt, np.int32), np.zeros(nt, np.int32)
    for r in range(nr):
        for k in range(dn if keys else n):
            row = sym[(r * n + k) * nt:(r * n + k + 1) * nt]
            for gi in range(ng if keys else 0):
                b1 = b2 = np.int32(0)
                for t in range(gi * cnt, (gi + 1) * cnt):
                    c = np.int32(row[np.uint64(t)])
                    b1, b2 = b1 + c, b2 + c * c
                s1[(r * ng + gi) * dn + k], s2[(r * ng + gi) * dn + k] = b1, b2
            if not keys:  # values: accumulate a group's channels token by token
                for t in range(nt):
                    ut = np.uint64(t)
                    c = np.int32(row[ut])
                    a1[ut], a2[ut] = a1[ut] + c, a2[ut] + c * c
                if (k + 1) % cnt == 0:
                    for t in range(nt):
                        s1[(r * nt + t) * ng + k // cnt], s2[(r * nt + t) * ng + k // cnt] = a1[t], a2[t]
                    a1[:], a2[:] = 0, 0
    spreads(s1, s2, cnt)
    return s1, s2, cnt


@inline
def spreads(s1, s2, cnt):  # sums of codes and of their squares over groups of cnt -> s2 = lg of the spread
    lc = lg(float(cnt))
    for i in range(s2.size):
        var = cnt * s2[i] - s1[i] * s1[i]
        s2[i] = max((lg(float(var)) >> 1) - lc, LG_SCMIN) if var > 0 else LG_SCMIN


def neighbours(keys: bool, nr: int, na: int, nb: int, heads: int) -> np.ndarray:
    """[N, 4] int32 earlier elements (-1: none) that predict each scale/zero element. Keys [nr, na=G, nb=D]:
    the channel's previous group, else its RoPE partner d - D/2 (rotate-half pairs share a rotation), else
    the previous channel. Values [nr, na=T, nb=G]: previous token, other group, previous head (averaged).
    Column 3: the element whose group mean predicts the zero (keys: previous group; values: token)."""
    r, a, b = (x.reshape(-1) for x in np.indices((nr, na, nb)))
    i = np.arange(r.size)
    prev_a = np.where(a > 0, i - nb, -1)
    if keys:
        first = np.where(b >= nb // 2, i - nb // 2, np.where(b > 0, i - 1, -1)) if nb > 1 else np.full(i.size, -1)
        cols = [np.where(a > 0, prev_a, first), -np.ones_like(i), -np.ones_like(i), prev_a]
    else:
        cols = [prev_a, np.where(b > 0, i - 1, -1), np.where(r % heads > 0, i - na * nb, -1), prev_a]
    return np.stack(cols, 1).astype(np.int32)


@jit
def predict(s1, lsc, cnt, nbr, mu_w, sc_b, z_b, rs, rz, decode):
    """Scale/zero patterns (uint16 [N], array order) with their group_stats and neighbours. Scale: the mean
    lg sigma (lg scale + code spread) of the references (none: the last sigma) minus this group's spread.
    Zero: mu_w * the reference group's mean (scale * mean code + zero), minus mean code * scale. Encoding
    writes the residuals rs/rz; decoding rebuilds sc_b/z_b from them."""
    lsig, mus, last = np.full(sc_b.size, ABSENT, np.int64), np.zeros(sc_b.size), ABSENT
    for i in range(sc_b.size):
        acc, k = 0, 0
        for q in range(3):
            j = nbr[i, q]
            if j >= 0 and lsig[j] != ABSENT:
                acc, k = acc + lsig[j], k + 1
        ref = last if k == 0 else (acc if k == 1 else (acc >> 1 if k == 2 else acc // 3))  # = acc // k, no idiv
        sb = _code(mono(min(max(ref - lsc[i] + 15360, 0), 0x7BFF)) if ref != ABSENT else 0x8000,
                   np.int64(sc_b[i]), rs, i, decode)
        s, mc, j = f16(sb), s1[i] / cnt, nbr[i, 3]
        zb = _code(near((mu_w * mus[j] if j >= 0 else 0.0) - mc * s), np.int64(z_b[i]), rz, i, decode)
        sc_b[i], z_b[i] = sb, zb
        mu = f16(zb) + mc * s
        mus[i] = mu if abs(mu) < 1e30 else 0.0
        if 0 < sb < 0x7C00:  # = 0 < s < 1e30: positive, finite
            lsig[i] = last = (lg(s) if sb < 0x0400 else _lg16(sb)) + lsc[i]

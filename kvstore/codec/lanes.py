"""Kernels over lane-major codes, the vector rANS decoder's output (`kvstore.codec.simd`): the block
coder packs them and takes their group statistics without first transposing them to channel-major rows.

Lane-major: codes [groups, T, w] (flat), the code of channel c = g * w + l (channels numbered row-major over
the stream's [R, n] channels) at token t at (g * T + t) * w + l. Each kernel here equals its channel-major
counterpart in `kvstore.codec.ans` bit for bit (tests/kvstore/codec/test_lanes.py):
- `to_rows(lanes, w, t_n, out)`: the channel-major rows [R * n * T] (any n);
- `pack(lanes, w, t_n, n, bits, out)` = ans.pack_rows for 4- and 8-bit codes, when n % w == 0;
- `group_stats(lanes, w, t_n, n, keys, ng, dn)` = ans.group_stats, when n % w == 0 (and, for values,
  w % (n / ng) == 0: a value group never straddles two lane groups). `fits` says whether both apply.
"""

from __future__ import annotations

import numpy as np

from kvstore.codec.ans import jit, spreads


def fits(w: int, n: int, bits: int, keys: bool, ng: int) -> bool:
    """Whether pack and group_stats take lane-major codes of this stream shape (else: to_rows first)."""
    return bits in (4, 8) and n % w == 0 and (keys or (ng > 0 and n % ng == 0 and w % (n // ng) == 0))


@jit
def to_rows(lanes, w, t_n, out):  # lane-major [groups, T, w] -> channel-major out [groups * w, T]
    for g in range(lanes.size // (t_n * w)):
        b = np.uint64(g * w * t_n)
        for ln in range(w):
            for j in range(t_n):
                out[b + np.uint64(ln * t_n + j)] = lanes[b + np.uint64(j * w + ln)]


@jit
def pack(lanes, w, t_n, n, bits, out):
    """Lane-major 4- or 8-bit codes -> out [R, T, m] uint8 (m = n / 2 or n; two 4-bit codes per byte, the
    even channel low); n % w == 0, so a lane group is w consecutive channels of one row."""
    m = n // 2 if bits == 4 else n
    flat = out.reshape(-1)
    for g in range(lanes.size // (t_n * w)):
        r, k0 = (g * w) // n, (g * w) % n
        for t in range(t_n):
            src, dst = np.uint64((g * t_n + t) * w), np.uint64((r * t_n + t) * m + (k0 // 2 if bits == 4 else k0))
            if bits == 4:
                for i in range(w // 2):
                    ui = np.uint64(i)
                    flat[dst + ui] = lanes[src + np.uint64(2) * ui] | (lanes[src + np.uint64(2) * ui + np.uint64(1)] << 4)
            else:
                for i in range(w):
                    flat[dst + np.uint64(i)] = lanes[src + np.uint64(i)]


@jit
def group_stats(lanes, w, t_n, n, keys, ng, dn):
    """ans.group_stats of lane-major codes (see `fits`) -> (sum of codes, lg of their spread, codes per group)."""
    nr, cnt = lanes.size // (n * t_n), t_n // ng if keys else n // ng
    size = nr * ng * (dn if keys else t_n)
    s1, s2 = np.zeros(size, np.int64), np.zeros(size, np.int64)
    a1, a2 = np.zeros(w, np.int32), np.zeros(w, np.int32)
    for g in range(lanes.size // (t_n * w)):
        r, k0 = (g * w) // n, (g * w) % n
        if keys:  # channel k0 + l over the tokens of group gi
            for gi in range(ng):
                a1[:], a2[:] = 0, 0
                for t in range(gi * cnt, (gi + 1) * cnt):
                    src = np.uint64((g * t_n + t) * w)
                    for ln in range(w):
                        c = np.int32(lanes[src + np.uint64(ln)])
                        a1[ln], a2[ln] = a1[ln] + c, a2[ln] + c * c
                for ln in range(min(w, dn - k0)):
                    s1[(r * ng + gi) * dn + k0 + ln], s2[(r * ng + gi) * dn + k0 + ln] = a1[ln], a2[ln]
        else:  # token t over the cnt channels of each value group (whole groups within the w lanes)
            for t in range(t_n):
                src, o = np.uint64((g * t_n + t) * w), (r * t_n + t) * ng + k0 // cnt
                for q in range(w // cnt):
                    b1 = b2 = np.int32(0)
                    for ln in range(q * cnt, (q + 1) * cnt):
                        c = np.int32(lanes[src + np.uint64(ln)])
                        b1, b2 = b1 + c, b2 + c * c
                    s1[o + q], s2[o + q] = b1, b2
    spreads(s1, s2, cnt)
    return s1, s2, cnt

"""The rANS coders on their own: random symbols under every context mode round-trip exactly with every lane
count (NL lanes by the scalar decoder; simd.WIDTHS lanes by the vector kernels), and inconsistent words are
refused (-1), never a crash."""

import numpy as np
import pytest

from kvstore.codec import ans, rans, simd


def _stream(seed, rows, t_n, n, mode, gv, cs, bits):
    """Random codes with some order-1 structure -> (sym, table row of every code, freq, start, lut)."""
    rng = np.random.default_rng(seed)
    a = 1 << bits
    sym = np.empty(rows * t_n, np.uint8)
    for r in range(rows):
        walk = np.cumsum(rng.integers(-1, 2, t_n)) + rng.integers(0, a)
        sym[r * t_n:(r + 1) * t_n] = np.clip(walk, 0, a - 1)
    full, cnt = ans.contexts(sym, t_n, n, mode, gv, bits)
    p = (a >> cs) + 1  # table rows by (previous >> cs), as the decoders derive them
    prev = np.arange(a + 1)
    smap = np.arange(ans.NCLS[mode])[:, None] * p + np.where(prev < a, prev >> cs, p - 1)
    ctx = smap.reshape(-1)[full].astype(np.int32)
    rows_cnt = np.zeros((ans.NCLS[mode] * p, a), np.int64)
    np.add.at(rows_cnt, (ctx, sym.astype(np.int64)), 1)
    with np.errstate(divide="ignore"):
        q = np.where(rows_cnt > 0, np.clip(np.rint(4 * np.log2(np.maximum(rows_cnt, 1))) + 1, 1, ans.QMAX), 0)
    freq = ans.normalize(q.astype(np.int64))
    return sym, ctx, freq, np.cumsum(freq, 1) - freq, ans.build_lut(freq)


CASES = [  # rows, t_n, n, mode, gv, cs, bits
    (16, 32, 8, 0, 8, 0, 4), (24, 16, 8, 1, 8, 1, 4), (32, 24, 16, 2, 16, 0, 4), (12, 20, 4, 2, 8, 0, 3),
    (7, 9, 7, 0, 7, 0, 8), (5, 33, 5, 1, 5, 2, 2), (1, 1, 1, 0, 1, 0, 1),  # rows % 4 != 0: lane 0 takes the rest
]


def _plannable(case) -> bool:  # mode 2 needs whole lane groups of value channels (entropy's plan never asks else)
    _, _, n, mode, gv, _, _ = case
    return mode != 2 or not (n % ans.NL or gv % ans.NL or gv < 2 * ans.NL)


@pytest.mark.parametrize("rows,t_n,n,mode,gv,cs,bits", [c for c in CASES if _plannable(c)])
def test_the_scalar_layout_round_trips_exactly(rows, t_n, n, mode, gv, cs, bits):
    sym, ctx, freq, start, lut = _stream(rows * 31 + t_n, rows, t_n, n, mode, gv, cs, bits)
    shared = rans.rans_encode_shared(sym, ctx, t_n, freq, start, ans.NL)
    padded = np.concatenate([shared, np.zeros(rans.padding(t_n), np.uint16)])
    out = np.zeros_like(sym)
    assert rans.decode_shared(padded, shared.size, out, t_n, n, mode, gv, cs, bits, lut, ans.NL) == 0
    assert (out == sym).all()


def test_inconsistent_scalar_words_are_refused():
    rows, t_n, n, mode, gv, cs, bits = CASES[2]
    sym, ctx, freq, start, lut = _stream(3, rows, t_n, n, mode, gv, cs, bits)
    words = rans.rans_encode_shared(sym, ctx, t_n, freq, start, ans.NL)
    pad = np.zeros(rans.padding(t_n), np.uint16)
    out = np.empty_like(sym)
    args = (out, t_n, n, mode, gv, cs, bits, lut, ans.NL)
    assert rans.decode_shared(np.concatenate([words, pad]), words.size, *args) == 0 and (out == sym).all()
    for nw in (words.size - 1, words.size + 1, 0, 2 * ans.NL - 1):  # word counts other than the stream's
        assert rans.decode_shared(np.concatenate([words, pad]), nw, *args) == -1
    rng = np.random.default_rng(4)
    for _ in range(50):  # random words: refused or decoded to codes of the alphabet, never out of bounds
        junk = rng.integers(0, 1 << 16, words.size).astype(np.uint16)
        r = rans.decode_shared(np.concatenate([junk, pad]), words.size, *args)
        assert r in (0, -1) and out.max() < 1 << bits


SIMD_CASES = [  # groups, extra rows, t_n, n, mode, cs, bits: whole groups of w rows, and rows left over for lane 0
    (2, 0, 32, 64, 1, 0, 4), (3, 17, 19, 40, 0, 1, 4), (1, 0, 128, 8, 1, 0, 8), (1, 5, 7, 16, 1, 1, 3),
    (2, 0, 50, 32, 0, 0, 2), (0, 15, 9, 8, 0, 0, 4), (1, 0, 1, 1, 0, 0, 1),
]


def _simd_stream(rows, t_n, n, mode, cs, bits, w=simd.LANES, seed=0):
    sym, ctx, freq, start, lut = _stream(seed + rows * 7 + t_n, rows, t_n, n, mode, n, cs, bits)
    words = rans.rans_encode_shared(sym, ctx, t_n, freq, start, w)
    return sym, lut, words, np.concatenate([words, np.zeros(rans.padding(t_n), np.uint16)])


@pytest.mark.parametrize("w", simd.WIDTHS)
@pytest.mark.parametrize("groups,extra,t_n,n,mode,cs,bits", SIMD_CASES)
def test_the_vector_layouts_round_trip_exactly(w, groups, extra, t_n, n, mode, cs, bits):
    rows = groups * w + extra
    sym, lut, words, padded = _simd_stream(rows, t_n, n, mode, cs, bits, w)
    out = np.zeros_like(sym)
    assert rans.decode_shared(padded, words.size, out, t_n, n, mode, n, cs, bits, lut, w) == 0
    assert (out == sym).all()


def test_inconsistent_vector_streams_are_refused():
    groups, extra, t_n, n, mode, cs, bits = SIMD_CASES[1]
    sym, lut, words, padded = _simd_stream(groups * simd.LANES + extra, t_n, n, mode, cs, bits)
    out = np.empty_like(sym)
    args = (t_n, n, mode, n, cs, bits, lut)
    assert rans.decode_shared(padded, words.size - 1, out, *args, simd.LANES) == -1  # a word short
    assert rans.decode_shared(padded, words.size, out, *args, ans.NL) == -1  # another layout's decoder
    assert rans.decode_shared(padded, words.size, out, *args, 16) == -1  # another width's kernel
    assert rans.decode_shared(padded, words.size, out, *args, 32) == -1  # no decoder of that lane count
    assert rans.decode_shared(words[:-1], words.size, out, *args, simd.LANES) == -1  # fewer words than nw
    assert rans.decode_shared(words, words.size, out, *args, simd.LANES) == 0  # the vector decoder pads its copy
    assert (out == sym).all()
    assert rans.decode_shared(padded, words.size, out, t_n, n, 2, n, cs, bits, lut, simd.LANES) == -1  # mode 2
    for bad_cs, bad_bits in ((bits + 1, bits), (40, bits), (-1, bits), (0, 9)):  # shifts the kernel must not see
        assert rans.decode_shared(padded, words.size, out, t_n, n, mode, n, bad_cs, bad_bits, lut, simd.LANES) == -1
    assert rans.decode_shared(padded, words.size, out, 0, n, mode, n, cs, bits, lut, simd.LANES) == -1  # no tokens
    rng = np.random.default_rng(5)
    for _ in range(30):  # junk: refused or codes of the alphabet, never out of bounds
        junk = np.concatenate([rng.integers(0, 1 << 16, words.size).astype(np.uint16), padded[words.size:]])
        assert rans.decode_shared(junk, words.size, out, *args, simd.LANES) in (0, -1) and out.max() < 1 << bits

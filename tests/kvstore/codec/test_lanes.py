"""Lane-major kernels (`kvstore.codec.lanes`) equal their channel-major counterparts in `kvstore.codec.ans`
bit for bit, on random codes of every shape they take; `fits` says which shapes those are."""

import numpy as np
import pytest

from kvstore.codec import ans, lanes


def _lane_major(rows: np.ndarray, w: int, t_n: int) -> np.ndarray:  # channel-major [C, T] -> [C / w, T, w]
    return np.ascontiguousarray(rows.reshape(-1, w, t_n).transpose(0, 2, 1)).reshape(-1)


SHAPES = [  # w, t_n, n, heads (rows R), bits
    (64, 128, 64, 6, 4), (64, 32, 128, 3, 4), (16, 9, 32, 5, 4), (64, 64, 64, 4, 8), (16, 7, 48, 2, 8),
]


@pytest.mark.parametrize("w,t_n,n,r,bits", SHAPES)
def test_to_rows_and_pack_equal_the_channel_major_path(w, t_n, n, r, bits):
    rng = np.random.default_rng(w + t_n + n + bits)
    rows = rng.integers(0, 1 << bits, r * n * t_n).astype(np.uint8)
    lm = _lane_major(rows, w, t_n)
    back = np.empty_like(rows)
    lanes.to_rows(lm, w, t_n, back)
    assert (back == rows).all()
    m = n // 2 if bits == 4 else n
    want = ans.pack_rows(rows, bits, (r, t_n, m))
    got = np.empty((r, t_n, m), np.uint8)
    assert lanes.fits(w, n, bits, True, 1)
    lanes.pack(lm, w, t_n, n, bits, got)
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("keys,w,t_n,n,r,ng,dn", [
    (True, 64, 128, 64, 6, 4, 64), (True, 16, 32, 48, 3, 2, 40), (True, 64, 64, 128, 2, 1, 128),
    (False, 64, 128, 64, 6, 2, 64), (False, 16, 20, 32, 4, 4, 32), (False, 64, 8, 128, 3, 4, 128),
])
def test_group_stats_equal_the_channel_major_path(keys, w, t_n, n, r, ng, dn):
    rng = np.random.default_rng(t_n + n + ng)
    for bits in (2, 4, 8):
        rows = rng.integers(0, 1 << bits, r * n * t_n).astype(np.uint8)
        rows[: n * t_n] = rng.integers(0, 2) * ((1 << bits) - 1)  # a constant row: zero spread
        assert lanes.fits(w, n, 4, keys, ng)
        want = ans.group_stats(rows, t_n, n, keys, ng, dn)
        got = lanes.group_stats(_lane_major(rows, w, t_n), w, t_n, n, keys, ng, dn)
        assert all(np.array_equal(a, b) for a, b in zip(want[:2], got[:2])) and want[2] == got[2]


def test_fits_refuses_what_the_kernels_do_not_take():
    assert not lanes.fits(64, 32, 4, True, 1)  # a lane group spans rows
    assert not lanes.fits(64, 64, 3, True, 1)  # 3-bit codes pack across bytes
    assert not lanes.fits(64, 192, 4, False, 4)  # value groups of 48 straddle lane groups of 64
    assert lanes.fits(64, 192, 4, False, 6)  # groups of 32

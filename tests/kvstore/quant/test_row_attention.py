"""A batched pass's rows attending in one call (kvstore/quant/row_attention.py): within float32 error of exact
attention, each row's bits a function of its own query, keys and values only (not of the other rows, its slot,
the buffer's capacity or the query's layout), new readings written before they are read, and bad arguments
refused before the kernel touches memory."""

import math

import numpy as np
import pytest
import torch

from kvstore.quant import row_attention
from kvstore.quant.row_attention import RowAttention, attend_one


def _buffer(g, n, cap, hkv, d, dtype):
    b = torch.randn(2, 1, hkv, cap, d, generator=g).to(dtype)
    b[..., n:, :] = float("nan")  # past n: nothing a row may read
    return b


def _exact(q, buf, n, start, scale):
    """fp64 attention of q [Hq, D] over rows [start, n) of buf."""
    k, v = buf[0, 0, :, start:n].double(), buf[1, 0, :, start:n].double()
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    p = torch.softmax((q.double().unsqueeze(1) @ k.transpose(1, 2)).squeeze(1) * scale, dim=-1)
    return (p.unsqueeze(1) @ v).squeeze(1)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 2e-6), (torch.bfloat16, 2e-6)])
@pytest.mark.parametrize("hq, hkv, d", [(9, 3, 64), (4, 4, 16), (8, 2, 128)])
def test_each_row_is_exact_attention_within_float32_error(dtype, bound, hq, hkv, d):
    """Against fp64 attention over the same (model-dtype) keys and values: float32 arithmetic throughout, so the
    error is float32's (the output is then rounded to the model dtype: compared before that rounding)."""
    g = torch.Generator().manual_seed(hq * d)
    lengths = [(1, 0), (2, 0), (17, 0), (100, 40), (300, 0), (513, 500)]
    bufs = [_buffer(g, n, n + 5, hkv, d, dtype) for n, _ in lengths]
    q = (torch.randn(len(lengths), hq, 1, d, generator=g) * 2).to(dtype)
    att = RowAttention(q, d ** -0.5, dtype)
    for r, ((n, start), b) in enumerate(zip(lengths, bufs, strict=True)):
        att.add(r, b, n, start)
    att.flush()
    for r, ((n, start), b) in enumerate(zip(lengths, bufs, strict=True)):
        want = _exact(q[r, :, 0].float(), b, n, start, d ** -0.5)
        err = (torch.from_numpy(att.out[r]).double() - want).abs().max().item()
        assert err < bound * max(1.0, want.abs().max().item()), (n, start, err)


def test_a_rows_bits_do_not_depend_on_the_other_rows_its_slot_capacity_or_query_layout():
    g = torch.Generator().manual_seed(1)
    hq, hkv, d, n = 9, 3, 64, 77
    mine = _buffer(g, n, n, hkv, d, torch.bfloat16)
    q = torch.randn(1, hq, 1, d, generator=g).bfloat16()
    seen = None
    for trial in range(6):
        others = [(_buffer(g, m, m + 9 * trial, hkv, d, torch.bfloat16), m) for m in (1, 30, 200, 64)[:trial % 4 + 1]]
        slot = trial % (len(others) + 1)
        rows = others[:slot] + [(None, n)] + others[slot:]
        qs = torch.randn(len(rows), hq, 1, d, generator=g).bfloat16()
        qs[slot] = q[0]
        if trial % 2:  # a query laid out as attention gets it from the projection: not contiguous
            qs = qs.transpose(1, 2).contiguous().transpose(1, 2)
        buf = torch.full((2, 1, hkv, n + 7 * trial, d), float("nan")).bfloat16()  # more capacity, nothing past n
        buf[..., :n, :] = mine
        att = RowAttention(qs, 0.125, torch.bfloat16)
        for r, (b, m) in enumerate(rows):
            att.add(r, buf if b is None else b, m)
        att.flush()
        got = att.output()[slot].view(torch.int16)
        seen = got if seen is None else seen
        assert torch.equal(got, seen), f"trial {trial}"
    assert torch.equal(attend_one(q, mine[0], mine[1], 0.125).view(torch.int16)[0], seen)


def test_new_readings_are_written_before_they_are_read_rows_in_order():
    """Two consecutive rows of one session in one flush (as replay packs them): each writes its reading, and the
    second sees the first's, as if they had run one after another."""
    g = torch.Generator().manual_seed(2)
    hq, hkv, d, n = 6, 2, 32, 40
    buf = _buffer(g, n, n + 8, hkv, d, torch.float32)
    ref = buf.clone()
    new = torch.randn(2, 3, hkv, 1, d, generator=g)
    q = torch.randn(3, hq, 1, d, generator=g)
    att = RowAttention(q, 0.2, torch.float32)
    att.add(0, buf, n + 1, 0, new, 1)
    att.add(2, buf, n + 2, 3, new, 0)
    att.flush()
    out = att.output()
    assert torch.equal(buf[:, 0, :, n], new[:, 1, :, 0]) and torch.equal(buf[:, 0, :, n + 1], new[:, 0, :, 0])
    for r, (m, start, src) in ((0, (n + 1, 0, 1)), (2, (n + 2, 3, 0))):
        ref[:, 0, :, m - 1] = new[:, src, :, 0]
        one = attend_one(q[r:r + 1], ref[0, :, :, :m], ref[1, :, :, :m], 0.2, start)
        assert torch.equal(one[0], out[r])
    assert not out[1].any()  # a row never added: zeros


def test_the_exponential_is_within_two_float32_ulps_of_exp():
    x = np.concatenate([-np.logspace(-8, 1.93, 4000), np.linspace(-86.0, 0.0, 4000), [0.0, -1e-30]]).astype(np.float32)
    s = x.copy()
    total = row_attention._exp_shifted(s, len(s), np.float32(0.0), np.empty(len(s), np.int32))
    want = np.exp(x.astype(np.float64))
    assert np.all(np.abs(s - want) <= 2 * np.spacing(want.astype(np.float32)))
    assert math.isclose(total, want.sum(), rel_tol=1e-5)
    below = np.array([-86.5, -100.0, -1e4, -np.inf], np.float32)  # floored: tiny, normal, never 0 or garbage
    row_attention._exp_shifted(below, 4, np.float32(0.0), np.empty(4, np.int32))
    assert np.all((below > 0) & (below < 1e-37))


def test_bad_arguments_are_refused_before_the_kernel_runs():
    q = torch.randn(2, 4, 1, 16)
    att = RowAttention(q, 0.25, torch.float32)
    good = torch.zeros(2, 1, 2, 10, 16)
    for bad in (torch.zeros(2, 1, 2, 10, 16).bfloat16(),  # dtype
                torch.zeros(2, 1, 2, 16, 10).transpose(-1, -2),  # not contiguous
                torch.zeros(2, 2, 2, 10, 16),  # two batch rows
                torch.zeros(2, 1, 3, 10, 16),  # 3 kv heads do not divide 4
                torch.zeros(2, 1, 2, 10, 8)):  # head_dim
        with pytest.raises(ValueError):
            att.add(0, bad, 5)
    for r, n, start in ((2, 5, 0), (0, 11, 0), (0, 5, 5), (0, 0, 0)):
        with pytest.raises(ValueError):
            att.add(r, good, n, start)
    with pytest.raises(ValueError):
        att.add(0, good, 5, 0, torch.zeros(2, 2, 2, 1, 16), 2)  # no such source row
    with pytest.raises(ValueError):
        att.add(0, good, 5, 0, torch.zeros(2, 2, 4, 1, 16), 0)  # readings of other heads
    att.add(0, good, 5)
    with pytest.raises(ValueError):
        att.add(1, torch.zeros(2, 1, 4, 10, 16), 5)  # another Hkv in one pass
    att.flush()
    assert not att.out.any()


def test_a_rotated_rows_output_goes_back_in_float32_before_its_one_rounding():
    from kvstore.quant.rotation import _fwht_rows, hadamard_rows

    g = torch.Generator().manual_seed(3)
    hq, hkv, d, n = 9, 3, 64, 50
    buf = _buffer(g, n, n, hkv, d, torch.bfloat16)
    q = torch.randn(2, hq, 1, d, generator=g).bfloat16()
    plain, rotated = RowAttention(q, 0.125, torch.bfloat16), RowAttention(q, 0.125, torch.bfloat16)
    for att, turn in ((plain, False), (rotated, True)):
        att.add(0, buf, n, rotate=turn)
        att.add(1, buf, n - 3)  # not rotated
        att.flush()
    want = plain.out.copy()
    _fwht_rows(want[0], np.float32(d ** -0.5))
    assert np.array_equal(rotated.out[0].view(np.int32), want[0].view(np.int32))
    assert np.array_equal(rotated.out[1].view(np.int32), plain.out[1].view(np.int32))
    # close to rotating the rounded output (what the per-row way does), which rounds twice
    assert torch.allclose(rotated.output()[0].float(), hadamard_rows(plain.output()[0]).float(), atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_bits_do_not_depend_on_running_rows_in_parallel(dtype):
    """The rows of a flush run on numba's OpenMP threads (`PARALLEL`); the same code compiled serially gives the
    same bits (a row is one thread's from start to end)."""
    import numba as nb

    g = torch.Generator().manual_seed(4)
    hq, hkv, d = 9, 3, 64
    lengths = [3, 700, 64, 1, 129, 250, 2, 31]
    bufs = [_buffer(g, n, n + 2, hkv, d, dtype) for n in lengths]
    q = torch.randn(len(lengths), hq, 1, d, generator=g).to(dtype)
    att = RowAttention(q, 0.125, dtype)
    for r, (n, b) in enumerate(zip(lengths, bufs, strict=True)):
        att.add(r, b, n, n // 3, rotate=bool(r % 2))
    rows, meta = np.arange(len(lengths), dtype=np.int64), np.asarray(att._meta, np.int64)
    serial = nb.njit(parallel=False)(row_attention._attend_bf16_rows if dtype == torch.bfloat16
                                     else row_attention._attend_f32_rows)
    out = np.zeros_like(att.out)
    serial(att.q, out, rows, meta, att._src, hkv, att.scale)
    att.flush()
    assert row_attention.PARALLEL  # numba's OpenMP layer loads on the machines we serve on
    assert np.array_equal(out.view(np.int32), att.out.view(np.int32))

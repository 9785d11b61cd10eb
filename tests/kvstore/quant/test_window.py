"""The INT8 recent window (`w8`, kvstore/quant/window.py): the stated error bound, a state that is a function of
the tokens alone (chunking, sinks, sealing), and a lossless export -> encode -> decode -> import."""

import numpy as np
import pytest
import torch

from kvstore.codec.kv import decode_kv, encode_kv
from kvstore.config import QuantConfig
from kvstore.quant.cache import QuantizedKVCache
from kvstore.quant.window import FloatWindow, Int8Window

B, H, D = 1, 2, 16


def _kv(n, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)
    k[..., 3] *= 20  # an outlier channel, as real keys have
    return k.to(dtype), v.to(dtype)


def _feed(cache, k, v, chunks, layers=1):
    start = 0
    outs = []
    for n in chunks:
        outs.append([cache.update(k[:, :, start:start + n], v[:, :, start:start + n], i) for i in range(layers)])
        start += n
    return outs


def test_int8_codes_are_within_half_a_step_and_never_clip():
    x = torch.randn(2, 3, 50, 64) * torch.logspace(-3, 3, 50).view(1, 1, 50, 1)
    x[0, 0, 7] = 0  # an all-zero row: scale 0, codes 0, read back exactly
    w = Int8Window.quantize(x)
    assert w.codes.dtype == torch.int8 and w.scale.dtype == torch.float16 and w.scale.shape == (2, 3, 50, 1)
    peak = w.codes.abs().amax(-1)
    peak[0, 0, 7] = 127  # the zero row aside, each row's absmax lands on 126 or 127 (scale rounded up)
    assert int(w.codes.abs().max()) <= 127 and int(peak.min()) >= 126
    s = w.scale.float()
    err = (w.read(torch.float32) - x).abs()
    assert bool((err <= s / 2 * (1 + 1e-6) + x.abs() * 2**-20).all())  # stated bound: half a step
    assert bool((w.read(torch.float32)[0, 0, 7] == 0).all()) and float(w.scale[0, 0, 7]) == 0.0


def test_slice_select_and_cat_act_on_codes():
    x = torch.randn(1, 2, 10, 8)
    w = Int8Window.quantize(x)
    parts = Int8Window.quantize(x[..., :4, :]).cat(Int8Window.quantize(x[..., 4:, :]))
    assert torch.equal(parts.codes, w.codes) and torch.equal(parts.scale, w.scale)  # per-token: chunking-free
    assert torch.equal(w.slice(3).read(torch.float32), w.read(torch.float32)[..., 3:, :])
    idx = torch.tensor([0, 2, 9])
    assert torch.equal(w.select(idx).codes, w.codes[..., idx, :])
    assert torch.equal(w.head(5, torch.float16), w.read(torch.float16)[..., :5, :])
    assert torch.equal(FloatWindow.quantize(x).read(torch.float32), x)  # w16 holds the values as they are


@pytest.mark.parametrize("spec", ["int4:g32:gv16:r40:w8", "int4:k8v4:g32:gv8:r0:w8", "int2:g16:gv16:r33:s4:w8",
                                  "int4:g16:gv8:r24:had:out0.02:w8"])
def test_w8_state_is_chunking_invariant_and_seals_from_the_int8_values(spec):
    q = QuantConfig.parse(spec)
    k, v = _kv(150, 1)
    states = []
    for chunks in ([150], [1] * 150, [7, 60, 1, 1, 81], [33, 33, 33, 51]):
        c = QuantizedKVCache(q, 1)
        _feed(c, k, v, chunks)
        states.append(c.export_state())
    assert all(s.equals(states[0]) for s in states[1:])
    t = states[0].tensor_dict()
    layer = c.layers[0]
    n_win = 150 - q.sinks - layer.n_sealed
    assert t["0.k_win"].dtype == np.int8 and t["0.k_win"].shape == (B, H, n_win, D)
    assert t["0.v_win_scale"].dtype == np.float16 and t["0.v_win_scale"].shape == (B, H, n_win, 1)
    if q.sinks:  # sinks never pass through the window: they are the model's values
        assert np.array_equal(t["0.k_sink"], k[:, :, :q.sinks].numpy())
    # the sealed region is what sealing the dequantized INT8 values gives (the full-precision ones are gone)
    ref = QuantizedKVCache(q.replace(window_bits=16), 1)
    start = q.sinks
    kq = torch.cat([k[:, :, :start], Int8Window.quantize(k[:, :, start:]).read(torch.float32)], dim=-2)
    vq = torch.cat([v[:, :, :start], Int8Window.quantize(v[:, :, start:]).read(torch.float32)], dim=-2)
    _feed(ref, kq, vq, [150])
    sealed = {n: a for n, a in ref.export_state().tensors if "_win" not in n}
    assert all(np.array_equal(sealed[n], t[n]) for n in sealed) and len(sealed) == len(t) - 4


def test_update_returns_the_window_as_read():
    q = QuantConfig.parse("int4:g32:gv16:r16:w8")
    k, v = _kv(80, 2)
    c = QuantizedKVCache(q, 1)
    keys, values = _feed(c, k, v, [80])[0][0]
    n_sealed = c.layers[0].n_sealed
    assert n_sealed == 64
    assert torch.equal(keys[:, :, n_sealed:], Int8Window.quantize(k[:, :, n_sealed:]).read(torch.float32))
    assert torch.equal(values[:, :, n_sealed:], Int8Window.quantize(v[:, :, n_sealed:]).read(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_w8_export_encode_decode_import_is_bit_identical_and_continues_identically(dtype):
    q = QuantConfig.parse("int4:k8v4:g32:gv16:r32:s2:w8")
    k, v = _kv(140, 3, dtype)
    a = QuantizedKVCache(q, 2)
    _feed(a, k[:, :, :100], v[:, :, :100], [37, 63], layers=2)
    state = a.export_state()
    back = decode_kv(encode_kv(state, model_fingerprint="m"), model_fingerprint="m")
    assert back.equals(state)
    b = QuantizedKVCache.from_state(back)
    assert b.export_state().equals(state)
    assert b.layers[0].keys.codes.dtype == torch.int8 and b.layers[0].dtype == dtype
    for layer in range(2):
        ka, va = a.update(k[:, :, 100:], v[:, :, 100:], layer)
        kb, vb = b.update(k[:, :, 100:], v[:, :, 100:], layer)
        assert torch.equal(ka, kb) and torch.equal(va, vb) and ka.dtype == dtype
    assert a.export_state().equals(b.export_state())


def test_w8_window_is_smaller_and_crop_keeps_the_codes():
    k, v = _kv(100, 4)
    sizes = {}
    for spec in ("int4:g32:gv16:r64", "int4:g32:gv16:r64:w8"):
        c = QuantizedKVCache(QuantConfig.parse(spec), 1)
        _feed(c, k, v, [100])
        c.drop_views()
        sizes[spec] = c.state_bytes()
    # window of 68 tokens: float32 rows of 16 -> int8 rows of 16 + one fp16 scale: 64 B -> 18 B per row
    assert sizes["int4:g32:gv16:r64"] - sizes["int4:g32:gv16:r64:w8"] == 2 * B * H * 68 * (64 - 18)
    c = QuantizedKVCache(QuantConfig.parse("int4:g32:gv16:r64:w8"), 1)
    _feed(c, k, v, [100])
    before = c.layers[0].keys.codes.clone()
    c.crop(-5)
    assert c.get_seq_length() == 95 and torch.equal(c.layers[0].keys.codes, before[..., :-5, :])


def test_a_state_with_bad_window_tensors_is_refused():
    q = QuantConfig.parse("int4:g32:gv16:r64:w8")
    c = QuantizedKVCache(q, 1)
    k, v = _kv(40, 5)
    _feed(c, k, v, [40])
    state = c.export_state()
    for bad in (lambda a: a.astype(np.float32), lambda a: np.concatenate([a, a], axis=-1)):
        broken = [(n, bad(a) if n == "0.v_win_scale" else a) for n, a in state.tensors]
        with pytest.raises(ValueError, match="INT8 window"):
            QuantizedKVCache.from_state(type(state)(state.num_tokens, state.quant_spec, state.meta, broken))

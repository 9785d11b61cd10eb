"""The decode view (kvstore/quant/view.py, kept by kvstore/quant/layer.py): K/V handed to attention are
bit-identical with and without it, step after step across sealing, crops, a dropped view rebuilt, new rows
handed over precomputed (`NewRows`, as a batched pass does), and for every spec that keeps one; it is never
exported and is counted in device_bytes only while it exists."""

import pytest
import torch

from kvstore.config import QuantConfig
from kvstore.quant.cache import QuantizedKVCache

SPECS = ["int4:k8v4:g32:r128", "int4:g32:gv32:r16", "int2:k4v2:g16:gv16:r16:s4", "int4:g16:r16:had:hadattn",
         "int4:g16:gv16:r16:out0.02", "int8:g16:r8", "int4:k8v4:g16:r16:hadv", "int:k4v3:g16:gv16:r8:w8:s4",
         "int4:g16:r16:w8:hadv:hadattn", "int4:g16:gv16:r16:w8:s0"]


def _pair(spec):
    q = QuantConfig.parse(spec)
    return QuantizedKVCache(q, 2), QuantizedKVCache(q, 2)


@pytest.mark.parametrize("spec", SPECS)
def test_the_view_hands_attention_the_same_bits_as_a_full_read(spec):
    torch.manual_seed(3)
    viewed, plain = _pair(spec)
    steps = [40, 1, 1, 7, 1, 33, 1, 1, 1, 16] + [1] * 40
    for i, n in enumerate(steps):
        for layer in range(2):
            k, v = torch.randn(1, 2, n, 32), torch.randn(1, 2, n, 32)
            a = viewed.layers[layer].update(k.clone(), v.clone())
            plain.layers[layer].view = None
            b = plain.layers[layer].update(k.clone(), v.clone())
            plain.layers[layer].view = None
            assert all(torch.equal(x, y) for x, y in zip(a, b)), f"step {i}: {spec}"
        if i == 20:
            viewed.drop_views()  # a new call rebuilds the view from the state
    assert viewed.export_state().equals(plain.export_state())


def test_the_view_is_scratch_counted_only_while_it_exists():
    cache, _ = _pair("int4:k8v4:g32:r16")
    for _ in range(3):
        for layer in cache.layers:
            layer.update(torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32))
    assert all(layer.view is not None for layer in cache.layers)
    assert cache.device_bytes() > cache.state_bytes()
    names = [n for n, _ in cache.export_state().tensors]
    cache.drop_views()
    assert cache.device_bytes() == cache.state_bytes()
    assert [n for n, _ in cache.export_state().tensors] == names


@pytest.mark.parametrize("in_pass", [False, True], ids=["outside", "in_a_pass"])  # in a pass: the short way
@pytest.mark.parametrize("spec", ["int:k4v3:g16:gv16:r8:w8:s4", "int4:k8v4:g16:r16", "int4:g16:r16:w8:hadv:hadattn"])
def test_crops_and_precomputed_rows_keep_the_view_exact(spec, in_pass):
    torch.manual_seed(5)
    viewed, plain = _pair(spec)
    with torch.inference_mode(in_pass):
        _crop_and_precompute(viewed, plain, spec)
    assert viewed.export_state().equals(plain.export_state())


def _crop_and_precompute(viewed, plain, spec):
    for i in range(60):
        n = 9 if i % 10 == 0 else 1
        for layer in range(2):
            k, v = torch.randn(3, 2, n, 32), torch.randn(3, 2, n, 32)  # row 1 is this cache's
            lv = viewed.layers[layer]
            new = lv.new_rows(k, v).row(1) if n == 1 and lv.is_initialized else None
            a = lv.update(k[1:2].clone(), v[1:2].clone(), new=new)
            plain.layers[layer].view = None
            b = plain.layers[layer].update(k[1:2].clone(), v[1:2].clone())
            plain.layers[layer].view = None
            assert all(torch.equal(x, y) for x, y in zip(a, b)), f"step {i}: {spec}"
            if i % 7 == 3 and len(lv.keys) > 2:
                lv.crop(-2)
                plain.layers[layer].crop(-2)


def test_a_view_built_in_a_forward_pass_takes_writes_outside_one():
    cache, plain = _pair("int:k4v3:g16:gv16:r8:w8:s4")
    torch.manual_seed(7)
    k, v = torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
    with torch.inference_mode():  # as the model runs
        for layer in cache.layers:
            layer.update(k.clone(), v.clone())
    for layer in plain.layers:
        layer.update(k.clone(), v.clone())
    cache.seal_all()  # adopting a stored prefix seals the window between passes, outside inference mode
    plain.seal_all()
    k2, v2 = torch.randn(1, 2, 1, 32), torch.randn(1, 2, 1, 32)
    for a, b in zip(cache.layers, plain.layers):
        b.view = None
        assert all(torch.equal(x, y) for x, y in zip(a.update(k2.clone(), v2.clone()), b.update(k2.clone(), v2.clone())))
    assert cache.export_state().equals(plain.export_state())


def test_keys_and_values_written_stacked_or_apart_read_back_the_same_across_growth():
    """One buffer holds both sides: `write_both` of [k; v] stacked is `write(k, v)`, growing keeps every row."""
    from kvstore.quant.view import SPARE_MIN, DecodeView

    g = torch.Generator().manual_seed(3)
    k0, v0 = torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    apart, stacked = DecodeView(k0, v0), DecodeView(k0, v0)
    keys, values = [k0], [v0]
    for _ in range(SPARE_MIN + 20):  # past the first capacity
        k, v = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 1, 8, generator=g)
        apart.write(apart.n, k, v)
        got_k, got_v = stacked.append(torch.stack((k, v)))
        keys.append(k)
        values.append(v)
        assert torch.equal(got_k, torch.cat(keys, -2)) and torch.equal(got_v, torch.cat(values, -2))
    assert all(torch.equal(a, b) for a, b in zip(apart.read(), stacked.read(), strict=True))
    stacked.write_both(3, torch.stack((torch.zeros(1, 2, 2, 8), torch.ones(1, 2, 2, 8))))  # an overwrite
    k, v = stacked.read()
    assert bool((k[..., 3:5, :] == 0).all()) and bool((v[..., 3:5, :] == 1).all()) and stacked.n == len(keys) + 4

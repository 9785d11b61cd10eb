"""The decode view (kvstore/quant/layer.py): K/V handed to attention are bit-identical with and without it,
step after step across sealing, after a dropped view is rebuilt, and for every spec that keeps one; it is
never exported and is counted in device_bytes only while it exists."""

import pytest
import torch

from kvstore.config import QuantConfig
from kvstore.quant.cache import QuantizedKVCache

SPECS = ["int4:k8v4:g32:r128", "int4:g32:gv32:r16", "int2:k4v2:g16:gv16:r16:s4", "int4:g16:r16:had:hadattn",
         "int4:g16:gv16:r16:out0.02", "int8:g16:r8", "int4:k8v4:g16:r16:hadv"]


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

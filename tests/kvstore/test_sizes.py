"""Whole-session accounting (kvstore/sizes.py): every tensor counted once, the paper figure equals the measured
one, and the arithmetic of a known case by hand."""

import pytest
import torch

from kvstore.config import QuantConfig
from kvstore.layout import ModelShape
from kvstore.quant.cache import QuantizedKVCache
from kvstore.sizes import part_of, planned_size, state_size

L, H, D = 2, 2, 16


def _state(spec, n, dtype=torch.float32, chunks=None):
    c = QuantizedKVCache(QuantConfig.parse(spec), L)
    g = torch.Generator().manual_seed(n)
    k, v = torch.randn(1, H, n, D, generator=g).to(dtype), torch.randn(1, H, n, D, generator=g).to(dtype)
    start = 0
    for m in chunks or [n]:
        for layer in range(L):
            c.update(k[:, :, start:start + m], v[:, :, start:start + m], layer)
        start += m
    return c.export_state()


@pytest.mark.parametrize("spec", ["int4:g32:gv16:r40", "int4:k8v4:g32:gv16:r40:w8", "int2:g16:gv8:r24:s4:w8",
                                  "int4:k4v2:g16:gv8:r16:out0.02", "int4:g16:gv8:r16:lb8f42", "fp"])
@pytest.mark.parametrize("n,dtype", [(150, torch.float32), (37, torch.bfloat16), (3, torch.float16)])
def test_planned_size_is_the_measured_size(spec, n, dtype):
    state = _state(spec, n, dtype, chunks=[n // 2, n - n // 2] if n > 1 else None)
    measured = state_size(state)
    assert measured.total == state.nbytes  # every tensor once
    assert measured.sealed == sum(a.nbytes for name, a in state.tensors if part_of(name) == "sealed")
    shape = ModelShape.of_state(state)
    assert planned_size(QuantConfig.parse(spec), shape, n) == measured


def test_known_case_by_hand():
    # bf16 model like SmolLM2-135M (30 layers, 3 KV heads, head_dim 64) at 2,048 tokens, int4 g32 gv32 r128:
    # 1,920 sealed tokens at 4 bits + fp16 scale and zero per 32 = 5 bits per element; 128 window tokens
    shape = ModelShape(30, 3, 64, "torch.bfloat16")
    s = planned_size(QuantConfig.parse("int4:g32:gv32:r128"), shape, 2048)
    per_token_16 = 2 * 30 * 3 * 64 * 2  # 23,040 B of bf16 K and V per token
    assert s.kv16_bytes == per_token_16 * 2048
    assert s.sealed == 1920 * per_token_16 * 5 // 16 and s.window == 128 * per_token_16 and s.sinks == 0
    w8 = planned_size(QuantConfig.parse("int4:g32:gv32:r128:w8"), shape, 2048)
    assert w8.window == 128 * 2 * 30 * 3 * (64 + 2)  # int8 codes + one fp16 scale per token and head
    assert w8.sealed == s.sealed and w8.fraction_of_16bit() < s.fraction_of_16bit()
    assert s.bytes_per_token == s.total / 2048 and s.bits_per_element == 8 * s.total / (2 * 30 * 3 * 64 * 2048)


def test_parts():
    assert [part_of(n) for n in ("0.k_sink", "3.v_codes", "3.k_scale", "1.k_win", "1.v_win_scale", "evict.imp")] == [
        "sinks", "sealed", "sealed", "window", "window", "other"]

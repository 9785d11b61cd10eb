import numpy as np
import pytest
import torch

from kvstore.config import QuantConfig
from kvstore.layout import ModelShape, layout
from kvstore.prefix import blocks as blk
from kvstore.quant.cache import QuantizedKVCache

H, D, L = 2, 16, 3


def _cache(spec: str, n: int, chunks: list[int] | None = None, seed: int = 0, dtype=torch.float32):
    q = QuantConfig.parse(spec)
    c = QuantizedKVCache(q, L)
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(1, H, n, D, generator=g).to(dtype), torch.randn(1, H, n, D, generator=g).to(dtype)
    start = 0
    for m in chunks or [n]:
        for layer in range(L):
            c.update(k[:, :, start:start + m], v[:, :, start:start + m], layer)
        start += m
    return c, k, v


def _same(a, b) -> bool:
    ta, tb = a.tensor_dict(), b.tensor_dict()
    return ta.keys() == tb.keys() and all(ta[n].dtype == tb[n].dtype and ta[n].shape == tb[n].shape
                                          and ta[n].tobytes() == tb[n].tobytes() for n in ta)


SPECS = ["int4:g16:gv8:r8", "int4:k8v4:g16:gv16:r0:s3", "int2:g16:gv8:r16:had:out0.02", "int4:k16v4:g16:gv8:r4",
         "fp:g16:r8", "int4:g16:gv8:r8:lb4284f4"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("block_tokens", [16, 32])
def test_split_join_is_bit_exact_and_layout_predicts_blocks(spec, block_tokens):
    c, _, _ = _cache(spec, 101)
    state = c.export_state()
    n = blk.whole_blocks(state, block_tokens)
    assert n >= 2
    shape = ModelShape.of_state(state)
    quant = QuantConfig.parse(spec)
    for k in range(n + 1):
        blocks, tail = blk.split(state, block_tokens, k)
        assert blk.join(blocks, tail).equals(state)
        for i, b in enumerate(blocks):
            assert [(nm, a.dtype, a.shape) for nm, a in b] == layout(quant, shape, block_tokens, i)


def test_blocks_of_a_longer_history_equal_the_shorter_one_s():
    a, _, _ = _cache("int4:g16:gv8:r8", 120, [40, 40, 40])
    b, _, _ = _cache("int4:g16:gv8:r8", 120, [40, 40, 40, ])
    sa, sb = a.export_state(), b.export_state()
    ba, _ = blk.split(sa, 16, 4)
    bb, _ = blk.split(sb, 16, 4)
    assert all(x.tobytes() == y.tobytes() for p, q in zip(ba, bb) for (_, x), (_, y) in zip(p, q))


@pytest.mark.parametrize("spec", ["int4:g16:gv8:r24", "int2:g16:gv8:r24:had:out0.02:s16", "int4:k8v4:g16:gv8:r24:w8",
                                  "int2:g16:gv8:r24:s16:w8"])
def test_prefix_state_is_what_seal_all_leaves(spec):
    q = QuantConfig.parse(spec)
    c, _, _ = _cache(spec, 96, [32, 32, 32])  # canonical chunk passes to S = 96
    c.seal_all()
    state = c.export_state()
    n = blk.whole_blocks(state, 16)
    assert n * 16 + q.sinks == 96 and c.layers[0].keys.shape[-2] == 0
    blocks, _ = blk.split(state, 16, n)
    adopted = blk.prefix_state(blocks, q, ModelShape.of_state(state), 16)
    assert _same(adopted, state) and adopted.meta["layer_forced"] == state.meta["layer_forced"]
    back = QuantizedKVCache.from_state(adopted)
    assert back.get_seq_length() == 96 and back.layers[0].forced == 96 - q.sinks


def test_sealing_groups_together_or_one_by_one_gives_the_same_bits():
    # rotation and outliers reduce over many elements: the layer seals them group by group
    spec = "int2:g16:gv8:r0:had:out0.02"
    together, _, _ = _cache(spec, 64, [64])
    apart, _, _ = _cache(spec, 64, [16, 16, 16, 16])
    assert _same(together.export_state(), apart.export_state())


def test_bfloat16_blocks_round_trip():
    c, _, _ = _cache("int4:k16v4:g16:gv8:r8:s2", 70, dtype=torch.bfloat16)
    state = c.export_state()
    shape = ModelShape.of_state(state)
    assert shape.dtype == "torch.bfloat16" and shape.numpy_dtype == np.int16
    blocks, tail = blk.split(state, 16, 3)
    assert blk.join(blocks, tail).equals(state)
    assert [(n, a.dtype, a.shape) for n, a in blocks[0]] == layout(QuantConfig.parse("int4:k16v4:g16:gv8:r8:s2"), shape, 16, 0)


def test_split_refuses_bad_requests():
    c, _, _ = _cache("int4:g16:gv8:r8", 60)
    state = c.export_state()
    with pytest.raises(ValueError, match="multiple of key_group"):
        blk.split(state, 24, 1)
    with pytest.raises(ValueError, match="whole blocks"):
        blk.split(state, 16, blk.whole_blocks(state, 16) + 1)
    blocks, tail = blk.split(state, 16, 2)
    with pytest.raises(ValueError, match="expects 2 blocks"):
        blk.join(blocks[:1], tail)
